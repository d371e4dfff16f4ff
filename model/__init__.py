"""Kiln model architectures in plain PyTorch (no deepspeed, torch.distributed or ray).

One folder per family (`model/llama/`, `model/t5/`), each with a `FamilySpec`; `model.registry`
maps ``model_type`` to it. Shared here: blocks (`model.layers`), the tokenizer and its Hugging
Face export, generation, reading Hugging Face folders.
"""

from __future__ import annotations

import torch
from torch import nn

from model.registry import ModelConfig, family, get_preset, model_types, preset_names, spec


def build_model(
    cfg: ModelConfig,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build, materialise on ``device`` and initialise from ``seed`` the model of ``cfg``."""
    return spec(cfg).model_class.from_config(cfg, seed=seed, device=device, dtype=dtype)


__all__ = [
    "ModelConfig",
    "build_model",
    "family",
    "get_preset",
    "model_types",
    "preset_names",
    "spec",
]
