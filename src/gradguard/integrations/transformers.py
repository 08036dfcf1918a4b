r"""Hugging Face ``Trainer``: ``GradGuardCallback`` clips with any gradguard strategy and skips non-finite steps.

.. code-block:: python

    import gradguard as gg
    from transformers import Trainer, TrainingArguments
    from gradguard.integrations.transformers import GradGuardCallback

    args = TrainingArguments(..., max_grad_norm=0)          # the Trainer must not clip too (its default is 1.0)
    trainer = Trainer(model, args, ...)
    GradGuardCallback(gg.ZClip()).bind(trainer)     # decide before the Trainer's norm pass (see bind)

How it fits the Trainer's step. After the last micro-batch's backward the Trainer clips (``max_grad_norm > 0``),
computes its ``grad_norm`` (unscaling fp16 gradients through accelerate on the way), then calls
``on_pre_optimizer_step``, then ``optimizer.step()``. A callback added with ``callbacks=[...]`` acts in
``on_pre_optimizer_step``; one that is also bound (:meth:`GradGuardCallback.bind`) acts in place of the Trainer's
norm pass, on the gradients as backward left them. Either way:

1. clip with the chosen strategy (gradients are unscaled by then);
2. agree on the finite flag across ranks (one MAX all-reduce when ``torch.distributed`` is initialised), so every
   rank skips the same steps;
3. skip a non-finite step by setting every gradient of the optimizer to ``None``: ``optimizer.step()`` then changes
   no weight, moment or step count, and the model's buffers (BatchNorm's running statistics, any registered buffer),
   copied in ``on_step_begin``, are put back. The Trainer still counts the step (``global_step``, the learning-rate
   schedule);
4. accumulate the norm statistics on the device and add them to the Trainer's logs at each logging step:
   ``gradguard/norm_mean`` and ``/norm_max`` (over the finite steps since the last log), ``/clip_rate``,
   ``/skipped`` (steps skipped since the last log), ``/skipped_total`` and ``/threshold`` (the last one). They go
   into ``trainer.state.log_history`` and to the callbacks after this one (put it first to feed reporters).

``TrainingArguments(max_grad_norm > 0)`` together with a clipper would clip twice: the callback raises
``ValueError`` when the Trainer is built (or when training starts). Reading the finite flag costs one host-device
synchronisation per optimizer step; the logged statistics are read once per logging step.

``host_sync=False`` keeps the decision on the device: the clipper runs on the accelerator path and, instead of
dropping the gradients, the callback prepares the Trainer's coming ``optimizer.step()`` (``found_inf`` for a fused
Adam/AdamW/SGD/Adagrad kernel, a masked update, one copy of parameters and state, for any other optimizer; a step
post-hook on the torch optimizer finishes it); buffers are put back with ``where(ok, new, saved)``. gradguard then
reads the host twice per logging step (the statistics, and the skip counters, whose
:meth:`~gradguard.policy.SkipPolicy.settle` also raises ``TrainingDivergedError``) and never in between. Not with
``fp16`` (accelerate's GradScaler drives the step itself) or ``on_nonfinite="raise"``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradguard._checks import check_monitor
from gradguard.backup import BufferBackup
from gradguard.clippers.base import Clipper, ClipStats
from gradguard.hooks import StepGate, optimizer_parameters
from gradguard.integrations import require
from gradguard.integrations._common import GateCallback, clip_target, restore_buffers_where

__all__ = ["GradGuardCallback"]

if TYPE_CHECKING:
    _Base = object
else:
    _Base = require("transformers", "transformers", "gradguard.integrations.transformers").TrainerCallback


class GradGuardCallback(GateCallback, _Base):
    """Clip with a gradguard strategy and skip non-finite steps in the Hugging Face ``Trainer``.

    Args:
        clipper: ``gg.NormClip(1.0)``, ``gg.ZClip()``, ... (then set ``TrainingArguments(max_grad_norm=0)``), or
            ``None`` to only skip non-finite steps (the Trainer's own clipping may stay on).
        on_nonfinite: ``"skip"`` (default), ``"warn"`` (skip with a warning) or ``"raise"``
            (:class:`gradguard.NonFiniteError`, before the weights change).
        monitor: a :class:`gradguard.Monitor`, recorded after every optimizer step.
        max_consecutive_skips: more skipped steps in a row than this raise :class:`gradguard.TrainingDivergedError`.
        process_group: the group whose ranks hold disjoint gradients (pipeline stages, experts): norms are reduced
            over it (set on the clipper); the skip decision is always agreed over the whole world.
        prefix: the prefix of the keys added to the Trainer's logs.
        verbose: log the first skipped step and a summary every 100 steps (``"gradguard"`` logger).
        host_sync: ``True`` (default): read the finite flag once per step and drop a bad step's gradients.
            ``False``: decide and skip on the device (see the module docstring); counters and statistics are read
            at the logging steps only. No ``monitor`` then (it takes the skip as a host bool).

    The clipper's state and the skip counters are :meth:`state_dict` / :meth:`load_state_dict`.

    Example:
        >>> import gradguard as gg
        >>> from gradguard.integrations.transformers import GradGuardCallback
        >>> GradGuardCallback(gg.AutoClip()).gate.on_nonfinite
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
        prefix: str = "gradguard/",
        verbose: bool = True,
        host_sync: bool = True,
    ) -> None:
        check_monitor(monitor)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if host_sync is False and monitor is not None:
            raise ValueError("monitor= needs host_sync=True (Monitor.record takes whether each step was skipped as a "
                             "host bool): drop the monitor or keep host_sync=True")
        self.gate = StepGate(clipper, on_nonfinite, max_consecutive_skips, process_group, verbose=verbose,
                             host_sync=host_sync)
        self.monitor = monitor
        self.prefix = prefix
        self._armed = False  # between on_step_begin and on_pre_optimizer_step
        self._decided: ClipStats | None = None  # this step's decision, once taken
        self._buffers = BufferBackup()
        self._captured = False
        self._reset_window()

    def _reset_window(self) -> None:
        self._n = 0
        # [sum of finite norms, finite count, max finite norm, clipped count, skipped count], on the device
        self._acc: Tensor | None = None
        self._threshold: Tensor | None = None

    def _check(self, args: Any) -> None:
        max_grad_norm = getattr(args, "max_grad_norm", None)
        if self.gate.clipper is not None and max_grad_norm is not None and max_grad_norm > 0:
            raise ValueError(
                f"TrainingArguments(max_grad_norm={max_grad_norm}) and GradGuardCallback(clipper="
                f"{self.gate.clipper!r}) would clip the gradients twice (the Trainer's default is 1.0). Set "
                "`max_grad_norm=0` in TrainingArguments when using GradGuardCallback with a clipper (or pass "
                "clipper=None to keep the Trainer's clipping and only skip non-finite steps)"
            )
        if not self.gate.host_sync and getattr(args, "fp16", False):
            raise ValueError(
                "GradGuardCallback(host_sync=False) cannot run with TrainingArguments(fp16=True): accelerate's "
                "GradScaler drives the optimizer step itself (and reads its overflow flag on the host for non-fused "
                "optimizers). Use host_sync=True there, or bf16=True (no scaler)"
            )

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Refuse double clipping when the Trainer is built."""
        self._check(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Refuse double clipping before the first step (for a callback added after the Trainer was built)."""
        self._check(args)

    def bind(self, trainer: Any) -> Any:
        """Decide before the Trainer touches the gradients; returns ``trainer``.

        Unbound, the callback acts in ``on_pre_optimizer_step``, *after* the Trainer's gradient-norm pass:
        ``accelerator.clip_grad_norm_(params, max_grad_norm)``, or with ``max_grad_norm=0`` the same call with
        ``inf`` to measure the norm. With one infinite gradient that pass computes ``inf / inf`` and multiplies every
        gradient by NaN, so the callback sees (and its diagnosis names) every parameter instead of the one that
        overflowed, and with a clipper the gradients are read and rewritten once more than needed.

        Bound, the callback takes that pass over (on this Trainer's accelerator only, during the optimizer step of
        a training step): it clips with its strategy, decides, and skips first, on the gradients as backward left
        them; it then hands its norm to the Trainer (which logs it as ``grad_norm``) instead of the measuring pass,
        so there is no extra pass. With ``clipper=None`` and ``max_grad_norm > 0`` the Trainer's own clipping runs
        after the decision, on finite gradients only. The callback is added to the Trainer if it is not there.
        Gradients on several device meshes (the Trainer's mixed-mesh path) do not go through the accelerator: there
        the callback still decides in ``on_pre_optimizer_step``. Not supported (``ValueError``): fp16 with a
        GradScaler, DeepSpeed, XLA and FSDP1, where accelerate's pass also unscales or reduces the gradients.
        """
        accelerator: Any = getattr(trainer, "accelerator", None)
        original = getattr(accelerator, "clip_grad_norm_", None)
        handler = getattr(trainer, "callback_handler", None)
        if not callable(original) or handler is None:
            raise TypeError(
                f"bind expects a transformers.Trainer (with an accelerator and callbacks), got {type(trainer).__name__}"
            )
        kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
        fsdp1 = kind == "FSDP" and not getattr(accelerator, "is_fsdp2", False)
        if kind in ("DEEPSPEED", "XLA") or fsdp1 or getattr(accelerator, "scaler", None) is not None:
            what = "a GradScaler (fp16 mixed precision)" if getattr(accelerator, "scaler", None) is not None else kind
            raise ValueError(
                f"bind does not support {what}: there the Trainer's norm pass also unscales or reduces the gradients "
                "in its own way. Use the callback unbound (Trainer(..., callbacks=[cb])): it then decides in "
                "on_pre_optimizer_step"
            )
        if getattr(original, "__gradguard__", None) is not None:
            raise ValueError("this Trainer is already bound to a GradGuardCallback; bind one callback per Trainer")
        if self not in handler.callbacks:
            trainer.add_callback(self)

        def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2, **kw: Any) -> Any:
            if not self._armed or not getattr(accelerator, "sync_gradients", True):
                return original(parameters, max_norm, norm_type, **kw)
            stats = self._decide(trainer.model, trainer.optimizer)
            if math.isinf(max_norm) or (self.gate.host_sync and self.gate.last_skipped):
                return stats.norm  # the measuring pass is the gate's own; a skipped step has nothing left to clip
            return original(parameters, max_norm, norm_type, **kw)  # clipper=None: the Trainer clips, on finite grads

        clip_grad_norm_.__gradguard__ = self  # type: ignore[attr-defined]
        accelerator.clip_grad_norm_ = clip_grad_norm_
        return trainer

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Detach the step post-hooks of ``host_sync=False``."""
        self._remove_post_hooks()

    def on_step_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        """A new optimizer step: the decision is still to be taken; the model's buffers are copied before its
        first forward pass (they are small), to be put back if the step is skipped."""
        self._armed = True
        self._decided = None
        self._captured = isinstance(model, nn.Module)
        if model is not None and self._captured:
            self._buffers.capture(model)

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Clip, agree across ranks, and skip a non-finite step (unless the bound pass already did)."""
        if optimizer is None:
            raise RuntimeError("GradGuardCallback needs the Trainer's optimizer in on_pre_optimizer_step")
        self._decide(model, optimizer)
        self._armed = False
        self._decided = None

    def _decide(self, model: nn.Module | None, optimizer: Any) -> ClipStats:
        """The step's one decision (taken at most once per optimizer step)."""
        if self._decided is None:
            params = optimizer_parameters(optimizer)
            if not self.gate.host_sync:
                self._decided, ok = self._device_step(clip_target(model, params), optimizer)
                if self._captured:
                    restore_buffers_where(self._buffers, ok)  # the same, selected on the device
            else:
                self._decided = self.gate(clip_target(model, params), params)
                if self.gate.last_skipped and self._captured:
                    self._buffers.restore()  # BatchNorm statistics (any buffer) as before the step's forward passes
            self._accumulate(self._decided)
            self._captured = False
        return self._decided

    def _accumulate(self, stats: ClipStats) -> None:
        norm = stats.norm.detach().float()
        finite = torch.isfinite(norm)
        safe = torch.where(finite, norm, torch.zeros_like(norm))
        bad = self.gate.last_bad
        skipped = bad.float().to(norm.device) if bad is not None else torch.zeros_like(norm)
        row = torch.stack([safe, finite.float(), safe, stats.clipped.detach().float().to(norm.device), skipped])
        if self._acc is None:
            self._acc = row
        else:
            acc = self._acc.to(norm.device)
            self._acc = torch.stack([acc[0] + row[0], acc[1] + row[1], torch.maximum(acc[2], row[2]), acc[3] + row[3],
                                     acc[4] + row[4]])
        self._threshold = stats.threshold.detach().float()
        self._n += 1

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Record the step in the monitor (after the update, gradients still set)."""
        self._record(optimizer, model)

    def summary(self) -> dict[str, float]:
        """The statistics since the last log, read on the host: one read for the statistics, and (``host_sync=False``)
        one for the skip counters."""
        out: dict[str, float] = {}
        if self._n == 0 or self._acc is None:
            return out
        acc = self._acc
        threshold = self._threshold.reshape(1).to(acc.device) if self._threshold is not None else acc[:0]
        values = torch.cat([acc, threshold]).tolist()
        total, count, peak, clipped, skipped = values[:5]
        p = self.prefix
        out[p + "norm_mean"] = total / count if count else math.nan
        out[p + "norm_max"] = peak if count else math.nan
        out[p + "clip_rate"] = clipped / self._n
        out[p + "skipped"] = float(skipped)
        out[p + "skipped_total"] = float(self.gate.skipped_steps)
        if len(values) > 5:
            out[p + "threshold"] = float(values[5])
        return out

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the statistics to the training logs (not to evaluation logs)."""
        if logs is None or "loss" not in logs or self._n == 0:
            return
        if not self.gate.host_sync:
            self.gate.settle()  # the counters' one read per logging step; raises TrainingDivergedError
        values = self.summary()
        logs.update(values)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(values)
        self._reset_window()
