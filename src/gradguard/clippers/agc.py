r"""Adaptive Gradient Clipping, unit-wise (Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image
Recognition Without Normalization", ICML 2021, arXiv:2102.06171, section 4).

For every unit :math:`i` (an output unit of a layer) with weights :math:`W^i` and gradient :math:`G^i`:

.. math::
    m^i = \lambda \max(\|W^i\|_F, \epsilon), \qquad
    G^i \leftarrow \begin{cases} G^i \, m^i / \max(\|G^i\|_F, 10^{-6}) & \text{if } \|G^i\|_F > m^i \\
                                 G^i & \text{otherwise.} \end{cases}

Units in PyTorch layouts: Linear ``[out, in]`` and ConvNd ``[out, in/g, *k]`` use dim 0 (one unit per row);
ConvTransposeNd weights are ``[in, out/g, *k]``, so their output units are along dim 1 (within each group) — timm's
``adaptive_clip_grad`` uses dim 0 there, which mixes units. 0-d and 1-d tensors (biases, norm scales) are one unit.
A gradient is never scaled up. The paper does not clip the final classifier: pass its names in ``exclude``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from gradguard import norms
from gradguard._checks import check_nonnegative, check_norm_type
from gradguard._compat import CONV_TRANSPOSE
from gradguard.clippers.base import Clipper, ClipStats, ParamInfo, name_filter
from gradguard.distributed import is_dtensor
from gradguard.scaling import scale_, scale_units_

__all__ = ["AGC", "unit_layout"]

_MIN_GRAD_NORM = 1e-6


def unit_layout(param: Tensor, module: nn.Module | None) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(view_shape, reduce_dims)`` that exposes the output units of ``param``, or ``None`` for a single unit."""
    if param.dim() <= 1:
        return None
    is_weight = module is not None and getattr(module, "weight", None) is param
    if is_weight and isinstance(module, CONV_TRANSPOSE):
        g = int(module.groups)  # type: ignore[arg-type]  # ConvTranspose*d.groups is an int
        return (g, param.shape[0] // g, param.shape[1], -1), (1, 3)
    return (param.shape[0], -1), (1,)


def _agc_coef(w_norm: Tensor, g_norm: Tensor, clipping: float, eps: float) -> Tensor:
    """Per-unit factor: ``m / max(g, 1e-6)`` where ``g > m = clipping * max(w, eps)``, else 1 (NaN-safe: 1)."""
    limit = w_norm.clamp(min=eps).mul_(clipping)
    return torch.where(g_norm > limit, limit / g_norm.clamp(min=_MIN_GRAD_NORM), 1.0)


class AGC(Clipper):
    r"""Unit-wise adaptive gradient clipping (NFNets), batched and correct for ConvTranspose.

    .. math:: G^i \leftarrow G^i \cdot \min\Big(1, \frac{\lambda \max(\|W^i\|, \epsilon)}{\max(\|G^i\|, 10^{-6})}\Big)

    Args:
        clipping: :math:`\lambda`, the largest allowed ratio of gradient to weight norm per unit (paper: 0.01 for
            large batches, larger for small ones).
        eps: :math:`\epsilon`, the floor on weight norms, so zero-initialised units can still move.
        exclude: parameter names (exact, or glob patterns such as ``"head.*"``) or a predicate on the name; the
            paper excludes the final linear layer. Excluded gradients are not clipped (but count in ``stats.norm``).
        norm_type: the unit norm (2 in the paper).

    Pass the module (``clipper(model)``) so ConvTranspose weights are recognised; with bare tensors every
    weight uses dim 0. ``stats.coef`` is the smallest factor over all units; per-parameter detail is included.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> model(torch.randn(16, 4)).pow(2).sum().mul(1e3).backward()
        >>> stats = gg.AGC(clipping=0.01, exclude=["2.*"])(model)
        >>> w, g = model[0].weight, model[0].weight.grad
        >>> bool((g.norm(dim=1) <= 0.01 * w.norm(dim=1).clamp(min=1e-3) * (1 + 1e-5)).all())
        True
    """

    def __init__(
        self,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: str | Iterable[str] | Callable[[str], bool] | None = None,
        norm_type: float | str = 2.0,
    ) -> None:
        self.clipping = check_nonnegative(clipping, "clipping", allow_inf=False)
        self.eps = check_nonnegative(eps, "eps", allow_inf=False)
        self.norm_type = check_norm_type(norm_type)
        self.exclude = exclude
        self._excluded = name_filter(exclude)

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        self._check_sharded(params)  # before any gradient is touched
        p = self.norm_type
        unitwise, whole, skipped = self._partition(params)
        parts: list[tuple[list[int], Tensor]] = []  # (parameter indices, their gradient norms)
        units = self._units([params[k] for k in unitwise]) if unitwise else None
        if units is not None:
            parts.append((unitwise, norms.group_norms(units.g_all, units.owner, len(unitwise), p)))
        whole_grads = [params[k].grad for k in whole]
        whole_norms = norms.tensor_norms(whole_grads, p, check=False) if whole else None
        if whole_norms is not None:
            parts.append((whole, whole_norms))
        if skipped:
            parts.append((skipped, norms.tensor_norms([params[k].grad for k in skipped], p, check=False)))
        dtype = torch.float64 if any(n.dtype == torch.float64 for _, n in parts) else torch.float32
        device = parts[0][1].device
        order = [k for idx, _ in parts for k in idx]
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        inverse = inverse.to(device)  # back to parameter order
        per = torch.cat([n.to(device, dtype) for _, n in parts])[inverse]
        total = norms.combine_norms(per, p, process_group=self.process_group)
        finite = torch.isfinite(total)  # a non-finite step leaves every gradient as it was
        coef_parts: list[Tensor] = []
        if units is not None:
            coef_parts.append(self._scale_units(units, finite))
        if whole_norms is not None:
            w_norms = norms.tensor_norms([params[k].param.detach() for k in whole], p, check=False)
            whole_coefs = torch.where(finite, _agc_coef(w_norms, whole_norms, self.clipping, self.eps), 1.0)
            scale_(whole_grads, whole_coefs)
            coef_parts.append(whole_coefs)
        if skipped:
            coef_parts.append(torch.ones(len(skipped), dtype=dtype, device=device))
        per_coef = torch.cat([c.to(device, dtype) for c in coef_parts])[inverse]
        coef_min = per_coef.amin()
        return ClipStats(
            norm=total,
            threshold=torch.full((), math.inf, dtype=dtype, device=device),
            coef=coef_min,
            clipped=coef_min < 1,
            names=tuple(i.name for i in params),
            tensor_norms=per,
            tensor_coefs=per_coef,
        )

    def _partition(self, params: list[ParamInfo]) -> tuple[list[int], list[int], list[int]]:
        """Indices of (multi-unit, single-unit, excluded) parameters."""
        unitwise: list[int] = []
        whole: list[int] = []
        skipped: list[int] = []
        for k, info in enumerate(params):
            if self._excluded(info.name):
                skipped.append(k)
            elif unit_layout(info.param, info.module) is None:
                whole.append(k)
            else:
                unitwise.append(k)
        return unitwise, whole, skipped

    def _check_sharded(self, params: list[ParamInfo]) -> None:
        for info in params:
            if is_dtensor(info.grad) and info.param.dim() > 1 and not self._excluded(info.name):
                raise TypeError(
                    f"AGC cannot clip the sharded (DTensor) gradient of {info.name!r} unit-wise yet: its units may "
                    "span ranks. Use a global-norm strategy under FSDP2 / tensor parallel (gg.NormClip, gg.ZClip, "
                    "gg.AutoClip, gg.AdaGC), or exclude the parameter with AGC(exclude=[...])"
                )

    def _units(self, params: list[ParamInfo]) -> _Units:
        """Unit views and unit norms of every multi-unit tensor, batched (a handful of ops, not a dozen per tensor)."""
        p = self.norm_type
        views: list[Tensor] = []  # unit views of the gradients (contiguous copies for rare strided ones)
        strided: list[tuple[Tensor, Tensor]] = []  # (gradient, its contiguous copy) to write back
        unit_g: list[Tensor] = []
        w_units: list[Tensor] = []
        for info in params:
            layout = unit_layout(info.param, info.module)
            assert layout is not None
            view_shape, dims = layout
            grad = info.grad
            shape = _view_shape(grad, view_shape)
            view = grad.view(shape) if grad.is_contiguous() else grad.reshape(shape).clone()
            if not grad.is_contiguous():
                strided.append((grad, view))
            views.append(view)
            unit_g.append(norms.unit_norms(view, None, dims, p))
            w_units.append(norms.unit_norms(info.param.detach(), view_shape, dims, p))
        device = unit_g[0].device
        counts = [u.numel() for u in unit_g]
        owner = torch.repeat_interleave(
            torch.arange(len(params), device=device), torch.tensor(counts, device=device), output_size=sum(counts)
        )
        g_all = torch.cat([u.reshape(-1).to(device) for u in unit_g])
        w_all = torch.cat([u.reshape(-1).to(device) for u in w_units]).to(g_all.dtype)
        return _Units(views, strided, [u.shape for u in unit_g], counts, owner, g_all, w_all)

    def _scale_units(self, units: _Units, finite: Tensor) -> Tensor:
        """Scale every unit by its factor (1 everywhere when ``finite`` is false); each tensor's smallest factor."""
        coef_all = torch.where(finite, _agc_coef(units.w_all, units.g_all, self.clipping, self.eps), 1.0)
        smallest = torch.ones(len(units.views), dtype=coef_all.dtype, device=coef_all.device).scatter_reduce_(
            0, units.owner, coef_all, reduce="amin"
        )
        coefs = [c.view(shape) for c, shape in zip(torch.split(coef_all, units.counts), units.shapes)]
        scale_units_(units.views, coefs, smallest)
        for grad, copy in units.strided:
            grad.copy_(copy.view(grad.shape))
        return smallest


class _Units(NamedTuple):
    views: list[Tensor]
    strided: list[tuple[Tensor, Tensor]]
    shapes: list[torch.Size]
    counts: list[int]
    owner: Tensor  # the tensor (0..n-1) each unit belongs to
    g_all: Tensor  # every unit's gradient norm, concatenated
    w_all: Tensor  # every unit's weight norm


def _view_shape(t: Tensor, view_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Resolve the ``-1`` of ``view_shape`` for ``t``."""
    known = math.prod([s for s in view_shape if s != -1])
    return tuple(t.numel() // known if s == -1 else s for s in view_shape)
