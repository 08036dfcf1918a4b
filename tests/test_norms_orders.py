"""Every norm order torch accepts (0, negative p, -inf as well as p > 0 and inf): gradguard against torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import gradguard as gg
import gradguard.norms as N
from conftest import clone_params, make_params

NEW_ORDERS = [0.0, -0.5, -1.0, -2.0, -math.inf]
SHAPES = [(), (7,), (3, 5), (2, 3, 4, 2), (1,), (300, 300)]  # the last is above the CPU concatenation cutoff


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-30} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-300}


@pytest.mark.parametrize("norm_type", NEW_ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_clip_grad_norm_matches_torch(norm_type, dtype, foreach, max_norm):
    params = make_params(SHAPES, dtype, none_at=(4,))
    ref = clone_params(params)
    ours = gg.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=foreach)
    theirs = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=foreach)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, **_tol(dtype))
    for p, q in zip(params, ref):
        assert (p.grad is None) == (q.grad is None)
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **_tol(dtype))


@pytest.mark.parametrize("norm_type", NEW_ORDERS)
def test_get_total_norm_and_tensor_norms_match_torch(norm_type):
    ts = [g for g in (torch.randn(s) for s in SHAPES)]
    ts[2][1, 1] = 0.0  # a zero: the 0-norm counts it out, negative orders go to 0 for that tensor
    torch.testing.assert_close(gg.get_total_norm(ts, norm_type), torch.nn.utils.get_total_norm(ts, norm_type))
    per = N.tensor_norms(ts, norm_type)
    torch.testing.assert_close(per, torch.stack([torch.linalg.vector_norm(t, norm_type) for t in ts]))


def test_hand_computed_vectors():
    g = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([3.0, 0.0, 0.0, 5.0])]
    # p = 0: per-tensor counts of non-zeros; the total is ‖(2, 0, 2)‖_0 = 2 (torch's definition, not 4)
    assert N.tensor_norms(g, 0).tolist() == [2.0, 0.0, 2.0]
    assert float(gg.get_total_norm(g, 0)) == 2.0 == float(torch.nn.utils.get_total_norm(g, 0))
    # -inf: the smallest magnitude; any zero gives 0
    assert float(gg.get_total_norm(g, -math.inf)) == 0.0
    h = [torch.tensor([1.0, -2.0]), torch.tensor([-4.0])]
    assert float(gg.get_total_norm(h, -math.inf)) == 1.0
    # p = -1: (1/1 + 1/2 + 1/4)^-1 = 4/7
    assert gg.get_total_norm(h, -1.0).item() == pytest.approx(4 / 7, rel=1e-7)
    # p = -2: (1 + 1/4 + 1/16)^-1/2
    assert gg.get_total_norm(h, -2).item() == pytest.approx((1 + 1 / 4 + 1 / 16) ** -0.5, rel=1e-7)
    # clipping by the 0-norm: 2 tensors with a non-zero entry, max_norm 1 -> coefficient 1 / (2 + 1e-6)
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    params[0].grad, params[1].grad = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([4.0, 0.0])
    assert float(gg.clip_grad_norm_(params, 1.0, 0)) == 2.0
    torch.testing.assert_close(params[1].grad, torch.tensor([4.0 / (2 + 1e-6), 0.0]))


@pytest.mark.parametrize("norm_type", NEW_ORDERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_against_float64(norm_type, dtype):
    ts = [(torch.randn(s, dtype=torch.float64) * 100).to(dtype) for s in SHAPES]
    ours = gg.get_total_norm(ts, norm_type)
    assert ours.dtype == torch.float32
    exact = torch.nn.utils.get_total_norm([t.double() for t in ts], norm_type)
    fp32 = torch.nn.utils.get_total_norm([t.float() for t in ts], norm_type)  # torch on an fp32 copy
    # negative orders sum |x|^p in float32, dominated by a few terms: as accurate as torch on an fp32 copy
    rtol = 1e-5 if norm_type >= 0 or math.isinf(norm_type) else 1e-4
    torch.testing.assert_close(ours.double(), exact, rtol=rtol, atol=0)
    torch.testing.assert_close(ours, fp32, rtol=1e-5, atol=0)


@pytest.mark.parametrize("norm_type", [-1.0, -math.inf, 0.0])
def test_empty_tensors_add_nothing(norm_type):
    # torch raises for the negative orders on an empty tensor (no identity); gradguard leaves it out of the total
    full = [torch.tensor([1.0, -2.0]), torch.tensor([-4.0, 0.5])]
    with_empty = [full[0], torch.zeros(0), torch.zeros(3, 0), full[1]]
    torch.testing.assert_close(gg.get_total_norm(with_empty, norm_type), torch.nn.utils.get_total_norm(full, norm_type))
    per = N.tensor_norms(with_empty, norm_type)
    assert per[1].item() == per[2].item() == (0.0 if norm_type == 0 else math.inf)
    assert float(gg.get_total_norm([torch.zeros(0)], norm_type)) == (0.0 if norm_type == 0 else math.inf)
    assert float(gg.get_total_norm([], norm_type)) == 0.0  # no tensors at all: 0, as in torch


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -math.inf])
def test_nan_propagates_for_every_order(norm_type):
    ts = [torch.tensor([1.0, math.nan]), torch.tensor([2.0])]
    if norm_type == 0:  # NaN != 0 counts as non-zero: torch's 0-norm is finite here too
        assert float(gg.get_total_norm(ts, norm_type)) == float(torch.nn.utils.get_total_norm(ts, norm_type))
    else:
        assert math.isnan(float(gg.get_total_norm(ts, norm_type)))


def test_orders_that_cannot_be_reduced_across_ranks_are_refused(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        g = [torch.tensor([3.0, 4.0])]
        for bad in (0.0, -math.inf):
            with pytest.raises(ValueError, match="cannot be reduced across ranks.*norm_type > 0"):
                N.total_norm(g, bad, process_group=group)
        assert float(N.total_norm(g, -1.0, process_group=group)) == pytest.approx(1 / (1 / 3 + 1 / 4))
        assert float(N.total_norm(g, 2.0, process_group=group)) == 5.0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.complex64])
def test_the_no_host_read_path_agrees_with_float64_for_every_dtype(norm_type, dtype):
    # The path of accelerators, torch.compile and Guard(host_sync=False), run on CPU: per-tensor norms and totals
    # of long tensors (taken in pieces: torch's whole-tensor kernel is off by 1e-5 and more there) and complex ones
    # (the modulus), equal to float64 within float32 accuracy, as the host path is.
    gen = torch.Generator().manual_seed(3)
    real = torch.float32 if dtype == torch.complex64 else dtype
    ts = [torch.randn(n, generator=gen, dtype=torch.float64) + 0.5 for n in (1 << 20, 300, 0, 70_000)]
    ts = [torch.complex(t, t.flip(0)).to(dtype) if dtype == torch.complex64 else t.to(real) for t in ts]
    exact = [float(torch.linalg.vector_norm(t.to(torch.complex128 if t.is_complex() else torch.float64), norm_type))
             if t.numel() else 0.0 for t in ts]
    want_total = float(torch.linalg.vector_norm(torch.tensor(exact, dtype=torch.float64), norm_type))
    with gg.norms.device_path():
        per = gg.norms.tensor_norms(ts, norm_type)
        total = gg.get_total_norm(ts, norm_type)
    host = gg.get_total_norm(ts, norm_type)
    # float32 accumulation over 16K-value pieces: 1e-6 for p = 1, 2, 2e-6 measured for other p; bf16/fp16 2-norm
    # totals are made of bf16-rounded row norms; complex tensors are taken whole by torch's kernel (1.5e-5 at 1M)
    rel = 1e-6 if norm_type in (1.0, 2.0, math.inf) else 5e-6 / min(norm_type, 1.0) ** 2  # p < 1 amplifies 1/p
    rel = 1e-4 if dtype == torch.complex64 else 1e-3 if real != torch.float32 and norm_type == 2.0 else rel
    assert per.dtype == total.dtype == torch.float32
    assert per.tolist() == pytest.approx(exact, rel=1e-4 if dtype == torch.complex64 else max(rel, 5e-6))
    assert float(total) == pytest.approx(want_total, rel=rel)
    assert float(total) == pytest.approx(float(host), rel=rel)


@pytest.mark.parametrize("value", [1e30, 1e-30, 3.0])
@pytest.mark.parametrize("p", [-2.0, -1.0, -0.5, 0.0, -math.inf])
def test_orders_zero_and_below_are_torchs_computation_overflow_included(value, p):
    # The README: the overflow rescue is for p > 0; orders <= 0 are computed as torch computes them (the -2-norm of
    # float32 values of 1e30 overflows to inf in both, that of 1e-30 to 0).
    ts = [torch.full((10,), value), torch.full((3,), 2 * value)]
    assert torch.equal(gg.get_total_norm(ts, p), torch.nn.utils.get_total_norm(ts, p))
