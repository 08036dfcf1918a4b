"""Undo buffers for a guarded step: what the Guard (and the fused step's fallback) copy before a step so that a step
that is not applied leaves the model and optimizer exactly as they were.

* :class:`StepBackup` — device copies of the parameters and the optimizer state, refilled in place with one foreach
  copy per checked step (memory: the parameter bytes plus the optimizer-state bytes).
* :class:`BufferBackup` — a copy of every registered buffer (BatchNorm running statistics, ``num_batches_tracked``),
  taken before the forward pass (memory: the buffer bytes, usually a tiny fraction of the parameters).
* :func:`copy_state` — a detached deep copy of a nested ``state_dict`` on a chosen device (rollback snapshots).
* :class:`Snapshot` — the state of every stateful part of a training run (model, optimizer, scaler, scheduler, EMA,
  clipper), copied to a chosen device, for rollback (memory: one copy of each, held once).
* :class:`RngState` — the random-number generators' states, to replay a step with the same draws (dropout masks) or
  to put the stream back afterwards.
"""

from __future__ import annotations

import copy
import random
import sys
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BufferBackup", "RngState", "Snapshot", "StepBackup", "copy_state"]


class StepBackup:
    """Device copies of the parameters and the optimizer state, taken just before a checked ``optimizer.step()``.

    The copy buffers are allocated once and refilled with one foreach copy per step; only when the optimizer's
    state changes shape (its first step, a new parameter group) is the layout rebuilt.
    """

    def __init__(self) -> None:
        self.sources: list[Tensor] = []  # parameters, then optimizer-state tensors
        self.copies: list[Tensor] = []
        self.params: list[Tensor] = []
        self.layout: list[tuple[Tensor, tuple[str, ...]]] = []  # per parameter: its state's tensor keys
        self.extras: dict[int, dict[str, Any] | None] = {}  # non-tensor state values (and absent states)

    @torch.no_grad()
    def capture(self, params: list[Tensor], optimizer: torch.optim.Optimizer) -> None:
        layout: list[tuple[Tensor, tuple[str, ...]]] = []
        sources = list(params)
        extras: dict[int, dict[str, Any] | None] = {}
        for p in params:
            st = optimizer.state.get(p)
            if not st:
                extras[id(p)] = None
                layout.append((p, ()))
                continue
            keys = tuple(k for k, v in st.items() if isinstance(v, Tensor))
            sources += [st[k] for k in keys]
            extras[id(p)] = {k: copy.deepcopy(v) for k, v in st.items() if not isinstance(v, Tensor)}
            layout.append((p, keys))
        if len(self.copies) != len(sources) or any(
            c.shape != s.shape or c.dtype != s.dtype or c.device != s.device for c, s in zip(self.copies, sources)
        ):
            self.copies = [torch.empty_like(s) for s in sources]
        if sources:
            torch._foreach_copy_(self.copies, sources)
        self.sources, self.params, self.layout, self.extras = sources, params, layout, extras

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        if self.sources:
            torch._foreach_copy_(self.sources, self.copies)  # parameters and state tensors, in place
        i = len(self.params)
        for p, keys in self.layout:
            extra = self.extras.get(id(p))
            if extra is None:  # the optimizer had no state for p before this step
                optimizer.state.pop(p, None)
                continue
            st = optimizer.state[p]
            for k in keys:  # an optimizer that replaced a state tensor (rather than updating it) gets it back
                if st.get(k) is not self.sources[i]:
                    st[k] = self.copies[i].clone()
                i += 1
            st.update(copy.deepcopy(extra))
            for k in [k for k in st if k not in keys and k not in extra]:
                del st[k]


class BufferBackup:
    """A copy of every buffer of the model (BatchNorm running statistics, ``num_batches_tracked``, any registered
    buffer), refilled in place each step, so a step that is not applied leaves them exactly as they were."""

    def __init__(self) -> None:
        self.owners: list[tuple[nn.Module, str]] = []
        self.sources: list[Tensor] = []
        self.copies: list[Tensor] = []

    @torch.no_grad()
    def capture(self, model: nn.Module) -> None:
        owners: list[tuple[nn.Module, str]] = []
        sources: list[Tensor] = []
        for mod in model.modules():
            for name, buf in mod.named_buffers(recurse=False):
                if buf is not None:
                    owners.append((mod, name))
                    sources.append(buf)
        if len(self.copies) != len(sources) or any(
            c.shape != b.shape or c.dtype != b.dtype or c.device != b.device for c, b in zip(self.copies, sources)
        ):
            self.copies = [torch.empty_like(b) for b in sources]
        if sources:
            torch._foreach_copy_(self.copies, sources)
        self.owners, self.sources = owners, sources

    @torch.no_grad()
    def restore_where(self, keep: Tensor) -> None:
        """On the device: each buffer stays as it is where the 0-d bool ``keep`` is true, else gets its saved value
        back (no host read). A buffer the forward pass replaced by another tensor of the same shape, dtype and device
        gets ``where(keep, new, saved)`` as a new tensor (never written in place: it may alias another); one replaced
        by something of another shape (or by ``None``) cannot be chosen on the device and is left as the step left it.
        """
        for (mod, name), src, saved in zip(self.owners, self.sources, self.copies):
            current = getattr(mod, name, None)
            if not isinstance(current, Tensor) or (current.shape, current.dtype, current.device) != (
                saved.shape, saved.dtype, saved.device
            ):
                continue
            chosen = torch.where(keep.to(current.device), current, saved)
            if current is src:
                current.copy_(chosen)
            else:
                setattr(mod, name, chosen)

    @torch.no_grad()
    def restore(self) -> None:
        for (mod, name), src, saved in zip(self.owners, self.sources, self.copies):
            current = getattr(mod, name, None)
            if current is src:
                src.copy_(saved)
            else:  # the forward pass replaced the buffer object: put a copy of the saved value back
                setattr(mod, name, saved.clone())


def copy_state(obj: Any, device: torch.device, into: Any = None) -> Any:
    """A deep copy of a (nested) state_dict with every tensor on ``device`` (a rollback snapshot).

    ``into``: an earlier copy; its tensors are refilled in place wherever the nested layout matches (same keys,
    shapes, dtypes, device), so refreshing a snapshot never holds two copies at once.
    """
    if isinstance(obj, Tensor):
        if isinstance(into, Tensor) and (into.shape, into.dtype, into.device) == (obj.shape, obj.dtype, device):
            return into.copy_(obj.detach())
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        prev = into if isinstance(into, dict) else {}
        return {k: copy_state(v, device, prev.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        same = isinstance(into, (list, tuple)) and len(into) == len(obj)
        return type(obj)(copy_state(v, device, into[i] if same else None) for i, v in enumerate(obj))
    return copy.deepcopy(obj)


class RngState:
    """The state of torch's CPU generator and of every initialised CUDA device's, and with ``python_and_numpy=True``
    also Python's ``random`` and NumPy's global generator (when NumPy is imported), taken at construction.

    :meth:`restore` puts them back, so what runs next draws the same random numbers as what ran after the capture.
    """

    def __init__(self, *, python_and_numpy: bool = False) -> None:
        self.cpu = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        self.cuda = torch.cuda.get_rng_state_all() if cuda else None  # type: ignore[no-untyped-call]
        np = sys.modules.get("numpy") if python_and_numpy else None
        self.python = random.getstate() if python_and_numpy else None
        self.numpy = np.random.get_state() if np is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)  # type: ignore[no-untyped-call]
        if self.python is not None:
            random.setstate(self.python)
        np = sys.modules.get("numpy")
        if np is not None and self.numpy is not None:
            np.random.set_state(self.numpy)


class Snapshot:
    """A rollback point: the ``state_dict`` of each named part (anything with ``state_dict``/``load_state_dict``),
    deep-copied with every tensor on ``device``.

    Memory: one copy of the parts' state, held once. A new snapshot is copied *into* the previous one's tensors
    where their layout is unchanged (the usual case: the same model and optimizer a few steps later), so taking one
    never holds two copies at once; a part whose layout changed (an optimizer's first step creates its state) is
    copied afresh.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.states: dict[str, Any] | None = None

    @torch.no_grad()
    def take(self, parts: dict[str, Any]) -> None:
        old = self.states or {}
        self.states = {name: copy_state(part.state_dict(), self.device, old.get(name)) for name, part in parts.items()}

    def restore(self, parts: dict[str, Any]) -> None:
        """Load the saved state into each part that was saved (``RuntimeError`` when none was taken)."""
        if self.states is None:
            raise RuntimeError("no snapshot to roll back to: pass snapshot_every=N to Guard")
        for name, part in parts.items():
            if name in self.states:
                state = self.states[name]
                # A module copies the values into its own tensors; anything else (an optimizer) may keep the tensors
                # it is given as its state, so it gets a copy: the snapshot must stay intact for a second rollback.
                part.load_state_dict(state if isinstance(part, nn.Module) else copy_state(state, self.device))
