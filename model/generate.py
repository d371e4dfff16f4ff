"""Autoregressive sampling from a `LlamaForCausalLM`: greedy, temperature, top-k, nucleus.

Shape legend: V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.layers import KVCache
from model.llama import LlamaForCausalLM


def _filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set to -inf the logits outside the top k, then outside the nucleus of mass top_p
    (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration", Sec. 3.1).
    logits: (V,) float32; the most likely token always survives."""
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (V,)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        drop = torch.zeros_like(logits, dtype=torch.bool)
        drop[order] = mass_before >= top_p  # keeps the smallest prefix with mass >= top_p
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_args(
    model: LlamaForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    vocab = model.config.vocab_size
    assert vocab is not None  # a built model always has one
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; give at least one token (e.g. the BOS id)")
    bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt_ids has ids outside [0, {vocab}): {bad[:10]}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an int >= 1, or None to disable it")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1], or None to disable it")


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens; returns only the new ids.

    temperature == 0 is greedy (argmax); otherwise logits / temperature are filtered by
    `top_k` and `top_p` (nucleus) and sampled from a CPU generator seeded with `seed` (None =
    nondeterministic). Generation stops after `eos_id` is produced; that id is included.
    The context is the last `max_position_embeddings` tokens. With `use_cache` a per-layer
    key/value cache avoids recomputing the prefix while the sequence fits in
    `max_position_embeddings`; past that, every step recomputes the cropped window (RoPE
    positions shift, so cached keys would be stale). `use_cache=False` always recomputes.

    Raises:
        ValueError: empty prompt or ids outside the vocabulary, max_new_tokens < 0,
        temperature < 0, top_k < 1, top_p outside (0, 1].
    """
    _check_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    max_pos = model.config.max_position_embeddings
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    ids = list(prompt_ids)
    cache: list[KVCache] | None = None
    for _ in range(max_new_tokens):
        if cache is not None and len(ids) <= max_pos and cache[0].length == len(ids) - 1:
            window = ids[-1:]  # the cache holds every earlier position
        else:
            window = ids[-max_pos:]
            cache = model.new_kv_cache() if use_cache and len(ids) <= max_pos else None
        inputs = torch.tensor([window], dtype=torch.long, device=device)  # (1, T)
        logits = model(inputs, kv_cache=cache)[0, -1].float().cpu()  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = _filter_logits(logits / temperature, top_k, top_p)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        ids.append(token)
        if token == eos_id:
            break
    return ids[len(prompt_ids) :]
