"""Lightning: ``GradGuardCallback(gg.ZClip())`` clips adaptively and skips a NaN batch inside ``Trainer.fit``.

A small regression model trains for a few dozen steps; batch 7 carries a NaN. The callback acts in
``on_before_optimizer_step`` (after Lightning's AMP unscale), skips that step on every rank, and logs
``gradguard/norm``, ``/threshold``, ``/clipped``, ``/skipped`` to the module's logger (CSV here).

    pip install "gradguard[lightning]"
    python examples/lightning_example.py [--steps 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg
from gradguard.integrations.lightning import GradGuardCallback


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main(steps: int, out: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(steps * 16, 8), torch.randn(steps * 16, 1) * 10
    x[7 * 16] = float("nan")  # one corrupt sample in batch 7
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    callback = GradGuardCallback(gg.ZClip(warmup_steps=5))
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(out), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        callbacks=[callback],  # no gradient_clip_val: the callback clips
    )
    model = Regressor()
    trainer.fit(model, data)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"steps {trainer.global_step}, skipped {callback.gate.skipped_steps}, parameters finite: {finite}")
    print(f"logged: {sorted(k for k in trainer.logged_metrics if k.startswith('gradguard/'))}")
    print(f"metrics file: {trainer.logger.experiment.metrics_file_path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    main(args.steps, args.out or tempfile.mkdtemp(prefix="gradguard-lightning-"))
