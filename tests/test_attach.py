"""gg.attach: the optimizer step pre-hook, and the grad=None skip it (and the callbacks) rely on."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.hooks import StepGate, skip_step_


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _backward(model: nn.Module, scale: float = 1.0, nan: bool = False) -> None:
    x = torch.randn(16, 4)
    if nan:
        x[0, 0] = float("nan")
    model(x).pow(2).sum().mul(scale).backward()


def _state_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, dict):
            if not _state_equal(va, vb):
                return False
        elif isinstance(va, torch.Tensor):
            if not torch.equal(va, vb):
                return False
        elif va != vb:
            return False
    return True


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=False),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
    ],
    ids=["sgd-momentum", "adamw", "adam-loop", "rmsprop"],
)
def test_setting_grads_to_none_leaves_weights_and_optimizer_state_untouched(make_opt):
    """The claim the skip rests on: torch optimizers skip parameters without gradients (state and step counts too)."""
    model = _model()
    opt = make_opt(model.parameters())
    for _ in range(3):  # build some state first
        opt.zero_grad()
        _backward(model)
        opt.step()
    params = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    _backward(model, nan=True)
    skip_step_(model.parameters())
    opt.step()
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert _state_equal(state, opt.state_dict())
    # and the next good step proceeds exactly as if the bad one had never been attempted
    ref_model = copy.deepcopy(model)
    ref_model.load_state_dict(params)
    ref_opt = make_opt(ref_model.parameters())
    ref_opt.load_state_dict(state)
    torch.manual_seed(5)
    _backward(model)
    torch.manual_seed(5)
    _backward(ref_model)
    opt.step()
    ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


def test_attach_clips_every_step_and_remove_detaches():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = gg.attach(opt, gg.NormClip(1.0), model)
    for _ in range(3):
        opt.zero_grad()
        _backward(model, scale=100.0)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        assert float(update.norm()) <= 0.1 * 1.0 * (1 + 1e-5)
        assert bool(handle.stats.clipped)
    assert handle.gate.steps == 3 and handle.skipped_steps == 0
    handle.remove()
    handle.remove()  # idempotent
    opt.zero_grad()
    _backward(model, scale=100.0)
    norm = gg.get_total_norm([p.grad for p in model.parameters()])
    opt.step()
    assert handle.gate.steps == 3 and float(norm) > 1.0  # not clipped any more


def test_nonfinite_step_is_skipped_with_default_parameters():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    with gg.attach(opt, gg.ZClip(warmup_steps=2)) as handle:
        for step in range(5):
            opt.zero_grad()
            _backward(model, nan=step == 2)
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            same = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            assert same == (step == 2)
            assert handle.last_skipped == (step == 2)
    assert handle.skipped_steps == 1 and handle.removed
    assert {float(s["step"]) for s in opt.state_dict()["state"].values()} == {4.0}
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_guard_only_attach_skips_without_clipping():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = gg.attach(opt, None)
    _backward(model, scale=100.0)
    opt.step()
    assert not handle.last_skipped and float(handle.stats.norm) > 1.0 and not bool(handle.stats.clipped)


def test_closure_steps_are_refused_not_silently_misclipped():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gg.attach(opt, gg.NormClip(1.0))

    def closure():
        opt.zero_grad()
        loss = model(torch.randn(2, 4)).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure=closure)


def test_policies_raise_warn_and_max_consecutive_skips():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = gg.attach(opt, gg.NormClip(1.0), model, on_nonfinite="raise")
    _backward(model, nan=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gg.NonFiniteError) as info:
        opt.step()
    assert info.value.diagnosis.stage == "backward" and "0.weight" in info.value.diagnosis.parameters
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    handle.remove()

    handle = gg.attach(opt, gg.NormClip(1.0), on_nonfinite="warn", max_consecutive_skips=2)
    for _ in range(2):
        opt.zero_grad()
        _backward(model, nan=True)
        with pytest.warns(RuntimeWarning, match="skipped step"):
            opt.step()
    opt.zero_grad()
    _backward(model, nan=True)
    with pytest.raises(gg.TrainingDivergedError, match="3 bad steps in a row"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    handle.remove()


def test_double_attach_and_bad_arguments():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = gg.attach(opt, gg.NormClip(1.0))
    with pytest.raises(ValueError, match="already attached"):
        gg.attach(opt, gg.NormClip(1.0))
    handle.remove()
    gg.attach(opt, gg.NormClip(1.0)).remove()  # fine once removed
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        gg.attach(model, gg.NormClip(1.0))
    with pytest.raises(TypeError, match="Clipper"):
        gg.attach(opt, 1.0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        gg.attach(opt, gg.NormClip(1.0), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        gg.attach(opt, gg.NormClip(1.0), max_consecutive_skips=-1)
    with pytest.raises(TypeError, match="record"):
        gg.attach(opt, gg.NormClip(1.0), monitor=object())
    with pytest.raises(TypeError, match="parameters"):
        gg.attach(opt, gg.NormClip(1.0), parameters=[1, 2])
    assert opt._optimizer_step_pre_hooks == {}  # nothing was registered by the failed calls


def test_generator_parameters_are_kept_for_every_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = gg.attach(opt, gg.NormClip(1.0), model.named_parameters())
    for _ in range(2):
        opt.zero_grad()
        _backward(model, scale=100.0)
        opt.step()
        assert bool(handle.stats.clipped)
    handle.remove()


def test_monitor_records_each_step(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.Monitor(tmp_path, sinks=("jsonl",)) as monitor, gg.attach(opt, gg.NormClip(1.0), model, monitor=monitor):
        for step in range(3):
            opt.zero_grad()
            _backward(model, nan=step == 1)
            opt.step()
    with open(monitor.path) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if r["type"] == "step"]
    assert len(steps) == 3 and [r["skipped"] for r in steps] == [False, True, False]


def test_gate_counters_round_trip():
    gate = StepGate(gg.NormClip(1.0))
    w = torch.zeros(2, requires_grad=True)
    w.grad = torch.tensor([float("inf"), 0.0])
    gate([w], [w])
    assert w.grad is None and gate.skipped_steps == 1
    other = StepGate(gg.NormClip(1.0))
    other.load_state_dict(gate.state_dict())
    assert other.state_dict() == gate.state_dict() == {
        "policy": {"steps": 1, "good_steps": 0, "skipped_steps": 1, "consecutive_skips": 1,
                   "skipped_by_reason": {"nonfinite_loss": 0, "nonfinite_grad": 1, "nonfinite_params": 0,
                                         "loss_spike": 0, "grad_norm_spike": 0}},
        "clipper": {},
    }


def test_attach_reports_the_first_skip_and_numbers_steps_from_one(caplog):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    class Recorder:
        def record(self, stats, **fields):
            calls.append((fields["step"], fields["reason"], fields["lr"]))

    with caplog.at_level("WARNING", logger="gradguard"), gg.attach(opt, gg.NormClip(1.0), model,
                                                                    monitor=Recorder()) as handle:
        for step in range(4):
            opt.zero_grad()
            _backward(model, nan=step in (1, 2))
            opt.step()
    assert calls == [(1, None, 0.1), (2, "nonfinite_grad", 0.1), (3, "nonfinite_grad", 0.1), (4, None, 0.1)]
    logged = [r.getMessage() for r in caplog.records if r.name == "gradguard"]
    assert len(logged) == 1 and "skipped step 2 (nonfinite_grad" in logged[0] and "0.weight" in logged[0]
    assert handle.gate.last_diagnosis.step == 3
    caplog.clear()
    with caplog.at_level("WARNING", logger="gradguard"), gg.attach(opt, verbose=False):
        opt.zero_grad()
        _backward(model, nan=True)
        opt.step()
    assert not [r for r in caplog.records if r.name == "gradguard"]
