"""Training the T5 family through `kiln train` with 2 CPU processes (torchrun, gloo, DeepSpeed CPU
accelerator): ZeRO stages agree, resume is exact, validation reports target-token metrics, and
`kiln generate` fills the spans of a sentinel prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import T5_SENTINELS, kiln_in_process, step_losses, step_sample_ids, train_config
from distributed import run_distributed, train_runs
from test_train_distributed import STAGE_TOLERANCE, continue_from

from model.generate import fill_in_spans, generate_seq2seq
from trainer.inference import load_run


def t5_config(tmp: Path, data_root: Path, **sections) -> Path:
    """`train_config` for the T5 debug preset on the sentinel tokenizer of `prepared_t5_data`."""
    return train_config(
        tmp, data_root, model__model_type="t5", tokenizer__num_sentinels=T5_SENTINELS, **sections
    )


def test_t5_zero_stages_agree(t5_runs):
    losses = {stage: step_losses(run) for stage, run in t5_runs.items()}
    reference = torch.tensor([losses[0][s] for s in range(1, 7)])
    assert reference[-1] < reference[0]  # it learns
    for stage in (1, 2, 3):
        got = torch.tensor([losses[stage][s] for s in range(1, 7)])
        torch.testing.assert_close(got, reference, rtol=0, atol=STAGE_TOLERANCE)


def test_t5_validation_reports_target_metrics(t5_runs):
    records = [json.loads(x) for x in (t5_runs[2] / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "val_loss" in r}
    assert sorted(evals) == [0, 3, 6]
    assert evals[6]["val_loss"] < evals[0]["val_loss"]
    for r in evals.values():
        assert r["val_ppl"] == pytest.approx(torch.tensor(r["val_loss"]).exp().item(), rel=1e-6)
        assert r["val_bpb"] > 0


RESUME_STAGES = (0, 3)


@pytest.fixture(scope="module")
def t5_resumed(t5_runs, prepared_t5_data, tmp_path_factory) -> dict[int, Path]:
    """`t5_runs` of stages 0 and 3 cut back to step 3 and resumed on 2 processes (in-process,
    one worker start-up)."""
    configs = []
    for stage in RESUME_STAGES:
        tmp = tmp_path_factory.mktemp(f"t5resume{stage}")
        configs.append(
            t5_config(tmp, prepared_t5_data, parallel__zero_stage=stage, train__eval_every=3)
        )
        continue_from(t5_runs[stage], 3, tmp)
    runs = run_distributed(train_runs, 2, *configs)[0]
    return dict(zip(RESUME_STAGES, runs, strict=True))


@pytest.mark.parametrize("stage", RESUME_STAGES)
def test_t5_resume_is_exact(t5_runs, t5_resumed, stage):
    reference, run = t5_runs[stage], t5_resumed[stage]
    want, got = step_losses(reference), step_losses(run)
    assert sorted(got) == [4, 5, 6]
    for s in (4, 5, 6):
        assert got[s] == pytest.approx(want[s], abs=1e-6), (s, got[s], want[s])
    assert step_sample_ids(run) == {s: step_sample_ids(reference)[s] for s in (4, 5, 6)}


def test_kiln_generate_fills_the_spans(t5_runs):
    run = t5_runs[3]
    prompt = "ROMEO: <extra_id_0> the <extra_id_1> night."
    result = kiln_in_process("generate", str(run), "--prompt", prompt, "--temperature", "0",
                  "--max-new-tokens", "12")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    model, tok = load_run(run)
    ids = tok.encode(prompt)
    new = generate_seq2seq(model, [*ids, tok.eos_id], max_new_tokens=12, temperature=0)
    assert new[0] in tok.sentinel_ids  # targets open with a sentinel (learned in 6 steps)
    want = tok.decode(fill_in_spans(ids, new, tok.sentinel_ids, tok.eos_id))
    assert result.stdout.strip() == want.strip()
    assert want.startswith("ROMEO:")
