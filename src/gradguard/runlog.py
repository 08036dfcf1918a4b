"""The run log: the one definition of ``metrics.jsonl``, written by :class:`~gradguard.Monitor`, read by the report.

A run log is UTF-8 text, one strict-JSON object per line (RFC 8259: no ``NaN``/``Infinity`` tokens). Non-finite
numbers are the strings ``"nan"``, ``"inf"``, ``"-inf"`` (:func:`encode_number` / :func:`decode_number`). The
``"type"`` field tells the records apart; :data:`FIELDS` lists each record's fields, in the order written:

* ``meta`` -- the first line: ``schema`` (:data:`SCHEMA_VERSION`), versions, creation time, the Monitor's settings.
  A run resumed after a crash appends a later ``meta`` record with ``"resumed": true``; the records after it
  continue the same run (step numbers may repeat the ones recorded before the crash).
* ``step`` -- one recorded training step, with the running counts ``steps_seen`` / ``clipped_count`` /
  ``skipped_count`` (exact even when the Monitor records every k-th step only).
* ``layers`` -- per-layer gradient norms, parameter norms and update ratios, one value per name.
* ``health`` -- a raised layer flag (:mod:`gradguard.health`).
* ``event`` -- a skipped or diagnosed step, with the diagnosis and its readable text.
* ``end`` -- the final counts, written on close.

Compatibility: a reader accepts every schema version up to its own (:data:`READABLE_VERSIONS`) and a log whose
``meta`` record has no ``schema`` field (written before the field existed; read as schema 1). A newer version is
refused with a message saying to upgrade, never read wrongly. Unknown extra fields are ignored, so a writer may add
an optional field without a new version; removing or retyping a field needs a new version and a reader for the old
one here.

:func:`load_run` streams the file (a million steps stay in compact columns, :class:`StepTable`), checks the type of
every field it keeps, and turns anything malformed into a :class:`ReportError` naming the file, the line and the
field. A last line cut short by a crash (no trailing newline) is dropped with a warning.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

__all__ = [
    "FIELDS",
    "HEALTH_FLAGS",
    "JSONL_NAME",
    "READABLE_VERSIONS",
    "RECORD_TYPES",
    "SCHEMA_VERSION",
    "ReportError",
    "RunData",
    "StepTable",
    "decode_number",
    "encode_number",
    "end_record",
    "load_run",
    "meta_record",
    "record",
]

SCHEMA_VERSION = 1
"""The schema version this gradguard writes (the ``schema`` field of the ``meta`` record)."""
READABLE_VERSIONS = (1,)
"""The schema versions :func:`load_run` reads (a ``meta`` record without ``schema`` is read as version 1)."""
JSONL_NAME = "metrics.jsonl"
"""The run log's file name inside the Monitor's ``log_dir``."""
RECORD_TYPES = ("meta", "step", "layers", "health", "event", "end")
HEALTH_FLAGS = ("vanishing", "exploding", "nonfinite")
"""The values of a ``health`` record's ``flag`` (see :mod:`gradguard.health`)."""

FIELDS: dict[str, tuple[str, ...]] = {
    "meta": ("type", "schema", "gradguard", "torch", "created", "every", "per_layer_every", "sinks"),
    "step": ("type", "step", "time", "loss", "norm", "norm_after", "threshold", "coef", "clipped", "skipped",
             "reason", "lr", "steps_seen", "clipped_count", "skipped_count"),
    "layers": ("type", "step", "names", "grad_norm", "param_norm", "update_ratio"),
    "health": ("type", "step", "layer", "flag", "value", "message"),
    "event": ("type", "step", "skipped", "reason", "diagnosis", "text"),
    "end": ("type", "steps_seen", "clipped_count", "skipped_count"),
}
"""Every record type's fields as the Monitor writes them (``meta`` may add ``resumed``)."""

STEP_NUMBERS = ("time", "loss", "norm", "norm_after", "threshold", "coef", "lr")
"""The ``step`` fields that are numbers (or ``null``); non-finite ones encoded by :func:`encode_number`."""
STEP_COUNTS = ("steps_seen", "clipped_count", "skipped_count")
_STEP_REQUIRED = ("step", "loss", "norm", "norm_after", "threshold", "coef", "clipped", "skipped", "reason", "lr")
_MAX_INT = 2**53  # step numbers and counts are exact in a float64 (plots, JSON readers in other languages)


class ReportError(ValueError):
    """A run directory or its ``metrics.jsonl`` cannot be read; the message names the file, line and field."""


# ------------------------------------------------------------------------------------------------ numbers
def encode_number(x: float | None) -> float | str | None:
    """A float as strict JSON: non-finite values become ``"nan"``, ``"inf"``, ``"-inf"``.

    >>> encode_number(1.5), encode_number(float("-inf")), encode_number(None)
    (1.5, '-inf', None)
    """
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def decode_number(x: Any) -> float | None:
    """Inverse of :func:`encode_number` (``None`` stays ``None``); anything else raises ``ValueError``.

    >>> decode_number("inf"), decode_number(2), decode_number(None)
    (inf, 2.0, None)
    """
    if x is None:
        return None
    if isinstance(x, str):
        if x not in ("nan", "inf", "-inf"):
            raise ValueError(f"expected a number or 'nan'/'inf'/'-inf', got {_short(x)}")
        return float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"expected a number, got {_short(x)}")
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"number out of the float64 range: {_short(x)}") from None


def meta_record(*, torch: str, every: int, per_layer_every: int | None, sinks: Sequence[str],
                resumed: bool = False) -> dict[str, Any]:
    """The ``meta`` record a Monitor writes first (``resumed=True``: the one it appends when resuming a run)."""
    import datetime

    from gradguard import __version__

    rec: dict[str, Any] = {
        "type": "meta", "schema": SCHEMA_VERSION, "gradguard": __version__, "torch": torch,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "every": every, "per_layer_every": per_layer_every, "sinks": list(sinks),
    }
    if resumed:
        rec["resumed"] = True
    return rec


def record(kind: str, **values: Any) -> dict[str, Any]:
    """A record of type ``kind`` with every field of :data:`FIELDS` (``None`` where not given), as written.

    >>> record("end", steps_seen=3, clipped_count=1, skipped_count=0)
    {'type': 'end', 'steps_seen': 3, 'clipped_count': 1, 'skipped_count': 0}
    """
    if kind not in FIELDS:
        raise ValueError(f"kind must be one of {RECORD_TYPES}, got {kind!r}")
    unknown = set(values) - set(FIELDS[kind]) - ({"resumed"} if kind == "meta" else set())
    if unknown:
        raise ValueError(f"{kind} records have no field(s) {sorted(unknown)}; the fields are {FIELDS[kind][1:]}")
    rec = dict.fromkeys(FIELDS[kind])
    rec.update(values, type=kind)
    return rec


def end_record(steps_seen: int, clipped_count: int, skipped_count: int) -> dict[str, Any]:
    """The ``end`` record a Monitor writes on close."""
    return record("end", steps_seen=steps_seen, clipped_count=clipped_count, skipped_count=skipped_count)


def _short(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


# ------------------------------------------------------------------------------------------- field checks
class _Bad(Exception):
    """A field failed its check (internal; turned into a ReportError with file, line, record type, field)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


def _get(rec: dict[str, Any], key: str, required: bool) -> Any:
    if key not in rec:
        if required:
            raise _Bad(key, "missing")
        return None
    return rec[key]


def _int(rec: dict[str, Any], key: str, *, required: bool = True, nullable: bool = False, low: int = -_MAX_INT,
         ) -> int | None:
    v = _get(rec, key, required)
    if v is None and (nullable or (not required and key not in rec)):
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(key, f"expected an integer{' or null' if nullable else ''}, got {_short(v)}")
    if not low <= v <= _MAX_INT:
        raise _Bad(key, f"expected an integer in [{low}, 2**53], got {_short(v)}")
    return v


def _num(rec: dict[str, Any], key: str, *, required: bool = True) -> float | None:
    v = _get(rec, key, required)
    try:
        return decode_number(v)
    except ValueError as e:
        raise _Bad(key, str(e)) from None


def _bool(rec: dict[str, Any], key: str, *, required: bool = True, nullable: bool = False) -> bool | None:
    v = _get(rec, key, required)
    if v is None and (nullable or not required):
        return None
    if not isinstance(v, bool):
        raise _Bad(key, f"expected true or false{' or null' if nullable else ''}, got {_short(v)}")
    return v


def _str(rec: dict[str, Any], key: str, *, required: bool = True, nullable: bool = True) -> str | None:
    v = _get(rec, key, required)
    if v is None and (nullable or not required):
        return None
    if not isinstance(v, str):
        raise _Bad(key, f"expected a string{' or null' if nullable else ''}, got {_short(v)}")
    return v


def _numbers(rec: dict[str, Any], key: str, n: int, *, required: bool) -> array[float] | None:
    v = _get(rec, key, required)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != n:
        raise _Bad(key, f"expected a list of {n} numbers (one per name) or null, got {_short(v)}")
    out = array("d")
    for i, x in enumerate(v):
        try:
            d = decode_number(x)
        except ValueError as e:
            raise _Bad(f"{key}[{i}]", str(e)) from None
        if d is None:
            raise _Bad(f"{key}[{i}]", "expected a number, got None")
        out.append(d)
    return out


# -------------------------------------------------------------------------------------------------- steps
class StepTable(Sequence[dict[str, Any]]):
    """The ``step`` records of a run, in compact columns (about 90 bytes a step instead of ~1 kB of dicts).

    Indexing and iteration give each step as a dict with every field of :data:`FIELDS` ``["step"]`` (numbers
    decoded: floats, ``None`` where not recorded); :meth:`numbers` and :meth:`ints` give whole columns as NumPy
    arrays for plotting.
    """

    def __init__(self) -> None:
        self._step = array("q")
        self._num = {k: array("d") for k in STEP_NUMBERS}  # NaN where not recorded: see _has
        self._has = {k: bytearray() for k in STEP_NUMBERS}
        self._cnt = {k: array("q") for k in STEP_COUNTS}  # -1 where not recorded
        self._clipped = bytearray()  # 0 false, 1 true, 2 null
        self._skipped = bytearray()
        self._reason: list[str | None] = []
        self._reasons: dict[str, str] = {}  # one string object per distinct reason

    def _append(self, rec: dict[str, Any]) -> None:
        """Check every field of a ``step`` record, then append it (raises ``_Bad`` before appending anything)."""
        for k in _STEP_REQUIRED:
            if k not in rec:
                raise _Bad(k, "missing")
        step = _int(rec, "step")
        nums: list[float | None] = []
        for k in STEP_NUMBERS:  # the common case (a float, or null) without a call per field: a million lines
            v = rec.get(k)
            nums.append(v if (v is None or type(v) is float) else _num(rec, k, required=False))
        t = nums[0]
        if t is not None and not math.isfinite(t):
            raise _Bad("time", f"expected finite Unix seconds, got {_short(rec['time'])}")
        clipped = rec["clipped"]
        if clipped is not None and type(clipped) is not bool:
            _bool(rec, "clipped", nullable=True)
        skipped = rec["skipped"]
        if type(skipped) is not bool:
            _bool(rec, "skipped")
        reason = rec["reason"]
        if reason is not None and type(reason) is not str:
            _str(rec, "reason")
        counts = []
        for k in STEP_COUNTS:
            c = rec.get(k)
            counts.append(c if (c is None or (type(c) is int and 0 <= c <= _MAX_INT))
                          else _int(rec, k, required=False, nullable=True, low=0))
        self._step.append(step)  # type: ignore[arg-type]
        for k, x in zip(STEP_NUMBERS, nums):
            self._num[k].append(math.nan if x is None else x)
            self._has[k].append(x is not None)
        for k, c in zip(STEP_COUNTS, counts):
            self._cnt[k].append(-1 if c is None else c)
        self._clipped.append(2 if clipped is None else int(clipped))
        self._skipped.append(skipped)
        self._reason.append(None if reason is None else self._reasons.setdefault(reason, reason))

    def __len__(self) -> int:
        return len(self._step)

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("step index out of range")
        out: dict[str, Any] = {}
        for k in FIELDS["step"]:  # the order written
            if k in self._num:
                out[k] = self._num[k][i] if self._has[k][i] else None
            elif k in self._cnt:
                v = self._cnt[k][i]
                out[k] = None if v < 0 else v
            elif k == "clipped":
                c = self._clipped[i]
                out[k] = None if c == 2 else bool(c)
            elif k == "skipped":
                out[k] = bool(self._skipped[i])
            elif k == "reason":
                out[k] = self._reason[i]
            elif k == "step":
                out[k] = self._step[i]
            else:
                out[k] = "step"
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def ints(self, key: str) -> Any:
        """A column of integers as an ``int64`` NumPy array: ``"step"``, a count (-1 where not recorded),
        ``"clipped"`` (0, 1, 2 for null) or ``"skipped"`` (0, 1)."""
        import numpy as np

        if key == "step":
            return np.frombuffer(self._step, dtype=np.int64) if len(self) else np.zeros(0, np.int64)
        if key in ("clipped", "skipped"):
            buf = self._clipped if key == "clipped" else self._skipped
            return np.frombuffer(bytes(buf), dtype=np.uint8).astype(np.int64)
        if key not in self._cnt:
            raise KeyError(f"{key!r} is not an integer step field; choose from step, clipped, skipped, {STEP_COUNTS}")
        col = self._cnt[key]
        return np.frombuffer(col, dtype=np.int64) if len(col) else np.zeros(0, np.int64)

    def numbers(self, key: str) -> tuple[Any, Any]:
        """``(values, recorded)``: a number column as ``float64`` (NaN where not recorded) and its mask."""
        import numpy as np

        if key not in self._num:
            raise KeyError(f"{key!r} is not a number step field; choose from {STEP_NUMBERS}")
        if not len(self):
            return np.zeros(0), np.zeros(0, bool)
        return (np.frombuffer(self._num[key], dtype=np.float64),
                np.frombuffer(bytes(self._has[key]), dtype=np.uint8).astype(bool))

    def reasons(self) -> list[str | None]:
        """The ``reason`` column."""
        return list(self._reason)


# ------------------------------------------------------------------------------------------------ records
@dataclass
class RunData:
    """One recorded run, decoded: every kept field type-checked, non-finite numbers back to floats.

    ``meta`` is the first ``meta`` record and ``resumes`` the later ones (``"resumed": true``), each with the
    1-based ``line`` it was read from added. ``layers`` hold ``grad_norm`` / ``param_norm`` / ``update_ratio`` as
    float arrays (or ``None``); ``health`` values and ``event`` fields are decoded the same way.
    """

    name: str
    path: Path
    meta: dict[str, Any]
    steps: StepTable = field(default_factory=StepTable)
    layers: list[dict[str, Any]] = field(default_factory=list)
    health: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)


def _meta(rec: dict[str, Any]) -> dict[str, Any]:
    if "schema" in rec:  # absent: written before the field existed, read as version 1
        v = rec["schema"]
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad("schema", f"expected an integer schema version, got {_short(v)}")
        if v not in READABLE_VERSIONS:
            newer = v > max(READABLE_VERSIONS)
            raise _Bad("schema", f"schema {v} is not supported: this gradguard reads schema "
                       f"{', '.join(map(str, READABLE_VERSIONS))}"
                       + ("; the log was written by a newer gradguard: upgrade (pip install -U gradguard)"
                          if newer else "; the file is corrupt or from another tool"))
    for k in ("gradguard", "torch", "created"):
        _str(rec, k, required=False)
    _int(rec, "every", required=False, nullable=True, low=1)
    _int(rec, "per_layer_every", required=False, nullable=True, low=1)
    sinks = _get(rec, "sinks", False)
    if sinks is not None and (not isinstance(sinks, list) or not all(isinstance(s, str) for s in sinks)):
        raise _Bad("sinks", f"expected a list of strings, got {_short(sinks)}")
    _bool(rec, "resumed", required=False)
    return dict(rec)


def _layers(rec: dict[str, Any], last_names: tuple[str, ...]) -> dict[str, Any]:
    step = _int(rec, "step")
    names = _get(rec, "names", True)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _Bad("names", f"expected a list of strings, got {_short(names)}")
    kept = last_names if tuple(names) == last_names else tuple(names)  # share the names between records
    out: dict[str, Any] = {"type": "layers", "step": step, "names": kept,
                           "grad_norm": _numbers(rec, "grad_norm", len(names), required=True)}
    if out["grad_norm"] is None:
        raise _Bad("grad_norm", "expected a list of numbers, got None")
    for k in ("param_norm", "update_ratio"):
        out[k] = _numbers(rec, k, len(names), required=False)
    return out


def _health(rec: dict[str, Any]) -> dict[str, Any]:
    flag = _str(rec, "flag", nullable=False)
    if flag not in HEALTH_FLAGS:
        raise _Bad("flag", f"expected one of {HEALTH_FLAGS}, got {_short(rec['flag'])}")
    return {"type": "health", "step": _int(rec, "step"), "layer": _str(rec, "layer", nullable=False), "flag": flag,
            "value": _num(rec, "value", required=False), "message": _str(rec, "message", required=False) or ""}


def _event(rec: dict[str, Any]) -> dict[str, Any]:
    diagnosis = _get(rec, "diagnosis", False)
    if diagnosis is not None and not isinstance(diagnosis, dict):
        raise _Bad("diagnosis", f"expected an object or null, got {_short(diagnosis)}")
    return {"type": "event", "step": _int(rec, "step"), "skipped": bool(_bool(rec, "skipped", required=False)),
            "reason": _str(rec, "reason", required=False), "diagnosis": diagnosis,
            "text": _str(rec, "text", required=False)}


def _end(rec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "end", **{k: _int(rec, k, low=0) for k in STEP_COUNTS}}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON (non-finite numbers are written as \"nan\"/\"inf\"/\"-inf\")")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one decoder (json.loads with options builds one a call)


class _RunReader:
    """:func:`load_run`'s state between lines: the run so far, the last layer names (a ``layers`` record may say
    "same as before"), and whether the ``end`` record was read (only a resumed run's ``meta`` may follow it)."""

    def __init__(self, run: RunData) -> None:
        self.run = run
        self.last_names: tuple[str, ...] = ()
        self.after_end = False

    def read_line(self, raw: bytes, where: str, lineno: int) -> None:
        """Decode one line (``where`` is ``path:line``) and add its record; blank and cut-short lines add nothing."""
        ok, rec = _decode_line(raw, where, self.run.warnings)
        if not ok:
            return
        kind = rec.get("type") if isinstance(rec, dict) else None
        if not isinstance(kind, str) or kind not in RECORD_TYPES:
            raise ReportError(f"{where}: not a gradguard record (expected an object with 'type' in "
                              f"{RECORD_TYPES}, got {_short(rec)})")
        if not self.run.meta and kind != "meta":
            raise ReportError(f"{where}: the first line must be the 'meta' record; is this a gradguard "
                              "metrics.jsonl?")
        try:
            self._add(kind, rec, where, lineno)
        except _Bad as e:
            raise ReportError(f"{where}: {kind} record, field {e.field!r}: {e.message}") from None

    def _add(self, kind: str, rec: dict[str, Any], where: str, lineno: int) -> None:
        run = self.run
        if kind == "meta":
            meta = _meta(rec)
            if not run.meta:
                run.meta = meta
            elif meta.get("resumed") is True:
                run.resumes.append({**meta, "line": lineno})
                self.after_end = False
            else:
                raise _Bad("resumed", "a second 'meta' record must say \"resumed\": true (two runs "
                           "were written into one file; give each run its own log_dir)")
            return
        if self.after_end:
            raise ReportError(f"{where}: a {kind!r} record after the 'end' record; a resumed run "
                              "starts with a 'meta' record with \"resumed\": true")
        if kind == "step":
            run.steps._append(rec)
        elif kind == "layers":
            layer = _layers(rec, self.last_names)
            self.last_names = layer["names"]
            run.layers.append(layer)
        elif kind == "health":
            run.health.append(_health(rec))
        elif kind == "event":
            run.events.append(_event(rec))
        else:
            run.end = _end(rec)
            self.after_end = True


def _decode_line(raw: bytes, where: str, warnings: list[str]) -> tuple[bool, Any]:
    """``(True, value)`` for a line of JSON; ``(False, None)`` for a blank line or a last line cut short by a crash
    (no trailing newline: noted in ``warnings``). Anything else that does not decode is a ReportError."""
    complete = raw.endswith(b"\n")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if not complete:
            warnings.append(f"{where}: last line cut short (the run crashed while writing it); ignored")
            return False, None
        raise ReportError(f"{where}: not UTF-8 text (byte {e.start + 1}: {e.reason}); is it a "
                          "metrics.jsonl written by gg.Monitor?") from None
    if not line.strip():
        return False, None
    try:
        return True, _DECODER.decode(line)
    except (ValueError, RecursionError) as e:
        if not complete:
            warnings.append(f"{where}: last line cut short (the run crashed while writing it); ignored")
            return False, None
        msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)[:200]
        raise ReportError(f"{where}: not valid JSON ({msg}); the file is corrupt: remove or repair "
                          "that line") from None


def load_run(run_dir: str | os.PathLike[str], name: str | None = None) -> RunData:
    """Read ``run_dir/metrics.jsonl`` line by line into a :class:`RunData`.

    Raises :class:`ReportError` naming the file, the line and the field for anything that is not a record of a
    readable schema version. A last line cut short by a crash (no trailing newline) is dropped with a warning in
    ``RunData.warnings``.
    """
    root = Path(run_dir)
    path = root / JSONL_NAME
    if not path.is_file():
        raise ReportError(f"{str(path)!r} does not exist; record a run with gg.Monitor({str(root)!r})")
    run = RunData(name=name or root.name or str(root), path=root, meta={})
    reader = _RunReader(run)
    try:
        with open(path, "rb") as f:  # bytes, split at b"\n" only, decoded line by line: errors name their line
            for lineno, raw in enumerate(f, start=1):
                reader.read_line(raw, f"{path}:{lineno}", lineno)
    except OSError as e:
        raise ReportError(f"{str(path)!r} cannot be read: {e.strerror or e}") from None
    if not run.meta:
        raise ReportError(f"{str(path)!r} is empty: the run recorded nothing (was the Monitor created and closed "
                          "before any step?)")
    if not run.steps:
        raise ReportError(f"{str(path)!r} holds no step records: the run ended before its first recorded step")
    return run
