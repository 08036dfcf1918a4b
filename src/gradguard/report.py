"""``gradguard report RUN_DIR``: a self-contained HTML report of a run recorded by :class:`~gradguard.Monitor`.

For each run (``RUN_DIR`` holding ``metrics.jsonl``, or each sub-directory of ``RUN_DIR`` holding one) the report
shows:

* the total gradient norm over time, before and after clipping, with the threshold, the clipped steps and the
  skipped steps;
* the clip rate over the steps with a finite gradient norm (over a rolling window and cumulatively) and the
  training loss;
* heatmaps of per-layer gradient norms and update-to-parameter ratios over time, on the same columns, with every
  skipped or non-finite step marked in each;
* the flagged layers (vanishing / exploding / non-finite, see :mod:`gradguard.health`) and every skipped or
  non-finite step, with its diagnosis when the Guard recorded one;

and, for several runs, the norms and losses overlaid, with a table of contents. The plots are PNGs (matplotlib,
``pip install "gradguard[plot]"``) embedded in the HTML as ``data:`` URIs, so the one file can be mailed, and also
written into a folder named after the report (``report.html`` -> ``report_files/``). Everything is rendered in
memory first and then written with atomic renames: a bad input or a failed plot leaves nothing half-written.

The log is read through :mod:`gradguard.runlog` (every field type-checked; a malformed record is a
:class:`ReportError` naming file, line and field). Every value that reaches the HTML is escaped, and the page carries
a Content-Security-Policy that forbids script, so a crafted log cannot run code in the reader's browser. Long runs
are drawn from bounded summaries (at most ``2 x 2000`` points per line, ``1000`` heatmap columns, min/max kept per
bucket and every non-finite bucket marked), so the memory is the compact columns of :class:`~gradguard.runlog.StepTable`
plus a constant.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradguard.runlog import JSONL_NAME, ReportError, RunData, load_run

__all__ = ["ReportError", "ReportResult", "RunData", "build_report", "find_runs", "load_run", "summarize"]

MAX_POINTS = 2000
"""Buckets per line plot: longer series are drawn as each bucket's minimum and maximum (spikes are kept)."""
MAX_COLUMNS = 1000
"""Heatmap columns: more per-layer records are merged (largest value; non-finite wins)."""
MAX_LISTED = 20
"""Skipped or non-finite steps listed in full per run (the rest are counted)."""


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote: the HTML file and the PNGs in its ``<stem>_files`` folder."""

    html: Path
    images: tuple[Path, ...]
    runs: tuple[RunData, ...]


def _e(v: Any) -> str:
    """Any value as HTML text: ``str`` of it, escaped (quotes included, so it is safe inside attributes too)."""
    return html.escape(str(v), quote=True)


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


def _bad_mask(run: RunData) -> tuple[Any, Any, Any]:
    """Per recorded step: non-finite loss or norm, skipped, and their union."""
    import numpy as np

    nonfinite = np.zeros(len(run.steps), bool)
    for key in ("loss", "norm"):
        v, has = run.steps.numbers(key)
        nonfinite |= has & ~np.isfinite(v)
    skipped = run.steps.ints("skipped").astype(bool)
    return nonfinite, skipped, nonfinite | skipped


def summarize(run: RunData) -> dict[str, Any]:
    """The headline numbers of a run.

    ``final_loss`` is the training loss of the last recorded step (not a held-out loss); ``clip_rate`` is
    ``clipped / (steps seen - recorded steps with a non-finite norm)``: a step whose norm is NaN/inf is neither
    clipped nor unclipped; ``bad_steps`` counts the recorded steps that were skipped or had a non-finite loss or norm.
    """
    import numpy as np

    steps = run.steps
    last = steps[-1]
    end = run.end
    seen = end["steps_seen"] if end else (last["steps_seen"] if last["steps_seen"] is not None else len(steps))
    clipped = end["clipped_count"] if end else last["clipped_count"]
    skipped = end["skipped_count"] if end else (last["skipped_count"] or 0)
    loss, has_loss = steps.numbers("loss")
    norm, has_norm = steps.numbers("norm")
    nonfinite_norm = int(np.count_nonzero(has_norm & ~np.isfinite(norm)))
    finite_seen = seen - nonfinite_norm
    nonfinite, _, bad = _bad_mask(run)
    step_col = steps.ints("step")
    first_bad = int(step_col[np.argmax(nonfinite)]) if nonfinite.any() else None
    fin_loss = loss[has_loss & np.isfinite(loss)]
    fin_norm = norm[has_norm & np.isfinite(norm)]
    recorded_loss = np.nonzero(has_loss)[0]
    times, has_time = steps.numbers("time")
    t = times[has_time]
    return {
        "run": run.name,
        "steps": seen,
        "final_loss": float(loss[recorded_loss[-1]]) if recorded_loss.size else None,
        "best_loss": float(fin_loss.min()) if fin_loss.size else None,
        "skipped": skipped,
        "clip_rate": (clipped / finite_seen) if (clipped is not None and finite_seen > 0) else None,
        "max_norm": float(fin_norm.max()) if fin_norm.size else None,
        "first_nonfinite_step": first_bad,
        "bad_steps": int(np.count_nonzero(bad)),
        "flags": len(run.health),
        "wall_s": float(t[-1] - t[0]) if t.size else None,
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


def _buckets(n: int, k: int) -> Any:
    """Bucket index of each of ``n`` items in order, ``k`` buckets at most."""
    import numpy as np

    return (np.arange(n, dtype=np.int64) * k) // max(n, 1)


def _envelope(x: Any, y: Any, k: int = MAX_POINTS) -> tuple[Any, Any]:
    """At most ``2k`` points of a finite series: each bucket's minimum and maximum, in step order."""
    import numpy as np

    n = len(x)
    if n <= 2 * k:
        return x, y
    b = math.ceil(n / k)
    rows = math.ceil(n / b)
    pad = rows * b - n
    yy = np.concatenate([y, np.full(pad, np.nan)]).reshape(rows, b)
    lo = np.nanargmin(yy, axis=1) + np.arange(rows) * b
    hi = np.nanargmax(yy, axis=1) + np.arange(rows) * b
    idx = np.stack([np.minimum(lo, hi), np.maximum(lo, hi)], axis=1).reshape(-1)
    return x[idx], y[idx]


def _spans(x: Any, bad: Any, k: int = MAX_POINTS) -> list[tuple[float, float]]:
    """``(start, width)`` of the stretches of records flagged ``bad`` (merged into at most ``k`` buckets)."""
    import numpy as np

    n = len(x)
    if not n or not bad.any():
        return []
    if n > k:
        bucket = _buckets(n, k)
        bad = np.bincount(bucket, weights=bad.astype(np.float64), minlength=k) > 0
        starts = np.searchsorted(bucket, np.arange(k))
        ends = np.append(starts[1:], n) - 1
        lo, hi = x[starts].astype(np.float64), x[np.minimum(ends + 1, n - 1)].astype(np.float64)
    else:
        lo = x.astype(np.float64)
        hi = np.append(x[1:], x[-1]).astype(np.float64)
    out: list[tuple[float, float]] = []
    i, m = 0, len(bad)
    while i < m:
        if bad[i]:
            j = i
            while j + 1 < m and bad[j + 1]:
                j += 1
            a, z = float(lo[i]), float(hi[j])
            out.append((a, max(z - a, 0.5)))
            i = j + 1
        else:
            i += 1
    return out


def _shade(ax: Any, spans: list[tuple[float, float]], label: str) -> None:
    if spans:
        ax.broken_barh(spans, (0, 1), transform=ax.get_xaxis_transform(), color="crimson", alpha=0.15, lw=0,
                       label=label)


def _thin(x: Any, k: int = MAX_POINTS) -> Any:
    """At most ``k`` of the sorted positions ``x`` (one per bucket)."""
    import numpy as np

    if len(x) <= k:
        return x
    return x[np.unique(_buckets(len(x), k), return_index=True)[1]]


def _series(run: RunData, key: str) -> tuple[Any, Any, Any]:
    """``(steps, values, recorded)`` of a number column."""
    v, has = run.steps.numbers(key)
    return run.steps.ints("step"), v, has


def _line(ax: Any, x: Any, v: Any, has: Any, **kw: Any) -> Any:
    import numpy as np

    ok = has & np.isfinite(v)
    xs, ys = _envelope(x[ok], v[ok])
    return ax.plot(xs, ys, **kw)


def _log_axis(ax: Any, v: Any, has: Any) -> None:
    import numpy as np

    fin = v[has & np.isfinite(v)]
    if fin.size and (fin > 0).all():
        ax.set_yscale("log")


def _mark_skips(ax: Any, run: RunData) -> None:
    import numpy as np

    x = run.steps.ints("step")[run.steps.ints("skipped").astype(bool)]
    if x.size:
        ax.vlines(_thin(np.sort(x)), 0, 1, transform=ax.get_xaxis_transform(), color="crimson", alpha=0.35, lw=1,
                  label=f"skipped step ({x.size})")


def _draw_grad_norm(ax: Any, run: RunData) -> None:
    """Total gradient norm before / after clipping, the threshold, clipped and skipped steps."""
    import numpy as np

    x, norm, has = _series(run, "norm")
    if has.any():
        _line(ax, x, norm, has, color="tab:blue", lw=1, label="norm before clipping")
        _, after, has_a = _series(run, "norm_after")
        _line(ax, x, after, has_a, color="tab:green", lw=1, alpha=0.8, label="norm after clipping")
        _, thr, has_t = _series(run, "threshold")
        ok = has_t & np.isfinite(thr)
        if ok.any():
            tx, ty = _envelope(x[ok], thr[ok])
            ax.step(tx, ty, where="post", color="black", ls="--", lw=1, label="threshold")
        clipped = (run.steps.ints("clipped") == 1) & has & np.isfinite(norm)
        if clipped.any():
            cx, cy = x[clipped], norm[clipped]
            keep = np.unique(_buckets(len(cx), MAX_POINTS), return_index=True)[1] if len(cx) > MAX_POINTS else None
            if keep is not None:
                cx, cy = cx[keep], cy[keep]
            ax.plot(cx, cy, ".", color="tab:orange", ms=4, label=f"clipped ({int(np.count_nonzero(clipped))})")
        _log_axis(ax, norm, has)
        _shade(ax, _spans(x[has], ~np.isfinite(norm[has])), "non-finite norm")
    else:
        ax.text(0.5, 0.5, "no gradient norms recorded (loss-only records)", ha="center", transform=ax.transAxes)
    _mark_skips(ax, run)
    ax.set_ylabel("total gradient norm")
    ax.set_title(f"{_t(run.name)}: gradient norm, clip rate and training loss", loc="left")


def _draw_loss(ax: Any, run: RunData) -> None:
    """The training loss, with non-finite stretches shaded and skipped steps as red lines."""
    import numpy as np

    x, loss, has = _series(run, "loss")
    _line(ax, x, loss, has, color="tab:purple", lw=1, label="training loss")
    _log_axis(ax, loss, has)
    _shade(ax, _spans(x[has], ~np.isfinite(loss[has])), "non-finite loss")
    _mark_skips(ax, run)
    ax.set_ylabel("training loss")


def clip_rates(run: RunData, window: int = 50) -> tuple[Any, Any, Any]:
    """``(steps, rolling, cumulative)`` clip rates over the steps with a finite gradient norm.

    At a record ``i`` with running counts ``n_i`` (steps seen), ``c_i`` (clipped) and ``f_i`` (recorded steps
    with a non-finite norm so far): cumulative ``c_i / (n_i - f_i)``, rolling over the last ``window`` records
    ``(c_i - c_j) / ((n_i - f_i) - (n_j - f_j))`` with ``j = i - window`` (NaN where no finite step).
    """
    import numpy as np

    steps = run.steps
    seen, clipped = steps.ints("steps_seen"), steps.ints("clipped_count")
    norm, has = steps.numbers("norm")
    nf = np.cumsum(has & ~np.isfinite(norm))
    ok = (seen >= 0) & (clipped >= 0)
    x = steps.ints("step")[ok]
    fin = (seen - nf)[ok].astype(np.float64)
    c = clipped[ok].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cumulative = np.where(fin > 0, c / np.where(fin > 0, fin, 1), np.nan)
        j = np.maximum(np.arange(len(x)) - window, -1)
        fin0 = np.where(j >= 0, fin[np.maximum(j, 0)], 0.0)
        c0 = np.where(j >= 0, c[np.maximum(j, 0)], 0.0)
        d = fin - fin0
        rolling = np.where(d > 0, (c - c0) / np.where(d > 0, d, 1), np.nan)
    return x, rolling, cumulative


def _draw_clip_rate(ax: Any, run: RunData, window: int = 50) -> None:
    """The fraction of finite-norm steps clipped: over the last ``window`` records and since the start."""
    import numpy as np

    x, rolling, cumulative = clip_rates(run, window)
    for v, kw in ((rolling, {"color": "tab:orange", "label": f"clip rate (last {window} records)"}),
                  (cumulative, {"color": "black", "ls": "--", "label": "clip rate since start"})):
        _line(ax, x, v, np.ones(len(v), bool), lw=1, **kw)
    _mark_skips(ax, run)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("clipped / finite")


def plot_training(run: RunData) -> bytes:
    """Three panels sharing the step axis: gradient norm (threshold, clipped, skipped), clip rate, training loss."""
    fig = _figure(height=7.5)
    _margins(fig, bottom=0.5, top=0.35)
    ax_norm, ax_rate, ax_loss = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.4, 2.2],
                                                                              "hspace": 0.08})
    _draw_grad_norm(ax_norm, run)
    _draw_clip_rate(ax_rate, run)
    _draw_loss(ax_loss, run)
    for ax in (ax_norm, ax_rate, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7)
    ax_loss.set_xlabel("step")
    return _png(fig)


@dataclass
class LayerGrid:
    """A per-layer quantity on the heatmap's columns (shared by every panel of a run).

    ``logged[i, j]``: log10 of the largest positive finite value of layer ``i`` in column ``j`` (NaN if none);
    ``bad[i, j]``: a zero or non-finite value there; ``present[i, j]``: any value there; ``steps[j]``: the first step
    of the column; ``marked[j]``: the column holds a skipped or non-finite step (from the step records or a
    non-finite gradient norm): the same columns are marked in every panel.
    """

    names: list[str]
    steps: list[int]
    logged: Any
    bad: Any
    present: Any
    marked: Any


def layer_grid(run: RunData, key: str, max_columns: int = MAX_COLUMNS) -> LayerGrid:
    """Per-layer ``key`` (``grad_norm``, ``param_norm``, ``update_ratio``) on one column per ``layers`` record,
    merged into at most ``max_columns``; records without ``key`` give empty (white) columns, never a dropped one."""
    import numpy as np

    names: list[str] = []
    index: dict[str, int] = {}
    rows_of: dict[int, Any] = {}
    for rec in run.layers:
        if id(rec["names"]) not in rows_of:
            for n in rec["names"]:
                if n not in index:
                    index[n] = len(names)
                    names.append(n)
            rows_of[id(rec["names"])] = np.asarray([index[n] for n in rec["names"]], dtype=np.int64)
    n_rec = len(run.layers)
    k = min(n_rec, max_columns)
    col = _buckets(n_rec, k)
    logged = np.full((len(names), k), -np.inf)
    bad = np.zeros((len(names), k), bool)
    present = np.zeros((len(names), k), bool)
    marked = np.zeros(k, bool)
    first = [0] * k
    _, _, step_bad = _bad_mask(run)
    bad_steps = set(run.steps.ints("step")[step_bad].tolist())
    for i, rec in enumerate(run.layers):
        j = int(col[i])
        if i == 0 or col[i - 1] != j:
            first[j] = rec["step"]
        rows = rows_of[id(rec["names"])]
        grad = np.frombuffer(rec["grad_norm"], dtype=np.float64) if len(rows) else np.zeros(0)
        marked[j] |= rec["step"] in bad_steps or not np.isfinite(grad).all()
        values = rec[key]
        if values is None or not len(rows):
            continue
        v = np.frombuffer(values, dtype=np.float64)
        good = np.isfinite(v) & (v > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lv = np.where(good, np.log10(np.where(good, v, 1.0)), -np.inf)
        np.maximum.at(logged[:, j], rows, lv)
        bad[rows, j] |= ~good
        present[rows, j] = True
    logged[np.isneginf(logged)] = np.nan
    return LayerGrid(names, first, logged, bad, present, marked)


_LAYER_LABEL = {"grad_norm": "gradient norm", "update_ratio": "update / parameter norm",
                "param_norm": "parameter norm"}


def plot_layer_heatmap(run: RunData, key: str = "grad_norm") -> bytes:
    """log10 of a per-layer quantity over time: zero or non-finite cells in red, flagged layers' names in red, and
    a red marker above every column holding a skipped or non-finite step (the same columns in every panel)."""
    import numpy as np

    g = layer_grid(run, key)
    names, steps = g.names, g.steps
    height = min(12.0, 1.6 + 0.22 * max(len(names), 4))
    fig = _figure(height=height)
    longest = min(max((len(n) for n in names), default=4), 60) + (2 if run.health else 0)
    _margins(fig, left=min(4.0, 0.3 + 0.065 * longest), right=-0.05)  # the colour bar brings its own room
    ax = fig.add_subplot()
    cmap = _matplotlib().colormaps["viridis"].with_extremes(bad="white")
    finite_vals = g.logged[np.isfinite(g.logged)]
    vmin, vmax = (float(finite_vals.min()), float(finite_vals.max())) if finite_vals.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(g.logged), aspect="auto", interpolation="nearest", cmap=cmap,
                   vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
    fig.colorbar(im, ax=ax, label=f"log10 {_LAYER_LABEL[key]}", pad=0.01)
    if g.bad.any():  # zero or non-finite cells in red, over the colour map
        red = _matplotlib().colors.ListedColormap(["crimson"])
        ax.imshow(np.ma.masked_where(~g.bad, np.ones(g.bad.shape)), aspect="auto", interpolation="nearest",
                  cmap=red)
    notes = []
    if g.bad.any():
        notes.append("red: zero or non-finite")
    if g.marked.any():
        cols = np.nonzero(g.marked)[0]
        ax.plot(cols, np.full(cols.size, -0.5), "v", color="crimson", ms=6, clip_on=False, zorder=5)
        notes.append("\u25bc skipped or non-finite step")
    if not (g.present.any()):
        notes.append(f"no {_LAYER_LABEL[key]} recorded")
    if notes:
        ax.set_title("; ".join(notes), loc="right", fontsize=8, color="crimson")
    flagged = {h["layer"] for h in run.health}
    stride = max(1, math.ceil(len(names) / 40))
    ticks = list(range(0, len(names), stride))
    ax.set_yticks(ticks)
    ax.set_yticklabels([("\u26a0 " if names[i] in flagged else "") + _t(_clip(names[i], 60)) for i in ticks],
                       fontsize=7)
    for t, i in zip(ax.get_yticklabels(), ticks):
        if names[i] in flagged:
            t.set_color("crimson")
    xt = list(range(0, len(steps), max(1, math.ceil(len(steps) / 12))))
    ax.set_xticks(xt)
    ax.set_xticklabels([str(steps[i]) for i in xt], fontsize=8)
    ax.set_xlabel("step")
    ax.set_title(f"{_t(_clip(run.name, 60))}: per-layer {_LAYER_LABEL[key]} (log10)", loc="left")
    return _png(fig)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def _t(s: str) -> str:
    r"""A name as matplotlib plain text: every ``$`` escaped, so mathtext never parses it (``lr$\alpha{$`` is drawn
    as written; the axes' own ``$10^{-1}$`` tick labels still use mathtext)."""
    return s.replace("$", r"\$")


def plot_compare(runs: Sequence[RunData], key: str) -> bytes:
    """``key`` (``"norm"`` or ``"loss"``) of several runs on one axis; the first non-finite value of each as a cross
    at the top."""
    import numpy as np

    fig = _figure(height=4.0)
    _margins(fig)
    ax = fig.add_subplot()
    colors = _matplotlib().colormaps["tab10"]
    all_pos = True
    any_fin = False
    for i, run in enumerate(runs):
        x, v, has = _series(run, key)
        fin = v[has & np.isfinite(v)]
        any_fin |= bool(fin.size)
        all_pos &= bool((fin > 0).all())
        c = colors(i % 10)
        _line(ax, x, v, has, lw=1, color=c, label=_t(_clip(run.name, 40)))
        bad = x[has & ~np.isfinite(v)]
        if bad.size:
            ax.plot(bad[:1], [1.0], "x", color=c, ms=9, mew=2, transform=ax.get_xaxis_transform(), clip_on=False)
            ax.annotate("NaN/inf", (float(bad[0]), 1.0), xycoords=("data", "axes fraction"), color=c, fontsize=7,
                        xytext=(3, -10), textcoords="offset points")
    if any_fin and all_pos:
        ax.set_yscale("log")
    what = {"norm": "total gradient norm (before clipping)", "loss": "training loss"}[key]
    ax.set_xlabel("step")
    ax.set_ylabel(what)
    ax.set_title(f"{what}, all runs (x: first non-finite value)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=7, ncol=2)
    return _png(fig)


# ------------------------------------------------------------------------------------------------------- HTML
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")
"""No script, no fetch: images only from ``data:`` URIs, styles only from the page itself."""

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.3em .6em;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}img{max-width:100%;display:block;margin:.8em 0;
border:1px solid #eee}pre{background:#f8f8f8;padding:.6em;overflow-x:auto;font-size:.85em}.bad{color:#b00020;
font-weight:600}.ok{color:#1b7f3b}.muted{color:#777;font-size:.85em}nav ul{columns:3;font-size:.9em}
"""


def _fmt(v: Any, spec: str = ".4g") -> str:
    """A value as escaped HTML text (``—`` for ``None``)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return _e(format(v, spec) if math.isfinite(v) else str(v))
    return _e(v)


def _img(name: str, data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" data-file="{_e(name)}" alt="{_e(alt)}">'


def _summary_table(summaries: Sequence[dict[str, Any]], anchors: Sequence[str]) -> str:
    head = ("<tr><th class=l>run</th><th>steps</th>"
            "<th title='the loss of the last recorded training step (not a held-out loss)'>last train loss</th>"
            "<th>best train loss</th><th>skipped</th>"
            "<th title='clipped steps / steps with a finite gradient norm'>clip rate (finite steps)</th>"
            "<th>largest norm</th><th>first non-finite</th><th>skipped or non-finite</th><th>flags</th></tr>")
    rows = []
    for s, a in zip(summaries, anchors):
        final = s["final_loss"]
        cls = "bad" if final is None or not math.isfinite(final) else "ok"
        rate = "—" if s["clip_rate"] is None else _e(f"{s['clip_rate']:.0%}")
        first = s["first_nonfinite_step"]
        rows.append(
            f"<tr><td class=l><a href=\"#{_e(a)}\">{_e(s['run'])}</a></td><td>{_fmt(s['steps'])}</td>"
            f"<td class={cls}>{_fmt(final)}</td><td>{_fmt(s['best_loss'])}</td>"
            f"<td class={'bad' if s['skipped'] else 'ok'}>{_fmt(s['skipped'])}</td><td>{rate}</td>"
            f"<td>{_fmt(s['max_norm'])}</td><td class={'bad' if first is not None else 'ok'}>{_fmt(first)}</td>"
            f"<td class={'bad' if s['bad_steps'] else 'ok'}>{_fmt(s['bad_steps'])}</td><td>{_fmt(s['flags'])}</td>"
            "</tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def _health_table(run: RunData, limit: int = 200) -> str:
    if not run.health:
        return "<p class=ok>No layer flagged (vanishing, exploding or non-finite).</p>"
    rows = "".join(
        f"<tr><td>{_fmt(h['step'])}</td><td class=l>{_e(h['layer'])}</td><td class=l>{_e(h['flag'])}</td>"
        f"<td class=l>{_e(h['message'])}</td></tr>" for h in run.health[:limit])
    more = (f"<p class=muted>… and {len(run.health) - limit} more flags in {JSONL_NAME}</p>"
            if len(run.health) > limit else "")
    return ("<table><tr><th>step</th><th class=l>layer</th><th class=l>flag</th><th class=l>detail</th></tr>"
            + rows + "</table>" + more)


def _events_html(run: RunData, limit: int = MAX_LISTED, max_ranges: int = 2000) -> str:
    """Every skipped or non-finite step, Guard or not: the step records flag them, the event records explain them.

    The first ``limit`` in full (with the diagnosis), every other one by step number (as ranges ``41–49``)."""
    import numpy as np

    _nonfinite, skipped, bad = _bad_mask(run)
    idx = np.nonzero(bad)[0]
    recorded_steps = run.steps.ints("step")[idx].tolist()
    by_step: dict[int, list[dict[str, Any]]] = {}
    for e in run.events:
        by_step.setdefault(e["step"], []).append(e)
    listed = set(recorded_steps)
    unrecorded = [e for e in run.events if e["step"] not in listed]
    total = len(idx) + len(unrecorded)
    if not total:
        return "<p class=ok>No skipped or non-finite step.</p>"
    reasons: dict[str, int] = {}
    reason_col = run.steps.reasons()
    for i in idx.tolist():
        r = reason_col[i] or ("non-finite, not skipped" if not skipped[i] else "skipped")
        reasons[r] = reasons.get(r, 0) + 1
    for e in unrecorded:
        reasons[str(e["reason"])] = reasons.get(str(e["reason"]), 0) + 1
    parts = [f"<p class=bad>{_e(total)} skipped or non-finite step(s): "
             + ", ".join(f"<b>{_e(k)}</b>: {_e(v)}" for k, v in reasons.items()) + "</p>"]
    items: list[tuple[int, str, bool, str | None]] = []
    for i in idx[:limit].tolist():
        st = run.steps[i]
        what = []
        for key in ("loss", "norm"):
            if st[key] is not None and not math.isfinite(st[key]):
                what.append(f"{key} {st[key]}")
        texts = [e["text"] for e in by_step.get(st["step"], []) if e["text"]]
        reason = st["reason"] or ", ".join(what) or "skipped"
        if what and st["reason"]:
            reason += " (" + ", ".join(what) + ")"
        items.append((st["step"], reason, bool(skipped[i]), texts[0] if texts else None))
    for e in unrecorded[: max(0, limit - len(items))]:
        items.append((e["step"], str(e["reason"]), e["skipped"], e["text"]))
    for step, reason, was_skipped, text in items:
        verb = "skipped" if was_skipped else "not skipped: the update was applied"
        parts.append(f"<p class=bad>step {_e(step)} — {_e(reason)} ({_e(verb)})</p>")
        parts.append(f"<pre>{_e(text)}</pre>" if text else
                     "<p class=muted>no diagnosis recorded (run under gg.Guard(..., monitor=...) to get one)</p>")
    if total > len(items):
        rest = sorted({int(v) for v in run.steps.ints("step")[idx[limit:]].tolist()}
                      | {e["step"] for e in unrecorded[max(0, limit - len(idx)):]})
        ranges = _ranges(rest)
        shown = ", ".join(ranges[:max_ranges])
        more = f", … ({len(ranges) - max_ranges} more ranges in {JSONL_NAME})" if len(ranges) > max_ranges else ""
        parts.append(f"<p class=bad>and {_e(total - len(items))} more at step(s) {_e(shown)}{_e(more)}</p>")
    return "".join(parts)


def _ranges(steps: Sequence[int]) -> list[str]:
    """Sorted step numbers as ranges: ``[3, 4, 5, 9]`` -> ``["3–5", "9"]``."""
    out: list[str] = []
    i = 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        out.append(str(steps[i]) if i == j else f"{steps[i]}\u2013{steps[j]}")
        i = j + 1
    return out


def _slug(s: str) -> str:
    out = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in s)
    return "run-" + (out or "run")


def _render(runs: Sequence[RunData], title: str) -> tuple[str, dict[str, bytes]]:
    images: dict[str, bytes] = {}
    summaries = [summarize(r) for r in runs]
    anchors: list[str] = []
    for run in runs:
        slug = _slug(run.name)
        while slug in anchors:
            slug += "_"
        anchors.append(slug)
    toc = "".join(f"<li><a href=\"#{_e(a)}\">{_e(r.name)}</a>"
                  + (" <span class=bad>(skipped or non-finite steps)</span>" if s["bad_steps"] or s["skipped"]
                     else "") + "</li>" for r, a, s in zip(runs, anchors, summaries))
    body = [f"<h1>{_e(title)}</h1>",
            f"<p class=muted>gradguard report, {_e(datetime.datetime.now().isoformat(timespec='seconds'))} — "
            f"{_e(len(runs))} run(s). Norms are total gradient norms before clipping unless noted; losses are "
            "training losses of the recorded steps; the clip rate counts clipped steps among the steps with a "
            "finite gradient norm; red lines mark skipped steps, red shading non-finite values.</p>",
            f"<nav><h2>Contents</h2><ul><li><a href=\"#summary\">Summary</a></li>{toc}</ul></nav>",
            "<h2 id=\"summary\">Summary</h2>", _summary_table(summaries, anchors)]

    def add(name: str, data: bytes, alt: str) -> str:
        images[name] = data
        return _img(name, data, alt)

    if len(runs) > 1:
        body.append("<h2>All runs</h2>")
        body.append(add("compare_grad_norm.png", plot_compare(runs, "norm"), "gradient norm, all runs"))
        body.append(add("compare_loss.png", plot_compare(runs, "loss"), "training loss, all runs"))
    for run, slug in zip(runs, anchors):
        prefix = "" if len(runs) == 1 else slug[len("run-"):] + "-"
        body.append(f"<h2 id=\"{_e(slug)}\">{_e(run.name)}</h2>")
        version = run.meta.get("gradguard")
        body.append(f"<p class=muted>{_e(run.path)}"
                    + (f" — recorded with gradguard {_e(version)}" if version is not None else "") + "</p>")
        for r in run.resumes:
            body.append(f"<p class=muted>resumed (line {_e(r['line'])}, {_e(r.get('created') or '')})</p>")
        for w in run.warnings:
            body.append(f"<p class=bad>{_e(w)}</p>")
        body.append(add(prefix + "training.png", plot_training(run),
                        f"{run.name}: gradient norm with threshold, clipped and skipped steps; clip rate; loss"))
        body.append("<h3>Layers</h3>")
        if run.layers:
            body.append(add(prefix + "layers.png", plot_layer_heatmap(run, "grad_norm"),
                            f"{run.name}: per-layer gradient norms"))
            if any(r["update_ratio"] is not None for r in run.layers):
                body.append(add(prefix + "update_ratio.png", plot_layer_heatmap(run, "update_ratio"),
                                f"{run.name}: per-layer update/parameter ratio"))
        else:
            body.append("<p class=muted>No per-layer records (pass model= to Monitor.record, or lower "
                        "per_layer_every).</p>")
        body.append("<h4>Flagged layers</h4>")
        body.append(_health_table(run))
        body.append("<h3>Skipped and non-finite steps</h3>")
        body.append(_events_html(run))
    doc = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
           f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\"><title>{_e(title)}</title>"
           "<meta name=viewport content='width=device-width,initial-scale=1'><style>" + _CSS + "</style></head><body>"
           + "\n".join(body) + "</body></html>\n")
    return doc, images


def render(runs: Sequence[RunData], title: str, image_dir: str = "") -> tuple[str, dict[str, bytes]]:
    """The HTML text and the PNGs (relative path -> bytes) for ``runs``; nothing is written.

    ``image_dir`` prefixes the PNG names (``"report_files/"``). Names are drawn as plain text, not mathtext (a
    layer named ``lr$\\alpha{$`` is shown as written). Any failure while drawing is a :class:`ReportError`.
    """
    mpl = _matplotlib()
    try:
        with mpl.rc_context({"text.usetex": False}):  # names are escaped for mathtext (_t); never for LaTeX
            doc, images = _render(runs, title)
    except (ReportError, ImportError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # a value matplotlib cannot draw: say which run, never a traceback
        names = ", ".join(r.name for r in runs)
        raise ReportError(f"cannot draw the report of {names}: {type(e).__name__}: {str(e)[:300]}") from e
    if image_dir:
        doc = doc.replace(' data-file="', f' data-file="{_e(image_dir)}')
        images = {image_dir + k: v for k, v in images.items()}
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
                 title: str | None = None, *, write_images: bool = True) -> ReportResult:
    """Build the HTML report of the run(s) in ``run_dir``; default ``out`` is ``run_dir/report.html``.

    The PNGs are embedded in the HTML and, with ``write_images`` (default), also written into ``<stem>_files/``
    beside it (PNGs left there by an earlier report of another run set are removed). Returns what was written.
    Raises :class:`ReportError` for a bad run directory or record (before anything is written) and
    ``ImportError`` without matplotlib.
    """
    if not isinstance(write_images, bool):
        raise TypeError(f"write_images must be True or False, got {write_images!r}")
    root = Path(run_dir)
    paths = find_runs(root)
    out_path = Path(out) if out is not None else root / "report.html"
    if out_path.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"the report file must end in .html, got {str(out_path)!r}")
    if out_path.exists() and out_path.is_dir():
        raise ReportError(f"{str(out_path)!r} is a directory; pass a file name such as report.html")
    image_dir = out_path.parent / f"{out_path.stem}_files"
    if write_images and image_dir.exists() and not image_dir.is_dir():
        raise ReportError(f"{str(image_dir)!r} (the report's image folder) is a file; remove it or pass another -o")
    runs = [load_run(p, name=(p.name if p != root else None)) for p in paths]
    _matplotlib()
    doc, images = render(runs, title or f"gradguard report: {root.resolve().name}",
                         f"{image_dir.name}/" if write_images else "")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    files = {out_path.parent / name: data for name, data in images.items()} if write_images else {}
    if write_images:
        image_dir.mkdir(exist_ok=True)
    files[out_path] = doc.encode("utf-8")
    _write_atomic(files)
    written = tuple(p for p in files if p != out_path)
    if write_images:
        for stale in image_dir.glob("*.png"):
            if stale not in files:
                stale.unlink(missing_ok=True)
    return ReportResult(out_path, written, tuple(runs))
