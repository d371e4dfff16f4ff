"""The ``kiln train --dry-run`` report: resolved config, sizes, batch arithmetic, memory."""

from __future__ import annotations

from trainer.config import BatchPlan, KilnConfig
from trainer.estimate import flops_per_token, memory_estimate
from trainer.objectives import describe


def _gib(n: float) -> str:
    return f"{n / 2**30:8.3f} GiB"


def plan_report(cfg: KilnConfig, plan: BatchPlan) -> str:
    m = cfg.derived.model
    mem = memory_estimate(cfg, plan)
    n = m.num_parameters()
    world = plan.pipeline_stages * plan.data_parallel_size
    lines = [
        "# resolved config",
        cfg.to_yaml().rstrip(),
        "",
        "# model",
        f"parameters:            {n:,} ({n / 1e6:.2f}M; "
        f"{m.num_parameters(exclude_input_embedding=True):,} in matmuls)",
        f"FLOPs per token:       {flops_per_token(cfg):.4g} (6N + attention; per raw token)",
        f"objective:             {describe(cfg.derived.objectives, cfg.data.seq_len)}",
        "",
        "# batch",
        f"micro_batch_size x gradient_accumulation_steps x data_parallel_size = global_batch_size"
        f"\n{plan.micro_batch_size} x {plan.gradient_accumulation_steps} x "
        f"{plan.data_parallel_size} = {plan.global_batch_size} sequences",
        f"tokens_per_step:       {plan.tokens_per_step:,} (x seq_len {plan.seq_len})",
        f"processes:             {plan.pipeline_stages} pipeline stage(s) x "
        f"{plan.data_parallel_size} data-parallel = {world}",
        f"tokens in the run:     {plan.tokens_per_step * cfg.train.max_steps:,} "
        f"({cfg.train.max_steps} steps)",
        "",
        f"# memory per device (estimate; ZeRO stage {cfg.parallel.zero_stage}, "
        f"{plan.pipeline_stages} pipeline stage(s), "
        f"{cfg.train.precision}, {plan.data_parallel_size} data-parallel ranks)",
        f"parameters:            {_gib(mem.parameters)}",
        f"gradients:             {_gib(mem.gradients)}",
        f"optimizer states:      {_gib(mem.optimizer_states)}",
        f"activations:           {_gib(mem.activations)}"
        + (" (checkpointed)" if cfg.train.activation_checkpointing else ""),
        f"total:                 {_gib(mem.total)}",
    ]
    if mem.cpu_offloaded:
        lines.append(f"offloaded to CPU:      {_gib(mem.cpu_offloaded)}")
    return "\n".join(lines)
