"""Back-of-envelope arithmetic a run is planned with: FLOPs per token and memory per device.

These are estimates for ``--dry-run`` and for MFU; the measured figures come from the training
loop and ``bench/throughput.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model.registry import spec
from trainer.config import BatchPlan, KilnConfig
from trainer.objectives import model_lengths

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


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one training process."""

    parameters: float
    gradients: float
    optimizer_states: float
    activations: float
    cpu_offloaded: float  # bytes moved to host memory by offload

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer_states + self.activations


def memory_estimate(cfg: KilnConfig, plan: BatchPlan) -> MemoryEstimate:
    """Estimate device memory per data-parallel rank under the chosen ZeRO stage.

    Model states follow the ZeRO paper (Rajbhandari et al. 2020, Sec. 3 and 5): with Psi
    parameters, fp32 training keeps 4 Psi bytes of weights, 4 Psi of gradients and 8 Psi of Adam
    moments; mixed precision keeps 2 Psi + 2 Psi and 12 Psi of optimizer state (fp32 master
    weights, momentum, variance). Stage 1 partitions the optimizer states over the N_d
    data-parallel ranks, stage 2 also the gradients, stage 3 also the weights.

    Activations per layer follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models", eq. 1): ``s b h (34 + 5 a s / h)`` bytes at 2 bytes per value; the
    ``5 a s / h`` attention-matrix term is dropped because ``scaled_dot_product_attention`` with a
    fused kernel does not store it, and the result scales with the element size. With activation
    checkpointing only each layer's input (``2 s b h`` bytes at 2 bytes per value) is kept, plus
    one layer being recomputed. For T5, encoder blocks count at the encoder length and decoder
    blocks, which add cross-attention, at 1.5x the per-value term and the decoder length.
    With P pipeline stages a stage holds 1/P of the model states and, under DeepSpeed's 1F1B
    schedule, the activations of up to min(P, micro-batches) micro-batches of its layers (the
    first stage's worst case). The fp32 logits and their gradient (``2 * 4 s b V`` bytes) are
    added on top. Fragmentation, communication buffers and the CUDA context are not included.
    """
    m, p = cfg.derived.model, cfg.parallel
    psi = float(m.num_parameters())
    mixed = cfg.train.precision != "fp32"
    weight_bytes, grad_bytes, optim_bytes = (2, 2, 12) if mixed else (4, 4, 8)
    nd = plan.data_parallel_size
    pp = plan.pipeline_stages  # a stage holds ~1/P of the layers
    weights, grads, optim = (psi / pp * b for b in (weight_bytes, grad_bytes, optim_bytes))
    if p.zero_stage >= 1:
        optim /= nd
    if p.zero_stage >= 2:
        grads /= nd
    if p.zero_stage >= 3:
        weights /= nd
    offloaded = 0.0
    if p.offload_optimizer:
        offloaded += optim
        optim = 0.0
    if p.offload_params:
        offloaded += weights
        weights = 0.0

    b, scale = plan.micro_batch_size, BYTES[cfg.train.precision] / 2
    stacks = spec(m).activation_stacks(m, model_lengths(cfg.derived.objectives, cfg.data.seq_len))
    layers = 0.0
    for stack in stacks:
        n, s, h = stack.num_blocks, stack.seq_len, stack.d_model
        per_layer = s * b * h * stack.values_per_token * scale
        if cfg.train.activation_checkpointing:
            layers += n * 2 * s * b * h * scale + per_layer
        else:
            layers += n * per_layer
    logits = 2 * 4 * stacks[-1].seq_len * b * float(m.vocab_size or 0)
    if pp > 1:  # 1F1B: the first stage keeps up to P micro-batches of its 1/P of the layers
        layers *= min(pp, plan.gradient_accumulation_steps) / pp
    return MemoryEstimate(weights, grads, optim, layers + logits, offloaded)


# Dense (no sparsity) peak FLOP/s per GPU from the vendors' datasheets, by precision.
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
}


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
        name = torch.cuda.get_device_name(device)
        for key, table in GPU_PEAK_FLOPS.items():
            if key in name:
                return table[precision]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return measure_matmul_flops(device, dtype)
