"""torch.compile: the functional core traces with zero graph breaks on CPU tensors, and compiled equals eager; the
Guard and the Monitor around a compiled model, and clipping inside a compiled train step with a fused AdamW."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import gradguard as gg
from conftest import clone_params, make_params
from gradguard._compat import uncompiled
from gradguard.runlog import load_run

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


# ------------------------------------------------------------------------------- around and inside compiled training
class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).tanh())


def _twins() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = Regressor()
    twin = Regressor()
    twin.load_state_dict(net.state_dict())
    return net, twin


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin() * 3


def _assert_same_weights(a: nn.Module, b: nn.Module, **tol) -> None:
    for (n, p), (m, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == m
        torch.testing.assert_close(p, q, **tol)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_uncompiled_unwraps_torch_compile_wrappers_only():
    net = Regressor()
    assert uncompiled(net) is net
    assert uncompiled(torch.compile(net)) is net
    assert next(n for n, _ in torch.compile(net).named_parameters()) == "_orig_mod.body.weight"  # what it undoes
    holder = nn.Sequential(torch.compile(net))  # a compiled module inside another: only a top wrapper is unwrapped
    assert uncompiled(holder) is holder


# the locator's replay installs global module hooks; torch warns that they also fire for the compile wrapper itself
@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there are global hooks:UserWarning")
def test_guard_around_a_compiled_model_trains_like_eager_skips_nan_and_names_layers_as_the_user(tmp_path):
    torch._dynamo.reset()
    net, twin = _twins()
    model = torch.compile(net)  # inductor
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=0.05)
    with gg.Monitor(tmp_path / "compiled", per_layer_every=1) as mon, \
            gg.Monitor(tmp_path / "eager", per_layer_every=1) as mon_twin:
        guard = gg.Guard(model, opt, clipper=gg.NormClip(1.0), monitor=mon, verbose=False)
        guard_twin = gg.Guard(twin, opt_twin, clipper=gg.NormClip(1.0), monitor=mon_twin, verbose=False)
        clipped = []
        for step in range(6):
            x, y = _batch(step)
            if step < 3:  # the closure convention
                r = guard.step(lambda: nn.functional.mse_loss(model(x), y))
                r_twin = guard_twin.step(lambda: nn.functional.mse_loss(twin(x), y))
            else:  # the manual convention: backward through the Guard, then step
                opt.zero_grad()
                guard.backward(nn.functional.mse_loss(model(x), y))
                r = guard.step()
                opt_twin.zero_grad()
                guard_twin.backward(nn.functional.mse_loss(twin(x), y))
                r_twin = guard_twin.step()
            assert not r.skipped and not r_twin.skipped
            torch.testing.assert_close(r.loss, r_twin.loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r.norm, r_twin.norm, rtol=1e-5, atol=1e-6)
            clipped.append(bool(r.clipped))
            _assert_same_weights(net, twin, rtol=1e-5, atol=1e-6)
        assert any(clipped)  # the clipper really worked on the compiled model's gradients

        # a NaN batch: skipped, nothing moves, and the diagnosis says what the eager one says
        x, y = _batch(99)
        x[3, 2] = math.nan
        weights = [p.detach().clone() for p in net.parameters()]
        state = [t.clone() for t in _tensors(opt.state_dict())]
        r = guard.step(lambda: nn.functional.mse_loss(model(x), y))
        r_twin = guard_twin.step(lambda: nn.functional.mse_loss(twin(x), y))
        assert r.skipped and r.reason == r_twin.reason == "nonfinite_loss"
        assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(state, _tensors(opt.state_dict())))
        d, d_twin = guard.diagnosis, guard_twin.diagnosis
        assert d is not None and d_twin is not None and d.located
        # what the locator says under compile: the same stage, op, cause and value as eager (its replay sees the
        # compiled model's forward op by op, module by module), under the user's module and parameter names (the
        # Guard names them from the model inside the torch.compile wrapper)
        assert (d.stage, d.op, d.cause, d.value) == (d_twin.stage, d_twin.op, d_twin.cause, d_twin.value) == (
            "input", "aten.addmm.default", d_twin.cause, "nan")
        assert d.module == d_twin.module == "body"  # the user's names, not the wrapper's "_orig_mod.body"
        assert d.parameters == d_twin.parameters

        # training goes on in step with the twin after the skip
        x, y = _batch(7)
        r = guard.step(lambda: nn.functional.mse_loss(model(x), y))
        guard_twin.step(lambda: nn.functional.mse_loss(twin(x), y))
        assert not r.skipped
        _assert_same_weights(net, twin, rtol=1e-5, atol=1e-6)
    layers, layers_twin = load_run(tmp_path / "compiled").layers, load_run(tmp_path / "eager").layers
    assert [rec["names"] for rec in layers] == [rec["names"] for rec in layers_twin]
    assert list(layers[0]["names"]) == ["body.weight", "body.bias", "head.weight", "head.bias"]  # the user's names
    for rec, rec_twin in zip(layers, layers_twin):
        assert rec["step"] == rec_twin["step"]
        for key in ("grad_norm", "param_norm"):
            assert list(rec[key]) == pytest.approx(list(rec_twin[key]), rel=1e-5, abs=1e-6, nan_ok=True)  # NaN step: NaN


def _clip_with(kind: str):
    if kind == "clip_grad_norm_":
        return None, lambda model, clipper: gg.clip_grad_norm_(model.parameters(), 0.5)
    clipper = {"NormClip": lambda: gg.NormClip(0.5), "ZClip": lambda: gg.ZClip(warmup_steps=2),
               "AGC": lambda: gg.AGC(clipping=0.01)}[kind]
    return clipper, lambda model, c: c(model).norm


@pytest.mark.parametrize("kind", ["clip_grad_norm_", "NormClip", "ZClip", "AGC"])
def test_clipping_inside_a_compiled_train_step_with_fused_adamw_equals_eager(kind):
    torch._dynamo.reset()
    make, clip = _clip_with(kind)
    c, c_twin = (make(), make()) if make else (None, None)
    net, twin = _twins()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, fused=True)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=0.05, fused=True)
    x, y = _batch(0)
    net(x).sum().backward()
    explained = torch._dynamo.explain(clip)(net, make() if make else None)  # on a throwaway clipper
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    opt.zero_grad()
    compiled_clip = torch.compile(clip, fullgraph=True)

    def train_step(model, optimizer, clipper, x, y, clip_fn):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # dynamo breaks the graph here, and in optimizer.step() (torch's own graph_break())
        norm = clip_fn(model, clipper)
        optimizer.step()
        return loss.detach(), norm

    compiled_step = torch.compile(train_step)
    for step in range(5):
        x, y = _batch(step)
        loss, norm = compiled_step(net, opt, c, x, y, compiled_clip)
        loss_twin, norm_twin = train_step(twin, opt_twin, c_twin, x, y, clip)
        torch.testing.assert_close(loss, loss_twin, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm, norm_twin, rtol=1e-5, atol=1e-6)
        _assert_same_weights(net, twin, rtol=1e-5, atol=1e-6)
    if c is not None:
        for a, b in zip(_tensors(c.state_dict()), _tensors(c_twin.state_dict())):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # every graph break of the whole step is torch's (backward, the optimizer), none in gradguard
    explained = torch._dynamo.explain(train_step)(net, opt, c, x, y, clip)
    frames = [f.filename for b in explained.break_reasons for f in b.user_stack]
    package = os.path.dirname(os.path.abspath(gg.__file__)) + os.sep  # the package, not a checkout named gradguard
    assert frames and not [f for f in frames if os.path.abspath(f).startswith(package)], frames


def test_compiled_total_norm_of_a_long_cpu_tensor_is_float32_accurate():
    torch._dynamo.reset()
    g = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) + 1.0  # 4M values, a common offset
    exact = torch.linalg.vector_norm(g.double())
    torch.testing.assert_close(gg.get_total_norm([g]).double(), exact, rtol=2e-6, atol=0)  # eager: accurate
    got = torch.compile(lambda ts: gg.get_total_norm(ts), fullgraph=True)([g])
    torch.testing.assert_close(got.double(), exact, rtol=2e-6, atol=0)  # compiled: rows too (torch's kernel: ~1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_norm_of_huge_or_tiny_finite_gradients_is_finite_and_accurate(dtype):
    # The float32 rows overflow above 1.8e19 and lose precision below 1e-19; compiled, a torch.cond in the graph
    # recomputes the norm with float64 accumulation then (no host read, no graph break), as eager rescues it.
    torch._dynamo.reset()
    compiled = torch.compile(lambda ts: gg.get_total_norm(ts), fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for scale in (3e19, 1e30, 1e-25):
        ts = [(torch.randn(70_000, generator=gen) * scale).to(dtype), (torch.randn(30, generator=gen) * scale).to(dtype)]
        exact = float(torch.linalg.vector_norm(torch.cat([t.double() for t in ts])))
        got = compiled(ts)
        assert math.isfinite(float(got)) and float(got) == pytest.approx(exact, rel=1e-6), scale
    explained = torch._dynamo.explain(lambda ts: gg.get_total_norm(ts))(ts)
    assert explained.graph_break_count == 0, explained.break_reasons
    for bad, want in ((math.inf, math.inf), (math.nan, math.nan)):
        ts = [torch.ones(70_000, dtype=dtype), torch.ones(30, dtype=dtype)]
        ts[0][5] = bad
        got = float(compiled(ts))
        assert (math.isnan(got) if math.isnan(want) else got == want), bad
