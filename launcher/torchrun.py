"""torchrun, quiet, with one line per failed rank instead of its traceback and failure table.

The training processes record why they fail in the run folder (:mod:`trainer.errors`) and the
launcher shows each failure once; torchrun's own report (its Python traceback, ``ChildFailedError``
and a table of every rank's error file) would repeat it in a less readable form. This module runs
torchrun's ``run`` with the same arguments and, when a rank fails, prints only the rank, its exit
code and the signal that ended it, then exits 1::

    python -m launcher.torchrun --nproc_per_node=2 --standalone -m trainer.main config.yaml
"""

from __future__ import annotations

import logging
import os
import signal
import sys

# torchrun logs at LOGLEVEL (default WARNING; its OMP_NUM_THREADS banner), read when its loggers
# are created, and its agent through plain loggers (a line per failed rank): both repeat what Kiln
# says; `kiln train --verbose` (KILN_VERBOSE=1) keeps them. LOGLEVEL is not passed on to the
# training processes.
_VERBOSE = os.environ.get("KILN_VERBOSE", "") not in ("", "0")
_LOGLEVEL = os.environ.get("LOGLEVEL")
if not _VERBOSE:
    os.environ["LOGLEVEL"] = "CRITICAL"

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import parse_args, run  # noqa: E402

if _LOGLEVEL is None:
    os.environ.pop("LOGLEVEL", None)
else:
    os.environ["LOGLEVEL"] = _LOGLEVEL
if not _VERBOSE:  # the agent's plain loggers (its per-rank "failed (exitcode ...)" line)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)


def describe_exit(exitcode: int) -> str:
    """``code 1``, or ``signal SIGKILL`` (with the usual cause) for a negative exit code."""
    if exitcode >= 0:
        return f"code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"
    cause = {
        "SIGKILL": " (killed: out of host memory, or by hand)",
        "SIGSEGV": " (crashed)",
        "SIGALRM": " (the hang watchdog: no progress for health.step_timeout)",
    }
    return f"signal {name}{cause.get(name, '')}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        for rank, failure in sorted(e.failures.items()):
            print(f"rank {rank} exited with {describe_exit(failure.exitcode)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
