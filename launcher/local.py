"""Local launch: one torchrun per node that starts ``trainer.main`` in every process.

The launcher starts torchrun in its own session so that a Ctrl-C in the terminal reaches only
this process, which then asks the workers to checkpoint and stop (SIGTERM) instead of killing
them. SIGTERM and SIGUSR1 sent to this process are forwarded to the workers the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import psutil

# glibc's malloc raises its mmap threshold (up to 32 MiB) each time a block above it is freed, so
# blocks of up to 32 MiB (gradient buckets, gathered ZeRO-3 parameters, optimizer temporaries)
# are later carved from the heap and kept there when freed: the `1b` preset under ZeRO-3 on two
# 12 GiB CPU ranks is killed for memory in its first step by what the heaps keep. Setting the
# threshold fixes it (and turns off the dynamic raise and the trim threshold's with it: mallopt(3)):
# blocks of 128 KiB and more are mapped and unmapped on their own and go back to the system when
# freed. bench/memory.py measures both. A value the user exports wins.
MALLOC_DEFAULTS = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def malloc_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The glibc allocator variables the training processes start with: each of
    :data:`MALLOC_DEFAULTS`, or the value ``environ`` (default: ``os.environ``) already has."""
    environ = os.environ if environ is None else environ
    return {key: environ.get(key, value) for key, value in MALLOC_DEFAULTS.items()}


def worker_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of the training processes: ``environ`` (default: ``os.environ``)
    with :func:`malloc_environment`'s defaults for the allocator variables it lacks."""
    environ = os.environ if environ is None else environ
    return {**environ, **malloc_environment(environ)}


def torchrun_command(
    config_path: Path,
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
) -> list[str]:
    """The torchrun command line that runs ``trainer.main`` on this node (through
    :mod:`launcher.torchrun`, which reports a failed rank in one line)."""
    cmd = [sys.executable, "-m", "launcher.torchrun", f"--nproc_per_node={nproc_per_node}"]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [
            f"--nnodes={nnodes}",
            f"--node_rank={node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={master_addr}:{master_port}",
        ]
    return [*cmd, "-m", "trainer.main", str(config_path)]


def run_workers(cmd: list[str]) -> int:
    """Run ``cmd`` (a torchrun command) in :func:`worker_environment`, forwarding stop signals
    to its workers.

    Returns torchrun's exit code; 0 also when a forwarded signal stopped the run cleanly.
    """
    proc = subprocess.Popen(cmd, start_new_session=True, env=worker_environment())
    interrupts = 0

    def forward(signum, _frame):
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:  # a second Ctrl-C: stop without saving
                proc.kill()
                return
            print("\nstopping: the workers finish the step and save (Ctrl-C again to kill)")
            signum = signal.SIGTERM
        try:
            for child in psutil.Process(proc.pid).children():
                child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass

    previous = {
        s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    }
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
