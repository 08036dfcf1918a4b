r"""``suggest_max_norm``: find a clipping threshold by measuring, not by guessing.

The usual advice is that ``max_norm`` "must be found by experiment". This is that experiment, automated: run
``steps`` ordinary training steps **without clipping**, record the total gradient norm :math:`\|g_t\|` of each
(through the norm engine, :mod:`gradguard.norms`), then put the model, the optimizer, the gradients and every random
number generator back exactly as they were, bit for bit, so training starts as if nothing had happened.

The rule. With :math:`q_p` the ``p``-th percentile of the finite observed norms (linear interpolation),

.. math:: \text{max\_norm} = q_{90} .

Reasoning: a threshold at the 90th percentile leaves nine steps in ten of the kind this run produces untouched and
scales the rest — the rare large steps and the spikes that blow training up — down to the size of a typical large
step. Clipping is known to be safe to apply much more often than that: Seetharaman et al. (*AutoClip: Adaptive
Gradient Clipping for Source Separation Networks*, 2020) clip at the 10th percentile of the running norm history
and find training at least as good, so :math:`q_{90}` is the conservative end of the useful range; lower it (toward
the median, also reported) if the loss still spikes, or use ``gg.AutoClip`` / ``gg.ZClip`` for a threshold that
follows the run. Norms usually shrink as training proceeds, so a threshold measured at the start of training clips
less and less later; re-run the finder after a while, or prefer an adaptive clipper, if that matters.

Non-finite steps (a NaN or infinite loss or gradient) are not applied to the model, are counted, and are excluded
from the percentiles.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import norms
from gradguard._checks import check_norm_type
from gradguard.backup import RngState
from gradguard.clippers.norm import NormClip
from gradguard.clippers.state import check_int, check_number

__all__ = ["PERCENTILES", "Suggestion", "suggest_max_norm"]

PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 100.0)
"""The percentiles every :class:`Suggestion` reports (100 is the largest finite norm)."""


@dataclass(frozen=True)
class Suggestion:
    """A recommended ``max_norm`` with the evidence behind it.

    Attributes:
        max_norm: the recommended threshold (``percentile``-th percentile of the finite observed norms).
        percentile: the percentile the rule used.
        percentiles: ``{p: norm}`` for each of :data:`PERCENTILES`.
        norms: the total gradient norm of every step run, in order (``nan``/``inf`` for non-finite steps).
        losses: the loss of every step run.
        nonfinite_steps: how many steps had a non-finite loss or gradient (not applied, not counted).
        norm_type: the p of the norms.
        rule: the rule, in one line.
        reasoning: why this value, with the numbers.
    """

    max_norm: float
    percentile: float
    percentiles: dict[float, float]
    norms: tuple[float, ...]
    losses: tuple[float, ...]
    nonfinite_steps: int
    norm_type: float = 2.0
    rule: str = ""
    reasoning: str = field(default="", repr=False)

    @property
    def steps(self) -> int:
        """Number of steps run."""
        return len(self.norms)

    def clipper(self) -> NormClip:
        """A ``gg.NormClip`` with the recommended threshold."""
        return NormClip(self.max_norm, self.norm_type)

    def __str__(self) -> str:
        return f"max_norm={self.max_norm:.4g}  ({self.rule})\n{self.reasoning}"

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Save a PNG: the norm of each step with the recommendation, and their distribution. Needs matplotlib."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError('Suggestion.plot needs matplotlib: pip install "gradguard[plot]"') from e
        import numpy as np

        out = Path(path)
        if out.suffix.lower() != ".png":
            raise ValueError(f"path must end in .png, got {str(out)!r}")
        fig = Figure(figsize=(11, 3.8), dpi=100)
        FigureCanvasAgg(fig)
        ax, hx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
        steps = np.arange(len(self.norms))
        values = np.asarray(self.norms, dtype=np.float64)
        ok = np.isfinite(values) & (values > 0)
        ax.plot(steps[ok], values[ok], ".-", lw=0.8, ms=3, color="tab:blue", label="norm (no clipping)")
        for s in steps[~np.isfinite(values)]:
            ax.axvline(s, color="crimson", alpha=0.4, lw=1)
        ax.axhline(self.max_norm, color="black", ls="--", lw=1.2,
                   label=f"suggested max_norm = p{self.percentile:g} = {self.max_norm:.3g}")
        ax.axhline(self.percentiles[50.0], color="gray", ls=":", lw=1, label=f"median = {self.percentiles[50.0]:.3g}")
        if ok.any():
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("total gradient norm")
        ax.set_title(f"gradient norms over {self.steps} unclipped steps"
                     + (f" ({self.nonfinite_steps} non-finite, red)" if self.nonfinite_steps else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if ok.any():
            logs = np.log10(values[ok])
            hx.hist(logs, bins=min(30, max(5, int(ok.sum()) // 3)), color="tab:blue", alpha=0.7)
            for p in (50.0, self.percentile, 99.0):
                hx.axvline(math.log10(self.percentiles[p]), color="black" if p == self.percentile else "gray",
                           ls="--" if p == self.percentile else ":", lw=1)
                hx.text(math.log10(self.percentiles[p]), hx.get_ylim()[1] * 0.95, f" p{p:g}", fontsize=8,
                        va="top")
        hx.set_xlabel("log10 norm")
        hx.set_ylabel("steps")
        hx.set_title("distribution")
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
        return out


# ------------------------------------------------------------------------------------------------- state I/O
class _State:
    """Everything a training step changes, copied so it can be put back bit for bit."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            self.tensors = [(t, t.detach().clone()) for t in _model_tensors(model)]
            self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
            opt_params = [p for g in optimizer.param_groups for p in g["params"]]
            seen = {id(p) for p, _ in self.grads}
            self.grads += [(p, None if p.grad is None else p.grad.detach().clone()) for p in opt_params
                           if id(p) not in seen]
            self.tensors += [(p, p.detach().clone()) for p in opt_params if id(p) not in seen]
        self.optimizer = copy.deepcopy(optimizer.state_dict())  # state_dict() holds references: copy them
        self.rng = RngState(python_and_numpy=True)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)  # in place: the parameters stay the same objects the optimizer holds
            for p, g in self.grads:
                p.grad = g
        optimizer.load_state_dict(self.optimizer)
        self.rng.restore()


def _model_tensors(model: nn.Module) -> list[Tensor]:
    """Parameters and every buffer (persistent or not), each once."""
    out: list[Tensor] = []
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _batch_loss(model: nn.Module, batch: Any) -> Tensor:
    """Default for batches without ``loss_fn``: a model that returns its own loss (``model(**batch).loss``...)."""
    if isinstance(batch, (tuple, list)):
        raise TypeError(
            f"a batch is a {type(batch).__name__} (e.g. inputs and targets) and the loss cannot be guessed; pass "
            "loss_fn=lambda model, batch: ... (e.g. lambda m, b: F.cross_entropy(m(b[0]), b[1]))"
        )
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    if isinstance(out, Tensor) and out.numel() == 1:
        return out
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if isinstance(loss, Tensor):
        return loss
    raise TypeError(
        "cannot tell the loss from the model's output for a batch; pass loss_fn=lambda model, batch: ... "
        "(e.g. lambda m, b: F.cross_entropy(m(b[0]), b[1])), or pass a closure instead of batches"
    )


def _percentile(sorted_values: list[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default) of sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _progress(total: int, progress: bool | None) -> Any:
    if progress is False or (progress is None and total < 20):
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError as e:
        if progress:
            raise ImportError('progress=True needs tqdm: pip install "gradguard[progress]"') from e
        return None
    return tqdm(total=total, desc="gradguard: measuring gradient norms", unit="step",
                disable=None if progress is None else False, leave=False)


def suggest_max_norm(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    closure_or_batches: Callable[[], Tensor] | Iterable[Any],
    steps: int = 100,
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    percentile: float = 90.0,
    norm_type: float | str = 2.0,
    progress: bool | None = None,
) -> Suggestion:
    """Run ``steps`` unclipped training steps, restore everything, and recommend a ``max_norm``.

    Args:
        model: the model to train.
        optimizer: its optimizer (stepped during the measurement, then restored).
        closure_or_batches: a closure running the forward pass and returning the loss (as for ``gg.Guard``: the
            finder zeroes the gradients and calls ``backward``), or an iterable of batches, each turned into a loss
            by ``loss_fn(model, batch)`` (default: the model returns its loss, as Hugging Face models do).
        steps: number of steps (an iterable of batches may end sooner).
        loss_fn: see ``closure_or_batches``.
        percentile: the percentile of the observed norms to recommend (see the module docstring for the rule).
        norm_type: the p of the norms.
        progress: show a tqdm progress bar (``None``: on an interactive terminal, for 20 steps or more).

    Afterwards the model's parameters, buffers and gradients, the optimizer's state (step counts included) and the
    torch (CPU and CUDA), Python and NumPy random generators are exactly as before. The data iterator is not
    rewound: pass a fresh one or a closure over a copy.

    Example:
        >>> import torch, gradguard as gg
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(8, 1); opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> x, y = torch.randn(64, 8), torch.randn(64, 1)
        >>> before = {k: v.clone() for k, v in model.state_dict().items()}
        >>> s = gg.suggest_max_norm(model, opt, lambda: torch.nn.functional.mse_loss(model(x), y), steps=30)
        >>> s.percentiles[50.0] <= s.max_norm <= s.percentiles[100.0]
        True
        >>> all(torch.equal(before[k], v) for k, v in model.state_dict().items()), opt.state_dict()["state"]
        (True, {})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    steps = check_int(steps, "steps", low=1)
    percentile = check_number(percentile, "percentile", low=0.0, high=100.0, low_open=True)
    p = check_norm_type(norm_type)
    source, get_loss = _loss_source(model, closure_or_batches, steps, loss_fn)
    params = [q for group in optimizer.param_groups for q in group["params"]]
    if not params:
        raise ValueError("the optimizer has no parameters")

    saved = _State(model, optimizer)
    norm_values: list[float] = []
    losses: list[float] = []
    bar = _progress(steps, progress)
    try:
        for item in source:
            norm_v, loss_v = _measure_step(optimizer, params, get_loss, item, p)
            norm_values.append(norm_v)
            losses.append(loss_v)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(norm=f"{norm_v:.3g}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        saved.restore(model, optimizer)

    finite = sorted(v for v, loss_v in zip(norm_values, losses) if math.isfinite(v) and math.isfinite(loss_v))
    nonfinite = len(norm_values) - len(finite)
    if not norm_values:
        raise ValueError("closure_or_batches gave no batch; pass a non-empty iterable or a closure")
    if not finite:
        raise RuntimeError(
            f"all {len(norm_values)} steps gave a non-finite loss or gradient norm, so there is nothing to measure; "
            "fix the NaN first (gg.locate_nonfinite(closure) names the op), or lower the learning rate"
        )
    pct = {q: _percentile(finite, q) for q in PERCENTILES}
    max_norm = _percentile(finite, percentile)
    pct.setdefault(percentile, max_norm)
    rule = f"max_norm = p{percentile:g} of the gradient norms of {len(norm_values)} unclipped steps"
    reasoning = _reasoning(rule, len(norm_values), len(finite), pct, percentile, max_norm)
    return Suggestion(
        max_norm=max_norm, percentile=percentile, percentiles=pct, norms=tuple(norm_values), losses=tuple(losses),
        nonfinite_steps=nonfinite, norm_type=p, rule=rule, reasoning=reasoning,
    )


def _loss_source(
    model: nn.Module,
    closure_or_batches: Callable[[], Tensor] | Iterable[Any],
    steps: int,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None,
) -> tuple[Iterable[Any], Callable[[Any], Tensor]]:
    """What :func:`suggest_max_norm` iterates (``steps`` items at most) and how each item becomes a loss."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (model, batch) -> loss, got {type(loss_fn).__name__}")
    if callable(closure_or_batches) and not isinstance(closure_or_batches, nn.Module):
        closure: Callable[[], Tensor] = closure_or_batches
        if loss_fn is not None:
            raise ValueError("loss_fn is only for batches; a closure already returns the loss")
        return range(steps), lambda _: closure()
    if isinstance(closure_or_batches, Iterable) and not isinstance(closure_or_batches, (str, bytes, Tensor)):
        fn = loss_fn or _batch_loss
        return islice(closure_or_batches, steps), lambda batch: fn(model, batch)
    raise TypeError(
        "closure_or_batches must be a closure returning the loss or an iterable of batches, got "
        f"{type(closure_or_batches).__name__}"
    )


def _measure_step(
    optimizer: torch.optim.Optimizer, params: list[Tensor], get_loss: Callable[[Any], Tensor], item: Any,
    p: float,
) -> tuple[float, float]:
    """One unclipped step on ``item``: ``(gradient norm, loss)``, read together in one host read; the optimizer
    steps only when both are finite."""
    optimizer.zero_grad(set_to_none=True)
    loss = get_loss(item)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"the loss must be a one-element tensor, got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
    loss.backward()  # type: ignore[no-untyped-call]
    grads = [q.grad for q in params if q.grad is not None]
    if not grads:
        raise RuntimeError("no parameter of the optimizer received a gradient; does the loss depend on the "
                           "model's parameters?")
    total = norms.total_norm(grads, p)
    both = torch.stack([total.float(), loss.detach().reshape(()).float().to(total.device)]).tolist()
    if math.isfinite(both[0]) and math.isfinite(both[1]):
        optimizer.step()  # unclipped, as training would run without gradguard
    return both[0], both[1]


def _reasoning(rule: str, n_steps: int, n_finite: int, pct: dict[float, float], percentile: float,
               max_norm: float) -> str:
    """The :attr:`Suggestion.reasoning` text: what was measured, the percentiles, the rule, and the tail's shape."""
    nonfinite = n_steps - n_finite
    median = pct[50.0]
    spread = pct[100.0] / median if median > 0 else math.inf
    lines = [
        f"Measured {n_steps} unclipped steps: {n_finite} finite norms"
        + (f", {nonfinite} non-finite steps (not applied, excluded)" if nonfinite else "") + ".",
        "Percentiles: " + ", ".join(f"p{q:g}={v:.4g}" for q, v in pct.items() if q in PERCENTILES) + ".",
        f"Rule: {rule} = {max_norm:.4g}. Steps like ~{percentile:g}% of these pass unchanged; the larger ones "
        "(rare large steps, spikes) are scaled down to this size.",
    ]
    if spread > 10:
        lines.append(f"The largest norm is {spread:.3g}x the median: a heavy tail of spikes, which this threshold "
                     "cuts. If the loss still spikes, lower max_norm toward the median "
                     f"({median:.4g}) or use gg.ZClip / gg.AutoClip.")
    else:
        lines.append(f"The largest norm is only {spread:.3g}x the median: no strong spikes in this window; "
                     "AutoClip (Seetharaman et al., 2020) shows clipping more often (down to the 10th percentile) "
                     f"is also safe, so anything between the median ({median:.4g}) and this value is reasonable.")
    if nonfinite:
        lines.append("Clipping does not fix non-finite gradients: use gg.Guard to skip those steps.")
    return "\n".join(lines)
