"""gradguard.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_, with the memory-bandwidth floors of the same run.

Every round runs each contender once, in an interleaved order, on the same gradients (restored, untimed, before
each call); the table reports medians over rounds and ratios. Floors, measured on the same tensors in the same
rounds:

* read floor: one ``torch.sum`` per gradient tensor (a pure read pass);
* read+write floor: one in-place ``mul_`` per gradient tensor (a pure read+write pass).

When clipping, the least possible work is one read (the norm) and one read+write (the scaling), so the target is
``(read + rw) floor``; when no clipping is needed it is the read floor alone.

    python benchmarks/bench_clip.py              # all cases, 11 rounds
    python benchmarks/bench_clip.py --rounds 21 --cases gpt2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

import gradguard as gg
from shapes import gpt2_small_shapes, small_shapes


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    params = []
    for s in shapes:
        p = torch.empty(s, dtype=dtype).requires_grad_(True)
        p.grad = torch.randn(s, dtype=dtype)
        params.append(p)
    return params


def measure(
    contenders: dict[str, Callable[[], object]], restore: Callable[[], None], rounds: int
) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for k in names:  # warm-up
        restore()
        contenders[k]()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate so no contender always goes first
        for k in order:
            restore()
            t0 = time.perf_counter()
            contenders[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_case(name: str, shapes: list[tuple[int, ...]], dtype: torch.dtype, rounds: int) -> list[dict[str, object]]:
    params = make_params(shapes, dtype)
    grads = [p.grad for p in params]
    originals = [g.clone() for g in grads]
    total = float(torch.nn.utils.get_total_norm([g.float() for g in grads]))

    def restore() -> None:
        torch._foreach_copy_(grads, originals)

    rows = []
    for clipping, max_norm in (("clip", total / 4), ("no clip", total * 4)):
        contenders: dict[str, Callable[[], object]] = {
            "gradguard": lambda m=max_norm: gg.clip_grad_norm_(params, m),
            "torch": lambda m=max_norm: torch.nn.utils.clip_grad_norm_(params, m),
            "read floor": lambda: [g.sum() for g in grads],
            "rw floor": lambda: [g.mul_(0.999) for g in grads],
        }
        med = measure(contenders, restore, rounds)
        floor = med["read floor"] + (med["rw floor"] if clipping == "clip" else 0.0)
        rows.append(
            {
                "case": name,
                "dtype": str(dtype).removeprefix("torch."),
                "tensors": len(shapes),
                "values_M": round(sum(torch.Size(s).numel() for s in shapes) / 1e6, 1),
                "clipping": clipping,
                "gg_vs_torch": med["gradguard"] / med["torch"],
                "gg_vs_floor": med["gradguard"] / floor,
                "torch_vs_floor": med["torch"] / floor,
                "floor": "read + rw" if clipping == "clip" else "read",
                "median_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--cases", default="gpt2,small,fp16,bf16", help="comma-separated subset of gpt2,small,fp16,bf16")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    cases = {
        "gpt2": ("GPT-2 small", gpt2_small_shapes, torch.float32),
        "small": ("5,000 small tensors", small_shapes, torch.float32),
        "fp16": ("GPT-2 small", gpt2_small_shapes, torch.float16),
        "bf16": ("GPT-2 small", gpt2_small_shapes, torch.bfloat16),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians\n")
    print("| case | dtype | clipping | gradguard / torch | gradguard / floor | torch / floor | floor |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for key in args.cases.split(","):
        name, shapes_fn, dtype = cases[key]
        for row in run_case(name, shapes_fn(), dtype, args.rounds):
            rows.append(row)
            print(
                f"| {row['case']} ({row['tensors']} tensors, {row['values_M']}M) | {row['dtype']} | {row['clipping']} "
                f"| {row['gg_vs_torch']:.2f}x | {row['gg_vs_floor']:.2f}x | {row['torch_vs_floor']:.2f}x "
                f"| {row['floor']} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
