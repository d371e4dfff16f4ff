"""Typed model configs; field names are those of the Hugging Face config of the export target
(`transformers.LlamaConfig`, `transformers.T5Config`). `model_type` tells the families apart."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INIT_FROM_DESCRIPTION = (
    "Hugging Face checkpoint folder (config.json + safetensors) to continue pretraining from: "
    "its config.json gives the architecture, its weights the start (a resumed run takes its "
    "checkpoint's), its tokenizer.model the tokenizer"
)


class LlamaConfig(BaseModel):
    """Shape and numerics of a Llama-architecture decoder (Touvron et al. 2023).

    Field names match `transformers.LlamaConfig`, so `model.hf.to_hf_config` copies them as is.
    Validation errors are `ValueError` (pydantic's `ValidationError` subclasses it) naming the
    field, its value and the fix.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model_type: Literal["llama"] = Field("llama", description="Model family: decoder-only.")
    name: str = Field("custom", description="Preset these values came from (informational).")
    init_from: str | None = Field(None, description=INIT_FROM_DESCRIPTION)
    vocab_size: int | None = Field(
        None, description="Vocabulary size; None = filled in by the trainer from the tokenizer."
    )
    hidden_size: int = Field(64, description="Model width D.")
    intermediate_size: int = Field(176, description="SwiGLU inner width.")
    num_hidden_layers: int = Field(2, description="Number of decoder layers L.")
    num_attention_heads: int = Field(4, description="Query heads H.")
    num_key_value_heads: int = Field(2, description="Key/value heads K (grouped-query attention).")
    max_position_embeddings: int = Field(256, description="Longest sequence, in tokens.")
    rms_norm_eps: float = Field(1e-5, description="Epsilon inside the RMSNorm square root.")
    rope_theta: float = Field(10000.0, description="RoPE base frequency.")
    tie_word_embeddings: bool = Field(False, description="Share the input embedding and head.")
    initializer_range: float = Field(0.02, description="Std of the normal weight init.")

    @model_validator(mode="after")
    def _check(self) -> LlamaConfig:
        positive = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "initializer_range",
        )
        for field in positive:
            value = getattr(self, field)
            if value <= 0:
                raise ValueError(f"{field}={value} must be positive; set it to a value > 0")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(
                f"vocab_size={self.vocab_size} must be positive, or None to take it from the "
                "tokenizer"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; pick num_key_value_heads among "
                "the divisors of num_attention_heads"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; change either so that "
                "head_dim = hidden_size / num_attention_heads is an integer"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim = hidden_size / num_attention_heads = {self.hidden_size} / "
                f"{self.num_attention_heads} = {self.head_dim} is odd; RoPE rotates pairs of "
                "channels, so change hidden_size or num_attention_heads to make it even"
            )
        return self

    @property
    def head_dim(self) -> int:
        """Width of one attention head, Dh = hidden_size // num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self, *, exclude_input_embedding: bool = False) -> int:
        """Number of parameters of `LlamaForCausalLM(self)`, computed without building it.

        Tied embedding/head weights count once. `exclude_input_embedding=True` drops the input
        embedding table when it is not tied to the head: a lookup costs no FLOPs, so MFU's
        N in 6N (Kaplan et al. 2020, Sec. 2.1) leaves it out.

        Raises:
            ValueError: `vocab_size` is still None.
        """
        if self.vocab_size is None:
            raise ValueError("vocab_size is None; set it (the trainer takes it from the tokenizer)")
        d, dh = self.hidden_size, self.head_dim
        attn = d * dh * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)  # q,o + k,v
        mlp = 3 * d * self.intermediate_size  # gate, up, down
        layer = attn + mlp + 2 * d  # two RMSNorm weights
        table = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else table
        embed = 0 if exclude_input_embedding and not self.tie_word_embeddings else table
        return embed + self.num_hidden_layers * layer + d + head  # + d: final norm


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


ModelConfig = LlamaConfig | T5Config
