"""Peak resident memory per rank of real multi-process Kiln runs, beside the ``--dry-run`` plan.

For each run it makes, it prints per rank: the peak resident set size (RSS) at construction
(the model built), at the engine build (``deepspeed.initialize``), during the first optimizer
step and over the steady-state steps after it, beside the planner's estimate
(:func:`trainer.estimate.memory_estimate`, what ``kiln train --dry-run`` shows), the time
from launch to the end of the first step and a steady step's time.

How: every run is a fresh ``python -m torch.distributed.run --nproc_per_node N bench/memory.py
--worker ...`` job, as ``kiln train`` starts one: each rank builds the model
(``trainer.construct.build_for_layout``), wraps it (``trainer.engine.build_engine``, the
DeepSpeed config of ``trainer.engine.deepspeed_config``) and steps it with
``trainer.loop.Trainer.train_step`` on synthetic token batches (``bench/throughput.py``'s
``SyntheticTokens``). Each rank appends its
pid and a line per phase change, with a timestamp, to a marks file; this process samples every
rank's RSS (``VmRSS`` of ``/proc/<pid>/status``) every 50 ms and files each sample under the
rank's current phase. At the end each rank adds its own ``getrusage`` peak (``ru_maxrss``),
which catches spikes between samples. A rank killed by the kernel's OOM killer shows as
``killed`` with the phase it died in and the last RSS seen.

Estimates compared, per rank (CPU run: device memory is host memory):

* construction: ``runtime + construction`` (the model as the layout builds it,
  ``trainer.construct.build_for_layout`` as ``trainer.main`` calls it: under ZeRO-3 each rank's
  1/N share, ``deepspeed.zero.Init``);
* engine: ``runtime + engine_build`` (what ``deepspeed.initialize`` copies: flat weights, the
  fp32 master, the gradient partitions; under ZeRO-3 the largest tensor gathered whole while
  it hooks the gradients);
* first step / steady: ``runtime + model states + max(activations + DeepSpeed's forward /
  backward buffers, the optimizer step's buffers)``
  (:attr:`trainer.estimate.MemoryEstimate.host_per_rank`).

Runs (``--runs``, comma-separated; each one at a time, several minutes for the large ones):

* ``1b``: the ``1b`` preset, ZeRO-3, 2 processes, fp32, micro batch 1, 128 tokens, 5 steps;
* ``125m``, ``debug``: the same layout for the ``125m`` preset (a size that fits whatever the
  build does), the same with 2 blocks (``125m-2l``, under 3 GiB for both ranks: mostly the
  embedding tables) and the ``debug`` preset (the runtime alone: Python, torch, DeepSpeed, gloo);
* ``largest``, ``largest-nvme``: a decoder of the ``1b`` width with ``--largest-layers`` blocks,
  ZeRO-3 on 2 processes, 3 steps, without and with NVMe offload of parameters and optimizer
  states to ``--nvme-path`` (refused with the fix where DeepSpeed's aio op cannot be built).
  ``--largest-layers 0`` (the default) takes the most blocks whose planned host memory for the
  node fits in ``--host-share`` of this machine's memory (:func:`largest_layers`);
* ``t5-large``, ``t5-large-pipe``, ``t5-large-pipe-zero1``: T5 ``large`` under ZeRO-3 and
  under a 2-stage pipeline (ZeRO-0: one data-parallel rank per stage; and ZeRO-1, which
  partitions nothing there and costs 2.98 GiB more per rank; 2 micro-batches), 2 processes,
  3 steps;
* ``plan``: estimates only: the ``7b`` and ``13b`` presets on one 8-GPU node (bf16, micro batch
  1, 2048 tokens) under ZeRO-3 and under a 4-stage pipeline x 2 data-parallel (ZeRO-1, 8
  micro-batches): device and host memory per rank, host memory per node.

The allocator: the ranks start in the environment Kiln's launchers give them
(:func:`launcher.local.worker_environment`: ``MALLOC_MMAP_THRESHOLD_=131072`` unless this
process's environment sets one); ``--glibc-malloc`` starts them without glibc's ``MALLOC_*``
variables (its dynamic mmap threshold), as Kiln did before. glibc then keeps the large blocks
DeepSpeed frees in its heaps: measured here on the ``125m`` run, 2.94 / 2.75 GiB per rank
without the threshold, 1.98 / 1.97 with it (estimate 2.13), at the same step time (9.6 s and
9.1 s on the shared machine).

Measured here (2 cores, shared): ``1b`` per rank, measured / planned: construction 2.62-2.66 / 2.68
GiB, engine build 6.69-6.70 / 6.79, first step 10.38, steady 11.35-11.36 / 11.43, ru_maxrss
11.36-11.39; 124 s to the end of the first step, 47 s a step. ``largest-nvme --largest-nvme-layers
1`` (126M parameters): 1.82 / 1.96 at construction, 3.53 / 3.59 at the engine build, 4.01 / 3.88
steady; 52 s to the first step, 13 s a step. ``largest-nvme --largest-nvme-layers 24`` (1,525M
parameters, larger than ``1b``, which is the largest that fits here without offload): 1.83 / 1.96
at construction, 6.72-6.75 / 6.41 at the engine build, 7.59 / 7.31 steady (1.04x), 14.33 GiB per
rank on disk / 14.2; 224 s to the first step, 110 s a step. ``t5-large``: 1.91 / 2.08 at
construction, 5.04 / 5.12 at the engine build, 8.39-8.44 / 8.41 steady; ``t5-large-pipe`` (ZeRO-0):
6.60 (encoder stage) and 6.72 (decoder stage) steady against 6.64 planned for the larger stage
(7.39 and 8.10 while DeepSpeed still all-reduced the gradients over one data-parallel rank), 32 s
to the first step, 20 s a step; ``t5-large-pipe-zero1``: 1.76 / 1.94 at construction against 2.02,
4.58 / 4.96 at the engine build against 5.06, 8.83 / 9.66 steady against 9.62 (the decoder stage),
49 s to the first step, 22 s a step.

Heavy runs on a shared machine: wrap the command in ``flock /tmp/kiln-heavy.lock``.

    python bench/memory.py --runs plan,125m
    python bench/memory.py --runs 125m --glibc-malloc
    flock /tmp/kiln-heavy.lock python bench/memory.py --runs 1b --json out.json
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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.05
JOB_TIMEOUT_S = 3600
GIB = 2**30


@dataclass(frozen=True)
class Run:
    """One measured configuration: a model preset and ``key=value`` overrides, on ``nproc``
    processes for ``steps`` optimizer steps."""

    name: str
    overrides: tuple[str, ...]
    nproc: int = 2
    steps: int = 3
    nvme: bool = False
    notes: str = ""
    extra: tuple[str, ...] = field(default=())


def base_overrides(family: str, preset: str, stage: int, seq_len: int) -> tuple[str, ...]:
    return (
        f"model.model_type={family}",
        f"model.name={preset}",
        "tokenizer.vocab_size=32000",
        f"data.seq_len={seq_len}",
        "train.micro_batch_size=1",
        "train.precision=fp32",
        f"parallel.zero_stage={stage}",
    )


def largest_layers(nvme: bool, budget: float, nvme_path: str = "/tmp/kiln-nvme") -> int:
    """The most blocks a decoder of the ``1b`` width may have, under ZeRO-3 on 2 CPU processes
    (fp32, micro batch 1, 128 tokens, optionally with NVMe offload), for the planner's host
    memory of the node to stay within ``budget`` bytes."""
    layers = 1
    while layers < 4096:
        overrides = [
            *base_overrides("llama", "1b", 3, 128),
            f"model.num_hidden_layers={layers + 1}",
        ]
        if nvme:
            overrides += [*NVME_OVERRIDES, f"parallel.nvme_path={nvme_path}"]
        if estimate(overrides, 2)[1].host_per_node > budget:
            break
        layers += 1
    return layers


NVME_OVERRIDES = (
    "parallel.offload_params=true",
    "parallel.offload_optimizer=true",
    "parallel.offload_device=nvme",
)


def runs(args) -> dict[str, Run]:
    largest = (
        *base_overrides("llama", "1b", 3, 128),
        f"model.num_hidden_layers={args.largest_layers}",
    )
    nvme_layers = args.largest_nvme_layers or args.largest_layers
    largest_nvme = (
        *base_overrides("llama", "1b", 3, 128),
        f"model.num_hidden_layers={nvme_layers}",
        *NVME_OVERRIDES,
        f"parallel.nvme_path={args.nvme_path}",
    )
    return {
        "debug": Run("debug", base_overrides("llama", "debug", 3, 128), steps=5),
        "125m": Run("125m", base_overrides("llama", "125m", 3, 128), steps=5),
        "125m-2l": Run(
            "125m x2 layers",
            (*base_overrides("llama", "125m", 3, 128), "model.num_hidden_layers=2"),
            steps=5,
        ),
        "1b": Run("1b", base_overrides("llama", "1b", 3, 128), steps=5),
        "largest": Run(f"1b-width x{args.largest_layers} layers", largest),
        "largest-nvme": Run(f"1b-width x{nvme_layers} layers, NVMe", largest_nvme, nvme=True),
        "t5-large": Run("t5 large ZeRO-3", base_overrides("t5", "large", 3, 128)),
        "t5-large-pipe": Run(
            "t5 large 2-stage pipeline",
            (
                *base_overrides("t5", "large", 0, 128),
                "parallel.pipeline_stages=2",
                "train.gradient_accumulation_steps=2",
            ),
        ),
        "t5-large-pipe-zero1": Run(
            "t5 large 2-stage pipeline, ZeRO-1",
            (
                *base_overrides("t5", "large", 1, 128),
                "parallel.pipeline_stages=2",
                "train.gradient_accumulation_steps=2",
            ),
        ),
    }


# ---------------------------------------------------------------------------------------------
# the worker: one rank


def worker(args) -> None:
    """One rank: mark phases in ``<marks>.rank<R>`` while building and stepping."""
    rank = int(os.environ["RANK"])
    marks = Path(f"{args.marks}.rank{rank}").open("a", buffering=1)  # noqa: SIM115 (whole run)

    def mark(phase: str) -> None:
        marks.write(f"{phase} {time.time():.3f}\n")

    marks.write(f"pid {os.getpid()}\n")
    mark("start")
    from trainer import distributed

    world = distributed.init_distributed()
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import SyntheticTokens

    from trainer.config import batch_plan, load_config
    from trainer.construct import build_for_layout
    from trainer.engine import build_engine
    from trainer.loop import Trainer

    try:
        cfg = load_config(None, args.overrides)
        plan = batch_plan(cfg, world.world_size)
        data = SyntheticTokens(cfg, plan.seq_len, plan.global_batch_size * args.steps)
        distributed.barrier()
        mark("construct")
        model, _ = build_for_layout(cfg, plan)  # as trainer.main builds it
        mark("engine")
        engine = build_engine(cfg, model, plan)
        del model
        ones = np.ones(cfg.derived.model.vocab_size)  # token bytes: only evaluate() reads them
        trainer = Trainer(cfg, engine, plan, world, data, token_bytes=ones, peak_flops=1.0)
        distributed.barrier()
        mark("first_step")
        trainer.train_step()
        mark("steady")
        for _ in range(args.steps - 1):
            trainer.train_step()
        distributed.barrier()
        mark("done")
        marks.write(f"maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}\n")
    finally:
        distributed.close()


# ---------------------------------------------------------------------------------------------
# the parent: launch, sample, report


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes, None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def read_marks(path: Path) -> tuple[int | None, list[tuple[str, float]], int | None]:
    """(pid, [(phase, time)], ru_maxrss bytes) of one rank's marks file."""
    pid, phases, maxrss = None, [], None
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "pid":
                pid = int(value)
            elif key == "maxrss":
                maxrss = int(value)
            elif value:
                phases.append((key, float(value)))
    return pid, phases, maxrss


def measure(run: Run, tmp: Path, *, glibc_default: bool = False) -> dict:
    """Launch ``run`` under torchrun and sample its ranks; returns the per-rank figures.

    The ranks start in the environment Kiln's launchers give them
    (:func:`launcher.local.worker_environment`: a bounded glibc mmap threshold unless this
    process's environment sets one); ``glibc_default``: without glibc's ``MALLOC_*`` variables
    (its dynamic mmap threshold), as before the launchers set one."""
    from launcher.local import worker_environment

    env = worker_environment()
    if glibc_default:
        env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    marks = tmp / f"marks-{abs(hash(run.name))}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={run.nproc}", str(Path(__file__).resolve()), "--worker"]
    cmd += [f"--marks={marks}", f"--steps={run.steps}", "--", *run.overrides]
    log = marks.with_suffix(".log")
    peaks: list[dict[str, int]] = [{} for _ in range(run.nproc)]
    last_rss = [0] * run.nproc
    started = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            if time.time() - started > JOB_TIMEOUT_S:
                proc.terminate()
                proc.wait()
                break
            for r in range(run.nproc):
                pid, phases, _ = read_marks(Path(f"{marks}.rank{r}"))
                if pid is None or not phases:
                    continue
                rss = rss_bytes(pid)
                if rss is None:
                    continue
                phase = phases[-1][0]
                last_rss[r] = rss
                peaks[r][phase] = max(peaks[r].get(phase, 0), rss)
            time.sleep(SAMPLE_S)
    result = {"exit": proc.returncode, "ranks": []}
    for r in range(run.nproc):
        _, phases, maxrss = read_marks(Path(f"{marks}.rank{r}"))
        times = dict(phases)
        p = peaks[r]
        steady_s = None
        if "done" in times and run.steps > 1:
            steady_s = (times["done"] - times["steady"]) / (run.steps - 1)
        rank = {
            "construction": max(p.get("start", 0), p.get("construct", 0)),
            "engine": p.get("engine"),
            "first_step": p.get("first_step"),
            "steady": max(p.get("steady", 0), p.get("done", 0)) or None,
            "maxrss": maxrss,
            "last_phase": phases[-1][0] if phases else None,
            "last_rss": last_rss[r],
            "time_to_first_step_s": times["steady"] - started if "steady" in times else None,
            "step_s": steady_s,
        }
        result["ranks"].append(rank)
    if proc.returncode != 0:
        result["log_tail"] = log.read_text()[-2500:]
    return result


def estimate(run_overrides, world: int, *, on_gpu: bool = False, nodes: int = 1):
    from trainer.config import batch_plan, load_config
    from trainer.estimate import memory_estimate

    cfg = load_config(None, list(run_overrides))
    plan = batch_plan(cfg, world)
    return cfg, memory_estimate(cfg, plan, on_gpu=on_gpu, nodes=nodes)


def gib(n: float | None) -> str:
    return "       -" if n is None else f"{n / GIB:8.2f}"


def report(run: Run, result: dict) -> list[str]:
    cfg, est = estimate(run.overrides, run.nproc)
    psi = cfg.derived.model.num_parameters()
    steady_est = est.host_per_rank - est.data_workers  # the rank itself (workers: own processes)
    construct_est = est.runtime + est.construction
    lines = [
        f"\n## {run.name}: {psi / 1e6:.0f}M parameters, ZeRO-{cfg.parallel.zero_stage}, "
        f"{cfg.parallel.pipeline_stages} stage(s), {run.nproc} processes, "
        f"{cfg.train.precision}, micro batch {cfg.train.micro_batch_size}, "
        f"{cfg.data.seq_len} tokens, {run.steps} steps",
        f"estimate per rank (GiB): construction {construct_est / GIB:.2f} (runtime "
        f"{est.runtime / GIB:.2f} + build {est.construction / GIB:.2f}); engine build "
        f"{(est.runtime + est.engine_build) / GIB:.2f}; training "
        f"{steady_est / GIB:.2f} = runtime + parameters {est.parameters / GIB:.2f} + gradients "
        f"{est.gradients / GIB:.2f} + optimizer {est.optimizer_states / GIB:.2f} + max("
        f"activations {est.activations / GIB:.2f} + DeepSpeed buffers {est.buffers / GIB:.2f}, "
        f"optimizer step {est.step_buffers / GIB:.2f})"
        + (f" + host swap {est.host_swap / GIB:.2f}" if est.host_swap else "")
        + (f"; NVMe {est.nvme / GIB:.2f}" if est.nvme else ""),
    ]
    if "refused" in result:
        return [*lines, f"refused before start: {result['refused']}"]
    lines.append(
        "rank  construction    engine  first step    steady   ru_maxrss  est. steady  "
        "measured/est  first step after  step"
    )
    for r, rank in enumerate(result["ranks"]):
        steady = rank["steady"] or rank["first_step"]
        ratio = f"{max(steady or 0, rank['maxrss'] or 0) / steady_est:11.2f}x" if steady else "-"
        t, step = rank["time_to_first_step_s"], rank.get("step_s")
        lines.append(
            f"{r:4}  {gib(rank['construction'])}  {gib(rank.get('engine'))}    "
            f"{gib(rank['first_step'])}  {gib(rank['steady'])}   {gib(rank['maxrss'])}     "
            f"{gib(steady_est)}  {ratio:>12}  "
            + (f"{t:14.1f} s" if t is not None else f"{'-':>16}")
            + (f"  {step:5.1f} s" if step is not None else "")
        )
    if result["exit"] != 0:
        died = [
            f"rank {r}: last seen in {rank['last_phase']} at {gib(rank['last_rss']).strip()} GiB"
            for r, rank in enumerate(result["ranks"])
        ]
        tail = result.get("log_tail", "")
        kind = "killed by SIGKILL (the OOM killer)" if "SIGKILL" in tail else "failed"
        lines.append(f"{kind}: torchrun exit {result['exit']}; " + "; ".join(died))
        if kind == "failed":
            lines.append(tail[-1500:])
    return lines


def plan_lines() -> list[str]:
    """The planner's figures for the 7b and 13b presets on one 8-GPU node (no run)."""
    lines = [
        "\n## plan only: one node of 8 GPUs, bf16, micro batch 1, 2048 tokens "
        "(GiB per rank; host per node)",
        "preset  layout                 device  (states + activations + buffers | step)  "
        "host/rank  host/node  construction/rank",
    ]
    for preset in ("7b", "13b"):
        base = (
            f"model.name={preset}",
            "tokenizer.vocab_size=32000",
            "data.seq_len=2048",
            "train.micro_batch_size=1",
            "train.precision=bf16",
            "launch.nproc_per_node=8",
        )
        layouts = {
            "ZeRO-3 x8": ("parallel.zero_stage=3",),
            "ZeRO-3 x8 + offload": (
                "parallel.zero_stage=3",
                "parallel.offload_optimizer=true",
                "parallel.offload_params=true",
            ),
            "4 stages x 2 ZeRO-1": (
                "parallel.zero_stage=1",
                "parallel.pipeline_stages=4",
                "train.gradient_accumulation_steps=8",
            ),
        }
        for layout, extra in layouts.items():
            _, est = estimate((*base, *extra), 8, on_gpu=True)
            states = est.parameters + est.gradients + est.optimizer_states
            lines.append(
                f"{preset:6}  {layout:20}  {gib(est.total)}  ({states / GIB:.2f} + "
                f"{est.activations / GIB:.2f} + {est.buffers / GIB:.2f} | "
                f"{est.step_buffers / GIB:.2f})"
                f"{'':>14}{gib(est.host_per_rank)}  {gib(est.host_per_node)}  "
                f"{gib(est.construction)}"
            )
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--runs",
        default="plan,125m,1b",
        help="comma-separated: plan,"
        + ",".join(
            runs(argparse.Namespace(largest_layers=1, largest_nvme_layers=1, nvme_path="x"))
        ),
    )
    p.add_argument(
        "--largest-layers", type=int, default=0, help="blocks of 'largest' (0: the planner's)"
    )
    p.add_argument(
        "--largest-nvme-layers",
        type=int,
        default=0,
        help="blocks of 'largest-nvme' (0: the planner's)",
    )
    p.add_argument(
        "--host-share",
        type=float,
        default=0.8,
        help="share of this machine's memory the planner may fill when picking the largest",
    )
    p.add_argument("--nvme-path", default="/tmp/kiln-nvme", help="swap folder for NVMe runs")
    p.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="start the ranks without MALLOC_* variables (glibc's dynamic mmap threshold) "
        "instead of the launchers' environment",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--marks", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    names = [n for n in args.runs.split(",") if n]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if "largest" in names and not args.largest_layers:
        args.largest_layers = largest_layers(False, args.host_share * total)
    if "largest-nvme" in names and not args.largest_nvme_layers:
        args.largest_nvme_layers = largest_layers(True, args.host_share * total, args.nvme_path)
    table = runs(args)
    unknown = [n for n in names if n != "plan" and n not in table]
    if unknown:
        p.error(f"unknown runs {unknown}; choose from plan, {', '.join(table)}")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name == "plan":
                print("\n".join(plan_lines()), flush=True)
                continue
            run = table[name]
            result = {}
            if run.nvme:
                from launcher.preflight import check_nvme_offload
                from trainer.config import load_config
                from trainer.errors import ConfigError

                try:
                    check_nvme_offload(load_config(None, list(run.overrides)))
                    Path(args.nvme_path).mkdir(parents=True, exist_ok=True)
                except ConfigError as e:
                    result = {"refused": str(e)}
            if not result:
                result = measure(run, Path(tmp), glibc_default=args.glibc_malloc)
            figures[name] = result
            print("\n".join(report(run, result)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
