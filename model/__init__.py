"""Kiln model architectures in plain PyTorch (no deepspeed, torch.distributed or ray)."""

from model.config import LlamaConfig
from model.generate import generate
from model.llama import LlamaForCausalLM
from model.presets import get_preset, preset_names

__all__ = ["LlamaConfig", "LlamaForCausalLM", "generate", "get_preset", "preset_names"]
