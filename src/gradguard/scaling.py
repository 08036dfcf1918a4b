r"""In-place scaling of gradients: the one write pass every clipping strategy ends with.

The clipping coefficient follows ``torch.nn.utils.clip_grad_norm_``:

.. math::
    c = \min\Big(\frac{\text{max\_norm}}{\|g\| + 10^{-6}},\ 1\Big), \qquad g \leftarrow c\, g ,

with one deliberate difference: where :math:`\|g\|` is NaN or infinite the coefficient is 1, so gradients are left
as they were (torch multiplies them by NaN or 0, destroying the finite ones too). The non-finite norm is returned to
the caller, whose job it is to skip the step (see :class:`gradguard.Guard`).

On CPU the coefficient is read on the host (free there) and the write pass is skipped when nothing needs
scaling; bf16 gradients are multiplied by the largest bf16 factor not above it (a float32 factor makes every call
mixed-dtype, measured 4-12% slower), and passes over 32M values run on the engine's single-threaded CPU workers
(:mod:`gradguard.norms`). On accelerators the multiplication always runs, with the coefficient as a device tensor,
so no host-device synchronisation is introduced.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from gradguard._nograd import no_grad
from gradguard.distributed import dtensor_type
from gradguard.norms import (
    cpu_map,
    cpu_tasks,
    group_by_device_and_dtype,
    host_reads_allowed,
    use_foreach,
    worth_workers,
)

__all__ = ["EPS", "clip_coefficient", "clip_to_norm_", "deferred_scale", "scale_", "scale_units_"]

EPS = 1e-6
"""Added to the norm before dividing, as in torch (``max_norm / (total_norm + 1e-6)``)."""


def clip_coefficient(max_norm: float | Tensor, norm: Tensor) -> Tensor:
    """``min(max_norm / (norm + 1e-6), 1)``, and 1 where ``norm`` is not finite. Element-wise; no host read."""
    coef = torch.clamp(max_norm / (norm + EPS), max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


_DEFERRED: ContextVar[list[tuple[Sequence[Tensor], Tensor]] | None] = ContextVar("gradguard_deferred", default=None)


@contextmanager
def deferred_scale() -> Iterator[list[tuple[Sequence[Tensor], Tensor]]]:
    """Inside, :func:`scale_` with one global factor (a 0-d ``coef``) records ``(tensors, coef)`` instead of writing.

    The caller owns the write: :mod:`gradguard.fused` folds the factor into a fused optimizer's ``grad_scale``.
    Only valid around a clipper whose global scaling is its last access to the gradients.
    """
    sink: list[tuple[Sequence[Tensor], Tensor]] = []
    token = _DEFERRED.set(sink)
    try:
        yield sink
    finally:
        _DEFERRED.reset(token)


@no_grad
def clip_to_norm_(tensors: Sequence[Tensor], max_norm: float, norm: Tensor, foreach: bool | None = None) -> None:
    """Scale ``tensors`` in place by ``clip_coefficient(max_norm, norm)`` (``norm`` a 0-d tensor).

    On CPU (not compiling) the coefficient is computed on the host from one read of ``norm``, and nothing is written
    when it is 1: a handful of scalar tensor ops fewer, which is most of the cost for a few tiny tensors. Elsewhere
    it is :func:`scale_` with the device coefficient (no host read).
    """
    if not tensors:
        return
    ts = _locals(tensors) if host_reads_allowed() and norm.is_cpu else None  # DTensors: their local shards
    cpu = _cpu_values(ts) if ts is not None else None
    if ts is None or cpu is None:
        scale_(tensors, clip_coefficient(max_norm, norm), foreach)
        return
    v = norm.item()
    if not math.isfinite(v):
        return
    if norm.dtype == torch.float64:
        c = min(max_norm / (v + EPS), 1.0)
    else:  # float32 arithmetic, rounded as the tensor ops of clip_coefficient round it (exact emulation)
        c = min(_f32(_f32(max_norm) / _f32(v + _f32(EPS))), 1.0)
    if c < 1.0:  # a 0-d float32 factor, as torch: a host scalar would be rounded to fp16 (1e-8 -> 0) on some paths
        values, all_bf16 = cpu
        # bf16 gradients: a bf16 factor, rounded down (see _bf16_down)
        factor = torch.tensor(_bf16_down(c), dtype=torch.bfloat16) if all_bf16 else torch.tensor(c, dtype=norm.dtype)
        _mul_groups(ts, factor, foreach, all_cpu=True, values=values)


def _cpu_values(tensors: Sequence[Tensor]) -> tuple[int, bool] | None:
    """``(number of values, whether all are bf16)`` when every tensor is on the CPU, else None: one pass (each pass
    over the tensors costs ~0.3-0.5 us per tensor on caches cold from the gradients just written)."""
    values = 0
    bf16 = True
    for t in tensors:
        if not t.is_cpu:
            return None
        values += t.numel()
        bf16 = bf16 and t.dtype == torch.bfloat16
    return values, bf16


def _bf16_down(c: float) -> float:
    """The largest bfloat16 value ``<= c`` (``0 <= c < 1``): the float32 bits with the low 16 cleared.

    bf16 gradients are multiplied by a bf16 factor: a float32 one makes every ``mul_`` a mixed-dtype call, measured
    4-12% slower over the whole write pass (torch's own bf16 factor is bf16 too). Rounding down (relative change
    < 2^-7, below the gradients' own resolution) keeps the clipped norm at most ``max_norm``; bf16 has float32's
    exponent range, so no factor underflows to 0.
    """
    (bits,) = struct.unpack("I", struct.pack("f", c))
    return float(struct.unpack("f", struct.pack("I", bits & 0xFFFF0000))[0])


def _f32(x: float) -> float:
    """``x`` rounded to float32 (a float64 sum or quotient of float32 values, rounded once, is the float32 result)."""
    return float(struct.unpack("f", struct.pack("f", x))[0]) if math.isfinite(x) and abs(x) < 3.4e38 else x


def _locals(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    """DTensors replaced by their local shards (same storage), so scaling runs the plain kernels on each rank."""
    cls = dtensor_type()
    if cls is None or not any(isinstance(t, cls) for t in tensors):
        return tensors
    return [t.to_local() if isinstance(t, cls) else t for t in tensors]  # type: ignore[attr-defined]


def _on_host(coef: Tensor, tensors: Sequence[Tensor]) -> bool:
    """Whether the coefficient may be read on the host: CPU only, and never while torch.compile traces (a read
    would break the graph; the device path below has no branch on values)."""
    return host_reads_allowed() and coef.is_cpu and all(t.is_cpu for t in tensors)


@no_grad
def scale_(tensors: Sequence[Tensor], coef: Tensor, foreach: bool | None = None) -> None:
    """Multiply ``tensors`` in place by ``coef``: a 0-d tensor (one factor) or a 1-d tensor (one per tensor).

    Factors equal to 1 are skipped on CPU. Nothing is read back from an accelerator. DTensors (FSDP2, tensor
    parallel) are scaled through their local shards, in place.
    """
    if not tensors:
        return
    sink = None if torch.compiler.is_compiling() else _DEFERRED.get()  # a ContextVar does not trace
    if sink is not None and coef.dim() == 0:
        sink.append((tensors, coef))
        return
    tensors = _locals(tensors)
    per_tensor = coef.dim() == 1
    if per_tensor and coef.numel() != len(tensors):
        raise ValueError(f"coef has {coef.numel()} entries for {len(tensors)} tensors")
    if _on_host(coef, tensors):
        values = coef.tolist() if per_tensor else [coef.item()] * len(tensors)
        keep = [i for i, v in enumerate(values) if v != 1.0]
        if not keep:
            return
        if not per_tensor:
            _mul_groups([tensors[i] for i in keep], coef, foreach, all_cpu=True)
            return
        for i in keep:  # CPU: per-tensor scalars, no broadcast copies
            tensors[i].mul_(values[i])
        return
    if per_tensor:
        for (device, _), idx in group_by_device_and_dtype(tensors).items():
            ts = [tensors[i] for i in idx]
            cs = list(coef.to(device, non_blocking=device.type != "cpu")[idx].unbind())
            if use_foreach(device, foreach):
                torch._foreach_mul_(ts, cs)
            else:
                for t, c in zip(ts, cs):
                    t.mul_(c)
        return
    _mul_groups(tensors, coef, foreach)


def _mul_groups(
    tensors: Sequence[Tensor], coef: Tensor, foreach: bool | None, *, all_cpu: bool = False, values: int | None = None
) -> None:
    """``t *= coef`` for every tensor: one foreach call per (device, dtype) group where supported, else a loop.

    All on CPU (``all_cpu``, known to the caller) with ``foreach=None``: ``torch._foreach_mul_`` calls (torch's C++
    loop of the same in-place ``mul_`` per tensor, whatever the dtypes: same bits, no Python iteration per tensor) on
    pieces of about a million values, run by the engine's single-threaded CPU workers (see :mod:`gradguard.norms`:
    robust where other processes keep the cores busy); ``foreach=False`` keeps the Python loop. ``values``: their
    number of values, when the caller has counted them.
    """
    if all_cpu and foreach is None:
        n = sum(t.numel() for t in tensors) if values is None else values
        if not worth_workers(n):  # inline: one call, no pieces
            torch._foreach_mul_(list(tensors), coef)
        else:
            cpu_map(_mul_task(coef), cpu_tasks(_pieces(tensors)))
        return
    coefs: dict[torch.device, Tensor] = {}
    for (device, _), idx in group_by_device_and_dtype(tensors).items():
        c = coefs.get(device)
        if c is None:
            c = coefs[device] = coef.to(device, non_blocking=device.type != "cpu")
        ts = [tensors[i] for i in idx]
        if use_foreach(device, foreach):
            torch._foreach_mul_(ts, c)
        else:
            for t in ts:
                t.mul_(c)


_PIECE = 1 << 20  # values per piece of a long contiguous tensor in the CPU write pass


def _pieces(tensors: Sequence[Tensor]) -> Iterator[Tensor]:
    """Contiguous tensors longer than _PIECE as flat views of _PIECE values (in place writes reach the tensor), the
    others whole."""
    for t in tensors:
        if t.numel() > _PIECE and t.is_contiguous():
            yield from torch.split(t.view(-1), _PIECE)
        else:
            yield t


def _mul_task(coef: Tensor) -> Callable[[list[Tensor]], None]:
    def run(pieces: list[Tensor]) -> None:
        torch._foreach_mul_(pieces, coef)

    return run


@no_grad
def scale_units_(views: Sequence[Tensor], coefs: Sequence[Tensor], smallest: Tensor) -> None:
    """``views[i] *= coefs[i]`` in place, broadcast over each view (one factor per unit, e.g. per output row).

    ``smallest[i]`` is ``coefs[i]``'s smallest factor: on CPU it is read once, for all views, and views whose
    factors are all 1 are not written; on accelerators every view is multiplied (no host read).
    """
    on_host = smallest.is_cpu and all(v.is_cpu for v in views) and host_reads_allowed()
    needed = (smallest < 1).tolist() if on_host else [True] * len(views)
    for view, coef, need in zip(views, coefs, needed):
        if need:
            view.mul_(coef.to(view.device, non_blocking=view.device.type != "cpu"))
