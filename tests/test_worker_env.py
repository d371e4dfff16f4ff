"""The training processes start with a bounded glibc mmap threshold
(`launcher.local.MALLOC_DEFAULTS`) unless the user set one: local launch (and `kiln slurm node`,
through the same `run_workers`), the Slurm script, a Ray job's runtime environment."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from launcher.local import MALLOC_DEFAULTS, run_workers, worker_environment
from launcher.ray_cli import job_env_vars
from launcher.slurm import SlurmOptions, render_script
from trainer.config import load_config

KEY = "MALLOC_MMAP_THRESHOLD_"

# Each rank reports the variable and what glibc did with it: after a 1 MiB block is freed, glibc's
# dynamic threshold (no variable set) rises to 1 MiB and a 512 KiB block comes from the heap; a
# threshold of 128 or 256 KiB, read at process start, keeps it a mapping of its own (mallinfo2's
# hblks counts those).
RANK = textwrap.dedent(
    """
    import ctypes, os, sys

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    libc.free(libc.malloc(1 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(512 << 10)
    mapped = libc.mallinfo2().hblks > before
    libc.free(block)
    rank = os.environ["RANK"]
    with open(os.path.join(sys.argv[1], rank), "w") as f:
        f.write(f"{os.environ.get('MALLOC_MMAP_THRESHOLD_')} {mapped}")
    """
)


def _launch(tmp_path) -> dict[str, tuple[str, str]]:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "launcher.torchrun", "--standalone", "--nproc_per_node=2"]
    assert run_workers([*cmd, str(script), str(out)]) == 0
    return {p.name: tuple(p.read_text().split()) for p in out.iterdir()}


def test_local_ranks_start_with_the_threshold_glibc_applies(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY, raising=False)
    assert _launch(tmp_path) == {"0": ("131072", "True"), "1": ("131072", "True")}


def test_a_users_threshold_wins_in_the_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY, "262144")
    assert _launch(tmp_path) == {"0": ("262144", "True"), "1": ("262144", "True")}


def test_glibcs_default_keeps_the_block_in_the_heap(tmp_path):
    """The control: without the variable the probe sees glibc's dynamic threshold."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = {k: v for k, v in worker_environment().items() if k != KEY}
    env["RANK"] = "0"
    subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, check=True)
    assert (tmp_path / "0").read_text() == "None False"


def test_worker_environment_adds_only_what_is_missing():
    assert worker_environment({"PATH": "/bin"}) == {"PATH": "/bin", **MALLOC_DEFAULTS}
    assert worker_environment({KEY: "65536"})[KEY] == "65536"


@pytest.mark.parametrize("user", [None, "262144"])
def test_ray_jobs_carry_the_threshold(monkeypatch, user):
    if user is None:
        monkeypatch.delenv(KEY, raising=False)
    else:
        monkeypatch.setenv(KEY, user)
    env = job_env_vars(load_config(None, []), {"KILN_FAULT": "x"})
    assert env[KEY] == (user or MALLOC_DEFAULTS[KEY])
    assert env["KILN_FAULT"] == "x" and "KILN_CONFIG" in env


def test_the_slurm_script_exports_the_threshold_unless_set(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    opts = SlurmOptions(nodes=1, gpus_per_node=0, nproc_per_node=2)
    script = render_script(cfg, opts, workdir=tmp_path, python=sys.executable)
    line = re.search(rf"^export {KEY}=.*$", script, flags=re.MULTILINE).group(0)
    shell = f"{line}\necho ${KEY}"
    env = {k: v for k, v in worker_environment().items() if k != KEY}
    ours = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True)
    assert ours.stdout.strip() == MALLOC_DEFAULTS[KEY]
    env[KEY] = "262144"
    theirs = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True)
    assert theirs.stdout.strip() == "262144"
