"""Read a Hugging Face checkpoint folder (as `save_pretrained` writes it, and as Kiln publishes
it) into Kiln's config and state dict, to continue pretraining from it (`model.init_from`).

A folder holds ``config.json`` and either ``model.safetensors`` or ``model.safetensors.index.json``
with its shards (any float dtype; read back as fp32). The key maps are the families' own
(each family spec's `hf` adapter). `transformers` is imported lazily: it is heavy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from model.registry import FAMILIES, ModelConfig, spec

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_hf_model_type(path: str | Path) -> str:
    """The ``model_type`` of ``path/config.json``.

    Raises:
        FileNotFoundError: the folder or its config.json does not exist.
        ValueError: config.json is not a JSON object with a ``model_type``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} holds no {CONFIG_FILE}; is it a Hugging Face model folder?"
        )
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ValueError(f"{file} names no model_type")
    return raw["model_type"]


def load_hf_config(path: str | Path, *, name: str = "custom") -> ModelConfig:
    """Kiln's config of the Hugging Face model in ``path`` (its ``config.json``, read with
    `transformers.AutoConfig` so older formats are upgraded, then the family's
    ``from_hf_config``).

    Raises:
        FileNotFoundError: the folder or its config.json does not exist.
        ValueError: a ``model_type`` other than llama or t5, or a feature Kiln does not implement
            (the message names it).
    """
    model_type = read_hf_model_type(path)
    if model_type not in FAMILIES:
        raise ValueError(
            f"{Path(path) / CONFIG_FILE} has model_type={model_type!r}; Kiln continues "
            f"pretraining {sorted(FAMILIES)} models only"
        )
    import transformers

    hf_cfg = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    return FAMILIES[model_type].hf.from_hf_config(hf_cfg, name=name)


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files holding the weights of ``path``: the single ``model.safetensors``,
    or the shards the index names (sorted); empty when the folder has neither."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        return [path / f for f in sorted(set(_weight_map(path).values()))]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    return []


def _weight_map(path: Path) -> dict[str, str]:
    index = json.loads((path / INDEX_FILE).read_text())
    if not isinstance(index.get("weight_map"), dict):
        raise ValueError(f"{path / INDEX_FILE} has no weight_map")
    return index["weight_map"]


def _present_weight_files(path: Path) -> list[Path]:
    """:func:`weight_files` of ``path``, every one of them present.

    Raises:
        FileNotFoundError: no weights in ``path``, or a shard the index names is missing.
    """
    files = weight_files(path)
    if not files:
        raise FileNotFoundError(
            f"{path} holds no {WEIGHTS_FILE} or {INDEX_FILE}; save the model with "
            f"`save_pretrained` (safetensors) first"
        )
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{path / INDEX_FILE} names shard {file.name}, missing")
    return files


def load_hf_weights(path: str | Path, cfg: ModelConfig) -> dict[str, Tensor]:
    """The weights of the Hugging Face checkpoint in ``path`` as Kiln's fp32 state dict of
    ``cfg``, loadable with ``load_state_dict(strict=True)`` (a tied head is the embedding tensor).

    Reads ``model.safetensors``, or every shard ``model.safetensors.index.json`` maps a key to
    (a key is taken from the shard the index names); floating tensors are upcast to fp32.

    Raises:
        FileNotFoundError: no weights in ``path``, or a shard the index names is missing.
        ValueError: the index names a key its shard lacks; keys missing or unexpected for
            ``cfg`` (both lists in the message).
    """
    path = Path(path)
    files = _present_weight_files(path)
    weight_map = _weight_map(path) if (path / INDEX_FILE).is_file() else None
    sd: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = f.keys()
            if weight_map is not None:
                wanted = [k for k, shard in weight_map.items() if shard == file.name]
                lacking = sorted(set(wanted) - set(keys))
                if lacking:
                    raise ValueError(f"{file} lacks {lacking[:5]} that {INDEX_FILE} maps to it")
                keys = wanted
            for key in keys:
                t = f.get_tensor(key)
                sd[key] = t.to(torch.float32) if t.is_floating_point() else t
    return spec(cfg).hf.from_hf_state_dict(sd, cfg)


class HFWeightReader:
    """The weights of the Hugging Face checkpoint in ``path`` as a `model.init.Source`: called
    with one of Kiln's parameter names (``cfg``'s keys) and an element range, it reads from the
    safetensors shards only the rows of that tensor the range covers (``safe_open`` +
    ``get_slice``: the file is memory-mapped, only the sliced bytes are read and copied) and
    returns them flattened, upcast to fp32. A ZeRO-3 rank reads its partition, a pipeline stage
    its layers' tensors; no rank holds a full copy of the checkpoint.

    ``reads`` records every read as ``(HF key, first element, stop element)`` of the flattened
    tensor (whole rows: at most one partial row either side of the range asked for).

    Raises (on construction):
        FileNotFoundError: no weights in ``path``, or a shard the index names is missing.
        ValueError: keys missing or unexpected for ``cfg`` (both lists in the message).
    """

    def __init__(self, path: str | Path, cfg: ModelConfig) -> None:
        path = Path(path)
        files = _present_weight_files(path)
        if (path / INDEX_FILE).is_file():
            self._file = {k: path / shard for k, shard in _weight_map(path).items()}
        else:
            with safe_open(str(files[0]), framework="pt") as f:  # reads the header only
                self._file = dict.fromkeys(f.keys(), files[0])
        family = spec(cfg).hf
        family.from_hf_state_dict(dict.fromkeys(self._file), cfg)  # the key check, its message
        self._hf_key = dict(family.key_pairs(cfg))
        self.path = path
        self.reads: list[tuple[str, int, int]] = []

    def __call__(self, name: str, shape: torch.Size, start: int, stop: int) -> Tensor:
        """Elements ``[start, stop)`` of Kiln parameter ``name`` (full shape ``shape``),
        flattened: a 1-D fp32 CPU tensor of ``stop - start`` elements.

        Raises:
            KeyError: ``name`` is not a parameter of the config.
            ValueError: the tensor's shape in the file is not ``shape``; the index maps the key
                to a shard that lacks it.
        """
        hf_key = self._hf_key[name]
        if start >= stop:
            return torch.empty(0, dtype=torch.float32)
        file = self._file[hf_key]
        with safe_open(str(file), framework="pt") as f:
            present = f.keys()  # a list: a safetensors handle has no `in`
            if hf_key not in present:
                raise ValueError(f"{file} lacks {hf_key!r} that {INDEX_FILE} maps to it")
            piece = f.get_slice(hf_key)
            if tuple(piece.get_shape()) != tuple(shape):
                raise ValueError(
                    f"{hf_key} in {file} has shape {tuple(piece.get_shape())}; the model's "
                    f"{name} has {tuple(shape)}"
                )
            if len(shape) == 0:
                rows, row = f.get_tensor(hf_key).reshape(1), 1
                first = 0
            else:
                row = math.prod(shape[1:])
                first, last = start // row, -(-stop // row)  # the rows the range touches
                rows = piece[first:last].reshape(-1)
        self.reads.append((hf_key, first * row, first * row + rows.numel()))
        values = rows[start - first * row : stop - first * row]
        return values.to(torch.float32) if values.dtype != torch.float32 else values.clone()
