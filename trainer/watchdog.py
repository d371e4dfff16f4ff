"""The hang watchdog: a step that makes no progress ends the process, with its stacks on file.

A rank stuck in a collective (a peer that died without closing its sockets, a wedged NCCL
kernel, a rank that never arrives) waits as long as the process group's timeout, often hours.
With ``health.step_timeout = T`` (seconds) every rank instead, on its own and from outside the
Python interpreter, so also while its main thread is blocked inside a gloo / NCCL call:

1. at ``T`` seconds without progress writes the Python stacks of all its threads to
   ``<run_dir>/hangs/<UTC launch time>-rank<R>.txt`` (the standard library's
   ``faulthandler.dump_traceback_later``, run by a C thread; the file's first line names the
   rank, host, pid and the step the launch started from; faulthandler's ``Timeout (H:MM:SS)!``
   line starts the dump);
2. at ``T + kill_grace(T)`` is killed by the kernel through ``SIGALRM`` (``setitimer``; SIGALRM's
   default action ends the process, whatever its threads are doing). Exit status: signal 14,
   reported as ``-14`` by torchrun and Ray, ``142`` by a shell.

The two stages are apart on purpose: every rank has its own timer, armed within a step of its
peers' (they meet at every step's collectives), and the first rank to exit breaks its peers'
collectives, which would make them fail with a connection error before their own timer fired,
leaving no stack. ``faulthandler.dump_traceback_later(..., exit=True)`` would exit right after
its dump; the grace (:func:`kill_grace`: 5% of ``T``, at least 2 s, above a step's length for any
useful ``T``) lets every rank dump first.

A launcher tells a hang from another failure by the dumps in ``hangs/`` written since it started
the ranks (:func:`hang_reports`): ``kiln slurm``'s job requeues itself after a hang when it saved
a newer checkpoint than it started from (:func:`launcher.slurm.after_run`), Ray Train restarts
the worker group (``FailureConfig``); both resume from the newest complete checkpoint.

What is timed (:class:`HangWatchdog`): the timer is re-armed as each training step starts
(``Trainer.train_step``) and keeps running through the work up to the next step (the metrics'
all-reduce, logging, the callbacks' polls): "no progress" means no new step started for ``T``.
The first step of each launch gets ``FIRST_STEP_FACTOR * T``: it pays for the engine's warm-up,
compilation and the first collectives' connection set-up (torchtitan gives its first step a
3x longer collective timeout, ``comm.init_timeout_seconds`` 300 vs ``train_timeout_seconds``
100). Evaluation, checkpoint saves and loads are not timed (their length grows with the model,
the validation set and the filesystem, not with the step): the timer is stopped during them and
re-armed with ``T`` after. Publishing runs in background processes and is not timed either. Set
up before the first step (engine build, resume) and the tear-down after the last are not timed.

Cost per step: one ``faulthandler.dump_traceback_later`` (it replaces its C timer thread) and one
``setitimer`` system call, no host-device sync: 36-113 us (median 41 us) per step on a 2-core
CPU host under a load of 5, against a 125m-preset step of seconds there (0.1 s on a GPU).
"""

from __future__ import annotations

import datetime
import faulthandler
import functools
import os
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from trainer.callbacks import Callback
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.loop import Trainer

HANGS_DIR = "hangs"  # in the run folder
FIRST_STEP_FACTOR = 3.0
DUMP_MARK = "Timeout ("  # faulthandler's first line of a timed-out dump: "Timeout (0:30:00)!"
_REPORT_NAME = re.compile(r"^(?P<launch>\d{8}T\d{6}Z)-rank(?P<rank>\d+)\.txt$")


def kill_grace(step_timeout: float) -> float:
    """Seconds between a rank's stack dump and its kill: 5% of ``step_timeout``, at least 2."""
    return max(2.0, 0.05 * step_timeout)


class HangWatchdog(Callback):
    """Times every training step of a :class:`~trainer.loop.Trainer` on this rank (see the module
    docstring for what is timed and what happens on a timeout).

    :meth:`on_train_start` opens the rank's report file and wraps the trainer's ``train_step``
    (arms the timer), ``evaluate``, ``save`` and ``load`` (stop it, then re-arm); :meth:`close`
    (also :meth:`on_train_end`) stops the timer, unwraps them and deletes the report if no dump
    went into it. Call :meth:`close` when ``fit`` raises too: the timer would otherwise end the
    process later.

    Args:
        step_timeout: seconds without progress, > 0 (``health.step_timeout``).
        hangs_dir: where the reports go (``<run_dir>/hangs``).
        rank: this process's global rank; ``world_size``: the number of ranks.

    Raises:
        ConfigError: (at :meth:`on_train_start``) SIGALRM has a handler in this process, so it
            could not end a process whose main thread is stuck.
    """

    def __init__(self, step_timeout: float, hangs_dir: Path, rank: int, world_size: int):
        assert step_timeout > 0, "health.step_timeout <= 0 turns the watchdog off: do not build it"
        self.step_timeout, self.hangs_dir = step_timeout, hangs_dir
        self.rank, self.world_size = rank, world_size
        self.report: Path | None = None
        self._file: IO[str] | None = None
        self._next_timeout = FIRST_STEP_FACTOR * step_timeout
        self._wrapped: dict[str, Callable] = {}
        self._trainer: Trainer | None = None

    # -- the timer ------------------------------------------------------------------------------
    def arm(self, seconds: float) -> None:
        """Dump the stacks in ``seconds`` and kill the process ``kill_grace(step_timeout)`` later
        unless re-armed or stopped before."""
        faulthandler.dump_traceback_later(seconds, exit=False, file=self._file)
        signal.setitimer(signal.ITIMER_REAL, seconds + kill_grace(self.step_timeout))

    def disarm(self) -> None:
        """Stop the timer (kill first, then dump: no kill can follow a dump that did not come)."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        if (handler := signal.getsignal(signal.SIGALRM)) is not signal.SIG_DFL:
            raise ConfigError(
                "health.step_timeout needs SIGALRM's default action (end the process) to end a "
                f"hung rank, but this process handles SIGALRM ({handler!r}); set "
                "health.step_timeout=0 to train without the hang watchdog"
            )
        # one launch time for all ranks, so that the reports of one hang share a name
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        if self.world_size > 1:
            from trainer import distributed

            now = distributed.broadcast_object(now)
        self.hangs_dir.mkdir(parents=True, exist_ok=True)
        self.report = self.hangs_dir / f"{now}-rank{self.rank}.txt"
        self._file = open(self.report, "w")  # noqa: SIM115 (open while the timer may write)
        self._file.write(
            f"kiln hang watchdog: rank {self.rank} of {self.world_size} on {socket.gethostname()} "
            f"(pid {os.getpid()}), launch from step {trainer.step}, health.step_timeout "
            f"{self.step_timeout:g} s (first step {FIRST_STEP_FACTOR:g}x). A dump below means no "
            f"training step made progress for that long; the process was then killed (SIGALRM) "
            f"{kill_grace(self.step_timeout):g} s later.\n"
        )
        self._file.flush()
        self._trainer = trainer
        self._wrap(trainer, "train_step", self._timed)
        for name in ("evaluate", "save", "load"):
            self._wrap(trainer, name, self._untimed)

    def on_train_end(self, trainer: Trainer) -> None:
        self.close()

    def close(self) -> None:
        """Stop the timer, unwrap the trainer, delete the report if it holds no dump."""
        if self._file is None:
            return
        self.disarm()
        for name in self._wrapped:
            delattr(self._trainer, name)  # back to the class's method
        self._wrapped.clear()
        self._file.close()
        self._file = None
        if DUMP_MARK not in self.report.read_text(errors="replace"):
            self.report.unlink()

    # -- wrappers -------------------------------------------------------------------------------
    def _wrap(self, trainer: Trainer, name: str, how: Callable[[Callable], Callable]) -> None:
        method = getattr(trainer, name)
        self._wrapped[name] = method
        setattr(trainer, name, functools.wraps(method)(how(method)))

    def _timed(self, method: Callable) -> Callable:
        def timed_step(*args: Any, **kwargs: Any) -> Any:
            self.arm(self._next_timeout)
            self._next_timeout = self.step_timeout
            return method(*args, **kwargs)

        return timed_step

    def _untimed(self, method: Callable) -> Callable:
        def untimed(*args: Any, **kwargs: Any) -> Any:
            self.disarm()
            try:
                return method(*args, **kwargs)
            finally:
                if self._file is not None:
                    self.arm(self.step_timeout)

        return untimed


def hang_reports(run_dir: Path, since: float = 0.0) -> list[Path]:
    """The hang reports (stack dumps) in ``run_dir/hangs`` written at or after ``since`` (Unix
    seconds: a launch's start), by launch and rank; reports without a dump are left out."""
    found = []
    for path in (Path(run_dir) / HANGS_DIR).glob("*-rank*.txt"):
        match = _REPORT_NAME.match(path.name)
        try:
            if match and path.stat().st_mtime >= since and DUMP_MARK in path.read_text("utf-8"):
                found.append((match["launch"], int(match["rank"]), path))
        except (OSError, UnicodeDecodeError):
            continue
    return [path for *_, path in sorted(found)]


def describe_hangs(reports: list[Path]) -> str:
    """One line naming the ranks that hung and where their stacks are (``reports`` from
    :func:`hang_reports`, not empty)."""
    ranks = sorted({int(_REPORT_NAME.match(p.name)["rank"]) for p in reports})
    timeout = re.search(r"health\.step_timeout (\S+) s", reports[0].read_text(errors="replace"))
    seconds = f" for {timeout[1]} s" if timeout else ""
    return (
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} made no progress"
        f"{seconds} (health.step_timeout): the hang watchdog ended them; their Python stacks are "
        f"in {', '.join(str(p) for p in reports)}"
    )
