"""Real survival cohorts (tabular-only) in the all-subsets protocol: ``clinfusediff realdata``.

``datasets`` loads cohorts shipped in PyPI packages (scikit-survival, SurvSet: GPL-3, optional
``benchmark`` extra, imported only inside the loaders) and splits their columns into modality
blocks; ``run`` runs the repeated, patient-level cross-validation (docs/REALDATA.md).
"""

from .datasets import LOADERS, RealDataset, load_dataset, missingness

__all__ = ["LOADERS", "RealDataset", "load_dataset", "missingness"]
