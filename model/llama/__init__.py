"""The Llama decoder family: config, presets, module, Hugging Face adapter and its spec."""

from __future__ import annotations

from typing import Any

from model.family import ActivationStack, FamilySpec
from model.generate import generate
from model.llama import hf
from model.llama.config import LlamaConfig
from model.llama.model import LlamaForCausalLM
from model.llama.presets import PRESETS
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


def flops_per_sequence(cfg: LlamaConfig, lengths: tuple[int, ...]) -> float:
    """Training FLOPs (forward + backward, no recomputation) of one sequence of T tokens:
    ``(6 N + 12 L D T) T`` from PaLM (Chowdhery et al. 2022, Appendix B), N the parameters that
    take part in matmuls (the input embedding lookup does not, unless tied to the head), L the
    layers, D the width; the second term is the attention score and value matmuls."""
    (T,) = lengths
    n = cfg.num_parameters(exclude_input_embedding=True)
    return (6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * T) * T


def activation_stacks(cfg: LlamaConfig, lengths: tuple[int, ...]) -> list[ActivationStack]:
    """One stack of self-attention blocks over the sequence."""
    (T,) = lengths
    return [ActivationStack(cfg.num_hidden_layers, T, cfg.hidden_size, 34)]


def architecture_rows(m: LlamaConfig) -> list[tuple[str, Any]]:
    return [
        ("family", "decoder-only transformer (Llama architecture, `LlamaForCausalLM`)"),
        ("layers", m.num_hidden_layers),
        ("hidden size", m.hidden_size),
        ("attention heads (key/value)", f"{m.num_attention_heads} ({m.num_key_value_heads})"),
        ("feed-forward", f"SwiGLU, {m.intermediate_size}"),
        ("positions", f"RoPE, theta {m.rope_theta:g}, up to {m.max_position_embeddings}"),
        ("normalisation", f"RMSNorm (pre-norm), eps {m.rms_norm_eps:g}"),
        ("vocabulary", m.vocab_size),
        ("tied embeddings", m.tie_word_embeddings),
    ]


def check_batch(cfg: LlamaConfig, rows) -> dict[str, Any]:
    """``input_ids (2, T)``, T = min(32, max_position_embeddings)."""
    return {"input_ids": rows(min(32, cfg.max_position_embeddings))}


def generation_config(cfg: LlamaConfig) -> dict[str, int]:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


def complete(model: LlamaForCausalLM, tok: Tokenizer, prompt: str, **sampling) -> str:
    """The prompt followed by its sampled continuation (up to EOS)."""
    return prompt + tok.decode(generate(model, tok.encode(prompt), eos_id=tok.eos_id, **sampling))


def shape_row(m: LlamaConfig) -> tuple[str, str, str]:
    heads = f"{m.num_attention_heads}/{m.num_key_value_heads}"
    return str(m.num_hidden_layers), str(m.hidden_size), heads


SPEC = FamilySpec(
    model_type="llama",
    description="decoder",
    config_class=LlamaConfig,
    model_class=LlamaForCausalLM,
    presets=PRESETS,
    hf=hf,
    hf_model_class="LlamaForCausalLM",
    hf_auto_class="AutoModelForCausalLM",
    pipeline_tag="text-generation",
    architecture="decoder-only transformer (Llama architecture)",
    objectives=("causal_lm",),
    default_num_sentinels=0,
    tokenizer_appends_eos=False,
    model_inputs=("input_ids",),
    document_inputs=("document_ids", "position_ids"),
    flops_per_sequence=flops_per_sequence,
    activation_stacks=activation_stacks,
    architecture_rows=architecture_rows,
    check_batch=check_batch,
    generation_config=generation_config,
    complete=complete,
    shape_row=shape_row,
)

__all__ = ["SPEC", "LlamaConfig", "LlamaForCausalLM"]
