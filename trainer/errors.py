"""Errors Kiln raises for a user's mistake, and how a training process reports a failure.

A user's mistake raises one of :data:`USER_ERRORS` with a message that says what is wrong, where,
and the fix; the CLI prints it as one paragraph, without a traceback. A training process that
fails records why in its run folder (:func:`record_failure`: ``logs/rank-R.error.json``, and the
traceback of an unexpected error in ``logs/rank-R.traceback.txt``); the launcher that started the
processes collects the records of every rank and shows each message once
(:func:`read_failures`, :func:`describe_failures`), instead of torchrun's dump of every rank's
traceback.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that cannot run; the message names the field, the value and the fix."""


class StorageFullError(RuntimeError):
    """A write failed because the device it went to is full; the message says where, what is
    still saved, and how to go on."""


class TrainingDivergedError(RuntimeError):
    """The health supervisor stopped the run (``health.on_*: stop``): the message names the
    step, what was wrong and where the report and the checkpoint are."""


# Set by a launcher that reads the failure records and shows them (`kiln train`): the ranks then
# print nothing of their own; without it (Slurm's log, a torchrun started by hand) each prints one
# line.
COLLECTED_ENV = "KILN_COLLECTS_FAILURES"

# What Kiln's checks raise with the fix in the message: shown without a traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    StorageFullError,
    TrainingDivergedError,
)


def record_failure(error: BaseException, *, rank: int, log_dir: Path) -> dict[str, Any]:
    """Write why this rank fails into ``log_dir`` and return the record.

    The record (``rank-R.error.json``) holds ``rank``, ``time`` (Unix seconds), ``user`` (a
    user's mistake: one of :data:`USER_ERRORS`), ``type``, ``message`` and, for an unexpected
    error, ``traceback``: the file holding its full traceback. Writing never raises: the record's
    ``recorded`` says whether the file was written (a full disk may refuse it).
    """
    user = isinstance(error, USER_ERRORS)
    record: dict[str, Any] = {
        "rank": rank,
        "time": time.time(),
        "user": user,
        "type": type(error).__name__,
        "message": str(error) or type(error).__name__,
    }
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        if not user:
            path = log_dir / f"rank-{rank}.traceback.txt"
            path.write_text("".join(traceback.format_exception(error)))
            record["traceback"] = str(path)
        (log_dir / f"rank-{rank}.error.json").write_text(json.dumps(record))
        record["recorded"] = True
    except OSError:
        record["recorded"] = False
    return record


def read_failures(log_dir: Path, since: float) -> list[dict[str, Any]]:
    """The failure records (:func:`record_failure`) written into ``log_dir`` at or after
    ``since`` (Unix seconds: a launch's start, so an earlier attempt's records are not shown),
    by rank."""
    records = []
    for path in log_dir.glob("rank-*.error.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("time", 0) >= since:
            records.append(record)
    return sorted(records, key=lambda r: r["rank"])


def describe_failures(records: list[dict[str, Any]]) -> str:
    """Each distinct failure once, with the ranks that had it: a user's mistake as its message;
    an unexpected error as its type, message and the traceback file of its first rank."""
    by_message: dict[tuple[bool, str, str], list[dict[str, Any]]] = {}
    for r in records:
        by_message.setdefault((r["user"], r["type"], r["message"]), []).append(r)
    parts = []
    for (user, kind, message), group in by_message.items():
        ranks = ", ".join(str(r["rank"]) for r in group)
        where = f"rank{'s' if len(group) > 1 else ''} {ranks}"
        if user:
            parts.append(f"{message}\n(on {where})")
        else:
            written = group[0].get("traceback", "not written")
            parts.append(
                f"{kind} on {where}: {message}\nfull traceback: {written}\n"
                "This is a bug in Kiln or a library it uses if the message does not point at "
                "your config or data; please report it with that file"
            )
    return "\n\n".join(parts)
