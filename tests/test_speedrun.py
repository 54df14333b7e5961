"""The speedrun trainer end to end on CPU: gradient equivalence across world sizes, the smoke run,
early stop + checkpoint, SIGTERM, two gloo ranks under torchrun, and clear CLI errors."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_speedrun as ts

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_speedrun.py"


def run_cli(args, env_extra=None, timeout=600, cwd=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def summary_of(text):
    lines = [l for l in text.splitlines() if l.startswith("summary: ")]
    assert lines, text[-3000:]
    return json.loads(lines[-1][len("summary: "):])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return ts.write_synthetic_corpus(folder, seed=1, train_tokens=200_000, val_tokens=20_000)


# ---- gradients: 1 rank x 8 micro-batches == 2 ranks x 4 micro-batches ----

def accumulated_grads(model, loader, accum, stage):
    model.zero_grad(set_to_none=True)
    for _ in range(accum):
        inputs, targets, cu, *_ = loader.next_batch(stage.batch_size)
        (model(inputs, targets, cu, stage.forward_config()) / accum).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def test_world_size_1_gradients_equal_two_simulated_ranks(corpus):
    train_glob, _ = corpus
    torch.manual_seed(0)
    cfg = ts.ModelConfig.smoke(attn_backend="sdpa", compile_mode="none", max_seq_len=512, val_max_len=512)
    model = ts.GPT(cfg).float()   # all fp32 on CPU: sums in another order agree to ~1e-6
    with torch.no_grad():         # the record starts some weights (and gating scalars) at zero:
        for p in model.parameters():  # move every one off zero so every gradient is non-zero
            p.add_(torch.randn_like(p) * 0.02)
    schedule = ts.TrainingSchedule(ts.reference_stages(128, (1, 2, 3)), 9, 1)
    stage = ts.StageState(schedule, model, torch.device("cpu"))
    stage.advance(0)
    batch = stage.batch_size
    single = accumulated_grads(model, ts.BosAlignedLoader(train_glob, batch, 128, 8, 0, 1), 8, stage)
    ranks = [accumulated_grads(model, ts.BosAlignedLoader(train_glob, batch, 128, 4, r, 2), 4, stage)
             for r in range(2)]
    assert set(single) == set(ranks[0]) == {name for name, _ in model.named_parameters()}   # every parameter
    for name, g in single.items():
        averaged = (ranks[0][name] + ranks[1][name]) / 2      # what all-reduce(AVG) delivers
        assert g.abs().max() > 0, name
        torch.testing.assert_close(averaged, g, rtol=1e-4, atol=1e-6, msg=name)


# ---- the smoke run ----

@pytest.mark.slow
def test_smoke_runs_every_stage_on_cpu(tmp_path):
    # the smoke preset shortened to one step per stage (CI time): 3 scheduled + 1 extension step
    result = run_cli(["--smoke", "--device", "cpu", "--log_dir", str(tmp_path), "--run_id", "smoke",
                      "--num_scheduled_iterations", "3", "--num_extension_iterations", "1", "--val_loss_every", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "smoke.txt").read_text()
    assert "def main(argv=None)" in log and "args: {" in log           # source and arguments recorded
    assert "torch " in log and "triton " in log
    summary = summary_of(result.stdout)
    assert summary["steps"] == 4 and summary["stopped_by"] is None
    assert all(v is not None for v in summary["stage_step_avg_ms"])    # all 3 stages + extension ran
    assert [s for s, _ in summary["val_losses"]] == [0, 2, 4]
    first, final = summary["val_losses"][0][1], summary["final_val_loss"]
    assert np.isfinite(final) and final < first - 0.3                  # it learns
    assert summary["attn_backend"] == "sdpa" and summary["world_size"] == 1
    for step in range(1, 5):
        assert f"step:{step}/4 train_time:" in log
    assert "split step 3" in log and "warm-up done" in log


def test_max_steps_stops_early_and_saves_a_checkpoint(tmp_path, corpus):
    train_glob, val_glob = corpus
    summary = ts.main(["--smoke", "--device", "cpu", "--log_dir", str(tmp_path), "--run_id", "r",
                       "--train_files", train_glob, "--val_files", val_glob, "--max_steps", "2",
                       "--val_loss_every", "0", "--save_checkpoint"])
    assert summary["stopped_by"] == "max_steps" and summary["steps"] == 2
    assert summary["final_val_loss"] is None                          # no final validation at max_steps
    assert [s for s, _ in summary["val_losses"]] == []
    ckpt = torch.load(tmp_path / "r" / "state_step000002.pt", weights_only=False)
    assert ckpt["step"] == 2 and "qk_bank" in ckpt["model"] and ckpt["args"]["max_steps"] == 2
    assert set(ckpt["optimizer"]["states"]) == set(ts.PARAM_TABLE)
    assert not list((tmp_path / "r").glob("*.tmp"))
    assert signal.getsignal(signal.SIGTERM) is not None                # handler restored


# ---- resume: a stopped run continues exactly where it stopped ----

def smoke_args(corpus, folder, run_id):
    train_glob, val_glob = corpus
    return ["--smoke", "--device", "cpu", "--log_dir", str(folder), "--run_id", run_id, "--train_files", train_glob,
            "--val_files", val_glob, "--val_loss_every", "1"]


def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path, corpus):
    whole = ts.main(smoke_args(corpus, tmp_path, "whole"))
    # stopped before step 3 (step 2, even, left Adam gradients waiting for step 3), resumed, stopped
    # again before step 4 (none waiting), resumed to the end
    first = ts.main(smoke_args(corpus, tmp_path, "r") + ["--max_steps", "3", "--save_checkpoint"])
    assert first["stopped_by"] == "max_steps" and first["steps"] == 3
    second = ts.main(smoke_args(corpus, tmp_path, "r") + ["--init_from", "resume", "--max_steps", "4",
                                                          "--save_checkpoint"])
    assert second["stopped_by"] == "max_steps" and second["steps"] == 4
    assert [p.name for p in (tmp_path / "r").glob("state_step*")] == ["state_step000004.pt"]   # older removed
    resumed = ts.main(smoke_args(corpus, tmp_path, "r") + ["--init_from", "resume"])
    assert resumed["stopped_by"] is None and resumed["steps"] == whole["steps"] == 8
    assert resumed["val_losses"] == whole["val_losses"]                  # every step, exact floats
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    log = (tmp_path / "r.txt").read_text()
    assert log.count("Speedrun trainer: our own implementation") == 1    # the code is logged once
    assert f"resumed from {tmp_path / 'r' / 'state_step000003.pt'}: step 3 of 8" in log
    val_steps = [int(m[1]) for m in re.finditer(r"^step:(\d+)/8 val_loss:", log, re.M)]
    assert val_steps == list(range(9))                                    # each validation logged once


def test_resume_refuses_a_checkpoint_of_another_model_version():
    """A checkpoint from before a record that changed the parameters: one error line naming what
    differs, nothing loaded."""
    model = ts.GPT(ts.ModelConfig.smoke(attn_backend="sdpa", compile_mode="none", max_seq_len=512, val_max_len=512))
    optimizer = ts.NorMuonAndAdam(model.named_parameters())
    state = {name: t.clone() for name, t in model.state_dict().items()}
    state.pop("mudd_gate_scale")
    state["old_lambdas"] = torch.zeros(3)
    state["bigram_embed.weight"] = torch.zeros(7, 5)
    before = model.mudd_w1.detach().clone()
    state["mudd_w1"] = torch.ones_like(state["mudd_w1"])
    with pytest.raises(SystemExit, match=r"^error: the checkpoint holds another model than this train_speedrun.py "
                       r"builds \(missing mudd_gate_scale; not in this model old_lambdas; bigram_embed.weight \(7, 5\) here"):
        ts.restore_checkpoint({}, state, model, optimizer)
    assert torch.equal(model.mudd_w1, before)
    assert ts.model_state_mismatch(model.state_dict(), model) is None


def test_resume_refuses_other_data_or_schedule(tmp_path, corpus):
    ts.main(smoke_args(corpus, tmp_path, "r") + ["--max_steps", "2", "--save_checkpoint"])
    with pytest.raises(SystemExit, match="written with --num_scheduled_iterations 6, this run has 7"):
        ts.main(smoke_args(corpus, tmp_path, "r") + ["--init_from", "resume", "--num_scheduled_iterations", "7"])
    with pytest.raises(SystemExit, match="--max_steps 2 is not past the checkpoint's step 2"):
        ts.main(smoke_args(corpus, tmp_path, "r") + ["--init_from", "resume", "--max_steps", "2"])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])   # USR1: Slurm's warning via run.sbatch
def test_stop_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus, sig):
    train_glob, val_glob = corpus
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--log_dir", str(tmp_path),
                             "--run_id", "t", "--train_files", train_glob, "--val_files", val_glob,
                             "--num_scheduled_iterations", "60", "--val_loss_every", "0"],   # a signal stop saves anyway
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("step:1/"):
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "".join(out)
    rest, err = proc.communicate(timeout=300)
    text = "".join(out) + rest
    assert proc.returncode == 0, err[-3000:]
    assert f"stopped by {sig.name}" in text
    summary = summary_of(text)
    assert summary["stopped_by"] == sig.name and 1 <= summary["steps"] < 62
    assert (tmp_path / "t" / f"state_step{summary['steps']:06d}.pt").exists()
    if sig == signal.SIGUSR1:    # and the run continues from it (two more steps here)
        more = summary["steps"] + 2
        resumed = ts.main(["--smoke", "--device", "cpu", "--log_dir", str(tmp_path), "--run_id", "t",
                           "--train_files", train_glob, "--val_files", val_glob, "--num_scheduled_iterations", "60",
                           "--val_loss_every", "0", "--init_from", "resume", "--max_steps", str(more)])
        assert resumed["steps"] == more and resumed["stopped_by"] == "max_steps"
        assert f"step:{more}/62 train_time:" in (tmp_path / "t.txt").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
def test_stop_signal_during_the_compile_warm_up_ends_the_run_at_once(tmp_path, corpus, sig):
    """The tester's case (`--smoke --device cpu --compile`): a stop signal while torch.compile warms up
    (minutes on a CPU, with compile helper processes) was acted on only after the warm-up. Now the
    process ends within seconds, with one line and no traceback, and leaves no helper behind."""
    train_glob, val_glob = corpus   # (the smoke run's own synthetic corpus costs seconds to write)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--compile",
                             "--train_files", train_glob, "--val_files", val_glob,
                             "--log_dir", str(tmp_path), "--run_id", "w"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("warm-up: replaying"):
            break
    time.sleep(3)   # compiling step 0's graph now
    sent = time.monotonic()
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    text = "".join(out) + rest
    assert proc.returncode == 0, err[-3000:]
    assert f"stopped by {sig.name} before the first training step: nothing to save" in text.splitlines()
    assert "Traceback" not in text + err and "step:1/" not in text
    assert err.splitlines() == ["warning: --compile on a CPU spends minutes compiling before the first step; "
                                "the smoke run is eager"]
    assert "nothing to save" in (tmp_path / "w.txt").read_text()
    time.sleep(1)
    helpers = subprocess.run(["pgrep", "-f", f"--log_dir {tmp_path}"], capture_output=True, text=True).stdout
    assert helpers == "", "compile helpers outlived the run"


@pytest.mark.slow
def test_two_gloo_ranks_under_torchrun_follow_the_single_process_run(tmp_path, corpus):
    """Same token stream and averaged gradients: the loss curve of 2 ranks x 4 micro-batches
    matches 1 rank x 8 (bf16 rounding aside)."""
    train_glob, val_glob = corpus
    common = ["--smoke", "--device", "cpu", "--train_files", train_glob, "--val_files", val_glob,
              "--max_steps", "2", "--val_loss_every", "2"]
    single = run_cli(common + ["--log_dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(SCRIPT), *common, "--log_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = summary_of(single.stdout), summary_of(two.stdout)
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    (step0_a, loss0_a), (step2_a, loss2_a) = s1["val_losses"]
    (step0_b, loss0_b), (step2_b, loss2_b) = s2["val_losses"]
    assert (step0_a, step2_a) == (step0_b, step2_b) == (0, 2)
    assert loss0_a == pytest.approx(loss0_b, abs=1e-4)                  # same start, same val tokens
    assert loss2_a < loss0_a - 0.05                                      # trained
    assert loss2_a == pytest.approx(loss2_b, abs=0.01)


# ---- clear errors ----

# ---- cold start: compile helper processes (the GPU run measures what they save) ----

def test_compile_helpers_run_their_job_and_report_failures(tmp_path, corpus):
    train_glob, val_glob = corpus
    argv = ["--smoke", "--device", "cpu", "--no-compile", "--log_dir", str(tmp_path), "--run_id", "h"]
    args = ts.parse_args(argv + ["--train_files", train_glob, "--val_files", val_glob])
    lines = []
    helpers = ts.CompileHelpers([("train", 2), ("eval", 0)], argv, args, lines.append)
    helpers.wait("train", 2)
    helpers.wait("eval")
    assert "compile helpers: 2 processes" in lines[0]
    assert lines[1].startswith("compile helper train:2: compiled in") and "ran to the end" in lines[1]
    assert lines[2].startswith("compile helper eval:0: compiled in")
    assert (tmp_path / "h.compile_train_2.txt").exists() and not helpers.running
    # a helper that fails leaves a warning: the main process then compiles that graph itself
    broken = ts.parse_args(argv + ["--train_files", str(tmp_path / "none_*.bin"), "--val_files", val_glob])
    helpers = ts.CompileHelpers([("train", 2)], argv, broken, lines.append)
    helpers.wait("train")
    assert lines[-1].startswith("warning: compile helper train:2 failed (exit 1)") and "no train shards match" in lines[-1]


def test_compile_helpers_are_stopped_when_the_run_ends_early(tmp_path, corpus):
    train_glob, val_glob = corpus
    argv = ["--smoke", "--device", "cpu", "--no-compile", "--log_dir", str(tmp_path), "--run_id", "h"]
    args = ts.parse_args(argv + ["--train_files", train_glob, "--val_files", val_glob])
    helpers = ts.CompileHelpers([("train", 2)], argv, args, lambda line: None)
    (proc, _), = helpers.running.values()
    helpers.close()                          # right away: the helper is still importing torch
    assert proc.returncode == -signal.SIGTERM and not helpers.running


def test_world_size_3_is_a_one_line_error(tmp_path):
    result = run_cli(["--smoke", "--device", "cpu", "--log_dir", str(tmp_path)],
                     env_extra=dict(WORLD_SIZE="3", RANK="0", LOCAL_RANK="0"), timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: world size 3 is not supported")


def test_missing_data_is_a_one_line_error(tmp_path):
    result = run_cli(["--device", "cpu", "--train_files", str(tmp_path / "none_*.bin"), "--log_dir", str(tmp_path)],
                     timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: no train shards match")


def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli(["--smoke", "--log_dir", str(tmp_path)], timeout=120)
    assert result.returncode != 0
    assert "error: --device cuda but no CUDA GPU" in result.stderr.strip().splitlines()[-1]


def test_compile_time_breakdown_names_phases_caches_and_graphs():
    before = ts.compiled_graph_count()
    fn = torch.compile(lambda x: (x * 3).cos().sum(), fullgraph=True)
    fn(torch.randn(8))
    line = ts.compile_time_breakdown()
    assert ts.compiled_graph_count() == before + 1
    assert line.startswith("compile time: dynamo trace ") and "AOTAutograd cache hit" in line
    per_graph = line.split("per graph (s): ")[1].split()
    assert len(per_graph) >= 1 and all(float(t) >= 0 for t in per_graph)
    assert [float(t) for t in per_graph] == sorted((float(t) for t in per_graph), reverse=True)
