"""Training throughput of Kiln beside a plain PyTorch loop, measured on this machine.

What it measures, per model preset:

* **Kiln**: the DeepSpeed engine of :func:`trainer.engine.build_engine`, stepped by
  :meth:`trainer.loop.Trainer.train_step` (the loop's own calls: ``engine(x)``,
  ``causal_lm_loss``, ``engine.backward``, ``engine.step``), for each ZeRO stage and process
  count. The rest of ``Trainer.fit`` (stop-flag all-reduce, logging, eval) is not timed.
* **plain loop**: the same model, initialisation, synthetic batches and optimisation, in plain
  PyTorch: ``torch.optim.AdamW`` on the same parameter groups (:func:`trainer.engine.param_groups`),
  the same ``LambdaLR`` schedule, ``clip_grad_norm_`` at ``train.grad_clip``; no DeepSpeed.
  One process. Its last loss should equal Kiln ZeRO-0 one process's (same maths).

How: every configuration runs in fresh processes, ``python -m torch.distributed.run --standalone
--nproc_per_node N bench/throughput.py --worker ...``; rank 0 writes its figures as JSON for the
parent. Batches are random token ids from a seeded generator, identical for both runners. After
``--warmup`` optimizer steps, ``--steps`` steps are timed between barriers. torchrun sets
``OMP_NUM_THREADS=1`` when N > 1; with N = 1 the process uses all cores. The plain loop and Kiln
ZeRO-0 on one process run adjacent, alternated ``--repeats`` times, and the best of each counts.

Formulas:

* tokens/s = steps x global_batch_size x seq_len / timed wall seconds (all ranks together).
* MFU = tokens/s x F / P. F = 6 N + 12 L d T training FLOPs per token (PaLM, Chowdhery et al.
  2022, Appendix B; :func:`trainer.estimate.flops_per_token`). P = the machine's fp32 peak,
  measured once at start as the best FLOP/s of a 1024^3 matmul on all cores
  (:func:`trainer.estimate.measure_matmul_flops`). P is the whole machine for every process
  count, since the N processes share its cores.
* memory = peak resident set size (``getrusage`` ``ru_maxrss``), max over ranks: tensors plus
  Python, torch and DeepSpeed themselves.

Target (CPU): Kiln ZeRO-0 on one process at >= 0.95x the plain loop's tokens/s. The ratio is
printed with PASS/FAIL; the exit code is 0 either way.

    python bench/throughput.py                      # debug and 125m, ZeRO 0-3, 1 and 2 processes
    python bench/throughput.py --presets debug --stages 0 --nprocs 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Timed optimizer steps per preset when --steps is not given: about 10 s each on a 2-core CPU.
DEFAULT_STEPS = {"debug": 40, "125m": 6}
REPO = Path(__file__).resolve().parent.parent


def bench_config(args, preset: str, stage: int):
    from trainer.config import load_config

    return load_config(
        None,
        [
            f"model.name={preset}",
            f"tokenizer.vocab_size={args.vocab_size}",
            f"data.seq_len={args.seq_len}",
            f"train.micro_batch_size={args.micro_batch_size}",
            f"parallel.zero_stage={stage}",
        ],
    )


class SyntheticTokens:
    """Stands in for ``TrainData``: sample ``i`` is row ``i % num_samples`` of uniform random
    token ids drawn once from a generator seeded with ``seed``."""

    def __init__(self, vocab_size: int, seq_len: int, num_samples: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(vocab_size, (num_samples, seq_len + 1), generator=g)

    def batch(self, indices: np.ndarray):
        """Returns (input_ids (n, T) int64, labels (n, T) int64, sample ids (n,))."""
        rows = self.rows[torch.as_tensor(indices) % len(self.rows)]
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), np.asarray(indices)


class PlainLoop:
    """The optimisation of ``Trainer.train_step`` in plain PyTorch, for one process."""

    def __init__(self, cfg, model: torch.nn.Module, plan, data: SyntheticTokens):
        from trainer.engine import lr_lambda, param_groups

        t = cfg.train
        self.model, self.plan, self.data, self.grad_clip = model, plan, data, t.grad_clip
        self.step = 0
        self.optimizer = torch.optim.AdamW(
            param_groups(model, t.weight_decay),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))

    def train_step(self) -> torch.Tensor:
        from trainer.loop import causal_lm_loss

        p, total = self.plan, torch.zeros(())
        self.model.train()
        for micro in range(p.gradient_accumulation_steps):
            start = self.step * p.global_batch_size + micro * p.micro_batch_size  # as Trainer's
            input_ids, labels, _ = self.data.batch(np.arange(start, start + p.micro_batch_size))
            loss = causal_lm_loss(self.model(input_ids), labels)
            (loss / p.gradient_accumulation_steps).backward()
            total += loss.detach()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / p.gradient_accumulation_steps


def worker(args) -> None:
    """One rank of one configuration; rank 0 writes the figures to ``args.out``."""
    from trainer import distributed

    world = distributed.init_distributed()  # before deepspeed is imported
    import torch.distributed as dist

    from model import LlamaForCausalLM
    from trainer.config import batch_plan
    from trainer.engine import build_engine
    from trainer.loop import Trainer

    try:
        cfg = bench_config(args, args.preset, args.stage)
        plan = batch_plan(cfg, world.world_size)
        samples = plan.global_batch_size * (args.warmup + args.steps)
        data = SyntheticTokens(cfg.tokenizer.vocab_size, plan.seq_len, samples)
        model = LlamaForCausalLM.from_config(cfg.model, seed=cfg.train.seed)
        if args.runner == "plain":
            assert world.world_size == 1, "the plain loop runs on one process"
            train_step = PlainLoop(cfg, model, plan, data).train_step
        else:
            engine = build_engine(cfg, model, plan)
            trainer = Trainer(
                cfg,
                engine,
                plan,
                world,
                data,  # type: ignore[arg-type]
                token_bytes=np.ones(cfg.model.vocab_size),
                peak_flops=1.0,
            )
            train_step = trainer.train_step
        for _ in range(args.warmup):
            train_step()
        distributed.barrier()
        start = time.perf_counter()
        losses = [train_step() for _ in range(args.steps)]
        distributed.barrier()
        seconds = time.perf_counter() - start
        rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])  # MiB
        if world.world_size > 1:
            dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        if world.is_main:
            result = {
                "step_s": seconds / args.steps,
                "tokens_per_s": args.steps * plan.tokens_per_step / seconds,
                "peak_rss_mib": rss.item(),
                "threads": torch.get_num_threads(),
                "last_loss": losses[-1].item(),
                "global_batch_size": plan.global_batch_size,
            }
            Path(args.out).write_text(json.dumps(result))
    finally:
        distributed.close()


def run_config(args, preset: str, runner: str, stage: int, nproc: int, steps: int, out: Path):
    """Launch one configuration under torchrun; returns its figures, or ``{"error": ...}``."""
    worker_args = dict(runner=runner, preset=preset, stage=stage, steps=steps)
    worker_args.update({k: getattr(args, k) for k in ("warmup", "seq_len", "micro_batch_size")})
    worker_args.update(vocab_size=args.vocab_size, out=out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), "--worker"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in worker_args.items()]
    label = f"{preset:>6} {runner:5} ZeRO-{stage} x{nproc}"
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"{label}: FAILED (exit {proc.returncode}) after {wall:.0f} s\n{tail}", flush=True)
        return {"error": f"exit {proc.returncode}"}
    result = json.loads(out.read_text())
    print(f"{label}: {result['tokens_per_s']:9.1f} tokens/s ({wall:.0f} s)", flush=True)
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
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed optimizer steps per configuration (default per preset: {DEFAULT_STEPS}, "
        "else 10)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before timing")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="alternated runs of the plain loop and Kiln ZeRO-0 on one process; best of each",
    )
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per process")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokenizer vocabulary size")
    p.add_argument("--json", type=Path, default=None, help="also write all figures to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden, kind in [("--runner", str), ("--preset", str), ("--stage", int), ("--out", str)]:
        p.add_argument(hidden, type=kind, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from model.presets import get_preset
    from trainer.estimate import flops_per_token, measure_matmul_flops

    began = time.perf_counter()
    if os.getloadavg()[0] > 0.5:
        print(
            f"note: load average {os.getloadavg()[0]:.1f} before start; other processes "
            "share the cores and will add noise"
        )
    peak = measure_matmul_flops(torch.device("cpu"), torch.float32, seconds=2.0)
    cores = torch.get_num_threads()
    print(f"machine peak: {peak / 1e9:.1f} GFLOP/s fp32 (1024^3 matmul, {cores} threads)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            get_preset(preset)  # fail early on a wrong name
            steps = args.steps or DEFAULT_STEPS.get(preset, 10)
            fpt = flops_per_token(bench_config(args, preset, 0).model, args.seq_len)
            jobs = [(r, 0, 1) for _ in range(args.repeats) for r in ("plain", "kiln")]
            jobs += [("kiln", s, n) for s in args.stages for n in args.nprocs if (s, n) != (0, 1)]
            for i, (runner, stage, nproc) in enumerate(jobs):
                out = Path(tmp) / f"{preset}-{i}.json"
                fig = run_config(args, preset, runner, stage, nproc, steps, out)
                fig.update(preset=preset, runner=runner, zero_stage=stage, nproc=nproc)
                if "tokens_per_s" in fig:
                    fig["mfu"] = fig["tokens_per_s"] * fpt / peak
                rows.append(fig)
    report(args, rows, peak, time.perf_counter() - began)


def best(rows, **key):
    """The fastest successful row matching ``key`` (and all matching rows' tokens/s)."""
    match = [r for r in rows if all(r[k] == v for k, v in key.items()) and "tokens_per_s" in r]
    return max(match, key=lambda r: r["tokens_per_s"], default=None), [
        round(r["tokens_per_s"], 1) for r in match
    ]


def report(args, rows, peak: float, wall: float) -> None:
    head = f"{'preset':>6} {'runner':6} {'ZeRO':>4} {'procs':>5} {'thr/p':>5} {'step s':>7} "
    head += f"{'tokens/s':>9} {'x plain':>7} {'MFU %':>6} {'RSS MiB':>8} {'last loss':>9}"
    print(f"\n{head}\n{'-' * len(head)}")
    verdicts = []
    for preset in args.presets:
        plain, plain_all = best(rows, preset=preset, runner="plain")
        kiln0, kiln0_all = best(rows, preset=preset, runner="kiln", zero_stage=0, nproc=1)
        shown = [plain, kiln0] + [
            best(rows, preset=preset, runner="kiln", zero_stage=s, nproc=n)[0]
            or {"preset": preset, "runner": "kiln", "zero_stage": s, "nproc": n, "error": "failed"}
            for s in args.stages
            for n in args.nprocs
            if (s, n) != (0, 1)
        ]
        for r in filter(None, shown):
            zero = "-" if r["runner"] == "plain" else r["zero_stage"]
            line = f"{preset:>6} {r['runner']:6} {zero:>4} {r['nproc']:>5} "
            if "error" in r:
                print(line + "FAILED")
                continue
            vs = f"{r['tokens_per_s'] / plain['tokens_per_s']:.3f}" if plain else "-"
            print(
                line + f"{r['threads']:>5} {r['step_s']:7.3f} {r['tokens_per_s']:9.1f} "
                f"{vs:>7} {100 * r['mfu']:6.1f} {r['peak_rss_mib']:8.0f} {r['last_loss']:9.4f}"
            )
        if plain and kiln0:
            ratio = kiln0["tokens_per_s"] / plain["tokens_per_s"]
            verdicts.append((preset, ratio, plain_all, kiln0_all))
    print(
        f"\nMFU = tokens/s x (6N + 12LdT) / machine peak ({peak / 1e9:.1f} GFLOP/s fp32, measured "
        "at start on all cores), the same peak for every process count. RSS: peak resident set "
        "size, max over ranks. thr/p: torch threads per process. Plain loop and Kiln ZeRO-0 x1: "
        f"best of {args.repeats} alternated runs."
    )
    for preset, ratio, plain_all, kiln0_all in verdicts:
        verdict = "PASS" if ratio >= 0.95 else "FAIL"
        print(
            f"{preset}: Kiln ZeRO-0 1 process / plain loop tokens/s = {ratio:.3f} "
            f"(target >= 0.95) {verdict}  [runs: plain {plain_all}, kiln {kiln0_all}]"
        )
    print(f"wall time: {wall:.0f} s")
    if args.json:
        ratios = {p: r for p, r, *_ in verdicts}
        dump = {"machine_peak_flops": peak, "wall_s": wall, "results": rows}
        dump.update(args={k: str(v) for k, v in vars(args).items()}, zero0_over_plain=ratios)
        args.json.write_text(json.dumps(dump, indent=1))


if __name__ == "__main__":
    main()
