"""What the Lightning and Hugging Face callbacks share: picking what to clip, and readable stats."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.backup import BufferBackup
from gradguard.clippers.base import Clipper, ClipStats, Parameters
from gradguard.hooks import StepGate
from gradguard.policy import learning_rate

__all__ = ["GateCallback", "clip_target", "restore_buffers_where", "scalar_stats", "torch_optimizer"]


class GateCallback:
    """What the Lightning and Hugging Face callbacks share: the :class:`~gradguard.hooks.StepGate` (clipper and skip
    policy), its checkpoint, and the record handed to a monitor."""

    gate: StepGate
    monitor: Any
    _post_hooks: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any]

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

    def _device_step(self, parameters: Parameters, optimizer: Any) -> tuple[ClipStats, Tensor]:
        """``host_sync=False``: clip and decide on the device and prepare the trainer's coming ``optimizer.step()``
        (:meth:`StepGate.prepare_device_step`); a step post-hook on the torch optimizer finishes it."""
        opt = torch_optimizer(optimizer)
        hooks = getattr(self, "_post_hooks", None)
        if hooks is None:
            hooks = self._post_hooks = weakref.WeakKeyDictionary()
        if opt not in hooks:
            gate = self.gate
            hooks[opt] = opt.register_step_post_hook(lambda *_: gate.finish_device_step(True))
        return self.gate.prepare_device_step(parameters, opt)

    def _remove_post_hooks(self) -> None:
        """Training ended: detach the step post-hooks (and put back what a step that never ran had set)."""
        self.gate.finish_device_step(False)
        hooks = getattr(self, "_post_hooks", None)
        for handle in list(hooks.values()) if hooks else []:
            handle.remove()
        self._post_hooks = weakref.WeakKeyDictionary()

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


def scalar_stats(stats: ClipStats, skipped: bool | Tensor, prefix: str) -> dict[str, Tensor]:
    """``{prefix + "norm": ..., "threshold", "coef", "clipped", "skipped"}`` as 0-d float device tensors (no sync;
    ``skipped`` a host bool or a device flag)."""
    dev = stats.norm.device
    flag = skipped.detach().float().to(dev) if isinstance(skipped, Tensor) else torch.tensor(float(skipped), device=dev)
    return {
        prefix + "norm": stats.norm.detach().float(),
        prefix + "threshold": stats.threshold.detach().float().to(dev),
        prefix + "coef": stats.coef.detach().float().to(dev),
        prefix + "clipped": stats.clipped.detach().float().to(dev),
        prefix + "skipped": flag,
    }


def torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a trainer's wrapper (Lightning's ``LightningOptimizer``, accelerate's
    ``AcceleratedOptimizer``): the object whose ``step`` takes ``found_inf`` and runs the step hooks."""
    for _ in range(8):  # wrappers nest at most a few deep
        inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


@torch.no_grad()
def restore_buffers_where(backup: BufferBackup, ok: Tensor) -> None:
    """The device version of ``backup.restore()`` for a step decided on the device: every buffer becomes
    ``where(ok, current, saved)`` (BatchNorm statistics stay as the step left them where it was applied, and are
    put back where it was not), with no host read (except for a buffer the forward pass replaced by one of another
    shape, where the flag is read)."""
    for (mod, name), src, saved in zip(backup.owners, backup.sources, backup.copies):
        flag = ok.to(saved.device)
        current = getattr(mod, name, None)
        if current is src:
            src.copy_(torch.where(flag, src, saved))
        elif isinstance(current, Tensor) and current.shape == saved.shape:  # the forward pass replaced the buffer
            setattr(mod, name, torch.where(flag.to(current.device), current, saved.to(current.device)))
        elif not bool(ok):  # replaced by a tensor of another shape: no select possible, the one case read on the host
            setattr(mod, name, saved.clone())


def first(items: Iterable[Any]) -> Any:
    """The first item, or ``None``."""
    return next(iter(items), None)
