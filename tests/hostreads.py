"""A host-read counter for tests: every place where tensor values are read on the host (a device synchronisation on
an accelerator).

:class:`HostReads` is a ``TorchDispatchMode`` that counts

* ``aten._local_scalar_dense`` — what ``t.item()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``if t:`` and
  ``t.is_nonzero()`` dispatch to;
* ``aten.equal`` and ``aten.is_nonzero`` (a host bool answer);
* copies from a non-CPU device to the CPU (``aten._to_copy`` to ``device="cpu"``, ``aten.copy_`` into a CPU tensor):
  ``t.cpu()``, ``t.to("cpu")``. On CPU-only runs these never happen; they are counted for CUDA runs;

and, because they read memory without dispatching an op, ``Tensor.tolist`` and ``Tensor.numpy`` (patched while
the mode is active).

Each read is recorded with the innermost frames of the Python stack, so a read can be attributed:
:meth:`HostReads.count` counts all of them, ``count(within="gradguard")`` only those with a frame inside the
``gradguard`` package (what gradguard itself reads, as opposed to the trainer around it reading its loss).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard

__all__ = ["HostRead", "HostReads"]

_GRADGUARD_DIR = os.path.dirname(os.path.abspath(gradguard.__file__)) + os.sep
_HERE = os.path.abspath(__file__)


@dataclass(frozen=True)
class HostRead:
    """One host read: what read (an aten op or a Tensor method) and the Python stack at that point."""

    what: str
    stack: tuple[traceback.FrameSummary, ...]

    def within(self, package: str) -> bool:
        """Whether a frame of the stack lies in ``package`` (``"gradguard"``: the library under test)."""
        if package != "gradguard":
            raise ValueError(f"only 'gradguard' is known, got {package!r}")
        return any(os.path.abspath(f.filename).startswith(_GRADGUARD_DIR) for f in self.stack)

    def where(self) -> str:
        """The innermost frame that is not this helper, as ``file:line in function``."""
        for f in reversed(self.stack):
            if os.path.abspath(f.filename) != _HERE:
                return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
        return "?"

    def __str__(self) -> str:
        return f"{self.what} at {self.where()}"


def _device_to_cpu(source: Any, target: Any) -> bool:
    """Whether ``source`` is a tensor off the CPU and ``target`` the CPU."""
    return (isinstance(source, torch.Tensor) and source.device.type != "cpu" and target is not None
            and torch.device(target).type == "cpu")


class HostReads(TorchDispatchMode):
    """Count host reads while active (``with HostReads() as reads: ...``; ``reads.count()``)."""

    READ_OPS = ("_local_scalar_dense", "equal", "is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[HostRead] = []
        self._patched: dict[str, Any] = {}

    def count(self, within: str | None = None) -> int:
        """All reads, or (``within="gradguard"``) those with a frame inside the gradguard package."""
        if within is None:
            return len(self.reads)
        return sum(1 for r in self.reads if r.within(within))

    def report(self, within: str | None = None) -> str:
        """The reads, one a line (for assertion messages)."""
        return "\n".join(str(r) for r in self.reads if within is None or r.within(within))

    def _record(self, what: str) -> None:
        self.reads.append(HostRead(what, tuple(traceback.extract_stack()[:-2])))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.READ_OPS:
            self._record(f"aten.{name}")
        elif name == "_to_copy" and _device_to_cpu(args[0] if args else None, kwargs.get("device")):
            self._record("aten._to_copy (device -> cpu)")
        elif name == "copy_" and len(args) >= 2 and _device_to_cpu(args[1], args[0].device):
            self._record("aten.copy_ (device -> cpu)")
        return func(*args, **kwargs)

    # Tensor.tolist / Tensor.numpy read memory without dispatching an op: patched while the mode is active
    def __enter__(self) -> HostReads:
        mode = self

        def patch(name: str) -> None:
            original = getattr(torch.Tensor, name)

            def counted(self_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                mode._record(f"Tensor.{name}")
                return original(self_, *args, **kwargs)

            self._patched[name] = original
            setattr(torch.Tensor, name, counted)

        for name in ("tolist", "numpy"):
            patch(name)
        try:
            super().__enter__()
        except BaseException:
            self._unpatch()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._unpatch()

    def _unpatch(self) -> None:
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
