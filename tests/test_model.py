"""Llama model: parity with transformers, HF key/config maps, presets, init, config checks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import transformers

from model import get_preset, preset_names
from model.llama import LlamaConfig, LlamaForCausalLM
from model.llama.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict

VOCAB = 97
PARITY_TOL = 1e-4


def tiny_cfg(**overrides: object) -> LlamaConfig:
    """Small GQA config (4 query heads, 2 kv heads) with non-default RoPE base, eps and init."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=500.0,
        initializer_range=0.2,  # logits of order 1, so a parity gap would show
    )
    return LlamaConfig(**{**fields, **overrides})


def hf_model(cfg: LlamaConfig) -> transformers.LlamaForCausalLM:
    hf_cfg = to_hf_config(cfg)
    return transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").eval()


def max_logit_diff(ours: LlamaForCausalLM, hf: transformers.LlamaForCausalLM) -> float:
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(input_ids)
        assert logits.abs().max() > 0.5  # not trivially close to zero
        return (logits - hf(input_ids).logits).abs().max().item()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_ours_to_hf(tied: bool) -> None:
    cfg = tiny_cfg(tie_word_embeddings=tied)
    ours = LlamaForCausalLM.from_config(cfg, seed=0)
    hf = hf_model(cfg)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    assert max_logit_diff(ours, hf) <= PARITY_TOL


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_hf_to_ours(tied: bool) -> None:
    cfg = tiny_cfg(tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = hf_model(cfg)
    with torch.no_grad():  # HF inits norms to ones; make them matter for the test
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf_sd = hf.state_dict()
    if tied:
        del hf_sd["lm_head.weight"]  # HF checkpoints of tied models omit the head
    ours = LlamaForCausalLM.from_config(cfg, seed=1)
    ours.load_state_dict(from_hf_state_dict(hf_sd, cfg), strict=True)
    assert max_logit_diff(ours, hf) <= PARITY_TOL
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied


@pytest.mark.parametrize("tied", [False, True])
def test_state_dict_round_trip(tied: bool) -> None:
    cfg = tiny_cfg(tie_word_embeddings=tied)
    sd = LlamaForCausalLM.from_config(cfg, seed=0).state_dict()
    hf_sd = to_hf_state_dict(sd, cfg)
    assert all(k == "lm_head.weight" or k.startswith("model.") for k in hf_sd)
    back = from_hf_state_dict(hf_sd, cfg)
    assert list(back) == list(sd)
    for key in sd:
        torch.testing.assert_close(back[key], sd[key], rtol=0, atol=0)


def test_state_dict_key_errors_list_keys() -> None:
    cfg = tiny_cfg()
    hf_sd = to_hf_state_dict(LlamaForCausalLM.from_config(cfg, seed=0).state_dict(), cfg)
    del hf_sd["lm_head.weight"]  # not optional when untied
    hf_sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\]") as err:
        from_hf_state_dict(hf_sd, cfg)
    assert "model.layers.9.mlp.up_proj.weight" in str(err.value)
    with pytest.raises(ValueError, match="unexpected keys"):
        to_hf_state_dict({**LlamaForCausalLM(cfg).state_dict(), "extra": torch.zeros(1)}, cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_config_round_trip(tied: bool) -> None:
    cfg = tiny_cfg(tie_word_embeddings=tied, name="mine")
    hf_cfg = to_hf_config(cfg, bos_token_id=5, eos_token_id=6, pad_token_id=7)
    assert (hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.pad_token_id) == (5, 6, 7)
    assert hf_cfg.head_dim == cfg.head_dim and hf_cfg.hidden_act == "silu"
    assert not hf_cfg.attention_bias and not hf_cfg.mlp_bias
    assert from_hf_config(hf_cfg, name="mine") == cfg


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 16}, "head_dim"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "linear"),
    ],
)
def test_from_hf_config_rejects_unsupported(overrides: dict, field: str) -> None:
    hf_cfg = to_hf_config(tiny_cfg())
    fields = {**hf_cfg.to_dict(), **overrides}
    if "rope_scaling" in overrides:
        fields.pop("rope_parameters", None)  # transformers >= 5 reads scaling from here
    with pytest.raises(ValueError, match=field):
        from_hf_config(transformers.LlamaConfig(**fields))


def test_to_hf_config_needs_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        to_hf_config(LlamaConfig())


@pytest.mark.parametrize("name", preset_names())
def test_preset_counts_match_meta_build(name: str) -> None:
    cfg = get_preset(name)
    assert cfg.name == name and cfg.vocab_size is None
    cfg = LlamaConfig(**{**cfg.model_dump(), "vocab_size": 32000})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())  # unique
    table = model.embed_tokens.weight.numel()
    dropped = 0 if cfg.tie_word_embeddings else table
    assert cfg.num_parameters(exclude_input_embedding=True) == cfg.num_parameters() - dropped


def test_preset_sizes() -> None:
    def size(name: str, vocab_size: int = 32000) -> int:
        cfg = LlamaConfig(**{**get_preset(name).model_dump(), "vocab_size": vocab_size})
        return cfg.num_parameters()

    assert size("7b") == pytest.approx(6.74e9, rel=0.01)  # Llama 2 7B: 6,738,415,616
    assert size("13b") == pytest.approx(13.0e9, rel=0.01)
    assert 100e6 < size("125m") < 170e6
    assert size("1b", vocab_size=128256) == pytest.approx(1.236e9, rel=0.001)  # Llama 3.2 1B
    assert preset_names()[:2] == ["debug", "tiny"]


def test_unknown_preset_lists_names() -> None:
    with pytest.raises(ValueError, match="debug"):
        get_preset("nope")


def test_init_is_seed_deterministic() -> None:
    cfg = tiny_cfg()
    a = LlamaForCausalLM.from_config(cfg, seed=3).state_dict()
    b = LlamaForCausalLM.from_config(cfg, seed=3).state_dict()
    c = LlamaForCausalLM.from_config(cfg, seed=4).state_dict()
    direct = LlamaForCausalLM(cfg)  # built on CPU, no meta step
    direct.init_weights(3)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        torch.testing.assert_close(a[key], direct.state_dict()[key], rtol=0, atol=0)
    assert not torch.equal(
        a["layers.0.self_attn.q_proj.weight"], c["layers.0.self_attn.q_proj.weight"]
    )


def test_init_values_and_scaled_residual_std() -> None:
    cfg = tiny_cfg(
        hidden_size=128, intermediate_size=512, num_hidden_layers=8, initializer_range=0.1
    )
    model = LlamaForCausalLM.from_config(cfg, seed=0)
    layer = model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(128))
    assert torch.equal(model.norm.weight, torch.ones(128))
    assert layer.mlp.up_proj.weight.std().item() == pytest.approx(0.1, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.1 / 4, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(0.1 / 4, rel=0.05)


def test_from_config_dtype_and_buffers() -> None:
    cfg = tiny_cfg(tie_word_embeddings=True)
    model = LlamaForCausalLM.from_config(cfg, seed=0, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert [name for name, _ in model.named_children()] == [
        "embed_tokens",
        "layers",
        "norm",
        "lm_head",
    ]
    assert "rope_cos" not in model.state_dict()
    torch.testing.assert_close(model.rope_cos[0].float(), torch.ones(cfg.head_dim))
    assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16
    fp32 = LlamaForCausalLM.from_config(cfg, seed=0).to(torch.bfloat16)
    for key, value in fp32.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, fp32.rope_sin, rtol=0, atol=0)


def test_forward_shape_and_length_limit() -> None:
    cfg = tiny_cfg()
    model = LlamaForCausalLM.from_config(cfg, seed=0)
    assert model(torch.zeros(3, 64, dtype=torch.long)).shape == (3, 64, VOCAB)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_kv_cache_matches_full_forward() -> None:
    model = LlamaForCausalLM.from_config(tiny_cfg(), seed=0)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = model.new_kv_cache()
    with torch.no_grad():
        full = model(input_ids)
        parts = [model(input_ids[:, :5], kv_cache=cache)]
        parts += [model(input_ids[:, 5:9], kv_cache=cache)]  # several new positions at once
        parts += [model(input_ids[:, i : i + 1], kv_cache=cache) for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_build_without_vocab_raises() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaForCausalLM(LlamaConfig())
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaConfig().num_parameters()


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"hidden_size": 0}, "hidden_size=0"),
        ({"num_hidden_layers": -1}, "num_hidden_layers=-1"),
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"hidden_size": 66, "num_attention_heads": 4}, "hidden_size=66"),
        ({"hidden_size": 12, "num_attention_heads": 4, "num_key_value_heads": 1}, "head_dim"),
        ({"hidden_sizee": 64}, "hidden_sizee"),
        ({"hidden_size": "abc"}, "hidden_size"),
        ({"hidden_size": 64.0}, "hidden_size"),
    ],
)
def test_bad_config_names_the_field(fields: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        LlamaConfig(**fields)


def test_model_package_imports_no_distributed_code() -> None:
    forbidden = ("deepspeed", "torch.distributed", "ray")
    for path in Path(__file__).parents[1].joinpath("model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                bad = [f for f in forbidden if name == f or name.startswith(f + ".")]
                assert not bad, f"{path.name} imports {name}"
