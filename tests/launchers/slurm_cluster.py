"""A real one-node SLURM cluster (Debian's slurm-wlm + munge) on this machine, for launcher tests.

Recipe from ../shared/docs/STACK.md ("A real SLURM on one machine"): install the packages if missing (root, apt),
start munged as user munge, write a minimal slurm.conf under a temporary directory, start slurmctld and slurmd
with SLURM_CONF pointing at it, wait until the node is idle. `stop()` kills exactly the daemons started here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")

SLURM_CONF = """\
ClusterName=mdmci
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/ctld.log
SlurmdLogFile={root}/log/d.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class SlurmSetupError(RuntimeError):
    pass


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge when slurmctld is missing (as the CI machine starts without them)."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise SlurmSetupError("installing slurm-wlm and munge needs root (apt-get); run the tests as root or "
                              "install them first")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], env=env)
    if out.returncode != 0:  # a stale package index: update once and retry
        _run(["apt-get", "update", "-q"], env=env)
        out = _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], env=env)
    if out.returncode != 0:
        raise SlurmSetupError(f"apt-get install {' '.join(PACKAGES)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """Start with `LocalSlurm(root).start()`; `env` holds SLURM_CONF for sbatch/squeue/submitit."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._munged_pid: int | None = None

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        ensure_installed()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        host = socket.gethostname()
        self.conf.write_text(SLURM_CONF.format(host=host, root=self.root, cpus=os.cpu_count() or 2,
                                               ctld_port=_free_port(), d_port=_free_port()))
        for daemon in ("slurmctld", "slurmd"):
            out = _run([daemon, "-f", str(self.conf)], env=self.env)
            if out.returncode != 0:
                self.stop()
                raise SlurmSetupError(f"{daemon} failed to start: {out.stderr}\n{self.logs()}")
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = _run(["sinfo", "-h", "-o", "%t"], env=self.env).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        self.stop()
        raise SlurmSetupError(f"the node did not become idle within {timeout}s (state {state!r})\n{self.logs()}")

    def _start_munge(self) -> None:
        if _run(["munge", "-n"]).returncode == 0:  # a munged is already serving this machine
            return
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run(["mungekey", "--create"])
            shutil.chown(key, "munge", "munge")
        pidfile = run_dir / f"munged-{os.getpid()}.pid"  # user munge cannot write into our temp dir
        out = _run(["runuser", "-u", "munge", "--", "munged", "--force", f"--pid-file={pidfile}"])
        if out.returncode != 0:
            raise SlurmSetupError(f"munged failed to start: {out.stderr}")
        deadline = time.time() + 10
        while not pidfile.exists() and time.time() < deadline:
            time.sleep(0.1)
        self._munged_pid = int(pidfile.read_text().split()[0]) if pidfile.exists() else None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def stop(self) -> None:
        if self.conf.exists():  # jobs first: their slurmstepd processes outlive slurmd
            _run(["scancel", "--full", "--partition=debug"], env=self.env)
            deadline = time.time() + 30
            while _run(["squeue", "-h"], env=self.env).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        pids = [self.root / "slurmd.pid", self.root / "slurmctld.pid"]
        for pidfile in pids:
            if pidfile.exists():
                _kill(int(pidfile.read_text().split()[0]))
        if self._munged_pid is not None:
            _kill(self._munged_pid)
            self._munged_pid = None


def _kill(pid: int, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
