"""Wall-clock time of ``gradguard demo --quick`` (the README's first command), as a subprocess, several runs.

Timing lives here, not in the test suite: a test must never fail because the machine is busy. The demo's time is a
product figure (the README says "well under a minute on 2 cores"), so it is measured here and recorded in BENCHMARKS.md.
Besides the wall-clock time, the CPU time (user + system) of the demo process is reported: the demo trains on one
thread, so on a busy machine its CPU time is the better estimate of its wall-clock time on idle cores.

    python benchmarks/bench_demo.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
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
    if args.runs < 1:
        ap.error(f"--runs must be a positive integer, got {args.runs}")
    load = os.getloadavg()[0]
    walls, cpus = [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            before = os.times()
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "gradguard", "demo", "--quick", "--out", str(Path(tmp) / "d")],
                                  capture_output=True, text=True, check=False)
            walls.append(time.perf_counter() - start)
            after = os.times()
            cpus.append(after.children_user - before.children_user + after.children_system - before.children_system)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        print(f"run {i + 1}: {walls[-1]:.1f} s wall, {cpus[-1]:.1f} s CPU", flush=True)
    print(f"gradguard demo --quick: median {statistics.median(walls):.1f} s wall over {len(walls)} runs "
          f"(min {min(walls):.1f} s, max {max(walls):.1f} s); median CPU time {statistics.median(cpus):.1f} s "
          f"(min {min(cpus):.1f} s, max {max(cpus):.1f} s); 1-minute load average at the start: {load:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
