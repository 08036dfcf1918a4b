"""GradGuardCallback inside a real Lightning Trainer (CPU, tiny model)."""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradguard as gg

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from gradguard.integrations.lightning import GradGuardCallback  # noqa: E402

LR = 0.1
MAX_NORM = 0.5


class TinyRegressor(L.LightningModule):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=LR)
        return torch.optim.SGD(self.parameters(), lr=LR)


class ParamRecorder(L.Callback):
    """Parameters before and after every training batch."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))


def loader(n_batches: int = 8, nan_at: int | None = None, scale: float = 50.0) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * 4, 4, generator=g)
    y = torch.randn(n_batches * 4, 1, generator=g) * scale  # large targets: raw gradient norms far above MAX_NORM
    if nan_at is not None:
        x[nan_at * 4] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def make_trainer(tmp_path, callbacks, steps: int = 8, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, **kwargs,
    )


def test_updates_are_bounded_by_lr_times_max_norm(tmp_path):
    model, rec = TinyRegressor(), ParamRecorder()
    cb = GradGuardCallback(gg.NormClip(MAX_NORM))
    make_trainer(tmp_path, [cb, rec]).fit(model, loader())
    assert len(rec.after) == 8
    steps = [float((a - b).norm()) for a, b in zip(rec.after, rec.before)]
    assert all(s <= LR * MAX_NORM * (1 + 1e-4) for s in steps), steps
    assert max(steps) > 0.9 * LR * MAX_NORM  # the bound is reached: gradients really were clipped, not tiny
    assert cb.gate.last_stats is not None and float(cb.gate.last_stats.norm) > MAX_NORM
    assert cb.gate.skipped_steps == 0


def test_without_the_callback_updates_exceed_the_bound(tmp_path):
    """Control for the test above: the same run unclipped takes much larger steps."""
    model, rec = TinyRegressor(), ParamRecorder()
    make_trainer(tmp_path, [rec]).fit(model, loader())
    assert max(float((a - b).norm()) for a, b in zip(rec.after, rec.before)) > 2 * LR * MAX_NORM


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_nan_batch_is_skipped_and_parameters_stay_finite(tmp_path, optimizer):
    model, rec = TinyRegressor(optimizer), ParamRecorder()
    cb = GradGuardCallback(gg.ZClip(warmup_steps=2))
    make_trainer(tmp_path, [cb, rec]).fit(model, loader(nan_at=3))
    assert cb.gate.skipped_steps == 1
    torch.testing.assert_close(rec.after[3], rec.before[3], rtol=0, atol=0)  # the NaN step changed nothing
    assert not torch.equal(rec.after[4], rec.before[4])  # training went on
    for p in model.parameters():
        assert torch.isfinite(p).all()
    if optimizer == "adamw":  # 8 batches, one skipped: AdamW took 7 steps
        steps = {float(s["step"]) for s in model.trainer.optimizers[0].state_dict()["state"].values()}
        assert steps == {7.0}
    zstate = cb.clipper.state_dict()
    assert all(torch.isfinite(v).all() for v in zstate.values() if v.is_floating_point())


def test_stats_reach_the_modules_logger(tmp_path):
    model = TinyRegressor()
    trainer = make_trainer(tmp_path, [GradGuardCallback(gg.NormClip(MAX_NORM))], steps=4)
    trainer.fit(model, loader(nan_at=2))
    assert {"gradguard/norm", "gradguard/clipped", "gradguard/skipped"} <= set(trainer.logged_metrics)
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    norms = [float(r["gradguard/norm"]) for r in rows if r.get("gradguard/norm")]
    skipped = [float(r["gradguard/skipped"]) for r in rows if r.get("gradguard/skipped")]
    assert len(norms) == 4 and math.isnan(norms[2]) and all(n > MAX_NORM for i, n in enumerate(norms) if i != 2)
    assert skipped == [0.0, 0.0, 1.0, 0.0]


def test_gradient_clip_val_together_with_a_clipper_is_refused(tmp_path):
    model = TinyRegressor()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, [GradGuardCallback(gg.NormClip(1.0))], gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="gradient_clip_val=None"):
        trainer.fit(model, loader())
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)  # raised before any step


def test_guard_only_callback_allows_lightnings_clipping(tmp_path):
    model, rec = TinyRegressor(), ParamRecorder()
    cb = GradGuardCallback(None)
    make_trainer(tmp_path, [cb, rec], gradient_clip_val=MAX_NORM).fit(model, loader(nan_at=1))
    assert cb.gate.skipped_steps == 1
    assert torch.equal(rec.after[1], rec.before[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_on_nonfinite_raise_stops_before_the_update(tmp_path):
    model, rec = TinyRegressor(), ParamRecorder()
    trainer = make_trainer(tmp_path, [GradGuardCallback(gg.NormClip(1.0), on_nonfinite="raise"), rec])
    with pytest.raises(gg.NonFiniteError):
        trainer.fit(model, loader(nan_at=0))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_state_round_trips():
    cb = GradGuardCallback(gg.ZClip(warmup_steps=2))
    w = torch.zeros(1, requires_grad=True)
    for n in (1.0, 2.0, 3.0):
        w.grad = torch.tensor([n])
        cb.gate([w], [w])
    other = GradGuardCallback(gg.ZClip(warmup_steps=2))
    other.load_state_dict(cb.state_dict())
    assert other.gate.steps == 3
    for k, v in cb.clipper.state_dict().items():
        assert torch.equal(v, other.clipper.state_dict()[k])


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_nonfinite"):
        GradGuardCallback(gg.NormClip(1.0), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="gg.Guard"):
        GradGuardCallback(gg.NormClip(1.0), on_nonfinite="rollback")
    with pytest.raises(TypeError, match="Clipper"):
        GradGuardCallback(torch.nn.utils.clip_grad_norm_)
    with pytest.raises(TypeError, match="monitor"):
        GradGuardCallback(monitor=object())


class StepRecorder:
    """A monitor that keeps what the callback hands it."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def record(self, stats, **fields):
        self.calls.append(fields)


def test_no_gradguard_warnings_without_a_logger_and_one_based_monitor_steps(tmp_path, recwarn, caplog):
    model, monitor = TinyRegressor(), StepRecorder()
    cb = GradGuardCallback(gg.NormClip(MAX_NORM), monitor=monitor)
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[cb],
    )
    with caplog.at_level("WARNING", logger="gradguard"):
        trainer.fit(model, loader(nan_at=2))
    package = os.path.dirname(os.path.abspath(gg.__file__)) + os.sep  # the package, not a checkout named gradguard
    ours = [str(w.message) for w in recwarn.list
            if "gradguard" in str(w.message) or os.path.abspath(w.filename).startswith(package)]
    assert ours == []  # e.g. Lightning's "called self.log(...) but have no logger configured" for our keys
    assert [c["step"] for c in monitor.calls] == [1, 2, 3, 4]
    assert [c["reason"] for c in monitor.calls] == [None, None, "nonfinite_grad", None]
    # the skip is still reported, through logging (once, with the step number)
    logged = [r.getMessage() for r in caplog.records if r.name == "gradguard"]
    assert len(logged) == 1 and "skipped step 3 (nonfinite_grad" in logged[0]


def test_checkpoint_state_is_validated_before_anything_changes():
    cb = GradGuardCallback(gg.ZClip(warmup_steps=2), verbose=False)
    w = torch.zeros(1, requires_grad=True)
    for n in (1.0, 2.0, 3.0):
        w.grad = torch.tensor([n])
        cb.gate([w], [w])
    state = cb.state_dict()
    other = GradGuardCallback(gg.ZClip(warmup_steps=2), verbose=False)
    before = other.state_dict()
    for bad in ({"gate": state["policy"], "clipper": state["clipper"]},  # the old layout
                {**state, "policy": {**state["policy"], "steps": 1.5}},
                {**state, "clipper": {**state["clipper"], "buffer": torch.zeros(5)}}):
        with pytest.raises((ValueError, TypeError)):
            other.load_state_dict(bad)
        assert other.state_dict() == before


class BNRegressor(TinyRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))


class BufferRecorder(L.Callback):
    def __init__(self) -> None:
        self.before: list[dict] = []
        self.after: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append({n: b.clone() for n, b in pl_module.named_buffers()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append({n: b.clone() for n, b in pl_module.named_buffers()})


def test_skipped_step_leaves_batchnorm_statistics_bit_exact(tmp_path):
    model, rec = BNRegressor(), BufferRecorder()
    cb = GradGuardCallback(gg.NormClip(MAX_NORM), verbose=False)
    make_trainer(tmp_path, [cb, rec], steps=6).fit(model, loader(n_batches=6, nan_at=3))
    assert cb.gate.skipped_steps == 1
    for name, before in rec.before[3].items():  # the NaN batch: its forward pass wrote NaN, undone on the skip
        assert torch.equal(rec.after[3][name], before), name
    assert int(model.net[1].num_batches_tracked) == 5  # 6 batches, one skipped
    assert torch.isfinite(model.net[1].running_mean).all() and torch.isfinite(model.net[1].running_var).all()
    assert not torch.equal(rec.after[4]["net.1.running_mean"], rec.before[4]["net.1.running_mean"])  # updates go on
