r"""Fixed-threshold clippers: the functional core as objects, and per-layer clipping.

* :class:`NormClip` — global norm clipping (Pascanu et al., ICML 2013):
  :math:`g \leftarrow \min(1, \tau / (\|g\|_p + 10^{-6}))\, g`.
* :class:`ValueClip` — element-wise clamping :math:`g \leftarrow \operatorname{clamp}(g, -v, v)`.
* :class:`LayerwiseClip` — each group :math:`G` (a parameter, a module, or any grouping of names) clipped by its own
  norm: :math:`g_G \leftarrow \min(1, \tau / (\|g_G\|_p + 10^{-6}))\, g_G`, so one exploding layer does not shrink the
  others (the "uneven layers" caveat of a single global factor).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from gradguard import norms
from gradguard._checks import check_nonnegative, check_norm_type
from gradguard.clippers.base import Clipper, ClipStats, ParamInfo
from gradguard.functional import clip_grad_value_
from gradguard.scaling import clip_coefficient, scale_

__all__ = ["LayerwiseClip", "NormClip", "ValueClip"]


def _full(value: float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=like.dtype, device=like.device)


class NormClip(Clipper):
    r"""Clip the global p-norm of the gradients to ``max_norm`` (the object form of :func:`gradguard.clip_grad_norm_`).

    .. math:: c = \min\Big(1, \frac{\text{max\_norm}}{\|g\|_p + 10^{-6}}\Big), \qquad g \leftarrow c\,g

    Reference: Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks", ICML 2013.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Linear(4, 1)
        >>> model(torch.ones(2, 4)).sum().mul(10).backward()
        >>> stats = gg.NormClip(max_norm=1.0)(model)
        >>> bool(stats.clipped), round(float(gg.get_total_norm([p.grad for p in model.parameters()])), 4)
        (True, 1.0)
    """

    def __init__(self, max_norm: float, norm_type: float | str = 2.0) -> None:
        self.max_norm = check_nonnegative(max_norm, "max_norm")
        self.norm_type = check_norm_type(norm_type)

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        grads = [i.grad for i in params]
        total = norms.total_norm(grads, self.norm_type, check=False, process_group=self.process_group)
        coef = clip_coefficient(self.max_norm, total)
        scale_(grads, coef)
        return ClipStats(norm=total, threshold=_full(self.max_norm, total), coef=coef, clipped=coef < 1)


class ValueClip(Clipper):
    r"""Clamp every gradient element into ``[-clip_value, clip_value]`` (the object form of :func:`clip_grad_value_`).

    .. math:: g \leftarrow \operatorname{clamp}(g, -v, v)

    ``stats.norm`` is the 2-norm before clipping (the finite flag); ``stats.coef`` is the strongest shrink applied to
    any element, :math:`\min(1, v / \max|g|)`. On CPU the clamp pass is skipped when no element exceeds ``v``.
    NaN elements stay NaN (they are reported, not hidden).

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.zeros(3, requires_grad=True); w.grad = torch.tensor([-4.0, 0.5, 2.0])
        >>> stats = gg.ValueClip(1.0)([w])
        >>> w.grad, round(float(stats.coef), 4)
        (tensor([-1.0000,  0.5000,  1.0000]), 0.25)
    """

    def __init__(self, clip_value: float) -> None:
        self.clip_value = check_nonnegative(clip_value, "clip_value")

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        grads = [i.grad for i in params]
        total = norms.total_norm(grads, 2.0, check=False, process_group=self.process_group)
        peak = norms.total_norm(grads, math.inf, check=False, process_group=self.process_group)
        coef = clip_coefficient(self.clip_value, peak)
        clipped = peak > self.clip_value
        # CPU, eager: skip the write pass when nothing exceeds the value (a host read, free there; none when compiled)
        if torch.compiler.is_compiling() or not peak.is_cpu or bool(clipped):
            clip_grad_value_([i.param for i in params], self.clip_value)
        return ClipStats(norm=total, threshold=_full(self.clip_value, total), coef=coef, clipped=clipped)


GroupBy = str | Callable[[str], str]


class LayerwiseClip(Clipper):
    r"""Clip each group of parameters by its own norm.

    .. math:: c_G = \min\Big(1, \frac{\text{max\_norm}}{\|g_G\|_p + 10^{-6}}\Big), \qquad g_G \leftarrow c_G\,g_G

    Args:
        max_norm: the limit for every group's norm.
        norm_type: p in (0, inf].
        groups: ``"parameter"`` (each tensor alone), ``"module"`` (parameters of the same module together:
            ``"encoder.0.weight"`` and ``"encoder.0.bias"`` form ``"encoder.0"``), or a function from a parameter
            name to a group key.

    Per-parameter norms, factors and the threshold are reported in the stats; the global ``coef`` is the smallest.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> model(torch.ones(1, 2)).sum().mul(100).backward()
        >>> stats = gg.LayerwiseClip(1.0, groups="module")(model)
        >>> norms = gg.grad_norms(model)
        >>> [round(float(torch.hypot(norms[f"{m}.weight"], norms[f"{m}.bias"])), 4) for m in ("0", "1")]
        [1.0, 1.0]
    """

    def __init__(self, max_norm: float, norm_type: float | str = 2.0, groups: GroupBy = "parameter") -> None:
        self.max_norm = check_nonnegative(max_norm, "max_norm")
        self.norm_type = check_norm_type(norm_type)
        if not (callable(groups) or groups in ("parameter", "module")):
            raise ValueError(
                f"groups must be 'parameter', 'module' or a function name -> group key, got {groups!r}"
            )
        self.groups = groups
        self._cache: tuple[tuple[str, ...], torch.device, Tensor, int] | None = None

    def _group_index(self, names: tuple[str, ...], device: torch.device) -> tuple[Tensor, int]:
        if self._cache is not None and self._cache[0] == names and self._cache[1] == device:
            return self._cache[2], self._cache[3]
        if self.groups == "parameter":
            keys: list[object] = list(names)
        elif self.groups == "module":
            keys = [n.rsplit(".", 1)[0] if "." in n else "" for n in names]
        else:
            keys = [self.groups(n) for n in names]  # type: ignore[operator]
        ids: dict[object, int] = {}
        index = torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long).to(device)
        self._cache = (names, device, index, len(ids))
        return index, len(ids)

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        grads = [i.grad for i in params]
        names = tuple(i.name for i in params)
        per = norms.tensor_norms(grads, self.norm_type, check=False)
        total = norms.combine_norms(per, self.norm_type, process_group=self.process_group)
        index, n_groups = self._group_index(names, per.device)
        group_coef = clip_coefficient(self.max_norm, norms.group_norms(per, index, n_groups, self.norm_type))
        coefs = torch.where(torch.isfinite(total), group_coef[index], 1.0)  # a non-finite step: nothing scaled
        scale_(grads, coefs)
        coef = coefs.amin()
        return ClipStats(
            norm=total,
            threshold=_full(self.max_norm, per),
            coef=coef,
            clipped=coef < 1,
            names=names,
            tensor_norms=per,
            tensor_coefs=coefs,
            tensor_thresholds=torch.full_like(per, self.max_norm),
        )
