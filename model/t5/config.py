"""Typed config of the T5 v1.1 encoder-decoder; field names are `transformers.T5Config`'s."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.family import INIT_FROM_DESCRIPTION


class T5Config(BaseModel):
    """Shape and numerics of a T5 v1.1 encoder-decoder (Raffel et al. 2020; the v1.1 changes:
    gated-GELU feed-forward, no dropout in pretraining, untied output head; google-research/
    text-to-text-transfer-transformer `released_checkpoints.md`).

    Field names match `transformers.T5Config`. The special ids default to Kiln's tokenizer
    (`model.tokenizer`: pad 3, eos 2); the decoder starts from the pad id, as in T5.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model_type: Literal["t5"] = Field("t5", description="Model family: encoder-decoder.")
    name: str = Field("custom", description="Preset these values came from (informational).")
    init_from: str | None = Field(None, description=INIT_FROM_DESCRIPTION)
    vocab_size: int | None = Field(
        None, description="Vocabulary size; None = filled in by the trainer from the tokenizer."
    )
    d_model: int = Field(64, description="Model width D.")
    d_kv: int = Field(16, description="Width of one attention head (H x d_kv need not be D).")
    d_ff: int = Field(128, description="Gated-GELU inner width F.")
    num_layers: int = Field(2, description="Encoder blocks.")
    num_decoder_layers: int = Field(2, description="Decoder blocks.")
    num_heads: int = Field(4, description="Attention heads H.")
    relative_attention_num_buckets: int = Field(32, description="Relative position buckets.")
    relative_attention_max_distance: int = Field(
        128, description="Distance (tokens) from which all positions share the last bucket."
    )
    dropout_rate: float = Field(0.0, description="Dropout probability (T5 v1.1 pretrains at 0).")
    layer_norm_epsilon: float = Field(1e-6, description="Epsilon inside the RMSNorm square root.")
    initializer_factor: float = Field(1.0, description="Scales every initial std (T5 uses 1).")
    feed_forward_proj: Literal["gated-gelu"] = Field(
        "gated-gelu", description="wo(gelu_tanh(wi_0 x) * wi_1 x), the T5 v1.1 feed-forward."
    )
    tie_word_embeddings: bool = Field(False, description="T5 v1.1 unties the output head.")
    pad_token_id: int = Field(3, description="Padding id; also the decoder start id.")
    eos_token_id: int = Field(2, description="End of inputs and of targets.")
    decoder_start_token_id: int = Field(3, description="First decoder input (= pad in T5).")

    @model_validator(mode="after")
    def _check(self) -> T5Config:
        positive = (
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_decoder_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "layer_norm_epsilon",
            "initializer_factor",
        )
        for field in positive:
            value = getattr(self, field)
            if value <= 0:
                raise ValueError(f"{field}={value} must be positive; set it to a value > 0")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(
                f"vocab_size={self.vocab_size} must be positive, or None to take it from the "
                "tokenizer"
            )
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                f"relative_attention_num_buckets={self.relative_attention_num_buckets} is too "
                "few: half are exact offsets and half logarithmic bins per direction; use >= 4 "
                "(T5 uses 32)"
            )
        return self

    @property
    def num_blocks(self) -> int:
        """Transformer blocks, encoder + decoder (the most pipeline stages it can be cut into)."""
        return self.num_layers + self.num_decoder_layers

    @property
    def max_seq_len(self) -> None:
        """None: relative position buckets take any length."""
        return None

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads, H x d_kv."""
        return self.num_heads * self.d_kv

    def num_parameters(self, *, exclude_input_embedding: bool = False) -> int:
        """Number of parameters of `T5ForConditionalGeneration(self)`, computed without building.

        `exclude_input_embedding=True` drops the shared input embedding when it is not tied to
        the head (a lookup costs no FLOPs; see `LlamaConfig.num_parameters`).

        Raises:
            ValueError: `vocab_size` is still None.
        """
        enc, dec = self.stack_parameters()
        if self.vocab_size is None:
            raise ValueError("vocab_size is None; set it (the trainer takes it from the tokenizer)")
        table = self.vocab_size * self.d_model
        head = 0 if self.tie_word_embeddings else table
        embed = 0 if exclude_input_embedding and not self.tie_word_embeddings else table
        return embed + enc + dec + head

    def stack_parameters(self) -> tuple[int, int]:
        """(encoder, decoder) parameters without the embedding and head: blocks, norms and the
        relative position bias of each stack."""
        d, inner = self.d_model, self.inner_dim
        attn = 4 * d * inner
        mlp = 3 * d * self.d_ff
        bias = self.relative_attention_num_buckets * self.num_heads
        enc = self.num_layers * (attn + mlp + 2 * d) + d + bias
        dec = self.num_decoder_layers * (2 * attn + mlp + 3 * d) + d + bias
        return enc, dec
