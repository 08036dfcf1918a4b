"""gradguard.fused: the clip folded into a fused optimizer step (grad_scale / found_inf), and the masked fallback.

Oracles: clip-then-step-or-skip with the same torch optimizer (the clipper writes the gradients, the step runs only
when the norm is finite), torch.amp.GradScaler's own step, and a TorchDispatchMode that counts host reads.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard as gg
from gradguard.fused import fused_clip_step, supports_fused_step
from gradguard.norms import device_path
from gradguard.scaling import clip_coefficient

SHAPES = [(7, 5), (5,), (3, 4, 2), (1,)]

FUSED_CONFIGS = [
    ("Adam", {}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("Adam", {"maximize": True}),
    ("AdamW", {}),
    ("AdamW", {"amsgrad": True, "maximize": True, "weight_decay": 0.05}),
    ("SGD", {}),
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"momentum": 0.8, "dampening": 0.3, "maximize": True}),
    ("Adagrad", {"weight_decay": 0.1, "lr_decay": 0.01}),
]
FALLBACK_CONFIGS = [
    ("AdamW", {"foreach": True}),
    ("Adam", {"foreach": False, "amsgrad": True}),
    ("SGD", {"momentum": 0.9, "dampening": 0.2}),
    ("RMSprop", {"momentum": 0.5, "centered": True}),
    ("NAdam", {}),
    ("Rprop", {}),
    ("SGD", {"foreach": True}),  # no state at all: nothing to create, nothing read
    ("Adagrad", {"foreach": True}),  # state created in the constructor
]


def make(name, kwargs, fused=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    lr = 0.01 if name != "SGD" else 0.1
    extra = {"fused": True} if fused else {}
    return params, getattr(torch.optim, name)(params, lr=lr, **extra, **kwargs)


def grads_for(step, scale=1.0, bad=None):
    gen = torch.Generator().manual_seed(1000 + step)
    gs = [torch.randn(s, generator=gen) * scale for s in SHAPES]
    if bad is not None:
        gs[1][2] = bad
    return gs


def set_grads(params, gs):
    for p, g in zip(params, gs):
        p.grad = g.clone()


def pow2_max_norm(gs, factor):
    """A max_norm for which NormClip's coefficient (computed by the engine) is exactly ``factor``, a power of two."""
    total = gg.get_total_norm(gs)
    guess = torch.tensor(factor, dtype=torch.float32) * (total + 1e-6)
    for k in range(-8, 9):  # neighbours of the guess, in float32 ulps
        m = float(guess.view(torch.int32).add(k).view(torch.float32))
        if float(clip_coefficient(m, total)) == factor:
            return m
    raise AssertionError("no max_norm gives a power-of-two coefficient")


def reference_step(opt, params, clipper):
    """Clip-then-step-or-skip: the clipper writes the gradients; the step runs only when the norm is finite."""
    stats = clipper(params)
    if bool(stats.finite):
        opt.step()
    return stats


def assert_same(params_a, opt_a, params_b, opt_b):
    for a, b in zip(params_a, params_b):
        assert torch.equal(a.detach(), b.detach())
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad.nan_to_num(1e9), b.grad.nan_to_num(1e9))
    for a, b in zip(params_a, params_b):
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert set(sa) == set(sb)
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k


def ulp_distance(a, b):
    ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)  # monotone integer image of the floats
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max())


# schedule: (clip factor or None for no clipping, non-finite value to inject or None)
SCHEDULE = [(0.5, None), (None, None), (None, math.nan), (0.25, None), (0.125, math.inf), (None, None), (0.5, None)]


@pytest.mark.parametrize(("name", "kwargs"), FUSED_CONFIGS, ids=lambda v: str(v))
def test_fused_step_equals_clip_then_step_bit_for_bit(name, kwargs):
    """Several steps: power-of-two coefficients (the kernel's 1/c division is then exact), unclipped steps, and
    NaN/Inf steps that must leave parameters, state and the step counter exactly as they were."""
    ours_p, ours = make(name, kwargs)
    ref_p, ref = make(name, kwargs)
    assert supports_fused_step(ours)
    for step, (factor, bad) in enumerate(SCHEDULE):
        gs = grads_for(step, bad=bad)
        max_norm = 1e9 if factor is None or bad is not None else pow2_max_norm(gs, factor)
        set_grads(ours_p, gs)
        set_grads(ref_p, gs)
        before = [p.detach().clone() for p in ours_p]
        stats = fused_clip_step(ours, gg.NormClip(max_norm), ours_p)
        ref_stats = reference_step(ref, ref_p, gg.NormClip(max_norm))
        for f in ("norm", "threshold", "coef", "clipped"):
            assert torch.equal(getattr(stats, f), getattr(ref_stats, f)) or bad is not None
        assert bool(stats.clipped) == (factor is not None and bad is None)
        assert_same(ours_p, ours, ref_p, ref)
        if bad is not None:
            assert all(torch.equal(b, p.detach()) for b, p in zip(before, ours_p))
            assert not bool(stats.finite)
    if name in ("Adam", "AdamW", "Adagrad"):
        assert float(ours.state[ours_p[0]]["step"]) == len(SCHEDULE) - 2  # the two skipped steps did not count


@pytest.mark.parametrize(("name", "kwargs"), FUSED_CONFIGS[:5], ids=lambda v: str(v))
def test_a_skipped_first_step_of_fused_adam_continues_like_a_fresh_start(name, kwargs):
    """The fused kernel creates zero state and step 0 before skipping: the same as a fresh start, bit for bit."""
    ours_p, ours = make(name, kwargs)
    ref_p, ref = make(name, kwargs)
    set_grads(ours_p, grads_for(0, bad=math.nan))
    fused_clip_step(ours, 1.0, ours_p)
    assert float(ours.state[ours_p[0]]["step"]) == 0.0
    assert all(not bool(v.any()) for v in ours.state[ours_p[0]].values())
    for step in (1, 2):
        gs = grads_for(step)
        set_grads(ours_p, gs)
        set_grads(ref_p, gs)
        fused_clip_step(ours, pow2_max_norm(gs, 0.5), ours_p)
        reference_step(ref, ref_p, gg.NormClip(pow2_max_norm(gs, 0.5)))
        assert_same(ours_p, ours, ref_p, ref)


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_a_skipped_first_step_of_fused_sgd_leaves_no_momentum_buffer(dampening):
    """torch's fused SGD allocates momentum buffers with empty_like, so a kernel-skipped first step would leave them
    uninitialised; fused_clip_step reads the flag once on that step and leaves the state absent, as the reference."""
    ours_p, ours = make("SGD", {"momentum": 0.9, "dampening": dampening})
    ref_p, ref = make("SGD", {"momentum": 0.9, "dampening": dampening})
    set_grads(ours_p, grads_for(0, bad=math.inf))
    set_grads(ref_p, grads_for(0, bad=math.inf))
    fused_clip_step(ours, 1.0, ours_p)
    reference_step(ref, ref_p, gg.NormClip(1.0))
    assert not any(ours.state.get(p) for p in ours_p)
    for step in (1, 2, 3):
        gs = grads_for(step)
        set_grads(ours_p, gs)
        set_grads(ref_p, gs)
        fused_clip_step(ours, pow2_max_norm(gs, 0.25), ours_p)
        reference_step(ref, ref_p, gg.NormClip(pow2_max_norm(gs, 0.25)))
        assert_same(ours_p, ours, ref_p, ref)
    assert all(torch.isfinite(ours.state[p]["momentum_buffer"]).all() for p in ours_p)


@given(
    factor=st.floats(min_value=1e-3, max_value=0.999, allow_nan=False),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(["Adam", "AdamW", "SGD"]),
)
def test_any_coefficient_changes_only_the_clipped_gradient_by_at_most_one_ulp(factor, seed, name):
    """For a general coefficient the kernel sees fl(g / fl(1/c)) instead of fl(g * c): at most 1 ulp apart, and the
    step on that gradient is the optimizer's own arithmetic, bit for bit."""
    kwargs = {"momentum": 0.9} if name == "SGD" else {"weight_decay": 0.01}
    ours_p, ours = make(name, kwargs, seed=seed)
    ref_p, ref = make(name, kwargs, seed=seed)
    same_p, same = make(name, kwargs, seed=seed)
    gs = grads_for(seed, scale=3.0)
    max_norm = float(gg.get_total_norm(gs)) * factor
    set_grads(ours_p, gs)
    set_grads(ref_p, gs)
    fused_clip_step(ours, max_norm, ours_p)
    reference_step(ref, ref_p, gg.NormClip(max_norm))
    for a, b in zip(ours_p, ref_p):  # the kernel writes the gradient it used back to .grad
        assert ulp_distance(a.grad, b.grad) <= 1
    set_grads(same_p, [p.grad for p in ours_p])  # the same step on the kernel's gradient: bit-exact
    same.step()
    assert_same(ours_p, ours, same_p, same)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


_SYNC_METHODS = ("item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__", "__index__")


def _count_host_reads(monkeypatch):
    calls: list[str] = []
    for name in _SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def wrapper(self_, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self_, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize(
    "clipper",
    [lambda: gg.NormClip(2.0), lambda: gg.ZClip(warmup_steps=5), lambda: gg.AutoClip(window=16)],
    ids=["NormClip", "ZClip", "AutoClip"],
)
def test_one_hundred_fused_steps_read_nothing_on_the_host(clipper, monkeypatch):
    """Every host read counted (aten._local_scalar_dense and the Tensor methods that read values) over 100 fused
    AdamW steps from the very first, with clipped, unclipped and non-finite steps: none, on the path every
    accelerator takes (norms.device_path(); on CPU the engine's shortcuts — the overflow rescue decided on the host —
    read values, which costs no synchronisation there)."""
    params, opt = make("AdamW", {})
    clip = clipper()
    batches = [grads_for(s, scale=1.0 if s % 3 else 4.0, bad=math.nan if s % 17 == 5 else None) for s in range(100)]
    calls = _count_host_reads(monkeypatch)
    with _OpLog() as log, device_path():  # the accelerator path (on CPU the engine may read to skip work)
        for gs in batches:
            for p, g in zip(params, gs):
                p.grad = g
            fused_clip_step(opt, clip, params)
    monkeypatch.undo()
    assert "_local_scalar_dense" not in log.ops
    assert calls == []
    assert float(opt.state[params[0]]["step"]) == 100 - sum(1 for s in range(100) if s % 17 == 5)


def test_fused_steps_with_a_grad_scaler_read_nothing_on_the_host(monkeypatch):
    """unscale_, clip, step-or-skip and scaler.update(): 40 steps, overflow steps included, no host read."""
    params, opt, scaler = _scaled_setup(2.0**8)
    clip = gg.ZClip(warmup_steps=4)
    batches = [grads_for(s, bad=math.inf if s % 9 == 4 else None) for s in range(40)]
    calls = _count_host_reads(monkeypatch)
    with _OpLog() as log, device_path():  # the accelerator path (on CPU the engine may read to skip work)
        for gs in batches:
            scale = scaler.scale(torch.ones(()))  # the scaled loss: its value is the scale, on the device
            for p, g in zip(params, gs):
                p.grad = g * scale
            fused_clip_step(opt, clip, params, scaler=scaler)
            scaler.update()
    monkeypatch.undo()
    assert "_local_scalar_dense" not in log.ops
    assert calls == []
    assert float(opt.state[params[0]]["step"]) == 40 - 4
    expected, good = 2.0**8, 0  # backoff 0.5 on an overflow, growth 2 after 2 good steps in a row
    for s in range(40):
        if s % 9 == 4:
            expected, good = expected * 0.5, 0
        else:
            good += 1
            if good == 2:
                expected, good = expected * 2.0, 0
    assert scaler.get_scale() == expected


class _GradTouches(TorchDispatchMode):
    """Records every op that receives one of ``tensors`` (by storage), in order."""

    def __init__(self, tensors):
        super().__init__()
        self.ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.ptrs for t in flat):
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_a_folded_clip_reads_the_gradients_once_and_never_writes_them_before_the_kernel():
    """The clip costs one read pass: before the fused kernel, the gradients only go through the norm; clip-then-step
    writes them (an in-place multiply)."""
    params, opt = make("AdamW", {})
    set_grads(params, grads_for(0, scale=10.0))
    with _GradTouches([p.grad for p in params]) as log:
        stats = fused_clip_step(opt, gg.NormClip(1.0), params)
    assert bool(stats.clipped)
    assert log.ops[-1] == "_fused_adamw_" and log.ops.count("_fused_adamw_") == 1
    assert not [op for op in log.ops[:-1] if op.endswith("_") or op.startswith("copy")], log.ops
    params_r, opt_r = make("AdamW", {})
    set_grads(params_r, grads_for(0, scale=10.0))
    with _GradTouches([p.grad for p in params_r]) as log_r:
        reference_step(opt_r, params_r, gg.NormClip(1.0))
    assert [op for op in log_r.ops[:-1] if op in ("mul_", "_foreach_mul_")]


@pytest.mark.parametrize(
    "clipper",
    [lambda: gg.ZClip(warmup_steps=3), lambda: gg.AutoClip(percentile=50), lambda: gg.Chain(gg.AGC(0.05), gg.NormClip(2.))],
    ids=["ZClip", "AutoClip", "Chain"],
)
def test_stateful_clippers_fold_with_identical_stats_and_state(clipper):
    """Fixed gradients per step (norms independent of the parameters): stats and clipper state bit-identical to
    clip-then-step, parameters within the 1-ulp-gradient tolerance."""
    ours_p, ours = make("AdamW", {})
    ref_p, ref = make("AdamW", {})
    c_ours, c_ref = clipper(), clipper()
    for step in range(12):
        bad = math.inf if step == 6 else None
        gs = grads_for(step, scale=8.0 if step in (4, 9) else 1.0, bad=bad)
        set_grads(ours_p, gs)
        set_grads(ref_p, gs)
        s1 = fused_clip_step(ours, c_ours, ours_p)
        s2 = reference_step(ref, ref_p, c_ref)
        for f in ("norm", "threshold", "coef", "clipped"):
            assert torch.equal(getattr(s1, f), getattr(s2, f)), (step, f)
        sd1, sd2 = c_ours.state_dict(), c_ref.state_dict()
        assert repr(sd1) == repr(sd2)
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert float(ours.state[ours_p[0]]["step"]) == 11


def test_per_tensor_clippers_write_and_fold_only_the_finite_flag_bit_exactly():
    ours_p, ours = make("AdamW", {"weight_decay": 0.1})
    ref_p, ref = make("AdamW", {"weight_decay": 0.1})
    for step, bad in enumerate([None, math.nan, None, None]):
        gs = grads_for(step, scale=5.0, bad=bad)
        set_grads(ours_p, gs)
        set_grads(ref_p, gs)
        fused_clip_step(ours, gg.LayerwiseClip(1.0), ours_p)
        reference_step(ref, ref_p, gg.LayerwiseClip(1.0))
        assert_same(ours_p, ours, ref_p, ref)


def test_float64_gradients_are_written_not_folded_and_stay_bit_exact():
    """grad_scale is float32: for float64 gradients the clipper writes them (exact) and only found_inf rides."""
    gen = torch.Generator().manual_seed(3)
    ours_p = [torch.nn.Parameter(torch.randn(6, 3, dtype=torch.float64, generator=gen))]
    ref_p = [torch.nn.Parameter(ours_p[0].detach().clone())]
    ours = torch.optim.Adam(ours_p, lr=0.01, fused=True)
    ref = torch.optim.Adam(ref_p, lr=0.01, fused=True)
    for bad in [None, math.inf, None]:
        g = torch.randn(6, 3, dtype=torch.float64, generator=gen) * 7
        if bad is not None:
            g[0, 0] = bad
        ours_p[0].grad, ref_p[0].grad = g.clone(), g.clone()
        fused_clip_step(ours, 0.3, ours_p)
        reference_step(ref, ref_p, gg.NormClip(0.3))
        assert_same(ours_p, ours, ref_p, ref)


@pytest.mark.parametrize(("name", "kwargs"), FALLBACK_CONFIGS, ids=lambda v: str(v))
def test_fallback_masked_step_equals_clip_then_step_or_skip_bit_for_bit(name, kwargs):
    """Non-fused optimizers: the clipper writes, the step is masked by where(finite, new, old). Any coefficient is
    exact here (the same multiplication as the reference), including a non-finite first step (state left absent)."""
    ours_p, ours = make(name, kwargs, fused=False)
    ref_p, ref = make(name, kwargs, fused=False)
    assert not supports_fused_step(ours)
    for step, bad in enumerate([math.nan, None, None, math.inf, None, math.nan, None]):
        gs = grads_for(step, scale=4.0, bad=bad)
        set_grads(ours_p, gs)
        set_grads(ref_p, gs)
        before = [p.detach().clone() for p in ours_p]
        fused_clip_step(ours, gg.NormClip(1.5), ours_p)
        reference_step(ref, ref_p, gg.NormClip(1.5))
        assert_same(ours_p, ours, ref_p, ref)
        if bad is not None:
            assert all(torch.equal(b, p.detach()) for b, p in zip(before, ours_p))
    assert not torch.equal(ours_p[0].detach(), make(name, kwargs, fused=False)[0][0].detach())  # it did step


def _scaled_setup(scale):
    params, opt = make("AdamW", {"weight_decay": 0.01})
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=2)
    return params, opt, scaler


def test_composes_with_a_grad_scaler_like_unscale_clip_scaler_step():
    """GradScaler: the gradients hold S*g. Oracle: unscale_, clip, scaler.step, update. Overflow steps are skipped,
    the scale backs off and grows identically; power-of-two coefficients make the comparison bit-exact."""
    ours_p, ours, ours_s = _scaled_setup(2.0**12)
    ref_p, ref, ref_s = _scaled_setup(2.0**12)
    for step, (factor, bad) in enumerate([(0.5, None), (None, math.inf), (None, None), (0.25, None), (None, None),
                                          (0.5, math.nan), (None, None), (0.125, None)]):
        gs = grads_for(step, bad=bad)
        max_norm = 1e9 if factor is None or bad is not None else pow2_max_norm(gs, factor)
        ours_s.scale(torch.ones(())), ref_s.scale(torch.ones(()))  # the loss would be scaled for backward
        scale = ours_s.get_scale()
        assert scale == ref_s.get_scale()
        set_grads(ours_p, [g * scale for g in gs])
        set_grads(ref_p, [g * scale for g in gs])
        stats = fused_clip_step(ours, gg.NormClip(max_norm), ours_p, scaler=ours_s)
        ours_s.update()
        ref_s.unscale_(ref)
        ref_stats = gg.NormClip(max_norm)(ref_p)
        ref_s.step(ref)
        ref_s.update()
        assert torch.equal(stats.norm, ref_stats.norm) or bad is not None
        assert_same(ours_p, ours, ref_p, ref)
    assert ours_s.get_scale() == ref_s.get_scale()
    assert float(ours.state[ours_p[0]]["step"]) == 6


def test_an_already_unscaled_optimizer_is_not_unscaled_twice():
    params, opt, scaler = _scaled_setup(2.0**4)
    gs = grads_for(0)
    scaler.scale(torch.ones(()))
    set_grads(params, [g * 16 for g in gs])
    scaler.unscale_(opt)
    stats = fused_clip_step(opt, 1e9, params, scaler=scaler)
    assert torch.equal(stats.norm, gg.get_total_norm(gs))
    scaler.update()


@pytest.mark.parametrize("form", ["module", "parameters()", "named_parameters()"])
def test_parameters_may_be_a_module_or_a_generator(form):
    """A generator is consumed once by the checks; the clipper must still see every parameter, and the factor is
    still folded (nothing writes the gradients before the kernel)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=0.1, fused=True)
    x = torch.randn(16, 5)
    for m in (model, ref):
        m(x).pow(2).sum().mul(50).backward()
    arg = {"module": model, "parameters()": model.parameters(), "named_parameters()": model.named_parameters()}
    with _GradTouches([p.grad for p in model.parameters()]) as log:
        stats = fused_clip_step(opt, gg.NormClip(0.5), arg[form])
    ref_stats = reference_step(opt_r, list(ref.parameters()), gg.NormClip(0.5))
    assert torch.equal(stats.norm, ref_stats.norm) and bool(stats.clipped)
    assert not [op for op in log.ops[:-1] if op.endswith("_")] and log.ops[-1] == "_fused_adamw_"
    for a, b in zip(model.parameters(), ref.parameters()):
        assert ulp_distance(a.grad, b.grad) <= 1
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)


def test_fallback_with_a_grad_scaler_skips_overflows_exactly():
    ours_p, ours = make("RMSprop", {"momentum": 0.5}, fused=False)
    ref_p, ref = make("RMSprop", {"momentum": 0.5}, fused=False)
    ours_s = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=3)
    ref_s = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=3)
    for step, bad in enumerate([None, None, math.inf, None, None, None, math.nan, None]):
        gs = grads_for(step, scale=3.0, bad=bad)
        scale = float(ours_s.scale(torch.ones(())))
        assert scale == float(ref_s.scale(torch.ones(())))
        set_grads(ours_p, [g * scale for g in gs])
        set_grads(ref_p, [g * scale for g in gs])
        fused_clip_step(ours, gg.NormClip(1.0), ours_p, scaler=ours_s)
        ours_s.update()
        ref_s.unscale_(ref)
        gg.NormClip(1.0)(ref_p)
        ref_s.step(ref)
        ref_s.update()
        assert_same(ours_p, ours, ref_p, ref)
    assert ours_s.get_scale() == ref_s.get_scale()


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], [p.grad.clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_untouched(params, opt, snap):
    ps, gs, sd = snap
    assert all(torch.equal(a, p.detach()) for a, p in zip(ps, params))
    assert all(torch.equal(a, p.grad) for a, p in zip(gs, params))
    assert repr(opt.state_dict()) == repr(sd)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda o, p: fused_clip_step("adam", 1.0, p), TypeError, "torch.optim.Optimizer"),
        (lambda o, p: fused_clip_step(o, "1.0", p), TypeError, "gg.NormClip"),
        (lambda o, p: fused_clip_step(o, True, p), TypeError, "max_norm"),
        (lambda o, p: fused_clip_step(o, -1.0, p), ValueError, "max_norm"),
        (lambda o, p: fused_clip_step(o, math.nan, p), ValueError, "max_norm"),
        (lambda o, p: fused_clip_step(o, 1.0, p, scaler=object()), TypeError, "GradScaler"),
        (lambda o, p: fused_clip_step(o, 1.0, [3]), TypeError, "parameters"),
    ],
)
def test_bad_arguments_raise_before_anything_is_touched(call, error, match):
    params, opt = make("AdamW", {})
    set_grads(params, grads_for(0, scale=10.0))
    fused_clip_step(opt, 1.0, params)
    set_grads(params, grads_for(1, scale=10.0))
    snap = _snapshot(params, opt)
    with pytest.raises(error, match=match):
        call(opt, params)
    _assert_untouched(params, opt, snap)


def test_a_sparse_gradient_or_a_preset_grad_scale_is_refused_with_the_fix():
    params, opt = make("Adam", {})
    set_grads(params, grads_for(0))
    opt.grad_scale = torch.tensor(2.0)
    snap = _snapshot(params, opt)
    with pytest.raises(ValueError, match="scaler="):
        fused_clip_step(opt, 1.0, params)
    _assert_untouched(params, opt, snap)
    del opt.grad_scale
    params[0].grad = params[0].grad.to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        fused_clip_step(opt, 1.0, params)
    lbfgs = torch.optim.LBFGS(params[1:])
    with pytest.raises(TypeError, match="closure"):
        fused_clip_step(lbfgs, 1.0)


def test_a_scaler_is_not_unscaled_when_the_call_is_refused():
    params, opt, scaler = _scaled_setup(2.0**8)
    gs = grads_for(0)
    scaler.scale(torch.ones(()))
    set_grads(params, [g * 256 for g in gs])
    params[0].grad = params[0].grad.to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        fused_clip_step(opt, 1.0, params, scaler=scaler)
    assert all(torch.equal(p.grad, g * 256) for p, g in zip(params[1:], gs[1:]))  # still scaled
    params[0].grad = gs[0] * 256
    fused_clip_step(opt, 1e9, params, scaler=scaler)  # unscale_ was not recorded: this call may still do it
    scaler.update()
    assert float(opt.state[params[0]]["step"]) == 1.0


DOC_BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parents[1] / "docs" / "fused.md").read_text(),
                        flags=re.S)


@pytest.mark.parametrize("code", DOC_BLOCKS, ids=[f"fused.md-{i}" for i in range(len(DOC_BLOCKS))])
def test_doc_example_runs_and_prints_what_it_says(code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/fused.md", "exec"), {"__name__": "__doc_example__"})
    expected = [m.strip() for m in re.findall(r"print\(.*\)\s+#\s*(.+)", code)]
    assert expected and out.getvalue().split("\n")[: len(expected)] == expected


def test_deferred_scale_records_one_global_factor_and_writes_per_tensor_ones():
    """The hook in scaling.scale_: inside deferred_scale a 0-d factor is recorded (no write), a per-tensor factor is
    written as usual; outside (also after an exception) scale_ writes again."""
    from gradguard.scaling import deferred_scale, scale_

    a, b = torch.tensor([3.0, 4.0]), torch.tensor([1.0])
    with deferred_scale() as pending:
        scale_([a, b], torch.tensor(0.5))
        scale_([a, b], torch.tensor([0.5, 2.0]))
    assert len(pending) == 1 and pending[0][0] == [a, b] and float(pending[0][1]) == 0.5
    assert a.tolist() == [1.5, 2.0] and b.tolist() == [2.0]
    with pytest.raises(RuntimeError), deferred_scale():
        raise RuntimeError("boom")
    scale_([a], torch.tensor(2.0))
    assert a.tolist() == [3.0, 4.0]
