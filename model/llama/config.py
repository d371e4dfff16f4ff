"""Typed config of the Llama decoder; field names are `transformers.LlamaConfig`'s."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.family import INIT_FROM_DESCRIPTION


class LlamaConfig(BaseModel):
    """Shape and numerics of a Llama-architecture decoder (Touvron et al. 2023).

    Field names match `transformers.LlamaConfig`, so `model.llama.hf.to_hf_config` copies them
    as is. Validation errors are `ValueError` (pydantic's `ValidationError` subclasses it)
    naming the field, its value and the fix.
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
    def num_blocks(self) -> int:
        """Transformer blocks L (the most pipeline stages the model can be cut into)."""
        return self.num_hidden_layers

    @property
    def max_seq_len(self) -> int:
        """Longest sequence the model takes, in tokens (its RoPE table)."""
        return self.max_position_embeddings

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
