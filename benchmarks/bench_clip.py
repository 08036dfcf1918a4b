"""gradguard.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_, with the memory-bandwidth floors of the same run.

Every round runs each contender once, in an interleaved order, on the same gradients (restored, untimed, before
each call); the table reports medians over rounds and ratios. Floors, measured on the same tensors in the same
rounds:

* read floor: one ``torch.sum`` per gradient tensor (a pure read pass);
* read+write floor: one in-place ``mul_`` per gradient tensor (a pure read+write pass).

When clipping, the least possible work is one read (the norm) and one read+write (the scaling), so the target is
``(read + rw) floor``; when no clipping is needed it is the read floor alone. Gradients are restored (untimed)
before every timed call, so every "clip" call really clips.

``--busy`` starts a CPU-bound subprocess (one busy core) beside the benchmark for its whole run: the condition
under which per-tensor multi-threaded kernel calls stall on a descheduled thread.

    python benchmarks/bench_clip.py                          # the default cases, 11 rounds
    python benchmarks/bench_clip.py --rounds 21 --cases gpt2
    python benchmarks/bench_clip.py --busy --cases gpt2,gpt2-bf16,tiny10,medium64
    python benchmarks/bench_clip.py --cases sweep            # every case below (llama-fp32 needs ~10 GiB)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import gradguard as gg
from gradguard.cli import _positive_int  # the CLI's positive-integer argument type
from shapes import (
    gpt2_small_shapes,
    llama_1b_shapes,
    medium_shapes,
    resnet50_shapes,
    small_shapes,
    tiny_shapes,
    total_size_shapes,
)


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    params = []
    for s in shapes:
        # the parameter's values are never read: a stride-0 tensor of the right shape costs one element
        p = torch.empty_strided(s, (0,) * len(s), dtype=dtype).requires_grad_(True)
        p.grad = torch.randn(s, dtype=dtype)
        params.append(p)
    return params


def measure(
    contenders: dict[str, Callable[[], object]], restore: Callable[[], None], rounds: int, reps: int = 1
) -> dict[str, float]:
    """Median time of each contender: ``rounds`` interleaved rounds in a rotating order; in each round every
    contender makes ``reps`` timed calls in a row (each after an untimed ``restore()``) and the round keeps their
    median; the result is the median over rounds."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for k in names:  # warm-up
        restore()
        contenders[k]()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate so no contender always goes first
        for k in order:
            samples = []
            for _ in range(reps):
                restore()
                t0 = time.perf_counter()
                contenders[k]()
                samples.append(time.perf_counter() - t0)
            times[k].append(statistics.median(samples))
    return {k: statistics.median(v) for k, v in times.items()}


def run_case(
    name: str, shapes: list[tuple[int, ...]], dtype: torch.dtype, rounds: int, reps: int = 1
) -> list[dict[str, object]]:
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
        med = measure(contenders, restore, rounds, reps)
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


CASES: dict[str, tuple[str, Callable[[], list[tuple[int, ...]]], torch.dtype]] = {
    "gpt2": ("GPT-2 small", gpt2_small_shapes, torch.float32),
    "gpt2-bf16": ("GPT-2 small", gpt2_small_shapes, torch.bfloat16),
    "gpt2-fp16": ("GPT-2 small", gpt2_small_shapes, torch.float16),
    "resnet50": ("ResNet-50", resnet50_shapes, torch.float32),
    "resnet50-bf16": ("ResNet-50", resnet50_shapes, torch.bfloat16),
    "llama-bf16": ("Llama ~1B", llama_1b_shapes, torch.bfloat16),
    "llama-fp32": ("Llama ~1B", llama_1b_shapes, torch.float32),
    "small": ("5,000 small tensors", small_shapes, torch.float32),
    "tiny10": ("10 tiny tensors", lambda: tiny_shapes(10), torch.float32),
    "tiny1k": ("1,000 tiny tensors", lambda: tiny_shapes(1000), torch.float32),
    "tiny100k": ("100,000 tiny tensors", lambda: tiny_shapes(100_000), torch.float32),
    "medium64": ("64 tensors of 16K-64K", medium_shapes, torch.float32),
    "medium64-bf16": ("64 tensors of 16K-64K", medium_shapes, torch.bfloat16),
    "total1M": ("1M values", lambda: total_size_shapes(1 << 20), torch.float32),
    "total10M": ("10M values", lambda: total_size_shapes(10_000_000), torch.float32),
    "total100M": ("100M values", lambda: total_size_shapes(100_000_000), torch.float32),
    "total500M": ("500M values", lambda: total_size_shapes(500_000_000), torch.float32),
}
DEFAULT = "gpt2,gpt2-bf16,gpt2-fp16,resnet50,small,tiny10,tiny1k,medium64"
SWEEP = ",".join(CASES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=_positive_int, default=11)
    ap.add_argument("--cases", default=DEFAULT, help=f"comma-separated subset of {SWEEP}, or 'sweep' for all")
    ap.add_argument("--reps", type=_positive_int, default=1, help="timed calls per contender per round (median counts)")
    ap.add_argument("--busy", action="store_true", help="run a CPU-bound subprocess beside the benchmark")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    keys = SWEEP.split(",") if args.cases == "sweep" else args.cases.split(",")
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {SWEEP}")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds of "
            f"{args.reps} call(s) each, medians"
            f"{', one busy core beside (--busy)' if busy else ''}\n"
        )
        print("| case | dtype | clipping | gradguard / torch | gradguard / floor | torch / floor | floor |")
        print("|---|---|---|---|---|---|---|")
        rows = []
        for key in keys:
            name, shapes_fn, dtype = CASES[key]
            for row in run_case(name, shapes_fn(), dtype, args.rounds, args.reps):
                row["busy"] = busy is not None
                rows.append(row)
                print(
                    f"| {row['case']} ({row['tensors']} tensors, {row['values_M']}M) | {row['dtype']} "
                    f"| {row['clipping']} | {row['gg_vs_torch']:.2f}x | {row['gg_vs_floor']:.2f}x "
                    f"| {row['torch_vs_floor']:.2f}x | {row['floor']} |",
                    flush=True,
                )
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
