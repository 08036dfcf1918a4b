"""suggest_max_norm: measures real unclipped steps, recommends a documented percentile, restores state bit-exactly."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.finder import PERCENTILES


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))


def _data(n: int = 40, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
    }


def _assert_equal_state(a, b) -> None:
    def eq(x, y, where):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert isinstance(y, dict) and set(x) == set(y), where
            for k in x:
                eq(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                eq(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    eq(a, b, "state")


@pytest.mark.parametrize("opt_name", ["adam", "sgd_momentum"])
def test_state_is_restored_bit_exactly(opt_name):
    torch.manual_seed(0)
    model = _model()
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = _data()
    for x, y in data[:3]:  # an optimizer with state: step counts, moments, momentum buffers
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    nn.functional.mse_loss(model(data[3][0]), data[3][1]).backward()  # leave gradients set, as mid-step
    random.seed(5)
    np.random.seed(5)
    before = _state(model, opt)
    rng_torch, rng_py, rng_np = torch.get_rng_state(), random.getstate(), np.random.get_state()
    params_before = [id(p) for p in model.parameters()]

    it = iter(data)

    def closure():
        x, y = next(it)
        return nn.functional.mse_loss(model(x), y)

    s = gg.suggest_max_norm(model, opt, closure, steps=25, progress=False)
    assert s.steps == 25 and s.nonfinite_steps == 0
    _assert_equal_state(before, _state(model, opt))  # params, BatchNorm running stats + counter, Adam steps
    assert [id(p) for p in model.parameters()] == params_before  # the same tensors the optimizer holds
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng_torch)  # dropout drew numbers: they are given back
    assert random.getstate() == rng_py
    np_after = np.random.get_state()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(rng_np, np_after))
    assert model.training  # mode untouched


def test_recommendation_is_the_documented_percentile_of_the_real_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = _data(30)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    expected = []
    for x, y in data:  # the same unclipped steps, by hand
        ref_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        expected.append(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in reference.parameters()]))))
        ref_opt.step()

    s = gg.suggest_max_norm(model, opt, data, steps=30, loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
                            progress=False)
    assert s.norms == pytest.approx(expected, rel=1e-5)
    assert s.max_norm == pytest.approx(float(np.percentile(expected, 90)), rel=1e-5)
    assert s.percentile == 90.0 and set(s.percentiles) == set(PERCENTILES)
    for q in PERCENTILES:
        assert s.percentiles[q] == pytest.approx(float(np.percentile(expected, q)), rel=1e-5)
    assert "p90" in s.rule and "p50=" in s.reasoning and "median" in str(s)
    assert isinstance(s.clipper(), gg.NormClip) and s.clipper().max_norm == s.max_norm
    median = gg.suggest_max_norm(model, opt, data, steps=30, percentile=50,
                                 loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    assert median.max_norm == pytest.approx(float(np.median(expected)), rel=1e-5)


def test_nonfinite_steps_are_not_applied_and_excluded():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [torch.randn(8, 4) for _ in range(12)]
    batches[3][0, 0] = math.nan
    batches[7][1, 2] = math.inf

    class Wrapper(nn.Module):  # a model that returns its own loss, like Hugging Face models
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x).pow(2).mean()

    s = gg.suggest_max_norm(Wrapper(), opt, batches, steps=100)
    assert s.steps == 12 and s.nonfinite_steps == 2
    assert math.isnan(s.norms[3]) and not math.isfinite(s.norms[7])
    assert math.isfinite(s.max_norm) and "gg.Guard" in s.reasoning
    assert torch.isfinite(model.weight).all()


def test_hf_style_output_and_dict_batches():
    class Out:
        def __init__(self, loss):
            self.loss = loss

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, input_ids, labels):
            return Out(nn.functional.mse_loss(self.lin(input_ids), labels))

    model = M()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [{"input_ids": torch.randn(4, 3), "labels": torch.randn(4, 1)} for _ in range(5)]
    assert gg.suggest_max_norm(model, opt, batches, steps=5).steps == 5


def test_all_nonfinite_raises_and_restores():
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters())
    before = _state(model, opt)
    with pytest.raises(RuntimeError, match="all 4 steps gave a non-finite"):
        gg.suggest_max_norm(model, opt, lambda: model(torch.full((2, 3), math.nan)).sum(), steps=4)
    _assert_equal_state(before, _state(model, opt))


def test_an_error_in_the_closure_still_restores():
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters())
    before = _state(model, opt)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("data loader broke")
        return model(torch.randn(2, 3)).sum()

    with pytest.raises(KeyError, match="data loader broke"):
        gg.suggest_max_norm(model, opt, closure, steps=10)
    _assert_equal_state(before, _state(model, opt))


def test_bad_arguments():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    closure = lambda: model(torch.randn(2, 3)).sum()  # noqa: E731
    with pytest.raises(ValueError, match="steps must be >= 1"):
        gg.suggest_max_norm(model, opt, closure, steps=0)
    with pytest.raises(ValueError, match="percentile must be in"):
        gg.suggest_max_norm(model, opt, closure, percentile=0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        gg.suggest_max_norm("model", opt, closure)
    with pytest.raises(TypeError, match="optimizer must be"):
        gg.suggest_max_norm(model, "sgd", closure)
    with pytest.raises(TypeError, match="closure_or_batches must be"):
        gg.suggest_max_norm(model, opt, 3)
    with pytest.raises(ValueError, match="loss_fn is only for batches"):
        gg.suggest_max_norm(model, opt, closure, loss_fn=lambda m, b: b)
    with pytest.raises(TypeError, match="pass loss_fn="):
        gg.suggest_max_norm(model, opt, [(torch.randn(2, 3), torch.randn(2, 1))])
    with pytest.raises(ValueError, match="gave no batch"):
        gg.suggest_max_norm(model, opt, [])
    with pytest.raises(TypeError, match="one-element tensor"):
        gg.suggest_max_norm(model, opt, lambda: model(torch.randn(2, 3)))


def test_plot_and_progress_bar(tmp_path, capsys):
    PIL = pytest.importorskip("PIL.Image")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = _data(30)
    s = gg.suggest_max_norm(model, opt, data, steps=30, progress=True,
                            loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    assert "gradguard: measuring gradient norms" in capsys.readouterr().err
    path = s.plot(tmp_path / "sub" / "norms.png")
    img = PIL.open(path)
    img.load()
    assert img.format == "PNG" and img.size == (1100, 380)
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 100
    with pytest.raises(ValueError, match=r"must end in \.png"):
        s.plot(tmp_path / "norms.jpg")
