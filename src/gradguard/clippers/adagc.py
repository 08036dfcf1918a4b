r"""AdaGC: adaptive per-tensor gradient clipping (Wang, Li, Chen, Zeng, Yang, Yu, Ma & Shen, "AdaGC: Enhancing LLM
Pretraining Stability via Adaptive Gradient Clipping", arXiv:2502.11034).

Each tensor :math:`i` is clipped against an exponential moving average :math:`\gamma_i` of its own past *clipped*
gradient norms:

.. math::
    h_{t,i} = \min\Big(1, \frac{\lambda_{rel}\,\gamma_{t-1,i}}{\|g_{t,i}\| + 10^{-6}}\Big), \qquad
    \hat g_{t,i} = h_{t,i}\, g_{t,i}, \qquad
    \gamma_{t,i} = \beta\,\gamma_{t-1,i} + (1-\beta)\,\|\hat g_{t,i}\|.

During the first ``warmup_steps`` steps the clipping is global with an absolute threshold and :math:`\gamma` tracks
the running minimum of the clipped norms:

.. math::
    h_t = \min\Big(1, \frac{\lambda_{abs}}{\|g_t\| + 10^{-6}}\Big), \qquad
    \gamma_{t,i} = \min(\gamma_{t-1,i}, \|\hat g_{t,i}\|).

A tensor seen for the first time after warm-up starts its EMA at its own norm (unclipped). A step with a non-finite
norm changes no statistic and does not count towards the warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradguard import norms
from gradguard._checks import check_nonnegative
from gradguard.clippers.base import Clipper, ClipStats, ParamInfo
from gradguard.clippers.state import check_int, check_number, check_state_keys
from gradguard.scaling import clip_coefficient, scale_

__all__ = ["AdaGC"]


class AdaGC(Clipper):
    r"""Per-tensor adaptive clipping against each tensor's EMA of clipped norms (Wang et al. 2025).

    .. math:: h_{t,i} = \min(1, \lambda_{rel}\gamma_{t-1,i} / (\|g_{t,i}\| + 10^{-6})),\quad
              \gamma_{t,i} = \beta\gamma_{t-1,i} + (1-\beta)\,h_{t,i}\|g_{t,i}\|

    Args:
        beta: EMA coefficient in (0, 1).
        lambda_abs: the global threshold during warm-up (>= 0).
        lambda_rel: the allowed ratio to a tensor's EMA after warm-up (> 0; the paper uses 1.05).
        warmup_steps: steps of global clipping before per-tensor clipping starts.

    The statistics are keyed by parameter name, so parameters may come and go between steps; pass a module or
    ``named_parameters()`` so names are stable. ``stats.tensor_thresholds`` holds each tensor's limit.

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.zeros(1, requires_grad=True)
        >>> clipper = gg.AdaGC(warmup_steps=2)
        >>> for n in [0.5, 0.4, 0.45, 10.0]:
        ...     w.grad = torch.tensor([n])
        ...     stats = clipper([("w", w)])
        >>> round(float(w.grad), 4) < 0.5
        True
    """

    def __init__(
        self, beta: float = 0.98, lambda_abs: float = 1.0, lambda_rel: float = 1.05, warmup_steps: int = 100
    ) -> None:
        self.beta = check_number(beta, "beta", low=0.0, high=1.0, low_open=True, high_open=True)
        self.lambda_abs = check_nonnegative(lambda_abs, "lambda_abs")
        self.lambda_rel = check_number(lambda_rel, "lambda_rel", low=0.0, low_open=True)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", low=0)
        self.reset()

    def reset(self) -> None:
        self._names: dict[str, int] = {}
        self._gamma: Tensor | None = None  # per known name, inf until first seen
        self._step: Tensor | None = None  # finite steps taken (int64, on device)
        self._index_cache: tuple[tuple[str, ...], torch.device, Tensor] | None = None

    def _index(self, names: tuple[str, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        for n in names:
            self._names.setdefault(n, len(self._names))
        size = len(self._names)
        if self._gamma is None or self._step is None:
            self._gamma = torch.full((size,), math.inf, device=device)
            self._step = torch.zeros((), dtype=torch.long, device=device)
        if self._gamma.numel() < size:
            grown = torch.full((size,), math.inf, device=device)
            grown[: self._gamma.numel()] = self._gamma.to(device)
            self._gamma = grown
        self._gamma = self._gamma.to(device)
        self._step = self._step.to(device)
        if self._index_cache is None or self._index_cache[0] != names or self._index_cache[1] != device:
            idx = torch.tensor([self._names[n] for n in names], dtype=torch.long).to(device)
            self._index_cache = (names, device, idx)
        return self._index_cache[2], self._gamma

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        grads = [i.grad for i in params]
        names = tuple(i.name for i in params)
        per = norms.tensor_norms(grads, 2.0, check=False)
        total = norms.combine_norms(per, 2.0, process_group=self.process_group)
        index, gamma_all = self._index(names, per.device)
        assert self._step is not None
        gamma = gamma_all[index]
        finite = torch.isfinite(total)
        warm = self._step < self.warmup_steps

        global_coef = clip_coefficient(self.lambda_abs, total)
        local_limit = self.lambda_rel * gamma  # inf for a tensor never seen: no clip on first sight
        local_coef = clip_coefficient(local_limit.to(per.dtype), per)
        coefs = torch.where(warm, global_coef.expand_as(per), local_coef)
        clipped_norms = (coefs * per).float()
        ema = torch.where(torch.isinf(gamma), clipped_norms, self.beta * gamma + (1 - self.beta) * clipped_norms)
        new_gamma = torch.where(warm, torch.minimum(gamma, clipped_norms), ema)
        gamma_all.index_put_((index,), torch.where(finite, new_gamma, gamma))
        self._step.add_(finite.long())

        scale_(grads, coefs)
        limits = torch.where(warm, torch.full_like(per, self.lambda_abs), local_limit.to(per.dtype))
        coef = coefs.amin()
        return ClipStats(
            norm=total,
            threshold=torch.where(warm, torch.full_like(total, self.lambda_abs), torch.full_like(total, math.inf)),
            coef=coef,
            clipped=coef < 1,
            names=names,
            tensor_norms=per,
            tensor_coefs=coefs,
            tensor_thresholds=limits,
        )

    def state_dict(self) -> dict[str, Any]:
        if self._gamma is None or self._step is None:
            return {"names": list(self._names)}
        return {"names": list(self._names), "gamma": self._gamma.clone(), "step": self._step.clone()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        check_state_keys(state_dict, {"names"}, {"gamma", "step"}, type(self).__name__)
        names = list(state_dict["names"])
        gamma = state_dict.get("gamma")
        if gamma is not None and (not isinstance(gamma, Tensor) or gamma.shape != (len(names),)):
            raise ValueError(f"AdaGC state_dict['gamma'] must be a tensor of shape ({len(names)},), one per name")
        self.reset()
        self._names = {n: i for i, n in enumerate(names)}
        if gamma is not None:
            self._gamma = gamma.clone()
            self._step = torch.as_tensor(state_dict["step"]).clone()
