"""Property tests (hypothesis) for the functional core."""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gradguard as gg

shapes = st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6)
norm_types = st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, math.inf])


def _params(shapes, seed, scale):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.zeros(s, dtype=torch.float64, requires_grad=True)
        p.grad = torch.randn(s, generator=g, dtype=torch.float64) * scale
        params.append(p)
    return params


def _flat(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


@given(shapes, st.integers(0, 2**16), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), norm_types)
def test_clipped_norm_is_bounded_and_direction_preserved(shapes, seed, scale, max_norm, p):
    params = _params(shapes, seed, scale)
    before = _flat(params).clone()
    total = gg.clip_grad_norm_(params, max_norm, norm_type=p)
    after = _flat(params)
    assert gg.get_total_norm([x.grad for x in params], p).item() <= max_norm * (1 + 1e-5)
    torch.testing.assert_close(total, torch.linalg.vector_norm(before, p) if before.numel() else total)
    if total > 0:
        # a positive multiple of the original: same direction
        c = min(1.0, max_norm / (total.item() + 1e-6))
        torch.testing.assert_close(after, before * c)


@given(shapes, st.integers(0, 2**16), st.floats(1e-3, 1e2), norm_types)
def test_no_op_under_the_threshold(shapes, seed, scale, p):
    params = _params(shapes, seed, scale)
    before = _flat(params).clone()
    total = gg.get_total_norm([x.grad for x in params], p)
    gg.clip_grad_norm_(params, total.item() * 2 + 1e-3, norm_type=p)
    assert torch.equal(_flat(params), before)


@given(shapes, st.integers(0, 2**16), st.floats(1e-3, 1e3), st.floats(0, 10))
def test_clip_grad_value_bounds_every_element(shapes, seed, scale, v):
    params = _params(shapes, seed, scale)
    before = _flat(params).clone()
    gg.clip_grad_value_(params, v)
    after = _flat(params)
    assert bool(torch.all(after.abs() <= v))
    unchanged = before.abs() <= v
    assert torch.equal(after[unchanged], before[unchanged])


@given(st.lists(st.floats(-6e4, 6e4, allow_nan=False, width=16), min_size=1, max_size=200), norm_types)
def test_fp16_norm_matches_float64(values, p):
    t = torch.tensor(values, dtype=torch.float16)
    ref = torch.linalg.vector_norm(t.double(), p).item()
    assume(ref > 0)
    got = gg.get_total_norm([t], p).item()
    assert math.isfinite(got)
    assert abs(got - ref) / ref <= 1e-3
