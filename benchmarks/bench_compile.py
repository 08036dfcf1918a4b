"""torch.compile vs eager: the functional core and three strategies, compiled with ``fullgraph=True``.

For each gradient set (GPT-2 small's 148 shapes, ResNet-50's 161), every contender runs once per round, in rotating
order, on the same gradients (restored, untimed, before each call, so every call that should clip does clip);
figures are medians over the rounds, reported as ratios of medians from the same run:

* ``gg.clip_grad_norm_`` (``max_norm`` = a quarter of the norm: it clips), ``gg.get_total_norm``,
  ``gg.clip_grad_value_`` (``clip_value`` = the 99th percentile of ``|g|``: it clamps);
* ``gg.NormClip`` (clips), ``gg.ZClip`` (after its warm-up, on steady norms: the common step, nothing to scale),
  ``gg.AGC(0.01)`` (gradients ~half of whose units exceed 0.01 x their weight norm);

each compiled (``torch.compile(fn, fullgraph=True)``, inductor, timed after its first call, its gradients checked
against eager's) vs the same call eager,
and vs torch's own eager ``torch.nn.utils`` function (for the strategies: ``torch.nn.utils.clip_grad_norm_``).
The first call of each compiled function (tracing + inductor code generation + the first run) is reported
separately as its compile time, and the returned norm's relative error against a float64 norm for both.

    python benchmarks/bench_compile.py [--rounds 7] [--cases gpt2,resnet50] [--only clip_grad_norm_,NormClip,...]
    python benchmarks/bench_compile.py --cases gpt2-2,resnet50   # GPT-2 with 2 of its 12 blocks (compile time)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # compile times from cold, not from inductor's cache

import torch
from torch import nn

import gradguard as gg
from bench_clip import measure
from shapes import gpt2_small_shapes, resnet50

NAMES = ("clip_grad_norm_", "get_total_norm", "clip_grad_value_", "NormClip", "ZClip", "AGC")


def _gpt2(blocks: int) -> nn.Module:
    shapes = gpt2_small_shapes()
    shapes = shapes[:2 + 12 * blocks] + shapes[-2:]  # embeddings, `blocks` blocks, the final LayerNorm
    return nn.ParameterList([nn.Parameter(torch.randn(s) * 0.02) for s in shapes])


def make_case(name: str) -> tuple[str, nn.Module]:
    """``(description, module)`` with random float32 gradients set."""
    torch.manual_seed(0)
    if name == "resnet50":
        model: nn.Module = resnet50()
    elif name.startswith("gpt2"):
        blocks = 12 if name == "gpt2" else int(name.split("-")[1])
        model = _gpt2(blocks)
    else:
        raise SystemExit(f"unknown case {name!r}: use gpt2, gpt2-N (N of 12 blocks) or resnet50")
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 0.05
    n = sum(p.numel() for p in params)
    label = {"resnet50": "ResNet-50"}.get(name, "GPT-2 small" if name == "gpt2" else f"GPT-2 small, {name[5:]} blocks")
    return f"{label} ({len(params)} tensors, {n / 1e6:.1f}M)", model


def contenders(which: str, model: nn.Module) -> tuple[Callable[[], object], Callable[[], object], gg.Clipper | None]:
    """``(gradguard's call, torch's eager peer, the clipper or None)`` on ``model``'s gradients."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    max_norm = total / 4
    clip_value = float(torch.quantile(torch.cat([g.reshape(-1) for g in grads])[::97].abs(), 0.99))
    if which == "clip_grad_norm_":
        return ((lambda: gg.clip_grad_norm_(params, max_norm)),
                (lambda: nn.utils.clip_grad_norm_(params, max_norm)), None)
    if which == "get_total_norm":
        return (lambda: gg.get_total_norm(grads)), (lambda: nn.utils.get_total_norm(grads)), None
    if which == "clip_grad_value_":
        return ((lambda: gg.clip_grad_value_(params, clip_value)),
                (lambda: nn.utils.clip_grad_value_(params, clip_value)), None)
    makers: dict[str, Callable[[], gg.Clipper]] = {
        "NormClip": lambda: gg.NormClip(max_norm), "ZClip": gg.ZClip, "AGC": lambda: gg.AGC(clipping=0.01)}
    if which not in makers:
        raise SystemExit(f"unknown contender {which!r}: choose from {', '.join(NAMES)}")
    clipper = makers[which]()
    return (lambda: clipper(model).norm), (lambda: nn.utils.clip_grad_norm_(params, max_norm)), clipper


def check(compiled: Callable[[], object], eager: Callable[[], object], grads: list[torch.Tensor],
          restore: Callable[[], None]) -> tuple[float, float] | None:
    """Refuse to time a compiled call whose gradients are not eager's (to 1%: both clip, by nearly the same factor);
    return the relative errors of the two norms against float64, ``(compiled, eager)``, or None (no norm returned)."""
    restore()
    exact = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])))
    got = compiled()
    after = [g.clone() for g in grads]
    restore()
    want = eager()
    for a, b in zip(after, grads):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-6)
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        return None
    return abs(float(got) / exact - 1), abs(float(want) / exact - 1)


def run(which: str, model: nn.Module, rounds: int) -> dict[str, float]:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    originals = [g.clone() for g in grads]

    def restore() -> None:
        torch._foreach_copy_(grads, originals)

    ours, theirs, clipper = contenders(which, model)
    if isinstance(clipper, gg.ZClip):  # past the warm-up, as in training (eager and compiled share the clipper)
        for _ in range(clipper.warmup_steps + 1):
            restore()
            clipper(model)
    compiled = torch.compile(ours, fullgraph=True)
    restore()
    t0 = time.perf_counter()
    compiled()  # tracing, code generation, first run
    compile_s = time.perf_counter() - t0
    errors = check(compiled, ours, grads, restore)
    med = measure({"compiled": compiled, "eager": ours, "torch": theirs}, restore, rounds)  # measure warms up too
    return {"compile_s": compile_s, **med, "err_compiled": errors[0] if errors else math.nan,
            "err_eager": errors[1] if errors else math.nan}


def _err(e: float) -> str:
    return "-" if math.isnan(e) else f"{e:.1e}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cases", default="gpt2,resnet50")
    ap.add_argument("--only", default=",".join(NAMES))
    args = ap.parse_args(argv)
    kernel = os.environ.get("GRADGUARD_CPU_NORM_KERNEL", "dot")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians; "
          f"float32 gradients on the CPU; gradguard's eager CPU norm kernel: {kernel}; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| gradients | call | compiled / eager | compiled / torch eager | gradguard eager / torch eager | "
          "compile time | norm's error vs float64, compiled / eager |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        label, model = make_case(case)
        for which in args.only.split(","):
            torch._dynamo.reset()
            m = run(which, model, args.rounds)
            peer = "torch clip_grad_norm_" if which in ("NormClip", "ZClip", "AGC") else f"torch {which}"
            print(f"| {label} | {which} (vs {peer}) | {m['compiled'] / m['eager']:.2f}x | "
                  f"{m['compiled'] / m['torch']:.2f}x | {m['eager'] / m['torch']:.2f}x | {m['compile_s']:.1f} s | "
                  f"{_err(m['err_compiled'])} / {_err(m['err_eager'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
