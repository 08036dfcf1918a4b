"""Clipping strategies: stateful, checkpointable, composable. See docs/strategies.md for how to choose."""

from gradguard.clippers.adagc import AdaGC
from gradguard.clippers.agc import AGC
from gradguard.clippers.autoclip import AutoClip
from gradguard.clippers.base import Chain, Clipper, ClipStats, ParamInfo, resolve_parameters
from gradguard.clippers.norm import LayerwiseClip, NormClip, ValueClip
from gradguard.clippers.state import StateSpec
from gradguard.clippers.zclip import ZClip

__all__ = [
    "AGC",
    "AdaGC",
    "AutoClip",
    "Chain",
    "ClipStats",
    "Clipper",
    "LayerwiseClip",
    "NormClip",
    "ParamInfo",
    "StateSpec",
    "ValueClip",
    "ZClip",
    "resolve_parameters",
]
