"""Unit tests of the pieces around the engine: learning-rate schedules, the DeepSpeed config,
checkpoint bookkeeping (latest, pruning, partial folders) and the FLOPs / MFU arithmetic."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from model.registry import get_preset
from trainer import checkpoint
from trainer.config import batch_plan, load_config
from trainer.engine import deepspeed_config, lr_lambda
from trainer.estimate import flops_per_token
from trainer.storage import RunFolder


def cfg_with(*overrides):
    return load_config(None, ["tokenizer.vocab_size=512", *overrides])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedules(schedule):
    cfg = cfg_with(
        f"train.lr_schedule={schedule}",
        "train.lr=1e-3",
        "train.min_lr=1e-4",
        "train.warmup_steps=10",
        "train.max_steps=110",
    )
    f = lr_lambda(cfg.train)
    lrs = [1e-3 * f(step) for step in range(111)]
    assert lrs[0] == pytest.approx(1e-4)  # first warmup step: lr / warmup_steps
    assert lrs[9] == pytest.approx(1e-3)  # end of warmup
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))
    if schedule == "constant":
        assert lrs[110] == pytest.approx(1e-3)
        return
    assert lrs[110] == pytest.approx(1e-4)  # decayed to min_lr at max_steps
    assert all(a >= b - 1e-15 for a, b in itertools.pairwise(lrs[10:]))
    midpoint = 1e-4 + 0.5 * (1e-3 - 1e-4)  # both schedules cross half way at mid-decay
    assert lrs[60] == pytest.approx(midpoint)
    if schedule == "cosine":
        assert lrs[35] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_deepspeed_config_follows_the_config():
    cfg = cfg_with(
        "parallel.zero_stage=3",
        "parallel.offload_optimizer=true",
        "parallel.offload_params=true",
        "train.precision=bf16",
        "train.micro_batch_size=2",
        "train.global_batch_size=16",
        "train.grad_clip=0.5",
    )
    ds = deepspeed_config(cfg, batch_plan(cfg, 4), on_gpu=True)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed CPUAdam when offloading
    fp16 = deepspeed_config(cfg_with("train.precision=fp16"), batch_plan(cfg, 1), on_gpu=False)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert fp16["optimizer"]["params"]["torch_adam"] is True


def _fake_checkpoint(root, step):
    d = root / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    return d


def test_latest_prune_and_partial(tmp_path):
    root = RunFolder(tmp_path).checkpoints
    assert checkpoint.latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40):
        _fake_checkpoint(root, step)
    (root / "step-00000020-universal").mkdir()
    (root / ".tmp-step-00000050").mkdir()  # a save that died half-way
    (root / "latest").write_text(checkpoint.tag_for(40))
    assert checkpoint.latest_checkpoint(tmp_path) == root / "step-00000040"
    checkpoint.prune(root, keep_last=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000030", "step-00000040"]
    assert checkpoint.remove_partial(tmp_path) == [root / ".tmp-step-00000050"]
    assert not (root / ".tmp-step-00000050").exists()
    (root / "latest").write_text(checkpoint.tag_for(50))  # names an incomplete checkpoint
    assert checkpoint.latest_checkpoint(tmp_path) == root / "step-00000040"


def test_needs_universal():
    state = {"zero_stage": 2, "world_size": 2}
    assert checkpoint.needs_universal(state, zero_stage=2, world_size=1)
    assert not checkpoint.needs_universal(state, zero_stage=2, world_size=2)
    assert not checkpoint.needs_universal({"zero_stage": 0, "world_size": 2}, 0, 1)


def test_flops_per_token_matches_palm_formula():
    m = get_preset("7b").model_copy(update={"vocab_size": 32000})
    n = m.num_parameters(exclude_input_embedding=True)
    assert n == m.num_parameters() - 32000 * 4096  # untied: the lookup table does no matmul
    cfg = load_config(None, ["model.name=7b", "model.vocab_size=32000", "data.seq_len=2048"])
    assert cfg.model == m
    assert flops_per_token(cfg) == 6 * n + 12 * 32 * 4096 * 2048
