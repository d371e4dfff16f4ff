"""Where a run lives: :class:`RunFolder`, a local path or an fsspec URL (``s3://bucket/runs/x``,
``gs://...``, ``file:///abs/path``), and which of its checkpoints is newest and complete.

Everything that reads or writes a run folder (checkpointing, resume, publish, generate, the
launchers) asks a :class:`RunFolder`; nothing else branches on whether the run is at a URL.
It builds on :mod:`trainer.manifest` (what makes a checkpoint folder complete) and
:mod:`trainer.mirror` (the copies to and from a URL); :mod:`trainer.checkpoint` imports it,
never the reverse.

A plain path is no URL: it is used as it is, nothing is copied.

DeepSpeed reads and writes local paths only, so a run whose ``run_dir`` is a URL works in a
local *mirror* of it, ``<cache>/runs/<name>-<hash of the URL>/`` on every node, where ``<cache>``
is ``$KILN_CACHE`` or ``<system temp>/kiln-cache`` (it must be a node-local disk). The mirror has
the layout of a plain run folder, plus ``.kiln-url`` naming its URL;
:class:`trainer.mirror.RunStorage` copies between it and the URL:

- saving (:meth:`RunFolder.commit_checkpoint`, from :func:`trainer.checkpoint.save_checkpoint`):
  each node uploads the shards its ranks wrote to ``<url>/checkpoints/step-N/``, rank 0 last
  uploads ``trainer_state.json`` and then writes ``<url>/checkpoints/latest`` as one object.
  Object stores have no rename; what makes a checkpoint at the URL complete is that
  ``trainer_state.json`` and ``latest`` are written only after every rank's upload finished, so
  ``latest`` only ever names a complete checkpoint;
- starting (:meth:`RunFolder.start`): each node downloads the checkpoint ``latest`` names into
  its mirror, which the resume logic then reads as a plain run folder;
- finishing (:meth:`RunFolder.finish`): a run that reached ``train.max_steps`` deletes each
  node's mirror once everything is uploaded (an offline wandb folder, its only copy, is kept).
  A run stopped by a signal or a crash keeps it: its resume reuses it;
- reading (``kiln generate / publish / checkpoint consolidate``): :meth:`RunFolder.localize`,
  which downloads into the mirror (kept for the next read);
- cleaning (``kiln cache list / clean``): :func:`trainer.mirror.list_mirrors` and
  :func:`~trainer.mirror.stale_mirrors` say what the mirrors of this node hold and when they
  last changed, :func:`~trainer.mirror.remove_mirror` deletes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from trainer.manifest import (
    STATE_FILE,
    checkpoint_tag,
    damage,
    prune_checkpoints,
    write_atomic,
)
from trainer.mirror import (
    URL_FILE,
    RunStorage,
    check_url,
    is_url,
    mirror_dir,
    mirrors_root,
    remove_mirror,
)

RESTARTED = "restarted"  # `--restart` moves a run's history into restarted-<time>/
# what --restart moves
HISTORY = ("checkpoints", "metrics.jsonl", "health.jsonl", "sample_ids", "logs", "hf")


def is_relative_path(path: str) -> bool:
    """Whether ``path`` is a local path relative to the current folder (a URL and ``~/x`` are
    not): the paths a process elsewhere reads differently."""
    return not is_url(path) and not os.path.isabs(os.path.expanduser(path))


class RunFolder:
    """Where a run lives, and which of its checkpoints is newest and complete.

    ``run_dir`` is a local path, used as it is, or an fsspec URL, worked through this node's
    mirror (:class:`RunStorage`). Everything that reads or writes a run folder asks this object;
    nothing else needs to know which of the two it is. Layout (the same in a mirror)::

        config.yaml  metrics.jsonl  health.jsonl  sample_ids/rank<r>.jsonl  hf/step-N/  wandb/
        checkpoints/step-N/ (complete: holds trainer_state.json)  checkpoints/.tmp-step-N/
        checkpoints/latest  (names the newest complete checkpoint)

    Paths (``local``, ``checkpoints``, ...) are where this process reads and writes: the path
    itself, or the mirror.
    """

    def __init__(self, run_dir: str | Path):
        """Nothing is opened or created here (a URL's filesystem is opened on first use)."""
        self.url: str | None = str(run_dir) if is_url(run_dir) else None
        self.location = self.url if self.url is not None else str(Path(run_dir))
        self.local = mirror_dir(self.url) if self.url is not None else Path(run_dir)
        self._store: RunStorage | None = None

    def __repr__(self) -> str:
        return f"RunFolder({self.location!r})"

    @property
    def store(self) -> RunStorage | None:
        """The URL's filesystem and mirror; None for a path.

        Raises:
            ValueError: no installed filesystem opens the URL (:func:`check_url`).
        """
        if self.url is not None and self._store is None:
            self._store = RunStorage(self.url)
        return self._store

    def check(self) -> None:
        """Refuse a location this machine cannot reach (before any process starts); opens
        nothing.

        Raises:
            ValueError: a URL whose protocol no installed fsspec filesystem handles (the message
                names the package to install).
        """
        if self.url is not None:
            check_url(self.url)

    # -- paths -----------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.local / "checkpoints"

    @property
    def config_path(self) -> Path:
        return self.local / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.local / "metrics.jsonl"

    def checkpoint_dir(self, step: int) -> Path:
        """The local folder of the checkpoint of ``step`` (complete or not, present or not)."""
        return self.checkpoints / checkpoint_tag(step)

    def node_main(self, rank: int, local_rank: int) -> bool:
        """Whether this process prepares the run folder for the processes of its node: with a
        URL every node has its own mirror, prepared by its first process (``local_rank`` 0); a
        path is one folder for all, prepared by rank 0."""
        return local_rank == 0 if self.url is not None else rank == 0

    # -- the newest complete checkpoint ----------------------------------------------------------
    def _local_latest(self) -> str | None:
        """The newest complete checkpoint this process reads: for a path the newest complete
        folder (:meth:`scan`); for a URL what the mirror's ``latest`` names, which :meth:`start`
        and :meth:`localize` set to the URL's (a mirror may hold a newer save whose upload never
        finished: the other nodes do not have it).

        Raises:
            FileNotFoundError: a mirror's ``latest`` names an incomplete checkpoint.
        """
        if self.url is None:
            return self.scan()[0]
        latest = self.checkpoints / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (self.checkpoints / tag / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"{latest} names {tag}, which is not a complete checkpoint in the mirror of "
                f"{self.url}; delete the mirror {self.local} to fetch the run again"
            )
        return tag

    def scan(self, *, checksums: bool = False) -> tuple[str | None, list[str]]:
        """The newest complete local checkpoint, whatever ``checkpoints/latest`` says, and notes
        on why it is not what ``latest`` names.

        Complete means: ``step-N`` holds a readable ``trainer_state.json`` (a save writes it
        last), and every file its manifest (``files``: :func:`checkpoint_files`) lists has the
        recorded size, and with ``checksums`` the recorded sha256 (checkpoints saved before
        manifests are taken as they are). Checkpoints are checked newest first, so a damaged old
        one costs nothing. ``latest`` is a convenience written after each save: a deleted,
        stale or damaged one never makes a run start over (overwriting its checkpoints) or go
        back.

        Returns:
            ``(tag, notes)``: tag ``step-N``, or None when no checkpoint is complete; notes are
            sentences for the log, empty when ``latest`` names the newest complete checkpoint.
        """
        root = self.checkpoints
        candidates: list[tuple[int, str, dict]] = []
        passed_over: dict[str, str] = {}
        for folder in root.glob("step-*"):
            if folder.name.endswith("-universal"):
                continue
            try:
                state = json.loads((folder / STATE_FILE).read_text())
                candidates.append((int(state["step"]), folder.name, state.get("files") or {}))
            except FileNotFoundError:
                passed_over[folder.name] = f"has no {STATE_FILE} (a save that did not end)"
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                passed_over[folder.name] = f"has an unreadable {STATE_FILE} ({e})"
        newest = None
        for _, tag, files in sorted(candidates, reverse=True):
            problem = damage(root / tag, files, checksums=checksums)
            if problem is None:
                newest = tag
                break
            passed_over[tag] = problem
        latest = root / "latest"
        named = latest.read_text().strip() if latest.is_file() else None
        notes = []
        if named != newest:
            notes.append(
                f"{latest} {'names ' + named if named else 'is missing'}; the newest complete "
                f"checkpoint is {newest}"
            )
        notes += [
            f"passed over {tag}: it {why}"
            for tag, why in sorted(passed_over.items())
            if newest is None or tag > newest
        ]
        return newest, notes

    def resume_from(self, *, checksums: bool = False) -> tuple[str | None, list[str]]:
        """:meth:`scan`, refusing to start over in a folder that holds checkpoints of which none
        is complete (training from step 0 would overwrite and prune them).

        Raises:
            FileExistsError: ``checkpoints/`` holds ``step-N`` folders and none is complete; the
                message lists why each was passed over and what to do.
        """
        tag, notes = self.scan(checksums=checksums)
        if tag is None and any(n.startswith("passed over") for n in notes):
            lines = "".join(f"\n  {n}" for n in notes)
            raise FileExistsError(
                f"{self.location} holds checkpoints, none of them complete:{lines}\nTo train "
                "from step 0 in this folder pass --restart (the run's history is moved into "
                f"{RESTARTED}-<time>/ inside it, nothing is deleted), or give another run_dir"
            )
        return tag, notes

    def history(self) -> list[Path]:
        """What a run leaves in its folder besides ``config.yaml``: checkpoints, metrics, sample
        ids, failure logs and published folders (:data:`HISTORY`), those present."""
        return [self.local / name for name in HISTORY if (self.local / name).exists()]

    def set_aside(self, now: float | None = None) -> Path | None:
        """Move the run's history (:meth:`history`) into ``restarted-<UTC time>/`` inside the
        run folder, so that a run started from step 0 overwrites nothing and the old one can
        still be read (``kiln generate``/``publish`` on that folder). Offline wandb runs stay:
        each run has its own id. Nothing is deleted.

        Returns:
            the folder it was moved into, None when there was nothing to move.

        Raises:
            ValueError: the run folder is a URL (object stores have no cheap move): give
                another run_dir.
        """
        if self.url is not None:
            raise ValueError(
                f"--restart works on a run folder path; {self.url} is a URL, whose files an "
                "object store cannot move: give another run_dir to start over"
            )
        moved = self.history()
        if not moved:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
        aside = self.local / f"{RESTARTED}-{stamp}"
        aside.mkdir()  # FileExistsError for two restarts in one second: nothing moved yet
        for path in moved:
            os.replace(path, aside / path.name)
        return aside

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint of the run (``step-N``), None if it has none: for a path
        the newest folder with its ``trainer_state.json`` (:meth:`scan`), for a URL what the URL's
        ``latest`` names (written only after every rank's upload finished)."""
        if self.store is not None:
            return self.store.latest_tag()
        return self._local_latest()

    def latest_step(self) -> int | None:
        """The step of :meth:`latest_tag`, None if the run has no checkpoint."""
        if self.store is not None:
            return self.store.latest_step()
        tag = self._local_latest()
        if tag is None:
            return None
        return json.loads((self.checkpoints / tag / STATE_FILE).read_text())["step"]

    def latest_state(self, tag: str | None = None) -> dict[str, Any] | None:
        """The ``trainer_state.json`` of checkpoint ``tag`` (default :meth:`latest_tag`; read at
        the URL for a URL run), or None when the run has no checkpoint."""
        tag = tag or self.latest_tag()
        if tag is None:
            return None
        rel = f"checkpoints/{tag}/{STATE_FILE}"
        if self.store is not None:
            text = self.store.read_text(rel)
            return None if text is None else json.loads(text)
        return json.loads((self.local / rel).read_text())

    def latest_checkpoint(self) -> Path | None:
        """The local folder of the newest complete checkpoint this process can read, or None: a
        URL run's mirror has the URL's after :meth:`start` or :meth:`localize`.

        Raises:
            FileNotFoundError: a URL mirror's ``latest`` names an incomplete checkpoint.
        """
        tag = self._local_latest()
        return None if tag is None else self.checkpoints / tag

    def find_checkpoint(self, step: int | None = None) -> Path:
        """The local folder of the newest complete checkpoint, or of the one of ``step``
        (:meth:`localize` first to read a URL's).

        Raises:
            FileNotFoundError: there is no (such) complete checkpoint here.
        """
        if step is None:
            ckpt = self.latest_checkpoint()
            if ckpt is None:
                raise FileNotFoundError(
                    f"{self.local} has no checkpoint yet; train it with `kiln train`"
                )
            return ckpt
        ckpt = self.checkpoint_dir(step)
        if not (ckpt / STATE_FILE).is_file():
            raise FileNotFoundError(f"{ckpt} is not a complete checkpoint")
        return ckpt

    # -- the life of a run -----------------------------------------------------------------------
    def prepare(self, config_yaml: str) -> Path:
        """Create the run folder (and, for a URL, this node's mirror) and write ``config.yaml``
        into it (uploaded for a URL). Returns the local folder the run works in."""
        if self.store is not None:
            self.store.make_mirror()
        self.local.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config_yaml)
        if self.store is not None:
            self.store.write_text("config.yaml", config_yaml)
        return self.local

    def start(
        self,
        config_yaml: str,
        *,
        node_main: bool,
        barrier: Callable[[], None],
        checksums: bool = True,
    ) -> None:
        """Make this node's copy resume where the run is (every process of the world calls it,
        before it reads a checkpoint): for a URL the node's first process writes
        ``config.yaml`` into the mirror (also on nodes ``kiln`` never ran on) and fetches what
        the URL's ``latest`` names, checked against its manifest (sha256 with ``checksums``),
        while the others wait in ``barrier``. A path is already where the run is.

        Raises:
            FileNotFoundError: the checkpoint is damaged at the URL
                (:meth:`RunStorage.fetch_checkpoint`).
        """
        if self.store is None:
            return
        if node_main:
            self.store.make_mirror()
            self.config_path.write_text(config_yaml)
            self.store.pull_run(checksums=checksums)
        barrier()

    def remove_partial(self) -> list[Path]:
        """Delete the local ``.tmp-*`` folders a run that died while saving left; returns them."""
        removed = sorted(self.checkpoints.glob(".tmp-*"))
        for p in removed:
            shutil.rmtree(p, ignore_errors=True)
        return removed

    def begin_checkpoint(self, tag: str, *, rank: int, node_main: bool) -> Path:
        """Clear what an earlier attempt at saving ``tag`` left (before any rank writes):
        this node's temporary folder, and at a URL a partial upload. Returns the temporary
        folder the ranks write the checkpoint into."""
        tmp = self.checkpoints / f".tmp-{tag}"
        if node_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.store is not None and rank == 0 and self.store.latest_tag() != tag:
            self.store.remove(f"checkpoints/{tag}")  # a partial upload of an earlier attempt
        return tmp

    def commit_checkpoint(
        self,
        tag: str,
        *,
        rank: int,
        node_main: bool,
        keep_last: int,
        barrier: Callable[[], None],
    ) -> Path:
        """Make the checkpoint ``tag`` complete once every rank wrote its files into the
        temporary folder and rank 0 ``trainer_state.json`` (all ranks call this together).

        For a URL each node's first process uploads the shards its ranks wrote, every rank its
        run files (:meth:`RunStorage.push_run_files`); after ``barrier`` rank 0 uploads
        ``trainer_state.json`` and then ``latest``, so ``latest`` at the URL only names complete
        checkpoints; the mirrors of other nodes drop their copy. Then rank 0 renames the local
        folder, replaces the local ``latest`` and prunes (:meth:`prune`).

        Returns:
            the local folder of the checkpoint.
        """
        tmp = self.checkpoints / f".tmp-{tag}"
        store = self.store
        if store is not None:
            if node_main:  # the shards this node's ranks wrote (the state file comes last)
                files = [f for f in tmp.rglob("*") if f.is_file() and f.name != STATE_FILE]
                store.upload(files, tmp, f"checkpoints/{tag}")
            store.push_run_files(rank)  # metrics of this step were logged before it was saved
            barrier()
            if rank == 0:
                store.upload([tmp / STATE_FILE], tmp, f"checkpoints/{tag}")
                store.write_text("checkpoints/latest", tag)
            elif node_main:  # the mirror of another node keeps nothing: a resume downloads
                shutil.rmtree(tmp, ignore_errors=True)
        final = self.checkpoints / tag
        if rank == 0:
            if final.exists():  # a re-save of the same step (e.g. a signal right after a save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(self.checkpoints / "latest", tag)
            self.prune(keep_last)
        return final

    def prune(self, keep_last: int) -> None:
        """Delete complete checkpoints older than the newest ``keep_last`` (rank 0): locally
        with their universal conversions, and at a URL also the incomplete ones older than its
        newest complete one (:meth:`RunStorage.prune`)."""
        if self.store is not None:
            self.store.prune(keep_last)
        prune_checkpoints(self.checkpoints, keep_last)

    def push_run_files(self, rank: int) -> None:
        """Upload this rank's run files to a URL (:meth:`RunStorage.push_run_files`); a path
        has them already."""
        if self.store is not None:
            self.store.push_run_files(rank)

    def upload(self, paths: Iterable[Path]) -> None:
        """Upload files and folders under :attr:`local` (e.g. ``hf/step-N`` and its log) to
        the same place at a URL; a path has them already."""
        if self.store is None:
            return
        paths = list(paths)
        files = [f for p in paths if p.is_dir() for f in p.rglob("*") if f.is_file()]
        self.store.upload(files + [p for p in paths if p.is_file()], self.local, "")

    def finish(self) -> Path | None:
        """A finished URL run is all at the URL: delete this node's mirror, which only takes
        disk space, but for offline wandb runs (their only copy). Call it from the node's first
        process once the node is done with it. Nothing happens for a path.

        Returns:
            the ``wandb`` folder kept, or None.
        """
        if self.store is None:
            return None
        offline_wandb = any((self.local / "wandb").glob("offline-run-*"))
        remove_mirror(self.local, keep=("wandb", URL_FILE) if offline_wandb else ())
        return self.local / "wandb" if offline_wandb else None

    # -- readers ---------------------------------------------------------------------------------
    def localize(self, step: int | None = None, *, into: Path | None = None) -> Path:
        """A local run folder to read the checkpoint of ``step`` (default: latest) from.

        A path is returned as it is. For a URL the checkpoint and ``metrics.jsonl`` are
        downloaded into the mirror (what is missing), or into the folder ``into`` instead,
        whose ``latest`` then names the URL's.

        Raises:
            FileNotFoundError: the URL has no (such) complete checkpoint.
        """
        if self.url is None:
            return self.local
        store = RunStorage(self.url, local=into)
        tag = store.latest_tag() if step is None else checkpoint_tag(step)
        if tag is None:
            raise FileNotFoundError(f"{self.url} has no checkpoint yet; train it with `kiln train`")
        store.fetch_checkpoint(tag)
        store.make_mirror()
        if step is None:
            (store.local / "checkpoints" / "latest").write_text(tag)
        store.download_file("metrics.jsonl")
        return store.local

    def checkpoint(self, step: int | None = None) -> Path:
        """The local folder of the complete checkpoint of ``step`` (default: the newest),
        downloaded into the mirror first for a URL.

        Raises:
            FileNotFoundError: the run has no (such) complete checkpoint.
        """
        if self.url is None:
            return self.find_checkpoint(step)
        local = self.localize(step)
        if step is None:  # the URL's newest (the mirror may hold a newer save never uploaded)
            step = int((local / "checkpoints" / "latest").read_text().split("-")[1])
        return RunFolder(local).find_checkpoint(step)

    @contextlib.contextmanager
    def read_copy(self, step: int) -> Iterator[Path]:
        """A local run folder holding the checkpoint of ``step`` for the ``with`` block: the
        path itself, or for a URL a download that leaves no mirror behind.

        Raises:
            FileNotFoundError: the URL has no such complete checkpoint.
        """
        if self.url is None:
            yield self.local
            return
        mirrors_root().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sample-", dir=mirrors_root()) as tmp:
            yield self.localize(step, into=Path(tmp))

    def published(self, step: int) -> str | Path | None:
        """Where the run's ``transformers`` folder of ``step`` (``hf/step-N``) is, at the URL
        for a URL run; None if it was not published (completely)."""
        tag = checkpoint_tag(step)
        if self.store is not None:
            found = self.store.fs.isfile(self.store.remote(f"hf/{tag}/config.json"))
            return f"{self.store.url}/hf/{tag}" if found else None
        folder = self.local / "hf" / tag
        return folder if folder.is_dir() else None

    def ray_storage(self) -> dict[str, Any]:
        """The ``storage_path`` (and ``storage_filesystem``) arguments of Ray Train's
        ``RunConfig`` for Ray's own files under ``<run>/ray``: at the URL through fsspec, as
        Kiln's own files (pyarrow alone resolves fewer protocols)."""
        if self.store is None:
            return {"storage_path": str(self.local.resolve() / "ray")}
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return {
            "storage_path": f"{self.store.root}/ray",
            "storage_filesystem": PyFileSystem(FSSpecHandler(self.store.fs)),
        }


def localize(run_dir: str | Path, step: int | None = None, *, into: Path | None = None) -> Path:
    """:meth:`RunFolder.localize` of ``run_dir``."""
    return RunFolder(run_dir).localize(step, into=into)
