"""Peak memory and time of a training step per activation-checkpointing choice
(``train.activation_checkpointing`` and ``_every``), beside the dry-run's activation estimate.

Each choice runs in a fresh Python process (``--worker``): it builds the preset (plain PyTorch,
fp32, no DeepSpeed, so only the model's activations differ between choices), applies
``trainer.engine.apply_activation_checkpointing``, allocates every gradient, then runs one
warm-up and ``--repeats`` timed steps of forward + loss + backward on random tokens (the
chunked loss, 256 tokens a chunk, so the logits do not swamp the blocks' figures); time is the
fastest step (the least disturbed on a shared machine).
Memory: ``ru_maxrss`` (peak resident set) minus the resident size before the first step
(weights and gradients already there), i.e. what the step's activations and temporaries add;
workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed blocks return to the system. The
estimate column is :func:`trainer.estimate.activation_bytes` for the same shape (blocks only:
logits, embedding output and temporaries come on top in the measurement).

    python bench/activation_checkpointing.py                     # tiny preset, 8 x 512 tokens
    python bench/activation_checkpointing.py --preset 125m --micro-batch-size 2 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHOICES = ("none", "full", "full/2", "attention", "mlp", "mlp/2")


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def worker(choice: str, args) -> None:
    """One choice in this process; prints a JSON line of its figures."""
    import torch

    from model import build_model
    from model.registry import get_preset, spec
    from trainer.engine import apply_activation_checkpointing
    from trainer.estimate import activation_bytes

    mode, _, every = choice.partition("/")
    every = int(every or 1)
    torch.manual_seed(0)
    cfg = get_preset(args.preset).model_copy(update={"vocab_size": args.vocab})
    model = build_model(cfg, seed=0).train()
    apply_activation_checkpointing(model, mode, every)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    B, T = args.micro_batch_size, args.seq_len
    ids = torch.randint(0, args.vocab, (B, T + 1))

    def step() -> float:
        # the chunked loss, so that the (tokens x vocab) logits do not swamp the blocks' figures
        loss = model(ids[:, :-1], labels=ids[:, 1:], loss_chunk_tokens=256)
        loss.backward()
        return loss.item()

    base = _rss_bytes()
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stacks = spec(cfg).activation_stacks(cfg, (T,))
    estimate = activation_bytes(stacks, B, 4, mode, every)
    figures = dict(choice=choice, loss=loss, added_gib=(peak - base) / 2**30)
    figures.update(estimate_gib=estimate / 2**30, step_s=min(times[1:]))
    print(json.dumps(figures))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="a decoder preset (model.llama.presets)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--choices", default=",".join(CHOICES), help="mode[/every], comma-separated")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    print(
        f"# {args.preset} decoder, fp32, {args.micro_batch_size} x {args.seq_len} tokens, vocab "
        f"{args.vocab}; fresh process per choice; step = forward + chunked loss + backward"
    )
    print(f"{'choice':<11} {'added GiB':>10} {'blocks est.':>12} {'step s':>8} {'vs none':>8}")
    none = None
    for choice in args.choices.split(","):
        cmd = [sys.executable, __file__, "--worker", choice, *sys.argv[1:]]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(REPO)}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{choice} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        none = none or (r if choice == "none" else None)
        ratio = f"{r['step_s'] / none['step_s']:.2f}" if none else "-"
        print(
            f"{choice:<11} {r['added_gib']:>10.3f} {r['estimate_gib']:>12.3f} "
            f"{r['step_s']:>8.3f} {ratio:>8}"
        )


if __name__ == "__main__":
    main()
