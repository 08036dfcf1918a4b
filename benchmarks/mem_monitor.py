"""Peak RSS of per-layer monitoring (issue 11): ``Monitor(per_layer_every=1)`` vs ``per_layer_every=None``.

Each configuration runs in a fresh process (peak RSS, ``VmHWM``, is per process). A model of 8 Linear(1024, 1024)
layers (32 MiB of fp32 parameters) trains 6 SGD steps, recorded standalone; the figure is the median peak RSS
(of interleaved runs) above that of the same loop with no per-layer records, in units of parameter bytes.

    python benchmarks/mem_monitor.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import sys, tempfile, torch, gradguard as gg
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(8)])
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x = torch.randn(4, 1024)
every = None if sys.argv[1] == "none" else int(sys.argv[1])
with gg.Monitor(tempfile.mkdtemp(), per_layer_every=every) as monitor:
    for _ in range(6):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        stats = gg.NormClip(1.0)(model)
        opt.step()
        monitor.record(stats, loss=loss, model=model)
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(hwm * 1024, param_bytes)
"""


def peak(every: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, every], check=True, capture_output=True, text=True,
                         cwd=tempfile.gettempdir()).stdout.split()
    return int(out[0]), int(out[1])


def main(repeats: int = 5) -> None:
    bases, layered = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        base, param_bytes = peak("none")
        bases.append(base)
        layered.append(peak("1")[0])
    base, top = statistics.median(bases), statistics.median(layered)
    print(f"parameters: {param_bytes / 2**20:.0f} MiB; median peak RSS of {repeats} interleaved processes each: "
          f"per_layer_every=None {base / 2**20:.0f} MiB, per_layer_every=1 {top / 2**20:.0f} MiB: "
          f"+{(top - base) / param_bytes:.2f}x parameter bytes")


if __name__ == "__main__":
    main()
