"""Checkpoints that are never half-written, and exact resume.

Layout under ``<run_dir>/checkpoints/``::

    step-00000100/            one complete checkpoint
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed shards (by rank)
        trainer_state.json    step, consumed samples (data cursor, in logical indices), tokens,
                              wandb id, world size, the health supervisor's windows, the global
                              sample indices excluded by rollbacks (``excluded_samples``), the
                              rollbacks made and the learning-rate cool-down (trainer.loop), the
                              run's fingerprint (trainer.fingerprint) and the manifest of the
                              other files (``files``: bytes and sha256 of each), written last
        rng_state_rank{r}.pt  RNG states of every rank
        config.yaml           the resolved config of the run
        tokenizer.model, tokenizer_meta.json
    latest                    text file naming the newest complete checkpoint

A checkpoint is written under ``.tmp-step-N`` and renamed when every rank has finished writing;
``latest`` is replaced atomically afterwards, so it only ever names complete checkpoints.

Where the run folder is (a path, or an fsspec URL written through a local mirror) and which
checkpoint is newest and complete is :class:`trainer.storage.RunFolder`'s to say; this module
writes and reads the checkpoints themselves.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer import distributed, manifest
from trainer.errors import StorageFullError
from trainer.storage import RunFolder

if TYPE_CHECKING:
    from trainer.config import KilnConfig

STATE_FILE = manifest.STATE_FILE
tag_for = manifest.checkpoint_tag


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """:meth:`RunFolder.latest_checkpoint <trainer.storage.RunFolder.latest_checkpoint>` of a
    local run folder: the newest complete checkpoint (whatever ``latest`` names), or None."""
    return RunFolder(run_dir).latest_checkpoint()


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """:meth:`RunFolder.find_checkpoint <trainer.storage.RunFolder.find_checkpoint>` of a local
    run folder: the latest complete checkpoint, or the one of ``step``.

    Raises:
        FileNotFoundError: the run has no (such) complete checkpoint.
    """
    return RunFolder(run_dir).find_checkpoint(step)


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine,
    run_dir: str | Path | RunFolder,
    state: dict[str, Any],
    *,
    rank: int,
    keep_last: int,
    extra_files: tuple[Path, ...] = (),
    checksums: bool = True,
) -> Path:
    """Write a complete checkpoint for ``state["step"]`` (all ranks call this together).

    Args:
        engine: the DeepSpeed engine (every rank writes its shards).
        run_dir: the run folder, a path or an fsspec URL (:class:`trainer.storage.RunFolder`):
            with a URL the checkpoint is written into this node's mirror and uploaded, and
            ``latest`` at the URL is written after every node's upload.
        state: JSON-serialisable trainer state; must hold ``step``.
        extra_files: copied into the checkpoint by rank 0 (config, tokenizer).
        checksums: record each file's sha256 in the manifest as well as its size (state key
            ``files``: :func:`trainer.manifest.checkpoint_files`, which rank 0 lists from its
            node: a URL run's other nodes' shards are not listed).

    Returns:
        the (local) checkpoint folder. Older complete checkpoints beyond ``keep_last`` are
        deleted (at the URL too).
    """
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    tag = tag_for(state["step"])
    # torchrun, srun and Ray Train all set LOCAL_RANK.
    node_main = folder.node_main(rank, int(os.environ.get("LOCAL_RANK", rank)))
    tmp = folder.begin_checkpoint(tag, rank=rank, node_main=node_main)
    distributed.barrier()
    with _storage_full_is_an_error(folder, tmp):
        engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_state_rank{rank}.pt")
    distributed.barrier()
    if rank == 0:
        with _storage_full_is_an_error(folder, tmp):
            for f in extra_files:
                shutil.copy2(f, tmp / f.name)
            files = manifest.checkpoint_files(tmp, checksums=checksums)
            state = {**state, "files": files}
            manifest.write_atomic(tmp / STATE_FILE, json.dumps(state, indent=2))
    final = folder.commit_checkpoint(
        tag, rank=rank, node_main=node_main, keep_last=keep_last, barrier=distributed.barrier
    )
    distributed.barrier()
    return final


FULL_BELOW = 64 * 2**20  # bytes: a failed write with less free space than this was a full disk


@contextlib.contextmanager
def _storage_full_is_an_error(folder: RunFolder, tmp: Path):
    """Turn a write that failed on a full device (``ENOSPC``, or any error while less than
    :data:`FULL_BELOW` bytes are free: ``torch.save`` reports it as a ``RuntimeError``) into a
    :class:`~trainer.errors.StorageFullError` that names the device, the free space and the
    checkpoint a resume takes, after deleting this partial save (its space is needed)."""
    try:
        yield
    except Exception as e:
        try:
            free = shutil.disk_usage(tmp.parent).free
        except OSError:
            free = None
        if getattr(e, "errno", None) != errno.ENOSPC and (free is None or free >= FULL_BELOW):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        newest = folder.latest_tag() if folder.url is None else None
        raise StorageFullError(
            f"no space left to save {tmp.name.removeprefix('.tmp-')} in {tmp.parent} "
            f"({(free or 0) / 2**20:.1f} MiB free; a checkpoint of this run takes "
            f"{_size_of_newest(folder) / 2**20:.1f} MiB). The partial save was deleted"
            + (f"; {newest} is intact and the run resumes from it" if newest else "")
            + ": free space there (or lower checkpoint.keep_last) and run the same command again"
        ) from e


def _size_of_newest(folder: RunFolder) -> int:
    ckpt = folder.latest_checkpoint() if folder.url is None else None
    return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) if ckpt else 0


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints in ``root`` older than the newest ``keep_last`` (and their
    conversions): :func:`trainer.manifest.prune_checkpoints`."""
    manifest.prune_checkpoints(root, keep_last)


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete ``.tmp-*`` folders left by a run that died while saving (rank 0, at start)."""
    return RunFolder(run_dir).remove_partial()


def needs_universal(
    state: dict[str, Any], zero_stage: int, world_size: int, sub_group_size: int | None = None
) -> bool:
    """ZeRO stages 1-3 partition optimizer state by data-parallel rank (ZeRO-3 also by
    sub-group of ``sub_group_size`` elements); loading it on another number of ranks, stage or
    sub-group size goes through DeepSpeed's universal checkpoint format."""
    saved_groups = int(state.get("sub_group_size", DEEPSPEED_SUB_GROUP_SIZE))
    other_groups = zero_stage == 3 and sub_group_size is not None and sub_group_size != saved_groups
    return state["zero_stage"] >= 1 and (
        state["world_size"] != world_size or state["zero_stage"] != zero_stage or other_groups
    )


DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's default, which Kiln used before deriving


def keep_sub_groups(cfg: KilnConfig, state: dict[str, Any]) -> KilnConfig:
    """``cfg`` resuming ``state``'s ZeRO-3 checkpoint with the ``sub_group_size`` it was saved
    with (recorded in the state; DeepSpeed's default for checkpoints that predate the record),
    unless ``parallel.sub_group_size`` is set: ZeRO-3 stores the optimizer state one sub-group
    of a rank's partition at a time, so a checkpoint loads exactly only into the same
    sub-groups (another size set knowingly goes through the universal format:
    :func:`needs_universal`). Other stages have no sub-groups: ``cfg`` is returned as it is."""
    if state.get("zero_stage") != 3 or cfg.parallel.zero_stage != 3:
        return cfg
    if cfg.parallel.sub_group_size is not None:
        return cfg
    saved = int(state.get("sub_group_size", DEEPSPEED_SUB_GROUP_SIZE))
    parallel = cfg.parallel.model_copy(update={"sub_group_size": saved})
    return cfg.model_copy(update={"parallel": parallel})


def check_pipeline_layout(state: dict[str, Any], pipeline_stages: int, world_size: int) -> None:
    """Pipeline checkpoints resume on the layout that wrote them (stage files hold a stage's
    layers and its optimizer shard).

    Raises:
        ValueError: the stage count or world size differs; the message says what to run.
    """
    saved = state.get("pipeline_stages", 1)
    if saved == pipeline_stages == 1:
        return
    if saved != pipeline_stages or state["world_size"] != world_size:
        raise ValueError(
            f"the checkpoint was written by {saved} pipeline stage(s) on {state['world_size']} "
            f"processes; a pipeline checkpoint resumes on the same layout: run with "
            f"parallel.pipeline_stages={saved} on {state['world_size']} processes (its weights "
            f"can be consolidated into the plain model: `kiln checkpoint consolidate`)"
        )


def convert_to_universal(ckpt: Path) -> Path:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format beside it (rank 0 only).

    Runs ``deepspeed.checkpoint.ds_to_universal`` into a temporary folder and renames it to
    ``<ckpt>-universal`` when complete; the trainer files are copied along. Idempotent.

    Raises:
        RuntimeError: the conversion failed (its output is in the message).
    """
    out = ckpt.with_name(ckpt.name + "-universal")
    if (out / STATE_FILE).is_file():
        return out
    tmp = ckpt.with_name(f".tmp-{ckpt.name}-universal")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(ckpt), "--output_folder", str(tmp),
        "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {ckpt}:\n{proc.stdout}\n{proc.stderr}")
    for f in ckpt.iterdir():
        if f.is_file() and not f.name.endswith(".pt"):
            shutil.copy2(f, tmp / f.name)
    for f in ckpt.glob("rng_state_rank*.pt"):
        shutil.copy2(f, tmp / f.name)
    os.replace(tmp, out)
    return out


def load_checkpoint(engine, ckpt: Path, *, rank: int, weight_decays: list[float]) -> dict[str, Any]:
    """Load shards, optimizer and scheduler state into ``engine`` and this rank's RNG state.

    ``weight_decays`` are those of the engine's parameter groups, in order.

    Returns the trainer state saved with it. A rank that did not exist when the checkpoint was
    written (resume on more processes) keeps its freshly seeded RNG.
    """
    path, _ = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt}")
    if ckpt.name.endswith("-universal") and engine.zero_optimization_stage() == 3:
        # DeepSpeed's ZeRO-3 universal loader copies param_groups[0]'s hyperparameters onto every
        # group (runtime/zero/stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3),
        # which would decay the norms from now on; give each group its own weight decay back.
        for group, decay in zip(
            engine.optimizer.optimizer.param_groups, weight_decays, strict=True
        ):
            group["weight_decay"] = decay
    rng_file = ckpt / f"rng_state_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return read_trainer_state(ckpt)


def load_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint, on CPU, in one process.

    Read tensor by tensor (:func:`trainer.consolidate.open_checkpoint`): ZeRO stage 0 from the
    module in ``mp_rank_00_model_states.pt``, stages 1-3 from the fp32 master partitions of every
    rank (the layout DeepSpeed's ``zero_to_fp32`` reads), pipeline checkpoints from their
    per-layer files; so the peak is the model itself, not the files (a ZeRO-0 file also holds the
    optimizer state). Shared parameters (a tied head) are one tensor under both keys.

    Raises:
        FileNotFoundError: a file the checkpoint's layout needs is missing.
        ValueError: the files disagree with each other or are truncated.
    """
    from trainer.consolidate import open_checkpoint

    weights = open_checkpoint(ckpt)
    read: dict[str, torch.Tensor] = {}
    for key in weights.names():
        source = weights.source(key)
        if source not in read:
            read[source] = weights.read(source)
        read[key] = read[source]
    return {key: read[key] for key in weights.names()}
