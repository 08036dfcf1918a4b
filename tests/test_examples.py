"""The examples run as tests: what the README promises is what they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_blows_up_without_clipping_and_not_with_it():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "100"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    no_clip, clip = out.splitlines()[:2]
    assert "nan" in no_clip.split("largest")[0]
    assert "nan" not in clip and "inf" not in clip
    assert "total" in out


def _run_example(name: str, *args: str) -> str:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout


@pytest.mark.slow
def test_plain_loop_example_skips_the_corrupt_batch():
    out = _run_example("plain_loop.py", "--steps", "10")
    assert "step  5" in out and out.splitlines()[5].endswith("skipped True")
    assert out.splitlines()[-1] == "done: 1 step(s) skipped, parameters finite: True"


@pytest.mark.slow
def test_lightning_example(tmp_path):
    pytest.importorskip("lightning")
    out = _run_example("lightning_example.py", "--steps", "12", "--out", str(tmp_path))
    assert "steps 12, skipped 1, parameters finite: True" in out
    assert "'gradguard/norm'" in out and "'gradguard/skipped'" in out


@pytest.mark.slow
def test_hf_trainer_example(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = _run_example("hf_trainer_example.py", "--steps", "8", "--out", str(tmp_path))
    assert "skipped 1, parameters finite: True" in out
    assert "'gradguard/skipped': 1.0" in out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_example():
    out = _run_example("ddp_example.py", "--steps", "5")
    assert "step 3: skipped=True reason=nonfinite_loss" in out
    assert "skipped 1 step(s) on every rank; parameters identical across ranks: True" in out
