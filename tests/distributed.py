"""Run a function on N gloo ranks in fresh processes: the one helper distributed tests use
(STYLE.md principle 10), and `train_in_process`, Kiln's training loop as `kiln train` runs it in
each worker, without the CLI, torchrun and their imports.

    results = run_distributed(fn, 2, arg)  # [fn(arg) on rank 0, fn(arg) on rank 1]

``fn`` must be importable by name (a module-level function of a test module or of this one): the
ranks are spawned, not forked, so that DeepSpeed and gloo start clean in each.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from trainer.distributed import free_port


class RankError(RuntimeError):
    """A rank of :func:`run_distributed` raised or died; the message names the rank."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank


def _worker(
    rank: int, fn: Callable, world_size: int, port: int, out: str, args: tuple[Any, ...]
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    import torch.distributed as dist

    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(*args)
        with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    except BaseException as e:
        # The traceback as text: the exception itself may not pickle back to the parent.
        (Path(out) / f"rank{rank}.err").write_text(
            "".join(traceback.format_exception(type(e), e, e.__traceback__))
        )
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # As trainer.main does: the interpreter's teardown of DeepSpeed's and gloo's C++ threads
    # sometimes aborts a finished process ("terminate called without an active exception",
    # exit -6; 3 of 358 tests in one CI run), so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _first_failure(out: Path, exitcodes: list[int | None]) -> RankError:
    """The rank whose failure came first: the others then fail in their collectives
    ("Connection reset by peer") or are terminated, and naming one of them would mislead."""
    errs = {r: out / f"rank{r}.err" for r in range(len(exitcodes))}
    terminated = (None, 0, -signal.SIGTERM, -signal.SIGKILL)  # by run_distributed, or done
    died = [
        r for r, code in enumerate(exitcodes) if code not in terminated and not errs[r].exists()
    ]
    if died:  # no traceback: it exited on its own (os._exit, a crash)
        return RankError(died[0], f"exited with code {exitcodes[died[0]]}")
    raised = sorted((p.stat().st_mtime_ns, r) for r, p in errs.items() if p.exists())
    if raised:
        rank = raised[0][1]
        return RankError(rank, "\n" + errs[rank].read_text())
    return RankError(-1, f"exit codes {exitcodes}")  # pragma: no cover (killed from outside)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned processes that share a gloo process group
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` on a free port,
    ``DS_ACCELERATOR=cpu`` set); returns each rank's return value, by rank.

    Raises:
        RankError: a rank raised (its traceback in the message) or exited abnormally; the
            other ranks are terminated, so a rank left waiting in a collective does not hang.
        TimeoutError: the ranks were not all done within ``timeout`` seconds (all killed).
    """
    with tempfile.TemporaryDirectory(prefix="kiln-dist-") as out:
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), out, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        failed = False
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_distributed: {fn.__name__} ran past {timeout} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            failed = True
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        if failed:
            raise _first_failure(Path(out), [p.exitcode for p in ctx.processes])
        results = []
        for rank in range(world_size):
            with open(Path(out) / f"rank{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results


def train_in_process(config: Path, *overrides: str) -> Path:
    """One rank of ``kiln train CONFIG OVERRIDES`` inside :func:`run_distributed`: what the CLI
    does before it launches (prepare data, write the run's config.yaml), then
    :func:`trainer.main.train`. The process group outlives the run, so a worker can train several
    runs in a row. Returns the run folder."""
    import torch.distributed as dist

    from trainer import distributed, main, storage
    from trainer.config import load_config
    from trainer.data.prepare import prepare_all

    cfg = load_config(config, overrides)
    import deepspeed

    distributed.init_distributed()  # this process's set-up; the group exists, so no more
    # What init_distributed does under torchrun; over an existing group it only wraps it (the
    # pipeline's PipelineModule needs DeepSpeed's comm before the engine).
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    if dist.get_rank() == 0:
        prepare_all(cfg)
        storage.RunFolder(cfg.run_dir).prepare(cfg.to_yaml())
    dist.barrier()
    close = distributed.close
    distributed.close = distributed.barrier  # keep run_distributed's group for the next run
    try:
        main.train(cfg)
    finally:
        distributed.close = close
    return Path(cfg.run_dir)


def train_runs(*configs: Path | tuple[Path, ...]) -> list[Path]:
    """:func:`train_in_process` for each config in turn (a tuple: the config and its overrides);
    one worker start-up for several runs."""
    runs = []
    for c in configs:
        config, *overrides = c if isinstance(c, tuple) else (c,)
        runs.append(train_in_process(config, *overrides))
    return runs
