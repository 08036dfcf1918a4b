"""The Clipper contract, checked for every clipper in one registry (docs/extending.md).

Adding a clipper to ``REGISTRY`` is all it takes for it to be held to: no host read (meta tensors), state round-trip
and bit-exact resume, a non-finite step that leaves no trace, device migration of its state, bad parameters and bad
state dicts refused before anything changes (corruptions generated from its declared state), and torch.compile with
no graph break, equal to eager. ``test_registry_covers_every_public_clipper`` fails when a public clipper is missing.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
import gradguard.clippers as clippers_pkg
from gradguard.clippers.state import StateSpec

EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _doc_blocks(section: str) -> list[str]:
    """The python blocks of one ``## section`` of docs/extending.md."""
    text = EXTENDING.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end != -1 else None], flags=re.S)


def _run_doc_block(code: str, label: str) -> dict[str, Any]:
    """Run a doc example in a fresh namespace; its ``print(...)  # value`` comments must hold."""
    module = types.ModuleType(f"extending_example_{abs(hash(label))}")
    sys.modules[module.__name__] = module  # an importable home for the example's classes (torch.compile needs one)
    namespace: dict[str, Any] = module.__dict__
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, label, "exec"), namespace)
    expected = [m.strip() for m in re.findall(r"print\(.*\)\s+#\s*(.+)", code)]
    assert expected and out.getvalue().split("\n")[: len(expected)] == expected, label
    return namespace


DOC_CLIPPER = _run_doc_block(_doc_blocks("A new clipper")[0], "extending.md: A new clipper")["EMAClip"]

REGISTRY: dict[str, Callable[[], gg.Clipper]] = {
    "NormClip": lambda: gg.NormClip(1.0),
    "ValueClip": lambda: gg.ValueClip(0.05),
    "LayerwiseClip": lambda: gg.LayerwiseClip(0.5, groups="module"),
    "AGC": lambda: gg.AGC(0.05, exclude=["2.bias"]),
    "AutoClip": lambda: gg.AutoClip(percentile=20.0),
    "AutoClip-window": lambda: gg.AutoClip(percentile=50.0, window=7),
    "AutoClip-sketch": lambda: gg.AutoClip(percentile=30.0, exact_steps=8),  # switches to the sketch mid-run
    "ZClip": lambda: gg.ZClip(warmup_steps=8),
    "ZClip-percentile": lambda: gg.ZClip(warmup_steps=8, mode="percentile", skip_update_on_spike=True),
    "AdaGC": lambda: gg.AdaGC(warmup_steps=6),
    "Chain": lambda: gg.Chain(gg.AGC(0.1), gg.ZClip(warmup_steps=5), gg.AutoClip(exact_steps=16)),
    "docs/extending.md EMAClip": lambda: DOC_CLIPPER(factor=1.5),  # the walkthrough's clipper, held to the contract
}
CASES = pytest.mark.parametrize("name", list(REGISTRY))
# Element-wise clamping, like clip_grad_value_: finite elements are clamped whatever the norm (NaN stays NaN).
ELEMENTWISE = {"ValueClip"}


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Conv1d(2, 2, 3), nn.ConvTranspose1d(2, 2, 3))


def _norms(n: int = 70, seed: int = 5) -> list[float]:
    rng = np.random.default_rng(seed)
    seq = [float(v) for v in np.exp(rng.normal(0.0, 0.15, n))]
    for s in (9, 30, 31, 50):
        if s < n:
            seq[s] *= 40.0
    return seq


def _directions(model: nn.Module) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(model.parameters())]


def _feed(model: nn.Module, dirs: list[torch.Tensor], n: float) -> None:
    for i, (p, d) in enumerate(zip(model.parameters(), dirs)):
        p.grad = d * n * (1 + i)


def _run(clipper: gg.Clipper, model: nn.Module, seq: list[float], call: Callable[[], gg.ClipStats] | None = None):
    dirs = _directions(model)
    out = []
    for n in seq:
        _feed(model, dirs, n)
        s = (call or (lambda: clipper(model)))()
        out.append((s.norm.clone(), s.threshold.clone(), s.coef.clone(), s.clipped.clone(),
                    *[p.grad.clone() for p in model.parameters()]))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _stateful(clipper: gg.Clipper) -> bool:
    return bool(clipper.state_dict())


# ------------------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("section", ["A new clipper", "A new integration"])
def test_extending_doc_examples_run(section):
    blocks = _doc_blocks(section)
    assert blocks
    for i, code in enumerate(blocks):
        _run_doc_block(code, f"extending.md: {section} [{i}]")



def test_registry_covers_every_public_clipper():
    public = {
        obj for name in clippers_pkg.__all__
        if inspect.isclass(obj := getattr(clippers_pkg, name)) and issubclass(obj, gg.Clipper) and obj is not gg.Clipper
    }
    covered = {type(make()) for make in REGISTRY.values()}
    assert public <= covered, f"add {sorted(c.__name__ for c in public - covered)} to REGISTRY"


# ---------------------------------------------------------------------------------------------------- no host read
@CASES
def test_no_host_read_on_meta_tensors(name):
    # Meta tensors carry no data: any .item(), bool() or .tolist() raises, so the accelerator path must not use one.
    model = _model().to("meta")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    clipper = REGISTRY[name]()
    for _ in range(4):
        stats = clipper(model)
        assert stats.norm.device.type == "meta" and stats.coef.device.type == "meta"


@CASES
def test_state_follows_the_gradients_device(name):
    # state built on CPU, then the model moves (here to meta): the state moves with it, nothing is read back
    model = _model()
    clipper = REGISTRY[name]()
    _run(clipper, model, _norms(12))
    model.to("meta")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    assert clipper(model).norm.device.type == "meta"
    for value in _tensors(clipper.state_dict()):
        assert value.device.type == "meta"


def _tensors(state: Mapping[str, Any]) -> Iterator[torch.Tensor]:
    for v in state.values():
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, Mapping):
            yield from _tensors(v)


# ------------------------------------------------------------------------------------------- state and resume
@CASES
def test_resume_is_bit_identical(name):
    seq = _norms()
    model = _model()
    uninterrupted = _run(REGISTRY[name](), model, seq)
    first = REGISTRY[name]()
    part1 = _run(first, model, seq[:35])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = REGISTRY[name]()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert _same(resumed.state_dict(), first.state_dict())
    part2 = _run(resumed, model, seq[35:])
    for step, (x, y) in enumerate(zip(uninterrupted, part1 + part2)):
        for u, v in zip(x, y):
            assert torch.equal(u, v), step
    resumed.reset()
    assert resumed.state_dict() == {}
    for x, y in zip(_run(resumed, model, seq[:9]), _run(REGISTRY[name](), model, seq[:9])):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


@CASES
def test_load_of_an_empty_state_resets(name):
    model = _model()
    clipper = REGISTRY[name]()
    _run(clipper, model, _norms(20))
    clipper.load_state_dict({})
    assert clipper.state_dict() == {}
    for x, y in zip(_run(clipper, model, _norms(10, seed=1)), _run(REGISTRY[name](), model, _norms(10, seed=1))):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


@CASES
def test_a_nonfinite_step_leaves_no_trace(name):
    model = _model()
    clipper = REGISTRY[name]()
    _run(clipper, model, _norms(20))
    before = clipper.state_dict()
    for bad in (math.nan, math.inf):
        _feed(model, _directions(model), 1.0)
        next(iter(model.parameters())).grad[0, 0] = bad
        grads = [p.grad.clone() for p in model.parameters()]
        stats = clipper(model)
        assert not bool(stats.finite)
        assert _same(clipper.state_dict(), before)
        if name not in ELEMENTWISE:  # the evidence left intact for the Guard
            assert all(_same(g, p.grad) for g, p in zip(grads, model.parameters()))


# ------------------------------------------------------------------------------------------------------ bad input
@CASES
def test_bad_parameters_change_nothing(name):
    model = _model()
    clipper = REGISTRY[name]()
    _run(clipper, model, _norms(10))
    state = clipper.state_dict()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"parameters\[1\]"):
        clipper([next(iter(model.parameters())), 3])
    with pytest.raises(TypeError, match="parameters must be"):
        clipper(42)
    assert _same(clipper.state_dict(), state)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def _leaves(clipper: gg.Clipper, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], gg.Clipper]]:
    """The clippers that own declared state, with their path in the (nested) state_dict."""
    if isinstance(clipper, gg.Chain):
        for i, c in enumerate(clipper.clippers):
            yield from _leaves(c, (*path, str(i)))
    elif clipper._state_spec():
        yield path, clipper


def _corruptions(spec: StateSpec, value: torch.Tensor) -> Iterator[tuple[str, Any, type[Exception]]]:
    yield "not a tensor", value.tolist(), TypeError
    other = torch.float64 if spec.dtype != torch.float64 else torch.float32
    yield "wrong dtype", value.to(other), TypeError
    yield "wrong shape", torch.cat([value.reshape(-1), value.reshape(-1)[:1]]) if value.dim() else value.reshape(1), ValueError
    flat = value.reshape(-1)
    if flat.numel() == 0:
        return
    if spec.low >= 0:
        bad = value.clone()
        bad.reshape(-1)[0] = -1
        yield "negative", bad, ValueError
    if value.is_floating_point() and not spec.nan:
        bad = value.clone()
        bad.reshape(-1)[0] = math.nan
        yield "NaN", bad, ValueError
    if value.is_floating_point() and not spec.inf:
        bad = value.clone()
        bad.reshape(-1)[-1] = math.inf
        yield "infinite", bad, ValueError


def _replace(state: Mapping[str, Any], path: tuple[str, ...], key: str, value: Any, drop: bool = False) -> dict:
    out = dict(state)
    if path:
        out[path[0]] = _replace(state[path[0]], path[1:], key, value, drop)
        return out
    if drop:
        del out[key]
    else:
        out[key] = value
    return out


@CASES
def test_bad_state_dict_is_refused_before_anything_changes(name):
    model = _model()
    clipper = REGISTRY[name]()
    _run(clipper, model, _norms(12))
    good = clipper.state_dict()
    untouched = copy.deepcopy(clipper)
    attempts = 0
    for path, leaf in _leaves(clipper):
        sub = good
        for p in path:
            sub = sub[p]
        for key, spec in leaf._state_spec().items():
            for what, value, exc in _corruptions(spec, sub[key]):
                with pytest.raises(exc, match=re.escape(f"[{key!r}]")):
                    clipper.load_state_dict(_replace(good, path, key, value))
                attempts += 1
                assert _same(clipper.state_dict(), good), (path, key, what)
            with pytest.raises(ValueError, match="missing"):
                clipper.load_state_dict(_replace(good, path, key, None, drop=True))
        with pytest.raises(ValueError, match="unknown"):
            clipper.load_state_dict(_replace(good, path, "surprise", torch.zeros(1)))
    with pytest.raises(TypeError, match="mapping"):
        clipper.load_state_dict([("a", 1)])  # type: ignore[arg-type]
    if not list(_leaves(clipper)):
        with pytest.raises(ValueError, match="stateless"):
            clipper.load_state_dict({"mean": torch.zeros(())})
    else:
        assert attempts >= 4
    assert _same(clipper.state_dict(), good)
    # and it still behaves exactly like a copy that never saw the bad loads
    seq = _norms(15, seed=3)
    for x, y in zip(_run(clipper, model, seq), _run(untouched, model, seq)):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


# -------------------------------------------------------------------------------------------------- torch.compile
def test_norm_engine_and_scaling_trace_fullgraph():
    from gradguard import functional, norms, scaling

    grads = [torch.randn(4, 3), torch.randn(5)]

    def engine() -> torch.Tensor:
        per = norms.tensor_norms(grads, 2.0, check=False)
        total = norms.combine_norms(per, 2.0)
        scaling.scale_(grads, scaling.clip_coefficient(1.0, total))
        scaling.scale_(grads, scaling.clip_coefficient(1.0, per))
        units = norms.unit_norms(grads[0], None, (1,), 2.0)
        scaling.scale_units_([grads[0]], [units.clamp(max=1.0)], units.amin().reshape(1))
        functional.clip_grad_value_(grads, 0.1)
        return norms.total_norm(grads, math.inf, check=False)

    torch._dynamo.reset()
    torch.compile(engine, fullgraph=True, backend="eager")()


@CASES
def test_compiles_fullgraph_and_equals_eager(name):
    torch._dynamo.reset()
    seq = _norms(14)
    seq[5] = math.nan  # a non-finite step under compile, too
    eager_model, compiled_model = _model(), _model()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager = _run(REGISTRY[name](), eager_model, seq)
    clipper = REGISTRY[name]()
    step = torch.compile(lambda: clipper(compiled_model), fullgraph=True, backend="aot_eager")
    compiled = _run(clipper, compiled_model, seq, call=step)  # any graph break raises under fullgraph=True
    for i, (x, y) in enumerate(zip(eager, compiled)):
        for u, v in zip(x, y):
            torch.testing.assert_close(v, u, rtol=1e-6, atol=0, equal_nan=True, msg=f"step {i}")
