r"""Lightning 2.x: ``GradGuardCallback`` clips with any gradguard strategy and skips non-finite steps.

.. code-block:: python

    import lightning as L, gradguard as gg
    from gradguard.integrations.lightning import GradGuardCallback

    trainer = L.Trainer(callbacks=[GradGuardCallback(gg.ZClip())])   # leave gradient_clip_val unset

How it fits Lightning's step. Lightning runs ``optimizer.step(closure)``; the closure does forward and backward,
then (for ``16-mixed``) the precision plugin unscales the gradients, then calls ``on_before_optimizer_step``, then
its own clipping, then the optimizer's update. The callback acts in ``on_before_optimizer_step``:

1. clip with the chosen strategy, on unscaled gradients (Lightning's AMP ``unscale_`` has already run);
2. agree on the finite flag across ranks (one MAX all-reduce under DDP/FSDP; none in a single process), so every
   rank skips the same steps and DDP never hangs on a step only one rank took (Lightning #5243);
3. skip a non-finite step by setting every gradient of that optimizer to ``None``: the update that follows inside
   the same closure-driven ``optimizer.step`` changes nothing (weights, moments and step counts stay as they were),
   and the module's buffers (BatchNorm's running statistics, any registered buffer), copied before the step's first
   forward pass, are put back; a ``GradScaler`` still sees its overflow and lowers the scale;
4. log ``gradguard/norm``, ``/threshold``, ``/coef``, ``/clipped``, ``/skipped`` through ``pl_module.log_dict``, so
   they reach the LightningModule's logger at its ``log_every_n_steps``.

Under FSDP2 (``ModelParallelStrategy``) and tensor parallel the gradients are DTensors and the norm engine reduces
them over the mesh, so clipping by norm works where ``Trainer(gradient_clip_val=...)`` refuses to.

``Trainer(gradient_clip_val=...)`` together with a clipper would clip twice: ``setup`` raises ``ValueError``.
Reading the finite flag costs one host-device synchronisation per optimizer step.

``host_sync=False`` keeps the decision on the device: the clipper runs on the accelerator path, and instead of
dropping the gradients the callback prepares the optimizer's coming update (still inside Lightning's
``optimizer.step(closure)``, after the closure): ``found_inf`` for a fused Adam/AdamW/SGD/Adagrad kernel, a masked
update (one copy of parameters and optimizer state) for any other optimizer; a step post-hook on the optimizer
finishes it. Buffers are put back with ``where(ok, new, saved)``. The stats are logged, and the skip counters read
(one host read: :meth:`gradguard.policy.SkipPolicy.settle`, which also raises ``TrainingDivergedError``), only on the
steps Lightning logs (``log_every_n_steps``). Not with ``16-mixed`` (its GradScaler drives the step itself) or
``on_nonfinite="raise"``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor, nn

from gradguard._checks import check_monitor
from gradguard.backup import BufferBackup
from gradguard.clippers.base import Clipper
from gradguard.hooks import StepGate, optimizer_parameters
from gradguard.integrations import require
from gradguard.integrations._common import (
    GateCallback,
    clip_target,
    first,
    restore_buffers_where,
    scalar_stats,
    torch_optimizer,
)

__all__ = ["GradGuardCallback"]


def _callback_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` classes: ``lightning.pytorch`` and/or ``pytorch_lightning``, whichever is installed
    (both, when both are, so the callback is accepted by either package's Trainer)."""
    bases = []
    for mod in ("lightning.pytorch", "pytorch_lightning"):
        if importlib.util.find_spec(mod.split(".")[0]) is not None:
            bases.append(require(mod, "lightning", "gradguard.integrations.lightning").Callback)
    if not bases:
        require("lightning", "lightning", "gradguard.integrations.lightning")  # raises with the install hint
    return tuple(bases)


if TYPE_CHECKING:
    _Base = object
else:
    _Base = type("_Base", _callback_bases(), {})


class GradGuardCallback(GateCallback, _Base):
    """Clip with a gradguard strategy and skip non-finite steps, inside Lightning's optimizer step.

    Args:
        clipper: ``gg.NormClip(1.0)``, ``gg.ZClip()``, ``gg.Chain(...)``, ... or ``None`` to only skip non-finite
            steps (then ``gradient_clip_val`` may stay set: Lightning clips after the check).
        on_nonfinite: ``"skip"`` (default), ``"warn"`` (skip with a warning) or ``"raise"``
            (:class:`gradguard.NonFiniteError`, before the weights change).
        monitor: a :class:`gradguard.Monitor`, recorded at the end of every batch that took an optimizer step.
        max_consecutive_skips: more skipped steps in a row than this raise :class:`gradguard.TrainingDivergedError`.
        process_group: the group whose ranks hold disjoint gradients (pipeline stages, experts): norms are reduced
            over it (set on the clipper); the skip decision is always agreed over the whole world.
        log: log the step's stats through ``pl_module.log_dict`` (on step, to the module's logger; nothing is
            logged under ``Trainer(logger=False)``).
        prefix: the logged keys' prefix.
        verbose: log the first skipped step and a summary every 100 steps (``"gradguard"`` logger).
        host_sync: ``True`` (default): read the finite flag once per step and drop a bad step's gradients.
            ``False``: decide and skip on the device (see the module docstring); stats are logged and counters
            read only on the steps Lightning logs. No ``monitor`` then (it takes the skip as a host bool).

    The clipper's state and the skip counters are saved in Lightning checkpoints (``state_dict``).

    Example:
        >>> import gradguard as gg
        >>> from gradguard.integrations.lightning import GradGuardCallback
        >>> GradGuardCallback(gg.NormClip(1.0)).gate.on_nonfinite
        'skip'
    """

    def __init__(
        self,
        clipper: Clipper | None = None,
        on_nonfinite: str = "skip",
        monitor: Any | None = None,
        *,
        max_consecutive_skips: int | None = 10,
        process_group: dist.ProcessGroup | None = None,
        log: bool = True,
        prefix: str = "gradguard/",
        verbose: bool = True,
        host_sync: bool = True,
    ) -> None:
        super().__init__()
        check_monitor(monitor)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if host_sync is False and monitor is not None:
            raise ValueError("monitor= needs host_sync=True (Monitor.record takes whether each step was skipped as a "
                             "host bool): drop the monitor or keep host_sync=True")
        self.gate = StepGate(clipper, on_nonfinite, max_consecutive_skips, process_group, verbose=verbose,
                             host_sync=host_sync)
        self.monitor = monitor
        self.log = bool(log)
        self.prefix = prefix
        self._stepped = False
        self._buffers = BufferBackup()
        self._window_open = True  # the next batch starts an optimizer step: copy the buffers before its forward

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse double clipping before training starts."""
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if self.gate.clipper is not None and clip_val not in (None, 0, 0.0):
            raise ValueError(
                f"Trainer(gradient_clip_val={clip_val}) and GradGuardCallback(clipper={self.gate.clipper!r}) would "
                "clip the gradients twice. Set `gradient_clip_val=None` when using GradGuardCallback with a clipper "
                "(or pass clipper=None to keep Lightning's clipping and only skip non-finite steps)"
            )
        plugin = getattr(trainer, "precision_plugin", None)
        if not self.gate.host_sync and getattr(plugin, "scaler", None) is not None:
            raise ValueError(
                "GradGuardCallback(host_sync=False) cannot run under a GradScaler (precision='16-mixed'): the scaler "
                "drives the optimizer step itself (and reads its overflow flag on the host for non-fused optimizers). "
                "Use host_sync=True there, or bf16-mixed precision (no scaler)"
            )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Detach the step post-hooks of ``host_sync=False``."""
        self._remove_post_hooks()

    def _logs_now(self, trainer: Any) -> bool:
        """Whether Lightning writes the logs at the end of this optimizer step (``log_every_n_steps``)."""
        every = getattr(trainer, "log_every_n_steps", 1) or 1
        return bool((int(getattr(trainer, "global_step", 0)) + 1) % int(every) == 0)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Clip, agree across ranks, and skip a non-finite step (after Lightning's AMP unscale)."""
        if not self.gate.host_sync:
            self._on_device(trainer, pl_module, optimizer)
            return
        params = optimizer_parameters(optimizer)
        model = pl_module if isinstance(pl_module, nn.Module) else None
        stats = self.gate(clip_target(model, params), params)
        self._stepped = True
        if self.gate.last_skipped and model is not None and not self._window_open:
            self._buffers.restore()  # BatchNorm statistics (any buffer) as before this step's forward passes
        self._window_open = True
        if self.log and hasattr(pl_module, "log_dict") and getattr(trainer, "logger", None) is not None:
            values = scalar_stats(stats, self.gate.last_skipped, self.prefix)
            pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, logger=True, batch_size=1)

    def _on_device(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """``host_sync=False``: decide on the device; read the counters and log only on Lightning's log steps."""
        opt = torch_optimizer(optimizer)
        model = pl_module if isinstance(pl_module, nn.Module) else None
        logs_now = self._logs_now(trainer)
        if logs_now:
            self.gate.settle()  # the one host read per log interval (TrainingDivergedError, the policy's logging)
        stats, ok = self._device_step(clip_target(model, optimizer_parameters(opt)), opt)
        self._stepped = True
        if model is not None and not self._window_open:
            restore_buffers_where(self._buffers, ok)
        self._window_open = True
        if logs_now and self.log and hasattr(pl_module, "log_dict") and getattr(trainer, "logger", None) is not None:
            values = scalar_stats(stats, ~ok, self.prefix)
            pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, logger=True, batch_size=1)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Copy the module's buffers before the first forward pass of an optimizer step (they are small)."""
        if self._window_open and isinstance(pl_module, nn.Module):
            self._buffers.capture(pl_module)
            self._window_open = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Record the step in the monitor (gradients are still set here; the update has been applied)."""
        if self.monitor is None or not self._stepped:
            return
        self._stepped = False
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self._record(first(getattr(trainer, "optimizers", None) or []), pl_module,
                     loss.detach() if isinstance(loss, Tensor) else None)
