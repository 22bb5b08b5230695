"""Test-time training in feature space: per-episode adapters, batched over patients and subsets."""

from .ttt import ADAPTABLE, EpisodeAdapters, TTTResult, adapt_and_predict, sample_fused

__all__ = ["ADAPTABLE", "EpisodeAdapters", "TTTResult", "adapt_and_predict", "sample_fused"]
