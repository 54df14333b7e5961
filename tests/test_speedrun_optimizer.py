"""NorMuonAndAdam: single steps against straightforward implementations, the bf16 mantissa
trick, the odd-step Adam cadence, embed/lm_head tying, state handling and rank sharding."""
import os
import socket

import pytest
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings, strategies as st

import train_speedrun as ts


# ---- a tiny parameter set carrying every label of the record's table ----

def tiny_params(dtype_banks=torch.float32, seed=0, d=8, vocab=16):
    """Real labels and .reshape attributes, record-like layouts at toy sizes."""
    g = torch.Generator().manual_seed(seed)
    def p(*shape, dtype=torch.float32, label):
        t = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.5).to(dtype))
        t.label = label
        return t
    qk = p(8, 4, d, dtype=dtype_banks, label="qk")      # wide, like the record's (256, 768) blocks
    qk.reshape = (8, 4, d)
    vo = p(4, d, d, dtype=dtype_banks, label="vo")
    vo.reshape = (4, d, d)
    mlp = p(2, 2, 4 * d, d, dtype=dtype_banks, label="mlp")
    mlp.reshape = (4, 4 * d, d)
    params = [qk, vo, mlp,
              p(6, label="scalars"), p(2 * vocab, d, label="value_embed"), p(2 * vocab, d, label="bigram_embed"),
              p(1, 12, label="smear_gate"),
              p(2, 2, 12, label="ve_gate_bank"), p(d, vocab, label="lm_head"),
              p(11, 2, label="post_lambdas"), p(11, 2, label="resid_lambdas"),
              p(vocab, d, label="embed"), p(2, 4, d, label="mudd_w1"), p(2, 14, 4, label="mudd_w2"),
              p(2, 14, label="mudd_b2"), p(2, 4, d, label="mudd_gate_w1"), p(2, 41, 4, label="mudd_gate_w2"),
              p(2, 41, label="mudd_gate_b2"), p(label="mudd_gate_scale")]
    return [(q.label, q) for q in params]


def random_grads(named, seed):
    g = torch.Generator().manual_seed(seed)
    return {label: torch.randn(q.shape, generator=g).to(q.dtype) for label, q in named}


def set_grads(named, grads):
    for label, q in named:
        q.grad = grads[label].clone()


# ---- straightforward implementations to compare with ----

def textbook_adam(p, g, m, v, t, lr, b1, b2, eps, wd):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    update = lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    update = update + torch.where(update * p > 0, lr * lr * wd * p, torch.zeros_like(p))
    return p - update, m, v


def textbook_normuon(p, g, buf, v2, momentum, lr, wd, beta2, lr_ratio):
    """p, g: (n, r, c) fp64. One NorMuon step from the given momentum/second-moment state."""
    buf = momentum * buf + (1 - momentum) * g
    blended = momentum * buf + (1 - momentum) * g
    o = exact_polar(blended)
    r, c = o.shape[-2:]
    dim = -1 if r >= c else -2
    ms = o.square().mean(dim=dim, keepdim=True)
    v2 = beta2 * v2 + (1 - beta2) * ms
    scaled = o / v2.clamp_min(1e-10).sqrt()
    scaled = scaled * (o.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True))
    eff_lr = lr * max(1.0, r / c) ** 0.5 * lr_ratio
    decay = torch.where(scaled * p >= 0, p * wd * lr, torch.zeros_like(p))
    return p - eff_lr * (scaled + decay), buf, v2


def exact_polar(G, split_baddbmm=False):
    """U V^T from an fp64 SVD: the exact polar factor Polar Express approximates."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).to(G.dtype)


def test_adam_single_steps_match_textbook():
    named = tiny_params()
    opt = ts.NorMuonAndAdam(named)
    opt.set_schedule(lr_multiplier=1.3, muon_momentum_value=0.9)
    label = "value_embed"
    q = dict(named)[label]
    cfg = ts.PARAM_TABLE[label]
    p = q.detach().double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    lr = 0.008 * 1.3 * cfg["lr_mul"]
    for t in (1, 2, 3):
        grads = random_grads(named, seed=t)
        set_grads(named, grads)
        opt.step(do_adam=True)
        p, m, v = textbook_adam(p, grads[label].double(), m, v, t, lr, *cfg["betas"], 1e-10,
                                0.005 * cfg["wd_mul"])
        torch.testing.assert_close(q.detach().double(), p, rtol=1e-5, atol=1e-6)
    assert opt.state[q]["step"] == 3


@pytest.mark.parametrize("label", ["qk", "vo", "mlp"])
def test_normuon_single_steps_match_textbook(label, monkeypatch):
    # exact orthogonalization on both sides, so only the NorMuon arithmetic is compared
    monkeypatch.setattr(ts, "polar_express", exact_polar)
    named = tiny_params()
    opt = ts.NorMuonAndAdam(named)
    q = dict(named)[label]
    n, r, c = q.reshape
    lr_ratio = torch.tensor([2.0 if (i % 2 and label == "mlp") else 1.0 for i in range(n)]).view(n, 1, 1).double()
    p = q.detach().double().view(n, r, c).clone()
    buf = torch.zeros_like(p)
    # second moment per row of a square or tall matrix, per column of a wide one (qk)
    v2 = torch.zeros((n, r, 1) if r >= c else (n, 1, c), dtype=torch.float64)
    for step, (lr_mul, mom) in enumerate([(1.0, 0.85), (0.7, 0.9), (0.5, 0.95)]):
        grads = random_grads(named, seed=10 + step)
        set_grads(named, grads)
        opt.set_schedule(lr_multiplier=lr_mul, muon_momentum_value=mom)
        opt.step(do_adam=False)
        p, buf, v2 = textbook_normuon(p, grads[label].double().view(n, r, c), buf, v2, mom, 0.023 * lr_mul,
                                      1.2, 0.9, lr_ratio)   # beta2 0.9 since record #78
        torch.testing.assert_close(q.detach().double().view(n, r, c), p, rtol=1e-5, atol=1e-6)
        assert q.grad is None


def test_polar_express_close_to_exact_polar_factor():
    # the optimizer's orthogonalizer: singular values pushed near 1, directions of U V^T
    torch.manual_seed(0)
    for shape in [(3, 32, 32), (2, 64, 16), (2, 16, 64)]:
        G = torch.randn(shape)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        exact = U @ Vh
        approx = ts.polar_express(G).float()
        cos = (approx * exact).sum(dim=(-2, -1)) / (approx.norm(dim=(-2, -1)) * exact.norm(dim=(-2, -1)))
        assert (cos > 0.98).all(), cos
        sv = torch.linalg.svdvals(approx)
        assert sv.max() < 1.3 and sv.min() > 0.5


def reconstruct_fp32(p_bf16, mantissa):
    high = p_bf16.view(torch.int16).to(torch.int32) << 16
    low = mantissa.view(torch.int16).to(torch.int32) & 0xFFFF
    return (high | low).view(torch.float32)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-6, 1e-1), st.floats(0.0, 2.0))
def test_cautious_update_bf16_is_exact_fp32_update(seed, lr, wd):
    g = torch.Generator().manual_seed(seed)
    precise = torch.randn(64, generator=g) * 3
    bf16 = precise.bfloat16()                       # truncate, keep the low bits in the mantissa
    bits = precise.view(torch.int32)
    bf16 = (bits >> 16).to(torch.int16).view(torch.bfloat16).clone()
    mantissa = bits.to(torch.int16).view(torch.uint16).clone()
    assert torch.equal(reconstruct_fp32(bf16, mantissa), precise)
    update = torch.randn(64, generator=g)
    lr_t, wd_t = torch.tensor(lr), torch.tensor(wd)
    expected = precise.clone()
    ts.cautious_update_fp32_(expected, update, wd_t, lr_t)
    ts.cautious_update_bf16_(bf16, mantissa, update, wd_t, lr_t)
    assert torch.equal(reconstruct_fp32(bf16, mantissa), expected)


def test_bf16_banks_follow_the_fp32_trajectory_exactly():
    """With the mantissa buffer a bf16 bank loses nothing: same steps as an fp32 bank."""
    named16 = tiny_params(dtype_banks=torch.bfloat16)
    named32 = [(label, torch.nn.Parameter(q.detach().float().clone())) for label, q in named16]
    for (label, q32), (_, q16) in zip(named32, named16):
        q32.label = label
        if hasattr(q16, "reshape") and isinstance(q16.reshape, tuple):
            q32.reshape = q16.reshape
    opt16, opt32 = ts.NorMuonAndAdam(named16), ts.NorMuonAndAdam(named32)
    for step in range(4):
        grads = random_grads(named16, seed=100 + step)
        set_grads(named16, grads)
        set_grads(named32, {k: v.float() for k, v in grads.items()})
        for opt in (opt16, opt32):
            opt.set_schedule(1.0, 0.9)
            opt.step(do_adam=False)
    for label in ("qk", "vo", "mlp"):
        q16, q32 = dict(named16)[label], dict(named32)[label]
        mantissa = opt16.state[q16]["mantissa"].view(q16.shape)
        assert torch.equal(reconstruct_fp32(q16.detach(), mantissa), q32.detach())


def test_adam_only_on_odd_steps_and_grads_accumulate_meanwhile():
    named = tiny_params()
    opt = ts.NorMuonAndAdam(named)
    before = {label: q.detach().clone() for label, q in named}
    set_grads(named, random_grads(named, seed=1))
    opt.step(do_adam=False)
    for label, q in named:
        if label in ("qk", "vo", "mlp"):
            assert q.grad is None and not torch.equal(q.detach(), before[label])
        else:
            assert q.grad is not None and torch.equal(q.detach(), before[label])
            assert opt.state[q]["step"] == 0
    opt.step(do_adam=True)
    assert all(q.grad is None for _, q in named)
    assert all(opt.state[q]["step"] == 1 for label, q in named if label not in ("qk", "vo", "mlp", "embed"))


def test_tied_embed_follows_lm_head_until_split():
    named = tiny_params()
    params = dict(named)
    lm, embed = params["lm_head"], params["embed"]
    with torch.no_grad():
        embed.copy_(lm.T)
    opt = ts.NorMuonAndAdam(named)
    grads = random_grads(named, seed=5)
    set_grads(named, grads)
    p = lm.detach().double().clone()
    opt.step(do_adam=True)
    cfg = ts.PARAM_TABLE["lm_head"]
    combined = grads["lm_head"].double() + grads["embed"].double().T   # embed's grad rides on lm_head
    expected, _, _ = textbook_adam(p, combined, 0 * p, 0 * p, 1, 0.008, *cfg["betas"], 1e-10, 0.005 * cfg["wd_mul"])
    torch.testing.assert_close(lm.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(embed.detach(), lm.detach().T)
    assert opt.state[embed]["step"] == 0

    opt.copy_lm_state_to_embed()
    assert opt.split_embed and opt.state[embed]["step"] == 1
    assert torch.equal(opt.state[embed]["exp_avg"], opt.state[lm]["exp_avg"].T)
    assert torch.equal(opt.state[embed]["exp_avg_sq"], opt.state[lm]["exp_avg_sq"].T)
    set_grads(named, random_grads(named, seed=6))
    opt.step(do_adam=True)
    assert not torch.equal(embed.detach(), lm.detach().T)        # untied: separate updates now
    assert opt.state[embed]["step"] == 2


def test_state_dict_round_trip_and_reset():
    named = tiny_params()
    opt = ts.NorMuonAndAdam(named)
    initial = opt.state_dict()
    for step in range(3):
        set_grads(named, random_grads(named, seed=step))
        opt.step(do_adam=step % 2 == 1)
    opt.copy_lm_state_to_embed()
    saved = opt.state_dict()
    opt.load_state_dict(initial)
    opt.reset()
    assert not opt.split_embed
    for label, q in named:
        for key, value in opt.state[q].items():
            if key == "lr_ratio":
                continue
            assert (value == 0).all() if torch.is_tensor(value) else value == 0, (label, key)
    opt.load_state_dict(saved)
    assert opt.split_embed
    for label, q in named:
        for key, value in opt.state[q].items():
            want = saved["states"][label][key]
            assert torch.equal(value, want) if torch.is_tensor(value) else value == want


def test_bad_labels_are_errors():
    named = tiny_params()
    named[0][1].label = "nope"
    with pytest.raises(ValueError, match="label"):
        ts.NorMuonAndAdam(named)
    with pytest.raises(ValueError, match="differ"):
        ts.NorMuonAndAdam(tiny_params()[:-1])


# ---- sharding over ranks ----

RECORD_SHAPES = {   # the record's parameter shapes (world size 8 pads qk to 64, vo to 24; scalars are 24)
    "qk": ((64, 256, 768), (64, 256, 768)), "vo": ((24, 768, 768), (24, 768, 768)),
    "mlp": ((12, 2, 3072, 768), (24, 3072, 768)),
    "scalars": ((24,), None), "value_embed": ((5 * 50304, 768), None), "bigram_embed": ((50304 * 15 // 2, 768), None),
    "smear_gate": ((1, 12), None),
    "ve_gate_bank": ((5, 6, 12), None), "post_lambdas": ((11, 2), None),
    "resid_lambdas": ((11, 2), None), "lm_head": ((768, 50304), None),
    "embed": ((50304, 768), None),
    "mudd_w1": ((2, 64, 768), None), "mudd_w2": ((2, 14, 64), None), "mudd_b2": ((2, 14), None),
    "mudd_gate_w1": ((2, 64, 768), None), "mudd_gate_w2": ((2, 41, 64), None), "mudd_gate_b2": ((2, 41), None),
    "mudd_gate_scale": ((), None),
}


def meta_record_params():
    out = []
    for label, (shape, reshape) in RECORD_SHAPES.items():
        q = torch.nn.Parameter(torch.empty(shape, device="meta"))
        q.label = label
        if reshape:
            q.reshape = reshape
        out.append((label, q))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_record_bank_sharding_shapes_per_rank(world_size):
    covered = {"qk": [], "vo": [], "mlp": []}
    for rank in range(world_size):
        opt = ts.NorMuonAndAdam(meta_record_params(), world_size=world_size, rank=rank)
        for label, q in opt.by_label.items():
            cfg, state = opt.settings[q], opt.state[q]
            expect_comms = ts.PARAM_TABLE[label]["comms"] if world_size > 1 else "none"
            assert cfg.comms == expect_comms
            if cfg.optim == "normuon":
                n, r, c = q.reshape
                assert cfg.chunk_size * world_size == n
                assert state["momentum_buffer"].shape == (n // world_size, r, c)
                moment = (n // world_size, r, 1) if r >= c else (n // world_size, 1, c)   # qk: wide
                assert state["second_moment"].shape == moment
                assert cfg.lr_mul == (2.0 if label == "mlp" else 1.0)             # sqrt(3072/768)
                covered[label] += range(rank * cfg.chunk_size, (rank + 1) * cfg.chunk_size)
            elif cfg.comms in ("sharded", "sparse"):     # sparse: bigram_embed since record #71
                assert state["exp_avg"].shape == (q.shape[0] // world_size, *q.shape[1:])
            else:
                assert state["exp_avg"].shape == q.shape
    assert {label: sorted(rows) for label, rows in covered.items()} == \
        {"qk": list(range(64)), "vo": list(range(24)), "mlp": list(range(24))}


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_mlp_c_proj_matrices_get_double_lr_on_every_rank(world_size):
    ratios = []
    for rank in range(world_size):
        opt = ts.NorMuonAndAdam(tiny_params_for_ranks(), world_size=world_size, rank=rank)
        ratios += opt.state[opt.by_label["mlp"]]["lr_ratio"].flatten().tolist()
    assert ratios == [1.0, 2.0] * 12      # bank order c_fc, c_proj, c_fc, ... over all ranks


def tiny_params_for_ranks():
    """Toy banks with the record's matrix counts at 8 ranks (64 qk, 24 vo, 24 mlp) so every world
    size divides."""
    named = tiny_params(d=8, vocab=8)
    params = dict(named)
    qk = torch.nn.Parameter(torch.zeros(64, 4, 8))
    qk.label, qk.reshape = "qk", (64, 4, 8)
    vo = torch.nn.Parameter(torch.zeros(24, 8, 8))
    vo.label, vo.reshape = "vo", (24, 8, 8)
    mlp = torch.nn.Parameter(torch.zeros(12, 2, 32, 8))
    mlp.label, mlp.reshape = "mlp", (24, 32, 8)
    params["qk"], params["vo"], params["mlp"] = qk, vo, mlp
    return list(params.items())


def test_rows_not_divisible_by_world_size_is_an_error():
    named = tiny_params()
    with pytest.raises(ValueError, match="do not split"):
        ts.NorMuonAndAdam(named, world_size=3)


# ---- two real ranks (gloo) give the world-size-1 result on the averaged gradient ----

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_steps(opt, named, grads_per_step):
    for step, grads in enumerate(grads_per_step):
        set_grads(named, grads)
        # dense gradients: every row of the sparse table counts as touched
        opt.note_touched_rows("bigram_embed", np.arange(grads["bigram_embed"].shape[0]))
        opt.set_schedule(1.0, 0.9)
        opt.step(do_adam=ts.is_adam_step(step))
        if step == 1:
            opt.copy_lm_state_to_embed()


def _rank_grads(step, rank):
    """Per-rank gradients whose average over the two ranks is exact in fp32."""
    base = random_grads(tiny_params(), seed=200 + step)
    delta = random_grads(tiny_params(), seed=300 + step)
    return {k: base[k] + (delta[k] if rank == 0 else -delta[k]) for k in base}


def _gloo_worker(rank, world_size, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        named = tiny_params()
        opt = ts.NorMuonAndAdam(named, world_size=world_size, rank=rank)
        _run_steps(opt, named, [_rank_grads(step, rank) for step in range(4)])
        if rank == 0:
            torch.save({label: q.detach().clone() for label, q in named}, out_path)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_world_size_one(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_gloo_worker, args=(2, _free_port(), str(out)), nprocs=2)
    named = tiny_params()
    start = {label: q.detach().clone() for label, q in named}
    opt = ts.NorMuonAndAdam(named)
    averaged = [{k: (a + b) / 2 for (k, a), b in zip(_rank_grads(s, 0).items(), _rank_grads(s, 1).values())}
                for s in range(4)]
    _run_steps(opt, named, averaged)
    got = torch.load(out)
    for label, q in named:
        assert not torch.equal(q.detach(), start[label]), label      # every parameter moved
        torch.testing.assert_close(got[label], q.detach(), rtol=1e-4, atol=1e-6, msg=label)


# ---- record #71: the sparse exchange of a table's gradient equals the dense reduce-scatter ----

def _sparse_rank_grads(step, rank, rows, width, world_size):
    """Each rank touches its own random rows (some shared, some owned by other ranks) over two
    steps; grads are zero elsewhere, as an embedding's backward leaves them. Returns
    (touched rows per step, grads per step)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    touched = torch.randperm(rows, generator=g)[: rows // 3].numpy()
    touched = np.concatenate([touched, [0, rows - 1]])        # every rank touches the first and last row
    grad = torch.zeros(rows, width)
    grad[touched] = torch.randn(len(touched), width, generator=g)
    return touched, grad


def _sparse_worker(rank, world_size, port, comms, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        table = dict(ts.PARAM_TABLE, bigram_embed=dict(ts.PARAM_TABLE["bigram_embed"], comms=comms))
        ts.PARAM_TABLE.clear()
        ts.PARAM_TABLE.update(table)
        named = tiny_params(d=8, vocab=24)            # bigram_embed: 48 rows, splits over 2 and 4 ranks
        opt = ts.NorMuonAndAdam(named, world_size=world_size, rank=rank)
        rows, width = named[4][1].shape
        for step in range(4):                         # Adam runs on steps 1 and 3 with two steps of grads
            grads = random_grads(named, seed=500 + step)
            touched, grads["bigram_embed"] = _sparse_rank_grads(step, rank, rows, width, world_size)
            for label, q in named:
                q.grad = grads[label].clone() if q.grad is None or label != "bigram_embed" else q.grad + grads[label]
            opt.note_touched_rows("bigram_embed", touched)
            opt.set_schedule(1.0, 0.9)
            opt.step(do_adam=ts.is_adam_step(step))
        if rank == 0:
            torch.save({label: q.detach().clone() for label, q in named}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_sparse_table_exchange_equals_dense_reduce_scatter(tmp_path, world_size):
    results = {}
    for comms in ("sparse", "sharded"):
        out = tmp_path / f"{comms}.pt"
        mp.spawn(_sparse_worker, args=(world_size, _free_port(), comms, str(out)), nprocs=world_size)
        results[comms] = torch.load(out)
    start = dict(tiny_params(d=8, vocab=24))["bigram_embed"]
    assert not torch.equal(results["sparse"]["bigram_embed"], start)
    for label, dense in results["sharded"].items():
        torch.testing.assert_close(results["sparse"][label], dense, rtol=1e-6, atol=1e-7, msg=label)


def test_touched_rows_survive_a_checkpoint_and_not_a_reset():
    """An even step's touched rows are pending like its Adam gradient: a checkpoint keeps them."""
    named = tiny_params(d=8, vocab=24)
    opt = ts.NorMuonAndAdam(named, world_size=2)      # (one rank's view; no exchange is run)
    opt.note_touched_rows("bigram_embed", np.array([3, 5, 5, 40]))
    saved = opt.state_dict()
    assert saved["touched_rows"]["bigram_embed"].tolist() == [3, 5, 40]
    fresh = ts.NorMuonAndAdam(tiny_params(d=8, vocab=24), world_size=2)
    fresh.load_state_dict(saved)
    assert np.flatnonzero(fresh.touched_rows[fresh.by_label["bigram_embed"]]).tolist() == [3, 5, 40]
    fresh.reset()
    assert not fresh.touched_rows[fresh.by_label["bigram_embed"]].any()


def test_compiled_update_math_traces_as_full_graphs(monkeypatch):
    """compile=True wraps the update math in torch.compile(fullgraph=True); trace it (aot_eager:
    Dynamo + AOTAutograd, no Inductor codegen) and check it still steps like the eager version."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))
    monkeypatch.setattr(ts, "COMPILED_ADAM_MIN_NUMEL", 0)     # toy sizes: compile every Adam update too
    torch._dynamo.reset()
    named_c, named_e = tiny_params(dtype_banks=torch.bfloat16), tiny_params(dtype_banks=torch.bfloat16)
    opt_c = ts.NorMuonAndAdam(named_c, compile=True)
    opt_e = ts.NorMuonAndAdam(named_e)
    for step in range(2):
        grads = random_grads(named_c, seed=40 + step)
        for named, opt in ((named_c, opt_c), (named_e, opt_e)):
            set_grads(named, grads)
            opt.set_schedule(1.0, 0.9)
            opt.step(do_adam=step == 1)
    for (label, qc), (_, qe) in zip(named_c, named_e):
        torch.testing.assert_close(qc.detach().float(), qe.detach().float(), rtol=1e-2, atol=1e-3, msg=label)
    torch._dynamo.reset()


def test_a_sparse_exchange_with_no_noted_rows_is_refused():
    """A loop that forgets to note the rows would silently drop every other rank's gradient."""
    named = tiny_params(d=8, vocab=24)
    opt = ts.NorMuonAndAdam(named, world_size=2)      # refused before any collective runs
    table = opt.by_label["bigram_embed"]
    with pytest.raises(RuntimeError, match="no touched rows were noted"):
        opt._launch_sparse_exchange(table, torch.ones_like(table), opt.settings[table])
