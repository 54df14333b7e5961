"""A throwaway single-node Slurm cluster for tests: munged, slurmctld and slurmd, all state in one
temporary directory, on free ports, stopped by pid afterwards. Nothing under /etc is used or changed.

    with MiniSlurm.start() as cluster:
        job_id = cluster.sbatch(["--wrap", "hostname"], cwd=tmp)
        info = cluster.wait_until_done(job_id, timeout=60)

Needs Debian's packages `slurmctld slurmd slurm-client munge` (Slurm 22.05 on Debian 12). When a
daemon cannot start, start() raises SlurmUnavailable with the reason and the daemon's log.

Run by hand to try run.sbatch against a live cluster:
    python3 tests/slurm/minislurm.py      # prints `export SLURM_CONF=...`; Enter stops it
"""

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REQUIRED_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
START_TIMEOUT_S = 40


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the test cluster; the message says why (tests skip with it)."""


def missing_programs():
    return [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_memory_mb():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 2048


def slurm_conf_text(root, node, user, ctld_port, slurmd_port):
    """Smallest configuration that runs batch jobs, requeues them, and keeps their records.

    Two settings make requeue fast enough for a test: cred_expire (a requeued job waits that long
    before it is eligible again; 120 s by default) and sched_interval (how often pending jobs are
    looked at; 60 s by default).
    """
    cpus = os.cpu_count() or 1
    memory_mb = max(256, available_memory_mb() // 2)
    return f"""\
ClusterName=minislurm
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/run/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmdTimeout=300
SlurmctldDebug=info
SlurmdDebug=info
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class MiniSlurm:
    def __init__(self, root):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons = {}  # name -> Popen, stopped in reverse order
        self.job_ids = []

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def start(cls, root=None):
        missing = missing_programs()
        if missing:
            raise SlurmUnavailable(f"Slurm/munge programs not installed: {', '.join(missing)} "
                                   "(apt-get install slurmctld slurmd slurm-client munge)")
        if root is None:
            # Not pytest's tmp_path: munged insists that every user can traverse its socket folder.
            root = tempfile.mkdtemp(prefix="minislurm-")
        cluster = cls(root)
        try:
            cluster._write_files()
            cluster._start_daemons()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_files(self):
        self.root.chmod(0o755)
        for sub in ("etc", "run", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o755, exist_ok=True)
        key_dir = self.root / "munge"
        key_dir.mkdir(mode=0o700, exist_ok=True)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "etc" / "plugstack.conf").write_text("")
        self.conf.write_text(slurm_conf_text(self.root, self.node, getpass.getuser(),
                                             free_port(), free_port()))

    def _start_daemons(self):
        r = self.root
        self._spawn("munged", ["munged", "--foreground", f"--socket={r}/run/munge.sock",
                               f"--key-file={r}/munge/munge.key", f"--log-file={r}/log/munged.log",
                               f"--pid-file={r}/run/munged.pid", f"--seed-file={r}/munge/seed",
                               "--force"])
        self._wait_for(lambda: (r / "run" / "munge.sock").exists(), "munged", r / "log" / "munged.log")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait_for(self._node_is_up, "slurmctld/slurmd", r / "log" / "slurmd.log")
        self._check_a_job_runs()

    def _check_a_job_runs(self):
        """Daemons up is not enough (e.g. slurmd not root cannot start jobs): run a trivial job."""
        try:
            job_id = self.sbatch(["--wrap", "true", f"--output={self.root}/log/smoke-%j.out"], cwd=self.root)
            info = self.wait_until_done(job_id, timeout=START_TIMEOUT_S)
        except (subprocess.SubprocessError, AssertionError) as e:
            raise SlurmUnavailable(f"the cluster started but cannot run a trivial job: {e}\n"
                                   + self.log_tail("slurmd")) from e
        if info.get("JobState") != "COMPLETED":
            raise SlurmUnavailable(f"a trivial job ended {info.get('JobState')} ({info.get('Reason')}):\n"
                                   + self.log_tail("slurmd"))

    def _spawn(self, name, argv):
        out = open(self.root / "log" / f"{name}.out", "w")
        self.daemons[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                              start_new_session=True)

    def _wait_for(self, ready, what, log_path):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with status {proc.returncode} at start-up:\n"
                                           + self.log_tail(name))
            if ready():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"{what} not ready after {START_TIMEOUT_S} s; {log_path}:\n"
                               + tail(log_path))

    def _node_is_up(self):
        result = self.run(["sinfo", "--noheader", "--format=%T"], check=False)
        return result.returncode == 0 and result.stdout.strip().rstrip("*") in ("idle", "mixed", "allocated")

    def stop(self):
        """Cancel our jobs, let their processes go, then stop the daemons by pid; remove the files."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None and self.job_ids:
            self.run(["scancel", *self.job_ids], check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._jobs_still_active():
                time.sleep(0.5)
        for name in reversed(list(self.daemons)):
            proc = self.daemons[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.daemons.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def _jobs_still_active(self):
        result = self.run(["squeue", "--noheader", "--format=%i"], check=False)
        return result.returncode == 0 and result.stdout.strip() != ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- client side ---------------------------------------------------------------------------

    def run(self, argv, check=True, **kwargs):
        kwargs.setdefault("env", self.env)
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60, **kwargs)

    def sbatch(self, args, cwd, env=None):
        """Submit; returns the job id. `env` is the job's environment (sbatch passes it on)."""
        job_env = dict(self.env if env is None else env, SLURM_CONF=str(self.conf))
        result = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=job_env)
        job_id = result.stdout.strip().split(";")[0]
        self.job_ids.append(job_id)
        return job_id

    def job(self, job_id):
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        text = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_job(self, job_id, condition, timeout, what):
        """Poll until condition(job dict) holds; AssertionError with the job's state on timeout."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while not condition(info):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: {what} not reached within {timeout} s; "
                                     f"state {info.get('JobState')} reason {info.get('Reason')}\n"
                                     f"{self.log_tail('slurmctld')}")
            time.sleep(0.5)
            info = self.job(job_id)
        return info

    def wait_until_done(self, job_id, timeout):
        return self.wait_for_job(job_id, lambda j: j.get("JobState") in FINISHED_STATES, timeout,
                                 "a finished state")

    def log_tail(self, name, lines=30):
        for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.out"):
            if path.exists() and path.stat().st_size:
                return f"--- {path} ---\n" + tail(path, lines)
        return f"(no log for {name})"


def tail(path, lines=30):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


if __name__ == "__main__":
    with MiniSlurm.start() as cluster:
        print(f"single-node Slurm up on {cluster.node}; state in {cluster.root}")
        print(f"export SLURM_CONF={cluster.conf}")
        try:
            input("press Enter to stop it ... ")
        except (EOFError, KeyboardInterrupt):
            pass
