r"""Functional clipping, keyword-compatible with ``torch.nn.utils``.

Clipping by global norm (Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
ICML 2013):

.. math::
    \|g\|_p = \Big(\sum_i \|g_i\|_p^p\Big)^{1/p}, \qquad
    c = \min\Big(\frac{\text{max\_norm}}{\|g\|_p + 10^{-6}},\ 1\Big), \qquad g_i \leftarrow c\, g_i .

Clipping by value: :math:`g \leftarrow \operatorname{clamp}(g, -v, v)` element-wise.

Differences from torch (see the README): norms are accumulated and returned in float32 (float64 for float64
gradients); empty tensors have norm 0 for every p; gradients are never multiplied by a non-finite coefficient; on
CPU the scaling pass is skipped when no clipping is needed.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable, Mapping
from typing import TypeAlias

import torch
from torch import Tensor, nn

from gradguard import norms
from gradguard._checks import (
    COMPLEX_DTYPES,
    FLOAT_DTYPES,
    check_foreach,
    check_gradient,
    check_nonnegative,
    check_norm_type,
    not_a_tensor,
    tensor_list,
)
from gradguard._nograd import no_grad
from gradguard.norms import group_by_device_and_dtype, use_foreach
from gradguard.scaling import clip_to_norm_

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_norms",
]

TensorOrTensors: TypeAlias = Tensor | Iterable[Tensor] | nn.Module
_SUPPORTED = FLOAT_DTYPES | COMPLEX_DTYPES
NamedParameters: TypeAlias = nn.Module | Iterable[tuple[str, Tensor]] | Mapping[str, Tensor]


def _tensors(items: TensorOrTensors, name: str, *, check: bool = True) -> list[Tensor]:
    """``items`` as a list of tensors; an ``nn.Module`` stands for its parameters (each shared one once).
    ``check=False``: entries are not checked to be tensors (the caller does, in its own pass)."""
    if isinstance(items, nn.Module):
        return list(items.parameters())
    return tensor_list(items, name, check=check)


def _gradients(parameters: TensorOrTensors, *, complex_ok: bool = True) -> list[Tensor]:
    """The ``.grad`` of every parameter that has one, validated (nothing is modified).

    One pass over the parameters: on the hot path each pass costs about 0.3-0.5 us per tensor on caches cold from
    the gradients just written (measured: 64 tensors, ~30 us a pass), a visible share of a millisecond-long clip.
    """
    is_generator = isinstance(parameters, types.GeneratorType)
    params: list[object] = _tensors(parameters, "parameters", check=False)  # type: ignore[assignment]
    ok = _SUPPORTED if complex_ok else FLOAT_DTYPES
    strided = torch.strided
    grads: list[Tensor] = []
    for i, t in enumerate(params):
        if not isinstance(t, Tensor):
            raise not_a_tensor("parameters", i, t)
        g = t.grad
        if g is None:
            continue
        if g.layout != strided or g.dtype not in ok:  # the slow check runs only to name a bad gradient
            check_gradient(g, f"parameters[{i}].grad", complex_ok=complex_ok)
        grads.append(g)
    if is_generator and not params:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    return grads


def _raise_nonfinite(total: Tensor, norm_type: float) -> None:
    if not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and leave the gradients unscaled (gradguard never multiplies them by a "
            "non-finite coefficient), set `error_if_nonfinite=False`; to find where the non-finite value came "
            "from, use gradguard.locate_nonfinite."
        )


@no_grad
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    r"""Norm of ``tensors`` viewed as one vector: :math:`\|(\|t_1\|_p, \dots, \|t_n\|_p)\|_p`.

    Args:
        tensors: a tensor or an iterable of tensors (typically gradients); an ``nn.Module`` means its parameters.
        norm_type: any order torch accepts: ``p > 0``, ``'inf'`` / ``float('inf')`` (max), ``0`` (count of non-zero
            entries per tensor; the total, as in torch, is the number of tensors with one), ``p < 0`` and ``-inf``
            (smallest magnitude). Empty tensors add nothing to the total.
        error_if_nonfinite: raise ``RuntimeError`` if the norm is NaN or infinite (reads it on the host).
        foreach: ``None`` picks the fastest kernel; ``True`` requires the foreach kernels; ``False`` loops.

    Returns:
        A 0-d float32 tensor (float64 if any input is 64-bit) on the first tensor's device; ``tensor(0.)`` if empty.

    Example:
        >>> import torch, gradguard as gg
        >>> gg.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    ts = _tensors(tensors, "tensors")
    p = check_norm_type(norm_type, any_order=True)
    check_foreach(foreach)
    total = norms.total_norm(norms.check_tensors(ts, "tensors"), p, foreach, check=False)
    if error_if_nonfinite:
        _raise_nonfinite(total, p)
    return total


@no_grad
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor | float,
    foreach: bool | None = None,
) -> None:
    r"""Scale gradients in place by :math:`\min(\text{max\_norm} / (\text{total\_norm} + 10^{-6}), 1)`.

    A NaN or infinite ``total_norm`` leaves the gradients untouched. On CPU nothing is written when the coefficient
    is 1. Equivalent to the second half of :func:`clip_grad_norm_`.

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.zeros(2, requires_grad=True); w.grad = torch.tensor([3.0, 4.0])
        >>> gg.clip_grads_with_norm_([w], max_norm=1.0, total_norm=torch.tensor(5.0))
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    m = check_nonnegative(max_norm, "max_norm")
    check_foreach(foreach)
    if not isinstance(total_norm, Tensor):
        total_norm = torch.tensor(float(total_norm))
    grads = _gradients(parameters)
    clip_to_norm_(grads, m, total_norm, foreach)


@no_grad
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    r"""Clip the gradients' global p-norm to ``max_norm``, in place; return the norm before clipping.

    .. math::
        c = \min\Big(\frac{\text{max\_norm}}{\|g\|_p + 10^{-6}},\ 1\Big), \qquad g_i \leftarrow c\, g_i

    (Pascanu et al., ICML 2013.) A drop-in for ``torch.nn.utils.clip_grad_norm_`` with the same arguments and
    return value; the norm is float32 (float64 for float64 gradients), so fp16/bf16 gradients are never silently
    zeroed, and a non-finite norm leaves the gradients untouched instead of filling them with NaN.

    Args:
        parameters: a tensor, an iterable of tensors or an ``nn.Module`` (its parameters) whose ``.grad`` is
            clipped; ``None`` grads are skipped.
        max_norm: the largest allowed norm, ``>= 0``.
        norm_type: any order torch accepts (see :func:`get_total_norm`): ``p > 0``, ``inf``, ``0``, ``p < 0``,
            ``-inf``. Finite gradients up to the dtype maximum give a finite norm (no overflow of the sum of squares).
        error_if_nonfinite: raise ``RuntimeError`` (gradients untouched) if the norm is NaN or infinite.
        foreach: ``None`` picks the fastest kernel; ``True`` requires the foreach kernels; ``False`` loops.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).pow(2).sum().mul(100).backward()
        >>> before = gg.clip_grad_norm_(model.parameters(), max_norm=1.0)
        >>> bool(before > 1.0), round(float(gg.get_total_norm([p.grad for p in model.parameters()])), 4)
        (True, 1.0)
    """
    m = check_nonnegative(max_norm, "max_norm")
    p = check_norm_type(norm_type, any_order=True)
    check_foreach(foreach)
    grads = _gradients(parameters)
    total = norms.total_norm(grads, p, foreach, check=False)
    if error_if_nonfinite:
        _raise_nonfinite(total, p)
    clip_to_norm_(grads, m, total, foreach)
    return total


@no_grad
def clip_grad_value_(parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None) -> None:
    r"""Clamp every gradient element into ``[-clip_value, clip_value]``, in place.

    .. math:: g \leftarrow \operatorname{clamp}(g, -v, v)

    NaN elements stay NaN (they are not hidden). One read+write pass per tensor (torch's foreach path makes two:
    ``clamp_min_`` then ``clamp_max_``). Complex gradients are rejected with ``TypeError``.

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.zeros(3, requires_grad=True); w.grad = torch.tensor([-5.0, 0.5, 7.0])
        >>> gg.clip_grad_value_([w], clip_value=1.0)
        >>> w.grad
        tensor([-1.0000,  0.5000,  1.0000])
    """
    v = check_nonnegative(clip_value, "clip_value")
    check_foreach(foreach)
    grads = _gradients(parameters, complex_ok=False)
    for (device, _), idx in group_by_device_and_dtype(grads).items():
        group = [grads[i] for i in idx]
        if device.type != "cpu" and use_foreach(device, foreach):
            torch._foreach_clamp_min_(group, -v)
            torch._foreach_clamp_max_(group, v)
        else:
            use_foreach(device, foreach)  # foreach=True on an unsupported device raises, as in torch
            for g in group:
                g.clamp_(-v, v)


def _named(module_or_named_parameters: NamedParameters) -> list[tuple[str, Tensor]]:
    src = module_or_named_parameters
    items: list[tuple[str, Tensor]]
    if isinstance(src, nn.Module):
        items = list(src.named_parameters())
    elif isinstance(src, Mapping):
        items = list(src.items())
    elif isinstance(src, Iterable) and not isinstance(src, (Tensor, str, bytes)):
        items = list(src)
    else:
        raise TypeError(
            "module_or_named_parameters must be an nn.Module, a mapping name -> parameter, or (name, parameter) "
            f"pairs such as model.named_parameters(); got {type(src).__name__}"
        )
    for i, item in enumerate(items):
        is_pair = isinstance(item, tuple) and len(item) == 2
        if not (is_pair and isinstance(item[0], str) and isinstance(item[1], Tensor)):
            raise TypeError(
                f"module_or_named_parameters[{i}] must be a (name, tensor) pair, got {type(item).__name__}; "
                "pass model.named_parameters() rather than model.parameters()"
            )
        if item[0] == "total":
            raise ValueError("a parameter is named 'total', which grad_norms reserves for the total norm; rename it")
    return items


@no_grad
def grad_norms(module_or_named_parameters: NamedParameters, norm_type: float | str = 2.0) -> dict[str, Tensor]:
    r"""Per-parameter gradient norms :math:`\|g_i\|_p` and their total, in one grouped pass, kept on the device.

    Returns ``{name: norm, ..., "total": norm}`` for every parameter that has a gradient; the values are 0-d
    float32 tensors (float64 for float64 gradients) that are never read back to the host here, so calling this
    every step costs no synchronisation. ``"total"`` is the norm :func:`clip_grad_norm_` would clip by.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(3, 1)
        >>> model(torch.ones(1, 3)).sum().backward()
        >>> {k: round(float(v), 4) for k, v in gg.grad_norms(model).items()}
        {'weight': 1.7321, 'bias': 1.0, 'total': 2.0}
    """
    p = check_norm_type(norm_type, any_order=True)
    named = [(n, t.grad) for n, t in _named(module_or_named_parameters) if t.grad is not None]
    grads = [g for _, g in named]
    ok = FLOAT_DTYPES | COMPLEX_DTYPES
    for n, g in named:
        if g.layout != torch.strided or g.dtype not in ok:
            check_gradient(g, f"the gradient of {n!r}")
    if not named:
        return {"total": torch.tensor(0.0)}
    per = norms.tensor_norms(grads, p, check=False)
    out = dict(zip([n for n, _ in named], per.unbind()))
    out["total"] = norms.combine_norms(per, p)
    return out
