"""The run-folder object (:class:`trainer.storage.RunFolder`) on its own, for a local path and a
``file://`` URL alike: the newest complete checkpoint, prune, localize. Fast: a fake engine
writes the shards, one process, no training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, FakeEngine

from trainer import checkpoint
from trainer.manifest import STATE_FILE, checkpoint_tag
from trainer.storage import RunFolder

pytestmark = pytest.mark.usefixtures("cache")  # mirrors under the test's folder


@pytest.fixture(params=["path", "url"])
def run(request, tmp_path) -> tuple[RunFolder, Path]:
    """A run folder and where its files really are (the path, or the URL's folder)."""
    real = tmp_path / "runs" / "r"
    folder = RunFolder(f"file://{real}" if request.param == "url" else real)
    folder.prepare("seed: 1\n")
    return folder, real


def save(folder: RunFolder, step: int, keep_last: int = 5) -> Path:
    state = {"step": step, "zero_stage": 0}
    return checkpoint.save_checkpoint(FakeEngine(), folder, state, rank=0, keep_last=keep_last)


def incomplete(real: Path, step: int) -> None:
    """A save that died: the shards of ``step`` but no trainer_state.json."""
    ckpt = real / "checkpoints" / checkpoint_tag(step)
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"partial")


def test_paths_and_where_it_works(run, cache):
    folder, real = run
    assert (folder.url is None) == (folder.local == real)
    if folder.url is not None:
        assert folder.local.parent == cache / "runs" and folder.location == f"file://{real}"
    assert folder.config_path == folder.local / "config.yaml"
    assert (real / "config.yaml").read_text() == "seed: 1\n"  # uploaded for a URL
    assert folder.metrics_path == folder.local / "metrics.jsonl"
    assert folder.checkpoint_dir(7) == folder.local / "checkpoints" / "step-00000007"
    # One folder for all ranks, or one mirror per node prepared by its first process.
    assert folder.node_main(rank=0, local_rank=0) and not folder.node_main(rank=3, local_rank=1)
    assert folder.node_main(rank=2, local_rank=0) == (folder.url is not None)


def test_newest_complete_checkpoint_ignores_an_incomplete_one(run):
    folder, real = run
    assert folder.latest_tag() is None and folder.latest_step() is None
    assert folder.latest_checkpoint() is None
    save(folder, 3)
    save(folder, 6)
    incomplete(real, 9)
    assert folder.latest_tag() == "step-00000006" and folder.latest_step() == 6
    assert folder.latest_checkpoint() == folder.local / "checkpoints" / "step-00000006"
    assert folder.find_checkpoint(3).name == "step-00000003"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        folder.checkpoint(9)


def test_latest_is_a_hint_the_newest_complete_checkpoint_decides(tmp_path):
    """A deleted, stale or dangling `latest` never makes a run start over or go back: the
    newest complete checkpoint is the resume point, and the notes say why."""
    folder = RunFolder(tmp_path / "r")
    for step in (2, 4, 6):
        save(folder, step)
    assert folder.scan() == ("step-00000006", [])
    (folder.checkpoints / "latest").unlink()
    tag, notes = folder.scan()
    assert tag == "step-00000006" and folder.latest_step() == 6
    assert notes == [f"{folder.checkpoints / 'latest'} is missing; the newest complete checkpoint "
                     "is step-00000006"]  # fmt: skip
    (folder.checkpoints / "latest").write_text("step-00000002")  # stale
    assert folder.latest_checkpoint() == folder.checkpoint_dir(6)
    incomplete(tmp_path / "r", 8)
    (folder.checkpoints / "latest").write_text("step-00000008")  # dangling
    tag, notes = folder.scan()
    assert tag == "step-00000006" and "names step-00000008" in notes[0]
    assert (
        notes[1]
        == "passed over step-00000008: it has no trainer_state.json (a save that did not end)"
    )
    (folder.checkpoint_dir(6) / "trainer_state.json").write_text("{garbage")
    tag, notes = folder.scan()
    assert tag == "step-00000004"
    assert any(n.startswith("passed over step-00000006: it has an unreadable") for n in notes)


def test_a_checkpoint_whose_files_differ_from_its_manifest_is_passed_over(tmp_path):
    """Every save records its files' sizes and sha256 in trainer_state.json; a truncated,
    missing or flipped file makes the checkpoint incomplete (sizes always, sha256 when asked),
    and a folder whose checkpoints are all damaged refuses to start over."""
    folder = RunFolder(tmp_path / "r")
    for step in (2, 4, 6):
        save(folder, step)
    files = json.loads((folder.checkpoint_dir(6) / STATE_FILE).read_text())["files"]
    shard = folder.checkpoint_dir(6) / "mp_rank_00_model_states.pt"
    data = shard.read_bytes()
    assert files["mp_rank_00_model_states.pt"][0] == len(data) > 0
    assert set(files) >= {"mp_rank_00_model_states.pt", "rng_state_rank0.pt"}
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert folder.scan() == ("step-00000006", [])  # sizes alone cannot see it
    tag, notes = folder.scan(checksums=True)
    assert tag == "step-00000004"
    assert "passed over step-00000006: it has mp_rank_00_model_states.pt with another sha256 " \
        "than its manifest's (damaged bytes)" in notes  # fmt: skip
    shard.write_bytes(data[: len(data) // 2])
    tag, notes = folder.scan()
    assert tag == "step-00000004"
    assert f"of {len(data) // 2:,} bytes, its manifest says {len(data):,} (truncated?)" in notes[-1]
    (folder.checkpoint_dir(4) / "rng_state_rank0.pt").unlink()
    assert folder.scan()[0] == "step-00000002"
    assert "lacks rng_state_rank0.pt, which its manifest lists" in folder.scan()[1][-2]
    (folder.checkpoint_dir(2) / STATE_FILE).write_text("")
    with pytest.raises(FileExistsError, match="none of them complete") as e:
        folder.resume_from()
    assert "To train from step 0 in this folder pass --restart" in str(e.value)


def test_prune_keeps_the_newest_complete_ones(run):
    folder, real = run
    for step in (3, 6):
        save(folder, step, keep_last=2)
    incomplete(real, 7)  # older than the next save: a URL drops it, a path keeps it
    save(folder, 9, keep_last=2)
    at_url = sorted(p.name for p in (real / "checkpoints").iterdir())
    want = ["latest", "step-00000006", "step-00000009"]
    assert at_url == (want if folder.url else [*want[:2], "step-00000007", want[2]])
    local = sorted(p.name for p in folder.checkpoints.iterdir() if p.name != "step-00000007")
    assert local == want
    folder.prune(keep_last=1)
    assert folder.latest_tag() == "step-00000009"
    assert not (real / "checkpoints" / "step-00000006").exists()
    assert not (folder.checkpoints / "step-00000006").exists()


def test_localize_reads_a_checkpoint_without_the_writer_s_copy(run):
    folder, _ = run
    save(folder, 3)
    save(folder, 6)
    if folder.url is not None:  # another machine: no mirror yet
        shutil.rmtree(folder.local)
    assert folder.localize() == folder.local
    ckpt = folder.checkpoint(3)
    assert ckpt == folder.local / "checkpoints" / "step-00000003"
    assert json.loads((ckpt / STATE_FILE).read_text())["step"] == 3
    assert folder.checkpoint().name == "step-00000006"
    with folder.read_copy(6) as local:
        assert RunFolder(local).find_checkpoint(6).name == "step-00000006"
    assert local.exists() == (folder.url is None)  # a URL's throwaway download is gone
    with pytest.raises(FileNotFoundError):
        folder.checkpoint(12)


def test_finish_removes_a_url_run_s_mirror_only(run):
    folder, real = run
    save(folder, 3)
    assert folder.finish() is None
    assert folder.local.exists() == (folder.url is None)
    assert (real / "checkpoints" / "step-00000003" / STATE_FILE).is_file()


def test_the_run_folder_imports_no_other_kiln_module():
    """trainer.checkpoint imports trainer.storage, never the reverse (and not torch, so that
    the CLI's run-folder checks stay fast): the run folder imports only its own parts, the
    checkpoint manifest and the URL mirror."""
    code = (
        "import sys, trainer.storage; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trainer', 'torch')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [
        "['trainer',",
        "'trainer.manifest',",
        "'trainer.mirror',",
        "'trainer.storage']",
    ]
