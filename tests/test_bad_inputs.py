"""Bad inputs and faults, tried as a hostile user would: every one gets a non-zero exit, one
message that names the problem and the fix, no traceback, and leaves what is already saved exactly
as it was (checksums of every file under the test's folder before and after).

Each case is (name, set-up, command, words the message must hold). The set-ups build the folders
a command meets (a run folder with checkpoints, a data root, a published folder) from files alone,
so the cases run in-process in well under a second each; cases that need a trained run live with
the tests of that feature.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import kiln_in_process


def fake_run(root: Path) -> Path:
    """A run folder as training leaves it: config, metrics, three complete checkpoints."""
    run = root / "run"
    for step in (2, 4, 6):
        ckpt = run / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(f'{{"step": {step}}}')
        (ckpt / "mp_rank_00_model_states.pt").write_bytes(bytes([step]) * 64)
    (run / "checkpoints" / "latest").write_text("step-00000006")
    (run / "config.yaml").write_text("run_dir: run\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    return run


def fake_data_root(root: Path) -> Path:
    data = root / "data"
    (data / "tokenizer").mkdir(parents=True)
    (data / "tokenizer" / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    (data / "corpus" / "train").mkdir(parents=True)
    (data / "corpus" / "manifest.json").write_text("{}")
    (data / "corpus" / "train" / "shard-00000.bin").write_bytes(b"\x01" * 128)
    return data


def fake_hf_folder(root: Path) -> Path:
    folder = root / "published"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x02" * 32)
    return folder


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Path], None]
    args: Callable[[Path], list[str]]
    says: tuple[str, ...]


def _both(root: Path) -> None:
    fake_run(root)
    fake_data_root(root)


def run_to(command: str, out: str, *flags: str) -> Callable[[Path], list[str]]:
    """``kiln COMMAND <root>/run --out <root>/OUT FLAGS`` (COMMAND may be two words)."""
    return lambda r: [*command.split(), str(r / "run"), "--out", str(r / out), *flags]


CASES = [
    Case(
        "publish --out the run folder itself",
        _both,
        run_to("publish", "run", "--overwrite"),
        ("is the run folder", "choose a folder outside it"),
    ),
    Case(
        "publish --out a folder holding the run",
        _both,
        run_to("publish", ".", "--overwrite"),
        ("holds it", "would replace the run's checkpoints"),
    ),
    Case(
        "publish --overwrite onto a data root",
        _both,
        run_to("publish", "data", "--overwrite"),
        ("replaces only a published Hugging Face folder", "holds folders", "another --out"),
    ),
    Case(
        "publish --overwrite onto another run folder",
        lambda r: (fake_run(r), fake_run(r / "other")),
        run_to("publish", "other/run", "--overwrite"),
        ("replaces only a published Hugging Face folder", "checkpoints"),
    ),
    Case(
        "publish --overwrite onto a folder of files without config.json",
        lambda r: (fake_run(r), (r / "notes").mkdir(), (r / "notes" / "a.txt").write_text("x")),
        run_to("publish", "notes", "--overwrite"),
        ("no config.json", "another --out"),
    ),
    Case(
        "publish onto an existing folder without --overwrite",
        lambda r: (fake_run(r), fake_hf_folder(r)),
        run_to("publish", "published"),
        ("exists", "--overwrite"),
    ),
    Case(
        "publish --out an existing file",
        lambda r: (fake_run(r), (r / "file.txt").write_text("keep me")),
        run_to("publish", "file.txt"),
        ("file.txt",),
    ),
    Case(
        "consolidate --out onto an existing file",
        lambda r: (fake_run(r), fake_hf_folder(r)),
        run_to("checkpoint consolidate", "published/model.safetensors"),
        ("exists", "--overwrite"),
    ),
    Case(
        "consolidate --out into the run's checkpoints",
        _both,
        run_to("checkpoint consolidate", "run/checkpoints/w.safetensors"),
        ("inside the run's checkpoints", "elsewhere"),
    ),
    Case(
        "consolidate --out a file that is not safetensors",
        _both,
        run_to("checkpoint consolidate", "run/metrics.jsonl"),
        ("must name a .safetensors file",),
    ),
]


def write(name: str, text: str) -> Callable[[Path], None]:
    """A set-up that writes one file (and the run folder, which must stay as it is)."""

    def setup(root: Path) -> None:
        fake_run(root)
        (root / name).write_text(text)

    return setup


OK_CONFIG = "run_dir: run\ndata:\n  datasets: [{name: c, sources: [{path: corpus.txt}]}]\n"

CASES += [
    Case(
        "a YAML syntax error",
        write("exp.yaml", "model: {name: debug\n"),
        lambda r: ["train", str(r / "exp.yaml"), "--dry-run"],
        ("is not valid YAML", "line 2"),
    ),
    Case(
        "a YAML list instead of sections",
        write("exp.yaml", "- model\n- data\n"),
        lambda r: ["train", str(r / "exp.yaml"), "--dry-run"],
        ("holds a YAML list", "mapping of sections"),
    ),
    Case(
        "an override without a value",
        write("exp.yaml", OK_CONFIG),
        lambda r: ["train", str(r / "exp.yaml"), "train.lr", "--dry-run"],
        ("'train.lr' is not dotted.key=value", "train.lr=3e-4"),
    ),
    Case(
        "an override with an empty key part",
        write("exp.yaml", OK_CONFIG),
        lambda r: ["data", "prepare", str(r / "exp.yaml"), "train..lr=1"],
        ("'train..lr=1' is not dotted.key=value",),
    ),
]


def config_case(name: str, *overrides: str, says: tuple[str, ...]) -> Case:
    """``kiln train exp.yaml OVERRIDES --dry-run`` on a valid config."""
    return Case(
        name,
        write("exp.yaml", OK_CONFIG),
        lambda r: ["train", str(r / "exp.yaml"), *overrides, "--dry-run"],
        says,
    )


CASES += [
    config_case("an unknown section", "trian.lr=1", says=("did you mean 'train'",)),
    config_case("an unknown key", "train.lrr=1", says=("did you mean 'lr'",)),
    config_case("a section given a number", "train=5", says=("train=5", "TrainConfig")),
    config_case(
        "an unknown preset", "model.name=gigantic", says=("is not a llama preset", "use one of")
    ),
    config_case("ZeRO stage 4", "parallel.zero_stage=4", says=("zero_stage=4", "0, 1, 2 or 3")),
    config_case(
        "pipeline with ZeRO 3",
        "parallel.pipeline_stages=2",
        "parallel.zero_stage=3",
        "launch.nproc_per_node=2",
        says=("pipeline", "zero_stage"),
    ),
    config_case(
        "offload of parameters without ZeRO 3",
        "parallel.offload_params=true",
        says=("offload_params=true needs parallel.zero_stage=3",),
    ),
    config_case(
        "a batch that does not divide",
        "train.global_batch_size=7",
        says=("global_batch_size=7 is not divisible", "use a multiple of"),
    ),
    config_case("a negative learning rate", "train.lr=-1", says=("train.lr", "greater than 0")),
    config_case("a step count that is no number", "train.max_steps=abc", says=("max_steps",)),
    config_case(
        "heads that do not divide the width",
        "model.hidden_size=65",
        says=("hidden_size=65 is not divisible by num_attention_heads", "change either"),
    ),
    config_case(
        "sequences longer than the model's positions",
        "data.seq_len=100000",
        says=("exceeds model.max_position_embeddings", "shorten data.seq_len"),
    ),
    config_case(
        "a validation fraction above 1", "data.validation_fraction=1.5", says=("validation",)
    ),
    config_case(
        "a run folder URL of an unknown protocol",
        "run_dir=foo://bar",
        says=("knows no protocol 'foo'", "s3://"),
    ),
    config_case(
        "--restart of a run folder at a URL",
        "run_dir=file:///tmp/kiln-test-url-run",
        "--restart",
        says=("--restart works on a run folder path", "give another run_dir"),
    ),
    config_case(
        "init_from a folder that does not exist",
        "model.init_from=/nonexistent/model",
        says=("is not a folder", "save_pretrained"),
    ),
    config_case(
        "a data source that matches nothing",
        "data.datasets=[{name: c, sources: [{path: nowhere/*.txt}]}]",
        says=("matches no file", "fix the path"),
    ),
    Case(
        "a config file that does not exist",
        fake_run,
        lambda r: ["train", str(r / "missing.yaml"), "--dry-run"],
        ("missing.yaml", "does not exist"),
    ),
    Case(
        "a folder given as the config",
        fake_run,
        lambda r: ["train", str(r / "run"), "--dry-run"],
        ("is a directory",),
    ),
    Case(
        "generate from a folder without checkpoints",
        lambda r: (r / "empty").mkdir(),
        lambda r: ["generate", str(r / "empty"), "--prompt", "x"],
        ("has no checkpoint yet", "kiln train"),
    ),
    Case(
        "generate from a checkpoint step that does not exist",
        fake_run,
        lambda r: ["generate", str(r / "run"), "--prompt", "x", "--step", "5"],
        ("step-00000005", "is not a complete checkpoint"),
    ),
    Case(
        "generate from a file instead of a run folder",
        write("notes.txt", "x"),
        lambda r: ["generate", str(r / "notes.txt"), "--prompt", "x"],
        ("notes.txt", "is a file"),
    ),
    Case(
        "consolidate a folder without checkpoints",
        lambda r: (r / "empty").mkdir(),
        lambda r: [
            "checkpoint",
            "consolidate",
            str(r / "empty"),
            "--out",
            str(r / "w.safetensors"),
        ],
        ("has no checkpoint yet",),
    ),
    Case(
        "slurm status of a run never submitted",
        fake_run,
        lambda r: ["slurm", "status", str(r / "run")],
        ("no job was submitted", "kiln slurm submit"),
    ),
    Case(
        "cache clean with a duration that is none",
        fake_run,
        lambda r: ["cache", "clean", "--older-than", "xyz"],
        ("'xyz' is no duration", "30m, 12h, 7d"),
    ),
]


def data_case(name: str, files: dict[str, bytes | str], says: tuple[str, ...], **extra) -> Case:
    """``kiln data prepare`` of one dataset made of ``files`` (written under the test's folder;
    the first is the source unless ``source`` names a glob)."""
    source = extra.pop("source", next(iter(files)))
    overrides = [f"{k}={v}" for k, v in {"tokenizer.vocab_size": 1024, **extra}.items()]

    def setup(root: Path) -> None:
        fake_run(root)
        for name_, content in files.items():
            path = root / name_
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content)
            else:
                path.write_bytes(content)

    def args(root: Path) -> list[str]:
        (root / "exp.yaml").touch()
        return [
            "data", "prepare", str(root / "exp.yaml"), f"run_dir={root / 'run'}",
            f"data.root={root / 'prepared'}",
            f"data.datasets=[{{name: c, sources: [{{path: {root / source}}}]}}]",
            *overrides,
        ]  # fmt: skip

    return Case(name, setup, args, says)


def prepare_into(data_root: str, run: str = "run") -> Callable[[Path], list[str]]:
    """``kiln data prepare`` of a valid corpus into ``<root>/DATA_ROOT``, run_dir ``<root>/RUN``."""

    def args(root: Path) -> list[str]:
        (root / "exp.yaml").touch()
        (root / "ok.txt").write_text("Some ordinary text.\n\n" * 100)
        return [
            "data", "prepare", str(root / "exp.yaml"), f"run_dir={root / run}",
            f"data.root={root / data_root}",
            f"data.datasets=[{{name: c, sources: [{{path: {root / 'ok.txt'}}}]}}]",
        ]  # fmt: skip

    return args


CASES += [
    Case(
        "data prepare into the run folder",
        fake_run,
        prepare_into("run"),
        ("data.root is", "which is the run folder", "separate folders"),
    ),
    Case(
        "data prepare into a dataset folder that holds the run",
        lambda r: fake_run(r / "c"),
        prepare_into(".", run="c/run"),
        ("dataset 'c' is", "which holds the run folder", "separate folders"),
    ),
]

_LATIN1 = "Der Bär läuft über die Straße nach Köln. Café, naïve, Größe.\n\n" * 200
_RANDOM = bytes((i * 7919 + 13) % 251 for i in range(20_000))
CASES += [
    data_case(
        "a Latin-1 corpus",
        {"latin1.txt": _LATIN1.encode("latin-1")},
        ("is not UTF-8 and looks like cp1252", "iconv -f CP1252 -t UTF-8"),
    ),
    data_case("a binary file", {"blob.txt": _RANDOM}, ("is not UTF-8", "max_skipped_fraction")),
    data_case("an empty file", {"empty.txt": ""}, ("empty.txt", "hold no non-blank line")),
    data_case(
        "a corpus shorter than one sequence",
        {"short.txt": "Just one short line.\n" * 3},
        ("less than one sequence of data.seq_len", "shorten data.seq_len"),
        **{"tokenizer.vocab_size": 300},
    ),
    data_case(
        "mostly malformed json lines",
        {"bad.jsonl": '{"text": "fine"}\n{not json\n' * 30},
        ("30 malformed json lines (lines 2, 4, 6", "data.max_skipped_fraction=0.5"),
    ),
    data_case(
        "json records without the text field",
        {"body.jsonl": '{"body": "hello there"}\n' * 30},
        ("has no column 'text'", "text_field"),
    ),
    data_case(
        "a source folder that holds no text",
        {"folder/readme.md": "# not text"},
        ("folder",),
        source="folder",
    ),
    data_case(
        "a tokenizer too small for its reserved pieces",
        {"ok.txt": "Some ordinary text.\n\n" * 100},
        ("leaves no room for learned pieces", "raise tokenizer.vocab_size"),
        **{"tokenizer.vocab_size": 256},
    ),
]


def tree_checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(case, tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    case.setup(root)
    before = tree_checksums(root)
    result = kiln_in_process(*case.args(root))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for words in case.says:
        assert words in output, output
    after = tree_checksums(root)
    assert {name: after.get(name) for name in before} == before  # new files may appear


# -- a resume on other settings than the checkpoint's (fingerprints) ------------------------------
def fingerprinted_run(root: Path, data_root: Path, layout: dict | None = None, **recorded) -> Path:
    """A run folder whose checkpoints (steps 2 and 4, global batch 8, one process) record the
    fingerprint of the test's training config, with the entries of ``recorded``
    (``"data.seq_len": 128``) standing for a run trained on other settings and those of
    ``layout`` (``world_size``, ``pipeline_stages``) for another layout. Returns the config."""
    layout = layout or {}
    import json

    from tests.conftest import train_config
    from trainer.config import load_config
    from trainer.fingerprint import run_fingerprint

    config = train_config(root, data_root)
    fingerprint = {**run_fingerprint(load_config(config)), **recorded}
    for step in (2, 4):
        ckpt = root / "run" / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        state = {"step": step, "fingerprint": fingerprint, "consumed_samples": 8 * step}
        state |= {"global_batch_size": 8, "world_size": 1, "zero_stage": 0, **layout}
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        (ckpt / "mp_rank_00_model_states.pt").write_bytes(bytes([step]) * 64)
    (root / "run" / "checkpoints" / "latest").write_text("step-00000004")
    return config


RESUME_CASES = {  # name: (recorded in the checkpoint, overrides now, the line the refusal shows)
    "another max_steps (the schedule)": ({}, ["train.max_steps=12"], "train.max_steps: 6 -> 12"),
    "another warmup": ({}, ["train.warmup_steps=1"], "train.warmup_steps: 2 -> 1"),
    "another model width": ({"model.hidden_size": 128}, [], "model.hidden_size: 128 -> 64"),
    "another seq_len": ({"data.seq_len": 128}, [], "data.seq_len: 128 -> 64"),
    "another tokenizer": ({"tokenizer.sha256": "0" * 64}, [], "tokenizer.sha256: 000000000000 ->"),
    "re-prepared data": (
        {"data.datasets.shakespeare.shards": "f" * 64},
        [],
        "data.datasets.shakespeare.shards: ffffffffffff ->",
    ),
    "a dataset removed": (
        {"data.datasets.wiki.weight": 1.0},
        [],
        "data.datasets: wiki removed",
    ),
    "another objective": (
        {"objective.mixture": [{"type": "prefix_lm", "weight": 1.0}]},
        [],
        "objective.mixture: prefix_lm x1 -> causal_lm x1",
    ),
}


@pytest.mark.parametrize("name", RESUME_CASES)
def test_a_resume_on_changed_settings_is_refused_with_what_differs(name, prepared_data, tmp_path):
    recorded, overrides, line = RESUME_CASES[name]
    root = tmp_path / "work"
    root.mkdir()
    config = fingerprinted_run(root, prepared_data, **recorded)
    before = tree_checksums(root)
    result = kiln_in_process("train", str(config), *overrides)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert "trained with other settings" in output and line in output, output
    assert "--accept-changes" in output and "another run_dir" in output, output
    after = tree_checksums(root)
    assert {name: after.get(name) for name in before} == before  # new files may appear


def test_accepted_changes_and_the_dry_run_report(prepared_data, tmp_path, caplog):
    """--accept-changes lets the resume through with each change logged; the dry run says where
    the run stands (resumes from step-4, the change it would refuse, epochs) without refusing;
    the same settings resume silently."""
    from launcher import preflight
    from trainer.config import load_config

    config = fingerprinted_run(tmp_path, prepared_data)
    same = preflight.check_resume(load_config(config), accept_changes=False)
    assert (same.tag, same.step, same.changes) == ("step-00000004", 4, ())
    longer = load_config(config, ["train.max_steps=12"])
    resume = preflight.check_resume(longer, accept_changes=True)
    assert resume.changes == ("train.max_steps: 6 -> 12",)
    assert "with a changed setting: train.max_steps: 6 -> 12" in caplog.text
    report = kiln_in_process("train", str(config), "train.max_steps=12", "--dry-run")
    assert report.returncode == 0, report.stdout + report.stderr
    assert "resumes from step-00000004 (step 4 of 12)" in report.stdout
    assert "(refused without --accept-changes):\n  train.max_steps: 6 -> 12" in report.stdout
    sequences = load_config(config).dataset_dir("shakespeare")
    import json

    n = json.loads((sequences / "manifest.json").read_text())["splits"]["train"]["sequences"]
    assert f"({8 * 12:,} samples of {n:,} train sequences)" in report.stdout
    finished = kiln_in_process("train", str(config), "train.max_steps=4", "--dry-run")
    assert "finished (step-00000004, train.max_steps=4)" in finished.stdout


@pytest.mark.slow  # one `kiln train` launch
def test_restart_moves_the_old_run_aside_and_trains_from_step_0(prepared_data, tmp_path, caplog):
    """Starting over in a folder that holds checkpoints takes --restart, never a missing file:
    the dry run says what would move; the restart moves the old run's checkpoints and metrics
    into restarted-<time>/ byte for byte, then trains from step 0."""
    config = fingerprinted_run(tmp_path, prepared_data)
    run = tmp_path / "run"
    (run / "metrics.jsonl").write_text('{"step": 4, "loss": 9.0}\n')
    before = tree_checksums(run)
    plan = kiln_in_process("train", str(config), "--restart", "--dry-run")
    assert "starts at step 0 of 6\n  --restart first moves checkpoints, metrics.jsonl" in (
        plan.stdout
    ), plan.stdout + plan.stderr
    assert tree_checksums(run) == before  # a dry run moves nothing
    result = kiln_in_process("train", str(config), "--restart", "--sample-prompt", "")
    assert result.returncode == 0, result.stdout + result.stderr
    (aside,) = run.glob("restarted-*")
    assert f"--restart: moved the run's history into {aside}" in caplog.text
    assert tree_checksums(aside) == {k: v for k, v in before.items() if k != "config.yaml"}
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [
        "step-00000003",
        "step-00000006",
    ]


# -- failures inside the training processes ------------------------------------------------------
@pytest.mark.slow  # one `kiln train` launch of 2 processes
def test_a_failure_in_the_workers_is_shown_once_with_its_ranks(prepared_data, tmp_path):
    """Token ids beyond the vocabulary in a shard whose checksum is not checked: the ranks fail
    in the embedding. The launcher shows the error once, naming the ranks and the file holding
    the traceback, instead of torchrun's traceback and failure table."""
    import shutil

    import numpy as np

    from tests.conftest import kiln, train_config

    data = tmp_path / "data"
    shutil.copytree(prepared_data, data, ignore=shutil.ignore_patterns(".cache"))
    shard = next((data / "shakespeare" / "train").glob("shard-*.bin"))
    ids = np.memmap(shard, dtype=np.uint16, mode="r+")
    ids[:] = 60_000  # the vocabulary has 512 pieces
    ids.flush()
    config = train_config(tmp_path, data, data__verify_checksums="false", train__max_steps=2)
    result = kiln("train", str(config), "--nproc", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "ChildFailedError" not in output and "Root Cause" not in output, output
    import re

    # rank 1 usually fails too, unless torchrun stopped it first
    shown = re.findall(r"IndexError on (ranks? [0-9, ]+): index out of range", output)
    assert len(shown) == 1 and shown[0] in ("ranks 0, 1", "rank 0", "rank 1"), output
    assert output.count("index out of range") == 1, output  # the ranks print none of their own
    traceback_file = re.search(r"full traceback: (\S+)", output)[1]
    assert Path(traceback_file).parent == tmp_path / "run" / "logs"
    assert "Traceback (most recent call last)" in Path(traceback_file).read_text()


# -- a prepared data root or a run folder that is damaged or does not fit ------------------------
def _flip_shard(data: Path, truncate: bool) -> None:
    shard = next((data / "shakespeare" / "train").glob("shard-*.bin"))
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-64] if truncate else raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:])


def _damage_all_checkpoints(root: Path) -> None:
    for state in (root / "run" / "checkpoints").glob("step-*/trainer_state.json"):
        state.write_text("{garbage")


DAMAGE_CASES = {  # name: (damage(root, data), overrides, words the refusal holds)
    "a truncated shard": (
        lambda root, data: _flip_shard(data, truncate=True),
        [],
        ("shard", "bytes, the manifest says", "kiln data prepare"),
    ),
    "a shard with flipped bytes": (
        lambda root, data: _flip_shard(data, truncate=False),
        [],
        ("does not match its sha256 in the manifest", "--force"),
    ),
    "a data root prepared with another tokenizer size": (
        lambda root, data: None,
        ["tokenizer.vocab_size=1024"],
        ("has 512 pieces and tokenizer.vocab_size=1024", "set tokenizer.vocab_size=512"),
    ),
    "a data root prepared with another seq_len": (
        lambda root, data: None,
        ["data.seq_len=32"],
        ("seq_len", "--force"),
    ),
    "a model vocabulary smaller than the tokenizer's": (
        lambda root, data: None,
        ["model.vocab_size=256"],
        ("model.vocab_size=256", "512"),
    ),
    "a run folder whose checkpoints are all damaged": (
        lambda root, data: _damage_all_checkpoints(root),
        [],
        ("none of them complete", "unreadable trainer_state.json", "--restart", "another run_dir"),
    ),
    "a resume on another global batch": (
        lambda root, data: None,
        ["train.global_batch_size=4"],
        ("consumed 32 samples in 4 steps", "resume with train.global_batch_size=8"),
    ),
    "a pipeline checkpoint resumed on one process": (
        lambda root, data: None,
        ["layout:pipeline"],
        ("2 pipeline stage(s) on 2 processes", "parallel.pipeline_stages=2 on 2 processes"),
    ),
}


@pytest.mark.parametrize("name", DAMAGE_CASES)
def test_damaged_or_mismatched_data_and_runs_are_refused_before_training(
    name, prepared_data, tmp_path
):
    import shutil

    damage, overrides, says = DAMAGE_CASES[name]
    root = tmp_path / "work"
    root.mkdir()
    data = root / "data"
    shutil.copytree(prepared_data, data, ignore=shutil.ignore_patterns(".cache"))
    pipeline = "layout:pipeline" in overrides
    overrides = [o for o in overrides if o != "layout:pipeline"]
    layout = {"pipeline_stages": 2, "world_size": 2} if pipeline else None
    config = fingerprinted_run(root, data, layout)
    damage(root, data)
    before = tree_checksums(root)
    result = kiln_in_process("train", str(config), *overrides)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for words in says:
        assert words in output, output
    after = tree_checksums(root)
    assert {name: after.get(name) for name in before} == before
