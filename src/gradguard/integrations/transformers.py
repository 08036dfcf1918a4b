r"""Hugging Face ``Trainer``: ``GradGuardCallback`` clips with any gradguard strategy and skips non-finite steps.

.. code-block:: python

    import gradguard as gg
    from transformers import Trainer, TrainingArguments
    from gradguard.integrations.transformers import GradGuardCallback

    args = TrainingArguments(..., max_grad_norm=0)          # the Trainer must not clip too (its default is 1.0)
    trainer = Trainer(model, args, ..., callbacks=[GradGuardCallback(gg.ZClip())])

How it fits the Trainer's step. After the last micro-batch's backward the Trainer clips (``max_grad_norm > 0``),
computes its ``grad_norm`` (unscaling fp16 gradients through accelerate on the way), then calls
``on_pre_optimizer_step``, then ``optimizer.step()``. The callback acts in ``on_pre_optimizer_step``:

1. clip with the chosen strategy (gradients are unscaled by then);
2. agree on the finite flag across ranks (one MAX all-reduce when ``torch.distributed`` is initialised), so every
   rank skips the same steps;
3. skip a non-finite step by setting every gradient of the optimizer to ``None``: ``optimizer.step()`` then changes
   no weight, moment or step count. The Trainer still counts the step (``global_step``, the learning-rate schedule);
4. accumulate the norm statistics on the device and add them to the Trainer's logs at each logging step:
   ``gradguard/norm_mean`` and ``/norm_max`` (over the finite steps since the last log), ``/clip_rate``,
   ``/skipped`` (steps skipped since the last log), ``/skipped_total`` and ``/threshold`` (the last one). They go
   into ``trainer.state.log_history`` and to the callbacks after this one (put it first to feed reporters).

``TrainingArguments(max_grad_norm > 0)`` together with a clipper would clip twice: the callback raises
``ValueError`` when the Trainer is built (or when training starts). Reading the finite flag costs one host-device
synchronisation per optimizer step; the logged statistics are read once per logging step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradguard._checks import check_monitor
from gradguard.clippers.base import Clipper, ClipStats
from gradguard.hooks import StepGate, optimizer_parameters
from gradguard.integrations import require
from gradguard.integrations._common import clip_target

__all__ = ["GradGuardCallback"]

if TYPE_CHECKING:
    _Base = object
else:
    _Base = require("transformers", "transformers", "gradguard.integrations.transformers").TrainerCallback


class GradGuardCallback(_Base):
    """Clip with a gradguard strategy and skip non-finite steps in the Hugging Face ``Trainer``.

    Args:
        clipper: ``gg.NormClip(1.0)``, ``gg.ZClip()``, ... (then set ``TrainingArguments(max_grad_norm=0)``), or
            ``None`` to only skip non-finite steps (the Trainer's own clipping may stay on).
        on_nonfinite: ``"skip"`` (default), ``"warn"`` (skip with a warning) or ``"raise"``
            (:class:`gradguard.NonFiniteError`, before the weights change).
        monitor: a :class:`gradguard.Monitor`, recorded after every optimizer step.
        max_consecutive_skips: more skipped steps in a row than this raise :class:`gradguard.TrainingDivergedError`.
        process_group: a group whose ranks hold disjoint gradients (pipeline stages), set on the clipper.
        prefix: the prefix of the keys added to the Trainer's logs.

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
    ) -> None:
        check_monitor(monitor)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.gate = StepGate(clipper, on_nonfinite, max_consecutive_skips, process_group)
        self.monitor = monitor
        self.prefix = prefix
        self._reset_window()

    @property
    def clipper(self) -> Clipper | None:
        """The clipping strategy (``None``: check only)."""
        return self.gate.clipper

    def _reset_window(self) -> None:
        self._n = 0
        self._skipped = 0
        self._acc: Tensor | None = None  # [sum of finite norms, finite count, max finite norm, clipped count]
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

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Refuse double clipping when the Trainer is built."""
        self._check(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Refuse double clipping before the first step (for a callback added after the Trainer was built)."""
        self._check(args)

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Clip, agree across ranks, and skip a non-finite step."""
        if optimizer is None:
            raise RuntimeError("GradGuardCallback needs the Trainer's optimizer in on_pre_optimizer_step")
        params = optimizer_parameters(optimizer)
        stats = self.gate(clip_target(model, params), params)
        self._accumulate(stats)

    def _accumulate(self, stats: ClipStats) -> None:
        norm = stats.norm.detach().float()
        finite = torch.isfinite(norm)
        safe = torch.where(finite, norm, torch.zeros_like(norm))
        row = torch.stack([safe, finite.float(), safe, stats.clipped.detach().float().to(norm.device)])
        if self._acc is None:
            self._acc = row
        else:
            acc = self._acc.to(norm.device)
            self._acc = torch.stack([acc[0] + row[0], acc[1] + row[1], torch.maximum(acc[2], row[2]), acc[3] + row[3]])
        self._threshold = stats.threshold.detach().float()
        self._n += 1
        self._skipped += int(self.gate.last_skipped)

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Record the step in the monitor (after the update, gradients still set)."""
        if self.monitor is None:
            return
        lr = optimizer.param_groups[0].get("lr") if optimizer is not None else None
        self.monitor.record(
            self.gate.last_stats, skipped=self.gate.last_skipped,
            reason="nonfinite_grad" if self.gate.last_skipped else None,
            lr=lr if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None,
            model=model, step=int(state.global_step) + 1,  # counted up after this callback
        )

    def summary(self) -> dict[str, float]:
        """The statistics since the last log, read on the host (one synchronisation)."""
        out: dict[str, float] = {}
        if self._n == 0 or self._acc is None:
            return out
        total, count, peak, clipped = self._acc.tolist()
        p = self.prefix
        out[p + "norm_mean"] = total / count if count else math.nan
        out[p + "norm_max"] = peak if count else math.nan
        out[p + "clip_rate"] = clipped / self._n
        out[p + "skipped"] = float(self._skipped)
        out[p + "skipped_total"] = float(self.gate.skipped_steps)
        if self._threshold is not None:
            out[p + "threshold"] = float(self._threshold)
        return out

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the statistics to the training logs (not to evaluation logs)."""
        if logs is None or "loss" not in logs or self._n == 0:
            return
        values = self.summary()
        logs.update(values)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(values)
        self._reset_window()

    def state_dict(self) -> dict[str, Any]:
        """The clipper's state and the skip counters."""
        clipper = self.gate.clipper
        return {"gate": self.gate.state_dict(), "clipper": clipper.state_dict() if clipper is not None else {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.gate.load_state_dict(state_dict["gate"])
        if self.gate.clipper is not None:
            self.gate.clipper.load_state_dict(state_dict["clipper"])
