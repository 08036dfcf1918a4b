"""Root pytest configuration: doctest collection of modules whose optional extras are not installed is skipped."""

from __future__ import annotations

import importlib.util

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("lightning") is None and importlib.util.find_spec("pytorch_lightning") is None:
    collect_ignore_glob.append("src/gradguard/integrations/lightning.py")
if importlib.util.find_spec("transformers") is None:
    collect_ignore_glob.append("src/gradguard/integrations/transformers.py")
