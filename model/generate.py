"""Autoregressive sampling from a `LlamaForCausalLM` (`generate`) or a
`T5ForConditionalGeneration` (`generate_seq2seq`, `fill_in_spans`): greedy, temperature, top-k,
nucleus.

Shape legend: V vocab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from model.layers import KVCache

if TYPE_CHECKING:  # the families import this module for their spec's `complete`
    from model.llama.model import LlamaForCausalLM
    from model.t5.model import T5ForConditionalGeneration


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
    model: LlamaForCausalLM | T5ForConditionalGeneration,
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
    generator = _generator(seed)
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
        token = _pick(logits, temperature, top_k, top_p, generator)
        ids.append(token)
        if token == eos_id:
            break
    return ids[len(prompt_ids) :]


def _pick(logits: Tensor, temperature: float, top_k, top_p, generator) -> int:
    """The next token from logits (V,) float32: argmax at temperature 0, else a sample."""
    if temperature == 0:
        return int(logits.argmax())
    logits = _filter_logits(logits / temperature, top_k, top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@torch.no_grad()
def generate_seq2seq(
    model: T5ForConditionalGeneration,
    input_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Decode up to `max_new_tokens` target tokens for the encoder input `input_ids`.

    The encoder runs once; the decoder starts from `decoder_start_token_id` and stops after the
    config's `eos_token_id` (included in the result). Sampling as :func:`generate`. With
    `use_cache` the decoder keeps per-layer self- and cross-attention keys and values (T5's
    relative positions do not shift, so the cache is always valid); without it every step runs
    the decoder over the whole prefix.

    Returns:
        the generated ids, without the start id.

    Raises:
        ValueError: as :func:`generate`.
    """
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    generator = _generator(seed)
    memory = model.encode(torch.tensor([input_ids], dtype=torch.long, device=device))
    ids = [model.config.decoder_start_token_id]
    cache = model.new_cache() if use_cache else None
    for _ in range(max_new_tokens):
        window = ids[-1:] if cache is not None else ids
        step = torch.tensor([window], dtype=torch.long, device=device)  # (1, T)
        logits = model.decode(step, memory, cache=cache)[0, -1].float().cpu()  # (V,)
        token = _pick(logits, temperature, top_k, top_p, generator)
        ids.append(token)
        if token == model.config.eos_token_id:
            break
    return ids[1:]


def fill_in_spans(
    input_ids: list[int], output_ids: list[int], sentinel_ids: np.ndarray | list[int], eos_id: int
) -> list[int]:
    """The input with each sentinel replaced by the span the model generated for it.

    The output reads ``<extra_id_0> span0 <extra_id_1> span1 ... </s>`` (span corruption
    targets); a sentinel of the input with no span in the output is left as it is.
    """
    sentinels = [int(s) for s in sentinel_ids]
    index = {s: i for i, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current: int | None = None
    for t in output_ids:
        if t == eos_id:
            break
        if t in index:
            current = index[t]
            spans[current] = []
        elif current is not None:
            spans[current].append(t)
    out: list[int] = []
    for t in input_ids:
        if t in index and index[t] in spans:
            out += spans[index[t]]
        elif t != eos_id:
            out.append(t)
    return out
