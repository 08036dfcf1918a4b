"""Where the NaN came from: the op-level locator, the Diagnosis, and the cause rules.

The troubleshooting flow every practitioner runs by hand, automated:

1. the batch holds the NaN/Inf that reaches the loss -> ``stage="input"``: fix the data;
2. the loss is non-finite -> the forward pass made it (``log(0)``, a division by zero, an overflow);
3. the loss is finite but gradients are not -> ``stage="backward"`` (an infinite derivative at the edge of a domain,
   a discarded ``torch.where`` branch whose derivative is ``0 * inf``, degenerate eigenvalues, an overflow);
4. gradients finite, parameters non-finite after ``optimizer.step()`` -> ``stage="step"``: the update was too large
   (parameters already non-finite before the step are a corrupt init or checkpoint instead).

:func:`locate_nonfinite` replays one step under a ``TorchDispatchMode`` that records every aten op output with the
records its inputs came from (by storage: views and in-place writes keep the chain) and, for floating-point outputs,
element-wise NaN/Inf flags (``isnan(t).any()``, ``isinf(t).any()``: never a sum, which overflows on finite masks
of ``finfo.min``). The flags stay on the device and are read once, at the end. Blame follows the data: from what
failed (the loss, else the gradients) the locator walks back along the values that reach it to the op where the
NaN (or, for an Inf-only failure, the Inf) was born, so an Inf that a softmax or ``torch.where`` neutralised is never
blamed. Unlike ``torch.autograd.detect_anomaly`` it sees the forward pass and infinities, and names the op where the
value *started* rather than the first backward node that met it. :func:`explain` turns the op, the values and the
dtype into a cause and a fix.
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

from gradguard._compat import (
    TorchDispatchMode,
    current_autograd_node,
    has_composite_implicit_kernel,
    node_sequence_nr,
    tree_flatten,
)

__all__ = ["Diagnosis", "NonFiniteError", "TrainingDivergedError", "explain", "locate_nonfinite", "nonfinite_names"]

@dataclass(frozen=True)
class Diagnosis:
    """Where a non-finite value (or a spike) came from, and what to do about it.

    Attributes:
        stage: ``"input"`` (already in the batch), ``"forward"``, ``"backward"`` or ``"step"`` (gradients finite,
            parameters non-finite after the optimizer step).
        module: qualified name of the module running where the non-finite value was born (``""`` for the root
            module), or ``None`` when unknown.
        op: the aten op where it was born (e.g. ``"aten.log.default"``); in backward, the exact forward aten op of
            its autograd node (``"aten.sqrt"`` for ``SqrtBackward0``, ``"aten._softmax"`` for ``SoftmaxBackward0``).
        node: in backward, the autograd node (e.g. ``"SqrtBackward0"``).
        parameters: names of parameters whose gradients (or, at ``stage="step"``, values) are non-finite.
        cause: what most likely happened, in words.
        fix: what to change.
        value: ``"nan"``, ``"inf"`` or ``"nan+inf"``: what that op's output held, when located.
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
_LOGS = ("log", "log2", "log10", "log1p")
_DIVS = ("div", "div_", "true_divide", "reciprocal", "rsqrt", "floor_divide", "remainder", "fmod")
_SOFTMAX = ("_softmax", "softmax", "_log_softmax", "log_softmax", "_safe_softmax", "logsumexp")
_STDVAR = ("std", "var", "std_mean", "var_mean")
_EIG = re.compile(r"^(Linalg(Eigh|Eig|Svd|Eigvalsh)|Svd|Symeig|Eig)")
_GROWTH = ("mul", "add", "sub", "sum", "mm", "bmm", "addmm", "matmul", "baddbmm", "addcmul", "exp")
_ROOTS = ("sqrt", "rsqrt", "pow", "norm", "linalg_vector_norm", "cdist", "_cdist_forward", "_euclidean_dist")


def _base(op: str | None) -> str:
    """``"aten.log.default"`` / ``"aten.log"`` -> ``"log"`` (in-place ``"add_"`` -> ``"add"``)."""
    if not op:
        return ""
    name = op.split(".")[1] if op.startswith("aten.") and op.count(".") >= 1 else op
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _overflow(what: str, dtype: torch.dtype | None) -> tuple[str, str]:
    """Cause and fix for a finite -> Inf overflow, fitted to the dtype the op ran in."""
    if dtype == torch.float16:
        return (
            f"float16 overflow in {what}: values exceeded float16's maximum (65504)",
            "run this part in bfloat16 (float32's range: torch.autocast(dtype=torch.bfloat16)) or keep the op in "
            "float32; for gradients, use torch.amp.GradScaler",
        )
    if dtype == torch.bfloat16:
        return (
            f"overflow in {what} in bfloat16: values exceeded ~3.4e38 (bfloat16 already has float32's range, so "
            "the values are genuinely huge, not a precision artefact)",
            "scale the values down (normalise inputs/activations, subtract the max before exp, lower the learning "
            "rate) and compute this op in float32",
        )
    name = str(dtype).removeprefix("torch.") if dtype is not None else "the dtype"
    return (
        f"overflow in {what}: values exceeded {name}'s range",
        "scale the values down: subtract the max before exp (torch.softmax / torch.logsumexp), normalise "
        "inputs/activations, lower the learning rate",
    )


def _scaled_overflow(dtype: torch.dtype | None, node: str | None) -> tuple[str, str]:
    """An Inf in backward with a loss scale: the scaler's expected float16 overflow, or a scale that is simply too
    large for a dtype with float32's range (which needs no scaling)."""
    where = f" in {node}" if node else ""
    if dtype in (torch.bfloat16, torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        return (
            f"gradient overflow under loss scaling{where}: the scaled gradients exceeded {name}'s range",
            f"{name} has float32's range and needs no loss scaling: drop the GradScaler (or lower its init_scale); "
            "if it repeats without one, scale the values down and lower the learning rate",
        )
    return (
        f"gradient overflow under loss scaling{where} (float16 range exceeded); the GradScaler lowers its scale and "
        "the step is skipped — expected occasionally, a problem if it repeats",
        "if it repeats: lower GradScaler's init_scale (or growth_factor), or use bfloat16 autocast (float32's "
        "range, no scaler needed)",
    )


def explain(
    stage: str,
    op: str | None = None,
    node: str | None = None,
    *,
    scaled: bool = False,
    value: str | None = None,
    dtype: torch.dtype | None = None,
    facts: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """``(cause, fix)`` for a non-finite value: the rule for the op that produced it and the values it saw.

    ``op`` is the aten op (``"aten.log.default"``; in backward the forward op of ``node``), ``value`` ``"nan"`` /
    ``"inf"`` / ``"nan+inf"``, ``dtype`` the dtype the op ran in, ``facts`` what the locator saw around the op:
    ``count`` (the denominator is a count: a sum of a mask), ``eps`` (the denominator already adds this constant),
    ``single`` (std/var over one sample), ``inf_op`` (the op where an Inf input of a NaN-producing op started),
    ``params_before`` (parameters already non-finite before the step). Without facts the rules use op and value.
    """
    facts = facts or {}
    nan = value is not None and "nan" in value
    if stage == "input":
        return _explain_input(value, nan)
    if stage == "step":
        return _explain_step(facts)
    if stage == "backward" and scaled and not nan and not node:
        return _scaled_overflow(dtype, node)
    if value is None and op is None and node is None:  # not located: only the stage is known
        return _explain_unlocated(stage)
    if stage == "forward" or (stage == "backward" and not node and op):
        return _explain_forward(stage, op, value, nan, dtype, facts)
    return _explain_backward(op, node, nan, scaled, dtype, facts)


def _explain_input(value: str | None, nan: bool) -> tuple[str, str]:
    """The batch itself holds NaN/Inf."""
    what = "NaN" if nan else "Inf" if value == "inf" else "NaN or Inf"
    return (
        f"the input batch already contains {what} values",
        "check the data pipeline (normalisation, division by a zero std, corrupt samples); filter the batch with "
        "torch.isfinite(x).all() or repair it with torch.nan_to_num",
    )


def _explain_step(facts: dict[str, Any]) -> tuple[str, str]:
    """Gradients finite, parameters not: already bad before the step (``params_before``), or a too-large update."""
    if facts.get("params_before"):
        return (
            "parameters (or buffers) were already non-finite before this step (a corrupt initialisation or "
            "checkpoint, an earlier unguarded update, BatchNorm running stats fed a bad batch): this step's data and "
            "learning rate are not the cause",
            "reload a good checkpoint or re-initialise; check torch.isfinite(t).all() for every parameter and "
            "buffer after loading (and after custom init code)",
        )
    return (
        "gradients were finite but the parameters became non-finite after optimizer.step(): the update was too "
        "large",
        "lower the learning rate (or warm it up), raise the optimizer's eps (e.g. Adam eps=1e-8 -> 1e-6 in fp16), "
        "and clip gradients (gg.NormClip / a smaller max_norm)",
    )


def _explain_unlocated(stage: str) -> tuple[str, str]:
    """Not located (no op, node or value): only the stage is known."""
    if stage == "forward":
        return (
            "the loss is non-finite: the forward pass produced a NaN or Inf (log(0), a division by zero, an "
            "out-of-domain input, an overflow)",
            "name the op first (gg.locate_nonfinite); then keep its input in the domain: log(x.clamp_min(eps)), "
            "y.clamp_min(eps) in a denominator, subtract the max before exp",
        )
    return (
        "the loss is finite but gradients are not: an infinite derivative (sqrt, log or a division at 0, "
        "including in a branch torch.where discards), degenerate eigenvalues, or an overflow",
        "name the op first (gg.locate_nonfinite); add eps / clamp at that op; clip gradients only if it is an "
        "overflow (Inf): clipping cannot repair a NaN",
    )


def _explain_forward(
    stage: str, op: str | None, value: str | None, nan: bool, dtype: torch.dtype | None, facts: dict[str, Any]
) -> tuple[str, str]:
    """A value produced by a forward op (or by an op outside any autograd node during backward)."""
    inf_op = facts.get("inf_op")
    nan_op = facts.get("nan_op")
    base = _base(op)
    rule = _forward_rule(base, op, nan, dtype, facts)
    if rule is not None:
        then = f"; the Inf then became NaN in {nan_op}" if nan_op and "0 * log(0)" not in rule[0] else ""
        if stage == "backward" and facts.get("discarded"):
            return (rule[0] + then + "; the loss never saw it (a branch torch.where discards, a masked value), "
                    "but the backward pass did",
                    rule[1] + "; or apply the op to torch.where(cond, x, safe) (the 'double where')")
        return rule[0] + then, rule[1]
    if nan and inf_op:  # inf - inf, 0 * inf, inf / inf: the Inf is the root
        cause, fix = _forward_rule(_base(inf_op), inf_op, False, facts.get("inf_dtype", dtype), {}) or (
            f"{inf_op} produced an Inf", "")
        return (f"{op} turned an Inf into NaN (inf - inf, 0 * inf or inf / inf); the Inf came from {inf_op}: "
                f"{cause}", fix or "keep the values finite where the Inf starts (clamp, eps, subtract the max)")
    if not nan or value == "nan+inf":  # Inf (and NaN where Infs met, inside the op): an overflow
        cause, fix = _overflow(op or "the forward pass", dtype)
        return cause + (" (NaN where the Infs met)" if nan else ""), fix
    return (
        f"a NaN was produced in the forward pass{f' by {op}' if op else ''} from finite inputs",
        "check that op's inputs at this step (out-of-domain values); clamp them into its domain",
    )


def _explain_backward(  # ~60 lines: a flat table of derivative rules, tried in order (mostly message text)
    op: str | None, node: str | None, nan: bool, scaled: bool, dtype: torch.dtype | None, facts: dict[str, Any]
) -> tuple[str, str]:
    """An autograd node turned finite values into NaN/Inf: the op's derivative rules, then overflow."""
    inf_op = facts.get("inf_op")
    base = _base(op)
    short = (node or "").removesuffix("0").removesuffix("1").removesuffix("2")
    short = short[: short.find("Backward")] if "Backward" in short else short
    if node and _EIG.match(node):
        return (
            f"the gradient of {op or short} divides by eigenvalue (singular value) gaps 1/(l_i - l_j): the matrix "
            "has degenerate (repeated) eigenvalues, so the backward pass is 0/0 or x/0",
            "break the degeneracy with a tiny random jitter, e.g. A + 1e-6 * torch.diag(torch.randn(n)), or use "
            "only quantities whose gradient is stable (eigenvalues, not eigenvectors); clipping cannot repair this",
        )
    if facts.get("discarded"):
        return (
            f"an Inf from {inf_op} in the forward pass did not reach the loss (an untaken torch.where branch or a "
            f"masked value) but its derivative did: 0 * inf = NaN in {node} during the backward pass",
            "make the discarded values finite before the op (the 'double where'): x_safe = torch.where(cond, x, "
            "safe_value); torch.where(cond, op(x_safe), other); or clamp the op's input",
        )
    where_note = (" (if the 0 is only in a branch torch.where discards, apply the op to torch.where(cond, x, safe) "
                  "instead)") if nan else ""
    grew = not nan and facts.get("bw_op") in _GROWTH  # an Inf from multiplying finite values: not a pole at 0
    if base in ("acos", "asin") and not grew:
        return (
            f"the derivative of {base} (-/+ 1 / sqrt(1 - x^2)) is infinite at x = +-1 in the backward pass",
            f"clamp the input strictly inside the domain: torch.{base}(x.clamp(-1 + eps, 1 - eps)) with eps ~1e-6 "
            "(1e-3 in float16/bfloat16)",
        )
    if base in _ROOTS and not grew:
        return (
            f"the derivative of {short or base} is infinite at 0 (sqrt, fractional pow, norm at a zero vector) in "
            "the backward pass",
            "add eps inside the root: torch.sqrt(x + 1e-12), (x + eps) ** p, or torch.linalg.vector_norm(x + eps); "
            "for distances, sqrt(squared_distance.clamp_min(eps))" + where_note,
        )
    if (base in _DIVS or base == "atan2") and not grew:
        return (
            f"the derivative of {short or base} (-x / y^2) is infinite where the denominator is 0 in the backward pass",
            "keep the denominator away from 0: y.clamp_min(eps) for a non-negative y, count.clamp_min(1) for a count"
            + where_note,
        )
    if base in _LOGS and not grew:
        return (
            f"the derivative of {base} (1 / x) is infinite at x = 0 in the backward pass",
            "clamp the argument: torch.log(x.clamp_min(eps)); for p * log(p) use torch.xlogy(p, p)" + where_note,
        )
    if scaled and not nan:
        return _scaled_overflow(dtype, node)
    if nan:
        return (
            f"a NaN was produced in the backward pass{f' in {node}' if node else ''} from finite values (0 * inf or "
            "0 / 0 inside a derivative)",
            f"look at the inputs of {op or 'that op'} at this step: a value at the edge of the op's domain (0 for "
            "roots, logs and divisions) needs eps or a clamp; clipping cannot repair a NaN",
        )
    if dtype in (torch.float16, torch.bfloat16):
        cause, fix = _overflow(f"the backward pass{f' ({node})' if node else ''}", dtype)
        return cause, fix + "; clip gradients (gg.NormClip)"
    return (
        f"exploding gradients: the backward pass overflowed{f' in {node}' if node else ''}",
        "clip gradients (gg.NormClip or an adaptive gg.ZClip / gg.AutoClip) or lower max_norm, and lower the "
        "learning rate",
    )


def _forward_rule(  # noqa: PLR0912 - a flat table of independent op rules, tried in order
    base: str, op: str | None, nan: bool, dtype: torch.dtype | None, facts: dict[str, Any]
) -> tuple[str, str] | None:
    """The op-specific rules for a value produced in the forward pass; ``None`` when no rule fits."""
    inf_op = facts.get("inf_op")
    if facts.get("constant_inf") and not nan:
        return (
            f"an Inf written on purpose by {op} (a -inf mask fill) reached the loss: a row or sequence where every "
            "position is masked",
            "fill masks with torch.finfo(dtype).min instead of -inf, keep at least one position per row, or leave "
            "fully masked rows out of the loss",
        )
    if base in _LOGS and not nan and _base(facts.get("nan_op")) == "mul":
        return (
            f"0 * log(0): {op} gave -inf where its argument was 0 and {facts['nan_op']} multiplied it by 0 (the "
            "p * log p of an entropy or KL term)",
            "use torch.xlogy(p, p) (0 where p == 0) or torch.special.entr(p) for entropy, and "
            "torch.nn.functional.kl_div(log_q, p) for KL divergence",
        )
    if base == "mul" and nan and inf_op and _base(inf_op) in _LOGS:
        return (
            f"0 * log(0): {inf_op} gave -inf where its argument was 0 and multiplying by 0 made it NaN (the p * log p "
            "of an entropy or KL term)",
            "use torch.xlogy(p, p) (0 where p == 0) or torch.special.entr(p) for entropy, and "
            "torch.nn.functional.kl_div(log_q, p) for KL divergence",
        )
    if base in _SOFTMAX and nan and inf_op:
        return (
            f"{op}: a row where every position is masked with -inf (softmax of all -inf is 0/0 = NaN); the -inf came "
            f"from {inf_op}",
            "fill masks with torch.finfo(dtype).min instead of -inf (as Hugging Face does), or make sure every row "
            "keeps at least one unmasked position",
        )
    if base in _STDVAR and nan and facts.get("single"):
        return (
            f"{op} over a single sample: the unbiased estimate divides by n - 1 = 0",
            "use correction=0 (unbiased=False) where one sample is possible, or DataLoader(drop_last=True) so no "
            "batch has one sample",
        )
    if base in ("div", "true_divide", "reciprocal") and facts.get("count"):
        return (
            f"division by a count that is 0 in {op} (e.g. mask.sum() of a batch with no valid positions)",
            "divide by count.clamp_min(1): the result is then 0 for an empty batch; do not add 1e-8 to a count "
            "(a numerator that is not exactly 0 becomes a 1e8x loss)",
        )
    if base in (*_DIVS, *_LOGS, "sqrt", "rsqrt") and "eps" in facts:
        eps = facts["eps"]
        arg = "denominator" if base in _DIVS else "argument"
        if nan and base not in _DIVS:
            return (
                f"{op} of a negative {arg} although it already adds eps={eps:g}: the value itself is negative, "
                "no eps can fix that",
                "find why it goes negative (rounding in a subtraction, 1 - p > 1); clamp it: x.clamp_min(eps) "
                "instead of x + eps",
            )
        low = dtype in (torch.float16, torch.bfloat16)
        tiny = (f"{eps:g} rounds to 0 next to these values in {str(dtype).removeprefix('torch.')}" if low else
                f"the {arg} can be negative, and -{eps:g} cancels the eps")
        return (
            f"{'division by zero' if base in _DIVS else 'a zero'} in {op} although the {arg} already adds "
            f"eps={eps:g}: {tiny}",
            ("compute it in float32, or use x.clamp_min(eps) with an eps the dtype represents (>= 1e-4 for "
             "float16); a larger eps added in the same dtype rounds away too") if low else
            "use x.clamp_min(eps) for a quantity that must be positive instead of x + eps",
        )
    if base in _DIVS:
        what = "0 / 0" if nan else "a division by zero"
        return (
            f"{what} in the forward pass ({op})",
            "keep the denominator away from 0: y.clamp_min(eps) for a non-negative y (eps ~1e-8 below its typical "
            "values), count.clamp_min(1) for a count",
        )
    if base in _LOGS:
        if nan:
            return (
                f"log of a negative number in the forward pass ({op}): its argument left the domain",
                "find why the argument goes negative (rounding in 1 - p, a subtraction); make it positive by "
                "construction (softplus, exp, clamp_min(eps))",
            )
        return (
            f"log(0) = -inf in the forward pass ({op})",
            "clamp the argument: torch.log(x.clamp_min(eps)), or work in log space (log_softmax, logsigmoid, "
            "torch.xlogy)",
        )
    if base in ("acos", "asin") and nan:
        return (
            f"{base} of a value outside [-1, 1] in the forward pass (a cosine that rounded to 1.0000001)",
            f"clamp the input: torch.{base}(x.clamp(-1 + eps, 1 - eps)) (eps ~1e-6; also keeps the gradient finite "
            "at +-1)",
        )
    if base in ("sqrt", "rsqrt") and nan:
        return (
            f"sqrt of a negative number in the forward pass ({op})",
            "clamp the input: torch.sqrt(x.clamp_min(0) + eps)",
        )
    if base == "pow":
        if nan:
            return (
                f"a negative base raised to a fractional exponent in {op} (NaN, not an overflow)",
                "make the base non-negative (x.clamp_min(0) ** p, or x.abs() ** p * x.sign()); clipping or a "
                "smaller learning rate does not fix this",
            )
        cause, fix = _overflow(op or "pow", dtype)
        return cause + " (or 0 raised to a negative exponent)", fix + "; for 0 ** -p, add eps to the base"
    if base in ("exp", "exp2", "expm1") and not nan:
        cause, fix = _overflow(op or "exp", dtype)
        return cause + " (exp of large values)", fix
    if base in ("acosh", "atanh") and nan:
        return (f"{op} of a value outside its domain", "clamp the input into the op's domain")
    return None


# ------------------------------------------------------------------------------------------------- the locator
def _forward_op_of(node_name: str | None) -> str | None:
    """Fallback for a node the replay did not see created: ``"SqrtBackward0"`` -> ``"aten.sqrt"``,
    ``"SoftmaxBackward0"`` -> ``"aten._softmax"``, ``"ToCopyBackward0"`` -> ``"aten._to_copy"`` (the op with an
    autograd formula: the leading-underscore variant when aten has one)."""
    if not node_name or "Backward" not in node_name:
        return None
    base = node_name.split("Backward")[0]
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()
    for name in (f"_{snake}", snake, f"{snake}_forward"):
        if hasattr(torch.ops.aten, name) and _has_autograd_formula(getattr(torch.ops.aten, name)):
            return f"aten.{name}"
    return f"aten.{snake}"


def _has_autograd_formula(packet: Any) -> bool:
    """Whether an aten op has its own autograd kernel (so autograd names its node after it)."""
    try:
        return any(not has_composite_implicit_kernel(getattr(packet, o).name()) for o in packet.overloads())
    except AttributeError:
        return False


def _storage_key(t: Tensor) -> torch.UntypedStorage | None:
    """The memory a tensor's values live in: views and in-place writes share it. The storage object itself (torch
    keeps one Python object per storage), so keys die with the memory and a reused address is never confused with
    it. ``None`` for empty, meta, sparse or storage-less (subclass) tensors."""
    if t.device.type == "meta" or t.is_sparse or not t.numel():
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _flags(t: Tensor) -> Tensor:
    """``[has NaN, has Inf]`` as a 2-element bool tensor on ``t``'s device: per-element checks, no sum that can
    overflow, no host read."""
    return torch.stack((torch.isnan(t).any(), torch.isinf(t).any()))


@dataclass
class _Rec:
    kind: str  # "input", "param", "forward", "backward"
    op: str | None
    module: str | None
    node: str | None
    inputs: tuple[int, ...]  # records the op read
    dtype: torch.dtype | None
    flag: int | None  # index into the flag list; None: cannot hold NaN/Inf (integer, uninitialised)
    name: str | None = None  # parameter name
    node_seq: int | None = None
    scalars: tuple[float, ...] = ()  # the op's numeric arguments (eps, exponents)
    reduced: int = 0  # input elements per output element (std/var over one sample)


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


_UNINITIALISED = ("aten.empty", "aten.new_empty", "aten.empty_like", "aten.empty_strided")


class _Locator(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records every op output in execution order: which records its inputs came from (by storage) and, for
    floating-point outputs, device-side NaN/Inf flags. Nothing is read on the host until the end."""

    def __init__(self, param_names: dict[int, str], modules: _Modules) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.param_names = param_names  # id(storage) of a parameter (alive throughout) -> its name
        self.modules = modules
        self.where: Any = torch.utils.weak.WeakIdKeyDictionary()  # storage -> the record that last wrote it
        self.recs: list[_Rec] = []
        self.flags: list[Tensor] = []
        self.made_by: Any = torch.utils.weak.WeakIdKeyDictionary()  # tensor -> op packet that created it
        self.node_op: dict[int, str] = {}  # autograd sequence number -> forward op packet
        self.backward = False
        self.leaves: list[Tensor] = []  # leaf tensors requiring grad that the forward pass read (for model=None)

    def _new(self, rec: _Rec, t: Tensor | None) -> int:
        if t is not None and rec.flag is None and _is_float(t) and t.numel():
            rec.flag = len(self.flags)
            self.flags.append(_flags(t))
        self.recs.append(rec)
        return len(self.recs) - 1

    def source(self, t: Tensor, op: str | None, module: str | None) -> int | None:
        """The record ``t``'s values came from; an ``input``/``param`` record for memory no op wrote."""
        key = _storage_key(t)
        if key is None:
            return None
        r = self.where.get(key)
        if r is None:
            name = self.param_names.get(id(key))
            r = self._new(_Rec("param" if name else "input", op, module, None, (), t.dtype, None, name), t)
            self.where[key] = r
            if not self.backward and t.requires_grad and t.is_leaf:
                self.leaves.append(t)
        return r

    def note_node(self, t: Tensor) -> None:
        fn = t.grad_fn
        if fn is not None:
            made = self.made_by.get(t)
            if made is not None:
                self.node_op.setdefault(node_sequence_nr(fn), made)

    def _input_records(self, flat: list[Any], op: str, module: str | None) -> list[int]:
        """The records the op's tensor arguments came from, each once, in argument order."""
        inputs: list[int] = []
        for t in flat:
            if isinstance(t, Tensor):
                if not self.backward:
                    self.note_node(t)
                r = self.source(t, op, module)
                if r is not None and r not in inputs:
                    inputs.append(r)
        return inputs

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        node = current_autograd_node() if self.backward else None
        node_name = node.name() if node is not None else None
        seq = node_sequence_nr(node) if node is not None else None
        if seq is not None:
            module = self.modules.node_module.get(seq)
        else:
            module = self.modules.stack[-1] if self.modules.stack else None
        op = str(func)
        flat = tree_flatten((args, kwargs))[0]
        inputs = self._input_records(flat, op, module)
        out = func(*args, **kwargs)
        packet = str(func.overloadpacket)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if func.is_view:  # same memory, same values: the record of the base stands
            for t in outs:
                self.made_by[t] = packet
            return out
        written = _written_by(func, args, kwargs, outs) if func._schema.is_mutable else outs
        scalars = tuple(float(a) for a in flat if isinstance(a, (int, float)) and not isinstance(a, bool))
        first = next((t for t in flat if isinstance(t, Tensor)), None)
        uninit = op.startswith(_UNINITIALISED)
        for t in written:
            key = _storage_key(t)
            reduced = first.numel() // max(t.numel(), 1) if first is not None else 0
            rec = _Rec("backward" if self.backward else "forward", op, module, node_name, tuple(inputs), t.dtype,
                       None, None, seq, scalars, reduced)
            r = self._new(rec, None if uninit else t)
            if key is not None:
                self.where[key] = r
            self.made_by[t] = packet
        return out


def _written_by(func: Any, args: Any, kwargs: dict[str, Any], outs: list[Tensor]) -> list[Tensor]:
    """The tensors a mutating op (in-place / ``out=``) writes: its written arguments (positional and keyword), then
    its new outputs (native_batch_norm updates its running stats and returns a new output)."""
    written: list[Tensor] = []
    for arg, val in zip(func._schema.arguments, args):
        if arg.alias_info is not None and arg.alias_info.is_write:
            written.extend(v for v in (val if isinstance(val, (list, tuple)) else [val]) if isinstance(v, Tensor))
    for name, val in kwargs.items():
        arg_ = next((a for a in func._schema.arguments if a.name == name), None)
        if arg_ is not None and arg_.alias_info is not None and arg_.alias_info.is_write:
            written.extend(v for v in (val if isinstance(val, (list, tuple)) else [val]) if isinstance(v, Tensor))
    seen = [_storage_key(w) for w in written]
    written.extend(t for t in outs if not any(k is not None and k is _storage_key(t) for k in seen))
    return written


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
                    self.modules.node_module.setdefault(node_sequence_nr(t.grad_fn), self.modules.stack[-1])
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


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return list(range(torch.cuda.device_count()))
    return []


def _read(flags: list[Tensor]) -> list[tuple[bool, bool]]:
    """The one host read: every flag, stacked per device."""
    out: list[tuple[bool, bool]] = [(False, False)] * len(flags)
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    for idx in by_device.values():
        for i, (n, f) in zip(idx, torch.stack([flags[i] for i in idx]).tolist()):
            out[i] = (bool(n), bool(f))
    return out


def _value(nan: bool, inf: bool) -> str | None:
    return "nan+inf" if nan and inf else "nan" if nan else "inf" if inf else None


class _Graph:
    """The recorded ops with their flags read back: tracing an origin along the values that reach a target."""

    def __init__(self, recs: list[_Rec], flags: list[tuple[bool, bool]]) -> None:
        self.recs = recs
        self.flags = flags

    def nan(self, r: int) -> bool:
        f = self.recs[r].flag
        return f is not None and self.flags[f][0]

    def inf(self, r: int) -> bool:
        f = self.recs[r].flag
        return f is not None and self.flags[f][1]

    def origin(self, targets: list[int], nan: bool) -> int | None:
        """The first record (in execution order), reachable backwards from ``targets`` through records holding a
        NaN (``nan=True``) or a NaN/Inf (``nan=False``), none of whose inputs hold one: where the value was born.
        Among several, one that computed its Inf is preferred to one that wrote an ``-inf`` constant (a mask fill)."""
        bad = self.nan if nan else (lambda r: self.nan(r) or self.inf(r))
        stack = [t for t in targets if bad(t)]
        seen: set[int] = set()
        origins: list[int] = []
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            upstream = [i for i in self.recs[r].inputs if bad(i)]
            if upstream:
                stack.extend(upstream)
            else:
                origins.append(r)
        computed = [r for r in origins if not any(math.isinf(x) for x in self.recs[r].scalars)]
        return min(computed or origins) if origins else None  # an Inf computed beats an -inf written on purpose

    def first_origin(self, nan: bool, kind: str) -> int | None:
        """Without a path to follow: the first record of ``kind`` (else any) that makes a NaN (or Inf) from inputs
        without one, skipping Infs written on purpose (a ``-inf`` fill)."""
        bad = self.nan if nan else (lambda r: self.nan(r) or self.inf(r))
        found = [r for r, rec in enumerate(self.recs) if bad(r) and not any(bad(i) for i in rec.inputs)
                 and (nan or not any(math.isinf(x) for x in rec.scalars))]
        return next((r for r in found if self.recs[r].kind == kind), found[0] if found else None)

    def count_like(self, r: int, depth: int = 0) -> bool:
        """Whether record ``r`` holds a count: an integer/bool tensor, or a sum / conversion of one."""
        rec = self.recs[r]
        if rec.dtype is not None and not (rec.dtype.is_floating_point or rec.dtype.is_complex):
            return True
        if depth < 4 and _base(rec.op) in ("sum", "_to_copy", "clone", "count_nonzero", "to", "type_as", "copy"):
            return any(self.count_like(i, depth + 1) for i in rec.inputs)
        return False


def locate_nonfinite(
    closure: Callable[[], Tensor],
    model: nn.Module | None = None,
    *,
    backward: bool = True,
    loss_scale: float | Tensor | None = None,
    step: int | None = None,
) -> Diagnosis | None:
    """Replay one step (``closure()``, then backward) under the op-level locator; ``None`` if loss and gradients
    stayed finite.

    Blame follows the data. Every op output is recorded with the records its inputs came from and device-side
    NaN/Inf flags (read once, at the end). From the non-finite loss (or, if the loss is finite, the non-finite
    gradients: ``stage="backward"``) the locator walks back along the values that reach it. The origin of a NaN is
    the first op on that path whose output has a NaN while none of its inputs has one; the origin of an Inf-only
    failure is the first op on it that turns finite inputs into an Inf. An Inf that is produced and then
    neutralised (an attention mask of ``-inf`` that softmax turns into 0, the untaken branch of ``torch.where``)
    is not on that path and is never blamed. A NaN made from an Inf (``0 * log 0``, ``inf - inf``) names the op
    that made the NaN, and its cause names the op where the Inf started.

    The model's parameters, buffers and existing gradients, and the RNG state (via ``torch.random.fork_rng``), are
    the same afterwards as before; the closure is called exactly once. The replay uses global module hooks and the
    global RNG, so it is not thread-safe: do not run other models in other threads meanwhile. Without ``model`` the
    first module the closure runs is taken as the root for naming modules and parameters. ``loss_scale`` multiplies
    the loss before backward, to reproduce a GradScaler's overflow.

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
    params: list[tuple[str, Tensor]] = list(model.named_parameters()) if model is not None else []
    buffers: list[Tensor] = [b for b in model.buffers() if b is not None] if model is not None else []
    saved_buffers = [b.detach().clone() for b in buffers]
    saved_grads = [p.grad for _, p in params]
    late: list[tuple[Tensor, Tensor | None]] = []
    for _, p in params:
        p.grad = None
    try:
        with torch.random.fork_rng(devices=_cuda_devices()), _module_tracking(model) as modules:
            named_buffers = list(model.named_buffers()) if model is not None else []
            locator = _Locator(_storage_names(params + named_buffers), modules)  # a buffer (running stats) is state
            with _NodeOwner(modules), locator:
                loss = closure()
            if model is None:
                params = _params_found_by_running(locator, modules, params)
            late = [(p, p.grad) for _, p in params[len(saved_grads):]]  # found by running: keep their gradients
            for p, _ in late:
                p.grad = None
            loss_rec, loss_flag = _record_loss(locator, loss)
            if backward and loss.requires_grad:
                locator.backward = True
                with locator:
                    (loss * loss_scale if loss_scale is not None else loss).backward()  # type: ignore[no-untyped-call]
            with_grad = [(n, p.grad) for n, p in params if p.grad is not None]
            grad_flags = len(locator.flags)
            locator.flags.extend(_flags(g) for _, g in with_grad)
            grad_keys = [_storage_key(g) for _, g in with_grad]
            grad_recs = [locator.where.get(gk) if gk is not None else None for gk in grad_keys]
            flags = _read(locator.flags)  # the one host read
    finally:
        for (_, p), g in zip(params[: len(saved_grads)], saved_grads):
            p.grad = g
        for p, g in late:
            p.grad = g
        with torch.no_grad():
            for b, s in zip(buffers, saved_buffers):
                b.copy_(s)
    graph = _Graph(locator.recs, flags)
    bad_params = tuple(n for (n, _), f in zip(with_grad, flags[grad_flags:]) if f[0] or f[1])
    failing = _failing(flags[loss_flag], loss_rec, flags[grad_flags:], grad_recs, bool(bad_params))
    if failing is None:
        return None
    targets, want_nan, stage = failing
    o = graph.origin(targets, want_nan)
    if o is None:  # the failing value's producer was not recorded: the first origin of the stage, as a fallback
        o = graph.first_origin(want_nan, "forward" if stage == "forward" else "backward")
    if o is None:
        cause, fix = explain(stage)
        return Diagnosis(stage, parameters=bad_params, cause=cause, fix=fix, step=step, located=True)
    return _diagnose_origin(graph, locator, o, stage, want_nan, bad_params, loss_scale is not None, step)


def _storage_names(ps: list[tuple[str, Tensor]]) -> dict[int, str]:
    """Storage identity -> qualified name, for naming the records of parameters and buffers."""
    return {id(k): n for n, p in ps if (k := _storage_key(p)) is not None}


def _params_found_by_running(
    locator: _Locator, modules: _Modules, params: list[tuple[str, Tensor]]
) -> list[tuple[str, Tensor]]:
    """Without ``model``: name parameters after the root module the closure ran (their ``input`` records become
    ``param`` records), then add the leaf tensors the closure differentiates without a module."""
    if modules.root is not None:
        params = list(modules.root.named_parameters())
        named_buffers = list(modules.root.named_buffers())
        locator.param_names.update(_storage_names(params + named_buffers))
        for name, p in params + named_buffers:
            key = _storage_key(p)
            r = locator.where.get(key) if key is not None else None
            if r is not None and locator.recs[r].kind == "input":
                locator.recs[r].kind, locator.recs[r].name = "param", name
    known = {id(p) for _, p in params}
    return params + [(f"<tensor {i}>", t) for i, t in enumerate(x for x in locator.leaves if id(x) not in known)]


def _record_loss(locator: _Locator, loss: Any) -> tuple[int | None, int]:
    """The loss's record (an input record if no op produced it) and the index of its flag; checks it is a tensor."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"locate_nonfinite: the closure must return the loss tensor, got {type(loss).__name__}")
    loss_rec = locator.source(loss, None, None)  # an input record if no op produced it
    if loss.grad_fn is not None and loss_rec is not None:
        made = locator.made_by.get(loss)
        if made is not None:
            locator.node_op.setdefault(node_sequence_nr(loss.grad_fn), made)
    loss_flag = len(locator.flags)
    locator.flags.append(_flags(loss.detach()) if _is_float(loss) and loss.numel() else
                         torch.zeros(2, dtype=torch.bool, device=loss.device))
    return loss_rec, loss_flag


def _failing(
    loss_flags: tuple[bool, bool],
    loss_rec: int | None,
    grad_flags: list[tuple[bool, bool]],
    grad_recs: list[int | None],
    any_bad_grad: bool,
) -> tuple[list[int], bool, str] | None:
    """``(targets, want_nan, stage)``: the non-finite loss (``forward``), else the non-finite gradients
    (``backward``); ``None`` when both are finite."""
    loss_nan, loss_inf = loss_flags
    if loss_nan or loss_inf:
        return ([loss_rec] if loss_rec is not None else []), loss_nan, "forward"
    if any_bad_grad:
        bad = [(r, f) for r, f in zip(grad_recs, grad_flags) if f[0] or f[1]]
        return [r for r, _ in bad if r is not None], any(f[0] for _, f in bad), "backward"
    return None


def _diagnose_origin(
    graph: _Graph,
    locator: _Locator,
    o: int,
    stage: str,
    want_nan: bool,
    bad_params: tuple[str, ...],
    scaled: bool,
    step: int | None,
) -> Diagnosis:
    """The :class:`Diagnosis` of origin record ``o``: follow a NaN back to its Inf, gather the facts, explain."""
    rec = locator.recs[o]
    facts: dict[str, Any] = {}
    if want_nan and rec.kind in ("forward", "backward"):  # a NaN made from an Inf: where did the Inf start?
        o, rec = _follow_inf(graph, locator, o, rec, facts)
    value = _value(graph.nan(o), graph.inf(o))
    if rec.kind == "param":
        cause, fix = explain("step", facts={"params_before": True})
        return Diagnosis("step", rec.module, rec.op, None, (rec.name or "",), cause, fix, value, step, True)
    if rec.kind == "input":
        cause, fix = explain("input", value=value)
        return Diagnosis("input", rec.module, rec.op, None, bad_params, cause, fix, value, step, True)
    _origin_facts(graph, locator, o, rec, stage, facts)
    if rec.kind == "forward":
        cause, fix = explain(stage, rec.op, None, value=value, dtype=rec.dtype, facts=facts, scaled=scaled)
        return Diagnosis(stage, rec.module, rec.op, None, bad_params, cause, fix, value, step, True)
    fwd_op = _op_of_node(locator, rec)
    cause, fix = explain("backward", fwd_op, rec.node, scaled=scaled, value=value, dtype=rec.dtype, facts=facts)
    return Diagnosis("backward", rec.module, fwd_op, rec.node, bad_params, cause, fix, value, step, True)


def _follow_inf(graph: _Graph, locator: _Locator, o: int, rec: _Rec, facts: dict[str, Any]) -> tuple[int, _Rec]:
    """A NaN made from an Inf: the record to blame (the Inf's origin, or ``o`` itself), noting in ``facts`` where
    the Inf started (``inf_op``, ``inf_dtype``, ``discarded``) or which op turned it into NaN (``nan_op``)."""
    inf_in = [i for i in rec.inputs if graph.inf(i)]
    src = graph.origin(inf_in, nan=False) if inf_in else None
    if src is None:
        return o, rec
    srec = locator.recs[src]
    # an Inf written on purpose (a -inf mask fill, where(..., -inf)) or one the forward pass discarded
    # (it reached the NaN only through a backward op): the NaN is born where it was made
    deliberate = any(math.isinf(x) for x in srec.scalars) or _base(rec.op) in _SOFTMAX
    crossed = rec.kind == "backward" and srec.kind == "forward"
    if srec.kind in ("input", "param") and not deliberate and _base(rec.op) not in _SOFTMAX:
        return src, srec  # the batch (or a weight) held the Inf that became NaN
    if deliberate or crossed:
        facts["inf_op"] = srec.op if srec.kind != "backward" else _op_of_node(locator, srec)
        facts["inf_dtype"] = srec.dtype
        if crossed:
            facts["discarded"] = True
        return o, rec
    # an Inf computed on the same path (overflow, x / 0, log 0) then became NaN: blame the Inf
    facts["nan_op"] = rec.op if rec.kind == "forward" else _op_of_node(locator, rec)
    return src, srec


def _origin_facts(graph: _Graph, locator: _Locator, o: int, rec: _Rec, stage: str, facts: dict[str, Any]) -> None:
    """What the rules of :func:`explain` need to know about an op's origin record, added to ``facts``."""
    base = _base(rec.op)
    arg = None  # the input at the edge of the domain: a denominator, a log or root argument
    if base in _DIVS and len(rec.inputs) >= 2 and rec.kind == "forward":
        arg = rec.inputs[1]
        if graph.count_like(arg):
            facts["count"] = True
    elif base in (*_LOGS, "sqrt", "rsqrt", "reciprocal") and rec.inputs and rec.kind == "forward":
        arg = rec.inputs[0]
    if arg is not None:
        a = locator.recs[arg]
        eps = [abs(x) for x in a.scalars if 0 < abs(x) <= 1e-2]
        if _base(a.op) in ("add", "sub") and eps:
            facts["eps"] = eps[0]
    if base in _STDVAR and rec.reduced <= 1:
        facts["single"] = True
    if any(math.isinf(x) for x in rec.scalars) and graph.inf(o):
        facts["constant_inf"] = True
    if stage == "backward" and rec.kind == "forward":  # born in forward, reached only the gradients
        facts["discarded"] = True
    if rec.kind == "backward":  # the aten op inside the node: a pole (div, rsqrt, pow < 0) or growth (mul, mm)
        facts["bw_op"] = base
        if base == "pow" and rec.scalars and rec.scalars[-1] >= 0:
            facts["bw_op"] = "mul"  # x ** (p - 1) with p - 1 >= 0 grows, it has no pole


def _op_of_node(locator: _Locator, rec: _Rec) -> str | None:
    """The forward aten op (packet) of a backward record's autograd node: as seen created, else from its name."""
    if rec.node_seq is not None and rec.node_seq in locator.node_op:
        return locator.node_op[rec.node_seq]
    return _forward_op_of(rec.node) or rec.op
