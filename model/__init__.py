"""Kiln model architectures in plain PyTorch (no deepspeed, torch.distributed or ray)."""

from __future__ import annotations

import torch

from model.config import LlamaConfig, ModelConfig, T5Config
from model.generate import generate
from model.llama import LlamaForCausalLM
from model.presets import get_preset, model_types, preset_names
from model.t5 import T5ForConditionalGeneration

MODEL_CLASSES = {"llama": LlamaForCausalLM, "t5": T5ForConditionalGeneration}


def model_class(cfg: ModelConfig) -> type[LlamaForCausalLM | T5ForConditionalGeneration]:
    """The module class of ``cfg.model_type``."""
    return MODEL_CLASSES[cfg.model_type]


def build_model(
    cfg: ModelConfig,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM | T5ForConditionalGeneration:
    """Build, materialise on ``device`` and initialise from ``seed`` the model of ``cfg``."""
    return model_class(cfg).from_config(cfg, seed=seed, device=device, dtype=dtype)


__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "ModelConfig",
    "T5Config",
    "T5ForConditionalGeneration",
    "build_model",
    "generate",
    "get_preset",
    "model_class",
    "model_types",
    "preset_names",
]
