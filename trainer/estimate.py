"""Back-of-envelope arithmetic a run is planned with: FLOPs per token and memory per device.

These are estimates for ``--dry-run`` and for MFU; the measured figures come from the training
loop and ``bench/throughput.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model.family import ActivationStack
from model.registry import spec
from trainer.config import BatchPlan, KilnConfig
from trainer.objectives import model_lengths

if TYPE_CHECKING:
    from trainer.pipeline import StageShape

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def flops_per_token(cfg: KilnConfig) -> float:
    """Training FLOPs per raw token (``data.seq_len`` tokens per sequence), forward + backward,
    without recomputation: the family spec's ``flops_per_sequence`` at the model's input lengths
    (:func:`trainer.objectives.model_lengths`) over ``data.seq_len``. A decoder's is
    ``6 N + 12 L D T`` (PaLM, Chowdhery et al. 2022, App. B; see
    `model.llama.flops_per_sequence`); a T5's applies the same counting to each stack. Units:
    FLOP per token.
    """
    d, seq_len = cfg.derived, cfg.data.seq_len
    return spec(d.model).flops_per_sequence(d.model, model_lengths(d.objectives, seq_len)) / seq_len


# DeepSpeed's ZeRO defaults (deepspeed/runtime/zero/config.py and offload_config.py, 0.19), in
# elements: what a run gets for each knob Kiln neither derives nor is given.
DS_ALLREDUCE_BUCKET = 500_000_000  # ZeRO-0's gradient all-reduce bucket (engine.py)
DS_PARAM_SWAP_BUFFERS = 5  # offload_param.buffer_count (NVMe)
DS_OPTIMIZER_SWAP_BUFFERS = 4  # offload_optimizer.buffer_count (NVMe)
# Resident memory of one training process before any model tensor: the Python interpreter,
# torch, DeepSpeed (with its CPU ops) and gloo, measured here (bench/memory.py, `debug` preset,
# 2 processes, ZeRO-3: 0.59-0.60 GiB peak per rank with ~0.09 GiB of model tensors and
# activations). On a GPU the CUDA context adds ~0.5 GiB of device memory, not counted here.
RUNTIME_BYTES = 0.5 * 2**30
# Resident memory of one data prefetch worker (data.prefetch_workers, trainer.data.prefetch): a
# spawned Python process with torch, numpy and the trainer's data code, measured here with the
# tests' data: 252 MiB resident, 170 MiB of it its own. Memory maps of the shards are page cache.
DATA_WORKER_BYTES = 0.25 * 2**30


@dataclass(frozen=True)
class DsMemorySettings:
    """DeepSpeed's ZeRO memory knobs of one run, in elements (DeepSpeed's names and units), and
    which of them the config set (the rest are derived, :func:`ds_memory_settings`)."""

    reduce_bucket_size: int
    allgather_bucket_size: int
    stage3_prefetch_bucket_size: int
    stage3_max_live_parameters: int
    stage3_max_reuse_distance: int
    stage3_param_persistence_threshold: int
    sub_group_size: int
    param_swap_buffer_size: int  # offload_param.buffer_size (NVMe): the largest tensor fits
    given: tuple[str, ...] = ()

    def zero_config(self, stage: int) -> dict[str, int]:
        """The ``zero_optimization`` keys DeepSpeed reads at ZeRO ``stage`` (0-3)."""
        if stage == 0:
            return {}
        keys = {"reduce_bucket_size": self.reduce_bucket_size}
        if stage in (1, 2):
            keys["allgather_bucket_size"] = self.allgather_bucket_size
        if stage == 3:
            keys.update(
                stage3_prefetch_bucket_size=self.stage3_prefetch_bucket_size,
                stage3_max_live_parameters=self.stage3_max_live_parameters,
                stage3_max_reuse_distance=self.stage3_max_reuse_distance,
                stage3_param_persistence_threshold=self.stage3_param_persistence_threshold,
                sub_group_size=self.sub_group_size,
            )
        return keys


@dataclass(frozen=True)
class ModelShape:
    """The sizes the memory settings and the planner need, in elements: ``d_model``, the
    largest single parameter tensor (usually the embedding table, vocab x d_model; an MLP
    weight where the vocabulary is small), the mean transformer block's parameters, and the
    blocks."""

    parameters: int
    d_model: int
    largest_tensor: int
    block_parameters: int
    num_blocks: int


def model_shape(cfg: KilnConfig) -> ModelShape:
    """:class:`ModelShape` of ``cfg``'s model from its family spec, without building it. The mean
    block is the parameters outside the embedding table(s) over the blocks (T5's decoder blocks,
    with cross-attention, are ~1.3x its encoder blocks)."""
    m = cfg.derived.model
    lengths = model_lengths(cfg.derived.objectives, cfg.data.seq_len)
    d = spec(m).activation_stacks(m, lengths)[0].d_model
    psi = m.num_parameters()
    table = int(m.vocab_size or 0) * d
    tables = table * (1 if m.tie_word_embeddings else 2)
    blocks = m.num_blocks
    return ModelShape(psi, d, largest_parameter(m), max(1, (psi - tables) // blocks), blocks)


_LARGEST: dict[str, int] = {}


def largest_parameter(m) -> int:
    """Elements of the largest parameter tensor of the model config ``m``: the model built on
    the meta device (no memory; ~1.5 s for the first model, the 13b preset, 0.05 s after),
    remembered per config."""
    key = m.model_dump_json()
    if key not in _LARGEST:
        with torch.device("meta"):
            model = spec(m).model_class(m)
        _LARGEST[key] = max(p.numel() for p in model.parameters())
    return _LARGEST[key]


def ds_memory_settings(cfg: KilnConfig) -> DsMemorySettings:
    """DeepSpeed's ZeRO bucket, prefetch and live-parameter sizes for ``cfg``'s model, in
    elements; a value set in ``parallel`` wins over the derived one.

    Derived (DeepSpeed's defaults are sized for a 1B+ model on a large GPU: 5e8-element buckets
    are 2 GB each in fp32, and 1e9 live parameters keep a whole 1B model gathered on every rank):

    * ``reduce_bucket_size = allgather_bucket_size = d_model**2``,
      ``stage3_prefetch_bucket_size = 0.9 d_model**2``,
      ``stage3_param_persistence_threshold = 10 d_model``: the rules of Hugging Face
      ``transformers``' DeepSpeed integration for ``"auto"`` (integrations/deepspeed.py,
      ``trainer_config_process``), which DeepSpeed's ZeRO-3 tutorial cites;
    * ``stage3_max_live_parameters = stage3_max_reuse_distance = max(2 x the mean block, the
      largest tensor)``: the block being computed and the next one (prefetch), and never less
      than the embedding table, which ZeRO-3 gathers whole;
    * ``sub_group_size`` = the mean block: the optimizer steps a rank's partition one sub-group
      at a time, and each sub-group costs an fp32 copy of its gradients (4 bytes per element;
      0.5 GB per rank at DeepSpeed's 1e9 default on a 1B model on 2 ranks);
    * ``offload_param.buffer_size`` (NVMe) the largest tensor (DeepSpeed refuses a smaller one;
      its default, 1e8 elements, costs 5 pinned buffers of 0.4 GB in fp32 on a smaller model),
      and ``offload_param.max_in_cpu`` the live window above.

    The trade-off: larger values mean fewer, larger collectives (faster on fast links) and more
    memory; smaller ones the reverse. The settings depend on the model only (and each knob's
    override), not on the device's free memory, so that every rank derives the same sizes: ZeRO
    reduces gradients bucket by bucket, and ranks with different buckets would not match.
    """
    shape = model_shape(cfg)
    d = shape.d_model
    window = max(2 * shape.block_parameters, shape.largest_tensor)
    derived = {
        "reduce_bucket_size": d * d,
        "allgather_bucket_size": d * d,
        "stage3_prefetch_bucket_size": int(0.9 * d * d),
        "stage3_max_live_parameters": window,
        "stage3_max_reuse_distance": window,
        "stage3_param_persistence_threshold": 10 * d,
        "sub_group_size": shape.block_parameters,
    }
    p = cfg.parallel
    given = tuple(k for k in derived if getattr(p, k) is not None)
    values = {k: getattr(p, k) if k in given else v for k, v in derived.items()}
    values["allgather_bucket_size"] += values["allgather_bucket_size"] % 2  # DeepSpeed: even
    swap = shape.largest_tensor  # DeepSpeed's 1e8 default would cost 5 x 0.4 GB in fp32
    return DsMemorySettings(**values, param_swap_buffer_size=swap, given=given)


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one training process (rank), in bytes, and of one node.

    Device memory: ``parameters``, ``gradients``, ``optimizer_states`` (fp32 master weights where
    DeepSpeed keeps them, Adam's two moments), ``activations`` and ``buffers`` (DeepSpeed's
    during forward and backward: gradient buckets, gathered ZeRO-3 parameters), and
    ``step_buffers`` (the optimizer step's: ZeRO's fp32 gradient copy and buckets, which come
    after backward has freed the activations); :attr:`total` is the peak of the two
    phases. Host memory: ``host_offload`` (offloaded states, pinned on a GPU),
    ``host_swap`` (pinned NVMe swap buffers and parameters kept in host memory under NVMe
    offload), ``data_workers`` (the rank's data prefetch worker processes), ``construction``
    (the model as each rank builds it, before DeepSpeed takes it),
    ``engine_build`` (host memory at the peak of ``deepspeed.initialize``: the copies it makes
    while it flattens and partitions the model), ``runtime`` (Python, torch, DeepSpeed).
    ``nvme`` is the bytes a rank writes to disk. ``ranks_per_node`` processes share a node;
    ``device_is_host`` is True on a CPU run, where "device" memory is host memory too. ``stage``:
    with pipeline stages, the stage these figures are for (the one that needs the most); None
    without.
    """

    parameters: float
    gradients: float
    optimizer_states: float
    activations: float
    buffers: float = 0.0
    step_buffers: float = 0.0
    host_offload: float = 0.0
    host_swap: float = 0.0
    construction: float = 0.0
    engine_build: float = 0.0
    runtime: float = RUNTIME_BYTES
    nvme: float = 0.0
    data_workers: float = 0.0
    ranks_per_node: int = 1
    device_is_host: bool = True
    stage: int | None = None

    @property
    def total(self) -> float:
        """Device bytes per rank at the peak of a step: model states + the larger of forward /
        backward (activations + DeepSpeed's buffers) and the optimizer step (its buffers)."""
        states = self.parameters + self.gradients + self.optimizer_states
        return states + max(self.activations + self.buffers, self.step_buffers)

    @property
    def cpu_offloaded(self) -> float:
        """Bytes per rank moved off the device to host memory or disk by offload."""
        return self.host_offload + self.nvme

    @property
    def host_per_rank(self) -> float:
        """Peak host bytes of one process and its data workers: the runtime and the workers
        plus the largest of construction, the engine build and the training state in host
        memory (on a CPU run the device's share is host memory too; the model built for
        construction is what DeepSpeed then flattens and partitions, so the three peaks come
        one after the other and do not add up)."""
        training = self.host_offload + self.host_swap
        if self.device_is_host:
            training += self.total
        return (
            self.runtime + self.data_workers + max(self.construction, self.engine_build, training)
        )

    @property
    def host_per_node(self) -> float:
        """Peak host bytes of one node: :attr:`host_per_rank` x ranks per node."""
        return self.host_per_rank * self.ranks_per_node


def memory_estimate(
    cfg: KilnConfig, plan: BatchPlan, *, on_gpu: bool = False, nodes: int | None = None
) -> MemoryEstimate:
    """Estimate memory per rank (device and host) and per node under the chosen layout.

    Model states follow the ZeRO paper (Rajbhandari et al. 2020, Sec. 3 and 5) as DeepSpeed
    0.19 allocates them (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py): with Psi
    parameters, fp32 training keeps 4 Psi bytes of weights, 4 Psi of gradients and 8 Psi of Adam
    moments; mixed precision keeps 2 Psi + 2 Psi and 12 Psi of optimizer state (fp32 master
    weights, momentum, variance). Stage 1 partitions the optimizer states over the N_d
    data-parallel ranks, stage 2 also the gradients, stage 3 also the weights. ZeRO 1-3 keep an
    fp32 master copy of each rank's partition in fp32 training too: ZeRO 1-2's
    ``weights_partition = ... .clone()``, and ZeRO-3's ``_create_fp32_partitions``, whose
    branch that would share fp32 weights compares the tensor's ``torch.device`` with the
    device's name (a ``str``), which is never equal, and so clones them too (measured:
    ``tests/test_ds_memory.py``).

    DeepSpeed's buffers (elements from :func:`ds_memory_settings` times the element size e of
    the weights), in forward and backward (``buffers``): ZeRO-0, the all-reduce bucket (5e8
    elements or the gradients), which DeepSpeed flattens the gradients into at every step
    (``buffered_allreduce_fallback``; the pipeline engine's ``_exec_reduce_grads`` too), only
    with N_d > 1: Kiln turns that all-reduce off over one data-parallel rank
    (:func:`trainer.engine.build_engine`; measured on T5 large's 2-stage ZeRO-0 run: 8.10 GiB on
    the decoder stage with it, 6.72 without, 6.64 planned); ZeRO 1-2, one reduce bucket (fp32
    under ZeRO-1, which accumulates in fp32); ZeRO-3, the reduce bucket, the gathered parameters
    (up to ``stage3_max_live_parameters``, never more than the model), the persistent small
    tensors (at most 3 norm-sized vectors per block, whole on every rank) and autograd's
    full-size gradient of the largest tensor before it is reduced. In the optimizer step
    (``step_buffers``), after backward has freed the activations and released the gathered
    parameters: ZeRO 1-2's all-gather bucket and the flat fp32 copy of the rank's gradient
    partition that ``stage_1_and_2.step`` hands the optimizer (``flatten(averaged_gradients)``,
    ``4 Psi / (P N_d)``: measured on T5 large's 2-stage ZeRO-1 run, 9.66 GiB on the decoder
    stage against 8.16 planned without it); ZeRO-3's reduce bucket and persistent tensors
    (kept allocated) and its fp32 copy of one sub-group's gradients
    (``_prepare_fp32_grad_for_sub_group``). The optimizer itself adds nothing: Kiln's is torch's
    fused AdamW (DeepSpeed's CPUAdam on a GPU with offload), which steps in place, where the
    single-tensor AdamW allocated two fp32 temporaries of the tensor it steps (``denom``;
    measured: the first step of a 50M-element parameter grows the peak by 2.01 tensors fused,
    the two moments, against 4.02 single-tensor). The two phases' peaks do not add up (measured
    on the 1b run, bench/memory.py).

    Offload (``offload_device``): optimizer states, with their fp32 gradient partition (which
    leaves the device under ZeRO 2-3), and/or ZeRO-3 weight partitions move to host memory
    (``host_offload``), or with ``nvme`` to disk (``nvme``), where host memory keeps DeepSpeed's
    swap buffers: 4 optimizer sub-groups of fp32 (``offload_optimizer.buffer_count``) and the
    fp32 gradient partitions, which are written to disk too (beside each sub-group's states),
    and 5 parameter buffers (``offload_param``) plus the parameter elements kept in host memory
    (``max_in_cpu``, set to the live window).

    Construction: each rank builds what it holds: under ZeRO-3 its 1/N_d share of the fp32
    weights (``deepspeed.zero.Init``) plus the largest tensor being initialised whole (with
    parameters offloaded to NVMe, the parameter swap buffers in place of the share); a
    pipeline stage its own layers; otherwise the whole fp32 model. The engine build:
    :func:`deepspeed_initialize_bytes`, or with parameter offload the offloaded states and swap
    buffers, which DeepSpeed allocates there.

    Activations per layer follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models", eq. 1): ``s b h (34 + 5 a s / h)`` bytes at 2 bytes per value; the
    ``5 a s / h`` attention-matrix term is dropped because ``scaled_dot_product_attention`` with a
    fused kernel does not store it, and the result scales with the element size. With activation
    checkpointing only each layer's input (``2 s b h`` bytes at 2 bytes per value) is kept, plus
    one layer being recomputed. For T5, encoder blocks count at the encoder length and decoder
    blocks, which add cross-attention, at 1.5x the per-value term and the decoder length.
    With P pipeline stages each stage is estimated apart and the figures are those of the stage
    that needs the most (``stage``; device memory on GPUs, host memory on CPUs): the model
    states of the layers DeepSpeed gives it (:func:`trainer.pipeline.stage_shapes`: T5's
    decoder blocks, with cross-attention, weigh more than its encoder's; a tied embedding counts
    on each stage that uses it) and, under DeepSpeed's 1F1B schedule, the activations of its
    blocks for min(P - s, micro-batches) micro-batches at stage s. The fp32 logits and their
    gradient (``2 * 4 s b V`` bytes) are added on the last stage (every rank without a
    pipeline). Fragmentation and the CUDA context are not included.

    Args:
        cfg: the resolved config.
        plan: its batch plan (:func:`trainer.config.batch_plan`).
        on_gpu: the ranks train on GPUs (device and host memory differ); False: on CPUs.
        nodes: nodes the ranks are spread over; None: ``launch.nnodes``.
    """
    if plan.pipeline_stages == 1:
        return _rank_estimate(cfg, plan, on_gpu, nodes, None)
    from trainer.pipeline import stage_shapes

    stages = [
        _rank_estimate(cfg, plan, on_gpu, nodes, (s, shape))
        for s, shape in enumerate(stage_shapes(cfg))
    ]
    return max(stages, key=lambda e: (e.total, e.host_per_rank) if on_gpu else e.host_per_rank)


def _rank_estimate(
    cfg: KilnConfig,
    plan: BatchPlan,
    on_gpu: bool,
    nodes: int | None,
    stage: tuple[int, StageShape] | None,
) -> MemoryEstimate:
    """:func:`memory_estimate` of a rank of the whole model (``stage`` None) or of pipeline
    stage ``stage = (index, what it holds)``."""
    m, p = cfg.derived.model, cfg.parallel
    shape = model_shape(cfg)
    settings = ds_memory_settings(cfg)
    psi = float(shape.parameters)
    mixed = cfg.train.precision != "fp32"
    e = BYTES[cfg.train.precision]
    weight_bytes, grad_bytes, optim_bytes = (2, 2, 12) if mixed else (4, 4, 8)
    nd, pp = plan.data_parallel_size, plan.pipeline_stages
    held = psi if stage is None else float(stage[1].parameters)  # this rank's model (stage)
    if p.zero_stage >= 1 and not mixed:
        optim_bytes += 4  # DeepSpeed's fp32 master partition, a copy even in fp32 training
    weights, grads, optim = (held * b for b in (weight_bytes, grad_bytes, optim_bytes))
    if p.zero_stage >= 1:
        optim /= nd
    if p.zero_stage >= 2:
        grads /= nd
    if p.zero_stage >= 3:
        weights /= nd

    buffers = step_buffers = 0.0
    if p.zero_stage == 0:
        buffers = min(DS_ALLREDUCE_BUCKET, held) * e if nd > 1 else 0.0
    elif p.zero_stage in (1, 2):
        reduce_e = 4 if p.zero_stage == 1 else e
        buffers = settings.reduce_bucket_size * reduce_e
        # the flat fp32 gradient partition the step gives the optimizer (a copy of the
        # gradients, which live until it is made; ZeRO-2 in 16 bits flattens in e bytes first)
        flat_grads = (4 + (e if mixed and p.zero_stage == 2 else 0)) * held / nd
        if p.offload_optimizer:  # the fp32 gradient partition lives on the host (host_offload)
            flat_grads = 0.0
        step_buffers = settings.allgather_bucket_size * e + flat_grads
    elif p.zero_stage == 3:
        gathered = min(psi, settings.stage3_max_live_parameters + shape.largest_tensor)
        persistent = 3 * shape.num_blocks * shape.d_model  # norm vectors under the threshold
        if settings.stage3_param_persistence_threshold < shape.d_model:
            persistent = 0
        step_copy = 0.0 if p.offload_optimizer else 4 * min(settings.sub_group_size, psi / nd)
        # autograd's full-size gradient of the largest gathered tensor, before DeepSpeed's hook
        # copies it into the reduce bucket
        full_grad = shape.largest_tensor
        buffers = (settings.reduce_bucket_size + gathered + persistent + full_grad) * e
        step_buffers = (settings.reduce_bucket_size + persistent) * e + step_copy
    host_offload = host_swap = nvme = 0.0
    offloaded_optim = optim + 4 * held / nd if p.offload_optimizer else 0.0  # + fp32 grads
    if p.offload_optimizer:
        optim = 0.0
        if p.zero_stage >= 2:  # the gradient partition lives with the optimizer (on the host)
            grads = 0.0
    offloaded_weights = weights if p.offload_params else 0.0
    if p.offload_params:
        weights = 0.0
    if p.offload_device == "nvme":
        nvme = offloaded_optim + offloaded_weights
        if p.offload_optimizer:
            host_swap += DS_OPTIMIZER_SWAP_BUFFERS * min(settings.sub_group_size, psi / nd) * 4
            # the fp32 gradient partitions live in host memory (stage3.py's
            # grad_partitions_flat_buffer on the offload device, which is the CPU) and are also
            # swapped out beside each sub-group's states (the "_gradient_" swap files): measured
            # on the 1.5B bench/memory.py run, 14.33 GiB per rank on disk against 14.2 counted
            host_swap += 4 * held / nd
        if p.offload_params:
            host_swap += DS_PARAM_SWAP_BUFFERS * settings.param_swap_buffer_size * e
            host_swap += min(settings.stage3_max_live_parameters, psi / nd) * e  # max_in_cpu
    else:
        host_offload = offloaded_optim + offloaded_weights

    b = plan.micro_batch_size
    stacks = spec(m).activation_stacks(m, model_lengths(cfg.derived.objectives, cfg.data.seq_len))
    layers = activation_bytes(
        stacks,
        b,
        e,
        cfg.train.activation_checkpointing,
        cfg.train.activation_checkpointing_every,
        held=None if stage is None else set(stage[1].blocks),
    )
    # fp32 logits and their gradient: of all the tokens, or of one chunk with the chunked loss
    tokens = stacks[-1].seq_len * b
    if cfg.train.loss_chunk_tokens:
        tokens = min(tokens, cfg.train.loss_chunk_tokens)
    logits = 2 * 4 * tokens * float(m.vocab_size or 0)
    if stage is not None:
        # 1F1B: stage s keeps the activations of min(P - s, micro-batches) micro-batches
        # (DeepSpeed's TrainSchedule.num_pipe_buffers); the last stage computes the logits
        layers *= min(pp - stage[0], plan.gradient_accumulation_steps)
        logits *= stage[1].has_head

    if p.zero_stage == 3 and pp == 1 and p.offload_params and p.offload_device == "nvme":
        # zero.Init swaps each partition out through the parameter swap buffers it allocates
        param_swap = DS_PARAM_SWAP_BUFFERS * settings.param_swap_buffer_size * e
        construction = param_swap + 4 * shape.largest_tensor
    elif p.zero_stage == 3 and pp == 1:
        construction = 4 * (psi / nd + shape.largest_tensor)
    else:
        construction = 4 * held
    engine_build = deepspeed_initialize_bytes(cfg, plan, on_gpu=on_gpu, held=held)
    if p.offload_params:  # the offload's host memory and swap buffers exist from the build on
        engine_build += host_offload + host_swap
    world = pp * nd
    nodes = nodes or cfg.launch.nnodes
    return MemoryEstimate(
        parameters=weights,
        gradients=grads,
        optimizer_states=optim,
        activations=layers + logits,
        buffers=buffers,
        step_buffers=step_buffers,
        host_offload=host_offload,
        host_swap=host_swap,
        construction=construction,
        engine_build=engine_build,
        nvme=nvme,
        data_workers=DATA_WORKER_BYTES * cfg.data.prefetch_workers * (cfg.data.prefetch_steps > 0),
        ranks_per_node=max(1, math.ceil(world / nodes)),
        device_is_host=not on_gpu,
        stage=None if stage is None else stage[0],
    )


def deepspeed_initialize_bytes(
    cfg: KilnConfig, plan: BatchPlan, *, on_gpu: bool, held: float | None = None
) -> float:
    """Host bytes per rank at the peak of ``deepspeed.initialize`` (the engine build), the
    model included, as DeepSpeed 0.19 allocates them. With Psi parameters, P pipeline stages
    (``held``: the stage's parameters; None: Psi / P), N_d data-parallel ranks and e bytes per
    weight of the training dtype:

    * ZeRO 1-2 (a pipeline stage too): ``DeepSpeedZeroOptimizer`` concatenates the stage's
      weights into one flat tensor per parameter group (``flatten_dense_tensors_aligned``)
      while they still exist: ``2 e Psi / P``. Then the weights become views of the flat tensor
      and it clones the fp32 master of its partition (``single_partition_of_fp32_groups``) and
      gives it a zero fp32 gradient (``initialize_optimizer_states``, freed on return without
      CPU offload): ``e Psi / P + 8 Psi / (P N_d)`` (T5 large's decoder stage, ZeRO-1 on one
      data-parallel rank: 4.96 GiB measured, 5.06 planned, 3.54 without the gradient). On a
      GPU with room for the flat tensor all of it happens in device memory (no host bytes);
      DeepSpeed flattens in host memory only when the device lacks the room.
    * ZeRO-3 without parameter offload: ``defragment`` (``runtime/zero/utils.py``) copies the
      rank's partitions into one flat host tensor, ``e Psi / N_d``, freeing each partition as it
      goes (on a GPU the tensor then goes to the device). On a CPU run the flat tensor stays the
      weights, and ``_setup_for_real_optimizer`` adds the fp32 master partition (``4 Psi /
      N_d``, a copy in fp32 training too: :func:`memory_estimate`),
      ``initialize_optimizer_states``' zero fp32 gradient of the largest sub-group, freed on
      return, then the fp32 gradient partitions (``grad_partitions_flat_buffer``, ``4 Psi /
      N_d``).
    * ZeRO-3 with parameter offload: the partitions already live in host memory or on NVMe
      (counted in ``host_offload`` and ``host_swap``).
    * ZeRO-0: the engine keeps the model as built, cast to the training dtype (``e Psi / P``
      on a CPU run; no copy).
    * ZeRO-3, on a CPU run, then: ``create_reduce_and_remove_grad_hooks`` gathers each
      parameter whole, one at a time, to register its gradient hook, and partitions it again.
      The largest tensor (L elements, usually the embedding table) gathered through gloo's
      ``all_gather_into_tensor`` costs ``2 e L``: the output and gloo's full-size staging copy
      (measured on 2 gloo processes: a 0.5 GiB output raised the peak by 1.0 GiB). The 1b
      preset's engine build measured 6.65 GiB per rank against 6.30 planned without it, 6.79
      with it. On a GPU the gathered tensor is device memory, within the step's gathered
      parameters (``buffers``).
    """
    p = cfg.parallel
    psi = float(model_shape(cfg).parameters)
    e = BYTES[cfg.train.precision]
    nd, pp = plan.data_parallel_size, plan.pipeline_stages
    held = psi / pp if held is None else held
    if p.zero_stage in (1, 2):
        if on_gpu:
            return 0.0
        return max(2 * e * held, e * held + 8 * held / nd)
    if p.zero_stage == 0:  # the model as built, in the training dtype, stays the weights
        return 0.0 if on_gpu else e * held
    if on_gpu:
        return 0.0 if p.offload_params else e * psi / nd
    gathered = 2 * e * model_shape(cfg).largest_tensor
    if p.offload_params:
        return gathered
    weights, master = e * psi / nd, 4 * psi / nd
    sub_group = 4 * min(ds_memory_settings(cfg).sub_group_size, psi / nd)
    return weights + master + max(sub_group, 4 * psi / nd) + gathered


# Of the 34 x D 16-bit values a self-attention block keeps per token (Korthikanti et al. 2022,
# Sec. 4.1: attention 11 without the score terms, MLP 19, two norms 2 each), what recomputing
# one sublayer frees: all of it but its input (2, the norm's output, which stays stored).
SUBLAYER_VALUES_FREED = {"attention": 11 - 2, "mlp": 19 - 2}


def activation_bytes(
    stacks: Sequence[ActivationStack],
    micro_batch_size: int,
    bytes_per_value: int,
    mode: str,
    every: int = 1,
    held: set[int] | None = None,
) -> float:
    """Bytes of the blocks' stored activations in one micro-batch's forward, as
    ``train.activation_checkpointing`` = ``mode`` and ``_every`` = ``every`` leave them.

    A block keeps ``values_per_token`` x D values per token (`model.family.ActivationStack`);
    the checkpointed blocks (:func:`trainer.engine.checkpointed_blocks` over the model's blocks,
    stacks in order) keep only their input (``full``: D per token), or free one sublayer's
    values (``attention``: each attention sublayer, self and cross, 9 x D; ``mlp``: 17 x D;
    :data:`SUBLAYER_VALUES_FREED`); backward recomputes one checkpointed unit at a time, which
    adds one unit's values once. ``bytes_per_value``: the training dtype's element size.
    ``held``: the global indices of the blocks counted (a pipeline stage's); None: all.
    """
    from trainer.engine import checkpointed_blocks

    scale = bytes_per_value / 2  # values are counted in 16-bit units
    total_blocks = sum(stack.num_blocks for stack in stacks)
    chosen = set(checkpointed_blocks(total_blocks, every)) if mode != "none" else set()
    out, first, transient = 0.0, 0, 0.0
    for stack in stacks:
        mine = set(range(first, first + stack.num_blocks))
        first += stack.num_blocks
        if held is not None:
            mine &= held
        n, tokens, h = len(mine), stack.seq_len * micro_batch_size, stack.d_model
        checkpointed = len(chosen & mine)
        per_block = stack.values_per_token
        if mode == "full":
            freed = per_block - 2
            unit = per_block
        elif mode in SUBLAYER_VALUES_FREED:
            # a block with cross-attention (values beyond a self-attention block's) has two
            attentions = 2 if per_block > 34 else 1
            freed = SUBLAYER_VALUES_FREED[mode] * (attentions if mode == "attention" else 1)
            unit = SUBLAYER_VALUES_FREED[mode] + 2
        else:
            freed = unit = 0
        out += (n * per_block - checkpointed * freed) * tokens * h * scale
        if checkpointed:
            transient = max(transient, unit * tokens * h * scale)
    return out + transient


# Dense (no sparsity) peak FLOP/s per GPU from the vendors' datasheets, by precision.
# Dense (no sparsity) peak FLOP/s per precision from NVIDIA's datasheets, which print the
# "with sparsity" tensor-core figure, twice the dense one: H100 SXM, H200 and GH200 bf16 1,979 ->
# 989, fp32 67 (nvidia.com/en-us/data-center/h100, .../h200); H100 PCIe 1,513 -> 756, fp32 51;
# H100 NVL 1,671 -> 835, fp32 60; A100 312 dense, fp32 19.5 (.../a100); L40S 733 -> 362, fp32
# 91.6 (.../l40s); L4 242 -> 121, fp32 30.3 (.../l4); A10 250 -> 125, fp32 31.2
# (.../products/a10-gpu); A10G (AWS) 70, fp32 31.2. Matched against torch.cuda.get_device_name
# in order, the more specific names first ("H100 PCIe" before "H100", "L40S" before "L4").
GPU_PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12},
    "GH200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
}


def datasheet_peak_flops(gpu_name: str, precision: str) -> float | None:
    """The dense peak FLOP/s in ``precision`` (``bf16``, ``fp16``, ``fp32``) of the GPU that
    ``torch.cuda.get_device_name`` calls ``gpu_name``, from :data:`GPU_PEAK_FLOPS`; None for a
    GPU not in the table."""
    return next((t[precision] for k, t in GPU_PEAK_FLOPS.items() if k in gpu_name), None)


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, *, n: int = 1024, seconds: float = 0.5
) -> float:
    """Best observed FLOP/s of an ``n x n @ n x n`` matmul on ``device`` (2 n^3 FLOPs each), over
    about ``seconds`` of repeats. This is the practical peak MFU is measured against on CPUs."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.matmul(a, b)  # warm-up
    while time.perf_counter() < deadline or best == 0.0:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one device: the datasheet figure for known GPUs, else measured."""
    if device.type == "cuda":
        known = datasheet_peak_flops(torch.cuda.get_device_name(device), precision)
        if known is not None:
            return known
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return measure_matmul_flops(device, dtype)
