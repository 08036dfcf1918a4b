"""Extra peak memory of each way to guard a step, as a multiple of the parameter bytes (issue 11).

Each mode runs in a fresh process (peak RSS, ``VmHWM``, is per process). A model of 16 Linear(1024, 1024) layers
(64 MiB of fp32 parameters) trains 6 AdamW steps; the figure is the median peak RSS (of interleaved runs) above that
of the plain loop (``clip_grad_norm_`` then ``optimizer.step()``), divided by the parameter bytes. AdamW's own state
(2x the parameter bytes) is in the baseline, so each figure is what the mode adds.

    python benchmarks/mem_guard.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import sys, torch, gradguard as gg
from gradguard.fused import fused_clip_step
torch.set_num_threads(1)
torch.manual_seed(0)
mode = sys.argv[1]
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(16)])
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=mode in ("fused", "guard-device"))
x = torch.randn(4, 1024)
loss_fn = lambda: model(x).pow(2).mean()
guard = None
if mode.startswith("guard"):
    kwargs = {"guard": {}, "guard-backup": {"param_check": "backup"}, "guard-nocheck": {"check_params_every": None},
              "guard-rollback": {"on_nonfinite": "rollback", "snapshot_every": 2},
              "guard-device": {"host_sync": False}}[mode]
    guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0), verbose=False, **kwargs)
for _ in range(6):
    if guard is not None:
        guard.step(loss_fn)
        continue
    opt.zero_grad()
    loss_fn().backward()
    if mode == "fused":
        fused_clip_step(opt, gg.NormClip(1.0), model)
    else:
        gg.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(hwm * 1024, param_bytes)
"""

MODES = {
    "plain": "clip_grad_norm_ + AdamW.step (the baseline)",
    "guard": "gg.Guard defaults (check_params_every=1, param_check='auto' -> 'preflight': the update dry-run on copies "
             "of at most 1% of the parameter bytes at a time)",
    "guard-backup": "gg.Guard(param_check='backup') (a transactional copy of parameters and AdamW state)",
    "guard-nocheck": "gg.Guard(check_params_every=None) (no weight check after the step; buffers still backed up)",
    "guard-rollback": "gg.Guard(on_nonfinite='rollback', snapshot_every=2) (a CPU snapshot of parameters + AdamW "
                      "state, on top of the defaults)",
    "guard-device": "gg.Guard(host_sync=False) with fused AdamW (decided on the device, preflight check)",
    "fused": "gg.fused_clip_step with fused AdamW (clip folded into the step)",
}


def peak(mode: str) -> tuple[int, int]:
    # a fixed mmap threshold: every tensor buffer is its own mapping, returned to the OS when freed, so the peak RSS
    # follows the live bytes (glibc's dynamic threshold otherwise keeps freed buffers in the heap, +-0.15x noise)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], check=True, capture_output=True, text=True,
                         env=env).stdout
    hwm, params = out.split()
    return int(hwm), int(params)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    peaks: dict[str, list[int]] = {m: [] for m in MODES}
    param_bytes = 0
    for _ in range(args.runs):  # interleaved: every mode once per run
        for mode in MODES:
            hwm, param_bytes = peak(mode)
            peaks[mode].append(hwm)
    base = statistics.median(peaks["plain"])
    print(f"parameters: {param_bytes / 2**20:.0f} MiB fp32; median peak RSS of {args.runs} interleaved runs\n")
    print("| mode | extra peak memory (x parameter bytes) |")
    print("|---|---|")
    for mode, text in MODES.items():
        extra = (statistics.median(peaks[mode]) - base) / param_bytes
        print(f"| {text} | {extra:+.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
