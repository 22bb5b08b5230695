"""models: encoders, fusion (mean, attention, diffusion), denoiser, heads; ``build_model``."""

from .model import FUSIONS, ClinFuseDiffModel, build_model

__all__ = ["FUSIONS", "ClinFuseDiffModel", "build_model"]
