r"""Preflight: would this ``optimizer.step()`` put a non-finite value into the weights? Answered before the step, by
running the optimizer's own update on copies of a few percent of the parameters at a time.

A learning rate that is too high (or an optimizer state gone bad) can turn finite gradients into non-finite weights.
Checking the weights *after* the step needs an undo: a copy of the parameters and the optimizer state taken before
it (for AdamW, 3x the parameter bytes; a 7B model's 84 GB). The preflight needs none. For each *chunk* of at most

.. math:: B = \max(0.01 \cdot \text{parameter bytes},\; 1\,\text{MiB})

bytes (parameter + gradient + optimizer-state copies, and the update's own temporaries), it copies the chunk's
parameters, gradients and state into a *scratch optimizer* — the same class with the same parameter-group settings,
no hooks, owning only the copies — calls its ``step()``, and folds ``isfinite`` of the stepped copies into one device
flag. The copies live in a workspace the size of the largest chunk, allocated once and reused by every chunk and every
step, so the extra memory is one chunk: at most 1% of the parameter bytes for any model above 100 MiB of parameters
(the Guard's whole extra memory then stays under 5%: BENCHMARKS.md).
Nothing of the real parameters, gradients, optimizer state, hooks or LR scheduler is touched, and there
is no host read (the flag stays on the device until the Guard reads its decision).

The dry-run is exact because it runs the same update code on the same values: a parameter's new value depends only
on its own gradient and state (and the group's settings). For the *elementwise* torch optimizers (SGD, Adam, AdamW,
Adamax, NAdam, RAdam, Adagrad, RMSprop, Rprop, ASGD, Adadelta) that holds for every element, so a large tensor is
split into slices that fit the chunk size. For torch's other per-tensor optimizers (Adafactor's factored moments, Muon's
orthogonalised matrix update) a tensor is stepped whole, so a chunk holds at least the largest parameter (and its
state); so is a parameter that is not contiguous (``channels_last``), and each dtype of a mixed-precision model has
its own workspace. An optimizer whose ``step`` gradguard does not know (a custom class, a subclass overriding
``step``, a wrapper that steps another optimizer) cannot be dry-run safely: :func:`preflight_kind` returns ``None``
and the Guard takes a transactional backup instead (``param_check="backup"``); so does a step with hooks.

Cost: one more optimizer update over copies (read parameters, gradients and state, write the copies and step them),
about 2x the optimizer step's memory traffic. It runs only on the steps that check the weights
(``Guard(check_params_every=N)``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from gradguard import norms
from gradguard._compat import scratch_optimizer, step_without_hooks, torch_step_function
from gradguard.distributed import dtensor_type, is_dtensor, local_tensor

__all__ = ["Preflight", "preflight_kind"]

FRACTION = 0.01  # of the parameter bytes: the most a chunk of copies may hold (the Guard's total stays < 5%)
MIN_CHUNK_BYTES = 1 << 20  # bytes: below this a chunk costs more in Python than it saves in memory

_ELEMENTWISE_NAMES = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop", "Rprop", "ASGD",
                      "Adadelta")
_PER_TENSOR_NAMES = ("Adafactor", "Muon")  # torch.optim classes whose update mixes the elements of a tensor
_STATE_GUESS = 3  # state tensors per parameter assumed before the optimizer has created any (Adam with amsgrad)
_TEMPORARIES = 5  # parameter-sized intermediates an update allocates while it runs (measured for AdamW: sqrt(v),
# its quotient, the weight-decay and bias-correction temporaries, the finite check), in parameter-element sizes


def _known(names: Sequence[str]) -> list[Any]:
    classes = (getattr(torch.optim, n, None) for n in names)
    return [torch_step_function(c) for c in classes if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)]


_ELEMENTWISE = _known(_ELEMENTWISE_NAMES)
_PER_TENSOR = _known(_PER_TENSOR_NAMES)


def preflight_kind(optimizer: torch.optim.Optimizer) -> Literal["elementwise", "per_tensor"] | None:
    """How ``optimizer``'s step can be dry-run: ``"elementwise"`` (slices of a tensor), ``"per_tensor"`` (whole
    tensors), or ``None`` (its ``step`` is not one of torch's: it cannot be dry-run safely)."""
    step = torch_step_function(type(optimizer))
    if any(step is s for s in _ELEMENTWISE):
        return "elementwise"
    if any(step is s for s in _PER_TENSOR):
        return "per_tensor"
    return None


@dataclass(frozen=True)
class _Piece:
    group: int  # index of the parameter group
    param: Tensor
    start: int | None  # a slice of the flattened tensor, or None: the whole tensor
    stop: int | None


class Preflight:
    """Dry-runs ``optimizer.step()`` chunk by chunk and says whether every stepped parameter stays finite.

    Args:
        fraction: the most a chunk of copies may hold, as a fraction of the parameter bytes.
        min_bytes: ...but never less than this many bytes (1 MiB: smaller chunks cost more Python than they save).

    Example:
        >>> import torch
        >>> from gradguard.preflight import Preflight
        >>> w = torch.nn.Parameter(torch.tensor([3e38, 1.0])); w.grad = torch.tensor([-3e38, 1.0])
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> bool(Preflight()(opt, [w])), w.tolist()   # the step would overflow w[0]; w is untouched
        (False, [3.0000000054977558e+38, 1.0])
    """

    def __init__(self, fraction: float = FRACTION, min_bytes: int = MIN_CHUNK_BYTES) -> None:
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        if not isinstance(min_bytes, int) or isinstance(min_bytes, bool) or min_bytes < 1:
            raise ValueError(f"min_bytes must be a positive integer, got {min_bytes!r}")
        self.fraction = float(fraction)
        self.min_bytes = min_bytes
        self._workspace: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def chunk_bytes(self, optimizer: torch.optim.Optimizer) -> int:
        """Bytes a chunk of copies may hold: ``max(fraction x parameter bytes, min_bytes)``."""
        total = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
        return max(int(self.fraction * total), self.min_bytes)

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor:
        """A 0-d bool device tensor: whether ``optimizer.step()`` would leave every parameter in ``params`` (those
        with a gradient are stepped) finite. No host read; nothing real changes."""
        # the max-norm: finite exactly when every value is (a 2-norm of finite values above 1.8e19 could overflow)
        flags = [torch.isfinite(norms.total_norm(stepped, math.inf, check=False))
                 for stepped, _ in self.dry_run(optimizer, params)]
        device = params[0].device if params else torch.device("cpu")
        if not flags:
            return torch.ones((), dtype=torch.bool, device=device)
        return torch.stack([f.to(device) for f in flags]).all()

    @torch.no_grad()
    def nonfinite(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
        """The parameters that ``optimizer.step()`` would make non-finite (the failure path: reads on the host)."""
        bad: dict[int, Tensor] = {}
        for stepped, pieces in self.dry_run(optimizer, params):
            for q, piece in zip(stepped, pieces):
                if not bool(torch.isfinite(q).all()):
                    bad[id(piece.param)] = piece.param
        return list(bad.values())

    def plan(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[list[_Piece]]:
        """The chunks: lists of pieces (whole tensors or slices) whose copies fit :meth:`chunk_bytes` (a chunk holds one
        whole tensor larger than that where the optimizer is not elementwise)."""
        kind = preflight_kind(optimizer)
        if kind is None:
            raise TypeError(
                f"{type(optimizer).__name__}.step is not one of torch.optim's, so it cannot be dry-run safely; use "
                "a transactional backup (Guard(param_check='backup'))"
            )
        limit = self.chunk_bytes(optimizer)
        owner = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        chunks: list[list[_Piece]] = []
        chunk: list[_Piece] = []
        used = 0
        for p in params:
            if p.grad is None:
                continue
            if kind != "elementwise" and is_dtensor(p):
                raise TypeError(
                    f"{type(optimizer).__name__} updates whole tensors, which a DTensor shard is not: its step cannot "
                    "be dry-run on the local shards; use check_params_every=None"
                )
            per_element, sliceable = _cost(optimizer, p, kind == "elementwise")
            n = local_tensor(p).numel()
            if not sliceable or n * per_element <= limit - used:  # whole: in this chunk, or to start the next
                if chunk and used + n * per_element > limit:
                    chunks.append(chunk)
                    chunk, used = [], 0
                chunk.append(_Piece(owner[id(p)], p, None, None))
                used += n * per_element
                continue
            start = 0
            while start < n:
                take = min(n - start, (limit - used) // per_element)
                if take <= 0:
                    if chunk:
                        chunks.append(chunk)
                        chunk, used = [], 0
                        continue
                    take = 1  # one element costs more than the whole chunk: progress regardless
                chunk.append(_Piece(owner[id(p)], p, start, start + take))
                used += take * per_element
                start += take
        if chunk:
            chunks.append(chunk)
        return chunks

    def dry_run(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Any:
        """For each chunk of :meth:`plan`: step copies of it with a scratch optimizer; yields ``(stepped copies,
        pieces)``, the copies flattened for a sliced piece. The copies live in one workspace per dtype and device,
        allocated once (the largest chunk) and reused by every chunk and every step: a chunk overwrites the last."""
        chunks = self.plan(optimizer, params)
        need: dict[tuple[torch.dtype, torch.device], int] = {}
        for chunk in chunks:
            for key, n in _chunk_needs(optimizer, chunk).items():
                need[key] = max(need.get(key, 0), n)
        for key, n in need.items():
            buf = self._workspace.get(key)
            if buf is None or buf.numel() < n:
                self._workspace[key] = torch.empty(n, dtype=key[0], device=key[1])
        sharded = dtensor_type() is not None  # no DTensor can exist before its module is imported
        for chunk in chunks:
            taken: dict[tuple[torch.dtype, torch.device], int] = {}
            sources: list[Tensor] = []
            targets: list[Tensor] = []

            def copy_of(t: Tensor, piece: _Piece, taken: dict[tuple[torch.dtype, torch.device], int] = taken,
                        sources: list[Tensor] = sources, targets: list[Tensor] = targets) -> Tensor:
                t = local_tensor(t.detach()) if sharded else t.detach()  # a shard: an elementwise update is local
                src = t if piece.start is None else t.view(-1)[piece.start:piece.stop]
                key = (src.dtype, src.device)
                at = taken.get(key, 0)
                taken[key] = at + src.numel()
                sources.append(src)
                targets.append(self._workspace[key][at:at + src.numel()].view(src.shape))
                return targets[-1]  # filled below, with every other copy of the chunk in one foreach call

            scratch = scratch_optimizer(optimizer)
            groups: dict[int, list[Tensor]] = {}
            copies: list[Tensor] = []
            for piece in chunk:
                q = copy_of(piece.param, piece)
                q.grad = copy_of(piece.param.grad, piece)  # type: ignore[arg-type]
                state = optimizer.state.get(piece.param)
                if state:
                    scratch.state[q] = {
                        k: copy.deepcopy(v) if not isinstance(v, Tensor)
                        else copy_of(v, piece) if v.shape == piece.param.shape else local_tensor(v.detach()).clone()
                        for k, v in state.items()
                    }
                groups.setdefault(piece.group, []).append(q)
                copies.append(q)
            torch._foreach_copy_(targets, sources)
            scratch.param_groups = [dict(optimizer.param_groups[g], params=qs) for g, qs in groups.items()]
            step_without_hooks(scratch)  # no hook of the real optimizer, nor a global one, sees the dry-run
            yield copies, chunk


def _chunk_needs(optimizer: torch.optim.Optimizer, chunk: list[_Piece]) -> dict[tuple[torch.dtype, torch.device], int]:
    """Elements of workspace a chunk's copies take, per dtype and device (parameters, gradients, parameter-shaped
    state; scalar state is cloned)."""
    need: dict[tuple[torch.dtype, torch.device], int] = {}
    for piece in chunk:
        n = local_tensor(piece.param).numel() if piece.start is None else (piece.stop or 0) - piece.start
        state = optimizer.state.get(piece.param) or {}
        shaped = [v for v in state.values() if isinstance(v, Tensor) and v.shape == piece.param.shape]
        for t in (piece.param, piece.param.grad, *shaped):
            assert t is not None
            need[(t.dtype, t.device)] = need.get((t.dtype, t.device), 0) + n
    return need


def _cost(optimizer: torch.optim.Optimizer, p: Tensor, elementwise: bool) -> tuple[int, bool]:
    """Bytes per element of a piece of ``p`` (parameter + gradient + parameter-shaped state copies, and the update's
    own intermediates), and whether
    ``p`` may be sliced (elementwise optimizer, contiguous tensors, every state tensor parameter-shaped or scalar)."""
    grad = p.grad
    assert grad is not None
    state = optimizer.state.get(p) or {}
    tensors = [v for v in state.values() if isinstance(v, Tensor)]
    shaped = [local_tensor(v) for v in tensors if v.shape == p.shape]
    p, grad = local_tensor(p), local_tensor(grad)
    per_element = (1 + _TEMPORARIES) * p.element_size() + grad.element_size()
    per_element += sum(v.element_size() for v in shaped) if state else _STATE_GUESS * p.element_size()
    sliceable = (
        elementwise
        and p.is_contiguous()
        and grad.is_contiguous()
        and grad.shape == p.shape
        and all(v.is_contiguous() for v in shaped)
        and all(v.shape == p.shape or v.numel() <= 1 for v in tensors)
    )
    return per_element, sliceable
