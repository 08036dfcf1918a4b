"""The preflight: dry-running an optimizer step on copies, chunk by chunk, answers exactly whether the real step would
make a weight non-finite, touches nothing real, and holds at most one chunk of copies (<= 1% of the parameter bytes,
or 1 MiB)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.preflight import FRACTION, MIN_CHUNK_BYTES, Preflight, preflight_kind

# (name, factory(params, lr), (lr, gradient) with which one step overflows a weight of 3.3e38, or None: Adadelta's
# update is bounded by its own ratio of running averages, no learning rate overflows a weight in one step)
ELEMENTWISE: list[tuple[str, Callable[..., torch.optim.Optimizer], tuple[float, float] | None]] = [
    ("sgd", lambda ps, lr, **kw: torch.optim.SGD(ps, lr=lr, **kw), (1.0, -3e38)),
    ("sgd-momentum-nesterov-wd", lambda ps, lr, **kw: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True,
                                                                      weight_decay=1e-2, **kw), (1.0, -3e38)),
    ("adam", lambda ps, lr, **kw: torch.optim.Adam(ps, lr=lr, **kw), (1e10, -3e38)),
    ("adamw-amsgrad", lambda ps, lr, **kw: torch.optim.AdamW(ps, lr=lr, amsgrad=True, **kw), (1e10, -1.0)),
    ("adamax", lambda ps, lr, **kw: torch.optim.Adamax(ps, lr=lr, **kw), (1e10, -3e38)),
    ("nadam", lambda ps, lr, **kw: torch.optim.NAdam(ps, lr=lr, **kw), (1e10, -3e38)),
    ("radam", lambda ps, lr, **kw: torch.optim.RAdam(ps, lr=lr, **kw), (1.0, -3e38)),
    ("adagrad", lambda ps, lr, **kw: torch.optim.Adagrad(ps, lr=lr, **kw), (1e10, -3e38)),
    ("rmsprop-centered", lambda ps, lr, **kw: torch.optim.RMSprop(ps, lr=lr, centered=True, momentum=0.5, **kw),
     (3e37, -1.0)),
    ("asgd", lambda ps, lr, **kw: torch.optim.ASGD(ps, lr=lr, **kw), (1.0, -3e38)),
    ("adadelta", lambda ps, lr, **kw: torch.optim.Adadelta(ps, lr=lr, **kw), None),
]
IMPLS = ["single", "foreach"]
SMALL = 1 << 16  # a 64 KiB chunk floor instead of 1 MiB, so small tensors are sliced too


def make_params(seed: int = 0) -> list[nn.Parameter]:
    """Two tensors larger than a chunk of SMALL (so they are sliced) and two small ones, one without a gradient."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(70_000,), (30, 1000), (5, 7), (3,)]
    ps = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in ps[:3]:
        p.grad = torch.randn(p.shape, generator=g)
    return ps  # ps[3] has no gradient: not stepped


def snapshot(ps: list[nn.Parameter], opt: torch.optim.Optimizer) -> Any:
    return ([p.detach().clone() for p in ps], [None if p.grad is None else p.grad.clone() for p in ps],
            copy.deepcopy(opt.state_dict()))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def real_step(ps: list[nn.Parameter], opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The oracle: the real step on deep copies of parameters and optimizer, copied together so
    the copy's groups and state refer to the copied parameters; returns the stepped parameters."""
    twin_ps, twin = copy.deepcopy((ps, opt))
    for t, p in zip(twin_ps, ps):
        t.grad = None if p.grad is None else p.grad.clone()
    twin.step()
    return [t.detach() for t in twin_ps]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "factory", "blow"), ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_dry_run_equals_the_real_step_and_touches_nothing(name, factory, blow, impl):
    ps = make_params()
    opt = factory(ps, 1e-2, foreach=impl == "foreach")
    opt.step()  # the optimizer has state now (moments, step counts)
    for p in ps[:3]:
        p.grad = torch.randn_like(p)
    before = snapshot(ps, opt)
    expected = real_step(ps, opt)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    pf = Preflight(min_bytes=SMALL)
    plan = pf.plan(opt, ps)
    assert len(plan) > 2 and any(piece.start not in (None, 0) for chunk in plan for piece in chunk)  # really sliced
    seen = 0
    for stepped, pieces in pf.dry_run(opt, ps):
        for q, piece in zip(stepped, pieces):
            i = next(i for i, p in enumerate(ps) if p is piece.param)
            want = expected[i] if piece.start is None else expected[i].reshape(-1)[piece.start:piece.stop]
            assert torch.equal(q, want), (name, i, piece.start)  # the same update, bit for bit
            seen += q.numel()
    assert seen == sum(p.numel() for p in ps[:3])  # every stepped element once; ps[3] (no grad) not at all
    assert bool(pf(opt, ps))
    assert same(snapshot(ps, opt), before) and calls == []  # nothing real changed, no hook ran


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "factory", "blow"), ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_one_element_that_would_overflow_is_found_in_any_chunk(name, factory, blow, impl):
    if blow is None:
        pytest.skip("no learning rate overflows this optimizer's update in one step")
    lr, grad = blow
    ps = make_params()
    opt = factory(ps, lr, foreach=impl == "foreach")
    pf = Preflight(min_bytes=SMALL)
    for where in (0, 35_000, 69_999):  # first, a middle and the last chunk of the sliced tensor
        with torch.no_grad():
            ps[0].fill_(0.5)
            ps[0][where] = 3.3e38
            ps[0].grad.fill_(1e-3)
            ps[0].grad[where] = grad
        before = snapshot(ps, opt)
        outcome = real_step(ps, opt)
        blows = not all(bool(torch.isfinite(t).all()) for t in outcome)
        assert blows, f"{name}: the scenario must overflow the real step"  # else the test proves nothing
        assert not bool(pf(opt, ps))
        assert [p is ps[0] for p in pf.nonfinite(opt, ps)] == [True]
        assert same(snapshot(ps, opt), before)


@pytest.mark.parametrize("fused", [False, True])
def test_fused_and_per_tensor_optimizers(fused):
    ps = make_params()
    if fused:
        opt: torch.optim.Optimizer = torch.optim.AdamW(ps, lr=1e-3, fused=True)
    else:
        opt = torch.optim.Adafactor(ps[:3], lr=1e-2)
    opt.step()
    expected = real_step(ps if fused else ps[:3], opt)
    pf = Preflight(min_bytes=SMALL)
    if not fused:  # Adafactor mixes a matrix's rows and columns: whole tensors, never slices
        assert preflight_kind(opt) == "per_tensor"
        assert all(piece.start is None for chunk in pf.plan(opt, ps[:3]) for piece in chunk)
    for stepped, pieces in pf.dry_run(opt, ps if fused else ps[:3]):
        for q, piece in zip(stepped, pieces):
            i = next(i for i, p in enumerate(ps) if p is piece.param)
            want = expected[i] if piece.start is None else expected[i].reshape(-1)[piece.start:piece.stop]
            assert torch.equal(q, want)


def test_every_chunk_fits_its_share_of_the_parameter_bytes():
    big = [nn.Parameter(torch.zeros(11_000_000)), nn.Parameter(torch.zeros(2000, 1500)), nn.Parameter(torch.zeros(9))]
    for p in big:
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(big, lr=1e-3)
    opt.step()  # state: exp_avg, exp_avg_sq (parameter-shaped), step (scalar)
    assert Preflight().chunk_bytes(opt) == max(int(FRACTION * sum(p.numel() * 4 for p in big)), MIN_CHUNK_BYTES)
    assert FRACTION <= 0.01
    pf = Preflight(fraction=0.02)  # a chunk size above the 1 MiB floor for these 56 MB of parameters
    param_bytes = sum(p.numel() * 4 for p in big)
    assert pf.chunk_bytes(opt) == int(0.02 * param_bytes) > MIN_CHUNK_BYTES
    per_element = 4 * 4 + 5 * 4  # parameter, gradient, two moments; the update's intermediates
    chunks = pf.plan(opt, big)
    for chunk in chunks:
        elements = sum((p.stop - p.start) if p.start is not None else p.param.numel() for p in chunk)
        assert elements * per_element <= pf.chunk_bytes(opt) <= 0.02 * param_bytes
    assert sum(sum((p.stop - p.start) if p.start is not None else p.param.numel() for p in c) for c in chunks) == \
        sum(p.numel() for p in big)
    assert bool(pf(opt, big))  # the copies live in one workspace, reused by every chunk and every step
    held = sum(b.numel() * b.element_size() for b in pf._workspace.values())
    assert 0 < held <= pf.chunk_bytes(opt)
    pf(opt, big)
    assert sum(b.numel() * b.element_size() for b in pf._workspace.values()) == held


def test_unknown_optimizers_cannot_be_dry_run_and_the_guard_falls_back_to_a_backup():
    class Custom(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            return super().step(closure)

    model = nn.Linear(3, 1)
    opt = Custom(model.parameters(), lr=0.1)
    assert preflight_kind(opt) is None
    with pytest.raises(TypeError, match="param_check='backup'"):
        Preflight().plan(opt, list(model.parameters()))
    assert gg.Guard(model, opt, verbose=False).param_check == "backup"
    with pytest.raises(ValueError, match='param_check="backup"'):
        gg.Guard(model, opt, param_check="preflight")
    with pytest.raises(ValueError, match="param_check must be"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), param_check="copy")
    sub = torch.optim.AdamW(model.parameters())  # torch's own classes, and subclasses that keep their step
    assert gg.Guard(model, sub, verbose=False).param_check == "preflight"


@pytest.mark.parametrize("param_check", ["preflight", "backup"])
@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_guard_blocks_a_blow_up_in_either_mode_and_names_the_weight(param_check, policy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt, param_check=param_check, on_nonfinite=policy,
                     snapshot_every=1 if policy == "rollback" else None, verbose=False)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    x[:, 5] = 0  # the weights reading feature 5 never change the loss: a huge one leaves the forward pass finite
    for _ in range(3):
        assert not guard.step(lambda: nn.functional.mse_loss(model(x), y)).skipped
    snapshot_model, snapshot_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with torch.no_grad():
        model[0].weight[3, 5] = 3e38  # weight decay at this learning rate pushes it past float32's max
    opt.param_groups[0]["lr"] = 1e38
    before_model = copy.deepcopy(model.state_dict())
    before_opt = copy.deepcopy(opt.state_dict())
    report = guard.step(lambda: nn.functional.mse_loss(model(x), y))
    assert report.skipped and report.reason == "nonfinite_params"
    assert guard.diagnosis.parameters == ("0.weight",)
    if policy == "rollback":  # back to the snapshot of the last good step (before the weight and lr were changed)
        before_model, before_opt = snapshot_model, snapshot_opt
    assert same(model.state_dict(), before_model) and same(opt.state_dict(), before_opt)
    assert all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters())


def test_step_hooks_make_auto_take_the_backup_and_explicit_preflight_refuse():
    """A pre-hook can change what the real step does (here the learning rate): a dry-run of the class's update alone
    would miss it, so "auto" checks such steps with the backup, and an explicit preflight refuses them."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    x, y = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0]])
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3e37, 1.0]]))  # feature 0 is 0: the huge weight leaves the loss finite
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, weight_decay=1.0)
    opt.register_step_pre_hook(lambda o, a, k: o.param_groups[0].__setitem__("lr", 1e38))
    guard = gg.Guard(model, opt, verbose=False)
    before = copy.deepcopy(model.state_dict())
    report = guard.step(lambda: nn.functional.mse_loss(model(x), y))
    assert report.skipped and report.reason == "nonfinite_params"  # the hook's lr would have blown the weight up
    assert same(model.state_dict(), before)
    strict = gg.Guard(model, opt, param_check="preflight", verbose=False)
    with pytest.raises(ValueError, match="step hooks"):
        strict.step(lambda: nn.functional.mse_loss(model(x), y))
    assert same(model.state_dict(), before) and strict.step_count == 0


def test_no_hook_sees_the_dry_run():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    ps = make_params()
    opt = torch.optim.AdamW(ps[:3], lr=1e-3)
    calls = []
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(o))
    try:
        assert bool(Preflight(min_bytes=SMALL)(opt, ps))
    finally:
        handle.remove()
    assert calls == []


def test_dtensor_shards_are_dry_run_locally(tmp_path):
    """FSDP2 / tensor-parallel parameters are DTensors: an elementwise update is shard-local, so the dry-run steps
    the local shards (one rank here: the whole tensor is the shard) and equals the real step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        g = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(distribute_tensor(torch.randn(300, 100, generator=g), mesh, [Shard(0)])) for _ in range(2)]
        for p in ps:
            p.grad = distribute_tensor(torch.randn(300, 100, generator=g), mesh, [Shard(0)])
        opt = torch.optim.AdamW(ps, lr=1e-2)
        opt.step()
        expected = [t.to_local() for t in real_step(ps, opt)]
        pf = Preflight(min_bytes=SMALL)
        assert any(piece.start not in (None, 0) for chunk in pf.plan(opt, ps) for piece in chunk)
        for stepped, pieces in pf.dry_run(opt, ps):
            for q, piece in zip(stepped, pieces):
                assert not isinstance(q, DTensor)
                i = next(i for i, p in enumerate(ps) if p is piece.param)
                assert torch.equal(q, expected[i].reshape(-1)[piece.start:piece.stop] if piece.start is not None
                                   else expected[i])
        assert bool(pf(opt, ps))
    finally:
        dist.destroy_process_group()


def test_huge_but_finite_weights_are_not_mistaken_for_a_blow_up():
    """A weight of 1e30 is finite: its square overflows float32, but the check is on the values, not a 2-norm."""
    w = nn.Parameter(torch.full((100_000,), 1e30))
    w.grad = torch.ones_like(w)
    opt = torch.optim.SGD([w], lr=0.1)
    assert bool(Preflight()(opt, [w]))
    from gradguard.norms import device_path

    with device_path():
        assert bool(Preflight()(opt, [w]))


@pytest.mark.parametrize(("kwargs", "match"), [({"fraction": 0}, "fraction"), ({"fraction": 1.5}, "fraction"),
                                               ({"fraction": True}, "fraction"), ({"min_bytes": 0}, "min_bytes"),
                                               ({"min_bytes": 2.5}, "min_bytes")])
def test_bad_chunk_sizes_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preflight(**kwargs)
