"""Training throughput of Kiln beside a plain PyTorch loop, measured on this machine.

What it measures, per model preset (``debug``, ``125m``: Llama presets; ``t5:debug``,
``t5:small``: T5 v1.1 presets trained with span corruption; ``nanogpt``: the shape of nanoGPT's
``train_shakespeare_char`` (Karpathy, nanoGPT ``config/train_shakespeare_char.py``) as a Llama:
6 layers, width 384, 6 heads, 256 tokens, micro batch 8, its character vocabulary of 65 (Kiln
pads the model's to 128, ``trainer.config.VOCAB_MULTIPLE``), SwiGLU width 1024 = 8/3 x 384
rounded, the parameter count of nanoGPT's 4 x 384 GELU MLP):

* **Kiln**: the DeepSpeed engine of :func:`trainer.engine.build_engine`, stepped by
  :meth:`trainer.loop.Trainer.train_step` (the loop's own calls: ``engine(**inputs)``,
  ``token_loss``, ``engine.backward``, ``engine.step`` with the step's agreement all-reduce
  of stop flags and health values before the update), for each ZeRO stage and process count.
  The rest of ``Trainer.fit`` (logging, eval, callbacks) is not timed.
* **plain loop**: the same model, initialisation, synthetic batches and optimisation, in plain
  PyTorch: ``torch.optim.AdamW`` on the same parameter groups (:func:`trainer.engine.param_groups`),
  the same ``LambdaLR`` schedule, ``clip_grad_norm_`` at ``train.grad_clip``; no DeepSpeed.
  One process. Its last loss should equal Kiln ZeRO-0 one process's (same maths). Its AdamW is
  the default implementation, as nanoGPT's loop has it on a CPU (``fused=True`` on CUDA only,
  nanoGPT ``model.py`` ``configure_optimizers``): on a CPU, one kernel per parameter and
  operation.
* **fused**: the plain loop with ``torch.optim.AdamW(fused=True)``, the optimizer Kiln builds
  (:func:`trainer.engine.deepspeed_config`): how much of Kiln's lead over the plain loop a
  hand-written loop gets by choosing the same optimizer kernel.
* **compiled**: Kiln ZeRO-0 on one process with ``train.compile=true`` (each block compiled by
  ``torch.compile``, :mod:`trainer.compile`); its compilation happens in the untimed warmup step.
* **hf**: the peer: the Hugging Face ``transformers`` model of the family
  (``LlamaForCausalLM``, ``T5ForConditionalGeneration``) of the same shape (SDPA attention where
  it has it), holding the same initial weights (the family's ``to_hf_state_dict``), in the plain
  loop. Its losses equal Kiln's for Llama; T5's differ (both apply ``dropout_rate``, each with
  its own random draws).

How: every configuration runs in fresh processes, ``python -m torch.distributed.run --standalone
--nproc_per_node N bench/throughput.py --worker ...``; rank 0 writes its figures as JSON for the
parent. Batches are random token ids from a seeded generator, identical for both runners, turned
into examples by the run's objective (span corruption for T5, sentinels = the last 100 ids). After
``--warmup`` optimizer steps, ``--steps`` steps are timed between barriers. torchrun sets
``OMP_NUM_THREADS=1`` when N > 1; with N = 1 the process uses all cores. The plain loop, Kiln
ZeRO-0 on one process and the ``--peers`` (compiled, hf, fused) run adjacent, alternated
``--repeats`` times; the table shows the fastest of each, and each verdict is the median over the
repeats of the ratio to the plain loop run beside it.

Formulas:

* tokens/s = steps x global_batch_size x seq_len / timed wall seconds (all ranks together); for
  T5, seq_len raw tokens per sequence (before span corruption).
* MFU = tokens/s x F / P. F = 6 N + 12 L d T training FLOPs per token (PaLM, Chowdhery et al.
  2022, Appendix B); for T5 the encoder and decoder counted at their own lengths, per raw token
  (:func:`trainer.estimate.flops_per_token`). P = the machine's fp32 peak,
  measured once at start as the best FLOP/s of a 1024^3 matmul on all cores
  (:func:`trainer.estimate.measure_matmul_flops`). P is the whole machine for every process
  count, since the N processes share its cores.
* memory = peak resident set size (``getrusage`` ``ru_maxrss``), max over ranks: tensors plus
  Python, torch and DeepSpeed themselves.

Noise: on a shared or virtual machine, runs of one configuration differ by 10% or more. The
"others %" column is the share of the machine's CPU time that other processes (and the
hypervisor's steal) took while a configuration ran, from ``/proc/stat`` less this script's own
processes. Workers inherit the environment, so allocator settings (``MALLOC_*``) apply to all.

``--interleaved`` measures the same runners side by side more tightly: one process per preset
holds all of them (each its own model, optimizer and batches) and times one optimizer step of
each in turn, the order rotated every round; the ratio to the plain loop is taken per round and
its median reported, so load that other processes put on the machine for seconds or minutes
hits every runner of a round alike. After the rounds each runner takes one more step under
``torch.profiler`` (:func:`kernel_seconds`): the table shows its share in GEMMs and in attention
kernels, and the script prints the ceiling those kernels put on any runner that calls them:
the plain loop's step time / the seconds of Kiln's GEMMs and attention (Amdahl's law:
compilation removes and fuses the other ops, not these).

Targets (CPU, fp32, one process): Kiln ZeRO-0 >= 1.0x the plain loop's tokens/s; Kiln compiled
>= 1.15x. The ratios are printed with PASS/FAIL; the exit code is 0 either way. The hf and
fused ratios are reported without a target.

    python bench/throughput.py --interleaved --presets nanogpt,125m   # plain, Kiln, compiled,
                                                    # hf, fused: one process, rotated rounds
    python bench/throughput.py --presets nanogpt,125m --stages 0 --nprocs 1 \
        --pipeline-micro-batches ''             # the same runners, a process per run
    python bench/throughput.py                      # debug and 125m, ZeRO 0-3, 1 and 2 processes
    python bench/throughput.py --presets t5:debug,t5:small
    python bench/throughput.py --presets debug --stages 0 --nprocs 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Timed optimizer steps per preset when --steps is not given. On a quiet 2-core CPU the default
# run took ~10 minutes, ~4 of them starting the 22 torchrun jobs (~8-10 s each), before the
# peers (--peers compiled,hf,fused: 18 more jobs, the compiled ones compiling in their warmup step;
# --peers '' leaves them out); a 125m step takes ~2 s on one process (ZeRO-0) to ~10 s on two
# (ZeRO-3). --steps 2 saves ~1 minute.
DEFAULT_STEPS = {"debug": 30, "125m": 3, "t5:debug": 30, "t5:small": 3, "nanogpt": 8}
# Presets that are a shape rather than a registry name: their overrides, applied last.
SHAPES = {
    "nanogpt": [
        "model.name=debug",
        "model.hidden_size=384",
        "model.num_hidden_layers=6",
        "model.num_attention_heads=6",
        "model.num_key_value_heads=6",
        "model.intermediate_size=1024",
        "model.max_position_embeddings=256",
        "tokenizer.vocab_size=65",
        "data.seq_len=256",
        "train.micro_batch_size=8",
    ]
}
TARGETS = {"kiln": 1.0, "compiled": 1.15}  # x the plain loop's tokens/s; others: no target
JOB_TIMEOUT_S = 900  # per configuration; an --interleaved job: per runner it holds
REPO = Path(__file__).resolve().parent.parent


def split_preset(preset: str) -> tuple[str, str]:
    """``"t5:small"`` -> ``("t5", "small")``; a bare name is a Llama preset (a shape of
    :data:`SHAPES`: the Llama preset its overrides name)."""
    if preset in SHAPES:
        return "llama", "debug"
    family, _, name = preset.rpartition(":")
    return family or "llama", name


def bench_config(
    args,
    preset: str,
    stage: int,
    pipeline_stages: int = 1,
    micro_batches: int = 0,
    compile: bool = False,
    extra: tuple[str, ...] = (),
):
    """The run config of a benchmark configuration: ``preset`` (a registry name or a shape of
    :data:`SHAPES`) at ``args``' vocabulary, seq_len and micro batch, then ``extra`` overrides."""
    from trainer.config import load_config

    family, name = split_preset(preset)
    overrides = [
        f"model.model_type={family}",
        f"model.name={name}",
        f"tokenizer.vocab_size={args.vocab_size}",
        f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"parallel.zero_stage={stage}",
        f"parallel.pipeline_stages={pipeline_stages}",
    ]
    if micro_batches:
        overrides.append(f"train.gradient_accumulation_steps={micro_batches}")
    overrides.append(f"train.compile={str(compile).lower()}")
    return load_config(None, [*overrides, *SHAPES.get(preset, []), *extra])


class SyntheticTokens:
    """Stands in for ``TrainData``: sample ``i`` is row ``i % num_samples`` of uniform random
    token ids drawn once from a generator seeded with ``seed``, made into a batch by the run's
    objective (T5: the last 100 ids are the sentinels)."""

    def __init__(self, cfg, seq_len: int, num_samples: int, seed: int = 0):
        from trainer.objectives import build_objective

        vocab = cfg.tokenizer.vocab_size
        g = np.random.default_rng(seed)
        self.rows = g.integers(4, vocab, (num_samples, seq_len + 1), dtype=np.int64)
        self.objective = build_objective(cfg, np.arange(vocab - 1, vocab - 101, -1))
        self.excluded = np.zeros(0, dtype=np.int64)  # as TrainData: global indices left out

    def global_indices(self, logical: np.ndarray) -> np.ndarray:
        """As :meth:`trainer.data.dataset.TrainData.global_indices`: (n,) int64."""
        from trainer.data.dataset import skip_excluded

        return skip_excluded(logical, self.excluded)

    def batch(self, indices: np.ndarray):
        """A :class:`trainer.objectives.Batch` of the samples ``indices`` (n,)."""
        from trainer.objectives import TRAIN_STREAM

        idx = np.asarray(indices)
        rows = self.rows[idx % len(self.rows)]
        return self.objective(rows, idx, TRAIN_STREAM)._replace(sample_ids=idx)


class PlainLoop:
    """The optimisation of ``Trainer.train_step`` in plain PyTorch, for one process.

    ``forward``: ``(**batch.inputs) -> logits (B, T, V)``; None: ``model`` itself. ``fused``:
    ``torch.optim.AdamW``'s argument (None: its default, a kernel per tensor on a CPU)."""

    def __init__(
        self, cfg, model: torch.nn.Module, plan, data: SyntheticTokens, forward=None, fused=None
    ):
        from trainer.engine import lr_lambda, param_groups

        t = cfg.train
        self.model, self.plan, self.data, self.grad_clip = model, plan, data, t.grad_clip
        self.forward = forward or model
        self.step = 0
        self.data_wait_s = 0.0  # seconds spent making batches, as Trainer.data_wait_s
        self.optimizer = torch.optim.AdamW(
            param_groups(model, t.weight_decay),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
            fused=fused,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.train))

    def train_step(self) -> torch.Tensor:
        from trainer.objectives import token_loss

        p, total = self.plan, torch.zeros(())
        self.model.train()
        for micro in range(p.gradient_accumulation_steps):
            start = self.step * p.global_batch_size + micro * p.micro_batch_size  # as Trainer's
            waited = time.perf_counter()
            batch = self.data.batch(np.arange(start, start + p.micro_batch_size))
            self.data_wait_s += time.perf_counter() - waited
            loss = token_loss(self.forward(**batch.inputs), batch.labels)
            (loss / p.gradient_accumulation_steps).backward()
            total += loss.detach()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / p.gradient_accumulation_steps


def make_train_step(args, runner: str, world):
    """``(train_step, plan)`` of one runner (see :func:`run_config`) for ``args.preset``: a
    fresh model from the same seed, the same synthetic batches."""
    from model import build_model
    from trainer.config import batch_plan
    from trainer.engine import build_engine
    from trainer.loop import Trainer

    pipe = runner == "pipe"
    cfg = bench_config(
        args,
        args.preset,
        args.stage,
        args.nproc_pipeline if pipe else 1,
        args.micro_batches,
        compile=runner == "compiled",
    )
    plan = batch_plan(cfg, world.world_size)
    samples = plan.global_batch_size * (args.warmup + args.steps)
    data = SyntheticTokens(cfg, plan.seq_len, samples)
    model = build_model(cfg.derived.model, seed=cfg.train.seed)
    if runner in ("plain", "fused"):
        assert world.world_size == 1, "the plain loop runs on one process"
        fused = True if runner == "fused" else None
        return PlainLoop(cfg, model, plan, data, fused=fused).train_step, plan
    if runner == "hf":
        assert world.world_size == 1, "the Hugging Face model runs in the plain loop"
        hf = hf_model(cfg, model)
        forward = lambda **inputs: hf(**inputs, use_cache=False).logits  # noqa: E731
        return PlainLoop(cfg, hf, plan, data, forward).train_step, plan
    engine = build_engine(cfg, model, plan)
    ones = np.ones(cfg.derived.model.vocab_size)  # token bytes: only evaluate() reads them
    trainer = Trainer(cfg, engine, plan, world, data, token_bytes=ones, peak_flops=1.0)
    return trainer.train_step, plan


def interleaved_worker(args, world) -> None:
    """All of ``args.interleave`` (runner names) in this one process, each with its own model,
    optimizer and batches; after ``--warmup`` steps each (compilation included), ``--steps``
    rounds of one optimizer step per runner, the order rotated every round. A round's runners
    share the machine's state within seconds, so each round's ratio to the plain loop is immune
    to what other processes do at a longer scale. Writes per runner: the step times, the median
    tokens/s, and the per-round ratios to the plain loop."""
    names = args.interleave.split(",")
    steps = {name: make_train_step(args, name, world) for name in names}
    warmup_s = {}
    for name, (step, _) in steps.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        warmup_s[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in names}
    waits: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, float] = {}
    for i in range(args.steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            runner = steps[name][0].__self__  # a Trainer or a PlainLoop: both time their data
            runner.data_wait_s = 0.0
            start = time.perf_counter()
            losses[name] = steps[name][0]().item()
            times[name].append(time.perf_counter() - start)
            waits[name].append(runner.data_wait_s)
    kernels = {name: kernel_seconds(steps[name][0]) for name in names}
    result = {}
    for name in names:
        tokens = steps[name][1].tokens_per_step
        result[name] = {
            "step_times_s": times[name],
            "step_s": statistics.median(times[name]),
            "tokens_per_s": tokens / statistics.median(times[name]),
            "warmup_s": warmup_s[name],
            "last_loss": losses[name],
            "round_ratios": [p / t for p, t in zip(times["plain"], times[name], strict=True)],
            "data_wait_pct": 100 * sum(waits[name]) / sum(times[name]),
            "threads": torch.get_num_threads(),
            **kernels[name],
        }
    Path(args.out).write_text(json.dumps(result))


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def kernel_seconds(train_step) -> dict[str, float]:
    """One more optimizer step of ``train_step`` under ``torch.profiler`` (CPU): its wall
    seconds, and the self CPU seconds of its matrix multiplications (:data:`GEMM_OPS`, eager or
    called by Inductor's compiled code) and of its attention kernels (any op named
    ``scaled_dot_product``: SDPA forward and backward), summed over the threads that ran them
    (on one process these are the step's one thread of ops; the kernels' own OpenMP threads
    are not ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        train_step()
        wall = time.perf_counter() - start
    gemm = attention = 0.0
    for event in prof.key_averages():
        if event.key in GEMM_OPS:
            gemm += event.self_cpu_time_total / 1e6
        elif "scaled_dot_product" in event.key:
            attention += event.self_cpu_time_total / 1e6
    return {"profiled_step_s": wall, "gemm_s": gemm, "attention_s": attention}


def worker(args) -> None:
    """One rank of one configuration; rank 0 writes the figures to ``args.out``."""
    from trainer import distributed

    world = distributed.init_distributed()  # before deepspeed is imported
    import torch.distributed as dist

    if args.runner == "1t":  # the one-thread reference of the pipeline rows
        torch.set_num_threads(1)
    try:
        if args.interleave:
            return interleaved_worker(args, world)
        train_step, plan = make_train_step(args, args.runner, world)
        for _ in range(args.warmup):
            train_step()
        distributed.barrier()
        losses, times = [], []
        runner = train_step.__self__  # a Trainer or a PlainLoop: both time their data
        runner.data_wait_s = 0.0
        start = last = time.perf_counter()
        for _ in range(args.steps):
            losses.append(train_step())
            times.append(time.perf_counter() - last)
            last += times[-1]
        distributed.barrier()
        seconds = time.perf_counter() - start
        rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])  # MiB
        if world.world_size > 1:
            dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        if world.is_main:
            result = {
                "step_s": seconds / args.steps,
                "step_times_s": times,
                "tokens_per_s": args.steps * plan.tokens_per_step / seconds,
                "peak_rss_mib": rss.item(),
                "threads": torch.get_num_threads(),
                "last_loss": losses[-1].item(),
                "global_batch_size": plan.global_batch_size,
                "data_wait_pct": 100 * runner.data_wait_s / seconds,  # rank 0's
            }
            Path(args.out).write_text(json.dumps(result))
    finally:
        distributed.close()


def hf_model(cfg, model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face ``transformers`` model of ``cfg``'s family (the family spec's
    ``hf_model_class``: ``LlamaForCausalLM``, ``T5ForConditionalGeneration``) and shape, holding
    ``model``'s weights (copied, through the family's key map), with SDPA attention where the
    class has it."""
    import transformers

    from model.registry import spec

    m = cfg.derived.model
    family = spec(m)
    hf_cfg = family.hf.to_hf_config(m)
    hf_cfg._attn_implementation = "sdpa"
    hf = getattr(transformers, family.hf_model_class)(hf_cfg)
    weights = family.hf.to_hf_state_dict(model.state_dict(), m)
    hf.load_state_dict({k: v.clone() for k, v in weights.items()})
    return hf


def busy_cpu_seconds() -> float:
    """CPU seconds all processes (and the hypervisor's steal) used since boot, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the torchrun jobs)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def run_config(
    args,
    preset: str,
    runner: str,
    stage: int,
    nproc: int,
    steps: int,
    out: Path,
    micro_batches=0,
    interleave: str = "",
):
    """Launch one configuration under torchrun; returns its figures, or ``{"error": ...}``.

    Runners: ``plain`` (the plain loop), ``fused`` (the plain loop with fused AdamW), ``kiln``,
    ``compiled`` (Kiln, ``train.compile=true``),
    ``hf`` (the family's ``transformers`` model in the plain loop), ``1t`` (Kiln on one thread: the
    reference of the pipeline rows), ``pipe`` (Kiln with ``nproc`` pipeline stages,
    ``micro_batches`` per step); with ``interleave`` (runner names), all of those in one process,
    step by step (:func:`interleaved_worker`)."""
    worker_args = dict(runner=runner, preset=preset, stage=stage, steps=steps)
    worker_args.update(micro_batches=micro_batches, nproc_pipeline=nproc)
    worker_args.update({k: getattr(args, k) for k in ("warmup", "seq_len", "micro_batch_size")})
    worker_args.update(vocab_size=args.vocab_size, out=out, interleave=interleave)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), "--worker"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in worker_args.items()]
    label = f"{preset:>8} {runner:8} ZeRO-{stage} x{nproc}"
    if micro_batches:
        label += f" m={micro_batches}"
    start, busy, own = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    log = out.with_suffix(".log")
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=JOB_TIMEOUT_S * max(1, len(interleave.split(","))))
        except subprocess.TimeoutExpired:  # e.g. one rank died, the other waits in a collective
            proc.terminate()  # torchrun stops its workers on SIGTERM
            proc.wait()
    wall = time.perf_counter() - start
    others = (busy_cpu_seconds() - busy - (own_cpu_seconds() - own)) / (wall * os.cpu_count())
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text()[-3000:]
        print(f"{label}: FAILED (exit {proc.returncode}) after {wall:.0f} s\n{tail}", flush=True)
        return {"error": f"exit {proc.returncode}"}
    result = json.loads(out.read_text())
    if interleave:
        print(f"{preset:>8} {interleave}: {wall:.0f} s, others {100 * others:.0f}% of the CPU")
        return {"runners": result, "others_cpu": max(0.0, others)}
    result["others_cpu"] = max(0.0, others)
    print(
        f"{label}: {result['tokens_per_s']:9.1f} tokens/s ({wall:.0f} s, "
        f"others {100 * result['others_cpu']:.0f}% of the CPU)",
        flush=True,
    )
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Tokens/s, MFU and peak memory of Kiln (DeepSpeed ZeRO stages x process "
        "counts) beside a plain PyTorch loop, each configuration in fresh torchrun processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    csv = lambda kind: lambda s: [kind(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--presets", type=csv(str), default="debug,125m", help="model presets")
    p.add_argument("--stages", type=csv(int), default="0,1,2,3", help="ZeRO stages for Kiln")
    p.add_argument("--nprocs", type=csv(int), default="1,2", help="process counts for Kiln")
    steps_help = f"timed optimizer steps per configuration; None: {DEFAULT_STEPS}, else 10"
    p.add_argument("--steps", type=int, default=None, help=steps_help)
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before timing")
    pairs_help = "alternated runs of the plain loop, Kiln ZeRO-0 on one process and the peers"
    p.add_argument("--repeats", type=int, default=3, help=pairs_help)
    p.add_argument(
        "--peers",
        type=csv(str),
        default="compiled,hf,fused",
        help="runners alternated with the plain loop and Kiln: compiled (Kiln, train.compile="
        "true), hf (the family's transformers model: LlamaForCausalLM, "
        "T5ForConditionalGeneration), fused (the plain loop with torch's fused AdamW)",
    )
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per process")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokenizer vocabulary size")
    p.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write all figures here"
    )
    p.add_argument(
        "--pipeline-micro-batches",
        type=csv(int),
        default="1,2,4,8",
        help="micro-batch counts of the 2-stage pipeline rows ('' to skip them)",
    )
    p.add_argument(
        "--pipeline-only", action="store_true", help="run only the pipeline rows of the presets"
    )
    p.add_argument(
        "--interleaved",
        action="store_true",
        help="instead of a process per run: per preset, one process holding the plain loop, Kiln "
        "ZeRO-0 and the peers, timed step by step in rotated rounds (--steps rounds, median "
        "per-round ratio): the side-by-side measure for a noisy shared machine",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--interleave", default="", help=argparse.SUPPRESS)
    hidden = [("--runner", str), ("--preset", str), ("--stage", int), ("--out", str)]
    hidden += [("--micro-batches", int), ("--nproc-pipeline", int)]
    for flag, kind in hidden:
        p.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from model.registry import get_preset
    from trainer.estimate import flops_per_token, measure_matmul_flops

    began = time.perf_counter()
    peak = measure_matmul_flops(torch.device("cpu"), torch.float32, seconds=2.0)
    cores = torch.get_num_threads()
    print(f"machine peak: {peak / 1e9:.1f} GFLOP/s fp32 (1024^3 matmul, {cores} threads)")
    if args.interleaved:
        return interleaved_main(args, peak)
    rows, pipe_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets if not args.pipeline_only else []:
            family, name = split_preset(preset)
            get_preset(name, family)  # fail early on a wrong name
            steps = args.steps or DEFAULT_STEPS.get(preset, 10)
            fpt = flops_per_token(bench_config(args, preset, 0))
            peers = list(args.peers)
            alternated = ("plain", "kiln", *peers)
            jobs = [(r, 0, 1, k) for k in range(args.repeats) for r in alternated]
            others = [(s, n) for s in args.stages for n in args.nprocs if (s, n) != (0, 1)]
            jobs += [("kiln", s, n, None) for s, n in others]
            for i, (runner, stage, nproc, repeat) in enumerate(jobs):
                out = Path(tmp) / f"{preset}-{i}.json"
                fig = run_config(args, preset, runner, stage, nproc, steps, out)
                fig.update(preset=preset, runner=runner, zero_stage=stage, nproc=nproc)
                fig.update(repeat=repeat)
                if "tokens_per_s" in fig:
                    fig["mfu"] = fig["tokens_per_s"] * fpt / peak
                rows.append(fig)
            pipe_rows += pipeline_jobs(args, preset, steps, Path(tmp))
        for preset in args.presets if args.pipeline_only else []:
            steps = args.steps or DEFAULT_STEPS.get(preset, 10)
            pipe_rows += pipeline_jobs(args, preset, steps, Path(tmp))
    if rows:
        report(args, rows, peak, time.perf_counter() - began)
    if pipe_rows:
        pipeline_report(pipe_rows)
    if args.json:
        dump = json.loads(args.json.read_text()) if rows else {}
        dump["pipeline"] = pipe_rows
        args.json.write_text(json.dumps(dump, indent=1))


def interleaved_main(args, peak: float) -> None:
    """``--interleaved``: per preset, one process runs the plain loop, Kiln ZeRO-0 and the peers
    step by step (:func:`interleaved_worker`); prints their table and the verdicts."""
    from trainer.estimate import flops_per_token

    began, dump = time.perf_counter(), {}
    head = f"{'preset':>8} {'runner':>8} {'step s':>7} {'tokens/s':>9} {'x plain':>7} {'MFU %':>6}"
    head += f" {'warmup s':>8} {'last loss':>9} {'wait %':>6} {'GEMM %':>6} {'attn %':>6}"
    lines, verdicts, ceilings = [head, "-" * len(head)], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            peers = list(args.peers)
            names = ["plain", "kiln", *peers]
            steps = args.steps or 2 * DEFAULT_STEPS.get(preset, 10)
            out = Path(tmp) / f"{preset}-interleaved.json"
            fig = run_config(args, preset, "plain", 0, 1, steps, out, interleave=",".join(names))
            dump[preset] = fig
            if "runners" not in fig:
                lines.append(f"{preset:>8} FAILED")
                continue
            fpt = flops_per_token(bench_config(args, preset, 0))
            for name in names:
                r = fig["runners"][name]
                ratio = statistics.median(r["round_ratios"])
                mfu = 100 * r["tokens_per_s"] * fpt / peak
                lines.append(
                    f"{preset:>8} {name:>8} {r['step_s']:>7.3f} {r['tokens_per_s']:>9.1f} "
                    f"{ratio:>7.3f} {mfu:>6.1f} {r['warmup_s']:>8.1f} {r['last_loss']:>9.4f} "
                    f"{r['data_wait_pct']:>6.2f} {100 * r['gemm_s'] / r['profiled_step_s']:>6.1f}"
                    f" {100 * r['attention_s'] / r['profiled_step_s']:>6.1f}"
                )
                if name != "plain":
                    verdicts.append((preset, name, ratio, [round(x, 3) for x in r["round_ratios"]]))
            kiln, plain = fig["runners"]["kiln"], fig["runners"]["plain"]
            kernels = kiln["gemm_s"] + kiln["attention_s"]
            ceilings.append((preset, kernels, plain["step_s"], plain["step_s"] / kernels))
    print("\n" + "\n".join(lines))
    print(
        "\nOne process per preset, fp32; step s: median over the rounds; x plain: median over "
        "the rounds of (plain loop step time / this runner's step time) in the same round; "
        f"MFU against {peak / 1e9:.1f} GFLOP/s (1024^3 matmul); warmup s: the untimed first "
        "steps (compilation included for compiled); wait %: the time the runner waited for "
        "batches (Kiln: made data.prefetch_steps ahead) as a share of its step time; GEMM %, "
        "attn %: the share of one more (profiled) step spent in matrix multiplications and in "
        "attention kernels (self CPU time of aten::mm/addmm/bmm/baddbmm and of the SDPA ops)."
    )
    for preset, kernels, plain_s, ceiling in ceilings:
        print(
            f"{preset}: Kiln's matmuls and attention kernels take {kernels:.3f} s a step, the "
            f"plain loop's whole step {plain_s:.3f} s: a runner that runs the same kernels "
            f"reaches at most {ceiling:.3f}x the plain loop (compilation fuses and removes the "
            "other ops; it calls the same GEMM and attention kernels)"
        )
    names = {"kiln": "Kiln ZeRO-0", "compiled": "Kiln compiled", "hf": "Hugging Face"}
    names["fused"] = "plain loop with fused AdamW"
    print_verdicts(
        [(p, r, ratio, f"{len(rounds)} rounds") for p, r, ratio, rounds in verdicts], names, ""
    )
    print(f"wall time: {time.perf_counter() - began:.0f} s")
    if args.json:
        dump = {"machine_peak_flops": peak, "interleaved": dump}
        args.json.write_text(json.dumps(dump, indent=1))


PIPELINE_STAGES = 2


def pipeline_jobs(args, preset: str, steps: int, tmp: Path) -> list[dict]:
    """For each of ``--pipeline-micro-batches`` m: Kiln on one process of one thread with m
    micro-batches per step (the reference: same optimizer steps per token), then 2 pipeline
    stages (2 processes of one thread) with m micro-batches per step."""
    out = []
    jobs = []
    for m in args.pipeline_micro_batches:
        jobs += [("1t", 1, m), ("pipe", PIPELINE_STAGES, m)]
    for i, (runner, nproc, m) in enumerate(jobs):
        path = tmp / f"{preset}-pipe-{i}.json"
        fig = run_config(args, preset, runner, 0, nproc, steps, path, micro_batches=m)
        fig.update(preset=preset, runner=runner, nproc=nproc, micro_batches=m)
        out.append(fig)
    return out


def pipeline_report(rows: list[dict]) -> None:
    """The pipeline table: tokens/s per micro-batch count beside the 1F1B schedule's bubble
    (P - 1) / (m + P - 1) (Huang et al. 2019, GPipe, Sec. 2.3; Narayanan et al. 2021, Sec. 2.2)
    and the measured idle share 1 - tokens/s / (P x the one-thread reference's tokens/s): the
    time the P single-thread stages do not spend computing (bubble, send/receive, imbalance)."""
    head = f"{'preset':>8} {'micro':>5} {'1 stage':>9} {'2 stages':>9} {'bubble':>7} {'idle':>6}"
    print(f"\n{head}")
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for r in rows:
            if r["preset"] != preset or r["runner"] != "pipe":
                continue
            m, p = r["micro_batches"], r["nproc"]
            ref = [x for x in rows if x["preset"] == preset and x["runner"] == "1t"]
            base = next((x.get("tokens_per_s") for x in ref if x["micro_batches"] == m), None)
            bubble = (p - 1) / (m + p - 1)
            if "tokens_per_s" not in r or not base:
                print(f"{preset:>8} {m:>5} {'FAILED':>9}")
                continue
            idle = 1 - r["tokens_per_s"] / (p * base)
            r.update(bubble=bubble, idle=idle, reference_tokens_per_s=base)
            tps = r["tokens_per_s"]
            print(f"{preset:>8} {m:>5} {base:>9.1f} {tps:>9.1f} {bubble:>7.3f} {idle:>6.3f}")
    print(
        "tokens/s of 1 stage (one process, one thread) and 2 pipeline stages (two processes of "
        "one thread) at m micro-batches per step; bubble: the 1F1B schedule's idle share "
        "(P-1)/(m+P-1); idle: 1 - tokens/s(2 stages) / (2 x tokens/s(1 stage)), measured "
        "(bubble + send/receive + imbalance)."
    )


def print_verdicts(verdicts: list[tuple], names: dict[str, str], what: str) -> None:
    """One line per ``(preset, runner, ratio, over)``: the runner's median ratio to the plain
    loop (``over``: what the median is taken over) and, where :data:`TARGETS` names one, the
    target and PASS / FAIL."""
    for preset, runner, ratio, over in verdicts:
        target = TARGETS.get(runner)
        verdict = (
            ""
            if target is None
            else f" (target >= {target}) " + ("PASS" if ratio >= target else "FAIL")
        )
        print(
            f"{preset}: {names.get(runner, runner)} / plain loop{what} = {ratio:.3f}, median of "
            f"{over}{verdict}"
        )


def pair_ratios(rows: list[dict], preset: str, runner: str) -> tuple[float, list[float]] | None:
    """``runner`` / plain tokens/s within each repeat of the alternated runs, in run order, and
    their median (None: no repeat where both succeeded). Runs of one repeat share the machine's
    state at the time, so their ratio is steadier than the ratio of two separately chosen runs."""
    by_repeat: dict[int, dict[str, float]] = {}
    for r in rows:
        if "tokens_per_s" in r and r["preset"] == preset and r.get("repeat") is not None:
            by_repeat.setdefault(r["repeat"], {})[r["runner"]] = r["tokens_per_s"]
    ratios = [v[runner] / v["plain"] for v in by_repeat.values() if runner in v and "plain" in v]
    if not ratios:
        return None
    return statistics.median(ratios), [round(r, 3) for r in ratios]


def runs(rows: list[dict], **key) -> list[dict]:
    """The successful rows matching ``key``, fastest first."""
    match = [r for r in rows if "tokens_per_s" in r and all(r[k] == v for k, v in key.items())]
    return sorted(match, key=lambda r: -r["tokens_per_s"])


ROW = "{:>8} {:>8} {:>4} {:>5} {:>5} {:>7} {:>9} {:>7} {:>6} {:>8} {:>9} {:>8} {:>6}"
COLUMNS = ["preset", "runner", "ZeRO", "procs", "thr/p", "step s", "tokens/s", "x plain"]
COLUMNS += ["MFU %", "RSS MiB", "last loss", "others %", "wait %"]
HEAD = ROW.format(*COLUMNS)


def table_row(r: dict, plain: dict | None) -> str:
    no_zero = r["runner"] in ("plain", "hf", "fused")
    cells = [r["preset"], r["runner"], "-" if no_zero else r["zero_stage"]]
    cells.append(r["nproc"])
    if "error" in r:
        return ROW.format(*cells, "FAILED", *[""] * 8).rstrip()
    vs = f"{r['tokens_per_s'] / plain['tokens_per_s']:.3f}" if plain else "-"
    cells += [r["threads"], f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.1f}", vs]
    cells += [f"{100 * r['mfu']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['last_loss']:.4f}"]
    wait = f"{r['data_wait_pct']:.2f}" if "data_wait_pct" in r else "-"
    return ROW.format(*cells, f"{100 * r['others_cpu']:.0f}", wait)


def report(args, rows: list[dict], peak: float, wall: float) -> None:
    print(f"\n{HEAD}\n{'-' * len(HEAD)}")
    verdicts = []
    for preset in args.presets:
        plain_runs = runs(rows, preset=preset, runner="plain")
        kiln0_runs = runs(rows, preset=preset, runner="kiln", zero_stage=0, nproc=1)
        plain = plain_runs[0] if plain_runs else None
        shown = plain_runs[:1] + kiln0_runs[:1]
        for peer in args.peers:
            shown += runs(rows, preset=preset, runner=peer)[:1]
        for stage, nproc in [(s, n) for s in args.stages for n in args.nprocs if (s, n) != (0, 1)]:
            key = dict(preset=preset, runner="kiln", zero_stage=stage, nproc=nproc)
            shown += runs(rows, **key)[:1] or [{**key, "error": "failed"}]
        for r in shown:
            print(table_row(r, plain))
        for runner in ("kiln", *args.peers):
            ratio = pair_ratios(rows, preset, runner)
            if ratio is not None:
                verdicts.append((preset, runner, *ratio))
    print(
        "\nMFU = tokens/s x FLOPs per token (6N + 12LdT; T5: per stack) / machine peak "
        f"({peak / 1e9:.1f} GFLOP/s fp32, measured at start on all cores), the same peak for "
        "every process count. RSS: peak resident set size, max over ranks. thr/p: torch "
        "threads per process. others %: CPU taken by other processes while the configuration "
        "ran. wait %: rank 0's time waiting for batches (Kiln: the loop's data_wait_s, batches "
        "made data.prefetch_steps ahead; plain loop and hf: made in the step) as a share of the "
        "timed wall time. Plain loop, Kiln ZeRO-0 x1 and the peers: the fastest of "
        f"{args.repeats} alternated runs each in the table; each verdict is the median over the "
        "repeats of the ratio to the plain loop run beside it."
    )
    names = {"kiln": "Kiln ZeRO-0 1 process", "compiled": "Kiln compiled", "hf": "Hugging Face"}
    names["fused"] = "plain loop with fused AdamW"
    print_verdicts(verdicts, names, " tokens/s")
    print(f"wall time: {wall:.0f} s")
    if args.json:
        ratios = {f"{p}/{runner}": r for p, runner, r, _ in verdicts}
        dump = {"machine_peak_flops": peak, "wall_s": wall, "results": rows}
        dump.update(args={k: str(v) for k, v in vars(args).items()}, over_plain=ratios)
        args.json.write_text(json.dumps(dump, indent=1))


if __name__ == "__main__":
    main()
