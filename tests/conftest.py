from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "gradguard", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gradguard"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_params(shapes, dtype=torch.float32, *, grads=True, scale=1.0, none_at=()):
    """Leaf tensors with random gradients; ``none_at`` indices get no gradient."""
    params = []
    for i, shape in enumerate(shapes):
        p = torch.zeros(shape, dtype=dtype, requires_grad=True)
        if grads and i not in none_at:
            p.grad = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_(True)
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def grads_of(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_bit_identical(before, params):
    for b, p in zip(before, params):
        if b is None:
            assert p.grad is None
        else:
            assert p.grad is not None
            torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)
