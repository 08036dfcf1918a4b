r"""AutoClip (Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation
Networks", IEEE MLSP 2020, arXiv:2007.14469).

Keep the history :math:`h_1, \dots, h_t` of global gradient norms, the current one included, and clip to its p-th
percentile:

.. math:: \tau_t = \operatorname{percentile}_p(h_1, \dots, h_t), \qquad
          g \leftarrow \min\Big(1, \frac{\tau_t}{\|g\| + 10^{-6}}\Big)\, g

with linear interpolation between order statistics (``numpy.percentile``'s default). The paper uses p = 10 over the
whole history; ``window`` keeps only the last ``window`` norms (a ring buffer) to bound memory and time.

Differences from the ``autoclip`` 0.2.1 package, on purpose: the paper's defaults (p = 10 and the *global* norm;
the package's ``QuantileClip`` defaults to the 90th percentile of per-parameter histories), the current norm is in
the history before the threshold is taken (the package takes it after, so its first step is unclipped), and a
non-finite norm never enters the history (the step leaves the state as if it had not happened).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradguard import norms
from gradguard._checks import check_norm_type
from gradguard.clippers.base import Clipper, ClipStats, ParamInfo
from gradguard.clippers.state import check_int, check_number, check_state_keys
from gradguard.scaling import clip_coefficient, scale_

__all__ = ["AutoClip"]


class AutoClip(Clipper):
    r"""Clip to a percentile of the history of gradient norms (Seetharaman et al. 2020).

    .. math:: \tau_t = \operatorname{percentile}_p(\{\|g_1\|, \dots, \|g_t\|\}), \qquad
              g \leftarrow \min(1, \tau_t / (\|g_t\| + 10^{-6}))\, g

    Args:
        percentile: p in [0, 100] (paper: 10).
        window: keep only the last ``window`` finite norms; ``None`` keeps all (the paper), growing by doubling.
        norm_type: the norm of the gradients.

    The history lives on the gradients' device; the percentile is ``torch.nanquantile`` over it (unused slots are
    NaN), so no value is read back to the host.

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.zeros(1, requires_grad=True)
        >>> clipper = gg.AutoClip(percentile=10)
        >>> thresholds = []
        >>> for n in [1.0, 2.0, 3.0, 4.0, 100.0, 5.0]:
        ...     w.grad = torch.tensor([n])
        ...     thresholds.append(round(float(clipper([w]).threshold), 4))
        >>> thresholds
        [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    """

    def __init__(self, percentile: float = 10.0, window: int | None = None, norm_type: float | str = 2.0) -> None:
        self.percentile = check_number(percentile, "percentile", low=0.0, high=100.0)
        self.window = None if window is None else check_int(window, "window", low=1)
        self.norm_type = check_norm_type(norm_type)
        self.reset()

    def reset(self) -> None:
        self._history: Tensor | None = None  # NaN where empty
        self._count: Tensor | None = None  # number of finite norms recorded (int64, on device)
        self._calls = 0  # host-side upper bound on _count, for growing an unbounded history

    def _ensure(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._history is None or self._count is None:
            size = self.window if self.window is not None else 64
            self._history = torch.full((size,), math.nan, dtype=torch.float32, device=device)
            self._count = torch.zeros((), dtype=torch.long, device=device)
        elif self.window is None and self._calls >= self._history.numel():  # grow before it can overflow
            grown = torch.full((2 * self._history.numel(),), math.nan, dtype=torch.float32, device=device)
            grown[: self._history.numel()] = self._history.to(device)
            self._history = grown
        self._history = self._history.to(device)
        self._count = self._count.to(device)
        return self._history, self._count

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        grads = [i.grad for i in params]
        total = norms.total_norm(grads, self.norm_type, check=False, process_group=self.process_group)
        history, count = self._ensure(total.device)
        finite = torch.isfinite(total)
        slot = (count % history.numel() if self.window is not None else count).reshape(1)
        # a non-finite norm rewrites the old value; index_select, not history[slot], which would read slot on the host
        value = torch.where(finite, total.float(), history.index_select(0, slot))
        history.index_put_((slot,), value)
        count.add_(finite.long())
        self._calls += 1
        threshold = torch.nanquantile(history, self.percentile / 100.0, interpolation="linear").to(total.dtype)
        coef = clip_coefficient(threshold, total)
        scale_(grads, coef)
        return ClipStats(norm=total, threshold=threshold, coef=coef, clipped=coef < 1)

    def state_dict(self) -> dict[str, Any]:
        if self._history is None or self._count is None:
            return {"calls": self._calls}
        return {"history": self._history.clone(), "count": self._count.clone(), "calls": self._calls}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        check_state_keys(state_dict, {"calls"}, {"history", "count"}, type(self).__name__)
        history = state_dict.get("history")
        if history is not None:
            if not isinstance(history, Tensor) or history.dim() != 1:
                raise ValueError("AutoClip state_dict['history'] must be a 1-D tensor")
            if self.window is not None and history.numel() != self.window:
                raise ValueError(
                    f"AutoClip state_dict has a history of {history.numel()} norms but this clipper has "
                    f"window={self.window}; construct AutoClip with the window the checkpoint was saved with"
                )
        calls = check_int(state_dict["calls"], "state_dict['calls']", low=0)
        self._history = None if history is None else history.clone()
        self._count = None if history is None else torch.as_tensor(state_dict["count"]).clone()
        self._calls = calls
