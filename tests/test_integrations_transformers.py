"""GradGuardCallback inside a real Hugging Face Trainer (CPU, tiny models built locally: nothing downloaded)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import gradguard as gg

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradguard.integrations.transformers import GradGuardCallback  # noqa: E402

LR = 0.1
MAX_NORM = 0.5


class Regression(Dataset):
    def __init__(self, n: int = 32, nan_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, 1, generator=g) * 50.0  # raw gradient norms far above MAX_NORM
        if nan_at is not None:
            self.x[nan_at] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class TinyRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class ParamRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))


def make_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential", seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(tmp_path, model, dataset, callbacks, optimizer="sgd", **overrides) -> Trainer:
    opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    opt = opt_cls(model.parameters(), lr=LR)
    return Trainer(model=model, args=make_args(tmp_path, **overrides), train_dataset=dataset, callbacks=callbacks,
                   optimizers=(opt, None))


def test_updates_are_bounded_by_lr_times_max_norm(tmp_path):
    model, rec = TinyRegressor(), ParamRecorder()
    cb = GradGuardCallback(gg.NormClip(MAX_NORM))
    trainer = make_trainer(tmp_path, model, Regression(), [cb, rec])
    trainer.train()
    steps = [float((a - b).norm()) for a, b in zip(rec.after, rec.before)]
    assert len(steps) == 8
    assert all(s <= LR * MAX_NORM * (1 + 1e-4) for s in steps), steps
    assert max(steps) > 0.9 * LR * MAX_NORM
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 8
    assert all(h["gradguard/norm_mean"] > MAX_NORM and h["gradguard/clip_rate"] == 1.0 for h in logs)
    assert all(h["gradguard/skipped"] == 0.0 and h["gradguard/threshold"] == MAX_NORM for h in logs)


def test_without_the_callback_updates_exceed_the_bound(tmp_path):
    model, rec = TinyRegressor(), ParamRecorder()
    make_trainer(tmp_path, model, Regression(), [rec]).train()
    assert max(float((a - b).norm()) for a, b in zip(rec.after, rec.before)) > 2 * LR * MAX_NORM


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_nan_batch_is_skipped_and_parameters_stay_finite(tmp_path, optimizer):
    model, rec = TinyRegressor(), ParamRecorder()
    cb = GradGuardCallback(gg.ZClip(warmup_steps=2))
    trainer = make_trainer(tmp_path, model, Regression(nan_at=13), [cb, rec], optimizer=optimizer)
    trainer.train()
    assert cb.gate.skipped_steps == 1
    assert torch.equal(rec.after[3], rec.before[3])  # sample 13 is in the 4th batch: that step changed nothing
    assert not torch.equal(rec.after[4], rec.before[4])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if optimizer == "adamw":
        assert {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()} == {7.0}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["gradguard/skipped"] for h in logs] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert math.isnan(logs[3]["gradguard/norm_mean"]) and logs[-1]["gradguard/skipped_total"] == 1.0


def test_gpt2_built_from_a_config_is_clipped(tmp_path):
    """A real transformer (1-layer GPT-2 from a config, random weights): every step is clipped to MAX_NORM."""
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)

    class Tokens(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    rec = ParamRecorder()
    cb = GradGuardCallback(gg.NormClip(MAX_NORM))
    make_trainer(tmp_path, model, Tokens(), [cb, rec], max_steps=4).train()
    steps = [float((a - b).norm()) for a, b in zip(rec.after, rec.before)]
    assert all(s <= LR * MAX_NORM * (1 + 1e-4) for s in steps) and float(cb.gate.last_stats.norm) > MAX_NORM


def test_max_grad_norm_with_a_clipper_is_refused_at_construction(tmp_path):
    model = TinyRegressor()
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        make_trainer(tmp_path, model, Regression(), [GradGuardCallback(gg.NormClip(1.0))], max_grad_norm=1.0)


def test_max_grad_norm_refused_when_added_later(tmp_path):
    model = TinyRegressor()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, model, Regression(), [], max_grad_norm=1.0)
    trainer.add_callback(GradGuardCallback(gg.NormClip(1.0)))
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        trainer.train()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_guard_only_keeps_the_trainers_clipping(tmp_path):
    model, rec = TinyRegressor(), ParamRecorder()
    cb = GradGuardCallback(None)
    make_trainer(tmp_path, model, Regression(nan_at=2), [cb, rec], max_grad_norm=MAX_NORM).train()
    assert cb.gate.skipped_steps == 1 and torch.equal(rec.after[0], rec.before[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_nonfinite"):
        GradGuardCallback(gg.NormClip(1.0), on_nonfinite="nope")
    with pytest.raises(TypeError, match="Clipper"):
        GradGuardCallback(1.0)


class OneInf(nn.Module):
    """A regressor plus a parameter ``extra`` whose gradient is +inf on the batch holding ``boom=inf``: exactly one
    non-finite gradient element, every other gradient finite."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.extra = nn.Parameter(torch.zeros(1))

    def forward(self, x, labels=None, boom=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels) + (self.extra * boom).sum(), "logits": out}


class Boom(Regression):
    def __init__(self, boom_at: int) -> None:
        super().__init__()
        self.boom = torch.zeros(len(self.x), 1)
        self.boom[boom_at] = math.inf

    def __getitem__(self, i):
        return {**super().__getitem__(i), "boom": self.boom[i]}


def _count_accelerator_clips(trainer) -> list[float]:
    calls: list[float] = []
    original = trainer.accelerator.clip_grad_norm_

    def counting(parameters, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return original(parameters, max_norm, *args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = counting
    return calls


@pytest.mark.parametrize("bound", [True, False])
def test_bound_callback_sees_the_gradients_as_backward_left_them(tmp_path, bound):
    model, rec = OneInf(), ParamRecorder()
    cb = GradGuardCallback(gg.NormClip(MAX_NORM), verbose=False)
    trainer = make_trainer(tmp_path, model, Boom(boom_at=9), [rec])  # max_grad_norm=0
    calls = _count_accelerator_clips(trainer)
    if bound:
        assert cb.bind(trainer) is trainer and cb in trainer.callback_handler.callbacks
    else:
        trainer.add_callback(cb)
    trainer.train()
    assert cb.gate.skipped_steps == 1 and torch.equal(rec.after[2], rec.before[2])  # sample 9: the 3rd batch
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if not bound:  # the Trainer's inf-norm pass turned the one Inf into NaN everywhere, and ran every step
        assert len(cb.gate.last_diagnosis.parameters) == 5 and calls == [math.inf] * 8
        return
    assert cb.gate.last_diagnosis.parameters == ("extra",)  # one Inf stays one Inf
    assert calls == []  # no pass of the Trainer's over the gradients: the gate's norm is the Trainer's grad_norm
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for i, h in enumerate(logs):
        if i != 2:
            assert h["grad_norm"] == pytest.approx(h["gradguard/norm_mean"], rel=1e-6) and h["grad_norm"] > MAX_NORM
    steps = [float((a - b).norm()) for a, b in zip(rec.after, rec.before)]
    assert all(s <= LR * MAX_NORM * (1 + 1e-4) for s in steps)


def test_bound_guard_only_callback_decides_before_the_trainers_clipping(tmp_path):
    model, rec = OneInf(), ParamRecorder()
    cb = GradGuardCallback(None, verbose=False)
    trainer = make_trainer(tmp_path, model, Boom(boom_at=9), [rec], max_grad_norm=MAX_NORM)
    calls = _count_accelerator_clips(trainer)
    cb.bind(trainer).train()
    assert cb.gate.skipped_steps == 1 and cb.gate.last_diagnosis.parameters == ("extra",)
    assert calls == [MAX_NORM] * 7  # the Trainer's own clipping, on the 7 finite steps only
    steps = [float((a - b).norm()) for a, b in zip(rec.after, rec.before)]
    assert steps[2] == 0.0 and all(s <= LR * MAX_NORM * (1 + 1e-4) for s in steps)
    with pytest.raises(ValueError, match="already bound"):
        GradGuardCallback(None).bind(trainer)
    with pytest.raises(TypeError, match="transformers.Trainer"):
        GradGuardCallback(None).bind(object())


def test_bind_refuses_what_it_cannot_take_over(tmp_path):
    trainer = make_trainer(tmp_path, TinyRegressor(), Regression(), [])
    original = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # what accelerate sets up for fp16 on a GPU
    with pytest.raises(ValueError, match="GradScaler"):
        GradGuardCallback(gg.NormClip(1.0)).bind(trainer)
    assert trainer.accelerator.clip_grad_norm_ == original  # nothing was patched


class BNRegressor(TinyRegressor):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))


class BufferRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.before: list[dict] = []
        self.after: list[dict] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before.append({n: b.clone() for n, b in model.named_buffers()})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after.append({n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("bound", [True, False])
def test_skipped_step_leaves_batchnorm_statistics_bit_exact(tmp_path, bound):
    model, rec = BNRegressor(), BufferRecorder()
    cb = GradGuardCallback(gg.NormClip(MAX_NORM), verbose=False)
    trainer = make_trainer(tmp_path, model, Regression(nan_at=13), [rec] if bound else [cb, rec])
    if bound:
        cb.bind(trainer)
    trainer.train()
    assert cb.gate.skipped_steps == 1
    for name, before in rec.before[3].items():  # sample 13 is in the 4th batch: its forward wrote NaN, undone
        assert torch.equal(rec.after[3][name], before), name
    bn = model.net[1]
    assert int(bn.num_batches_tracked) == 7 and torch.isfinite(bn.running_mean).all()
    assert torch.isfinite(bn.running_var).all()
