"""run.sbatch: launch decisions (fast, no Slurm), signal handling, and real jobs on a real Slurm.

The fast tests run the wrapper with DRY_RUN=1 against a fake `python` (it answers the wrapper's probe
with a chosen number of GPUs) and a fake `scontrol`, so every GPU/node combination can be checked on
a CPU machine. The tests marked `slurm` start a single-node Slurm (tests/slurm/minislurm.py) and
submit real CPU jobs: `python3 -m pytest -m slurm tests/test_slurm.py` runs only them.
"""

import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import minislurm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / "run.sbatch"
RESUMABLE_EXIT = 75
SPEEDRUN_WORLD_SIZES = {1, 2, 4, 8}


def clean_env(**overrides):
    """This process's environment without Slurm job variables (pytest itself may run in a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    for name in ("NUM_GPUS", "GPU_TYPE", "NODES", "OMP_NUM_THREADS", "MAX_RESTARTS", "USE_SRUN",
                 "ENV_ACTIVATE", "PYTHON", "DRY_RUN", "CUDA_VISIBLE_DEVICES", "MASTER_PORT", "RUNS",
                 "ATTEMPT"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


# =============================================================================
# fast: launch decisions with a fake python and a fake scontrol
# =============================================================================

FAKE_PYTHON = """#!/bin/bash
# Stands in for python in DRY_RUN tests: answers run.sbatch's probe, runs nothing.
cat > /dev/null
if [ -n "$FAKE_PROBE_SECONDS" ]; then echo "probing" >&2; sleep "$FAKE_PROBE_SECONDS"; fi
echo "python 3.0.0"
echo "executable $0"
echo "torch 9.9.9"
echo "cuda 12.9"
echo "gpus ${FAKE_VISIBLE_GPUS:-0}"
if [ "${FAKE_VISIBLE_GPUS:-0}" -gt 0 ]; then echo "gpu_name NVIDIA_H100_80GB_HBM3"; echo "nccl 2.27.3"; fi
"""

FAKE_SCONTROL = """#!/bin/bash
# Only what run.sbatch asks before launching: the host names of a node list like gpu[1-4].
if [ "$1 $2" = "show hostnames" ]; then
    n=$(echo "$3" | sed -E 's/.*-([0-9]+)\\].*/\\1/'); for i in $(seq 1 "$n"); do echo "gpu$i"; done
fi
"""


@pytest.fixture(scope="module")
def fake_tools(tmp_path_factory):
    """A work dir holding the three flow scripts (empty) and a bin dir with the fake programs."""
    root = tmp_path_factory.mktemp("wrapper")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    for script in ("train_baseline.py", "train_speedrun.py", "prepare_data.py"):
        (root / script).write_text("")
    return root


def dry_run(fake_tools, script, *args, visible=0, slurm=None, **env):
    """run.sbatch with DRY_RUN=1; slurm = dict of Slurm job variables (None: outside Slurm)."""
    overrides = dict(env, DRY_RUN=1, FAKE_VISIBLE_GPUS=visible,
                     PATH=f"{fake_tools / 'bin'}:{os.environ['PATH']}")
    overrides.update(slurm or {})
    return subprocess.run(["bash", str(WRAPPER), script, *args], cwd=fake_tools, env=clean_env(**overrides),
                          capture_output=True, text=True, timeout=30)


def slurm_vars(nodes=1, gpus=0, cpus=16, restarts=0):
    env = {"SLURM_JOB_ID": 4242, "SLURM_JOB_NAME": "t", "SLURM_JOB_NUM_NODES": nodes,
           "SLURM_JOB_NODELIST": f"gpu[1-{nodes}]", "SLURM_CPUS_PER_TASK": cpus, "SLURM_RESTART_COUNT": restarts}
    if gpus:
        env["SLURM_GPUS_ON_NODE"] = gpus
    return env


def launched_command(result):
    line = next(line for line in result.stdout.splitlines() if "command: " in line)
    return shlex.split(line.split("command: ", 1)[1])


def banner_omp_threads(result):
    return int(re.search(r"OMP_NUM_THREADS=(\d+)", result.stdout).group(1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gpus=st.integers(0, 16), nodes=st.integers(1, 3), cpus=st.integers(1, 128))
def test_speedrun_accepts_only_one_node_and_1_2_4_8_gpus(fake_tools, gpus, nodes, cpus):
    result = dry_run(fake_tools, "train_speedrun.py", visible=gpus,
                     slurm=slurm_vars(nodes=nodes, gpus=gpus, cpus=cpus))
    if nodes > 1:
        assert result.returncode != 0 and "runs on one node" in result.stderr
    elif gpus and gpus not in SPEEDRUN_WORLD_SIZES:
        assert result.returncode != 0 and "needs 1, 2, 4 or 8 GPUs" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        cmd = launched_command(result)
        if gpus:
            assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
            assert f"--nproc_per_node={gpus}" in cmd
            assert cmd[cmd.index("--gpu_type") + 1] == "auto"
        else:
            assert "torch.distributed.run" not in cmd and cmd[-2:] == ["--device", "cpu"]
        assert banner_omp_threads(result) == max(1, cpus // max(gpus, 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gpus=st.integers(0, 8), nodes=st.integers(1, 4), restarts=st.integers(0, 3))
def test_baseline_launch_nodes_gpus_and_resume(fake_tools, gpus, nodes, restarts):
    result = dry_run(fake_tools, "train_baseline.py", "--out_dir", "o", visible=gpus,
                     slurm=slurm_vars(nodes=nodes, gpus=gpus, restarts=restarts))
    if nodes > 1 and gpus == 0:
        assert result.returncode != 0 and "multi-node runs need GPUs" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    cmd = launched_command(result)
    assert cmd[cmd.index("train_baseline.py") + 1:][:2] == ["--out_dir", "o"]  # user args come first
    assert (cmd[-2:] == ["--init_from", "resume"]) == (restarts > 0)
    if nodes > 1:
        # one torchrun per node through srun, meeting on the first node of the allocation
        assert "launch: srun" in result.stdout
        assert f"--nnodes={nodes}" in cmd and "--rdzv_backend=c10d" in cmd
        assert f"--rdzv_endpoint=gpu1:{20000 + 4242}" in cmd and "--rdzv_id=4242" in cmd
    elif gpus:
        assert "--standalone" in cmd and f"--nproc_per_node={gpus}" in cmd
    else:
        assert "torch.distributed.run" not in cmd


def test_gpus_asked_for_but_not_visible(fake_tools):
    result = dry_run(fake_tools, "train_baseline.py", visible=0, slurm=slurm_vars(gpus=4))
    assert result.returncode != 0
    assert "4 GPU(s) asked for (SLURM_GPUS_ON_NODE) but torch sees none" in result.stderr
    result = dry_run(fake_tools, "train_baseline.py", visible=2, NUM_GPUS=4)
    assert result.returncode != 0 and "only 2 GPU(s) are visible" in result.stderr


def test_local_run_uses_all_visible_gpus_and_gpu_type(fake_tools):
    result = dry_run(fake_tools, "train_baseline.py", visible=2)
    cmd = launched_command(result)
    assert "--nproc_per_node=2" in cmd and cmd[-2:] == ["--gpu_type", "auto"]
    # the type named in the Slurm request, or GPU_TYPE, goes to --gpu_type; never twice
    result = dry_run(fake_tools, "train_speedrun.py", visible=8,
                     slurm=dict(slurm_vars(gpus=8), SLURM_GPUS_PER_NODE="h200:8"))
    assert launched_command(result)[-2:] == ["--gpu_type", "h200"]
    result = dry_run(fake_tools, "train_baseline.py", visible=1, GPU_TYPE="A100")
    assert launched_command(result)[-2:] == ["--gpu_type", "a100"]
    result = dry_run(fake_tools, "train_baseline.py", "--gpu_type", "h100", visible=1, GPU_TYPE="a100")
    assert launched_command(result).count("--gpu_type") == 1


def test_prepare_data_runs_as_plain_python(fake_tools):
    result = dry_run(fake_tools, "prepare_data.py", "shakespeare_char", visible=8, slurm=slurm_vars(gpus=8))
    assert result.returncode == 0, result.stderr
    cmd = launched_command(result)
    assert cmd[1:] == ["prepare_data.py", "shakespeare_char"]


@pytest.mark.parametrize("script, message", [
    ("no_such_script.py", "script 'no_such_script.py' not found"),
    ("notes.txt", "don't know how to run 'notes.txt'"),
])
def test_bad_script_is_a_clear_error(fake_tools, script, message):
    (fake_tools / "notes.txt").write_text("")
    result = dry_run(fake_tools, script)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr


@pytest.mark.parametrize("sig, expected_status, expected_text", [
    (signal.SIGUSR1, RESUMABLE_EXIT, "nothing to requeue"),  # checkpoint and stop: resumable
    (signal.SIGTERM, 143, "finished with exit status 143"),  # stop on request (Ctrl-C, kill)
])
def test_local_signal_reaches_the_trainer(tmp_path, sig, expected_status, expected_text):
    """Outside Slurm the wrapper passes the signal to the trainer, which saves and exits 0."""
    trainer = tmp_path / "train_baseline.py"
    trainer.write_text(
        "import signal, sys, time\n"
        "stop = []\n"
        "for s in (signal.SIGUSR1, signal.SIGTERM): signal.signal(s, lambda n, f: stop.append(n))\n"
        "print('ready', flush=True)\n"
        "while not stop: time.sleep(0.05)\n"
        "print(f'preempted by {signal.Signals(stop[0]).name}: checkpoint saved', flush=True)\n")
    proc = subprocess.Popen(["bash", str(WRAPPER), "train_baseline.py"], cwd=tmp_path,
                            env=clean_env(PYTHON=sys.executable), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "ready":
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=30) == expected_status
    assert f"preempted by {sig.name}: checkpoint saved" in rest and expected_text in rest


@pytest.mark.slow
def test_usr1_goes_to_torchrun_workers_and_torchrun_survives(tmp_path):
    """The GPU path (mode 'workers') with a real torchrun of 2 CPU processes. USR1 goes to every
    process, as srun delivers it to a job step: the workers stop, torchrun (which would die of
    USR1) survives and waits for them, and the launcher reports 'resumable'."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent("""\
        import os, signal, time
        stop = []
        signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
        open(f"ready{os.environ['RANK']}", "w").close()
        while not stop:
            time.sleep(0.05)
        print(f"rank {os.environ['RANK']} stopped", flush=True)
        """))
    # The launcher functions only, without the wrapper's main part.
    functions = re.search(r"^forward_signal\(\).*?^}\n.*?^launch_and_forward\(\).*?^}\n",
                          WRAPPER.read_text(), re.MULTILINE | re.DOTALL).group(0)
    script = (f"RESUMABLE_EXIT={RESUMABLE_EXIT}\n{functions}\n"
              f"launch_and_forward workers {shlex.quote(sys.executable)} -m torch.distributed.run "
              f"--standalone --nproc_per_node=2 worker.py\n")
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=clean_env(OMP_NUM_THREADS=1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not ((tmp_path / "ready0").exists() and (tmp_path / "ready1").exists()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else ""
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == RESUMABLE_EXIT, out
    assert "rank 0 stopped" in out and "rank 1 stopped" in out


def test_usr1_before_the_run_starts_skips_it(fake_tools):
    """A USR1 during start-up (job started just before its limit): nothing is started, status 75."""
    env = clean_env(FAKE_PROBE_SECONDS=2, PATH=f"{fake_tools / 'bin'}:{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", str(WRAPPER), "train_baseline.py"], cwd=fake_tools, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "probing"
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == RESUMABLE_EXIT
    assert "USR1 arrived before the run started" in out and "nothing to requeue" in out


STOPPING_TRAINER = (
    "import signal, time\n"
    "stop = []\n"
    "signal.signal(signal.SIGUSR1, lambda n, f: stop.append(n))\n"
    "print('ready', flush=True)\n"
    "while not stop: time.sleep(0.05)\n"
    "print('stopped on USR1', flush=True)\n")

RECORDING_SCONTROL = """#!/bin/bash
# Answers 'show job' as for a batch job and records every call, so a test can see a requeue.
echo "$*" >> "$SCONTROL_CALLS"
if [ "$1 $2" = "show job" ]; then echo "JobId=$3 BatchFlag=1 Restarts=0"; fi
"""


# A stand-in speedrun that, like the real one, leaves its checkpoint in <log_dir>/<run_id>/ when
# CHECKPOINT=1 (the real one always does on USR1; this one lets a test take it away).
STOPPING_SPEEDRUN = STOPPING_TRAINER + (
    "import os, sys\n"
    "if os.environ.get('CHECKPOINT') == '1':\n"
    "    run_id = sys.argv[sys.argv.index('--run_id') + 1]\n"
    "    os.makedirs(f'logs/{run_id}', exist_ok=True)\n"
    "    open(f'logs/{run_id}/state_step000005.pt', 'wb').close()\n")


@pytest.mark.parametrize("script, checkpoint, requeued", [
    ("train_baseline.py", "0", True),
    ("train_speedrun.py", "1", True),      # it left a checkpoint: the requeued job resumes from it
    ("train_speedrun.py", "0", False),     # none: a requeue would start at step 0 and meet the same limit
])
def test_usr1_in_a_batch_job_requeues_only_a_resumable_trainer(tmp_path, script, checkpoint, requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(RECORDING_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    (tmp_path / script).write_text(STOPPING_SPEEDRUN if script == "train_speedrun.py" else STOPPING_TRAINER)
    calls = tmp_path / "scontrol_calls"
    env = clean_env(PYTHON=sys.executable, PATH=f"{bin_dir}:{os.environ['PATH']}", SCONTROL_CALLS=calls,
                    CHECKPOINT=checkpoint, **slurm_vars(nodes=1, gpus=0))
    proc = subprocess.Popen(["bash", str(WRAPPER), script], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, text=True)
    banner = []
    for line in proc.stdout:
        banner.append(line)
        if line.strip() == "ready":
            proc.send_signal(signal.SIGUSR1)
            break
    rest = proc.stdout.read()
    status = proc.wait(timeout=30)
    recorded = calls.read_text() if calls.exists() else ""
    assert "stopped on USR1" in rest
    if script == "train_speedrun.py":   # a run id that outlives the requeue: the job id
        assert "--run_id speedrun_job4242" in "".join(banner)
    if requeued:
        assert status == 0 and "requeue 4242" in recorded, rest
    else:
        assert status == RESUMABLE_EXIT and "requeue" not in recorded, rest
        assert "no checkpoint is in logs/speedrun_job4242: the job is not requeued" in rest


def test_usr1_outside_slurm_says_how_to_resume_a_speedrun(tmp_path):
    (tmp_path / "train_speedrun.py").write_text(STOPPING_SPEEDRUN)
    proc = subprocess.Popen(["bash", str(WRAPPER), "train_speedrun.py"], cwd=tmp_path,
                            env=clean_env(PYTHON=sys.executable), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "ready":
            proc.send_signal(signal.SIGUSR1)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=30) == RESUMABLE_EXIT, rest
    assert "no checkpoint is in" not in rest
    assert "not a Slurm job: nothing to requeue (rerun the same command with --init_from resume --run_id RUN_ID" in rest


def test_restarted_speedrun_resumes_only_from_a_checkpoint(fake_tools):
    no_checkpoint = dry_run(fake_tools, "train_speedrun.py", slurm=slurm_vars(restarts=1))
    assert "--init_from resume" not in no_checkpoint.stdout
    assert "no checkpoint in logs/speedrun_job4242: train_speedrun.py starts again from step 0" in no_checkpoint.stdout
    folder = fake_tools / "logs" / "speedrun_job4242"
    folder.mkdir(parents=True)
    try:
        (folder / "state_step000007.pt").write_bytes(b"")
        resumed = dry_run(fake_tools, "train_speedrun.py", slurm=slurm_vars(restarts=1))
    finally:
        shutil.rmtree(folder)      # the folder is shared by this module's tests
    assert "--run_id speedrun_job4242 --device cpu --init_from resume" in resumed.stdout, resumed.stdout


@pytest.mark.parametrize("variable, value, message", [
    ("MAX_RESTARTS", "-1", "MAX_RESTARTS='-1' must be a whole number"),
    ("MAX_RESTARTS", "08", "MAX_RESTARTS='08' must be a whole number"),
    ("SLURM_RESTART_COUNT", "x", "SLURM_RESTART_COUNT='x' is not a whole number"),
    ("NUM_GPUS", "two", "NUM_GPUS='two' must be a whole number"),
    ("NUM_GPUS", "010", "NUM_GPUS='010' must be a whole number"),
    ("NODES", "0", "NODES='0' must be a positive whole number"),
    ("GPU_TYPE", "h300", "GPU_TYPE='h300' is not one the trainers know"),
    ("OMP_NUM_THREADS", "0", "OMP_NUM_THREADS='0' must be a positive whole number"),
    ("USE_SRUN", "yes", "USE_SRUN='yes' must be auto, 0 or 1"),
])
def test_bad_environment_is_a_one_line_error(fake_tools, variable, value, message):
    result = dry_run(fake_tools, "train_baseline.py", **{variable: value})
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "command: " not in result.stdout


def test_dry_run_takes_only_0_or_1(fake_tools):
    env = clean_env(DRY_RUN="yes", FAKE_VISIBLE_GPUS=0, PATH=f"{fake_tools / 'bin'}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(WRAPPER), "train_baseline.py"], cwd=fake_tools, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "DRY_RUN='yes' must be 0 or 1" in result.stderr


# ---- record attempts: a seed per array task, or RUNS runs in a row ----

def array_vars(task, array_job=4240, count=8):
    return dict(slurm_vars(), SLURM_JOB_ID=array_job + task, SLURM_ARRAY_JOB_ID=array_job,
                SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_COUNT=count)


def option(cmd, name):
    """The value of an option in a command line; it must appear exactly once."""
    assert cmd.count(name) == 1, cmd
    return cmd[cmd.index(name) + 1]


def planned_runs(result):
    """The commands a DRY_RUN of an attempt prints, one per run."""
    return [shlex.split(line.split("command: ", 1)[1]) for line in result.stdout.splitlines() if "command: " in line]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.integers(0, 1000), log_dir=st.sampled_from([None, "records", "records/"]))
def test_array_task_runs_with_its_own_seed_in_the_attempt_folder(fake_tools, task, log_dir):
    user_args = ["--smoke"] + (["--log_dir", log_dir] if log_dir else [])
    result = dry_run(fake_tools, "train_speedrun.py", *user_args, slurm=array_vars(task))
    assert result.returncode == 0, result.stderr
    [cmd] = planned_runs(result)
    folder = f"{(log_dir or 'logs').rstrip('/')}/attempt_4240"     # named after the array job, not the task
    assert option(cmd, "--seed") == str(task)
    assert option(cmd, "--log_dir") == folder                        # the user's --log_dir is replaced
    assert option(cmd, "--run_id") == f"run{task}_seed{task}"
    assert f"array task {task} (seed {task}) -> {folder}/run{task}_seed{task}.txt" in result.stdout
    assert not (fake_tools / folder).exists()                        # DRY_RUN makes nothing


def test_local_runs_dry_run_lists_every_run_and_its_seed(fake_tools):
    result = dry_run(fake_tools, "train_speedrun.py", "--smoke", RUNS=3, ATTEMPT="try1")
    assert result.returncode == 0, result.stderr
    runs = planned_runs(result)
    assert [option(cmd, "--seed") for cmd in runs] == ["0", "1", "2"]
    assert [option(cmd, "--run_id") for cmd in runs] == ["run0_seed0", "run1_seed1", "run2_seed2"]
    assert {option(cmd, "--log_dir") for cmd in runs} == {"logs/try1"}
    for k in range(3):
        assert f"run {k + 1}/3 (seed {k}) -> logs/try1/run{k}_seed{k}.txt" in result.stdout
    assert not (fake_tools / "logs" / "try1").exists()
    # without ATTEMPT: one folder per attempt, named after the time it started
    result = dry_run(fake_tools, "train_speedrun.py", RUNS=2)
    assert result.returncode == 0, result.stderr
    assert all(re.fullmatch(r"logs/attempt_local_\d{8}-\d{6}(_\d+)?", option(cmd, "--log_dir"))
               for cmd in planned_runs(result)) and len(planned_runs(result)) == 2
    # RUNS inside a (non-array) batch job: named after the job
    result = dry_run(fake_tools, "train_speedrun.py", RUNS=2, slurm=slurm_vars())
    assert {option(cmd, "--log_dir") for cmd in planned_runs(result)} == {"logs/attempt_4242"}


@pytest.mark.parametrize("seed_args", [["--seed", "7"], ["--seed=7"]])
@pytest.mark.parametrize("where", ["array", "local"])
def test_a_seed_given_by_the_user_is_kept_and_said(fake_tools, seed_args, where):
    if where == "array":
        result = dry_run(fake_tools, "train_speedrun.py", *seed_args, slurm=array_vars(3))
    else:
        result = dry_run(fake_tools, "train_speedrun.py", *seed_args, RUNS=2)
    assert result.returncode == 0, result.stderr
    runs = planned_runs(result)
    for cmd in runs:
        seeds = [a for a in cmd if a == "--seed" or a.startswith("--seed=")]
        assert seeds == seed_args[:1] and cmd[cmd.index(seed_args[0]):][:len(seed_args)] == seed_args
    assert [option(cmd, "--run_id") for cmd in runs] == (["run3_seed7"] if where == "array"
                                                          else ["run0_seed7", "run1_seed7"])
    assert "note: --seed 7 given: kept" in result.stdout


@pytest.mark.parametrize("env, slurm, script, args, message", [
    ({"RUNS": "0"}, None, "train_speedrun.py", [], "RUNS='0' must be a positive whole number"),
    ({"RUNS": "-1"}, None, "train_speedrun.py", [], "RUNS='-1' must be a positive whole number"),
    ({"RUNS": "abc"}, None, "train_speedrun.py", [], "RUNS='abc' must be a positive whole number"),
    ({"RUNS": "01"}, None, "train_speedrun.py", [], "RUNS='01' must be a positive whole number"),
    ({"RUNS": "3"}, None, "train_baseline.py", [], "RUNS is for record attempts of train_speedrun.py"),
    ({"RUNS": "3"}, None, "prepare_data.py", [], "RUNS is for record attempts of train_speedrun.py"),
    ({"RUNS": "3"}, "array", "train_speedrun.py", [], "RUNS=3 in an array job (task 2)"),
    ({"ATTEMPT": "a/b", "RUNS": "2"}, None, "train_speedrun.py", [], "ATTEMPT='a/b' must be a plain folder name"),
    ({"ATTEMPT": "rec"}, None, "train_speedrun.py", [], "ATTEMPT names the folder of a record attempt"),
    ({"RUNS": "2"}, None, "train_speedrun.py", ["--run_id", "x"], "--run_id is chosen per run"),
    ({}, "array", "train_speedrun.py", ["--seed", "x"], "--seed 'x' must be a whole number"),
])
def test_bad_attempt_settings_are_one_line_errors(fake_tools, env, slurm, script, args, message):
    result = dry_run(fake_tools, script, *args, slurm=array_vars(2) if slurm else None, **env)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "command: " not in result.stdout


def test_array_of_another_script_runs_the_same_command_in_every_task(fake_tools):
    result = dry_run(fake_tools, "train_baseline.py", "--out_dir", "o", slurm=array_vars(1))
    assert result.returncode == 0, result.stderr
    cmd = launched_command(result)
    assert "--seed" not in cmd and "--log_dir" not in cmd and cmd[-2:] == ["--device", "cpu"]
    assert "every task of the array runs the same command" in result.stdout


FAKE_SPEEDRUN = """\
import argparse, json, os, sys
p = argparse.ArgumentParser()
for name in ("--seed", "--log_dir", "--run_id", "--device"):
    p.add_argument(name)
a = p.parse_args()
os.makedirs(a.log_dir, exist_ok=True)
with open(os.path.join(a.log_dir, a.run_id + ".txt"), "a") as f:
    print("args: " + json.dumps(vars(a)), file=f)
if a.seed in os.environ.get("FAIL_SEEDS", "").split(","):
    sys.exit(3)
with open(os.path.join(a.log_dir, a.run_id + ".json"), "w") as f:
    json.dump({"run_id": a.run_id}, f)
"""


def test_local_series_stops_at_a_failed_run_and_a_rerun_completes_it(tmp_path):
    """A stand-in trainer (writes the log and JSON, fails for the seeds in FAIL_SEEDS) run for real."""
    (tmp_path / "train_speedrun.py").write_text(FAKE_SPEEDRUN)
    attempt = tmp_path / "logs" / "try"

    def series(**env):
        return subprocess.run(["bash", str(WRAPPER), "train_speedrun.py"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env=clean_env(PYTHON=sys.executable, RUNS=4, ATTEMPT="try", **env))

    failed = series(FAIL_SEEDS="1")
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert "run 2/4 (seed 1) failed (exit status 3); its log: logs/try/run1_seed1.txt" in failed.stdout
    assert "the attempt stops here with 1 of 4 runs finished in logs/try; rerun with ATTEMPT=try" in failed.stdout
    assert "run 3/4" not in failed.stdout and "record_stats.py" not in failed.stdout
    assert sorted(p.name for p in attempt.iterdir()) == ["run0_seed0.json", "run0_seed0.txt", "run1_seed1.txt"]

    done = series()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "run 1/4 (seed 0): already finished (logs/try/run0_seed0.json), keeping it" in done.stdout
    assert "run 4/4 (seed 3) -> logs/try/run3_seed3.txt" in done.stdout
    assert done.stdout.rstrip().splitlines()[-2].endswith(
        "record attempt done: 4 run(s) in logs/try; statistics: python3 record_stats.py logs/try")
    names = sorted(p.name for p in attempt.iterdir())
    assert [n for n in names if n.endswith(".json")] == [f"run{k}_seed{k}.json" for k in range(4)]
    assert [n for n in names if n.endswith(".txt")] == [f"run{k}_seed{k}.txt" for k in range(4)]
    assert len([n for n in names if n.endswith(".unfinished")]) == 1    # the failed try's log, set aside
    seeds = [json.loads((attempt / f"run{k}_seed{k}.txt").read_text()[len("args: "):])["seed"] for k in range(4)]
    assert seeds == ["0", "1", "2", "3"]


def test_usr1_stops_a_local_series(tmp_path):
    """A run stopped by USR1 (the trainer exits cleanly) ends the series: speedruns cannot resume."""
    (tmp_path / "train_speedrun.py").write_text(STOPPING_TRAINER)
    proc = subprocess.Popen(["bash", str(WRAPPER), "train_speedrun.py"], cwd=tmp_path, stdout=subprocess.PIPE,
                            text=True, env=clean_env(PYTHON=sys.executable, RUNS=3, ATTEMPT="try"))
    for line in proc.stdout:
        if line.strip() == "ready":
            proc.send_signal(signal.SIGUSR1)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=30) == RESUMABLE_EXIT, rest
    assert "stopped on USR1" in rest and "run 1/3 (seed 0) was stopped (exit status 75)" in rest
    assert "run 2/3" not in rest and "record_stats.py" not in rest


# =============================================================================
# real Slurm: one single-node cluster per test module (and per xdist worker)
# =============================================================================

TINY_MODEL = ["--device", "cpu", "--compile", "false", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
              "--block_size", "32", "--batch_size", "8", "--gradient_accumulation_steps", "1",
              "--warmup_iters", "10", "--eval_iters", "5", "--log_interval", "1", "--seed", "1337",
              "--dropout", "0.0"]
LOSS_LINE = re.compile(r"^iter (\d+): loss ([0-9.]+)", re.MULTILINE)


def tiny_run_args(data_dir, out_dir, iters, eval_interval):
    return ["--data_dir", str(data_dir), "--out_dir", str(out_dir), *TINY_MODEL,
            "--max_iters", str(iters), "--lr_decay_iters", str(iters), "--eval_interval", str(eval_interval)]


@pytest.fixture(scope="module")
def cluster():
    try:
        slurm = minislurm.MiniSlurm.start()
    except minislurm.SlurmUnavailable as e:
        pytest.skip(f"cannot start a single-node Slurm on this machine: {e}")
    yield slurm
    slurm.stop()


@pytest.fixture(scope="module")
def char_data(tmp_path_factory, request):
    """train.bin / val.bin / meta.pkl of tinyshakespeare at character level (written here, with numpy)."""
    source = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not source.exists():
        pytest.skip(f"{source} not present")
    text = source.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    split = int(0.9 * len(ids))
    data_dir = tmp_path_factory.mktemp("char_data")
    ids[:split].tofile(data_dir / "train.bin")
    ids[split:].tofile(data_dir / "val.bin")
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return data_dir


@pytest.fixture
def job_dir(tmp_path):
    """Where jobs are submitted from: run.sbatch's header writes logs/%x-%j.out under it."""
    (tmp_path / "logs").mkdir()
    return tmp_path


def job_env():
    # The python running the tests comes first on PATH, so the job's python has torch & co.
    return clean_env(OMP_NUM_THREADS=1, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def submit(cluster, job_dir, name, *args, env=None):
    job_id = cluster.sbatch([f"--job-name={name}", "--cpus-per-task=1", str(WRAPPER), *args],
                            cwd=job_dir, env=env or job_env())
    return job_id, job_dir / "logs" / f"{name}-{job_id}.out"


def read_log(path):
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def wait_until_under_way(log, under_way, timeout):
    """Poll the job's log until under_way(its text) holds; fail with the log if it never does."""
    deadline = time.monotonic() + timeout
    while not under_way(read_log(log)):
        assert time.monotonic() < deadline, f"training never got going:\n{read_log(log)}"
        time.sleep(0.2)


def past_iter(n):
    """under_way: the baseline has logged the loss of iteration n or later."""
    return lambda text: max((int(i) for i, _ in LOSS_LINE.findall(text)), default=0) >= n


def preempt_beside_a_reference(cluster, job_id, log, reference_cmd, cwd, under_way, start_timeout,
                               finish_timeout):
    """Run reference_cmd (the same job through the wrapper outside Slurm, uninterrupted) while the
    job gets USR1 on its batch shell once under_way(its log), as --signal=B:USR1@T would; wait for
    the requeue and for both to end. Returns (job info, reference exit code, reference output)."""
    reference = subprocess.Popen(reference_cmd, cwd=cwd, env=job_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_under_way(log, under_way, start_timeout)
        cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
        cluster.wait_for_job(job_id, lambda j: int(j.get("Restarts", 0)) >= 1, 60, "a requeue")
        info = cluster.wait_until_done(job_id, timeout=finish_timeout)
        output, _ = reference.communicate(timeout=finish_timeout)
    finally:
        if reference.poll() is None:
            reference.kill()
    return info, reference.returncode, output


def training_losses(metrics_path):
    """iter -> training loss, from the trainer's metrics.jsonl."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_trains_and_loss_falls(cluster, char_data, job_dir):
    job_id, log = submit(cluster, job_dir, "tiny", str(REPO / "train_baseline.py"),
                         *tiny_run_args(char_data, job_dir / "out", iters=60, eval_interval=30))
    info = cluster.wait_until_done(job_id, timeout=120)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert f"Slurm job {job_id}" in text and "command: " in text  # the banner came first
    losses = [float(loss) for _, loss in LOSS_LINE.findall(text)]
    assert len(losses) >= 50, text
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1, losses


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_preemption_requeues_and_resumes_exactly(cluster, char_data, job_dir):
    iters = 1500
    args = tiny_run_args(char_data, job_dir / "preempted", iters=iters, eval_interval=500)
    job_id, log = submit(cluster, job_dir, "preempt", str(REPO / "train_baseline.py"), *args)

    # The same run, uninterrupted, through the wrapper outside Slurm, meanwhile; USR1 once
    # training is under way.
    reference_out = job_dir / "reference"
    reference_cmd = ["bash", str(WRAPPER), str(REPO / "train_baseline.py"),
                     *tiny_run_args(char_data, reference_out, iters=iters, eval_interval=500)]
    info, reference_status, reference_log = preempt_beside_a_reference(
        cluster, job_id, log, reference_cmd, job_dir, past_iter(100), start_timeout=90, finish_timeout=180)
    text = read_log(log)
    assert reference_status == 0, reference_log
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert info["Restarts"] == "1", text

    # Stopped with a checkpoint, requeued by the wrapper, restarted with --init_from resume.
    stopped_at = int(re.search(r"preempted: checkpoint saved at iter (\d+)", text).group(1))
    assert 100 <= stopped_at < iters, text
    assert f"requeueing job {job_id}" in text
    assert "restart 1/" in text and "--init_from resume" in text and "resuming from" in text

    # Same seed, same losses: at every iteration, and therefore at the end.
    resumed, uninterrupted = training_losses(job_dir / "preempted" / "metrics.jsonl"), training_losses(reference_out / "metrics.jsonl")
    assert max(uninterrupted) == max(resumed) == iters - 1
    assert resumed == uninterrupted


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_srun_launch_path_relays_preemption(cluster, char_data, job_dir):
    """USE_SRUN=1 takes the multi-node path on one node: srun, one launcher per node. A USR1 sent to
    the job steps (not to the batch shell, as --signal=USR1@N without B: would) still requeues."""
    iters = 800
    job_id, log = submit(cluster, job_dir, "srun", str(REPO / "train_baseline.py"),
                         *tiny_run_args(char_data, job_dir / "out", iters=iters, eval_interval=400),
                         env=dict(job_env(), USE_SRUN="1"))
    wait_until_under_way(log, past_iter(100), timeout=90)
    cluster.run(["scancel", "--signal=USR1", job_id])
    info = cluster.wait_until_done(job_id, timeout=120)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text
    assert "launch: srun" in text and "preempted: checkpoint saved" in text and "resuming from" in text
    assert max(training_losses(job_dir / "out" / "metrics.jsonl")) == iters - 1


@pytest.mark.slurm
def test_slurm_missing_script_fails_clearly(cluster, job_dir):
    job_id, log = submit(cluster, job_dir, "missing", "no_such_script.py", "--max_iters", "1")
    info = cluster.wait_until_done(job_id, timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert "error: script 'no_such_script.py' not found" in read_log(log)


# ---- record attempts for real: seeded train_speedrun.py runs, in an array job and locally ----

# The cheapest real run of train_speedrun.py: the smoke model on CPU, one training step and no
# validation (about 10 s on 2 busy cores), on a small synthetic corpus written once. --smoke alone would
# write a corpus into the attempt folder from every task at once.
TINY_SPEEDRUN = ["--smoke", "--device", "cpu", "--max_steps", "1", "--val_loss_every", "0"]


@pytest.fixture(scope="module")
def speedrun_data(tmp_path_factory):
    import train_speedrun  # torch: only the tests that train pay for it
    train_glob, val_glob = train_speedrun.write_synthetic_corpus(
        tmp_path_factory.mktemp("speedrun_data"), seed=1, train_tokens=40_000, val_tokens=4_000)
    return ["--train_files", train_glob, "--val_files", val_glob]


def check_attempt_folder(folder, seeds):
    """One log and one JSON summary per run, named run<k>_seed<k>, each run trained with its seed."""
    run_ids = [f"run{k}_seed{k}" for k in seeds]
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert names == sorted([f"{r}.txt" for r in run_ids] + [f"{r}.json" for r in run_ids]), names
    for seed, run_id in zip(seeds, run_ids):
        log = (folder / f"{run_id}.txt").read_text()
        args = json.loads(re.search(r"^args: (.*)$", log, re.MULTILINE).group(1))   # the trainer's own record
        assert (args["seed"], args["run_id"], Path(args["log_dir"]).name) == (seed, run_id, folder.name)
        summary = json.loads((folder / f"{run_id}.json").read_text())
        assert summary["run_id"] == run_id and summary["seed"] == seed and summary["steps"] == 1 and summary["stopped_by"] == "max_steps"


def array_tasks_when_done(cluster, job_id, count, timeout):
    """`scontrol show job` of every task of an array job, once all `count` tasks have finished."""
    deadline = time.monotonic() + timeout
    while True:
        text = cluster.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        tasks = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line.strip()]
        if len(tasks) == count and all(t.get("JobState") in minislurm.FINISHED_STATES for t in tasks):
            return tasks
        assert time.monotonic() < deadline, (f"array job {job_id}: not done within {timeout} s\n{text}\n"
                                             + cluster.log_tail("slurmctld"))
        time.sleep(0.5)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_array_is_one_attempt_with_a_seed_per_task(cluster, speedrun_data, job_dir):
    job_id = cluster.sbatch(["--job-name=attempt", "--cpus-per-task=1", "--array=0-2", str(WRAPPER),
                             str(REPO / "train_speedrun.py"), *TINY_SPEEDRUN, *speedrun_data],
                            cwd=job_dir, env=job_env())
    tasks = array_tasks_when_done(cluster, job_id, 3, timeout=240)
    outputs = "\n".join(read_log(p) for p in sorted((job_dir / "logs").glob("attempt-*.out")))
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2"]
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), outputs
    folder = f"logs/attempt_{job_id}"                                  # the array job's id, not a task's
    check_attempt_folder(job_dir / folder, seeds=[0, 1, 2])
    for k in range(3):
        assert f"array task {k} (seed {k}) -> {folder}/run{k}_seed{k}.txt" in outputs
    assert outputs.count(f"once every task of job {job_id} has finished: python3 record_stats.py {folder}") == 3


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_preemption_requeues_and_resumes_a_speedrun_exactly(cluster, job_dir):
    import train_speedrun
    data = train_speedrun.write_synthetic_corpus(job_dir / "data", seed=1)   # enough for the 8 smoke steps
    args = [str(REPO / "train_speedrun.py"), "--smoke", "--device", "cpu", "--val_loss_every", "1",
            "--train_files", data[0], "--val_files", data[1]]
    job_id, log = submit(cluster, job_dir, "speedrun", *args)
    # the same run, uninterrupted, through the wrapper outside Slurm, meanwhile
    info, reference_status, reference_out = preempt_beside_a_reference(
        cluster, job_id, log, ["bash", str(WRAPPER), *args, "--run_id", "reference"], job_dir,
        lambda text: "step:2/8 train_time" in text, start_timeout=120, finish_timeout=240)
    text = read_log(log)
    assert reference_status == 0, reference_out
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text
    run_id = f"speedrun_job{job_id}"
    assert re.search(rf"checkpoint: logs/{run_id}/state_step0000\d\d.pt", text), text
    assert f"requeueing job {job_id}" in text and "resuming from the checkpoint in" in text
    assert f"--run_id {run_id} --init_from resume" in text
    resumed = json.loads((job_dir / "logs" / f"{run_id}.json").read_text())
    uninterrupted = json.loads((job_dir / "logs" / "reference.json").read_text())
    assert resumed["steps"] == uninterrupted["steps"] == 8
    assert resumed["val_losses"] == uninterrupted["val_losses"]      # every step, exact floats


@pytest.mark.slow
def test_local_runs_are_one_attempt_with_a_seed_per_run(speedrun_data, tmp_path):
    result = subprocess.run(["bash", str(WRAPPER), str(REPO / "train_speedrun.py"), *TINY_SPEEDRUN, *speedrun_data],
                            cwd=tmp_path, env=dict(job_env(), RUNS="3"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [folder] = (tmp_path / "logs").iterdir()
    assert re.fullmatch(r"attempt_local_\d{8}-\d{6}", folder.name)
    check_attempt_folder(folder, seeds=[0, 1, 2])
    for k in range(3):
        assert f"run {k + 1}/3 (seed {k}) -> logs/{folder.name}/run{k}_seed{k}.txt" in result.stdout
    assert f"statistics: python3 record_stats.py logs/{folder.name}" in result.stdout
