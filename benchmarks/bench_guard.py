"""Overhead of ``Guard.step`` on a small transformer (CPU) against a plain loop that already calls
``torch.nn.utils.clip_grad_norm_``; ``torch.autograd.detect_anomaly`` for reference; and the cost of one replay under
the op-level locator (the failure path) relative to one plain step.

Each variant trains its own copy of the same model on the same batches; rounds are interleaved (each round runs
``--steps`` steps of every variant, in rotated order) and the table reports per-step medians as ratios.

    python benchmarks/bench_guard.py [--rounds 9] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import gradguard as gg


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = TinyTransformer()
    n_params = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1000, (args.batch, args.seq + 1), generator=g) for _ in range(8)]
    loss_fn = nn.CrossEntropyLoss()

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(base)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def closure_for(model: nn.Module, b: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: loss_fn(model(b[:, :-1]).reshape(-1, 1000), b[:, 1:].reshape(-1))

    variants: dict[str, Callable[[torch.Tensor], None]] = {}

    m0, o0 = make()

    def plain_step(m: nn.Module, o: torch.optim.Optimizer, b: torch.Tensor) -> None:
        o.zero_grad(set_to_none=True)
        closure_for(m, b)().backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        o.step()

    variants["plain loop + torch clip_grad_norm_"] = lambda b: plain_step(m0, o0, b)

    m1, o1 = make()
    guard = gg.Guard(m1, o1, clipper=gg.NormClip(1.0))
    variants["gg.Guard(NormClip(1.0)), defaults"] = lambda b: (guard.step(closure_for(m1, b)), None)[1]

    m2, o2 = make()
    guard_nocheck = gg.Guard(m2, o2, clipper=gg.NormClip(1.0), check_params_every=None)
    variants["gg.Guard(..., check_params_every=None)"] = lambda b: (guard_nocheck.step(closure_for(m2, b)), None)[1]

    m5, o5 = make()
    guard_backup = gg.Guard(m5, o5, clipper=gg.NormClip(1.0), param_check="backup")
    variants["gg.Guard(..., param_check='backup')"] = lambda b: (guard_backup.step(closure_for(m5, b)), None)[1]

    m7 = copy.deepcopy(base)
    o7 = torch.optim.AdamW(m7.parameters(), lr=1e-3, fused=True)
    variants["plain loop, fused AdamW (the baseline of the next row)"] = lambda b: plain_step(m7, o7, b)

    m6 = copy.deepcopy(base)
    o6 = torch.optim.AdamW(m6.parameters(), lr=1e-3, fused=True)
    guard_device = gg.Guard(m6, o6, clipper=gg.NormClip(1.0), host_sync=False)
    variants["gg.Guard(..., host_sync=False), fused AdamW"] = lambda b: (guard_device.step(closure_for(m6, b)), None)[1]

    m3, o3 = make()

    def anomaly(b: torch.Tensor) -> None:
        with torch.autograd.detect_anomaly(check_nan=True):
            plain_step(m3, o3, b)

    variants["plain loop under detect_anomaly"] = anomaly

    m4, _ = make()
    variants["one replay under gg.locate_nonfinite"] = lambda b: (gg.locate_nonfinite(closure_for(m4, b), m4), None)[1]

    import warnings

    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for k in names:
        variants[k](batches[0])  # warm-up
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            for s in range(args.steps):
                variants[k](batches[(r + s) % len(batches)])
            times[k].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med[names[0]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"TinyTransformer {n_params / 1e6:.2f}M params, batch {args.batch}x{args.seq}, AdamW; "
          f"{args.rounds} interleaved rounds x {args.steps} steps, medians\n")
    print("| variant | time per step / plain loop |")
    print("|---|---|")
    for k in names:
        print(f"| {k} | {med[k] / ref:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
