"""The clipper protocol: ``clipper(parameters) -> ClipStats``, checkpointable, composable.

A clipper is called after ``loss.backward()`` and before ``optimizer.step()``. It reads the gradients once through
the norm engine (:mod:`gradguard.norms`), decides a threshold, scales the gradients in place
(:mod:`gradguard.scaling`) and returns a :class:`ClipStats` of device tensors: nothing is read back to the host,
so calling it every step costs no synchronisation on an accelerator.

Stateful clippers (AutoClip, ZClip, AdaGC) declare their statistics as device tensors (:class:`DeviceState`) and
round-trip them exactly through ``state_dict()`` / ``load_state_dict()``: a resumed run computes the same thresholds,
bit for bit, and a state that does not fit is refused before anything changes.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradguard._checks import COMPLEX_DTYPES, FLOAT_DTYPES, check_gradient
from gradguard.clippers.state import DeviceState

__all__ = ["Chain", "ClipStats", "Clipper", "ParamInfo", "Parameters", "name_filter", "resolve_parameters"]

Parameters: TypeAlias = nn.Module | Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]]


@dataclass(frozen=True)
class ClipStats:
    """What a clipper did this step. Every field is a device tensor; reading one on the host is the caller's choice.

    Attributes:
        norm: total gradient norm before clipping (0-d, float32; float64 for float64 gradients). Non-finite when
            any gradient holds a NaN or an infinity: ``torch.isfinite(stats.norm)`` is the step's finite flag.
        threshold: the global limit applied this step (0-d); ``inf`` when the strategy set none (per-tensor
            strategies report their limits in ``tensor_thresholds``).
        coef: the global factor applied (0-d, <= 1); for per-tensor or per-unit strategies the smallest one.
        clipped: whether any gradient was scaled down (0-d bool).
        names: parameter names, in the order of the per-tensor fields (empty when those are absent).
        tensor_norms: per-parameter gradient norms before clipping, or ``None``.
        tensor_coefs: per-parameter factors applied (the smallest unit's, for AGC), or ``None``.
        tensor_thresholds: per-parameter limits, or ``None``.
    """

    norm: Tensor
    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    names: tuple[str, ...] = ()
    tensor_norms: Tensor | None = None
    tensor_coefs: Tensor | None = None
    tensor_thresholds: Tensor | None = None

    @property
    def finite(self) -> Tensor:
        """0-d bool tensor: all gradients were finite (from the same pass that gave ``norm``)."""
        return torch.isfinite(self.norm)

    def as_dict(self) -> dict[str, float | bool]:
        """The scalar fields read on the host (one synchronisation); for logging at an interval."""
        values = torch.stack([self.norm.float(), self.threshold.float(), self.coef.float(), self.clipped.float()])
        norm, threshold, coef, clipped = values.tolist()
        return {"norm": norm, "threshold": threshold, "coef": coef, "clipped": bool(clipped)}

    @staticmethod
    def unclipped(device: torch.device | None = None, norm: Tensor | None = None) -> ClipStats:
        """Stats for a step where nothing was clipped (no gradients, or a pass-through)."""
        n = norm if norm is not None else torch.zeros((), device=device)
        return ClipStats(
            norm=n,
            threshold=torch.full((), float("inf"), device=n.device),
            coef=torch.ones((), device=n.device),
            clipped=torch.zeros((), dtype=torch.bool, device=n.device),
        )


class ParamInfo(NamedTuple):
    """A parameter with a gradient, its qualified name, and the module that owns it (when known)."""

    name: str
    param: Tensor
    module: nn.Module | None = None

    @property
    def grad(self) -> Tensor:
        """The parameter's gradient (set: clippers only see parameters that have one)."""
        return self.param.grad  # type: ignore[return-value]


def resolve_parameters(parameters: Parameters, *, with_grad: bool = True) -> list[ParamInfo]:
    """Turn a module, a tensor, an iterable of tensors or of ``(name, tensor)`` pairs into :class:`ParamInfo` s.

    A module gives qualified names and owning modules (so AGC can tell a ConvTranspose weight); tied parameters
    appear once. Unnamed tensors are named by position (``"0"``, ``"1"``, ...). With ``with_grad`` only parameters
    whose ``.grad`` is set are returned, and those gradients are checked (dense, floating point or complex).
    """
    infos = _collect_infos(parameters)
    for info in infos:
        if not isinstance(info.param, Tensor):
            raise TypeError(f"parameter {info.name!r} must be a torch.Tensor, got {type(info.param).__name__}")
    if not with_grad:
        return infos
    infos = [i for i in infos if i.param.grad is not None]
    ok = FLOAT_DTYPES | COMPLEX_DTYPES
    for info in infos:
        g = info.grad
        if g.layout != torch.strided or g.dtype not in ok:
            check_gradient(g, f"the gradient of {info.name!r}")
    return infos


def _collect_infos(parameters: Parameters) -> list[ParamInfo]:
    """Name every parameter of ``parameters`` (unchecked): the dispatch on its kind for :func:`resolve_parameters`."""
    if isinstance(parameters, nn.Module):
        return _module_infos(parameters)
    if isinstance(parameters, Tensor):
        return [ParamInfo("0", parameters)]
    if isinstance(parameters, Mapping):
        return [ParamInfo(str(k), v) for k, v in parameters.items()]
    if isinstance(parameters, Iterable) and not isinstance(parameters, (str, bytes)):
        return _iterable_infos(parameters)
    raise TypeError(
        "parameters must be an nn.Module, a tensor, or an iterable of tensors or (name, tensor) pairs; "
        f"got {type(parameters).__name__}"
    )


def _module_infos(module: nn.Module) -> list[ParamInfo]:
    """A module's parameters with qualified names and owning modules; a tied parameter appears once."""
    infos: list[ParamInfo] = []
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                infos.append(ParamInfo(f"{mod_name}.{p_name}" if mod_name else p_name, p, mod))
    return infos


def _iterable_infos(parameters: Iterable[Any]) -> list[ParamInfo]:
    """Tensors (named by position) or ``(name, tensor)`` pairs; anything else is a TypeError naming its index."""
    infos: list[ParamInfo] = []
    for i, item in enumerate(parameters):
        if isinstance(item, Tensor):
            infos.append(ParamInfo(str(i), item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            infos.append(ParamInfo(item[0], item[1]))
        else:
            raise TypeError(
                f"parameters[{i}] must be a tensor or a (name, tensor) pair, got {type(item).__name__}; pass "
                "a module, model.parameters() or model.named_parameters()"
            )
    return infos


def name_filter(
    exclude: str | Iterable[str] | Callable[[str], bool] | None, arg: str = "exclude"
) -> Callable[[str], bool]:
    """A predicate on parameter names from exact names / glob patterns (``"head.*"``) or a callable."""
    if exclude is None:
        return lambda name: False
    if callable(exclude):
        return exclude
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{arg} must hold parameter names or glob patterns (str), got {type(p).__name__}")
    exact = {p for p in patterns if not any(c in p for c in "*?[")}
    globs = [p for p in patterns if p not in exact]
    return lambda name: name in exact or any(fnmatch.fnmatchcase(name, g) for g in globs)


class Clipper(DeviceState):
    """Base class: ``clipper(parameters) -> ClipStats``. Subclasses implement :meth:`clip`.

    Stateless clippers need nothing more. Stateful ones declare their tensors in ``_state_spec()`` (name ->
    :class:`~gradguard.clippers.state.StateSpec`) and use ``self._state_on(device)`` in :meth:`clip`; ``state_dict``,
    the validated, atomic ``load_state_dict``, ``reset`` and device migration come from :class:`DeviceState`.
    The contract (see docs/extending.md): read gradients only through :mod:`gradguard.norms`, scale only through
    :mod:`gradguard.scaling`, never read a device value on the host, and leave every statistic unchanged when the
    norm is not finite.

    Distributed training: DTensor gradients (FSDP2, tensor parallel) are reduced by the norm engine on their own.
    When the ranks of a process group hold *disjoint* plain gradients (pipeline stages, experts), call
    :meth:`set_process_group` once so global norms, and hence thresholds and adaptive statistics, cover all of them
    and agree on every rank. Subclasses pass :attr:`process_group` to the engine's global-norm calls.
    """

    _process_group: dist.ProcessGroup | None = None

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The group global norms are reduced over (``None``: no reduction of plain tensors)."""
        return self._process_group

    def set_process_group(self, group: dist.ProcessGroup | None) -> Clipper:
        """Reduce global norms over ``group``, whose ranks hold disjoint gradients; ``None`` turns it off.

        Returns the clipper, so ``gg.ZClip().set_process_group(pp_group)`` reads naturally. Not saved in
        ``state_dict`` (a process group is not checkpointable).
        """
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"group must be a torch.distributed.ProcessGroup (e.g. from dist.new_group(ranks)) or None, got "
                f"{type(group).__name__}"
            )
        self._process_group = group
        return self

    def __call__(self, parameters: Parameters) -> ClipStats:
        """Clip the gradients of ``parameters`` in place and return what was done."""
        infos = resolve_parameters(parameters)
        with torch.no_grad():
            if not infos:
                return ClipStats.unclipped()
            return self.clip(infos)

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        """Clip ``params`` (all have gradients, already checked). Runs under ``torch.no_grad()``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Chain(Clipper):
    """Apply clippers in order, e.g. ``Chain(AGC(0.01), NormClip(1.0))`` (per-unit first, then a global cap).

    The combined stats report the norm before the first clipper, the product of the factors applied, the tightest
    threshold, and whether any clipper clipped. ``state_dict`` nests the children's states under ``"0"``, ``"1"``...
    """

    def __init__(self, *clippers: Clipper) -> None:
        if not clippers:
            raise ValueError("Chain needs at least one clipper, e.g. Chain(gg.AGC(), gg.NormClip(1.0))")
        for i, c in enumerate(clippers):
            if not isinstance(c, Clipper):
                raise TypeError(f"Chain argument {i} must be a gradguard Clipper, got {type(c).__name__}")
        self.clippers = tuple(clippers)

    def set_process_group(self, group: dist.ProcessGroup | None) -> Clipper:
        """Set ``group`` on this chain and every clipper in it."""
        super().set_process_group(group)
        for c in self.clippers:
            c.set_process_group(group)
        return self

    def clip(self, params: list[ParamInfo]) -> ClipStats:
        stats = [c.clip(params) for c in self.clippers]
        first = stats[0]
        coef = first.coef
        threshold = first.threshold
        clipped = first.clipped
        for s in stats[1:]:
            coef = coef * s.coef
            threshold = torch.minimum(threshold, s.threshold)
            clipped = clipped | s.clipped
        return ClipStats(
            norm=first.norm, threshold=threshold, coef=coef, clipped=clipped, names=first.names,
            tensor_norms=first.tensor_norms,
        )

    def state_dict(self) -> dict[str, Any]:
        """The children's states under ``"0"``, ``"1"``...; ``{}`` while none has state."""
        states = {str(i): c.state_dict() for i, c in enumerate(self.clippers)}
        return states if any(states.values()) else {}

    def _prepare_load(self, state_dict: Mapping[str, Any]) -> Callable[[], None]:
        """Every child's state validated before any child changes (all or nothing)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"Chain.load_state_dict expects a mapping (from state_dict()), got {type(state_dict).__name__}"
            )
        if not state_dict:
            return self.reset
        expected = {str(i) for i in range(len(self.clippers))}
        if set(state_dict) != expected:
            raise ValueError(
                f"Chain state_dict must have keys {sorted(expected)}, got {sorted(state_dict)}; construct the Chain "
                "with the clippers the checkpoint was saved with"
            )
        commits = [
            c._prepare_load(state_dict[str(i)])
            if type(c).load_state_dict is DeviceState.load_state_dict
            else functools.partial(c.load_state_dict, state_dict[str(i)])  # a clipper with its own (not atomic)
            for i, c in enumerate(self.clippers)
        ]

        def commit() -> None:
            for c in commits:
                c()

        return commit

    def reset(self) -> None:
        for c in self.clippers:
            c.reset()

    def keep_where(self, keep: Tensor, before: Mapping[str, Any]) -> None:
        """Each child's :meth:`~gradguard.clippers.state.DeviceState.keep_where` with its part of ``before``."""
        for i, c in enumerate(self.clippers):
            c.keep_where(keep, before.get(str(i), {}) if before else {})
