"""Named model presets per family: small factory functions in registries. `vocab_size` stays
None (the trainer fills it from the tokenizer); YAML experiments override fields on top."""

from __future__ import annotations

from collections.abc import Callable

from model.config import LlamaConfig, ModelConfig, T5Config


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


def t5_debug() -> T5Config:
    """Tiny T5 that trains on a CPU in seconds; ~0.2M non-embedding parameters. Shape chosen for
    speed, not taken from a paper."""
    return T5Config(
        name="debug", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4,
    )  # fmt: skip


def t5_small() -> T5Config:
    """T5 v1.1 small (google/t5-v1_1-small config.json): 512 wide, 8+8 layers, 6 heads of 64,
    1024 gated-GELU inner; ~77M parameters with the 32128 vocabulary."""
    return T5Config(
        name="small", d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
        num_heads=6,
    )  # fmt: skip


def t5_base() -> T5Config:
    """T5 v1.1 base (google/t5-v1_1-base config.json): 768 wide, 12+12 layers, 12 heads of 64,
    2048 inner; ~248M parameters with the 32128 vocabulary."""
    return T5Config(
        name="base", d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
        num_heads=12,
    )  # fmt: skip


def t5_large() -> T5Config:
    """T5 v1.1 large (google/t5-v1_1-large config.json): 1024 wide, 24+24 layers, 16 heads of
    64, 2816 inner; ~783M parameters with the 32128 vocabulary."""
    return T5Config(
        name="large", d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
        num_heads=16,
    )  # fmt: skip


def t5_xl() -> T5Config:
    """T5 v1.1 XL (google/t5-v1_1-xl config.json): 2048 wide, 24+24 layers, 32 heads of 64,
    5120 inner; ~2.85B parameters with the 32128 vocabulary."""
    return T5Config(
        name="xl", d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
        num_heads=32,
    )  # fmt: skip


LLAMA_PRESETS: dict[str, Callable[[], LlamaConfig]] = {
    "debug": debug,
    "tiny": tiny,
    "125m": llama_125m,
    "1b": llama_1b,
    "7b": llama_7b,
    "13b": llama_13b,
}


T5_PRESETS: dict[str, Callable[[], T5Config]] = {
    "debug": t5_debug,
    "small": t5_small,
    "base": t5_base,
    "large": t5_large,
    "xl": t5_xl,
}

PRESETS: dict[str, dict[str, Callable[[], ModelConfig]]] = {
    "llama": LLAMA_PRESETS,
    "t5": T5_PRESETS,
}


def model_types() -> list[str]:
    """The model families: ``model.model_type`` values."""
    return list(PRESETS)


def preset_names(model_type: str = "llama") -> list[str]:
    """Names accepted by `get_preset` for the family, smallest first.

    Raises:
        ValueError: unknown family.
    """
    if model_type not in PRESETS:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {model_types()}")
    return list(PRESETS[model_type])


def get_preset(name: str, model_type: str = "llama") -> ModelConfig:
    """A fresh config for preset `name` of the family `model_type`.

    Raises:
        ValueError: unknown family or name (the message lists the valid ones).
    """
    names = preset_names(model_type)
    if name not in names:
        raise ValueError(f"unknown {model_type} preset {name!r}; choose one of {names}")
    return PRESETS[model_type][name]()
