r"""``gg.attach``: clip and guard through an optimizer step pre-hook, for loops you do not want to change.

Every ``optimizer.step()`` first runs, on the optimizer's parameters:

1. the clipper (or, without one, the norm engine alone), giving a :class:`~gradguard.ClipStats`;
2. the finite flag ``isfinite(stats.norm)``, MAX-reduced over the ranks when ``torch.distributed`` is initialised,
   so that every rank makes the same decision (one tiny all-reduce; none in a single process);
3. on a non-finite step, the *skip*: every parameter's ``.grad`` is set to ``None``. torch optimizers skip parameters
   without a gradient, so the step changes nothing: not the weights, not the moments, not the step counts (for
   AdamW, SGD with momentum, and every optimizer built on ``torch.optim.Optimizer``'s convention). A ``GradScaler``
   that found the overflow skips as before and still lowers its scale.

Reading the flag is the one host-device synchronisation per step; it is what deciding to skip costs.

``host_sync=False`` keeps the decision on the device instead (issue 11): the clipper runs on the accelerator path
(:func:`gradguard.norms.device_path`), and the step is taken or not by :func:`gradguard.fused.prepare_step`, the two
halves of :func:`gradguard.fused.step_on_device` placed in the pre-hook and a post-hook: a fused Adam, AdamW, SGD or
Adagrad (``fused=True``) gets ``found_inf = ~ok`` (and ``grad_scale = 1/c`` when the clip can be folded) for its
kernel, which then leaves weights, state and step counts as they were; any other optimizer is copied (parameters and
state: one extra copy of each, refilled in place every step) in the pre-hook and ``where(ok, new, old)``-selected in
the post-hook. The counters are the policy's deferred ones (:meth:`gradguard.policy.SkipPolicy.defer`): read on the
host only when you read them, or at :meth:`AttachHandle.settle`. Host reads left: a fused SGD with momentum reads the
flag on its first step (its momentum buffers are created then) and a non-fused optimizer once on the
step that creates its state; none after.

The closure caveat: the pre-hook runs *before* ``optimizer.step(closure)`` calls the closure, i.e. before this
step's gradients exist. A step called with a closure (LBFGS, Lightning) therefore raises instead of clipping stale
gradients; use :class:`gradguard.Guard` (``guard.step(closure)``) or the Lightning callback there.

The same logic backs the Lightning and Hugging Face callbacks (:mod:`gradguard.integrations`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradguard import distributed, norms
from gradguard._checks import check_monitor
from gradguard.clippers.base import Clipper, ClipStats, Parameters, resolve_parameters
from gradguard.clippers.state import check_int
from gradguard.diagnose import Diagnosis, explain, nonfinite_names
from gradguard.fused import clip_for_step, prepare_step
from gradguard.policy import PolicyCounters, Reason, SkipPolicy, check_process_group, learning_rate

__all__ = ["AttachHandle", "StepGate", "attach", "skip_step_"]

def skip_step_(params: Iterable[Tensor]) -> None:
    """Make the next ``optimizer.step()`` a no-op for ``params`` by setting every ``.grad`` to ``None``.

    torch optimizers skip parameters without a gradient, so the weights, the moments (``exp_avg``,
    ``momentum_buffer``) and the per-parameter ``step`` counts all stay as they were.

    >>> import torch, gradguard as gg
    >>> w = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.AdamW([w], lr=0.1)
    >>> w.grad = torch.tensor([float("nan"), 1.0])
    >>> gg.hooks.skip_step_([w]); opt.step()
    >>> w.tolist(), opt.state_dict()["state"]
    ([1.0, 1.0], {})
    """
    for p in params:
        p.grad = None


class StepGate(PolicyCounters):
    """Clip, agree across ranks on whether the gradients are finite, and skip the step if not.

    Shared by :func:`attach` and the Lightning / Hugging Face callbacks, so they behave alike; what happens on a
    bad step (counters, policy, errors, the report to the log, ``state_dict``) is the
    :class:`~gradguard.policy.SkipPolicy` that :class:`gradguard.Guard` uses too.

    Args:
        clipper: a gradguard clipper, or ``None`` to check without clipping.
        on_nonfinite: ``"skip"`` (drop the step), ``"warn"`` (drop it with a warning), ``"raise"``
            (:class:`~gradguard.NonFiniteError`, before the weights change). ``"rollback"`` needs
            :class:`gradguard.Guard`.
        max_consecutive_skips: more non-finite steps in a row than this raise
            :class:`~gradguard.TrainingDivergedError` (skipping is not helping); ``None`` never raises.
        process_group: the group whose ranks hold disjoint gradients of one model (pipeline stages, experts): the
            gradient norm is reduced over it (it is set on the clipper, see
            :meth:`gradguard.Clipper.set_process_group`). The skip decision is always agreed over the whole world,
            so no rank steps alone. The same meaning as :class:`gradguard.Guard`'s ``process_group``.
        norm_type: the norm checked when there is no clipper.
        verbose: report the first skip of each kind and a summary every ``summary_every`` steps on the
            ``"gradguard"`` logger (see :mod:`gradguard.policy`).
        summary_every: steps between summaries.
        host_sync: ``True`` (default): read the finite flag once per step (:meth:`__call__`). ``False``: keep it on
            the device (:meth:`decide_on_device`; the owner applies the skip with
            :func:`gradguard.fused.prepare_step`), the counters deferred until read; ``on_nonfinite="raise"`` needs
            ``True`` (the error must stop the step before the weights change).
    """

    def __init__(
        self,
        clipper: Clipper | None = None,
        on_nonfinite: str = "skip",
        max_consecutive_skips: int | None = 10,
        process_group: dist.ProcessGroup | None = None,
        norm_type: float = 2.0,
        *,
        verbose: bool = True,
        summary_every: int = 100,
        host_sync: bool = True,
    ) -> None:
        if not isinstance(host_sync, bool):
            raise TypeError(f"host_sync must be a bool, got {type(host_sync).__name__}")
        if not host_sync and on_nonfinite == "raise":
            raise ValueError(
                "on_nonfinite='raise' needs host_sync=True: the error must be raised before the step is applied, "
                "which needs the finite flag on the host; pass on_nonfinite='skip' or 'warn' with host_sync=False"
            )
        if clipper is not None and not isinstance(clipper, Clipper):
            raise TypeError(
                f"clipper must be a gradguard Clipper (e.g. gg.NormClip(1.0), gg.ZClip()) or None, got "
                f"{type(clipper).__name__}"
            )
        self.policy = SkipPolicy(on_nonfinite, max_consecutive_skips, verbose=verbose,
                                 summary_every=summary_every, rollback=False)
        check_process_group(process_group)
        if clipper is not None and process_group is not None:
            clipper.set_process_group(process_group)
        self.clipper = clipper
        self.process_group = process_group
        self.norm_type = norm_type
        self.last_stats: ClipStats | None = None
        self.last_diagnosis: Diagnosis | None = None  # the last skipped step's (host_sync=True only)
        self.host_sync = host_sync
        self.last_bad: Tensor | None = None  # the last step's 0-d bool "not applied" flag, on the device
        self._reason_masks: dict[torch.device, Tensor] = {}
        self._finish: Any = None  # host_sync=False: what completes the step prepared before optimizer.step()

    # the policy's settings and counters (on_nonfinite, skipped_steps, ... from PolicyCounters), and:
    @property
    def steps(self) -> int:
        """Steps attempted (the last step's 1-based number)."""
        return self.policy.steps

    def __call__(self, parameters: Parameters, step_params: Iterable[Tensor]) -> ClipStats:
        """Run on ``parameters`` (clip and check); on a non-finite step skip it for ``step_params``."""
        infos = resolve_parameters(parameters)
        with torch.no_grad():
            if self.clipper is not None:
                stats = self.clipper.clip(infos) if infos else ClipStats.unclipped()
            else:
                total = norms.total_norm([i.grad for i in infos], self.norm_type, check=False,
                                         process_group=self.process_group)
                stats = ClipStats.unclipped(norm=total)
        bad = distributed.any_across_ranks(~stats.finite)
        self.last_bad = bad
        skipped = bool(bad)  # the one host read per step: deciding to skip needs it
        step = self.policy.start()
        self.last_stats = stats
        if not skipped:
            self.policy.accept()
            return stats
        self.last_diagnosis = self._diagnosis(infos, step)
        error = self.policy.reject(Reason.NONFINITE_GRAD, self.last_diagnosis, stacklevel=3)
        if error is not None:
            raise error
        skip_step_(step_params)
        return stats

    def decide_on_device(
        self, parameters: Parameters, optimizer: torch.optim.Optimizer, params: list[Tensor]
    ) -> tuple[ClipStats, Tensor, Tensor | None]:
        """``host_sync=False``: clip ``parameters`` on the accelerator path and decide without a host read.

        Returns ``(stats, ok, coef)``: ``ok`` the 0-d bool device tensor "every rank's gradients are finite"
        (MAX-reduced when distributed), ``coef`` the clip factor left for a fused ``optimizer``'s ``grad_scale``
        (``None``: the clipper wrote the gradients), as :func:`gradguard.fused.clip_for_step` decides for ``params``
        (the optimizer's parameters with gradients). The step is counted with :meth:`SkipPolicy.defer`; the caller
        applies the decision (:func:`gradguard.fused.prepare_step`).
        """
        infos = resolve_parameters(parameters)
        coef: Tensor | None = None
        with torch.no_grad(), norms.device_path():
            if self.clipper is not None:
                stats, coef = clip_for_step(optimizer, self.clipper, parameters, params) if infos else (
                    ClipStats.unclipped(), None)
            else:
                total = norms.total_norm([i.grad for i in infos], self.norm_type, check=False,
                                         process_group=self.process_group)
                stats = ClipStats.unclipped(norm=total)
            bad = distributed.any_across_ranks(~stats.finite).reshape(())
            mask = self._reason_masks.get(bad.device)
            if mask is None:  # built once per device: NONFINITE_GRAD's position among the Reasons
                mask = torch.tensor([r is Reason.NONFINITE_GRAD for r in Reason], device=bad.device)
                self._reason_masks[bad.device] = mask
            self.policy.defer(mask & bad)
        self.last_stats = stats
        self.last_bad = bad
        return stats, ~bad, coef

    def prepare_device_step(self, parameters: Parameters, optimizer: torch.optim.Optimizer) -> tuple[ClipStats, Tensor]:
        """``host_sync=False``, before the ``optimizer.step()`` that someone else calls: clip and decide
        (:meth:`decide_on_device`) and arrange for that step to be taken only where ``ok``
        (:func:`gradguard.fused.prepare_step`); :meth:`finish_device_step` must follow the step. Returns
        ``(stats, ok)``. ``optimizer`` is the torch optimizer that steps (not a trainer's wrapper)."""
        self.finish_device_step(False)  # the previous step raised before it was finished: put the attributes back
        with_grad = [p for p in optimizer_parameters(optimizer) if p.grad is not None]
        stats, ok, coef = self.decide_on_device(parameters, optimizer, with_grad)
        self._finish = prepare_step(optimizer, ok, coef, params=with_grad)
        if self._finish is None:  # a fused SGD's first step, found non-finite on the host: nothing may step
            skip_step_(with_grad)
        return stats, ok

    def finish_device_step(self, completed: bool = True) -> None:
        """After the step :meth:`prepare_device_step` prepared (``completed=False``: it raised, or never ran)."""
        finish, self._finish = self._finish, None
        if finish is not None:
            finish(completed)

    def settle(self) -> None:
        """Fold the deferred steps into the counters (one host read, none when nothing is pending) and raise
        :class:`~gradguard.TrainingDivergedError` if more than ``max_consecutive_skips`` came in a row."""
        error = self.policy.settle(stacklevel=2)
        if error is not None:
            raise error

    def _diagnosis(self, infos: list[Any], step: int | None = None) -> Diagnosis:
        # local shards only: this runs on the error path and must issue no collective
        bad = nonfinite_names([(i.name, i.grad) for i in infos])
        if bad:
            cause, fix = explain("backward")
        else:
            cause = "another rank's gradients were non-finite; every rank skips the step so they stay in agreement"
            fix = "look at the first rank that reported non-finite gradients"
        return Diagnosis("backward", parameters=tuple(bad), cause=cause, fix=fix,
                         step=self.policy.steps if step is None else step)

    def state_dict(self) -> dict[str, Any]:
        """``{"policy": SkipPolicy.state_dict(), "clipper": clipper.state_dict() or {}}``, for resuming."""
        return {"policy": self.policy.state_dict(),
                "clipper": self.clipper.state_dict() if self.clipper is not None else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Everything is checked before anything is applied."""
        if not isinstance(state, Mapping) or set(state) != {"policy", "clipper"}:
            raise ValueError(
                "the step gate's state must be {'policy': ..., 'clipper': ...} as returned by state_dict(), got "
                f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}"
            )
        values = SkipPolicy.check_state(state["policy"], "state_dict['policy']")
        if self.clipper is not None:
            self.clipper.load_state_dict(state["clipper"])  # validates before it changes anything
        elif state["clipper"]:
            raise ValueError("the state holds a clipper's statistics but this gate has no clipper; pass the clipper "
                             "the checkpoint was saved with")
        self.policy.apply_state(values)


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of ``optimizer``'s param groups, once, in order."""
    seen: set[int] = set()
    out: list[Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, AttachHandle] = weakref.WeakKeyDictionary()


class AttachHandle:
    """What :func:`attach` returns: :meth:`remove` detaches; the counters and last stats are readable.

    Attributes:
        gate: the :class:`StepGate` (``steps``, ``skipped_steps``, ``consecutive_skips``, ``last_stats``,
            ``last_skipped``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gate: StepGate, parameters: Parameters | None,
                 monitor: Any | None, settle_every: int | None = None) -> None:
        self.gate = gate
        self._optimizer_ref = weakref.ref(optimizer)
        self._parameters = parameters
        self._monitor = monitor
        self._model = parameters if isinstance(parameters, nn.Module) else None
        self._settle_every = settle_every
        self._pre = optimizer.register_step_pre_hook(self._pre_hook)
        wants_post = monitor is not None or not gate.host_sync
        self._post = optimizer.register_step_post_hook(self._post_hook) if wants_post else None
        self.removed = False

    @property
    def stats(self) -> ClipStats | None:
        """The last step's :class:`~gradguard.ClipStats` (device tensors), or ``None`` before the first step."""
        return self.gate.last_stats

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for non-finite gradients."""
        return self.gate.skipped_steps

    @property
    def last_skipped(self) -> bool:
        """Whether the last step was skipped."""
        return self.gate.last_skipped

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # torch passes (optimizer, *step_args): a closure is args[1] or closure=
        if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
            raise RuntimeError(
                "gg.attach cannot clip a step called with a closure: the hook runs before the closure computes "
                "this step's gradients. Use gg.Guard(model, optimizer, clipper).step(closure), or the Lightning "
                "callback gradguard.integrations.lightning.GradGuardCallback; or call the step without a closure"
            )
        params = optimizer_parameters(optimizer)
        target = self._parameters if self._parameters is not None else params
        if self.gate.host_sync:
            self.gate(target, params)
            return
        if self._settle_every is not None and self.gate.steps % self._settle_every == 0:
            self.gate.finish_device_step(False)
            self.gate.settle()  # the host read asked for (none at step 0): raise a divergence before this step
        self.gate.prepare_device_step(target, optimizer)

    def settle(self) -> None:
        """``host_sync=False``: read the deferred steps now (one host read; none when nothing is pending) and raise
        :class:`~gradguard.TrainingDivergedError` if more than ``max_consecutive_skips`` bad steps came in a row.
        Call it where you log; the counters settle by themselves when read (a divergence found then is raised
        here)."""
        self.gate.settle()

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.gate.finish_device_step(True)
        if self._monitor is None:
            return
        reason = self.gate.last_reason
        self._monitor.record(self.gate.last_stats, skipped=self.gate.last_skipped,
                             reason=None if reason is None else reason.value, lr=learning_rate(optimizer),
                             model=self._model, step=self.gate.steps)

    def remove(self) -> None:
        """Detach from the optimizer: later steps run unclipped and unchecked. Idempotent."""
        if self.removed:
            return
        self.gate.finish_device_step(False)
        self._pre.remove()
        if self._post is not None:
            self._post.remove()
        opt = self._optimizer_ref()
        if opt is not None and _ATTACHED.get(opt) is self:
            del _ATTACHED[opt]
        self.removed = True

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "attached"
        return (f"AttachHandle({state}, clipper={self.gate.clipper!r}, steps={self.gate.steps}, "
                f"skipped_steps={self.gate.skipped_steps})")


def attach(
    optimizer: torch.optim.Optimizer,
    clipper: Clipper | None = None,
    parameters: Parameters | None = None,
    *,
    on_nonfinite: str = "skip",
    max_consecutive_skips: int | None = 10,
    process_group: dist.ProcessGroup | None = None,
    monitor: Any | None = None,
    verbose: bool = True,
    host_sync: bool = True,
    settle_every: int | None = None,
) -> AttachHandle:
    r"""Clip and guard every ``optimizer.step()`` through a step pre-hook; ``handle.remove()`` undoes it.

    Before each step: ``stats = clipper(parameters)``; if the gradient norm is not finite (on any rank, when
    distributed) the step is skipped by setting every ``.grad`` to ``None`` (weights, moments and step counts stay
    exactly as they were). One host read per step decides the skip.

    Args:
        optimizer: a ``torch.optim.Optimizer``.
        clipper: ``gg.NormClip(1.0)``, ``gg.ZClip()``, ... or ``None`` to only skip non-finite steps.
        parameters: what the clipper sees; default the optimizer's parameters (named by position). Pass the model
            for parameter names (AdaGC, AGC's ``exclude``) and module types (AGC with ConvTranspose).
        on_nonfinite: ``"skip"``, ``"warn"`` (skip with a warning) or ``"raise"`` (:class:`~gradguard.NonFiniteError`).
        max_consecutive_skips: more skipped steps in a row than this raise :class:`~gradguard.TrainingDivergedError`.
        process_group: the group whose ranks hold disjoint gradients (pipeline stages, experts): norms are reduced
            over it (set on the clipper); the skip decision is always agreed over the whole world.
        monitor: a :class:`gradguard.Monitor`, recorded after every step (with its 1-based step number).
        verbose: log the first skipped step and a summary every 100 steps (``"gradguard"`` logger).
        host_sync: ``True`` (default): one host read per step decides the skip (the gradients of a bad step are
            dropped). ``False``: no host read; the step is skipped on the device (``found_inf`` inside a fused
            optimizer's kernel, ``fused=True``; otherwise a masked update that keeps one copy of the parameters and
            optimizer state), and the counters are read when you read them (see the module docstring). Not with
            ``on_nonfinite="raise"`` or a ``monitor`` (both need the decision on the host every step).
        settle_every: with ``host_sync=False``, read the deferred counters every this many steps (one host read
            then) so that ``max_consecutive_skips`` raises there; ``None`` (default): only when you read a counter
            or call :meth:`AttachHandle.settle`.

    Not for steps called with a closure (the hook runs before the closure): see the module docstring.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> handle = gg.attach(opt, gg.NormClip(max_norm=1.0), model)
        >>> model(torch.randn(8, 4)).pow(2).sum().mul(100).backward()
        >>> opt.step()                                   # clipped to norm 1 first
        >>> round(float(handle.stats.norm), 1) > 1.0, handle.skipped_steps
        (True, 0)
        >>> handle.remove()
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if optimizer in _ATTACHED and not _ATTACHED[optimizer].removed:
        raise ValueError(
            "gradguard is already attached to this optimizer (it would clip twice); call handle.remove() on the "
            "first handle before attaching again"
        )
    check_monitor(monitor)
    if not isinstance(host_sync, bool):
        raise TypeError(f"host_sync must be a bool, got {type(host_sync).__name__}")
    if not host_sync and monitor is not None:
        raise ValueError(
            "monitor= needs host_sync=True: Monitor.record takes whether each step was skipped as a host bool. Drop "
            "the monitor, or keep host_sync=True (one host read per step)"
        )
    if settle_every is not None:
        if host_sync:
            raise ValueError("settle_every only applies with host_sync=False (host_sync=True reads every step)")
        settle_every = check_int(settle_every, "settle_every (steps between host reads, >= 1, or None)", low=1)
    if parameters is not None:
        if not isinstance(parameters, (nn.Module, Tensor, Mapping)):
            parameters = list(parameters)  # a generator such as model.parameters() is read once per step
        resolve_parameters(parameters, with_grad=False)  # checked now, not at the first step
    gate = StepGate(clipper, on_nonfinite, max_consecutive_skips, process_group, verbose=verbose, host_sync=host_sync)
    handle = AttachHandle(optimizer, gate, parameters, monitor, settle_every)
    _ATTACHED[optimizer] = handle
    return handle
