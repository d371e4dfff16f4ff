"""The T5 v1.1 model: parity with `transformers.T5ForConditionalGeneration`, the key map round
trip, presets, initialisation, cached decoding and span filling."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from model import build_model, get_preset, preset_names
from model.generate import fill_in_spans, generate_seq2seq
from model.t5 import T5Config, T5ForConditionalGeneration
from model.t5 import hf as hf_t5
from model.t5.model import relative_position_bucket

PARITY_ATOL = 1e-4  # fp32, the bound


def tiny_config(**kw) -> T5Config:
    base = dict(
        vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
    )  # fmt: skip
    return T5Config(**{**base, **kw})


def hf_model(cfg: T5Config) -> transformers.T5ForConditionalGeneration:
    """An HF T5 with our shapes. transformers 5 always ties lm_head to `shared` on a fresh model
    (it unties on `from_pretrained` when the checkpoint holds both); give it its own head."""
    model = transformers.T5ForConditionalGeneration(hf_t5.to_hf_config(cfg)).eval()
    if not cfg.tie_word_embeddings:
        model.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    return model


def batch(cfg: T5Config, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, cfg.vocab_size, (3, 40), generator=g)
    y = torch.randint(4, cfg.vocab_size, (3, 45), generator=g)  # > max_distance: log buckets
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0
    mask[2, 10:] = 0
    return x, y, mask


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(tie):
    cfg = tiny_config(tie_word_embeddings=tie)
    ours = T5ForConditionalGeneration.from_config(cfg, seed=0).eval()
    theirs = hf_model(cfg)
    theirs.load_state_dict(hf_t5.to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    x, y, mask = batch(cfg)
    with torch.no_grad():
        got = ours(x, y, mask)
        want = theirs(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
    assert got.shape == (3, 45, cfg.vocab_size)
    assert (got - want).abs().max().item() <= PARITY_ATOL


def test_round_trip_through_transformers():
    cfg = tiny_config()
    theirs = hf_model(cfg)  # HF's own initialisation
    ours = T5ForConditionalGeneration(cfg)
    ours.load_state_dict(hf_t5.from_hf_state_dict(theirs.state_dict(), cfg), strict=True)
    back = hf_t5.to_hf_state_dict(ours.state_dict(), cfg)
    assert set(back) == set(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back[k], v), k
    x, y, mask = batch(cfg, seed=1)
    with torch.no_grad():
        want = theirs(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
    assert (ours(x, y, mask) - want).abs().max().item() <= PARITY_ATOL
    for tie in (False, True):
        c = tiny_config(tie_word_embeddings=tie)
        assert hf_t5.from_hf_config(hf_t5.to_hf_config(c)) == c


def test_key_map_refuses_mismatched_state_dicts():
    cfg = tiny_config()
    sd = T5ForConditionalGeneration.from_config(cfg, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"missing keys.*decoder\.layers\.2"):
        hf_t5.to_hf_state_dict({k: v for k, v in sd.items() if "layers.2" not in k}, cfg)
    with pytest.raises(ValueError, match="feed_forward_proj='relu'"):
        hf_t5.from_hf_config(transformers.T5Config(feed_forward_proj="relu"))


def test_relative_position_bucket_matches_transformers():
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            )
            got = relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            )
            assert torch.equal(got, want)


@pytest.mark.parametrize(
    "name,published",
    [("small", 77e6), ("base", 248e6), ("large", 783e6), ("xl", 2.85e9)],
)
def test_presets_have_the_published_sizes(name, published):
    cfg = get_preset(name, "t5").model_copy(update={"vocab_size": 32128})  # T5's vocabulary
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_parameters()
    assert abs(n - published) / published < 0.01
    assert preset_names("t5") == ["debug", "small", "base", "large", "xl"]


def test_initialisation_follows_t5():
    cfg = tiny_config(d_model=128, d_kv=32, d_ff=256, num_heads=4, vocab_size=512)
    m = build_model(cfg, seed=3)
    d, inner, ff = 128, 128, 256
    want = {
        "shared.weight": 1.0,
        "lm_head.weight": d**-0.5,
        "encoder.layers.0.self_attn.q_proj.weight": (d * 32) ** -0.5,
        "encoder.layers.0.self_attn.k_proj.weight": d**-0.5,
        "decoder.layers.0.cross_attn.o_proj.weight": inner**-0.5,
        "decoder.layers.1.mlp.gate_proj.weight": d**-0.5,
        "encoder.layers.1.mlp.down_proj.weight": ff**-0.5,
    }
    sd = m.state_dict()
    for name, std in want.items():
        assert sd[name].std().item() == pytest.approx(std, rel=0.1), name
    assert torch.equal(sd["decoder.final_layer_norm.weight"], torch.ones(d))
    assert torch.equal(build_model(cfg, seed=3).state_dict()["shared.weight"], sd["shared.weight"])


def test_cached_decoding_matches_full_forward():
    cfg = tiny_config()
    m = T5ForConditionalGeneration.from_config(cfg, seed=0).eval()
    x, y, mask = batch(cfg)
    with torch.no_grad():
        full = m(x, y, mask)
        memory = m.encode(x, mask)
        cache = m.new_cache()
        steps = [m.decode(y[:, t : t + 1], memory, mask, cache=cache) for t in range(y.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_generate_seq2seq_greedy_with_and_without_cache():
    cfg = tiny_config(eos_token_id=2, decoder_start_token_id=3, pad_token_id=3)
    m = T5ForConditionalGeneration.from_config(cfg, seed=5).eval()
    ids = list(range(10, 30))
    a = generate_seq2seq(m, ids, max_new_tokens=12, temperature=0)
    b = generate_seq2seq(m, ids, max_new_tokens=12, temperature=0, use_cache=False)
    assert a == b and 0 < len(a) <= 12
    # greedy decoding matches the argmax of a full forward over what it produced
    with torch.no_grad():
        logits = m(torch.tensor([ids]), torch.tensor([[3, *a[:-1]]]))
    assert logits[0].argmax(-1).tolist() == a
    s1 = generate_seq2seq(m, ids, max_new_tokens=12, temperature=1.0, top_k=5, seed=7)
    assert s1 == generate_seq2seq(m, ids, max_new_tokens=12, temperature=1.0, top_k=5, seed=7)


def test_fill_in_spans():
    sentinels = [99, 98, 97]
    eos = 2
    inputs = [10, 99, 11, 12, 98, 13]
    outputs = [99, 20, 21, 98, 22, 2, 97, 5]
    assert fill_in_spans(inputs, outputs, sentinels, eos) == [10, 20, 21, 11, 12, 22, 13]
    # a sentinel the model gave no span for stays
    assert fill_in_spans([10, 97], [99, 20, 2], sentinels, eos) == [10, 97]
