"""Cost of document-masked attention (``data.document_mask``, ``data.reset_position_ids``):
training-step time with and without it, and the attention op alone through an SDPA boolean
mask (what Kiln uses, ``model.layers.allowed_keys``) beside ``flex_attention`` block masks.

Step: a plain model of the preset (fp32, one process, no DeepSpeed: only the forward differs
between the settings; one model and optimizer for all), forward + loss + backward +
``torch.optim.AdamW`` step on one fixed batch of packed rows: random tokens with an EOS ending
each document, document lengths drawn geometrically with mean ``--doc-len`` tokens. The batch
comes from ``trainer.objectives.CausalLM`` for each setting (``off``: ``input_ids`` only, SDPA's
``is_causal``; ``mask``: + ``document_ids``; ``mask+reset``: + ``position_ids``). After one
warm-up step each, the settings run alternated (the order rotated each round), ``--rounds``
times; the table gives each one's median step time and the median over the rounds of its
ratio to ``off`` in the same round.

Attention op (``--attention``): forward + backward of one attention call at the preset's shape
(B, H, T, Dh), causal, with the same documents: SDPA ``is_causal`` (no mask), SDPA with the
(B, 1, T, T) boolean mask, and ``torch.compile``'d ``flex_attention`` with a ``BlockMask`` from
``create_block_mask`` (its compile time reported separately, then timed like the others). Where
``flex_attention`` has no backward (torch 2.13 on a CPU raises ``NotImplementedError``), all
of them are timed forward only (inputs without gradients).

    python bench/document_mask.py                                  # debug preset
    python bench/document_mask.py --preset 125m --micro-batch-size 2 --seq-len 512 --attention
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

SETTINGS = ("off", "mask", "mask+reset")
EOS = 2


def packed_rows(batch: int, seq_len: int, doc_len: float, vocab: int, seed: int = 0):
    """(batch, seq_len + 1) int64 rows of random tokens in documents ending with EOS."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(4, vocab, (batch, seq_len + 1))
    for row in rows:
        at = 0
        while True:
            at += int(rng.geometric(1.0 / doc_len))
            if at > seq_len:
                break
            row[at - 1] = EOS
    return rows


def step_timer(args):
    """One step function per setting over one model and optimizer (the weights drift from step
    to step, which does not change a step's work; one copy keeps the 125m preset's memory low)."""
    from model import build_model
    from model.registry import get_preset
    from trainer.objectives import CausalLM, token_loss

    cfg = get_preset(args.preset).model_copy(update={"vocab_size": args.vocab})
    rows = packed_rows(args.micro_batch_size, args.seq_len, args.doc_len, args.vocab)
    objectives = {
        "off": CausalLM(),
        "mask": CausalLM(document_mask=True, eos_id=EOS),
        "mask+reset": CausalLM(document_mask=True, reset_position_ids=True, eos_id=EOS),
    }
    model = build_model(cfg, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = {}
    for name, objective in objectives.items():
        batch = objective(rows, None, 0)

        def step(batch=batch) -> float:
            start = time.perf_counter()
            loss = token_loss(model(**batch.inputs), batch.labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        step()  # warm-up: allocations, optimizer state
        steps[name] = step
    docs = objectives["mask"](rows, None, 0).inputs["document_ids"]
    return steps, docs, cfg


def report(times: dict[str, list[float]], reference: str, what: str) -> None:
    print(f"{what}\n{'':<26} {'median ms':>10} {'x ' + reference:>16}")
    for name, ts in times.items():
        ratio = statistics.median(t / r for t, r in zip(ts, times[reference], strict=True))
        print(f"{name:<26} {statistics.median(ts) * 1e3:>10.2f} {ratio:>16.3f}")


def attention_bench(args, docs: torch.Tensor, cfg) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from model.layers import allowed_keys

    B, T = docs.shape
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, Dh, generator=gen, requires_grad=True) for _ in range(3))
    mask = allowed_keys(T, T, causal=True, query_documents=docs)  # (B, 1, T, T)

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    flex = torch.compile(flex_attention, dynamic=False)
    backward = True
    start = time.perf_counter()
    block_mask = create_block_mask(document_causal, B, None, T, T, device=str(q.device))
    try:
        flex(q, k, v, block_mask=block_mask).sum().backward()
    except NotImplementedError as e:  # torch 2.13 on CPU: forward only
        print(f"flex_attention cannot train here: {e}; timing forwards only")
        backward = False
        q, k, v = q.detach(), k.detach(), v.detach()  # flex checks requires_grad, not the mode
        flex(q, k, v, block_mask=block_mask)
    print(f"flex_attention: first call (compile) {time.perf_counter() - start:.1f} s")
    with torch.no_grad():
        y_flex = flex(q, k, v, block_mask=block_mask)
        y_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    print(f"flex vs SDPA mask: max |diff| {(y_flex - y_sdpa).abs().max().item():.2e}")

    calls = {
        "sdpa is_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa bool mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa mask + build": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed_keys(T, T, causal=True, query_documents=docs)
        ),
        "flex block mask": lambda: flex(q, k, v, block_mask=block_mask),
        "flex + create_block_mask": lambda: flex(
            q, k, v, block_mask=create_block_mask(document_causal, B, None, T, T, device="cpu")
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            if backward:
                call().sum().backward()
                q.grad = k.grad = v.grad = None
            else:
                with torch.no_grad():
                    call()
            times[name].append(time.perf_counter() - start)
    what = "forward + backward" if backward else "forward"
    report(times, "sdpa is_causal", f"attention {what} B{B} H{H} T{T} Dh{Dh}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--doc-len", type=float, default=64.0, help="mean document length (tokens)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--attention", action="store_true", help="also time the attention op alone")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    steps, docs, cfg = step_timer(args)
    ndocs = float((docs.max(dim=1).values + 1).float().mean())
    print(
        f"preset {args.preset}: micro batch {args.micro_batch_size} x {args.seq_len} tokens, "
        f"{ndocs:.1f} documents per row, fp32, {torch.get_num_threads()} threads"
    )
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        order = SETTINGS[r % 3 :] + SETTINGS[: r % 3]  # rotate: no setting always first
        for name in order:
            times[name].append(steps[name]())
    report(times, "off", "training step")
    if args.attention:
        attention_bench(args, docs, cfg)


if __name__ == "__main__":
    main()
