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
from gradguard.clippers.state import StateSpec, check_int, check_number
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

    _STATE_FIX = "pass the dict AdaGC.state_dict() made"
    _names: dict[str, int]
    _index_cache: tuple[tuple[str, ...], torch.device, Tensor] | None

    def _state_spec(self) -> dict[str, StateSpec]:
        return {
            "gamma": StateSpec((-1,), torch.float32, math.inf, low=0.0, inf=True),  # per known name; inf: unseen
            "step": StateSpec((), torch.long, low=0),  # finite steps taken
        }

    def _extra_state_keys(self) -> frozenset[str]:
        return frozenset({"names"})

    def _extra_state(self) -> dict[str, Any]:
        return {"names": list(self._names)}

    def _check_state(self, state: Mapping[str, Any]) -> None:
        names = state["names"]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"AdaGC state_dict['names'] must be a list of parameter names (str); {self._STATE_FIX}")
        if len(set(names)) != len(names):
            raise ValueError(f"AdaGC state_dict['names'] holds a name twice; {self._STATE_FIX}")
        if state["gamma"].shape != (len(names),):
            raise ValueError(
                f"AdaGC state_dict['gamma'] must have shape ({len(names)},), one value per name, got "
                f"{tuple(state['gamma'].shape)}; {self._STATE_FIX}"
            )

    def _set_extra_state(self, state: Mapping[str, Any]) -> None:
        self._names = {n: i for i, n in enumerate(state["names"])}
        self._index_cache = None

    def reset(self) -> None:
        super().reset()
        self._names = {}
        self._index_cache = None

    def _index(self, names: tuple[str, ...], device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        for n in names:
            self._names.setdefault(n, len(self._names))
        state = self._state_on(device)
        known = state["gamma"].numel()
        if known < len(self._names):  # new names: +inf until first seen
            fresh = torch.full((len(self._names) - known,), math.inf, dtype=torch.float32, device=device)
            state["gamma"] = torch.cat([state["gamma"], fresh])
        if self._index_cache is None or self._index_cache[0] != names or self._index_cache[1] != device:
            idx = torch.tensor([self._names[n] for n in names], dtype=torch.long).to(device)
            self._index_cache = (names, device, idx)
        return self._index_cache[2], state

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        grads = [i.grad for i in params]
        names = tuple(i.name for i in params)
        per = norms.tensor_norms(grads, 2.0, check=False)
        total = norms.combine_norms(per, 2.0, process_group=self.process_group)
        index, state = self._index(names, per.device)
        gamma_all, step = state["gamma"], state["step"]
        gamma = gamma_all[index]
        finite = torch.isfinite(total)
        warm = step < self.warmup_steps

        global_coef = clip_coefficient(self.lambda_abs, total)
        local_limit = self.lambda_rel * gamma  # inf for a tensor never seen: no clip on first sight
        local_coef = clip_coefficient(local_limit.to(per.dtype), per)
        coefs = torch.where(warm, global_coef.expand_as(per), local_coef)
        coefs = torch.where(finite, coefs, 1.0)  # a non-finite step scales nothing (and changes no statistic)
        clipped_norms = (coefs * per).float()
        ema = torch.where(torch.isinf(gamma), clipped_norms, self.beta * gamma + (1 - self.beta) * clipped_norms)
        new_gamma = torch.where(warm, torch.minimum(gamma, clipped_norms), ema)
        gamma_all.index_put_((index,), torch.where(finite, new_gamma, gamma))
        step.add_(finite.long())

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
