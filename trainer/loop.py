"""The training loop: ``train_step``, ``evaluate``, ``save``, ``load``, ``fit``.

Data order is a pure function of the logical sample index and the run's exclusions: optimizer
step ``s`` (0-based) consumes the logical indices ``[s * G, (s + 1) * G)`` (G = global batch
size), and micro-step ``m`` of data-parallel rank ``r`` reads ``s * G + m * (b * n) + r * b +
[0, b)`` (b = micro batch size, n = data-parallel size). Logical index ``i`` reads the ``i``-th
global sample index not excluded (:func:`trainer.data.dataset.skip_excluded`; with no exclusions,
global index ``i``), which the sampler maps to a sequence. Exclusions are the global indices of
steps the health supervisor rolled back from (:meth:`Trainer.roll_back`). With pipeline stages
the micro-steps of a step are DeepSpeed's micro-batches (``engine.train_batch``), and the stages
of one data-parallel replica read the same indices. The checkpoint stores the cursor (logical
samples consumed) and the exclusions, so a resume, on any number of processes, neither skips nor
repeats a sample.
"""

from __future__ import annotations

import math
import resource
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import checkpoint, distributed, health
from trainer.callbacks import Callback
from trainer.config import BatchPlan, KilnConfig
from trainer.data.dataset import TrainData
from trainer.data.prefetch import Prefetcher, to_device
from trainer.distributed import World
from trainer.engine import group_weight_decays, loop_clips_gradients
from trainer.estimate import ds_memory_settings, flops_per_token
from trainer.fingerprint import run_fingerprint
from trainer.objectives import IGNORE_INDEX, token_loss
from trainer.storage import RunFolder


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    """Runs optimizer steps on a DeepSpeed engine and hands metrics to callbacks.

    Args:
        cfg: the resolved config.
        engine: from :func:`trainer.engine.build_engine`.
        plan: batch arithmetic for this world size.
        data: training mixture; ``validation``: held-out sequences (may be None).
        token_bytes: (V,) int bytes of text per token id, for bits per byte.
        peak_flops: per-device peak FLOP/s for MFU.
    """

    def __init__(
        self,
        cfg: KilnConfig,
        engine,
        plan: BatchPlan,
        world: World,
        data: TrainData,
        *,
        token_bytes: np.ndarray,
        peak_flops: float,
        callbacks: list[Callback] = (),
        extra_files: tuple[Path, ...] = (),
    ):
        self.cfg, self.engine, self.plan, self.world, self.data = cfg, engine, plan, world, data
        self.run_folder = RunFolder(cfg.run_dir)  # where save() writes (a path or a URL mirror)
        self.token_bytes = torch.as_tensor(token_bytes, dtype=torch.float64)
        self.peak_flops = peak_flops
        self.callbacks = list(callbacks)
        self.extra_files = extra_files
        self.fingerprint = run_fingerprint(cfg)  # what it trains on, saved in every checkpoint
        self.step = 0
        self.consumed_samples = 0
        self.tokens_seen = 0
        self.wandb_run_id = uuid.uuid4().hex[:12]
        self.stop_requested = False  # this rank got SIGTERM / SIGUSR1 (set by the handler)
        self.stopping = False  # all ranks agreed to stop after this step
        self.polling = False  # all ranks call the callbacks' on_poll after this step
        self.saved_step: int | None = None  # the step of the last save
        self._poll_interval: float | None = None  # set by fit from the callbacks
        self._last_poll = 0.0
        self.last_sample_ids = np.zeros(0, dtype=np.int64)  # this rank's, of the last step
        self.last_lr = 0.0
        self._flops_per_token = flops_per_token(cfg)
        self.pipelined = plan.pipeline_stages > 1
        # DeepSpeed reports no gradient norm for ZeRO-0 fp32 (it clips and keeps no norm); the
        # loop then measures the norm and clips with it, once, before the optimizer step
        # (trainer.engine.loop_clips_gradients: DeepSpeed's gradient_clipping is 0 there).
        self._clips_gradients = loop_clips_gradients(cfg, plan)
        # the training loss of the plain head; with train.compile, compiled beside the blocks
        self.token_loss = token_loss
        if cfg.train.compile and not cfg.train.loss_chunk_tokens and not self.pipelined:
            from trainer.compile import compile_loss

            self.token_loss = compile_loss(token_loss, world.device)
        self._grad_norm: torch.Tensor | None = None  # a device tensor: read when logged
        self.dp_rank = engine.grid.data_parallel_id if self.pipelined else world.rank
        # The training order's micro-batches, made data.prefetch_steps steps ahead in
        # DataLoader workers (trainer.data.prefetch); data_wait_s: the seconds this process
        # waited for them (and their copies to the device) since the last metrics.
        self.batches = Prefetcher(
            data,
            plan,
            self.dp_rank,
            prefetch_steps=cfg.data.prefetch_steps,
            max_steps=cfg.train.max_steps,
            workers=cfg.data.prefetch_workers,
            pin_memory=world.device.type == "cuda",
        )
        self.data_wait_s = 0.0
        # The health supervisor (trainer.health) decides at every update, on every rank alike.
        self.supervisor = health.Supervisor(cfg.health, world.world_size)
        self.faults = health.FaultInjector(world.rank)
        self.health_events: list[health.HealthEvent] = []  # of the last step
        self.health_stop: Exception | None = None  # set when an action was `stop`
        self._skip_update = False  # the agreed action of this step skips its update
        self._roll_back = False  # the agreed action of this step is `rollback`
        self.rollbacks: list[dict[str, int]] = []  # {"step", "to_step"} of each rollback made
        self.lr_cooldown_until = 0  # steps up to this one train at health.rollback_lr_scale
        self._reached = 0  # the furthest step this process trained: faults fire once
        self._step_loss: torch.Tensor | None = None  # this rank's mean loss of the step
        self._prev_grad_norm: Any = None  # the last applied update's norm (None: skipped)
        if cfg.health.enabled:
            for name in ("on_nonfinite", "on_spike", "on_grad_norm_spike"):  # stop skips too
                if getattr(cfg.health, name) in ("skip_step", "rollback", "stop"):
                    health.check_skip_supported(engine, f"health.{name}")
        # DeepSpeed calls _take_model_step once per optimizer step, after the last backward of
        # the step and before the update, with the pipeline engine too (inside train_batch):
        # the one place the agreement can run before the update on every engine.
        self._take_model_step = engine._take_model_step
        engine._take_model_step = self._supervised_model_step
        if self.pipelined and self.faults:
            loss_fn = engine.module.loss_fn
            engine.module.loss_fn = lambda *a: self.faults.apply(loss_fn(*a), self._fault_step())

    # -- signals ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (Slurm preemption, a scheduler's stop) finish the step, save and
        exit. Python installs handlers only from the main thread; Ray Train runs the training
        function in a worker thread, where stops come through Ray instead (the run resumes from
        its last checkpoint), so nothing is installed there."""
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, _frame):
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def _agree(self) -> None:
        """The step's one collective, before its update: stop signals, rank 0's clock for
        on_poll, each rank's loss and the previous update's gradient norm, summed over the ranks
        in one small all-reduce; every rank then takes the supervisor's decision on the same
        values.

        Ranks may see a signal at different steps; stop when any rank saw it (as Megatron's
        DistributedSignalHandler does). The decision is kept apart from the handler's flag: a
        signal landing after the all-reduce must not make one rank leave the loop (or start a
        collective save) alone; it counts at the next step. The callbacks' on_poll must run on
        every rank at the same step (it may be a collective).
        """
        n, device = self.world.world_size, self.world.device
        poll = (
            self._poll_interval is not None
            and self.world.is_main
            and time.monotonic() - self._last_poll >= self._poll_interval
        )
        # [stop, poll, grad norm (rank 0's; -1: none), loss of rank r, rank r holds a loss]
        values = torch.zeros(3 + 2 * n, dtype=torch.float64, device=device)
        values[0], values[1] = float(self.stop_requested), float(poll)
        if self.world.is_main:
            norm = self._prev_grad_norm
            values[2] = -1.0 if norm is None else torch.as_tensor(norm, dtype=torch.float64)
        if self._step_loss is not None:
            values[3 + self.world.rank] = self._step_loss.detach().to(torch.float64)
            values[3 + n + self.world.rank] = 1.0
        if n > 1:
            values = distributed.all_reduce_sum(values, device)
        flags = values.tolist()  # the step's one host sync
        self.stopping, self.polling = flags[0] > 0, flags[1] > 0
        if self.polling:
            self._last_poll = time.monotonic()
        action, self.health_events = self.supervisor.decide(
            self.step + 1,
            flags[3 : 3 + n],
            [h > 0 for h in flags[3 + n :]],
            None if flags[2] == -1.0 else flags[2],
        )
        self._skip_update = action in ("skip_step", "rollback", "stop")
        self._roll_back = action == "rollback"  # fit rolls back once the step is over
        if action == "stop":  # after this step is saved (Checkpointer), fit raises
            self.stopping = True
            report = self.run_folder.local / "health.jsonl"
            self.health_stop = health.stop_error(self.health_events, self.step + 1, report)

    def _supervised_model_step(self, lr_kwargs=None) -> None:
        """Replaces the engine's ``_take_model_step``: agree, then update or skip."""
        if self.pipelined:  # the last stages hold the sum of the step's micro-batch losses
            total = self.engine.total_loss if self.engine.is_last_stage() else None
            self._step_loss = (
                None if total is None else total / self.plan.gradient_accumulation_steps
            )
        self._agree()
        self._step_loss = None
        if self._skip_update:
            with health.skipped_update(self.engine):
                self._take_model_step(lr_kwargs)
            self._prev_grad_norm = None
            return
        if self._clips_gradients:
            self._grad_norm = self._clip_gradients()
        self._take_model_step(lr_kwargs)
        norm = self.engine.get_global_grad_norm()
        self._prev_grad_norm = self._grad_norm if norm is None else norm

    def _clip_gradients(self) -> torch.Tensor:
        """The global L2 norm () fp32 of the step's gradients (a device tensor, no host sync),
        having scaled them by ``min(1, train.grad_clip / (norm + 1e-6))`` when ``grad_clip`` > 0
        (``torch.nn.utils.clip_grad_norm_``'s formula, which is also DeepSpeed's). One pass of
        multi-tensor kernels over the gradients, for the engines of
        :func:`trainer.engine.loop_clips_gradients` (ZeRO-0 fp32: the gradients are the
        parameters' own, already averaged over the data-parallel ranks by DeepSpeed's backward)."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.train.grad_clip, norm)
        return norm

    # -- steps ----------------------------------------------------------------------------------
    def micro_batch_indices(self, step: int, micro: int, dp_rank: int | None = None) -> np.ndarray:
        """Global sample indices (micro_batch_size,) int64 of micro-step ``micro`` of step
        ``step`` (0-based) on data-parallel rank ``dp_rank`` (default: this rank's): the
        logical indices of the module docstring with the run's exclusions left out."""
        p, r = self.plan, self.dp_rank if dp_rank is None else dp_rank
        start = step * p.global_batch_size + micro * p.micro_batch_size * p.data_parallel_size
        start += r * p.micro_batch_size
        return self.data.global_indices(np.arange(start, start + p.micro_batch_size))

    def step_global_indices(self, step: int) -> np.ndarray:
        """The global sample indices (global_batch_size,) int64, sorted, that all ranks read at
        ``step`` (1-based)."""
        g = self.plan.global_batch_size
        return self.data.global_indices(np.arange((step - 1) * g, step * g))

    def _fault_step(self) -> int:
        """The step (1-based) the fault injector is asked about: this step the first time the
        process reaches it, else 0 (no fault: a step a rollback trains again)."""
        return self.step + 1 if self.step + 1 > self._reached else 0

    def step_sample_ids(self, step: int, ranks: list[int]) -> list[int]:
        """The sample ids (``dataset_idx * 2**40 + seq_idx``, as the batches carry them) that the
        global ``ranks`` trained on at ``step`` (1-based), in rank and micro-batch order; under
        the pipeline engine, those of the ranks' data-parallel replicas. Computed from the
        sampler alone (no data read), so any rank can name another's samples."""
        from trainer.data.dataset import SAMPLE_ID_STRIDE

        p = self.plan
        if self.pipelined:
            topology = self.engine.grid.topology()
            dp_ranks = sorted({topology.get_coord(r).data for r in ranks})
        else:
            dp_ranks = sorted(ranks)
        out = []
        for r in dp_ranks:
            for micro in range(p.gradient_accumulation_steps):
                d, seq = self.data.sampler(self.micro_batch_indices(step - 1, micro, r))
                out += (d * SAMPLE_ID_STRIDE + seq).tolist()
        return out

    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Returns this rank's mean loss over its micro-batches (a device tensor: no host sync).
        """
        self.engine.train()
        if self.cfg.health.rolls_back:
            self._apply_lr_cooldown()
        self.last_lr = self.engine.get_lr()[0]  # the rate this step uses
        if self.pipelined:
            return self._pipeline_train_step()
        total = torch.zeros((), device=self.world.device)
        ids = []
        for micro in range(self.plan.gradient_accumulation_steps):
            waited = time.perf_counter()
            batch = self.batches.get(self.step, micro)
            ids.append(batch.sample_ids)
            inputs, labels = self._to_device(batch.inputs), self._to_device(batch.labels)
            self.data_wait_s += time.perf_counter() - waited
            if self.cfg.train.loss_chunk_tokens:  # the model's head applies the chunked loss
                chunk = self.cfg.train.loss_chunk_tokens
                loss = self.engine(**inputs, labels=labels, loss_chunk_tokens=chunk)
            else:
                loss = self.token_loss(self.engine(**inputs), labels)
            if self.faults:
                loss = self.faults.apply(loss, self._fault_step())
            self.engine.backward(loss)
            total += loss.detach()
            if micro == self.plan.gradient_accumulation_steps - 1:
                self._step_loss = total / self.plan.gradient_accumulation_steps
            self.engine.step()  # at the last micro-batch: _supervised_model_step
        self.last_sample_ids = np.concatenate(ids)
        self._advance()
        return total / self.plan.gradient_accumulation_steps

    def _advance(self) -> None:
        self.step += 1
        self._reached = max(self._reached, self.step)
        self.consumed_samples += self.plan.global_batch_size
        self.tokens_seen += self.plan.tokens_per_step

    def _pipeline_inputs(self, inputs: dict[str, torch.Tensor]):
        """The first stage's input: the tensor or tuple `trainer.pipeline`'s layers expect."""
        from trainer.pipeline import first_stage_inputs

        return first_stage_inputs(self.cfg.derived.model, self._to_device(inputs))

    def _pipeline_train_step(self) -> torch.Tensor:
        waited = time.perf_counter()
        batches = [
            self.batches.get(self.step, micro)
            for micro in range(self.plan.gradient_accumulation_steps)
        ]
        micro_batches = [
            (self._pipeline_inputs(b.inputs), self._to_device(b.labels)) for b in batches
        ]
        self.data_wait_s += time.perf_counter() - waited
        self.engine.train_batch(iter(micro_batches))
        self.last_sample_ids = np.concatenate([b.sample_ids for b in batches])
        self._advance()
        # this replica's mean micro-batch loss, broadcast from its last stage to every stage
        return self.engine.dp_group_loss.detach().float().reshape(())

    def _logits(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor | None:
        """Forward one micro-batch without gradients; None on pipeline stages other than the
        last (which alone holds the logits)."""
        if not self.pipelined:
            return self.engine(**self._to_device(inputs))
        micro_batch = (self._pipeline_inputs(inputs), labels.to(self.world.device))
        _, logits = self.engine.eval_batch(
            iter([micro_batch]), return_logits=True, bcast_loss=False, num_micro_batches=1
        )
        return logits if self.engine.is_last_stage() else None

    def _to_device(self, x: dict[str, torch.Tensor] | torch.Tensor):
        """A tensor or a dict of tensors on the device (non-blocking on CUDA: see to_device)."""
        if isinstance(x, torch.Tensor):
            return to_device(x, self.world.device)
        return {k: to_device(v, self.world.device) for k, v in x.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats per labelled token: next tokens of a decoder, target tokens of
        an encoder-decoder), perplexity per labelled token and bits per byte over
        ``eval_samples`` held-out sequences (all of them if fewer; ``{}`` if none), split over
        the ranks (every rank runs the same number of forwards, as ZeRO-3 needs). Bits per byte
        = total nats / ln 2 / UTF-8 bytes of the labelled text (sentinels and EOS count 0), so
        runs with different tokenizers compare."""
        held_out = len(self.data.validation) if self.data.validation is not None else 0
        p, n = self.plan, min(self.cfg.train.eval_samples, held_out)
        if n == 0:
            return {}
        self.engine.eval()
        per_round = p.micro_batch_size * p.data_parallel_size
        sums = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
        for start in range(0, n, per_round):
            idx = start + self.dp_rank * p.micro_batch_size + np.arange(p.micro_batch_size)
            inputs, labels, _ = self.data.validation_batch(idx)
            labels[torch.as_tensor(idx >= n)] = IGNORE_INDEX  # padding rows of the last round
            logits = self._logits(inputs, labels)
            if logits is None:  # a pipeline stage before the last: it adds nothing
                continue
            nats = token_loss(logits, labels.to(self.world.device), reduction="sum")
            valid = labels != IGNORE_INDEX
            sums += torch.stack(
                [
                    nats.double().cpu(),
                    valid.sum().double(),
                    self.token_bytes[labels.clamp(min=0)][valid].sum(),
                ]
            )
        nats, tokens, nbytes = distributed.all_reduce_sum(sums, self.world.device).tolist()
        loss = nats / tokens
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": nats / math.log(2) / nbytes,
        }

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "tokens_seen": self.tokens_seen,
            "wandb_run_id": self.wandb_run_id,
            "world_size": self.world.world_size,
            "zero_stage": self.cfg.parallel.zero_stage,
            "pipeline_stages": self.plan.pipeline_stages,
            "global_batch_size": self.plan.global_batch_size,
            "sub_group_size": ds_memory_settings(self.cfg).sub_group_size,  # ZeRO-3's layout
            "hardware": distributed.hardware(self.world),
            "config": self.cfg.model_dump(mode="json"),
            "fingerprint": self.fingerprint,
            "health": self.supervisor.state(),
            "excluded_samples": self.data.excluded.tolist(),  # global indices left out
            "rollbacks": self.rollbacks,
            "lr_cooldown_until": self.lr_cooldown_until,
        }

    def save(self) -> Path:
        self.saved_step = self.step
        return checkpoint.save_checkpoint(
            self.engine,
            self.run_folder,
            self.state(),
            rank=self.world.rank,
            keep_last=self.cfg.checkpoint.keep_last,
            extra_files=self.extra_files,
            checksums=self.cfg.checkpoint.verify_checksums,
        )

    def load(self, ckpt: Path) -> None:
        """Resume from ``ckpt``: engine shards, optimizer, scheduler, RNG, data cursor (logical
        samples consumed: ``step`` x the global batch), excluded samples, rollbacks made.

        Raises:
            ValueError: the checkpoint's cursor is not a whole number of this run's global
                batches (the message names the batch to resume with).
        """
        state = checkpoint.load_checkpoint(
            self.engine,
            ckpt,
            rank=self.world.rank,
            weight_decays=group_weight_decays(self.cfg.train.weight_decay),
        )
        self.step = state["step"]
        self.consumed_samples = state["consumed_samples"]
        self.tokens_seen = state["tokens_seen"]
        self.wandb_run_id = state["wandb_run_id"]
        self.supervisor.load_state(state.get("health", {}))  # absent before the supervisor
        self.data.excluded = np.unique(np.asarray(state.get("excluded_samples", []), np.int64))
        self.rollbacks = list(state.get("rollbacks", []))
        self.lr_cooldown_until = int(state.get("lr_cooldown_until", 0))
        if self.consumed_samples != self.step * self.plan.global_batch_size:
            raise ValueError(
                f"{ckpt} consumed {self.consumed_samples} samples in {self.step} steps, which a "
                f"global batch of {self.plan.global_batch_size} cannot continue exactly; resume "
                f"with train.global_batch_size={state['global_batch_size']}"
            )

    # -- the loop ------------------------------------------------------------------------------
    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def fit(self) -> None:
        """Train to ``train.max_steps`` (or until a stop signal), evaluating and logging; a step
        the health supervisor agreed to roll back is not logged or saved: the run goes back to
        the newest checkpoint (:meth:`roll_back`) and trains on from there.

        Raises:
            TrainingDivergedError: a ``stop`` action, or a divergence past the rollback cap
                (after the step is saved).
        """
        intervals = [cb.poll_interval for cb in self.callbacks if cb.poll_interval is not None]
        self._poll_interval = min(intervals, default=None)  # of on_poll, in seconds
        self._last_poll = time.monotonic()
        self._call("on_train_start")
        self.batches.start(self.step)  # the workers fill while step 0 evaluates
        try:  # the workers stop however fit ends (they ignore the step's stop signals)
            self._train()
        finally:
            self.batches.close()
        self._call("on_train_end")
        if self.health_stop is not None:
            raise self.health_stop

    def _train(self) -> None:
        """:meth:`fit`'s evaluation at step 0 and its steps, to the last one or a stop."""
        t = self.cfg.train
        if self.step == 0:
            self._evaluate_and_report()
        window_loss = torch.zeros((), device=self.world.device)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < t.max_steps:
            window_loss += self.train_step()
            window_steps += 1
            if self._roll_back and self._rolled_back():
                window_loss.zero_()
                window_start, window_steps = time.perf_counter(), 0
                self.data_wait_s = 0.0
                if self.stopping:  # a signal with the step: the run is at a saved checkpoint
                    break
                continue
            for event in self.health_events:
                self._call("on_health_event", event)
            metrics = None
            if self.step % t.log_every == 0 or self.step == t.max_steps or self.stopping:
                metrics = self._train_metrics(
                    window_loss / window_steps, window_start, window_steps
                )
                window_loss.zero_()
                window_start, window_steps = time.perf_counter(), 0
            self._call("on_step_end", metrics)
            if self.polling:
                self._call("on_poll")
            if self.step % t.eval_every == 0 or self.step == t.max_steps:
                self._evaluate_and_report()
            if self.stopping:
                break

    # -- rollback -----------------------------------------------------------------------------
    def _rolled_back(self) -> bool:
        """The step just trained was agreed ``rollback``: roll back (events recorded first,
        with the step rolled back to), or when the cap is reached turn it into ``stop`` (the
        rest of fit saves and raises), or with no checkpoint yet into ``skip_step``. Returns
        whether it rolled back. Every rank calls it at the same step (collectives inside)."""
        self._roll_back = False
        h, step = self.cfg.health, self.step
        rolling = [e for e in self.health_events if e.action == "rollback"]
        recent = [r for r in self.rollbacks if r["step"] > step - h.rollback_window]
        if len(recent) >= h.max_rollbacks:
            for e in rolling:
                e.action = "stop"
            self.stopping = True
            report = self.run_folder.local / "health.jsonl"
            self.health_stop = health.rollback_cap_error(self.health_events, recent, h, report)
            return False
        ckpt = self._newest_checkpoint()
        if ckpt is None:  # before the first save: nothing to go back to
            if self.world.is_main:
                print(f"health: step {step}: no checkpoint to roll back to yet; skipping the step")
            for e in rolling:
                e.action = "skip_step"
            return False
        to_step = checkpoint.read_trainer_state(ckpt)["step"]
        for e in rolling:
            e.rollback_to = to_step
        for event in self.health_events:  # named with this step's samples, before exclusion
            self._call("on_health_event", event)
        self.roll_back(ckpt)
        return True

    def _newest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of the run folder (checksums verified with
        ``checkpoint.verify_checksums``; rank 0 checks, every rank gets its answer), the
        universal conversion of it when it was written on another layout; None if none."""
        folder = self.run_folder
        if folder.url is None:
            checksums = self.cfg.checkpoint.verify_checksums
            tag = folder.scan(checksums=checksums)[0] if self.world.is_main else None
            tag = distributed.broadcast_object(tag)
            ckpt = None if tag is None else folder.checkpoints / tag
        else:  # this node's mirror, which holds what the run saved since it started
            ckpt = folder.latest_checkpoint()
        if ckpt is None:
            return None
        state = checkpoint.read_trainer_state(ckpt)
        p = self.cfg.parallel
        universal = checkpoint.needs_universal(
            state, p.zero_stage, self.world.world_size, p.sub_group_size
        )
        if universal:  # the checkpoint this process resumed from on another layout
            if folder.node_main(self.world.rank, self.world.local_rank):
                checkpoint.convert_to_universal(ckpt)
            distributed.barrier()
            ckpt = ckpt.with_name(ckpt.name + "-universal")
        # DeepSpeed reads this flag of its config when it loads; the engine was built with the
        # flag of the checkpoint it started from.
        self.engine._config.load_universal_checkpoint = universal
        return ckpt

    def roll_back(self, ckpt: Path) -> None:
        """Reload ``ckpt`` (a complete checkpoint of this run, older than this step) in the
        running processes and leave the global sample indices of the step just trained (all
        ranks' ``global_batch_size`` of them) out of the data order from then on: the steps after
        the checkpoint read the same samples as before up to this step, which reads the next
        ones. The exclusions and rollbacks made so far are kept (the checkpoint predates the
        newest), and the next ``health.rollback_cooldown_steps`` steps train at
        ``health.rollback_lr_scale`` times the scheduled rate. Collective: every rank calls it.
        """
        diverged = self.step
        bad = self.step_global_indices(diverged)
        excluded, rollbacks = np.union1d(self.data.excluded, bad), self.rollbacks
        self.load(ckpt)
        self.data.excluded = excluded.astype(np.int64)
        self.rollbacks = [*rollbacks, {"step": diverged, "to_step": self.step}]
        self.lr_cooldown_until = self.step + self.cfg.health.rollback_cooldown_steps
        self.saved_step = self.step
        self._prev_grad_norm = self._grad_norm = None  # the skipped update has no norm
        self._call("on_rollback")

    def _apply_lr_cooldown(self) -> None:
        """Set the optimizer's rate for the step about to train: the schedule's, times
        ``health.rollback_lr_scale`` up to step :attr:`lr_cooldown_until`. Set at every step
        (the rate saved with a checkpoint during a cool-down must not outlive it)."""
        scheduler = self.engine.lr_scheduler
        if scheduler is None:
            return
        cooling = self.step + 1 <= self.lr_cooldown_until
        scale = self.cfg.health.rollback_lr_scale if cooling else 1.0
        for group, lr in zip(
            scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr * scale

    def _evaluate_and_report(self) -> None:
        if metrics := self.evaluate():
            self._call("on_eval_end", metrics)

    def _train_metrics(self, loss: torch.Tensor, since: float, steps: int) -> dict[str, float]:
        mean_loss = distributed.all_reduce_sum(loss.reshape(1), self.world.device).item()
        elapsed = time.perf_counter() - since
        tokens_per_s = steps * self.plan.tokens_per_step / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._grad_norm
        data_wait_s, self.data_wait_s = self.data_wait_s, 0.0  # this rank's, over the window
        return {
            "loss": mean_loss / self.world.world_size,
            "lr": self.last_lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self._flops_per_token / (self.peak_flops * self.world.world_size),
            "memory_gb": peak_memory_gb(self.world.device),
            "tokens_seen": float(self.tokens_seen),
            "world_size": self.world.world_size,  # an elastic Ray group may change it on resume
            "data_wait_s": data_wait_s / steps,  # per step, waiting for batches (rank 0's)
            "data_wait_pct": 100 * data_wait_s / elapsed,  # of the window's wall time
        }
