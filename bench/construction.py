"""Peak resident memory per rank while the model is constructed (and, with ``--engine``, while
DeepSpeed's engine is built around it), on N CPU processes with gloo.

    python bench/construction.py --nproc 2 model.name=1b parallel.zero_stage=3
    python bench/construction.py --nproc 2 --legacy model.name=1b parallel.zero_stage=3
    python bench/construction.py --nproc 4 model.name=1b model.hidden_size=3072 \\
        model.intermediate_size=8192 model.num_hidden_layers=26 model.num_attention_heads=24 \\
        model.num_key_value_heads=24 model.tie_word_embeddings=false parallel.zero_stage=3

``--legacy`` constructs as `trainer.main` did before construction followed the layout: the
whole model on every rank (`model.build_model`), partitioned or cut by the engine builder.
Each rank prints its resident memory after imports, its peak (``ru_maxrss``) after
construction and, with ``--engine``, after `trainer.engine.build_engine`, in GiB. The overrides
are `kiln train`'s dotlist (``train.micro_batch_size``/``global_batch_size`` default to 1 and
N / pipeline stages). Run from the repository root with ``PYTHONPATH=.``; ``--legacy`` also runs
against an older checkout's ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

GIB = 1024**3


def _rss() -> float:
    """Resident memory of this process now, GiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def _peak() -> float:
    """Peak resident memory of this process so far, GiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _rank(rank: int, nproc: int, port: int, overrides: list[str], legacy: bool, engine: bool):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    from trainer import distributed
    from trainer.config import batch_plan, load_config
    from trainer.engine import build_engine

    world = distributed.init_distributed()
    cfg = load_config(None, overrides)
    plan = batch_plan(cfg, world.world_size)
    line = f"rank {rank}: after imports {_rss():.2f} GiB"
    start = time.perf_counter()
    if legacy:
        from model import build_model

        model = build_model(cfg.derived.model, seed=cfg.train.seed)
    else:
        from trainer.construct import build_for_layout  # (not in Kiln before it)

        model, _ = build_for_layout(cfg, plan)
    params = model.parameters()
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    line += (
        f"; construction: peak {_peak():.2f} GiB, now {_rss():.2f} GiB, "
        f"{held / 1e9:.3f}B parameter elements held, {time.perf_counter() - start:.1f} s"
    )
    if engine:
        start = time.perf_counter()
        build_engine(cfg, model, plan)
        line += f"; engine: peak {_peak():.2f} GiB, {time.perf_counter() - start:.1f} s"
    print(line, flush=True)
    distributed.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--legacy", action="store_true", help="the whole model on every rank")
    parser.add_argument("--engine", action="store_true", help="also build the DeepSpeed engine")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    from trainer.config import load_config
    from trainer.distributed import free_port

    stages = load_config(None, args.overrides).parallel.pipeline_stages
    batch = [f"train.global_batch_size={args.nproc // stages}", "train.micro_batch_size=1"]
    cfg = load_config(None, [*batch, *args.overrides])
    n = cfg.derived.model.num_parameters()
    mode = "legacy (whole model per rank)" if args.legacy else "by layout"
    print(
        f"{cfg.model.name} {n / 1e9:.3f}B parameters ({n * 4 / GIB:.2f} GiB fp32), "
        f"ZeRO-{cfg.parallel.zero_stage}, {stages} stage(s), {args.nproc} processes, {mode}",
        flush=True,
    )
    overrides = [*batch, *args.overrides]
    mp.start_processes(
        _rank,
        args=(args.nproc, free_port(), overrides, args.legacy, args.engine),
        nprocs=args.nproc,
        start_method="spawn",
    )


if __name__ == "__main__":
    main()
