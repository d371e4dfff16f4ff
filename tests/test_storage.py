"""Run folders at an fsspec URL: the storage module against a ``file://`` URL, and `kiln train`
with ``run_dir=file:///...`` that saves to the URL, then resumes from it alone."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import REPO, FakeEngine, kiln, kiln_in_process, step_losses, train_config

from trainer import checkpoint, mirror, storage
from trainer.config import ConfigError, check_paths, load_config

pytestmark = pytest.mark.usefixtures("cache")  # mirrors under the test's folder


def save(url: str, step: int, keep_last: int = 2) -> Path:
    return checkpoint.save_checkpoint(
        FakeEngine(), url, {"step": step, "zero_stage": 0}, rank=0, keep_last=keep_last
    )


def test_is_url():
    assert mirror.is_url("s3://bucket/runs/x") and mirror.is_url("file:///tmp/run")
    assert not mirror.is_url("runs/x") and not mirror.is_url(Path("/tmp/run"))
    assert storage.RunFolder("runs/x").local == Path("runs/x")  # a path is used as it is


def test_save_uploads_a_complete_checkpoint_then_latest(tmp_path, cache):
    remote = tmp_path / "remote" / "run"
    url = f"file://{remote}"
    store = mirror.RunStorage(url)
    assert mirror.mirror_dir(url).parent == cache / "runs"
    local = save(url, 3)
    assert local == mirror.mirror_dir(url) / "checkpoints" / "step-00000003"
    ckpt = remote / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in local.iterdir())
    assert (remote / "checkpoints" / "latest").read_text() == "step-00000003"
    assert store.latest_step() == 3
    for step in (6, 9):
        save(url, step)
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == [
        "latest",
        "step-00000006",
        "step-00000009",
    ]  # keep_last=2 at the URL too
    assert not list((remote / "checkpoints").glob(".tmp-*"))


def test_latest_only_names_complete_checkpoints(tmp_path, monkeypatch):
    url = f"file://{tmp_path / 'remote'}"
    seen: list[list[str]] = []
    original = mirror.RunStorage.write_text

    def write_text(self, rel, text):  # what the URL holds when latest is written
        if rel == "checkpoints/latest":
            seen.append(
                sorted(p.name for p in (tmp_path / "remote" / "checkpoints" / text).iterdir())
            )
        original(self, rel, text)

    monkeypatch.setattr(mirror.RunStorage, "write_text", write_text)
    save(url, 3)
    assert seen == [["mp_rank_00_model_states.pt", "rng_state_rank0.pt", checkpoint.STATE_FILE]]


def test_pull_run_restores_a_deleted_mirror(tmp_path):
    url = f"file://{tmp_path / 'remote' / 'run'}"
    local = save(url, 3)
    (local.parents[1] / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    mirror.RunStorage(url).push_run_files(0)
    want = {p.name: p.read_bytes() for p in local.iterdir()}
    shutil.rmtree(mirror.mirror_dir(url))
    store = mirror.RunStorage(url)
    assert store.pull_run() == "step-00000003"
    ckpt = checkpoint.latest_checkpoint(store.local)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == want
    assert json.loads((store.local / "metrics.jsonl").read_text())["step"] == 3
    # A partial upload (no trainer_state.json) of a later step is not what latest names.
    (tmp_path / "remote" / "run" / "checkpoints" / "step-00000006").mkdir()
    assert storage.localize(url) == store.local
    assert checkpoint.find_checkpoint(store.local).name == "step-00000003"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        storage.localize(url, step=6)


def test_a_damaged_mirror_copy_is_fetched_again_and_a_damaged_url_copy_is_refused(tmp_path):
    """The mirror's copy of the checkpoint `latest` names is checked against its manifest: a
    flipped byte (same size, so a size check alone fetches nothing) is fetched again whole; a
    checkpoint damaged at the URL itself is refused with what to do."""
    url = f"file://{tmp_path / 'remote' / 'run'}"
    local = save(url, 3)
    shard = local / "mp_rank_00_model_states.pt"
    want = shard.read_bytes()
    shard.write_bytes(bytes([want[0] ^ 0xFF]) + want[1:])
    store = mirror.RunStorage(url)
    assert store.pull_run() == "step-00000003"
    assert shard.read_bytes() == want
    remote = tmp_path / "remote" / "run" / "checkpoints" / "step-00000003" / shard.name
    remote.write_bytes(bytes([want[0] ^ 0xFF]) + want[1:])
    assert store.pull_run() == "step-00000003"  # the mirror's copy is intact: it is used
    shutil.rmtree(mirror.mirror_dir(url))
    with pytest.raises(FileNotFoundError) as error:
        store.pull_run()
    message = str(error.value)
    assert f"{shard.name} with another sha256 than its manifest's" in message
    assert "the checkpoint at the URL is damaged" in message and "checkpoints/latest" in message
    assert store.pull_run(checksums=False) == "step-00000003"  # sizes only: it passes


def test_a_url_without_checkpoint_starts_afresh(tmp_path):
    url = f"file://{tmp_path / 'remote' / 'run'}"
    save(url, 3)
    shutil.rmtree(tmp_path / "remote")  # the run was deleted at the URL; the mirror is stale
    assert mirror.RunStorage(url).pull_run() is None
    assert storage.RunFolder(url).latest_checkpoint() is None  # the stale mirror resumes nothing
    with pytest.raises(FileNotFoundError, match="no checkpoint yet"):
        storage.localize(url)


@pytest.mark.parametrize(
    "url, message",
    [("nosuchproto://bucket/run", "knows no protocol 'nosuchproto'"), ("s3://b/run", "s3fs")],
)
def test_unusable_urls_are_config_errors(tmp_path, url, message):
    if url.startswith("s3"):
        pytest.importorskip("fsspec")
        try:
            import s3fs  # noqa: F401

            pytest.skip("s3fs is installed")
        except ImportError:
            pass
    cfg = load_config(train_config(tmp_path, tmp_path), [f"run_dir={url}"])
    with pytest.raises(ConfigError, match=message):
        check_paths(cfg)


def test_kiln_train_refuses_an_unknown_protocol(prepared_data, tmp_path):
    config = train_config(tmp_path, prepared_data)
    result = kiln_in_process("train", str(config), "run_dir=nosuchproto://x/run", "--nproc", "1")
    assert result.returncode != 0
    assert "knows no protocol" in result.stderr
    assert not (REPO / "nosuchproto:").exists()


@pytest.mark.slow
def test_train_to_a_url_and_resume_from_it(prepared_data, tmp_path, cache, monkeypatch):
    """6 steps to file://.../remote/run (checkpoints 3 and 6, published at the end); the
    finished run deletes its local mirror. With the URL's latest set back to step 3 (a run
    preempted after it), the same command resumes from the URL alone and trains steps 4-6 to
    the same losses. (A run stopped by a signal keeps its mirror: test_train_distributed.py's
    test_sigterm_saves_and_resumes.)"""
    remote = tmp_path / "remote" / "run"
    url = f"file://{remote}"
    config = train_config(tmp_path, prepared_data)
    args = ["train", str(config), f"run_dir={url}", "--nproc", "1"]
    result = kiln(*args, "checkpoint.publish_at_end=true", "--sample-prompt", "ROMEO:")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    # Everything is at the URL, the mirror is gone (the final sample read a throwaway download).
    assert not mirror.mirror_dir(url).exists() and not list((cache / "runs").iterdir())
    assert "sample from step-00000006:\nROMEO:" in result.stdout
    hf = f"{url}/hf/step-00000006"
    assert f"published in the transformers layout: {hf}\n" in result.stdout
    assert (remote / "hf" / "step-00000006" / "model.safetensors").is_file()
    snippet = [line.strip() for line in result.stdout.split(f"{hf}\n")[1].splitlines()[:6]]
    assert snippet[1] == f'fs, path = url_to_fs("{hf}")'
    assert snippet[4] == 'tokenizer = AutoTokenizer.from_pretrained("step-00000006")'
    monkeypatch.chdir(tmp_path)
    exec("\n".join(snippet[:3]), {})  # its copy of the folder, which the next lines load
    for f in (remote / "hf" / "step-00000006").iterdir():
        assert (tmp_path / "step-00000006" / f.name).read_bytes() == f.read_bytes()
    ckpts = remote / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000006"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000003", "step-00000006"]
    for tag in ("step-00000003", "step-00000006"):
        assert (ckpts / tag / checkpoint.STATE_FILE).is_file()
        assert (ckpts / tag / "mp_rank_00_model_states.pt").is_file()
    assert load_config(remote / "config.yaml").run_dir == url
    want = step_losses(remote)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert (remote / "sample_ids" / "rank0.jsonl").is_file()
    assert not (REPO / "file:").exists()

    (ckpts / "latest").write_text("step-00000003")
    result = kiln(*args, "--sample-prompt", "")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"resuming {url} from step-00000003\n" in result.stdout
    assert (ckpts / "latest").read_text() == "step-00000006"
    got = step_losses(remote)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for s in (4, 5, 6):
        assert got[s] == pytest.approx(want[s], abs=1e-6), (s, got[s], want[s])
    assert not mirror.mirror_dir(url).exists()

    # what `kiln generate / publish URL` read: a download into the mirror, which stays
    from trainer.inference import load_run

    model, tok = load_run(url)
    assert (mirror.mirror_dir(url) / "checkpoints" / "step-00000006").is_dir()
    assert tok.vocab_size == 512 and not model.training


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_kiln_cache_lists_and_cleans_mirrors(tmp_path, cache):
    """Two mirrors made as `kiln train` makes them, one with files last changed 2 hours ago, and
    an old one without .kiln-url: `clean --older-than 1h` removes the old ones, frees their bytes
    and keeps the fresh one; `--dry-run` only says so."""
    urls = {age: f"file://{tmp_path}/remote/{age}" for age in ("old", "fresh")}
    for url in urls.values():
        storage.RunFolder(url).prepare("seed: 1\n")
        ckpt = mirror.mirror_dir(url) / "checkpoints" / "step-00000003"
        ckpt.mkdir(parents=True)
        (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x" * 5000)
    old, fresh = (mirror.mirror_dir(urls[age]) for age in ("old", "fresh"))
    bare = cache / "runs" / "bare-0123456789ab"
    (bare / "checkpoints").mkdir(parents=True)
    (bare / "checkpoints" / "latest").write_text("step-00000003")
    two_hours_ago = time.time() - 2 * 3600
    for f in [*old.rglob("*"), old, *bare.rglob("*"), bare]:  # files and folders
        os.utime(f, (two_hours_ago, two_hours_ago))
    listed = kiln_in_process("cache", "list")  # the `cache` fixture set KILN_CACHE
    assert listed.returncode == 0, listed.stderr[-3000:]
    lines = listed.stdout.splitlines()
    assert lines[0] == f"mirrors in {cache / 'runs'}: 3"
    kib = f"{_size(old) / 1024:.1f} KiB"  # 5000 bytes, config.yaml and .kiln-url
    line = next(x for x in lines if x.endswith(f"{urls['old']} ({old.name})"))
    assert line.split() == [*kib.split(), "2.0h", urls["old"], f"({old.name})"]
    assert any(x.endswith(f"? ({bare.name})") for x in lines)
    assert any(x.endswith(f"{urls['fresh']} ({fresh.name})") for x in lines)

    freed = _size(old) + _size(bare)
    dry = kiln_in_process("cache", "clean", "--older-than", "1h", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert f"would remove {old} ({urls['old']}, {kib}, last modified 2.0h ago)" in dry.stdout
    assert f"would remove {bare} (?," in dry.stdout and str(fresh) not in dry.stdout
    assert f"would free {freed:,} bytes" in dry.stdout
    assert old.is_dir() and bare.is_dir()

    clean = kiln_in_process("cache", "clean", "--older-than", "1h")
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert f"removed {old} (" in clean.stdout and f"removed {bare} (" in clean.stdout
    assert f"freed {freed:,} bytes" in clean.stdout
    assert sorted((cache / "runs").iterdir()) == [fresh]
    assert (fresh / "checkpoints" / "step-00000003" / "mp_rank_00_model_states.pt").is_file()


def test_ray_driver_keeps_a_url_run_dir(tmp_path):
    from launcher.ray_driver import absolute_paths

    cfg = load_config(train_config(tmp_path, tmp_path), ["run_dir=s3://bucket/runs/x"])
    assert absolute_paths(cfg, Path("/cluster/kiln")).run_dir == "s3://bucket/runs/x"
