"""Speedrun data loaders on small synthetic FineWeb shards (written with prepare_data)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import prepare_data
import train_speedrun as ts

BOS = prepare_data.BOS_TOKEN
HYPO = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make_docs(lengths, seed=0):
    """Documents as the record's shards hold them: BOS, then tokens that are never BOS."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[BOS], rng.integers(0, BOS, size=n - 1)]).astype(np.uint16) for n in lengths]


def write_shards(folder, docs_per_shard, prefix="train"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, docs in enumerate(docs_per_shard):
        prepare_data.write_fineweb_shard(folder / f"{prefix}_{i:06d}.bin", np.concatenate(docs))
    return str(folder / f"{prefix}_*.bin")


def take_all(loader, n, batch_size=None):
    out = []
    for _ in range(n):
        inputs, targets, cu, *_ = loader.next_batch(batch_size) if batch_size else loader.next_batch()
        out.append((inputs.numpy(), targets.numpy(), cu.numpy()))
    return out


def expected_runs(docs, tokens_per_rank, max_seq_len, count):
    """Independent re-statement of the record's batching: fill runs of tokens_per_rank + 1 tokens
    with document prefixes (<= max_seq_len), cutting the last one to fit."""
    runs, d = [], 0
    for _ in range(count):
        pieces, need = [], tokens_per_rank + 1
        while need > 0:
            piece = docs[d][:min(max_seq_len, need)]
            pieces.append(piece)
            need -= len(piece)
            d += 1
        runs.append(pieces)
    return runs


doc_lengths = st.lists(st.integers(1, 150), min_size=60, max_size=120)


@settings(**HYPO)
@given(doc_lengths, st.sampled_from([16, 32, 64]), st.sampled_from([16, 48, 64]))
def test_bos_aligned_batches_match_the_record_rules(tmp_path_factory, lengths, max_seq_len, per_rank):
    docs = make_docs(lengths)
    pattern = write_shards(tmp_path_factory.mktemp("d"), [docs])
    usable = sum(min(n, max_seq_len) for n in lengths)
    count = usable // (per_rank + 1 + max_seq_len)         # a run may waste the rest of its cut piece
    assume(count >= 1)
    loader = ts.BosAlignedLoader(pattern, per_rank * 8, max_seq_len, grad_accum_steps=8)
    for (inputs, targets, cu), pieces in zip(take_all(loader, count), expected_runs(docs, per_rank, max_seq_len, count)):
        buf = np.concatenate(pieces)
        assert len(inputs) == per_rank and np.array_equal(inputs, buf[:-1]) and np.array_equal(targets, buf[1:])
        assert inputs.dtype == np.int32 and targets.dtype == np.int64 and cu.dtype == np.int32
        assert len(cu) == ts.cu_seqlens_slots(per_rank) and cu[0] == 0
        assert np.all(np.diff(cu) >= 0)                                  # monotone
        real = len(pieces)
        assert np.all(cu[real:] == per_rank)                             # padding repeats the end
        starts = cu[:real][cu[:real] < per_rank]     # a last piece can be just the extra target token
        assert np.all(inputs[starts] == BOS)                             # every document starts at BOS
        assert np.sum(inputs == BOS) == len(starts)                      # ... and only there
        assert np.all(np.diff(cu[:real + 1]) <= max_seq_len)             # no piece longer than the max


@settings(**HYPO)
@given(doc_lengths, st.sampled_from([16, 32]))
def test_same_token_stream_for_every_world_size(tmp_path_factory, lengths, per_rank):
    docs = make_docs(lengths, seed=1)
    pattern = write_shards(tmp_path_factory.mktemp("d"), [docs])
    steps = sum(min(n, 32) for n in lengths) // (8 * (per_rank + 1 + 32))
    assume(steps >= 1)
    batch = per_rank * 8
    single = take_all(ts.BosAlignedLoader(pattern, batch, 32, grad_accum_steps=8), 8 * steps)
    for world in (2, 4, 8):
        accum = 8 // world
        per_rank_batches = [take_all(ts.BosAlignedLoader(pattern, batch, 32, accum, rank, world), accum * steps)
                            for rank in range(world)]
        for k in range(accum * steps):
            for rank in range(world):
                got, want = per_rank_batches[rank][k], single[k * world + rank]
                assert all(np.array_equal(a, b) for a, b in zip(got, want)), (world, rank, k)


def test_batch_size_change_takes_effect_at_once(tmp_path):
    docs = make_docs([40] * 200)
    pattern = write_shards(tmp_path, [docs])
    loader = ts.BosAlignedLoader(pattern, 16 * 8, 64, grad_accum_steps=8)
    assert len(loader.next_batch()[0]) == 16
    assert len(loader.next_batch(32 * 8)[0]) == 32
    assert len(loader.next_batch(32 * 8)[0]) == 32
    with pytest.raises(SystemExit, match="multiple of 16"):
        loader.next_batch(24 * 8)


def test_max_seq_len_change_takes_effect_at_once(tmp_path):
    """Record #72's stage change: the loader cuts documents at the new length from the next batch."""
    pattern = write_shards(tmp_path, [make_docs([100] * 200)])
    loader = ts.BosAlignedLoader(pattern, 64 * 8, 64, grad_accum_steps=8)
    pieces = lambda batch: np.diff(batch.cu_seqlens.numpy())
    assert pieces(loader.next_batch()).max() == 64
    short = loader.next_batch(None, 16)
    assert loader.max_seq_len == 16 and 0 < pieces(short).max() <= 16
    assert pieces(loader.next_batch(64 * 8, 48)).max() == 48


def test_next_shard_loads_in_background_and_tail_is_dropped(tmp_path):
    shard_a, shard_b = make_docs([30] * 10, seed=2), make_docs([30] * 10, seed=3)
    pattern = write_shards(tmp_path, [shard_a, shard_b])
    loader = ts.BosAlignedLoader(pattern, 64 * 8, 64, grad_accum_steps=8)
    got = take_all(loader, 6)
    # a run of 65 tokens takes 3 documents of 30 (the third cut): 3 runs per shard, 1 doc left over
    want = expected_runs(shard_a, 64, 64, 3) + expected_runs(shard_b, 64, 64, 3)
    for (inputs, _, _), pieces in zip(got, want):
        assert np.array_equal(inputs, np.concatenate(pieces)[:-1])
    assert loader.shards_used == 2
    with pytest.raises(SystemExit, match="ran out after 2 shard"):
        loader.next_batch()


def test_quick_index_then_full_index_gives_the_same_stream(tmp_path, monkeypatch):
    docs = make_docs(np.random.default_rng(4).integers(1, 90, size=300))
    pattern = write_shards(tmp_path, [docs])
    full = take_all(ts.BosAlignedLoader(pattern, 32 * 8, 64, 8), 100)
    monkeypatch.setattr(ts, "QUICK_INDEX_TOKENS", 200)     # the quick index runs out after ~4 docs
    quick = take_all(ts.BosAlignedLoader(pattern, 32 * 8, 64, 8), 100)
    for a, b in zip(full, quick):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_too_many_documents_for_cu_seqlens_is_a_clear_error(tmp_path):
    pattern = write_shards(tmp_path, [make_docs([2] * 400)])
    loader = ts.BosAlignedLoader(pattern, 512 * 8, 64, grad_accum_steps=8)   # 128 slots, ~256 docs
    with pytest.raises(SystemExit, match="join short documents"):
        loader.next_batch()


def test_missing_and_corrupt_shards_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="no train shards match"):
        ts.BosAlignedLoader(str(tmp_path / "nothing_*.bin"), 128, 64, 8)
    with pytest.raises(SystemExit, match="no val shards match"):
        ts.SequentialLoader(str(tmp_path / "nothing_*.bin"), 128, 8)
    bad = tmp_path / "train_000000.bin"
    bad.write_bytes(np.arange(600, dtype="<i4").tobytes())            # wrong magic
    with pytest.raises(SystemExit, match="error: .*magic"):
        ts.BosAlignedLoader(str(tmp_path / "train_*.bin"), 128, 64, 8)
    good = make_docs([50] * 20)
    prepare_data.write_fineweb_shard(tmp_path / "val_000000.bin", np.concatenate(good))
    with open(tmp_path / "val_000000.bin", "ab") as f:
        f.write(b"\0\0\0\0")                                            # more tokens than the header says
    with pytest.raises(SystemExit, match="error: "):
        ts.SequentialLoader(str(tmp_path / "val_*.bin"), 128, 8)


@settings(**HYPO)
@given(st.lists(st.integers(1, 300), min_size=20, max_size=60), st.sampled_from([1, 2, 4, 8]))
def test_validation_batches_are_contiguous_rank_slices(tmp_path_factory, lengths, world):
    docs = make_docs(lengths, seed=5)
    stream = np.concatenate(docs)
    pattern = write_shards(tmp_path_factory.mktemp("v"), [docs], prefix="val")
    batch = 16 * 8 * 8                                     # 128 tokens per micro-batch, all ranks
    accum = 8 // world
    per_rank = batch // accum // world
    micro = batch // accum
    count = (len(stream) - 1) // micro - 1
    if count < 1:
        return
    for rank in range(world):
        loader = ts.SequentialLoader(pattern, batch, accum, rank, world)
        for k in range(count):
            inputs, targets, cu = (t.numpy() for t in loader.next_batch()[:3])
            start = k * micro + rank * per_rank
            assert np.array_equal(inputs, stream[start:start + per_rank])
            assert np.array_equal(targets, stream[start + 1:start + per_rank + 1])
            bos = np.flatnonzero(inputs == BOS)
            assert cu[0] == 0 and np.array_equal(cu[1:len(bos) + 1], bos) and np.all(cu[len(bos) + 1:] == per_rank)


def test_validation_running_out_is_a_clear_error(tmp_path):
    pattern = write_shards(tmp_path, [make_docs([100] * 5)], prefix="val")    # 500 tokens
    loader = ts.SequentialLoader(pattern, 128 * 8, 8)
    take_all(loader, 2)
    with pytest.raises(SystemExit, match="ran out; lower --val_tokens"):
        take_all(loader, 3)


def test_cu_seqlens_slots_like_the_record():
    # record #78: the three training micro-batch sizes (tokens per rank) get their own counts
    assert [ts.cu_seqlens_slots(n) for n in (16384, 32768, 49152)] == [64, 96, 128]
    # elsewhere (validation, --smoke): the next multiple of 128 of tokens // 300, at least 128
    assert ts.cu_seqlens_slots(262144) == 896
    assert ts.cu_seqlens_slots(65536) == 256
    assert ts.cu_seqlens_slots(16) == 128


def test_record_stage_one_micro_batch_with_too_many_documents_is_a_clear_error(tmp_path):
    """A stage-1 micro-batch (16384 tokens per rank at 8 ranks) has 64 slots since record #78:
    63 documents fit, 64 do not."""
    for docs, fits in ((63, True), (64, False)):
        length = 16384 // docs + 1                      # docs documents cover the micro-batch
        pattern = write_shards(tmp_path / str(docs), [make_docs([length] * (docs + 8))])
        loader = ts.BosAlignedLoader(pattern, 16384 * 8, 2048, grad_accum_steps=8)
        if fits:
            assert len(loader.next_batch().cu_seqlens) == 64
        else:
            with pytest.raises(SystemExit, match="more than the 63"):
                loader.next_batch()


# ---- record #71: bigram rows hashed on the host by the training loader ----

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50256), min_size=1, max_size=300), st.sampled_from([50304 * 5, 50304, 1031, 2]))
def test_host_bigram_rows_equal_the_models_hash(tokens, table_size):
    import torch
    tokens = np.array(tokens, dtype=np.uint16)
    host = ts.bigram_rows_host(tokens, table_size)
    device = ts.bigram_hash(torch.from_numpy(tokens.astype(np.int32)), table_size)
    assert host.dtype == np.int32 and np.array_equal(host, device.numpy())
    assert host[0] == table_size - 1 and np.all((host >= 0) & (host < table_size))


def test_training_loader_hands_the_bigram_rows_and_the_model_uses_them(tmp_path):
    import torch
    pattern = write_shards(tmp_path, [make_docs([40, 70, 30, 90, 50, 60] * 6)])
    loader = ts.BosAlignedLoader(pattern, 8 * 64, 64, 8, bigram_table_size=1031)
    batch = loader.next_batch()
    assert torch.equal(batch.bigram_rows, ts.bigram_hash(batch.inputs, 1031))
    assert np.array_equal(batch.bigram_rows_host, batch.bigram_rows.numpy())
    assert ts.BosAlignedLoader(pattern, 8 * 64, 64, 8).next_batch().bigram_rows is None
    torch.manual_seed(0)
    model = ts.GPT(ts.ModelConfig.smoke(attn_backend="sdpa", compile_mode="none", bigram_vocab_size=1031,
                                        max_seq_len=512, val_max_len=512))
    with torch.no_grad():
        model.bigram_embed.weight.normal_()          # zero-initialised: make the rows matter
    sched = ts.ForwardScheduleConfig(torch.tensor([1.0, 0.5]), 128, 384)
    given_rows = model(batch.inputs, batch.targets, batch.cu_seqlens, sched, batch.bigram_rows)
    hashed_here = model(batch.inputs, batch.targets, batch.cu_seqlens, sched)
    shifted = model(batch.inputs, batch.targets, batch.cu_seqlens, sched, (batch.bigram_rows + 1) % 1031)
    assert torch.equal(given_rows, hashed_here) and not torch.equal(given_rows, shifted)
