"""The `gradguard` command: entry point, `python -m gradguard`, help and usage errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from gradguard.cli import EXIT_OK, EXIT_USAGE, main


def test_python_m_gradguard_and_help():
    proc = subprocess.run([sys.executable, "-m", "gradguard", "--help"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "report" in proc.stdout


@pytest.mark.skipif(shutil.which("gradguard") is None, reason="the console script is not installed (pip install -e .)")
def test_console_script():
    proc = subprocess.run(["gradguard", "report", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "RUN_DIR" in proc.stdout and "-o OUT.html" in proc.stdout


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
