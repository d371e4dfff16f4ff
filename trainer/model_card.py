"""The model card (``README.md``) of a published checkpoint, rendered from
``trainer/templates/model_card.md.j2`` with what the run recorded: the resolved config, the
trainer state of the checkpoint, the data manifests and ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from model.registry import spec
from trainer.config import config_from_dict
from trainer.objectives import describe, describe_documents, is_causal

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer
    from trainer.publish import PublishReport

TEMPLATE_DIR = Path(__file__).parent / "templates"
OBJECTIVE_NAMES = {
    "causal_lm": "next-token prediction",
    "span_corruption": "span corruption",
    "prefix_lm": "prefix language modelling",
}


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def last_evaluation(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The last validation record of ``metrics.jsonl`` at or before ``step`` (None if none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if "val_loss" in record and record["step"] <= step:
            found = record
    return found


def _datasets(cfg) -> list[dict[str, Any]]:
    total = sum(d.weight for d in cfg.data.datasets)
    rows = []
    for d in cfg.data.datasets:
        manifest_path = cfg.dataset_dir(d.name) / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        train = manifest.get("splits", {}).get("train", {})
        docs = manifest.get("documents", {}).get("usable")
        rows.append(
            {
                "name": d.name,
                "share": f"{d.weight / total:.0%}",
                "sources": ", ".join(f"`{s.path}`" for s in d.sources),
                "license": manifest.get("license") or d.license or "not recorded",
                "documents": f"{docs:,}" if docs is not None else "n/a",
                "tokens": f"{train['tokens']:,}" if "tokens" in train else "n/a",
            }
        )
    return rows


def _training_rows(cfg, state: dict[str, Any]) -> list[tuple[str, str]]:
    t, p = cfg.train, cfg.parallel
    hardware = state.get("hardware", {})
    device = hardware.get("device_name") or hardware.get("accelerator") or "not recorded"
    layout = f"{state['world_size']} processes, ZeRO stage {state['zero_stage']}"
    if state.get("pipeline_stages", 1) > 1:
        layout += f", {state['pipeline_stages']} pipeline stages"
    offloaded = [
        n
        for n, on in (("optimizer states", p.offload_optimizer), ("parameters", p.offload_params))
        if on
    ]
    if offloaded:
        where = "NVMe" if p.offload_device == "nvme" else "CPU memory"
        layout += f", {' and '.join(offloaded)} offloaded to {where}"
    return [
        ("steps", f"{state['step']:,}"),
        ("tokens seen", f"{state['tokens_seen']:,}"),
        ("objective", describe(cfg.derived.objectives, cfg.data.seq_len)),
        ("documents", describe_documents(cfg.data)),
        ("global batch", f"{state['global_batch_size']} sequences of {cfg.data.seq_len} tokens"),
        (
            "optimizer",
            f"AdamW (betas {t.adam_beta1}, {t.adam_beta2}; weight decay {t.weight_decay}), "
            f"clip {t.grad_clip}",
        ),
        (
            "learning rate",
            f"{t.lr:g} peak, {t.warmup_steps} warmup steps, {t.lr_schedule} decay to {t.min_lr:g}",
        ),
        ("precision", t.precision),
        ("hardware", device),
        ("parallel layout", layout),
        ("initialised from", cfg.model.model_dump().get("init_from") or f"seed {t.seed}"),
        *_rollback_rows(state),
    ]


def _index_ranges(indices: list[int]) -> str:
    """Sorted ints as ranges: ``[4, 5, 6, 9]`` -> ``"4-6, 9"``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _rollback_rows(state: dict[str, Any]) -> list[tuple[str, str]]:
    """The training record of the health supervisor's rollbacks (:mod:`trainer.health`): the
    steps that diverged, the checkpoints gone back to, and the global sample indices left out of
    the data order; none for a run that never rolled back."""
    rollbacks, excluded = state.get("rollbacks", []), state.get("excluded_samples", [])
    if not rollbacks and not excluded:
        return []
    made = ", ".join(f"step {r['step']} to step {r['to_step']}" for r in rollbacks)
    return [
        ("rollbacks", f"{len(rollbacks)} ({made})"),
        (
            "excluded samples",
            f"{len(excluded)} global sample indices left out of the data order: "
            f"{_index_ranges(excluded)}",
        ),
    ]


def model_card(
    run_dir: Path,
    state: dict[str, Any],
    report: PublishReport,
    tok: Tokenizer,
    *,
    license: str | None,
    location: str,
) -> str:
    """The card's Markdown (with the Hub's YAML metadata block) for the checkpoint whose trainer
    state is ``state``, published as ``report`` says, with tokenizer ``tok``; its code loads the
    model from ``location`` (the folder or the Hub repository)."""
    run_cfg = config_from_dict(state["config"])
    m = run_cfg.derived.model
    family = spec(m)
    causal = is_causal(run_cfg.derived.objectives)
    evaluation = last_evaluation(run_dir, state["step"])
    if evaluation is not None:
        evaluation["target"] = "" if causal else " (per target token)"
        evaluation.setdefault("val_ppl", math.exp(min(evaluation["val_loss"], 50)))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("model_card.md.j2").render(
        license=license or "other",
        pipeline_tag=family.pipeline_tag,
        family=m.model_type,
        name=report.out.name,
        params=_human(report.parameters),
        architecture=family.architecture,
        step=state["step"],
        tokens_seen=state["tokens_seen"],
        objective=" + ".join(
            dict.fromkeys(OBJECTIVE_NAMES[o.type] for o in run_cfg.derived.objectives)
        ),
        auto_class=family.hf_auto_class,
        location=location,
        architecture_rows=family.architecture_rows(m),
        tokenizer={
            "model_type": run_cfg.tokenizer.model_type,
            "vocab_size": tok.vocab_size,
            "sha256": tok.sha256,
            "input_sentence_size": run_cfg.tokenizer.input_sentence_size,
            "sentinels": len(tok.sentinel_ids),
        },
        tokenizer_behaviour=(
            "Encoding appends `</s>`, as T5's tokenizer does."
            if family.tokenizer_appends_eos
            else "Encoding adds no `<s>` or `</s>` (the training documents had none in front)."
        ),
        datasets=_datasets(run_cfg),
        seq_len=run_cfg.data.seq_len,
        training_rows=_training_rows(run_cfg, state),
        evaluation=evaluation,
        check={
            "fp32": report.max_logit_diff_fp32,
            "native": report.max_logit_diff_native,
            "dtype": report.dtype,
            "scale": report.logit_scale,
        },
        checkpoint=f"{Path(report.checkpoint).name}",
        config_yaml=run_cfg.to_yaml(),
    )
