"""gradguard: keep PyTorch training stable.

A torch-compatible clipping core that is faster and never silently corrupts gradients, adaptive clippers, a Guard
that keeps non-finite values out of the weights, and monitoring. Public names only; see the README.
"""

from gradguard.clippers import (
    AGC,
    AdaGC,
    AutoClip,
    Chain,
    Clipper,
    ClipStats,
    LayerwiseClip,
    NormClip,
    ParamInfo,
    ValueClip,
    ZClip,
)
from gradguard.diagnose import Diagnosis, NonFiniteError, TrainingDivergedError, locate_nonfinite
from gradguard.finder import Suggestion, suggest_max_norm
from gradguard.functional import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    grad_norms,
)
from gradguard.fused import fused_clip_step
from gradguard.guard import Guard, StepReport
from gradguard.health import HealthFlag, LayerHealth
from gradguard.hooks import attach
from gradguard.monitor import Monitor, Sink
from gradguard.policy import Reason

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AdaGC",
    "AutoClip",
    "Chain",
    "ClipStats",
    "Clipper",
    "Diagnosis",
    "Guard",
    "HealthFlag",
    "LayerHealth",
    "LayerwiseClip",
    "Monitor",
    "NonFiniteError",
    "NormClip",
    "ParamInfo",
    "Reason",
    "Sink",
    "StepReport",
    "Suggestion",
    "TrainingDivergedError",
    "ValueClip",
    "ZClip",
    "__version__",
    "attach",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "fused_clip_step",
    "get_total_norm",
    "grad_norms",
    "locate_nonfinite",
    "suggest_max_norm",
]
