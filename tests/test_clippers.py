"""Clipping strategies: hand-computed vectors, peers as oracles where they are right, and their defects not ours."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradguard as gg


def _set_grad(param: torch.Tensor, norm: float, direction: torch.Tensor) -> None:
    param.grad = (direction / direction.norm() * norm).to(param.dtype).reshape(param.shape)


def _norm_sequence(n=80, seed=0, spikes=(30, 31, 50, 65)):
    rng = np.random.default_rng(seed)
    seq = list(np.exp(rng.normal(0.0, 0.15, n)))
    for s in spikes:
        seq[s] *= 40.0
    return seq


# ------------------------------------------------------------------------------------------------ NormClip, ValueClip
def test_normclip_and_valueclip_match_the_functional_core():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 3), nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m(torch.randn(4, 6)).pow(2).sum().mul(30).backward() if m is a else None
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()
    stats = gg.NormClip(0.5)(a)
    total = gg.clip_grad_norm_(b.parameters(), 0.5)
    assert torch.equal(stats.norm, total)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    assert bool(stats.clipped) and stats.threshold.item() == 0.5 and stats.coef.item() < 1

    w = torch.zeros(4, requires_grad=True)
    w.grad = torch.tensor([3.0, -0.2, -8.0, 0.1])
    stats = gg.ValueClip(0.5)([w])
    assert w.grad.tolist() == pytest.approx([0.5, -0.2, -0.5, 0.1])
    assert stats.norm.item() == pytest.approx(math.hypot(3.0, 0.2, 8.0, 0.1))
    assert stats.coef.item() == pytest.approx(0.5 / 8.0) and bool(stats.clipped)
    v0 = w.grad._version
    assert not bool(gg.ValueClip(1.0)([w]).clipped)
    assert w.grad._version == v0  # CPU: nothing exceeded, nothing written


def test_clipper_accepts_module_params_and_named_pairs_and_skips_missing_grads():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model(torch.ones(2, 3)).sum().backward()
    model[1].bias.grad = None
    clipper = gg.LayerwiseClip(1e-3)
    for src in (model, model.parameters(), model.named_parameters(), dict(model.named_parameters())):
        stats = clipper(src)
        assert len(stats.tensor_norms) == 3
    assert gg.LayerwiseClip(1.0)(model).names == ("0.weight", "0.bias", "1.weight")
    empty = gg.NormClip(1.0)(nn.Linear(2, 2))
    assert empty.norm.item() == 0 and not bool(empty.clipped) and math.isinf(empty.threshold.item())


# --------------------------------------------------------------------------------------------------- LayerwiseClip
@pytest.mark.parametrize("groups", ["parameter", "module", lambda name: "all"])
def test_layerwise_clip_by_group(groups):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    model(torch.randn(8, 5)).pow(2).sum().mul(10).backward()
    before = {n: p.grad.clone().double() for n, p in model.named_parameters()}
    if groups == "parameter":
        members = {n: [n] for n in before}
    elif groups == "module":
        members = {n: [m for m in before if m.split(".")[0] == n.split(".")[0]] for n in before}
    else:
        members = {n: list(before) for n in before}
    stats = gg.LayerwiseClip(0.7, groups=groups)(model)
    for n, p in model.named_parameters():
        gnorm = math.sqrt(sum(before[m].pow(2).sum().item() for m in members[n]))
        coef = min(1.0, 0.7 / (gnorm + 1e-6))
        torch.testing.assert_close(p.grad.double(), before[n] * coef, rtol=1e-5, atol=1e-7)
    assert stats.tensor_coefs.min().item() == pytest.approx(stats.coef.item())


# ------------------------------------------------------------------------------------------------------------- AGC
def _agc_reference(w: torch.Tensor, g: torch.Tensor, unit_dims, clipping=0.01, eps=1e-3) -> torch.Tensor:
    """Float64 reference by explicit units: unit_dims are the dims reduced (None: whole tensor)."""
    w, g = w.double(), g.double()
    wn = torch.linalg.vector_norm(w, dim=unit_dims, keepdim=unit_dims is not None)
    gn = torch.linalg.vector_norm(g, dim=unit_dims, keepdim=unit_dims is not None)
    limit = clipping * wn.clamp(min=eps)
    return torch.where(gn > limit, g * limit / gn.clamp(min=1e-6), g)


def _fill_grads(model, scale=5.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale


def test_agc_linear_conv_bias_and_excluded_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.Linear(5, 2))
    _fill_grads(model, scale=0.05)
    with torch.no_grad():
        model[2].bias.zero_()  # zero weights: eps floors the limit
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = gg.AGC(clipping=0.02, eps=1e-3, exclude=["3.*"])(model)
    expected = {
        "0.weight": _agc_reference(model[0].weight, before["0.weight"], (1, 2, 3), 0.02),
        "0.bias": _agc_reference(model[0].bias, before["0.bias"], None, 0.02),
        "2.weight": _agc_reference(model[2].weight, before["2.weight"], (1,), 0.02),
        "2.bias": _agc_reference(model[2].bias, before["2.bias"], None, 0.02),
        "3.weight": before["3.weight"].double(),
        "3.bias": before["3.bias"].double(),
    }
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[n], rtol=1e-5, atol=1e-8, msg=n)
    assert bool(stats.clipped)
    total = math.sqrt(sum(g.double().pow(2).sum().item() for g in before.values()))
    assert stats.norm.item() == pytest.approx(total, rel=1e-5)
    assert stats.names == tuple(n for n, _ in model.named_parameters())
    assert stats.tensor_coefs[-1].item() == 1.0 and stats.tensor_coefs[-2].item() == 1.0


@pytest.mark.parametrize("groups", [1, 2])
def test_agc_conv_transpose_uses_output_units(groups):
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 3, groups=groups)  # weight [in=4, out/groups, 3, 3]
    _fill_grads(layer, scale=0.05)
    w, g = layer.weight.detach(), layer.weight.grad.clone()
    gg.AGC(clipping=0.05)(layer)
    # reference: gather each output channel's weights explicitly, across its group's input channels
    in_g, out_g = 4 // groups, 6 // groups
    expected = g.double().clone()
    for grp in range(groups):
        rows = slice(grp * in_g, (grp + 1) * in_g)
        for j in range(out_g):
            wu, gu = w[rows, j].double(), g[rows, j].double()
            limit = 0.05 * max(wu.norm().item(), 1e-3)
            if gu.norm().item() > limit:
                expected[rows, j] = gu * limit / max(gu.norm().item(), 1e-6)
    torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=1e-5, atol=1e-8)


def test_agc_never_scales_small_gradients_up():
    model = nn.Sequential(nn.Linear(16, 16), nn.Conv1d(2, 4, 3))
    _fill_grads(model, scale=1e-9)
    before = [p.grad.clone() for p in model.parameters()]
    stats = gg.AGC(clipping=0.01)(model)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p.grad)
    assert not bool(stats.clipped) and stats.coef.item() == 1.0


def test_agc_exclude_forms():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    for exclude in ("1.weight", ["1.weight", "1.bias"], "1.*", lambda n: n.startswith("1.")):
        _fill_grads(model, scale=10.0)
        head = model[1].weight.grad.clone()
        gg.AGC(exclude=exclude)(model)
        assert torch.equal(model[1].weight.grad, head)
        assert not torch.equal(model[0].weight.grad, head[:0])


# --------------------------------------------------------------------------------------------------------- AutoClip
def test_autoclip_hand_computed_thresholds():
    w = torch.zeros(2, requires_grad=True)
    clipper = gg.AutoClip(percentile=10)
    got = []
    for n in [1, 2, 3, 4, 100, 5]:
        _set_grad(w, n, torch.tensor([1.0, 1.0]))
        got.append(clipper([w]).threshold.item())
    assert got == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.4, 1.5], rel=1e-6)


@pytest.mark.parametrize("window", [None, 5])
def test_autoclip_matches_numpy_percentile_of_the_history(window):
    seq = _norm_sequence(n=150)
    w = torch.zeros(3, requires_grad=True)
    clipper = gg.AutoClip(percentile=25.0, window=window)
    history = []
    for n in seq:
        _set_grad(w, n, torch.tensor([1.0, 2.0, 2.0]))
        stats = clipper([w])
        history.append(n)
        hist = history if window is None else history[-window:]
        expected = np.percentile(np.array(hist, dtype=np.float64), 25.0)
        assert stats.threshold.item() == pytest.approx(expected, rel=1e-5)
        assert w.grad.norm().item() <= expected * (1 + 1e-5)


def test_autoclip_no_nan_early_and_no_poisoning():
    w = torch.zeros(2, requires_grad=True)
    clipper, clean = gg.AutoClip(), gg.AutoClip()
    for step, n in enumerate([1.0, 2.0, float("nan"), 3.0, float("inf"), 4.0]):
        w.grad = torch.tensor([n, 0.0])
        stats = clipper([w])
        if math.isfinite(n):
            w.grad = torch.tensor([n, 0.0])
            ref = clean([w])
            assert torch.equal(stats.threshold, ref.threshold), step
            assert torch.isfinite(w.grad).all()
        else:
            assert w.grad[0].isnan() or w.grad[0].isinf()  # left as it was, not spread
    assert clipper.state_dict().keys() == clean.state_dict().keys() == {"history", "count", "sketch"}
    for key, a in clipper.state_dict().items():  # the two non-finite steps left no trace
        assert torch.equal(a.nan_to_num(-1), clean.state_dict()[key].nan_to_num(-1)), key


@pytest.mark.parametrize(("percentile", "seed"), [(10.0, 0), (50.0, 1), (90.0, 2), (0.0, 3), (100.0, 4)])
def test_autoclip_full_history_beyond_the_exact_phase_is_within_one_percent(percentile, seed):
    # norms over six orders of magnitude; exact for the first 16, then the sketch of all of them: within 1% (relative)
    # of numpy's percentile of the whole history, every step
    rng = np.random.default_rng(seed)
    seq = np.exp(rng.normal(0.0, 3.0, 300))
    w = torch.zeros(2, requires_grad=True)
    clipper = gg.AutoClip(percentile=percentile, exact_steps=16)
    for t, n in enumerate(seq):
        w.grad = torch.tensor([float(n), 0.0], dtype=torch.float32)
        got = clipper([w]).threshold.item()
        expected = np.percentile(np.asarray(seq[: t + 1], dtype=np.float32).astype(np.float64), percentile)
        if t < 16:
            assert got == pytest.approx(expected, rel=1e-6), t
        else:
            assert abs(got - expected) <= 0.01 * expected * (1 + 1e-6), t
    assert clipper.state_dict()["history"].numel() == 16


@given(st.floats(min_value=2.0**-60, max_value=2.0**60, allow_nan=False, allow_infinity=False))
def test_autoclip_sketch_bucket_stands_for_its_values_within_one_percent(x):
    # the DDSketch guarantee the full-history threshold rests on: a bucket's representative is within 1% of every
    # value that lands in it (so is the interpolation between two representatives)
    from gradguard.clippers.autoclip import sketch_bucket

    counts = torch.zeros(5000, dtype=torch.long)
    counts.index_add_(0, sketch_bucket(torch.tensor(x, dtype=torch.float64)), torch.tensor([1]))
    clipper = gg.AutoClip(percentile=50.0, exact_steps=1)
    w = torch.zeros(1, requires_grad=True)
    w.grad = torch.tensor([1.0])
    clipper([w])
    state = clipper.state_dict()
    state["sketch"] = counts[: state["sketch"].numel()] + state["sketch"]  # 1.0 and x: two norms, the sketch phase
    state["count"] = torch.tensor(2)
    clipper.load_state_dict(state)
    w.grad = torch.tensor([math.nan])  # a non-finite step: only reads the threshold
    got = clipper([w]).threshold.item()
    expected = (1.0 + x) / 2  # the median of {1, x}
    assert abs(got - expected) <= 0.01 * expected * (1 + 1e-6)  # + float32 rounding of the threshold


def _long_run_state(clipper: gg.AutoClip, low: float, high: float, n: int) -> dict:
    """A state as after ``n`` finite norms, half ``low`` and half ``high`` (built through the clipper's own steps)."""
    w = torch.zeros(1, requires_grad=True)
    probe = gg.AutoClip(exact_steps=clipper.exact_steps)
    for v in (low, high):
        w.grad = torch.tensor([v])
        probe([w])
    state = probe.state_dict()
    sketch = state["sketch"] * (n // 2)
    history = torch.full_like(state["history"], math.nan)
    history[: clipper.exact_steps // 2] = low
    history[clipper.exact_steps // 2 :] = high
    return {"history": history, "count": torch.tensor(n), "sketch": sketch}


def test_autoclip_default_survives_a_long_run_in_bounded_memory():
    # issue 12: the unbounded default crashed at step 16,777,217 (quantile() input too large) and slowed with length.
    # A state that says 2**24 norms were seen (half 0.5, half 2.0): the next steps take the full-history percentile
    # from the sketch, with the same state size as on step one.
    n = 2**24
    clipper = gg.AutoClip(percentile=50.0)
    clipper.load_state_dict(_long_run_state(clipper, 0.5, 2.0, n))
    size = sum(t.numel() * t.element_size() for t in clipper.state_dict().values())
    w = torch.zeros(2, requires_grad=True)
    for _ in range(3):
        w.grad = torch.tensor([100.0, 0.0])
        stats = clipper([w])
        # the median of 2**23 + k norms >= 2.0 and 2**23 norms of 0.5: the upper value, 2.0 (within 1%)
        assert abs(stats.threshold.item() - 2.0) <= 0.02 * (1 + 1e-6)
        assert abs(w.grad.norm().item() - stats.threshold.item()) <= 1e-5 * 2
    state = clipper.state_dict()
    assert int(state["count"]) == n + 3 and int(state["sketch"].sum()) == n + 3
    assert sum(t.numel() * t.element_size() for t in state.values()) == size < 64 * 1024
    p10 = gg.AutoClip(percentile=10.0)
    p10.load_state_dict(_long_run_state(p10, 0.5, 2.0, n))
    w.grad = torch.tensor([100.0, 0.0])
    assert abs(p10([w]).threshold.item() - 0.5) <= 0.005 * (1 + 1e-6)


def test_autoclip_state_of_another_window_is_refused_by_name():
    # issue 12: loading an AutoClip(window=8) state into AutoClip() raised IndexError later
    w = torch.zeros(1, requires_grad=True)
    windowed = gg.AutoClip(window=8)
    for n in (1.0, 2.0, 3.0):
        w.grad = torch.tensor([n])
        windowed([w])
    default = gg.AutoClip()
    with pytest.raises(ValueError, match=r"missing \['sketch'\].*construct AutoClip with the window"):
        default.load_state_dict(windowed.state_dict())
    with pytest.raises(ValueError, match=r"state_dict\['history'\] must have shape \(4,\).*window=4"):
        gg.AutoClip(window=4).load_state_dict(windowed.state_dict())
    assert default.state_dict() == {}


def test_autoclip_state_cross_checks():
    w = torch.zeros(1, requires_grad=True)
    clipper = gg.AutoClip(exact_steps=8)
    for n in (3.0, 1.0, 2.0):
        w.grad = torch.tensor([n])
        clipper([w])
    good = clipper.state_dict()
    assert good["history"][:3].tolist() == [1.0, 2.0, 3.0]  # kept sorted
    unsorted = dict(good, history=good["history"].clone())
    unsorted["history"][:3] = torch.tensor([3.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="sorted"):
        clipper.load_state_dict(unsorted)
    extra = good["sketch"].clone()
    extra[0] += 1
    with pytest.raises(ValueError, match=r"'sketch'\] counts 4 norms but 'count' is 3"):
        clipper.load_state_dict(dict(good, sketch=extra))
    with pytest.raises(ValueError, match=r"min\(count, 8\) = 2 norms"):
        clipper.load_state_dict(dict(good, count=torch.tensor(2)))
    assert all(torch.equal(v.nan_to_num(-1), good[k].nan_to_num(-1)) for k, v in clipper.state_dict().items())


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")
def test_autoclip_package_defect_is_not_ours():
    # autoclip 0.2.1's StandardClip returns NaN gradients on its second step (std of one sample).
    autoclip = pytest.importorskip("autoclip.torch")
    w = torch.zeros(2, requires_grad=True)
    theirs = autoclip.StandardClip([w])
    for n in (1.0, 2.0):
        w.grad = torch.tensor([n, 0.0])
        theirs.step()
    assert torch.isnan(w.grad).any()
    clipper = gg.AutoClip()
    for n in (1.0, 2.0):
        w.grad = torch.tensor([n, 0.0])
        clipper([w])
        assert torch.isfinite(w.grad).all()


# ------------------------------------------------------------------------------------------------------------ ZClip
ZCLIP_CONFIGS = [
    {"mode": "zscore", "clip_option": "adaptive_scaling"},
    {"mode": "zscore", "clip_option": "adaptive_scaling", "clip_factor": 0.7},
    {"mode": "zscore", "clip_option": "mean"},
    {"mode": "percentile"},
    {"mode": "zscore", "clip_option": "adaptive_scaling", "skip_update_on_spike": True},
    {"mode": "percentile", "skip_update_on_spike": True, "max_grad_norm": 2.0},
    {"mode": "zscore", "clip_option": "mean", "max_grad_norm": 1.05, "alpha": 0.9, "z_thresh": 2.0},
]


@pytest.mark.parametrize("config", ZCLIP_CONFIGS)
def test_zclip_matches_the_zclip_package(config):
    zclip = pytest.importorskip("zclip")
    kwargs = {"warmup_steps": 10, **config}
    kwargs.setdefault("max_grad_norm", None)
    theirs = zclip.ZClip(**kwargs)
    ours = gg.ZClip(**kwargs)
    a, b = nn.Linear(4, 1, bias=False), nn.Linear(4, 1, bias=False)
    direction = torch.tensor([1.0, -2.0, 0.5, 3.0])
    clipped_steps = 0
    for step, n in enumerate(_norm_sequence()):
        _set_grad(a.weight, n, direction)
        _set_grad(b.weight, n, direction)
        theirs.step(a)
        stats = ours(b)
        assert b.weight.grad.norm().item() == pytest.approx(a.weight.grad.norm().item(), rel=2e-5), step
        clipped_steps += bool(stats.clipped)
    assert theirs.mean == pytest.approx(ours.state_dict()["mean"].item(), rel=1e-5)
    assert theirs.var == pytest.approx(ours.state_dict()["var"].item(), rel=1e-4)
    assert clipped_steps >= 3


def test_zclip_nonfinite_norm_leaves_state_as_if_the_step_had_not_happened():
    seq = _norm_sequence(n=80)
    bad_steps = {5: float("nan"), 40: float("inf")}  # one during warm-up, one after
    w = torch.zeros(2, requires_grad=True)
    clean, faulty = gg.ZClip(warmup_steps=10), gg.ZClip(warmup_steps=10)
    for step, n in enumerate(seq):
        if step in bad_steps:
            w.grad = torch.tensor([bad_steps[step], 1.0])
            before = {k: v.clone() for k, v in faulty.state_dict().items()}
            stats = faulty([w])
            after = faulty.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
            assert not bool(stats.finite) and w.grad[1].item() == 1.0  # untouched
        _set_grad(w, n, torch.tensor([1.0, 1.0]))
        t_clean = clean([w]).threshold
        _set_grad(w, n, torch.tensor([1.0, 1.0]))
        t_faulty = faulty([w]).threshold
        assert torch.equal(t_clean, t_faulty), step
    for k, v in clean.state_dict().items():
        assert torch.equal(v, faulty.state_dict()[k])


def test_zclip_package_is_poisoned_by_one_nan_and_ours_is_not():
    zclip = pytest.importorskip("zclip")
    theirs = zclip.ZClip(warmup_steps=5, max_grad_norm=None)
    ours = gg.ZClip(warmup_steps=5)
    layer = nn.Linear(2, 1, bias=False)
    for n in [1.0, 1.1, 0.9, 1.0, 1.05, 1.0, float("nan"), 1.0, 1.02]:
        layer.weight.grad = torch.tensor([[n, 0.0]])
        theirs.step(layer)
        layer.weight.grad = torch.tensor([[n, 0.0]])
        ours(layer)
    assert math.isnan(theirs.mean)
    assert math.isfinite(ours.state_dict()["mean"].item())


def test_zclip_default_has_no_fixed_cap_unlike_the_package():
    w = torch.zeros(1, requires_grad=True)
    clipper = gg.ZClip(warmup_steps=3)
    for _ in range(5):
        w.grad = torch.tensor([10.0])
        clipper([w])
        assert w.grad.item() == 10.0  # the package (max_grad_norm=1.0 by default) would cut this to 1.0


# ------------------------------------------------------------------------------------------------------------ AdaGC
def _adagc_reference(seq, beta, lam_abs, lam_rel, warmup):
    """Pure-Python AdaGC over a sequence of per-tensor norm lists; returns per-step lists of coefficients."""
    gamma = None
    step = 0
    out = []
    for norms in seq:
        total = math.sqrt(sum(x * x for x in norms))
        if not math.isfinite(total):
            out.append(None)
            continue
        if gamma is None:
            gamma = [math.inf] * len(norms)
        if step < warmup:
            h = [min(1.0, lam_abs / (total + 1e-6))] * len(norms)
            gamma = [min(g, hh * x) for g, hh, x in zip(gamma, h, norms)]
        else:
            h = [min(1.0, lam_rel * g / (x + 1e-6)) for g, x in zip(gamma, norms)]
            gamma = [hh * x if math.isinf(g) else beta * g + (1 - beta) * hh * x for g, hh, x in zip(gamma, h, norms)]
        step += 1
        out.append(h)
    return out


def test_adagc_matches_a_hand_reference():
    rng = np.random.default_rng(3)
    seq = [[float(np.exp(rng.normal(0, 0.2))) * s for s in (0.5, 2.0)] for _ in range(40)]
    seq[12] = [8.0, 2.0]
    seq[20] = [float("nan"), 1.0]
    seq[25] = [0.5, 30.0]
    ref = _adagc_reference(seq, 0.9, 1.5, 1.05, warmup=8)
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    clipper = gg.AdaGC(beta=0.9, lambda_abs=1.5, lambda_rel=1.05, warmup_steps=8)
    for step, (na, nb) in enumerate(seq):
        a.grad = torch.tensor([na, 0.0, 0.0]) if math.isfinite(na) else torch.tensor([na, 1.0, 0.0])
        b.grad = torch.tensor([0.0, nb])
        stats = clipper([("a", a), ("b", b)])
        if ref[step] is None:
            assert not bool(stats.finite)
            continue
        assert stats.tensor_coefs.tolist() == pytest.approx(ref[step], rel=1e-5), step
        assert a.grad.norm().item() == pytest.approx(ref[step][0] * na, rel=1e-5)
    assert any(h[1] < 1 for h in ref[8:] if h) and any(h[0] < 1 for h in ref[:8] if h)


def test_adagc_new_parameter_after_warmup_starts_from_its_own_norm():
    clipper = gg.AdaGC(warmup_steps=1)
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    a.grad = torch.tensor([1.0])
    clipper([("a", a)])
    a.grad, b.grad = torch.tensor([1.0]), torch.tensor([7.0])
    stats = clipper([("a", a), ("b", b)])
    assert stats.tensor_coefs[1].item() == 1.0  # first sight: unclipped
    b.grad = torch.tensor([70.0])
    a.grad = torch.tensor([1.0])
    stats = clipper([("a", a), ("b", b)])
    assert b.grad.item() == pytest.approx(1.05 * 7.0, rel=1e-5)  # now clipped relative to its EMA


# --------------------------------------------------------------------------------------------------------------- Chain
def test_chain_reports_first_norm_and_product_of_coefs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    _fill_grads(model, scale=3.0)
    total_before = gg.get_total_norm([p.grad for p in model.parameters()])
    chain = gg.Chain(gg.AGC(0.5), gg.NormClip(0.1))
    stats = chain(model)
    torch.testing.assert_close(stats.norm, total_before, rtol=1e-6, atol=0)
    after = gg.get_total_norm([p.grad for p in model.parameters()])
    assert after.item() <= 0.1 * (1 + 1e-5)
    assert stats.threshold.item() == pytest.approx(0.1)
    assert bool(stats.clipped) and stats.coef.item() < 1


# ---------------------------------------------------------------------------------------------- checkpoint / resume
# Resume, state round-trip, no host read and bad state dicts, for every clipper: tests/test_clipper_contract.py.


# ------------------------------------------------------------------------------------------------------- bad input
BAD = [
    (lambda: gg.AutoClip(percentile=101), ValueError, r"percentile must be in \[0, 100\]"),
    (lambda: gg.AutoClip(percentile=-1), ValueError, "percentile"),
    (lambda: gg.AutoClip(percentile=float("nan")), ValueError, "percentile"),
    (lambda: gg.AutoClip(window=0), ValueError, "window"),
    (lambda: gg.AutoClip(exact_steps=0), ValueError, "exact_steps"),
    (lambda: gg.ZClip(alpha=1.0), ValueError, r"alpha must be in \(0, 1\)"),
    (lambda: gg.ZClip(alpha=0.0), ValueError, "alpha"),
    (lambda: gg.ZClip(z_thresh=0), ValueError, "z_thresh"),
    (lambda: gg.ZClip(warmup_steps=-1), ValueError, "warmup_steps"),
    (lambda: gg.ZClip(mode="median"), ValueError, "mode must be"),
    (lambda: gg.ZClip(clip_option="max"), ValueError, "clip_option"),
    (lambda: gg.ZClip(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (lambda: gg.ZClip(eps=float("nan")), ValueError, "eps"),
    (lambda: gg.AGC(clipping=-0.01), ValueError, "clipping must be non-negative"),
    (lambda: gg.AGC(clipping=float("nan")), ValueError, "clipping"),
    (lambda: gg.AGC(exclude=[3]), TypeError, "exclude"),
    (lambda: gg.AdaGC(beta=1.5), ValueError, "beta"),
    (lambda: gg.AdaGC(lambda_rel=0), ValueError, "lambda_rel"),
    (lambda: gg.AdaGC(warmup_steps=-3), ValueError, "warmup_steps"),
    (lambda: gg.NormClip(-1.0), ValueError, "max_norm"),
    (lambda: gg.NormClip(1.0, norm_type=0), ValueError, "norm_type"),
    (lambda: gg.ValueClip(float("nan")), ValueError, "clip_value"),
    (lambda: gg.LayerwiseClip(1.0, groups="layer"), ValueError, "groups must be"),
    (lambda: gg.Chain(), ValueError, "at least one"),
    (lambda: gg.Chain(gg.NormClip(1.0), "x"), TypeError, "Chain argument 1"),
]


@pytest.mark.parametrize(("make", "exc", "match"), BAD)
def test_bad_arguments_raise_at_construction(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_state_dict_leaves_state_untouched():
    w = torch.zeros(1, requires_grad=True)
    chain = gg.Chain(gg.ZClip(warmup_steps=3), gg.AutoClip(window=4))
    for n in (1.0, 2.0, 3.0, 4.0):
        w.grad = torch.tensor([n])
        chain([w])
    before = chain.state_dict()
    bad = {"0": before["0"], "1": {"history": torch.zeros(9), "count": torch.tensor(0)}}
    with pytest.raises(ValueError, match="window=4"):
        chain.load_state_dict(bad)
    after = chain.state_dict()
    assert torch.equal(after["0"]["mean"], before["0"]["mean"])
    assert torch.equal(after["1"]["history"], before["1"]["history"])
    with pytest.raises(ValueError, match="does not match"):
        gg.ZClip().load_state_dict({"mean": torch.tensor(0.0)})


def test_zclip_negative_mean_state_is_refused_and_cannot_flip_gradients():
    # issue 12: a state with a negative mean made the threshold negative and flipped the sign of the gradients
    w = torch.zeros(1, requires_grad=True)
    clipper = gg.ZClip(warmup_steps=2)
    for n in (1.0, 1.1, 0.9):
        w.grad = torch.tensor([n])
        clipper([w])
    good = clipper.state_dict()
    with pytest.raises(ValueError, match=r"ZClip state_dict\['mean'\] holds -5.*lower bound 0"):
        clipper.load_state_dict(dict(good, mean=torch.tensor(-5.0)))
    with pytest.raises(ValueError, match=r"'count'\] is 3, more than warmup_steps=2"):
        clipper.load_state_dict(dict(good, count=torch.tensor(3)))
    with pytest.raises(TypeError, match=r"'var'\] must be a torch.Tensor"):
        clipper.load_state_dict(dict(good, var=0.1))
    w.grad = torch.tensor([50.0])
    stats = clipper([w])
    assert bool(stats.clipped) and 0 < w.grad.item() < 50.0


def test_adagc_state_names_are_checked():
    clipper = gg.AdaGC(warmup_steps=1)
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    clipper([("a", a), ("b", b)])
    good = clipper.state_dict()
    assert good["names"] == ["a", "b"]
    with pytest.raises(ValueError, match="holds a name twice"):
        clipper.load_state_dict(dict(good, names=["a", "a"]))
    with pytest.raises(ValueError, match=r"'gamma'\] must have shape \(3,\), one value per name"):
        clipper.load_state_dict(dict(good, names=["a", "b", "c"]))
    with pytest.raises(TypeError, match="list of parameter names"):
        clipper.load_state_dict(dict(good, names=[1, 2]))
    assert clipper.state_dict()["names"] == ["a", "b"]


def test_bad_parameters_raise_before_anything_is_touched():
    w = torch.zeros(2, requires_grad=True)
    w.grad = torch.tensor([5.0, 5.0])
    clipper = gg.ZClip(warmup_steps=1)
    with pytest.raises(TypeError, match="parameters"):
        clipper([w, 3])
    with pytest.raises(TypeError, match="parameters must be"):
        clipper(42)
    assert clipper.state_dict() == {} and w.grad.tolist() == [5.0, 5.0]


# ----------------------------------------------------------------------------------------- timm's AGC as an oracle
def _timm_agc():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        pytest.skip("timm is not installed (pip install --no-deps timm); .ci/run installs it")
    mod_spec = importlib.util.spec_from_file_location("timm_agc", Path(spec.origin).parent / "utils" / "agc.py")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def test_agc_matches_timm_where_timm_is_right_and_not_for_conv_transpose():
    timm_agc = _timm_agc()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 8), nn.ConvTranspose2d(8, 4, 3))
    _fill_grads(model, scale=0.05, seed=3)
    ref = [p.grad.clone() for p in model.parameters()]
    gg.AGC(clipping=0.01, eps=1e-3)(model)
    params = list(model.parameters())
    holders = []
    for p, g in zip(params, ref):
        q = p.detach().clone().requires_grad_(True)
        q.grad = g
        holders.append(q)
    timm_agc.adaptive_clip_grad(holders, clip_factor=0.01, eps=1e-3)
    names = [n for n, _ in model.named_parameters()]
    for name, p, q in zip(names, params, holders):
        if name == "3.weight":  # ConvTranspose [in, out, k, k]: timm normalises rows of *input* channels
            assert not torch.allclose(p.grad, q.grad, rtol=1e-4)
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_chain_loads_a_clipper_that_manages_its_own_state():
    # a third-party clipper overriding state_dict/load_state_dict (no declared state) still round-trips in a Chain
    class Counting(gg.NormClip):
        def __init__(self) -> None:
            super().__init__(1.0)
            self.calls = 0

        def clip(self, params):
            self.calls += 1
            return super().clip(params)

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state_dict):
            self.calls = int(state_dict["calls"])

    w = torch.zeros(1, requires_grad=True)
    chain = gg.Chain(Counting(), gg.AutoClip())
    for n in (1.0, 2.0, 3.0):
        w.grad = torch.tensor([n])
        chain([w])
    fresh = gg.Chain(Counting(), gg.AutoClip())
    fresh.load_state_dict(chain.state_dict())
    assert fresh.clippers[0].calls == 3
    assert torch.equal(fresh.state_dict()["1"]["count"], torch.tensor(3))


@pytest.mark.parametrize("window", [None, 5])
def test_autoclip_loads_a_checkpoint_of_the_previous_format(window):
    # before the bounded default: {"history": norms in arrival order (NaN-padded, grown by doubling), "count",
    # "calls"}. Converted exactly: the resumed clipper continues as if it had seen the same norms itself.
    seq = _norm_sequence(n=80)[:40]
    w = torch.zeros(1, requires_grad=True)
    clipper = gg.AutoClip(window=window, exact_steps=16)
    for n in seq[:30]:
        w.grad = torch.tensor([n], dtype=torch.float32)
        clipper([w])
    if window is None:
        history = torch.full((64,), math.nan)
        history[:30] = torch.tensor(seq[:30], dtype=torch.float32)
    else:
        history = clipper.state_dict()["history"]  # the ring was already this format
    previous = {"history": history, "count": torch.tensor(30), "calls": 31}
    resumed = gg.AutoClip(window=window, exact_steps=16)
    resumed.load_state_dict(previous)
    for k, v in clipper.state_dict().items():
        assert torch.equal(v.nan_to_num(-1), resumed.state_dict()[k].nan_to_num(-1)), k
    for n in seq[30:]:
        w.grad = torch.tensor([n], dtype=torch.float32)
        a = clipper([w]).threshold
        w.grad = torch.tensor([n], dtype=torch.float32)
        assert torch.equal(a, resumed([w]).threshold)
