r"""The Monitor: what clipping and the Guard did, step by step and layer by layer, without a host sync per step.

Every recorded step keeps, as device tensors, the loss, the gradient norm before clipping :math:`\|g\|`, the norm
after clipping :math:`c\,\|g\|` (the coefficient times the norm: no second pass over the gradients), the threshold,
the coefficient :math:`c`, whether the step clipped, plus host values the caller already has (skipped, reason,
learning rate as a float). Every ``per_layer_every`` steps it also keeps, per parameter tensor, the gradient norm,
the parameter norm and the update-to-parameter ratio :math:`\|\theta_t - \theta_{t-1}\| / \|\theta_t\|`, all from
the norm engine (:mod:`gradguard.norms`). Nothing is read back to the host when recording: the values are stacked on
the device and copied in one transfer per device when the monitor writes (every ``flush_every`` records, after
``flush_secs`` seconds, on a skipped step, on :meth:`Monitor.flush`, :meth:`Monitor.close` and on ``SIGTERM``).

Steps are numbered from 1 (step 1 is the first recorded step, as the Guard counts); ``record(step=...)`` sets the
number explicitly. The classes, one job each:

* :class:`Monitor` -- validates its arguments, wires the parts below together, and is what the Guard calls;
* :class:`RunDirectory` -- owns the log directory: one owner at a time (a lock held while the Monitor is open, so
  two processes can never write one log), and how its files are opened (new, overwritten, or appended to);
* :class:`Sink` -- the extension point: ``write(records)`` and ``close()``; :class:`JsonlSink`,
  :class:`TensorBoardSink`, :class:`LoggingSink` and :class:`WandbSink` are the built-in ones;
* ``_Staging`` -- the on-device staging buffer (recorded steps and running counts until the next write);
* ``_LayerProbe`` -- the per-layer measurement (never more than one copy of the parameters).

Sinks (``sinks=``, names or :class:`Sink` instances):

* ``"jsonl"`` (default): ``LOG_DIR/metrics.jsonl``, one JSON object per line, written and flushed a batch at a
  time, so a crash leaves a readable file holding everything written before it. Schema (``"type"`` tells them
  apart; non-finite numbers are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``, so every line is strict
  JSON):

  - ``meta``: ``schema`` (1), ``gradguard``, ``torch``, ``created``, ``every``, ``per_layer_every``, ``sinks``,
    and ``resumed`` (``true``) at the start of each appended (``resume=True``) segment;
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
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from gradguard import norms
from gradguard._checks import check_norm_type
from gradguard._compat import uncompiled
from gradguard.clippers.base import ClipStats
from gradguard.clippers.state import check_int, check_number
from gradguard.health import HealthFlag, LayerHealth
from gradguard.runlog import JSONL_NAME, decode_number, encode_number, end_record, meta_record

__all__ = [
    "SINKS", "JsonlSink", "LoggingSink", "Monitor", "RunDirectory", "Sink", "TensorBoardSink", "WandbSink",
    "decode_number", "encode_number",
]

SINKS = ("jsonl", "tensorboard", "logging", "wandb")
"""The sink names :class:`Monitor` accepts (each a built-in :class:`Sink`)."""

_LOG = logging.getLogger("gradguard.monitor")
_OPEN: weakref.WeakSet[Monitor] = weakref.WeakSet()


def _close_all() -> None:  # atexit: an exception that ends the program still leaves complete files
    for m in list(_OPEN):
        if m._pid != os.getpid():  # a forked child (a DataLoader worker) never writes its parent's log
            continue
        try:
            m.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            _LOG.exception("gradguard: closing a Monitor at exit failed")


atexit.register(_close_all)


# ------------------------------------------------------------------------------------------------------ SIGTERM
class _SigtermFlush:
    """On ``SIGTERM``, flush every open Monitor, then pass the signal on to the handler installed before.

    Installed (main thread only: Python allows signal handlers nowhere else) when the first Monitor opens and
    restored when the last one closes, unless someone installed another handler since. The previous handler is
    chained: a Python callable is called; ``SIG_DFL`` is restored and the signal re-sent, so the process still ends
    by ``SIGTERM`` (exit status ``-15``) as it would have without gradguard; ``SIG_IGN`` ignores it. A Monitor that
    is in the middle of a write when the signal arrives finishes that write first and then passes the signal on.
    """

    def __init__(self) -> None:
        self.previous: Any = None
        self.installed = False
        self.deferred: tuple[int, FrameType | None] | None = None

    def install(self) -> None:
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        self.previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self)
        self.installed = True

    def uninstall(self) -> None:
        if not self.installed or _OPEN or threading.current_thread() is not threading.main_thread():
            return
        ours = signal.getsignal(signal.SIGTERM) is self
        if ours:  # never undo a handler installed after ours
            signal.signal(signal.SIGTERM, self.previous)
        self.installed = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        busy = False
        for m in list(_OPEN):
            busy |= m._flush_for_signal()
        if busy:  # a write was interrupted: the Monitor finishes it, then calls resume()
            self.deferred = (signum, frame)
            return
        self.chain(signum, frame)

    def resume(self) -> None:
        if self.deferred is not None:
            (signum, frame), self.deferred = self.deferred, None
            self.chain(signum, frame)

    def chain(self, signum: int, frame: FrameType | None) -> None:
        previous = self.previous
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)


_SIGTERM = _SigtermFlush()


# ------------------------------------------------------------------------------------------------- run directory
LOCK_NAME = ".gradguard.lock"

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class RunDirectory:
    """The owner of one Monitor's log directory: exclusive ownership, and how the run's files are opened.

    ``mode`` is ``"new"`` (a file that exists is an error: created with ``O_EXCL``), ``"overwrite"`` (truncated) or
    ``"append"`` (continued: ``resume=True``). While the Monitor is open it holds an exclusive lock (``flock``) on
    ``LOG_DIR/.gradguard.lock``; a second Monitor on the same directory, in this process or another, gets a
    :class:`FileExistsError` instead of a share of the file. The operating system drops the lock when the process
    dies, so a crashed run never blocks its resume. Sinks get the directory in :meth:`Sink.open`.
    """

    def __init__(self, path: Path, mode: Literal["new", "overwrite", "append"]) -> None:
        self.path = path
        """The log directory."""
        self.mode = mode
        """``"new"``, ``"overwrite"`` or ``"append"``."""
        self._release: weakref.finalize[..., RunDirectory] = weakref.finalize(self, _unlock, None, -1, 0)
        self._release.detach()  # not owned until acquire()

    def acquire(self) -> None:
        """Create the directory and take its lock, or raise :class:`FileExistsError` when another owner holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_NAME
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _try_lock(fd)
            except OSError:
                try:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                except OSError:  # pragma: no cover - Windows: the locked byte cannot be read
                    holder = "unknown"
                os.close(fd)
                raise FileExistsError(
                    f"{str(self.path)!r} is being written by another gg.Monitor (pid {holder}); one log has one "
                    "owner: give each process its own log_dir (under torch.distributed, ranks='zero' or ranks='all')"
                ) from None
            try:  # the previous owner may have removed the file between our open and our lock: retry on the new one
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                # released by release(), or when this object is collected (a Monitor dropped without close())
                self._release = weakref.finalize(self, _unlock, lock, fd, os.getpid())
                return
            os.close(fd)

    def open_text(self, name: str) -> IO[str]:
        """Open ``name`` in the directory for writing text, as the mode says (exclusive, truncating or appending)."""
        if not self._release.alive:
            raise RuntimeError("RunDirectory.open_text needs the directory's lock: call acquire() first")
        flags = os.O_WRONLY | os.O_CREAT | {"new": os.O_EXCL, "overwrite": os.O_TRUNC, "append": os.O_APPEND}[self.mode]
        fd = os.open(self.path / name, flags, 0o644)
        return os.fdopen(fd, "a" if self.mode == "append" else "w", encoding="utf-8")

    def release(self) -> None:
        """Give the directory up (the lock file is removed while still locked, then unlocked). Safe to call twice."""
        self._release()


def _unlock(lock: Path | None, fd: int, pid: int) -> None:
    if lock is None:
        return
    try:
        if os.getpid() == pid:  # a forked child exiting must not remove the lock its parent still holds
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


class _Counts:
    """Where a run stands: the last step number and the running counts (continued by ``resume=True``)."""

    __slots__ = ("clipped_count", "last_step", "skipped_count", "steps_seen")

    def __init__(self, last_step: int = 0, steps_seen: int = 0, clipped_count: int = 0, skipped_count: int = 0):
        self.last_step = last_step
        self.steps_seen = steps_seen
        self.clipped_count = clipped_count
        self.skipped_count = skipped_count


_TAIL = 1 << 20


def _resume_point(path: Path) -> tuple[_Counts, bool]:
    """Read an existing ``metrics.jsonl`` to continue it: ``(counts, had_records)``.

    A last line cut short by a crash (no newline) is removed first, so the appended records start on a line of
    their own and the file stays readable line by line. Only the end of the file is read (its last MiB; all of it
    only when that holds no ``step`` or ``end`` record), so resuming a long run costs the same as a short one.
    """
    if not path.is_file():
        return _Counts(), False
    counts: _Counts | None = None
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        for start in dict.fromkeys((max(0, size - _TAIL), 0)):
            f.seek(start)
            data = f.read()
            if data and not data.endswith(b"\n") and (b"\n" in data or start == 0):
                keep = data.rfind(b"\n") + 1
                _LOG.warning("gradguard: %s ended with a line cut short by a crash; removed it before appending",
                             path)
                f.truncate(start + keep)
                data = data[:keep]
            counts = _scan_counts(data.split(b"\n")[1 if start else 0:])  # a tail's first line may be partial
            if counts is not None:
                break
        had_records = f.seek(0, os.SEEK_END) > 0
    return counts or _Counts(), had_records


def _scan_counts(lines: list[bytes]) -> _Counts | None:
    """The last step number and running counts in these lines, or None when they hold no step/end record."""
    counts: _Counts | None = None
    for line in lines:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(rec, dict) or rec.get("type") not in ("step", "end"):
            continue
        counts = counts or _Counts()
        if rec["type"] == "step" and isinstance(rec.get("step"), int):
            counts.last_step = max(counts.last_step, rec["step"])
        for key in ("steps_seen", "clipped_count", "skipped_count"):
            if isinstance(rec.get(key), int):
                setattr(counts, key, rec[key])
    if counts is not None:
        counts.last_step = max(counts.last_step, counts.steps_seen)
    return counts


# ---------------------------------------------------------------------------------------------------------- sinks
class Sink:
    """Where the Monitor's records go: subclass it, implement :meth:`write`, pass an instance in ``sinks=[...]``.

    A sink takes its options in its own constructor and is handed the run's directory once, in :meth:`open`,
    before the first :meth:`write`; :meth:`close` is called once at the end. Records are plain dicts with strict-JSON
    values (``"type"`` is ``"meta"``, ``"step"``, ``"layers"``, ``"health"``, ``"event"`` or ``"end"``; non-finite
    numbers are the strings ``"nan"``/``"inf"``/``"-inf"``: :func:`decode_number` turns them back into floats), in
    batches: one call per write of the Monitor, never one per training step. A sink instance serves one Monitor.

    Example (a CSV of the step losses)::

        class LossCsv(Sink):
            def open(self, run):
                self.f = run.open_text("loss.csv")  # exclusive, truncated or appended, as the Monitor's mode
            def write(self, records):
                for r in records:
                    if r["type"] == "step":
                        self.f.write(f"{r['step']},{r['loss']}\\n")
                self.f.flush()
            def close(self):
                self.f.close()

        monitor = gg.Monitor("runs/exp1", sinks=["jsonl", LossCsv()])
    """

    name: ClassVar[str] = ""
    """The name that selects the sink in ``sinks=`` (built-in sinks only)."""

    def existing(self, log_dir: Path) -> list[Path]:
        """Files of an earlier run in ``log_dir`` this sink would replace (a new run refuses to start over them)."""
        return []

    def open(self, run: RunDirectory) -> None:
        """Called once, after the directory is owned, before the first :meth:`write` (default: nothing)."""

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Write a batch of records (in order)."""
        raise NotImplementedError(f"{type(self).__name__} must implement write(records)")

    def close(self) -> None:
        """Called once when the Monitor closes (default: nothing)."""


class JsonlSink(Sink):
    """``LOG_DIR/metrics.jsonl``: one strict-JSON record a line, each batch written and flushed whole."""

    name = "jsonl"

    def __init__(self) -> None:
        self.path: Path | None = None
        self._f: IO[str] | None = None

    def existing(self, log_dir: Path) -> list[Path]:
        return [p for p in (log_dir / JSONL_NAME,) if p.exists()]

    def open(self, run: RunDirectory) -> None:
        self.path = run.path / JSONL_NAME
        self._f = run.open_text(JSONL_NAME)

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        if self._f is None:
            raise RuntimeError("JsonlSink.write before open(): pass the sink to gg.Monitor(sinks=[...])")
        text = "".join(json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records)
        self._f.write(text)  # one write per batch of whole lines, then flushed to the OS
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _finite(values: list[Any] | None) -> list[float]:
    return [v for v in (values or []) if isinstance(v, (int, float)) and math.isfinite(v)]


class TensorBoardSink(Sink):
    """A ``torch.utils.tensorboard.SummaryWriter`` on the log directory (``pip install "gradguard[tensorboard]"``).

    Scalars per step, per-layer scalars and log10 histograms, health flags and diagnoses as text. Overwriting a run
    removes its old event files; resuming adds a new event file beside them (TensorBoard reads both as one run).
    """

    name = "tensorboard"

    def __init__(self) -> None:
        try:
            import tensorboard  # type: ignore[import-untyped]  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise ImportError(
                'the "tensorboard" sink needs the tensorboard package: pip install "gradguard[tensorboard]"'
            ) from e
        self._w: Any = None

    def existing(self, log_dir: Path) -> list[Path]:
        return sorted(log_dir.glob("events.out.tfevents.*")) if log_dir.is_dir() else []

    def open(self, run: RunDirectory) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if run.mode == "overwrite":
            for f in self.existing(run.path):
                f.unlink()
        self._w = SummaryWriter(log_dir=str(run.path))

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        for r in records:
            kind, step = r["type"], r.get("step")
            if kind == "step":
                self._step(r, step)
            elif kind == "layers":
                self._layers(r, step)
            elif kind == "health":
                self._w.add_text("health", f"**{r['flag']}** `{r['layer']}`: {r['message']}", step)
            elif kind == "event":
                text = r["text"] or f"step {step}: {r['reason']}"
                self._w.add_text("events", "```\n" + text + "\n```", step)
        self._w.flush()

    def _step(self, r: Mapping[str, Any], step: int | None) -> None:
        w = self._w
        for key, tag in (("loss", "loss"), ("norm", "grad_norm/before_clip"), ("norm_after", "grad_norm/after_clip"),
                         ("threshold", "clip/threshold"), ("coef", "clip/coef"), ("lr", "lr")):
            v = decode_number(r[key])
            if v is not None:
                w.add_scalar(tag, v, step)
        if r["clipped"] is not None:
            w.add_scalar("clip/clipped", float(r["clipped"]), step)
        w.add_scalar("clip/skipped", float(r["skipped"]), step)
        if r["steps_seen"] and r["clipped_count"] is not None:
            w.add_scalar("clip/clip_rate", r["clipped_count"] / r["steps_seen"], step)

    def _layers(self, r: Mapping[str, Any], step: int | None) -> None:
        import numpy as np

        for key in ("grad_norm", "param_norm", "update_ratio"):
            values = r[key]
            if values is None:
                continue
            for name, v in zip(r["names"], values):
                x = decode_number(v)
                if x is not None:
                    self._w.add_scalar(f"layer_{key}/{name}", x, step)
            logs = [math.log10(v) for v in _finite(values) if v > 0]  # spans decades: log10
            if logs:
                self._w.add_histogram(f"layers/log10_{key}", np.asarray(logs, dtype=np.float64), step)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


class LoggingSink(Sink):
    """The ``gradguard.monitor`` logger (or ``logger``): steps at INFO, skips and health flags at WARNING."""

    name = "logging"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        if logger is not None and not isinstance(logger, logging.Logger):
            raise TypeError(f"logger must be a logging.Logger or None, got {type(logger).__name__}")
        self.logger = logger if logger is not None else _LOG

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        log = self.logger
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
                log.log(logging.WARNING if r["skipped"] else logging.INFO, " ".join(parts))
            elif kind == "health":
                log.warning("step %s: %s", r["step"], r["message"])
            elif kind == "event" and r["text"]:
                log.warning("step %s: %s\n%s", r["step"], r["reason"], r["text"])
            elif kind == "layers":
                log.debug("step %s: per-layer gradient norms %s", r["step"], dict(zip(r["names"], r["grad_norm"])))


class WandbSink(Sink):
    """Weights & Biases: ``wandb.init(mode="offline", dir=LOG_DIR, project="gradguard", **init_kwargs)``."""

    name = "wandb"

    def __init__(self, **init_kwargs: Any) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ImportError('the "wandb" sink needs Weights & Biases: pip install wandb') from e
        self.init_kwargs = init_kwargs
        self._run: Any = None

    def open(self, run: RunDirectory) -> None:
        import wandb

        options: dict[str, Any] = {"mode": "offline", "dir": str(run.path), "project": "gradguard"}
        options.update(self.init_kwargs)
        self._run = wandb.init(**options)

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
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
        if self._run is not None:
            self._run.finish()


def _sink_names(sinks: Iterable[str | Sink]) -> tuple[str, ...]:
    """How sinks are named in ``Monitor.sinks`` and the ``meta`` record: built-in names, else the class name."""
    return tuple(s if isinstance(s, str) else (s.name or type(s).__name__) for s in sinks)


def _make_sinks(sinks: Any, wandb_kwargs: Mapping[str, Any] | None) -> list[Sink]:
    """Sink names and :class:`Sink` instances -> instances (optional dependencies checked here, nothing created)."""
    items = _checked_sinks(sinks)
    return [s if isinstance(s, Sink) else _builtin_sink(s, wandb_kwargs) for s in items]


def _checked_sinks(sinks: Any) -> tuple[str | Sink, ...]:
    """``sinks`` as a tuple, every entry a known name or a :class:`Sink`, none twice; checked whole, first."""
    if isinstance(sinks, (str, Sink)):
        sinks = (sinks,)
    if not isinstance(sinks, Iterable):
        raise TypeError(f"sinks must be a sink name, a gg.Sink, or a sequence of them (names from {SINKS}), got "
                        f"{type(sinks).__name__}")
    items = tuple(sinks)
    if not items:
        raise ValueError(f"sinks must name at least one sink, e.g. sinks=('jsonl',); choose from {SINKS}")
    for s in items:
        if isinstance(s, str):
            if s not in SINKS:
                raise ValueError(f"unknown sink {s!r} in sinks; choose from {', '.join(SINKS)}, or pass a gg.Sink")
        elif not isinstance(s, Sink):
            raise TypeError(f"sinks must hold sink names (str) from {SINKS} or gg.Sink instances, got {s!r}")
    keys = [s if isinstance(s, str) else s.name for s in items if isinstance(s, str) or s.name]
    if len(set(keys)) != len(keys) or len({id(s) for s in items}) != len(items):
        raise ValueError(f"sinks lists a sink twice: {_sink_names(items)}")
    return items


def _builtin_sink(name: str, wandb_kwargs: Mapping[str, Any] | None) -> Sink:
    """The built-in sink called ``name`` (one of ``SINKS``, already checked)."""
    if name == "jsonl":
        return JsonlSink()
    if name == "tensorboard":
        return TensorBoardSink()
    if name == "logging":
        return LoggingSink()
    return WandbSink(**(wandb_kwargs or {}))


# ------------------------------------------------------------------------------------------- on-device staging
def _scalar(x: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = x.detach().reshape(())
    return x.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


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


class _Staging:
    """The on-device staging buffer: recorded steps and the running counts, until the next write.

    ``stage`` stacks a step's device values into one small tensor (no host read); ``drain`` copies everything
    staged to the host in one transfer per device and returns the step records with their per-layer values.
    """

    def __init__(self, counts: _Counts) -> None:
        self.pending: list[_Pending] = []
        self.steps_seen = counts.steps_seen
        self.skipped_count = counts.skipped_count
        self.clipped_host = counts.clipped_count  # the count as of the last host read
        self._clipped: Tensor | None = None  # clipped_count as a device tensor, once a step brought stats

    def count(self, stats: ClipStats | None, skipped: bool) -> None:
        self.steps_seen += 1
        self.skipped_count += skipped
        if stats is not None:  # a device add: the clip count stays exact between records, with no sync
            c = stats.clipped.detach().reshape(()).to(torch.int64)
            self._clipped = (c + self.clipped_host) if self._clipped is None else self._clipped + c.to(
                self._clipped.device)

    def stage(self, stats: ClipStats | None, loss: Tensor | float | None, skipped: bool, reason: str | None,
              lr: float | Tensor | None, step: int) -> _Pending:
        host: dict[str, Any] = {
            "type": "step", "step": step, "time": round(time.time(), 3), "loss": None, "norm": None,
            "norm_after": None, "threshold": None, "coef": None, "clipped": None, "skipped": skipped,
            "reason": reason, "lr": None, "steps_seen": self.steps_seen, "clipped_count": None,
            "skipped_count": self.skipped_count,
        }
        anchor = stats.norm if stats is not None else (loss if isinstance(loss, Tensor) else None)
        if anchor is None and isinstance(lr, Tensor):
            anchor = lr
        device = anchor.device if anchor is not None else torch.device("cpu")
        dtype = _wide(device)
        keys: list[str] = []
        values: list[Tensor] = []
        for key, v in (("loss", loss), ("lr", lr)):
            if isinstance(v, Tensor):
                keys.append(key)
                values.append(_scalar(v, dtype, device))
            elif v is not None:
                host[key] = float(v)
        if stats is not None:
            norm, coef = _scalar(stats.norm, dtype, device), _scalar(stats.coef, dtype, device)
            keys += ["norm", "norm_after", "threshold", "coef", "clipped"]
            values += [norm, norm * coef, _scalar(stats.threshold, dtype, device), coef,
                       _scalar(stats.clipped, dtype, device)]
        if self._clipped is not None:
            keys.append("clipped_count")
            values.append(_scalar(self._clipped, dtype, device))
        else:
            host["clipped_count"] = self.clipped_host
        p = _Pending(step, host, tuple(keys), torch.stack(values) if values else None)
        self.pending.append(p)
        return p

    def drain(self) -> list[tuple[_Pending, dict[str, Any], list[float] | None]]:
        """Everything staged, as ``(pending, step record, per-layer values)``; one host copy per device."""
        pending, self.pending = self.pending, []
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in pending:
            for t in (p.row, p.layers):
                if t is not None:
                    by_device.setdefault(t.device, []).append(t.reshape(-1).to(_wide(t.device)))
        host = {device: torch.cat(parts).cpu().tolist() for device, parts in by_device.items()}
        offsets = dict.fromkeys(host, 0)

        def take(t: Tensor) -> list[float]:
            i = offsets[t.device]
            offsets[t.device] = i + t.numel()
            return host[t.device][i:i + t.numel()]

        out: list[tuple[_Pending, dict[str, Any], list[float] | None]] = []
        for p in pending:
            rec = dict(p.host)
            if p.row is not None:
                rec.update(zip(p.keys, take(p.row)))
            if rec["clipped"] is not None:
                rec["clipped"] = bool(rec["clipped"])
            rec["clipped_count"] = self.clipped_host = int(rec["clipped_count"])
            for key in ("loss", "norm", "norm_after", "threshold", "coef", "lr"):
                rec[key] = encode_number(rec[key])
            out.append((p, rec, take(p.layers) if p.layers is not None else None))
        return out

    def clipped_total(self) -> int:
        """The exact clip count now (one host read; for the ``end`` record)."""
        if self._clipped is not None:
            self.clipped_host = int(self._clipped.item())
        return self.clipped_host


# ----------------------------------------------------------------------------------------- per-layer measurement
class _LayerProbe:
    r"""Per-layer measurement every ``every`` steps: gradient norms (before clipping), parameter norms, updates.

    The update ratio :math:`\|\theta_t - \theta_{t-1}\| / \|\theta_t\|` needs :math:`\theta_{t-1}`: one snapshot of
    the parameters, taken at the step before each measured step. Nothing else is copied: the differences are formed
    in the snapshot's own memory (``snapshot -= θ_t``, the norm of :math:`\theta_{t-1} - \theta_t` is the same), and
    with ``every=1`` the snapshot is refreshed in place (``copy_``) for the next step. So the monitor holds at most
    one copy of the parameter bytes, and only when ``update_ratio`` is on: that snapshot is state the update ratio
    needs by definition (the optimizer moves every layer in one step), held from one per-layer step to the next.

    Temporaries: one float32 upcast buffer for bf16/fp16 CPU tensors (1 MiB at most, and at most the largest such
    layer's bytes), never a layer's copy: the norm engine's no-host-read CPU path
    (``gradguard.norms._cpu_device_path_norms``), which also keeps long CPU tensors' norms float32-accurate. Names
    are the user's: a ``torch.compile`` wrapper's ``_orig_mod.`` prefix is dropped
    (``gradguard._compat.uncompiled``).
    """

    def __init__(self, every: int | None, norm_type: float, update_ratio: bool) -> None:
        self.every = every
        self.norm_type = norm_type
        self.update_ratio = update_ratio
        self._snapshot: tuple[int, dict[str, Tensor]] | None = None

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    @torch.no_grad()
    @norms.device_path()  # no host read on any device (the engine's CPU shortcuts would read values)
    def measure(self, stats: ClipStats | None, model: nn.Module, step: int) -> tuple[tuple[str, ...], Tensor] | None:
        """``(names, [grad norm, param norm, update ratio] x layers)`` on the device, or None without gradients."""
        named = [(n, p) for n, p in _user_named_parameters(model) if p.grad is not None]
        if not named:
            self._snapshot = None
            return None
        names = tuple(n for n, _ in named)
        params = [p.detach() for _, p in named]
        post = norms.tensor_norms([p.grad for _, p in named], self.norm_type, check=False)  # type: ignore[misc]
        wrapped = tuple(n for n, p in model.named_parameters() if p.grad is not None)  # as a clipper names them
        grad = _undo_clipping(post, stats, (names, wrapped))
        pnorm = norms.tensor_norms(params, self.norm_type, check=False).to(post)
        ratio = self._update_ratio(names, params, step)
        ratio = torch.full_like(post, math.nan) if ratio is None else ratio.to(post) / pnorm
        return names, torch.stack([grad, pnorm, ratio]).to(_wide(post.device))

    def _update_ratio(self, names: tuple[str, ...], params: list[Tensor], step: int) -> Tensor | None:
        snap, self._snapshot = self._snapshot, None
        if snap is None or snap[0] != step - 1 or not all(
                n in snap[1] and snap[1][n].shape == p.shape for n, p in zip(names, params)):
            return None
        diffs = [snap[1][n].sub_(p) for n, p in zip(names, params)]  # θ_{t-1} - θ_t, in the snapshot's memory
        out = norms.tensor_norms(diffs, self.norm_type, check=False)
        if self.due(step + 1):  # every=1: the snapshot becomes θ_t for the next step, in place
            for d, p in zip(diffs, params):
                d.copy_(p)
            self._snapshot = (step, dict(zip(names, diffs)))
        return out

    @torch.no_grad()
    def after(self, model: nn.Module, step: int) -> None:
        """Take the snapshot when the next step is measured (and the measurement did not already keep one)."""
        if not self.update_ratio or not self.due(step + 1) or (self._snapshot and self._snapshot[0] == step):
            return
        self._snapshot = None  # free the old one before copying
        self._snapshot = (step, {n: p.detach().clone() for n, p in _user_named_parameters(model) if p.requires_grad})


def _user_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` under the user's names (a ``torch.compile`` wrapper's prefix dropped)."""
    return uncompiled(model).named_parameters()


def _undo_clipping(post: Tensor, stats: ClipStats | None, names: tuple[tuple[str, ...], ...]) -> Tensor:
    """Per-layer norms before clipping, from the norms after it (exact for global and per-tensor clippers).

    ``names``: the layers' names as the stats may give them (the user's, and a ``torch.compile`` wrapper's).
    """
    same = stats is not None and stats.names in names
    if stats is not None and stats.tensor_norms is not None and same:
        return stats.tensor_norms.detach().to(post)
    if stats is None:
        return post
    c = stats.tensor_coefs if stats.tensor_coefs is not None and same else stats.coef
    c = c.detach().to(post)
    return post / torch.where(c > 0, c, torch.ones_like(c))


def _check_modes(update_ratio: Any, overwrite: Any, resume: Any, ranks: Any, wandb_kwargs: Any) -> None:
    for name, flag in (("update_ratio", update_ratio), ("overwrite", overwrite), ("resume", resume)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if overwrite and resume:
        raise ValueError("overwrite=True and resume=True contradict each other: overwrite replaces the run in "
                         "log_dir, resume continues it; pass one of them")
    if ranks not in ("zero", "all"):
        raise ValueError(f"ranks must be 'zero' (only rank 0 writes) or 'all' (one run per rank), got {ranks!r}")
    if wandb_kwargs is not None and not isinstance(wandb_kwargs, Mapping):
        raise TypeError(f"wandb_kwargs must be a mapping of wandb.init arguments, got {type(wandb_kwargs).__name__}")


# ---------------------------------------------------------------------------------------------------- ranks
def _rank() -> tuple[int, int]:
    """``(rank, world size)``: torch.distributed's when initialised, else torchrun's ``RANK``/``WORLD_SIZE``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


# -------------------------------------------------------------------------------------------------------- Monitor
class Monitor:
    """Record what clipping and the Guard do, on the device, and write it to JSONL / TensorBoard / logging / W&B.

    Args:
        log_dir: directory for ``metrics.jsonl`` and TensorBoard event files (created when missing).
        every: record every ``every``-th step (skipped steps and steps with a diagnosis are always recorded).
        per_layer_every: every ``per_layer_every``-th step, also record per-layer gradient norms, parameter norms
            and update-to-parameter ratios (needs ``model=`` in :meth:`record`); ``None`` turns this off.
        sinks: sink names from :data:`SINKS` and/or :class:`Sink` instances (your own, or built-in ones with
            options, e.g. ``LoggingSink(my_logger)``).
        flush_every: write after this many recorded steps (one device-to-host copy for all of them).
        flush_secs: also write at the first record after this many seconds since the last write.
        health: the :class:`~gradguard.health.LayerHealth` rules (``None`` for the defaults).
        norm_type: the p of the per-layer norms.
        update_ratio: keep one copy of the parameters from the step before each per-layer step, to measure the
            update (the optimizer moves every layer at once, so this copy is of all of them: +1x the parameter
            bytes, from that step to the per-layer one; always, with ``per_layer_every=1``). ``False``: per-layer
            records hold no copy, only an upcast buffer of 1 MiB at most (``benchmarks/mem_monitor.py``).
        overwrite: replace an existing run in ``log_dir`` (``metrics.jsonl``, TensorBoard files); without it (and
            without ``resume``) an existing run is an error rather than silently mixed with the new one.
        resume: continue the run in ``log_dir`` after a crash or a restart from a checkpoint: ``metrics.jsonl`` is
            appended to (a ``meta`` record with ``"resumed": true`` marks where), its earlier lines are kept, and
            the step numbers and running counts continue from the last ones written. No earlier run: a new one.
        ranks: under ``torch.distributed`` (or ``torchrun``'s ``RANK``), ``"zero"`` (default): only global rank 0
            writes, into ``log_dir``; the Monitor on every other rank records nothing and creates nothing (the
            gradient norms and the Guard's decisions are global, the loss is rank 0's). ``"all"``: every rank
            writes its own run into ``log_dir/rank<r>`` (``gradguard report log_dir`` overlays them; a single
            process writes into ``log_dir`` itself).
        wandb_kwargs: extra arguments for ``wandb.init`` (default ``mode="offline"``, ``dir=log_dir``).

    One log has one owner: the Monitor locks ``log_dir`` while open, and a second Monitor on it (another process,
    or this one) raises :class:`FileExistsError`. On ``SIGTERM`` every open Monitor writes what it holds, then the
    signal goes on to the handler installed before (by default the process still ends).

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
    >>> [(r["type"], r.get("step")) for r in map(json.loads, open(monitor.path))][:4]
    [('meta', None), ('step', 1), ('step', 2), ('layers', 2)]
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        every: int = 1,
        per_layer_every: int | None = 100,
        sinks: str | Sink | Iterable[str | Sink] = ("jsonl",),
        *,
        flush_every: int = 100,
        flush_secs: float = 30.0,
        health: LayerHealth | None = None,
        norm_type: float = 2.0,
        update_ratio: bool = True,
        overwrite: bool = False,
        resume: bool = False,
        ranks: Literal["zero", "all"] = "zero",
        wandb_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        # every check first: nothing is created for a bad argument
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path (str or os.PathLike), got {type(log_dir).__name__}")
        self.every = check_int(every, "every", low=1)
        self.per_layer_every = None if per_layer_every is None else check_int(per_layer_every, "per_layer_every", low=1)
        self.flush_every = check_int(flush_every, "flush_every", low=1)
        self.flush_secs = check_number(flush_secs, "flush_secs", low=0.0)
        if health is not None and not isinstance(health, LayerHealth):
            raise TypeError(f"health must be a gradguard LayerHealth or None, got {type(health).__name__}")
        self.health = health if health is not None else LayerHealth()
        _check_modes(update_ratio, overwrite, resume, ranks, wandb_kwargs)
        rank, world = _rank()
        self.rank = rank
        """This process's global rank (0 when not distributed)."""
        self.active = rank == 0 or ranks == "all"
        """Whether this Monitor writes (``False`` on ranks other than 0 with ``ranks="zero"``)."""
        self.log_dir = Path(log_dir) / f"rank{rank}" if ranks == "all" and world > 1 else Path(log_dir)
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise ValueError(f"log_dir {str(self.log_dir)!r} exists and is not a directory; pass a directory path")
        sink_objects = _make_sinks(sinks, wandb_kwargs)
        self.sinks = _sink_names(sink_objects)
        self.path = self.log_dir / JSONL_NAME
        self.flags: list[HealthFlag] = []
        """Every health flag raised so far (written to the sinks as ``health`` records)."""
        self._probe = _LayerProbe(self.per_layer_every, check_norm_type(norm_type), update_ratio)
        self._sinks: list[Sink] = []
        self._closed = False
        self._busy = False
        self._pid = os.getpid()
        self._run: RunDirectory | None = None
        counts = _Counts()
        if self.active:
            counts = self._open(sink_objects, "overwrite" if overwrite else "append" if resume else "new")
        self._staging = _Staging(counts)
        self._next_step = counts.last_step + 1
        self._last_write = time.monotonic()

    def _open(self, sinks: list[Sink], mode: Literal["new", "overwrite", "append"]) -> _Counts:
        """Own the directory, read where a resumed run stands, open every sink and write the ``meta`` record."""
        run = RunDirectory(self.log_dir, mode)
        run.acquire()  # first: a log another Monitor is writing gets that answer, not "already holds a run"
        try:
            if mode == "new":  # under the lock, so no other Monitor can create the files between check and open
                self._refuse_existing(sinks)
            counts, resumed = _resume_point(self.path) if mode == "append" else (_Counts(), False)
            meta = meta_record(torch=torch.__version__, every=self.every, per_layer_every=self.per_layer_every,
                               sinks=self.sinks, resumed=resumed)
            for s in sinks:
                s.open(run)
                self._sinks.append(s)
                s.write([meta])
        except BaseException:
            for s in self._sinks:
                s.close()
            self._sinks = []
            run.release()
            raise
        self._run = run
        _OPEN.add(self)
        _SIGTERM.install()
        return counts

    def _refuse_existing(self, sinks: list[Sink]) -> None:
        existing = [p for s in sinks for p in s.existing(self.log_dir)]
        if existing:
            raise FileExistsError(
                f"{str(self.log_dir)!r} already holds a run ({', '.join(p.name for p in existing[:3])}); pass "
                "resume=True to continue it, overwrite=True to replace it, or choose a new log_dir"
            )

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
            step: the step number, ``>= 1`` (default: one more than the last, so the first step is 1; after
                ``resume=True``, one more than the last step in the log). The Guard passes its own step count.
        """
        self._check_record(stats, loss, skipped, reason, lr, model, step)
        if not self.active:
            return
        step = self._next_step if step is None else step
        self._next_step = step + 1
        self._staging.count(stats, skipped)
        per_layer = model is not None and self._probe.due(step)
        event = skipped or diagnosis is not None
        if step % self.every == 0 or event or per_layer:
            pending = self._staging.stage(stats, loss, skipped, reason, lr, step)
            pending.event, pending.diagnosis = event, diagnosis
            if per_layer:
                assert model is not None
                measured = self._probe.measure(stats, model, step)
                if measured is not None:
                    pending.layer_names, pending.layers = measured
        if model is not None:
            self._probe.after(model, step)
        if event or len(self._staging.pending) >= self.flush_every or (
            self._staging.pending and time.monotonic() - self._last_write >= self.flush_secs
        ):
            self.flush()

    def _check_record(self, stats: Any, loss: Any, skipped: Any, reason: Any, lr: Any, model: Any, step: Any) -> None:
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
        if step is not None:
            check_int(step, "step", low=1)

    # ----------------------------------------------------------------------------------------------- writing
    def flush(self) -> None:
        """Copy the recorded values to the host (one transfer per device) and write them to every sink."""
        if self._closed or self._busy or not self.active:
            return
        self._busy = True
        try:
            self._last_write = time.monotonic()
            records = self._records()
            if records:
                for sink in self._sinks:
                    sink.write(records)
        finally:
            self._busy = False
            _SIGTERM.resume()

    def _records(self) -> list[dict[str, Any]]:
        """The staged steps as records, with their per-layer, health and event records, in step order."""
        records: list[dict[str, Any]] = []
        for p, rec, layer_values in self._staging.drain():
            records.append(rec)
            if layer_values is not None:
                n = len(p.layer_names)
                grad, pnorm, ratio = layer_values[:n], layer_values[n:2 * n], layer_values[2 * n:]
                records.append({
                    "type": "layers", "step": p.step, "names": list(p.layer_names),
                    "grad_norm": [encode_number(v) for v in grad], "param_norm": [encode_number(v) for v in pnorm],
                    "update_ratio": None if all(math.isnan(v) for v in ratio) else [encode_number(v) for v in ratio],
                })
                for flag in self.health.update(p.step, p.layer_names, grad, pnorm):
                    self.flags.append(flag)
                    h = flag.as_dict()
                    h["value"] = encode_number(flag.value)
                    records.append(h)
            if p.event:
                d = p.diagnosis
                as_dict = getattr(d, "as_dict", None)
                records.append({
                    "type": "event", "step": p.step, "skipped": p.host["skipped"], "reason": p.host["reason"],
                    "diagnosis": _jsonable(as_dict()) if callable(as_dict) else None,
                    "text": None if d is None else str(d),
                })
        return records

    def _flush_for_signal(self) -> bool:
        """SIGTERM: write what is staged; ``True`` when a write is in progress (it finishes, then passes it on)."""
        if self._pid != os.getpid():  # a forked child (a DataLoader worker) inherited the handler: not its log
            return False
        if self._busy:
            return True
        try:
            self.flush()
        except Exception:  # pragma: no cover - a failing sink must not stop the signal
            _LOG.exception("gradguard: writing a Monitor on SIGTERM failed")
        return False

    def close(self) -> None:
        """Write what is pending, an ``end`` record, and close every sink. Safe to call twice."""
        if self._closed or not self.active:
            self._closed = True
            return
        try:
            self.flush()
            s = self._staging
            end = end_record(s.steps_seen, s.clipped_total(), s.skipped_count)
            for sink in self._sinks:
                sink.write([end])
        finally:
            self._closed = True
            _OPEN.discard(self)
            try:
                for sink in self._sinks:
                    sink.close()
            finally:
                if self._run is not None:
                    self._run.release()
                _SIGTERM.uninstall()

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

