"""A real one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd in a temp dir.

Debian's ``slurm-wlm`` and ``munge`` packages (installed here when missing) start no daemons, so
this module starts them itself: munged as the munge user
with its files in a 0711 directory, slurmctld and slurmd in the foreground on loopback ports, and a
``cred_expire`` of 10 s so a requeued job reruns ~11 s later instead of ~121 s. Every client
command needs ``SLURM_CONF``; :meth:`SlurmCluster.env` provides it. :meth:`stop` cancels what is
still queued, waits for it, and stops the daemons it started (by PID).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mimae_scale.engine.distributed import free_port

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmError(RuntimeError):
    """The cluster could not be brought up, or a command against it failed."""


def ensure_installed() -> None:
    """Install Debian's Slurm and munge when a daemon binary is missing (needs root and apt)."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmError(f"{', '.join(PACKAGES)} are not installed and this user cannot apt-get install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def _node_hardware() -> str:
    """The node line's hardware fields as slurmd itself detects them (``slurmd -C``)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return " ".join(f"{k}={fields[k]}" for k in keys)


class SlurmCluster:
    """A one-node cluster (node ``localhost``, partition ``debug``) living in its own temp dir."""

    controller = "localhost"  # SlurmctldHost
    node_names: tuple[str, ...] = ("localhost",)

    def __init__(self, root: Path | None = None) -> None:
        # Not under pytest's 0700 tmp dirs: munged runs as another user and must reach its socket.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="mimae-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, ready_timeout: float = 60.0) -> SlurmCluster:
        ensure_installed()
        try:
            self._start_munge()
            self._write_conf()
            self._start_daemons()
            self.wait_until(lambda: all(self.node_state(n) == "IDLE" for n in self.node_names),
                            ready_timeout, f"nodes {', '.join(self.node_names)} idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel every job, wait for them to leave the node, then stop the daemons (newest first)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name], check=False)
            # the daemons are stopped anyway; slurmctld.log says what was left
            with contextlib.suppress(SlurmError):
                self.wait_until(lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(),
                                timeout, "jobs cancelled")
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- set-up ----------------------------------------------------------------------------------

    def _start_daemons(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        log = open(self.root / f"{name}.out", "ab")  # noqa: SIM115 - lives as long as the daemon
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), **kwargs)
        log.close()

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.root.chmod(0o711)
        self.munge_dir.mkdir(mode=0o700)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.munge_dir.chmod(0o711)  # clients (root here) connect to the socket inside
        self._spawn("munged", [
            "setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}", "--init-groups",
            "munged", "--foreground", f"--key-file={key}", f"--socket={self.socket}",
            f"--pid-file={self.munge_dir / 'munged.pid'}", f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ])
        self.wait_until(self.socket.exists, 15, "munged socket")

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir()
        self.conf.write_text(f"""\
ClusterName=mimaetest
SlurmctldHost={self.controller}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r / "jobcomp.txt"}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1,sched_min_interval=0
ReturnToService=2
MinJobAge=600
KillWait=5
MailProg=/bin/true
StateSaveLocation={r / "state"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
{self._nodes_conf()}
PartitionName=debug Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
""")

    def _nodes_conf(self) -> str:
        r = self.root
        return f"""\
SlurmdSpoolDir={r / "spool"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmdLogFile={r / "slurmd.log"}
NodeName=localhost NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN"""

    # -- client commands -------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env(env))
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def node_state(self, node: str = "localhost") -> str:
        out = self.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], check=False).stdout
        return out.strip().upper()

    def sbatch(self, args: list[str], env: dict[str, str] | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_until(self, condition: Callable[[], object], timeout: float, what: str,
                   interval: float = 0.25) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmError(f"{', '.join(dead)} exited while waiting for {what}; logs in {self.root}")
            value = condition()
            if value:
                return value
            time.sleep(interval)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.root}")

    def wait_for_state(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job's state is one of ``states``; returns its last ``scontrol`` record."""
        found: dict[str, str] = {}

        def reached() -> bool:
            found.update(self.job(job_id))
            return found.get("JobState") in states

        try:
            self.wait_until(reached, timeout, f"job {job_id} in {sorted(states)}")
        except SlurmError as exc:
            raise SlurmError(f"{exc} (last state {found.get('JobState')})") from None
        return found
