"""A real two-node Slurm cluster on this host, for the Slurm integration tests.

Both nodes (``n1``, ``n2``) are this machine: one ``slurmctld`` and two ``slurmd`` processes
with their own ports, spool folders and logs, all in a temporary folder, configured by a
``slurm.conf`` written there and selected with ``SLURM_CONF``. Nothing is installed here: the
Debian packages ``slurm-wlm`` and ``munge`` must be present (``.ci/run`` installs them). munged
is started when no munge daemon answers, and stopped again at the end only if it was started
here. See ``../shared/notes/local-slurm.md`` for the facts this relies on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "munged", "munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")

# cred_expire is also how long a requeued job waits before it may start again (default 120 s);
# sched_interval (default 60 s) is how often pending jobs are looked at without an event;
# KillWait (default 30 s) is how long a cancelled job's processes have between SIGTERM and SIGKILL
# (the tests' graceful stops are signals sent with `scancel --signal`, which starts no kill).
SLURM_CONF = """\
ClusterName=kilntest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=3
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def missing_binaries() -> list[str]:
    """The Slurm / munge programs this cluster needs that are not on PATH (or in sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        check = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return check.returncode == 0


class LocalSlurm:
    """Start with :meth:`start`, stop with :meth:`stop`; ``env`` selects this cluster.

    Args:
        root: an empty folder for slurm.conf, state, spool folders and daemon logs.

    Raises (from :meth:`start`):
        RuntimeError: munge has no key, or a daemon did not come up (its log is quoted).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []
        self._munged_pid: int | None = None

    def start(self, timeout: float = 60) -> LocalSlurm:
        self._start_munge()
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname().split(".")[0],
                root=self.root,
                ctld_port=_free_port(),
                n1_port=_free_port(),
                n2_port=_free_port(),
            )
        )
        # Foreground daemons (-D) are our children, so they are stopped by the pids we hold.
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for node in ("n1", "n2"):
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}.out")
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.node_states()
            if states and all(s.startswith("idle") for s in states.values()):
                return self
            for p in self._procs:
                if p.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
            time.sleep(0.5)
        states = self.node_states()
        self.stop()
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s ({states}):\n{self.logs()}")

    def _start_munge(self) -> None:
        if _munge_works():
            return
        if not MUNGE_KEY.is_file():
            raise RuntimeError(
                f"{MUNGE_KEY} is missing; create it with `mungekey --create` (as root) or "
                "reinstall the munge package"
            )
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        pidfile = self.root / "munged.pid"
        subprocess.run(["munged", "--force", f"--pid-file={pidfile}"], check=True, timeout=30)
        self._munged_pid = int(pidfile.read_text())
        for _ in range(50):
            if _munge_works():
                return
            time.sleep(0.1)
        raise RuntimeError("munged started but `munge -n | unmunge` still fails")

    def _spawn(self, cmd: list[str], log: str) -> None:
        with open(self.root / log, "ab") as out:
            self._procs.append(
                subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
            )

    def node_states(self) -> dict[str, str]:
        """``{node: state}`` as sinfo reports it (empty while slurmctld does not answer)."""
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True
        )
        if out.returncode != 0:
            return {}
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())

    def logs(self) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-20:]))
        return "\n".join(parts)

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kw)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr}")
        return result

    def stop(self) -> None:
        """Cancel what still runs, stop the daemons (SIGTERM, then SIGKILL) and munged if ours."""
        if self._procs and self._procs[0].poll() is None:
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self._procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()
        if self._munged_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._munged_pid, signal.SIGTERM)
            self._munged_pid = None
