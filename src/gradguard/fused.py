r"""Clipping folded into the optimizer step, with no host read (issue 11).

Clip-then-step reads the gradients once (the norm), writes them once (``g <- c g``) and then the optimizer reads
them again. torch's *fused* Adam, AdamW, SGD and Adagrad (``fused=True``; CPU and CUDA kernels) take two optional
device tensors on the optimizer object, the ones ``torch.amp.GradScaler`` drives them with: ``grad_scale``, by
which the kernel divides every gradient, and ``found_inf``, which, when nonzero, makes the kernel leave parameters
and state as they were (the step counter included: torch subtracts ``found_inf`` from it again). So
:func:`fused_clip_step` computes

.. math::
    c = \text{clipper's coefficient, e.g. } \min\Big(1, \frac{\tau}{\|g\|_p + 10^{-6}}\Big), \qquad
    \texttt{grad\_scale} = 1 / c, \qquad \texttt{found\_inf} = [\,\|g\|_p \text{ is not finite}\,]

and calls ``optimizer.step()``: clipping costs one read pass (the norm, which is also the finite flag) and no write
pass of its own (given ``grad_scale``, torch's kernel stores the unscaled gradient back to ``.grad`` inside the step),
and a non-finite step is skipped inside the kernel, with no host read.

Exactness. The kernel divides by ``1/c`` where clip-then-step multiplies by ``c``: the gradient the update uses is
``fl(g / fl(1/c))`` instead of ``fl(g * c)``, within 1 ulp of it (and equal when ``c`` is 1 or a power of two). That
is the only difference: the optimizer's arithmetic on that gradient, its state, the skipped steps and the step
counter are bit-exact (the kernel also writes the clipped gradient back to ``.grad``, as clip-then-step leaves it).
torch's own GradScaler + fused-optimizer path has the same 1-ulp property (``unscale_`` multiplies by ``1/S``, the
fused kernel divides by ``S``).

When the coefficient is not folded (the clipper scales per tensor or per unit: ``AGC``, ``LayerwiseClip``,
``AdaGC``, ``ValueClip``, a ``Chain`` that does not end in a global clipper, your own ``Clipper``; gradients that are
not all float32, since ``grad_scale`` is float32; ``parameters`` that are not exactly the optimizer's), the clipper
writes the gradients as usual (bit-exact clip-then-step) and only the finite flag rides in ``found_inf``.

Other optimizers (no ``fused=True``): the documented fallback. The clipper writes the gradients, then the step is
*masked*: parameters and optimizer state are copied (one preallocated foreach copy), the optimizer steps, and every
parameter and state tensor is set to ``torch.where(finite, new, old)``. Bit-exact with clip-then-step-or-skip, no
host read on accelerators (on CPU the clipper's write reads its coefficient to skip a no-op pass, which costs no
synchronisation there). Cost: one copy of parameters + state before the step and one masked select after (for Adam
about 3x the parameter bytes, written twice), comparable to the step itself. A step that *creates* optimizer state
(a parameter's first step) reads the finite flag on the host once, after the step, and drops that new state if the
step was not finite (state cannot be un-created on the device); so does the first step of a fused SGD with momentum,
before it (torch's fused SGD allocates its momentum buffers with ``empty_like`` and a skipped first step would leave
them uninitialised). After that, no host read.

GradScaler: pass it as ``scaler``; :func:`fused_clip_step` calls ``scaler.unscale_(optimizer)`` once (clippers must
see true gradients), folds the clip, and skips where the gradients or the norm are not finite (every step the
scaler would skip, plus a norm that overflows). Do not call ``scaler.step``; call ``scaler.update()`` afterwards as
usual: it reads the overflow flag ``unscale_`` recorded and backs the scale off exactly as after ``scaler.step``.

Distributed: the skip decision is ``isfinite`` of the clipper's norm, so it agrees on every rank wherever that norm
is global: DDP (replicated gradients), DTensor gradients (FSDP2, tensor parallel: the engine reduces the norm), and
clippers given ``set_process_group`` for disjoint gradients.

OLMo-core's skip-step optimizers take the same decision on the device (update times a 0/1 factor); here it is the
kernel's own ``found_inf`` for fused optimizers and a masked update otherwise.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradguard._compat import optimizer_skips_in_kernel, unscale_once
from gradguard.backup import StepBackup
from gradguard.clippers.adagc import AdaGC
from gradguard.clippers.agc import AGC
from gradguard.clippers.autoclip import AutoClip
from gradguard.clippers.base import Chain, Clipper, ClipStats, Parameters, resolve_parameters
from gradguard.clippers.norm import LayerwiseClip, NormClip, ValueClip
from gradguard.clippers.zclip import ZClip
from gradguard.scaling import deferred_scale, scale_

__all__ = ["clip_for_step", "fused_clip_step", "prepare_step", "step_on_device", "supports_fused_step"]

_FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
# clippers whose last access to the gradients is one global scale_ (the factor can be deferred to the kernel)
_GLOBAL = (NormClip, AutoClip, ZClip)
# clippers that write per tensor / per unit (never a deferrable 0-d scale_)
_PER_TENSOR = (AGC, LayerwiseClip, AdaGC, ValueClip)

_backups: weakref.WeakKeyDictionary[torch.optim.Optimizer, StepBackup] = weakref.WeakKeyDictionary()


def supports_fused_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` skips and unscales inside its kernel: torch's Adam, AdamW, SGD or Adagrad built with
    ``fused=True`` (every parameter group fused)."""
    return (
        isinstance(optimizer, _FUSED)
        and optimizer_skips_in_kernel(optimizer)
        and all(bool(g.get("fused")) for g in optimizer.param_groups)
    )


def _foldable(clipper: Clipper) -> bool:
    """The clipper's only deferrable write is its last access to the gradients: a global clipper, or a Chain of
    per-tensor clippers that ends in one (clippers are matched by their ``clip`` method, so a subclass that
    overrides it is not assumed to keep the contract)."""
    if isinstance(clipper, Chain):
        *first, last = clipper.clippers
        return _foldable(last) and all(_writes_only_per_tensor(c) for c in first)
    return any(type(clipper).clip is cls.clip for cls in _GLOBAL)


def _writes_only_per_tensor(clipper: Clipper) -> bool:
    if isinstance(clipper, Chain):
        return all(_writes_only_per_tensor(c) for c in clipper.clippers)
    return any(type(clipper).clip is cls.clip for cls in _PER_TENSOR)


def _check_state(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
    for p in params:
        for k, v in optimizer.state.get(p, {}).items():
            if v is not None and not isinstance(v, Tensor):
                raise TypeError(
                    f"{type(optimizer).__name__} keeps the non-tensor state {k!r}={v!r}, which a masked step cannot "
                    "restore without a host read; use a torch.optim optimizer with tensor state (Adam, AdamW, SGD, "
                    "...), ideally with fused=True"
                )


@torch.no_grad()
def fused_clip_step(
    optimizer: torch.optim.Optimizer,
    clipper: Clipper | float,
    parameters: Parameters | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> ClipStats:
    r"""Clip the gradients and step ``optimizer``, with the clip folded into the step and no host read.

    .. math::
        \texttt{grad\_scale} = 1/c, \quad \texttt{found\_inf} = [\,\|g\| \notin \mathbb{R}\,], \quad
        \theta \leftarrow \begin{cases} \text{step}(\theta, g / \texttt{grad\_scale}) & \|g\| \text{ finite} \\
        \theta & \text{otherwise (state and step counter unchanged)} \end{cases}

    where :math:`c` is the clipper's coefficient (``clip_coefficient``: :math:`\min(1, \tau/(\|g\|+10^{-6}))`).
    See the module docstring for exactness (1 ulp on the clipped gradient, the rest bit-exact), when the factor is
    folded, and the masked fallback for non-fused optimizers.

    Args:
        optimizer: a torch optimizer; fused Adam/AdamW/SGD/Adagrad (``fused=True``) take the folded path, any other
            optimizer with tensor state the masked fallback.
        clipper: a gradguard clipper (``gg.NormClip(1.0)``, ``gg.ZClip()``, ``gg.Chain(gg.AGC(), gg.NormClip(1.))``,
            ...) or a number ``max_norm`` (``gg.NormClip(max_norm)``; use the clipper object to keep its state).
        parameters: what the clipper sees (a module gives parameter names to the stats); default: the optimizer's
            parameters. The factor is folded only when these are exactly the optimizer's parameters with gradients.
        scaler: a ``torch.amp.GradScaler`` whose loss scale is in the gradients; ``unscale_`` is called here (once;
            skipped if you already called it). Call ``scaler.update()`` afterwards, not ``scaler.step``.

    Returns:
        The clipper's :class:`~gradguard.ClipStats` (device tensors); ``~stats.finite`` says the step was skipped.

    Example:
        >>> import torch, gradguard as gg
        >>> from gradguard.fused import fused_clip_step
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        >>> model(torch.ones(2, 4)).sum().mul(100).backward()
        >>> stats = fused_clip_step(opt, gg.NormClip(1.0), model)
        >>> bool(stats.clipped), round(float(gg.get_total_norm([p.grad for p in model.parameters()])), 4)
        (True, 1.0)
    """
    # ---- every check first: a failed call leaves gradients, parameters, optimizer and clipper state as they were
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError("LBFGS needs a closure and keeps Python state; step it yourself after gg.clip_grad_norm_")
    clip = _as_clipper(clipper)
    scaler = _enabled_scaler(scaler)
    _check_no_step_attrs(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    resolve_parameters(params)  # the optimizer's gradients: dense floating point (TypeError naming the parameter)
    if parameters is not None:
        if not isinstance(parameters, (nn.Module, Tensor, Mapping)) and isinstance(parameters, Iterable):
            parameters = list(parameters)  # a generator (model.parameters()) is read twice: checked, then clipped
        resolve_parameters(parameters)
    fused = supports_fused_step(optimizer)
    if not fused:
        _check_state(optimizer, params)

    # ---- unscale, clip (deferring a global factor), decide on the device, step
    if scaler is not None:
        unscale_once(scaler, optimizer)
    stats, coef = clip_for_step(optimizer, clip, params if parameters is None else parameters, params)
    step_on_device(optimizer, stats.finite, coef, params=params)
    return stats


def clip_for_step(
    optimizer: torch.optim.Optimizer, clipper: Clipper, target: Parameters, params: Sequence[Tensor]
) -> tuple[ClipStats, Tensor | None]:
    """Run ``clipper`` on ``target`` for a step of ``optimizer`` over ``params`` (its parameters with gradients):
    ``(stats, coef)``, where ``coef`` is the global factor left for the kernel's ``grad_scale`` (``None``: the
    clipper wrote the gradients itself). The factor is deferred only for a fused optimizer, a clipper whose last
    write is one global scale (see the module docstring), float32 gradients, and ``target`` covering exactly
    ``params``' gradients; and only when no ``grad_scale`` is set on the optimizer already (a GradScaler's)."""
    grads = [p.grad for p in params]
    fold = (
        supports_fused_step(optimizer)
        and vars(optimizer).get("grad_scale") is None
        and _foldable(clipper)
        and all(g is not None and g.dtype == torch.float32 for g in grads)
    )
    if fold:
        return _clip_deferred(clipper, target, grads)
    return clipper(target), None


def step_on_device(
    optimizer: torch.optim.Optimizer, ok: Tensor, coef: Tensor | None = None, *, params: Sequence[Tensor] | None = None
) -> None:
    r"""``optimizer.step()`` where the 0-d bool device tensor ``ok`` is true, nothing at all where it is false, decided
    on the device (no host read after a parameter's first step; see the module docstring).

    .. math:: (\theta, s) \leftarrow \begin{cases} \text{step}(\theta, s, c\,g) & ok \\ (\theta, s) & \text{otherwise}
              \end{cases}

    Fused Adam/AdamW/SGD/Adagrad skip inside their kernel (``found_inf = ~ok``; ``coef``, when given, rides in
    ``grad_scale = 1/coef``); any other optimizer with tensor state takes the masked update (one copy of the
    parameters and state, then ``where(ok, new, old)``), and a ``coef`` is written into the gradients first.
    ``params``: the parameters with gradients (default: the optimizer's).

    The one place gradguard skips a step on the device: :func:`fused_clip_step`, the Guard's ``host_sync=False``
    mode and ``gg.attach`` (through :func:`prepare_step`, its two halves) use it.
    """
    finish = prepare_step(optimizer, ok, coef, params=params)
    if finish is None:
        return
    completed = False
    try:
        optimizer.step()
        completed = True
    finally:
        finish(completed)


@torch.no_grad()
def prepare_step(
    optimizer: torch.optim.Optimizer, ok: Tensor, coef: Tensor | None = None, *, params: Sequence[Tensor] | None = None
) -> Callable[[bool], None] | None:
    """:func:`step_on_device` in two halves, for a caller that does not call ``optimizer.step()`` itself (the step
    hooks of ``gg.attach``): prepare the next ``optimizer.step()`` to be taken where ``ok``, not at all otherwise,
    and return ``finish(completed)``, to call right after that step (``completed=False`` if it raised: the
    optimizer's attributes are put back, no masked select is made).

    Fused optimizers: ``found_inf`` (and ``grad_scale`` for a ``coef``) are set on the optimizer until ``finish``;
    values already there (a ``GradScaler`` driving the step) are combined (``found_inf`` the maximum of both,
    ``grad_scale`` their product) and put back. Other optimizers: parameters and state are copied here and selected
    in ``finish``. Returns ``None`` when the step must not happen at all (a fused SGD's first step with momentum read
    as non-finite on the host): the caller then keeps the optimizer from stepping (e.g. by dropping the gradients).
    """
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    params = list(params)
    if supports_fused_step(optimizer):
        if _first_step(optimizer) and not bool(ok):  # once per run: lazily created state cannot be un-created
            return None
        return _arm(optimizer, ok, coef)
    _check_state(optimizer, params)
    if coef is not None:
        scale_([p.grad for p in params if p.grad is not None], coef)
    return _masked_begin(optimizer, params, ok)


def _as_clipper(clipper: Clipper | float) -> Clipper:
    """The clipper itself, or ``NormClip(max_norm)`` for a number (its ValueError names ``max_norm``)."""
    if isinstance(clipper, Clipper):
        return clipper
    if isinstance(clipper, numbers.Real) and not isinstance(clipper, bool):
        return NormClip(float(clipper))  # checks max_norm (ValueError naming it)
    raise TypeError(
        f"clipper must be a gradguard Clipper (e.g. gg.NormClip(1.0)) or a number max_norm, got "
        f"{type(clipper).__name__}"
    )


def _enabled_scaler(scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    """The scaler when it is an enabled GradScaler, ``None`` when absent or disabled; TypeError for anything else."""
    if scaler is None:
        return None
    if not all(hasattr(scaler, a) for a in ("unscale_", "update", "is_enabled")):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    return scaler if scaler.is_enabled() else None


def _check_no_step_attrs(optimizer: torch.optim.Optimizer) -> None:
    """``grad_scale`` / ``found_inf`` belong to fused_clip_step for the step: refuse an optimizer that has them set."""
    for attr in ("grad_scale", "found_inf"):
        if getattr(optimizer, attr, None) is not None:
            raise ValueError(
                f"optimizer.{attr} is already set; fused_clip_step sets it for the step itself: delete it, and pass "
                "a GradScaler as scaler= instead of driving the optimizer with it"
            )


def _clip_deferred(clip: Clipper, parameters: Parameters, grads: list[Any]) -> tuple[ClipStats, Tensor | None]:
    """Run ``clip`` with its global factor deferred: ``(stats, coef)``, ``coef`` the factor to fold into the step
    (``None`` when there was none, or when it applied to other tensors than ``grads``: then it is written here)."""
    with deferred_scale() as pending:
        stats = clip(parameters)
    if len(pending) > 1:  # impossible for the clippers _foldable accepts
        raise RuntimeError(f"{clip!r} deferred {len(pending)} global factors; expected one (a gradguard bug)")
    if not pending:
        return stats, None
    tensors, coef = pending[0]
    if {id(t) for t in tensors} != {id(g) for g in grads} or len(tensors) != len(grads):
        scale_(tensors, coef)  # not exactly the optimizer's gradients: write it, as the clipper would have
        return stats, None
    return stats, coef


def _first_step(optimizer: torch.optim.Optimizer) -> bool:
    """A fused SGD with momentum about to create its momentum buffers: torch allocates them with ``empty_like``, so
    a kernel-skipped first step would leave them uninitialised. (Fused Adam/AdamW create zero moments and step 0,
    which is what a fresh start uses; Adagrad creates its state in the constructor.)"""
    return isinstance(optimizer, torch.optim.SGD) and any(
        g["momentum"] != 0
        and any(p.grad is not None and optimizer.state.get(p, {}).get("momentum_buffer") is None for p in g["params"])
        for g in optimizer.param_groups
    )


_ABSENT = object()


def _arm(optimizer: torch.optim.Optimizer, finite: Tensor, coef: Tensor | None) -> Callable[[bool], None]:
    """Set ``found_inf = ~finite`` (and ``grad_scale = 1/coef``) for the next kernel step; returns what puts the
    optimizer's attributes back as they were."""
    before = {a: vars(optimizer).get(a, _ABSENT) for a in ("grad_scale", "found_inf")}
    found_inf = (~finite).to(torch.float32)
    prev_inf, prev_scale = before["found_inf"], before["grad_scale"]
    if isinstance(prev_inf, Tensor):  # a GradScaler's overflow flag: skip if either says so
        found_inf = torch.maximum(found_inf.to(prev_inf.device), prev_inf.to(torch.float32))
    grad_scale = None if coef is None else torch.reciprocal(coef.to(torch.float32))
    if isinstance(prev_scale, Tensor):  # the kernel divides by both
        grad_scale = prev_scale if grad_scale is None else prev_scale * grad_scale.to(prev_scale.device)
    optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
    optimizer.found_inf = found_inf  # type: ignore[attr-defined]

    def finish(completed: bool) -> None:
        for attr, value in before.items():
            if value is _ABSENT:
                vars(optimizer).pop(attr, None)
            else:
                setattr(optimizer, attr, value)

    return finish


def _masked_begin(optimizer: torch.optim.Optimizer, params: list[Tensor], finite: Tensor) -> Callable[[bool], None]:
    """Copy parameters and state before the step; the returned ``finish`` sets ``x <- where(finite, x_new, x_old)``
    for every parameter and state tensor after it: exact, no host read.

    State that this step creates (a parameter's first step) cannot be un-created on the device: only then is the
    flag read on the host, and on a non-finite step that new state is dropped, as if the step had not run.
    """
    absent = [p for p in params if not optimizer.state.get(p)]
    backup = _backups.get(optimizer)
    if backup is None:
        backup = _backups[optimizer] = StepBackup()
    backup.capture(params, optimizer)

    def finish(completed: bool) -> None:
        if not completed:
            return
        with torch.no_grad():  # a step post-hook runs outside the step's no_grad
            _masked_restore(backup, optimizer, finite)
        created = [p for p in absent if optimizer.state.get(p)]
        if created and not bool(finite):  # once per parameter, on its first step
            for p in created:
                del optimizer.state[p]

    return finish


def _masked_restore(backup: StepBackup, optimizer: torch.optim.Optimizer, finite: Tensor) -> None:
    ok: dict[torch.device, Tensor] = {}

    def select(new: Tensor, old: Tensor) -> Tensor:
        flag = ok.get(new.device)
        if flag is None:
            # to an accelerator: asynchronous; to the CPU (e.g. Adam's CPU `step` counters beside CUDA parameters): a
            # blocking copy, since the CPU would otherwise read the flag before the copy lands
            flag = ok[new.device] = finite.to(new.device, non_blocking=new.device.type != "cpu")
        return torch.where(flag, new, old)

    n = len(backup.params)
    for src, old in zip(backup.sources[:n], backup.copies[:n]):
        src.copy_(select(src, old))
    i = n
    for p, keys in backup.layout:
        if not keys:
            continue
        st: dict[str, Any] = optimizer.state[p]
        for k in keys:
            cur, old = st[k], backup.copies[i]
            if cur is backup.sources[i]:
                cur.copy_(select(cur, old))
            else:  # the optimizer replaced the state tensor rather than updating it
                st[k] = select(cur, old)
            i += 1
