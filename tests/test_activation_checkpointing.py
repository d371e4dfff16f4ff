"""Selective activation checkpointing (`train.activation_checkpointing`: none / full /
attention / mlp, `train.activation_checkpointing_every`): each choice stores less than none and
recomputes exactly (same loss and gradients, both families); the config keeps true / false and
refuses choices that do nothing; the dry-run estimate counts each choice; training with the
choices under ZeRO-3 and with 2 pipeline stages on 2 gloo processes gives the losses of no
checkpointing (resume with the options on: `test_chunked_loss`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import step_losses, t5_sections, train_config
from distributed import run_distributed, train_runs
from test_chunked_loss import PIPE, ZERO3, loss_and_grads, model_case
from torch.autograd.graph import saved_tensors_hooks

from model.family import ActivationStack
from trainer.config import ConfigError, load_config
from trainer.engine import apply_activation_checkpointing, checkpointed_blocks
from trainer.estimate import activation_bytes
from trainer.objectives import token_loss

CHOICES = [("full", 1), ("full", 2), ("attention", 1), ("mlp", 1), ("mlp", 2)]


def saved_bytes(model, kwargs) -> int:
    """Bytes autograd keeps for backward in one forward, outside the checkpointed regions (the
    tensors a checkpoint recomputes are not kept)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model(**kwargs)
    return total


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_each_choice_stores_less_and_recomputes_exactly(family):
    model, kwargs, _, labels = model_case(family, tie=False)
    want, want_grads = loss_and_grads(model, lambda: token_loss(model(**kwargs), labels))
    stored = {"none": saved_bytes(model, kwargs)}
    for mode, every in CHOICES:
        checkpointed, *_ = model_case(family, tie=False)
        apply_activation_checkpointing(checkpointed, mode, every)
        stored[mode, every] = saved_bytes(checkpointed, kwargs)
        got, got_grads = loss_and_grads(
            checkpointed, lambda m=checkpointed: token_loss(m(**kwargs), labels)
        )
        assert torch.equal(got, want), (mode, every)
        for name, grad in want_grads.items():
            assert torch.equal(got_grads[name], grad), (mode, every, name)
    none = stored["none"]
    assert stored["full", 1] < stored["full", 2] < none
    for sublayer in ("attention", "mlp"):  # which frees more depends on the family's shape
        assert stored["full", 1] < stored[sublayer, 1] < none
    assert stored["mlp", 1] < stored["mlp", 2] < none


def test_every_k_counts_blocks_from_one():
    assert checkpointed_blocks(4, 1) == [0, 1, 2, 3]
    assert checkpointed_blocks(5, 2) == [1, 3]
    assert checkpointed_blocks(4, 3) == [2]


def test_config_keeps_booleans_and_refuses_choices_that_do_nothing():
    cfg = load_config(None, ["train.activation_checkpointing=true"])
    assert cfg.train.activation_checkpointing == "full"
    cfg = load_config(None, ["train.activation_checkpointing=false"])
    assert cfg.train.activation_checkpointing == "none"
    cfg = load_config(None, ["train.activation_checkpointing=mlp"])
    assert cfg.train.activation_checkpointing == "mlp"
    with pytest.raises(ConfigError, match="does nothing with"):
        load_config(None, ["train.activation_checkpointing_every=2"])
    with pytest.raises(ConfigError, match="exceeds the model's 2 transformer blocks"):
        load_config(
            None, ["train.activation_checkpointing=full", "train.activation_checkpointing_every=3"]
        )
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_config(None, ["train.activation_checkpointing=selective"])


def test_estimate_counts_each_choice():
    """Korthikanti et al. 2022's counts: a block keeps 34 x D 16-bit values per token; full
    keeps its input (2), attention frees 9 per attention sublayer, mlp 17; plus one recomputed
    unit during backward."""
    stack = ActivationStack(num_blocks=4, seq_len=8, d_model=16, values_per_token=34)
    unit = 8 * 16  # tokens x D, at 2 bytes: "one value per token"
    got = {
        (mode, every): activation_bytes([stack], 1, 2, mode, every) / unit
        for mode, every in [("none", 1), *CHOICES]
    }
    assert got["none", 1] == 4 * 34
    assert got["full", 1] == 4 * 2 + 34
    assert got["full", 2] == 2 * 34 + 2 * 2 + 34
    assert got["attention", 1] == 4 * (34 - 9) + 11
    assert got["mlp", 1] == 4 * (34 - 17) + 19
    assert got["mlp", 2] == 2 * 34 + 2 * 17 + 19
    cross = ActivationStack(num_blocks=2, seq_len=8, d_model=16, values_per_token=51)
    assert activation_bytes([cross], 1, 2, "attention") / unit == 2 * (51 - 18) + 11


def test_dry_run_names_the_activation_options(prepared_data, tmp_path):
    """The dry-run's activations line says which choice (and the chunked loss, compilation) its
    figure assumes; a plain run's line says nothing."""
    from launcher.report import memory_lines
    from trainer.config import batch_plan

    def line(**train) -> str:
        sections = {f"train__{k}": v for k, v in train.items()}
        cfg = load_config(train_config(tmp_path, prepared_data, **sections))
        lines = memory_lines(cfg, batch_plan(cfg, 1), on_gpu=False)
        return next(x for x in lines if x.startswith("activations:"))

    assert line().endswith("GiB")
    assert line(activation_checkpointing="mlp", activation_checkpointing_every=2).endswith(
        "(checkpointing mlp of blocks 2, 4, ...)"
    )
    assert line(activation_checkpointing=True, loss_chunk_tokens=256, compile=True).endswith(
        "(checkpointing full of every block; loss in chunks of 256 tokens; compiled blocks)"
    )


# name -> (family, layout, activation_checkpointing, activation_checkpointing_every)
CHECKPOINTED = {
    "zero3-mlp": ("llama", ZERO3, "mlp", 1),
    "zero3-full-every2": ("llama", ZERO3, "full", 2),
    "llama-pipe-attention": ("llama", PIPE, "attention", 1),
    "t5-pipe-full-every2": ("t5", PIPE, "full", 2),
}


@pytest.fixture(scope="module")
def checkpointed_runs(prepared_data, prepared_t5_data, tmp_path_factory) -> dict[str, Path]:
    """The runs of :data:`CHECKPOINTED` on 2 processes (one worker start-up)."""
    configs = []
    for name, (family, layout, mode, every) in CHECKPOINTED.items():
        data, extra = (
            (prepared_data, {}) if family == "llama" else (prepared_t5_data, t5_sections())
        )
        configs.append(
            train_config(
                tmp_path_factory.mktemp(name),
                data,
                train__activation_checkpointing=mode,
                train__activation_checkpointing_every=every,
                **layout,
                **extra,
            )
        )
    return dict(zip(CHECKPOINTED, run_distributed(train_runs, 2, *configs)[0], strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_checkpointed_training_gives_the_losses_of_none(
    checkpointed_runs, zero_runs, pipeline_runs, name
):
    """Recomputation is exact: the same losses as the run without checkpointing, under ZeRO-3
    and with 2 pipeline stages."""
    family, layout, *_ = CHECKPOINTED[name]
    reference = zero_runs[3] if layout is ZERO3 else pipeline_runs[f"{family}-pipe"]
    want, got = step_losses(reference), step_losses(checkpointed_runs[name])
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=1e-6), (s, got[s], want[s])
