"""The one skip policy shared by :class:`gradguard.Guard`, :func:`gradguard.attach` and the trainer callbacks.

A :class:`SkipPolicy` owns everything about *what happens* on a bad step — the step counters, the policy name, the
consecutive-skip limit, the errors, the report to the log — while its owner decides *whether* a step is bad and
applies the skip. So the Guard, ``gg.attach``, and the Lightning and Hugging Face callbacks take the same arguments,
raise the same errors, number steps the same way and checkpoint the same ``state_dict``.

Step numbering: steps are 1-based. :meth:`SkipPolicy.start` is called once per optimizer step attempted, before
anything is decided, and returns the step's number: step 1 is the first step attempted (skipped or not). The Guard's
:class:`~gradguard.StepReport`, its :class:`~gradguard.Diagnosis` and what is passed to a monitor all use it.

Speaking up: unless ``verbose=False``, the first bad step for each :class:`Reason` is logged at ``WARNING`` on the
``"gradguard"`` logger with its diagnosis, and every ``summary_every`` steps a one-line summary of the bad steps
since the last summary follows (none when there were none). Python's logging prints warnings to stderr even when
nothing is configured, so a default ``on_nonfinite="skip"`` is never silent. ``on_nonfinite="warn"`` additionally
issues a :class:`RuntimeWarning` for every bad step.

Deferred counting (no host read per step): an owner that decides on the device calls :meth:`SkipPolicy.defer` with
the step's flags, a device bool tensor of one flag per :class:`Reason`, instead of :meth:`~SkipPolicy.start` +
:meth:`~SkipPolicy.accept` / :meth:`~SkipPolicy.reject`. The flags stay on the device until
:meth:`SkipPolicy.settle` reads every pending step's flags in one host read and folds them into the counters in
order, exactly as the eager calls would have (the same counters, logging and warnings, only later). Reading a counter
settles first, so a host read happens when, and only when, someone reads them. Memory: one byte per flag per pending
step on the device (5 bytes a step; the flags are stacked into blocks of 256 steps).
"""

from __future__ import annotations

import logging
import numbers
import warnings
from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradguard.clippers.state import check_int
from gradguard.diagnose import Diagnosis, NonFiniteError, TrainingDivergedError, explain

__all__ = [
    "POLICIES",
    "PolicyCounters",
    "Reason",
    "SkipPolicy",
    "check_process_group",
    "deferred_diagnosis",
    "learning_rate",
]

POLICIES = ("skip", "rollback", "raise", "warn")

logger = logging.getLogger("gradguard")


class Reason(str, Enum):
    """Why a step was not applied. A ``str`` enum: ``Reason.NONFINITE_GRAD == "nonfinite_grad"``.

    The order is the order in which the Guard reads its flags (the first that is set names the step).
    """

    NONFINITE_LOSS = "nonfinite_loss"
    NONFINITE_GRAD = "nonfinite_grad"
    NONFINITE_PARAMS = "nonfinite_params"
    LOSS_SPIKE = "loss_spike"
    GRAD_NORM_SPIKE = "grad_norm_spike"

    @property
    def is_spike(self) -> bool:
        """A spike (finite but far above its recent range): skipped, never raised as non-finite."""
        return self in (Reason.LOSS_SPIKE, Reason.GRAD_NORM_SPIKE)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


_COUNTERS = ("steps", "good_steps", "skipped_steps", "consecutive_skips")
_REASONS = tuple(Reason)
_BLOCK = 256  # pending flag rows are stacked into one device tensor per this many steps (bounded host objects)


def deferred_diagnosis(reason: Reason, step: int) -> Diagnosis:
    """The :class:`~gradguard.Diagnosis` of a step that was decided on the device and read later
    (:meth:`SkipPolicy.settle`): only the reason is known then (the gradients have moved on), so it names the stage
    and the usual cause and fix, not the op or the parameters."""
    if reason is Reason.LOSS_SPIKE:
        return Diagnosis(
            "forward", event="loss_spike", step=step,
            cause="loss spike: the loss jumped far above its recent range (a bad batch or the start of an "
            "instability)",
            fix="the step was skipped; if spikes repeat, lower the learning rate, check the data at this step, "
            "or clip more (lower max_norm)",
        )
    if reason is Reason.GRAD_NORM_SPIKE:
        return Diagnosis(
            "backward", event="grad_norm_spike", step=step,
            cause="exploding gradients: the gradient norm jumped far above its recent range",
            fix="the step was skipped; clip gradients or lower max_norm (an adaptive clipper such as gg.ZClip "
            "reacts to spikes), or lower the learning rate",
        )
    stage = {Reason.NONFINITE_LOSS: "forward", Reason.NONFINITE_GRAD: "backward"}.get(reason, "step")
    cause, fix = explain(stage)
    return Diagnosis(stage, cause=cause, fix=fix, step=step)


def learning_rate(optimizer: Any) -> float | None:
    """The first parameter group's learning rate as a host float, or ``None`` when there is none.

    A tensor learning rate is read only when it lives on the CPU (no device synchronisation)."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    lr = groups[0].get("lr")
    if isinstance(lr, Tensor):
        return float(lr) if lr.device.type == "cpu" and lr.numel() == 1 else None
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        return float(lr)
    return None


def check_max_consecutive_skips(value: Any) -> int | None:
    """``None`` (never give up) or an integer >= 0."""
    if value is None:
        return None
    return check_int(value, "max_consecutive_skips (an integer >= 0, or None for no limit)", low=0)


def check_process_group(group: Any) -> None:
    """``None`` or a ``torch.distributed.ProcessGroup``.

    One meaning everywhere (Guard, ``gg.attach``, the callbacks): the group whose ranks hold *disjoint* gradients of
    one model (pipeline stages, experts); gradient norms are reduced over it. The skip decision is always agreed over
    the whole world, so no rank ever steps alone."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.new_group(ranks)) or None, got "
            f"{type(group).__name__}"
        )


class SkipPolicy:
    """What to do about bad steps, and the counters that say how many there were.

    Args:
        on_nonfinite: ``"skip"`` (drop the step and continue), ``"rollback"`` (drop it and restore the last
            snapshot: only where the owner keeps snapshots, i.e. :class:`gradguard.Guard` with ``snapshot_every``),
            ``"raise"`` (:class:`~gradguard.NonFiniteError` for a non-finite step; spikes are skipped), ``"warn"``
            (skip with a :class:`RuntimeWarning` carrying the diagnosis).
        max_consecutive_skips: more bad steps in a row than this raise :class:`~gradguard.TrainingDivergedError`
            (skipping is not helping); ``None`` never raises.
        verbose: log the first bad step of each :class:`Reason` and a summary every ``summary_every`` steps
            (``False``: silent, apart from the ``"warn"`` policy's warnings).
        summary_every: steps between summaries.
        rollback: whether the owner can roll back (``"rollback"`` is refused otherwise, naming :class:`gg.Guard`).
    """

    def __init__(
        self,
        on_nonfinite: str = "skip",
        max_consecutive_skips: int | None = 10,
        *,
        verbose: bool = True,
        summary_every: int = 100,
        rollback: bool = True,
    ) -> None:
        if not isinstance(on_nonfinite, str) or on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
        if on_nonfinite == "rollback" and not rollback:
            raise ValueError(
                "on_nonfinite='rollback' needs snapshots of the model and optimizer: use "
                "gg.Guard(model, optimizer, on_nonfinite='rollback', snapshot_every=N), or pick 'skip', 'warn' or "
                "'raise' here"
            )
        if not isinstance(verbose, bool):
            raise TypeError(f"verbose must be a bool, got {verbose!r}")
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = check_max_consecutive_skips(max_consecutive_skips)
        self.verbose = verbose
        self.summary_every = check_int(summary_every, "summary_every", low=1)
        self.steps = 0  # steps attempted, deferred ones included: known on the host without a read
        self._good_steps = 0
        self._skipped_steps = 0
        self._consecutive_skips = 0
        self._skipped_by_reason: dict[str, int] = {r.value: 0 for r in Reason}
        self._last_skipped = False
        self._last_reason: Reason | None = None
        self._reported: set[str] = set()  # reasons already reported in full (not checkpointed: a new run reports)
        self._since_summary: dict[str, int] = {}
        self._summary_start = 1
        # deferred steps: flag rows (device bool tensors, one flag per Reason), oldest first, stacked per _BLOCK
        self._blocks: list[Tensor] = []
        self._rows: list[Tensor] = []
        self._pending = 0
        self.settled_rows: dict[int, list[bool]] | None = None  # an owner that wants the rows it read sets a dict
        self._held: Exception | None = None  # an error found while settling for a counter read, for settle()

    # ------------------------------------------------------------------------------------------------ counters
    # Reading a counter settles the deferred steps first (one host read, only when some are pending).
    @property
    def good_steps(self) -> int:
        """Steps applied."""
        self._settle_held()
        return self._good_steps

    @good_steps.setter
    def good_steps(self, value: int) -> None:
        self._settle_held()
        self._good_steps = value

    @property
    def skipped_steps(self) -> int:
        """Steps not applied (skipped, undone or rolled back)."""
        self._settle_held()
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._settle_held()
        self._skipped_steps = value

    @property
    def consecutive_skips(self) -> int:
        """Bad steps in a row, up to the last one."""
        self._settle_held()
        return self._consecutive_skips

    @consecutive_skips.setter
    def consecutive_skips(self, value: int) -> None:
        self._settle_held()
        self._consecutive_skips = value

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        """``{reason: steps not applied for it}`` (the live dict)."""
        self._settle_held()
        return self._skipped_by_reason

    @property
    def last_skipped(self) -> bool:
        """Whether the last step was not applied."""
        self._settle_held()
        return self._last_skipped

    @property
    def last_reason(self) -> Reason | None:
        """Why the last step was not applied (``None``: it was applied)."""
        self._settle_held()
        return self._last_reason

    @property
    def pending_steps(self) -> int:
        """Deferred steps whose flags have not been read yet (no read needed to know how many)."""
        return self._pending

    # ------------------------------------------------------------------------------------------------ the step
    def start(self) -> int:
        """A step is being attempted: returns its (1-based) number. Deferred steps before it are settled first (an
        error found then is kept for the next :meth:`settle`)."""
        self._settle_held()
        self.steps += 1
        return self.steps

    def accept(self) -> None:
        """The step was applied."""
        self._accept(self.steps)

    def reject(self, reason: Reason | str, diagnosis: Diagnosis, *, stacklevel: int = 2) -> Exception | None:
        """The step was not applied for ``reason``: count it, report it, and return the error the owner must raise
        once it has closed the step (``None``: continue; the owner rolls back if ``on_nonfinite == "rollback"``).

        ``stacklevel`` is where the ``"warn"`` policy's warning points, counted as by ``warnings.warn`` from the
        caller of this method (1: that caller)."""
        return self._reject(Reason(reason), diagnosis, self.steps, stacklevel + 1)

    def defer(self, bad: Tensor) -> int:
        """Count a step decided on the device, without reading it: returns its 1-based number (as :meth:`start`).

        ``bad`` is a bool tensor of shape ``(len(Reason),)`` on any device, one flag per :class:`Reason` in
        ``Reason`` order: any flag set means the step was not applied, and the first set flag names why. The tensor
        is kept as it is, not copied (do not write into it afterwards); :meth:`settle` reads it. The ``"raise"``
        policy cannot be deferred (its error must stop the step before the weights change): ``ValueError``.
        """
        if not isinstance(bad, Tensor):
            raise TypeError(f"bad must be a torch.Tensor of {len(_REASONS)} bool flags (one per Reason), got "
                            f"{type(bad).__name__}")
        if bad.dtype != torch.bool or tuple(bad.shape) != (len(_REASONS),):
            raise ValueError(
                f"bad must be a bool tensor of shape ({len(_REASONS)},), one flag per Reason in the order "
                f"{[r.value for r in _REASONS]}; got dtype {bad.dtype}, shape {tuple(bad.shape)} (build it with "
                "torch.stack([flag_loss, flag_grad, ...]))"
            )
        if self.on_nonfinite == "raise":
            raise ValueError(
                "on_nonfinite='raise' cannot be deferred: the error must be raised before the step is applied, which "
                "needs the flag on the host; use host_sync=True (one read per step) or on_nonfinite='skip'/'warn'"
            )
        self.steps += 1
        self._rows.append(bad.detach())
        self._pending += 1
        if len(self._rows) == _BLOCK:  # a device op, no read: bounds the number of pending tensors
            self._blocks.append(torch.stack(self._rows))
            self._rows = []
        return self.steps

    def settle(self, *, stacklevel: int = 1) -> Exception | None:
        """Read every pending deferred step's flags in one host read and fold them into the counters, in order, as
        :meth:`accept` / :meth:`reject` would have (the same logging and ``"warn"`` warnings). Returns the
        :class:`~gradguard.TrainingDivergedError` the owner must raise when more than ``max_consecutive_skips`` bad
        steps came in a row (the first such point; also one found earlier by a counter read), else ``None``. No
        pending steps: no host read. ``stacklevel``: where the ``"warn"`` warnings point (1: the caller)."""
        error = self._settle(stacklevel + 1)
        held, self._held = self._held, None
        return held if held is not None else error

    def _settle_held(self) -> None:
        if self._pending:
            error = self._settle(3)  # the "warn" warnings point at whoever read the counter
            if self._held is None:
                self._held = error

    def _settle(self, stacklevel: int) -> Exception | None:
        if not self._pending:
            return None
        parts = self._blocks + ([torch.stack(self._rows)] if self._rows else [])
        device = parts[0].device
        flags = torch.cat([p.to(device) for p in parts]) if len(parts) > 1 else parts[0]
        first = self.steps - self._pending + 1
        self._blocks, self._rows, self._pending = [], [], 0
        rows: list[list[bool]] = flags.tolist()  # the one host read for every pending step
        error: Exception | None = None
        for i, row in enumerate(rows):
            step = first + i
            if self.settled_rows is not None:
                self.settled_rows[step] = row  # the owner takes them (the Guard gives them to its step reports)
            reason = next((r for r, b in zip(_REASONS, row) if b), None)
            if reason is None:
                self._accept(step)
                continue
            found = self._reject(reason, deferred_diagnosis(reason, step), step, stacklevel + 1)
            error = error if error is not None else found
        return error

    def _accept(self, step: int) -> None:
        self._good_steps += 1
        self._consecutive_skips = 0
        self._last_skipped = False
        self._last_reason = None
        self._maybe_summarize(step)

    def _reject(self, reason: Reason, diagnosis: Diagnosis, step: int, stacklevel: int) -> Exception | None:
        """Count step ``step`` as not applied; ``stacklevel`` as ``reject``'s, counted from the caller of this method
        (1: that caller)."""
        self._skipped_steps += 1
        self._consecutive_skips += 1
        self._skipped_by_reason[reason.value] += 1
        self._last_skipped = True
        self._last_reason = reason
        self._since_summary[reason.value] = self._since_summary.get(reason.value, 0) + 1
        limit = self.max_consecutive_skips
        error: Exception | None = None
        if self.on_nonfinite == "raise" and not reason.is_spike:
            error = NonFiniteError(diagnosis)
        elif limit is not None and self._consecutive_skips > limit:
            error = TrainingDivergedError(
                f"gradguard: {self._consecutive_skips} bad steps in a row (max_consecutive_skips={limit}, last: "
                f"{reason}); skipping is not helping", diagnosis)
        if error is None and self.on_nonfinite == "warn":
            warnings.warn(f"gradguard skipped step {step} ({reason})\n{diagnosis}", RuntimeWarning,
                          stacklevel=stacklevel + 1)
        elif error is None and self.verbose and reason.value not in self._reported:
            self._reported.add(reason.value)
            action = "rolled back to the last snapshot" if self.on_nonfinite == "rollback" else "skipped"
            logger.warning("gradguard %s step %d (%s; first time for this reason, later ones are summarised every "
                           "%d steps; verbose=False silences this)\n%s", action, step, reason,
                           self.summary_every, diagnosis)
        self._maybe_summarize(step)
        return error

    def _maybe_summarize(self, step: int) -> None:
        if step % self.summary_every != 0:
            return
        counts, self._since_summary = self._since_summary, {}
        first, self._summary_start = self._summary_start, step + 1
        if not counts or not self.verbose:
            return
        detail = ", ".join(f"{n} {r}" for r, n in counts.items())
        logger.warning("gradguard: %d of steps %d-%d were not applied (%s); %d in total", sum(counts.values()),
                       first, step, detail, self._skipped_steps)

    # ---------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The counters: ``steps``, ``good_steps``, ``skipped_steps``, ``consecutive_skips`` (ints) and
        ``skipped_by_reason`` (``{reason: int}``). Deferred steps are settled first."""
        self._settle_held()
        out: dict[str, Any] = {k: getattr(self, k) for k in _COUNTERS}
        out["skipped_by_reason"] = dict(self._skipped_by_reason)
        return out

    @staticmethod
    def check_state(state: Any, where: str = "state_dict") -> dict[str, Any]:
        """Validate a :meth:`state_dict` without applying it; returns the values to apply."""
        if not isinstance(state, Mapping):
            raise TypeError(f"{where} must be a mapping (from SkipPolicy.state_dict()), got {type(state).__name__}")
        expected = {*_COUNTERS, "skipped_by_reason"}
        missing, unknown = expected - set(state), set(state) - expected
        if missing or unknown:
            raise ValueError(
                f"{where} does not match: missing {sorted(missing)}, unknown {sorted(unknown)}; pass what "
                "state_dict() returned"
            )
        values: dict[str, Any] = {k: check_int(state[k], f"{where}[{k!r}]") for k in _COUNTERS}
        by_reason = state["skipped_by_reason"]
        if not isinstance(by_reason, Mapping) or set(by_reason) != {r.value for r in Reason}:
            raise ValueError(
                f"{where}['skipped_by_reason'] must map each of {[r.value for r in Reason]} to a count, got "
                f"{by_reason!r}"
            )
        values["skipped_by_reason"] = {str(k): check_int(v, f"{where}['skipped_by_reason'][{k!r}]")
                                       for k, v in by_reason.items()}
        if values["good_steps"] + values["skipped_steps"] > values["steps"]:
            raise ValueError(f"{where}: good_steps + skipped_steps exceeds steps; the counters are inconsistent")
        return values

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (validated first: a bad state changes nothing)."""
        self.apply_state(self.check_state(state))

    def apply_state(self, values: Mapping[str, Any]) -> None:
        """Apply what :meth:`check_state` returned (cannot fail). Deferred steps not yet settled are dropped unread
        (the loaded counters replace them), and so is an error kept for :meth:`settle`."""
        self._blocks, self._rows, self._pending, self._held = [], [], 0, None
        self.steps = int(values["steps"])
        self._good_steps = int(values["good_steps"])
        self._skipped_steps = int(values["skipped_steps"])
        self._consecutive_skips = int(values["consecutive_skips"])
        self._skipped_by_reason = dict(values["skipped_by_reason"])
        self._last_skipped = False
        self._last_reason = None
        self._since_summary = {}
        self._summary_start = self.steps + 1


class PolicyCounters:
    """Read-only views of an owner's :class:`SkipPolicy` (``self.policy``): its settings and counters, so the Guard,
    the step gate and the callbacks expose them under the same names."""

    policy: SkipPolicy

    @property
    def on_nonfinite(self) -> str:
        """The policy: ``"skip"``, ``"rollback"``, ``"raise"`` or ``"warn"``."""
        return self.policy.on_nonfinite

    @property
    def max_consecutive_skips(self) -> int | None:
        """More bad steps in a row than this raise :class:`~gradguard.TrainingDivergedError` (``None``: no limit)."""
        return self.policy.max_consecutive_skips

    @property
    def skipped_steps(self) -> int:
        """Steps not applied (skipped, undone or rolled back)."""
        return self.policy.skipped_steps

    @property
    def consecutive_skips(self) -> int:
        """Bad steps in a row, up to the last one."""
        return self.policy.consecutive_skips

    @property
    def last_skipped(self) -> bool:
        """Whether the last step was not applied."""
        return self.policy.last_skipped

    @property
    def last_reason(self) -> Reason | None:
        """Why the last step was not applied (``None``: it was applied)."""
        return self.policy.last_reason
