"""Run folders at an fsspec URL (``s3://bucket/runs/x``, ``gs://...``, ``file:///abs/path``):
:class:`RunStorage` copies between the URL and this node's local *mirror* of it, and the cache of
mirrors is listed and cleaned here (``kiln cache list / clean``). :class:`trainer.storage.RunFolder`
is the one user: nothing else branches on whether a run is at a URL.

DeepSpeed reads and writes local paths only, so a run whose ``run_dir`` is a URL works in a
local mirror of it, ``<cache>/runs/<name>-<hash of the URL>/`` on every node, where ``<cache>``
is ``$KILN_CACHE`` or ``<system temp>/kiln-cache`` (it must be a node-local disk). The mirror has
the layout of a plain run folder, plus ``.kiln-url`` naming its URL. See
:mod:`trainer.storage` for when each copy happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trainer.manifest import STATE_FILE, damage

CACHE_ENV = "KILN_CACHE"
URL_FILE = ".kiln-url"  # in a mirror: the URL it mirrors (for `kiln cache list`)


def is_url(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` names a folder through an fsspec protocol (``proto://...``)."""
    return isinstance(run_dir, str) and "://" in run_dir


def check_url(url: str) -> None:
    """Refuse a URL no filesystem here can open (before any process starts).

    Raises:
        ValueError: fsspec does not know the protocol, or its filesystem package is missing
            (the message names the package to install).
    """
    try:
        import fsspec
    except ImportError:
        raise ValueError(
            f"run_dir={url!r} is a URL, which needs fsspec (pip install fsspec)"
        ) from None
    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        raise ValueError(f"run_dir={url!r}: {e} (pip install it on every node)") from None
    except ValueError:
        raise ValueError(
            f"run_dir={url!r}: fsspec knows no protocol {protocol!r}; use a local path or a URL "
            f"such as s3://, gs://, abfs://, file:///abs/path"
        ) from None


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "kiln-cache")


def mirrors_root() -> Path:
    """The folder that holds this node's mirrors, one folder each."""
    return cache_root() / "runs"


def mirror_dir(url: str) -> Path:
    """The local folder that mirrors the run folder at ``url`` on this node."""
    url = url.rstrip("/")
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return mirrors_root() / f"{url.rsplit('/', 1)[-1]}-{digest}"


class RunStorage:
    """A run folder at an fsspec URL and its local mirror (:func:`mirror_dir`).

    Paths given to its methods are relative to the run folder (``checkpoints/step-N``), the same
    on both sides.
    """

    def __init__(self, url: str, local: Path | None = None):
        """``local``: the folder to copy into instead of the mirror (a throwaway download)."""
        check_url(url)
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.local = mirror_dir(self.url) if local is None else local

    def remote(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def make_mirror(self) -> Path:
        """Create the local folder (if missing) with the URL in its ``.kiln-url``; returns it."""
        self.local.mkdir(parents=True, exist_ok=True)
        if not (self.local / URL_FILE).is_file():
            (self.local / URL_FILE).write_text(self.url + "\n")
        return self.local

    # -- small objects ---------------------------------------------------------------------------
    def write_text(self, rel: str, text: str) -> None:
        """Write one whole object (object stores make it visible at once, or not at all)."""
        self.fs.makedirs(self.remote(rel).rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(self.remote(rel), text.encode())

    def read_text(self, rel: str) -> str | None:
        try:
            return self.fs.cat_file(self.remote(rel)).decode()
        except FileNotFoundError:
            return None

    def latest_tag(self) -> str | None:
        """The checkpoint ``<url>/checkpoints/latest`` names, or None."""
        text = self.read_text("checkpoints/latest")
        return text.strip() if text else None

    def latest_step(self) -> int | None:
        tag = self.latest_tag()
        return int(tag.split("-")[1]) if tag else None

    # -- copies ----------------------------------------------------------------------------------
    def upload(self, files: list[Path], local_dir: Path, rel_dir: str) -> None:
        """Copy ``files`` (under ``local_dir``) to ``<url>/<rel_dir>/`` keeping their sub-paths."""
        if not files:
            return
        subs = [f.relative_to(local_dir).as_posix() for f in files]
        targets = [self.remote(f"{rel_dir}/{sub}" if rel_dir else sub) for sub in subs]
        for parent in {t.rsplit("/", 1)[0] for t in targets}:
            self.fs.makedirs(parent, exist_ok=True)
        self.fs.put([str(f) for f in files], targets)

    def listing(self, rel_dir: str) -> dict[str, int]:
        """Files under ``<url>/<rel_dir>/`` (recursive): relative path -> size in bytes."""
        base = self.remote(rel_dir)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        strip = self.fs._strip_protocol(base).rstrip("/") + "/"
        return {
            p[len(strip) :]: info["size"]
            for p, info in found.items()
            if info["type"] == "file" and p.startswith(strip)
        }

    def download(self, rel_dir: str, local_dir: Path) -> bool:
        """Make ``local_dir`` hold exactly the files of ``<url>/<rel_dir>/``, fetching only those
        missing or of another size. Returns whether anything was fetched."""
        want = self.listing(rel_dir)
        stale = [
            rel
            for rel, size in want.items()
            if not (local_dir / rel).is_file() or (local_dir / rel).stat().st_size != size
        ]
        if local_dir.is_dir():
            for f in [f for f in local_dir.rglob("*") if f.is_file()]:
                if f.relative_to(local_dir).as_posix() not in want:
                    f.unlink()
        if not stale:
            return False
        for rel in stale:
            (local_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get(
            [self.remote(f"{rel_dir}/{rel}") for rel in stale], [str(local_dir / r) for r in stale]
        )
        return True

    def download_file(self, rel: str) -> None:
        """Fetch ``<url>/<rel>`` into the mirror; remove the mirror's copy when there is none."""
        local = self.local / rel
        if not self.fs.isfile(self.remote(rel)):
            local.unlink(missing_ok=True)
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get(self.remote(rel), str(local))

    def remove(self, rel: str) -> None:
        if self.fs.exists(self.remote(rel)):
            self.fs.rm(self.remote(rel), recursive=True)

    # -- checkpoints -----------------------------------------------------------------------------
    def fetch_checkpoint(self, tag: str, *, checksums: bool = True) -> Path:
        """Download ``checkpoints/<tag>`` into the mirror (what is missing or of another size)
        and check it against its manifest (:func:`damage`: sizes, and sha256 with
        ``checksums``); a copy that differs is fetched again whole, once. Returns it there.

        Raises:
            FileNotFoundError: the URL holds no complete checkpoint ``tag``, or its files differ
                from its manifest at the URL too (the message says how to go on).
        """
        if not self.fs.isfile(self.remote(f"checkpoints/{tag}/{STATE_FILE}")):
            raise FileNotFoundError(f"{self.url}/checkpoints/{tag} is not a complete checkpoint")
        local = self.local / "checkpoints" / tag
        if local.is_dir() and not (local / STATE_FILE).is_file():
            shutil.rmtree(local)
        for _ in range(2):
            self.download(f"checkpoints/{tag}", local)
            files = json.loads((local / STATE_FILE).read_text()).get("files") or {}
            problem = damage(local, files, checksums=checksums)
            if problem is None:
                return local
            shutil.rmtree(local)  # a damaged mirror copy: fetch it all again
        raise FileNotFoundError(
            f"{self.url}/checkpoints/{tag}, which {self.url}/checkpoints/latest names, {problem}; "
            f"the checkpoint at the URL is damaged: write the name of an older complete "
            f"checkpoint (step-N) into {self.url}/checkpoints/latest to resume from it"
        )

    def pull_run(self, *, checksums: bool = True) -> str | None:
        """Make the mirror resume where the URL is (one process per node, before training).

        Fetches the checkpoint ``latest`` names (checked against its manifest:
        :meth:`fetch_checkpoint`), ``metrics.jsonl``, ``health.jsonl`` and ``sample_ids/``, and
        points the mirror's ``latest`` at it; with no ``latest`` at the URL the mirror gets none
        either (the run starts afresh). Returns the tag, or None.

        Raises:
            FileNotFoundError: the checkpoint is damaged at the URL (:meth:`fetch_checkpoint`).
        """
        tag = self.latest_tag()
        root = self.local / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        if tag is None:
            (root / "latest").unlink(missing_ok=True)
        else:
            self.fetch_checkpoint(tag, checksums=checksums)
            (root / "latest").write_text(tag)
        self.download_file("metrics.jsonl")
        self.download_file("health.jsonl")
        self.download("sample_ids", self.local / "sample_ids")
        return tag

    def push_run_files(self, rank: int) -> None:
        """Upload this rank's run files: ``sample_ids/rank<r>.jsonl``; rank 0 also
        ``metrics.jsonl``, ``health.jsonl`` and ``config.yaml``."""
        files = [self.local / "sample_ids" / f"rank{rank}.jsonl"]
        if rank == 0:
            files += [self.local / n for n in ("metrics.jsonl", "health.jsonl", "config.yaml")]
        self.upload([f for f in files if f.is_file()], self.local, "")

    def prune(self, keep_last: int) -> None:
        """Delete complete checkpoints at the URL older than the newest ``keep_last``, and
        incomplete ones (a save that died while uploading) older than the newest complete one."""
        steps = sorted(
            p.rsplit("/", 1)[-1]
            for p in self.fs.glob(self.remote("checkpoints/step-*"))
            if not p.endswith("-universal")
        )
        state = [self.remote(f"checkpoints/{t}/{STATE_FILE}") for t in steps]
        complete = [t for t, f in zip(steps, state, strict=True) if self.fs.isfile(f)]
        if not complete:
            return
        keep = set(complete[-keep_last:])
        for tag in steps:
            if tag not in keep and tag < complete[-1]:
                self.fs.rm(self.remote(f"checkpoints/{tag}"), recursive=True)


def download_lines(folder: str | Path) -> tuple[list[str], str]:
    """How a user gets the folder ``folder`` (a path, or a URL such as ``s3://.../hf/step-N``)
    to load it with ``from_pretrained``, which reads local folders and the Hub only: the lines
    of Python that copy a URL's folder into the current folder (none for a path), and the local
    folder to load."""
    if not is_url(folder):
        return [], str(folder)
    url = str(folder).rstrip("/")
    name = url.rsplit("/", 1)[-1]
    lines = [
        "from fsspec.core import url_to_fs",
        f'fs, path = url_to_fs("{url}")',
        f'fs.get(path + "/", "{name}/", recursive=True)',
    ]
    return lines, name


@dataclass(frozen=True)
class Mirror:
    """One mirror folder of this node's cache (see :func:`list_mirrors`)."""

    path: Path
    url: str | None  # what its .kiln-url names; None for a mirror without one
    size: int  # bytes of its files
    modified: float  # newest mtime in it, of a file or a folder (seconds since the epoch)


def _walk(path: Path) -> Iterable[os.stat_result]:
    """The lstat of ``path`` and of everything under it (links are not followed: wandb makes
    some)."""
    st = os.lstat(path)
    yield st
    if not stat.S_ISDIR(st.st_mode):
        return
    for parent, dirs, names in os.walk(path):
        for name in dirs + names:
            yield os.lstat(os.path.join(parent, name))


def _bytes(path: Path) -> int:
    """Bytes of the regular files at or under ``path``."""
    return sum(st.st_size for st in _walk(path) if stat.S_ISREG(st.st_mode))


def format_size(n: int) -> str:
    """``n`` bytes for people: ``"1.5 GiB"``, ``"340.0 KiB"``, ``"12 B"`` (binary units)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def read_mirror(path: Path) -> Mirror:
    """Size, last modification and URL of the mirror folder ``path``.

    The last modification is the newest mtime of a file or a folder in it: node 0's mirror of a
    run in progress gets metrics every logged step, every node's a ``checkpoints/.tmp-step-N``
    folder made (and, but on node 0, deleted) at every save.
    """
    stats = list(_walk(path))
    url = (path / URL_FILE).read_text().strip() if (path / URL_FILE).is_file() else ""
    return Mirror(
        path=path,
        url=url or None,
        size=sum(st.st_size for st in stats if stat.S_ISREG(st.st_mode)),
        modified=max(st.st_mtime for st in stats),
    )


def list_mirrors() -> list[Mirror]:
    """Every mirror under :func:`mirrors_root` on this node, by folder name."""
    root = mirrors_root()
    if not root.is_dir():
        return []
    return [read_mirror(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.is_symlink()]


def stale_mirrors(older_than: float, now: float | None = None) -> list[Mirror]:
    """The mirrors whose newest file is more than ``older_than`` seconds older than ``now``
    (default: the current time). The mirror of a run in progress changes at least at every
    save (:func:`read_mirror`)."""
    now = time.time() if now is None else now
    return [m for m in list_mirrors() if now - m.modified > older_than]


def remove_mirror(path: Path, keep: Iterable[str] = ()) -> int:
    """Delete the mirror folder ``path``, but for its top-level entries named in ``keep`` (the
    folder then stays with those). Returns the bytes of the files deleted.

    Raises:
        ValueError: ``path`` is not a folder right under :func:`mirrors_root`.
    """
    if path.parent != mirrors_root():
        raise ValueError(f"{path} is no mirror: mirrors are the folders in {mirrors_root()}")
    keep = set(keep)
    if not keep:
        freed = _bytes(path)
        shutil.rmtree(path)
        return freed
    freed = 0
    for entry in path.iterdir():
        if entry.name in keep:
            continue
        freed += _bytes(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return freed
