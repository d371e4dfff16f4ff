"""Training batches prepared ahead of the step, in a ``torch.utils.data.DataLoader`` worker.

The batch of micro-step ``m`` of step ``s`` on data-parallel rank ``r`` is a pure function of
``(s, m, r)``, the batch plan and the run's exclusions (:mod:`trainer.loop`'s order:
:func:`trainer.replay.step_indices`, then :meth:`TrainData.global_indices`), so it can be made
before the step asks for it. :class:`Prefetcher` hands out the micro-batches of the training order
one after the other, made ``data.prefetch_steps`` optimizer steps ahead by
``data.prefetch_workers`` DataLoader worker processes (memory-mapped reads, the objective: T5
span corruption runs there, in numpy), pinned in page-locked memory when the device is CUDA so that
the copy with ``non_blocking=True`` overlaps the step (:func:`to_device`).

Correctness is kept by one rule: the prefetched order is only used while the caller asks for the
micro-batch right after the last one and the exclusions are those the workers started with. Any
other request (a resume, a rollback that reloads an older step and leaves samples out,
:meth:`TrainData.exclude`) drops what was prepared and starts the workers again at the asked
position. Evaluation reads the validation split in the training process and does not touch the
order. ``data.prefetch_steps=0`` reads each micro-batch synchronously in the training process,
as before prefetching existed.

Why worker processes (DataLoader) and not a background thread. ``bench/prefetch.py`` runs both
beside the synchronous path in one Trainer (fp32, this 2-core CPU, micro batch 1 x 2 micro-batches
of 256 tokens, 2 steps ahead, under a load of 3-13 from other processes, so step times varied 5-67
s): the wait per step was 1.0 / 3.2 / 1.0 ms (synchronous / DataLoader / thread) at the 125m
decoder and 1.5 / 9.4 / 3.4 ms at T5 small, all under 0.05% of the step; starting the source at a
block's first step cost 150-220 ms with the DataLoader (then forked; spawned workers take ~1.9 s)
against 2-4 ms for a thread. On a CPU the two are equal for the target; the choice is made for the
GPU, where the training thread does little but launch kernels: a thread runs the objective's Python
and numpy code under the training thread's GIL, each of its slices delaying the next kernel launch
by up to ``sys.getswitchinterval()`` (5 ms), a cost that lands in the step time, not in the data
wait. A worker process shares nothing with the training thread but the cores, and the DataLoader
brings pinning in its own thread, worker-death detection and a well-kept implementation. Its price,
the worker start, is paid at the start of training (during the step-0 evaluation) and after a
rollback or resume.

Errors: an exception raised while a worker makes a batch is raised again in the training process
by :meth:`Prefetcher.get` as the same type with the same message as the synchronous path gives
(a note names the step and micro-batch); a worker that dies (a signal, the out-of-memory killer)
raises the DataLoader's ``RuntimeError`` naming its pid.

Stop signals: a scheduler's stop (Slurm's ``scancel --signal=TERM``, ``--signal=USR1@N``)
reaches every process of the job step, the workers included. The training process handles it
(:meth:`trainer.loop.Trainer.install_signal_handlers`: finish the step, save, exit) and then
closes the loader (:meth:`Prefetcher.close`, called by ``Trainer.fit`` however it ends). A worker
(:func:`_worker_signals`) takes SIGTERM and SIGUSR1 itself: it ends at once on a SIGTERM from
the training process (the DataLoader's last resort, and ``multiprocessing``'s at interpreter
exit) and within a second of the training process's death, and ignores the rest. Left to the
DataLoader's own SIGTERM handler, a worker dies of the scheduler's signal, and the training
process's SIGCHLD handler then raises "DataLoader worker exited unexpectedly" wherever that
process happens to be: on one rank in the middle of the stop's collectives, leaving the other
ranks waiting forever (a Slurm job that never ended, seen in the clean-clone CI). Left to ignore
every SIGTERM, a worker could not be ended by its parent (a process that exits without closing
the loader waits for it forever) and, orphaned with a full result pipe, would never end.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.objectives import Batch
from trainer.replay import step_indices

if TYPE_CHECKING:
    from trainer.config import BatchPlan
    from trainer.data.dataset import TrainData


# How workers start: spawned, a fresh interpreter (~1.9 s to the first batch here, ~3 s for a
# restart, 252 MiB resident of which 170 MiB its own), not forked. A fork shares the training
# process's pages copy-on-write, and every page that process writes afterwards (parameters,
# gradients, optimizer states, offload and swap buffers: all of them, every step) is then
# copied, the child keeping the old one: bench/memory.py's 1.5B decoder under NVMe offload had
# ranks of 7 GiB and forked workers of 6.1 GiB each until the machine ran out of memory. The
# dataset travels pickled (its memory maps reopen in the worker). Spawning re-imports the
# training process's main module under another name, as multiprocessing does: a script that
# trains must keep its entry point under ``if __name__ == "__main__":``.
_START_METHOD = "spawn"


class _WorkerError:
    """An exception raised in a worker while it made the batch of ``(step, micro)``, carried to
    the training process as a result (the DataLoader's own re-raise keeps only the type and a
    message with the worker's traceback in it)."""

    def __init__(self, error: BaseException, step: int, micro: int):
        note = f"raised in the data prefetch worker making step {step + 1}, micro-batch {micro}"
        error.add_note(note)
        try:  # the exception must survive the trip through the DataLoader's result queue
            pickle.loads(pickle.dumps(error))
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error} ({note})")
        self.error = error


class _HostBatch:
    """A :class:`Batch` as numpy arrays for the trip from the worker: pickled by value through
    the result queue (tens of KB: well under a millisecond), where a tensor travels as a
    shared-memory file whose descriptor the training process fetches from the worker over a
    socket: 2-8 ms per batch on this CPU, against 0.5-0.75 ms as arrays (measured with the
    tests' data, micro batches of 2 to 32 rows). The DataLoader's pin
    thread calls :meth:`pin_memory`; :meth:`batch` serves unpinned."""

    def __init__(self, batch: Batch):
        self.inputs = {k: v.numpy() for k, v in batch.inputs.items()}
        self.labels = batch.labels.numpy()
        self.sample_ids = batch.sample_ids

    def batch(self) -> Batch:
        """The tensors over the arrays (no copy)."""
        inputs = {k: torch.from_numpy(v) for k, v in self.inputs.items()}
        return Batch(inputs, torch.from_numpy(self.labels), self.sample_ids)

    def pin_memory(self) -> Batch:
        """The tensors copied into page-locked memory (for non-blocking copies to CUDA)."""
        b = self.batch()
        inputs = {k: v.pin_memory() for k, v in b.inputs.items()}
        return Batch(inputs, b.labels.pin_memory(), b.sample_ids)


class _MicroBatches(torch.utils.data.Dataset):
    """Item ``k``: the batch of micro-step ``k % A`` of step ``k // A`` (0-based; A = gradient
    accumulation steps) on data-parallel rank ``dp_rank``, with ``data``'s exclusions as they
    were when the workers started (each worker holds its own copy of ``data``)."""

    def __init__(self, data: TrainData, plan: BatchPlan, dp_rank: int):
        self.data, self.plan, self.dp_rank = data, plan, dp_rank

    def __getitem__(self, k: int) -> _HostBatch | _WorkerError:
        step, micro = divmod(k, self.plan.gradient_accumulation_steps)
        try:
            return _HostBatch(micro_batch(self.data, self.plan, self.dp_rank, step, micro))
        except Exception as e:
            return _WorkerError(e, step, micro)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}


def _worker_signals(parent: int, _worker_id: int) -> None:
    """The workers' ``worker_init_fn`` (it runs after the DataLoader installs its own worker
    handlers): SIGTERM and SIGUSR1 are blocked and a daemon thread takes them
    (``sigtimedwait``), ending the worker (``os._exit``: what it made is dropped) on a SIGTERM
    from the training process (pid ``parent``) or within a second of that process's death, and
    ignoring the stop signals anyone else sends (see the module docstring)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # threads started here inherit it

    def watch() -> None:
        while True:
            info = signal.sigtimedwait(_STOP_SIGNALS, 1.0)  # None: a second without a signal
            ended = info is not None and (info.si_signo, info.si_pid) == (signal.SIGTERM, parent)
            if ended or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="kiln_stop_signals", daemon=True).start()


def _as_is(item):  # the DataLoader's collate_fn: the dataset makes whole batches
    return item


def micro_batch(data: TrainData, plan: BatchPlan, dp_rank: int, step: int, micro: int) -> Batch:
    """The batch of micro-step ``micro`` of step ``step`` (0-based) on data-parallel rank
    ``dp_rank``, read now (:meth:`TrainData.batch` of the order's global indices).

    Raises:
        as :meth:`TrainData.batch` (e.g. ``ValueError`` for a damaged shard).
    """
    logical = step_indices(plan, step + 1, micro, dp_rank)
    return data.batch(data.global_indices(logical))


class Prefetcher:
    """The training order's micro-batches for one data-parallel rank, made ahead in DataLoader
    worker processes (see the module docstring).

    Args:
        data: the training mixture; its :attr:`~TrainData.excluded` is read at every request.
        plan: the batch arithmetic (micro batch size, accumulation, data-parallel size).
        dp_rank: this process's data-parallel rank.
        prefetch_steps: optimizer steps made ahead (``prefetch_steps x gradient_accumulation_steps``
            micro-batches in flight at most); 0: read synchronously at each request.
        max_steps: the run's last step; nothing past it is prepared.
        workers: DataLoader worker processes (each holds ``ceil(prefetch / workers)`` batches).
        pin_memory: pin the batches (page-locked host memory) for non-blocking copies to CUDA.
    """

    def __init__(
        self,
        data: TrainData,
        plan: BatchPlan,
        dp_rank: int,
        *,
        prefetch_steps: int,
        max_steps: int,
        workers: int = 1,
        pin_memory: bool = False,
    ):
        self.data, self.plan, self.dp_rank = data, plan, dp_rank
        self.prefetch_steps, self.max_steps, self.workers = prefetch_steps, max_steps, workers
        self.pin_memory = pin_memory
        self.starts = 0  # worker starts so far (the first one, and one per restart)
        self._iter = None
        self._next = -1  # the micro-step the workers deliver next
        self._excluded = np.zeros(0, dtype=np.int64)  # the exclusions the workers hold

    def start(self, step: int, micro: int = 0) -> None:
        """(Re)start the workers at micro-step ``micro`` of ``step`` (0-based), dropping what was
        made ahead; nothing when prefetching is off or ``step`` is past the run."""
        self.close()
        if self.prefetch_steps == 0 or step >= self.max_steps:
            return
        accumulation = self.plan.gradient_accumulation_steps
        ahead = self.prefetch_steps * accumulation
        first = step * accumulation + micro
        loader = torch.utils.data.DataLoader(
            _MicroBatches(self.data, self.plan, self.dp_rank),
            batch_size=None,
            sampler=range(first, self.max_steps * accumulation),
            num_workers=self.workers,
            collate_fn=_as_is,
            pin_memory=self.pin_memory,
            prefetch_factor=-(-ahead // self.workers),
            # the DataLoader draws its workers' base seed from this generator, which by default
            # is torch's global one: the model's dropout would then differ from a run without
            # prefetching. The batches draw nothing from it (objectives seed by sample index).
            generator=torch.Generator().manual_seed(0),
            multiprocessing_context=_START_METHOD,
            # the training process's pid, taken here: a worker still starting when that
            # process dies would otherwise see its new parent as its own
            worker_init_fn=functools.partial(_worker_signals, os.getpid()),
        )
        # The workers start with the stop signals blocked (a mask survives fork and exec), so
        # one that arrives while a worker is still importing stays pending until the worker's
        # own thread takes it (_worker_signals) instead of ending it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self._iter = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._next = first
        self._excluded = self.data.excluded.copy()
        self.starts += 1

    def get(self, step: int, micro: int) -> Batch:
        """The batch of micro-step ``micro`` of step ``step`` (0-based) on this rank: inputs (a
        dict of ``(micro_batch_size, ...)`` int64 tensors, whatever keys the objective makes),
        labels, sample ids, as :meth:`TrainData.batch` gives them; pinned when ``pin_memory``.

        Raises:
            the exception the batch's reading raised, same type and message as the synchronous
            path (a note says it came from the worker); ``RuntimeError`` when a worker died.
        """
        if self.prefetch_steps == 0 or step >= self.max_steps:
            return micro_batch(self.data, self.plan, self.dp_rank, step, micro)
        k = step * self.plan.gradient_accumulation_steps + micro
        if (
            self._iter is None
            or k != self._next
            or not np.array_equal(self._excluded, self.data.excluded)
        ):
            self.start(step, micro)
        item = next(self._iter)
        self._next += 1
        if isinstance(item, _WorkerError):
            self.close()
            raise item.error
        return item.batch() if isinstance(item, _HostBatch) else item  # else pinned already

    def close(self) -> None:
        """Stop the workers (what they made ahead is dropped)."""
        if self._iter is not None:
            # what the iterator's __del__ calls; called here so that the workers stop now, not
            # when a reference cycle or a traceback that holds the iterator is collected
            self._iter._shutdown_workers()
            self._iter = None
        self._next = -1


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: without blocking the host on CUDA (from pinned memory the copy
    runs on the stream, ordered before the kernels that read it), a plain copy elsewhere."""
    return tensor.to(device, non_blocking=device.type == "cuda")
