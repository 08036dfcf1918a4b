"""Hugging Face ``Trainer``: ``GradGuardCallback(gg.AutoClip())`` on a tiny GPT-2 built from a config.

Nothing is downloaded: the model has random weights and the data are random token ids. The Trainer's own clipping
is turned off (``max_grad_norm=0``) because the callback clips; with it on, the callback refuses to start. Step 3
is poisoned with a NaN gradient (by a backward hook) to show the skip; the gradguard statistics appear in the
Trainer's logs.

    pip install "gradguard[transformers]"
    python examples/hf_trainer_example.py [--steps 12] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import gradguard as gg
from gradguard.integrations.transformers import GradGuardCallback


class RandomTokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class PoisonStep(TrainerCallback):
    """Make backward put a NaN into one gradient at one step (stands in for an overflow)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.handle: Any = None

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == self.step:
            def poison(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                grad.view(-1)[0] = float("nan")
                return grad
            self.handle = next(model.parameters()).register_hook(poison)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def main(steps: int, out: str) -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-3, max_grad_norm=0.0,
        logging_steps=4, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    guard = GradGuardCallback(gg.AutoClip(percentile=10))
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(steps * 8), callbacks=[PoisonStep(3)])
    guard.bind(trainer)  # decides on the gradients as backward left them, in place of the Trainer's norm pass
    trainer.train()
    for record in trainer.state.log_history:
        if "loss" in record:
            shown = {k: round(v, 4) for k, v in record.items() if k.startswith("gradguard/") or k == "loss"}
            print(f"step {record['step']}: {shown}")
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"skipped {guard.gate.skipped_steps}, parameters finite: {finite}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    main(args.steps, args.out or tempfile.mkdtemp(prefix="gradguard-hf-"))
