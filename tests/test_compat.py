"""The torch seam (gradguard._compat): each entry point works on the installed torch, and no other module reaches
into torch internals."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from gradguard import _compat

SRC = Path(__file__).resolve().parents[1] / "src" / "gradguard"


def test_no_module_but_compat_touches_torch_internals():
    private = re.compile(r"torch\._C\b|torch\.utils\._|torch\._(?!foreach_)[a-z]\w*|\._sequence_nr|_per_optimizer_states"
                         r"|_ConvTransposeNd|_device_has_foreach_support|_step_supports_amp_scaling")
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if (private.search(code) and "torch._foreach_" not in code) or re.search(r"torch\._C\b", code):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert offenders == []


def test_no_cross_module_import_of_a_private_name():
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradguard"):
                offenders += [f"{path.relative_to(SRC)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert offenders == []


def test_autograd_node_keys_match_between_forward_and_backward():
    x = torch.ones(3, requires_grad=True)
    y = (x * 2).sum()
    forward_key = _compat.node_sequence_nr(y.grad_fn)
    seen = []

    def hook(*_):
        seen.append(_compat.node_sequence_nr(_compat.current_autograd_node()))

    y.grad_fn.register_prehook(hook)
    y.backward()
    assert seen == [forward_key]
    assert _compat.current_autograd_node() is None  # outside backward


def test_composite_kernel_lookup():
    assert _compat.has_composite_implicit_kernel("aten::linear")  # decomposed before autograd
    assert not _compat.has_composite_implicit_kernel("aten::mm")  # its own autograd formula
    assert not _compat.has_composite_implicit_kernel("aten::no_such_op")


def test_foreach_support_and_conv_transpose():
    from torch.utils._foreach_utils import _device_has_foreach_support  # the oracle: what torch's clipping asks

    for dev in ("cpu", "meta"):
        assert _compat.device_has_foreach_support(torch.device(dev)) is bool(_device_has_foreach_support(torch.device(dev)))
    assert isinstance(nn.ConvTranspose2d(2, 3, 3), _compat.CONV_TRANSPOSE)
    assert not isinstance(nn.Conv2d(2, 3, 3), _compat.CONV_TRANSPOSE)


def test_already_unscaled_follows_the_scaler_stage():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    assert not _compat.already_unscaled(scaler, opt)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    assert not _compat.already_unscaled(scaler, opt)
    scaler.unscale_(opt)
    assert _compat.already_unscaled(scaler, opt)
    with pytest.raises(RuntimeError, match="unscale_"):  # why it matters: a second call raises
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert not _compat.already_unscaled(scaler, opt)
    assert not _compat.already_unscaled(object(), opt)  # another scaler implementation


def test_optimizer_skips_in_kernel():
    w = [torch.nn.Parameter(torch.ones(2))]
    assert _compat.optimizer_skips_in_kernel(torch.optim.AdamW(w, fused=True))
    assert not _compat.optimizer_skips_in_kernel(torch.optim.AdamW(w))
    assert not _compat.optimizer_skips_in_kernel(torch.optim.RMSprop(w))


def test_unscale_once_unscales_exactly_once_per_step():
    model = nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    _compat.unscale_once(scaler, opt)
    _compat.unscale_once(scaler, opt)  # a second call is a no-op, not torch's "unscale_() has already been called"
    assert torch.equal(model.weight.grad, torch.ones(1, 2))


def test_optimizer_step_introspection():
    from torch.optim.lr_scheduler import StepLR
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from gradguard._compat import (
        scratch_optimizer,
        step_runs_only_its_update,
        step_without_hooks,
        torch_step_function,
    )

    # torch's wrappers come off, a user's decorator stays
    assert torch_step_function(torch.optim.AdamW) is torch_step_function(torch.optim.Adam)
    assert not hasattr(torch_step_function(torch.optim.SGD), "__wrapped__")

    class Decorated(torch.optim.SGD):
        step = functools.wraps(torch.optim.SGD.step)(lambda self, closure=None: torch.optim.SGD.step(self, closure))

    assert torch_step_function(Decorated) is not torch_step_function(torch.optim.SGD)

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.5)
    assert step_runs_only_its_update(opt)
    StepLR(opt, 1)  # replaces opt.step on the instance with its counting wrapper: still only the update
    assert step_runs_only_its_update(opt)
    handle = opt.register_step_pre_hook(lambda *a: None)
    assert not step_runs_only_its_update(opt)
    handle.remove()
    calls = []
    handle = register_optimizer_step_pre_hook(lambda *a: calls.append(1))
    try:
        assert not step_runs_only_its_update(opt)
        scratch = scratch_optimizer(opt)
        q = torch.ones(2)
        q.grad = torch.ones(2)
        scratch.param_groups = [dict(opt.param_groups[0], params=[q])]
        step_without_hooks(scratch)
        assert calls == [] and q.tolist() == [0.5, 0.5] and w.tolist() == [1.0, 1.0] and not opt.state
    finally:
        handle.remove()
