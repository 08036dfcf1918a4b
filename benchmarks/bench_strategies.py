"""Strategies vs their public peers, same process, interleaved rounds, medians, with the floors of the same run.

* AGC vs timm's ``adaptive_clip_grad`` on ResNet-50 gradients (161 tensors, 25.6M values). timm is loaded from its
  ``timm/utils/agc.py`` file alone (``pip install --no-deps timm``: importing the timm package needs torchvision).
  Floor: read W + read G + read/write G (the least unit-wise clipping can touch).
* ZClip vs the ``zclip`` 1.0.0 package on GPT-2 small gradients (148 tensors, 124.4M values), after warm-up, on
  steady norms (the common step: no spike, nothing to scale). Floor: one read of the gradients.
* AutoClip's bounded default on a small model (one 1024-value gradient, so the percentile dominates): a step after
  2**24 norms (the sketch phase) vs a step after 100 norms (the exact phase); and the previous unbounded default's
  per-step percentile, ``torch.nanquantile`` over 2**20 norms, vs the whole bounded step.

    python benchmarks/bench_strategies.py [--rounds 11] [--only agc,zclip,autoclip]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

import gradguard as gg
from bench_clip import measure
from shapes import gpt2_small_shapes, resnet50


def load_timm_agc() -> ModuleType | None:
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "utils" / "agc.py"
    mod_spec = importlib.util.spec_from_file_location("timm_agc", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def _restore_fn(grads: list[torch.Tensor]) -> Callable[[], None]:
    originals = [g.clone() for g in grads]
    return lambda: torch._foreach_copy_(grads, originals)


def bench_agc(rounds: int) -> dict[str, float] | None:
    timm_agc = load_timm_agc()
    if timm_agc is None:
        print("AGC: timm is not installed (pip install --no-deps timm); skipped")
        return None
    torch.manual_seed(0)
    model = resnet50()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 0.05  # ~half of the units exceed 0.01 x their weight norm
    grads = [p.grad for p in params]
    agc = gg.AGC(clipping=0.01, eps=1e-3)
    med = measure(
        {
            "gradguard": lambda: agc(model),
            "timm": lambda: timm_agc.adaptive_clip_grad(params, clip_factor=0.01, eps=1e-3),
            "read W": lambda: [p.detach().sum() for p in params],
            "read G": lambda: [g.sum() for g in grads],
            "rw G": lambda: [g.mul_(0.999) for g in grads],
        },
        _restore_fn(grads),
        rounds,
    )
    floor = med["read W"] + med["read G"] + med["rw G"]
    return {"gg_vs_peer": med["gradguard"] / med["timm"], "gg_vs_floor": med["gradguard"] / floor,
            "peer_vs_floor": med["timm"] / floor}


def bench_zclip(rounds: int) -> dict[str, float] | None:
    try:
        import zclip
    except ImportError:
        print("ZClip: the zclip package is not installed (pip install zclip==1.0.0); skipped")
        return None
    torch.manual_seed(0)
    holder = nn.ParameterList([nn.Parameter(torch.empty(s)) for s in gpt2_small_shapes()])
    for p in holder:
        p.grad = torch.randn(p.shape)
    grads = [p.grad for p in holder]
    ours, theirs = gg.ZClip(), zclip.ZClip(max_grad_norm=None)
    for _ in range(ours.warmup_steps + 1):  # past the warm-up, as in training
        ours(holder)
        theirs.step(holder)
    med = measure(
        {
            "gradguard": lambda: ours(holder),
            "zclip": lambda: theirs.step(holder),
            "read": lambda: [g.sum() for g in grads],
        },
        _restore_fn(grads),
        rounds,
    )
    return {"gg_vs_peer": med["gradguard"] / med["zclip"], "gg_vs_floor": med["gradguard"] / med["read"],
            "peer_vs_floor": med["zclip"] / med["read"]}


def _autoclip_after(n: int, w: nn.Parameter) -> gg.AutoClip:
    """An AutoClip() whose state says ``n`` finite norms were seen (the real steps, then the count scaled up)."""
    from gradguard.clippers.autoclip import sketch_bucket

    clipper = gg.AutoClip()
    steps = min(n, clipper.exact_steps + 100)
    for v in torch.exp(torch.randn(steps, generator=torch.Generator().manual_seed(0)) * 0.3):
        w.grad = torch.full_like(w, float(v))
        clipper([w])
    if n > steps:
        state = clipper.state_dict()
        state["sketch"].index_add_(0, sketch_bucket(torch.tensor(1.0)), torch.tensor([n - steps]))
        state["count"] = torch.tensor(n)
        clipper.load_state_dict(state)
    return clipper


def bench_autoclip(rounds: int) -> dict[str, float]:
    w = nn.Parameter(torch.zeros(1024))
    short, long = _autoclip_after(100, w), _autoclip_after(2**24, w)
    w.grad = torch.randn(1024)
    history = torch.rand(2**20)  # the previous default's history after 2**20 steps
    med = measure(
        {
            "after 100": lambda: short([w]),
            "after 2**24": lambda: long([w]),
            "nanquantile 2**20": lambda: torch.nanquantile(history, 0.1),
        },
        _restore_fn([w.grad]),
        rounds,
    )
    return {"long_vs_short": med["after 2**24"] / med["after 100"],
            "old_vs_long": med["nanquantile 2**20"] / med["after 2**24"], "long_us": med["after 2**24"] * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--only", default="agc,zclip,autoclip", help="comma-separated subset of agc, zclip, autoclip")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians\n")
    print("| strategy | peer | gradients | gradguard / peer | gradguard / floor | peer / floor | floor |")
    print("|---|---|---|---|---|---|---|")
    agc = bench_agc(args.rounds) if "agc" in only else None
    if agc:
        print(f"| AGC(0.01) | timm adaptive_clip_grad | ResNet-50, 161 tensors, 25.6M | {agc['gg_vs_peer']:.2f}x "
              f"| {agc['gg_vs_floor']:.2f}x | {agc['peer_vs_floor']:.2f}x | read W + read G + rw G |", flush=True)
    z = bench_zclip(args.rounds) if "zclip" in only else None
    if z:
        print(f"| ZClip() | zclip 1.0.0 | GPT-2 small, 148 tensors, 124.4M | {z['gg_vs_peer']:.2f}x "
              f"| {z['gg_vs_floor']:.2f}x | {z['peer_vs_floor']:.2f}x | read G |", flush=True)
    if "autoclip" in only:
        a = bench_autoclip(args.rounds)
        print(f"\nAutoClip(): a step after 2**24 norms / after 100 norms: {a['long_vs_short']:.2f}x "
              f"({a['long_us']:.0f} us); the previous default's percentile alone at 2**20 norms (nanquantile) / "
              f"a whole bounded step after 2**24: {a['old_vs_long']:.0f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
