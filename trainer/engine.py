"""Turn a plain PyTorch model into a DeepSpeed engine, in one function.

The model knows nothing of DeepSpeed; everything parallel (ZeRO stage, offload, precision,
accumulation, clipping) is decided here from the config.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from trainer.config import BatchPlan, KilnConfig, TrainConfig
from trainer.objectives import token_loss


def lr_lambda(t: TrainConfig):
    """Learning-rate multiplier per optimizer step: linear warmup from 0, then cosine, linear or
    constant decay from ``t.lr`` to ``t.min_lr`` at ``t.max_steps`` (cosine as in Loshchilov &
    Hutter 2017, SGDR, without restarts). Returns a function ``step -> factor`` for ``LambdaLR``."""
    floor = t.min_lr / t.lr

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        if t.lr_schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * decay

    return factor


def deepspeed_config(
    cfg: KilnConfig, plan: BatchPlan, *, on_gpu: bool, load_universal: bool = False
) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (see deepspeed.ai/docs/config-json).

    ZeRO's bucket, prefetch and live-parameter sizes come from
    :func:`trainer.estimate.ds_memory_settings` (derived from the model, or as set in
    ``parallel``), so the run allocates what ``--dry-run`` planned. Offload goes to
    ``parallel.offload_device``: host memory (pinned on a GPU), or with ``nvme`` to swap files
    under ``parallel.nvme_path`` (ZeRO-Infinity; the pre-flight's
    :func:`launcher.preflight.check_nvme_offload` refuses it where DeepSpeed's aio op cannot be
    built).
    """
    from trainer.estimate import ds_memory_settings

    t, p = cfg.train, cfg.parallel
    # torch's AdamW needs no compiled op; DeepSpeed's CPUAdam is much faster when the optimizer
    # is offloaded from a GPU, so it is used there (it builds on first use).
    cpu_adam = on_gpu and p.offload_optimizer
    # Kiln clips where it measures the norm anyway (ZeRO-0 fp32, Trainer._clip_gradients); the
    # engine would compute the same norm a second time.
    clip = 0.0 if loop_clips_gradients(cfg, plan) else t.grad_clip
    settings = ds_memory_settings(cfg)
    zero: dict[str, Any] = {"stage": p.zero_stage, **settings.zero_config(p.zero_stage)}
    offload: dict[str, Any] = {"device": p.offload_device, "pin_memory": on_gpu}
    if p.offload_device == "nvme":
        offload["nvme_path"] = p.nvme_path
    if p.offload_optimizer:
        zero["offload_optimizer"] = dict(offload)
    if p.offload_params:
        zero["offload_param"] = dict(offload)
        if p.offload_device == "nvme":
            zero["offload_param"]["buffer_size"] = settings.param_swap_buffer_size
            zero["offload_param"]["max_in_cpu"] = settings.stage3_max_live_parameters
    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.adam_beta1, t.adam_beta2],
                "eps": t.adam_eps,
                "weight_decay": t.weight_decay,
                "torch_adam": not cpu_adam,
                **({} if cpu_adam else {"fused": True}),  # torch's one-kernel AdamW
            },
        },
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        # DeepSpeed's samples/s timer synchronizes the device at every forward and step (a host
        # sync per micro-batch on a GPU) for a log line Kiln never prints (its own throughput is
        # measured over the logging window, trainer.loop.Trainer._train_metrics).
        "timers": {"throughput": {"enabled": False}},
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if p.offload_device == "nvme":
        # DeepSpeed's async I/O defaults (deepspeed.ai/docs/config-json/#asynchronous-io), spelled
        # out so the run's config shows them.
        ds["aio"] = {
            "block_size": 1048576,
            "queue_depth": 8,
            "intra_op_parallelism": 1,
            "single_submit": False,
            "overlap_events": True,
        }
    return ds


def loop_clips_gradients(cfg: KilnConfig, plan: BatchPlan) -> bool:
    """Whether the training loop, not DeepSpeed, clips the gradients: ZeRO-0 in fp32 without a
    pipeline, where DeepSpeed's engine clips with a per-parameter Python loop and reports no norm,
    while the loop needs the norm for its metrics and the health supervisor. There
    :meth:`trainer.loop.Trainer._clip_gradients` computes the norm once (``torch.nn.utils``'
    multi-tensor kernels) and clips with it, the same formula as DeepSpeed's
    (``max_norm / (norm + 1e-6)``, at most 1), and DeepSpeed's ``gradient_clipping`` is 0.
    Elsewhere DeepSpeed's ZeRO, bf16 / fp16 and pipeline optimizers compute the norm (they
    report it) and clip."""
    return (
        cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32" and plan.pipeline_stages == 1
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not norms or other 1-D tensors (the GPT-3 / Llama practice).
    Tied weights appear once. A ZeRO-3 partitioned parameter counts by its full shape
    (``ds_shape``; its ``data`` is an empty 1-D tensor between uses)."""
    decay, no_decay = [], []
    for p in dict.fromkeys(model.parameters()):  # unique, in order
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    decays = group_weight_decays(weight_decay)
    return [
        {"params": decay, "weight_decay": decays[0]},
        {"params": no_decay, "weight_decay": decays[1]},
    ]


def group_weight_decays(weight_decay: float) -> list[float]:
    """Weight decay of each group :func:`param_groups` makes, in order (matrices, the rest)."""
    return [weight_decay, 0.0]


# The sublayers each selective choice recomputes, by the blocks' child names (Hugging Face's,
# shared by the families: Llama's self_attn / mlp, T5's self_attn / cross_attn / mlp).
SUBLAYERS = {"attention": ("self_attn", "cross_attn"), "mlp": ("mlp",)}


def checkpointed_blocks(num_blocks: int, every: int) -> list[int]:
    """Indices (from 0) of the blocks that activation checkpointing wraps: every ``every``-th,
    counted from 1 (blocks k, 2k, ...; torchtitan's ``selective_ac_option`` = k)."""
    return [i for i in range(num_blocks) if (i + 1) % every == 0]


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every: int = 1) -> None:
    """Recompute parts of ``model.blocks()`` in backward instead of storing their activations
    (Chen et al. 2016, "Training deep nets with sublinear memory cost"; Korthikanti et al. 2022
    for recomputing parts of a block).

    Args:
        model: a plain model (its ``blocks()``; a pipeline's pieces call these same modules, so
            applying this before the cut checkpoints the pipeline's blocks alike).
        mode: ``"full"``: each chosen block keeps only its input; ``"attention"`` / ``"mlp"``:
            only that sublayer of each chosen block (self- and cross-attention of a T5 decoder
            block) is recomputed, keeping its input, the norm's output; ``"none"``: nothing.
        every: checkpoint blocks k, 2k, ... (:func:`checkpointed_blocks`).

    Only ``forward`` attributes are replaced (``torch.utils.checkpoint``, non-reentrant, RNG
    state preserved so dropout recomputes alike), so parameter names (and with them checkpoints
    and the Hugging Face key map) do not change; submodules still run through ``__call__``, so
    ZeRO-3's parameter-fetch hooks fire during recomputation, and a later ``torch.compile`` of a
    block compiles through the wrapper.

    Raises:
        ValueError: an unknown ``mode``, or a block without the sublayers ``mode`` names.
    """
    from torch.utils.checkpoint import checkpoint

    if mode == "none":
        return
    if mode != "full" and mode not in SUBLAYERS:
        raise ValueError(f"activation checkpointing mode {mode!r}: use none, full, attention, mlp")
    blocks = model.blocks()
    for i in checkpointed_blocks(len(blocks), every):
        block = blocks[i]
        if mode == "full":
            targets = [block]
        else:
            targets = [getattr(block, n) for n in SUBLAYERS[mode] if hasattr(block, n)]
            if not targets:
                raise ValueError(f"{type(block).__name__} has none of {SUBLAYERS[mode]}")
        for module in targets:
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)


def build_engine(cfg: KilnConfig, model: nn.Module, plan: BatchPlan, *, load_universal=False):
    """Wrap ``model`` in a DeepSpeed engine (ZeRO stage 0-3, offload, precision, AdamW, schedule).

    ``model`` is what :func:`trainer.construct.build_for_layout` built for the layout (this
    stage's `PipelineModule`, a ZeRO-3 partitioned model), or a whole plain model: with
    ``parallel.pipeline_stages`` > 1 that is first cut into a `PipelineModule`
    (:func:`trainer.pipeline.build_pipeline`) holding this stage's layers with ``model``'s
    weights, and under ZeRO-3 DeepSpeed partitions it. DeepSpeed returns its pipeline engine
    for a pipeline.

    The process group must already exist (:func:`trainer.distributed.init_distributed`).

    Returns:
        ``deepspeed.DeepSpeedEngine``; call it like the model, then ``engine.backward(loss)`` and
        ``engine.step()`` every micro-step (it steps the optimizer at accumulation boundaries).
        A ``PipelineEngine`` instead runs a whole step with ``engine.train_batch(iterator)``.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    # a pipeline's blocks are checkpointed by build_pipeline (here, or in trainer.construct)
    if plan.pipeline_stages > 1 and not isinstance(model, PipelineModule):
        from trainer.pipeline import build_pipeline

        model = build_pipeline(cfg, model, token_loss)
    elif not isinstance(model, PipelineModule):
        t = cfg.train
        apply_activation_checkpointing(
            model, t.activation_checkpointing, t.activation_checkpointing_every
        )
    on_gpu = torch.cuda.is_available()
    if cfg.train.compile:
        from trainer.compile import apply_compile

        apply_compile(model, "cuda" if on_gpu else "cpu")  # after the checkpoint wrappers
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg, plan, on_gpu=on_gpu, load_universal=load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)),
        dist_init_required=False,
    )
    if plan.data_parallel_size == 1 and cfg.parallel.zero_stage == 0:
        # DeepSpeed all-reduces gradients even over one data-parallel rank: it flattens every
        # gradient into a new buffer (up to 5e8 elements) and copies it back (~13% of a 125M
        # step on CPU, bench/throughput.py; 1.5 GiB of T5 large's decoder stage, bench/memory.py).
        # ZeRO 1-2 need the call (it fills their gradient partitions); ZeRO-0 does not.
        if plan.pipeline_stages > 1:
            engine.pipeline_enable_backward_allreduce = False
        else:
            engine.enable_backward_allreduce = False
    return engine
