"""Load a trained model from a run folder for generation, in one process, on CPU or one GPU."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model import spec
from model.tokenizer import Tokenizer
from trainer import checkpoint
from trainer.config import config_from_dict
from trainer.storage import RunFolder


def load_run(
    run_dir: str | Path, *, step: int | None = None, device: str = "cpu"
) -> tuple[nn.Module, Tokenizer]:
    """The model (fp32, eval mode) and tokenizer of a run's latest checkpoint (or ``step``).

    ``run_dir`` may be an fsspec URL: the checkpoint is downloaded into its local mirror first.

    Raises:
        FileNotFoundError: the run has no (such) complete checkpoint.
    """
    ckpt = RunFolder(run_dir).checkpoint(step)
    cfg = config_from_dict(checkpoint.read_trainer_state(ckpt)["config"])
    with torch.device("meta"):
        model = spec(cfg.model).model_class(cfg.derived.model)
    model.to_empty(device=device)
    model.init_weights(seed=0)  # fills buffers (RoPE); the weights are replaced below
    weights = checkpoint.load_model_weights(ckpt)
    model.load_state_dict(weights, strict=False)
    missing = {name for name, _ in model.named_parameters()} - set(weights)  # tied: listed once
    if missing:
        raise ValueError(f"{ckpt} lacks weights for {sorted(missing)[:5]}")
    return model.eval(), Tokenizer.load(ckpt / "tokenizer.model")
