"""Sampling: greedy determinism, top-k / nucleus filters, eos, context crop, KV cache."""

from __future__ import annotations

import pytest
import torch

from model.generate import _filter_logits, generate
from model.llama import LlamaConfig, LlamaForCausalLM

VOCAB = 61


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=16, initializer_range=0.5)
    return LlamaForCausalLM.from_config(cfg, seed=0).eval()


PROMPT = [3, 14, 15, 9, 2, 6]


def test_greedy_is_deterministic_and_full_length(model: LlamaForCausalLM) -> None:
    a = generate(model, PROMPT, max_new_tokens=8, temperature=0)
    assert a == generate(model, PROMPT, max_new_tokens=8, temperature=0)
    assert len(a) == 8 and all(0 <= t < VOCAB for t in a)
    assert len(set(a)) > 1  # a non-degenerate model, so the tests below can tell things apart
    assert generate(model, PROMPT, max_new_tokens=0, temperature=0) == []


def test_greedy_matches_argmax_of_full_forward(model: LlamaForCausalLM) -> None:
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert generate(model, PROMPT, max_new_tokens=5, temperature=0) == ids[len(PROMPT) :]


def test_top_k_1_and_tiny_top_p_equal_greedy(model: LlamaForCausalLM) -> None:
    greedy = generate(model, PROMPT, max_new_tokens=8, temperature=0)
    assert generate(model, PROMPT, max_new_tokens=8, top_k=1, seed=1) == greedy
    assert generate(model, PROMPT, max_new_tokens=8, top_p=1e-6, seed=2) == greedy


def test_sampling_is_seeded(model: LlamaForCausalLM) -> None:
    def sample(seed: int) -> list[int]:
        return generate(model, PROMPT, max_new_tokens=10, temperature=1.5, top_k=40, seed=seed)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_eos_stops_and_is_returned(model: LlamaForCausalLM) -> None:
    greedy = generate(model, PROMPT, max_new_tokens=8, temperature=0)
    i = next(i for i in range(1, 8) if greedy[i] not in greedy[:i])  # first new token after 0
    out = generate(model, PROMPT, max_new_tokens=8, temperature=0, eos_id=greedy[i])
    assert out == greedy[: i + 1]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9}])
def test_kv_cache_equals_recompute_past_the_context_limit(
    model: LlamaForCausalLM, sampling: dict
) -> None:
    # 6 prompt + 20 new tokens runs past max_position_embeddings=16, exercising the crop.
    kwargs = dict(max_new_tokens=20, seed=5, **sampling)
    cached = generate(model, PROMPT, use_cache=True, **kwargs)
    assert cached == generate(model, PROMPT, use_cache=False, **kwargs)
    assert len(cached) == 20
    long_prompt = list(range(30))  # longer than the context: cropped to the last 16
    assert generate(model, long_prompt, **kwargs) == generate(model, long_prompt[-16:], **kwargs)


def test_filter_logits_top_k_and_nucleus() -> None:
    logits = torch.tensor([0.5, 0.1, 0.3, 0.05, 0.05]).log()
    kept = _filter_logits(logits, top_k=2, top_p=None).isfinite()
    assert kept.tolist() == [True, False, True, False, False]
    # Nucleus: smallest set with mass >= 0.7 is {0.5, 0.3}; >= 0.85 adds 0.1.
    assert _filter_logits(logits, None, 0.7).isfinite().tolist() == [
        True,
        False,
        True,
        False,
        False,
    ]
    assert _filter_logits(logits, None, 0.85).isfinite().sum() == 3
    assert _filter_logits(logits, None, 1.0).isfinite().all()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"prompt_ids": []}, "prompt_ids"),
        ({"prompt_ids": [VOCAB]}, "prompt_ids"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_arguments_raise(model: LlamaForCausalLM, kwargs: dict, needle: str) -> None:
    args = {"prompt_ids": PROMPT, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=needle):
        generate(model, **args)
