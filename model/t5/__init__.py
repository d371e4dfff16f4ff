"""The T5 v1.1 encoder-decoder family: config, presets, module, Hugging Face adapter, spec."""

from __future__ import annotations

from typing import Any

import torch

from model.family import ActivationStack, FamilySpec
from model.generate import fill_in_spans, generate_seq2seq
from model.t5 import hf
from model.t5.config import T5Config
from model.t5.model import T5ForConditionalGeneration
from model.t5.presets import PRESETS
from model.tokenizer import Tokenizer


def flops_per_sequence(cfg: T5Config, lengths: tuple[int, ...]) -> float:
    """Training FLOPs (forward + backward) of one example with S encoder and T decoder
    positions: ``6 (N_enc S + (N_dec + head) T) + 12 D_inner (L_enc S^2 + L_dec (T^2 + T S))``,
    the decoder's counting (see `model.llama.flops_per_sequence`) applied to each stack, with
    cross-attention's T x S scores."""
    S, T = lengths
    enc, dec = cfg.stack_parameters()
    head = cfg.vocab_size * cfg.d_model
    dense = 6 * (enc * S + (dec + head) * T)
    attn = 12 * cfg.inner_dim * (cfg.num_layers * S**2 + cfg.num_decoder_layers * (T**2 + T * S))
    return float(dense + attn)


def activation_stacks(cfg: T5Config, lengths: tuple[int, ...]) -> list[ActivationStack]:
    """Encoder blocks at the encoder length; decoder blocks, which add cross-attention, at 1.5x
    the values per token and the decoder length."""
    S, T = lengths
    return [
        ActivationStack(cfg.num_layers, S, cfg.d_model, 34),
        ActivationStack(cfg.num_decoder_layers, T, cfg.d_model, 51),
    ]


def architecture_rows(m: T5Config) -> list[tuple[str, Any]]:
    return [
        ("family", "encoder-decoder transformer (T5 v1.1, `T5ForConditionalGeneration`)"),
        ("layers (encoder + decoder)", f"{m.num_layers} + {m.num_decoder_layers}"),
        ("d_model", m.d_model),
        ("heads x d_kv", f"{m.num_heads} x {m.d_kv}"),
        ("feed-forward", f"gated-GELU, {m.d_ff}"),
        (
            "positions",
            f"relative position buckets ({m.relative_attention_num_buckets}, max distance "
            f"{m.relative_attention_max_distance})",
        ),
        ("normalisation", f"RMSNorm (pre-norm), eps {m.layer_norm_epsilon:g}"),
        ("vocabulary", m.vocab_size),
        ("tied embeddings", m.tie_word_embeddings),
    ]


def check_batch(cfg: T5Config, rows) -> dict[str, Any]:
    """``input_ids (2, 32)``, ``attention_mask (2, 32)`` (row 1 padded after 20 tokens) and
    ``decoder_input_ids (2, 16)`` starting with the decoder start id."""
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    decoder = rows(16)
    decoder[:, 0] = cfg.decoder_start_token_id
    return {"input_ids": rows(32), "attention_mask": mask, "decoder_input_ids": decoder}


def generation_config(cfg: T5Config) -> dict[str, int]:
    """Decoding starts from the pad id, as T5's."""
    return {
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }


def complete(model: T5ForConditionalGeneration, tok: Tokenizer, prompt: str, **sampling) -> str:
    """The prompt (the encoder input) with its sentinel spans filled in by the generated ones;
    a prompt without sentinels gets the decoder's continuation after it."""
    ids = tok.encode(prompt)
    new = generate_seq2seq(model, [*ids, tok.eos_id], **sampling)
    if not set(ids) & set(tok.sentinel_ids.tolist()):
        return prompt + tok.decode(new)
    return tok.decode(fill_in_spans(ids, new, tok.sentinel_ids, tok.eos_id))


def shape_row(m: T5Config) -> tuple[str, str, str]:
    return f"{m.num_layers}+{m.num_decoder_layers}", str(m.d_model), str(m.num_heads)


SPEC = FamilySpec(
    model_type="t5",
    description="encoder-decoder",
    config_class=T5Config,
    model_class=T5ForConditionalGeneration,
    presets=PRESETS,
    hf=hf,
    hf_model_class="T5ForConditionalGeneration",
    hf_auto_class="AutoModelForSeq2SeqLM",
    pipeline_tag="text2text-generation",
    architecture="T5 v1.1 encoder-decoder",
    objectives=("span_corruption", "prefix_lm"),
    default_num_sentinels=100,
    tokenizer_appends_eos=True,
    model_inputs=("input_ids", "attention_mask", "decoder_input_ids"),
    document_inputs=("document_ids", "decoder_document_ids"),
    flops_per_sequence=flops_per_sequence,
    activation_stacks=activation_stacks,
    architecture_rows=architecture_rows,
    check_batch=check_batch,
    generation_config=generation_config,
    complete=complete,
    shape_row=shape_row,
)

__all__ = ["SPEC", "T5Config", "T5ForConditionalGeneration"]
