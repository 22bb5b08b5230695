"""The demo's resolution note: its AUROC standard error matches the spread of AUROC over
simulated test sets of the same size."""

import numpy as np
from scipy.stats import norm

from ClinFuseDiffCore.demo import hanley_mcneil_se, resolution_note


def test_hanley_mcneil_matches_simulation():
    rng = np.random.default_rng(0)
    auc, n_pos, n_neg = 0.75, 20, 20
    d = np.sqrt(2) * norm.ppf(auc)  # binormal: AUROC = Phi(d / sqrt 2)
    pos = rng.normal(d, 1, (4000, n_pos))
    neg = rng.normal(0, 1, (4000, n_neg))
    est = (pos[:, :, None] > neg[:, None, :]).mean((1, 2))
    assert abs(est.mean() - auc) < 0.01
    se = hanley_mcneil_se(auc, n_pos, n_neg)
    assert abs(se - est.std()) / est.std() < 0.15, (se, est.std())
    assert hanley_mcneil_se(auc, 1000, 1000) < se / 5


def test_resolution_note_names_the_test_size():
    class S:
        def __init__(self, t):
            self.target = t

    class D:
        samples = [S(1.0)] * 18 + [S(0.0)] * 22

    text = resolution_note(D())
    assert "40 test patients (18 / 22 per class)" in text and "clinfusediff experiment" in text
    D.samples = [S(1.0)] * 5
    assert "lacks one class" in resolution_note(D())
