"""What a run was started with, so that a resume continues the same run or says what changed.

Every checkpoint's ``trainer_state.json`` holds the run's fingerprint (:func:`run_fingerprint`):
a flat mapping from a setting's config name to its value, for the settings a resume must not
change without the user knowing:

- the model's shape (``model.*`` of the derived model section, vocabulary included; the
  informational ``name`` and ``init_from``, which a resume ignores, are left out);
- ``data.seq_len``, ``data.seed`` (the sample order), each dataset's ``weight`` and a digest of its
  prepared shards (``data.datasets.NAME.shards``: the sha256 of the manifest's shard checksums
  and sequence counts, so a dataset prepared again from other sources differs);
- the tokenizer file's sha256 (``tokenizer.sha256``);
- the learning-rate schedule (``train.max_steps``, ``lr``, ``min_lr``, ``lr_schedule``,
  ``warmup_steps``) and the objective mixture (``objective.mixture``).

The batch size is not in it: the data cursor already refuses a global batch that cannot
continue exactly (:meth:`trainer.loop.Trainer.load`). The launchers compare the newest
checkpoint's fingerprint with the new config's before any process starts
(:func:`launcher.preflight.check_resume`) and refuse a difference unless the user passes
``--accept-changes``; the checkpoints written after that hold the new fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from trainer.config import KilnConfig
from trainer.data.dataset import MANIFEST_FILE
from trainer.data.shards import file_sha256

SCHEDULE = ("max_steps", "lr", "min_lr", "lr_schedule", "warmup_steps")
_NOT_COMPARED = ("name", "init_from")  # informational, or read only when a run starts

Fingerprint = dict[str, Any]


def run_fingerprint(cfg: KilnConfig) -> Fingerprint:
    """The fingerprint of the run ``cfg`` describes, from its config, its tokenizer file and the
    manifests of its prepared datasets (a missing tokenizer or dataset is left out: a dry run
    before preparation compares what exists).

    Returns:
        ``{config name: JSON value}``, e.g. ``{"model.hidden_size": 64, "train.max_steps": 8,
        "tokenizer.sha256": "ab12...", "data.datasets.shakespeare.shards": "cd34..."}``.
    """
    model = cfg.derived.model.model_dump(mode="json", exclude=set(_NOT_COMPARED))
    fp: Fingerprint = {f"model.{k}": v for k, v in model.items()}
    fp["data.seq_len"] = cfg.data.seq_len
    fp["data.seed"] = cfg.data.seed
    for d in cfg.data.datasets:
        fp[f"data.datasets.{d.name}.weight"] = d.weight
        manifest = cfg.dataset_dir(d.name) / MANIFEST_FILE
        if manifest.is_file():
            fp[f"data.datasets.{d.name}.shards"] = shards_digest(json.loads(manifest.read_text()))
    if cfg.tokenizer_path.is_file():
        fp["tokenizer.sha256"] = file_sha256(cfg.tokenizer_path)
    for k in SCHEDULE:
        fp[f"train.{k}"] = getattr(cfg.train, k)
    fp["objective.mixture"] = [o.model_dump(mode="json") for o in cfg.derived.objectives]
    return fp


def shards_digest(manifest: dict[str, Any]) -> str:
    """sha256 (hex) over a prepared dataset's splits: each shard's file name, sequence count and
    sha256 as the manifest records them (the shards themselves are hashed against the manifest
    by :func:`trainer.data.dataset.verify_shards`)."""
    h = hashlib.sha256()
    for split in sorted(manifest["splits"]):
        for shard in manifest["splits"][split]["shards"]:
            h.update(f"{split}/{shard['file']}:{shard['sequences']}:{shard['sha256']}\n".encode())
    return h.hexdigest()


def differences(saved: Fingerprint, now: Fingerprint) -> list[str]:
    """The settings that differ between a checkpoint's fingerprint and the new run's, one line
    each (``train.max_steps: 8 -> 12``). Of the settings only one side records, a dataset's
    weight counts (the dataset was added or removed); the others are what a dry run before
    preparation cannot read yet (the tokenizer's sha256, a dataset's shards) and are left out."""
    lines = []
    for key in sorted(saved.keys() | now.keys()):
        if key in saved and key in now:
            if saved[key] != now[key]:
                lines.append(f"{key}: {_show(key, saved[key])} -> {_show(key, now[key])}")
        elif key.startswith("data.datasets.") and key.endswith(".weight"):
            name = key.removeprefix("data.datasets.").removesuffix(".weight")
            lines.append(f"data.datasets: {name} {'removed' if key in saved else 'added'}")
    return lines


def _show(key: str, value: Any) -> str:
    if key.endswith((".sha256", ".shards")) and isinstance(value, str):
        return value[:12]
    if key == "objective.mixture":
        return ", ".join(f"{o['type']} x{o['weight']:g}" for o in value)
    return json.dumps(value)
