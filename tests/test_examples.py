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
