"""The Llama decoder (Touvron et al. 2023), laid out like HF `LlamaForCausalLM` minus `model.`.

Shape legend: B batch, T time, D model dim (hidden_size), V vocab, Dh head dim.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.family import Piece
from model.init import Fill, InitRule, Normal, fill_parameters, seed_source
from model.layers import (
    Attention,
    GatedMLP,
    KVCache,
    LMHead,
    RMSNorm,
    allowed_keys,
    rope_cos_sin,
)
from model.llama.config import LlamaConfig


def rope_window(cos: Tensor, sin: Tensor, start: int, length: int) -> tuple[Tensor, Tensor]:
    """The rows of positions ``start .. start + length - 1`` of the RoPE tables cos, sin:
    (max_position_embeddings, Dh) -> (length, Dh) each.

    Raises:
        ValueError: the positions run past the tables (``max_position_embeddings``).
    """
    if start + length > cos.shape[0]:
        raise ValueError(
            f"sequence length {start + length} exceeds max_position_embeddings="
            f"{cos.shape[0]}; shorten the input or raise the limit"
        )
    return cos[start : start + length], sin[start : start + length]


def rope_at(cos: Tensor, sin: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of the RoPE tables cos, sin: (max_position_embeddings, Dh) at each sequence's
    own positions ``position_ids`` (B, T) int64 (positions that restart per document,
    ``data.reset_position_ids``) -> (B, 1, T, Dh) each, broadcasting over the heads.

    Positions must be below ``max_position_embeddings`` (not checked here: that would make the
    host wait for the device every step; a row's positions never exceed its length, which
    `rope_window` checks).
    """
    return cos[position_ids][:, None], sin[position_ids][:, None]


def rope_tables(
    holder: nn.Module, length: int, position_ids: Tensor | None, start: int = 0
) -> tuple[Tensor, Tensor]:
    """cos, sin for ``length`` positions from ``holder``'s tables (``rope_cos``, ``rope_sin``):
    positions ``start ..`` ((T, Dh) each, `rope_window`), or ``position_ids`` (B, T) int64 when
    given ((B, 1, T, Dh) each, `rope_at`)."""
    cos, sin = rope_window(holder.rope_cos, holder.rope_sin, start, length)  # checks the length
    if position_ids is None:
        return cos, sin
    return rope_at(holder.rope_cos, holder.rope_sin, position_ids)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Names match HF's."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "silu")

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D); cos, sin: (T, Dh) or (B, 1, T, Dh) for x's positions; mask: None
        (causal) or the (B, 1, T, T) bool document mask of `Attention`; returns (B, T, D)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Llama causal language model returning logits; the trainer computes the loss.

    Children are exactly `embed_tokens`, `layers`, `norm`, `lm_head`, so the Hugging Face key
    map (`model.llama.hf`) adds or strips the `model.` prefix. Build, materialise and initialise are
    separate steps: the constructor works under `torch.device("meta")`, `init_weights(seed)`
    fills parameters and RoPE buffers; `from_config` does all three.

    Raises:
        ValueError: `cfg.vocab_size` is None.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "LlamaConfig.vocab_size is None; set it (the trainer takes it from the tokenizer)"
            )
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        self.tie_weights()
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_pos, Dh), model dtype
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_pos, Dh), model dtype

    @classmethod
    def from_config(
        cls,
        cfg: LlamaConfig,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> LlamaForCausalLM:
        """Build on meta, materialise on `device`, `init_weights(seed)`, in `dtype`.

        The dtype is set while still on meta, so `device` never holds an fp32 copy; values equal
        an fp32 init cast to `dtype` (`init_weights` draws in fp32 and `copy_` rounds alike).
        """
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        model.to_empty(device=device)
        model.init_weights(seed)
        return model

    def tie_weights(self) -> None:
        """Make `lm_head.weight` the same Parameter as `embed_tokens.weight` when tied.

        Needed again after `to_empty`, which may replace Parameter objects.
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Recompute the RoPE buffers and initialise every parameter from `seed`.

        Each parameter is drawn in fp32 by `model.init.init_values` from generators seeded by
        (seed, its name), then copied to its device and dtype, so the result depends neither on
        the device nor on the order or layout in which parameters are built (a ZeRO-3 rank or a
        pipeline stage draws only its own part, `trainer.construct`). Distributions:
        `init_rule`.
        """
        self.tie_weights()
        for name, value in self.fresh_buffers().items():
            getattr(self, name).copy_(value)
        fill_parameters(self, seed_source(self, seed))

    def init_rule(self, name: str) -> InitRule:
        """The initial distribution of parameter `name` (a key of `named_parameters()`).

        Linear and embedding weights ~ N(0, initializer_range) as HF
        `LlamaPreTrainedModel._init_weights`; the residual output projections `o_proj` and
        `down_proj` use std initializer_range / sqrt(2 * num_hidden_layers) (GPT-2, Radford et
        al. 2019, Sec. 2.3; Megatron-LM `scaled_init_method_normal`, Shoeybi et al. 2019);
        RMSNorm weights are ones.

        Raises:
            KeyError: `name` is not a parameter of this model.
        """
        cfg = self.config
        if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, norm
            return Fill(1.0)
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            return Normal(cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))
        if name.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight")):
            return Normal(cfg.initializer_range)
        raise KeyError(f"{name!r} is not a parameter of LlamaForCausalLM")

    def fresh_buffers(self) -> dict[str, Tensor]:
        """The non-persistent buffers' values, computed anew: the RoPE tables ``rope_cos``,
        ``rope_sin``, each (max_position_embeddings, Dh) fp32 on the CPU (`rope_cos_sin`)."""
        cfg = self.config
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        return {"rope_cos": cos, "rope_sin": sin}

    def blocks(self) -> list[nn.Module]:
        """The repeated transformer blocks, in order (activation checkpointing wraps these)."""
        return list(self.layers)

    def new_kv_cache(self) -> list[KVCache]:
        """An empty key/value cache, one `KVCache` per layer, for `forward(..., kv_cache=)`."""
        return [KVCache() for _ in self.layers]

    def forward(
        self,
        input_ids: Tensor,
        *,
        document_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: list[KVCache] | None = None,
        labels: Tensor | None = None,
        loss_chunk_tokens: int | None = None,
    ) -> Tensor:
        """input_ids: (B, T) int64 -> logits: (B, T, V) in the parameters' dtype.

        `document_ids` (B, T) int64 (training on packed rows, ``data.document_mask``): each
        token's document; attention is causal within a document and never crosses into another
        (`model.layers.allowed_keys`, one (B, 1, T, T) bool mask for all layers). None: plain
        causal attention (SDPA's ``is_causal``, no mask tensor). `position_ids` (B, T) int64:
        each token's RoPE position (restarting per document with ``data.reset_position_ids``;
        Hugging Face's argument); None: 0 .. T - 1.

        `kv_cache` (inference only, from `new_kv_cache`): input_ids are the positions after the
        cached ones, and the cache grows by T.

        With `labels` (B, T) int64 (-100: no loss) it returns instead the mean cross-entropy
        () fp32 over the labelled positions, computed by the head `loss_chunk_tokens` tokens at
        a time without the full logits (`model.layers.linear_cross_entropy`).

        Raises:
            ValueError: the positions run past `max_position_embeddings`.
        """
        T = input_ids.shape[1]
        start = 0 if kv_cache is None else kv_cache[0].length
        cos, sin = rope_tables(self, T, position_ids, start)  # (T, Dh) or (B, 1, T, Dh)
        mask = None
        if document_ids is not None:
            mask = allowed_keys(T, T, causal=True, query_documents=document_ids)  # (B,1,T,T)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if kv_cache is None else kv_cache[i], mask)
        if labels is None:
            return self.lm_head(self.norm(x))  # (B, T, V)
        return self.lm_head(self.norm(x), labels, loss_chunk_tokens)  # ()

    def pipeline_pieces(self, *, head_loss: bool = False) -> list[Piece]:
        """The forward (without a cache) as pieces for a pipeline cut, in order: embed
        (input_ids (B, T) int64 -> (B, T, D)), each block ((B, T, D) -> (B, T, D), reading the
        RoPE tables from its holder, which every stage keeps on its device), norm, head
        (-> logits (B, T, V)). A tied head is the embedding's piece again (tie key ``"embed"``).

        With document masking the model's input is the tuple ``(input_ids, document_ids[,
        position_ids])`` (`forward`'s arguments) and the ids travel with the hidden states
        through the blocks, ``(x, document_ids[, position_ids])``, as integer tensors (no
        gradient); each block builds its mask and RoPE rows from them (one mask per block
        rather than per forward: a bool tensor crosses no stage boundary). The norm drops them.

        ``head_loss``: in training mode the head returns ``(h (B, T, D), weight (V, D))``, the
        projection's operands, instead of the logits, for a loss that applies the head chunk by
        chunk (`model.layers.linear_cross_entropy`); in eval mode it returns the logits.
        """
        embed = {"embed_tokens": self.embed_tokens}
        tie = "embed" if self.config.tie_word_embeddings else None
        rope = {"rope_cos": self.rope_cos, "rope_sin": self.rope_sin}
        blocks = [
            Piece("block", partial(_block, block), dict(block.named_children()), rope)
            for block in self.layers
        ]
        if tie:
            head = Piece("head", partial(_tied_head, head_loss), embed, tie=tie)
        else:
            head = Piece("head", partial(_head, head_loss), {"lm_head": self.lm_head})
        return [
            Piece("embed", _embed, embed, tie=tie),
            *blocks,
            Piece("norm", _norm, {"norm": self.norm}),
            head,
        ]


# -- the pieces' forwards: (holder, inputs) -> outputs (see `model.family.Piece`) ------------------
# Between pieces: x (B, T, D), or (x, document_ids, [position_ids]) with document masking.
def _embed(holder: nn.Module, inputs: Tensor | tuple) -> Tensor | tuple:
    if isinstance(inputs, Tensor):
        return holder.embed_tokens(inputs)  # (B, T, D)
    input_ids, *ids = inputs
    return holder.embed_tokens(input_ids), *ids


def _block(block: DecoderLayer, holder: nn.Module, inputs: Tensor | tuple) -> Tensor | tuple:
    if isinstance(inputs, Tensor):
        cos, sin = rope_window(holder.rope_cos, holder.rope_sin, 0, inputs.shape[1])  # (T, Dh)
        return block(inputs, cos, sin)
    x, document_ids, *position_ids = inputs
    T = x.shape[1]
    cos, sin = rope_tables(holder, T, position_ids[0] if position_ids else None)
    mask = allowed_keys(T, T, causal=True, query_documents=document_ids)  # (B, 1, T, T)
    return block(x, cos, sin, None, mask), document_ids, *position_ids


def _norm(holder: nn.Module, inputs: Tensor | tuple) -> Tensor:
    return holder.norm(inputs if isinstance(inputs, Tensor) else inputs[0])


def _head(head_loss: bool, holder: nn.Module, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    if head_loss and holder.training:
        return x, holder.lm_head.weight  # (B, T, D), (V, D): the loss applies the head
    return holder.lm_head(x)  # (B, T, V)


def _tied_head(head_loss: bool, holder: nn.Module, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    weight = holder.embed_tokens.weight  # lm_head's: the same Parameter
    if head_loss and holder.training:
        return x, weight  # (B, T, D), (V, D): the loss applies the head
    return F.linear(x, weight)  # (B, T, V)
