"""Memory of per-layer monitoring (issue 11): each ``gg.Monitor`` mode against the same loop with no per-layer records.

Each configuration runs in a fresh process (peak RSS, ``VmHWM``, is per process). A model of 8 Linear(1024, 1024)
layers (float32: 32 MiB of parameters; ``--dtype bfloat16``: 16 MiB) trains 8 SGD steps, recorded standalone; the
figure is the median peak RSS (of interleaved runs) above that of ``per_layer_every=None``, in units of parameter
bytes. After its peak RSS is read, each process measures one more ``record()`` (step 9, a per-layer step in every
mode that has them) with the profiler's allocation events (every allocation, kernel-internal copies included): its
peak temporary allocation, in units of the largest layer's bytes.

glibc's malloc raises its mmap threshold when a large block is freed, after which freed blocks can stay in the heap
and count in RSS depending on the order of earlier allocations (the same run varied by +-0.3x parameter bytes here);
``--malloc fixed`` (the default) pins ``MALLOC_MMAP_THRESHOLD_`` at 128 KiB in the children, so every block from
128 KiB up is returned on free and the RSS follows what is really held; ``--malloc default`` measures glibc as is.

    python benchmarks/mem_monitor.py [--runs 5] [--dtype float32|bfloat16] [--malloc fixed|default]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

MODES = {  # name: Monitor keyword arguments
    "per_layer_every=None": "per_layer_every=None",
    "per_layer_every=1 (update ratios: a snapshot of the parameters)": "per_layer_every=1",
    "per_layer_every=1, update_ratio=False": "per_layer_every=1, update_ratio=False",
    "per_layer_every=3 (the snapshot is held one step in three)": "per_layer_every=3",
}

_CHILD = r"""
import sys, tempfile, torch, gradguard as gg
from torch.profiler import ProfilerActivity, profile
torch.set_num_threads(1)
torch.manual_seed(0)
dtype = getattr(torch, sys.argv[2])
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(8)]).to(dtype)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x = torch.randn(4, 1024, dtype=dtype)
clip = gg.NormClip(1.0)

def step(monitor):
    opt.zero_grad()
    loss = model(x).float().pow(2).mean()
    loss.backward()
    stats = clip(model)
    opt.step()
    return lambda: monitor.record(stats, loss=loss, model=model)

with gg.Monitor(tempfile.mkdtemp(), **eval("dict(" + sys.argv[1] + ")")) as monitor:
    for _ in range(8):
        step(monitor)()
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    record = step(monitor)  # step 9: measured by every mode with per-layer records
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        record()
events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
live = peak = 0
for e in sorted(events, key=lambda e: e.start_ns()):  # (frees of blocks allocated before profiling are not seen)
    live += e.nbytes()
    peak = max(peak, live)
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(hwm * 1024, param_bytes, max(p.numel() * p.element_size() for p in model.parameters()), peak)
"""


def child(kwargs: str, dtype: str, malloc: str) -> tuple[int, int, int, int]:
    """``(peak RSS, parameter bytes, largest layer's bytes, peak temporaries of one record)`` of one process."""
    env = dict(os.environ)
    if malloc == "fixed":  # glibc: blocks from 128 KiB up are mmapped and unmapped on free, whatever came before
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    out = subprocess.run([sys.executable, "-c", _CHILD, kwargs, dtype], check=True, capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), env=env).stdout.split()
    hwm, param_bytes, largest, temporaries = (int(v) for v in out[-4:])
    return hwm, param_bytes, largest, temporaries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--malloc", default="fixed", choices=["fixed", "default"],
                    help="fixed: MALLOC_MMAP_THRESHOLD_=128 KiB in the children (the default)")
    args = ap.parse_args(argv)
    peaks: dict[str, list[int]] = {m: [] for m in MODES}
    last: dict[str, tuple[int, int, int, int]] = {}
    for _ in range(args.runs):  # interleaved, so drift on a shared machine hits every mode alike
        for mode, kwargs in MODES.items():
            last[mode] = child(kwargs, args.dtype, args.malloc)
            peaks[mode].append(last[mode][0])
    _, param_bytes, largest, _ = last["per_layer_every=None"]
    base = statistics.median(peaks["per_layer_every=None"])
    print(f"8 x Linear(1024, 1024), {args.dtype}: {param_bytes / 2**20:.0f} MiB of parameters, largest layer "
          f"{largest / 2**20:.0f} MiB; median peak RSS of {args.runs} interleaved processes per mode; "
          f"malloc {args.malloc}\n")
    print("| Monitor mode | extra peak RSS (x parameter bytes) | one record's peak temporaries (x largest layer) |")
    print("|---|---|---|")
    for mode in MODES:
        top = statistics.median(peaks[mode])
        print(f"| {mode} | {(top - base) / param_bytes:+.2f}x | {last[mode][3] / largest:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
