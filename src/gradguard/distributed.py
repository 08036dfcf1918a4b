"""torch.distributed glue: every collective gradguard issues goes through here.

Nothing here issues a collective unless ``torch.distributed`` is available and initialised, so single-process
training pays nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_max_", "is_distributed"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


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
