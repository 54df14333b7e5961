"""benchmarks/vs_upstream.py: editing upstream's Hyperparameters (the real record #68 file when the
mirror is here, and a synthetic file of the same shape always), loud failures, log parsing of both
formats, the per-stage step-time math, the comparison, and the run flow end to end on CPU with
stand-in training scripts (torchrun included) in place of the GPU trainers."""
import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/KellerJordan+modded-nanogpt/repo")
RECORD_68 = "9e53f9e3"


def _load():
    spec = importlib.util.spec_from_file_location("vs_upstream", REPO / "benchmarks" / "vs_upstream.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


vs = _load()

# ---- a synthetic upstream: the shape of record #68's train_gpt.py, runnable without a GPU --------
# It logs like upstream (its own code, a separator, then step lines into logs/<run_id>.txt), loads
# FA3 through `kernels` like upstream (the stand-in answers on CPU), and honours the edited fields.
SYNTH_UPSTREAM = '''\
import os
import sys
import time
import uuid
from dataclasses import dataclass
from itertools import accumulate

with open(sys.argv[0]) as f:
    code = f.read()

from kernels import get_kernel

world_size = int(os.environ["WORLD_SIZE"])
flash_attn_interface = get_kernel('varunneal/flash-attention-3').flash_attn_interface

@dataclass
class Hyperparameters:
    # data
    data_path = os.environ.get("DATA_PATH", ".")
    train_files: str = os.path.join(data_path, "data/fineweb10B/fineweb_train_*.bin") # input .bin to train on
    val_files: str = os.path.join(data_path, "data/fineweb10B/fineweb_val_*.bin") # input .bin to eval
    val_tokens: int = 10485760 # fixed for comparisons
    # schedule
    num_scheduled_iterations: int = 30  # steps of the lr and ws schedule
    num_extension_iterations: int = 4  # steps at final lr and ws
    # evaluation and logging
    run_id: str = f"{uuid.uuid4()}"
    val_loss_every: int = 10  # 0 for only at the end
    save_checkpoint: bool = False

args = Hyperparameters()

@dataclass
class TrainingStage:
    batch_size: int
    duration: float = None

TRAINING_STAGES = [
    TrainingStage(duration=1/3, batch_size=8),
    TrainingStage(duration=1/3, batch_size=16),
    TrainingStage(duration=1/3, batch_size=24),
    TrainingStage(batch_size=24),
]
ends = [0] + [round(c * args.num_scheduled_iterations) for c in accumulate(s.duration for s in TRAINING_STAGES[:-1])]
train_steps = args.num_scheduled_iterations + args.num_extension_iterations
STEP_MS = float(os.environ.get("SYNTH_STEP_MS", "10"))

os.makedirs("logs", exist_ok=True)
logfile = f"logs/{args.run_id}.txt"
def print0(s, console=False):
    with open(logfile, "a") as f:
        if console:
            print(s)
        print(s, file=f)

print0(code)
print0("=" * 100)
print0(f"world_size {world_size}, data {args.train_files} {args.val_files}")
print0("=" * 100)
transition_steps = ends[1:]
warmup_steps = sorted({0, 1, 2} | set(s + offset for s in transition_steps for offset in [-1, 0, 1] if s + offset >= 0))
print0(f"Sampling steps {warmup_steps} for warmup", console=True)
time.sleep(float(os.environ.get("SYNTH_SLEEP", "0")))
if os.environ.get("SYNTH_FAIL"):
    raise SystemExit("synthetic failure during the warm-up")
print0("Resetting Model", console=True)

training_time_ms = 0
for step in range(train_steps + 1):
    last_step = (step == train_steps)
    stage = sum(step >= e for e in ends[1:])
    if last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
        val_loss = 11.0 / (1 + step)
        print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms/max(step, 1):.2f}ms", console=True)

    if last_step:
        break

    # --------------- TRAINING SECTION -----------------
    training_time_ms += STEP_MS * (1 + stage)
    print0(f"step:{step+1}/{train_steps} train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms/(step + 1):.2f}ms", console=True)

print0(f"peak memory allocated: 1000 MiB reserved: 1100 MiB", console=True)
'''

# stands in for train_speedrun.py: its flags, its log format (code, separators, schedule line,
# "warm-up done", step lines with train_loss_per_token, stage lines, summary)
SYNTH_OURS = '''\
import argparse, json, sys, time
from pathlib import Path
p = argparse.ArgumentParser()
for flag in ("--train_files", "--val_files", "--log_dir", "--run_id", "--compile_cache"):
    p.add_argument(flag)
for flag in ("--num_scheduled_iterations", "--num_extension_iterations", "--val_loss_every",
             "--val_tokens", "--max_steps"):
    p.add_argument(flag, type=int, default=0)
p.add_argument("--attn")
a = p.parse_args()
log_path = Path(a.log_dir) / f"{a.run_id}.txt"
def log(s, console=True):
    with open(log_path, "a") as f:
        print(s, file=f)
    if console:
        print(s, flush=True)
log(Path(__file__).read_text(), console=False)
log("=" * 100, console=False)
log("args: " + json.dumps(vars(a)), console=False)
log("=" * 100, console=False)
S, E = a.num_scheduled_iterations, a.num_extension_iterations
ends = [0, round(S / 3), round(2 * S / 3), S, S + E]
total = S + E
log(f"world_size 1 x grad_accum 8 on cpu (other); attention flex; schedule {list(zip(ends[:-1], ends[1:]))}, split step 21")
log("warm-up done in 1.5s (2.0s since start), 3 graphs compiled")
last = min(a.max_steps, total) if a.max_steps else total
ms = 0.0
for step in range(last + 1):
    if step == total or (a.val_loss_every and step % a.val_loss_every == 0):
        log(f"step:{step}/{total} val_loss:{10.0 / (1 + step):.4f} train_loss_per_token:3.0 train_time:{ms:.0f}ms step_avg:{ms / max(step, 1):.2f}ms")
    if step == last:
        break
    stage = sum(step >= e for e in ends[1:4])
    ms += 9.0 * (1 + stage)
    log(f"step:{step + 1}/{total} train_time:{ms:.0f}ms step_avg:{ms / (step + 1):.2f}ms")
log("peak memory allocated: 900 MiB reserved: 950 MiB")
log("summary: " + json.dumps(dict(final_val_loss=None, train_time_ms=ms)))
'''


@pytest.fixture
def synth_upstream(tmp_path):
    root = tmp_path / "upstream"
    root.mkdir()
    (root / "train_gpt.py").write_text(SYNTH_UPSTREAM)
    (root / "triton_kernels.py").write_text("# kernels\n")
    (root / "records").mkdir()
    (root / "records" / "big.txt").write_text("not copied\n")
    return root


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def documents(n, seed=0):
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 50000, n).astype(np.uint16)
    out[:: 1000] = 50256
    return out


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_shard(folder / "fineweb_train_000001.bin", documents(20000))
    write_shard(folder / "fineweb_train_000002.bin", documents(20000, 1))
    write_shard(folder / "fineweb_val_000000.bin", documents(2 * vs.VAL_BATCH_SIZE + 10, 2))
    return str(folder / "fineweb_train_*.bin"), str(folder / "fineweb_val_*.bin")


def args_for(**kw):
    argv = []
    for k, v in kw.items():
        if v is True:
            argv.append(f"--{k}")
        else:
            argv += [f"--{k}", str(v)]
    return vs.parse_args(argv)


def check_edited(original, edited, expect_fields, steps=None, warmup_limited=False):
    ast.parse(edited)                                     # still Python
    for name, value in expect_fields.items():
        assert vs.field_value(edited, name) == value, name
    lines = edited.splitlines()
    added = [line for line in lines if "vs_upstream.py" in line]
    changed = len(expect_fields) + (2 if warmup_limited else 1 if steps is not None else 0)
    assert len(added) == changed, added
    if steps is not None:
        i = next(i for i, line in enumerate(lines) if line.strip().startswith("# --------------- TRAINING SECTION"))
        assert lines[i - 2] == f"    if step >= {steps}:  # vs_upstream.py: stop after {steps} steps"
        assert lines[i - 1] == "        break"
        # after the validation section, inside the loop: after `if last_step: ... break`
        assert any(line.strip() == "if last_step:" for line in lines[i - 12:i - 2])
    if warmup_limited:
        i = next(i for i, line in enumerate(lines) if line.startswith("warmup_steps = sorted("))
        assert lines[i + 1].startswith(f"warmup_steps = [s for s in warmup_steps if s < {steps}]")
    # nothing else changed: every removed line is a field line we set
    diff = vs.unified_diff(original, edited)
    removed = [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert len(removed) == len(expect_fields)


# ---- editing -------------------------------------------------------------------------------------

def edit(text, tmp_path, **kw):
    args = args_for(upstream="x", train_files="/d/train_*.bin", val_files="/d/val_*.bin", **kw)
    sched = vs.resolve_schedule(args, text)
    return vs.upstream_edits(text, args, sched, kw.get("val_tokens", 10485760), "rid.upstream"), sched


def test_synthetic_edit_short_schedule(tmp_path):
    edited, sched = edit(SYNTH_UPSTREAM, tmp_path, schedule="short", val_tokens=4194304)
    assert sched == dict(num_scheduled_iterations=300, num_extension_iterations=10, val_loss_every=50)
    check_edited(SYNTH_UPSTREAM, edited, dict(num_scheduled_iterations=300, num_extension_iterations=10,
                                              val_loss_every=50, val_tokens=4194304, run_id="rid.upstream",
                                              train_files="/d/train_*.bin", val_files="/d/val_*.bin"))
    assert vs.boundaries_from_code(edited) == [(0, 100), (100, 200), (200, 300), (300, 310)]


def test_synthetic_edit_record_steps(tmp_path):
    edited, sched = edit(SYNTH_UPSTREAM, tmp_path, steps=7, val_every=5)
    # record schedule: upstream's own step counts stay (30 + 4), only the val frequency changes
    assert sched == dict(num_scheduled_iterations=30, num_extension_iterations=4, val_loss_every=5)
    check_edited(SYNTH_UPSTREAM, edited, dict(val_loss_every=5, run_id="rid.upstream",
                                              train_files="/d/train_*.bin", val_files="/d/val_*.bin"),
                 steps=7, warmup_limited=True)
    edited, _ = edit(SYNTH_UPSTREAM, tmp_path, steps=7, full_warmup=True)
    check_edited(SYNTH_UPSTREAM, edited, dict(run_id="rid.upstream", train_files="/d/train_*.bin",
                                              val_files="/d/val_*.bin"), steps=7)


def test_compile_only_stops_before_the_first_step(tmp_path):
    edited, _ = edit(SYNTH_UPSTREAM, tmp_path, compile_only=True, side="upstream")
    assert "    if step >= 0:  # vs_upstream.py: stop after 0 steps" in edited
    assert "warmup_steps = [s for s" not in edited              # the full warm-up stays


@pytest.fixture(scope="module")
def record68(tmp_path_factory):
    if not MIRROR.exists():
        pytest.skip(f"the upstream mirror {MIRROR} is not here (CI): the synthetic file covers the edits")
    result = subprocess.run(["git", "-C", str(MIRROR), "show", f"{RECORD_68}:train_gpt.py"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"commit {RECORD_68} not readable from the mirror: {result.stderr.strip()}")
    path = tmp_path_factory.mktemp("up68") / "train_gpt.py"
    path.write_text(result.stdout)
    return result.stdout


def test_record68_edit_steps(record68, tmp_path):
    edited, sched = edit(record68, tmp_path, steps=100, val_every=100)
    assert sched == dict(num_scheduled_iterations=1515, num_extension_iterations=40, val_loss_every=100)
    check_edited(record68, edited, dict(val_loss_every=100, run_id="rid.upstream",
                                        train_files="/d/train_*.bin", val_files="/d/val_*.bin"),
                 steps=100, warmup_limited=True)
    assert vs.boundaries_from_code(record68) == [(0, 505), (505, 1010), (1010, 1515), (1515, 1555)]
    assert vs.kernel_name(record68) == "varunneal/flash-attention-3"


def test_record68_edit_short(record68, tmp_path):
    edited, _ = edit(record68, tmp_path, schedule="short", val_tokens=4194304)
    check_edited(record68, edited, dict(num_scheduled_iterations=300, num_extension_iterations=10,
                                        val_loss_every=50, val_tokens=4194304, run_id="rid.upstream",
                                        train_files="/d/train_*.bin", val_files="/d/val_*.bin"))
    assert vs.boundaries_from_code(edited) == [(0, 100), (100, 200), (200, 300), (300, 310)]
    # upstream's val batch is ours: the tool's val token arithmetic assumes it
    assert vs.field_value(record68, "val_batch_size") == vs.VAL_BATCH_SIZE


def test_record68_flash_call_is_what_the_standin_takes(record68):
    call = record68[record68.index("flash_attn_interface.flash_attn_varlen_func("):]
    call = call[:call.index(")\n") + 1]
    for keyword in ("cu_seqlens_q=", "cu_seqlens_k=", "max_seqlen_q=", "max_seqlen_k=", "causal=True",
                    "softmax_scale=", "window_size=(bm_size, 0)"):
        assert keyword in call


@pytest.mark.parametrize("drop,expect", [
    ("    val_loss_every: int = 10  # 0 for only at the end\n", "val_loss_every"),
    ("    num_extension_iterations: int = 4  # steps at final lr and ws\n", "num_extension_iterations"),
    ("    # --------------- TRAINING SECTION -----------------\n", "TRAINING SECTION"),
    ("warmup_steps = sorted({0, 1, 2} | set(s + offset for s in transition_steps for offset in [-1, 0, 1] if s + offset >= 0))\n",
     "warmup_steps = sorted"),
])
def test_missing_line_fails_loudly(drop, expect, synth_upstream, corpus, capsys, tmp_path):
    text = SYNTH_UPSTREAM.replace(drop, "")
    assert text != SYNTH_UPSTREAM
    (synth_upstream / "train_gpt.py").write_text(text)
    train, val = corpus
    rc = vs.main(["--upstream", str(synth_upstream), "--train_files", train, "--val_files", val,
                  "--schedule", "short", "--steps", "5", "--side", "upstream", "--dry_run",
                  "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("error: upstream train_gpt.py: could not find the line") and expect in err[0]
    if "warmup" in expect:
        assert "--full_warmup" in err[0]


def test_duplicate_field_is_an_error():
    text = SYNTH_UPSTREAM.replace("    save_checkpoint: bool = False\n",
                                  "    save_checkpoint: bool = False\n    val_loss_every: int = 3\n")
    with pytest.raises(vs.ToolError, match="2 lines"):
        vs.set_fields(text, dict(val_loss_every=5))


def test_field_outside_the_class_is_not_edited():
    text = SYNTH_UPSTREAM.replace("args = Hyperparameters()\n", "args = Hyperparameters()\n    val_tokens: int = 1\n")
    edited = vs.set_fields(text, dict(val_tokens=2097152))
    assert "    val_tokens: int = 1\n" in edited and vs.field_value(edited, "val_tokens") == 2097152


# ---- checkout, corpus and GPU errors (one `error:` line each) ------------------------------------

def run_main(argv, capsys):
    rc = vs.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip().splitlines()


def base_argv(upstream, corpus, tmp_path, *more):
    return ["--upstream", str(upstream), "--train_files", corpus[0], "--val_files", corpus[1],
            "--out_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"),
            "--cache_dir", str(tmp_path / "cache"), *more]


def test_missing_upstream_path(corpus, tmp_path, capsys):
    rc, _, err = run_main(base_argv(tmp_path / "nope", corpus, tmp_path), capsys)
    assert rc == 1 and err == [f"error: upstream checkout {tmp_path / 'nope'} does not exist"]


def test_not_an_upstream_checkout(corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_main(base_argv(tmp_path / "empty", corpus, tmp_path), capsys)
    assert rc == 1 and len(err) == 1 and "not an upstream modded-nanogpt checkout" in err[0]
    (tmp_path / "empty" / "train_gpt.py").write_text("print('hi')\n")
    rc, _, err = run_main(base_argv(tmp_path / "empty", corpus, tmp_path), capsys)
    assert rc == 1 and len(err) == 1 and "no `class Hyperparameters`" in err[0]


def test_corpus_errors(synth_upstream, corpus, tmp_path, capsys):
    missing = (str(tmp_path / "none_*.bin"), corpus[1])
    rc, _, err = run_main(base_argv(synth_upstream, missing, tmp_path), capsys)
    assert rc == 1 and err == [f"error: corpus not found: no train shards match {missing[0]!r}"]
    one = str(Path(corpus[0]).parent / "fineweb_train_000001.bin")
    rc, _, err = run_main(base_argv(synth_upstream, (one, corpus[1]), tmp_path), capsys)
    assert rc == 1 and len(err) == 1 and "at least 2 train shards" in err[0]
    bad = tmp_path / "bad_val.bin"
    bad.write_bytes(b"\0" * 2048)
    rc, _, err = run_main(base_argv(synth_upstream, (corpus[0], str(bad)), tmp_path), capsys)
    assert rc == 1 and len(err) == 1 and "not a FineWeb-format shard" in err[0]
    small = tmp_path / "small_val.bin"
    write_shard(small, documents(1000))
    rc, _, err = run_main(base_argv(synth_upstream, (corpus[0], str(small)), tmp_path), capsys)
    assert rc == 1 and len(err) == 1 and "fewer than one validation batch" in err[0]


def test_no_gpu_error(synth_upstream, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(vs, "gpu_count", lambda: 0)
    rc, out, err = run_main(base_argv(synth_upstream, corpus, tmp_path, "--schedule", "short"), capsys)
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: no CUDA GPU here")
    monkeypatch.setattr(vs, "gpu_count", lambda: 1)
    rc, out, err = run_main(base_argv(synth_upstream, corpus, tmp_path, "--nproc", "2"), capsys)
    assert rc == 1 and err == ["error: --nproc 2 but 1 GPU(s) visible"]


def test_no_gpu_error_real_check(synth_upstream, corpus, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    rc, _, err = run_main(base_argv(synth_upstream, corpus, tmp_path), capsys)
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: no CUDA GPU here")


def test_argument_errors(synth_upstream, corpus, tmp_path, capsys):
    for more, expect in ((["--nproc", "3"], "--nproc 3"), (["--steps", "0"], "--steps 0"),
                         (["--compile_only"], "--compile_only is for --side upstream"),
                         (["--run_id", "a/b"], "--run_id"), (["--val_tokens", "1000"], "multiple of")):
        rc, _, err = run_main(base_argv(synth_upstream, corpus, tmp_path, *more), capsys)
        assert rc == 1 and len(err) == 1 and expect in err[0], (more, err)
    rc, _, err = run_main(["--side", "upstream", "--train_files", corpus[0], "--val_files", corpus[1]], capsys)
    assert rc == 1 and err == ["error: --upstream PATH is needed to run the upstream side"]


def test_val_token_capacity_and_training_tokens():
    micro = vs.VAL_BATCH_SIZE // 8
    # one shard of exactly 8 micro-batches + 2 tokens: one full validation batch on one GPU
    assert vs.max_val_tokens([8 * micro + 2], 1) == vs.VAL_BATCH_SIZE
    assert vs.max_val_tokens([8 * micro + 1], 1) == 0
    # shard tails are skipped: two shards of 5 micro-batches each give 10, i.e. one batch on 1 GPU
    assert vs.max_val_tokens([5 * micro + 2, 5 * micro + 2], 1) == vs.VAL_BATCH_SIZE
    # 8 GPUs: one micro-batch of the full batch per step
    assert vs.max_val_tokens([3 * vs.VAL_BATCH_SIZE + 2], 8) == 3 * vs.VAL_BATCH_SIZE
    assert vs.tokens_needed(10, 300) == 10 * 131072
    assert vs.tokens_needed(310, 300) == 100 * (131072 + 262144 + 393216) + 10 * 393216


def test_dry_run_prints_edits_and_commands(synth_upstream, corpus, tmp_path, capsys):
    rc, out, err = run_main(base_argv(synth_upstream, corpus, tmp_path, "--steps", "7", "--dry_run",
                                      "--ours_args", "--attn flex"), capsys)
    assert rc == 0, err
    assert "+    if step >= 7:  # vs_upstream.py: stop after 7 steps" in out
    assert "+warmup_steps = [s for s in warmup_steps if s < 7]" in out
    assert "would run upstream:" in out and "torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py" in out
    ours = next(line for line in out.splitlines() if line.startswith("would run ours:"))
    for flag in ("--num_scheduled_iterations 30", "--num_extension_iterations 4", "--val_loss_every 10",
                 "--max_steps 7", "--run_id record_steps7.ours", "--attn flex", "--val_tokens 4194304"):
        assert flag in ours
    assert "note: the val shards hold" in out


def test_seed_seeds_upstreams_model_and_passes_ours_the_seed(synth_upstream, corpus, tmp_path, capsys):
    script = synth_upstream / "train_gpt.py"
    script.write_text(script.read_text() + "model: nn.Module = GPT(\n    vocab_size=50257,\n).cuda()\n")
    rc, out, err = run_main(base_argv(synth_upstream, corpus, tmp_path, "--seed", "5", "--dry_run"), capsys)
    assert rc == 0, err
    assert "+torch.manual_seed(5)  # vs_upstream.py: --seed 5" in out
    edited = out[out.index("+torch.manual_seed(5)"):]
    assert edited.splitlines()[1] == " model: nn.Module = GPT("          # seeded right before the build
    ours = next(line for line in out.splitlines() if line.startswith("would run ours:"))
    assert "--seed 5" in ours and "--run_id record_seed5.ours" in ours


def test_seed_refused_when_upstream_builds_its_model_elsewhere(synth_upstream, corpus, tmp_path, capsys):
    rc, _, err = run_main(base_argv(synth_upstream, corpus, tmp_path, "--seed", "5", "--dry_run"), capsys)
    assert rc == 1 and len(err) == 1 and "could not find the line `model: nn.Module = GPT(`" in err[0]


def test_ours_flags_exist_in_train_speedrun():
    """The flags the tool passes to ours are in train_speedrun.py's --help."""
    result = subprocess.run([sys.executable, str(REPO / "train_speedrun.py"), "--help"], capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for flag in ("--train_files", "--val_files", "--num_scheduled_iterations", "--num_extension_iterations",
                 "--val_loss_every", "--val_tokens", "--log_dir", "--run_id", "--compile_cache", "--max_steps",
                 "--seed"):
        assert flag in result.stdout, flag


# ---- logs and the comparison ---------------------------------------------------------------------

UPSTREAM_LOG = """\
@dataclass
class Hyperparameters:
    num_scheduled_iterations: int = 6  # vs_upstream.py (upstream: 1515)
    num_extension_iterations: int = 2  # vs_upstream.py (upstream: 40)
TRAINING_STAGES = [
    TrainingStage(duration=1/3, batch_size=8 * 2048 * 8, window_sizes=(1, 3), lr_mul=1.0,
                  mtp_weights_start=[1.0, 0.5, 0.25], mtp_weights_end=[1.0, 0.5, 0.0]),
    TrainingStage(duration=1/3, batch_size=16 * 2048 * 8, window_sizes=(3, 7), lr_mul=1.52),
    TrainingStage(duration=1/3, batch_size=24 * 2048 * 8, window_sizes=(5, 11), lr_mul=1.73),
    TrainingStage(batch_size=24 * 2048 * 8, window_sizes=(6, 13), lr_mul=1.0),
]
        print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms")
step:99/99 val_loss:0.1 train_time:1ms step_avg:1ms
====================================================================================================
Running PyTorch 2.11.0+cu130
====================================================================================================
Compiling model and warming up kernels (~7 minutes on first execution)
Sampling steps [0, 1, 2] for warmup
Resetting Model
step:0/8 val_loss:10.8258 train_time:0ms step_avg:0.03ms
step:1/8 train_time:100ms step_avg:100.00ms
step:2/8 train_time:200ms step_avg:100.00ms
step:3/8 train_time:400ms step_avg:133.33ms
step:4/8 val_loss:5.0000 train_time:600ms step_avg:150.00ms
step:4/8 train_time:600ms step_avg:150.00ms
step:5/8 train_time:900ms step_avg:180.00ms
step:6/8 train_time:1200ms step_avg:200.00ms
step:7/8 train_time:1500ms step_avg:214.29ms
step:8/8 train_time:1800ms step_avg:225.00ms
step:8/8 val_loss:4.0000 train_time:1801ms step_avg:225.12ms
peak memory allocated: 37308 MiB reserved: 38000 MiB
"""
# note: upstream logs the step-4 validation after the step-4 training line; the order above is
# deliberately mixed to show that validation lines do not enter the step times

OURS_LOG = """\
def main():
    log(f"step:{step + 1}/{total_steps} train_time:{now_ms:.0f}ms step_avg:{now_ms / (step + 1):.2f}ms")
====================================================================================================
torch 2.11.0
args: {"num_scheduled_iterations": 6}
====================================================================================================
world_size 1 x grad_accum 8 on NVIDIA H200 (h200); attention flex; fp8 True; compile True; schedule [(0, 2), (2, 4), (4, 6), (6, 8)], split step 5
warm-up: replaying steps [0, 2, 4, 5, 6]
warm-up done in 150.5s (160.2s since start), 12 graphs compiled
step:0/8 val_loss:10.8000 train_time:0ms step_avg:0.00ms
step:1/8 train_time:90ms step_avg:90.00ms
step:2/8 train_time:180ms step_avg:90.00ms
step:3/8 train_time:360ms step_avg:120.00ms
step:4/8 train_time:540ms step_avg:135.00ms
step:4/8 val_loss:5.1000 train_loss_per_token:5.5 train_time:541ms step_avg:135.25ms
step:5/8 train_time:840ms step_avg:168.00ms
step:6/8 train_time:1140ms step_avg:190.00ms
step:7/8 train_time:1500ms step_avg:214.29ms
step:8/8 train_time:1860ms step_avg:232.50ms
step:8/8 val_loss:3.9000 train_loss_per_token:4.0 train_time:1861ms step_avg:232.62ms
stage 1: 2 steps, step_avg 90.00ms
peak memory allocated: 31200 MiB reserved: 33000 MiB
summary: {"final_val_loss": 3.9, "train_time_ms": 1861.0}
"""


@pytest.fixture
def logs(tmp_path):
    up, ours = tmp_path / "t.upstream.txt", tmp_path / "t.ours.txt"
    up.write_text(UPSTREAM_LOG)
    ours.write_text(OURS_LOG)
    return up, ours


def test_parse_upstream_log(logs):
    log = vs.parse_log(logs[0])
    assert log["kind"] == "upstream"
    assert log["train_ms"] == {1: 100, 2: 200, 3: 400, 4: 600, 5: 900, 6: 1200, 7: 1500, 8: 1800}
    assert log["val"] == {0: 10.8258, 4: 5.0, 8: 4.0}          # the code dump's line is not data
    assert log["peak"] == (37308, 38000) and log["total_steps"] == 8
    assert log["boundaries"] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert log["boundaries_from"] == "the code its log starts with"


def test_parse_ours_log(logs):
    log = vs.parse_log(logs[1])
    assert log["kind"] == "ours"
    assert log["train_ms"][8] == 1860 and log["val"] == {0: 10.8, 4: 5.1, 8: 3.9}
    assert log["boundaries"] == [(0, 2), (2, 4), (4, 6), (6, 8)] and log["boundaries_from"] == "its log"
    assert (log["warmup_s"], log["since_start_s"]) == (150.5, 160.2)
    assert log["peak"] == (31200, 33000)


def test_not_a_log(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello\n")
    with pytest.raises(vs.ToolError, match="no step lines"):
        vs.parse_log(path)


def test_stage_step_times_math():
    train_ms = {1: 100, 2: 200, 3: 400, 4: 600, 5: 900, 6: 1200, 7: 1500, 8: 1800}
    stages = vs.stage_step_times(train_ms, [(0, 2), (2, 4), (4, 6), (6, 8)])
    assert stages == [(2, 100.0), (2, 200.0), (2, 300.0), (2, 300.0)]
    # a missing line drops the two steps it bounds; an unreached stage has no time
    del train_ms[3]
    assert vs.stage_step_times(train_ms, [(0, 4), (4, 8), (8, 10)]) == [(2, 100.0), (4, 300.0), (0, None)]


def test_comparison_ratios(logs, capsys):
    up, ours = (vs.parse_log(p) for p in logs)
    result = vs.compare(up, ours)
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["stage 1", "stage 2", "stage 3", "extension"]
    assert stages["stage 1"]["upstream_ms"] == 100 and stages["stage 1"]["ours_ms"] == 90
    assert stages["stage 1"]["ratio"] == pytest.approx(0.9)
    assert stages["stage 2"]["ratio"] == pytest.approx(180 / 200)
    assert stages["stage 3"]["ratio"] == pytest.approx(300 / 300)
    assert stages["extension"]["ratio"] == pytest.approx(360 / 300)
    assert result["overall"]["ratio"] == pytest.approx(1860 / 1800)
    assert [(v["step"], round(v["diff"], 4)) for v in result["val"]] == [(0, -0.0258), (4, 0.1), (8, -0.1)]
    assert "the same" in result["boundaries_from"]
    text = vs.format_comparison(result)
    assert "stage 1" in text and "0.900" in text and "+0.1000" in text
    assert "37308 MiB allocated" in text and "(ours/upstream allocated 0.836)" in text
    assert "its log: warm-up 150.5 s, 160.2 s" in text
    assert "n/a (not run by this tool" in text               # upstream: no timing sidecar, no timestamps


def test_comparison_uses_the_tools_timing(logs):
    logs[0].with_suffix(".timing").write_text(json.dumps(dict(warmup_end_s=183.25, first_step_line_s=190.0)))
    result = vs.compare(*(vs.parse_log(p) for p in logs))
    assert result["upstream"]["warmup_end_s"] == 183.25
    assert "upstream  183.2 s; first step line at 190.0 s" in vs.format_comparison(result)


def test_compare_command_writes_comparison_and_plot(logs, capsys):
    rc, out, err = run_main(["--compare", str(logs[0]), str(logs[1])], capsys)
    assert rc == 0, err
    assert "per-stage step time" in out and "validation loss" in out
    folder = logs[1].parent
    assert (folder / "t.comparison.log").read_text().startswith("upstream log:")
    assert json.loads((folder / "t.comparison.jsonl").read_text())["overall"]["steps"] == 8
    plot_line = next(line for line in out.splitlines() if line.startswith("plot"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot_line.startswith("plot skipped")
    else:
        assert plot_line.startswith("plot: ") and (folder / "t.comparison.png").stat().st_size > 0


def test_compare_command_honours_out_dir(logs, tmp_path, capsys):
    out_dir = tmp_path / "elsewhere"
    rc, out, err = run_main(["--compare", str(logs[0]), str(logs[1]), "--out_dir", str(out_dir)], capsys)
    assert rc == 0, err
    assert (out_dir / "t.comparison.log").read_text().startswith("upstream log:")
    assert not (logs[1].parent / "t.comparison.log").exists()


def test_compare_missing_log(tmp_path, capsys):
    rc, _, err = run_main(["--compare", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], capsys)
    assert rc == 1 and err == [f"error: log {tmp_path / 'a.txt'} not found"]


# ---- the run flow on CPU (stand-in scripts for both trainers; upstream under torchrun) -------------

@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "gpu_count", lambda: 8)
    ours = tmp_path / "fake_ours.py"
    ours.write_text(SYNTH_OURS)
    monkeypatch.setattr(vs, "OURS_SCRIPT", ours)


def test_both_sides_end_to_end(synth_upstream, corpus, tmp_path, capsys, fake_gpu):
    argv = base_argv(synth_upstream, corpus, tmp_path, "--steps", "25", "--val_every", "5", "--run_id", "e2e")
    rc, out, err = run_main(argv, capsys)
    assert rc == 0, (out, err)
    out_dir = tmp_path / "out"
    up_log, our_log = out_dir / "e2e.upstream.txt", out_dir / "e2e.ours.txt"
    assert up_log.exists() and our_log.exists()
    # upstream ran its edited copy: our corpus, 25 steps, val every 5, FA3 from the stand-in
    up_text = up_log.read_text()
    assert corpus[0].split("/")[-1] in up_text and "step:25/34 val_loss" in up_text and "step:26/34" not in up_text
    assert "attention: FlexAttention stand-in" in out
    assert not (tmp_path / "work" / "upstream" / "records").exists()          # not copied
    assert (out_dir / "e2e.upstream.diff").read_text().startswith("--- upstream/train_gpt.py")
    timing = json.loads((out_dir / "e2e.upstream.timing").read_text())
    assert timing["returncode"] == 0 and timing["warmup_end_s"] is not None
    assert timing["first_step_line_s"] >= timing["warmup_end_s"]
    ours_timing = json.loads((out_dir / "e2e.ours.timing").read_text())
    assert ours_timing["warmup_end_s"] is not None
    # comparison: stages 0-10, 10-20, 20-30 of the 30+4 schedule reached up to step 25
    assert "=== comparison (e2e)" in out
    result = json.loads((out_dir / "e2e.comparison.jsonl").read_text())
    assert [s["stage"] for s in result["stages"]] == ["stage 1", "stage 2", "stage 3"]
    assert [s["ratio"] for s in result["stages"]] == pytest.approx([0.9, 0.9, 0.9])
    assert [v["step"] for v in result["val"]] == [0, 5, 10, 15, 20, 25]
    # the per-step lines are thinned on the console, validations are all shown
    assert out.count("val_loss") >= 12


def test_separate_sides_then_comparison(synth_upstream, corpus, tmp_path, capsys, fake_gpu):
    common = base_argv(synth_upstream, corpus, tmp_path, "--schedule", "short", "--steps", "12", "--val_every", "6")
    rc, out, err = run_main(common + ["--side", "ours"], capsys)
    assert rc == 0, err
    assert "no comparison yet" in out
    rc, out, err = run_main(common + ["--side", "upstream", "--attn", "standin"], capsys)
    assert rc == 0, err
    assert "=== comparison (short_steps12_val6)" in out


def test_failing_side_shows_its_log(synth_upstream, corpus, tmp_path, capsys, fake_gpu, monkeypatch):
    monkeypatch.setenv("SYNTH_FAIL", "1")
    rc, out, err = run_main(base_argv(synth_upstream, corpus, tmp_path, "--steps", "5"), capsys)
    assert rc == 1
    assert err[-1].startswith("error: upstream side failed (exit status 1)")
    assert any("Sampling steps" in line for line in err[:-1])        # the tail of its log
    assert any("synthetic failure during the warm-up" in line for line in err[:-1])   # and console
    assert "=== ours" not in out                                      # stopped before the other side


def test_time_limit_stops_a_side(synth_upstream, corpus, tmp_path, capsys, fake_gpu, monkeypatch):
    monkeypatch.setenv("SYNTH_SLEEP", "120")
    argv = base_argv(synth_upstream, corpus, tmp_path, "--steps", "5", "--side", "upstream", "--time_limit", "8")
    rc, out, err = run_main(argv, capsys)
    assert rc == 1 and err[-1].startswith("error: upstream side stopped at the --time_limit of 8.0 s")
    timing = json.loads((tmp_path / "out" / "record_steps5.upstream.timing").read_text())
    assert timing["timed_out"] and timing["wall_s"] < 60


def test_dense_validation_documents_warn(tmp_path):
    """Record #68's val loader has room for 895 documents per 262,144-token micro-batch."""
    micro = vs.VAL_BATCH_SIZE // 8
    tokens = np.ones(8 * micro + 2, dtype=np.uint16)
    tokens[5 * micro: 5 * micro + 900 * 200: 200] = 50256           # micro-batch 5: 900 documents
    write_shard(tmp_path / "val.bin", tokens)
    assert vs.max_val_documents([str(tmp_path / "val.bin")], vs.VAL_BATCH_SIZE, 1) == 900
    assert vs.max_val_documents([str(tmp_path / "val.bin")], vs.VAL_BATCH_SIZE, 8) == 900
    for name in ("a", "b"):
        write_shard(tmp_path / f"train_{name}.bin", documents(1000))
    notes = []
    vs.check_corpus(str(tmp_path / "train_*.bin"), str(tmp_path / "val.bin"), 1, None, 10, 300, notes)
    assert any("holds 900 documents" in n and "895" in n for n in notes)


def test_plot_fallback_without_record_stats(logs, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(sys.modules, "record_stats", None)          # `import record_stats` fails
    result = vs.compare(*(vs.parse_log(p) for p in logs))
    path = logs[0].parent / "fallback.png"
    line = vs.write_plot(str(logs[0]), str(logs[1]), path, result)
    assert line.startswith("plot: ") and "fallback" in line and path.stat().st_size > 0


def test_compile_only_run(synth_upstream, corpus, tmp_path, capsys, fake_gpu):
    argv = base_argv(synth_upstream, corpus, tmp_path, "--schedule", "short", "--side", "upstream",
                     "--compile_only", "--attn", "standin")
    rc, out, err = run_main(argv, capsys)
    assert rc == 0, err
    text = (tmp_path / "out" / "short_compile.upstream.txt").read_text()
    assert "Sampling steps [0, 1, 2, 99, 100, 101, 199, 200, 201, 299, 300, 301] for warmup" in text
    assert "step:0/310 val_loss" in text and "step:1/310" not in text          # stopped before training
    assert "compile-only run" in out and "=== comparison" not in out
