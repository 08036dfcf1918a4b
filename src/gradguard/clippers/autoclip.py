r"""AutoClip (Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation
Networks", IEEE MLSP 2020, arXiv:2007.14469).

Keep the history :math:`h_1, \dots, h_t` of global gradient norms, the current one included, and clip to its p-th
percentile:

.. math:: \tau_t = \operatorname{percentile}_p(h_1, \dots, h_t), \qquad
          g \leftarrow \min\Big(1, \frac{\tau_t}{\|g\| + 10^{-6}}\Big)\, g

with linear interpolation between order statistics (``numpy.percentile``'s default).

The paper uses the whole history, which grows without bound (an exact percentile over a million norms costs a sort of
a million values every step). Here the default keeps it bounded in memory and in time per step, with no crash on a
run of any length:

* the first ``exact_steps`` finite norms (4096 by default) are kept in a sorted buffer (one insertion per step, no
  sort) and the percentile over them is **exact**, as in the paper;
* beyond that, the percentile comes from a log-bucketed histogram of *every* finite norm seen (a DDSketch: Masson,
  Rim & Lee, "DDSketch: A Fast and Fully-Mergeable Quantile Sketch with Relative-Error Guarantees", VLDB 2019):
  bucket :math:`i \ge 1` holds norms in :math:`[2^{-60}\gamma^{i-1}, 2^{-60}\gamma^{i})` with
  :math:`\gamma = 1.01/0.99`, and stands for :math:`2^{-60}\gamma^{i-1}\cdot 2\gamma/(\gamma+1)`, within 1% of every
  norm in it. The two order statistics around the percentile are read from the cumulative counts and interpolated,
  so the threshold is within **1% (relative)** of the exact full-history percentile, whatever the run's length
  (norms below :math:`2^{-60}` count as 0; above :math:`2^{60}`, as :math:`2^{60}`). 4161 int64 counts, a cumsum
  and a two-element search per step.

``window=N`` instead keeps only the last ``N`` norms (a ring buffer), exactly (a sort of ``N`` values per step).

Differences from the ``autoclip`` 0.2.1 package, on purpose: the paper's defaults (p = 10 and the *global* norm;
the package's ``QuantileClip`` defaults to the 90th percentile of per-parameter histories), the current norm is in
the history before the threshold is taken (the package takes it after, so its first step is unclipped), and a
non-finite norm never enters the history (the step leaves the state as if it had not happened).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from gradguard import norms
from gradguard._checks import check_norm_type
from gradguard.clippers.base import Clipper, ClipStats, ParamInfo
from gradguard.clippers.state import StateSpec, check_int, check_number
from gradguard.scaling import clip_coefficient, scale_

__all__ = ["AutoClip"]

_GAMMA = 1.01 / 0.99  # bucket ratio: a bucket's representative is within 1% of every value in it
_LOG_GAMMA = math.log(_GAMMA)
_LOW_EXP = -60  # buckets start at 2**-60 (bucket 0: [0, 2**-60)) and end at 2**60 (the last bucket: above)
_BUCKETS = math.ceil(-2 * _LOW_EXP * math.log(2) / _LOG_GAMMA) + 2
_LOG_REP = _LOW_EXP * math.log(2) + math.log(2 * _GAMMA / (_GAMMA + 1))  # log of bucket 1's representative


def _ranks(n: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """The 0-based ranks ``[lower, upper]`` (int64, shape ``(2,)``) around ``q (n - 1)``, and the fraction between."""
    last = (n.double() - 1).clamp(min=0)
    h = last * q
    lower = h.floor()
    ranks = torch.stack([lower, torch.minimum(lower + 1, last)]).long()
    return ranks, h - lower


def _interpolate(pair: Tensor, frac: Tensor, n: Tensor) -> Tensor:
    """``pair[0] + frac * (pair[1] - pair[0])`` (float64, 0-d), NaN when ``n == 0`` (no finite norm yet)."""
    value = torch.lerp(pair[0], pair[1], frac)
    return torch.where(n > 0, value, math.nan)


def sorted_percentile(values: Tensor, n: Tensor, q: float) -> Tensor:
    """The ``q``-quantile (linear) of the first ``n`` entries of ascending ``values`` (float64, 0-d; NaN if n=0)."""
    ranks, frac = _ranks(n, q)
    return _interpolate(values.index_select(0, ranks).double(), frac, n)


def sketch_bucket(norm: Tensor) -> Tensor:
    """The buckets of finite, non-negative norms (int64, flat; shape ``(1,)`` for a 0-d norm): 0 below ``2**-60``."""
    i = (norm.double().reshape(-1).log() - _LOW_EXP * math.log(2)) / _LOG_GAMMA + 1
    return i.floor_().clamp_(0, _BUCKETS - 1).long()


def _sketch_values(counts: Tensor, ranks: Tensor, frac: Tensor, n: Tensor) -> Tensor:
    """The interpolated value at ``ranks`` of the values counted in ``counts``, from bucket representatives."""
    buckets = torch.searchsorted(counts.cumsum(0), ranks, right=True)
    reps = torch.where(buckets > 0, ((buckets - 1).double() * _LOG_GAMMA + _LOG_REP).exp(), 0.0)
    return _interpolate(reps, frac, n)


class AutoClip(Clipper):
    r"""Clip to a percentile of the history of gradient norms (Seetharaman et al. 2020).

    .. math:: \tau_t = \operatorname{percentile}_p(\{\|g_1\|, \dots, \|g_t\|\}), \qquad
              g \leftarrow \min(1, \tau_t / (\|g_t\| + 10^{-6}))\, g

    Args:
        percentile: p in [0, 100] (paper: 10).
        window: keep only the last ``window`` finite norms (exact); ``None`` (the paper) uses the whole history:
            exact for the first ``exact_steps`` finite norms, then within 1% of exact (see the module docstring).
        norm_type: the norm of the gradients.
        exact_steps: how many finite norms the exact phase of ``window=None`` keeps (memory: 4 bytes each; time:
            one pass over them per step).

    The state lives on the gradients' device and no value is read back to the host.

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

    def __init__(
        self,
        percentile: float = 10.0,
        window: int | None = None,
        norm_type: float | str = 2.0,
        *,
        exact_steps: int = 4096,
    ) -> None:
        self.percentile = check_number(percentile, "percentile", low=0.0, high=100.0)
        self.window = None if window is None else check_int(window, "window", low=1)
        self.norm_type = check_norm_type(norm_type)
        self.exact_steps = check_int(exact_steps, "exact_steps", low=1)
        self.reset()

    _STATE_FIX = "construct AutoClip with the window (and exact_steps) the checkpoint was saved with"

    def _state_spec(self) -> dict[str, StateSpec]:
        size = self.window if self.window is not None else self.exact_steps
        what = f"window={self.window}" if self.window is not None else f"window=None, exact_steps={self.exact_steps}"
        spec = {
            "history": StateSpec((size,), torch.float32, math.nan, low=0.0, nan=True, fix=f"this AutoClip has {what}; "
                                 f"{self._STATE_FIX}"),
            "count": StateSpec((), torch.long, low=0),  # finite norms seen
        }
        if self.window is None:
            spec["sketch"] = StateSpec((_BUCKETS,), torch.long, low=0)
        return spec

    def _check_state(self, state: Mapping[str, Any]) -> None:
        history, count = state["history"], state["count"]
        if history.device.type == "meta":
            return
        filled = ~torch.isnan(history)
        n = min(int(count), history.numel())
        if int(filled.sum()) != n or not bool(filled[:n].all()):
            raise ValueError(
                f"AutoClip state_dict['history'] must hold min(count, {history.numel()}) = {n} norms in its first "
                f"slots, got {int(filled.sum())}; the checkpoint is corrupt or {self._STATE_FIX}"
            )
        if self.window is None:
            if not bool((history[1:n] >= history[: max(n - 1, 0)]).all()):
                raise ValueError("AutoClip state_dict['history'] must be sorted (window=None keeps it so)")
            if int(state["sketch"].sum()) != int(count):
                raise ValueError(
                    f"AutoClip state_dict['sketch'] counts {int(state['sketch'].sum())} norms but 'count' is "
                    f"{int(count)}; the checkpoint is corrupt"
                )

    def _prepare_load(self, state_dict: Mapping[str, Any]) -> Callable[[], None]:
        """Also accepts the previous format (``history`` in arrival order, ``count``, ``calls``), converted exactly."""
        if isinstance(state_dict, Mapping) and set(state_dict) == {"history", "count", "calls"}:
            state_dict = self._from_previous_format(state_dict)
        return super()._prepare_load(state_dict)

    def _from_previous_format(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        history, count = state["history"], state["count"]
        if not (isinstance(history, Tensor) and isinstance(count, Tensor) and history.dim() == 1):
            return state  # the regular checks say what is wrong
        if self.window is not None:
            return {"history": history, "count": count}
        n = min(int(count), history.numel())
        seen = history[:n].float()  # the finite norms, in the order they came
        exact = torch.full((self.exact_steps,), math.nan, dtype=torch.float32)
        first = torch.sort(seen[: self.exact_steps]).values
        exact[: first.numel()] = first
        sketch = torch.zeros(_BUCKETS, dtype=torch.long)
        if n:
            sketch.index_add_(0, sketch_bucket(seen.nan_to_num(0.0).clamp(min=0)), torch.ones(n, dtype=torch.long))
        return {"history": exact, "count": count, "sketch": sketch}

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        grads = [i.grad for i in params]
        total = norms.total_norm(grads, self.norm_type, check=False, process_group=self.process_group)
        state = self._state_on(total.device)
        finite = torch.isfinite(total)
        norm = torch.where(finite, total, torch.zeros_like(total))  # a non-finite norm changes nothing below
        if self.window is not None:
            threshold = self._windowed(state, norm, finite)
        else:
            threshold = self._full_history(state, norm, finite)
        threshold = threshold.to(total.dtype)
        coef = clip_coefficient(threshold, total)
        scale_(grads, coef)
        return ClipStats(norm=total, threshold=threshold, coef=coef, clipped=coef < 1)

    def _windowed(self, state: dict[str, Tensor], norm: Tensor, finite: Tensor) -> Tensor:
        """The last ``window`` norms in a ring; the exact percentile of a sorted copy."""
        history, count = state["history"], state["count"]
        slot = (count % history.numel()).reshape(1)
        # a non-finite norm rewrites the old value; index_select, not history[slot], which would read slot on the host
        history.index_put_((slot,), torch.where(finite, norm.float(), history.index_select(0, slot)))
        count.add_(finite.long())
        ordered = torch.sort(history).values  # NaN (empty slots) last
        return sorted_percentile(ordered, count.clamp(max=history.numel()), self.percentile / 100.0)

    def _full_history(self, state: dict[str, Tensor], norm: Tensor, finite: Tensor) -> Tensor:
        """Exact over the sorted first ``exact_steps`` norms; the sketch of all of them beyond."""
        history, count, sketch = state["history"], state["count"], state["sketch"]
        cap = history.numel()
        value = norm.float().reshape(1)
        position = (history < value).sum()  # NaN slots compare False: the insertion point among the filled ones
        index = torch.arange(cap, device=history.device)
        shifted = torch.cat([value, history[:-1]])  # shifted[i] = history[i - 1]
        inserted = torch.where(index < position, history, torch.where(index == position, value, shifted))
        history.copy_(torch.where(finite & (count < cap), inserted, history))
        sketch.index_add_(0, sketch_bucket(norm), finite.long().reshape(1))
        count.add_(finite.long())
        # one pair of ranks for both: in the exact phase (count <= cap) they index the history, beyond it the sketch
        ranks, frac = _ranks(count, self.percentile / 100.0)
        exact = _interpolate(history.index_select(0, ranks.clamp(max=cap - 1)).double(), frac, count)
        return torch.where(count <= cap, exact, _sketch_values(sketch, ranks, frac, count))
