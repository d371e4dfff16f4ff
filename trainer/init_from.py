"""``model.init_from``: a run that continues pretraining a Hugging Face checkpoint folder takes
its architecture from the folder's ``config.json`` and its tokenizer from the folder's
``tokenizer.model``; resolved here, before validation, from :func:`trainer.config.config_from_dict`.
The weights are read in the workers, each rank only the tensors or slices it holds
(:func:`trainer.construct.build_for_layout`, `model.hf_checkpoint.HFWeightReader`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.registry import FAMILIES, get_preset, model_types, preset_names
from trainer.errors import ConfigError

# Model fields a checkpoint's weights do not fix: a run may set them (T5's dropout, init stds).
_TRAINING_FIELDS = frozenset({"dropout_rate", "initializer_range", "initializer_factor"})


def resolve_init_from(tree: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with the model section of ``model.init_from`` (a Hugging Face folder): its
    ``config.json`` supplies every architecture field, which the YAML and overrides may repeat
    only with the same values (a preset ``model.name`` counts as its fields). The tokenizer
    settings ``vocab_size`` and ``num_sentinels`` come from the tokenizer the run will use: the
    folder's ``tokenizer.model`` unless ``tokenizer.path`` names another one.

    A model section that already names every field (the resolved ``config.yaml`` of a run, or a
    checkpoint's config) loads without the folder, so a run resumes and generates after it is
    gone; a fresh start still needs it (the weights are read in the workers).

    Raises:
        ConfigError: the folder, its config.json, its weights or the tokenizer are missing; a
            model family other than model.model_type, or not llama / t5; a feature Kiln does not
            implement; a setting that contradicts the folder (both values and the file named).
    """
    from model.hf_checkpoint import CONFIG_FILE, load_hf_config, read_hf_model_type, weight_files

    path = Path(str(model["init_from"]))
    where = f"model.init_from={str(path)!r}"
    family = model.get("model_type")
    if family is not None and family not in model_types():
        raise ConfigError(
            f"model.model_type={family!r} is not a model family; use one of {model_types()}"
        )
    fields = set(FAMILIES[family].config_class.model_fields) if family is not None else set()
    if family is not None and fields - {"name", "init_from"} <= set(model) and not path.exists():
        return tree
    try:
        hf_type = read_hf_model_type(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(
            f"{where}: {e}; point it at a Hugging Face model folder (config.json + "
            f"model.safetensors, as save_pretrained writes it)"
        ) from None
    if family is not None and hf_type != family:
        raise ConfigError(
            f"{where} holds a {hf_type!r} model ({path / CONFIG_FILE}) but model.model_type="
            f"{family!r}; set model.model_type={hf_type!r} (or drop it) or use a {family} folder"
        )
    try:
        arch = load_hf_config(path).model_dump(exclude={"name", "init_from"})
    except ValueError as e:
        raise ConfigError(f"{where}: Kiln cannot continue pretraining this model: {e}") from None
    if not weight_files(path):
        raise ConfigError(
            f"{where} holds no model.safetensors or model.safetensors.index.json; save the "
            f"weights there with save_pretrained (safetensors) or point init_from elsewhere"
        )
    name = model.get("name", "custom")
    given = {k: (v, f"model.{k}") for k, v in model.items()}
    if name != "custom":
        if name not in preset_names(hf_type):
            raise ConfigError(
                f"model.name={name!r} is not a {hf_type} preset; with {where} leave model.name "
                f"unset ('custom') or name the preset the folder's architecture has"
            )
        preset = get_preset(name, hf_type).model_dump(exclude={"name", "init_from", "vocab_size"})
        given = {k: (v, f"model.name={name!r} (a preset) sets {k}") for k, v in preset.items()}
        given |= {k: (v, f"model.{k}") for k, v in model.items()}
    for key, (value, source) in given.items():
        if key in arch and key not in _TRAINING_FIELDS and value != arch[key]:
            raise ConfigError(
                f"{source}={value!r} conflicts with {key}={arch[key]!r} in "
                f"{path / CONFIG_FILE}: {where} takes the architecture from there; drop the "
                f"setting or make it {arch[key]!r}"
            )
    resolved = {**arch, **model, "model_type": hf_type, "name": name}
    tokenizer = tree.get("tokenizer") or {}
    if isinstance(tokenizer, dict):
        tokenizer = _init_from_tokenizer_settings(tokenizer, path, arch["vocab_size"])
    return {**tree, "model": resolved, "tokenizer": tokenizer}


def _init_from_tokenizer_settings(
    tokenizer: dict[str, Any], path: Path, model_vocab: int
) -> dict[str, Any]:
    """The tokenizer section with ``vocab_size`` and ``num_sentinels`` of the tokenizer a run
    from ``path`` uses (see :func:`resolve_init_from`)."""
    from model.tokenizer import Tokenizer

    if tokenizer.get("path") is not None:
        file = Path(str(tokenizer["path"]))
        if not file.is_file():
            raise ConfigError(
                f"tokenizer.path={str(file)!r} does not exist; continuing pretraining from "
                f"model.init_from={str(path)!r} needs the tokenizer the model was trained with, "
                f"so point tokenizer.path at it"
            )
    else:
        file = path / "tokenizer.model"
        if not file.is_file():
            raise ConfigError(
                f"model.init_from={str(path)!r} holds no tokenizer.model (Kiln's sentencepiece "
                f"model); set tokenizer.path to the tokenizer the model was trained with"
            )
    tok = Tokenizer.load(file)
    if tok.vocab_size > model_vocab:
        raise ConfigError(
            f"tokenizer {file} has {tok.vocab_size} pieces but the model of model.init_from="
            f"{str(path)!r} has vocab_size={model_vocab}; use the tokenizer it was trained with"
        )
    found = {"vocab_size": tok.vocab_size, "num_sentinels": len(tok.sentinel_ids)}
    for key, value in found.items():
        if tokenizer.get(key) is not None and tokenizer[key] != value:
            raise ConfigError(
                f"tokenizer.{key}={tokenizer[key]!r} but {file} has {value}: a run from "
                f"model.init_from uses that tokenizer; drop tokenizer.{key} or make it {value}"
            )
    return {**tokenizer, **found}
