"""Where did the NaN come from? The op-level locator, the Diagnosis, and the cause rules.

The troubleshooting flow every practitioner runs by hand, automated:

1. a non-finite value already in the batch -> ``stage="input"``: fix the data;
2. the loss is non-finite -> the forward pass made it (``log(0)``, division by zero, ``exp`` overflow): add eps,
   clamp, subtract the max;
3. the loss is finite but gradients are not -> the backward pass (``sqrt``/``pow`` at 0 has an infinite
   derivative; overflow): add eps inside the root, clip, use a GradScaler;
4. gradients finite, parameters non-finite after ``optimizer.step()`` -> ``stage="step"``: the learning rate is too
   high (or the optimizer's eps too small).

:func:`locate_nonfinite` replays one step under a ``TorchDispatchMode`` that records, in execution order, a
non-finite flag for every floating-point output of every aten op (and for every input that no op produced: the
batch, the parameters), with the module being run and, in backward, the autograd node. The flags stay on the
device and are read once, at the end. Unlike ``torch.autograd.detect_anomaly`` it sees the forward pass, infinities
as well as NaNs, and names the op where the value *started* rather than the first backward node that met it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Diagnosis", "NonFiniteError", "TrainingDivergedError", "explain", "locate_nonfinite", "nonfinite_names"]

STAGES = ("input", "forward", "backward", "step")


@dataclass(frozen=True)
class Diagnosis:
    """Where a non-finite value (or a spike) came from, and what to do about it.

    Attributes:
        stage: ``"input"`` (already in the batch), ``"forward"``, ``"backward"`` or ``"step"`` (gradients finite,
            parameters non-finite after the optimizer step).
        module: qualified name of the module running when the first non-finite value was produced (``""`` for the
            root module), or ``None`` when unknown.
        op: the aten op that produced it (e.g. ``"aten.log.default"``); in backward, the forward op its autograd
            node belongs to (e.g. ``"aten.sqrt"`` for ``SqrtBackward0``).
        node: in backward, the autograd node (e.g. ``"SqrtBackward0"``).
        parameters: names of parameters whose gradients (or, at ``stage="step"``, values) are non-finite.
        cause: what most likely happened, in words.
        fix: what to change.
        value: ``"nan"``, ``"inf"`` or ``"nan+inf"`` for the first bad tensor, when located.
        step: the training step, when known.
        located: whether the op-level locator ran (otherwise the stage comes from the step's flags alone).
        event: ``"nonfinite"``, or ``"loss_spike"`` / ``"grad_norm_spike"`` for a finite spike the Guard skipped.
    """

    stage: str
    module: str | None = None
    op: str | None = None
    node: str | None = None
    parameters: tuple[str, ...] = ()
    cause: str = ""
    fix: str = ""
    value: str | None = None
    step: int | None = None
    located: bool = False
    event: str = "nonfinite"

    def __str__(self) -> str:
        where = []
        if self.module is not None:
            where.append(f"module {self.module or '<root>'!r}")
        if self.op:
            where.append(f"op {self.op}")
        if self.node:
            where.append(f"autograd node {self.node}")
        events = {"loss_spike": "loss spike", "grad_norm_spike": "gradient-norm spike"}
        what = events.get(self.event, "non-finite value")
        head = f"gradguard: {what} at stage '{self.stage}'"
        if self.step is not None:
            head += f" (step {self.step})"
        lines = [head]
        if where:
            lines.append("  where: " + ", ".join(where) + (f" ({self.value})" if self.value else ""))
        if self.parameters:
            more = f", ... ({len(self.parameters)} in all)" if len(self.parameters) > 8 else ""
            shown = ", ".join(self.parameters[:8]) + more
            lines.append(f"  parameters: {shown}")
        lines.append(f"  cause: {self.cause}")
        lines.append(f"  fix: {self.fix}")
        if not self.located and self.event == "nonfinite" and self.stage in ("forward", "backward"):
            lines.append("  (pass a closure to Guard.step, or call gg.locate_nonfinite(closure), to name the op)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        d = asdict(self)
        d["parameters"] = list(self.parameters)
        return d


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or parameter under ``on_nonfinite="raise"``. ``.diagnosis`` says where."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        super().__init__(str(diagnosis))
        self.diagnosis = diagnosis


class TrainingDivergedError(RuntimeError):
    """More bad steps in a row than ``max_consecutive_skips``: skipping is not helping. ``.diagnosis`` says where."""

    def __init__(self, message: str, diagnosis: Diagnosis | None) -> None:
        super().__init__(message + ("\n" + str(diagnosis) if diagnosis is not None else ""))
        self.diagnosis = diagnosis


def nonfinite_names(named: list[tuple[str, Tensor | None]]) -> tuple[str, ...]:
    """Names whose tensor holds a NaN or an infinity (``None`` tensors are skipped).

    For the failure path: one inf-norm pass through the norm engine and one host read. DTensors are checked on their
    local shards, so no collective is issued (a rank reports the parameters that are bad *there*).
    """
    from gradguard import norms
    from gradguard.distributed import local_tensor

    present = [(n, local_tensor(t)) for n, t in named if t is not None]
    if not present:
        return ()
    per = norms.tensor_norms([t for _, t in present], math.inf, check=False)
    return tuple(n for (n, _), ok in zip(present, torch.isfinite(per).tolist()) if not ok)


# ------------------------------------------------------------------------------------------------ cause rules
_LOG_DIV = re.compile(r"^aten\.(log|log2|log10|log1p|xlogy|special_xlogy|div|reciprocal|rsqrt|true_divide|"
                      r"floor_divide|remainder|fmod|atan2|digamma|polygamma|lgamma|erfinv)\b")
_EXP = re.compile(r"^aten\.(exp|exp2|expm1|_softmax|softmax|_log_softmax|logsumexp|sinh|cosh|pow|square|mul|"
                  r"mm|bmm|addmm|matmul|baddbmm|linear|_scaled_dot_product\w*|scaled_dot_product\w*|sum|mean|cumsum)\b")
_ROOT = re.compile(r"^(Sqrt|Rsqrt|Pow|Norm|LinalgVectorNorm|Div|Reciprocal|Log|Atan2|Cdist|Std|Var|Acos|Asin)")
_SQRT = re.compile(r"^aten\.(sqrt|pow|acos|asin|acosh|atanh)\b")


def explain(stage: str, op: str | None = None, node: str | None = None, *, scaled: bool = False) -> tuple[str, str]:
    """``(cause, fix)`` for a non-finite value, following the troubleshooting flow."""
    if stage == "input":
        return (
            "the input batch already contains NaN or Inf values",
            "check the data pipeline (normalisation, division by a zero std, corrupt samples); filter the batch with "
            "torch.isfinite(x).all() or repair it with torch.nan_to_num",
        )
    if stage == "step":
        return (
            "gradients were finite but the parameters became non-finite after optimizer.step(): the update was too "
            "large",
            "lower the learning rate (or warm it up), raise the optimizer's eps (e.g. Adam eps=1e-8 -> 1e-6 in fp16), "
            "and clip gradients (gg.NormClip / a smaller max_norm)",
        )
    if stage == "forward":
        if op and _LOG_DIV.match(op):
            return (
                f"log(0) or a division by zero in the forward pass ({op})",
                "add a small eps to the denominator / log argument (orders of magnitude below its values, e.g. "
                "1e-8), or clamp the input: torch.log(x.clamp_min(eps)), x / (y + eps)",
            )
        if op and _SQRT.match(op):
            return (
                f"sqrt/pow of a negative number (or an out-of-domain input) in the forward pass ({op})",
                "clamp the input into the op's domain, e.g. torch.sqrt(x.clamp_min(0) + eps)",
            )
        if op and _EXP.match(op):
            return (
                f"overflow in the forward pass ({op}): values exceeded the dtype's range (exp/softmax of large "
                "logits, or large activations in float16)",
                "subtract the max before exp (use torch.softmax / torch.logsumexp), keep this op in float32 or "
                "bfloat16 instead of float16, and check activation magnitudes / the learning rate",
            )
        return (
            f"a non-finite value was produced in the forward pass{f' by {op}' if op else ''}",
            "add eps / clamp the inputs of that op; if values are huge, lower the learning rate or clip gradients",
        )
    # backward
    if node and _ROOT.match(node):
        return (
            f"the derivative of {node.removesuffix('0').removesuffix('Backward')} is infinite at 0 (sqrt, pow, norm "
            "or division at zero) in the backward pass",
            "add eps inside the root / denominator: torch.sqrt(x + 1e-12), (x + eps) ** p, or "
            "torch.linalg.vector_norm(x) with x offset by eps",
        )
    if scaled:
        return (
            "gradient overflow under loss scaling (float16 range exceeded); the GradScaler lowers its scale and the "
            "step is skipped — expected occasionally, a problem if it repeats",
            "if it repeats: lower GradScaler's init_scale, use bfloat16, or clip gradients",
        )
    return (
        f"exploding gradients: the backward pass overflowed{f' in {node}' if node else ''}",
        "clip gradients (gg.NormClip or an adaptive gg.ZClip / gg.AutoClip) or lower max_norm, lower the learning "
        "rate, and use a GradScaler for float16",
    )


# ------------------------------------------------------------------------------------------------- the locator
def _forward_op_of(node_name: str | None) -> str | None:
    """``"SqrtBackward0"`` -> ``"aten.sqrt"``; ``"MmBackward0"`` -> ``"aten.mm"``."""
    if not node_name or "Backward" not in node_name:
        return None
    base = node_name.split("Backward")[0]
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()
    return f"aten.{snake}"


def _nonfinite_code(t: Tensor) -> Tensor:
    """One reduction per tensor: its float32 (float64) sum, NaN if any element is NaN (or +inf meets -inf), infinite
    if any is infinite. Sound (a non-finite tensor never sums to a finite value); it reads a finite tensor whose sum
    overflows float32 as infinite, which only happens with values ~1e34, an overflow in the making. No host read."""
    return t.sum(dtype=torch.float64 if t.dtype in (torch.float64, torch.complex128) else torch.float32)


def _code_value(total: float) -> str | None:
    """'nan' / 'inf' for a non-finite sum from :func:`_nonfinite_code`, ``None`` if finite."""
    if math.isnan(total):
        return "nan"
    return "inf" if total in (float("inf"), float("-inf")) else None


@dataclass
class _Event:
    kind: str  # "input", "param", "forward", "backward"
    op: str | None
    module: str | None
    node: str | None
    name: str | None = None  # parameter name for kind == "param"


class _Locator(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records a non-finite code per floating-point op output (and per external input) in execution order."""

    def __init__(self, param_names: dict[int, str], modules: _Modules) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.param_names = param_names  # data_ptr -> name
        self.modules = modules
        self.produced: set[int] = set()  # data_ptrs of tensors an op produced (so they are not "external")
        self.checked_external: set[int] = set()
        self.events: list[_Event] = []
        self.codes: list[Tensor] = []
        self.backward = False

    def _record(self, event: _Event, t: Tensor) -> None:
        self.events.append(event)
        self.codes.append(_nonfinite_code(t))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        node = torch._C._current_autograd_node() if self.backward else None
        node_name = node.name() if node is not None else None
        if node is not None:
            module = self.modules.node_module.get(node._sequence_nr())
        else:
            module = self.modules.stack[-1] if self.modules.stack else None
        op = str(func)
        if not self.backward:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, Tensor) and t.is_floating_point() and t.numel() and t.device.type != "meta":
                    ptr = t.data_ptr()
                    if ptr in self.produced or ptr in self.checked_external:
                        continue
                    self.checked_external.add(ptr)
                    name = self.param_names.get(ptr)
                    kind = "param" if name is not None else "input"
                    self._record(_Event(kind, op, module, None, name), t)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.is_floating_point() and t.numel() and t.device.type != "meta":
                self.produced.add(t.data_ptr())
                if func in _VIEW_LIKE or op.startswith(_UNINITIALISED):  # views repeat, empty* holds garbage
                    continue
                self._record(_Event("backward" if self.backward else "forward", op, module, node_name), t)
        return out


_UNINITIALISED = ("aten.empty", "aten.new_empty", "aten.empty_like", "aten.empty_strided")
_VIEW_LIKE = {
    torch.ops.aten.detach.default,
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.t.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.expand.default,
    torch.ops.aten.alias.default,
}


class _Modules:
    """The module stack (qualified names), the root module, and which module created each autograd node."""

    def __init__(self, model: nn.Module | None) -> None:
        self.root = model
        self.names: dict[int, str] = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self.stack: list[str] = []
        self.node_module: dict[int, str] = {}  # autograd sequence number -> module name

    def pre(self, module: nn.Module, _args: Any) -> None:
        if self.root is None:  # no model given: the first module entered is the root
            self.root = module
            self.names = {id(m): n for n, m in module.named_modules()}
        self.stack.append(self.names.get(id(module), type(module).__name__))

    def post(self, _module: nn.Module, _args: Any, _out: Any) -> None:
        if self.stack:
            self.stack.pop()


class _NodeOwner(TorchFunctionMode):
    """Above autograd: remember which module created each autograd node (for naming backward origins)."""

    def __init__(self, modules: _Modules) -> None:
        super().__init__()
        self.modules = modules

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.modules.stack:
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor) and t.grad_fn is not None:
                    self.modules.node_module.setdefault(t.grad_fn._sequence_nr(), self.modules.stack[-1])
        return out


@contextmanager
def _module_tracking(model: nn.Module | None) -> Iterator[_Modules]:
    """Track the running module with global forward hooks for the duration of the block."""
    modules = _Modules(model)
    h1 = nn.modules.module.register_module_forward_pre_hook(modules.pre)
    h2 = nn.modules.module.register_module_forward_hook(modules.post, always_call=True)
    try:
        yield modules
    finally:
        h1.remove()
        h2.remove()


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def locate_nonfinite(
    closure: Callable[[], Tensor],
    model: nn.Module | None = None,
    *,
    backward: bool = True,
    loss_scale: float | Tensor | None = None,
    step: int | None = None,
) -> Diagnosis | None:
    """Replay one step (``closure()``, then backward) under the op-level locator; ``None`` if all stayed finite.

    The model's parameters, buffers and existing gradients, and the global RNG state, are the same afterwards as
    before; the closure is called exactly once. Without ``model`` the first module the closure runs is taken as
    the root for naming modules and parameters. ``loss_scale`` multiplies the loss before backward, to reproduce a
    GradScaler's overflow. The flags are read once, at the end.

    Example:
        >>> import torch, gradguard as gg
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.proj = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return torch.log(self.proj(x).relu()).sum()  # log(0) where relu clips to 0
        >>> net = Net()
        >>> with torch.no_grad():
        ...     _ = net.proj.weight.fill_(-1.0)
        >>> d = gg.locate_nonfinite(lambda: net(torch.ones(1, 2)), net)
        >>> d.stage, d.module, d.op
        ('forward', '', 'aten.log.default')
    """
    rng = _rng_state()
    params: list[tuple[str, Tensor]] = list(model.named_parameters()) if model is not None else []
    buffers: list[Tensor] = [b for b in model.buffers() if b is not None] if model is not None else []
    saved_buffers = [b.detach().clone() for b in buffers]
    saved_grads = [p.grad for _, p in params]
    for _, p in params:
        p.grad = None
    param_names = {p.data_ptr(): n for n, p in params}
    try:
        with _module_tracking(model) as modules:
            locator = _Locator(param_names, modules)
            with _NodeOwner(modules), locator:
                loss = closure()
            if model is None and modules.root is not None:  # name parameters after the root module the closure ran
                params = list(modules.root.named_parameters())
                locator.param_names.update({p.data_ptr(): n for n, p in params})
            if backward and isinstance(loss, Tensor) and loss.requires_grad:
                locator.backward = True
                with locator:
                    (loss * loss_scale if loss_scale is not None else loss).backward()  # type: ignore[no-untyped-call]
        grad_codes = [_nonfinite_code(p.grad) for _, p in params if p.grad is not None]
        grad_names = [n for n, p in params if p.grad is not None]
        n_events = len(locator.codes)
        both = [*locator.codes, *grad_codes]
        sums = torch.stack([c.to(torch.float64) for c in both]).tolist() if both else []  # the one read
        codes = [_code_value(x) for x in sums]
    finally:
        for (_, p), g in zip(params[: len(saved_grads)], saved_grads):
            p.grad = g
        with torch.no_grad():
            for b, s in zip(buffers, saved_buffers):
                b.copy_(s)
        _set_rng_state(rng)
    bad_params = tuple(n for n, c in zip(grad_names, codes[n_events:]) if c)
    first = next((i for i, c in enumerate(codes[:n_events]) if c), None)
    if first is None:
        if bad_params:
            cause, fix = explain("backward")
            return Diagnosis("backward", parameters=bad_params, cause=cause, fix=fix, step=step, located=True)
        return None
    ev = locator.events[first]
    value = codes[first]
    if ev.kind == "param":
        cause, fix = explain("step")
        return Diagnosis("step", ev.module, ev.op, None, (ev.name or "",), cause, fix, value, step, True)
    if ev.kind == "input":
        cause, fix = explain("input")
        return Diagnosis("input", ev.module, ev.op, None, bad_params, cause, fix, value, step, True)
    if ev.kind == "forward":
        cause, fix = explain("forward", ev.op)
        return Diagnosis("forward", ev.module, ev.op, None, bad_params, cause, fix, value, step, True)
    fwd_op = _forward_op_of(ev.node) or ev.op
    cause, fix = explain("backward", fwd_op, ev.node, scaled=loss_scale is not None)
    return Diagnosis("backward", ev.module, fwd_op, ev.node, bad_params, cause, fix, value, step, True)
