"""The ``kiln train --dry-run`` report: resolved config, sizes, batch arithmetic, memory, and
where the run stands (starts, resumes or is finished; what still needs preparing; epochs)."""

from __future__ import annotations

import json

from launcher.preflight import Resume
from trainer.config import BatchPlan, KilnConfig
from trainer.data.dataset import MANIFEST_FILE
from trainer.estimate import ds_memory_settings, flops_per_token, memory_estimate
from trainer.objectives import describe, describe_documents


def _gib(n: float) -> str:
    return f"{n / 2**30:8.3f} GiB"


def run_status(cfg: KilnConfig, plan: BatchPlan, resume: Resume) -> list[str]:
    """The ``# run`` lines: start, resume or finished (:meth:`Resume.describe`), settings that
    differ from the checkpoint's, what ``kiln train`` would prepare first, and the epochs each
    dataset's share of the run's samples covers (shares by ``weight``)."""
    lines = ["# run", resume.describe()]
    if resume.changes:
        lines.append("changed since the checkpoint (refused without --accept-changes):")
        lines += [f"  {c}" for c in resume.changes]
    if not cfg.tokenizer_path.is_file():
        lines.append(f"to prepare first:      tokenizer {cfg.tokenizer_path}")
    total_weight = sum(d.weight for d in cfg.data.datasets)
    samples = plan.global_batch_size * cfg.train.max_steps
    for d in cfg.data.datasets:
        manifest = cfg.dataset_dir(d.name) / MANIFEST_FILE
        if not manifest.is_file():
            lines.append(f"to prepare first:      dataset {d.name} -> {manifest.parent}")
            continue
        sequences = json.loads(manifest.read_text())["splits"]["train"]["sequences"]
        drawn = samples * d.weight / total_weight
        lines.append(
            f"epochs of {d.name + ':':<11} {drawn / max(sequences, 1):.2f} "
            f"({drawn:,.0f} samples of {sequences:,} train sequences)"
        )
    return lines


def _activation_options(cfg: KilnConfig) -> str:
    """What the activations line assumes: the checkpointing choice, the chunked loss and
    compilation, e.g. ``" (checkpointing mlp of blocks 2, 4, ...; loss in chunks of 1024
    tokens)"``; ``""`` for none of them."""
    t, notes = cfg.train, []
    if t.activation_checkpointing != "none":
        every = t.activation_checkpointing_every
        blocks = "every block" if every == 1 else f"blocks {every}, {2 * every}, ..."
        notes.append(f"checkpointing {t.activation_checkpointing} of {blocks}")
    if t.loss_chunk_tokens:
        notes.append(f"loss in chunks of {t.loss_chunk_tokens} tokens")
    if t.compile:
        notes.append("compiled blocks")
    return f" ({'; '.join(notes)})" if notes else ""


def memory_lines(cfg: KilnConfig, plan: BatchPlan, *, on_gpu: bool) -> list[str]:
    """The ``# memory`` lines of the dry-run: per rank on the device (model states,
    activations, DeepSpeed's buffers) and in host memory (construction, offload, swap buffers,
    the runtime), per node, and DeepSpeed's memory settings with where each came from
    (:func:`trainer.estimate.memory_estimate`, :func:`trainer.estimate.ds_memory_settings`)."""
    p = cfg.parallel
    mem = memory_estimate(cfg, plan, on_gpu=on_gpu)
    device = "GPU" if on_gpu else "CPU process (device memory is host memory)"
    lines = [
        f"# memory per rank (estimate; {device}; ZeRO stage {p.zero_stage}, "
        f"{plan.pipeline_stages} pipeline stage(s), {cfg.train.precision}, "
        f"{plan.data_parallel_size} data-parallel ranks)",
    ]
    if mem.stage is not None:
        lines.append(
            f"pipeline stage:        {mem.stage} of 0-{plan.pipeline_stages - 1} (the one "
            "that needs the most: its own layers and 1F1B's micro-batches in flight)"
        )
    lines += [
        f"parameters:            {_gib(mem.parameters)}",
        f"gradients:             {_gib(mem.gradients)}",
        f"optimizer states:      {_gib(mem.optimizer_states)}",
        f"activations:           {_gib(mem.activations)}{_activation_options(cfg)}",
        f"DeepSpeed buffers:     {_gib(mem.buffers)} (forward/backward: buckets, gathered "
        "ZeRO-3 parameters)",
        f"optimizer step:        {_gib(mem.step_buffers)} (ZeRO's fp32 gradient copy and "
        "buckets, once the activations are freed)",
        f"total on the device:   {_gib(mem.total)} (states + the larger of the two phases)",
    ]
    if mem.host_offload:
        lines.append(
            f"offloaded to host:     {_gib(mem.host_offload)}" + (" (pinned)" if on_gpu else "")
        )
    if mem.nvme:
        lines.append(f"offloaded to NVMe:     {_gib(mem.nvme)} in {p.nvme_path}")
    if mem.host_swap:
        lines.append(f"NVMe swap buffers:     {_gib(mem.host_swap)} of host memory")
    lines += [
        f"construction:          {_gib(mem.construction)} (the model as this rank builds it)",
        f"engine build:          {_gib(mem.engine_build)} (deepspeed.initialize: its flat "
        "copies of the weights, fp32 master, gradient partitions, a tensor gathered whole)",
        f"runtime:               {_gib(mem.runtime)} (Python, torch, DeepSpeed)",
        f"data workers:          {_gib(mem.data_workers)} ({cfg.data.prefetch_workers} "
        f"prefetch process(es); data.prefetch_steps={cfg.data.prefetch_steps})",
        f"host memory per rank:  {_gib(mem.host_per_rank)} (peak)",
        f"host memory per node:  {_gib(mem.host_per_node)} ({mem.ranks_per_node} ranks)",
    ]
    if p.zero_stage > 0 and plan.data_parallel_size == 1:
        plain = cfg.model_copy(update={"parallel": p.model_copy(update={"zero_stage": 0})})
        extra = mem.host_per_rank - memory_estimate(plain, plan, on_gpu=on_gpu).host_per_rank
        if extra > 0:
            # one data-parallel rank per stage: ZeRO partitions over 1, yet DeepSpeed keeps its
            # flat copies (an fp32 master under ZeRO 1-2) and AdamW steps the whole partition
            lines.append(
                f"note: ZeRO stage {p.zero_stage} with 1 data-parallel rank partitions nothing "
                f"and costs {_gib(extra).strip()} more per rank than parallel.zero_stage=0"
            )
    settings = ds_memory_settings(cfg)
    zero = settings.zero_config(p.zero_stage)
    if zero:
        lines.append("DeepSpeed memory settings (elements; override in parallel.<name>):")
        lines += [
            f"  {k}={v:,} ({'set' if k in settings.given else 'derived'})" for k, v in zero.items()
        ]
    return lines


def plan_report(
    cfg: KilnConfig, plan: BatchPlan, resume: Resume | None = None, *, on_gpu: bool | None = None
) -> str:
    """The dry-run report of ``cfg`` under ``plan``, with the ``# run`` section when ``resume``
    is given (:func:`launcher.preflight.resume_plan`). Memory is planned for GPUs when
    ``on_gpu`` (default: whether this machine has CUDA), else for CPU processes."""
    m = cfg.derived.model
    n = m.num_parameters()
    world = plan.pipeline_stages * plan.data_parallel_size
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    lines = [
        "# resolved config",
        cfg.to_yaml().rstrip(),
        "",
        "# model",
        f"parameters:            {n:,} ({n / 1e6:.2f}M; "
        f"{m.num_parameters(exclude_input_embedding=True):,} in matmuls)",
        f"FLOPs per token:       {flops_per_token(cfg):.4g} (6N + attention; per raw token)",
        f"objective:             {describe(cfg.derived.objectives, cfg.data.seq_len)}",
        f"documents:             {describe_documents(cfg.data)}",
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
        *memory_lines(cfg, plan, on_gpu=on_gpu),
    ]
    if resume is not None:
        lines += ["", *run_status(cfg, plan, resume)]
    return "\n".join(lines)
