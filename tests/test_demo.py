"""`gradguard demo`: the story holds on real runs, the Guard's diagnosis of a real NaN is printed, the outputs are all
there, the printed lines for your own loop work, and it is deterministic for a seed.

One `gradguard demo --quick` subprocess is shared by the tests that read its output (module-scoped fixture).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from gradguard.cli import EXIT_USAGE, main
from gradguard.demo import (
    LEGEND,
    NAN_STEP,
    STOP_AFTER,
    STRATEGIES,
    TASKS,
    YOUR_LOOP,
    RunSummary,
    format_table,
    run_demo,
)
from gradguard.monitor import encode_number
from gradguard.runlog import load_run


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, str]:
    """`python -m gradguard demo --quick`, run once: (its --out directory, its stdout)."""
    out = tmp_path_factory.mktemp("quick") / "demo"
    # No wall-clock assertion: a loaded machine must not fail the suite. The time is measured by
    # benchmarks/bench_demo.py and recorded in BENCHMARKS.md.
    proc = subprocess.run([sys.executable, "-m", "gradguard", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _table_lines(text: str) -> dict[tuple[str, str], str]:
    return {tuple(line.split()[:2]): line for line in text.splitlines() if line.split()[:1] in (["rnn"], ["mlp"])}


@pytest.mark.slow
def test_demo_quick_end_to_end(quick):
    out, text = quick
    # the table: every model x strategy, and the story
    lines = _table_lines(text)
    assert set(lines) == {(t, s) for t in TASKS for s in STRATEGIES}
    for t in TASKS:
        assert "diverged: NaN at step" in lines[(t, "none")] and "(the updates blew up)" in lines[(t, "none")]
        assert "finite" in lines[(t, "guard")] and "diverged" not in lines[(t, "guard")]
        assert "skipped" in lines[(t, "guard")] and "loss_spike" in lines[(t, "guard")]
    for s in ("normclip", "adaptive"):  # clipping survives the explosion ...
        assert "finite" in lines[("rnn", s)] and "diverged" not in lines[("rnn", s)]
        # ... but not a NaN batch: only the Guard keeps it out of the weights
        assert f"diverged: NaN at step {NAN_STEP} (the NaN batch)" in lines[("mlp", s)]
    assert "1 nonfinite_loss" in lines[("mlp", "guard")]
    summary = {(r["task"], r["strategy"]): r for r in json.loads((out / "summary.json").read_text())}
    for (task, strategy), row in summary.items():
        if strategy == "none" or (task == "mlp" and strategy != "guard"):
            assert row["final_loss"] == "nan" and row["diverged_at"] is not None
            assert row["steps"] == row["diverged_at"] + STOP_AFTER  # stopped STOP_AFTER steps after the NaN
        else:
            assert isinstance(row["final_loss"], float) and row["final_loss"] < 1.0 and row["diverged_at"] is None
            assert row["steps"] == 150
        if strategy == "guard":
            assert row["skipped"] >= 3 and set(row["reasons"]) <= {"loss_spike", "grad_norm_spike", "nonfinite_loss"}
    assert summary[("mlp", "guard")]["reasons"]["nonfinite_loss"] == 1
    assert summary[("mlp", "guard")]["nan_batch"] == NAN_STEP and summary[("rnn", "guard")]["nan_batch"] is None
    # where it says the outputs are, they are
    assert f"report: {out / 'report.html'}" in text and f"tensorboard --logdir {out}" in text
    for t in TASKS:
        for s in STRATEGIES:
            run = out / f"{t}-{s}"
            assert (run / "metrics.jsonl").is_file() and list(run.glob("events.out.tfevents.*"))
    guard = load_run(out / "rnn-guard")
    assert guard.events and all(e["skipped"] and e["text"] for e in guard.events)  # and says why
    html = (out / "report.html").read_text()
    pngs = sorted(out.glob("report_files/*.png"))  # the report's images in its own folder, none beside it
    assert len(pngs) >= 2 + 2 * len(TASKS) * len(STRATEGIES) and not list(out.glob("*.png"))
    for png in pngs:
        assert f'data-file="report_files/{png.name}"' in html and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_nan_batch_is_skipped_and_its_diagnosis_printed(quick):
    out, text = quick
    # what the Monitor recorded for the NaN step of the guarded run: skipped, the weights untouched, diagnosed
    steps = {s["step"]: s for s in load_run(out / "mlp-guard").steps}
    assert steps[NAN_STEP]["skipped"] and steps[NAN_STEP]["reason"] == "nonfinite_loss"
    assert all(not s["skipped"] for k, s in steps.items() if k % 40 and k != NAN_STEP)
    unguarded = {s["step"]: s for s in load_run(out / "mlp-normclip").steps}
    assert math.isfinite(unguarded[NAN_STEP - 1]["loss"]) and not math.isfinite(unguarded[NAN_STEP + 1]["loss"])
    # printed under the table, as the Guard says it: the stage, module, op, cause and fix
    block = text.split("What the Guard said (mlp-guard):\n", 1)[1].split("\n\n", 1)[0]
    assert block.startswith(f"  gradguard: non-finite value at stage 'input' (step {NAN_STEP})\n")
    assert "where: module '0', op aten.addmm.default (nan)" in block
    assert "cause: the input batch already contains NaN values" in block  # the value seen: NaN, not Inf
    assert "fix: check the data pipeline" in block
    spike = text.split("What the Guard said (rnn-guard):\n", 1)[1].split("\n\n", 1)[0]
    assert spike.startswith("  gradguard: loss spike at stage 'forward' (step 40)\n") and "fix:" in spike
    assert json.loads((out / "summary.json").read_text())[7]["diagnosis"] == "\n".join(
        line[2:] for line in block.splitlines())


@pytest.mark.slow
def test_the_table_explains_its_columns(quick):
    _, text = quick
    header = next(line for line in text.splitlines() if line.startswith("model "))
    columns = re.split(r"\s{2,}", header.strip())
    assert columns[:2] == ["model", "strategy"] and len(columns) == 8
    assert LEGEND in text
    explained = {re.split(r"\s{2,}", line.strip().removeprefix("columns:").strip())[0] for line in LEGEND.splitlines()}
    assert explained == set(columns[2:])
    assert "every 40th batch is corrupt (targets x30)" in text and f"mlp batch {NAN_STEP} has a NaN input" in text


@pytest.mark.slow
def test_it_ends_with_the_lines_for_your_own_loop_and_they_work(quick):
    _, text = quick
    printed = text.rstrip("\n").splitlines()[-len(YOUR_LOOP.splitlines()):]
    assert [line.removeprefix("    ") for line in printed] == YOUR_LOOP.splitlines()
    code = "\n".join(line.removeprefix("    ") for line in printed)
    # run them, as printed, in a loop of one's own: a finite batch steps, a NaN batch is skipped and diagnosed
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    ns = {"model": model, "optimizer": optimizer, "loss_fn": nn.functional.mse_loss, "x": x, "y": y}
    before = [p.detach().clone() for p in model.parameters()]
    exec(compile(code, "<printed>", "exec"), ns)
    assert not ns["report"].skipped and ns["report"].step == 1
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # it stepped
    guard = ns["guard"]
    before = [p.detach().clone() for p in model.parameters()]
    ns["x"] = x.clone()
    ns["x"][2, 1] = math.nan
    exec(compile(code.splitlines()[-1], "<printed>", "exec"), ns)  # the per-batch line, on a NaN batch
    assert ns["report"].skipped and guard.diagnosis is not None and guard.diagnosis.stage == "input"
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


@pytest.mark.slow
def test_demo_is_deterministic_for_a_seed(quick, tmp_path):
    # the same seed in another process gives the same table and the same recorded numbers
    out, _ = quick
    kwargs = {"quick": True, "report": False, "progress": False, "echo": lambda *_: None}
    again = run_demo(tmp_path / "again", seed=0, **kwargs)
    recorded = json.loads((out / "summary.json").read_text())
    fresh = [{**asdict(r), "final_loss": encode_number(r.final_loss)} for r in again]
    drop = ("wall_s", "log_dir")
    assert [{k: v for k, v in r.items() if k not in drop} for r in fresh] == [
        {k: v for k, v in r.items() if k not in drop} for r in recorded]
    for run in ("rnn-guard", "mlp-normclip", "mlp-guard"):  # the recorded numbers too, not only the table
        a = [{k: v for k, v in s.items() if k != "time"} for s in load_run(out / run).steps]
        b = [{k: v for k, v in s.items() if k != "time"} for s in load_run(tmp_path / "again" / run).steps]
        assert json.dumps(a) == json.dumps(b)
    other = run_demo(tmp_path / "other", seed=4, tasks=("mlp",), strategies=("guard",), **kwargs)
    assert other[0].final_loss != again[7].final_loss  # another seed, another run


def _row(**kw) -> RunSummary:
    base = {"task": "mlp", "strategy": "normclip", "steps": 110, "final_loss": math.nan, "skipped": 0,
            "clip_rate": 0.5, "diverged_at": 100, "wall_s": 1.0, "reasons": {}, "log_dir": "x", "nan_batch": 100}
    return RunSummary(**{**base, **kw})


def test_outcome_names_why_a_run_diverged():
    table = format_table([
        _row(),
        _row(strategy="none", steps=15, diverged_at=5),
        _row(strategy="guard", steps=150, final_loss=0.05, skipped=4, diverged_at=None,
             reasons={"nonfinite_loss": 1, "loss_spike": 3}),
        _row(task="rnn", strategy="adaptive", steps=150, final_loss=0.15, diverged_at=None, nan_batch=None),
    ])
    rows = table.splitlines()[2:]
    assert rows[0].rstrip().endswith("diverged: NaN at step 100 (the NaN batch)")
    assert rows[1].rstrip().endswith("diverged: NaN at step 5 (the updates blew up)")
    assert rows[2].rstrip().endswith("finite; skipped 3 loss_spike, 1 nonfinite_loss")
    assert rows[3].rstrip().endswith("finite") and " 0.15 " in rows[3]


def test_short_run_prints_table_legend_and_loop(tmp_path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = run_demo(tmp_path, steps=3, tasks=("mlp",), strategies=("guard",), report=False, progress=False)
    text = printed.getvalue()
    assert rows[0].nan_batch is None and rows[0].diagnosis is None  # 3 steps: no NaN batch, nothing skipped
    assert "NaN input" not in text and "What the Guard said" not in text
    assert LEGEND in text and text.rstrip("\n").endswith(YOUR_LOOP.splitlines()[-1])
    assert (tmp_path / "summary.txt").read_text().startswith("Same data and initial weights")


def test_bad_demo_arguments(tmp_path, capsys):
    assert main(["demo", "--steps", "0", "--out", str(tmp_path / "x")]) == EXIT_USAGE
    assert "positive integer" in capsys.readouterr().err
    assert main(["demo", "--seed", "abc"]) == EXIT_USAGE
    (tmp_path / "file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "file"), "--steps", "2"]) == EXIT_USAGE
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_run_demo_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'cnn'"):
        run_demo(tmp_path, tasks=("cnn",))
    with pytest.raises(ValueError, match="unknown strategy 'sam'"):
        run_demo(tmp_path, strategies=("sam",))
    assert list(Path(tmp_path).iterdir()) == []
