"""The CPU read kernels a 2-norm can be built from, side by side, one thread or torch's threads, idle or busy.

Why this exists: on a machine where another process keeps a core busy, only one core is really ours, so the
cheapest *single-threaded* read that gives an accurate norm decides how fast the norm can be. Contenders, each over
the gradients of one model (restored, untimed, before every call), in interleaved rounds, medians:

* ``torch norm``: ``torch._foreach_norm`` (what ``torch.nn.utils.clip_grad_norm_`` calls): one whole-tensor
  reduction per tensor, single-threaded on CPU whatever the thread count, one accumulation chain per tensor
  (relative error 7e-4 at 16M float32 values);
* ``rows``: gradguard's row kernel (``torch.linalg.vector_norm(rows, dim=-1)`` per tensor, rows of up to 1024
  values, a tensor's tail of fewer than 1024 values left out), accurate to 1e-6 (each row a short sum), with
  torch's OpenMP threads and on one thread (``1t``); for float16 it is torch's float16-output kernel, which
  gradguard does not use (see ``gradguard fp16``);
* ``mkl dot``: ``torch.dot(t, t)`` per tensor (BLAS), with torch's threads and on one thread; fast, but off by up
  to 2e-5 on constant float32 data at 1M values (7e-6 at 256K);
* ``sum``: ``torch.sum`` per tensor (``bench_clip.py``'s read floor, here over the same tensors as the others);
* ``mul_``: ``torch._foreach_mul_`` by a 0-d factor (the write pass of a clip, torch's and gradguard's alike);
* float16 only: ``upcast copy``, each tensor copied 256K values at a time into a float32 buffer (what an exact
  float16 norm has to do on CPU: torch has no float16 reduction with a float32 result that skips the copy), and
  ``gradguard fp16``, gradguard's chunked upcast norm (the copy and the row norms of each chunk).

The tensors are those of 8K values or more (the ones gradguard reads as rows). Ratios are to ``torch norm``. The
``1t`` rows run inside ``gradguard.norms.single_threaded()`` (this thread's
OpenMP thread count set to 1).

    python benchmarks/bench_kernels.py --case resnet50            # idle
    python benchmarks/bench_kernels.py --case resnet50 --busy     # one core taken by a CPU-bound process
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable

import torch

from bench_clip import CASES, make_params, measure  # the one interleaved-rounds timer of the benchmarks
from gradguard.cli import _positive_int
from gradguard.norms import _CHUNK, _cpu_tensor_partial, _row_view, _UpcastBuffer, single_threaded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), default="resnet50")
    ap.add_argument("--rounds", type=_positive_int, default=11)
    ap.add_argument("--reps", type=_positive_int, default=3)
    ap.add_argument("--busy", action="store_true", help="run a CPU-bound subprocess beside the benchmark")
    args = ap.parse_args(argv)
    label, shapes, dtype = CASES[args.case]
    params = make_params(shapes(), dtype)
    grads = [p.grad for p in params if p.grad is not None]
    originals = [g.clone() for g in grads]
    big = [g for g in grads if g.numel() >= 8192]  # those gradguard reads as rows (the rest: one call, fixed costs)
    views = [_row_view(g)[0] for g in big]  # rows of up to 1024 values (a tail of < 1024 left out, where there is one)
    factor = torch.tensor(0.5, dtype=dtype)

    def restore() -> None:
        torch._foreach_copy_(grads, originals)

    def one_thread(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with single_threaded():
                return fn()

        return run

    def rows() -> object:
        return [torch.linalg.vector_norm(v, dim=-1) for v in views]

    def dots() -> object:
        return [torch.dot(g.view(-1), g.view(-1)) for g in big]

    def sums() -> object:
        return [g.sum() for g in big]

    contenders: dict[str, Callable[[], object]] = {
        "torch norm": lambda: torch._foreach_norm(big, 2.0),
        "rows": rows,
        "rows, 1t": one_thread(rows),
        "sum": sums,
        "sum, 1t": one_thread(sums),
        "mul_": lambda: torch._foreach_mul_(big, factor),
        "mul_, 1t": one_thread(lambda: torch._foreach_mul_(big, factor)),
    }
    if dtype not in (torch.bfloat16, torch.float16):  # no BLAS dot for 16-bit floats (torch's is ~30x slower)
        contenders["mkl dot"] = dots
        contenders["mkl dot, 1t"] = one_thread(dots)
    if dtype == torch.float16:
        buf = torch.empty(_CHUNK)
        scratch = _UpcastBuffer()

        def upcast() -> None:
            for g in big:
                for chunk in torch.split(g.view(-1), _CHUNK):
                    buf[: chunk.numel()].copy_(chunk)

        contenders["upcast copy"] = upcast
        contenders["upcast copy, 1t"] = one_thread(upcast)
        contenders["gradguard fp16"] = lambda: [_cpu_tensor_partial(g, 2.0, scratch) for g in big]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        med = measure(contenders, restore, args.rounds, args.reps)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    n = sum(g.numel() for g in big)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds of "
          f"{args.reps} calls, medians; {label}, {dtype}: {len(big)} tensors, {n / 1e6:.1f}M values"
          f"{', one busy core beside (--busy)' if busy else ''}\n")
    print("| kernel | / torch norm |")
    print("|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v / med['torch norm']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
