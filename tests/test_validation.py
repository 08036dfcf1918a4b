"""Bad input raises a clear error naming the argument, before any gradient is touched."""

from __future__ import annotations

import math

import pytest
import torch

import gradguard as gg
from conftest import assert_bit_identical, grads_of, make_params


def _params():
    params = make_params([(4,), (2, 3)])
    return params, grads_of(params)


CASES = [
    (lambda ps: gg.clip_grad_norm_(ps, -1.0), ValueError, "max_norm must be non-negative"),
    (lambda ps: gg.clip_grad_norm_(ps, math.nan), ValueError, "max_norm .*NaN"),
    (lambda ps: gg.clip_grad_norm_(ps, "1.0"), TypeError, "max_norm must be a non-negative number"),
    (lambda ps: gg.clip_grad_norm_(ps, True), TypeError, "max_norm"),
    # norm_type 0, negative and -inf are valid (every order torch accepts: tests/test_norms_orders.py)
    (lambda ps: gg.clip_grad_norm_(ps, 1.0, norm_type=math.nan), ValueError, "norm_type must be a number or"),
    (lambda ps: gg.clip_grad_norm_(ps, 1.0, norm_type=True), TypeError, "norm_type.*bool"),
    (lambda ps: gg.clip_grad_norm_(ps, 1.0, norm_type="two"), TypeError, "norm_type"),
    (lambda ps: gg.clip_grad_norm_(ps, 1.0, norm_type=None), TypeError, "norm_type"),
    (lambda ps: gg.clip_grad_norm_(ps, 1.0, foreach="yes"), TypeError, "foreach"),
    (lambda ps: gg.clip_grad_norm_([*ps, 3.0], 1.0), TypeError, r"parameters\[2\] must be a torch.Tensor"),
    (lambda ps: gg.clip_grad_norm_([*ps, None], 1.0), TypeError, r"parameters\[2\]"),
    (lambda ps: gg.clip_grad_norm_(5, 1.0), TypeError, "parameters must be a tensor or an iterable"),
    (lambda ps: gg.clip_grad_value_(ps, -0.5), ValueError, "clip_value must be non-negative"),
    (lambda ps: gg.clip_grad_value_(ps, math.nan), ValueError, "clip_value"),
    (lambda ps: gg.clip_grad_value_([*ps, "w"], 1.0), TypeError, r"parameters\[2\]"),
    (lambda ps: gg.clip_grads_with_norm_(ps, -1.0, torch.tensor(1.0)), ValueError, "max_norm"),
    (lambda ps: gg.get_total_norm([ps[0].grad, None]), TypeError, r"tensors\[1\].*drop the None"),
    (lambda ps: gg.get_total_norm([p.grad for p in ps], norm_type="nan"), ValueError, "norm_type"),
    (lambda ps: gg.clip_grad_norm_(torch.nn.Sequential(torch.nn.ReLU()), 1.0, norm_type=[2]), TypeError, "norm_type"),
    (lambda ps: gg.grad_norms(list(ps)), TypeError, r"\(name, tensor\) pair.*named_parameters"),
    (lambda ps: gg.grad_norms(42), TypeError, "module_or_named_parameters"),
    (lambda ps: gg.grad_norms([("total", ps[0])]), ValueError, "reserves"),
]


@pytest.mark.parametrize(("call", "exc", "match"), CASES)
def test_bad_input_raises_and_leaves_gradients_bit_identical(call, exc, match):
    params, before = _params()
    with pytest.raises(exc, match=match):
        call(params)
    assert_bit_identical(before, params)


def test_sparse_gradients_are_rejected_with_the_fix():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    dense = torch.nn.Linear(2, 2)
    dense(torch.ones(1, 2)).sum().backward()
    before = grads_of(dense.parameters())
    with pytest.raises(TypeError, match="dense \\(strided\\) gradients only.*to_dense"):
        gg.clip_grad_norm_([*dense.parameters(), *emb.parameters()], 1e-3)
    assert_bit_identical(before, list(dense.parameters()))
    with pytest.raises(TypeError, match="strided"):
        gg.clip_grad_value_(emb.parameters(), 1.0)


def test_complex_value_clipping_is_rejected():
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.ones(3, dtype=torch.complex64) * 5
    with pytest.raises(TypeError, match="complex.*view_as_real"):
        gg.clip_grad_value_([p], 1.0)
    assert torch.equal(p.grad, torch.ones(3, dtype=torch.complex64) * 5)


def test_integer_tensors_are_rejected():
    with pytest.raises(TypeError, match="floating point"):
        gg.get_total_norm([torch.ones(3, dtype=torch.int64)])


def test_zero_and_inf_max_norm_are_valid():
    params, _ = _params()
    gg.clip_grad_norm_(params, math.inf)
    gg.clip_grad_norm_(params, torch.tensor(0.0))
    assert all(torch.all(p.grad == 0) for p in params)
