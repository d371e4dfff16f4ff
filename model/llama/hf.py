"""Explicit, invertible map between our Llama and Hugging Face `transformers.LlamaForCausalLM`.

Our parameter names are HF's without the `model.` prefix on the body (`lm_head` has none in
either), so the key map is a prefix. `transformers` is imported lazily: it is heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from model.llama.config import LlamaConfig

if TYPE_CHECKING:
    import transformers

_HEAD = "lm_head.weight"
_EMBED = "embed_tokens.weight"
_LAYER_KEYS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def _our_keys(cfg: LlamaConfig) -> list[str]:
    """Every key of `LlamaForCausalLM(cfg).state_dict()`, in order (includes the tied head)."""
    layers = [f"layers.{i}.{k}" for i in range(cfg.num_hidden_layers) for k in _LAYER_KEYS]
    return [_EMBED, *layers, "norm.weight", _HEAD]


def key_pairs(cfg: LlamaConfig) -> list[tuple[str, str]]:
    """(our key, HF key) for every parameter of `LlamaForCausalLM(cfg)`, in our order (the head
    included even when tied)."""
    return [(k, _to_hf_key(k)) for k in _our_keys(cfg)]


def _to_hf_key(key: str) -> str:
    return key if key == _HEAD else f"model.{key}"


def _remap(
    sd: dict[str, Tensor], cfg: LlamaConfig, source_key: Callable[[str], str], side: str
) -> dict[str, Tensor]:
    """{our key: sd[source_key(our key)]} in our order. With tied embeddings the head is
    optional in `sd` and always the embedding tensor itself."""
    ours = _our_keys(cfg)
    wanted = {source_key(k) for k in ours}
    optional = {source_key(_HEAD)} if cfg.tie_word_embeddings else set()
    missing = sorted(wanted - set(sd) - optional)
    unexpected = sorted(set(sd) - wanted)
    if missing or unexpected:
        raise ValueError(
            f"{side} state dict does not match the config {cfg.name!r} "
            f"(num_hidden_layers={cfg.num_hidden_layers}, "
            f"tie_word_embeddings={cfg.tie_word_embeddings}): missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    out = {k: sd[source_key(k)] for k in ours if source_key(k) in sd}
    if cfg.tie_word_embeddings:
        out[_HEAD] = out[_EMBED]
    return out


def to_hf_state_dict(sd: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    """Our state dict -> HF `LlamaForCausalLM` names (tensors are shared, not copied).

    With tied embeddings the result holds `lm_head.weight` as the embedding tensor, as
    `LlamaForCausalLM.state_dict()` does; drop it (or use `save_pretrained`) before writing
    safetensors, which refuses shared tensors.

    Raises:
        ValueError: keys missing or unexpected for `cfg` (both lists in the message).
    """
    hf = _remap(sd, cfg, lambda k: k, "our")
    return {_to_hf_key(k): v for k, v in hf.items()}


def from_hf_state_dict(sd: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    """HF `LlamaForCausalLM` state dict -> ours, loadable with `load_state_dict(strict=True)`.

    With tied embeddings `lm_head.weight` may be absent (HF checkpoints usually omit it); the
    head is always the embedding tensor.

    Raises:
        ValueError: keys missing or unexpected for `cfg` (both lists in the message).
    """
    return _remap(sd, cfg, _to_hf_key, "Hugging Face")


def to_hf_config(
    cfg: LlamaConfig, *, bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 3
) -> transformers.LlamaConfig:
    """Our config -> `transformers.LlamaConfig` (no biases, silu, default RoPE).

    Raises:
        ValueError: `cfg.vocab_size` is None.
    """
    import transformers

    if cfg.vocab_size is None:
        raise ValueError("vocab_size is None; set it before exporting to Hugging Face")
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _rope_theta(hf_cfg: Any) -> float:
    """RoPE base of a default-RoPE HF config: `rope_parameters` (transformers >= 5) or
    `rope_theta` + `rope_scaling` (4.x). Raises ValueError for any scaling or partial RoPE."""
    params = getattr(hf_cfg, "rope_parameters", None)
    if params is None:  # transformers 4.x
        params = dict(getattr(hf_cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    theta = params.pop("rope_theta", 10000.0)
    if rope_type != "default" or params:
        raise ValueError(
            f"rope_type={rope_type!r} with {params} is not supported; only default RoPE "
            "(no rope_scaling, no partial_rotary_factor)"
        )
    return float(theta)


def from_hf_config(hf_cfg: transformers.LlamaConfig, *, name: str = "custom") -> LlamaConfig:
    """`transformers.LlamaConfig` -> ours; `name` fills the informational `name` field.

    Raises:
        ValueError: a feature we do not implement (biases, activation other than silu, head_dim
        other than hidden_size / num_attention_heads, rope scaling, attention dropout).
    """
    hidden, heads = hf_cfg.hidden_size, hf_cfg.num_attention_heads
    unsupported = {
        "model_type": (getattr(hf_cfg, "model_type", "llama"), "llama"),
        "attention_bias": (getattr(hf_cfg, "attention_bias", False), False),
        "mlp_bias": (getattr(hf_cfg, "mlp_bias", False), False),
        "hidden_act": (hf_cfg.hidden_act, "silu"),
        "head_dim": (getattr(hf_cfg, "head_dim", None) or hidden // heads, hidden // heads),
        "attention_dropout": (float(getattr(hf_cfg, "attention_dropout", 0.0) or 0.0), 0.0),
    }
    for field, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(
                f"{field}={value!r} is not supported; Kiln's Llama needs {supported!r}"
            )
    return LlamaConfig(
        name=name,
        vocab_size=hf_cfg.vocab_size,
        hidden_size=hidden,
        intermediate_size=hf_cfg.intermediate_size,
        num_hidden_layers=hf_cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=hf_cfg.num_key_value_heads or heads,
        max_position_embeddings=hf_cfg.max_position_embeddings,
        rms_norm_eps=float(hf_cfg.rms_norm_eps),
        rope_theta=_rope_theta(hf_cfg),
        tie_word_embeddings=bool(hf_cfg.tie_word_embeddings),
        initializer_range=float(hf_cfg.initializer_range),
    )
