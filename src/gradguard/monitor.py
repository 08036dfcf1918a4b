r"""The Monitor: what clipping and the Guard did, step by step and layer by layer, without a host sync per step.

Every recorded step keeps, as device tensors, the loss, the gradient norm before clipping :math:`\|g\|`, the norm
after clipping :math:`c\,\|g\|` (the coefficient times the norm: no second pass over the gradients), the threshold,
the coefficient :math:`c`, whether the step clipped, plus host values the caller already has (skipped, reason,
learning rate as a float). Every ``per_layer_every`` steps it also keeps, per parameter tensor, the gradient norm,
the parameter norm and the update-to-parameter ratio :math:`\|\theta_t - \theta_{t-1}\| / \|\theta_t\|`, all from
the norm engine (:mod:`gradguard.norms`). Nothing is read back to the host when recording: the values are stacked on
the device and copied in one transfer per device when the monitor writes (every ``flush_every`` records, after
``flush_secs`` seconds, on a skipped step, on :meth:`Monitor.flush` and :meth:`Monitor.close`).

Sinks (``sinks=``):

* ``"jsonl"`` (default): ``LOG_DIR/metrics.jsonl``, one JSON object per line, written and flushed a batch at a
  time, so a crash leaves a readable file holding everything written before it. Schema (``"type"`` tells them
  apart; non-finite numbers are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``, so every line is strict
  JSON):

  - ``meta``: ``schema`` (1), ``gradguard``, ``torch``, ``created``, ``every``, ``per_layer_every``, ``sinks``;
  - ``step``: ``step``, ``time`` (Unix seconds), ``loss``, ``norm``, ``norm_after``, ``threshold``, ``coef``,
    ``clipped``, ``skipped``, ``reason``, ``lr`` (numbers or ``null`` when not given), and the running counts
    ``steps_seen``, ``clipped_count``, ``skipped_count`` (exact even when ``every > 1``);
  - ``layers``: ``step``, ``names``, ``grad_norm`` (before clipping), ``param_norm``, ``update_ratio`` (lists,
    or ``null`` when unavailable);
  - ``health``: ``step``, ``layer``, ``flag`` (``vanishing`` / ``exploding`` / ``nonfinite``), ``value``,
    ``message`` (see :mod:`gradguard.health`);
  - ``event``: ``step``, ``skipped``, ``reason``, ``diagnosis`` (the ``Diagnosis.as_dict()``, or ``null``),
    ``text`` (its readable report);
  - ``end``: ``steps_seen``, ``clipped_count``, ``skipped_count``, written by :meth:`Monitor.close`.

* ``"tensorboard"``: a ``torch.utils.tensorboard.SummaryWriter`` on ``LOG_DIR`` (scalars, per-layer histograms,
  health flags and diagnoses as text); needs ``pip install "gradguard[tensorboard]"``.
* ``"logging"``: the ``gradguard.monitor`` logger (steps at INFO, skips and health flags at WARNING).
* ``"wandb"``: Weights & Biases, offline by default (``wandb_kwargs`` go to ``wandb.init``); needs ``wandb``.

``gradguard report LOG_DIR`` turns the JSONL into an HTML report with plots.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import norms
from gradguard.clippers.base import ClipStats
from gradguard.clippers.state import check_int, check_number
from gradguard.health import HealthFlag, LayerHealth
from gradguard.runlog import JSONL_NAME, decode_number, encode_number, end_record, meta_record

__all__ = ["SINKS", "Monitor", "decode_number", "encode_number"]

SINKS = ("jsonl", "tensorboard", "logging", "wandb")
"""The sink names :class:`Monitor` accepts."""

_LOG = logging.getLogger("gradguard.monitor")
_OPEN: weakref.WeakSet[Monitor] = weakref.WeakSet()


def _close_all() -> None:  # atexit: an exception that ends the program still leaves complete files
    for m in list(_OPEN):
        try:
            m.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            _LOG.exception("gradguard: closing a Monitor at exit failed")


atexit.register(_close_all)


# ---------------------------------------------------------------------------------------------------- sinks
class _Sink:
    def write(self, records: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _JsonlSink(_Sink):
    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run
        self.write([meta])

    def write(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records)
        self._f.write(text)  # one write per batch of whole lines, then flushed to the OS
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _finite(values: list[Any] | None) -> list[float]:
    return [v for v in (values or []) if isinstance(v, (int, float)) and math.isfinite(v)]


class _TensorBoardSink(_Sink):
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(log_dir))

    def write(self, records: list[dict[str, Any]]) -> None:
        import numpy as np

        w = self._w
        for r in records:
            kind, step = r["type"], r.get("step")
            if kind == "step":
                for key, tag in (("loss", "loss"), ("norm", "grad_norm/before_clip"),
                                 ("norm_after", "grad_norm/after_clip"), ("threshold", "clip/threshold"),
                                 ("coef", "clip/coef"), ("lr", "lr")):
                    v = decode_number(r[key])
                    if v is not None:
                        w.add_scalar(tag, v, step)
                if r["clipped"] is not None:
                    w.add_scalar("clip/clipped", float(r["clipped"]), step)
                w.add_scalar("clip/skipped", float(r["skipped"]), step)
                if r["steps_seen"]:
                    w.add_scalar("clip/clip_rate", r["clipped_count"] / r["steps_seen"], step)
            elif kind == "layers":
                for key in ("grad_norm", "param_norm", "update_ratio"):
                    values = r[key]
                    if values is None:
                        continue
                    for name, v in zip(r["names"], values):
                        x = decode_number(v)
                        if x is not None:
                            w.add_scalar(f"layer_{key}/{name}", x, step)
                    logs = [math.log10(v) for v in _finite(values) if v > 0]  # spans decades: log10
                    if logs:
                        w.add_histogram(f"layers/log10_{key}", np.asarray(logs, dtype=np.float64), step)
            elif kind == "health":
                w.add_text("health", f"**{r['flag']}** `{r['layer']}`: {r['message']}", step)
            elif kind == "event":
                text = r["text"] or f"step {step}: {r['reason']}"
                w.add_text("events", "```\n" + text + "\n```", step)
        w.flush()

    def close(self) -> None:
        self._w.close()


class _LoggingSink(_Sink):
    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            kind = r["type"]
            if kind == "step":
                parts = [f"step {r['step']}:"]
                if r["loss"] is not None:
                    parts.append(f"loss={decode_number(r['loss']):.6g}")
                if r["norm"] is not None:
                    parts.append(f"norm={decode_number(r['norm']):.4g}->{decode_number(r['norm_after']):.4g}")
                    parts.append(f"threshold={decode_number(r['threshold']):.4g}")
                    parts.append("clipped" if r["clipped"] else "not clipped")
                if r["lr"] is not None:
                    parts.append(f"lr={decode_number(r['lr']):.3g}")
                if r["skipped"]:
                    parts.append(f"SKIPPED ({r['reason']})")
                _LOG.log(logging.WARNING if r["skipped"] else logging.INFO, " ".join(parts))
            elif kind == "health":
                _LOG.warning("step %s: %s", r["step"], r["message"])
            elif kind == "event" and r["text"]:
                _LOG.warning("step %s: %s\n%s", r["step"], r["reason"], r["text"])
            elif kind == "layers":
                _LOG.debug("step %s: per-layer gradient norms %s", r["step"], dict(zip(r["names"], r["grad_norm"])))


class _WandbSink(_Sink):
    def __init__(self, log_dir: Path, kwargs: Mapping[str, Any]) -> None:
        import wandb

        options: dict[str, Any] = {"mode": "offline", "dir": str(log_dir), "project": "gradguard"}
        options.update(kwargs)
        self._run = wandb.init(**options)

    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            kind, step = r["type"], r.get("step")
            data: dict[str, Any] = {}
            if kind == "step":
                for key in ("loss", "norm", "norm_after", "threshold", "coef", "lr"):
                    v = decode_number(r[key])
                    if v is not None:
                        data[f"gradguard/{key}"] = v
                data["gradguard/clipped"] = float(bool(r["clipped"]))
                data["gradguard/skipped"] = float(r["skipped"])
            elif kind == "layers":
                for name, v in zip(r["names"], r["grad_norm"]):
                    x = decode_number(v)
                    if x is not None:
                        data[f"gradguard/layer_grad_norm/{name}"] = x
            elif kind in ("health", "event"):
                data[f"gradguard/{kind}"] = r.get("message") or r.get("text") or r.get("reason")
            if data:
                self._run.log(data, step=step)

    def close(self) -> None:
        self._run.finish()


# -------------------------------------------------------------------------------------------------- Monitor
def _check_sinks(sinks: Any) -> tuple[str, ...]:
    if isinstance(sinks, str):
        sinks = (sinks,)
    if not isinstance(sinks, Iterable):
        raise TypeError(f"sinks must be a sink name or a sequence of them from {SINKS}, got {type(sinks).__name__}")
    names = tuple(sinks)
    if not names:
        raise ValueError(f"sinks must name at least one sink, e.g. sinks=('jsonl',); choose from {SINKS}")
    for s in names:
        if not isinstance(s, str):
            raise TypeError(f"sinks must hold sink names (str) from {SINKS}, got {s!r}")
        if s not in SINKS:
            raise ValueError(f"unknown sink {s!r} in sinks; choose from {', '.join(SINKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"sinks lists a sink twice: {names}")
    return names


def _check_optional_deps(sinks: tuple[str, ...]) -> None:
    if "tensorboard" in sinks:
        try:
            import tensorboard  # type: ignore[import-untyped]  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise ImportError(
                'the "tensorboard" sink needs the tensorboard package: pip install "gradguard[tensorboard]"'
            ) from e
    if "wandb" in sinks:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ImportError('the "wandb" sink needs Weights & Biases: pip install wandb') from e


def _scalar(x: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = x.detach().reshape(())
    return x.to(device=device, dtype=dtype, non_blocking=True)


class _Pending:
    """One recorded step waiting on the device: host fields now, device values copied at write time."""

    __slots__ = ("diagnosis", "event", "host", "keys", "layer_names", "layers", "row", "step")

    def __init__(self, step: int, host: dict[str, Any], keys: tuple[str, ...], row: Tensor | None) -> None:
        self.step = step
        self.host = host
        self.keys = keys
        self.row = row
        self.layers: Tensor | None = None  # [3, n]: grad norm, param norm, update ratio
        self.layer_names: tuple[str, ...] = ()
        self.event = False
        self.diagnosis: object | None = None


class Monitor:
    """Record what clipping and the Guard do, on the device, and write it to JSONL / TensorBoard / logging / W&B.

    Args:
        log_dir: directory for ``metrics.jsonl`` and TensorBoard event files (created when missing).
        every: record every ``every``-th step (skipped steps and steps with a diagnosis are always recorded).
        per_layer_every: every ``per_layer_every``-th step, also record per-layer gradient norms, parameter norms
            and update-to-parameter ratios (needs ``model=`` in :meth:`record`); ``None`` turns this off.
        sinks: sink names from :data:`SINKS`.
        flush_every: write after this many recorded steps (one device-to-host copy for all of them).
        flush_secs: also write at the first record after this many seconds since the last write.
        health: the :class:`~gradguard.health.LayerHealth` rules (``None`` for the defaults).
        norm_type: the p of the per-layer norms.
        update_ratio: keep a copy of the parameters one step before each per-layer step, to measure the update.
        overwrite: replace an existing ``metrics.jsonl`` (and TensorBoard files) in ``log_dir``; without it an
            existing run is an error rather than silently mixed with the new one.
        wandb_kwargs: extra arguments for ``wandb.init`` (default ``mode="offline"``, ``dir=log_dir``).

    With the Guard, pass it in and the Guard records every step; standalone, call :meth:`record` after
    ``optimizer.step()`` with the clipper's stats:

    >>> import tempfile, torch, gradguard as gg
    >>> model = torch.nn.Linear(4, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> clip = gg.NormClip(max_norm=1.0)
    >>> with gg.Monitor(tempfile.mkdtemp(), per_layer_every=2) as monitor:
    ...     for step in range(4):
    ...         opt.zero_grad()
    ...         loss = model(torch.randn(8, 4)).pow(2).mean()
    ...         loss.backward()
    ...         stats = clip(model)
    ...         opt.step()
    ...         monitor.record(stats, loss=loss, lr=0.1, model=model)
    >>> [r["type"] for r in map(json.loads, open(monitor.path))][:4]
    ['meta', 'step', 'layers', 'step']
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        every: int = 1,
        per_layer_every: int | None = 100,
        sinks: str | Iterable[str] = ("jsonl",),
        *,
        flush_every: int = 100,
        flush_secs: float = 30.0,
        health: LayerHealth | None = None,
        norm_type: float = 2.0,
        update_ratio: bool = True,
        overwrite: bool = False,
        wandb_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        # every check first: nothing is created for a bad argument
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path (str or os.PathLike), got {type(log_dir).__name__}")
        self.log_dir = Path(log_dir)
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise ValueError(f"log_dir {str(self.log_dir)!r} exists and is not a directory; pass a directory path")
        self.every = check_int(every, "every", low=1)
        self.per_layer_every = None if per_layer_every is None else check_int(per_layer_every, "per_layer_every", low=1)
        self.sinks = _check_sinks(sinks)
        self.flush_every = check_int(flush_every, "flush_every", low=1)
        self.flush_secs = check_number(flush_secs, "flush_secs", low=0.0)
        if health is not None and not isinstance(health, LayerHealth):
            raise TypeError(f"health must be a gradguard LayerHealth or None, got {type(health).__name__}")
        self.health = health if health is not None else LayerHealth()
        self.norm_type = float(norm_type)
        self.update_ratio = bool(update_ratio)
        if wandb_kwargs is not None and not isinstance(wandb_kwargs, Mapping):
            raise TypeError(
                f"wandb_kwargs must be a mapping of wandb.init arguments, got {type(wandb_kwargs).__name__}"
            )
        _check_optional_deps(self.sinks)
        self.path = self.log_dir / JSONL_NAME
        old_events = sorted(self.log_dir.glob("events.out.tfevents.*")) if self.log_dir.is_dir() else []
        if not overwrite and (("jsonl" in self.sinks and self.path.exists())
                              or ("tensorboard" in self.sinks and old_events)):
            raise FileExistsError(
                f"{str(self.log_dir)!r} already holds a run ({JSONL_NAME} or TensorBoard events); pass "
                "overwrite=True to replace it, or choose a new log_dir"
            )

        self.log_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for f in old_events:
                f.unlink()
        self.flags: list[HealthFlag] = []
        """Every health flag raised so far (written to the sinks as ``health`` records)."""
        self._pending: list[_Pending] = []
        self._auto_step = 0
        self._steps_seen = 0
        self._skipped_count = 0
        self._clipped: Tensor | None = None  # running count of clipped steps, on the device
        self._clipped_host = 0
        self._prev_params: tuple[int, dict[str, Tensor]] | None = None
        self._last_write = time.monotonic()
        self._closed = False
        meta = meta_record(torch=torch.__version__, every=self.every, per_layer_every=self.per_layer_every,
                           sinks=self.sinks)
        self._sinks: list[_Sink] = []
        try:
            for name in self.sinks:
                if name == "jsonl":
                    self._sinks.append(_JsonlSink(self.path, meta))
                elif name == "tensorboard":
                    self._sinks.append(_TensorBoardSink(self.log_dir))
                elif name == "logging":
                    self._sinks.append(_LoggingSink())
                else:
                    self._sinks.append(_WandbSink(self.log_dir, wandb_kwargs or {}))
        except Exception:
            for s in self._sinks:
                s.close()
            raise
        _OPEN.add(self)

    # ------------------------------------------------------------------------------------------------ recording
    def record(
        self,
        stats: ClipStats | None,
        loss: Tensor | float | None = None,
        *,
        skipped: bool = False,
        reason: str | None = None,
        lr: float | Tensor | None = None,
        model: nn.Module | None = None,
        diagnosis: object | None = None,
        step: int | None = None,
    ) -> None:
        """Record one training step. Reads nothing back from the device (the values are copied when written).

        Args:
            stats: the clipper's :class:`~gradguard.ClipStats` for this step, or ``None`` (loss only).
            loss: the step's loss (a one-element tensor, detached here, or a float).
            skipped: whether the optimizer step was skipped; ``reason`` says why (e.g. ``"nonfinite_grad"``).
            lr: the learning rate used (a float, or a tensor for tensor learning rates).
            model: the model, for the per-layer records every ``per_layer_every`` steps. Call :meth:`record`
                after ``optimizer.step()``: gradients are still set then, and the update is measured.
            diagnosis: a :class:`~gradguard.Diagnosis` for a non-finite step; written with its report.
            step: the step index (default: one more than the last recorded step, starting at 0).
        """
        if self._closed:
            raise RuntimeError("this Monitor is closed; create a new gg.Monitor to record another run")
        if stats is not None and not isinstance(stats, ClipStats):
            raise TypeError(
                f"stats must be a gg.ClipStats (what a clipper returns) or None, got {type(stats).__name__}"
            )
        if isinstance(loss, bool) or (loss is not None and not isinstance(loss, (Tensor, int, float))):
            raise TypeError(f"loss must be a tensor, a float or None, got {type(loss).__name__}")
        if isinstance(loss, Tensor) and loss.numel() != 1:
            raise ValueError(f"loss must hold one value, got shape {tuple(loss.shape)}; pass loss.mean() or loss.sum()")
        if not isinstance(skipped, bool):
            raise TypeError(f"skipped must be a bool, got {type(skipped).__name__}")
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a str or None, got {type(reason).__name__}")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (Tensor, int, float))):
            raise TypeError(f"lr must be a float, a tensor or None, got {type(lr).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if step is None:
            step = self._auto_step
        elif isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int or None, got {type(step).__name__}")
        self._auto_step = step + 1
        self._steps_seen += 1
        self._skipped_count += skipped
        if stats is not None:  # a device add: the clip count stays exact between records, with no sync
            c = stats.clipped.detach().reshape(()).to(torch.int64)
            self._clipped = c if self._clipped is None else self._clipped + c.to(self._clipped.device)

        per_layer = self.per_layer_every is not None and model is not None and step % self.per_layer_every == 0
        event = skipped or diagnosis is not None
        if step % self.every == 0 or event or per_layer:
            self._pending.append(self._capture(stats, loss, skipped, reason, lr, step, event, diagnosis))
            if per_layer:
                assert model is not None
                self._capture_layers(self._pending[-1], stats, model, step)
        if (self.update_ratio and model is not None and self.per_layer_every is not None
                and (step + 1) % self.per_layer_every == 0):
            self._prev_params = (step, {n: p.detach().clone() for n, p in model.named_parameters()})

        if event or len(self._pending) >= self.flush_every or (
            self._pending and time.monotonic() - self._last_write >= self.flush_secs
        ):
            self.flush()

    def _capture(
        self, stats: ClipStats | None, loss: Tensor | float | None, skipped: bool, reason: str | None,
        lr: float | Tensor | None, step: int, event: bool, diagnosis: object | None,
    ) -> _Pending:
        host: dict[str, Any] = {
            "type": "step", "step": step, "time": round(time.time(), 3), "loss": None, "norm": None,
            "norm_after": None, "threshold": None, "coef": None, "clipped": None, "skipped": skipped,
            "reason": reason, "lr": None, "steps_seen": self._steps_seen, "clipped_count": None,
            "skipped_count": self._skipped_count,
        }
        keys: list[str] = []
        values: list[Tensor] = []
        anchor = stats.norm if stats is not None else (loss if isinstance(loss, Tensor) else None)
        if anchor is None and isinstance(lr, Tensor):
            anchor = lr
        device = anchor.device if anchor is not None else torch.device("cpu")
        dtype = torch.float32 if device.type == "mps" else torch.float64
        if isinstance(loss, Tensor):
            keys.append("loss")
            values.append(_scalar(loss, dtype, device))
        elif loss is not None:
            host["loss"] = float(loss)
        if stats is not None:
            keys += ["norm", "norm_after", "threshold", "coef", "clipped", "clipped_count"]
            norm = _scalar(stats.norm, dtype, device)
            coef = _scalar(stats.coef, dtype, device)
            assert self._clipped is not None
            values += [norm, norm * coef, _scalar(stats.threshold, dtype, device), coef,
                       _scalar(stats.clipped, dtype, device), _scalar(self._clipped, dtype, device)]
        else:
            host["clipped_count"] = self._clipped_host if self._clipped is None else None
            if self._clipped is not None:
                keys.append("clipped_count")
                values.append(_scalar(self._clipped, dtype, device))
        if isinstance(lr, Tensor):
            keys.append("lr")
            values.append(_scalar(lr, dtype, device))
        elif lr is not None:
            host["lr"] = float(lr)
        row = torch.stack(values) if values else None
        p = _Pending(step, host, tuple(keys), row)
        p.event = event
        p.diagnosis = diagnosis
        return p

    @torch.no_grad()
    def _capture_layers(self, pending: _Pending, stats: ClipStats | None, model: nn.Module, step: int) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        self._prev_params, prev = None, self._prev_params
        if not named:
            return
        names = tuple(n for n, _ in named)
        params = [p.detach() for _, p in named]
        post = norms.tensor_norms([p.grad for _, p in named], self.norm_type)  # type: ignore[misc]
        # gradients are read after clipping: undo the factor applied (exact for global and per-tensor clippers)
        if stats is not None and stats.tensor_norms is not None and stats.names == names:
            grad = stats.tensor_norms.detach().to(post)
        elif stats is not None and stats.tensor_coefs is not None and stats.names == names:
            c = stats.tensor_coefs.detach().to(post)
            grad = post / torch.where(c > 0, c, torch.ones_like(c))
        elif stats is not None:
            c = stats.coef.detach().to(post)
            grad = post / torch.where(c > 0, c, torch.ones_like(c))
        else:
            grad = post
        pnorm = norms.tensor_norms(params, self.norm_type).to(post)
        if prev is not None and prev[0] == step - 1 and all(n in prev[1] for n in names):
            deltas = [p - prev[1][n] for n, p in zip(names, params)]
            ratio = norms.tensor_norms(deltas, self.norm_type).to(post) / pnorm
        else:
            ratio = torch.full_like(post, math.nan)
        dtype = torch.float32 if post.device.type == "mps" else torch.float64
        pending.layers = torch.stack([grad, pnorm, ratio]).to(dtype)
        pending.layer_names = names

    # ----------------------------------------------------------------------------------------------- writing
    def flush(self) -> None:
        """Copy the recorded values to the host (one transfer per device) and write them to every sink."""
        if self._closed:
            return
        pending, self._pending = self._pending, []
        self._last_write = time.monotonic()
        if not pending:
            return
        # one copy per device: every row and every per-layer block, flattened and concatenated
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in pending:
            for t in (p.row, p.layers):
                if t is not None:
                    by_device.setdefault(t.device, []).append(t.reshape(-1).to(torch.float64 if
                                                                               t.device.type != "mps" else t.dtype))
        host_values: dict[torch.device, list[float]] = {}
        for device, parts in by_device.items():
            host_values[device] = torch.cat(parts).cpu().tolist()
        offsets = dict.fromkeys(host_values, 0)

        def take(t: Tensor) -> list[float]:
            n = t.numel()
            i = offsets[t.device]
            offsets[t.device] = i + n
            return host_values[t.device][i:i + n]

        records: list[dict[str, Any]] = []
        for p in pending:
            rec = dict(p.host)
            if p.row is not None:
                for key, v in zip(p.keys, take(p.row)):
                    rec[key] = v
            if rec["clipped"] is not None:
                rec["clipped"] = bool(rec["clipped"])
            if rec["clipped_count"] is not None:
                rec["clipped_count"] = int(rec["clipped_count"])
                self._clipped_host = rec["clipped_count"]
            for key in ("loss", "norm", "norm_after", "threshold", "coef", "lr"):
                rec[key] = encode_number(rec[key])
            records.append(rec)
            if p.layers is not None:
                flat = take(p.layers)
                n = len(p.layer_names)
                grad, pnorm, ratio = flat[:n], flat[n:2 * n], flat[2 * n:]
                records.append({
                    "type": "layers", "step": p.step, "names": list(p.layer_names),
                    "grad_norm": [encode_number(v) for v in grad], "param_norm": [encode_number(v) for v in pnorm],
                    "update_ratio": None if all(math.isnan(v) for v in ratio) else [encode_number(v) for v in ratio],
                })
                for flag in self.health.update(p.step, p.layer_names, grad, pnorm):
                    self.flags.append(flag)
                    rec = flag.as_dict()
                    rec["value"] = encode_number(flag.value)
                    records.append(rec)
            if p.event:
                d = p.diagnosis
                as_dict = getattr(d, "as_dict", None)
                records.append({
                    "type": "event", "step": p.step, "skipped": p.host["skipped"], "reason": p.host["reason"],
                    "diagnosis": _jsonable(as_dict()) if callable(as_dict) else None,
                    "text": None if d is None else str(d),
                })
        for sink in self._sinks:
            sink.write(records)

    def close(self) -> None:
        """Write what is pending, an ``end`` record, and close every sink. Safe to call twice."""
        if self._closed:
            return
        try:
            self.flush()
            if self._clipped is not None:
                self._clipped_host = int(self._clipped.item())
            end = end_record(self._steps_seen, self._clipped_host, self._skipped_count)
            for sink in self._sinks:
                sink.write([end])
        finally:
            self._closed = True
            _OPEN.discard(self)
            for sink in self._sinks:
                sink.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Monitor({str(self.log_dir)!r}, every={self.every}, per_layer_every={self.per_layer_every}, "
                f"sinks={self.sinks})")


def _jsonable(x: Any) -> Any:
    """Diagnosis dicts as strict JSON: tensors to lists, non-finite floats to strings, other objects to str."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return encode_number(x)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)

