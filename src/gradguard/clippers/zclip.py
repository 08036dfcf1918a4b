r"""ZClip: adaptive spike mitigation by z-score (Kumar, Owen, Ashkboos & others, "ZClip: Adaptive Spike Mitigation
for LLM Pre-Training", arXiv:2504.02507, 2025).

The mean :math:`\mu` and variance :math:`\sigma^2` of the global gradient norm are tracked by exponential moving
averages, initialised from the first ``warmup_steps`` norms. A norm :math:`g_t` whose z-score
:math:`z_t = (g_t - \mu)/(\sigma + \epsilon)` exceeds :math:`z_{thr}` is a spike and is clipped to

.. math::
    \tau_t = \begin{cases}
      (\mu + z_{thr}\sigma / (z_t / z_{thr})) \cdot \text{clip\_factor} & \text{zscore, adaptive\_scaling} \\
      \mu & \text{zscore, mean} \\
      \mu + z_{thr}\,\sigma \text{ (whenever } g_t \text{ exceeds it)} & \text{percentile}
    \end{cases}

then the EMAs take the (clipped) value :math:`x_t = \min(g_t, \tau_t)`:
:math:`\mu \leftarrow \alpha\mu + (1-\alpha)x_t`, :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(x_t - \mu)^2`
(with the updated :math:`\mu`, as in the reference implementation).

The thresholds equal those of the ``zclip`` 1.0.0 package configured alike. Unlike it: statistics are float32 device
tensors and no value is read back to the host (the package calls ``.item()`` every step); a non-finite norm never
enters the statistics (in the package one NaN poisons the mean forever); ``max_grad_norm`` defaults to ``None``
(the package's 1.0 silently adds a fixed clip); and the state round-trips through ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradguard import norms
from gradguard._checks import check_nonnegative, check_norm_type
from gradguard.clippers.base import Clipper, ClipStats, ParamInfo
from gradguard.clippers.state import StateSpec, check_int, check_number
from gradguard.scaling import clip_coefficient, scale_

__all__ = ["ZClip"]


class ZClip(Clipper):
    r"""Z-score spike clipping with EMA statistics (Kumar et al. 2025).

    Args:
        alpha: EMA smoothing factor in (0, 1).
        z_thresh: z-score above which a norm is a spike (> 0).
        max_grad_norm: an optional fixed cap applied on top (``None``: no fixed cap).
        eps: added to the standard deviation.
        warmup_steps: finite norms collected before the statistics start (no adaptive clipping until then).
        mode: ``"zscore"`` or ``"percentile"`` (clip to :math:`\mu + z_{thr}\sigma` whenever exceeded).
        clip_option: with ``"zscore"``: ``"adaptive_scaling"`` (a larger spike gets a tighter threshold) or
            ``"mean"`` (clip to the mean).
        clip_factor: multiplier of the adaptive-scaling threshold (0.5-0.9 is more aggressive).
        skip_update_on_spike: leave the statistics unchanged on a spike step.
        norm_type: the gradient norm (2 in the paper).

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.zeros(1, requires_grad=True)
        >>> clipper = gg.ZClip(warmup_steps=3)
        >>> for n in [1.0, 1.1, 0.9, 1.0, 50.0]:
        ...     w.grad = torch.tensor([n])
        ...     stats = clipper([w])
        >>> bool(stats.clipped), round(float(w.grad), 3) < 50.0
        (True, True)
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = None,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        norm_type: float | str = 2.0,
    ) -> None:
        self.alpha = check_number(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
        self.z_thresh = check_number(z_thresh, "z_thresh", low=0.0, low_open=True)
        self.max_grad_norm = None if max_grad_norm is None else check_nonnegative(max_grad_norm, "max_grad_norm")
        self.eps = check_number(eps, "eps", low=0.0)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", low=1)
        if not isinstance(mode, str) or mode.lower() not in ("zscore", "percentile"):
            raise ValueError(f"mode must be 'zscore' or 'percentile', got {mode!r}")
        self.mode = mode.lower()
        if not isinstance(clip_option, str) or clip_option.lower() not in ("adaptive_scaling", "mean"):
            raise ValueError(f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        self.clip_option = clip_option.lower()
        self.clip_factor = check_number(clip_factor, "clip_factor", low=0.0, low_open=True)
        if not isinstance(skip_update_on_spike, bool):
            raise TypeError(f"skip_update_on_spike must be a bool, got {skip_update_on_spike!r}")
        self.skip_update_on_spike = skip_update_on_spike
        self.norm_type = check_norm_type(norm_type)
        self.reset()

    _STATE_FIX = "construct ZClip with the warmup_steps the checkpoint was saved with"

    def _state_spec(self) -> dict[str, StateSpec]:
        fix = f"this ZClip has warmup_steps={self.warmup_steps}; {self._STATE_FIX}"
        return {
            "mean": StateSpec((), torch.float32, low=0.0),
            "var": StateSpec((), torch.float32, low=0.0),
            "count": StateSpec((), torch.long, low=0),  # finite warm-up norms seen
            "buffer": StateSpec((self.warmup_steps,), torch.float32, low=0.0, fix=fix),
        }

    def _check_state(self, state: Mapping[str, Any]) -> None:
        count = state["count"]
        if count.device.type != "meta" and int(count) > self.warmup_steps:
            raise ValueError(
                f"ZClip state_dict['count'] is {int(count)}, more than warmup_steps={self.warmup_steps}; "
                f"{self._STATE_FIX}"
            )

    def _spike_threshold(self, norm: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """(is_spike, threshold) after warm-up, following the reference implementation's branches."""
        if self.mode == "percentile":
            threshold = mean + self.z_thresh * std
            return norm > threshold, threshold
        z = (norm - mean) / (std + self.eps)
        spike = z > self.z_thresh
        if self.clip_option == "mean":
            return spike, mean
        eta = z / self.z_thresh
        return spike, (mean + (self.z_thresh * std) / eta) * self.clip_factor

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        grads = [i.grad for i in params]
        total = norms.total_norm(grads, self.norm_type, check=False, process_group=self.process_group)
        st = self._state_on(total.device)
        mean, var, count, buffer = st["mean"], st["var"], st["count"], st["buffer"]
        norm = total.float()
        finite = torch.isfinite(norm)
        ready = count >= self.warmup_steps  # statistics initialised before this step
        inf = torch.full_like(norm, math.inf)

        # after warm-up: spike detection and threshold
        std = var.sqrt()
        spike, spike_thr = self._spike_threshold(norm, mean, std)
        spike = spike & ready & finite
        adaptive = torch.where(spike, spike_thr, inf)
        cap = inf if self.max_grad_norm is None else torch.full_like(norm, self.max_grad_norm)
        threshold = torch.minimum(adaptive, cap)

        # statistics update (masked: a non-finite norm leaves every tensor exactly as it was)
        x = torch.where(spike, spike_thr, norm)
        update = ready & finite
        if self.skip_update_on_spike:
            update = update & ~spike
        new_mean = self.alpha * mean + (1 - self.alpha) * x
        new_var = self.alpha * var + (1 - self.alpha) * (x - new_mean) ** 2
        # warm-up: record the norm; the step that fills the buffer initialises the statistics
        record = ~ready & finite
        slot = count.clamp(max=self.warmup_steps - 1).reshape(1)
        buffer.index_put_((slot,), torch.where(record, norm, buffer.index_select(0, slot)))  # no int(slot): no sync
        filled = record & (count + 1 >= self.warmup_steps)
        init_mean = buffer.mean()
        init_var = ((buffer - init_mean) ** 2).mean()
        mean.copy_(torch.where(update, new_mean, torch.where(filled, init_mean, mean)))
        var.copy_(torch.where(update, new_var, torch.where(filled, init_var, var)))
        count.add_(record.long())

        threshold = threshold.to(total.dtype)
        coef = clip_coefficient(threshold, total)
        scale_(grads, coef)
        return ClipStats(norm=total, threshold=threshold, coef=coef, clipped=coef < 1)

    @property
    def initialized(self) -> Tensor:
        """0-d bool device tensor: the warm-up is over."""
        state = self._tensors()
        if not state:
            return torch.zeros((), dtype=torch.bool)
        return state["count"] >= self.warmup_steps
