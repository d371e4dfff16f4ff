"""Step time of Kiln's training loop with the health supervisor on and off.

One engine and one :class:`trainer.loop.Trainer` (``Trainer.train_step``: forward, backward, the
step's agreement all-reduce with the supervisor's decision, the optimizer step) on synthetic
tokens (``bench/throughput.py``'s :class:`SyntheticTokens`). After ``--warmup`` steps, blocks of
``--steps`` steps run alternately with the supervisor on (``health.enabled=true``, its windows
filled with ``health.window`` values, so every step computes both medians and MADs) and off
(``health.enabled=false``: the agreement still carries the stop flags and losses), ``--repeats``
times each. Reported:

* step time on / off: the median over the blocks of each (seconds per optimizer step);
* overhead = median of the paired block ratios on / off - 1 (noise on a shared CPU: several %);
* supervisor time: the wall time of ``Trainer._agree`` itself per step with the supervisor on
  (all-reduce, host sync, decision) as a share of the step time, the overhead not hidden by
  the noise. Before the supervisor the loop already did this all-reduce, of 2 flags.

Target: overhead at most 1% of the step time.

    python bench/health_overhead.py                                  # 125m, 1 process
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/health_overhead.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="125m", help="Llama preset")
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="blocks with the supervisor on (and off)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    from trainer import distributed

    world = distributed.init_distributed()
    from throughput import SyntheticTokens

    from model import build_model
    from trainer.config import batch_plan, load_config
    from trainer.engine import build_engine
    from trainer.health import Supervisor
    from trainer.loop import Trainer

    overrides = [
        f"model.name={args.preset}",
        f"tokenizer.vocab_size={args.vocab_size}",
        f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch_size}",
    ]
    cfg = load_config(None, overrides)
    off_cfg = load_config(None, [*overrides, "health.enabled=false"])
    plan = batch_plan(cfg, world.world_size)
    total_steps = args.warmup + 2 * args.repeats * args.steps
    data = SyntheticTokens(cfg, plan.seq_len, plan.global_batch_size * total_steps)
    engine = build_engine(cfg, build_model(cfg.derived.model, seed=cfg.train.seed), plan)
    ones = np.ones(cfg.derived.model.vocab_size)
    trainer = Trainer(cfg, engine, plan, world, data, token_bytes=ones, peak_flops=1.0)
    on = Supervisor(cfg.health, world.world_size)
    rng = np.random.default_rng(0)
    on.losses.extend(1e6 + rng.random(cfg.health.window))  # high: no step counts as a spike
    on.grad_norms.extend(1e6 + rng.random(cfg.health.window))
    off = Supervisor(off_cfg.health, world.world_size)

    agree = trainer._agree
    agree_s: list[float] = []

    def timed_agree() -> None:
        start = time.perf_counter()
        agree()
        agree_s.append(time.perf_counter() - start)

    trainer._agree = timed_agree
    for _ in range(args.warmup):
        trainer.train_step()
    blocks: dict[str, list[float]] = {"on": [], "off": []}
    on_agree: list[float] = []
    for _ in range(args.repeats):
        for name, supervisor in (("on", on), ("off", off)):
            trainer.supervisor = supervisor
            agree_s.clear()
            distributed.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            blocks[name].append((time.perf_counter() - start) / args.steps)
            if name == "on":
                on_agree += agree_s
    ratios = [a / b for a, b in zip(blocks["on"], blocks["off"], strict=True)]
    step_on, step_off = statistics.median(blocks["on"]), statistics.median(blocks["off"])
    result = {
        "preset": args.preset,
        "world_size": world.world_size,
        "step_s_on": step_on,
        "step_s_off": step_off,
        "overhead": statistics.median(ratios) - 1,
        "block_ratios": ratios,
        "supervisor_s_per_step": statistics.median(on_agree),
        "supervisor_share": statistics.median(on_agree) / step_on,
    }
    if world.is_main:
        print(
            f"{args.preset} on {world.world_size} process(es): step {step_on:.3f} s with the "
            f"supervisor, {step_off:.3f} s without: overhead {100 * result['overhead']:+.2f}% "
            f"(block ratios {', '.join(f'{r:.3f}' for r in ratios)}); the agreement with the "
            f"decision takes {1e3 * result['supervisor_s_per_step']:.3f} ms a step = "
            f"{100 * result['supervisor_share']:.4f}% of the step "
            f"({'PASS' if result['supervisor_share'] <= 0.01 else 'FAIL'}: target <= 1%)"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    distributed.close()


if __name__ == "__main__":
    main()
