"""Shared fixtures: a tiny tokenizer and a prepared dataset made from the bundled sample, and a
helper that runs `kiln train` as a user would (torchrun, gloo, DeepSpeed's CPU accelerator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import run_distributed, train_runs

REPO = Path(__file__).resolve().parents[1]
# Tests never reach the network: transformers and huggingface_hub read local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SAMPLE = REPO / "sample" / "tinyshakespeare" / "input.txt"
T5_SENTINELS = 16


# Fixtures that train (or start a cluster) for more than ~20 s on 2 cores: a test that uses one
# is `slow`, since `pytest -m "not slow"` would pay for the fixture.
SLOW_FIXTURES = {"zero_runs", "t5_runs", "pipeline_runs", "ray_cluster", "cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _source(path: Path) -> str:
    return f"{{path: {path}, sample_by: paragraph}}"


def _prepare(root: Path, *extra: str) -> Path:
    from trainer.config import load_config
    from trainer.data.prepare import prepare_all

    corpus = root / "shakespeare.txt"
    corpus.write_text(SAMPLE.read_text()[:200_000])
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "data.seq_len=64",
            "data.num_proc=1",
            "data.validation_fraction=0.05",
            f"data.datasets=[{{name: shakespeare, sources: [{_source(corpus)}]}}]",
            "tokenizer.vocab_size=512",
            *extra,
        ],
    )
    prepare_all(cfg)
    return root


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """A data root with a 512-piece tokenizer and the dataset `shakespeare` (seq_len 64) made
    from the first 200 KB of the bundled sample, one document per paragraph."""
    return _prepare(tmp_path_factory.mktemp("data"))


T5_OVERRIDES = ("model.model_type=t5", f"tokenizer.num_sentinels={T5_SENTINELS}")


@pytest.fixture(scope="session")
def prepared_t5_data(tmp_path_factory) -> Path:
    """As `prepared_data`, with a tokenizer that reserves 16 T5 sentinels (64 raw tokens make 3
    noise spans at density 0.15, mean span 3)."""
    return _prepare(tmp_path_factory.mktemp("t5data"), *T5_OVERRIDES)


def train_config(tmp_path: Path, data_root: Path, **sections) -> Path:
    """Write a debug-model training config into ``tmp_path`` and return its path."""
    from trainer.config import load_config

    corpus = _source(data_root / "shakespeare.txt")
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"data.root={data_root}",
        "data.seq_len=64",
        f"data.datasets=[{{name: shakespeare, sources: [{corpus}]}}]",
        "tokenizer.vocab_size=512",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.max_steps=6",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=1000",
        "train.eval_samples=8",
        "train.log_sample_ids=true",
        "train.peak_flops=1e11",
        "checkpoint.save_every=3",
        "checkpoint.keep_last=5",
        "tracking.wandb_mode=disabled",
        # Batches read in the step: a prefetch worker is a fresh process (~2 s to start on 2
        # cores) at every fit; the tests that prefetch (test_prefetch, test_compile's every
        # option, the Slurm stop signal, the Ray submission) ask for it.
        "data.prefetch_steps=0",
    ]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in sections.items()]
    path = tmp_path / "config.yaml"
    path.write_text(load_config(None, overrides).to_yaml())
    return path


def kiln(
    *args: str, timeout: float = 600, extra_env: dict[str, str] | None = None, **popen
) -> subprocess.CompletedProcess:
    """Run the `kiln` CLI in a subprocess, as a user would (``extra_env`` added to its
    environment)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def kiln_in_process(*args: str) -> subprocess.CompletedProcess:
    """Run the `kiln` CLI in this process (click's test runner) for commands that start no
    workers (generate, publish, checks that refuse, cache): the same command, from the same
    folder as :func:`kiln`, without a Python start-up and its imports. Returns what :func:`kiln`
    returns; an uncaught exception's traceback is in ``stderr``."""
    import contextlib
    import traceback

    from click.testing import CliRunner

    from launcher.cli import cli

    with contextlib.chdir(REPO):
        result = CliRunner().invoke(cli, list(args))
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Run-folder mirrors under the test's folder (KILN_CACHE travels to `kiln` subprocesses
    too)."""
    from trainer import mirror

    path = tmp_path / "cache"
    monkeypatch.setenv(mirror.CACHE_ENV, str(path))
    return path


class FakeEngine:
    """What save_checkpoint asks of a DeepSpeed engine: a shard under root/tag."""

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        out = Path(root) / tag
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.ones(3)}, out / "mp_rank_00_model_states.pt")


def train(config: Path, *extra: str, nproc: int = 2) -> Path:
    """`kiln train CONFIG --nproc N` to completion; returns the run folder."""
    result = kiln("train", str(config), "--nproc", str(nproc), "--sample-prompt", "", *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return config.parent / "run"


def t5_sections(**sections) -> dict[str, object]:
    """`train_config` sections for the T5 debug preset on `prepared_t5_data`'s tokenizer."""
    return dict(model__model_type="t5", tokenizer__num_sentinels=T5_SENTINELS, **sections)


# Run folders several test modules read (session-scoped: each is trained once per session).
@pytest.fixture(scope="session")
def zero_runs(prepared_data, tmp_path_factory) -> dict[int, Path]:
    """6 steps of the debug decoder under each ZeRO stage on 2 processes, checkpoints at steps
    3 and 6 (trained in-process on 2 gloo ranks, one worker start-up for the four runs). ZeRO-3
    steps its optimizer in one sub-group of 2^20 elements, not the derived size, so that a resume
    with the derived size must keep the checkpoint's (`test_resume_is_exact`)."""
    stages = (0, 1, 2, 3)
    groups = {3: {"parallel__sub_group_size": 2**20}}
    configs = [
        train_config(
            tmp_path_factory.mktemp(f"zero{s}"),
            prepared_data,
            parallel__zero_stage=s,
            **groups.get(s, {}),
        )
        for s in stages
    ]
    return dict(zip(stages, run_distributed(train_runs, 2, *configs)[0], strict=True))


@pytest.fixture(scope="session")
def t5_runs(prepared_t5_data, tmp_path_factory) -> dict[int, Path]:
    """6 steps of the T5 debug preset under each ZeRO stage on 2 processes, checkpoints at steps
    3 and 6, a validation pass at steps 0, 3 and 6 (in-process, as `zero_runs`)."""
    stages = (0, 1, 2, 3)
    configs = [
        train_config(
            tmp_path_factory.mktemp(f"t5zero{s}"),
            prepared_t5_data,
            **t5_sections(parallel__zero_stage=s, train__eval_every=3),
        )
        for s in stages
    ]
    return dict(zip(stages, run_distributed(train_runs, 2, *configs)[0], strict=True))


@pytest.fixture(scope="session")
def pipeline_runs(prepared_data, prepared_t5_data, tmp_path_factory) -> dict[str, Path]:
    """6 steps (global batch 8 = 4 micro-batches of 2) of each family: `{family}-plain` on 1
    process and `{family}-pipe`, 2 pipeline stages on 2 processes (ZeRO 1), checkpoints at steps
    3 and 6; and as `llama-tied-plain` / `llama-tied-pipe`, 3 steps of the decoder with its head
    tied to the embedding, no checkpoint (in-process: one 1-rank and one 2-rank worker start-up
    for them all)."""
    configs: dict[str, dict[str, Path]] = {"plain": {}, "pipe": {}}
    tied = dict(model__tie_word_embeddings="true", train__max_steps=3, checkpoint__save_every=1000)
    for family, data, extra in (
        ("llama", prepared_data, {}),
        ("t5", prepared_t5_data, t5_sections()),
        ("llama-tied", prepared_data, tied),
    ):
        for name, stages in (("plain", 1), ("pipe", 2)):
            tmp = tmp_path_factory.mktemp(f"{family}-{name}")
            configs[name][family] = train_config(
                tmp, data, parallel__zero_stage=1, parallel__pipeline_stages=stages, **extra
            )
    out = {}
    for name, nproc in (("plain", 1), ("pipe", 2)):
        runs = run_distributed(train_runs, nproc, *configs[name].values())[0]
        out.update(
            {f"{family}-{name}": run for family, run in zip(configs[name], runs, strict=True)}
        )
    return out


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step from a run's metrics.jsonl (the last record of a step wins)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def step_sample_ids(run_dir: Path) -> dict[int, list[int]]:
    """Sorted sample ids trained on at each step, over all ranks."""
    ids: dict[int, list[int]] = {}
    for f in (run_dir / "sample_ids").glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            ids.setdefault(rec["step"], []).extend(rec["ids"])
    return {k: sorted(v) for k, v in ids.items()}
