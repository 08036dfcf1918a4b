"""Quick start: gradguard as a drop-in for torch.nn.utils.clip_grad_norm_ on a network prone to exploding gradients.

A vanilla RNN learns the adding problem (sum the two marked numbers of a long sequence) at a learning rate high enough
to blow up. With `gg.clip_grad_norm_` before `optimizer.step()` the training stays finite; `gg.grad_norms` shows which
parameters carry the large gradients, without a host sync per step.

    python examples/quickstart.py [--steps 150]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradguard as gg


def adding_batch(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.rand(batch, length, generator=generator)
    marks = torch.zeros(batch, length)
    idx = torch.stack([torch.randperm(length, generator=generator)[:2] for _ in range(batch)])
    marks.scatter_(1, idx, 1.0)
    x = torch.stack([values, marks], dim=-1)
    y = (values * marks).sum(dim=1, keepdim=True)
    return x, y


class RNNRegressor(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(hidden, 1)
        nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=1.3)  # slightly expansive recurrence: gradients can explode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def train(steps: int, clip: bool, seed: int = 0) -> tuple[float, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = RNNRegressor()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    max_seen = 0.0
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x, y = adding_batch(32, 50, gen)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if clip:
            norm = gg.clip_grad_norm_(model.parameters(), max_norm=1.0)  # the norm before clipping, float32
        else:
            norm = gg.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        max_seen = max(max_seen, float(norm))
        opt.step()
    return loss.item(), max_seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    for clip in (False, True):
        loss, max_norm_seen = train(args.steps, clip)
        label = "gg.clip_grad_norm_(max_norm=1.0)" if clip else "no clipping                     "
        print(f"{label}  final loss {loss:10.4g}   largest gradient norm seen {max_norm_seen:10.4g}")

    # Which parameters carry the gradient? One grouped pass; values stay on the device until printed.
    model = RNNRegressor()
    x, y = adding_batch(32, 50, torch.Generator().manual_seed(1))
    nn.functional.mse_loss(model(x), y).backward()
    print("\nper-parameter gradient norms:")
    for name, norm in gg.grad_norms(model).items():
        print(f"  {name:16s} {float(norm):.4g}")


if __name__ == "__main__":
    main()
