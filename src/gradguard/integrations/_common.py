"""What the Lightning and Hugging Face callbacks share: picking what to clip, and readable stats."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.clippers.base import Clipper, ClipStats, Parameters
from gradguard.hooks import StepGate
from gradguard.policy import learning_rate

__all__ = ["GateCallback", "clip_target", "scalar_stats"]


class GateCallback:
    """What the Lightning and Hugging Face callbacks share: the :class:`~gradguard.hooks.StepGate` (clipper and skip
    policy), its checkpoint, and the record handed to a monitor."""

    gate: StepGate
    monitor: Any

    @property
    def clipper(self) -> Clipper | None:
        """The clipping strategy (``None``: check only)."""
        return self.gate.clipper

    def state_dict(self) -> dict[str, Any]:
        """The skip policy's counters and the clipper's statistics (:meth:`gradguard.hooks.StepGate.state_dict`),
        saved in the trainer's checkpoints."""
        return self.gate.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked first: a bad state changes nothing)."""
        self.gate.load_state_dict(state_dict)

    def _record(self, optimizer: Any, model: Any, loss: Tensor | None = None) -> None:
        """Hand the last step to the monitor, with the policy's 1-based step number."""
        if self.monitor is None:
            return
        reason = self.gate.last_reason
        self.monitor.record(
            self.gate.last_stats, loss=loss, skipped=self.gate.last_skipped,
            reason=None if reason is None else reason.value, lr=learning_rate(optimizer),
            model=model if isinstance(model, nn.Module) else None, step=self.gate.steps,
        )


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
