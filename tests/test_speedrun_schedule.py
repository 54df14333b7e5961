"""Schedule and configuration of the speedrun trainer: pure step -> setting functions."""
import functools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import train_speedrun as ts

WORLD_SIZES = (1, 2, 4, 8)
schedules = st.tuples(st.integers(3, 4000), st.integers(0, 200))


def make_schedule(scheduled, extension, args=None):
    args = args or ts.Hyperparameters()
    return ts.TrainingSchedule(ts.reference_stages(args.batch_seq_len, args.stage_seqs), scheduled, extension)


# ---- the record's numbers ----

def test_record_schedule_numbers():
    s = make_schedule(1440, 40)                      # record #80's step counts
    assert s.boundaries == [(0, 480), (480, 960), (960, 1440), (1440, 1480)]
    assert s.total_steps == 1480
    assert s.split_step == 961                       # stage 3 starts on an even step: the next odd one
    assert s.warmup_steps() == [0, 1, 2, 479, 480, 481, 959, 960, 961, 1439, 1440, 1441]
    stages = s.stages
    assert [st_.max_seq_len for st_ in stages] == [896, 2048, 2048, 2048]   # short documents first (#72)
    assert [st_.batch_size for st_ in stages] == [8 * 2048 * 8, 16 * 2048 * 8, 24 * 2048 * 8, 24 * 2048 * 8]
    assert [st_.window_blocks for st_ in stages] == [(1, 3), (3, 7), (5, 11), (6, 13)]
    assert [st_.lr_mul for st_ in stages[:3]] == [1.0, 1.52, 1.73]
    assert s.final_window_blocks == 20
    assert s.mtp_weights(0) == [1.0, 0.5, 0.25]
    assert s.mtp_weights(480) == [1.0, 0.5]
    assert s.mtp_weights(960) == [1.0]
    # cooldown (60% since record #73) starts at int(1440 * 0.4) = 576 (1 - 0.6 = 0.40000000000000002,
    # times 1440 rounds to 576.0) and ends at the floor, 0.15x since record #72
    assert s.lr_multiplier(575) == 1.52
    assert s.lr_multiplier(576) == 1.52
    assert s.lr_multiplier(577) < 1.52
    assert s.lr_multiplier(1440) == pytest.approx(0.15)
    assert s.lr_multiplier(1479) == pytest.approx(0.15)


def test_record_muon_momentum():
    total = 1555
    assert ts.muon_momentum(0, total) == pytest.approx(0.85)
    assert ts.muon_momentum(150, total) == pytest.approx(0.90)
    assert ts.muon_momentum(300, total) == pytest.approx(0.95)
    assert ts.muon_momentum(1505, total) == pytest.approx(0.95)
    assert ts.muon_momentum(1554, total) == pytest.approx(0.95 - 0.1 * 49 / 50)


# ---- batch arithmetic for every world size and stage ----

@pytest.mark.parametrize("smoke", [False, True])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_micro_batch_times_accum_times_world_is_stage_batch(world_size, smoke):
    args = ts.parse_args(["--smoke"] if smoke else [])
    accum = ts.grad_accum_steps_for(world_size)
    assert accum * world_size == 8
    for stage in make_schedule(12, 3, args).stages:
        per_rank, rem = divmod(stage.batch_size, accum * world_size)
        assert rem == 0
        assert per_rank % 16 == 0                        # attention wants multiples of 16 tokens
        assert per_rank * accum * world_size == stage.batch_size
        # the same micro-batch size for every world size: grad_accum absorbs the difference
        assert per_rank == stage.batch_size // 8
    val_per_rank = args.val_batch_size // (accum * world_size)
    assert val_per_rank * accum * world_size == args.val_batch_size and val_per_rank % 16 == 0


@pytest.mark.parametrize("world_size", [0, 3, 5, 6, 7, 16])
def test_unsupported_world_size_is_a_clear_error(world_size):
    with pytest.raises(SystemExit, match="world size .* not supported"):
        ts.grad_accum_steps_for(world_size)


# ---- stage boundaries and the split step ----

@settings(max_examples=60, deadline=None)
@given(schedules)
def test_boundaries_partition_the_run(sched):
    scheduled, extension = sched
    s = make_schedule(scheduled, extension)
    starts = [a for a, _ in s.boundaries]
    ends = [b for _, b in s.boundaries]
    assert starts[0] == 0 and ends[-1] == scheduled + extension
    assert starts[1:] == ends[:-1]                      # contiguous, no gaps
    assert ends[2] == scheduled                          # three stages fill the scheduled part
    for a, b in s.boundaries[:3]:
        assert abs((b - a) - scheduled / 3) <= 1         # thirds, rounded
    assert s.transition_steps() == starts[1:]


@settings(max_examples=60, deadline=None)
@given(schedules)
def test_split_step_is_odd_and_at_stage_3_start(sched):
    s = make_schedule(*sched)
    start3 = s.boundaries[2][0]
    assert s.split_step % 2 == 1 and ts.is_adam_step(s.split_step)
    assert s.split_step in (start3, start3 + 1)
    assert s.split_step in s.warmup_steps()              # compiled/exercised before the clock starts


@settings(max_examples=60, deadline=None)
@given(schedules)
def test_warmup_steps_cover_first_steps_and_every_transition(sched):
    s = make_schedule(*sched)
    w = s.warmup_steps()
    assert w == sorted(set(w))
    assert {0, 1, 2} <= set(w)
    for t in s.transition_steps():
        assert {t - 1, t, t + 1} <= set(w)
    assert {s.stage_index(x) for x in w} == {0, 1, 2, 3}       # every stage's shapes, extension too


# ---- per-step schedules, checked at every step ----

@settings(max_examples=25, deadline=None)
@given(schedules)
def test_lr_multiplier_every_step(sched):
    scheduled, extension = sched
    s = make_schedule(scheduled, extension)
    cd_start = int(scheduled * (1 - ts.COOLDOWN_FRAC))
    for step in range(s.total_steps + 1):
        stage, _ = s.lookup(step)
        lr = s.lr_multiplier(step)
        if step < cd_start:
            assert lr == stage.lr_mul
        else:
            t = min(1.0, (step - cd_start) / (scheduled - cd_start))
            assert lr == pytest.approx(stage.lr_mul + (0.15 - stage.lr_mul) * t)
            assert 0.15 - 1e-12 <= lr <= stage.lr_mul + 1e-12
        if step >= scheduled:
            assert lr == pytest.approx(0.15)


@settings(max_examples=25, deadline=None)
@given(schedules)
def test_mtp_weights_every_step(sched):
    s = make_schedule(*sched)
    for step in range(s.total_steps + 1):
        stage, t = s.lookup(step)
        w = s.mtp_weights(step)
        assert len(w) == len(stage.mtp_start) and w[0] == 1.0
        for got, a, b in zip(w, stage.mtp_start, stage.mtp_end):
            assert got == pytest.approx(a + (b - a) * t)
            assert min(a, b) - 1e-12 <= got <= max(a, b) + 1e-12
        assert 0.0 <= t <= 1.0


@settings(max_examples=25, deadline=None)
@given(schedules)
def test_prefix_weight_every_step(sched):
    """Record #88: the prefix-token weight is 0.25 through stage 1, falls linearly to 0 over stage
    2 and is 0 after; StageState hands the model that value as a (1,) tensor."""
    s = make_schedule(*sched)
    (_, end1), (start2, end2) = s.boundaries[0], s.boundaries[1]
    for step in range(s.total_steps + 1):
        w = s.prefix_weight(step)
        if step < end1:
            assert w == 0.25
        elif step < end2:
            assert w == pytest.approx(0.25 * (1 - (step - start2) / (end2 - start2)))
        else:
            assert w == 0.0
    state = ts.StageState(s, ts.GPT(ts.ModelConfig.smoke(max_seq_len=256, val_max_len=256)), torch.device("cpu"))
    for step in (0, end1, s.total_steps):
        state.advance(step)
        got = state.forward_config().prefix_weight
        assert got.shape == (1,) and got.item() == pytest.approx(s.prefix_weight(step))


@settings(max_examples=40, deadline=None)
@given(schedules, st.integers(0, 400), st.integers(0, 100))
def test_muon_momentum_every_step(sched, warmup, cooldown):
    total = sum(sched)
    prev_cooling = None
    for step in range(total):
        m = ts.muon_momentum(step, total, warmup, cooldown)
        assert 0.85 - 1e-12 <= m <= 0.95 + 1e-12
        if step < warmup:
            assert m == pytest.approx(0.85 + 0.1 * step / warmup)
        elif step > total - cooldown:
            assert m == pytest.approx(0.95 - 0.1 * (step - (total - cooldown)) / cooldown)
            assert prev_cooling is None or m < prev_cooling    # cooling down: falls every step
            prev_cooling = m
        else:
            assert m == 0.95


class _FakeYarn:
    def __init__(self):
        self.calls = []

    def apply(self, old, new):
        self.calls.append((old, new))

    def reset(self):
        self.calls.append("reset")


class _FakeModel:
    def __init__(self):
        self.yarn, self.yarn_paired_head = _FakeYarn(), _FakeYarn()


@settings(max_examples=15, deadline=None)
@given(st.integers(3, 300), st.integers(0, 30))
def test_stage_state_windows_batch_and_yarn_every_step(scheduled, extension):
    import torch
    s = make_schedule(scheduled, extension)
    model = _FakeModel()
    state = ts.StageState(s, model, torch.device("cpu"))
    expected_calls = ["reset"]
    long = s.stages[0].window_blocks[1]
    for step in range(s.total_steps + 1):
        state.advance(step)
        stage, _ = s.lookup(step)
        assert (state.ws_short, state.ws_long) == stage.window_blocks
        assert state.batch_size == stage.batch_size
        want = s.mtp_weights(step)
        got = state.mtp_weights.tolist()
        assert len(got) == 3 and got[:len(want)] == pytest.approx(want) and got[len(want):] == [0.0] * (3 - len(want))
        if stage.window_blocks[1] != long:
            expected_calls.append((long * 128, stage.window_blocks[1] * 128))
            long = stage.window_blocks[1]
        cfg = state.forward_config()
        assert (cfg.ws_short, cfg.ws_long) == (state.ws_short * 128, state.ws_long * 128)
    assert model.yarn.calls == expected_calls == model.yarn_paired_head.calls
    state.use_final_window()
    assert state.ws_long == 20 and state.forward_config().ws_long == 20 * 128
    state.reset()
    assert (state.ws_short, state.ws_long) == (1, 3) and model.yarn.calls[-1] == "reset"


def test_adam_only_on_odd_steps():
    assert [ts.is_adam_step(s) for s in range(6)] == [False, True, False, True, False, True]


# ---- command line ----

def test_parse_args_defaults_are_the_record():
    a = ts.parse_args([])
    assert (a.num_scheduled_iterations, a.num_extension_iterations) == (1270, 15)   # record #88
    assert (a.muon_warmup_steps, a.muon_cooldown_steps) == (300, 50)
    assert (a.val_tokens, a.val_batch_size, a.train_max_seq_len) == (10485760, 2097152, 2048)
    assert a.val_loss_every == 250 and a.compile and a.device == "cuda" and a.attn == "auto"


def test_parse_args_smoke_and_explicit_flags_win():
    a = ts.parse_args(["--smoke", "--device", "cpu", "--num_scheduled_iterations", "12"])
    assert a.smoke and not a.compile and a.num_scheduled_iterations == 12
    assert a.num_extension_iterations == ts.SMOKE_OVERRIDES["num_extension_iterations"]
    assert ts.parse_args(["--device", "cpu", "--compile"]).compile


@pytest.mark.parametrize("argv, message", [
    (["--num_scheduled_iterations", "2"], "at least 3"),
    (["--val_tokens", "1000"], "multiple of"),
    (["--val_batch_size", "100"], "multiple of 1024"),
    (["--val_batch_size", "1536"], "multiple of 1024"),   # 16-aligned, but flex needs 128 per rank
    (["--train_max_seq_len", "100"], "multiple of 16"),
    (["--max_steps", "-1"], ">= 0"),
])
def test_parse_args_bad_values_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit, match=message) as e:
        ts.parse_args(argv)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


def test_warmup_plan_compiles_only_what_the_run_uses():
    record = make_schedule(1515, 40)
    full = ts.parse_args([])
    # each stage's first step, the first tied Adam step, the split step, the first untied Adam step
    assert ts.warmup_plan(full, record) == ([0, 1, 505, 1010, 1011, 1515], [0, 505, 1010, 1515], True)
    timing = ts.parse_args(["--max_steps", "560", "--val_loss_every", "0"])
    assert ts.warmup_plan(timing, record) == ([0, 1, 505], [], False)             # stages 1-2, no eval
    periodic = ts.parse_args(["--max_steps", "1012"])
    assert ts.warmup_plan(periodic, record) == ([0, 1, 505, 1010, 1011], [0, 505, 1010], False)
    eager = ts.parse_args(["--device", "cpu"])
    assert ts.warmup_plan(eager, record) == ([0], [0], True)


@settings(max_examples=40, deadline=None)
@given(schedules)
def test_warmup_plan_covers_every_stage_and_optimizer_variant(sched):
    s = make_schedule(*sched)
    steps, eval_steps, final = ts.warmup_plan(ts.parse_args([]), s)
    assert final and set(steps) <= set(s.warmup_steps()) and steps == sorted(steps)
    stages_run = {s.stage_index(x) for x in range(s.total_steps)}     # no extension stage if 0 steps
    assert {s.stage_index(x) for x in steps} == stages_run == {s.stage_index(x) for x in eval_steps}
    odd = [x for x in steps if x % 2]
    assert any(x < s.split_step for x in odd)
    assert s.split_step in steps or s.split_step >= s.total_steps
    if any(x > s.split_step and x % 2 for x in s.warmup_steps() if x < s.total_steps):
        assert any(x > s.split_step for x in odd)                      # embed's own Adam update


# ---- cold start: which graphs the compile helpers take ----

def test_helper_jobs_for_the_record_and_shorter_runs():
    record = make_schedule(1515, 40)
    # stages 2 and 3 (new batch sizes; the extension reuses stage 3's) and one validation graph
    assert ts.helper_compile_jobs(ts.parse_args([]), record) == [("train", 505), ("train", 1010), ("eval", 0)]
    timing = ts.parse_args(["--max_steps", "560", "--val_loss_every", "0"])
    assert ts.helper_compile_jobs(timing, record) == [("train", 505)]
    stage1_only = ts.parse_args(["--max_steps", "100", "--val_loss_every", "0"])
    assert ts.helper_compile_jobs(stage1_only, record) == []


@settings(max_examples=40, deadline=None)
@given(schedules)
def test_helper_jobs_cover_every_graph_but_stage_1_training_once(sched):
    s = make_schedule(*sched)
    args = ts.parse_args([])
    steps, eval_steps, final = ts.warmup_plan(args, s)
    jobs = ts.helper_compile_jobs(args, s)
    train_batches = [s.lookup(step)[0].batch_size for kind, step in jobs if kind == "train"]
    first_batch = s.lookup(steps[0])[0].batch_size
    # each later batch shape the warm-up meets has exactly one helper; stage 1's has none
    assert sorted(train_batches) == sorted({s.lookup(x)[0].batch_size for x in steps} - {first_batch})
    assert all(step in steps for kind, step in jobs if kind == "train")
    assert [kind for kind, _ in jobs].count("eval") == (1 if eval_steps or final else 0)


def test_helpers_only_for_one_compiled_process():
    env1 = ts.DistEnv(rank=0, local_rank=0, world_size=1, device=ts.torch.device("cpu"))
    env2 = ts.DistEnv(rank=0, local_rank=0, world_size=2, device=ts.torch.device("cpu"))
    assert ts.use_compile_helpers(ts.parse_args([]), env1)
    assert not ts.use_compile_helpers(ts.parse_args([]), env2)          # ranks compile side by side
    assert not ts.use_compile_helpers(ts.parse_args(["--no-parallel_compile"]), env1)
    assert not ts.use_compile_helpers(ts.parse_args(["--no-compile"]), env1)


# ---- record #72: the sequence-length schedule ----

@functools.cache
def tiny_model():
    return ts.GPT(ts.ModelConfig.smoke(vocab_size=1024, bigram_vocab_size=1031, attn_backend="sdpa",
                                       compile_mode="none", max_seq_len=512, val_max_len=512))


@settings(max_examples=40, deadline=None)
@given(schedules, st.sampled_from([128, 512, 896, 1024, 2048, 4096]))
def test_max_seq_len_follows_the_stage_and_the_cap(sched, cap):
    """Every step's longest document piece is its stage's STAGE_TABLE max_seq_len capped by
    --train_max_seq_len; StageState hands it to the loader and the model at each step."""
    s = ts.TrainingSchedule(ts.reference_stages(2048, (8, 16, 24), cap), *sched)
    state = ts.StageState(s, tiny_model(), torch.device("cpu"))
    for step in range(s.total_steps):
        state.advance(step)
        want = min(ts.STAGE_TABLE[s.stage_index(step)]["max_seq_len"], cap)
        assert state.max_seq_len == want and state.forward_config().max_seq_len == want
    state.reset()
    assert state.max_seq_len == min(896, cap)
