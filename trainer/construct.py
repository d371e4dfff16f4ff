"""Build the model the way the run's layout holds it: every rank materialises only what it holds.

- ZeRO stage 3: the model is constructed inside DeepSpeed's ``zero.Init``, which partitions each
  module's parameters as soon as the module exists (the peak beyond this rank's partitions is
  one module's parameters), then each rank writes its partition's values: elements
  ``[rank * p, (rank + 1) * p)`` of each flattened parameter (``p`` DeepSpeed's partition size),
  drawn or read for that range alone.
- Pipeline: the plain model is built on the meta device (no memory) and cut; DeepSpeed's
  `PipelineModule` builds this stage's layers only, and only those are materialised.
- ZeRO stages 0-2: every rank holds the whole model; it is built on meta and materialised one
  parameter at a time.

The values come from a `model.init.Source`: the run seed (:func:`model.init.seed_source`, a pure
function of (seed, parameter name, element range)), or ``model.init_from``'s Hugging Face
folder (`model.hf_checkpoint.HFWeightReader`, which reads only the slices asked for). So the
initial weights, gathered, are the one-process model's bit for bit under any layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.hf_checkpoint import HFWeightReader
from model.init import Source, materialise, seed_source
from model.registry import spec

if TYPE_CHECKING:
    from trainer.config import BatchPlan, KilnConfig


def build_for_layout(
    cfg: KilnConfig, plan: BatchPlan, *, init_from: str | Path | None = None
) -> tuple[nn.Module, Source]:
    """This rank's model for the run's layout, with its initial weights.

    Args:
        cfg: the run config (``derived.model``, ``train.seed``, ``parallel``).
        plan: the batch plan (``pipeline_stages``, for the DeepSpeed config under ZeRO-3).
        init_from: a Hugging Face folder whose weights to start from (``model.init_from`` on a
            fresh run); None: from ``train.seed``.

    Returns:
        ``(module, source)``: the plain model (ZeRO 0-2: materialised; ZeRO-3: its parameters
        DeepSpeed-partitioned, each rank holding its partitions), or with
        ``pipeline_stages`` > 1 this stage's `PipelineModule`; and the source of the values
        (an `HFWeightReader` records what this rank read in ``reads``).

    Raises:
        FileNotFoundError, ValueError: ``init_from`` cannot be read for this model
            (`HFWeightReader`).
    """
    model_cfg = cfg.derived.model
    with torch.device("meta"):
        meta = spec(model_cfg).model_class(model_cfg)
    if init_from is not None:
        source: Source = HFWeightReader(init_from, model_cfg)
    else:
        source = seed_source(meta, cfg.train.seed)
    if plan.pipeline_stages > 1:
        from trainer.objectives import token_loss
        from trainer.pipeline import build_pipeline

        return build_pipeline(cfg, meta, token_loss, source=source), source
    if cfg.parallel.zero_stage == 3:
        return build_partitioned(cfg, plan, source), source
    materialise(meta, source)
    return meta, source


def build_partitioned(cfg: KilnConfig, plan: BatchPlan, source: Source) -> nn.Module:
    """The plain model constructed under DeepSpeed's ``zero.Init`` (ZeRO-3): its parameters
    partitioned over the data-parallel ranks as each module is built, then each rank's
    partitions filled from ``source`` (:func:`fill_partitions`). The process group and
    DeepSpeed's comm must be up (`trainer.distributed.init_distributed`).

    Cost: ``zero.Init`` still allocates each module whole on every rank, runs torch's default
    initialisation and broadcasts rank 0's values before partitioning; those values are then
    overwritten. Memory is bounded by the largest module, but the time is not free: the 1b
    preset (fp32, 2 CPU processes here) takes ~39 s against ~10 s for a whole model per rank
    (bench/construction.py)."""
    import deepspeed

    from trainer.engine import deepspeed_config

    model_cfg = cfg.derived.model
    ds = deepspeed_config(cfg, plan, on_gpu=torch.cuda.is_available())
    # mem_efficient_linear=False: zero.Init would otherwise replace F.linear process-wide.
    with deepspeed.zero.Init(config_dict_or_path=ds, mem_efficient_linear=False):
        model = spec(model_cfg).model_class(model_cfg)
    with torch.no_grad():
        for name, value in model.fresh_buffers().items():  # not partitioned: every rank's own
            getattr(model, name).copy_(value)
    fill_partitions(model, source)
    return model


@torch.no_grad()
def fill_partitions(model: nn.Module, source: Source) -> None:
    """Write into each ZeRO-3 partitioned parameter's partition (``ds_tensor``, 1-D, of
    ``ds_tensor.ds_numel`` elements) its values from ``source``: rank r of the parameter's
    process group holds flattened elements ``[r * n, (r + 1) * n)``, the tail past the
    parameter's ``ds_numel`` padded with zeros (DeepSpeed's layout, `partition_parameters.py`
    ``_partition_param``). Only those elements are drawn or read.

    A partition that ``zero.Init`` swapped out to NVMe (``offload_device: nvme``: every
    partition of at least ``aio``'s 1 MB) is swapped into one of DeepSpeed's parameter swap
    buffers, written there and swapped out again (``param.nvme_swapper``, DeepSpeed's
    `AsyncPartitionedParameterSwapper`), one parameter at a time.

    Raises:
        ValueError: a parameter is not ZeRO-3 partitioned.
    """
    import torch.distributed as dist
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    for name, param in model.named_parameters():
        part = getattr(param, "ds_tensor", None)
        if part is None:
            raise ValueError(f"{name} is not a ZeRO-3 partitioned parameter")
        on_nvme = getattr(part, "final_location", None) == OffloadDeviceEnum.nvme
        if on_nvme and part.status == PartitionedParamStatus.NOT_AVAILABLE:
            param.nvme_swapper.swap_in([param], async_op=False)
            part = param.ds_tensor
        size = part.ds_numel
        start = min(size * dist.get_rank(group=param.ds_process_group), param.ds_numel)
        stop = min(start + size, param.ds_numel)
        values = source(name, param.ds_shape, start, stop)
        part[: stop - start].copy_(values)
        part[stop - start :].zero_()
        if on_nvme:
            param.nvme_swapper.swap_out_and_release([param])
