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
    assert tree_checksums(root) == before
