r"""Layer health: which layers' gradients vanish, which dominate, which are not finite.

The :class:`~gradguard.Monitor` samples, every ``per_layer_every`` steps, each parameter's gradient norm
:math:`\|g_i\|` and parameter norm :math:`\|\theta_i\|`. Over the last ``window`` samples a layer is flagged

* **vanishing** when its gradient stays tiny relative to its parameters, measured against the rest of the model:

  .. math:: r_i = \frac{\|g_i\|}{\|\theta_i\|} < \text{vanishing\_ratio} \cdot \operatorname{median}_j r_j

  at every sample of the window. The ratio :math:`r_i` is what an SGD-like step changes the layer by (per unit of
  learning rate), so a layer a thousand times below the typical one (the default ``vanishing_ratio=1e-3``) learns a
  thousand times more slowly: the signature of vanishing gradients in deep or recurrent networks, which clipping
  cannot fix (it only ever scales gradients down). Comparing to the median keeps the rule free of the loss scale
  and of the learning rate, and a converged model, where every gradient is small, is not flagged. Layers with
  :math:`\|\theta_i\| = 0` (biases at their initial zeros) have no ratio and are never flagged vanishing;
* **exploding** (dominant) when it carries most of the squared gradient norm,

  .. math:: s_i = \frac{\|g_i\|^2}{\sum_j \|g_j\|^2} \ge \text{dominant\_share}

  at every sample of the window (default 0.9), in a model with at least ``min_layers`` parameter tensors. Norm
  clipping then scales the whole model by the factor this one layer calls for; layer-wise clipping
  (``gg.LayerwiseClip``) or AGC (``gg.AGC``) treat layers separately;
* **nonfinite** as soon as one sample holds a NaN or infinite gradient norm for the layer.

A flag is reported when it is raised (not again while it stays raised); it is raised again after it has cleared.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from gradguard.clippers.state import check_int, check_number

__all__ = ["HealthFlag", "LayerHealth"]


@dataclass(frozen=True)
class HealthFlag:
    """A raised flag: ``layer`` is ``flag`` (``"vanishing"``, ``"exploding"`` or ``"nonfinite"``) at ``step``.

    ``value`` is the quantity the rule tested at the last sample: the ratio :math:`r_i / \\operatorname{median} r`
    for vanishing, the share :math:`s_i` for exploding, the gradient norm for nonfinite.
    """

    step: int
    layer: str
    flag: str
    value: float
    message: str

    def as_dict(self) -> dict[str, object]:
        """The flag as a JSON-able record (``"type": "health"``)."""
        return {"type": "health", "step": self.step, "layer": self.layer, "flag": self.flag, "value": self.value,
                "message": self.message}


class LayerHealth:
    """Flags vanishing, dominant (exploding) and non-finite layers over a sliding window of per-layer samples.

    Args:
        window: number of consecutive per-layer samples a condition must hold for (>= 1).
        vanishing_ratio: a layer is vanishing when ``‖g‖/‖θ‖`` is below this fraction of the median over layers.
        dominant_share: a layer is exploding when its share of the squared total gradient norm is at least this.
        min_layers: fewer parameter tensors than this and no layer is called dominant (one of two always is).

    Example:
        >>> h = LayerHealth(window=2)
        >>> names = ["embed", "body", "head"]
        >>> h.update(10, names, grad=[1e-9, 1.0, 1.0], param=[1.0, 1.0, 1.0])
        []
        >>> [f.flag + ":" + f.layer for f in h.update(20, names, grad=[1e-9, 1.0, 1.0], param=[1.0, 1.0, 1.0])]
        ['vanishing:embed']
        >>> [f.flag + ":" + f.layer for f in h.update(30, names, grad=[float("nan"), 1, 1], param=[1, 1, 1])]
        ['nonfinite:embed']
    """

    def __init__(
        self, window: int = 3, vanishing_ratio: float = 1e-3, dominant_share: float = 0.9, min_layers: int = 3
    ) -> None:
        self.window = check_int(window, "window", low=1)
        self.vanishing_ratio = check_number(vanishing_ratio, "vanishing_ratio", low=0.0, high=1.0)
        self.dominant_share = check_number(dominant_share, "dominant_share", low=0.0, high=1.0)
        self.min_layers = check_int(min_layers, "min_layers", low=1)
        self.reset()

    def reset(self) -> None:
        """Forget all samples and raised flags."""
        self._names: tuple[str, ...] = ()
        self._vanishing: deque[list[float]] = deque(maxlen=self.window)  # r_i / median r per sample (nan: none)
        self._shares: deque[list[float]] = deque(maxlen=self.window)
        self._active: set[tuple[str, str]] = set()

    @property
    def active(self) -> frozenset[tuple[str, str]]:
        """The raised flags as ``(layer, flag)`` pairs."""
        return frozenset(self._active)

    def update(
        self, step: int, names: Sequence[str], grad: Sequence[float], param: Sequence[float]
    ) -> list[HealthFlag]:
        """Add one per-layer sample (host floats) and return the flags raised by it."""
        names = tuple(names)
        if not (len(names) == len(grad) == len(param)):
            raise ValueError(f"names, grad and param must have one entry per layer, got {len(names)}, "
                             f"{len(grad)} and {len(param)}")
        if names != self._names:  # the set of layers with gradients changed: start the window again
            self._names = names
            self._vanishing.clear()
            self._shares.clear()
        ratios = [g / p if p > 0 and math.isfinite(p) else math.nan for g, p in zip(grad, param)]
        defined = [r for r in ratios if math.isfinite(r)]
        median = statistics.median(defined) if len(defined) >= 2 else math.nan
        self._vanishing.append([r / median if median > 0 else math.nan for r in ratios])
        finite = all(math.isfinite(g) for g in grad)
        total_sq = sum(g * g for g in grad) if finite else math.nan
        self._shares.append([g * g / total_sq if total_sq > 0 else math.nan for g in grad])

        raised: list[HealthFlag] = []
        now: set[tuple[str, str]] = set()
        full = len(self._vanishing) == self.window
        for i, name in enumerate(names):
            if not math.isfinite(grad[i]):
                now.add((name, "nonfinite"))
                if (name, "nonfinite") not in self._active:
                    raised.append(HealthFlag(step, name, "nonfinite", float(grad[i]),
                                             f"{name}: gradient norm is {grad[i]} (not finite)"))
                continue
            if not full:
                continue
            rel = [s[i] for s in self._vanishing]
            if all(v < self.vanishing_ratio for v in rel):  # nan compares False: undefined ratios never flag
                now.add((name, "vanishing"))
                if (name, "vanishing") not in self._active:
                    raised.append(HealthFlag(
                        step, name, "vanishing", rel[-1],
                        f"{name}: gradient/parameter norm ratio {rel[-1]:.2g}x the median layer's for "
                        f"{self.window} samples (vanishing gradient; clipping cannot help: check initialisation, "
                        "activations, normalisation or skip connections)"))
            share = [s[i] for s in self._shares]
            if len(names) >= self.min_layers and all(v >= self.dominant_share for v in share):
                now.add((name, "exploding"))
                if (name, "exploding") not in self._active:
                    raised.append(HealthFlag(
                        step, name, "exploding", share[-1],
                        f"{name}: carries {share[-1]:.0%} of the squared gradient norm for {self.window} samples "
                        "(exploding/dominant layer; global clipping scales every layer by its factor: consider "
                        "gg.LayerwiseClip or gg.AGC)"))
        self._active = now
        return raised
