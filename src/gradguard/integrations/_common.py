"""What the Lightning and Hugging Face callbacks share: picking what to clip, and readable stats."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.clippers.base import ClipStats, Parameters

__all__ = ["clip_target", "scalar_stats"]


def clip_target(model: nn.Module | None, params: list[Tensor]) -> Parameters:
    """What the clipper sees for an optimizer over ``params``: the model itself when the optimizer trains all of its
    parameters that have gradients (names and module types, e.g. for AGC and AdaGC), the model's ``(name, param)``
    pairs for the optimizer's share otherwise, and the bare parameters when no model is known."""
    if model is None:
        return params
    ids = {id(p) for p in params}
    named = list(model.named_parameters())
    if all(id(p) in ids for _, p in named if p.grad is not None):
        return model
    return [(n, p) for n, p in named if id(p) in ids]


def scalar_stats(stats: ClipStats, skipped: bool, prefix: str) -> dict[str, Tensor]:
    """``{prefix + "norm": ..., "threshold", "coef", "clipped", "skipped"}`` as 0-d float device tensors (no sync)."""
    dev = stats.norm.device
    return {
        prefix + "norm": stats.norm.detach().float(),
        prefix + "threshold": stats.threshold.detach().float().to(dev),
        prefix + "coef": stats.coef.detach().float().to(dev),
        prefix + "clipped": stats.clipped.detach().float().to(dev),
        prefix + "skipped": torch.tensor(float(skipped), device=dev),
    }


def first(items: Iterable[Any]) -> Any:
    """The first item, or ``None``."""
    return next(iter(items), None)
