"""Named T5 v1.1 presets: small factory functions. `vocab_size` stays None (the trainer fills
it from the tokenizer); YAML experiments override fields on top."""

from __future__ import annotations

from collections.abc import Callable

from model.t5.config import T5Config


def debug() -> T5Config:
    """Tiny T5 that trains on a CPU in seconds; ~0.2M non-embedding parameters. Shape chosen for
    speed, not taken from a paper."""
    return T5Config(
        name="debug", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4,
    )  # fmt: skip


def small() -> T5Config:
    """T5 v1.1 small (google/t5-v1_1-small config.json): 512 wide, 8+8 layers, 6 heads of 64,
    1024 gated-GELU inner; ~77M parameters with the 32128 vocabulary."""
    return T5Config(
        name="small", d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
        num_heads=6,
    )  # fmt: skip


def base() -> T5Config:
    """T5 v1.1 base (google/t5-v1_1-base config.json): 768 wide, 12+12 layers, 12 heads of 64,
    2048 inner; ~248M parameters with the 32128 vocabulary."""
    return T5Config(
        name="base", d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
        num_heads=12,
    )  # fmt: skip


def large() -> T5Config:
    """T5 v1.1 large (google/t5-v1_1-large config.json): 1024 wide, 24+24 layers, 16 heads of
    64, 2816 inner; ~783M parameters with the 32128 vocabulary."""
    return T5Config(
        name="large", d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
        num_heads=16,
    )  # fmt: skip


def xl() -> T5Config:
    """T5 v1.1 XL (google/t5-v1_1-xl config.json): 2048 wide, 24+24 layers, 32 heads of 64,
    5120 inner; ~2.85B parameters with the 32128 vocabulary."""
    return T5Config(
        name="xl", d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
        num_heads=32,
    )  # fmt: skip


PRESETS: dict[str, Callable[[], T5Config]] = {
    "debug": debug,
    "small": small,
    "base": base,
    "large": large,
    "xl": xl,
}
