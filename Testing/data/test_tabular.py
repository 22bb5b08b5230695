"""Tabular tables: schema validation, train-only normalisation, plain-dict state, outcomes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from ClinFuseDiffCore.data.tabular import (TabularDims, TabularNormalizer, TabularTable, is_missing,
                                           read_outcomes)

CSV = """patient_id,age,sex,grade,site,kps
p1,40,F,2,A,90
p2,50,M,3,B,
p3,60,F,NA,A,70
p4,,M,4,C,80
p5,80,F,2,,60
"""


def _write(tmp_path: Path, text: str, name: str = "clinical_data.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_schema_detection_and_missing_values(tmp_path, caplog):
    path = _write(tmp_path, CSV)
    with caplog.at_level(logging.INFO):
        t = TabularTable.from_csv(path, "patient_id", categorical=["grade"], name="clinical")
    assert t.ids == ["p1", "p2", "p3", "p4", "p5"]
    assert t.numeric_columns == ["age", "kps"]  # grade declared categorical, sex/site detected
    assert t.categorical_columns == ["sex", "grade", "site"]
    assert any("'sex' treated as categorical" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(np.isnan(t.numeric), [[0, 0], [0, 1], [0, 0], [1, 0], [0, 0]])
    assert t.categorical[2, 1] is None and t.categorical[4, 2] is None and t.categorical[0, 0] == "F"
    assert "p3" in t and "zz" not in t
    # a column subset
    s = TabularTable.from_csv(path, columns=["age", "sex"])
    assert s.numeric_columns == ["age"] and s.categorical_columns == ["sex"] and s.name == "clinical_data"
    assert is_missing(" n/a ") and is_missing(None) and is_missing(float("nan")) and not is_missing("0")


def test_normalizer_fits_on_training_ids_only(tmp_path):
    t = TabularTable.from_csv(_write(tmp_path, CSV), categorical=["grade"], name="clinical")
    train = ["p1", "p2", "p3"]
    norm = TabularNormalizer(t).fit(train)
    # ages of the training rows only: 40, 50, 60 -> mean 50, std sqrt(200/3)
    np.testing.assert_allclose(norm.mean, [50.0, 80.0])
    np.testing.assert_allclose(norm.std, [np.sqrt(200 / 3), 10.0])
    assert norm.vocab == {"sex": ["F", "M"], "grade": ["2", "3"], "site": ["A", "B"]}
    assert norm.dims() == TabularDims(num=2, cat_cardinalities=[3, 3, 3])

    f = norm.transform(["p1", "p4", "p5", "unknown"])
    assert f["num"].dtype == np.float32 and f["num_missing"].dtype == np.float32 and f["cat"].dtype == np.int64
    assert f["num"].shape == (4, 2) and f["cat"].shape == (4, 3)
    np.testing.assert_allclose(f["num"][0], [(40 - 50) / np.sqrt(200 / 3), 1.0], rtol=1e-6)
    np.testing.assert_array_equal(f["num_missing"], [[0, 0], [1, 0], [0, 0], [1, 1]])
    assert f["num"][1, 0] == 0.0  # missing -> 0
    np.testing.assert_array_equal(f["cat"][0], [1, 1, 1])  # F, 2, A
    np.testing.assert_array_equal(f["cat"][1], [2, 0, 0])  # M, grade 4 unseen in training, site C unseen
    np.testing.assert_array_equal(f["cat"][2], [1, 1, 0])  # F, 2, site missing
    np.testing.assert_array_equal(f["cat"][3], [0, 0, 0])  # no row: all missing

    # the state is plain data (JSON round trip) and reproduces the transform
    state = json.loads(json.dumps(norm.state_dict()))
    again = TabularNormalizer.from_state(state, t)
    for k in f:
        np.testing.assert_array_equal(again.transform(["p1", "p4", "p5", "unknown"])[k], f[k])
    # a new table at inference (different column order, one patient)
    new = TabularTable.from_rows([{"patient_id": "x", "kps": "100", "site": "B", "sex": "M",
                                  "grade": "3", "age": "50"}], categorical=["grade"], name="clinical")
    g = again.transform(["x"], new)
    np.testing.assert_allclose(g["num"][0], [0.0, 2.0])
    np.testing.assert_array_equal(g["cat"][0], [2, 2, 2])
    with pytest.raises(ValueError, match=r"numeric columns \['kps'\].*missing"):
        again.transform(["x"], TabularTable.from_rows([{"patient_id": "x", "age": 1, "sex": "F",
                                                        "grade": "2", "site": "A"}], categorical=["grade"]))


def test_normalizer_errors(tmp_path):
    t = TabularTable.from_csv(_write(tmp_path, CSV), categorical=["grade"])
    with pytest.raises(ValueError, match="not fitted"):
        TabularNormalizer(t).transform(["p1"])
    with pytest.raises(ValueError, match="none of the training patients"):
        TabularNormalizer(t).fit(["q1", "q2"])
    with pytest.raises(ValueError, match="version"):
        TabularNormalizer.from_state({"version": 99})


def test_constant_and_empty_columns_do_not_divide_by_zero(tmp_path, caplog):
    path = _write(tmp_path, "patient_id,c,e\na,5,\nb,5,\n")
    with caplog.at_level(logging.WARNING):
        t = TabularTable.from_csv(path)
        f = TabularNormalizer(t).fit(["a", "b"]).transform(["a"])
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "['e']" in warned[0] and "training rows" in warned[0], warned
    assert np.isfinite(f["num"]).all()
    np.testing.assert_array_equal(f["num"], [[0.0, 0.0]])
    np.testing.assert_array_equal(f["num_missing"], [[0.0, 1.0]])


def test_schema_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no ID column 'patient_id'.*\['id', 'age'\]"):
        TabularTable.from_csv(_write(tmp_path, "id,age\na,1\n"))
    with pytest.raises(ValueError, match=r"configured columns \['bmi'\]"):
        TabularTable.from_csv(_write(tmp_path, CSV), columns=["age", "bmi"])
    with pytest.raises(ValueError, match=r"categorical columns \['bmi'\]"):
        TabularTable.from_csv(_write(tmp_path, CSV), categorical=["bmi"])
    with pytest.raises(ValueError, match="line 3 has an empty 'patient_id'"):
        TabularTable.from_csv(_write(tmp_path, "patient_id,age\na,1\n,2\n"))
    with pytest.raises(ValueError, match="'age' of patient 'b' is 'inf'"):
        TabularTable.from_csv(_write(tmp_path, "patient_id,age\na,1\nb,inf\n"))
    with pytest.raises(ValueError, match="no feature columns"):
        TabularTable.from_csv(_write(tmp_path, "patient_id\na\n"))
    with pytest.raises(ValueError, match="empty CSV"):
        TabularTable.from_csv(_write(tmp_path, ""))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        TabularTable.from_csv(tmp_path / "nope.csv")


def test_read_outcomes(tmp_path):
    path = _write(tmp_path, "patient_id,label,survival_months,event\na,1,12.5,1\nb,0,30,0\nc,,4,1\nd,1,,\n",
                  "outcomes.csv")
    out, skips = read_outcomes(path, task="classification", num_classes=2)
    assert sorted(out) == ["a", "b", "d"]
    assert out["a"] == (1.0, 12.5, 1.0)
    assert np.isnan(out["d"].time) and np.isnan(out["d"].event)
    assert [s.where for s in skips] == [f"{path}: patient c"]
    surv, sk = read_outcomes(path, task="survival")
    assert sorted(surv) == ["a", "b", "c"] and surv["c"].target == 4.0
    assert sk[0].where.endswith("patient d")
    reg, _ = read_outcomes(path, task="regression")
    assert reg["b"].target == 0.0
    with pytest.raises(ValueError, match="class labels must be integers 0..1"):
        read_outcomes(_write(tmp_path, "patient_id,label\na,2\n", "o2.csv"), num_classes=2)
    with pytest.raises(ValueError, match="line 2: 'label' = 'yes' is not a finite number"):
        read_outcomes(_write(tmp_path, "patient_id,label\na,yes\n", "o3.csv"))
    with pytest.raises(ValueError, match="events are 0"):
        read_outcomes(_write(tmp_path, "patient_id,survival_months,event\na,3,2\n", "o4.csv"), task="survival")
    with pytest.raises(ValueError, match="negative"):
        read_outcomes(_write(tmp_path, "patient_id,survival_months,event\na,-3,1\n", "o5.csv"), task="survival")
    with pytest.raises(ValueError, match=r"needs columns \['survival_months', 'event'\]"):
        read_outcomes(_write(tmp_path, "patient_id,label\na,1\n", "o6.csv"), task="survival")


def test_one_row_inputs_log_nothing_and_table_warnings_come_once_at_fit(tmp_path, caplog):
    """Issue 14 item 4: a patient's empty cells at inference are missing values, not table
    findings (a cohort run logged one warning per empty cell per patient: 431,656 lines)."""
    rows = "".join(f"p{i},{60 + i},,{'' if i % 2 else 'x'}\n" for i in range(40))
    path = _write(tmp_path, "patient_id,age,empty1,half\n" + rows)
    with caplog.at_level(logging.DEBUG, logger="ClinFuseDiffCore"):
        t = TabularTable.from_csv(path)
        norm = TabularNormalizer(t).fit([f"p{i}" for i in range(30)])
        state = norm.state_dict()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "empty1" in warned[0] and "half" not in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="ClinFuseDiffCore"):
        for i in range(30, 40):  # ten one-row inputs, each with empty cells, as the Predictor reads them
            one = TabularTable.from_rows([{"patient_id": f"p{i}", "age": "", "empty1": "", "half": ""}],
                                         header=["patient_id", "age", "empty1", "half"],
                                         categorical=["half"], quiet=True)
            f = TabularNormalizer.from_state(state).transform([f"p{i}"], one)
            assert f["num_missing"].tolist() == [[1.0, 1.0]]
    assert caplog.records == []
