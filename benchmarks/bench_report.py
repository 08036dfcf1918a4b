"""Time and peak memory of ``gradguard report`` on a long synthetic run (default: one million steps).

The log is written in the Monitor's format through :mod:`gradguard.runlog` (step records every step, 20-layer
records every 100 steps, a stretch of NaN steps, skipped steps with events, a health flag). Each report is built in a
fresh child process; its peak RSS (``ru_maxrss``) and wall time are printed, with the RSS of the same child after
importing gradguard and matplotlib only (the baseline).

    python benchmarks/bench_report.py --steps 1000000
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradguard.runlog import JSONL_NAME, encode_number, end_record, meta_record, record

_CHILD = r"""
import resource, sys, time
import gradguard.report, matplotlib.figure
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if sys.argv[1] == "report":
    r = gradguard.report.build_report(sys.argv[2], sys.argv[3])
    n = len(r.runs[0].steps)
else:
    n = len(gradguard.report.load_run(sys.argv[2]).steps)
wall = time.perf_counter() - t
print(n, wall, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_log(run_dir: Path, steps: int, layers: int = 20, layer_every: int = 100) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    names = [f"block{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(layers)]
    nan_from, nan_to = int(steps * 0.6), int(steps * 0.6) + 50
    clipped = skipped = 0
    with open(run_dir / JSONL_NAME, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta_record(torch="bench", every=1, per_layer_every=layer_every, sinks=["jsonl"])) + "\n")
        for i in range(steps):
            bad = nan_from <= i < nan_to
            skip = bad or i % 50_000 == 49_999
            norm = math.nan if bad else 1.0 + 0.5 * math.sin(i / 1000) + (20.0 if i % 10_007 == 0 else 0.0)
            clip = not bad and norm > 1.2
            clipped += clip
            skipped += skip
            coef = min(1.2 / (norm + 1e-6), 1.0) if not bad else 1.0
            loss = math.nan if bad else 2.0 / (1 + i / 1e4)
            reason = ("nonfinite_grad" if bad else "loss_spike") if skip else None
            out = [record("step", step=i, time=1.7e9 + 0.05 * i, loss=encode_number(loss), norm=encode_number(norm),
                          norm_after=encode_number(norm * coef), threshold=1.2, coef=coef, clipped=clip,
                          skipped=skip, reason=reason, lr=1e-3, steps_seen=i + 1, clipped_count=clipped,
                          skipped_count=skipped)]
            if i % layer_every == 0:
                grads = [encode_number(math.nan if bad and j == 3 else 10 ** (-(j % 5)) * (1 + (i % 97) / 97))
                         for j in range(layers)]
                out.append(record("layers", step=i, names=names, grad_norm=grads, param_norm=[1.0] * layers,
                                  update_ratio=[1e-3] * layers))
            if skip:
                out.append(record("event", step=i, skipped=True, reason=out[0]["reason"], diagnosis=None,
                                  text=f"step {i}: {out[0]['reason']}"))
            if i == nan_from:
                out.append(record("health", step=i, layer=names[3], flag="nonfinite", value="nan",
                                  message=f"{names[3]}: non-finite gradient norm"))
            f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in out))
        f.write(json.dumps(end_record(steps, clipped, skipped)) + "\n")


def measure(mode: str, run_dir: Path, out: Path) -> tuple[int, float, float, float]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(run_dir), str(out)], capture_output=True,
                          text=True, check=True)
    n, wall, base, peak = proc.stdout.split()
    return int(n), float(wall), int(base) / 1024, int(peak) / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t = time.perf_counter()
        write_log(run, args.steps)
        size = (run / JSONL_NAME).stat().st_size / 2**20
        print(f"log: {args.steps:,} steps, {size:.0f} MiB, written in {time.perf_counter() - t:.0f} s")
        for mode in ("load", "report"):
            n, wall, base, peak = measure(mode, run, Path(tmp) / "out" / "report.html")
            print(f"{mode:6s}: {n:,} steps, {wall:6.1f} s, peak RSS {peak:6.0f} MiB "
                  f"(after imports {base:.0f} MiB, +{peak - base:.0f} MiB)")
        html = (Path(tmp) / "out" / "report.html").stat().st_size / 2**20
        print(f"report.html: {html:.1f} MiB")


if __name__ == "__main__":
    main()
