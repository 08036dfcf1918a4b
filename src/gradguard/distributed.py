r"""torch.distributed glue: every collective gradguard issues goes through here.

Nothing here issues a collective unless ``torch.distributed`` is available and initialised, so single-process
training pays nothing (no collective, no host synchronisation, not even an import of ``torch.distributed.tensor``).

How norms are reduced. A p-norm of a gradient set split across ranks is

.. math::
    \|g\|_p = \Big(\sum_{r} \|g^{(r)}\|_p^{\,p}\Big)^{1/p}, \qquad
    \|g\|_\infty = \max_r \|g^{(r)}\|_\infty ,

so each rank contributes its local norm raised to the power p, the contributions are summed (an all-reduce SUM, in
float64 so large norms do not overflow), and the p-th root is taken; for :math:`p = \infty` the local norms are
MAX-reduced, with NaN carried explicitly (a MAX all-reduce may drop a NaN). Parts that are *replicated* (DDP
gradients, the ``Replicate`` dimensions of a DTensor) are never summed: every rank already holds the whole.

DTensor gradients (FSDP2 ``fully_shard``, tensor parallel) are reduced over the mesh dimensions whose placement is a
``Shard``. A ``Partial`` placement (pending sum) is first turned into ``Replicate`` by its own reduction: the norm of
a sum is not the sum of the local norms.

>>> import torch, gradguard.distributed as D
>>> D.is_distributed()
False
>>> D.all_reduce_norms_(torch.tensor([3.0, 4.0]), 2.0)   # a no-op when not distributed
tensor([3., 4.])
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_max_",
    "all_reduce_norms_",
    "all_reduce_sum_",
    "any_across_ranks",
    "dtensor_norm_groups",
    "dtensor_type",
    "is_distributed",
    "is_dtensor",
    "local_tensor",
    "reduce_over_groups_",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def _group_size(group: dist.ProcessGroup | None) -> int:
    return int(dist.get_world_size(group))


def all_reduce_max_(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """In-place MAX all-reduce of ``tensor`` over ``group`` (the default group if ``None``); a no-op when not
    distributed. Bool tensors are reduced as uint8 (gloo and NCCL have no bool MAX). No host synchronisation beyond
    the collective itself."""
    if not is_distributed():
        return tensor
    if tensor.dtype == torch.bool:
        as_int = tensor.to(torch.uint8)
        dist.all_reduce(as_int, op=dist.ReduceOp.MAX, group=group)
        tensor.copy_(as_int.bool())
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_reduce_sum_(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """In-place SUM all-reduce of ``tensor`` over ``group`` (the default group if ``None``); a no-op when not
    distributed. NaN and infinities propagate through the sum."""
    if not is_distributed():
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def any_across_ranks(flag: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """A 0-d bool tensor, True on every rank when ``flag`` is True on any rank of ``group`` (one MAX all-reduce).

    Used to make every rank skip the same steps. Returns ``flag`` itself (no collective) when not distributed.

    >>> import torch, gradguard.distributed as D
    >>> D.any_across_ranks(torch.tensor(True))
    tensor(True)
    """
    if not is_distributed():
        return flag
    return all_reduce_max_(flag.detach().reshape(()).to(torch.bool).clone(), group)


def all_reduce_norms_(norms: Tensor, norm_type: float, group: dist.ProcessGroup | None = None) -> Tensor:
    r"""Combine, entry by entry, norms of disjoint parts held by the ranks of ``group``, in place.

    Entry ``k`` becomes :math:`(\sum_r n_{k,r}^p)^{1/p}` (one SUM all-reduce in float64), or :math:`\max_r n_{k,r}`
    for ``p = inf`` (one MAX all-reduce, NaN preserved). A no-op when not distributed or when ``group`` has one rank.
    ``norms`` is a floating-point tensor of any shape; the result keeps its dtype and device.
    """
    if not is_distributed() or _group_size(group) == 1:
        return norms
    p = float(norm_type)
    if math.isinf(p):
        flat = norms.reshape(-1)
        nan = torch.isnan(flat)
        packed = torch.cat([torch.where(nan, torch.zeros_like(flat), flat), nan.to(flat.dtype)])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        n = flat.numel()
        out = torch.where(packed[n:] > 0, torch.full_like(flat, math.nan), packed[:n])
        norms.copy_(out.reshape(norms.shape))
        return norms
    powered = norms.to(torch.float64).pow(p)
    dist.all_reduce(powered, op=dist.ReduceOp.SUM, group=group)
    norms.copy_(powered.pow_(1.0 / p))
    return norms


# ----------------------------------------------------------------------------------------------------- DTensor
def dtensor_type() -> type[Tensor] | None:
    """The ``DTensor`` class if ``torch.distributed.tensor`` has been imported, else ``None``.

    No DTensor can exist before that module is imported, so single-process code never pays for the import.
    """
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (cheap: no import)."""
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage: in-place ops on it change the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined, no-any-return]


def dtensor_norm_groups(t: Tensor) -> tuple[Tensor, tuple[dist.ProcessGroup, ...]]:
    """``(local, groups)``: the local tensor whose norm to take, and the process groups to reduce that norm over.

    ``groups`` holds the group of every mesh dimension whose placement shards the tensor, in mesh order; replicated
    dimensions are not reduced (that would count each value several times). A ``Partial`` placement is first
    redistributed to ``Replicate`` (one collective on the tensor): its local values are addends, not pieces.
    """
    from torch.distributed.tensor import Replicate

    placements = t.placements  # type: ignore[attr-defined]
    mesh = t.device_mesh  # type: ignore[attr-defined]
    if any(pl.is_partial() for pl in placements):
        fixed = [Replicate() if pl.is_partial() else pl for pl in placements]
        t = t.redistribute(mesh, fixed)  # type: ignore[attr-defined]
        placements = t.placements  # type: ignore[attr-defined]
    groups = tuple(mesh.get_group(d) for d, pl in enumerate(placements) if pl.is_shard() and mesh.size(d) > 1)
    return t.to_local(), groups  # type: ignore[attr-defined]


def reduce_over_groups_(norms: Tensor, norm_type: float, groups: Sequence[dist.ProcessGroup]) -> Tensor:
    """:func:`all_reduce_norms_` over each of ``groups`` in turn (the mesh dimensions a DTensor is sharded on)."""
    for g in groups:
        all_reduce_norms_(norms, norm_type, g)
    return norms
