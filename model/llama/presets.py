"""Named Llama presets: small factory functions. `vocab_size` stays None (the trainer fills it
from the tokenizer); YAML experiments override fields on top."""

from __future__ import annotations

from collections.abc import Callable

from model.llama.config import LlamaConfig


def debug() -> LlamaConfig:
    """Tiny model that trains on a CPU in seconds (torchtitan's `debugmodel` idea); ~0.1M
    non-embedding parameters. Shape chosen for speed, not taken from a paper."""
    return LlamaConfig(
        name="debug",
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


def tiny() -> LlamaConfig:
    """CPU demo model, ~2.9M non-embedding parameters; a scaled-down Llama with GQA and
    intermediate ~ 8/3 x hidden rounded to a multiple of 16 (Touvron et al. 2023, Sec. 2.2)."""
    return LlamaConfig(
        name="tiny",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )


def llama_125m() -> LlamaConfig:
    """GPT-3 Small / GPT-NeoX-125M width and depth (Brown et al. 2020, Table 2.1: 768 wide,
    12 layers, 12 heads) with Llama blocks; ~85M non-embedding parameters."""
    return LlamaConfig(
        name="125m",
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
    )


def llama_1b() -> LlamaConfig:
    """Llama 3.2 1B shape (meta-llama/Llama-3.2-1B config.json): 2048 wide, 16 layers, 32 heads,
    8 kv heads, 8192 inner, rope_theta 500000, tied embeddings. Context capped at 8192 and no
    "llama3" rope scaling (the released model uses 131072 positions with rope scaling)."""
    return LlamaConfig(
        name="1b",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    )


def llama_7b() -> LlamaConfig:
    """Llama 2 7B (Touvron et al. 2023b, Table 1; meta-llama/Llama-2-7b-hf config.json)."""
    return LlamaConfig(
        name="7b",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )


def llama_13b() -> LlamaConfig:
    """Llama 2 13B (Touvron et al. 2023b, Table 1; meta-llama/Llama-2-13b-hf config.json)."""
    return LlamaConfig(
        name="13b",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
    )


PRESETS: dict[str, Callable[[], LlamaConfig]] = {
    "debug": debug,
    "tiny": tiny,
    "125m": llama_125m,
    "1b": llama_1b,
    "7b": llama_7b,
    "13b": llama_13b,
}
