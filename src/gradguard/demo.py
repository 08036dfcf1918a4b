"""``gradguard demo``: what clipping and the Guard do, shown on real training runs on the CPU.

Two models prone to exploding gradients, each trained four ways on the same data from the same initial weights:

* **rnn** — a vanilla ReLU RNN on the *adding problem* (Hochreiter & Schmidhuber, 1997): a sequence of random
  numbers, two of them marked; the target is their sum. The recurrent matrix is initialised slightly expansive
  (orthogonal, gain 1.3), so gradients back-propagated through the sequence grow geometrically, as in Pascanu et
  al. (2013);
* **mlp** — a 12-layer ReLU MLP (He initialisation) regressing a fixed random "teacher" network with SGD at a
  learning rate (0.1) high enough to diverge.

In both data streams every ``BAD_EVERY``-th batch is corrupt: its targets are multiplied by ``BAD_SCALE`` (a unit
error, the kind of bad record real pipelines produce). In the mlp stream, batch ``NAN_STEP`` also has a missing value:
one input feature is NaN. The four ways:

* ``none`` — plain SGD: the gradient norm explodes and the loss becomes NaN;
* ``normclip`` — ``gg.NormClip(max_norm=1.0)`` (Pascanu et al.): survives the explosion; the corrupt batches still
  get a full (clipped) step, and the NaN batch puts NaN into the weights (clipping cannot repair a NaN gradient);
* ``adaptive`` — ``gg.AutoClip(percentile=10)`` (Seetharaman et al. 2020): the threshold is the 10th percentile of
  the run's own gradient-norm history, so no number has to be guessed; the NaN batch kills it too;
* ``guard`` — ``gg.Guard(clipper=gg.AutoClip(10), spike_z=6)``: clips the same way, skips the NaN batch (the weights
  never see it) and the steps whose loss or gradient norm is more than 6 standard deviations above its recent range
  (the corrupt batches), and says why: its :class:`~gradguard.Diagnosis` of the NaN batch names the stage
  (``input``), the module and the op where the NaN first appeared, the cause and the fix.

A run whose weights have gone NaN is stopped ``STOP_AFTER`` steps later (they stay NaN; nothing more to see).
Each run is recorded by a :class:`~gradguard.Monitor` (JSONL + TensorBoard) into ``OUT/<model>-<strategy>/``;
``OUT/report.html`` (its PNGs in `OUT/report_files/`) compares them. Deterministic for a seed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import norms
from gradguard.clippers import AutoClip, ClipStats, NormClip
from gradguard.clippers.base import Clipper
from gradguard.guard import Guard
from gradguard.monitor import Monitor, encode_number
from gradguard.report import summarize
from gradguard.runlog import load_run

__all__ = ["LEGEND", "STRATEGIES", "TASKS", "YOUR_LOOP", "RunSummary", "format_table", "run_demo"]

STRATEGIES = ("none", "normclip", "adaptive", "guard")
TASKS = ("rnn", "mlp")
BAD_EVERY = 40  # every 40th batch is corrupt (after the Guard's spike detector has 32 steps of history) ...
BAD_SCALE = 30.0  # ... its targets are 30x too large
NAN_STEP = 100  # the mlp stream's batch 100 has a missing value: one input feature is NaN
STOP_AFTER = 10  # a run whose weights went NaN is stopped this many steps later
QUICK_STEPS = 150
FULL_STEPS = 600


@dataclass(frozen=True)
class RunSummary:
    """The outcome of one demo run."""

    task: str
    strategy: str
    steps: int
    final_loss: float  # held-out loss on clean data after training (nan when the weights are not finite)
    skipped: int
    clip_rate: float
    diverged_at: int | None  # first step whose non-finite loss reached the weights (the Guard's skips do not count)
    wall_s: float
    reasons: dict[str, int]
    log_dir: str
    nan_batch: int | None = None  # the step whose batch had a NaN input, if the run got that far
    diagnosis: str | None = None  # the Guard's diagnosis of its first non-finite step (else of its first spike)


#: What the table's columns mean (printed under it).
LEGEND = f"""\
columns: steps          steps trained (a run whose weights went NaN is stopped {STOP_AFTER} steps later: they stay NaN)
         held-out loss  MSE on a clean held-out batch after training (nan: the weights are NaN)
         skipped        steps the Guard skipped: the optimizer did not step, the weights are as before
         clip rate      share of the steps whose gradients the clipper scaled down
         wall s         training time of the run, in seconds
         outcome        finite, or the first step with a NaN loss and why; the Guard's skips by reason"""

#: The lines a user adds to their own loop (printed at the end of the demo; a test runs them).
YOUR_LOOP = """\
import gradguard as gg
guard = gg.Guard(model, optimizer, clipper=gg.AutoClip(percentile=10.0), spike_z=6.0)  # once, after the optimizer
report = guard.step(lambda: loss_fn(model(x), y))  # replaces zero_grad(), loss.backward(), optimizer.step()"""


# ------------------------------------------------------------------------------------------------------ tasks
class _RNN(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(hidden, 1)
        nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=1.3)  # type: ignore[arg-type]  # slightly expansive: gradients explode

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _adding_batch(batch: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    values = torch.rand(batch, length, generator=gen)
    idx = torch.rand(batch, length, generator=gen).argsort(dim=1)[:, :2]
    marks = torch.zeros(batch, length).scatter_(1, idx, 1.0)
    return torch.stack([values, marks], dim=-1), (values * marks).sum(dim=1, keepdim=True)


def _mlp(width: int = 64, depth: int = 12, d_in: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    for m in layers:
        if isinstance(m, nn.Linear):  # He initialisation: the signal reaches the output, and so can large updates
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class _Task:
    name: str
    make_model: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    lr: float
    spike_window: int
    nan_step: int | None = None  # this batch gets a NaN input feature


def _tasks(seed: int) -> dict[str, _Task]:
    teacher_gen = torch.Generator().manual_seed(seed + 1)
    w1 = torch.randn(16, 32, generator=teacher_gen) / 4.0
    w2 = torch.randn(32, 1, generator=teacher_gen) / math.sqrt(32)

    def mlp_batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(64, 16, generator=gen)
        return x, torch.tanh(x @ w1) @ w2

    return {
        "rnn": _Task("rnn", _RNN, lambda gen: _adding_batch(32, 50, gen), lr=0.05, spike_window=64),
        "mlp": _Task("mlp", _mlp, mlp_batch, lr=0.1, spike_window=64, nan_step=NAN_STEP),
    }


# ------------------------------------------------------------------------------------------------------ runs
def _clipper(strategy: str) -> Clipper | None:
    if strategy == "normclip":
        return NormClip(max_norm=1.0)
    if strategy in ("adaptive", "guard"):
        return AutoClip(percentile=10.0)
    return None


@dataclass
class _Seen:
    """What one run has seen so far, filled in step by step by :func:`run_one` and its helpers."""

    reasons: dict[str, int] = field(default_factory=dict)
    nan_batch: int | None = None
    diverged_at: int | None = None
    nonfinite_diagnosis: str | None = None
    spike_diagnosis: str | None = None


_LossFn = Callable[[Tensor, Tensor], Tensor]


def run_one(task: _Task, strategy: str, steps: int, seed: int, log_dir: Path,
            sinks: Sequence[str] = ("jsonl", "tensorboard"), tick: Callable[[], None] | None = None) -> RunSummary:
    """Train ``task`` with ``strategy`` for ``steps`` steps, recorded into ``log_dir``."""
    torch.manual_seed(seed)
    model = task.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=task.lr)
    data_gen = torch.Generator().manual_seed(seed)
    eval_x, eval_y = task.batch(torch.Generator().manual_seed(seed + 12345))
    clipper = _clipper(strategy)
    loss_fn: _LossFn = nn.functional.mse_loss
    seen = _Seen()
    per_layer_every = max(5, steps // 30)
    start = time.perf_counter()
    with Monitor(log_dir, per_layer_every=per_layer_every, sinks=tuple(sinks), overwrite=True,
                 flush_every=max(50, steps)) as monitor:
        guard = (Guard(model, optimizer, clipper=clipper, spike_z=6.0, spike_window=task.spike_window,
                       max_consecutive_skips=20, monitor=monitor, verbose=False)
                 if strategy == "guard" else None)
        for step in range(1, steps + 1):
            x, y = _demo_batch(task, data_gen, step, seen)
            loss: Tensor | None
            if guard is not None:
                loss, reached_weights = _guarded_step(guard, model, loss_fn, x, y, seen)
            else:
                loss, reached_weights = _plain_step(model, optimizer, clipper, monitor, loss_fn, x, y, step, task.lr)
            if tick is not None:
                tick()
            if (seen.diverged_at is None and reached_weights and loss is not None
                    and not math.isfinite(float(loss.detach()))):  # CPU: a free read
                seen.diverged_at = step
            if seen.diverged_at is not None and step >= seen.diverged_at + STOP_AFTER:
                break  # the weights are NaN and stay NaN: nothing more to see
    wall = time.perf_counter() - start
    with torch.no_grad():
        final = float(loss_fn(model(eval_x), eval_y))
    s = summarize(load_run(log_dir))  # the numbers in the table are read back from what the Monitor wrote
    return RunSummary(task.name, strategy, int(s["steps"]), final, int(s["skipped"] or 0),
                      float(s["clip_rate"] or 0.0), seen.diverged_at, wall, seen.reasons, str(log_dir),
                      seen.nan_batch, seen.nonfinite_diagnosis or seen.spike_diagnosis)


def _demo_batch(task: _Task, data_gen: torch.Generator, step: int, seen: _Seen) -> tuple[Tensor, Tensor]:
    """The task's next batch, corrupted as the demo says: every ``BAD_EVERY``-th is scaled, ``nan_step`` has a NaN."""
    x, y = task.batch(data_gen)
    if step % BAD_EVERY == 0:
        y = y * BAD_SCALE  # a corrupt batch
    if step == task.nan_step:  # a missing value in the input
        x = x.clone()
        x.view(-1)[3] = math.nan
        seen.nan_batch = step
    return x, y


def _guarded_step(guard: Guard, model: nn.Module, loss_fn: _LossFn, x: Tensor, y: Tensor,
                  seen: _Seen) -> tuple[Tensor | None, bool]:
    """One ``guard.step``; returns its loss and whether it reached the weights, noting a skip's reason/diagnosis."""

    def closure() -> Tensor:
        return loss_fn(model(x), y)

    report = guard.step(closure)
    if not report.skipped:
        return report.loss, True
    seen.reasons[str(report.reason)] = seen.reasons.get(str(report.reason), 0) + 1
    d = report.diagnosis
    if d is not None and d.event == "nonfinite" and seen.nonfinite_diagnosis is None:
        seen.nonfinite_diagnosis = str(d)
    elif d is not None and d.event != "nonfinite" and seen.spike_diagnosis is None:
        seen.spike_diagnosis = str(d)
    return report.loss, False


def _plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, clipper: Clipper | None, monitor: Monitor,
                loss_fn: _LossFn, x: Tensor, y: Tensor, step: int, lr: float) -> tuple[Tensor, bool]:
    """One unguarded step (clipped when ``clipper`` is set), recorded; its loss always reaches the weights."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    if clipper is not None:
        stats = clipper(model)
    else:  # no protection: only measure the norm, with the same engine
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        stats = ClipStats.unclipped(norm=norms.total_norm(grads))
    optimizer.step()
    monitor.record(stats, loss=loss, lr=lr, model=model, step=step)
    return loss, True


def format_table(rows: Sequence[RunSummary]) -> str:
    """The summary table printed by the demo."""
    head = ("model", "strategy", "steps", "held-out loss", "skipped", "clip rate", "wall s", "outcome")
    lines = []
    for r in rows:
        if r.diverged_at is not None and not math.isfinite(r.final_loss):
            why = "the NaN batch" if r.diverged_at == r.nan_batch else "the updates blew up"
            outcome = f"diverged: NaN at step {r.diverged_at} ({why})"
        elif r.skipped:
            why = ", ".join(f"{n} {k}" for k, n in sorted(r.reasons.items()))
            outcome = f"finite; skipped {why}"
        else:
            outcome = "finite"
        lines.append((r.task, r.strategy, str(r.steps), f"{r.final_loss:.4g}", str(r.skipped),
                      f"{r.clip_rate:.0%}", f"{r.wall_s:.1f}", outcome))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, 1, 7) else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def run_demo(out: str | os.PathLike[str] = "gradguard-demo", *, quick: bool = False, steps: int | None = None,
             seed: int = 0, tasks: Sequence[str] = TASKS, strategies: Sequence[str] = STRATEGIES,
             report: bool = True, progress: bool | None = None, echo: Callable[[str], Any] = print) -> list[RunSummary]:
    """Run the demo into ``out`` and return the summaries (see the module docstring)."""
    n = steps if steps is not None else (QUICK_STEPS if quick else FULL_STEPS)
    root = _check_demo_args(n, seed, tasks, strategies, out)
    sinks = _available_sinks(echo)
    defs = _tasks(seed)
    rows = _run_grid([defs[t] for t in tasks], strategies, n, seed, root, sinks, progress)
    text = "\n\n".join([_data_line(n, [defs[t] for t in tasks]), format_table(rows), LEGEND, *_said(rows)])
    echo(text)
    (root / "summary.txt").write_text(text + "\n", encoding="utf-8")
    records = [{**asdict(r), "final_loss": encode_number(r.final_loss)} for r in rows]
    (root / "summary.json").write_text(json.dumps(records, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    echo("")
    echo(f"runs (metrics.jsonl + TensorBoard events; every skip with its diagnosis): {root}/<model>-<strategy>/")
    if "tensorboard" in sinks:
        echo(f"  tensorboard --logdir {root}")
    if report:
        _echo_report(root, echo)
    echo("")
    echo("To guard your own loop, add these lines (when report.skipped, guard.diagnosis says why):")
    echo("\n".join("    " + line for line in YOUR_LOOP.splitlines()))
    return rows


def _check_demo_args(n: Any, seed: Any, tasks: Sequence[str], strategies: Sequence[str],
                     out: str | os.PathLike[str]) -> Path:
    """:func:`run_demo`'s argument checks, in order, before anything runs or is written; returns ``out``'s path."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"steps must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {TASKS}")
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; choose from {STRATEGIES}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {str(root)!r} exists and is not a directory")
    return root


def _available_sinks(echo: Callable[[str], Any]) -> tuple[str, ...]:
    """JSONL and TensorBoard, or JSONL only (said through ``echo``) when tensorboard is not installed."""
    try:
        import tensorboard  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        echo('note: tensorboard is not installed, writing JSONL only (pip install "gradguard[tensorboard]")')
        return ("jsonl",)
    return ("jsonl", "tensorboard")


def _run_grid(tasks: Sequence[_Task], strategies: Sequence[str], n: int, seed: int, root: Path,
              sinks: Sequence[str], progress: bool | None) -> list[RunSummary]:
    """Every task with every strategy, one thread, into ``root/<task>-<strategy>``, with an optional progress bar."""
    bar = _bar(len(tasks) * len(strategies) * n, progress)
    rows: list[RunSummary] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is as fast, and the numbers do not depend on the machine
    try:
        for t in tasks:
            for s in strategies:
                if bar is not None:
                    bar.set_description(f"{t.name}/{s}")
                tick = bar.update if bar is not None else None
                rows.append(run_one(t, s, n, seed, root / f"{t.name}-{s}", sinks, tick=tick))
                if bar is not None and rows[-1].steps < n:
                    bar.update(n - rows[-1].steps)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    return rows


def _echo_report(root: Path, echo: Callable[[str], Any]) -> None:
    """Build ``root/report.html`` and say where it is (or why there is none: matplotlib missing)."""
    try:
        from gradguard.report import build_report

        result = build_report(root, root / "report.html", title="gradguard demo: exploding gradients, "
                              "clipping and the Guard")
        echo(f"report: {result.html}  ({len(result.images)} PNGs in {result.html.stem}_files/)")
    except ImportError as e:
        echo(f"no HTML report: {e}")


def _data_line(steps: int, tasks: Sequence[_Task]) -> str:
    """What is in the data, printed above the table."""
    line = (f"Same data and initial weights for every strategy; every {BAD_EVERY}th batch is corrupt (targets "
            f"x{BAD_SCALE:g})")
    for t in tasks:
        if t.nan_step is not None and t.nan_step <= steps:
            line += f", and {t.name} batch {t.nan_step} has a NaN input (a missing value)"
    return line + "."


def _said(rows: Sequence[RunSummary]) -> list[str]:
    """The Guard's diagnoses, one block per guard run that skipped a step."""
    return [f"What the Guard said ({r.task}-guard):\n" + "\n".join("  " + line for line in r.diagnosis.splitlines())
            for r in rows if r.diagnosis is not None]


def _bar(total: int, progress: bool | None) -> Any:
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=total, unit="step", leave=False, disable=None if progress is None else False)
