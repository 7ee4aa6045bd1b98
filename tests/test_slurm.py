"""A real single-node Slurm (munged, slurmctld, slurmd on this machine) runs examples/slurm/deca.sbatch: a ring4 job,
one `deca-peer start` per task, to completion; the peers' final weights equal the in-process `simulate` run's.

Installs Debian's `slurm-wlm` and `munge` with apt-get where they are missing (root only). Everything the daemons
use (munge key and socket, slurm.conf, state, spool, logs, ports) is private to the test and removed after it;
nothing under /etc is read or changed. Runs as root (SlurmUser=root, SlurmdUser=root), proctrack/linuxproc and
task/none: no cgroups needed.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, free_base_port, max_diff_to_simulation
from deca_p2p.bootstrap import free_ports
from deca_p2p.metrics import records
from test_e2e import SMALL, _cli_args

pytestmark = pytest.mark.integration

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
JOB_END = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
           "DEADLINE")


def _missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


def _ensure_slurm() -> None:
    """Install slurm-wlm and munge (apt-get) where they are missing; skip with the reason where that cannot be done."""
    if not _missing():
        return
    if os.geteuid() != 0:
        pytest.skip(f"Slurm is not installed ({', '.join(_missing())} missing) and installing it needs root")
    if shutil.which("apt-get") is None:
        pytest.skip(f"Slurm is not installed ({', '.join(_missing())} missing) and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    t0 = time.monotonic()
    p = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], capture_output=True, text=True, env=env)
    if p.returncode != 0:  # a stale package index: refresh it once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        p = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], capture_output=True, text=True,
                           env=env)
    if p.returncode != 0 or _missing():
        last = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        pytest.skip(f"cannot install slurm-wlm and munge with apt-get (exit {p.returncode}): {last[0]}")
    print(f"installed slurm-wlm and munge in {time.monotonic() - t0:.0f} s")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class _MiniSlurm:
    """munged + slurmctld + slurmd for one node (this host), all under `root`, stopped by `stop()`."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir()
        (r / "munge").chmod(0o755)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge" / "munge.socket"
        self.procs.append(subprocess.Popen(
            [_sbin("munged"), "-F", "-f", f"--socket={sock}", f"--key-file={key}", f"--pid-file={r}/munge/munged.pid",
             f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        ctld_port, d_port = free_ports(2)
        self.conf.write_text("\n".join([
            "ClusterName=decatest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={sock}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",  # no cgroups
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "MinJobAge=600",  # keep a finished job's state for `scontrol show job`
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN",
            f"PartitionName=deca Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        deadline = time.monotonic() + 20
        while not sock.exists():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                raise AssertionError(f"munged did not start:\n{self.log('munged')}")
            time.sleep(0.1)
        for daemon in ("slurmctld", "slurmd"):
            self.procs.append(subprocess.Popen([_sbin(daemon), "-D", "-f", str(self.conf)], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise AssertionError(f"{dead[0]} exited:\n{self.log('slurmctld')}\n{self.log('slurmd')}")
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise AssertionError(f"node not idle after 60 s (sinfo: {state!r}):\n{self.log('slurmctld')}\n"
                             f"{self.log('slurmd')}")

    def run(self, *argv, check=True, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(list(argv), capture_output=True, text=True, env=kw.pop("env", self.env), **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
        return p

    def log(self, name: str, tail: int = 3000) -> str:
        f = self.root / "log" / f"{name}.log"
        return f.read_text(errors="replace")[-tail:] if f.exists() else f"(no {f})"

    def job_state(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def stop(self, jobs: list[str]) -> None:
        for job in jobs:
            self.run("scancel", job, check=False)
        deadline = time.monotonic() + 30
        while jobs and time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.5)
        # the job steps' slurmstepd (started by our slurmd) outlive it: end those of our jobs, by pid
        for pid in _stepd_pids(jobs):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _stepd_pids(jobs: list[str]) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("slurmstepd:") and any(f"[{j}." in cmd for j in jobs):
            pids.append(int(d.name))
    return pids


def test_slurm_runs_a_ring4_job_to_completion(deca_cache, tmp_path):
    _ensure_slurm()
    if os.geteuid() != 0:
        pytest.skip("the single-node Slurm of this test runs its daemons as root")
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        pytest.skip(f"this host's name {host!r} does not resolve: Slurm's node name is the peers' bootstrap host")
    root = Path(tempfile.mkdtemp(prefix="deca-slurm-"))  # short: the munge socket path must fit a sun_path
    slurm = _MiniSlurm(root)
    jobs: list[str] = []
    try:
        slurm.start()
        run_dir = tmp_path / "run"
        env = {**slurm.env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOPOLOGY": "topologies/ring4.json",
               "RUN_DIR": str(run_dir), "BASE_PORT": str(free_base_port(4)),
               "DECA_PEER": f"{sys.executable} -m deca_p2p.cli"}
        # --overcommit: 4 tasks on this node whatever its core count; the settings of the end-to-end test
        p = slurm.run("sbatch", "--parsable", "--overcommit", "--ntasks=4", "--cpus-per-task=1", "--time=10",
                      f"--output={tmp_path}/job-%j.out", "examples/slurm/deca.sbatch", *_cli_args(SMALL),
                      cwd=REPO, env=env)
        job = p.stdout.strip().split(";")[0]
        jobs.append(job)
        deadline = time.monotonic() + 300
        state = {}
        while time.monotonic() < deadline:
            state = slurm.job_state(job)
            if state.get("JobState") in JOB_END:
                break
            time.sleep(1)
        out_file = tmp_path / f"job-{job}.out"
        out = out_file.read_text(errors="replace") if out_file.exists() else "(no job output file)"
        assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", \
            f"job {job}: {state.get('JobState')} exit {state.get('ExitCode')}\n{out[-4000:]}\n{slurm.log('slurmd')}"
        assert "done; checkpoints in" in out, out[-3000:]
        for i in range(4):  # srun --label prefixes each task's lines with its id
            assert any(line.startswith(f"{i}: ") for line in out.splitlines()), (i, out[-3000:])
            final = records(run_dir, i, "final")
            assert len(final) == 1 and not final[0]["stopped"], (i, final)
        assert (run_dir / "bootstrap.json").exists()
        assert max_diff_to_simulation(run_dir, REPO / "topologies" / "ring4.json", SMALL) <= 1e-6
    finally:
        slurm.stop(jobs)
        shutil.rmtree(root, ignore_errors=True)
