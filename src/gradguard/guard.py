"""The Guard: a training step that never lets a non-finite value into the weights, and says where it came from.

One step, in order::

    closure() -> loss            (the Guard zeroes gradients first, and remembers the RNG state)
    backward(loss)               (scaled when a GradScaler is given)
    scaler.unscale_(optimizer)   (exactly once; clipping always sees unscaled gradients)
    clipper(model) -> ClipStats  (one pass over the gradients: the norm, which is also the finite flag)
    decide                       (loss finite, gradients finite, no spike: ONE host read, MAX-reduced across ranks)
    optimizer.step(), scheduler.step(), ema.update_parameters()   -- only if everything is finite
    scaler.update()              (always: a skipped overflow step still lowers the scale)

Every ``check_params_every`` steps the parameters themselves are checked after ``optimizer.step()`` (a learning
rate that is too high turns finite gradients into non-finite weights). On those steps the Guard backs up the
parameters and the optimizer state first, steps, and reads loss, gradient and parameter flags together — still one
host read — restoring the backup if anything was non-finite. So under ``"skip"`` and ``"rollback"`` the weights
never hold a non-finite value.

On a bad step with a closure, the step is replayed once under the op-level locator (same RNG state, parameters
untouched) and ``guard.diagnosis`` names the stage, module and op; without a closure it gives the stage and the
parameters with non-finite gradients.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gradguard import norms
from gradguard._checks import check_monitor
from gradguard.clippers.base import Clipper, ClipStats, resolve_parameters
from gradguard.clippers.state import check_int, check_number
from gradguard.diagnose import (
    Diagnosis,
    NonFiniteError,
    TrainingDivergedError,
    _rng_state,
    _set_rng_state,
    explain,
    locate_nonfinite,
    nonfinite_names,
)
from gradguard.distributed import all_reduce_max_

__all__ = ["Guard", "SpikeDetector", "StepReport"]

POLICIES = ("skip", "rollback", "raise", "warn")

# one flag per reason, in the order they are read back
_REASONS = ("nonfinite_loss", "nonfinite_grad", "nonfinite_params", "loss_spike", "grad_norm_spike")


class _Recorder(Protocol):
    """What the Guard calls after every step (``gg.Monitor`` is one)."""

    def record(
        self,
        stats: ClipStats | None,
        *,
        loss: Tensor | None,
        skipped: bool,
        reason: str | None,
        lr: float | None,
        model: nn.Module,
        diagnosis: Diagnosis | None,
        step: int,
    ) -> Any: ...


@dataclass(frozen=True)
class StepReport:
    """What happened in one guarded step.

    ``loss`` and ``stats`` hold device tensors (read them when you log); ``skipped``, ``reason`` and ``lr`` are host
    values (the step's single host read). ``reason`` is ``None`` for a good step, else one of ``"nonfinite_loss"``,
    ``"nonfinite_grad"``, ``"nonfinite_params"``, ``"loss_spike"``, ``"grad_norm_spike"``; ``rolled_back`` tells
    whether the last snapshot was restored.
    """

    step: int
    loss: Tensor | None
    stats: ClipStats
    skipped: bool
    reason: str | None = None
    lr: float | None = None
    diagnosis: Diagnosis | None = None
    rolled_back: bool = False

    @property
    def norm(self) -> Tensor:
        """Total gradient norm before clipping (device tensor)."""
        return self.stats.norm

    @property
    def coef(self) -> Tensor:
        """Clipping factor applied (device tensor)."""
        return self.stats.coef

    @property
    def clipped(self) -> Tensor:
        """Whether clipping scaled the gradients (device bool tensor)."""
        return self.stats.clipped


class SpikeDetector:
    """Rolling z-score spike detection on the device (OLMo-core's rule: a value more than ``z`` standard deviations
    above the mean of the last ``window`` accepted values is a spike).

    .. math:: \\text{spike}_t = n_t \\ge n_{min} \\;\\wedge\\; \\frac{x_t - \\bar x}{s + 10^{-12}} > z

    over the last ``window`` finite, non-spike values (:math:`n_t` of them, at least ``min_history``). Spikes and
    non-finite values never enter the window. No host read.
    """

    def __init__(self, z: float = 6.0, window: int = 128, min_history: int | None = None) -> None:
        self.z = check_number(z, "spike_z", low=0.0, low_open=True)
        self.window = check_int(window, "spike_window", low=2)
        history = min_history if min_history is not None else min(window, 32)
        self.min_history = check_int(history, "min_history", low=2)
        self._values: Tensor | None = None
        self._count: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        """Is ``x`` (0-d) a spike? Updates the window with ``x`` unless it is one (or non-finite)."""
        x = x.detach().float()
        if self._values is None or self._count is None or self._values.device != x.device:
            self._values = torch.full((self.window,), math.nan, device=x.device)
            self._count = torch.zeros((), dtype=torch.long, device=x.device)
        vals = self._values
        mean = torch.nanmean(vals)
        centred = torch.where(torch.isnan(vals), torch.zeros_like(vals), vals - mean)
        n = (~torch.isnan(vals)).sum()
        std = (centred.square().sum() / (n - 1).clamp(min=1)).sqrt()
        spike = (n >= self.min_history) & ((x - mean) / (std + 1e-12) > self.z)
        accept = torch.isfinite(x) & ~spike
        slot = (self._count % self.window).reshape(1)
        vals.index_put_((slot,), torch.where(accept, x, vals.index_select(0, slot)))
        self._count.add_(accept.long())
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {} if self._values is None or self._count is None else {
            "values": self._values.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._values = None if "values" not in state else state["values"].clone()
        self._count = None if "count" not in state else state["count"].clone()


class _StepBackup:
    """Device copies of the parameters and the optimizer state, taken just before a checked ``optimizer.step()``.

    The copy buffers are allocated once and refilled with one foreach copy per step; only when the optimizer's
    state changes shape (its first step, a new parameter group) is the layout rebuilt.
    """

    def __init__(self) -> None:
        self.sources: list[Tensor] = []  # parameters, then optimizer-state tensors
        self.copies: list[Tensor] = []
        self.params: list[Tensor] = []
        self.layout: list[tuple[Tensor, tuple[str, ...]]] = []  # per parameter: its state's tensor keys
        self.extras: dict[int, dict[str, Any] | None] = {}  # non-tensor state values (and absent states)

    @torch.no_grad()
    def capture(self, params: list[Tensor], optimizer: torch.optim.Optimizer) -> None:
        layout: list[tuple[Tensor, tuple[str, ...]]] = []
        sources = list(params)
        extras: dict[int, dict[str, Any] | None] = {}
        for p in params:
            st = optimizer.state.get(p)
            if not st:
                extras[id(p)] = None
                layout.append((p, ()))
                continue
            keys = tuple(k for k, v in st.items() if isinstance(v, Tensor))
            sources += [st[k] for k in keys]
            extras[id(p)] = {k: copy.deepcopy(v) for k, v in st.items() if not isinstance(v, Tensor)}
            layout.append((p, keys))
        if len(self.copies) != len(sources) or any(
            c.shape != s.shape or c.dtype != s.dtype or c.device != s.device for c, s in zip(self.copies, sources)
        ):
            self.copies = [torch.empty_like(s) for s in sources]
        if sources:
            torch._foreach_copy_(self.copies, sources)
        self.sources, self.params, self.layout, self.extras = sources, params, layout, extras

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        if self.sources:
            torch._foreach_copy_(self.sources, self.copies)  # parameters and state tensors, in place
        i = len(self.params)
        for p, keys in self.layout:
            extra = self.extras.get(id(p))
            if extra is None:  # the optimizer had no state for p before this step
                optimizer.state.pop(p, None)
                continue
            st = optimizer.state[p]
            for k in keys:  # an optimizer that replaced a state tensor (rather than updating it) gets it back
                if st.get(k) is not self.sources[i]:
                    st[k] = self.copies[i].clone()
                i += 1
            st.update(copy.deepcopy(extra))
            for k in [k for k in st if k not in keys and k not in extra]:
                del st[k]


def _to_cpu(obj: Any) -> Any:
    """A deep copy of a (nested) state_dict with every tensor cloned to CPU memory."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class Guard:
    """A guarded training step: clip, check, and never let a non-finite value into the weights.

    Args:
        model: the module being trained (its parameters are clipped and checked).
        optimizer: its optimizer.
        clipper: a gradguard clipper (``gg.NormClip(1.0)``, ``gg.ZClip()``, ...); ``None`` checks without clipping.
        scaler: a ``torch.amp.GradScaler``: the loss is scaled for backward, ``unscale_`` is called exactly once
            per step before clipping, and ``update()`` after every step (skipped or not).
        scheduler: a learning-rate scheduler, stepped only after a good step.
        on_nonfinite: ``"skip"`` (default), ``"rollback"`` (restore the last snapshot; needs ``snapshot_every``),
            ``"raise"`` (:class:`NonFiniteError`), or ``"warn"`` (skip with a warning).
        max_consecutive_skips: more bad steps in a row than this raise :class:`TrainingDivergedError`.
        snapshot_every: take a snapshot of model, optimizer, scaler, scheduler (and EMA) every this many good steps
            (CPU memory by default); ``None`` takes none.
        check_params_every: check the parameters for non-finite values after ``optimizer.step()`` every this many
            steps (``None``: never). Checked steps back the step up first, so a blown-up step is undone.
        monitor: an object with ``record(stats, **fields)`` (``gg.Monitor``), called after every step.
        spike_z: if set, a loss or gradient norm more than ``spike_z`` standard deviations above its rolling mean
            over ``spike_window`` steps is treated as a bad step (OLMo-core uses 6 over 128).
        ema: an ``torch.optim.swa_utils.AveragedModel`` (or anything with ``update_parameters(model)``) updated
            only after good steps.
        locate: replay bad steps under the op-level locator when a closure is available.
        snapshot_device: where snapshots live (``"cpu"``).
        process_group: the group across which the skip decision is MAX-reduced when torch.distributed is
            initialised (default: the world).

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0))
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> report = guard.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> report.skipped
        False
        >>> bad = guard.step(lambda: torch.nn.functional.mse_loss(model(x), y) * float("nan"))
        >>> bad.skipped, bad.reason, guard.diagnosis.stage
        (True, 'nonfinite_loss', 'forward')
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clipper: Clipper | None = None,
        scaler: torch.amp.GradScaler | None = None,
        scheduler: Any = None,
        on_nonfinite: str = "skip",
        max_consecutive_skips: int = 10,
        snapshot_every: int | None = None,
        check_params_every: int | None = 1,
        monitor: _Recorder | None = None,
        *,
        spike_z: float | None = None,
        spike_window: int = 128,
        ema: Any = None,
        locate: bool = True,
        snapshot_device: str | torch.device = "cpu",
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if clipper is not None and not isinstance(clipper, Clipper):
            raise TypeError(
                f"clipper must be a gradguard Clipper (e.g. gg.NormClip(1.0)) or None, got {type(clipper).__name__}"
            )
        if scaler is not None and not all(hasattr(scaler, a) for a in ("scale", "unscale_", "update")):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if scheduler is not None and not hasattr(scheduler, "step"):
            raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
        if on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
        self.max_consecutive_skips = check_int(max_consecutive_skips, "max_consecutive_skips", low=0)
        self.snapshot_every = None if snapshot_every is None else check_int(snapshot_every, "snapshot_every", low=1)
        if on_nonfinite == "rollback" and self.snapshot_every is None:
            raise ValueError('on_nonfinite="rollback" needs snapshots: pass snapshot_every=N (e.g. 100)')
        self.check_params_every = (
            None if check_params_every is None else check_int(check_params_every, "check_params_every", low=1)
        )
        check_monitor(monitor)
        if ema is not None and not callable(getattr(ema, "update_parameters", None)):
            raise TypeError("ema must have update_parameters(model) (e.g. torch.optim.swa_utils.AveragedModel)")
        self.model = model
        self.optimizer = optimizer
        self.clipper = clipper
        self.scaler = scaler
        self.scheduler = scheduler
        self.on_nonfinite = on_nonfinite
        self.monitor = monitor
        self.ema = ema
        self.locate = locate
        self.snapshot_device = torch.device(snapshot_device)
        self.process_group = process_group
        self._loss_spikes = None if spike_z is None else SpikeDetector(spike_z, spike_window)
        self._norm_spikes = None if spike_z is None else SpikeDetector(spike_z, spike_window)
        self.step_count = 0  # steps attempted
        self.good_steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.diagnosis: Diagnosis | None = None
        self._pending_loss: list[Tensor] = []
        self._backup = _StepBackup()
        self._snapshot: dict[str, Any] | None = None
        if self.snapshot_every is not None:
            self.snapshot()

    # ---------------------------------------------------------------------------------------------- public API
    def backward(self, loss: Tensor) -> None:
        """Backward ``loss`` (scaled when a GradScaler is given) and remember its finite flag for :meth:`step`.

        May be called several times before :meth:`step` (gradient accumulation).
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (one element), got shape {tuple(loss.shape)}; reduce it first")
        self._pending_loss.append(loss.detach().reshape(()))
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()  # type: ignore[no-untyped-call]

    def step(self, closure: Callable[[], Tensor] | None = None) -> StepReport:
        """One guarded step. With ``closure`` (forward pass returning the loss) the Guard zeroes the gradients, runs
        the closure and backward itself; without, call :meth:`backward` first."""
        rng = None
        if closure is not None:
            if not callable(closure):
                raise TypeError(
                    f"closure must be callable (forward pass returning the loss), got {type(closure).__name__}"
                )
            if self._pending_loss:
                raise RuntimeError("Guard.backward() was called before step(closure); use one way per step")
            rng = _rng_state() if self.locate else None
            self.optimizer.zero_grad(set_to_none=True)
            self.backward(closure())
        elif not self._pending_loss:
            raise RuntimeError("Guard.step() without a closure needs Guard.backward(loss) first")
        losses, self._pending_loss = self._pending_loss, []
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        self.step_count += 1
        return self._step(loss, closure, rng)

    def snapshot(self) -> None:
        """Take a snapshot now (model, optimizer, scaler, scheduler, EMA) for ``"rollback"``."""
        snap: dict[str, Any] = {
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
        }
        if self.scaler is not None:
            snap["scaler"] = copy.deepcopy(self.scaler.state_dict())
        if self.scheduler is not None and hasattr(self.scheduler, "state_dict"):
            snap["scheduler"] = copy.deepcopy(self.scheduler.state_dict())
        if isinstance(self.ema, nn.Module):
            snap["ema"] = _to_cpu(self.ema.state_dict())
        if self.clipper is not None:
            snap["clipper"] = _to_cpu(self.clipper.state_dict())
        snap["step"] = self.good_steps
        self._snapshot = snap

    def rollback(self) -> None:
        """Restore the last snapshot (model, optimizer, scaler, scheduler, EMA, clipper state)."""
        if self._snapshot is None:
            raise RuntimeError("no snapshot to roll back to: pass snapshot_every=N to Guard")
        snap = self._snapshot
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if "scaler" in snap and self.scaler is not None:
            self.scaler.load_state_dict(snap["scaler"])
        if "scheduler" in snap and self.scheduler is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        if "ema" in snap and isinstance(self.ema, nn.Module):
            self.ema.load_state_dict(snap["ema"])
        if "clipper" in snap and self.clipper is not None:
            self.clipper.load_state_dict(snap["clipper"])

    def state_dict(self) -> dict[str, Any]:
        """Counters and the clipper's and spike detectors' state (model/optimizer are checkpointed as usual)."""
        return {
            "step_count": self.step_count,
            "good_steps": self.good_steps,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "clipper": self.clipper.state_dict() if self.clipper is not None else {},
            "loss_spikes": self._loss_spikes.state_dict() if self._loss_spikes else {},
            "norm_spikes": self._norm_spikes.state_dict() if self._norm_spikes else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.clipper is not None:
            self.clipper.load_state_dict(state.get("clipper", {}))
        for key in ("step_count", "good_steps", "skipped_steps", "consecutive_skips"):
            setattr(self, key, check_int(state[key], key))
        if self._loss_spikes is not None:
            self._loss_spikes.load_state_dict(state.get("loss_spikes", {}))
        if self._norm_spikes is not None:
            self._norm_spikes.load_state_dict(state.get("norm_spikes", {}))

    # ------------------------------------------------------------------------------------------------ internals
    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _unscale(self) -> None:
        """``scaler.unscale_(optimizer)`` exactly once per step (skipped if the caller already did it)."""
        assert self.scaler is not None
        states = getattr(self.scaler, "_per_optimizer_states", None)
        stage = states[id(self.optimizer)].get("stage") if states is not None else None
        if stage is not None and getattr(stage, "name", "") == "UNSCALED":
            return
        self.scaler.unscale_(self.optimizer)

    def _lr(self) -> float | None:
        lr = self.optimizer.param_groups[0].get("lr")
        return float(lr) if isinstance(lr, (int, float)) else None

    def _step(self, loss: Tensor, closure: Callable[[], Tensor] | None, rng: Any) -> StepReport:
        if self.scaler is not None:
            self._unscale()
        with torch.no_grad():
            if self.clipper is not None:
                stats = self.clipper(self.model)
            else:
                grads = [i.grad for i in resolve_parameters(self.model)]
                stats = ClipStats.unclipped(norm=norms.total_norm(grads, 2.0, check=False) if grads else None,
                                            device=loss.device)
            flags = [~torch.isfinite(loss), ~stats.finite]
            check_params = self.check_params_every is not None and self.step_count % self.check_params_every == 0
            flags.append(torch.zeros((), dtype=torch.bool, device=loss.device))
            flags.append(self._loss_spikes(loss) if self._loss_spikes else torch.zeros_like(flags[0]))
            flags.append(self._norm_spikes(stats.norm) if self._norm_spikes else torch.zeros_like(flags[0]))
            if check_params:  # step first (backed up), check the weights, decide on everything at once
                params = self._params()
                self._backup.capture(params, self.optimizer)
                self.optimizer.step()
                flags[2] = ~torch.isfinite(norms.total_norm([p.detach() for p in params], 2.0, check=False))
            decision = torch.stack([f.to(loss.device) for f in flags])
            all_reduce_max_(decision, self.process_group)  # every rank takes the same decision
            bad = decision.tolist()  # the step's one host read
        reason = next((r for r, b in zip(_REASONS, bad) if b), None)
        if reason is None:
            if not check_params:
                self.optimizer.step()
            if self.scaler is not None:
                self.scaler.update()
            self._commit()
            report = StepReport(self.step_count, loss, stats, False, None, self._lr())
        else:
            if check_params:
                blown = self._nonfinite_names(grads=False) if reason == "nonfinite_params" else ()
                self._backup.restore(self.optimizer)
            report, error = self._bad_step(loss, stats, reason, closure, rng, blown if check_params else ())
            if self.scaler is not None:
                self.scaler.update()  # also before raising: the scaler must be ready for the next step
        if self.monitor is not None:  # before the gradients of a bad step are dropped: per-layer norms show them
            self.monitor.record(report.stats, loss=report.loss, skipped=report.skipped, reason=report.reason,
                                lr=report.lr, model=self.model, diagnosis=report.diagnosis, step=report.step)
        if report.skipped:
            self.optimizer.zero_grad(set_to_none=True)  # a bad step's gradients never reach a later step
            if error is not None:
                raise error
        return report

    def _commit(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.good_steps += 1
        self.consecutive_skips = 0
        if self.snapshot_every is not None and self.good_steps % self.snapshot_every == 0:
            self.snapshot()

    def _bad_step(
        self,
        loss: Tensor,
        stats: ClipStats,
        reason: str,
        closure: Callable[[], Tensor] | None,
        rng: Any,
        blown: tuple[str, ...],
    ) -> tuple[StepReport, Exception | None]:
        """Diagnose and apply the policy; the error to raise (if any) is returned, raised once the step is closed."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        diagnosis = self._diagnose(reason, closure, rng, blown)
        self.diagnosis = diagnosis
        rolled_back = False
        error: Exception | None = None
        spike = reason.endswith("spike")
        if self.on_nonfinite == "raise" and not spike:
            error = NonFiniteError(diagnosis)
        elif self.consecutive_skips > self.max_consecutive_skips:
            error = TrainingDivergedError(
                f"gradguard: {self.consecutive_skips} bad steps in a row (max_consecutive_skips="
                f"{self.max_consecutive_skips}); skipping is not helping", diagnosis)
        elif self.on_nonfinite == "rollback":
            self.rollback()
            rolled_back = True
        elif self.on_nonfinite == "warn":
            warnings.warn(str(diagnosis), RuntimeWarning, stacklevel=4)
        return StepReport(self.step_count, loss, stats, True, reason, self._lr(), diagnosis, rolled_back), error

    def _diagnose(
        self, reason: str, closure: Callable[[], Tensor] | None, rng: Any, blown: tuple[str, ...]
    ) -> Diagnosis:
        step = self.step_count
        if reason == "loss_spike":
            return Diagnosis(
                "forward", event="loss_spike", step=step,
                cause="loss spike: the loss jumped far above its recent range (a bad batch or the start of an "
                "instability)",
                fix="the step was skipped; if spikes repeat, lower the learning rate, check the data at this step, "
                "or clip more (lower max_norm)",
            )
        if reason == "grad_norm_spike":
            return Diagnosis(
                "backward", event="grad_norm_spike", step=step,
                cause="exploding gradients: the gradient norm jumped far above its recent range",
                fix="the step was skipped; clip gradients or lower max_norm (an adaptive clipper such as gg.ZClip "
                "reacts to spikes), or lower the learning rate",
            )
        if reason == "nonfinite_params":  # the weights the step would have made non-finite (it was undone)
            cause, fix = explain("step")
            return Diagnosis("step", parameters=blown, cause=cause, fix=fix, step=step)
        located = None
        if closure is not None and self.locate:
            after = _rng_state()
            if rng is not None:
                _set_rng_state(rng)
            scale = self.scaler.get_scale() if self.scaler is not None and self.scaler.is_enabled() else None
            try:
                located = locate_nonfinite(closure, self.model, loss_scale=scale, step=step)
            finally:
                _set_rng_state(after)
        if located is not None:
            return located
        if reason == "nonfinite_loss":
            cause, fix = explain("forward")
            return Diagnosis("forward", parameters=self._nonfinite_names(grads=True), cause=cause, fix=fix, step=step)
        cause, fix = explain("backward", scaled=self.scaler is not None)
        return Diagnosis("backward", parameters=self._nonfinite_names(grads=True), cause=cause, fix=fix, step=step)

    def _nonfinite_names(self, *, grads: bool) -> tuple[str, ...]:
        """Parameters with a non-finite gradient (or value): the failure path, where a host read is fine."""
        return nonfinite_names([(n, p.grad if grads else p.detach()) for n, p in self.model.named_parameters()])
