"""Training throughput of Kiln on one CUDA GPU, bf16: tokens/s, MFU, peak memory, SDPA backend.

For each preset (default: the ``125m`` and ``1b`` Llama presets and T5 v1.1 ``base``), with
``train.compile`` off and on, one fresh process trains Kiln as ``kiln train`` does on one GPU
(the DeepSpeed engine of :func:`trainer.engine.build_engine`, ZeRO-0, bf16, stepped by
:meth:`trainer.loop.Trainer.train_step`) on synthetic batches (random token ids, the run's
objective: span corruption for T5), and prints one table row:

* tokens/s per GPU = timed steps x micro batch x seq_len / seconds, after ``--warmup`` untimed
  steps (the compiled run compiles in them), CUDA synchronised before and after;
* MFU = tokens/s x F / P: F = training FLOPs per token, 6N + 12 L d T for a decoder (PaLM,
  Chowdhery et al. 2022, App. B), per stack at its own length for T5
  (:func:`trainer.estimate.flops_per_token`); P = the GPU's dense bf16 peak from the vendor's
  datasheet (:data:`trainer.estimate.GPU_PEAK_FLOPS`; an unknown GPU: "?" and a note, or
  ``--peak-tflops``);
* peak memory = ``torch.cuda.max_memory_allocated`` over the timed steps (tensors only, not the
  CUDA context or the caching allocator's reserve);
* SDPA backend = which kernel ``scaled_dot_product_attention`` dispatched to, read from the
  profiler's op names over one step (``aten::_scaled_dot_product_flash_attention``: flash,
  ``..._efficient_attention``: memory-efficient, ``..._cudnn_attention``: cudnn, else math).
  T5 passes its relative position bias as an additive mask, which the flash kernel does not
  take, so T5 runs memory-efficient attention.

Without CUDA it exits with an error and does nothing.

    python bench/gpu.py                          # 125m, 1b, t5:base; compile off and on
    python bench/gpu.py --presets 1b --steps 20 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (seq_len, micro batch) per preset: the usual pretraining lengths, batches that fit 80 GB.
DEFAULT_SHAPES = {"125m": (2048, 8), "1b": (2048, 4), "t5:base": (512, 32), "debug": (256, 4)}
SDPA_OPS = {
    "flash": "aten::_scaled_dot_product_flash_attention",
    "memory-efficient": "aten::_scaled_dot_product_efficient_attention",
    "cudnn": "aten::_scaled_dot_product_cudnn_attention",
    "math": "aten::_scaled_dot_product_attention_math",
}
NO_CUDA = (
    "Error: bench/gpu.py measures CUDA GPUs and torch sees none here (torch.cuda.is_available() "
    "is False); run it on a GPU machine with a CUDA build of torch. For CPU throughput use "
    "bench/throughput.py."
)


def peak_bf16(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the GPU called ``name`` (the datasheet table
    :data:`trainer.estimate.GPU_PEAK_FLOPS`, with its sources), or None if it is not there."""
    from trainer.estimate import datasheet_peak_flops

    return datasheet_peak_flops(name, "bf16")


def sdpa_backend(op_names: set[str]) -> str:
    """The SDPA kernels among profiler op names (``+``-joined if several), ``none`` if none."""
    found = [backend for backend, op in SDPA_OPS.items() if op in op_names]
    return "+".join(found) or "none"


def worker(args) -> None:
    """One configuration in this process; writes its figures as JSON to ``args.out``."""
    from throughput import SyntheticTokens, bench_config

    from model import build_model
    from trainer import distributed
    from trainer.config import batch_plan
    from trainer.engine import build_engine
    from trainer.loop import Trainer

    world = distributed.init_distributed()
    try:
        args.vocab_size, args.micro_batch_size = args.vocab, args.micro_batch
        cfg = bench_config(
            args, args.preset, 0, compile=bool(args.compile), extra=("train.precision=bf16",)
        )
        plan = batch_plan(cfg, 1)
        data = SyntheticTokens(cfg, plan.seq_len, plan.global_batch_size * (args.warmup + 2))
        engine = build_engine(cfg, build_model(cfg.derived.model, seed=cfg.train.seed), plan)
        ones = torch.ones(cfg.derived.model.vocab_size).numpy()
        trainer = Trainer(cfg, engine, plan, world, data, token_bytes=ones, peak_flops=1.0)
        start = time.perf_counter()
        for _ in range(args.warmup):
            trainer.train_step()
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = trainer.train_step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak_memory = torch.cuda.max_memory_allocated()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.train_step()
            torch.cuda.synchronize()
        ops = {e.key for e in prof.key_averages()}
        result = {
            "tokens_per_s": args.steps * plan.tokens_per_step / seconds,
            "step_s": seconds / args.steps,
            "warmup_s": warmup_s,
            "peak_memory_gib": peak_memory / 2**30,
            "sdpa": sdpa_backend(ops),
            "last_loss": float(loss),
            "gpu": torch.cuda.get_device_name(),
        }
        Path(args.out).write_text(json.dumps(result))
    finally:
        distributed.close()


ROW = "{:>8} {:>7} {:>5} {:>5} {:>10} {:>6} {:>9} {:>17} {:>9}"
HEAD = ROW.format(
    "preset", "compile", "seq", "micro", "tokens/s", "MFU %", "peak GiB", "SDPA", "warmup s"
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Tokens/s per GPU, MFU, peak memory and SDPA backend of Kiln on one CUDA "
        "GPU in bf16, with train.compile off and on, each configuration in a fresh process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--presets", default="125m,1b,t5:base", help="comma-separated model presets")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens)")
    p.add_argument("--vocab", type=int, default=32000, help="tokenizer vocabulary size")
    p.add_argument("--seq-len", type=int, default=None, help=f"None: {DEFAULT_SHAPES}")
    p.add_argument("--micro-batch", type=int, default=None, help="None: as --seq-len's table")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of an unknown GPU")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag, kind in [("--preset", str), ("--compile", int), ("--out", str)]:
        p.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 1
    if args.worker:
        worker(args)
        return 0
    from throughput import bench_config

    from trainer.estimate import flops_per_token

    name = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16(name)
    print(f"GPU: {name}, dense bf16 peak " + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown"))
    print(f"\n{HEAD}\n{'-' * len(HEAD)}", flush=True)
    rows = []
    for preset in [x for x in args.presets.split(",") if x]:
        seq, micro = DEFAULT_SHAPES.get(preset, (2048, 4))
        seq, micro = args.seq_len or seq, args.micro_batch or micro
        shape = argparse.Namespace(vocab_size=args.vocab, seq_len=seq, micro_batch_size=micro)
        fpt = flops_per_token(bench_config(shape, preset, 0))
        for compile in (0, 1):
            # a fresh folder of this run's own: no fixed /tmp name that another user's run shares
            out = Path(tempfile.mkdtemp(prefix="kiln-gpu-bench-")) / "result.json"
            cmd = [sys.executable, __file__, "--worker", f"--preset={preset}"]
            cmd += [f"--compile={compile}", f"--out={out}", f"--steps={args.steps}"]
            cmd += [f"--warmup={args.warmup}", f"--vocab={args.vocab}"]
            cmd += [f"--seq-len={seq}", f"--micro-batch={micro}"]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            on = "on" if compile else "off"
            if proc.returncode != 0 or not out.is_file():
                print(ROW.format(preset, on, seq, micro, "FAILED", *[""] * 4))
                print((proc.stdout + proc.stderr)[-2000:])
                rows.append(dict(preset=preset, compile=bool(compile), error=proc.returncode))
                continue
            r = json.loads(out.read_text())
            r.update(preset=preset, compile=bool(compile), seq_len=seq, micro_batch_size=micro)
            r["mfu"] = r["tokens_per_s"] * fpt / peak if peak else None
            mfu = f"{100 * r['mfu']:.1f}" if peak else "?"
            cells = [f"{r['tokens_per_s']:.0f}", mfu, f"{r['peak_memory_gib']:.1f}", r["sdpa"]]
            print(ROW.format(preset, on, seq, micro, *cells, f"{r['warmup_s']:.0f}"), flush=True)
            rows.append(r)
    print(
        "\ntokens/s: per GPU (one process), bf16, ZeRO-0. MFU: tokens/s x (6N + 12LdT; T5: per "
        "stack) / the dense bf16 peak. peak GiB: torch.cuda.max_memory_allocated over the timed "
        "steps. SDPA: the scaled_dot_product_attention kernel the profiler saw. warmup s: the "
        "untimed first steps (compilation included when compile is on)."
    )
    if not peak:
        print(f"MFU: '{name}' is not in the table of known GPUs; give --peak-tflops.")
    if args.json:
        args.json.write_text(json.dumps({"gpu": name, "peak_flops": peak, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
