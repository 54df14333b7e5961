"""train_baseline.py: config, model, schedule, batch math, data, training, resume, preemption, sampling."""

import importlib.util
import dataclasses
import json
import math
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepare_data
import train_baseline as tb

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "train_baseline.py")
TINY_MODEL = ["--device", "cpu", "--compile", "false", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
              "--block_size", "32", "--batch_size", "8", "--seed", "1337"]
# tiny model, tiny schedule; the LR schedule depends on lr_decay_iters, never on max_iters
TINY_RUN = TINY_MODEL + ["--gradient_accumulation_steps", "2", "--warmup_iters", "5", "--lr_decay_iters", "40",
                         "--eval_interval", "10", "--eval_iters", "3", "--log_interval", "1"]


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_cli(args, cwd=None, timeout=240):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def train_losses(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["iter"], r["loss"]) for r in records if "loss" in r]


def fallback_char_text() -> str:
    """Without ../shared: a made-up text holding what the tests prompt with (newline, 'ROMEO:', 'First')."""
    words = ("".join(chr(97 + (i * 7919 + j) % 26) for j in range(1 + i % 7)) for i in range(40_000))
    lines = []
    for i, word in enumerate(words):
        speaker = "\nROMEO:\n" if i % 50 == 0 else "\nFirst Citizen:\n" if i % 50 == 25 else None
        lines.append((speaker or ("\n" if i % 9 == 0 else " ")) + word)
    return "".join(lines)[:200_000]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """A small char-level dataset in nanoGPT's layout (train.bin, val.bin, meta.pkl)."""
    text = (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").read_text()[:200_000] \
        if (REPO.parent / "shared" / "data" / "tinyshakespeare.txt").exists() else \
        fallback_char_text()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    folder = tmp_path_factory.mktemp("char_data")
    split = int(len(ids) * 0.9)
    prepare_data.write_bin(folder / "train.bin", ids[:split])
    prepare_data.write_bin(folder / "val.bin", ids[split:])
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and pytest -n 2 already uses both cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -----------------------------------------------------------------------------
# batch and accumulation arithmetic

@given(total=st.integers(1, 512), world=st.integers(1, 64), batch=st.integers(1, 64), block=st.integers(1, 4096))
def test_accumulation_splits_over_ranks_or_errors(total, world, batch, block):
    if total % world == 0:
        per_rank = tb.accumulation_per_rank(total, world)
        assert per_rank * world == total
        assert tb.tokens_per_step(batch, block, total) == batch * block * per_rank * world
    else:
        with pytest.raises(tb.UsageError, match=f"not divisible by the world size {world}"):
            tb.accumulation_per_rank(total, world)


def test_tokens_per_step_of_gpt2_preset():
    cfg = tb.parse_config(["--preset", "gpt2"])
    assert tb.tokens_per_step(cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps) == 491_520
    assert [tb.accumulation_per_rank(40, w) for w in (1, 2, 4, 8)] == [40, 20, 10, 5]


def test_non_dividing_world_size_is_a_one_line_cli_error(char_data):
    env = dict(subprocess_env(), WORLD_SIZE="3", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    result = subprocess.run([sys.executable, SCRIPT, "--data_dir", str(char_data), *TINY_MODEL,
                             "--gradient_accumulation_steps", "4"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --gradient_accumulation_steps 4 is not divisible by the world size 3; it counts micro-batches "
        "for the whole job, so pick a multiple of 3"]


# -----------------------------------------------------------------------------
# learning-rate schedule

schedules = st.builds(
    lambda lr, min_frac, warmup, span: tb.TrainConfig(learning_rate=lr, min_lr=lr * min_frac, warmup_iters=warmup,
                                                      lr_decay_iters=warmup + span),
    st.floats(1e-6, 1.0), st.floats(0.0, 1.0), st.integers(0, 3000), st.integers(1, 100_000))


@settings(max_examples=60)
@given(cfg=schedules, data=st.data())
def test_lr_schedule_properties(cfg, data):
    lr = lambda it: tb.learning_rate_at(it, cfg)  # noqa: E731
    # warmup increases strictly and reaches the peak exactly when it ends
    warm = [lr(it) for it in range(min(cfg.warmup_iters, 200))]
    assert all(a < b for a, b in zip(warm, warm[1:] + [lr(cfg.warmup_iters)]))
    assert lr(cfg.warmup_iters) == cfg.learning_rate
    # cosine ends at min_lr and stays there
    assert lr(cfg.lr_decay_iters) == cfg.min_lr
    assert lr(cfg.lr_decay_iters + data.draw(st.integers(1, 10**6))) == cfg.min_lr
    # never above the peak; never below min_lr once warmup is over (warmup starts near 0, like nanoGPT);
    # positive until the decay ends, after which it is min_lr, which may be 0 (a decay to zero)
    it = data.draw(st.integers(0, cfg.lr_decay_iters + 1000))
    assert 0 <= lr(it) <= cfg.learning_rate
    if it >= cfg.warmup_iters:
        assert lr(it) >= cfg.min_lr
    if it < cfg.lr_decay_iters:
        assert lr(it) > 0
    # and decays monotonically in between
    a, b = sorted(data.draw(st.lists(st.integers(cfg.warmup_iters, cfg.lr_decay_iters), min_size=2, max_size=2)))
    assert lr(a) >= lr(b)


@pytest.mark.parametrize("min_frac, warmup, span", [(0.0, 0, 1), (1.0, 0, 1), (0.0, 3, 1), (1.0, 7, 5), (0.5, 0, 2)])
def test_lr_schedule_edges(min_frac, warmup, span):
    """The edges hypothesis finds: a decay to zero, equal bounds, no warmup, a one-step decay."""
    cfg = tb.TrainConfig(learning_rate=1e-3, min_lr=1e-3 * min_frac, warmup_iters=warmup,
                         lr_decay_iters=warmup + span)
    values = [tb.learning_rate_at(it, cfg) for it in range(warmup + span + 3)]
    assert values[warmup] == cfg.learning_rate and values[warmup + span:] == [cfg.min_lr] * 3
    assert all(0 < v for v in values[:warmup + span])
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))


def test_constant_lr_without_decay():
    cfg = tb.TrainConfig(decay_lr=False, learning_rate=3e-5)
    assert {tb.learning_rate_at(it, cfg) for it in (0, 1, 10**6)} == {3e-5}


def test_shakespeare_char_schedule_matches_nanogpt():
    cfg = tb.parse_config(["--preset", "shakespeare_char"])
    assert tb.learning_rate_at(0, cfg) == pytest.approx(1e-3 / 101)
    assert tb.learning_rate_at(100, cfg) == pytest.approx(1e-3)
    assert tb.learning_rate_at(5000, cfg) == pytest.approx(1e-4)


# -----------------------------------------------------------------------------
# data

@settings(max_examples=40, deadline=None)
@given(num_tokens=st.integers(2, 400), block=st.integers(1, 64), batch=st.integers(1, 8), seed=st.integers(0, 99))
def test_windows_stay_in_bounds_and_targets_are_shifted(num_tokens, block, batch, seed):
    if num_tokens <= block:
        return
    tokens = np.arange(num_tokens, dtype=np.uint16)  # token value == its position
    starts = tb.draw_window_starts(num_tokens, block, (batch,), torch.Generator().manual_seed(seed))
    x, y = tb.gather_windows(tokens, starts, block)
    assert x.shape == y.shape == (batch, block) and x.dtype == torch.int64
    assert int(y.max()) <= num_tokens - 1 and int(x.min()) >= 0
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 0], starts)


def test_a_fineweb_shard_named_train_bin_is_refused_never_read_as_tokens(tmp_path):
    """Its 1024-byte header would otherwise be trained on as 512 tokens (and the speedrun's format
    is another program's input): one error line that names the format and what to do."""
    prepare_data.write_fineweb_shard(tmp_path / "train.bin", np.arange(5000) % 50257)
    with pytest.raises(tb.UsageError, match=r"train.bin is a FineWeb shard .*train_baseline.py reads .bin files: "
                                            r"build train.bin/val.bin with `python3 prepare_data.py text"):
        tb.load_split(tmp_path, "train", block_size=64)


def test_raw_token_file_loads(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 5000, dtype=np.uint16)
    prepare_data.write_bin(tmp_path / "train.bin", tokens)
    loaded = tb.load_split(tmp_path, "train", block_size=64)
    assert np.array_equal(loaded, tokens)
    batches = tb.TrainBatches(loaded, 64, 4, 1, 0, 1, seed=0, device=torch.device("cpu"))
    x, y = batches.current
    start = int(batches.step_starts[0][0])
    assert np.array_equal(x[0].numpy(), tokens[start:start + 64])
    assert np.array_equal(y[0].numpy(), tokens[start + 1:start + 65])


def test_data_errors_are_clear(tmp_path):
    with pytest.raises(tb.UsageError, match="train.bin not found; prepare it with `python3 prepare_data.py"):
        tb.load_split(tmp_path, "train", 8)
    prepare_data.write_bin(tmp_path / "train.bin", np.arange(8, dtype=np.uint16))
    with pytest.raises(tb.UsageError, match="holds 8 tokens, not enough for one window of block_size 8"):
        tb.load_split(tmp_path, "train", 8)
    with pytest.raises(tb.UsageError, match="token id 7 but the model's vocabulary has 5"):
        tb.check_vocab(np.arange(8, dtype=np.uint16), 5, tmp_path / "train.bin")


def step_windows(batches, micro_steps):
    """The window starts one optimizer step consumes on this rank, in order."""
    starts = []
    for _ in range(micro_steps):
        starts.append(batches.current[0][:, 0].clone())
        batches.advance()
    return starts


@settings(max_examples=25, deadline=None)
@given(world=st.sampled_from([1, 2, 4]), per_rank=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_a_step_trains_on_the_same_windows_at_any_world_size(world, per_rank, seed):
    tokens = np.arange(10_000, dtype=np.uint16)
    total = world * per_rank
    make = lambda rank, w: tb.TrainBatches(tokens, 16, 3, total, rank, w, seed, torch.device("cpu"))  # noqa: E731
    single = make(0, 1)
    ranks = [make(r, world) for r in range(world)]
    for _ in range(3):
        expected = step_windows(single, total)
        got = [step_windows(b, per_rank) for b in ranks]
        # rank r takes micro-batches r, r + world, ...
        merged = [got[m % world][m // world] for m in range(total)]
        assert all(torch.equal(a, b) for a, b in zip(expected, merged))


def test_batch_generator_state_restores_the_pending_step():
    tokens = np.arange(5000, dtype=np.uint16)
    make = lambda seed: tb.TrainBatches(tokens, 8, 2, 3, 0, 1, seed, torch.device("cpu"))  # noqa: E731
    reference = step_windows(make(5), 9)  # steps 1-3, three micro-batches each
    batches = make(5)
    step_windows(batches, 4)  # all of step 1 and the first micro-batch of step 2
    # a checkpoint taken now replays step 2 from its first micro-batch, whatever the seed
    replay = make(999)
    replay.restore(batches.state())
    assert all(torch.equal(a, b) for a, b in zip(step_windows(replay, 6), reference[3:]))


# -----------------------------------------------------------------------------
# model

def test_gpt2_parameter_count_and_flops():
    with torch.device("meta"):
        model = tb.GPT(tb.GPTConfig(vocab_size=50257, bias=True))
    assert model.num_params(non_embedding=False) == 124_439_808  # OpenAI's GPT-2 small
    assert model.num_params() == 124_439_808 - 1024 * 768
    n = model.num_params()
    assert tb.flops_per_token(model.config, n) == 6 * n + 12 * 12 * 12 * 64 * 1024
    # 1 GFLOP per token at 156k tokens/s is half of an A100's 312 TFLOP/s
    assert tb.model_flops_utilization(1e9, 156e3, tb.PEAK_BF16_FLOPS["a100"]) == pytest.approx(0.5)
    assert tb.model_flops_utilization(1e9, 1.0, None) is None
    assert tb.PEAK_BF16_FLOPS == {"h100": 989e12, "h200": 989e12, "a100": 312e12}
    assert tb.peak_flops_for("h200", torch.device("cpu")) == 989e12
    assert tb.peak_flops_for("auto", torch.device("cpu")) is None
    # other GPU names run, without MFU, rather than failing a job over a label
    assert tb.parse_config(["--gpu_type", "V100"]).gpu_type == "v100"
    assert tb.peak_flops_for("v100", torch.device("cpu")) is None
    assert "known: h100, h200, a100" in tb.describe_peak(None, "v100", torch.device("cpu"))
    assert tb.describe_peak(None, "auto", torch.device("cpu")) == "no MFU on CPU"
    assert tb.describe_peak(989e12, "h100", torch.device("cpu")) == "MFU against 989 TFLOP/s"


def test_model_shapes_tying_and_init():
    torch.manual_seed(0)
    cfg = tb.GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=32, bias=False)
    model = tb.GPT(cfg)
    assert model.transformer.wte.weight is model.lm_head.weight
    idx = torch.randint(64, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 64) and loss.item() == pytest.approx(math.log(64), rel=0.1)
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 64) and loss is None
    c_proj = model.transformer.h[0].mlp.c_proj.weight
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert c_proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 3), rel=0.15)
    assert c_fc.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(p.bias is None for p in model.modules() if isinstance(p, torch.nn.Linear))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_attention_is_causal():
    torch.manual_seed(0)
    model = tb.GPT(tb.GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    a = torch.randint(32, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 32  # change only the future of position 4
    la, _ = model(a, a)
    lb, _ = model(b, b)
    assert torch.allclose(la[0, :5], lb[0, :5]) and not torch.allclose(la[0, 5:], lb[0, 5:])


def test_generation_stays_inside_the_tokenizer_vocabulary():
    torch.manual_seed(0)
    model = tb.GPT(tb.GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight[10:] *= 50  # make the "padding" rows the likeliest
    idx = torch.zeros(4, 1, dtype=torch.long)
    out = model.generate(idx, 30, temperature=1.0, generator=torch.Generator().manual_seed(0), vocab_size=10)
    assert out.shape == (4, 31) and int(out.max()) < 10
    assert int(model.generate(idx, 30, generator=torch.Generator().manual_seed(0)).max()) >= 10


def test_gpt2_codec_round_trip(gpt2_vocab):
    encode, decode, vocab_size = tb.make_codec(None)
    assert vocab_size == 50257 and decode(encode("Hello world<|endoftext|>")) == "Hello world<|endoftext|>"


def test_optimizer_decays_only_matrices():
    model = tb.GPT(tb.GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16, bias=True))
    opt = tb.configure_optimizer(model, tb.TrainConfig(), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 6e-4


def test_openai_weights_convert_from_hugging_face_layout():
    torch.manual_seed(0)
    cfg = tb.GPTConfig(block_size=8, vocab_size=40, n_layer=2, n_head=2, n_embd=16, bias=True)
    source = tb.GPT(cfg)
    # what transformers' GPT2LMHeadModel.state_dict() looks like: Conv1D weights (in, out) + mask buffers
    hf = {k: (v.t() if k.endswith(tb._CONV1D_SUFFIXES) else v) for k, v in source.state_dict().items()}
    hf.update({f"transformer.h.{i}.attn.bias": torch.ones(1, 1, 8, 8) for i in range(2)})
    target = tb.GPT(cfg)
    target.load_state_dict(tb.convert_hf_gpt2_state_dict(hf, target))
    idx = torch.randint(40, (2, 8))
    assert torch.equal(source(idx, idx)[1], target(idx, idx)[1])
    hf.pop("lm_head.weight")
    with pytest.raises(ValueError, match="missing"):
        tb.convert_hf_gpt2_state_dict(hf, target)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None,
                    reason="transformers is installed; the missing-package message cannot be shown")
def test_pretrained_without_transformers_is_a_clear_error():
    with pytest.raises(tb.UsageError, match="needs the `transformers` package: pip install transformers"):
        tb.gpt_from_pretrained("gpt2")


# -----------------------------------------------------------------------------
# configuration

def test_preset_then_explicit_options():
    cfg = tb.parse_config(["--preset", "shakespeare_char", "--batch_size=8", "--compile", "false", "--bias", "1",
                           "--eval_only"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout) == (6, 6, 384, 256, 0.2)
    assert (cfg.learning_rate, cfg.min_lr, cfg.beta2) == (1e-3, 1e-4, 0.99)
    assert (cfg.warmup_iters, cfg.max_iters, cfg.lr_decay_iters) == (100, 5000, 5000)
    assert (cfg.eval_interval, cfg.eval_iters, cfg.gradient_accumulation_steps) == (250, 200, 1)
    assert cfg.batch_size == 8 and cfg.compile is False and cfg.bias is True and cfg.eval_only is True
    # without --preset, small overrides keep the default demo (its data, out_dir and sizes)
    plain = tb.parse_config(["--batch_size", "3"])
    default = tb.parse_config([])
    assert plain.batch_size == 3 and plain.preset == "default"
    assert dataclasses.replace(plain, batch_size=default.batch_size) == default
    for args in (["--device", "cpu"], ["--max_iters", "50"]):
        cfg = tb.parse_config(args)
        assert (cfg.preset, cfg.data_dir, cfg.out_dir, cfg.n_layer) == ("default", "", "out/default", 4)


def test_no_arguments_is_the_default_preset():
    cfg = tb.parse_config([])
    assert cfg.preset == "default" and cfg.out_dir == "out/default" and cfg.compile is False


def test_bench_defaults_follow_nanogpt_bench_unless_given():
    cfg = tb.parse_config(["--preset", "gpt2", "--bench"])
    assert (cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps, cfg.grad_clip, cfg.compile) == \
        (12, 1024, 1, 0.0, True)
    cfg = tb.parse_config(["--preset", "gpt2", "--bench", "true", "--gradient_accumulation_steps=8"])
    assert cfg.gradient_accumulation_steps == 8


def test_resume_falls_back_to_the_original_init():
    assert tb.parse_config(["--init_from", "resume"]).resume_fallback == "scratch"
    cfg = tb.parse_config(["--preset", "finetune_shakespeare", "--init_from", "resume"])
    assert (cfg.init_from, cfg.resume_fallback) == ("resume", "gpt2-xl")
    cfg = tb.parse_config(["--init_from=gpt2-medium", "--init_from", "resume"])
    assert (cfg.init_from, cfg.resume_fallback) == ("resume", "gpt2-medium")


@pytest.mark.parametrize("args, message", [
    (["--n_embd", "100", "--n_head", "3"], "--n_embd 100 is not divisible by --n_head 3"),
    (["--warmup_iters", "50", "--lr_decay_iters", "50"], "--lr_decay_iters (50) must be greater than"),
    (["--min_lr", "1", "--learning_rate", "0.1"], "--min_lr (1.0) must lie between 0 and"),
    (["--init_from", "gpt3"], "--init_from 'gpt3' is not one of"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--compile_mode", "fast"], "--compile_mode 'fast': use default, max-autotune-no-cudagraphs"),
])
def test_bad_config_is_rejected(args, message):
    with pytest.raises(tb.UsageError) as err:
        tb.parse_config(args)
    assert message in str(err.value)


def test_bad_boolean_is_an_argparse_error():
    with pytest.raises(SystemExit):
        tb.parse_config(["--compile", "maybe"])


CPU = tb.Runtime(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)


def test_gpu_sized_runs_on_cpu_warn_with_the_time_and_the_cpu_recipe():
    for args in (["--preset", "shakespeare_char"], ["--preset", "gpt2", "--bench"], ["--preset", "gpt2"]):
        warning = tb.cpu_time_warning(tb.parse_config(args), CPU, 50304)
        assert warning.startswith("warning: this run is sized for a GPU: about ") and " h on a CPU" in warning
        assert "torch.compile alone takes minutes" in warning and warning.endswith(tb.CPU_RECIPE)
    recipe = tb.parse_config(shlex.split(tb.CPU_RECIPE)[2:])  # the recipe itself is CPU-sized
    assert tb.cpu_time_warning(recipe, CPU, 65) is None
    assert tb.cpu_time_warning(tb.parse_config([]), CPU, 100) is None  # the default demo
    assert "--compile false skips it" in tb.cpu_time_warning(tb.parse_config(["--compile", "true"]), CPU, 100)
    gpu = dataclasses.replace(CPU, device=torch.device("cuda", 0))
    assert tb.cpu_time_warning(tb.parse_config(["--preset", "gpt2"]), gpu, 50304) is None


def test_resume_of_a_run_started_from_openai_weights_keeps_their_architecture(capsys):
    """finetune_shakespeare starts from gpt2-xl; its requeued command (+ --init_from resume) must
    resume the 48-layer checkpoint, not compare it with the 12-layer defaults of the options."""
    cfg = tb.parse_config(["--preset", "finetune_shakespeare", "--init_from", "resume"])
    checkpoint = {"model_args": dict(block_size=1024, vocab_size=50257, dropout=0.0, bias=True,
                                     **tb.MODEL_SIZES["gpt2-xl"]),
                  "config": dataclasses.asdict(cfg), "iter_num": 5, "meta": None}
    tb.check_resume_matches(cfg, checkpoint, Path("ckpt.pt"), CPU, meta=None)
    assert capsys.readouterr().out == ""
    smaller = dict(checkpoint, model_args=dict(checkpoint["model_args"], **tb.MODEL_SIZES["gpt2"]))
    with pytest.raises(tb.UsageError, match=r"holds another model .*--n_layer 48 \(checkpoint: 12\)"):
        tb.check_resume_matches(cfg, smaller, Path("ckpt.pt"), CPU, meta=None)
    # a checkpoint already at max_iters: said, not silently done nothing
    tb.check_resume_matches(cfg, dict(checkpoint, iter_num=20), Path("ckpt.pt"), CPU, meta=None)
    assert "ckpt.pt is at iter 20, not below --max_iters 20: nothing left to train" in capsys.readouterr().out


def test_default_corpus_follows_corpus_bytes(tmp_path, monkeypatch, capsys):
    """A changed --corpus_bytes rebuilds the prepared stdlib corpus instead of being ignored."""
    monkeypatch.chdir(tmp_path)
    folder = tb.ensure_default_corpus(tb.parse_config(["--corpus_bytes", "100000"]), CPU)
    small = len(prepare_data.load_tokens(Path(folder) / "train.bin"))
    tb.ensure_default_corpus(tb.parse_config(["--corpus_bytes", "400000"]), CPU)
    large = len(prepare_data.load_tokens(Path(folder) / "train.bin"))
    assert small < large <= 400000
    assert "rebuilt the corpus in data/stdlib_char for --corpus_bytes 400,000" in capsys.readouterr().out
    tb.ensure_default_corpus(tb.parse_config(["--corpus_bytes", "400000"]), CPU)  # up to date: nothing said
    assert capsys.readouterr().out == ""


# -----------------------------------------------------------------------------
# training, checkpoints, resume (in-process: no interpreter start-up per run)

def test_tiny_training_loss_falls_and_checkpoints(char_data, tmp_path, capsys):
    cfg = tb.parse_config(["--data_dir", str(char_data), "--out_dir", str(tmp_path), *TINY_RUN, "--max_iters", "40",
                           "--learning_rate", "3e-3", "--eval_interval", "20", "--log_interval", "5"])
    result = tb.train(cfg)
    losses = [loss for _, loss in train_losses(tmp_path)]
    assert result["iter"] == 40 and not result["preempted"]
    assert losses[-1] < losses[0] - 0.5, losses
    assert result["losses"]["val"] < 3.6
    out = capsys.readouterr().out
    assert "iter 35: loss" in out and "ms/iter" in out and "tok/s" in out and "mfu n/a" in out
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 40 and ckpt["meta"]["vocab_size"] == ckpt["model_args"]["vocab_size"]
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_matches_an_uninterrupted_run_exactly(char_data, tmp_path):
    args = ["--data_dir", str(char_data), *TINY_RUN, "--dropout", "0.1", "--max_iters", "16"]
    tb.train(tb.parse_config(args + ["--out_dir", str(tmp_path / "straight")]))
    tb.train(tb.parse_config(args + ["--out_dir", str(tmp_path / "split"), "--max_iters", "7"]))
    result = tb.train(tb.parse_config(args + ["--out_dir", str(tmp_path / "split"), "--init_from", "resume"]))
    straight, split = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert [i for i, _ in split] == list(range(16))
    assert split == straight  # bit-for-bit: batches, dropout masks and optimizer state all restored
    assert result["iter"] == 16
    # eval_only on that checkpoint evaluates even though the checkpoint was written by an eval at 16
    before = (tmp_path / "split" / "ckpt.pt").stat().st_mtime_ns
    again = tb.train(tb.parse_config(args + ["--out_dir", str(tmp_path / "split"), "--init_from", "resume",
                                             "--eval_only"]))
    assert again["iter"] == 16 and again["losses"] == result["losses"]
    assert (tmp_path / "split" / "ckpt.pt").stat().st_mtime_ns == before


def test_time_limit_says_so_then_evaluates_saves_and_resumes(char_data, tmp_path, capsys):
    args = ["--data_dir", str(char_data), "--out_dir", str(tmp_path), *TINY_RUN, "--max_iters", "16"]
    result = tb.train(tb.parse_config(args + ["--time_limit", "1e-9"]))   # up after the first step
    out = capsys.readouterr().out
    assert result["iter"] == 1 and not result["preempted"]
    assert "time limit: --time_limit 1e-09 s reached at iter 1; evaluating and saving (continue with " \
           "--init_from resume)" in out, out
    assert out.index("time limit:") < out.index("saved checkpoint")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 1
    assert tb.train(tb.parse_config(args + ["--init_from", "resume"]))["iter"] == 16


def test_resume_without_checkpoint_starts_fresh(char_data, tmp_path, capsys):
    cfg = tb.parse_config(["--data_dir", str(char_data), "--out_dir", str(tmp_path), *TINY_RUN,
                           "--max_iters", "2", "--init_from", "resume"])
    assert tb.train(cfg)["iter"] == 2
    assert f"{tmp_path / 'ckpt.pt'} does not exist yet; starting from scratch" in capsys.readouterr().out


def test_resume_in_another_precision(char_data, tmp_path, capsys):
    """A float32 (or bf16) checkpoint has no loss scale; resuming it in float16 starts a fresh one
    instead of failing on the empty GradScaler state."""
    args = ["--data_dir", str(char_data), "--out_dir", str(tmp_path), *TINY_RUN]
    tb.train(tb.parse_config(args + ["--max_iters", "2", "--dtype", "float32"]))
    result = tb.train(tb.parse_config(args + ["--max_iters", "4", "--dtype", "float16", "--init_from", "resume"]))
    assert result["iter"] == 4 and math.isfinite(result["losses"]["val"])
    assert "dtype float32 -> float16" in capsys.readouterr().out


def test_metrics_trim_on_resume(tmp_path):
    lines = [{"iter": 0, "val_loss": 4.0}, {"iter": 0, "loss": 4.1}, {"iter": 1, "loss": 4.0},
             {"iter": 2, "val_loss": 3.9}, {"iter": 2, "loss": 3.8}, {"iter": 3, "loss": 3.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"iter": 4, "lo')
    tb.Metrics(tmp_path, True, resume_iter=2, resume_evaluated=True)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == lines[:4]
    tb.Metrics(tmp_path, True, resume_iter=2, resume_evaluated=False)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_sigusr1_checkpoints_exits_zero_and_resumes_exactly(char_data, tmp_path):
    args = ["--data_dir", str(char_data), "--out_dir", str(tmp_path / "run"), *TINY_RUN]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args, "--max_iters", "100000"], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 3:"):
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0, "".join(lines)
    preempted = [line for line in lines if line.startswith("preempted:")]
    assert len(preempted) == 1, "".join(lines)
    stopped_at = int(preempted[0].split()[5])
    ckpt = tmp_path / "run" / "ckpt.pt"
    assert preempted[0].strip() == f"preempted: checkpoint saved at iter {stopped_at} to {ckpt}"
    assert stopped_at >= 4
    # the requeued command: same options plus --init_from resume (and a reachable end for the test)
    end = stopped_at + 5
    result = run_cli([*args, "--max_iters", "100000", "--init_from", "resume", "--max_iters", str(end)])
    assert result.returncode == 0, result.stderr
    tb.train(tb.parse_config([*args, "--out_dir", str(tmp_path / "straight"), "--max_iters", str(end)]))
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "straight")


def test_rerunning_a_command_refuses_to_replace_its_checkpoint(char_data, tmp_path):
    args = ["--data_dir", str(char_data), "--out_dir", str(tmp_path), *TINY_RUN, "--max_iters", "10"]
    tb.train(tb.parse_config(args))
    ckpt, metrics = tmp_path / "ckpt.pt", tmp_path / "metrics.jsonl"
    saved, records = ckpt.read_bytes(), metrics.read_text()
    result = run_cli(args)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {ckpt} already holds a run; continue it with --init_from resume, or start over with --overwrite "
        "(it is replaced at the first checkpoint) or another --out_dir"]
    assert ckpt.read_bytes() == saved and metrics.read_text() == records
    # on purpose: --overwrite starts over, and the metrics are the new run's only
    assert tb.train(tb.parse_config(args + ["--overwrite", "--max_iters", "4"]))["iter"] == 4
    assert torch.load(ckpt, weights_only=True)["iter_num"] == 4
    assert [i for i, _ in train_losses(tmp_path)] == list(range(4))


def test_ctrl_c_checkpoints_and_exits_zero(char_data, tmp_path):
    """SIGINT (Ctrl-C) after training started: like SIGTERM/SIGUSR1, save, one line, exit 0."""
    args = ["--data_dir", str(char_data), "--out_dir", str(tmp_path), *TINY_RUN, "--max_iters", "100000"]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 3:"):
            proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err + "".join(lines) and err == ""
    preempted = [line for line in lines if line.startswith("preempted:")]
    assert len(preempted) == 1, "".join(lines)
    stopped_at = int(preempted[0].split()[5])
    assert preempted[0].strip() == f"preempted: checkpoint saved at iter {stopped_at} to {tmp_path / 'ckpt.pt'}"
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == stopped_at >= 4


def test_gpu_preset_on_cpu_warns_up_front_and_sigterm_ends_the_compile_at_once(char_data, tmp_path):
    """The tester's case: --preset shakespeare_char on a CPU compiled for 14+ minutes with no word,
    and a SIGTERM during that compile was not acted on. Now: a warning before the model is built,
    and a stop signal before the first step ends the process within seconds."""
    proc = subprocess.Popen([sys.executable, SCRIPT, "--preset", "shakespeare_char", "--device", "cpu",
                             "--data_dir", str(char_data), "--out_dir", str(tmp_path / "run")],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("compiling the model"):
            break
    time.sleep(3)  # inside torch.compile now (it runs at the first forward)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 0, err
    text = "".join(out) + rest
    assert "stopped by SIGTERM before the first training step: nothing to save" in text
    assert "Traceback" not in text + err
    assert err.splitlines()[0].startswith("warning: this run is sized for a GPU: about ")
    assert tb.CPU_RECIPE in err and not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.slow
def test_compiled_run_matches_eager_and_resumes(char_data, tmp_path):
    args = ["--data_dir", str(char_data), *TINY_RUN, "--max_iters", "6", "--eval_interval", "3"]
    tb.train(tb.parse_config(args + ["--out_dir", str(tmp_path / "eager")]))
    result = run_cli(args + ["--out_dir", str(tmp_path / "compiled"), "--compile", "true", "--max_iters", "3"])
    assert result.returncode == 0, result.stderr
    result = run_cli(args + ["--out_dir", str(tmp_path / "compiled"), "--compile", "true", "--init_from", "resume"])
    assert result.returncode == 0, result.stderr
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert [i for i, _ in compiled] == list(range(6))
    assert [loss for _, loss in compiled] == pytest.approx([loss for _, loss in eager], abs=1e-4)


# -----------------------------------------------------------------------------
# sampling, bench, the default run

def test_sample_prints_text(char_data, tmp_path, capsys):
    tb.train(tb.parse_config(["--data_dir", str(char_data), "--out_dir", str(tmp_path), *TINY_RUN,
                              "--max_iters", "2"]))
    capsys.readouterr()
    sample = ["sample", "--out_dir", str(tmp_path), "--device", "cpu"]
    tb.main([*sample, "--num_samples", "2", "--max_new_tokens", "20", "--start", "ROMEO:", "--seed", "3"])
    out = capsys.readouterr().out
    samples = out.split("---------------\n")
    assert len(samples) == 3 and samples[-1] == ""
    # the prompt, 20 new characters (newlines among them possible), then print's newline
    assert all(s.startswith("ROMEO:") and len(s) == 6 + 20 + 1 for s in samples[:2]), samples
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("First")
    tb.main([*sample, "--num_samples", "1", "--max_new_tokens", "5", "--start", f"FILE:{prompt}"])
    assert capsys.readouterr().out.startswith("First")
    with pytest.raises(SystemExit, match="characters outside the model's vocabulary"):
        tb.main([*sample, "--start", "\u00e9\u00e9"])
    with pytest.raises(SystemExit, match="ckpt.pt not found"):
        tb.main(["sample", "--out_dir", str(tmp_path / "nothing")])


def test_bench_prints_timing_and_json(tmp_path):
    result = run_cli(["--bench", *TINY_MODEL, "--bench_warmup", "1", "--bench_iters", "2", "--gpu_type", "a100",
                      "--data_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("bench: ") and "ms/iter" in lines[-2] and "tok/s" in lines[-2]
    report = json.loads(lines[-1])
    assert report["data"] == "random" and report["gradient_accumulation_steps"] == 1
    assert report["tokens_per_s"] == pytest.approx(8 * 32 / (report["ms_per_iter"] / 1000))
    assert report["peak_flops"] == 312e12 and report["mfu"] > 0


@pytest.mark.slow
def test_default_run_prepares_corpus_trains_and_samples(tmp_path):
    # the no-argument run with a much smaller budget: small corpus, few steps
    result = run_cli(["--preset", "default", "--max_iters", "30", "--lr_decay_iters", "30", "--warmup_iters", "5",
                      "--eval_interval", "15", "--eval_iters", "4", "--corpus_bytes", "300000"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (tmp_path / "data" / "stdlib_char" / "meta.pkl").exists()
    assert (tmp_path / "out" / "default" / "ckpt.pt").exists()
    val = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(val) == 3 and val[-1] < val[0] - 0.5, out
    assert "sample from out/default/ckpt.pt:" in out


# -----------------------------------------------------------------------------
# DDP on CPU: 2 gloo processes through torchrun

def child_pids(pid):
    """Processes whose parent is pid (torchrun starts its workers from any of its threads)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state_and_ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(state_and_ppid[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def torchrun(args, nproc=2):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, SCRIPT, *args]


@pytest.mark.slow
def test_ddp_two_ranks_match_one_rank_and_stop_together(char_data, tmp_path):
    args = ["--data_dir", str(char_data), *TINY_RUN, "--max_iters", "8", "--eval_interval", "4"]
    ddp = subprocess.run(torchrun(args + ["--out_dir", str(tmp_path / "ddp")]), env=subprocess_env(),
                         capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr
    assert "world size 2, 1 micro-steps per rank" in ddp.stdout
    assert (tmp_path / "ddp" / "ckpt.pt").exists()
    tb.train(tb.parse_config(args + ["--out_dir", str(tmp_path / "single")]))
    two, one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert [i for i, _ in two] == [i for i, _ in one] == list(range(8))
    # same global batch on 1 or 2 ranks: only float summation order differs
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], abs=1e-4)

    # SIGUSR1 to ONE worker: both ranks agree to stop after the same iteration
    proc = subprocess.Popen(torchrun(args + ["--out_dir", str(tmp_path / "stop"), "--max_iters", "100000"]),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 3:"):
            workers = child_pids(proc.pid)
            assert len(workers) == 2, workers
            os.kill(workers[-1], signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0, "".join(lines)
    assert sum(line.startswith("preempted: checkpoint saved at iter ") for line in lines) == 1, "".join(lines)
    assert (tmp_path / "stop" / "ckpt.pt").exists()


def readme_baseline_commands():
    """train_baseline.py command lines in the code blocks of the README's baseline section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Baseline")[1].split("\n## ")[0]
    code = "\n".join(section.split("```")[1::2]).replace("\\\n", " ")  # odd pieces are code blocks
    commands = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        if "train_baseline.py" in words and words[0] in ("python3", "torchrun"):
            commands.append(words[words.index("train_baseline.py") + 1:])
    return commands


def test_readme_commands_parse():
    commands = readme_baseline_commands()
    assert len(commands) >= 10
    for args in commands:
        if args[:1] == ["sample"]:
            tb.build_sample_parser().parse_args(args[1:])
        else:
            tb.parse_config(args)
