"""``gradguard report RUN_DIR``: a self-contained HTML report of a run recorded by :class:`~gradguard.Monitor`.

For each run (``RUN_DIR`` holding ``metrics.jsonl``, or each sub-directory of ``RUN_DIR`` holding one) the report
shows:

* the total gradient norm over time, before and after clipping, with the threshold, the clipped steps and the
  skipped steps;
* the clip rate (over a rolling window and cumulatively) and the loss;
* a heatmap of per-layer gradient norms over time (and of update-to-parameter ratios when recorded);
* the flagged layers (vanishing / exploding / non-finite, see :mod:`gradguard.health`) and the diagnosis of each
  skipped or non-finite step;

and, for several runs, the norms and losses overlaid. The plots are PNGs (matplotlib, ``pip install
"gradguard[plot]"``) embedded in the HTML as ``data:`` URIs, so the one file can be mailed or attached, and the same
PNGs are written beside it (``<stem>-<plot>.png``). Everything is rendered in memory first and then written with
atomic renames: a bad input or a failed plot leaves nothing half-written.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradguard.monitor import JSONL_NAME, SCHEMA, decode_number

__all__ = ["ReportError", "ReportResult", "RunData", "build_report", "find_runs", "load_run", "summarize"]

_TYPES = ("meta", "step", "layers", "health", "event", "end")
_STEP_KEYS = ("step", "loss", "norm", "norm_after", "threshold", "coef", "clipped", "skipped", "reason", "lr")
_NUMBER_KEYS = ("loss", "norm", "norm_after", "threshold", "coef", "lr")


class ReportError(ValueError):
    """The run directory or its ``metrics.jsonl`` cannot be read; the message says why and what to do."""


@dataclass
class RunData:
    """One recorded run, decoded (non-finite numbers back to floats)."""

    name: str
    path: Path
    meta: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    health: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote: the HTML file and the PNGs beside it."""

    html: Path
    images: tuple[Path, ...]
    runs: tuple[RunData, ...]


# ----------------------------------------------------------------------------------------------------- loading
def find_runs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The run directories under ``run_dir``: itself if it holds ``metrics.jsonl``, else its sub-directories that do.

    Raises :class:`ReportError` for a missing or empty directory, or one without any recorded run.
    """
    root = Path(run_dir)
    if not root.exists():
        raise ReportError(f"RUN_DIR {str(root)!r} does not exist; pass the log_dir given to gg.Monitor")
    if not root.is_dir():
        raise ReportError(f"RUN_DIR {str(root)!r} is not a directory; pass the log_dir given to gg.Monitor")
    if (root / JSONL_NAME).is_file():
        return [root]
    if not any(root.iterdir()):
        raise ReportError(f"RUN_DIR {str(root)!r} is empty; record a run into it with gg.Monitor({str(root)!r})")
    runs = sorted(p.parent for p in root.glob(f"*/{JSONL_NAME}") if p.is_file())
    if not runs:
        raise ReportError(
            f"no {JSONL_NAME} in {str(root)!r} or its sub-directories; record a run with gg.Monitor(log_dir) "
            "(sinks must include 'jsonl') and pass that log_dir"
        )
    return runs


def _decode_step(rec: dict[str, Any], where: str) -> dict[str, Any]:
    missing = [k for k in _STEP_KEYS if k not in rec]
    if missing:
        raise ReportError(f"{where}: step record lacks {missing}; the file is corrupt or from another tool")
    out = dict(rec)
    for k in _NUMBER_KEYS:
        try:
            out[k] = decode_number(rec[k])
        except ValueError as e:
            raise ReportError(f"{where}: field {k!r}: {e}") from None
    if not isinstance(rec["step"], int) or isinstance(rec["step"], bool):
        raise ReportError(f"{where}: 'step' must be an integer, got {rec['step']!r}")
    return out


def _decode_layers(rec: dict[str, Any], where: str) -> dict[str, Any]:
    names = rec.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ReportError(f"{where}: layers record needs 'names', a list of strings")
    out = dict(rec)
    for k in ("grad_norm", "param_norm", "update_ratio"):
        values = rec.get(k)
        if values is None:
            out[k] = None
            continue
        if not isinstance(values, list) or len(values) != len(names):
            raise ReportError(f"{where}: layers field {k!r} must be a list with one value per name")
        try:
            out[k] = [decode_number(v) for v in values]
        except ValueError as e:
            raise ReportError(f"{where}: layers field {k!r}: {e}") from None
    if out["grad_norm"] is None:
        raise ReportError(f"{where}: layers record lacks 'grad_norm'")
    return out


def load_run(run_dir: str | os.PathLike[str], name: str | None = None) -> RunData:
    """Read ``run_dir/metrics.jsonl``.

    A last line cut short by a crash (no trailing newline) is dropped with a warning in ``RunData.warnings``; any
    other line that is not a valid record raises :class:`ReportError` naming the file and line.
    """
    root = Path(run_dir)
    path = root / JSONL_NAME
    if not path.is_file():
        raise ReportError(f"{str(path)!r} does not exist; record a run with gg.Monitor({str(root)!r})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReportError(
            f"{str(path)!r} is not UTF-8 text ({e}); is it a metrics.jsonl written by gg.Monitor?"
        ) from None
    if not text.strip():
        raise ReportError(f"{str(path)!r} is empty: the run recorded nothing (was the Monitor created and closed "
                          "before any step?)")
    lines = text.split("\n")
    truncated_tail = not text.endswith("\n")
    run = RunData(name=name or root.name or str(root), path=root, meta={})
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if truncated_tail and i == len(lines):
                run.warnings.append(f"{where}: last line cut short (the run crashed while writing it); ignored")
                continue
            raise ReportError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); the file is corrupt — "
                              "remove or repair that line") from None
        if not isinstance(rec, dict) or rec.get("type") not in _TYPES:
            raise ReportError(f"{where}: not a gradguard record (expected an object with 'type' in {_TYPES})")
        kind = rec["type"]
        if i == 1 and kind != "meta":
            raise ReportError(f"{where}: the first line must be the 'meta' record; is this a gradguard metrics.jsonl?")
        if kind == "meta":
            if rec.get("schema") != SCHEMA:
                raise ReportError(f"{where}: schema {rec.get('schema')!r} is not supported (this gradguard reads "
                                  f"schema {SCHEMA}); upgrade gradguard")
            run.meta = rec
        elif kind == "step":
            run.steps.append(_decode_step(rec, where))
        elif kind == "layers":
            run.layers.append(_decode_layers(rec, where))
        elif kind == "health":
            run.health.append(rec)
        elif kind == "event":
            run.events.append(rec)
        else:
            run.end = rec
    if not run.steps:
        raise ReportError(f"{str(path)!r} holds no step records: the run ended before its first recorded step")
    return run


def summarize(run: RunData) -> dict[str, Any]:
    """The headline numbers of a run: steps, final and best loss, skips, clip rate, largest norm, wall time."""
    steps = run.steps
    last = steps[-1]
    seen = run.end["steps_seen"] if run.end else last.get("steps_seen") or len(steps)
    clipped = run.end["clipped_count"] if run.end else last.get("clipped_count")
    skipped = run.end["skipped_count"] if run.end else last.get("skipped_count", 0)
    losses = [s["loss"] for s in steps if s["loss"] is not None]
    finite_losses = [v for v in losses if math.isfinite(v)]
    norms = [s["norm"] for s in steps if s["norm"] is not None]
    first_bad = next((s["step"] for s in steps if any(
        s[k] is not None and not math.isfinite(s[k]) for k in ("loss", "norm"))), None)
    return {
        "run": run.name,
        "steps": seen,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(finite_losses) if finite_losses else None,
        "skipped": skipped,
        "clip_rate": (clipped / seen) if (clipped is not None and seen) else None,
        "max_norm": max((v for v in norms if math.isfinite(v)), default=None),
        "first_nonfinite_step": first_bad,
        "flags": len(run.health),
        "wall_s": (steps[-1]["time"] - steps[0]["time"]) if "time" in steps[0] else None,
    }


# ---------------------------------------------------------------------------------------------------- plotting
def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError('gradguard report needs matplotlib: pip install "gradguard[plot]"') from e
    return matplotlib


def _figure(width: float = 10.0, height: float = 3.6) -> Any:
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot, no global state: safe inside a training process
    return fig


def _margins(fig: Any, left: float = 0.85, right: float = 0.2, bottom: float = 0.55, top: float = 0.4) -> None:
    """Fixed margins in inches (``tight_layout`` draws the figure an extra time: twice the cost)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _series(steps: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for s in steps:
        if s[key] is not None:
            xs.append(s["step"])
            ys.append(s[key])
    return xs, ys


def _log_axis(ax: Any, values: Sequence[float]) -> None:
    if values and all(v > 0 for v in values if math.isfinite(v)) and any(math.isfinite(v) for v in values):
        ax.set_yscale("log")


def _mark_nonfinite(ax: Any, xs: Sequence[int], ys: Sequence[float], label: str) -> None:
    """Shade the stretches of recorded steps whose value is NaN or infinite."""
    spans: list[list[int]] = []
    prev_bad = False
    for i, (x, y) in enumerate(zip(xs, ys)):
        bad = not math.isfinite(y)
        if bad and not prev_bad:
            spans.append([x, x])
        if bad:
            spans[-1][1] = xs[i + 1] if i + 1 < len(xs) else x
        prev_bad = bad
    for j, (a, b) in enumerate(spans):
        ax.axvspan(a, max(b, a + 0.5), color="crimson", alpha=0.12, lw=0, label=label if j == 0 else None)


def _mark_skips(ax: Any, run: RunData) -> None:
    skips = [s["step"] for s in run.steps if s["skipped"]]
    for j, x in enumerate(skips):
        ax.axvline(x, color="crimson", alpha=0.35, lw=1, label="skipped step" if j == 0 else None)


def _draw_grad_norm(ax: Any, run: RunData) -> None:
    """Total gradient norm before / after clipping, the threshold, clipped and skipped steps."""
    xs, before = _series(run.steps, "norm")
    _, after = _series(run.steps, "norm_after")
    if xs:
        fin = [(x, y) for x, y in zip(xs, before) if math.isfinite(y)]
        ax.plot([x for x, _ in fin], [y for _, y in fin], color="tab:blue", lw=1, label="norm before clipping")
        fin_a = [(x, y) for x, y in zip(xs, after) if math.isfinite(y)]
        ax.plot([x for x, _ in fin_a], [y for _, y in fin_a], color="tab:green", lw=1, alpha=0.8,
                label="norm after clipping")
        tx, thr = _series(run.steps, "threshold")
        fin_t = [(x, y) for x, y in zip(tx, thr) if math.isfinite(y)]
        if fin_t:
            ax.step([x for x, _ in fin_t], [y for _, y in fin_t], where="post", color="black", ls="--", lw=1,
                    label="threshold")
        clipped = [(s["step"], s["norm"]) for s in run.steps if s["clipped"] and s["norm"] is not None
                   and math.isfinite(s["norm"])]
        if clipped:
            ax.plot([x for x, _ in clipped], [y for _, y in clipped], ".", color="tab:orange", ms=4,
                    label=f"clipped ({len(clipped)})")
        _log_axis(ax, before)
        _mark_nonfinite(ax, xs, before, "non-finite norm")
    else:
        ax.text(0.5, 0.5, "no gradient norms recorded (loss-only records)", ha="center", transform=ax.transAxes)
    _mark_skips(ax, run)
    ax.set_ylabel("total gradient norm")
    ax.set_title(f"{run.name}: gradient norm, clip rate and loss", loc="left")


def _draw_loss(ax: Any, run: RunData) -> None:
    """The loss, with non-finite stretches shaded and skipped steps as red lines."""
    xs, ys = _series(run.steps, "loss")
    fin = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    ax.plot([x for x, _ in fin], [y for _, y in fin], color="tab:purple", lw=1, label="loss")
    _log_axis(ax, ys)
    _mark_nonfinite(ax, xs, ys, "non-finite loss")
    _mark_skips(ax, run)
    ax.set_ylabel("loss")


def _clip_rates(run: RunData, window: int) -> tuple[list[int], list[float], list[float]]:
    pts: list[tuple[int, int, int]] = [
        (s["step"], s["steps_seen"], s["clipped_count"]) for s in run.steps
        if s.get("steps_seen") is not None and s.get("clipped_count") is not None
    ]
    xs: list[int] = []
    rolling: list[float] = []
    cumulative: list[float] = []
    for i, (x, n, c) in enumerate(pts):
        j = max(0, i - window)
        n0, c0 = (pts[j][1], pts[j][2]) if j < i else (0, 0)
        xs.append(x)
        rolling.append((c - c0) / (n - n0) if n > n0 else 0.0)
        cumulative.append(c / n if n else 0.0)
    return xs, rolling, cumulative


def _draw_clip_rate(ax: Any, run: RunData, window: int = 50) -> None:
    """The fraction of steps clipped: over the last ``window`` recorded steps and since the start."""
    xs, rolling, cumulative = _clip_rates(run, window)
    ax.plot(xs, rolling, color="tab:orange", lw=1, label=f"clip rate (last {window} records)")
    ax.plot(xs, cumulative, color="black", lw=1, ls="--", label="clip rate since start")
    _mark_skips(ax, run)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction clipped")


def plot_training(run: RunData) -> bytes:
    """Three panels sharing the step axis: gradient norm (threshold, clipped, skipped), clip rate, loss."""
    fig = _figure(height=7.5)
    _margins(fig, bottom=0.5, top=0.35)
    ax_norm, ax_rate, ax_loss = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.4, 2.2],
                                                                              "hspace": 0.08})
    _draw_grad_norm(ax_norm, run)
    _draw_clip_rate(ax_rate, run)
    _draw_loss(ax_loss, run)
    for ax in (ax_norm, ax_rate, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=7)
    ax_loss.set_xlabel("step")
    return _png(fig)


def _layer_matrix(run: RunData, key: str) -> tuple[list[str], list[int], list[list[float | None]]]:
    names: list[str] = []
    for rec in run.layers:
        for n in rec["names"]:
            if n not in names:
                names.append(n)
    index = {n: i for i, n in enumerate(names)}
    steps = [rec["step"] for rec in run.layers if rec[key] is not None]
    matrix: list[list[float | None]] = [[None] * len(steps) for _ in names]  # None: layer absent at that step
    col = 0
    for rec in run.layers:
        if rec[key] is None:
            continue
        for n, v in zip(rec["names"], rec[key]):
            matrix[index[n]][col] = v
        col += 1
    return names, steps, matrix


def plot_layer_heatmap(run: RunData, key: str = "grad_norm") -> bytes:
    """log10 of a per-layer quantity over time; non-finite cells in red, flagged layers' names in red."""
    import numpy as np

    names, steps, matrix = _layer_matrix(run, key)
    label = {"grad_norm": "gradient norm", "update_ratio": "update / parameter norm", "param_norm": "parameter norm"}
    height = min(12.0, 1.6 + 0.22 * max(len(names), 4))
    fig = _figure(height=height)
    longest = max((len(n) for n in names), default=4) + (2 if run.health else 0)
    _margins(fig, left=min(4.0, 0.3 + 0.065 * longest), right=-0.05)  # the colour bar brings its own room
    ax = fig.add_subplot()
    present = np.asarray([[v is not None for v in row] for row in matrix], dtype=bool).reshape(len(names), len(steps))
    data = np.asarray([[1.0 if v is None else v for v in row] for row in matrix],
                      dtype=np.float64).reshape(len(names), len(steps))
    good = present & np.isfinite(data) & (data > 0)
    logged = np.full(data.shape, np.nan)
    logged[good] = np.log10(data[good])
    cmap = _matplotlib().colormaps["viridis"].with_extremes(bad="white")
    finite_vals = logged[np.isfinite(logged)]
    vmin, vmax = (float(finite_vals.min()), float(finite_vals.max())) if finite_vals.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(logged), aspect="auto", interpolation="nearest", cmap=cmap,
                   vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
    fig.colorbar(im, ax=ax, label=f"log10 {label[key]}", pad=0.01)
    bad = present & ~good
    if bad.any():  # zero or non-finite cells in red, over the colour map
        red = _matplotlib().colors.ListedColormap(["crimson"])
        ax.imshow(np.ma.masked_where(~bad, np.ones(bad.shape)), aspect="auto", interpolation="nearest", cmap=red)
        ax.set_title("red: zero or non-finite", loc="right", fontsize=8, color="crimson")
    flagged = {h["layer"] for h in run.health}
    stride = max(1, math.ceil(len(names) / 40))
    ticks = list(range(0, len(names), stride))
    ax.set_yticks(ticks)
    ax.set_yticklabels([("\u26a0 " if names[i] in flagged else "") + names[i] for i in ticks], fontsize=7)
    for t, i in zip(ax.get_yticklabels(), ticks):
        if names[i] in flagged:
            t.set_color("crimson")
    xt = list(range(0, len(steps), max(1, math.ceil(len(steps) / 12))))
    ax.set_xticks(xt)
    ax.set_xticklabels([str(steps[i]) for i in xt], fontsize=8)
    ax.set_xlabel("step")
    ax.set_title(f"{run.name}: per-layer {label[key]} (log10)")
    return _png(fig)


def plot_compare(runs: Sequence[RunData], key: str) -> bytes:
    """``key`` (``"norm"`` or ``"loss"``) of several runs on one axis; non-finite values as crosses at the top."""
    fig = _figure(height=4.0)
    _margins(fig)
    ax = fig.add_subplot()
    allv: list[float] = []
    colors = _matplotlib().colormaps["tab10"]
    for i, run in enumerate(runs):
        xs, ys = _series(run.steps, key)
        allv += ys
        fin = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        c = colors(i % 10)
        ax.plot([x for x, _ in fin], [y for _, y in fin], lw=1, color=c, label=run.name)
        bad = [x for x, y in zip(xs, ys) if not math.isfinite(y)]
        if bad:
            ax.plot(bad[:1], [1.0], "x", color=c, ms=9, mew=2, transform=ax.get_xaxis_transform(), clip_on=False)
            ax.annotate("NaN/inf", (bad[0], 1.0), xycoords=("data", "axes fraction"), color=c, fontsize=7,
                        xytext=(3, -10), textcoords="offset points")
    _log_axis(ax, allv)
    what = {"norm": "total gradient norm (before clipping)", "loss": "loss"}[key]
    ax.set_xlabel("step")
    ax.set_ylabel(what)
    ax.set_title(f"{what}, all runs (x: first non-finite value)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=7, ncol=2)
    return _png(fig)


# ------------------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.3em .6em;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}img{max-width:100%;display:block;margin:.8em 0;
border:1px solid #eee}pre{background:#f8f8f8;padding:.6em;overflow-x:auto;font-size:.85em}.bad{color:#b00020;
font-weight:600}.ok{color:#1b7f3b}.muted{color:#777;font-size:.85em}
"""


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec) if math.isfinite(v) else str(v)
    return str(v)


def _img(name: str, data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<img src="data:image/png;base64,{b64}" data-file="{html.escape(name)}" alt="{html.escape(alt)}">')


def _summary_table(summaries: Sequence[dict[str, Any]]) -> str:
    head = ("<tr><th class=l>run</th><th>steps</th><th>last train loss</th><th>best loss</th><th>skipped</th>"
            "<th>clip rate</th><th>largest norm</th><th>first non-finite</th><th>flags</th></tr>")
    rows = []
    for s in summaries:
        final = s["final_loss"]
        cls = "bad" if final is None or not math.isfinite(final) else "ok"
        rate = "—" if s["clip_rate"] is None else f"{s['clip_rate']:.0%}"
        first = s["first_nonfinite_step"]
        rows.append(
            f"<tr><td class=l>{html.escape(s['run'])}</td><td>{s['steps']}</td><td class={cls}>{_fmt(final)}</td>"
            f"<td>{_fmt(s['best_loss'])}</td><td>{s['skipped']}</td><td>{rate}</td><td>{_fmt(s['max_norm'])}</td>"
            f"<td class={'bad' if first is not None else 'ok'}>{_fmt(first)}</td><td>{s['flags']}</td></tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def _health_table(run: RunData) -> str:
    if not run.health:
        return "<p class=ok>No layer flagged (vanishing, exploding or non-finite).</p>"
    rows = "".join(
        f"<tr><td>{h['step']}</td><td class=l>{html.escape(str(h['layer']))}</td><td class=l>{html.escape(h['flag'])}"
        f"</td><td class=l>{html.escape(str(h['message']))}</td></tr>" for h in run.health)
    return ("<table><tr><th>step</th><th class=l>layer</th><th class=l>flag</th><th class=l>detail</th></tr>"
            + rows + "</table>")


def _events_html(run: RunData, limit: int = 20) -> str:
    if not run.events:
        return "<p class=ok>No skipped or non-finite step.</p>"
    reasons: dict[str, int] = {}
    for e in run.events:
        reasons[str(e.get("reason"))] = reasons.get(str(e.get("reason")), 0) + 1
    parts = ["<p>" + ", ".join(f"<b>{html.escape(k)}</b>: {v}" for k, v in reasons.items()) + "</p>"]
    for e in run.events[:limit]:
        text = e.get("text") or f"step {e.get('step')}: {e.get('reason')} (no diagnosis recorded)"
        verb = "skipped" if e.get("skipped") else "not skipped"
        parts.append(f"<p><b>step {e.get('step')}</b> — {html.escape(str(e.get('reason')))} ({verb})</p>"
                     f"<pre>{html.escape(text)}</pre>")
    if len(run.events) > limit:
        parts.append(f"<p class=muted>… and {len(run.events) - limit} more events in metrics.jsonl</p>")
    return "".join(parts)


def _slug(s: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_" else "_" for c in s)
    return out or "run"


def render(runs: Sequence[RunData], stem: str, title: str) -> tuple[str, dict[str, bytes]]:
    """The HTML text and the PNGs (file name -> bytes) for ``runs``; nothing is written."""
    images: dict[str, bytes] = {}
    summaries = [summarize(r) for r in runs]
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p class=muted>gradguard report, {datetime.datetime.now().isoformat(timespec='seconds')} — "
            f"{len(runs)} run(s). Norms are total gradient norms before clipping unless noted; red lines mark "
            "skipped steps, red crosses non-finite values.</p>",
            "<h2>Summary</h2>", _summary_table(summaries)]

    def add(name: str, data: bytes, alt: str) -> str:
        images[name] = data
        return _img(name, data, alt)

    if len(runs) > 1:
        body.append("<h2>All runs</h2>")
        body.append(add(f"{stem}-compare_grad_norm.png", plot_compare(runs, "norm"), "gradient norm, all runs"))
        body.append(add(f"{stem}-compare_loss.png", plot_compare(runs, "loss"), "loss, all runs"))
    used: set[str] = set()
    for run in runs:
        slug = _slug(run.name)
        while slug in used:
            slug += "_"
        used.add(slug)
        prefix = f"{stem}-" if len(runs) == 1 else f"{stem}-{slug}-"
        body.append(f"<h2 id='{html.escape(slug)}'>{html.escape(run.name)}</h2>")
        body.append(f"<p class=muted>{html.escape(str(run.path))}"
                    + (f" — recorded with gradguard {html.escape(str(run.meta.get('gradguard')))}" if run.meta else "")
                    + "</p>")
        for w in run.warnings:
            body.append(f"<p class=bad>{html.escape(w)}</p>")
        body.append(add(prefix + "training.png", plot_training(run),
                        f"{run.name}: gradient norm with threshold, clipped and skipped steps; clip rate; loss"))
        body.append("<h3>Layers</h3>")
        if run.layers:
            body.append(add(prefix + "layers.png", plot_layer_heatmap(run, "grad_norm"),
                            f"{run.name}: per-layer gradient norms"))
            if any(r.get("update_ratio") is not None for r in run.layers):
                body.append(add(prefix + "update_ratio.png", plot_layer_heatmap(run, "update_ratio"),
                                f"{run.name}: per-layer update/parameter ratio"))
        else:
            body.append("<p class=muted>No per-layer records (pass model= to Monitor.record, or lower "
                        "per_layer_every).</p>")
        body.append("<h4>Flagged layers</h4>")
        body.append(_health_table(run))
        body.append("<h3>Skipped and non-finite steps</h3>")
        body.append(_events_html(run))
    doc = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>" + html.escape(title) + "</title>"
           "<meta name=viewport content='width=device-width,initial-scale=1'><style>" + _CSS + "</style></head><body>"
           + "\n".join(body) + "</body></html>\n")
    return doc, images


def _write_atomic(files: dict[Path, bytes]) -> None:
    """Write every file to a temporary name, then rename them all; on failure remove what was written."""
    tmp: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            t = path.with_name(f".{path.name}.tmp{os.getpid()}")
            t.write_bytes(data)
            tmp.append((t, path))
        for t, path in tmp:
            os.replace(t, path)
    except BaseException:
        for t, _ in tmp:
            t.unlink(missing_ok=True)
        raise


def build_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 title: str | None = None) -> ReportResult:
    """Build the HTML report of the run(s) in ``run_dir``; default ``out`` is ``run_dir/report.html``.

    The PNGs are written beside ``out`` as ``<stem>-<plot>.png`` and embedded in it. Returns what was written.
    Raises :class:`ReportError` for a bad run directory or record (before anything is written) and
    ``ImportError`` without matplotlib.
    """
    root = Path(run_dir)
    paths = find_runs(root)
    runs = [load_run(p, name=(p.name if p != root else None)) for p in paths]
    out_path = Path(out) if out is not None else root / "report.html"
    if out_path.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"the report file must end in .html, got {str(out_path)!r}")
    if out_path.exists() and out_path.is_dir():
        raise ReportError(f"{str(out_path)!r} is a directory; pass a file name such as report.html")
    _matplotlib()
    doc, images = render(runs, out_path.stem, title or f"gradguard report: {root.resolve().name}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    files = {out_path.parent / name: data for name, data in images.items()}
    files[out_path] = doc.encode("utf-8")
    _write_atomic(files)
    return ReportResult(out_path, tuple(out_path.parent / n for n in images), tuple(runs))
