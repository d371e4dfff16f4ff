"""The training-health supervisor: whether a step is healthy, and what to do when it is not.

Once per optimizer step, just before the optimizer update, every rank puts its stop and poll
flags, its local loss and rank 0's gradient norm of the previous step into one small all-reduce
(:meth:`trainer.loop.Trainer._agree`, the collective the loop does anyway for stop signals); every
rank then runs :meth:`Supervisor.decide` on the same reduced values, so all ranks take the same
action without another collective or host sync.

Detection (:meth:`Supervisor.decide`):

- ``nonfinite_loss``: the loss of any rank is NaN or infinite.
- ``loss_spike``: the step's mean loss is above ``median + k * 1.4826 * MAD`` of the mean losses
  of the last ``health.window`` applied steps (``k`` = ``health.spike_threshold``). The median
  absolute deviation (MAD) scaled by 1.4826 estimates the standard deviation of normal data while
  ignoring outliers (Hampel's identifier; Iglewicz & Hoaglin, "How to Detect and Handle
  Outliers", 1993; Leys et al., J. Exp. Soc. Psychol. 49, 2013). Detection starts once the window
  is full. A MAD below ``1e-3 * |median|`` counts as that much, so a flat loss does not make every
  rounding difference a spike.
- ``grad_norm_spike`` / ``nonfinite_grad_norm``: the same rule on the gradient norm the engine
  reports. DeepSpeed computes that norm inside the optimizer step, after the decision for the
  step, so it is checked one step late (the event names the step it belongs to) and its action
  can only be ``warn`` or ``stop``.

Actions: ``warn`` records the event and goes on; ``skip_step`` does not apply the step's update
(parameters and optimizer state stay bitwise as they were, through DeepSpeed's own overflow-skip
path: :func:`skipped_update`) while the data cursor and the learning-rate schedule move on, so
the learning rate stays a function of the step number (a run with skipped steps still ends its
decay at ``train.max_steps``; DeepSpeed's own fp16 skip holds the schedule back instead). Under
fp16 a skipped step also lowers the dynamic loss scale, as an overflow does. ``stop`` skips the
update too, saves, and ends the run with :class:`~trainer.errors.TrainingDivergedError` (the
checkpoint holds the state before the bad step and resumes after its data). The windows are
saved in every checkpoint, so a resumed run detects as an uninterrupted one would.

``rollback`` (:meth:`trainer.loop.Trainer.roll_back`) skips the update too, then the running
processes reload the newest complete (and, with ``checkpoint.verify_checksums``, verified)
checkpoint of the run folder, leave the step's global sample indices out of the data order from
then on (:func:`trainer.data.dataset.skip_excluded`: the steps between the checkpoint and the bad
step read the same samples again, the bad step and those after it read the next ones) and go
on; for ``health.rollback_cooldown_steps`` steps after the checkpoint the learning rate is
``health.rollback_lr_scale`` times the scheduled one. This is the remedy PaLM used by hand
(Chowdhery et al. 2022, section 5.1: restart about 100 steps before a spike and skip 200-500
batches) done in-process, skipping only the offending step's samples. The exclusions, the
rollbacks made and the cool-down are run state, saved in every checkpoint. A divergence while
``health.max_rollbacks`` rollbacks were already made at steps within ``health.rollback_window``
of it is not rolled back: the run saves and ends with :class:`~trainer.errors.TrainingDivergedError`
naming the steps (:func:`rollback_cap_error`). Before the run's first checkpoint there is nothing
to go back to: the step is skipped instead (the event's action says ``skip_step``).

Fault injection (for tests and rehearsals; off unless set): ``KILN_FAULT`` holds
comma-separated faults ``KIND@rankR:stepS[:xF | :sT]``: ``nan@rank1:step4`` makes rank 1's loss
NaN at step 4, ``spike@rank0:step5:x1000`` multiplies rank 0's loss (and with it its gradients)
by 1000 at step 5, ``sleep@rank1:step4:s600`` makes rank 1 sleep 600 s in step 4 (after its first
micro-batch's forward), a hang for the watchdog (:mod:`trainer.watchdog`) to catch. Steps count
from 1, as in metrics.jsonl. ``nan`` and ``spike`` stand for bad data: they fire the first time a
process reaches their step (the steps a rollback trains again do not repeat them: the rollback
left that data out), and a resumed process counts afresh, so a run resumed before that step meets
them again, as it would the data. ``sleep`` stands for a passing fault (a stuck link, a sick
node): it fires once per run folder; the sleeping rank first appends it to
``<run_dir>/faults.jsonl`` (:data:`FAULT_RECORD`), and a later launch that trains that step again
(the restart after the hang) skips it. Under the pipeline engine only the last stages compute a
loss, so a fault for a rank of another stage does nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.errors import ConfigError, TrainingDivergedError

if TYPE_CHECKING:
    from trainer.config import HealthConfig

FAULT_ENV = "KILN_FAULT"
FAULT_RECORD = "faults.jsonl"  # in the run folder: the sleep faults that fired
MAD_TO_STD = 1.4826  # 1 / Phi^-1(3/4): MAD * this estimates sigma for normal data
MIN_RELATIVE_MAD = 1e-3
SEVERITY = {"warn": 0, "skip_step": 1, "rollback": 2, "stop": 3}
SETTING = {  # the config field that chose each kind's action
    "nonfinite_loss": "health.on_nonfinite",
    "loss_spike": "health.on_spike",
    "nonfinite_grad_norm": "health.on_grad_norm_spike",
    "grad_norm_spike": "health.on_grad_norm_spike",
}


@dataclass(frozen=True)
class Fault:
    """One injected fault: at ``step`` (1-based) rank ``rank``'s loss becomes NaN (``nan``) or
    is multiplied by ``factor`` (``spike``), or the rank sleeps ``seconds`` (``sleep``)."""

    kind: str
    rank: int
    step: int
    factor: float = 1.0
    seconds: float = 0.0

    def __str__(self) -> str:
        arg = {"spike": f":x{self.factor:g}", "sleep": f":s{self.seconds:g}"}.get(self.kind, "")
        return f"{self.kind}@rank{self.rank}:step{self.step}{arg}"


_FAULT = re.compile(r"^(nan|spike|sleep)@rank(\d+):step(\d+)(?::([xs])([0-9.eE+-]+))?$")
_FAULT_ARG = {"nan": None, "spike": "x", "sleep": "s"}  # the argument each kind takes


def parse_faults(text: str) -> list[Fault]:
    """Faults from a ``KILN_FAULT`` value (see the module docstring); ``""`` gives none.

    Raises:
        ValueError: a fault that does not read ``nan@rankR:stepS``, ``spike@rankR:stepS:xF`` or
            ``sleep@rankR:stepS:sT`` (F, T non-negative numbers).
    """
    faults = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _FAULT.match(part)
        value = None
        if m is not None and m[5] is not None:
            with contextlib.suppress(ValueError):
                value = float(m[5])
        if (
            m is None
            or _FAULT_ARG[m[1]] != m[4]
            or (m[4] is not None and (value is None or not value >= 0))
        ):
            raise ValueError(
                f"{FAULT_ENV}={text!r}: cannot read {part!r}; write nan@rankR:stepS, "
                f"spike@rankR:stepS:xFACTOR or sleep@rankR:stepS:sSECONDS (for example "
                f"nan@rank1:step4,spike@rank0:step6:x1000,sleep@rank1:step8:s600)"
            )
        rank, step = int(m[2]), int(m[3])
        if m[1] == "sleep":
            faults.append(Fault("sleep", rank, step, seconds=value))
        else:
            faults.append(Fault(m[1], rank, step, factor=1.0 if value is None else value))
    return faults


class FaultInjector:
    """The faults of ``KILN_FAULT`` that concern ``rank``; :meth:`apply` changes a loss or
    sleeps.

    Args:
        rank: this process's global rank.
        text: the faults (default: the ``KILN_FAULT`` environment variable).
        record: the JSON-lines file (``<run_dir>/faults.jsonl``) that keeps the ``sleep`` faults
            that fired, so that each fires once per run folder; None: once per process. May be
            set after construction (``trainer.main`` sets it to the run folder's).
    """

    def __init__(self, rank: int, text: str | None = None, record: Path | None = None):
        text = os.environ.get(FAULT_ENV, "") if text is None else text
        self.faults = [f for f in parse_faults(text) if f.rank == rank]
        self.record = record
        self._slept: set[Fault] = set()

    def __bool__(self) -> bool:
        return bool(self.faults)

    def apply(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """``loss`` (a scalar tensor, in the graph) with this rank's faults of ``step`` (1-based)
        applied: NaN, or multiplied; unchanged when there are none. A ``sleep`` fault of the step
        sleeps here (the first call of the step) unless it fired before in the run folder."""
        for f in self.faults:
            if f.step != step:
                continue
            if f.kind == "nan":
                loss = loss * float("nan")
            elif f.kind == "spike":
                loss = loss * f.factor
            elif self._first_firing(f):
                time.sleep(f.seconds)
        return loss

    def _first_firing(self, fault: Fault) -> bool:
        """Whether ``fault`` fires now: not yet fired in this process nor in :attr:`record`
        (read and appended to here, before the fault acts, as the process may not outlive it)."""
        if fault in self._slept:
            return False
        self._slept.add(fault)
        if self.record is None:
            return True
        if self.record.is_file():
            for line in self.record.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("fault") == str(fault):
                        return False
        self.record.parent.mkdir(parents=True, exist_ok=True)
        with open(self.record, "a") as f:
            f.write(json.dumps({"fault": str(fault), "time": time.time()}) + "\n")
        return True


def robust_threshold(values: Any, k: float) -> float:
    """``median + k * 1.4826 * MAD`` of ``values`` (a 1-D sequence of finite floats), with the
    MAD at least ``1e-3 * |median|`` (sources in the module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    median = float(np.median(x))
    mad = float(np.median(np.abs(x - median)))
    return median + k * MAD_TO_STD * max(mad, MIN_RELATIVE_MAD * abs(median))


@dataclass
class HealthEvent:
    """One unhealthy step, as written to ``health.jsonl``.

    Attributes:
        step: the optimizer step (1-based, as in metrics.jsonl) the value belongs to.
        kind: ``nonfinite_loss``, ``loss_spike``, ``nonfinite_grad_norm`` or
            ``grad_norm_spike``.
        value: the step's mean loss (the non-finite one, for ``nonfinite_loss``) or grad norm.
        threshold: the spike threshold it was compared with (None for non-finite values).
        ranks: the global ranks whose value was non-finite or above the threshold (all ranks
            for a gradient norm, which is global).
        action: what the run did: ``warn``, ``skip_step``, ``rollback`` or ``stop``.
        sample_ids: sample ids the named ranks trained on at that step (filled by the recorder).
        rollback_to: for ``rollback``, the step of the checkpoint the run went back to.
    """

    step: int
    kind: str
    value: float
    threshold: float | None
    ranks: list[int]
    action: str
    sample_ids: list[int] = field(default_factory=list)
    rollback_to: int | None = None

    def record(self) -> dict[str, Any]:
        """The event as a JSON-ready dict."""
        return asdict(self)


class Supervisor:
    """Decides, from values every rank holds identically, whether a step is healthy.

    Args:
        cfg: the ``health`` section.
        world_size: number of ranks.
    """

    def __init__(self, cfg: HealthConfig, world_size: int):
        self.cfg, self.world_size = cfg, world_size
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.grad_norms: deque[float] = deque(maxlen=cfg.window)

    def state(self) -> dict[str, list[float]]:
        """The windows, for the checkpoint (so a resumed run detects as an uninterrupted one)."""
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}

    def load_state(self, state: dict[str, list[float]]) -> None:
        """Restore :meth:`state` (``{}``: empty windows)."""
        self.losses.clear()
        self.losses.extend(state.get("losses", []))
        self.grad_norms.clear()
        self.grad_norms.extend(state.get("grad_norms", []))

    def _spike(self, window: deque[float], value: float) -> float | None:
        """The threshold ``value`` exceeds, or None (window not yet full, or no spike)."""
        if len(window) < self.cfg.window:
            return None
        threshold = robust_threshold(window, self.cfg.spike_threshold)
        return threshold if value > threshold else None

    def decide(
        self,
        step: int,
        rank_losses: list[float],
        holds_loss: list[bool],
        prev_grad_norm: float | None,
    ) -> tuple[str, list[HealthEvent]]:
        """The action for optimizer step ``step`` (1-based) and the events behind it.

        Args:
            step: the step about to be applied.
            rank_losses: (world_size,) each rank's mean loss of the step (0 where it holds none).
            holds_loss: (world_size,) whether the rank computes a loss (pipeline: last stages).
            prev_grad_norm: the gradient norm of step ``step - 1`` if that update was applied.

        Returns:
            ``("none" | "warn" | "skip_step" | "rollback" | "stop", events)``; the loss enters
            the window only if the update is applied, the gradient norm when it was.
        """
        if not self.cfg.enabled:
            return "none", []
        c = self.cfg
        events: list[HealthEvent] = []
        ranks = [r for r in range(self.world_size) if holds_loss[r]]
        bad = [r for r in ranks if not math.isfinite(rank_losses[r])]
        mean = sum(rank_losses[r] for r in ranks) / len(ranks)
        if bad:
            value = rank_losses[bad[0]]
            events.append(HealthEvent(step, "nonfinite_loss", value, None, bad, c.on_nonfinite))
        elif (threshold := self._spike(self.losses, mean)) is not None:
            high = [r for r in ranks if rank_losses[r] > threshold] or ranks
            events.append(HealthEvent(step, "loss_spike", mean, threshold, high, c.on_spike))
        if prev_grad_norm is not None:
            everyone = list(range(self.world_size))
            if not math.isfinite(prev_grad_norm):
                events.append(
                    HealthEvent(
                        step - 1, "nonfinite_grad_norm", prev_grad_norm, None, everyone,
                        c.on_grad_norm_spike,
                    )
                )  # fmt: skip
            else:
                threshold = self._spike(self.grad_norms, prev_grad_norm)
                if threshold is not None:
                    events.append(
                        HealthEvent(
                            step - 1, "grad_norm_spike", prev_grad_norm, threshold, everyone,
                            c.on_grad_norm_spike,
                        )
                    )  # fmt: skip
                self.grad_norms.append(prev_grad_norm)
        action = max((e.action for e in events), key=SEVERITY.__getitem__, default="none")
        if action in ("none", "warn") and not bad:
            self.losses.append(mean)
        return action, events


def stop_error(events: list[HealthEvent], step: int, report: Path) -> TrainingDivergedError:
    """The error a ``stop`` action ends the run with: the first stopping event of ``events``,
    the step whose update was not applied (1-based) and where the report is."""
    e = next(e for e in events if e.action == "stop")
    threshold = f", threshold {e.threshold:.6g}" if e.threshold is not None else ""
    return TrainingDivergedError(
        f"training stopped at step {e.step}: {e.kind.replace('_', ' ')} (value {e.value:.6g}"
        f"{threshold}, ranks {e.ranks}) with {SETTING[e.kind]}=stop; the update of step {step} "
        f"was not applied and the run is saved at step {step}; the events are in {report}. "
        f"Resuming with the same command goes on after this step's data"
    )


def rollback_cap_error(
    events: list[HealthEvent], rollbacks: list[dict[str, int]], cfg: HealthConfig, report: Path
) -> TrainingDivergedError:
    """The error a run ends with when a divergence finds ``health.max_rollbacks`` rollbacks
    already made within ``health.rollback_window`` steps: ``events`` (their action set to
    ``stop``) are the step's, ``rollbacks`` (``{"step", "to_step"}``) those counted."""
    e = next(e for e in events if e.action == "stop")
    threshold = f", threshold {e.threshold:.6g}" if e.threshold is not None else ""
    earlier = "; ".join(f"step {r['step']} (rolled back to step {r['to_step']})" for r in rollbacks)
    return TrainingDivergedError(
        f"training keeps diverging: step {e.step}: {e.kind.replace('_', ' ')} (value "
        f"{e.value:.6g}{threshold}, ranks {e.ranks}) after {len(rollbacks)} rollback(s) within "
        f"health.rollback_window={cfg.rollback_window} steps: {earlier}. health.max_rollbacks="
        f"{cfg.max_rollbacks} is reached: the update of step {e.step} was not applied and the "
        f"run is saved at step {e.step}; the events and their sample ids are in {report}. Look "
        f"at those samples (or lower train.lr), then resume with the same command"
    )


def _patched(obj: Any, values: dict[str, Any]) -> contextlib.AbstractContextManager:
    """Set instance attributes of ``obj`` for the ``with`` block, then restore them."""

    @contextlib.contextmanager
    def manager() -> Iterator[None]:
        missing = object()
        saved = {k: obj.__dict__.get(k, missing) for k in values}
        for k, v in values.items():
            setattr(obj, k, v)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is missing:
                    delattr(obj, k)
                else:
                    setattr(obj, k, v)

    return manager()


def _skip_patches(optimizer: Any) -> tuple[dict[str, Any], Callable[[], bool]] | None:
    """How to make ``optimizer`` (an engine's) skip its next step through DeepSpeed's own
    overflow path: instance attributes to set, and a check that it did. None if unknown."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    def overflowed() -> bool:
        return optimizer.overflow is True

    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        # step() asks this first; an overflow then takes _loss_scale_update_and_overflow_cleanup:
        # gradients freed, partitions and optimizer state untouched.
        def overflow_check(update_scale: bool = True) -> bool:
            optimizer.overflow = True
            return optimizer._loss_scale_update_and_overflow_cleanup() if update_scale else True

        return {"_overflow_check_and_loss_scale_update": overflow_check}, overflowed
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        # step(): `if self.check_grad_overflow: self.check_overflow(...)`, then the overflow
        # branch clears the gradients and returns before the update.
        def check_overflow(partition_gradients: bool = True) -> None:
            optimizer.overflow = True

        return {"check_grad_overflow": True, "check_overflow": check_overflow}, overflowed
    if isinstance(optimizer, FP16_UnfusedOptimizer):  # ZeRO-0 with bf16 or fp16 (torch AdamW)
        # step(): `self.overflow = self.overflow_checker.check()`, then its
        # _skip_invalid_grad_norm: gradients freed, no update. (The fused FP16_Optimizer comes
        # with DeepSpeed's FusedAdam, which Kiln does not build: refused, untested.)
        checker = optimizer.overflow_checker
        return {"overflow_checker": _AlwaysOverflow(checker)}, overflowed
    if isinstance(optimizer, BF16_Optimizer):
        # Its step() has no overflow hook: the same branch it takes for an invalid norm.
        def step(closure: Any = None) -> None:
            optimizer.overflow = True
            optimizer._global_grad_norm = float("inf")
            optimizer.clear_hp_grads()
            optimizer.clear_lp_grads()

        return {"step": step}, overflowed
    if type(optimizer).__module__.startswith("torch.optim"):  # ZeRO-0 fp32: the torch optimizer
        called = []
        return {"step": lambda closure=None: called.append(True)}, lambda: bool(called)
    return None


class _AlwaysOverflow:
    """An FP16_UnfusedOptimizer overflow checker that reports an overflow."""

    def __init__(self, checker: Any):
        self.checker = checker

    def check(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.checker, name)


def check_skip_supported(engine: Any, setting: str) -> None:
    """Refuse a ``skip_step`` / ``stop`` action for an optimizer :func:`skipped_update` does not
    know (it could not leave the parameters unchanged).

    Raises:
        ConfigError: naming ``setting`` and the optimizer class.
    """
    if _skip_patches(engine.optimizer) is None:
        raise ConfigError(
            f"{setting} cannot skip an update of DeepSpeed's {type(engine.optimizer).__name__} "
            f"(the supervisor skips updates of the optimizers Kiln builds under ZeRO 0-3 and the "
            f"pipeline engine); set {setting}=warn"
        )


@contextlib.contextmanager
def skipped_update(engine: Any) -> Iterator[None]:
    """Within the block, the engine's optimizer step leaves parameters and optimizer state
    unchanged (DeepSpeed's fp16-overflow skip path where the optimizer has one) and frees the
    step's gradients; the learning-rate scheduler still steps once, so the rate stays a function
    of the step number.

    Raises:
        RuntimeError: the optimizer did not take the skip path (a DeepSpeed change).
    """
    patches = _skip_patches(engine.optimizer)
    assert patches is not None, "check_skip_supported refuses this engine at start"
    values, skipped = patches
    with _patched(engine.optimizer, values):
        yield
    if not skipped():
        raise RuntimeError(
            f"DeepSpeed's {type(engine.optimizer).__name__} did not take its skip path: the "
            f"supervisor cannot skip updates with this DeepSpeed version"
        )
    if not engine.was_step_applied() and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()  # the engine steps it only for applied updates
