"""Peak memory and time of one training step of the output head + loss: the plain path against
the chunked loss (``train.loss_chunk_tokens``), at a Llama-3-sized vocabulary.

The step is what the trainer runs past the last block: final hidden states h (T, D) and the head
weight (V, D) (both parameters-to-be with gradients) -> loss -> backward, so the peak holds the
weight, its gradient, h and whatever the loss keeps. Variants:

* ``plain``: ``token_loss(F.linear(h, w), labels)``, today's path (the (T, V) logits in fp32,
  their log-softmax and gradients);
* ``chunked``: ``model.layers.linear_cross_entropy`` (the custom autograd Function: only each
  token's log-sum-exp is kept; backward recomputes each chunk's logits);
* ``checkpoint``: the same chunks through ``torch.utils.checkpoint`` (non-reentrant), each
  chunk's plain loss recomputed in backward: the alternative the Function was measured against.

Each variant runs in a fresh Python process (``--worker``), so each peak is its own:
``ru_maxrss`` (peak resident set, Linux KiB) of that process, and the resident size right after
the weight, h and labels exist (``/proc/self/statm``); the difference is what the loss step adds.
Workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed large blocks return to the system and
the peak reflects live tensors, not glibc's retention. Time: the median of ``--repeats`` steps
after one warm-up step (on 2 cores the step is dominated by the three or four (T x D x V)
matmuls).

Defaults: V = 128256 (Llama 3), T = 2048 tokens, D = 2048, fp32, chunks of 1024 and 256
tokens: about 6 GiB for the plain variant; wrap it in ``flock /tmp/kiln-heavy.lock`` on a shared
machine. Every variant holds the weight and makes its gradient (V x D each); the ``loss``
column is what is left beyond those.

    flock /tmp/kiln-heavy.lock python bench/loss_memory.py
    python bench/loss_memory.py --vocab 32000 --tokens 1024 --hidden 512 --chunks 128,512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "chunked", "checkpoint")


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def worker(
    variant: str, vocab: int, tokens: int, hidden: int, chunk: int, dtype: str, repeats: int
):
    """One variant in this process; prints a JSON line of its figures."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from model.layers import linear_cross_entropy
    from trainer.objectives import token_loss

    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    # drawn in their dtype: an fp32 draw cast to bf16 would set the peak before the step runs
    h = torch.empty(tokens, hidden, dtype=dt).normal_(0, hidden**-0.5).requires_grad_()
    w = torch.empty(vocab, hidden, dtype=dt).normal_(0, 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))

    def chunk_loss(h_c, y):
        return token_loss(F.linear(h_c, w)[None], y[None], reduction="sum")

    def step():
        if variant == "plain":
            loss = token_loss(F.linear(h, w)[None], labels[None])
        elif variant == "chunked":
            loss = linear_cross_entropy(h, w, labels, chunk)
        else:
            total = sum(
                checkpoint(chunk_loss, h[s : s + chunk], labels[s : s + chunk], use_reentrant=False)
                for s in range(0, tokens, chunk)
            )
            loss = total / tokens
        loss.backward()
        h.grad = w.grad = None
        return loss.item()

    base = _rss_bytes()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures = dict(variant=variant, loss=loss, base_gib=base / 2**30, peak_gib=peak / 2**30)
    figures.update(added_gib=(peak - base) / 2**30, step_s=statistics.median(times[1:]))
    print(json.dumps(figures))


def run(variant: str, chunk: int, args) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", variant, "--vocab", str(args.vocab),
        "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--chunk", str(chunk),
        "--dtype", args.dtype, "--repeats", str(args.repeats),
    ]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)  # the worker's
    p.add_argument("--chunks", default="1024,256", help="tokens per chunk, comma-separated")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    grad_gib = args.vocab * args.hidden * {"fp32": 4, "bf16": 2}[args.dtype] / 2**30
    if args.worker:
        worker(args.worker, args.vocab, args.tokens, args.hidden, args.chunk, args.dtype,
               args.repeats)  # fmt: skip
        return
    print(
        f"# head + loss step: V={args.vocab}, T={args.tokens} tokens, D={args.hidden}, "
        f"{args.dtype}; fresh process each. peak: the process's peak RSS; added: peak - RSS "
        f"with w, h, labels allocated; loss: added - the weight's gradient ({grad_gib:.2f} GiB, "
        f"which every variant makes), i.e. what the loss itself holds"
    )
    print(
        f"{'variant':<16} {'peak GiB':>9} {'added GiB':>10} {'loss GiB':>9} {'peak/plain':>10} "
        f"{'loss/plain':>10} {'step s':>7} loss"
    )
    plain = None
    for variant in args.variants.split(","):
        for chunk in [0] if variant == "plain" else [int(c) for c in args.chunks.split(",")]:
            r = run(variant, chunk, args)
            r["loss_gib"] = r["added_gib"] - grad_gib
            plain = plain or (r if variant == "plain" else None)
            name = variant if variant == "plain" else f"{variant}/{chunk}"
            ratios = f"{'-':>10} {'-':>10}"
            if plain:
                peak, loss = r["peak_gib"] / plain["peak_gib"], r["loss_gib"] / plain["loss_gib"]
                ratios = f"{peak:>10.2f} {loss:>10.2f}"
            print(
                f"{name:<16} {r['peak_gib']:>9.2f} {r['added_gib']:>10.2f} {r['loss_gib']:>9.2f} "
                f"{ratios} {r['step_s']:>7.2f} {r['loss']:.6f}"
            )


if __name__ == "__main__":
    main()
