"""The model families by ``model_type``: the one place that lists them (see `model.family`)."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field

from model.family import FamilySpec
from model.llama import SPEC as LLAMA
from model.t5 import SPEC as T5

FAMILIES: dict[str, FamilySpec] = {"llama": LLAMA, "t5": T5}
DEFAULT_MODEL_TYPE = "llama"  # a model section without model_type

ModelConfig = Union[tuple(s.config_class for s in FAMILIES.values())]  # noqa: UP007
"""A config of any family."""

ModelConfigField = Annotated[ModelConfig, Field(discriminator="model_type")]
"""The pydantic field of a model section: the ``model_type`` picks the family's config."""


def model_types() -> list[str]:
    """The model families: ``model.model_type`` values."""
    return list(FAMILIES)


def family(model_type: str) -> FamilySpec:
    """The spec of ``model_type``.

    Raises:
        ValueError: unknown family (the message lists the known ones).
    """
    if model_type not in FAMILIES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {model_types()}")
    return FAMILIES[model_type]


def spec(cfg: Any) -> FamilySpec:
    """The spec of a model config (any object with ``model_type``)."""
    return family(cfg.model_type)


def preset_names(model_type: str = "llama") -> list[str]:
    """Names accepted by `get_preset` for the family, smallest first.

    Raises:
        ValueError: unknown family.
    """
    return list(family(model_type).presets)


def get_preset(name: str, model_type: str = "llama") -> ModelConfig:
    """A fresh config for preset ``name`` of the family ``model_type``.

    Raises:
        ValueError: unknown family or name (the message lists the valid ones).
    """
    return family(model_type).preset(name)
