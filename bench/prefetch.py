"""Data wait and step time of Kiln's training loop with batches read synchronously, prefetched by
DataLoader worker processes (:mod:`trainer.data.prefetch`, what the loop uses) and prefetched by
a background thread (:class:`ThreadPrefetcher`, the alternative, kept here for the comparison).

One engine and one :class:`trainer.loop.Trainer` per preset (``Trainer.train_step``) on synthetic
tokens (``bench/throughput.py``'s :class:`SyntheticTokens`: rows in memory, made into batches by
the run's objective, span corruption for T5, in whichever process or thread prepares them). The
loop's batch source (``trainer.batches``) is swapped between blocks of ``--steps`` optimizer steps,
rotated ``--repeats`` times: ``sync`` (``data.prefetch_steps=0``), ``dataloader`` and ``thread``
(``--prefetch-steps`` ahead). Each block starts its source afresh at the block's first step (the
order jumped), as a resume or rollback does; that step is reported apart ("restart") and left out
of the steady figures. Reported per preset and source:

* step s: median wall time of the steady steps;
* wait ms: median time per step that ``train_step`` spent getting batches and copying them to the
  device (the loop's ``data_wait_s``), and wait % = its share of the step;
* x sync: median over the rounds of (sync step time / this source's step time): what the source
  saves or costs beyond its own wait (a thread's GIL contention shows here, not in its wait);
* restart ms: median data wait of the first step of a block (worker start + first batch).

Target (issue 17): the loop's data wait under 2% of the step, both families.

    python bench/prefetch.py                                  # 125m and t5:small, fp32, CPU
    python bench/prefetch.py --presets t5:base --micro-batch-size 8 --accumulation 4
"""

from __future__ import annotations

import argparse
import copy
import json
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_PCT = 2.0


class ThreadPrefetcher:
    """The interface of :class:`trainer.data.prefetch.Prefetcher` served by one background thread
    of the training process: a bounded ``queue.Queue`` of ``prefetch_steps x accumulation``
    micro-batches, filled in order from a copy of the data (its sampler caches are not
    thread-safe); restarted when a request breaks the order or the exclusions change."""

    def __init__(self, data, plan, dp_rank: int, *, prefetch_steps: int, max_steps: int):
        self.data, self.plan, self.dp_rank = data, plan, dp_rank
        self.prefetch_steps, self.max_steps = prefetch_steps, max_steps
        self._thread: threading.Thread | None = None
        self._next = -1
        self._excluded = np.zeros(0, dtype=np.int64)

    def start(self, step: int, micro: int = 0) -> None:
        from trainer.data.prefetch import micro_batch

        self.close()
        accumulation = self.plan.gradient_accumulation_steps
        first = step * accumulation + micro
        self._queue = queue.Queue(self.prefetch_steps * accumulation)
        self._stop = threading.Event()
        data, stop, q = copy.deepcopy(self.data), self._stop, self._queue
        args = (self.plan, self.dp_rank)

        def fill() -> None:
            for k in range(first, self.max_steps * accumulation):
                try:
                    item = micro_batch(data, *args, *divmod(k, accumulation))
                except Exception as e:
                    item = e
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return

        self._thread = threading.Thread(target=fill, daemon=True, name="prefetch")
        self._thread.start()
        self._next, self._excluded = first, self.data.excluded.copy()

    def get(self, step: int, micro: int):
        k = step * self.plan.gradient_accumulation_steps + micro
        if (
            self._thread is None
            or k != self._next
            or len(self._excluded) != len(self.data.excluded)
        ):
            self.start(step, micro)
        item = self._queue.get()
        self._next += 1
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="125m,t5:small", help="comma-separated; t5:NAME for T5")
    p.add_argument("--steps", type=int, default=4, help="steps per block (the first: restart)")
    p.add_argument("--repeats", type=int, default=3, help="blocks per source")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--prefetch-steps", type=int, default=2, help="steps made ahead")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--accumulation", type=int, default=4, help="micro-batches per step")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    from trainer import distributed

    world = distributed.init_distributed()
    rows = [bench_preset(args, preset, world) for preset in args.presets.split(",") if preset]
    if world.is_main:
        report(args, rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    distributed.close()


def bench_preset(args, preset: str, world) -> list[dict]:
    """The blocks of one preset: one engine and Trainer, the batch source swapped per block."""
    from throughput import SyntheticTokens

    from model import build_model
    from trainer import distributed
    from trainer.config import batch_plan, load_config
    from trainer.data.prefetch import Prefetcher
    from trainer.engine import build_engine
    from trainer.loop import Trainer

    family, _, name = preset.rpartition(":")
    total_steps = args.warmup + 3 * args.repeats * args.steps
    cfg = load_config(
        None,
        [
            f"model.model_type={family or 'llama'}",
            f"model.name={name}",
            f"tokenizer.vocab_size={args.vocab_size}",
            f"data.seq_len={args.seq_len}",
            f"train.micro_batch_size={args.micro_batch_size}",
            f"train.gradient_accumulation_steps={args.accumulation}",
            f"train.max_steps={total_steps}",
        ],
    )
    plan = batch_plan(cfg, world.world_size)
    data = SyntheticTokens(cfg, plan.seq_len, plan.global_batch_size * total_steps)
    engine = build_engine(cfg, build_model(cfg.derived.model, seed=cfg.train.seed), plan)
    ones = np.ones(cfg.derived.model.vocab_size)
    trainer = Trainer(cfg, engine, plan, world, data, token_bytes=ones, peak_flops=1.0)
    pin = world.device.type == "cuda"
    common = dict(max_steps=total_steps)
    sources = {
        "sync": Prefetcher(data, plan, trainer.dp_rank, prefetch_steps=0, **common),
        "dataloader": Prefetcher(
            data,
            plan,
            trainer.dp_rank,
            prefetch_steps=args.prefetch_steps,
            pin_memory=pin,
            **common,
        ),
        "thread": ThreadPrefetcher(
            data, plan, trainer.dp_rank, prefetch_steps=args.prefetch_steps, **common
        ),
    }
    trainer.batches = sources["sync"]
    for _ in range(args.warmup):
        trainer.train_step()
    steps: dict[str, list[tuple[float, float]]] = {s: [] for s in sources}  # (step s, wait s)
    restarts: dict[str, list[float]] = {s: [] for s in sources}
    rounds: list[dict[str, float]] = []
    for r in range(args.repeats):
        names = list(sources)[r % 3 :] + list(sources)[: r % 3]
        medians = {}
        for source in names:
            trainer.batches = sources[source]
            block = []
            for i in range(args.steps):
                trainer.data_wait_s = 0.0
                distributed.barrier()
                start = time.perf_counter()
                trainer.train_step()
                if world.device.type == "cuda":
                    import torch

                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                if i == 0:
                    restarts[source].append(trainer.data_wait_s)
                else:
                    block.append((elapsed, trainer.data_wait_s))
            sources[source].close()
            if world.is_main:
                print(f"{preset} {source}: steps {[round(s, 3) for s, _ in block]} s", flush=True)
            steps[source] += block
            medians[source] = statistics.median(s for s, _ in block)
        rounds.append(medians)
    out = []
    for source in sources:
        step_s = statistics.median(s for s, _ in steps[source])
        wait_s = statistics.median(w for _, w in steps[source])
        out.append(
            {
                "preset": preset,
                "source": source,
                "step_s": step_s,
                "wait_ms": 1e3 * wait_s,
                "wait_pct": 100 * statistics.median(w / s for s, w in steps[source]),
                "x_sync": statistics.median(r["sync"] / r[source] for r in rounds),
                "restart_ms": 1e3 * statistics.median(restarts[source]),
                "micro_batches": plan.gradient_accumulation_steps,
                "micro_batch_size": plan.micro_batch_size,
                "device": str(world.device),
            }
        )
    return out


def report(args, rows: list[list[dict]]) -> None:
    head = f"{'preset':>9} {'source':>10} {'step s':>7} {'wait ms':>8} {'wait %':>7} {'x sync':>7}"
    head += f" {'restart ms':>10}"
    print(f"\n{head}\n{'-' * len(head)}")
    for preset_rows in rows:
        for r in preset_rows:
            print(
                f"{r['preset']:>9} {r['source']:>10} {r['step_s']:>7.3f} {r['wait_ms']:>8.2f} "
                f"{r['wait_pct']:>7.2f} {r['x_sync']:>7.3f} {r['restart_ms']:>10.1f}"
            )
    first = rows[0][0] if rows and rows[0] else {}
    print(
        f"\n{first.get('device', '?')}, micro batch {args.micro_batch_size} x {args.accumulation} "
        f"micro-batches per step, seq_len {args.seq_len}, {args.prefetch_steps} steps ahead; "
        f"medians over {args.repeats} blocks of {args.steps - 1} steady steps per source "
        "(x sync: per round); restart: the first step of a block."
    )
    for preset_rows in rows:
        for r in preset_rows:
            if r["source"] == "dataloader":
                verdict = "PASS" if r["wait_pct"] < TARGET_PCT else "FAIL"
                print(
                    f"{r['preset']}: data wait {r['wait_pct']:.2f}% of the step with prefetching "
                    f"(target < {TARGET_PCT}%) {verdict}"
                )


if __name__ == "__main__":
    main()
