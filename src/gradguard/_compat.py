"""The one seam between gradguard and torch internals.

Every torch name that is private (a leading underscore, or a module under ``torch._*`` / ``torch.utils._*``) and every
private attribute gradguard reads lives here, each with a fallback or a clear error naming the torch version, so a
torch upgrade that moves one of them breaks this file and nothing else. Public torch API is used wherever it exists
(``torch.amp.grad_scaler.OptState`` rather than comparing stage names, ``nn.ConvTranspose1d/2d/3d`` rather than
``_ConvTransposeNd``).

``torch._foreach_*`` kernels are the one exception: they are torch's own fused-list API, used by
``torch.nn.utils.clip_grad_norm_`` and the optimizers themselves, and called directly. ``tests/test_compat.py`` checks
each entry point here on the installed torch.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = [
    "CONV_TRANSPOSE",
    "TorchDispatchMode",
    "already_unscaled",
    "current_autograd_node",
    "device_has_foreach_support",
    "has_composite_implicit_kernel",
    "node_sequence_nr",
    "optimizer_skips_in_kernel",
    "scratch_optimizer",
    "step_runs_only_its_update",
    "step_without_hooks",
    "torch_step_function",
    "tree_flatten",
    "uncompiled",
    "unscale_once",
]

# --------------------------------------------------------------------------------------------- dispatch, pytree
try:  # torch >= 2.0: the base class of every dispatch mode; no public alias exists yet
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
except ImportError as e:  # pragma: no cover - only on a torch that moved them
    raise ImportError(
        f"gradguard needs torch.utils._python_dispatch.TorchDispatchMode and torch.utils._pytree.tree_flatten, which "
        f"torch {torch.__version__} does not have; install a torch in gradguard's supported range (>= 2.4)"
    ) from e

# ---------------------------------------------------------------------------------------------------- modules
CONV_TRANSPOSE: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
"""The transposed convolutions: their weights are ``(in, out / groups, *kernel)``, output units on dim 1 per group."""


def uncompiled(module: nn.Module) -> nn.Module:
    """The module that ``torch.compile(module)`` wrapped (its parameters under the user's own names, without the
    wrapper's ``_orig_mod.`` prefix), unwrapped repeatedly; ``module`` itself when it is no such wrapper."""
    frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    wrapper = getattr(frame, "OptimizedModule", None)
    while wrapper is not None and isinstance(module, wrapper) and isinstance(getattr(module, "_orig_mod", None),
                                                                             nn.Module):
        module = module._orig_mod
    return module


# ---------------------------------------------------------------------------------------------------- foreach
def device_has_foreach_support(device: torch.device) -> bool:
    """Whether torch's ``_foreach_*`` kernels run on ``device`` (as ``torch.nn.utils.clip_grad_norm_`` decides)."""
    try:
        from torch.utils._foreach_utils import _device_has_foreach_support
    except ImportError:  # pragma: no cover - fallback for a torch that moved it: CUDA and its look-alikes
        return device.type in ("cuda", "xpu", "mtia", "hpu")
    return bool(_device_has_foreach_support(device))


# ---------------------------------------------------------------------------------------------------- autograd
def current_autograd_node() -> Any | None:
    """The autograd node whose backward is running now (``None`` outside backward or on a torch without it)."""
    get = getattr(torch._C, "_current_autograd_node", None)
    return get() if get is not None else None


def node_sequence_nr(node: Any) -> int:
    """A key that names an autograd node in forward (``t.grad_fn``) and in backward (the running node) alike: its
    sequence number, or, on a torch whose nodes do not expose one, the node object's identity (the graph keeps the
    node alive while both are looked up)."""
    seq = getattr(node, "_sequence_nr", None)
    return int(seq()) if seq is not None else id(node)


def has_composite_implicit_kernel(op_name: str) -> bool:
    """Whether the aten op ``op_name`` (``"aten::softmax.int"``) is a composite (decomposed before autograd, so its
    autograd node is named after the ops it decomposes into). ``False`` when torch cannot say."""
    check = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if check is None:
        return False
    try:
        return bool(check(op_name, "CompositeImplicitAutograd"))
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------------------- optimizers
def optimizer_skips_in_kernel(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` accepts ``grad_scale`` / ``found_inf`` and applies them inside its kernel (torch marks
    such optimizers — the fused Adam, AdamW, SGD, Adagrad — with a private flag that GradScaler reads too)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def scratch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class and settings that owns nothing yet: no parameter groups, no state, no
    hooks (torch keeps them in private ``_optimizer_*_hooks`` dicts, emptied here) and no instance-level ``step``
    wrapper (an LR scheduler installs one bound to the real optimizer). Give it ``param_groups`` and ``state`` and its
    ``step()`` runs the class's own update on them: what :mod:`gradguard.preflight` dry-runs."""
    from collections import OrderedDict, defaultdict

    scratch = object.__new__(type(optimizer))
    skip = {"state", "param_groups", "step", "grad_scale", "found_inf"}
    for key, value in vars(optimizer).items():
        if key in skip:
            continue
        scratch.__dict__[key] = OrderedDict() if key.startswith("_optimizer_") and key.endswith("_hooks") else value
    scratch.state = defaultdict(dict)
    scratch.param_groups = []
    return scratch


def torch_step_function(cls: type) -> Any:
    """``cls.step`` with torch's own wrappers taken off (the profiler/hook wrapper and ``_use_grad_for_differentiable``,
    both defined in ``torch.optim``), and nothing else: a user's decorator stays, so a decorated step is not mistaken
    for torch's."""
    import os

    optim_dir = os.path.dirname(torch.optim.__file__)
    fn = cls.step  # type: ignore[attr-defined]
    # by where the wrapper's code lives: functools.wraps copies __module__, so a user's wrapper would claim torch's
    while hasattr(fn, "__wrapped__") and os.path.dirname(getattr(getattr(fn, "__code__", None), "co_filename",
                                                                 "")) == optim_dir:
        fn = fn.__wrapped__
    return fn


def step_runs_only_its_update(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` runs its class's update and nothing else: no step pre/post hook (the optimizer's
    own, kept in private ``_optimizer_step_*_hooks`` dicts, or torch's global ones) and no ``step`` replaced on the
    instance, except the LR scheduler's counting wrapper (marked ``_wrapped_by_lr_sched``)."""
    import torch.optim.optimizer as optim_module

    hooks = (vars(optimizer).get("_optimizer_step_pre_hooks"), vars(optimizer).get("_optimizer_step_post_hooks"),
             getattr(optim_module, "_global_optimizer_pre_hooks", None),
             getattr(optim_module, "_global_optimizer_post_hooks", None))
    if any(h for h in hooks):
        return False
    own = vars(optimizer).get("step")
    return own is None or bool(getattr(own, "_wrapped_by_lr_sched", False))


def step_without_hooks(optimizer: torch.optim.Optimizer) -> Any:
    """The class's ``step`` on ``optimizer`` without torch's hook wrapper: no global step hook sees the call (the
    wrapper, marked ``hooked``, runs them and the profiler record around the real step)."""
    fn: Any = type(optimizer).step
    if getattr(fn, "hooked", False) and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn(optimizer)


# ---------------------------------------------------------------------------------------------------- GradScaler
def already_unscaled(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` was already called in this step (calling it twice raises).

    GradScaler keeps the stage per optimizer in a private dict; the stage values are the public
    ``torch.amp.grad_scaler.OptState``. A scaler without that dict (another implementation) reads as not unscaled.
    """
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict) or id(optimizer) not in states:
        return False
    state = states[id(optimizer)]
    return isinstance(state, dict) and state.get("stage") is OptState.UNSCALED


def unscale_once(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless it was already called in this step (by the caller, or by the Guard)."""
    if not already_unscaled(scaler, optimizer):
        scaler.unscale_(optimizer)
