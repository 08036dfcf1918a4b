"""The `gradguard` command: entry point, `python -m gradguard`, help and usage errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gradguard
from gradguard.cli import EXIT_OK, EXIT_USAGE, main
from gradguard.demo import run_demo


def test_python_m_gradguard_and_help():
    proc = subprocess.run([sys.executable, "-m", "gradguard", "--help"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "report" in proc.stdout


# the environment's own script first (a virtual environment that is not activated), then PATH
SCRIPT = shutil.which("gradguard", path=str(Path(sys.executable).parent)) or shutil.which("gradguard")


@pytest.mark.skipif(SCRIPT is None, reason="the console script is not installed (pip install -e .)")
def test_console_script():
    proc = subprocess.run([SCRIPT, "report", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "RUN_DIR" in proc.stdout and "-o OUT.html" in proc.stdout
    proc = subprocess.run([SCRIPT, "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout == f"gradguard {gradguard.__version__}\n"


def test_usage_errors(capsys):
    assert main([]) == EXIT_USAGE
    assert "COMMAND" in capsys.readouterr().err
    assert main(["train"]) == EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err
    assert main(["report"]) == EXIT_USAGE
    assert "RUN_DIR" in capsys.readouterr().err
    assert main(["--help"]) == EXIT_OK


def test_demo_without_report_runs_in_process(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--out", str(tmp_path), "--no-report", "--no-progress"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "model" in out and "strategy" in out and "rnn" in out and "mlp" in out
    assert not (tmp_path / "report.html").exists() and (tmp_path / "summary.txt").is_file()


def test_version(capsys):
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out == f"gradguard {gradguard.__version__}\n"
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.+)"$', pyproject, flags=re.M).group(1) == gradguard.__version__


def test_report_into_a_missing_directory_is_an_error_and_writes_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    run_demo(runs, steps=3, tasks=("mlp",), strategies=("normclip",), report=False, progress=False,
             echo=lambda *_: None)
    run = runs / "mlp-normclip"
    before = sorted(tmp_path.rglob("*"))
    missing = tmp_path / "no" / "such" / "out.html"
    assert main(["report", str(run), "-o", str(missing)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "does not exist" in err and f"mkdir -p {missing.parent}" in err and "Nothing was written" in err
    (tmp_path / "afile").write_text("")
    before.append(tmp_path / "afile")
    assert main(["report", str(run), "-o", str(tmp_path / "afile" / "out.html")]) == EXIT_USAGE
    assert "is not a directory" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == sorted(before)  # no directory created, no file written
    pytest.importorskip("matplotlib")
    (tmp_path / "reports").mkdir()  # an existing directory: the check is not in the way
    assert main(["report", str(run), "-o", str(tmp_path / "reports" / "r.html")]) == EXIT_OK
    assert (tmp_path / "reports" / "r.html").is_file() and list((tmp_path / "reports" / "r_files").glob("*.png"))
