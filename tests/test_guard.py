"""The Guard: a fault-injection matrix, policies, state preservation, diagnosis, and the locator vs detect_anomaly."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from gradguard.guard import SpikeDetector
from gradguard.policy import Reason, SkipPolicy


class Faulty(nn.Module):
    """A small network whose nested module ``encoder.layers.1.attn`` can be made to fail in chosen ways."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 1)
        self.fault: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layers:
            layer.attn.fault = self.fault
            x = layer(x)
        return self.head(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attn()
        self.mlp = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x)).tanh()


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.fault: str | None = None
        self.is_target = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if self.is_target and self.fault == "log0":
            return torch.log(h * 0.0)  # log(0) = -inf
        if self.is_target and self.fault == "div0":
            return h / (h - h)  # division by zero
        if self.is_target and self.fault == "sqrt0":
            return torch.sqrt(h * 0.0) + h  # finite forward, infinite derivative at 0
        return h


def make(seed: int = 0, lr: float = 0.05, opt: str = "adam"):
    torch.manual_seed(seed)
    model = Faulty()
    model.encoder.layers[1].attn.is_target = True
    optimizer = (torch.optim.AdamW(model.parameters(), lr=lr) if opt == "adam"
                 else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    return model, optimizer


def batch(step: int, n: int = 16):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def loss_fn(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def params_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):  # bit-exact, NaN equal to NaN (unused history slots hold NaN)
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and bool(
            ((a == b) | (a.isnan() & b.isnan())).all())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def clone_state(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------ fault-injection matrix
FAULTS = {
    "log0": ("forward", "encoder.layers.1.attn", "aten.log.default", None),
    "div0": ("forward", "encoder.layers.1.attn", "aten.div.Tensor", None),
    "sqrt0": ("backward", "encoder.layers.1.attn", "aten.sqrt", "SqrtBackward0"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_faults_are_skipped_and_located(fault, policy):
    model, opt = make()
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0), scheduler=sched, on_nonfinite=policy,
                     snapshot_every=2 if policy == "rollback" else None)
    for step in range(4):
        x, y = batch(step)
        assert not guard.step(lambda: loss_fn(model, x, y)).skipped
    before_model, before_opt = clone_state(model.state_dict()), clone_state(opt.state_dict())
    before_sched = clone_state(sched.state_dict())
    snapshot_model = clone_state(guard._snapshot.states["model"]) if policy == "rollback" else None
    model.fault = fault
    x, y = batch(99)
    report = guard.step(lambda: loss_fn(model, x, y))
    model.fault = None
    assert report.skipped and params_finite(model)
    stage, module, op, node = FAULTS[fault]
    d = guard.diagnosis
    assert (d.stage, d.module, d.op, d.node) == (stage, module, op, node), str(d)
    assert d.located and d.cause and d.fix and str(d).startswith("gradguard: non-finite value")
    if policy == "skip":  # nothing moved
        assert state_equal(model.state_dict(), before_model)
        assert state_equal(opt.state_dict(), before_opt)
        assert state_equal(sched.state_dict(), before_sched)
    else:  # restored to the snapshot, bit for bit
        assert report.rolled_back and state_equal(model.state_dict(), snapshot_model)
    x, y = batch(100)
    assert not guard.step(lambda: loss_fn(model, x, y)).skipped


def test_nan_in_the_input_batch():
    model, opt = make()
    guard = gg.Guard(model, opt)
    x, y = batch(0)
    x[3, 2] = math.nan
    before = clone_state(model.state_dict())
    report = guard.step(lambda: loss_fn(model, x, y))
    assert report.skipped and report.reason == "nonfinite_loss"
    assert guard.diagnosis.stage == "input" and guard.diagnosis.value == "nan"
    assert "data" in guard.diagnosis.fix and state_equal(model.state_dict(), before)


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_learning_rate_blow_up_never_reaches_the_weights(policy):
    model, opt = make(lr=1e36, opt="sgd")
    guard = gg.Guard(model, opt, on_nonfinite=policy, snapshot_every=1 if policy == "rollback" else None)
    x, y = batch(0)
    before_model, before_opt = clone_state(model.state_dict()), clone_state(opt.state_dict())
    report = guard.step(lambda: loss_fn(model, x, y) * 1e6)
    assert report.skipped and report.reason == "nonfinite_params"
    assert guard.diagnosis.stage == "step" and "learning rate" in guard.diagnosis.fix
    assert guard.diagnosis.parameters  # which weights would have blown up
    assert params_finite(model)
    assert state_equal(model.state_dict(), before_model) and state_equal(opt.state_dict(), before_opt)


def test_overflow_under_grad_scaler_is_skipped_and_the_scale_lowered():
    model, opt = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    calls = []
    original = scaler.unscale_
    scaler.unscale_ = lambda o: (calls.append(1), original(o))[1]  # count unscale_ calls
    guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0), scaler=scaler)
    x, y = batch(0)
    before = clone_state(model.state_dict())
    report = guard.step(lambda: loss_fn(model, x, y) * 1e3)
    assert report.skipped and report.reason == "nonfinite_grad"
    assert guard.diagnosis.stage == "backward" and "scal" in guard.diagnosis.cause
    assert state_equal(model.state_dict(), before) and scaler.get_scale() < 2.0**127
    assert calls == [1]


def test_scaler_norm_equals_the_unscaled_norm_and_unscale_is_called_once():
    m1, o1 = make()
    m2, o2 = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    calls = []
    original = scaler.unscale_
    scaler.unscale_ = lambda o: (calls.append(1), original(o))[1]
    g1 = gg.Guard(m1, o1, clipper=gg.NormClip(0.5))
    g2 = gg.Guard(m2, o2, clipper=gg.NormClip(0.5), scaler=scaler)
    for step in range(5):
        x, y = batch(step)
        r1 = g1.step(lambda: loss_fn(m1, x, y))
        r2 = g2.step(lambda: loss_fn(m2, x, y))
        torch.testing.assert_close(r2.norm, r1.norm, rtol=1e-5, atol=0)
    assert calls == [1] * 5
    # the caller may unscale itself (e.g. to log unscaled gradients): the Guard does not call it twice
    x, y = batch(9)
    g2.backward(loss_fn(m2, x, y))
    scaler.unscale_(o2)
    g2.step()
    assert len(calls) == 6


def test_raise_and_warn_policies_and_the_consecutive_skip_limit():
    model, opt = make()
    guard = gg.Guard(model, opt, on_nonfinite="raise")
    model.fault = "log0"
    x, y = batch(0)
    with pytest.raises(gg.NonFiniteError) as err:
        guard.step(lambda: loss_fn(model, x, y))
    assert err.value.diagnosis.op == "aten.log.default" and params_finite(model)

    guard = gg.Guard(model, opt, on_nonfinite="warn", max_consecutive_skips=2)
    with pytest.warns(RuntimeWarning, match="aten.log.default"):
        assert guard.step(lambda: loss_fn(model, x, y)).skipped
    with pytest.warns(RuntimeWarning):
        guard.step(lambda: loss_fn(model, x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(gg.TrainingDivergedError, match="3 bad steps in a row") as err:
            guard.step(lambda: loss_fn(model, x, y))
    assert err.value.diagnosis.stage == "forward" and params_finite(model)
    model.fault = None
    guard.policy.consecutive_skips = 0
    assert not guard.step(lambda: loss_fn(model, x, y)).skipped


def test_backward_then_step_without_closure_gives_stage_and_parameters():
    model, opt = make()
    guard = gg.Guard(model, opt, clipper=gg.ZClip(warmup_steps=2))
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad()
        guard.backward(loss_fn(model, x, y))
        assert not guard.step().skipped
    model.fault = "sqrt0"
    opt.zero_grad()
    x, y = batch(5)
    guard.backward(loss_fn(model, x, y))
    report = guard.step()
    assert report.skipped and report.reason == "nonfinite_grad"
    d = guard.diagnosis
    assert d.stage == "backward" and not d.located and "encoder.layers.1.attn.proj.weight" in d.parameters
    assert "closure" in str(d)
    with pytest.raises(RuntimeError, match="backward"):
        guard.step()


def test_skipped_step_leaves_optimizer_scheduler_and_ema_untouched():
    model, opt = make()
    ema = torch.optim.swa_utils.AveragedModel(model)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    guard = gg.Guard(model, opt, clipper=gg.AutoClip(), scheduler=sched, ema=ema)
    for step in range(3):
        x, y = batch(step)
        guard.step(lambda: loss_fn(model, x, y))
    snap = [clone_state(s) for s in (model.state_dict(), opt.state_dict(), sched.state_dict(), ema.state_dict())]
    clip_state = clone_state(guard.clipper.state_dict())
    model.fault = "div0"
    x, y = batch(7)
    assert guard.step(lambda: loss_fn(model, x, y)).skipped
    for before, now in zip(snap, (model.state_dict(), opt.state_dict(), sched.state_dict(), ema.state_dict())):
        assert state_equal(now, before)
    # a step that is not applied commits nothing to the clipper (its call counter included)
    assert state_equal(guard.clipper.state_dict(), clip_state)


def test_loss_spike_is_skipped():
    model, opt = make()
    guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0), spike_z=6.0, spike_window=32)
    for step in range(40):
        x, y = batch(step)
        assert not guard.step(lambda: loss_fn(model, x, y)).skipped
    before = clone_state(model.state_dict())
    x, y = batch(41)
    report = guard.step(lambda: loss_fn(model, x, y) * 1e4)
    assert report.skipped and report.reason == "loss_spike" and state_equal(model.state_dict(), before)
    assert not guard.step(lambda: loss_fn(model, x, y)).skipped


def test_a_few_hundred_steps_with_faults_reach_the_clean_loss():
    def train(faults):
        model, opt = make(lr=0.01)
        guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0))
        for step in range(300):
            if faults.get(step) == "omit":
                continue
            model.fault = faults.get(step)
            x, y = batch(step % 50)
            guard.step(lambda: loss_fn(model, x, y))
        model.fault = None
        with torch.no_grad():
            return sum(loss_fn(model, *batch(s)).item() for s in range(50)) / 50, guard.skipped_steps

    faults = {40: "log0", 41: "div0", 120: "sqrt0", 200: "log0", 201: "log0"}
    clean, skipped_clean = train({})
    faulty, skipped = train(faults)
    assert skipped_clean == 0 and skipped == 5
    assert math.isfinite(faulty) and abs(faulty - clean) <= 0.15 * clean
    # a skipped step leaves no trace: the faulty run equals a clean run that never saw those 5 batches
    without, _ = train({s: "omit" for s in faults})
    assert faulty == without


def test_bad_arguments_raise_before_anything_changes():
    model, opt = make()
    cases = [
        (lambda: gg.Guard(model, opt, on_nonfinite="ignore"), ValueError, "on_nonfinite"),
        (lambda: gg.Guard(model, opt, on_nonfinite="rollback"), ValueError, "snapshot_every"),
        (lambda: gg.Guard(model, opt, clipper=1.0), TypeError, "clipper"),
        (lambda: gg.Guard("model", opt), TypeError, "model"),
        (lambda: gg.Guard(model, "sgd"), TypeError, "optimizer"),
        (lambda: gg.Guard(model, opt, max_consecutive_skips=-1), ValueError, "max_consecutive_skips"),
        (lambda: gg.Guard(model, opt, check_params_every=0), ValueError, "check_params_every"),
        (lambda: gg.Guard(model, opt, spike_z=-1.0), ValueError, "spike_z"),
        (lambda: gg.Guard(model, opt, monitor=object()), TypeError, "monitor"),
    ]
    for make_guard, exc, match in cases:
        with pytest.raises(exc, match=match):
            make_guard()
    guard = gg.Guard(model, opt)
    before = clone_state(model.state_dict())
    with pytest.raises(TypeError, match="closure"):
        guard.step(3)
    with pytest.raises(ValueError, match="scalar"):
        guard.backward(torch.ones(3, requires_grad=True))
    assert state_equal(model.state_dict(), before)


def test_monitor_receives_every_step():
    model, opt = make()
    records = []

    class Recorder:
        def record(self, stats, **fields):
            records.append((stats, fields))

    guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0), monitor=Recorder())
    x, y = batch(0)
    guard.step(lambda: loss_fn(model, x, y))
    model.fault = "log0"
    guard.step(lambda: loss_fn(model, x, y))
    assert [r[1]["skipped"] for r in records] == [False, True]
    assert records[1][1]["reason"] == "nonfinite_loss" and records[1][1]["diagnosis"].stage == "forward"
    assert set(records[0][1]) == {"loss", "skipped", "reason", "lr", "model", "diagnosis", "step"}


# ------------------------------------------------------------------------------------- the locator vs detect_anomaly
@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled:UserWarning")  # the oracle, used on purpose
@pytest.mark.filterwarnings("ignore:Error detected in:UserWarning")  # anomaly mode reporting what it found
def test_locator_catches_what_detect_anomaly_misses():
    # 1. a forward NaN whose gradient is finite (the NaN reaches the loss through a detached path)
    lin = nn.Linear(3, 1)
    x = torch.tensor([[1.0, -2.0, 3.0]])

    def forward_nan():
        out = lin(x)
        return out.sum() + torch.log(out.detach() - 1e9).sum()  # log(negative) = NaN, no gradient through it

    with torch.autograd.detect_anomaly(check_nan=True):
        forward_nan().backward()  # anomaly mode is silent: backward is finite
    d = gg.locate_nonfinite(forward_nan, lin)
    assert (d.stage, d.op, d.value) == ("forward", "aten.log.default", "nan")

    # 2. Inf-only gradients (sqrt at 0): anomaly mode checks NaN only
    w = nn.Parameter(torch.zeros(3))

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w

        def forward(self):
            return torch.sqrt(self.w).sum()

    root = Root()
    with torch.autograd.detect_anomaly(check_nan=True):
        root().backward()
    assert torch.isinf(w.grad).all()
    w.grad = None
    d = gg.locate_nonfinite(root, root)
    assert (d.stage, d.node, d.op, d.value, d.parameters) == ("backward", "SqrtBackward0", "aten.sqrt", "inf", ("w",))
    assert w.grad is None  # the replay left gradients as they were

    # 3. the op where the value started, not the first backward node that met it
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self):
            return (torch.log(x.reshape(-1) - 10.0) * self.w).sum()  # log(negative): NaN starts here

    late = Late()
    d = gg.locate_nonfinite(late, late)
    assert d.stage == "forward" and d.op == "aten.log.default" and d.value == "nan"
    with pytest.raises(RuntimeError) as anomaly, torch.autograd.detect_anomaly(check_nan=True):
        late().backward()
    assert "MulBackward0" in str(anomaly.value)  # anomaly mode blames the multiplication's backward


def test_locate_leaves_parameters_buffers_grads_and_rng_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    x = torch.randn(8, 4)
    x[0, 0] = math.inf
    state = clone_state(model.state_dict())
    grads = [torch.ones_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    rng = torch.get_rng_state()
    d = gg.locate_nonfinite(lambda: model(x).sum(), model)
    assert d.stage == "input" and d.value == "inf"
    assert state_equal(model.state_dict(), state)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng)
    assert gg.locate_nonfinite(lambda: model(torch.randn(8, 4)).sum(), model) is None


class ReplacingSGD(torch.optim.Optimizer):
    """An optimizer that replaces its state tensors instead of updating them in place (as some third-party ones do)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                st["buf"] = st.get("buf", torch.zeros_like(p)) * 0.9 + p.grad
                st["count"] = st.get("count", 0) + 1
                p.sub_(group["lr"] * st["buf"])


def test_checked_step_undo_restores_replaced_state_tensors():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = ReplacingSGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt)
    x = torch.randn(8, 4)
    guard.step(lambda: model(x).pow(2).mean())
    opt.param_groups[0]["lr"] = 1e38
    before_model, before_opt = clone_state(model.state_dict()), clone_state(opt.state_dict())
    report = guard.step(lambda: model(x).pow(2).mean() * 1e10)
    assert report.skipped and report.reason == "nonfinite_params"
    assert state_equal(model.state_dict(), before_model) and state_equal(opt.state_dict(), before_opt)


def test_raise_policy_leaves_the_scaler_ready_and_the_monitor_sees_the_gradients():
    model, opt = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    seen = []

    class Recorder:
        def record(self, stats, **fields):
            seen.append(all(p.grad is not None for p in fields["model"].parameters()))

    guard = gg.Guard(model, opt, scaler=scaler, on_nonfinite="raise", monitor=Recorder())
    model.fault = "log0"
    x, y = batch(0)
    with pytest.raises(gg.NonFiniteError):
        guard.step(lambda: loss_fn(model, x, y))
    assert seen == [True]  # recorded with the bad step's gradients, before they were dropped
    assert all(p.grad is None for p in model.parameters())
    model.fault = None
    assert not guard.step(lambda: loss_fn(model, x, y)).skipped  # the scaler was updated: no double unscale_


def test_spike_diagnosis_reads_as_a_spike():
    d = gg.Diagnosis("forward", event="loss_spike", cause="c", fix="f", step=3)
    assert str(d).startswith("gradguard: loss spike at stage 'forward' (step 3)") and "closure" not in str(d)


# ------------------------------------------------------------------ a step that is not applied changes nothing (#10)
class BNNet(nn.Module):
    """Linear -> BatchNorm1d -> Linear: the forward pass writes running_mean/var and num_batches_tracked."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 1)
        self.register_buffer("seen", torch.zeros(8))  # any registered buffer, updated in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.inp(x))
        if self.training:
            with torch.no_grad():
                self.seen.add_(h.detach().mean(0))
        return self.out(h.relu())


def make_bn(seed: int = 0, lr: float = 0.05):
    torch.manual_seed(seed)
    model = BNNet()
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def buffers_of(model):
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def _torch_style(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("convention", ["closure", "torch_closure", "manual"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_skipped_step_leaves_batchnorm_statistics_and_buffers_bit_exact(convention, policy):
    model, opt = make_bn()
    guard = gg.Guard(model, opt, on_nonfinite=policy, verbose=False)

    def run(x, y):
        if convention == "closure":
            return guard.step(lambda: loss_fn(model, x, y))
        if convention == "torch_closure":
            return guard.step(_torch_style(model, opt, x, y))
        guard.backward(loss_fn(model, x, y))
        return guard.step()

    for step in range(3):
        assert not run(*batch(step)).skipped
    before = buffers_of(model)
    assert int(before["bn.num_batches_tracked"]) == 3
    x, y = batch(3)
    x[2, 0] = float("nan")  # a corrupt sample: BatchNorm's batch mean and variance become NaN
    if policy == "raise":
        with pytest.raises(gg.NonFiniteError):
            run(x, y)
    else:
        assert run(x, y).skipped
    assert state_equal(buffers_of(model), before)  # NaN never reaches running_mean/var; the count did not move
    model.eval()
    assert bool(torch.isfinite(model(batch(4)[0])).all())  # later evaluation is unaffected
    model.train()
    assert not run(*batch(5)).skipped and int(model.bn.num_batches_tracked) == 4


def test_undone_step_leaves_batchnorm_statistics_bit_exact():
    model, opt = make_bn(lr=0.05)
    guard = gg.Guard(model, opt, verbose=False)
    for step in range(2):
        guard.step(lambda: loss_fn(model, *batch(step)))
    before, before_params = buffers_of(model), clone_state(model.state_dict())
    opt.param_groups[0]["lr"] = 1e38  # finite gradients, non-finite weights: the step is undone
    x, y = batch(2)
    report = guard.step(lambda: loss_fn(model, x, y) * 1e6)
    assert report.skipped and report.reason == "nonfinite_params"
    assert state_equal(buffers_of(model), before) and state_equal(model.state_dict(), before_params)


@pytest.mark.parametrize("make_clipper", [
    lambda: gg.ZClip(warmup_steps=2), lambda: gg.AutoClip(percentile=50), lambda: gg.AdaGC(warmup_steps=1),
    lambda: gg.Chain(gg.AdaGC(warmup_steps=1), gg.ZClip(warmup_steps=2)),
], ids=["zclip", "autoclip", "adagc", "chain"])
@pytest.mark.parametrize("fault", ["nonfinite_params", "loss_spike"])
def test_clipper_statistics_are_committed_only_for_applied_steps(make_clipper, fault):
    model, opt = make(opt="sgd", lr=0.01)
    guard = gg.Guard(model, opt, clipper=make_clipper(), spike_z=3.0 if fault == "loss_spike" else None,
                     spike_window=8, verbose=False)
    for step in range(8):
        assert not guard.step(lambda: loss_fn(model, *batch(step))).skipped
    clip_before, guard_before = clone_state(guard.clipper.state_dict()), clone_state(guard.state_dict())
    x, y = batch(8)
    if fault == "nonfinite_params":
        opt.param_groups[0]["lr"] = math.inf  # finite gradients (the clipper sees a finite norm), blown-up weights (1e38 times a clipped gradient can stay finite)
        report = guard.step(lambda: loss_fn(model, x, y) * 1e3)
        opt.param_groups[0]["lr"] = 0.01
    else:
        report = guard.step(lambda: loss_fn(model, x, y) * 1e4 + 1e4)
    assert report.skipped and report.reason == fault
    after = guard.state_dict()
    assert state_equal(guard.clipper.state_dict(), clip_before)  # ZClip EMA / AutoClip history / AdaGC EMAs
    assert state_equal(after["spikes"], guard_before["spikes"])
    # the oracle: a twin that never attempted the bad step clips the next step identically
    twin_model, twin_opt = make(opt="sgd", lr=0.01)
    twin = gg.Guard(twin_model, twin_opt, clipper=make_clipper(), verbose=False)
    for step in range(8):
        twin.step(lambda: loss_fn(twin_model, *batch(step)))
    r1 = guard.step(lambda: loss_fn(model, *batch(9)))
    r2 = twin.step(lambda: loss_fn(twin_model, *batch(9)))
    assert torch.equal(r1.stats.threshold, r2.stats.threshold) and torch.equal(r1.stats.coef, r2.stats.coef)
    assert state_equal(model.state_dict(), twin_model.state_dict())


# --------------------------------------------------------------------------------------------- resume (#10)
@pytest.mark.parametrize("order", ["model_first", "guard_first"])
def test_rollback_after_resume_restores_the_resumed_state_not_the_initial_weights(order):
    model, opt = make(opt="sgd")
    guard = gg.Guard(model, opt, clipper=gg.ZClip(warmup_steps=2), on_nonfinite="rollback", snapshot_every=3,
                     verbose=False)
    for step in range(4):
        guard.step(lambda: loss_fn(model, *batch(step)))
    ckpt = {"model": clone_state(model.state_dict()), "opt": clone_state(opt.state_dict()),
            "guard": clone_state(guard.state_dict())}

    resumed, ropt = make(seed=1, opt="sgd")  # a fresh process: different initial weights
    initial = clone_state(resumed.state_dict())
    rguard = gg.Guard(resumed, ropt, clipper=gg.ZClip(warmup_steps=2), on_nonfinite="rollback", snapshot_every=3,
                      verbose=False)
    if order == "guard_first":
        rguard.load_state_dict(ckpt["guard"])
    resumed.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["opt"])
    if order == "model_first":
        rguard.load_state_dict(ckpt["guard"])
    assert rguard.step_count == 4 and rguard.good_steps == 4
    resumed.fault = "log0"
    report = rguard.step(lambda: loss_fn(resumed, *batch(4)))
    assert report.skipped and report.rolled_back and report.step == 5
    assert state_equal(resumed.state_dict(), ckpt["model"]) and not state_equal(resumed.state_dict(), initial)
    assert state_equal(ropt.state_dict(), ckpt["opt"])


def test_guard_load_state_dict_refuses_mismatches_and_changes_nothing():
    model, opt = make()
    guard = gg.Guard(model, opt, clipper=gg.ZClip(warmup_steps=2), spike_z=6.0, spike_window=16, verbose=False)
    for step in range(3):
        guard.step(lambda: loss_fn(model, *batch(step)))
    good = clone_state(guard.state_dict())
    other_model, other_opt = make()
    target = gg.Guard(other_model, other_opt, clipper=gg.ZClip(warmup_steps=2), spike_z=6.0, spike_window=16,
                      verbose=False)
    target.step(lambda: loss_fn(other_model, *batch(0)))
    untouched = clone_state(target.state_dict())

    wrong_window = gg.Guard(model, opt, clipper=gg.ZClip(warmup_steps=2), spike_z=6.0, spike_window=32,
                            verbose=False).state_dict()
    wrong_window["spikes"] = {**good["spikes"], "window": 32,
                              "loss": {"values": torch.zeros(32), "count": torch.tensor(0)}}
    missing = {k: v for k, v in good.items() if k != "policy"}
    wrong_type = {**good, "policy": {**good["policy"], "steps": "3"}}
    no_spikes = {**good, "spikes": None}
    bad_clipper = {**good, "clipper": {"mean": torch.zeros(())}}
    cases = [
        (wrong_window, ValueError, "spike_window=32"),
        (missing, ValueError, r"missing \['policy'\]"),
        (wrong_type, TypeError, "steps"),
        (no_spikes, ValueError, "spikes"),
        (bad_clipper, ValueError, "ZClip"),
        ("state", TypeError, "mapping"),
    ]
    for state, exc, match in cases:
        with pytest.raises(exc, match=match):
            target.load_state_dict(state)
        assert state_equal(target.state_dict(), untouched)
    target.load_state_dict(good)
    assert state_equal(target.state_dict(), good)
    with pytest.raises(ValueError, match="spike_z=None"):
        gg.Guard(other_model, other_opt, verbose=False).load_state_dict(good)


# ------------------------------------------------------------------------------------- closure conventions (#10)
def test_torch_style_closure_that_calls_backward_itself_is_accepted_and_identical():
    m1, o1 = make()
    m2, o2 = make()
    g1 = gg.Guard(m1, o1, clipper=gg.NormClip(0.5), verbose=False)
    g2 = gg.Guard(m2, o2, clipper=gg.NormClip(0.5), verbose=False)
    for step in range(4):
        x, y = batch(step)
        r1 = g1.step(lambda: loss_fn(m1, x, y))  # returns the loss; the Guard runs backward
        r2 = g2.step(_torch_style(m2, o2, x, y))  # torch.optim convention: backward inside the closure
        assert not r2.skipped and torch.equal(r1.loss, r2.loss) and torch.equal(r1.norm, r2.norm)
    assert state_equal(m1.state_dict(), m2.state_dict()) and state_equal(o1.state_dict(), o2.state_dict())
    # a bad step with such a closure is skipped and located, without a second backward through a freed graph
    m2.fault = "log0"
    report = g2.step(_torch_style(m2, o2, *batch(5)))
    assert report.skipped and g2.diagnosis.module == "encoder.layers.1.attn"
    assert g2.diagnosis.op == "aten.log.default"


def test_torch_style_closure_under_a_grad_scaler_is_explained_and_changes_nothing():
    model, opt = make_bn()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = gg.Guard(model, opt, scaler=scaler, verbose=False)
    before, buffers = clone_state(model.state_dict()), buffers_of(model)
    with pytest.raises(RuntimeError, match="without calling backward"):
        guard.step(_torch_style(model, opt, *batch(0)))
    assert state_equal(model.state_dict(), before) and state_equal(buffers_of(model), buffers)
    assert all(p.grad is None for p in model.parameters()) and guard.step_count == 0
    assert not guard.step(lambda: loss_fn(model, *batch(0))).skipped  # the Guard is usable right after


# ---------------------------------------------------------------------------------- the Guard speaks up (#10)
def test_first_skip_per_reason_is_logged_then_summarised(caplog):
    model, opt = make(opt="sgd")
    guard = gg.Guard(model, opt, max_consecutive_skips=None, summary_every=5)
    with caplog.at_level("WARNING", logger="gradguard"):
        guard.step(lambda: loss_fn(model, *batch(0)))
        model.fault = "log0"
        guard.step(lambda: loss_fn(model, *batch(1)))  # step 2: first nonfinite_loss, reported in full
        guard.step(lambda: loss_fn(model, *batch(2)))  # step 3: same reason, only counted
        model.fault = None
        opt.param_groups[0]["lr"] = 1e38
        guard.step(lambda: loss_fn(model, *batch(3)) * 1e6)  # step 4: first nonfinite_params, in full
        opt.param_groups[0]["lr"] = 0.05
        guard.step(lambda: loss_fn(model, *batch(4)))  # step 5: good; the summary of steps 1-5 follows
    messages = [r.getMessage() for r in caplog.records if r.name == "gradguard"]
    assert len(messages) == 3
    assert "skipped step 2 (nonfinite_loss" in messages[0] and "aten.log.default" in messages[0]
    assert "skipped step 4 (nonfinite_params" in messages[1] and "learning rate" in messages[1]
    assert "3 of steps 1-5" in messages[2] and "2 nonfinite_loss" in messages[2] and "1 nonfinite_params" in messages[2]


def test_verbose_false_is_silent(caplog, recwarn):
    model, opt = make()
    guard = gg.Guard(model, opt, verbose=False, summary_every=1)
    model.fault = "log0"
    with caplog.at_level("DEBUG", logger="gradguard"):
        assert guard.step(lambda: loss_fn(model, *batch(0))).skipped
    assert not [r for r in caplog.records if r.name.startswith("gradguard")] and not recwarn.list


def test_steps_are_one_based_in_report_diagnosis_and_monitor():
    model, opt = make()
    steps = []

    class Recorder:
        def record(self, stats, **fields):
            steps.append(fields["step"])

    guard = gg.Guard(model, opt, monitor=Recorder(), verbose=False)
    reports = [guard.step(lambda: loss_fn(model, *batch(0)))]
    model.fault = "div0"
    reports.append(guard.step(lambda: loss_fn(model, *batch(1))))
    assert [r.step for r in reports] == steps == [1, 2] and guard.step_count == 2
    assert guard.diagnosis.step == 2 and "(step 2)" in str(guard.diagnosis)


# ------------------------------------------------------------------------------------ replay and RNG (#10)
def test_replay_uses_the_step_rng_and_leaves_the_stream_as_without_replay():
    def run(locate):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), locate=locate, verbose=False)
        x, y = batch(0)
        x[0, 0] = float("nan")
        report = guard.step(lambda: loss_fn(model, x, y))
        return report, guard.diagnosis, torch.rand(4)

    (r1, d1, after1), (r2, d2, after2) = run(True), run(False)
    assert r1.skipped and r2.skipped and d1.located and d1.stage == "input" and not d2.located
    assert torch.equal(after1, after2)  # the replay restored the RNG: later random numbers are unchanged


# ----------------------------------------------------------------------------------- construction errors (#12)
def test_optimizer_must_own_the_trainable_parameters_and_something_must_train():
    model, _ = make()
    partial = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not own .*encoder\.layers\.0\.attn\.proj\.weight"):
        gg.Guard(model, partial)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    gg.Guard(model, partial, verbose=False)  # frozen parameters need not be in the optimizer
    frozen = nn.Linear(4, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gg.Guard(frozen, torch.optim.SGD(frozen.parameters(), lr=0.1))


def test_policy_arguments_are_the_same_for_guard_attach_and_the_gate():
    model, opt = make()
    for build in (lambda **kw: gg.Guard(model, opt, verbose=False, **kw),
                  lambda **kw: gg.hooks.StepGate(gg.NormClip(1.0), **kw)):
        with pytest.raises(TypeError, match="max_consecutive_skips"):
            build(max_consecutive_skips="3")
        with pytest.raises(ValueError, match="max_consecutive_skips"):
            build(max_consecutive_skips=-1)
        with pytest.raises(ValueError, match="on_nonfinite"):
            build(on_nonfinite="ignore")
        with pytest.raises(TypeError, match="process_group"):
            build(process_group="world")
        assert build(max_consecutive_skips=None).max_consecutive_skips is None
    with pytest.raises(ValueError, match="gg.Guard"):
        gg.attach(opt, gg.NormClip(1.0), on_nonfinite="rollback")
    assert opt._optimizer_step_pre_hooks == {}


def test_a_loss_without_grad_is_explained_not_torchs_raw_error():
    model, opt = make_bn()
    guard = gg.Guard(model, opt, verbose=False)
    before, buffers = clone_state(model.state_dict()), buffers_of(model)

    def no_grad_closure():
        with torch.no_grad():
            return loss_fn(model, *batch(0))

    with pytest.raises(ValueError, match="does not require grad"):
        guard.step(no_grad_closure)
    assert state_equal(model.state_dict(), before) and state_equal(buffers_of(model), buffers)
    with pytest.raises(ValueError, match="does not require grad"):
        guard.backward(loss_fn(model, *batch(0)).detach())
    with pytest.raises(RuntimeError, match="backward"):  # nothing was queued by the failed backward()
        guard.step()
    assert all(p.grad is None for p in model.parameters()) and guard.step_count == 0
    assert not guard.step(lambda: loss_fn(model, *batch(0))).skipped


# --------------------------------------------------------------------------------- the skip policy, as a property
@settings(max_examples=200, deadline=None)
@given(
    outcomes=st.lists(st.one_of(st.none(), st.sampled_from(list(Reason))), max_size=60),
    limit=st.one_of(st.none(), st.integers(0, 5)),
    policy=st.sampled_from(["skip", "warn", "raise", "rollback"]),
)
def test_skip_policy_counters_errors_and_state_round_trip(outcomes, limit, policy):
    p = SkipPolicy(policy, limit, verbose=False)
    trailing = good = 0
    by_reason = dict.fromkeys((r.value for r in Reason), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, reason in enumerate(outcomes, start=1):
            assert p.start() == i  # steps are 1-based
            if reason is None:
                p.accept()
                trailing, good = 0, good + 1
                continue
            error = p.reject(reason, gg.Diagnosis("backward", step=i))
            trailing += 1
            by_reason[reason.value] += 1
            if policy == "raise" and not reason.is_spike:
                assert isinstance(error, gg.NonFiniteError)
            elif limit is not None and trailing > limit:
                assert isinstance(error, gg.TrainingDivergedError) and f"{trailing} bad steps in a row" in str(error)
            else:
                assert error is None
    state = p.state_dict()
    assert state == {"steps": len(outcomes), "good_steps": good, "skipped_steps": len(outcomes) - good,
                     "consecutive_skips": trailing, "skipped_by_reason": by_reason}
    q = SkipPolicy(policy, limit, verbose=False)
    q.load_state_dict(state)
    assert q.state_dict() == state


def test_warn_policy_points_at_the_callers_line():
    model, opt = make()
    guard = gg.Guard(model, opt, on_nonfinite="warn")
    model.fault = "log0"
    with pytest.warns(RuntimeWarning, match="skipped step 1 \\(nonfinite_loss\\)") as record:
        guard.step(lambda: loss_fn(model, *batch(0)))
    assert record[0].filename == __file__


def test_spike_detector_state_is_validated_whole_before_anything_changes():
    det = SpikeDetector(z=3.0, window=4, min_history=2)
    for x in (1.0, 2.0, 3.0):
        det(torch.tensor(x))
    before = det.state_dict()
    assert before["count"].item() == 3 and torch.isnan(before["values"]).sum() == 1
    bad_count = {**before, "count": torch.tensor(7)}  # 4 slots would be full after 7 accepted values
    bad_window = {"values": torch.zeros(8), "count": torch.tensor(8)}
    bad_dtype = {**before, "count": torch.tensor(3.0)}
    for state, err, text in ((bad_count, ValueError, "corrupt"), (bad_window, ValueError, "spike_window"),
                             (bad_dtype, TypeError, "dtype"), ({"values": before["values"]}, ValueError, "missing")):
        with pytest.raises(err, match=text):
            det.load_state_dict(state)
        after = det.state_dict()
        assert torch.equal(after["count"], before["count"])
        assert torch.equal(after["values"].nan_to_num(-1), before["values"].nan_to_num(-1))
    fresh = SpikeDetector(z=3.0, window=4, min_history=2)
    fresh.load_state_dict(before)
    assert bool(fresh(torch.tensor(100.0))) and not bool(det(torch.tensor(2.5)))
    assert bool(det(torch.tensor(100.0)))  # the loaded copy and the original agree


def test_an_exception_inside_a_scaled_step_does_not_leave_the_scaler_unscaled():
    """A clipper that raises after unscale_: the next step must unscale its own gradients (not take the scaled ones
    for unscaled because the scaler still says UNSCALED)."""

    class Flaky(gg.NormClip):
        calls = 0

        def clip(self, params):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("boom")
            return super().clip(params)

    torch.manual_seed(0)
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = gg.Guard(m, opt, clipper=Flaky(1e9), scaler=scaler, verbose=False, check_params_every=None)
    x = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="boom"):
        guard.step(lambda: m(x).sum())
    report = guard.step(lambda: m(x).sum())
    assert float(report.norm) == pytest.approx(4.0)  # d(sum)/dw = [2, 2, 2], d/db = 2: the unscaled norm, not 4096
    assert not report.skipped


def test_a_bad_snapshot_device_is_a_clear_error():
    model, opt = make()
    with pytest.raises(ValueError, match="snapshot_device must name a device"):
        gg.Guard(model, opt, clipper=gg.NormClip(1.0), snapshot_device="bogus")


def test_a_snapshot_survives_rollback_and_is_refreshed_in_place():
    """Two rollbacks to the same snapshot restore the same state (the optimizer must not adopt the snapshot's own
    tensors and then mutate them), and a refreshed snapshot reuses the previous one's memory."""
    from gradguard.backup import Snapshot

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)

    def train(n):
        for _ in range(n):
            opt.zero_grad()
            model(torch.randn(3, 4)).square().sum().backward()
            opt.step()

    train(2)
    snap = Snapshot(torch.device("cpu"))
    parts = {"model": model, "optimizer": opt}
    snap.take(parts)
    saved_model, saved_opt = clone_state(model.state_dict()), clone_state(opt.state_dict())
    ptrs = [t.data_ptr() for t in snap.states["optimizer"]["state"][0].values() if isinstance(t, torch.Tensor)]
    for _ in range(2):
        train(3)
        snap.restore(parts)
        assert state_equal(model.state_dict(), saved_model)
        assert state_equal(opt.state_dict()["state"], saved_opt["state"])
    train(1)
    snap.take(parts)  # refreshed in place: same tensors, new values
    assert [t.data_ptr() for t in snap.states["optimizer"]["state"][0].values() if isinstance(t, torch.Tensor)] == ptrs
    assert torch.equal(snap.states["model"]["weight"], model.weight.detach())
