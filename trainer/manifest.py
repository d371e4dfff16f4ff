"""What makes a checkpoint folder complete and whole: its name (:func:`checkpoint_tag`), the
``trainer_state.json`` written last (:data:`STATE_FILE`), the manifest of its files with their
sizes and sha256 (:func:`checkpoint_files`) and the check against it (:func:`damage`), atomic
small writes and pruning. Used by :mod:`trainer.storage` (local run folders) and
:mod:`trainer.mirror` (run folders at a URL); imports nothing of Kiln's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STATE_FILE = "trainer_state.json"  # in a checkpoint: what makes it complete


def checkpoint_tag(step: int) -> str:
    """The folder name of the checkpoint of ``step``: ``step-00000100``."""
    return f"step-{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: readers see the old or the new text."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_files(folder: Path, *, checksums: bool) -> dict[str, list]:
    """The manifest of the checkpoint being written in ``folder``: ``{path relative to folder:
    [bytes, sha256 hex or None]}`` for every file but ``trainer_state.json`` (which records it,
    written last); sha256 runs at about 1.4 GiB/s per core, in up to 8 threads."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE)
    digests = _sha256s(files) if checksums else [None] * len(files)
    return {
        str(p.relative_to(folder)): [p.stat().st_size, d]
        for p, d in zip(files, digests, strict=True)
    }


def _sha256s(paths: list[Path]) -> list[str]:
    """The sha256 (hex) of each file, hashed in up to 8 threads (hashlib releases the GIL)."""

    def sha256(path: Path) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256, paths))


def damage(folder: Path, files: dict[str, list], *, checksums: bool) -> str | None:
    """Why the checkpoint ``folder`` disagrees with its manifest ``files`` (from
    :func:`checkpoint_files`; the first difference, as the end of a sentence that starts with
    "it"), or None when every listed file has its size and, with ``checksums``, its sha256."""
    for rel, (size, _) in files.items():
        path = folder / rel
        if not path.is_file():
            return f"lacks {rel}, which its manifest lists"
        if (actual := path.stat().st_size) != size:
            return f"has {rel} of {actual:,} bytes, its manifest says {size:,} (truncated?)"
    if checksums:
        recorded = {rel: digest for rel, (_, digest) in files.items() if digest is not None}
        now = _sha256s([folder / rel for rel in recorded])
        for (rel, digest), actual in zip(recorded.items(), now, strict=True):
            if actual != digest:
                return f"has {rel} with another sha256 than its manifest's (damaged bytes)"
    return None


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete the complete checkpoints in the folder ``root`` (a run's ``checkpoints/``) older
    than the newest ``keep_last``, with their universal conversions."""
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    complete = [p for p in complete if not p.name.endswith("-universal")]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.with_name(old.name + "-universal"), ignore_errors=True)
