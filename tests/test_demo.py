"""`gradguard demo`: the story holds on real runs, the outputs are all there, it is deterministic and quick."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from gradguard.cli import EXIT_USAGE, main
from gradguard.demo import STRATEGIES, TASKS, run_demo
from gradguard.report import load_run


def _rows_without_wall_time(rows):
    return [{k: v for k, v in asdict(r).items() if k not in ("wall_s", "log_dir")} for r in rows]


def _same(a, b) -> bool:
    return all(
        x.keys() == y.keys() and all(
            (isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k])) or x[k] == y[k] for k in x)
        for x, y in zip(a, b)
    ) and len(a) == len(b)


def test_demo_is_deterministic_for_a_seed(tmp_path):
    kwargs = {"steps": 42, "report": False, "progress": False, "echo": lambda *_: None}
    first = run_demo(tmp_path / "a", seed=3, **kwargs)
    second = run_demo(tmp_path / "b", seed=3, **kwargs)
    assert _same(_rows_without_wall_time(first), _rows_without_wall_time(second))
    for run in ("rnn-guard", "mlp-normclip"):  # the recorded numbers too, not only the table
        a = [{k: v for k, v in s.items() if k != "time"} for s in load_run(tmp_path / "a" / run).steps]
        b = [{k: v for k, v in s.items() if k != "time"} for s in load_run(tmp_path / "b" / run).steps]
        assert json.dumps(a) == json.dumps(b)
    other = run_demo(tmp_path / "c", seed=4, tasks=("mlp",), strategies=("normclip",), **kwargs)
    assert other[0].final_loss != first[5].final_loss  # another seed, another run


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # No wall-clock assertion: a loaded machine must not fail the suite. The time is measured by
    # benchmarks/bench_demo.py and recorded in BENCHMARKS.md.
    proc = subprocess.run([sys.executable, "-m", "gradguard", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    # the table: every model x strategy, and the story
    lines = {tuple(line.split()[:2]): line for line in text.splitlines() if line.split()[:1] in (["rnn"], ["mlp"])}
    assert set(lines) == {(t, s) for t in TASKS for s in STRATEGIES}
    for t in TASKS:
        assert "diverged: NaN at step" in lines[(t, "none")]
        for s in ("normclip", "adaptive", "guard"):
            assert "finite" in lines[(t, s)] and "diverged" not in lines[(t, s)]
        assert "skipped" in lines[(t, "guard")] and "loss_spike" in lines[(t, "guard")]
    summary = json.loads((out / "summary.json").read_text())
    for row in summary:
        if row["strategy"] == "none":
            assert row["final_loss"] == "nan" and row["diverged_at"] is not None
        else:
            assert isinstance(row["final_loss"], float) and row["final_loss"] < 1.0 and row["diverged_at"] is None
        if row["strategy"] == "guard":
            assert row["skipped"] >= 3 and set(row["reasons"]) <= {"loss_spike", "grad_norm_spike"}
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
