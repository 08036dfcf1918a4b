"""Wall-clock time of ``gradguard demo --quick`` (the README's first command), as a subprocess, several runs.

Timing lives here, not in the test suite: a test must never fail because the machine is busy. The demo's time is a
product figure (the README says "under a minute on 2 cores"), so it is measured here and recorded in BENCHMARKS.md.

    python benchmarks/bench_demo.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="number of runs (the median and the range are reported)")
    args = ap.parse_args(argv)
    walls = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "gradguard", "demo", "--quick", "--out", str(Path(tmp) / "d")],
                                  capture_output=True, text=True, check=False)
            walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        print(f"run {i + 1}: {walls[-1]:.1f} s", flush=True)
    print(f"gradguard demo --quick: median {statistics.median(walls):.1f} s over {len(walls)} runs "
          f"(min {min(walls):.1f} s, max {max(walls):.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
