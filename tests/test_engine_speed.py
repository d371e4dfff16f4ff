"""The engine's per-step costs: torch's fused AdamW, the gradient norm computed once under ZeRO-0
fp32 (the loop clips, DeepSpeed does not clip again), no DeepSpeed throughput timer (a device
sync per micro-batch on a GPU), the loss compiled with ``train.compile``, and the same
optimisation as the plain loop of bench/throughput.py (same losses and weights within fp32
rounding)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from trainer.config import batch_plan, load_config
from trainer.engine import deepspeed_config, loop_clips_gradients
from trainer.objectives import token_loss

# Kiln against the plain loop after STEPS steps with clipping active: fused against unfused
# AdamW and torch's norm against DeepSpeed's order of sums differ in the last bits only.
STEPS = 3
ATOL = 1e-6


def cfg_with(*overrides):
    return load_config(None, ["tokenizer.vocab_size=512", *overrides])


def test_deepspeed_config_fused_adamw_no_second_clip_no_throughput_timer():
    cfg = cfg_with("train.grad_clip=0.5")
    ds = deepspeed_config(cfg, batch_plan(cfg, 1), on_gpu=False)
    assert ds["optimizer"]["params"]["fused"] is True
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["timers"] == {"throughput": {"enabled": False}}
    assert loop_clips_gradients(cfg, batch_plan(cfg, 1))
    assert ds["gradient_clipping"] == 0.0  # the loop clips ZeRO-0 fp32
    for overrides in (["parallel.zero_stage=1"], ["train.precision=bf16"]):
        other = cfg_with("train.grad_clip=0.5", *overrides)
        assert not loop_clips_gradients(other, batch_plan(other, 1))
        assert (
            deepspeed_config(other, batch_plan(other, 1), on_gpu=False)["gradient_clipping"] == 0.5
        )
    pipe = cfg_with("train.grad_clip=0.5", "parallel.pipeline_stages=2")
    assert deepspeed_config(pipe, batch_plan(pipe, 2), on_gpu=False)["gradient_clipping"] == 0.5
    offload = cfg_with("parallel.zero_stage=2", "parallel.offload_optimizer=true")
    params = deepspeed_config(offload, batch_plan(offload, 1), on_gpu=True)["optimizer"]["params"]
    assert "fused" not in params and params["torch_adam"] is False  # DeepSpeed's CPUAdam


def _kiln_and_plain_steps() -> dict:
    """STEPS steps of Kiln (ZeRO-0 fp32, one process) and of bench/throughput.py's plain loop on
    the same model, batches and settings, with clipping active at every step; counts the
    gradient-norm computations of Kiln's steps."""
    from unittest import mock

    import deepspeed.runtime.engine as ds_engine

    from bench.throughput import PlainLoop, SyntheticTokens
    from model import build_model
    from trainer.distributed import World
    from trainer.engine import build_engine
    from trainer.loop import Trainer

    cfg = cfg_with(
        "model.name=debug",
        "data.seq_len=32",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",  # 2 micro-batches per step
        "train.grad_clip=0.05",
        "train.lr=1e-3",
        "train.warmup_steps=1",
    )
    plan = batch_plan(cfg, 1)
    data = SyntheticTokens(cfg, plan.seq_len, plan.global_batch_size * STEPS)
    engine = build_engine(cfg, build_model(cfg.derived.model, seed=0), plan)
    world = World(
        rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu")
    )
    ones = torch.ones(cfg.derived.model.vocab_size).numpy()
    trainer = Trainer(cfg, engine, plan, world, data, token_bytes=ones, peak_flops=1.0)
    plain_model = build_model(cfg.derived.model, seed=0)
    plain = PlainLoop(cfg, plain_model, plan, data)
    get_total_norm = torch.nn.utils.get_total_norm
    with (
        mock.patch.object(torch.nn.utils, "get_total_norm", wraps=get_total_norm) as torch_norm,
        mock.patch.object(ds_engine, "clip_grad_norm_", wraps=ds_engine.clip_grad_norm_) as ds_clip,
    ):
        kiln_losses = [trainer.train_step().item() for _ in range(STEPS)]
    norms = torch_norm.call_count
    plain_losses = [plain.train_step().item() for _ in range(STEPS)]
    grad_norm = float(trainer._grad_norm)
    compiled = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": True})})
    other = build_engine(compiled, build_model(compiled.derived.model, seed=0), plan)
    loss = Trainer(compiled, other, plan, world, data, token_bytes=ones, peak_flops=1.0).token_loss
    return {
        "compiled_loss": getattr(loss, "_torchdynamo_orig_callable", None),
        "eager_loss": trainer.token_loss,
        "optimizer": type(engine.optimizer).__name__,
        "fused": [g["fused"] for g in engine.optimizer.param_groups],
        "timer_enabled": engine.tput_timer.config.enabled,
        "norms": norms,
        "ds_clips": ds_clip.call_count,
        "grad_norm": grad_norm,
        "kiln_losses": kiln_losses,
        "plain_losses": plain_losses,
        "kiln": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
        "plain": {k: v.detach().clone() for k, v in plain_model.state_dict().items()},
    }


def test_zero0_fp32_computes_the_grad_norm_once_and_trains_as_the_plain_loop():
    (got,) = run_distributed(_kiln_and_plain_steps, 1)
    assert got["optimizer"] == "AdamW" and got["fused"] == [True, True]
    # train.compile compiles the loss beside the blocks; eager runs keep the plain function
    assert got["compiled_loss"] is token_loss and got["eager_loss"] is token_loss
    assert got["timer_enabled"] is False
    assert got["norms"] == STEPS  # one norm per step, by the loop
    assert got["ds_clips"] == 0  # DeepSpeed's own clip (a second norm) never runs
    assert got["grad_norm"] > 0.05  # the clip was active: the norms exceed train.grad_clip
    assert got["kiln_losses"] == pytest.approx(got["plain_losses"], abs=ATOL)
    assert got["kiln"].keys() == got["plain"].keys()
    for key, value in got["kiln"].items():
        torch.testing.assert_close(value, got["plain"][key], atol=ATOL, rtol=0, msg=key)
