"""The one state mechanism of the clippers (:class:`DeviceState`: declared device tensors, migrated with the data,
saved and loaded atomically) and the argument checks they share (each names the argument and the fix)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Set
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["DeviceState", "StateSpec", "check_int", "check_number", "check_state_keys", "check_state_tensor"]


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number within ``[low, high]`` (an end is excluded when ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    lo_bad = low is not None and (v <= low if low_open else v < low)
    hi_bad = high is not None and (v >= high if high_open else v > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        interval = f"{lo or '(-inf'}, {hi or 'inf)'}"
        raise ValueError(f"{name} must be in {interval}, got {v:g}")
    return v


def check_int(value: Any, name: str, *, low: int = 0) -> int:
    """An integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    if int(value) < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_state_keys(
    state: Mapping[str, Any],
    required: Set[str],
    optional: Set[str],
    owner: str,
    fix: str = "was it saved from a different clipper?",
) -> None:
    """A state_dict has the required keys and nothing unknown."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner}.load_state_dict expects a mapping, got {type(state).__name__}")
    missing = required - set(state)
    unknown = set(state) - required - optional
    if missing or unknown:
        raise ValueError(
            f"{owner} state_dict does not match: missing {sorted(missing)}, unknown {sorted(unknown)}; {fix}"
        )


class StateSpec(NamedTuple):
    """One declared state tensor of a :class:`DeviceState`: its shape, dtype, initial fill and allowed values.

    ``shape`` may hold ``-1`` for a dimension of any length (allocated empty; the owner grows it). On load, values
    must be ``>= low`` and NaN / infinity are refused unless ``nan`` / ``inf`` allow them (NaN marks an empty slot,
    +inf an unseen entry). ``fix`` says how to build a clipper a mismatched shape fits.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float = 0.0
    low: float = -math.inf
    nan: bool = False
    inf: bool = False
    fix: str = "construct it with the settings the checkpoint was saved with"


def check_state_tensor(value: Any, key: str, spec: StateSpec, owner: str) -> Tensor:
    """A detached clone of ``value`` if it fits ``spec``; else a ValueError/TypeError naming ``key`` and the fix.

    The value checks read the tensor on the host (loading is not the hot path); ``meta`` tensors have no values
    and are checked for type, dtype and shape only.
    """
    where = f"{owner} state_dict[{key!r}]"
    if not isinstance(value, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(value).__name__}; pass the dict state_dict() made")
    if value.dtype != spec.dtype:
        raise TypeError(f"{where} must have dtype {spec.dtype}, got {value.dtype}; pass the dict state_dict() made")
    ok = value.dim() == len(spec.shape) and all(s in (-1, n) for s, n in zip(spec.shape, value.shape))
    if not ok:
        want = tuple("any" if s == -1 else s for s in spec.shape)
        raise ValueError(f"{where} must have shape {want}, got {tuple(value.shape)}; {spec.fix}")
    value = value.detach().clone()
    if value.device.type == "meta" or value.numel() == 0:
        return value
    v = value.double()
    if not spec.nan and bool(torch.isnan(v).any()):
        raise ValueError(f"{where} holds NaN; it must come from a run whose statistics were finite")
    if not spec.inf and bool(torch.isinf(v).any()):
        raise ValueError(f"{where} holds an infinity; it must come from a run whose statistics were finite")
    if bool((v < spec.low).any()):
        raise ValueError(
            f"{where} holds {float(v[v < spec.low].min()):g}, below its lower bound {spec.low:g} (norms and "
            "counts are never negative); the checkpoint is corrupt or from another clipper"
        )
    return value


class DeviceState:
    """Declared state tensors on the device, migrated with the data, saved and loaded atomically.

    A subclass declares its tensors in :meth:`_state_spec` (name -> :class:`StateSpec`) and reads them with
    ``self._state_on(device)``: allocated (filled per spec) on first use on the device the data lives on, moved
    there if it lives elsewhere (a checkpoint loaded on CPU, a model moved to another device). Non-tensor state
    (e.g. AdaGC's parameter names) goes through :meth:`_extra_state` / :meth:`_set_extra_state`; cross-field rules
    (a count that must match a history) through :meth:`_check_state`.

    :meth:`load_state_dict` validates everything — keys, types, dtypes, shapes, signs, finite values, the
    cross-field rules — before changing anything: a rejected state leaves the object exactly as it was.
    """

    _STATE_FIX = "construct it with the settings the checkpoint was saved with"

    def _state_spec(self) -> Mapping[str, StateSpec]:
        """The declared state tensors (empty: stateless)."""
        return {}

    def _tensors(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = vars(self).setdefault("_state", {})
        return state

    def _state_on(self, device: torch.device) -> dict[str, Tensor]:
        """The state tensors on ``device``, allocated on first use and migrated when they live elsewhere."""
        state = self._tensors()
        if not state:
            for key, spec in self._state_spec().items():
                shape = tuple(0 if s == -1 else s for s in spec.shape)
                state[key] = torch.full(shape, spec.fill, dtype=spec.dtype, device=device)
        elif any(t.device != device for t in state.values()):
            for key in list(state):
                state[key] = state[key].to(device)
        return state

    def _extra_state(self) -> dict[str, Any]:
        """Non-tensor state saved beside the tensors (only when the tensors exist)."""
        return {}

    def _set_extra_state(self, state: Mapping[str, Any]) -> None:
        """Install validated non-tensor state (must not raise: :meth:`_check_state` has accepted it)."""

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Cross-field checks on a state whose tensors passed their specs (clones): raise, never mutate."""

    def reset(self) -> None:
        """Forget all statistics, as if freshly constructed."""
        self._state: dict[str, Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        """The state needed to resume exactly (tensors are cloned; ``{}`` before the first step)."""
        state = self._tensors()
        if not state:
            return {}
        return {**{k: v.clone() for k, v in state.items()}, **self._extra_state()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`, all or nothing (``{}`` resets)."""
        self._prepare_load(state_dict)()

    @torch.no_grad()
    def keep_where(self, keep: Tensor, before: Mapping[str, Any]) -> None:
        """Decide on the device whether this step's statistics stand: where the 0-d bool ``keep`` is true the state
        stays as it is now, else it goes back to ``before`` (a :meth:`state_dict` taken before the step), with
        ``where`` on every tensor and no host read. A tensor that did not exist before (``before`` is ``{}``) or that
        grew (AdaGC meeting a new parameter) goes back to its spec's fill for the new part (the value of an unseen
        entry: AdaGC's is +inf). Non-tensor state is kept.
        """
        spec = self._state_spec()
        for key, now in self._tensors().items():
            flag = keep.to(now.device)
            fill = torch.full_like(now, spec[key].fill) if key in spec else now.clone()
            old = before.get(key) if before else None
            if isinstance(old, Tensor) and old.dim() == now.dim() and old.shape[1:] == now.shape[1:]:
                n = min(old.shape[0], now.shape[0]) if now.dim() else 0
                if now.dim() == 0:
                    fill = old.to(now.device)
                else:
                    fill[:n] = old[:n].to(now.device)
            now.copy_(torch.where(flag, now, fill))

    def _prepare_load(self, state_dict: Mapping[str, Any]) -> Callable[[], None]:
        """Validate ``state_dict`` completely and return the (non-failing) function that installs it."""
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{owner}.load_state_dict expects a mapping (from state_dict()), got {type(state_dict).__name__}"
            )
        spec = self._state_spec()
        if not state_dict:
            return self.reset
        if not spec:
            raise ValueError(
                f"{owner} is stateless, got a non-empty state_dict {sorted(state_dict)}; was it saved from a "
                "different clipper?"
            )
        extra = set(self._extra_state_keys())
        check_state_keys(state_dict, set(spec) | extra, set(), owner, fix=self._STATE_FIX)
        tensors = {k: check_state_tensor(state_dict[k], k, s, owner) for k, s in spec.items()}
        merged = {**{k: state_dict[k] for k in extra}, **tensors}
        self._check_state(merged)

        def commit() -> None:
            self._state = dict(tensors)
            self._set_extra_state(merged)

        return commit

    def _extra_state_keys(self) -> Set[str]:
        """The keys of :meth:`_extra_state`."""
        return frozenset()
