"""torch.compile: the functional core traces with zero graph breaks on CPU tensors, and compiled equals eager."""

from __future__ import annotations

import math

import pytest
import torch

import gradguard as gg
from conftest import clone_params, make_params

SHAPES = [(3, 4), (5,), (0,), (70, 1000), (1,)]  # one tensor above the CPU concatenation cutoff, one empty


def _clip_norm(params, max_norm, norm_type):
    return gg.clip_grad_norm_(params, max_norm, norm_type)


def _clip_value_then_total(params):
    gg.clip_grad_value_(params, 0.5)
    return gg.get_total_norm([p.grad for p in params])


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 0.5, math.inf, 0.0, -1.0, -math.inf])
def test_no_graph_breaks(norm_type):
    params = make_params(SHAPES)
    explained = torch._dynamo.explain(_clip_norm)(params, 1.0, norm_type)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    explained = torch._dynamo.explain(_clip_value_then_total)(make_params(SHAPES))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_norm", [1.0, 1e6])  # clipping and not clipping
def test_fullgraph_compiled_equals_eager(dtype, max_norm):
    torch._dynamo.reset()
    params = make_params(SHAPES, dtype)
    ref = clone_params(params)
    compiled = torch.compile(_clip_norm, fullgraph=True, backend="inductor")
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in params]))
    got = compiled(params, max_norm, 2.0)
    want = gg.clip_grad_norm_(ref, max_norm, 2.0)
    assert got.dtype == want.dtype == torch.float32
    # both accumulate in float32 (the compiled kernel in another order): each within 1e-5 of the float64 norm
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(want.double(), exact, rtol=1e-5, atol=0)
    # the two coefficients can differ in the last float32 bit: one bf16 rounding step apart at most
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 0}
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.grad, q.grad, **tol)
    if max_norm > 1:  # not clipping: the compiled path multiplies by exactly 1, the gradients are unchanged
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, ref))


def test_fullgraph_value_clip_and_total_equal_eager():
    torch._dynamo.reset()
    params = make_params(SHAPES, scale=2.0)
    ref = clone_params(params)
    got = torch.compile(_clip_value_then_total, fullgraph=True, backend="aot_eager")(params)
    want = _clip_value_then_total(ref)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, ref))
    assert max(float(p.grad.abs().max()) for p in params if p.numel()) == 0.5


def test_compiled_nonfinite_norm_leaves_gradients_untouched():
    torch._dynamo.reset()
    params = make_params(SHAPES)
    params[0].grad[0, 0] = math.nan
    before = [p.grad.clone() for p in params]
    total = torch.compile(_clip_norm, fullgraph=True, backend="aot_eager")(params, 1e-3, 2.0)
    assert torch.isnan(total)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)
