"""``Guard(host_sync=False)``: the whole step decided and skipped on the device. Proven on CPU (which takes the
accelerator's path) by counting every host read over 100 steps: 0. Bad steps change nothing, exactly as in the default
mode, and the counters, the log and the monitor agree once the decisions are settled."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.runlog import load_run
from hostreads import HostReads


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32, bias=False)  # a bias before BatchNorm has a zero gradient: Adam would amplify
        self.bn = nn.BatchNorm1d(32)  # its rounding noise to +-lr and the two modes' runs could not be compared
        self.fc2 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def batches(n: int, bad: dict[int, str]) -> list[tuple[torch.Tensor, torch.Tensor, str | None]]:
    """``n`` batches; ``bad`` maps a 1-based step to its fault: "loss" (a NaN input), "grad" (an inf in the backward
    only), "spike" (a loss far above its range, finite)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(1, n + 1):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
        fault = bad.get(i)
        if fault == "loss":
            x[3, 2] = math.nan
        out.append((x, y, fault))
    return out


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fault: str | None) -> torch.Tensor:
    loss = nn.functional.mse_loss(model(x), y)
    if fault == "grad":  # finite loss, infinite gradient: the backward of sqrt at 0
        loss = loss + torch.sqrt(model.fc2.bias.sum() * 0)
    if fault == "spike":
        loss = loss * 1e4
    return loss


def make(fused: bool, host_sync: bool, **kw):
    """fused: a fused AdamW (skips in its kernel); else SGD with momentum (the masked update). torch's non-fused Adam
    is not used for the count: it reads its own CPU ``step`` counters on the host (``step.item()``), which on an
    accelerator are CPU tensors (no device synchronisation) but which a CPU-only count cannot tell apart."""
    torch.manual_seed(0)
    model = Net()
    if fused:
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-2, foreach=True)
    guard = gg.Guard(model, opt, clipper=gg.ZClip(), spike_z=6.0, spike_window=32, host_sync=host_sync,
                     settle_every=1000, verbose=False, **kw)
    return model, opt, guard


def train(guard: gg.Guard, model: nn.Module, data) -> list:
    return [guard.step(lambda x=x, y=y, f=f: loss_of(model, x, y, f)) for x, y, f in data]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "masked-sgd"])
def test_zero_host_reads_over_100_steps_and_the_same_outcome_as_the_default(fused):
    bad = {40: "loss", 60: "grad", 80: "spike"}
    data = batches(101, bad)
    model, _opt, guard = make(fused, host_sync=False)
    train(guard, model, data[:1])  # the first step creates AdamW's state (a masked step reads its flag once then)
    with HostReads() as reads:
        reports = train(guard, model, data[1:])
    assert reads.count() == 0, reads.report()
    # the default mode (one host read per step) on the same data is the oracle
    model_sync, _opt_sync, guard_sync = make(fused, host_sync=True)
    sync_reports = train(guard_sync, model_sync, data)
    with HostReads() as reads:
        guard.settle()
    assert 1 <= reads.count() <= 2  # the policy's pending flags and the reports': one read each
    assert [r.reason for r in reports] == [r.reason for r in sync_reports[1:]]
    assert [r.step for r in reports if r.skipped] == [40, 60, 80]
    assert (guard.skipped_steps, guard.good_steps, guard.step_count) == (3, 98, 101)
    assert guard.policy.skipped_by_reason == guard_sync.policy.skipped_by_reason
    for (name, a), b in zip(model.state_dict().items(), model_sync.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=name)  # norms: host vs device kernels
    assert guard.clipper.state_dict()["count"] == guard_sync.clipper.state_dict()["count"]


def test_a_skipped_step_changes_nothing_on_the_device():
    data = batches(6, {5: "grad"})
    model, opt, guard = make(True, host_sync=False)
    train(guard, model, data[:4])
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
              copy.deepcopy(guard.clipper.state_dict()), copy.deepcopy(guard._norm_spikes.state_dict()))
    (report,) = train(guard, model, data[4:5])
    assert not bool(report.applied)
    after = (model.state_dict(), opt.state_dict(), guard.clipper.state_dict(), guard._norm_spikes.state_dict())
    for x, y in zip(before, after):
        for k in x:
            if isinstance(x[k], torch.Tensor):
                # BatchNorm statistics, weights, clipper and detector statistics (empty window slots are NaN)
                torch.testing.assert_close(y[k], x[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert before[1]["state"].keys() == after[1]["state"].keys()
    for i in before[1]["state"]:
        for k, v in before[1]["state"][i].items():
            assert torch.equal(v, after[1]["state"][i][k]), (i, k)  # moments and step counts
    assert report.skipped and report.reason == "nonfinite_grad"


def test_preflight_blow_up_is_skipped_on_the_device():
    model, opt, guard = make(True, host_sync=False)
    x, y, _ = batches(1, {})[0]
    train(guard, model, [(x, y, None)])
    with torch.no_grad():
        model.fc1.weight[0, 0] = 3e38
    x[:, 0] = 0  # so the huge weight leaves the forward pass finite
    opt.param_groups[0]["lr"] = 1e38  # AdamW's weight decay pushes it past float32's max
    before = copy.deepcopy(model.state_dict())
    with HostReads() as reads:
        report = guard.step(lambda: loss_of(model, x, y, None))
    assert reads.count() == 0
    assert report.reason == "nonfinite_params"
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))


def test_monitor_gets_every_step_when_settled_and_divergence_raises_at_the_settle(tmp_path):
    data = batches(12, {3: "loss", 7: "grad"})
    with gg.Monitor(tmp_path / "run", per_layer_every=None) as monitor:
        model, _opt, guard = make(True, host_sync=False, monitor=monitor)
        train(guard, model, data)
        guard.settle()
    run = load_run(tmp_path / "run")
    assert [s["step"] for s in run.steps] == list(range(1, 13))
    assert [s["step"] for s in run.steps if s["skipped"]] == [3, 7]
    assert [(e["step"], e["reason"]) for e in run.events] == [(3, "nonfinite_loss"), (7, "nonfinite_grad")]
    assert guard.diagnosis is not None and guard.diagnosis.stage == "backward"

    model, _opt, guard = make(True, host_sync=False, max_consecutive_skips=2)
    train(guard, model, batches(6, {2: "loss", 3: "loss", 4: "grad"}))  # no read, no error yet
    with pytest.raises(gg.TrainingDivergedError, match="3 bad steps in a row"):
        guard.settle()


def test_settle_every_reads_once_per_interval():
    data = batches(30, {})
    model, _opt, guard = make(True, host_sync=False)
    guard.settle_every = 10
    train(guard, model, data[:1])
    with HostReads() as reads:
        train(guard, model, data[1:])  # steps 2..30: settles at 10, 20, 30
    assert reads.count() == 3


def test_what_cannot_be_decided_on_the_device_is_refused():
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    for kw, match in [({"on_nonfinite": "raise"}, "raise"), ({"on_nonfinite": "rollback", "snapshot_every": 5},
                                                              "rollback"),
                      ({"snapshot_every": 5}, "snapshot_every=None"), ({"settle_every": 0}, "settle_every"),
                      ({"host_sync": "no"}, "host_sync must be")]:
        with pytest.raises((ValueError, TypeError), match=match):
            gg.Guard(model, opt, host_sync=kw.pop("host_sync", False), **kw)

    class Custom(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            return super().step(closure)

    custom = Custom(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="check_params_every=None"):
        gg.Guard(model, custom, host_sync=False)
    gg.Guard(model, custom, host_sync=False, check_params_every=None)  # the gradients are still checked


def test_the_default_mode_reads_once_per_step():
    """What host_sync=False saves: the default decides with one host read per step (on the accelerator path, which
    ``norms.device_path()`` makes the CPU take), weight check included."""
    from gradguard.norms import device_path

    data = batches(21, {10: "grad"})
    model, _opt, guard = make(True, host_sync=True)
    train(guard, model, data[:1])
    with device_path(), HostReads() as reads:
        reports = train(guard, model, [d for d in data[1:] if d[2] is None])
    assert reads.count() == len(reports) == 19


@pytest.mark.parametrize("clipper", ["adagc", "chain", "autoclip"])
def test_statistics_of_a_rejected_first_step_stay_unseen(clipper):
    """A rejected step leaves every clipper's statistics as the default mode does, also when the step was the first
    (nothing seen yet: AdaGC's per-parameter gamma must stay 'unseen', not become 0 and clip to 0 forever)."""
    def build(host_sync: bool):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        clip = {"adagc": lambda: gg.AdaGC(warmup_steps=2), "chain": lambda: gg.Chain(gg.AGC(0.05), gg.ZClip()),
                "autoclip": lambda: gg.AutoClip(10.0)}[clipper]()
        return model, gg.Guard(model, opt, clipper=clip, host_sync=host_sync, verbose=False)

    data = batches(8, {1: "loss", 4: "grad"})
    (m1, g1), (m2, g2) = build(False), build(True)
    train(g1, m1, data)
    train(g2, m2, data)
    g1.settle()
    s1, s2 = g1.clipper.state_dict(), g2.clipper.state_dict()

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, prefix + k + ".")
            else:
                yield prefix + k, v

    f1, f2 = dict(flat(s1)), dict(flat(s2))
    assert f1.keys() == f2.keys()
    for k, v in f1.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, f2[k], rtol=2e-6, atol=1e-7, equal_nan=True, msg=k)
        else:
            assert v == f2[k], k
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=name)


def test_step_report_is_read_only_and_compares_by_value():
    model, _opt, guard = make(True, host_sync=False)
    (report,) = train(guard, model, batches(1, {}))
    with pytest.raises(AttributeError, match="read-only"):
        report.step = 5  # type: ignore[misc]
    twin = gg.StepReport(report.step, report.loss, report.stats, report.skipped, report.reason, report.lr)
    assert twin == report and "deferred" not in repr(report)
    match report:
        case gg.StepReport(1, _, _, False, None):
            pass
        case _:
            raise AssertionError(repr(report))


def test_a_clipper_with_its_own_state_dict_cannot_be_kept_on_the_device():
    class Counting(gg.NormClip):
        def __init__(self) -> None:
            super().__init__(1.0)
            self.seen = 0

        def state_dict(self):  # state outside the declared device tensors: where() cannot put it back
            return {"seen": self.seen}

    model = Net()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    with pytest.raises(ValueError, match="DeviceState"):
        gg.Guard(model, opt, clipper=Counting(), host_sync=False)
    with pytest.raises(ValueError, match="DeviceState"):
        gg.Guard(model, opt, clipper=gg.Chain(gg.AGC(), Counting()), host_sync=False)
    with pytest.raises(AttributeError):
        gg.Guard(model, opt, host_sync=False).host_sync = True  # fixed at construction


def test_a_buffer_the_forward_pass_replaces_is_put_back_on_a_rejected_step():
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 1)
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen = self.seen + x.shape[0]  # a new tensor each forward pass, not an in-place update
            return self.lin(x)

    torch.manual_seed(0)
    model = Counter()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    guard = gg.Guard(model, opt, host_sync=False, verbose=False)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    guard.step(lambda: nn.functional.mse_loss(model(x), y))
    report = guard.step(lambda: nn.functional.mse_loss(model(x), y) * math.nan)
    guard.step(lambda: nn.functional.mse_loss(model(x), y))
    assert report.skipped and float(model.seen) == 32.0  # the rejected step's 16 samples are not counted
