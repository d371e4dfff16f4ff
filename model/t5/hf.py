"""Explicit, invertible map between our T5 and HF `transformers.T5ForConditionalGeneration`.

HF nests each block as ``block.i.layer.j`` (0 self-attention, 1 cross-attention in the decoder,
then the feed-forward) and keeps the relative position bias in the first block's
self-attention; ours names the sub-modules and keeps the bias on the stack. The map is a list of
(ours, HF) key pairs built from the config. `transformers` is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from model.t5.config import T5Config

if TYPE_CHECKING:
    import transformers

_ATTN = (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"))
_MLP = (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo"))
# Keys HF holds as aliases of another tensor: the stacks' embeddings are `shared`.
_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def key_pairs(cfg: T5Config) -> list[tuple[str, str]]:
    """(our key, HF key) for every parameter of `T5ForConditionalGeneration(cfg)`, in our order
    (the head included even when tied)."""
    pairs = [("shared.weight", "shared.weight")]
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        pairs.append(
            (
                f"{stack}.relative_attention_bias.embedding.weight",
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            )
        )
        for i in range(n):
            ours, hf = f"{stack}.layers.{i}", f"{stack}.block.{i}.layer"
            sublayers = [("self_attn", "0", "SelfAttention")]
            if stack == "decoder":
                sublayers.append(("cross_attn", "1", "EncDecAttention"))
            for name, j, hf_name in sublayers:
                pairs.append((f"{ours}.{name}_norm.weight", f"{hf}.{j}.layer_norm.weight"))
                pairs += [
                    (f"{ours}.{name}.{a}.weight", f"{hf}.{j}.{hf_name}.{b}.weight")
                    for a, b in _ATTN
                ]
            j = "2" if stack == "decoder" else "1"
            pairs.append((f"{ours}.mlp_norm.weight", f"{hf}.{j}.layer_norm.weight"))
            pairs += [
                (f"{ours}.mlp.{a}.weight", f"{hf}.{j}.DenseReluDense.{b}.weight") for a, b in _MLP
            ]
        pairs.append((f"{stack}.final_layer_norm.weight", f"{stack}.final_layer_norm.weight"))
    pairs.append(("lm_head.weight", "lm_head.weight"))
    return pairs


def _check(sd: dict[str, Tensor], wanted: set[str], optional: set[str], cfg, side) -> None:
    missing = sorted(wanted - set(sd) - optional)
    unexpected = sorted(set(sd) - wanted - optional)
    if missing or unexpected:
        raise ValueError(
            f"{side} state dict does not match the T5 config {cfg.name!r} (num_layers="
            f"{cfg.num_layers}, num_decoder_layers={cfg.num_decoder_layers}, "
            f"tie_word_embeddings={cfg.tie_word_embeddings}): missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )


def to_hf_state_dict(sd: dict[str, Tensor], cfg: T5Config) -> dict[str, Tensor]:
    """Our state dict -> HF `T5ForConditionalGeneration` names (tensors shared, not copied),
    with the stacks' ``embed_tokens`` aliases of ``shared`` as HF's own `state_dict()` has.

    Raises:
        ValueError: keys missing or unexpected for `cfg` (both lists in the message).
    """
    pairs = key_pairs(cfg)
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    _check(sd, {o for o, _ in pairs}, optional, cfg, "our")
    out = {hf: sd[o] for o, hf in pairs if o in sd}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["shared.weight"]
    for alias in _ALIASES:
        out[alias] = out["shared.weight"]
    return out


def from_hf_state_dict(sd: dict[str, Tensor], cfg: T5Config) -> dict[str, Tensor]:
    """HF `T5ForConditionalGeneration` state dict -> ours, loadable with
    `load_state_dict(strict=True)`. The ``embed_tokens`` aliases (and a tied head) may be
    absent; when present they are ignored in favour of ``shared.weight``.

    Raises:
        ValueError: keys missing or unexpected for `cfg` (both lists in the message).
    """
    pairs = key_pairs(cfg)
    optional = set(_ALIASES) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    _check(sd, {hf for _, hf in pairs}, optional, cfg, "Hugging Face")
    out = {o: sd[hf] for o, hf in pairs if hf in sd}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["shared.weight"]
    return out


def to_hf_config(cfg: T5Config) -> transformers.T5Config:
    """Our config -> `transformers.T5Config` (gated-gelu, no biases, our special ids).

    Raises:
        ValueError: `cfg.vocab_size` is None.
    """
    import transformers

    if cfg.vocab_size is None:
        raise ValueError("vocab_size is None; set it before exporting to Hugging Face")
    return transformers.T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout_rate,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        initializer_factor=cfg.initializer_factor,
        feed_forward_proj=cfg.feed_forward_proj,
        tie_word_embeddings=cfg.tie_word_embeddings,
        is_encoder_decoder=True,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id,
    )


def _tied(hf_cfg) -> bool:
    """Whether the head is the embedding (original T5) or its own matrix (T5 v1.1).

    transformers 5 always sets ``tie_word_embeddings=True`` on a `T5Config` and keeps the T5
    version in ``scale_decoder_outputs`` (v1.1: False; its head is untied on load when the
    checkpoint holds one); transformers 4 kept it in ``tie_word_embeddings``.
    """
    return bool(getattr(hf_cfg, "scale_decoder_outputs", hf_cfg.tie_word_embeddings))


def from_hf_config(hf_cfg: transformers.T5Config, *, name: str = "custom") -> T5Config:
    """`transformers.T5Config` -> ours.

    Raises:
        ValueError: a T5 variant we do not implement (the original T5's ReLU feed-forward, or
        any activation other than gated-gelu).
    """
    if hf_cfg.feed_forward_proj != "gated-gelu":
        raise ValueError(
            f"feed_forward_proj={hf_cfg.feed_forward_proj!r} is not supported; Kiln's T5 is "
            "T5 v1.1 (gated-gelu)"
        )
    return T5Config(
        name=name,
        vocab_size=hf_cfg.vocab_size,
        d_model=hf_cfg.d_model,
        d_kv=hf_cfg.d_kv,
        d_ff=hf_cfg.d_ff,
        num_layers=hf_cfg.num_layers,
        num_decoder_layers=hf_cfg.num_decoder_layers or hf_cfg.num_layers,
        num_heads=hf_cfg.num_heads,
        relative_attention_num_buckets=hf_cfg.relative_attention_num_buckets,
        relative_attention_max_distance=hf_cfg.relative_attention_max_distance,
        dropout_rate=float(hf_cfg.dropout_rate),
        layer_norm_epsilon=float(hf_cfg.layer_norm_epsilon),
        initializer_factor=float(hf_cfg.initializer_factor),
        tie_word_embeddings=_tied(hf_cfg),
        pad_token_id=hf_cfg.pad_token_id,
        eos_token_id=hf_cfg.eos_token_id,
        decoder_start_token_id=hf_cfg.decoder_start_token_id,
    )
