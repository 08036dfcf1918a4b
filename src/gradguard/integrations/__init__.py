"""Callbacks for the trainers people use: ``gradguard.integrations.lightning`` and
``gradguard.integrations.transformers``.

Each module imports its framework lazily and raises ``ImportError`` naming the extra to install
(``pip install "gradguard[lightning]"`` / ``"gradguard[transformers]"``). Both share the step logic of
:func:`gradguard.attach` (:class:`gradguard.hooks.StepGate`): clip with any gradguard strategy, agree across ranks on
whether the gradients are finite, and skip a non-finite step by dropping the gradients.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` telling how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs the {module!r} package: pip install \"gradguard[{extra}]\" (or pip install {module})"
        ) from e
