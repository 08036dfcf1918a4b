"""The Guard: a training step that never lets a non-finite value into the weights, and says where it came from.

One step, in order::

    closure() -> loss            (the Guard zeroes gradients first, and remembers the RNG state and the buffers)
    backward(loss)               (scaled when a GradScaler is given; not when the closure already called it)
    scaler.unscale_(optimizer)   (exactly once; clipping always sees unscaled gradients)
    clipper(model) -> ClipStats  (one pass over the gradients: the norm, which is also the finite flag)
    decide                       (loss finite, gradients finite, no spike: ONE host read, MAX-reduced across ranks)
    optimizer.step(), scheduler.step(), ema.update_parameters()   -- only if everything is finite
    scaler.update()              (always: a skipped overflow step still lowers the scale)

Every ``check_params_every`` steps the Guard also makes sure the step itself keeps the weights finite (a learning
rate that is too high turns finite gradients into non-finite weights), in one of two ways (``param_check``):

* ``"preflight"`` (the default for torch's optimizers): before the step, the optimizer's own update is dry-run on
  copies of a few percent of the parameters at a time (:mod:`gradguard.preflight`); its finite flag joins the
  decision. Extra memory: one chunk of copies, at most 1% of the parameter bytes (1 MiB for models under 100 MiB);
  the Guard's total stays under 5%.
  Extra time: about one more optimizer update over copies.
* ``"backup"`` (the default for an optimizer whose ``step`` gradguard does not know): a transactional copy of the
  parameters and the optimizer state is taken, the optimizer steps, the weights are checked and the copy restored if
  anything was non-finite. Extra memory: the parameter bytes plus the optimizer-state bytes (AdamW: 3x the
  parameter bytes), on the parameters' device.

Either way loss, gradient and parameter flags are read together — still one host read — so under ``"skip"`` and
``"rollback"`` the weights never hold a non-finite value.

A step that is not applied (skipped, or undone) changes nothing: besides the weights and the optimizer state, the
model's buffers (BatchNorm's running statistics and ``num_batches_tracked``, any registered buffer) are put back as
they were before the step's forward pass, and the clipper's and spike detectors' statistics are committed only for
applied steps. The buffers are copied before the closure runs, and again after each step for a following
``backward(); step()`` (whose forward pass the Guard does not see); they are small, and the parameters are not copied
for this.

Closures: both conventions work. A closure that returns the loss lets the Guard run backward (scaled by the
GradScaler); a ``torch.optim``-style closure that calls ``loss.backward()`` itself and returns the loss is detected
(its gradients are already there) and not backwarded twice. Under a GradScaler the closure must not call backward
(the scaler has to scale the loss first): the Guard raises and says so.

On a bad step with a closure, the step is replayed once under the op-level locator (same RNG state, parameters
untouched; the global RNG state is restored afterwards, so the random stream continues as if no replay had run) and
``guard.diagnosis`` names the stage, module and op; without a closure it gives the stage and the parameters with
non-finite gradients. Setting and restoring the global RNG state affects every thread: a Guard is not thread-safe,
and other threads must not draw random numbers while it steps.

Steps are numbered from 1: step 1 is the first step attempted (applied or not), in :class:`StepReport`, in
:class:`~gradguard.Diagnosis` and in what is passed to the monitor (:mod:`gradguard.policy`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gradguard import norms
from gradguard._checks import check_monitor
from gradguard._compat import already_unscaled, step_runs_only_its_update, uncompiled, unscale_once
from gradguard.backup import BufferBackup, RngState, Snapshot, StepBackup
from gradguard.clippers.base import Chain, Clipper, ClipStats, resolve_parameters
from gradguard.clippers.state import DeviceState, StateSpec, check_int, check_number
from gradguard.diagnose import (
    Diagnosis,
    explain,
    locate_nonfinite,
    nonfinite_names,
)
from gradguard.distributed import all_reduce_max_
from gradguard.fused import step_on_device
from gradguard.policy import (
    POLICIES,
    PolicyCounters,
    Reason,
    SkipPolicy,
    check_process_group,
    deferred_diagnosis,
    learning_rate,
)
from gradguard.preflight import Preflight, preflight_kind

__all__ = ["POLICIES", "Guard", "SpikeDetector", "StepReport"]

# one flag per reason, in the order they are read back
_REASONS = tuple(Reason)


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
        model: nn.Module | None,
        diagnosis: Diagnosis | None,
        step: int,
    ) -> Any: ...


class StepReport:
    """What happened in one guarded step.

    ``loss`` and ``stats`` hold device tensors (read them when you log); ``skipped``, ``reason`` and ``lr`` are host
    values (the step's single host read). ``reason`` is ``None`` for a good step, else one of ``"nonfinite_loss"``,
    ``"nonfinite_grad"``, ``"nonfinite_params"``, ``"loss_spike"``, ``"grad_norm_spike"``; ``rolled_back`` tells
    whether the last snapshot was restored.

    With ``Guard(host_sync=False)`` the decision stays on the device: ``applied`` (a 0-d bool device tensor) is
    there at once, and ``skipped`` / ``reason`` read it on the host the first time they are asked for (one read,
    yours to place: at a log interval, say).
    """

    __slots__ = ("_flags", "_reason", "_skipped", "diagnosis", "loss", "lr", "rolled_back", "stats", "step")
    __match_args__ = ("step", "loss", "stats", "skipped", "reason", "lr", "diagnosis", "rolled_back")
    step: int
    loss: Tensor | None
    stats: ClipStats
    lr: float | None
    diagnosis: Diagnosis | None
    rolled_back: bool
    _flags: Tensor | None
    _skipped: bool | None
    _reason: str | None

    def __init__(
        self,
        step: int,
        loss: Tensor | None,
        stats: ClipStats,
        skipped: bool | Tensor,
        reason: str | None = None,
        lr: float | None = None,
        diagnosis: Diagnosis | None = None,
        rolled_back: bool = False,
    ) -> None:
        values = {"step": step, "loss": loss, "stats": stats, "lr": lr, "diagnosis": diagnosis,
                  "rolled_back": rolled_back, "_reason": reason,
                  "_flags": skipped if isinstance(skipped, Tensor) else None,  # one flag per Reason, on the device
                  "_skipped": None if isinstance(skipped, Tensor) else bool(skipped)}
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"StepReport is read-only (cannot set {name!r})")

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepReport):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((self.step, id(self.loss), id(self.stats)))

    @property
    def applied(self) -> Tensor:
        """Whether the step was applied, as a 0-d bool tensor (on the device, never read)."""
        if self._flags is not None:
            return ~self._flags.any()
        device = self.loss.device if self.loss is not None else None
        return torch.tensor(not self._skipped, device=device)

    @property
    def skipped(self) -> bool:
        """Whether the step was not applied (skipped, undone or rolled back)."""
        if self._skipped is None:
            self._read()
        assert self._skipped is not None
        return self._skipped

    @property
    def reason(self) -> str | None:
        """Why the step was not applied (``None``: it was)."""
        if self._skipped is None:
            self._read()
        return self._reason

    def _read(self) -> None:
        assert self._flags is not None
        self._decided(self._flags.tolist())  # the deferred decision, read because it was asked for

    def _decided(self, bad: list[bool]) -> None:
        object.__setattr__(self, "_skipped", any(bad))
        object.__setattr__(self, "_reason", next((r.value for r, b in zip(_REASONS, bad) if b), None))

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

    def __repr__(self) -> str:
        decided = f"skipped={self._skipped}, reason={self._reason!r}" if self._skipped is not None else "deferred"
        return (f"StepReport(step={self.step}, loss={self.loss!r}, stats={self.stats!r}, {decided}, lr={self.lr}, "
                f"diagnosis={self.diagnosis!r}, rolled_back={self.rolled_back})")


class SpikeDetector(DeviceState):
    """Rolling z-score spike detection on the device (OLMo-core's rule: a value more than ``z`` standard deviations
    above the mean of the last ``window`` accepted values is a spike).

    .. math:: \\text{spike}_t = n_t \\ge n_{min} \\;\\wedge\\; \\frac{x_t - \\bar x}{s + 10^{-12}} > z

    over the last ``window`` finite, non-spike values (:math:`n_t` of them, at least ``min_history``). Spikes and
    non-finite values never enter the window. No host read. Its state (the window and the count of accepted values)
    uses the clippers' state mechanism (:class:`~gradguard.clippers.state.DeviceState`): it follows the data's
    device, and a rejected ``load_state_dict`` changes nothing.
    """

    _STATE_FIX = "construct the Guard with the spike_window the state was saved with"

    def __init__(self, z: float = 6.0, window: int = 128, min_history: int | None = None) -> None:
        self.z = check_number(z, "spike_z", low=0.0, low_open=True)
        self.window = check_int(window, "spike_window", low=2)
        history = min_history if min_history is not None else min(window, 32)
        self.min_history = check_int(history, "min_history", low=2)
        self.reset()

    def _state_spec(self) -> Mapping[str, StateSpec]:
        # losses may be negative: no lower bound on the values; NaN marks an empty slot
        return {"values": StateSpec((self.window,), torch.float32, math.nan, nan=True,
                                    fix=f"{self._STATE_FIX} (this one has spike_window={self.window})"),
                "count": StateSpec((), torch.long, 0.0, low=0.0)}

    def _check_state(self, state: Mapping[str, Any]) -> None:
        filled = int((~torch.isnan(state["values"])).sum()) if state["values"].device.type != "meta" else None
        count = int(state["count"]) if state["count"].device.type != "meta" else None
        if filled is not None and count is not None and filled != min(count, self.window):
            raise ValueError(
                f"SpikeDetector state_dict holds {filled} values but counts {count} accepted ones (expected "
                f"{min(count, self.window)} values); the checkpoint is corrupt"
            )

    def __call__(self, x: Tensor) -> Tensor:
        """Is ``x`` (0-d) a spike? Updates the window with ``x`` unless it is one (or non-finite)."""
        x = x.detach().float()
        state = self._state_on(x.device)
        vals, count = state["values"], state["count"]
        mean = torch.nanmean(vals)
        centred = torch.where(torch.isnan(vals), torch.zeros_like(vals), vals - mean)
        n = (~torch.isnan(vals)).sum()
        std = (centred.square().sum() / (n - 1).clamp(min=1)).sqrt()
        spike = (n >= self.min_history) & ((x - mean) / (std + 1e-12) > self.z)
        accept = torch.isfinite(x) & ~spike
        slot = (count % self.window).reshape(1)
        vals.index_put_((slot,), torch.where(accept, x, vals.index_select(0, slot)))
        count.add_(accept.long())
        return spike

    def check_state(self, state: Any, where: str = "state") -> None:
        """Raise a clear error unless ``state`` is a :meth:`state_dict` of a detector with this ``window``
        (nothing changes either way)."""
        try:
            self._prepare_load(state)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None


class Guard(PolicyCounters):
    """A guarded training step: clip, check, and never let a non-finite value into the weights.

    Args:
        model: the module being trained (its parameters are clipped and checked). Its trainable parameters
            (``requires_grad=True``) must all be in ``optimizer``: pass the sub-module an optimizer trains.
        optimizer: its optimizer.
        clipper: a gradguard clipper (``gg.NormClip(1.0)``, ``gg.ZClip()``, ...); ``None`` checks without clipping.
        scaler: a ``torch.amp.GradScaler``: the loss is scaled for backward, ``unscale_`` is called exactly once
            per step before clipping, and ``update()`` after every step (skipped or not).
        scheduler: a learning-rate scheduler, stepped only after a good step.
        on_nonfinite: ``"skip"`` (default), ``"rollback"`` (restore the last snapshot; needs ``snapshot_every``),
            ``"raise"`` (:class:`NonFiniteError`), or ``"warn"`` (skip with a warning). See
            :class:`gradguard.policy.SkipPolicy`, shared with ``gg.attach`` and the callbacks.
        max_consecutive_skips: more bad steps in a row than this raise :class:`TrainingDivergedError`; ``None``
            never raises.
        snapshot_every: take a snapshot of model, optimizer, scaler, scheduler (and EMA) every this many good steps
            (CPU memory by default); ``None`` takes none. :meth:`load_state_dict` refreshes it.
        check_params_every: make sure ``optimizer.step()`` keeps the parameters finite every this many steps
            (``None``: never; the gradients and the loss are checked on every step regardless).
        monitor: an object with ``record(stats, **fields)`` (``gg.Monitor``), called after every step with the
            step's 1-based number.
        spike_z: if set, a loss or gradient norm more than ``spike_z`` standard deviations above its rolling mean
            over ``spike_window`` steps is treated as a bad step (OLMo-core uses 6 over 128).
        ema: an ``torch.optim.swa_utils.AveragedModel`` (or anything with ``update_parameters(model)``) updated
            only after good steps.
        locate: replay bad steps under the op-level locator when a closure is available.
        snapshot_device: where snapshots live (``"cpu"``).
        param_check: how ``check_params_every`` checks a step: ``"preflight"`` (dry-run the update on copies,
            chunk by chunk, before stepping: extra memory at most 1% of the parameter bytes, or 1 MiB; torch.optim
            optimizers only), ``"backup"`` (copy parameters and optimizer state, step, restore if the weights went
            non-finite: extra memory = parameter + optimizer-state bytes, e.g. 3x the parameter bytes for AdamW), or
            ``"auto"`` (preflight where the optimizer allows it, else backup). See :mod:`gradguard.preflight`.
        process_group: the group whose ranks hold disjoint gradients of one model (pipeline stages, experts):
            gradient norms are reduced over it (it is set on the clipper). The skip decision is always MAX-reduced
            over the whole world, so every rank skips together. The same meaning as in ``gg.attach`` and the
            callbacks.
        verbose: log the first bad step of each reason (with its diagnosis) and a summary every ``summary_every``
            steps on the ``"gradguard"`` logger; ``False`` silences both.
        summary_every: steps between those summaries.
        host_sync: ``False`` decides on the device: no host read in a step at all (see "Deciding on the device"
            below). ``True`` (default): one host read per step, which lets a bad step be replayed, diagnosed down to
            the op, raised or rolled back at once.
        settle_every: with ``host_sync=False``, read the deferred decisions every this many steps (one host read):
            counters, log messages, monitor records, ``max_consecutive_skips``. :meth:`settle` does it on demand.

    Deciding on the device (``host_sync=False``): the skip flags (loss, gradients, the preflight's weight check,
    spikes) are combined on the device into ``ok``, and the step is applied only where ``ok``: fused Adam, AdamW,
    SGD and Adagrad skip inside their kernel (``found_inf``); any other optimizer takes a masked update (one copy of
    the parameters and optimizer state, then ``where(ok, new, old)``: that copy's memory, and its time, is the
    price). Clipper and spike statistics and the model's buffers are kept or put back with ``where``. The CPU takes
    the accelerator's path (:func:`gradguard.norms.device_path`), so the promise is tested on CPU: 0 host reads over
    100 steps. What changes: the scheduler and the EMA step on every step (a skipped step still advances the
    schedule, and averages the unchanged weights again); gradients are dropped after every step; ``"raise"`` and
    ``"rollback"`` and snapshots are not available (they act on the host before the next step); a bad step gets no
    replay: its :class:`~gradguard.Diagnosis` names the reason and stage only, when settled; the monitor receives the
    steps when they are settled, without per-layer records; :class:`StepReport` defers ``skipped`` and ``reason``.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0), verbose=False)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> report = guard.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> report.step, report.skipped
        (1, False)
        >>> bad = guard.step(lambda: torch.nn.functional.mse_loss(model(x), y) * float("nan"))
        >>> bad.step, bad.skipped, bad.reason, guard.diagnosis.stage
        (2, True, 'nonfinite_loss', 'forward')
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clipper: Clipper | None = None,
        scaler: torch.amp.GradScaler | None = None,
        scheduler: Any = None,
        on_nonfinite: str = "skip",
        max_consecutive_skips: int | None = 10,
        snapshot_every: int | None = None,
        check_params_every: int | None = 1,
        monitor: _Recorder | None = None,
        *,
        spike_z: float | None = None,
        spike_window: int = 128,
        ema: Any = None,
        locate: bool = True,
        snapshot_device: str | torch.device = "cpu",
        param_check: str = "auto",
        process_group: Any = None,
        verbose: bool = True,
        summary_every: int = 100,
        host_sync: bool = True,
        settle_every: int = 100,
    ) -> None:
        _check_parts(model, optimizer, clipper, scaler, scheduler, ema)
        policy = SkipPolicy(on_nonfinite, max_consecutive_skips, verbose=verbose, summary_every=summary_every)
        self.snapshot_every = None if snapshot_every is None else check_int(snapshot_every, "snapshot_every", low=1)
        if on_nonfinite == "rollback" and self.snapshot_every is None:
            raise ValueError('on_nonfinite="rollback" needs snapshots: pass snapshot_every=N (e.g. 100)')
        self.check_params_every = (
            None if check_params_every is None else check_int(check_params_every, "check_params_every", low=1)
        )
        check_monitor(monitor)
        resolved_check = _resolve_param_check(param_check, optimizer)
        self.settle_every = _check_deferred(host_sync, settle_every, on_nonfinite, self.snapshot_every,
                                            self.check_params_every, resolved_check, optimizer, clipper)
        self._host_sync = host_sync
        check_process_group(process_group)
        _check_ownership(model, optimizer)
        try:
            device = torch.device(snapshot_device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(
                f"snapshot_device must name a device (e.g. 'cpu' or 'cuda:0'), got {snapshot_device!r}"
            ) from e
        loss_spikes = None if spike_z is None else SpikeDetector(spike_z, spike_window)
        norm_spikes = None if spike_z is None else SpikeDetector(spike_z, spike_window)
        if clipper is not None and process_group is not None:
            clipper.set_process_group(process_group)
        self.model = model
        self.optimizer = optimizer
        self.clipper = clipper
        self.scaler = scaler
        self.scheduler = scheduler
        self.policy = policy
        self.monitor = monitor
        self.ema = ema
        self.locate = locate
        self.snapshot_device = device
        self.process_group = process_group
        self._loss_spikes = loss_spikes
        self._norm_spikes = norm_spikes
        self.diagnosis: Diagnosis | None = None
        self._pending_loss: list[Tensor] = []
        self.param_check = resolved_check
        self._auto_check = param_check == "auto"
        self._backup = StepBackup()
        self._preflight = Preflight()
        self._unrecorded: list[StepReport] = []  # host_sync=False: steps the monitor gets when they are settled
        policy.settled_rows = {}  # the decisions the policy reads, kept for those reports (one read for both)
        self._buffers = BufferBackup()
        self._buffers.capture(model)
        self._snapshot = Snapshot(self.snapshot_device)
        self._snapshot_due = False  # set by load_state_dict: refresh the snapshot before the next step
        if self.snapshot_every is not None:
            self.snapshot()

    # ----------------------------------------------------------------------------- the policy's settings, counters
    @property
    def step_count(self) -> int:
        """Steps attempted: the last step's number (steps are 1-based)."""
        return self.policy.steps

    @property
    def good_steps(self) -> int:
        """Steps applied."""
        return self.policy.good_steps

    @property
    def host_sync(self) -> bool:
        """Whether each step reads its decision on the host (fixed at construction: ``host_sync=False`` is checked
        against the policy, snapshots and the weight check then)."""
        return self._host_sync

    # ---------------------------------------------------------------------------------------------- public API
    def backward(self, loss: Tensor) -> None:
        """Backward ``loss`` (scaled when a GradScaler is given) and remember its finite flag for :meth:`step`.

        May be called several times before :meth:`step` (gradient accumulation). The buffers a step that is not
        applied restores are those of the end of the previous :meth:`step` (or of construction): with this manual
        convention the forward pass has run before the Guard sees the step. Prefer ``step(closure)``.
        """
        self._check_loss(loss)
        if not loss.requires_grad:
            raise ValueError(
                "loss does not require grad, so there is nothing to backward: was it computed under "
                "torch.no_grad(), detached, or from frozen parameters only? Compute it from a forward pass through "
                "the model's trainable parameters"
            )
        self._pending_loss.append(loss.detach().reshape(()))
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()  # type: ignore[no-untyped-call]

    def step(self, closure: Callable[[], Tensor] | None = None) -> StepReport:
        """One guarded step.

        With ``closure`` (the forward pass, returning the loss) the Guard zeroes the gradients, runs the closure,
        and runs backward itself, unless the closure already did (a ``torch.optim``-style closure that calls
        ``loss.backward()``: detected because the gradients are set when it returns). Without a closure, call
        :meth:`backward` first.
        """
        if closure is not None:
            if not callable(closure):
                raise TypeError(
                    f"closure must be callable (forward pass returning the loss), got {type(closure).__name__}"
                )
            if self._pending_loss:
                raise RuntimeError("Guard.backward() was called before step(closure); use one way per step")
        elif not self._pending_loss:
            raise RuntimeError("Guard.step() without a closure needs Guard.backward(loss) first")
        if self._snapshot_due:
            self.snapshot()
        rng = None
        own_backward = False
        if closure is not None:
            rng = RngState() if self.locate and self.host_sync else None  # no replay on the device path (and a
            # CUDA generator state would be copied to the host)
            self._buffers.capture(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            try:
                own_backward = self._run_closure(closure)
            except BaseException:
                self._buffers.restore()  # a failed call leaves the buffers and gradients as they were
                self.optimizer.zero_grad(set_to_none=True)
                self._pending_loss = []
                raise
        losses, self._pending_loss = self._pending_loss, []
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        try:
            return self._step(loss, closure, rng, own_backward)
        except BaseException:
            self._abandon_scaler_step()
            raise

    def _abandon_scaler_step(self) -> None:
        """After an exception inside a step: a GradScaler left unscaled (``unscale_`` done, ``update`` not) is
        updated, so the next step unscales its own gradients instead of taking them as already unscaled."""
        if self.scaler is not None and self.scaler.is_enabled() and already_unscaled(self.scaler, self.optimizer):
            self.scaler.update()

    def snapshot(self) -> None:
        """Take a snapshot now (model, optimizer, scaler, scheduler, EMA, clipper) for ``"rollback"``."""
        self._snapshot.take(self._stateful_parts())
        self._snapshot_due = False

    def rollback(self) -> None:
        """Restore the last snapshot (model, optimizer, scaler, scheduler, EMA, clipper state).

        After :meth:`load_state_dict` and before the next step, the snapshot is the resumed state itself."""
        if self._snapshot_due:
            self.snapshot()
        self._snapshot.restore(self._stateful_parts())

    def _stateful_parts(self) -> dict[str, Any]:
        """What a rollback restores: every part of the run with a ``state_dict``."""
        parts = {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler, "scheduler": self.scheduler,
                 "ema": self.ema if isinstance(self.ema, nn.Module) else None, "clipper": self.clipper}
        return {k: v for k, v in parts.items() if v is not None and hasattr(v, "state_dict")}

    def state_dict(self) -> dict[str, Any]:
        """What the Guard needs to resume exactly; the model, optimizer, scheduler and scaler are checkpointed as
        usual, by their own ``state_dict``.

        ``{"policy": SkipPolicy.state_dict()`` (counters: ``steps``, ``good_steps``, ``skipped_steps``,
        ``consecutive_skips``, ``skipped_by_reason``), ``"clipper": clipper.state_dict()`` (``{}`` without one),
        ``"spikes": None`` without spike detection, else ``{"window": spike_window, "loss": ..., "norm": ...}``
        (the two detectors' rolling windows)``}``. Snapshots are not saved: they are retaken on resume.
        """
        spikes = None
        if self._loss_spikes is not None and self._norm_spikes is not None:
            spikes = {"window": self._loss_spikes.window, "loss": self._loss_spikes.state_dict(),
                      "norm": self._norm_spikes.state_dict()}
        return {
            "policy": self.policy.state_dict(),
            "clipper": self.clipper.state_dict() if self.clipper is not None else {},
            "spikes": spikes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Everything is checked first: a wrong state raises and changes nothing.

        Resume in this order: load the model, optimizer (scheduler, scaler) states, then the Guard's. The rollback
        snapshot is refreshed from the model and optimizer as they are at the next step (or at :meth:`rollback`),
        so a rollback after resuming restores the resumed state or a later one, never the weights the Guard was
        constructed with.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping (from Guard.state_dict()), got {type(state).__name__}")
        expected = {"policy", "clipper", "spikes"}
        if set(state) != expected:
            raise ValueError(
                f"Guard state does not match: missing {sorted(expected - set(state))}, unknown "
                f"{sorted(set(state) - expected)}; pass what Guard.state_dict() returned"
            )
        policy = SkipPolicy.check_state(state["policy"], "state['policy']")
        spikes = state["spikes"]
        if self._loss_spikes is None or self._norm_spikes is None:
            if spikes is not None:
                raise ValueError("the state was saved by a Guard with spike detection (spike_z=...) but this Guard "
                                 "has spike_z=None; construct it with the spike_z and spike_window of the run")
        else:
            if not isinstance(spikes, Mapping) or set(spikes) != {"window", "loss", "norm"}:
                raise ValueError(
                    "state['spikes'] must be {'window', 'loss', 'norm'} from a Guard with spike detection, got "
                    f"{spikes!r}; construct the Guard with the spike_z of the run that saved it"
                )
            if spikes["window"] != self._loss_spikes.window:
                raise ValueError(
                    f"the state was saved with spike_window={spikes['window']!r} but this Guard has spike_window="
                    f"{self._loss_spikes.window}; construct it with spike_window={spikes['window']!r}"
                )
            self._loss_spikes.check_state(spikes["loss"], "state['spikes']['loss']")
            self._norm_spikes.check_state(spikes["norm"], "state['spikes']['norm']")
        if not isinstance(state["clipper"], Mapping):
            raise TypeError(f"state['clipper'] must be a mapping, got {type(state['clipper']).__name__}")
        if self.clipper is None and state["clipper"]:
            raise ValueError("the state holds a clipper's statistics but this Guard has no clipper; pass the "
                             "clipper the run was saved with")
        if self.clipper is not None:
            self.clipper.load_state_dict(state["clipper"])  # validates before it changes anything
        # nothing below can fail
        self.policy.apply_state(policy)
        if self._loss_spikes is not None and self._norm_spikes is not None:
            self._loss_spikes.load_state_dict(spikes["loss"])
            self._norm_spikes.load_state_dict(spikes["norm"])
        self._pending_loss = []
        self._unrecorded = []  # steps of the run before the load: their flags were dropped with the policy's
        self.policy.settled_rows = {}
        self._buffers.capture(self.model)
        self._snapshot_due = self.snapshot_every is not None

    # ------------------------------------------------------------------------------------------------ internals
    def _check_loss(self, loss: Any) -> None:
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (one element), got shape {tuple(loss.shape)}; reduce it first")

    def _run_closure(self, closure: Callable[[], Tensor]) -> bool:
        """Run the closure (and backward unless it did); returns whether it called backward itself."""
        with torch.enable_grad():
            loss = closure()
        self._check_loss(loss)
        own_backward = any(p.grad is not None for p in self._params())  # host-side: no synchronisation
        if not own_backward:
            self.backward(loss)
            return False
        if self.scaler is not None and self.scaler.is_enabled():
            raise RuntimeError(
                "the closure called loss.backward() itself, but with a GradScaler the Guard must scale the loss "
                "before backward: return the loss from the closure without calling backward() (the Guard runs "
                "the scaled backward)"
            )
        self._pending_loss.append(loss.detach().reshape(()))
        return True

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _step(
        self, loss: Tensor, closure: Callable[[], Tensor] | None, rng: Any, own_backward: bool
    ) -> StepReport:
        if not self.host_sync:
            return self._step_on_device(loss)
        check = self._check_now(self.policy.steps + 1)  # before anything changes: it may refuse the step
        step = self.policy.start()
        if self.scaler is not None:
            unscale_once(self.scaler, self.optimizer)
        # statistics as they were: put back if the step is not applied (small device clones, no host read)
        clipper_before = self.clipper.state_dict() if self.clipper is not None else None
        spikes_before = [d.state_dict() for d in (self._loss_spikes, self._norm_spikes) if d is not None]
        try:
            with torch.no_grad():
                stats = self._clip_or_measure(loss)
                bad = self._decide(loss, stats, check)
        except BaseException:  # e.g. a parameter layout the clipper or the check cannot handle: statistics as before
            self._put_back_statistics(clipper_before, spikes_before)
            raise
        reason = next((r for r, b in zip(_REASONS, bad) if b), None)
        error: Exception | None = None
        if reason is None:
            if check != "backup":  # a backup-checked step has stepped already
                self.optimizer.step()
            if self.scaler is not None:
                self.scaler.update()
            self._commit()
            report = StepReport(step, loss, stats, False, None, learning_rate(self.optimizer))
        else:
            report, error = self._refuse(reason, step, loss, stats, closure, rng, own_backward, check,
                                         clipper_before, spikes_before)
        if self.monitor is not None:  # before the gradients of a bad step are dropped: per-layer norms show them
            self.monitor.record(report.stats, loss=report.loss, skipped=report.skipped, reason=report.reason,
                                lr=report.lr, model=self.model, diagnosis=report.diagnosis, step=report.step)
        self._buffers.capture(self.model)  # what a later manual-convention step (backward(), step()) restores
        if report.skipped:
            self.optimizer.zero_grad(set_to_none=True)  # a bad step's gradients never reach a later step
            if error is not None:
                raise error
        return report

    def _clip_or_measure(self, loss: Tensor) -> ClipStats:
        """The clipper's stats, or (without a clipper) the unclipped total norm, on the device."""
        if self.clipper is not None:
            return self.clipper(self.model)
        grads = [i.grad for i in resolve_parameters(self.model)]
        norm = norms.total_norm(grads, 2.0, check=False, process_group=self.process_group) if grads else None
        return ClipStats.unclipped(norm=norm, device=loss.device)

    def _check_now(self, step: int) -> str | None:
        """How step ``step`` checks the weights: ``None``, ``"preflight"`` or ``"backup"``. A preflight dry-runs the
        class's update only, so while the optimizer has step hooks (or a ``step`` replaced on the instance) that could
        change what the real step does, ``"auto"`` takes the backup; an explicit ``"preflight"`` (or
        ``host_sync=False``) raises instead, before anything changes."""
        if self.check_params_every is None or step % self.check_params_every:
            return None
        if self.param_check == "backup" or step_runs_only_its_update(self.optimizer):
            return self.param_check
        if self._auto_check and self.host_sync:
            return "backup"
        raise ValueError(
            f"{type(self.optimizer).__name__} has step hooks (register_step_pre_hook/post_hook, or global ones) or a "
            "step replaced on the instance, which a preflight cannot run: they may change what the real step does. "
            'Remove them, or use param_check="backup" (host_sync=True), or check_params_every=None'
        )

    def _decide(self, loss: Tensor, stats: ClipStats, check: str | None) -> list[bool]:
        """Every skip flag, in ``_REASONS`` order, read in the step's one host read (max over ranks).
        With ``check`` the step is dry-run first (preflight), or, with a backup, taken first and checked."""
        bad: list[bool] = self._flags(loss, stats, check).tolist()  # the step's one host read
        return bad

    def _flags(self, loss: Tensor, stats: ClipStats, check: str | None) -> Tensor:
        """The skip flags, one per :class:`Reason` in order, stacked on the device and MAX-reduced over the world."""
        flags = [~torch.isfinite(loss), ~stats.finite]
        flags.append(torch.zeros((), dtype=torch.bool, device=loss.device))
        flags.append(self._loss_spikes(loss) if self._loss_spikes else torch.zeros_like(flags[0]))
        flags.append(self._norm_spikes(stats.norm) if self._norm_spikes else torch.zeros_like(flags[0]))
        if check == "preflight":
            flags[2] = ~self._preflight(self.optimizer, self._params())
        elif check == "backup":  # step first (backed up), check the weights, decide on everything at once
            params = self._params()
            self._backup.capture(params, self.optimizer)
            self.optimizer.step()
            flags[2] = ~torch.isfinite(norms.total_norm([p.detach() for p in params], 2.0, check=False))
        decision = torch.stack([f.to(loss.device) for f in flags])
        all_reduce_max_(decision)  # every rank of the world takes the same decision
        return decision

    def _step_on_device(self, loss: Tensor) -> StepReport:
        """``host_sync=False``: clip, decide and skip on the device, keep or put back the statistics and buffers
        with ``where``; the decision is read later, by :meth:`settle`."""
        check = self._check_now(self.policy.steps + 1)  # before anything changes: it may refuse the step
        detectors = [d for d in (self._loss_spikes, self._norm_spikes) if d is not None]
        if self.scaler is not None:
            unscale_once(self.scaler, self.optimizer)
        clipper_before = self.clipper.state_dict() if self.clipper is not None else {}
        spikes_before = [d.state_dict() for d in detectors]
        params = [p for p in self._params() if p.grad is not None]
        with torch.no_grad(), norms.device_path():
            stats = self._clip_or_measure(loss)
            bad = self._flags(loss, stats, check)
            ok = ~bad.any()
            step_on_device(self.optimizer, ok, params=params)
            if self.clipper is not None:
                self.clipper.keep_where(ok, clipper_before)
            for det, before in zip(detectors, spikes_before):
                det.keep_where(ok, before)
            self._buffers.restore_where(ok)
        if self.scaler is not None:
            self.scaler.update()  # reads the overflow flag unscale_ left on the device
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        step = self.policy.defer(bad)
        report = StepReport(step, loss, stats, bad, lr=learning_rate(self.optimizer))
        self._unrecorded.append(report)  # settled (diagnosed, given to the monitor) by settle()
        self._buffers.capture(self.model)
        self.optimizer.zero_grad(set_to_none=True)  # whether this step was bad is not known on the host
        if step % self.settle_every == 0:
            self.settle()
        return report

    def settle(self) -> None:
        """With ``host_sync=False``: read the deferred decisions (one host read for all of them), count them, log
        them as the policy does, give the steps to the monitor, and raise :class:`TrainingDivergedError` if more
        than ``max_consecutive_skips`` bad steps came in a row. Called every ``settle_every`` steps; call it at the
        end of training too. Nothing to do (no read) when nothing is pending."""
        records, self._unrecorded = self._unrecorded, []
        error = self.policy.settle(stacklevel=2)  # one host read for every pending step (none if a counter read did)
        rows, self.policy.settled_rows = self.policy.settled_rows or {}, {}
        for report in records:  # the policy read every pending step, a counter read included: no second read
            if report.step in rows:
                report._decided(rows[report.step])
        for report in records:
            diagnosis = None
            if report.skipped:
                diagnosis = deferred_diagnosis(Reason(report.reason), report.step)
                self.diagnosis = diagnosis
                object.__setattr__(report, "diagnosis", diagnosis)
            if self.monitor is not None:
                self.monitor.record(report.stats, loss=report.loss, skipped=report.skipped, reason=report.reason,
                                    lr=report.lr, model=None, diagnosis=diagnosis, step=report.step)
        if error is not None:
            raise error

    def _refuse(
        self,
        reason: Reason,
        step: int,
        loss: Tensor,
        stats: ClipStats,
        closure: Callable[[], Tensor] | None,
        rng: Any,
        own_backward: bool,
        check: str | None,
        clipper_before: dict[str, Any] | None,
        spikes_before: list[dict[str, Any]],
    ) -> tuple[StepReport, Exception | None]:
        """A step not applied: undo the update (if already stepped) and the statistics, diagnose it, apply the
        policy (the error to raise, or ``None``), and roll back when asked."""
        blown: tuple[str, ...] = ()
        if check == "preflight" and reason is Reason.NONFINITE_PARAMS:
            would_blow = {id(p) for p in self._preflight.nonfinite(self.optimizer, self._params())}
            blown = tuple(n for n, p in uncompiled(self.model).named_parameters() if id(p) in would_blow)
        elif check == "backup":
            blown = self._nonfinite_names(grads=False) if reason is Reason.NONFINITE_PARAMS else ()
            self._backup.restore(self.optimizer)
        diagnosis = self._diagnose(reason, closure, rng, blown, step, own_backward)
        self.diagnosis = diagnosis
        self._buffers.restore()  # the forward pass's BatchNorm statistics (and any buffer) are undone
        self._put_back_statistics(clipper_before, spikes_before)  # statistics commit only for applied steps
        error = self.policy.reject(reason, diagnosis, stacklevel=4)  # points at the caller of guard.step
        rolled_back = False
        if error is None and self.on_nonfinite == "rollback":
            self.rollback()
            rolled_back = True
        report = StepReport(step, loss, stats, True, reason.value, learning_rate(self.optimizer), diagnosis,
                            rolled_back)
        if self.scaler is not None:
            self.scaler.update()  # also before raising: the scaler must be ready for the next step
        return report, error

    def _put_back_statistics(self, clipper_before: dict[str, Any] | None, spikes_before: list[dict[str, Any]]) -> None:
        """The clipper's and the spike detectors' statistics as they were before this step."""
        if self.clipper is not None and clipper_before is not None:
            self.clipper.load_state_dict(clipper_before)
        for det, before in zip((d for d in (self._loss_spikes, self._norm_spikes) if d is not None), spikes_before):
            det.load_state_dict(before)

    def _commit(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.policy.accept()
        if self.snapshot_every is not None and self.good_steps % self.snapshot_every == 0:
            self.snapshot()

    def _diagnose(
        self,
        reason: Reason,
        closure: Callable[[], Tensor] | None,
        rng: Any,
        blown: tuple[str, ...],
        step: int,
        own_backward: bool,
    ) -> Diagnosis:
        if reason.is_spike:  # nothing to locate: the values are finite
            return deferred_diagnosis(reason, step)
        if reason is Reason.NONFINITE_PARAMS:  # the weights the step would have made non-finite (it was undone)
            cause, fix = explain("step")
            return Diagnosis("step", parameters=blown, cause=cause, fix=fix, step=step)
        located = None
        if closure is not None and self.locate:
            after = RngState()
            if rng is not None:
                rng.restore()  # the replay draws the same random numbers (dropout masks) as the step
            scale = self.scaler.get_scale() if self.scaler is not None and self.scaler.is_enabled() else None
            try:
                located = locate_nonfinite(closure, uncompiled(self.model), backward=not own_backward, loss_scale=scale,
                                           step=step)
            finally:
                after.restore()  # and the stream continues as if there had been no replay
        if located is not None:
            return located
        if reason is Reason.NONFINITE_LOSS:
            cause, fix = explain("forward")
            return Diagnosis("forward", parameters=self._nonfinite_names(grads=True), cause=cause, fix=fix, step=step)
        cause, fix = explain("backward", scaled=self.scaler is not None)
        return Diagnosis("backward", parameters=self._nonfinite_names(grads=True), cause=cause, fix=fix, step=step)

    def _nonfinite_names(self, *, grads: bool) -> tuple[str, ...]:
        """Parameters with a non-finite gradient (or value): the failure path, where a host read is fine."""
        named = uncompiled(self.model).named_parameters()  # the user's names, also around a torch.compile wrapper
        return nonfinite_names([(n, p.grad if grads else p.detach()) for n, p in named])


def _check_parts(model: Any, optimizer: Any, clipper: Any, scaler: Any, scheduler: Any, ema: Any) -> None:
    """TypeError naming the argument for each part of the run that is not what the Guard needs."""
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
    if ema is not None and not callable(getattr(ema, "update_parameters", None)):
        raise TypeError("ema must have update_parameters(model) (e.g. torch.optim.swa_utils.AveragedModel)")


def _check_deferred(
    host_sync: Any,
    settle_every: Any,
    on_nonfinite: str,
    snapshot_every: int | None,
    check_params_every: int | None,
    param_check: str,
    optimizer: torch.optim.Optimizer,
    clipper: Clipper | None,
) -> int:
    """``settle_every`` checked; with ``host_sync=False`` also what deciding on the device cannot do."""
    if not isinstance(host_sync, bool):
        raise TypeError(f"host_sync must be True or False, got {host_sync!r}")
    settle = check_int(settle_every, "settle_every", low=1)
    if host_sync:
        return settle
    if on_nonfinite not in ("skip", "warn"):
        raise ValueError(
            f'host_sync=False decides on the device, but on_nonfinite="{on_nonfinite}" must act on the host before the '
            'next step (raise the error, restore the snapshot): use on_nonfinite="skip" or "warn", or host_sync=True'
        )
    if snapshot_every is not None:
        raise ValueError("host_sync=False takes no snapshots (their cadence counts good steps on the host): pass "
                         "snapshot_every=None, or host_sync=True")
    if check_params_every is not None and param_check != "preflight":
        raise ValueError(
            f"host_sync=False checks the weights by a preflight (deciding before the step), but "
            f"{type(optimizer).__name__}'s step cannot be dry-run (param_check={param_check!r}): pass "
            "check_params_every=None, or host_sync=True"
        )
    if clipper is not None and not _keeps_on_device(clipper):
        raise ValueError(
            f"host_sync=False puts a rejected step's clipper statistics back on the device, which needs the clipper's "
            f"state in declared device tensors (gradguard.clippers.state.DeviceState); {type(clipper).__name__} has "
            "its own state_dict: use host_sync=True"
        )
    return settle


def _keeps_on_device(clipper: Clipper) -> bool:
    """Whether ``keep_where`` covers all of the clipper's state (the DeviceState mechanism, or a Chain of such)."""
    if isinstance(clipper, Chain):
        return all(_keeps_on_device(c) for c in clipper.clippers)
    return type(clipper).state_dict is DeviceState.state_dict and type(clipper).keep_where is DeviceState.keep_where


def _resolve_param_check(param_check: Any, optimizer: torch.optim.Optimizer) -> str:
    """``"preflight"`` or ``"backup"`` from the ``param_check`` argument (``"auto"``: preflight where it can run)."""
    if param_check not in ("auto", "preflight", "backup"):
        raise ValueError(f'param_check must be "auto", "preflight" or "backup", got {param_check!r}')
    kind = preflight_kind(optimizer)
    if param_check == "preflight" and kind is None:
        raise ValueError(
            f'param_check="preflight" dry-runs torch.optim updates, but {type(optimizer).__name__}.step is not one of '
            'them (a custom optimizer, a subclass overriding step, or a wrapper); use param_check="backup" (a copy of '
            "parameters and optimizer state per checked step) or \"auto\""
        )
    if param_check == "auto":
        return "preflight" if kind is not None else "backup"
    return str(param_check)


def _check_ownership(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer must train every trainable parameter of the model, and there must be one."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"model ({type(model).__name__}) has no trainable parameters: every parameter has requires_grad=False "
            "(or it has none), so there is nothing to guard. Unfreeze what you train (p.requires_grad_(True)) or "
            "pass the module that holds the trainable parameters"
        )
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in trainable if id(p) not in owned]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ValueError(
            f"the optimizer does not own these trainable parameters of model: {shown}. The Guard clips and checks "
            "model's parameters but steps the optimizer's: build the optimizer from model.parameters(), freeze "
            "the others (requires_grad_(False)), or pass as model the sub-module this optimizer trains"
        )
