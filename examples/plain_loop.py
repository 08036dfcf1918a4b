"""A plain training loop made safe with one line: ``gg.attach(optimizer, clipper, model)``.

The loop below is unchanged code (zero_grad, backward, step). ``gg.attach`` clips every step through an optimizer
pre-hook, and a batch that produces NaN gradients (here batch 5 is corrupted on purpose) is skipped: the weights and
Adam's moments are left exactly as they were.

    python examples/plain_loop.py [--steps 20]

Prints one line per step (``step, loss, grad norm, clipped, skipped``) and a final summary line.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradguard as gg


def main(steps: int = 20) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle = gg.attach(optimizer, gg.NormClip(max_norm=1.0), model)  # the only gradguard line

    for step in range(steps):
        x, y = torch.randn(32, 8), torch.randn(32, 1) * 10
        if step == 5:
            x[0, 0] = float("nan")  # a corrupt batch
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()  # clipped first; skipped if the gradients are not finite
        stats = handle.stats
        assert stats is not None
        print(f"step {step:2d}  loss {loss.item():9.4f}  grad norm {stats.norm.item():9.4f}  "
              f"clipped {bool(stats.clipped)!s:5}  skipped {handle.last_skipped}")

    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    handle.remove()
    print(f"done: {handle.skipped_steps} step(s) skipped, parameters finite: {finite}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
