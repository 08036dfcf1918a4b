"""Argument checks shared by every public entry point.

Each check runs before any gradient, parameter or state is touched, and its message names the argument and the fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "COMPLEX_DTYPES",
    "FLOAT_DTYPES",
    "check_foreach",
    "check_gradient",
    "check_monitor",
    "check_nonnegative",
    "check_norm_type",
    "not_a_tensor",
    "tensor_list",
]


FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
COMPLEX_DTYPES = frozenset({torch.complex64, torch.complex128})


def check_norm_type(norm_type: Any, *, any_order: bool = False) -> float:
    """Return ``norm_type`` as a float.

    By default it must be a positive number or ``inf`` (``'inf'`` is accepted, as in torch). With ``any_order=True``
    every order ``torch.linalg.vector_norm`` accepts is allowed: also ``0`` (the count of non-zero entries), negative
    numbers and ``-inf`` (the smallest absolute value); only NaN is rejected.
    """
    if isinstance(norm_type, bool):
        raise TypeError(f"norm_type must be a positive number or 'inf', got the bool {norm_type!r}")
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(
            f"norm_type must be a positive number or 'inf', got {norm_type!r} of type {type(norm_type).__name__}"
        ) from None
    if any_order:
        if math.isnan(p):
            raise ValueError(f"norm_type must be a number or +-inf (e.g. 2.0, 1.0, float('inf')), got {norm_type!r}")
        return p
    if math.isnan(p) or p <= 0:
        raise ValueError(
            f"norm_type must be a positive number or inf (e.g. 2.0, 1.0, 0.5, float('inf')), got {norm_type!r}"
        )
    return p


def check_nonnegative(value: Any, name: str, *, allow_inf: bool = True) -> float:
    """Return ``value`` as a float; it must be a real number >= 0 and not NaN."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a non-negative number, got {value!r} of type {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a non-negative number or a one-element real tensor, got {value!r}")
        value = value.item()
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must be a non-negative number, got NaN; pass a finite value such as 1.0")
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {v}; pass its absolute value {-v}")
    if math.isinf(v) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_foreach(foreach: Any) -> bool | None:
    """``foreach`` is tri-state as in torch: ``None`` (choose), ``True`` (require), ``False`` (per-tensor loop)."""
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
    return foreach


def tensor_list(items: Tensor | Iterable[Any], name: str, *, check: bool = True) -> list[Tensor]:
    """Materialise ``items`` (one tensor or an iterable of tensors) as a list, checking every element is a tensor
    (``check=False``: the caller checks them in its own pass, with :func:`not_a_tensor`)."""
    if isinstance(items, Tensor):
        return [items]
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(items).__name__}")
    out = list(items)
    if check:
        for i, t in enumerate(out):
            if not isinstance(t, Tensor):
                raise not_a_tensor(name, i, t)
    return out


def not_a_tensor(name: str, i: int, item: object) -> TypeError:
    """The error for entry ``i`` of ``name`` not being a tensor (with the fix for the common ``None``)."""
    hint = " (drop the None entries, e.g. [p.grad for p in params if p.grad is not None])" if item is None else ""
    return TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(item).__name__}{hint}")


def check_gradient(grad: Tensor, where: str, *, complex_ok: bool = True) -> None:
    """Reject layouts and dtypes the engine does not support, with the way out."""
    if grad.layout != torch.strided:
        raise TypeError(
            f"{where} has layout {grad.layout}; gradguard supports dense (strided) gradients only. "
            "Densify it with .to_dense() before clipping, or clip sparse embeddings with torch.nn.utils."
        )
    if grad.is_complex():
        if not complex_ok:
            raise TypeError(
                f"{where} is complex ({grad.dtype}); value clipping is undefined for complex numbers. "
                "Clip by norm (clip_grad_norm_) instead, or clip torch.view_as_real(grad)."
            )
        return
    if not grad.is_floating_point():
        raise TypeError(f"{where} has dtype {grad.dtype}; gradients must be floating point or complex")


def check_monitor(monitor: Any) -> None:
    """``monitor`` is ``None`` or has a callable ``record(stats, ...)`` (a ``gg.Monitor``)."""
    if monitor is not None and not callable(getattr(monitor, "record", None)):
        raise TypeError(f"monitor must have a record(stats, ...) method (a gg.Monitor), got {type(monitor).__name__}")
