"""Real survival cohorts that ship inside PyPI packages, split into modality blocks by meaning.

Every loader returns a :class:`RealDataset`: a tidy frame (one row per patient, index = patient ID
as a string; numeric columns float with NaN where missing, categorical columns str with None where
missing; ``time`` and ``event`` columns), a block map ``{block: [columns]}`` chosen from the
columns' documented meaning, and the list of categorical columns. A block is *naturally present*
for a patient when at least one of its columns is non-missing; nothing is imputed here (imputation,
where a method needs it, is fitted on the training patients of each fold in ``run.py``).

The data are read from the packages at run time and never written into the repository.
scikit-survival (``sksurv.datasets``) and SurvSet are GPL-3: they live in the optional
``benchmark`` extra (``pip install -e '.[benchmark]'``) and are imported inside the loaders only,
never when ``ClinFuseDiffCore`` is imported.

Blocks (the same text is in docs/REALDATA.md):

* ``whas500`` (scikit-survival; Worcester Heart Attack Study, 500 patients, death, 43% events;
  time = days of follow-up). No missing values.
  - ``demographics``: age, gender, bmi
  - ``vitals``: hr, sysbp, diasbp (initial heart rate and blood pressures at admission)
  - ``cardiac``: cvd (history of cardiovascular disease), afb (atrial fibrillation), sho
    (cardiogenic shock), chf (congestive heart complications), av3 (complete heart block), miord
    (recurrent MI), mitype (Q-wave MI), los (length of hospital stay)
* ``gbsg2`` (scikit-survival; German Breast Cancer Study Group 2, 686 patients, recurrence-free
  survival, 44% events; days). No missing values.
  - ``patient``: age, menostat, horTh (hormonal therapy)
  - ``tumour``: tsize, tgrade, pnodes (pathology: size, grade, positive nodes)
  - ``receptors``: estrec, progrec (oestrogen / progesterone receptor assays, fmol/mg)
* ``aids`` (scikit-survival; ACTG 320 trial, 1151 patients, AIDS diagnosis or death, 8% events;
  days). No missing values.
  - ``demographics``: age, sex, raceth, ivdrug (IV drug use history), hemophil
  - ``clinical``: karnof (Karnofsky score), priorzdv (months of prior ZDV), tx, txgrp (treatment)
  - ``labs``: cd4 (baseline CD4 count), strat2 (CD4 stratum <= 50 / > 50)
* ``flchain`` (SurvSet; Mayo serum free light chain study, 7874 patients, death, 28% events;
  days). ``fac_chapter`` (cause of death, known only after the event) is dropped: it leaks the
  outcome; ``fac_sample_yr`` duplicates ``num_sample_yr``.
  - ``demographics``: age, sex, sample_yr
  - ``flc``: kappa, lambda, flc_grp, mgus (free light chain assay)
  - ``renal``: creatinine — **naturally missing for 1350 patients (17.1%)**
* ``smarto`` (SurvSet; SMART study, 3873 patients with vascular disease, vascular events, 12%
  events; days).
  - ``history``: sex, age, length, weight, bmi, diabetes, cerebral, aaa, periph, stenosis,
    smoking, packyrs, alcohol (never missing as a block; 210 missing cells)
  - ``bp_automated``: systbp, diastbp (automated device) — **block missing for 1221 patients
    (31.5%)**
  - ``bp_manual``: systh, diasth (by hand) — **block missing for 1498 patients (38.7%)**;
    3 patients have neither BP block
  - ``labs_vascular``: chol, hdl, ldl, trig, homoc, glut, creat, albumin (albuminuria), imt
    (carotid intima-media thickness, ultrasound) — never missing as a block; 1096 missing cells
    (homoc 463, ldl 216, imt 98, ...)
* ``nki70`` (SurvSet; NKI breast cancer, 144 patients, metastasis-free survival, 33% events).
  No missing values.
  - ``clinical``: Age, Diam, N, ER, Grade
  - ``genomics``: the 70 genes of the 70-gene signature (expression)

The exact missingness is recomputed from the data by :func:`missingness` and printed in
``results.md``, so the numbers above can be checked on each run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

INSTALL_HINT = "pip install -e '.[benchmark]'  (scikit-survival, SurvSet: GPL-3, optional)"


@dataclass
class RealDataset:
    """A tidy survival cohort with modality blocks.

    Attributes:
        name: dataset key (``whas500``...).
        frame: pandas DataFrame, index = patient ID (str); feature columns + ``time`` + ``event``.
        blocks: {block: [columns]} in block order (the modality order of every mask).
        categorical: the categorical feature columns (values str, None where missing).
        source: where the data come from (package + function).
        endpoint: what ``event`` means.
    """

    name: str
    frame: "object"
    blocks: dict[str, list[str]]
    categorical: list[str]
    source: str
    endpoint: str
    notes: list[str] = field(default_factory=list)

    @property
    def features(self) -> list[str]:
        return [c for cols in self.blocks.values() for c in cols]

    @property
    def time(self) -> np.ndarray:
        return self.frame["time"].to_numpy(np.float64)

    @property
    def event(self) -> np.ndarray:
        return self.frame["event"].to_numpy(np.int64)

    def block_available(self) -> np.ndarray:
        """(N, M) bool: block m naturally present (>= 1 non-missing column) for patient n."""
        cols = []
        for names in self.blocks.values():
            present = ~self.frame[names].isna().to_numpy().all(axis=1)  # (N,)
            cols.append(present)
        return np.stack(cols, axis=1)


def missingness(ds: RealDataset) -> dict[str, dict[str, float]]:
    """Per block: patients with the whole block missing (count, fraction) and missing cells."""
    avail = ds.block_available()
    out = {}
    for m, (b, cols) in enumerate(ds.blocks.items()):
        cells = ds.frame[cols].isna().to_numpy()
        out[b] = {"patients_missing_block": int((~avail[:, m]).sum()),
                  "fraction_missing_block": float((~avail[:, m]).mean()),
                  "missing_cells_in_present_blocks": int(cells[avail[:, m]].sum()),
                  "columns": len(cols)}
    return out


def _tidy(X, time, event, categorical: list[str]):
    """Frame with str categories (None = missing), float numerics, ``time``/``event``; str index."""
    import pandas as pd

    df = pd.DataFrame(index=[str(i) for i in range(len(X))])
    for c in X.columns:
        col = X[c].reset_index(drop=True)
        if c in categorical:
            vals = [None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                    for v in col.astype(object).tolist()]
            df[c] = pd.Series(vals, index=df.index, dtype=object)
        else:
            df[c] = pd.to_numeric(col, errors="raise").astype(np.float64).to_numpy()
    df["time"] = np.asarray(time, np.float64)
    df["event"] = np.asarray(event).astype(np.int64)
    df.index.name = "patient_id"
    return df


def _sksurv(fn_name: str):
    try:
        import sksurv.datasets as skd
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError(f"this dataset is loaded from scikit-survival; {INSTALL_HINT}") from e
    X, y = getattr(skd, fn_name)()
    ev, tm = y.dtype.names
    return X, y[tm], y[ev]


def _survset(name: str):
    try:
        from SurvSet.data import SurvLoader
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError(f"this dataset is loaded from SurvSet; {INSTALL_HINT}") from e
    df = SurvLoader().load_dataset(ds_name=name)["df"]
    return df


def _from_survset(name: str, blocks_raw: dict[str, list[str]]):
    """SurvSet frame -> (X with unprefixed names, time, event, categorical, blocks)."""
    import pandas as pd

    df = _survset(name)
    X = pd.DataFrame(index=range(len(df)))
    cat: list[str] = []
    blocks: dict[str, list[str]] = {}
    for b, raw in blocks_raw.items():
        blocks[b] = []
        for col in raw:
            short = col.split("_", 1)[1]
            vals = df[col].reset_index(drop=True)
            if col.startswith("fac_"):
                # SurvSet writes a missing factor level as the string "missing".
                vals = vals.astype(object).where(vals.astype(str) != "missing", None)
                cat.append(short)
            X[short] = vals
            blocks[b].append(short)
    return X, df["time"].to_numpy(), df["event"].to_numpy(), cat, blocks


def load_whas500() -> RealDataset:
    X, t, e = _sksurv("load_whas500")
    blocks = {"demographics": ["age", "gender", "bmi"],
              "vitals": ["hr", "sysbp", "diasbp"],
              "cardiac": ["cvd", "afb", "sho", "chf", "av3", "miord", "mitype", "los"]}
    cat = ["gender", "cvd", "afb", "sho", "chf", "av3", "miord", "mitype"]
    return RealDataset("whas500", _tidy(X, t, e, cat), blocks, cat,
                       "sksurv.datasets.load_whas500", "death (lenfol days)")


def load_gbsg2() -> RealDataset:
    X, t, e = _sksurv("load_gbsg2")
    blocks = {"patient": ["age", "menostat", "horTh"],
              "tumour": ["tsize", "tgrade", "pnodes"],
              "receptors": ["estrec", "progrec"]}
    cat = ["menostat", "horTh", "tgrade"]
    return RealDataset("gbsg2", _tidy(X, t, e, cat), blocks, cat,
                       "sksurv.datasets.load_gbsg2", "recurrence-free survival (days)")


def load_aids() -> RealDataset:
    X, t, e = _sksurv("load_aids")
    blocks = {"demographics": ["age", "sex", "raceth", "ivdrug", "hemophil"],
              "clinical": ["karnof", "priorzdv", "tx", "txgrp"],
              "labs": ["cd4", "strat2"]}
    cat = ["sex", "raceth", "ivdrug", "hemophil", "karnof", "tx", "txgrp", "strat2"]
    return RealDataset("aids", _tidy(X, t, e, cat), blocks, cat,
                       "sksurv.datasets.load_aids (endpoint 'aids')", "AIDS diagnosis or death (days)")


def load_flchain() -> RealDataset:
    X, t, e, cat, blocks = _from_survset("flchain", {
        "demographics": ["num_age", "fac_sex", "num_sample_yr"],
        "flc": ["num_kappa", "num_lambda", "num_flc_grp", "fac_mgus"],
        "renal": ["num_creatinine"]})
    return RealDataset("flchain", _tidy(X, t, e, cat), blocks, cat,
                       "SurvSet flchain", "death (days)",
                       notes=["fac_chapter (cause of death) dropped: outcome leakage"])


def load_smarto() -> RealDataset:
    X, t, e, cat, blocks = _from_survset("smarto", {
        "history": ["fac_sex", "num_age", "num_length", "num_weight", "num_bmi", "fac_diabetes",
                    "fac_cerebral", "fac_aaa", "fac_periph", "fac_stenosis", "fac_smoking",
                    "num_packyrs", "fac_alcohol"],
        "bp_automated": ["num_systbp", "num_diastbp"],
        "bp_manual": ["num_systh", "num_diasth"],
        "labs_vascular": ["num_chol", "num_hdl", "num_ldl", "num_trig", "num_homoc", "num_glut",
                          "num_creat", "fac_albumin", "num_imt"]})
    return RealDataset("smarto", _tidy(X, t, e, cat), blocks, cat, "SurvSet smarto",
                       "vascular event (days)")


def load_nki70() -> RealDataset:
    df = _survset("nki70")
    genes = [c for c in df.columns if c.startswith("num_") and c != "num_Age"]
    X, t, e, cat, blocks = _from_survset("nki70", {
        "clinical": ["num_Age", "fac_Diam", "fac_N", "fac_ER", "fac_Grade"],
        "genomics": genes})
    return RealDataset("nki70", _tidy(X, t, e, cat), blocks, cat, "SurvSet nki70",
                       "metastasis-free survival")


LOADERS: dict[str, Callable[[], RealDataset]] = {
    "whas500": load_whas500, "gbsg2": load_gbsg2, "aids": load_aids,
    "flchain": load_flchain, "smarto": load_smarto, "nki70": load_nki70,
}


def load_dataset(name: str) -> RealDataset:
    """Load one cohort by name (see :data:`LOADERS`)."""
    if name not in LOADERS:
        raise ValueError(f"dataset {name!r} not in {sorted(LOADERS)}")
    return LOADERS[name]()
