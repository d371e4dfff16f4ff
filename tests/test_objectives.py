"""Span corruption and prefix LM: T5's length arithmetic, the invariants of the examples, batch
layout, determinism, the sentinel tokenizer and the family's config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE, T5_OVERRIDES, T5_SENTINELS

from model.tokenizer import Tokenizer, sentinel_piece, train_tokenizer
from trainer.config import ConfigError, load_config
from trainer.objectives import (
    IGNORE_INDEX,
    TRAIN_STREAM,
    Seq2Seq,
    build_objective,
    check_tokenizer,
    random_spans_noise_mask,
    raw_length_for_inputs,
    span_corruption,
    span_corruption_lengths,
)

SENTINELS = np.arange(1000, 900, -1)  # <extra_id_0> = 1000, <extra_id_1> = 999, ...
EOS, PAD = 2, 3


def test_lengths_are_t5s():
    # t5.data.preprocessors.random_spans_helper(512, 0.15, 3) = (568, 114)
    n = span_corruption_lengths(568, 0.15, 3.0)
    assert (n.num_noise_tokens, n.num_noise_spans) == (85, 28)
    assert (n.inputs_length, n.targets_length) == (512, 114)
    assert raw_length_for_inputs(512, 0.15, 3.0) == 568
    assert span_corruption_lengths(10, 0.01, 3.0).num_noise_tokens == 1  # at least one


def _corrupt(raw: int, index: int, density=0.15, span=3.0):
    rng = np.random.default_rng((0, TRAIN_STREAM, index))
    tokens = np.random.default_rng(index).integers(10, 500, raw)
    mask = random_spans_noise_mask(raw, density, span, rng)
    return tokens, mask, *span_corruption(tokens, mask, SENTINELS, EOS)


def _reconstruct(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t in SENTINELS:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1].tolist():
        out += spans[t] if t in SENTINELS else [t]
    return out


@pytest.mark.parametrize("raw,density,span", [(64, 0.15, 3.0), (256, 0.15, 3.0), (200, 0.5, 8)])
def test_span_corruption_invariants(raw, density, span):
    n = span_corruption_lengths(raw, density, span)
    noise_total = 0
    for index in range(300):
        tokens, mask, inputs, targets = _corrupt(raw, index, density, span)
        assert len(inputs) == n.inputs_length and len(targets) == n.targets_length
        assert inputs[-1] == EOS and targets[-1] == EOS
        # sentinels: each one in the inputs appears exactly once in the targets, in order
        in_sent = [t for t in inputs.tolist() if t in SENTINELS]
        out_sent = [t for t in targets.tolist() if t in SENTINELS]
        assert in_sent == out_sent == SENTINELS[: n.num_noise_spans].tolist()
        assert targets[0] == SENTINELS[0]  # targets open with the first sentinel
        assert _reconstruct(inputs, targets) == tokens.tolist()
        assert not mask[0] and mask[-1]  # non-noise first, noise last (T5's layout)
        noise_total += mask.sum()
    # over many samples the noise fraction is the density (up to T5's rounding per sequence)
    assert noise_total / (300 * raw) == pytest.approx(density, abs=0.5 / raw + 1e-9)


def test_span_corruption_is_deterministic_per_seed_and_index():
    a = _corrupt(128, 7)[1]
    assert np.array_equal(a, _corrupt(128, 7)[1])
    assert any(not np.array_equal(a, _corrupt(128, i)[1]) for i in range(8, 12))
    obj = Seq2Seq([_span()], raw_length=64, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD,
                  decoder_start_id=PAD, seed=1)  # fmt: skip
    rows = np.random.default_rng(0).integers(10, 500, (4, 65))
    b1, b2 = obj(rows, np.arange(4), TRAIN_STREAM), obj(rows, np.arange(4), TRAIN_STREAM)
    assert all(torch.equal(b1.inputs[k], b2.inputs[k]) for k in b1.inputs)
    other = Seq2Seq([_span()], raw_length=64, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD,
                    decoder_start_id=PAD, seed=2)(rows, np.arange(4), TRAIN_STREAM)  # fmt: skip
    assert not torch.equal(other.inputs["input_ids"], b1.inputs["input_ids"])


def _span(weight=1.0):
    from trainer.config import SpanCorruptionObjective

    return SpanCorruptionObjective(weight=weight)


def test_batch_layout_span_corruption_only():
    obj = Seq2Seq([_span()], raw_length=64, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD,
                  decoder_start_id=PAD, seed=0)  # fmt: skip
    n = span_corruption_lengths(64, 0.15, 3.0)
    assert obj.lengths() == (n.inputs_length, n.targets_length)
    rows = np.random.default_rng(0).integers(10, 500, (5, 65))
    b = obj(rows, np.arange(100, 105), TRAIN_STREAM)
    assert b.inputs["input_ids"].shape == (5, n.inputs_length)
    assert b.labels.shape == b.inputs["decoder_input_ids"].shape == (5, n.targets_length)
    assert bool(b.inputs["attention_mask"].all())  # nothing is padded
    assert (b.labels != IGNORE_INDEX).all()
    # decoder inputs are the targets shifted right behind the start (pad) id
    assert (b.inputs["decoder_input_ids"][:, 0] == PAD).all()
    assert torch.equal(b.inputs["decoder_input_ids"][:, 1:], b.labels[:, :-1])


def test_prefix_lm_and_mixture():
    from trainer.config import PrefixLMObjective

    obj = Seq2Seq([_span(3.0), PrefixLMObjective(weight=1.0)], raw_length=64,
                  sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD, decoder_start_id=PAD,
                  seed=0)  # fmt: skip
    assert obj.lengths() == (64, 64)
    kinds = []
    for index in range(400):
        tokens = np.random.default_rng(index).integers(10, 500, 64)
        inputs, targets, k = obj.example(tokens, index, TRAIN_STREAM)
        kinds.append(k)
        if k == 1:  # prefix LM: prefix + EOS, rest + EOS, nothing lost
            assert inputs[-1] == EOS and targets[-1] == EOS
            assert inputs[:-1].tolist() + targets[:-1].tolist() == tokens.tolist()
            assert 1 <= len(inputs) - 1 <= 63
    assert np.mean(np.array(kinds) == 1) == pytest.approx(0.25, abs=0.06)
    rows = np.random.default_rng(0).integers(10, 500, (8, 65))
    b = obj(rows, np.arange(8), TRAIN_STREAM)
    lengths = b.inputs["attention_mask"].sum(1)
    assert (b.inputs["input_ids"][b.inputs["attention_mask"] == 0] == PAD).all()
    assert ((b.labels != IGNORE_INDEX).sum(1) >= 1).all() and (lengths >= 2).all()


def test_tokenizer_reserves_sentinels_in_t5_order(tmp_path):
    tok = train_tokenizer([SAMPLE.read_text()[:100_000]], tmp_path / "t.model", vocab_size=600,
                          num_sentinels=8)  # fmt: skip
    ids = tok.sentinel_ids
    assert ids.tolist() == [599 - i for i in range(8)]  # <extra_id_0> is the last id
    assert tok.encode(f"a{sentinel_piece(3)}b") == [*tok.encode("a"), 596, *tok.encode("b")]
    assert tok.decode([596]) == "<extra_id_3>"
    assert (tok.token_bytes()[ids] == 0).all()
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    reloaded = Tokenizer.load(tmp_path / "t.model")
    assert np.array_equal(reloaded.sentinel_ids, ids)
    with pytest.raises(ValueError, match="sentinel pieces are reserved"):
        train_tokenizer([SAMPLE.read_text()[:1000]], tmp_path / "u.model", vocab_size=300,
                        num_sentinels=64)  # fmt: skip


def _cfg(*overrides):
    return load_config(None, ["model.model_type=t5", "data.seq_len=64", *overrides])


def test_config_defaults_for_t5():
    cfg = _cfg()
    assert cfg.derived.num_sentinels == 100
    assert [o.type for o in cfg.derived.objectives] == ["span_corruption"]
    assert load_config(None, []).derived.objectives[0].type == "causal_lm"
    assert load_config(None, []).derived.num_sentinels == 0


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["objective.mixture=[{type: span_corruption, mean_noise_span_length: 12}]"],
         "cannot fit"),
        (["tokenizer.num_sentinels=2"], "raise tokenizer.num_sentinels to at least 3"),
        (["objective.mixture=[{type: causal_lm}]"], r"does not train model\.model_type='t5'"),
        (["objective.mixture=[]"], "objective.mixture is empty"),
        (["objective.mixture=[{type: span_corruption, noise_density: 1.5}]"], "noise_density"),
        (["model.name=huge"], "not a t5 preset"),
        (["model.model_type=bert"], "not a model family"),
    ],
)  # fmt: skip
def test_bad_t5_configs_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        _cfg(*overrides)


def test_span_corruption_is_refused_for_a_decoder():
    with pytest.raises(ConfigError, match=r"does not train model\.model_type='llama'"):
        load_config(None, ["objective.mixture=[{type: span_corruption}]"])


def test_tokenizer_without_sentinels_is_refused(prepared_data, prepared_t5_data):
    cfg = _cfg(*T5_OVERRIDES)
    decoder_tok = Tokenizer.load(prepared_data / "tokenizer" / "tokenizer.model")
    with pytest.raises(ValueError, match=r"needs 3 sentinel pieces.*has 0.*num_sentinels"):
        check_tokenizer(cfg, decoder_tok)
    t5_tok = Tokenizer.load(prepared_t5_data / "tokenizer" / "tokenizer.model")
    assert len(t5_tok.sentinel_ids) == T5_SENTINELS
    check_tokenizer(cfg, t5_tok)
    assert build_objective(cfg, t5_tok.sentinel_ids).lengths() == (58, 14)
