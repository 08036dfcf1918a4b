"""Clip folded into the fused optimizer step vs the step alone vs clip-then-step, with the read floor of the same run.

Contenders, each run once per round in a rotating interleaved order on the same parameters (the gradients are
restored, untimed, before every call; the optimizer state just keeps stepping, which does not change the work):

* ``step``: ``optimizer.step()`` of a fused AdamW, no clipping;
* ``folded``: ``gradguard.fused.fused_clip_step(optimizer, gg.NormClip(max_norm))``: the norm (one read pass), the
  coefficient as ``grad_scale``, the finite flag as ``found_inf``, one kernel;
* ``clip then step``: ``gg.NormClip(max_norm)(params)`` (norm + in-place scaling) then ``optimizer.step()``;
* ``step, grad_scale=1``: the same kernel given ``grad_scale=1`` and ``found_inf=0`` (no clipping): what the
  kernel itself adds when it unscales (torch's kernel writes the unscaled gradient back to ``.grad``);
* ``read floor``: one ``torch.sum`` per gradient (a pure read pass over the gradients).

``max_norm`` is a quarter of the gradients' norm, so every call clips. The figure of merit is the cost of clipping,
``(folded - step) / read floor``: target <= 1.15 (clipping costs at most one read pass); for comparison
``(clip then step - step) / read floor``. It splits into the norm, ``(folded - step, grad_scale=1) / read floor``, and
the kernel's write-back, ``(step, grad_scale=1 - step) / read floor``. Medians over rounds.

    python benchmarks/bench_fused.py                     # ResNet-50 parameters (25.6M), 15 rounds
    python benchmarks/bench_fused.py --case block --threads 1 --rounds 41   # steadier on a shared machine
    python benchmarks/bench_fused.py --case gpt2 --rounds 9
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import gradguard as gg
from bench_clip import measure  # the one interleaved-rounds timer of the benchmarks
from gradguard.fused import fused_clip_step
from shapes import gpt2_small_shapes, resnet50


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--case", choices=("block", "resnet50", "gpt2"), default="resnet50",
                    help="block: one GPT-2 small transformer block (7.1M); resnet50 (25.6M); gpt2: GPT-2 small (124M)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.case == "resnet50":
        shapes = [tuple(p.shape) for p in resnet50().parameters()]
    else:
        shapes = gpt2_small_shapes()[2:14] if args.case == "block" else gpt2_small_shapes()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    originals = [torch.randn(s, generator=gen) for s in shapes]
    for p, g in zip(params, originals):
        p.grad = g.clone()
    grads = [g for g in (p.grad for p in params) if g is not None]
    max_norm = float(gg.get_total_norm(originals)) / 4
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    clipper = gg.NormClip(max_norm)

    one, zero = torch.ones(()), torch.zeros(())

    def kernel_unscaling() -> None:
        opt.grad_scale, opt.found_inf = one, zero  # type: ignore[attr-defined]
        opt.step()
        del opt.grad_scale, opt.found_inf  # type: ignore[attr-defined]

    def restore() -> None:
        torch._foreach_copy_(grads, originals)

    contenders: dict[str, Callable[[], object]] = {
        "step": opt.step,
        "step, grad_scale=1": kernel_unscaling,
        "folded": lambda: fused_clip_step(opt, clipper, params),
        "clip then step": lambda: (clipper(params), opt.step()),
        "read floor": lambda: [g.sum() for g in grads],
    }
    med = measure(contenders, restore, args.rounds)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians; "
          f"{args.case}: {len(shapes)} tensors, {n / 1e6:.1f}M float32 values, fused AdamW\n")
    print("| contender | median ms | / step |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.2f} | {v / med['step']:.3f}x |")
    floor = med["read floor"]
    print(f"\ncost of clipping / read floor: folded {(med['folded'] - med['step']) / floor:.2f}x, "
          f"clip then step {(med['clip then step'] - med['step']) / floor:.2f}x (target for folded: <= 1.15x)")
    print(f"folded = step + norm {(med['folded'] - med['step, grad_scale=1']) / floor:.2f}x + kernel write-back "
          f"{(med['step, grad_scale=1'] - med['step']) / floor:.2f}x (in read floors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
