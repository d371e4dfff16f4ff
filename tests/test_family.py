"""The family specs: every registered family provides what generic code asks of it, and no
generic code branches on ``model_type``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from model import build_model
from model.family import FamilySpec
from model.registry import FAMILIES, family, model_types, spec
from trainer.config import load_config
from trainer.estimate import flops_per_token
from trainer.objectives import build_objective, is_causal, model_lengths
from trainer.publish import hf_model, load_published

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_type", model_types())
def test_spec_is_complete_and_consistent(model_type):
    s = family(model_type)
    assert isinstance(s, FamilySpec) and s.model_type == model_type
    assert s.config_class.model_fields["model_type"].default == model_type
    assert "debug" in s.presets
    for name in ("to_hf_config", "from_hf_config", "to_hf_state_dict", "from_hf_state_dict"):
        assert callable(getattr(s.hf, name)), f"{model_type}.hf lacks {name}"
    hf_class = getattr(transformers, s.hf_model_class)
    assert getattr(transformers, s.hf_auto_class)._model_mapping[type(hf_class.config_class())]
    assert s.objectives and set(s.objectives) <= {"causal_lm", "span_corruption", "prefix_lm"}
    for name, preset in s.presets.items():
        cfg = preset().model_copy(update={"vocab_size": 512})
        assert cfg.name == name
        with torch.device("meta"):
            module = s.model_class(cfg)
        assert sum(p.numel() for p in module.parameters()) == cfg.num_parameters()
        assert len(module.blocks()) == cfg.num_blocks
        assert isinstance(s.architecture_rows(cfg), list) and len(s.shape_row(cfg)) == 3


@pytest.mark.parametrize("model_type", model_types())
def test_check_batch_feeds_the_model_and_its_hf_twin(model_type, tmp_path):
    """The spec's publishing batch goes into Kiln's model and the transformers class by keyword
    alike, with the same logits (the adapter's config and key map)."""
    s = family(model_type)
    cfg = s.preset("debug").model_copy(update={"vocab_size": 512})
    model = build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    batch = s.check_batch(cfg, lambda n: torch.randint(4, 512, (2, n), generator=g))
    assert set(s.model_inputs) == set(batch)
    hf_model(model, torch.float32).save_pretrained(tmp_path)  # the spec's adapter, as publish
    hf = load_published(tmp_path, model_type, torch.float32)  # the spec's Auto class
    assert type(hf).__name__ == s.hf_model_class
    with torch.no_grad():
        ours, theirs = model(**batch), hf(**batch).logits
    assert ours.shape[:2] == batch.get("decoder_input_ids", batch["input_ids"]).shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", model_types())
def test_flops_and_activations_follow_the_objective_lengths(model_type):
    cfg = load_config(
        None, [f"model.model_type={model_type}", "tokenizer.vocab_size=512", "data.seq_len=128"]
    )
    s = spec(cfg.model)
    lengths = model_lengths(cfg.derived.objectives, cfg.data.seq_len)
    # the lengths the estimates use are those of the batches the objective makes
    sentinels = np.arange(511, 511 - 16, -1)
    rows = np.random.default_rng(0).integers(4, 400, (2, 129))
    batch = build_objective(cfg, sentinels)(rows, np.arange(2), 0)
    assert set(batch.inputs) == set(s.model_inputs)
    made = [batch.inputs["input_ids"].shape[1]]
    if "decoder_input_ids" in batch.inputs:
        made.append(batch.inputs["decoder_input_ids"].shape[1])
    assert lengths == tuple(made)
    per_token = flops_per_token(cfg)
    n = cfg.derived.model.num_parameters(exclude_input_embedding=True)
    assert 6 * n * 0.5 < per_token < 6 * n * 2  # dominated by 6N
    stacks = s.activation_stacks(cfg.model, lengths)
    assert sum(st.num_blocks for st in stacks) == cfg.model.num_blocks
    assert is_causal(cfg.derived.objectives) == (len(lengths) == 1)
    assert cfg.derived.objectives[0].type == s.objectives[0]  # the family's default objective


def test_generic_code_never_branches_on_model_type():
    """model_type is decided by the registry: outside the family folders no code compares it."""
    pattern = re.compile(r"model_type\s*(==|!=|in\b)|== *\"(llama|t5)\"|isinstance\([^)]*Config\)")
    offenders = []
    for folder in ("model", "trainer", "launcher", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO)
            if rel.parts[:2] in {("model", name) for name in FAMILIES}:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and "trainer_spec" not in line:
                    offenders.append(f"{rel}:{i}: {line.strip()}")
    assert offenders == [], "ask the family spec instead:\n" + "\n".join(offenders)
