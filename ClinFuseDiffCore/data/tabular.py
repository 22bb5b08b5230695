"""Tabular modalities (clinical CSVs, labs, ...) and outcome files: read, validate, normalise.

* :class:`TabularTable` reads one CSV (one row per patient) and validates its schema: the id
  column exists, IDs are non-empty, unique and safe file names, declared columns exist, numeric
  columns hold finite numbers. A column is categorical when declared so or when any of its
  non-missing values is not a number (logged). Missing values are empty cells or one of
  ``NA, N/A, NaN, null, None`` (any case). Table-level messages (a column empty in every
  training row) are logged once per table, by ``TabularNormalizer.fit``; reading one patient's
  row at inference (``from_rows(..., quiet=True)``) logs nothing.
* :class:`TabularNormalizer` is fitted on the **training IDs only**: mean/std of each numeric
  column and the category vocabulary of each categorical column. Its state is a plain dict
  (stored in checkpoints). ``transform(ids)`` gives ``{"num": (N, F_num) float32 standardised, 0
  where missing; "num_missing": (N, F_num) float32 0/1; "cat": (N, F_cat) int64, 0 =
  missing/unknown, 1.. = categories in vocabulary order}``. IDs without a row are all missing.
* :func:`read_outcomes` reads the outcome file (label / survival time / event per patient).

Rows with an unsafe ID (path separators, ``..``) are left out with a logged :class:`Skip`;
duplicate IDs are an error (which row is right cannot be guessed). Files are only read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from ..utils import safe_id
from .discovery import Skip

log = logging.getLogger(__name__)

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none"})
STATE_VERSION = 1


def is_missing(value: Any) -> bool:
    """True for None, float NaN, empty strings and the missing tokens above."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip().lower() in MISSING_TOKENS


def _as_float(value: Any) -> Optional[float]:
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows as str dicts) of a CSV, every cell kept as text."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"{path}: empty CSV file; give a header row and one row per patient") from e
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path}: cannot parse as CSV ({type(e).__name__}: {e})") from e
    header = [str(c).strip() for c in df.columns]
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes or any(c.startswith("Unnamed:") for c in header):
        raise ValueError(f"{path}: header has duplicate or empty column names {dupes or header}; "
                         "give every column a unique name")
    df.columns = header
    return header, df.to_dict(orient="records")


def _ids(path: str, header: Sequence[str], rows: Sequence[Mapping[str, Any]], id_column: str,
         what: str) -> tuple[list[int], list[str], list[Skip]]:
    """Validated IDs: (kept row indices, ids, skips). Line numbers count the header as line 1."""
    if id_column not in header:
        raise ValueError(
            f"{path}: no ID column {id_column!r} in the {what}; columns found: {list(header)}. "
            "Rename the column or set data.id_column"
        )
    keep: list[int] = []
    ids: list[str] = []
    skips: list[Skip] = []
    first_line: dict[str, int] = {}
    dupes: dict[str, list[int]] = {}
    for r, row in enumerate(rows):
        line = r + 2
        raw = row.get(id_column)
        if is_missing(raw):
            raise ValueError(f"{path}: line {line} has an empty {id_column!r}; every row needs an ID")
        pid = str(raw).strip()
        try:
            safe_id(pid)
        except ValueError as e:
            s = Skip(f"{path}: line {line}", str(e))
            log.warning("skipped %s", s)
            skips.append(s)
            continue
        if pid in first_line:
            dupes.setdefault(pid, [first_line[pid]]).append(line)
            continue
        first_line[pid] = line
        keep.append(r)
        ids.append(pid)
    if dupes:
        shown = "; ".join(f"{k!r} on lines {v}" for k, v in list(dupes.items())[:5])
        raise ValueError(f"{path}: duplicate IDs in column {id_column!r}: {shown}"
                         f"{' ...' if len(dupes) > 5 else ''}; keep one row per patient")
    return keep, ids, skips


# ------------------------------------------------------------------------------ tables
@dataclass
class TabularTable:
    """One tabular modality: validated rows keyed by patient ID.

    Attributes:
        numeric: (N, F_num) float64, NaN where missing.
        categorical: (N, F_cat) object array of str, None where missing.
    """

    name: str
    source: str
    id_column: str
    ids: list[str]
    numeric_columns: list[str]
    categorical_columns: list[str]
    numeric: np.ndarray
    categorical: np.ndarray
    skips: list[Skip] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._row = {pid: i for i, pid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, patient_id: object) -> bool:
        return patient_id in self._row

    def row_index(self, patient_id: str) -> Optional[int]:
        return self._row.get(patient_id)

    @classmethod
    def from_csv(cls, path: str | Path, id_column: str = "patient_id",
                 columns: Optional[Sequence[str]] = None, categorical: Sequence[str] = (),
                 name: Optional[str] = None) -> "TabularTable":
        """Read and validate a CSV.

        Args:
            path: the CSV file (one row per patient).
            id_column: the patient ID column.
            columns: feature columns to use; None or empty = every column but the ID column.
            categorical: columns to treat as categories (others are detected).
            name: the modality name (default: the file stem).

        Returns:
            the table; rows with unsafe IDs are in ``table.skips`` (and logged).

        Raises:
            FileNotFoundError / ValueError naming the file and what to fix.
        """
        path = Path(path)
        header, rows = _read_csv(path)
        return cls.from_rows(rows, id_column=id_column, columns=columns, categorical=categorical,
                             name=name or path.name.split(".")[0], source=str(path), header=header)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], id_column: str = "patient_id",
                  columns: Optional[Sequence[str]] = None, categorical: Sequence[str] = (),
                  name: str = "tabular", source: str = "<rows>",
                  header: Optional[Sequence[str]] = None, quiet: bool = False) -> "TabularTable":
        """The same validation for rows given as dicts (e.g. one patient typed in at inference).

        ``quiet=True`` (the Predictor's one-row inputs) logs no table summary: an empty cell of
        one patient is a missing value, not a finding about the table.
        """
        if header is None:
            header = list(dict.fromkeys(k for r in rows for k in r))
        keep, ids, skips = _ids(source, header, rows, id_column, f"tabular file of {name!r}")
        if columns:
            absent = [c for c in columns if c not in header]
            if absent:
                raise ValueError(f"{source}: configured columns {absent} of {name!r} are not in the "
                                 f"file; columns found: {list(header)}. Fix data.tabular.{name}.columns")
            cols = [c for c in columns if c != id_column]
        else:
            cols = [c for c in header if c != id_column]
        bad_cat = [c for c in categorical if c not in cols]
        if bad_cat:
            raise ValueError(f"{source}: categorical columns {bad_cat} of {name!r} are not feature "
                             f"columns; feature columns: {cols}. Fix data.tabular.{name}.categorical")
        if not cols:
            raise ValueError(f"{source}: no feature columns besides {id_column!r}; a tabular "
                             "modality needs at least one")
        kept = [rows[r] for r in keep]
        num_cols, cat_cols = [], []
        for c in cols:
            values = [r.get(c) for r in kept]
            present = [v for v in values if not is_missing(v)]
            if c in categorical:
                cat_cols.append(c)
                continue
            non_num = [v for v in present if _as_float(v) is None]
            if non_num:
                if not quiet:
                    log.info("%s: column %r treated as categorical (non-numeric values such as %r)",
                             source, c, non_num[0])
                cat_cols.append(c)
            else:
                num_cols.append(c)
        numeric = np.full((len(kept), len(num_cols)), np.nan, dtype=np.float64)  # (N, F_num)
        for j, c in enumerate(num_cols):
            for i, r in enumerate(kept):
                v = r.get(c)
                if is_missing(v):
                    continue
                x = float(str(v).strip())
                if not math.isfinite(x):
                    raise ValueError(f"{source}: column {c!r} of patient {ids[i]!r} is {v!r}; numeric "
                                     "values must be finite (leave the cell empty if unknown)")
                numeric[i, j] = x
        categ = np.empty((len(kept), len(cat_cols)), dtype=object)  # (N, F_cat)
        for j, c in enumerate(cat_cols):
            for i, r in enumerate(kept):
                v = r.get(c)
                categ[i, j] = None if is_missing(v) else str(v).strip()
        missing_frac = (np.isnan(numeric).sum() + sum(v is None for v in categ.flat)) / max(
            1, len(kept) * len(cols))
        if not quiet:
            log.info("%s: %d patients, %d numeric + %d categorical columns of %r, %.1f%% missing "
                     "cells", source, len(ids), len(num_cols), len(cat_cols), name, 100 * missing_frac)
        return cls(name=name, source=source, id_column=id_column, ids=ids, numeric_columns=num_cols,
                   categorical_columns=cat_cols, numeric=numeric, categorical=categ, skips=skips)


@dataclass
class TabularDims:
    """What a tabular encoder needs: numeric width and categorical cardinalities.

    ``cat_cardinalities[j]`` counts the embedding rows of column j: its vocabulary plus index 0
    (missing/unknown).
    """

    num: int
    cat_cardinalities: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TabularDims":
        return cls(num=int(d["num"]), cat_cardinalities=[int(x) for x in d["cat_cardinalities"]])


class TabularNormalizer:
    """Standardisation and category vocabularies fitted on training IDs only.

    Example::

        norm = TabularNormalizer(table).fit(split["train"])
        feats = norm.transform(ids)            # {"num", "num_missing", "cat"}
        state = norm.state_dict()              # plain dict -> checkpoint
        norm2 = TabularNormalizer.from_state(state, new_table)
    """

    def __init__(self, table: Optional[TabularTable] = None):
        self.table = table
        self.name: str = table.name if table is not None else ""
        self.numeric_columns: list[str] = list(table.numeric_columns) if table is not None else []
        self.categorical_columns: list[str] = list(table.categorical_columns) if table is not None else []
        self.mean: Optional[np.ndarray] = None  # (F_num,)
        self.std: Optional[np.ndarray] = None  # (F_num,)
        self.vocab: dict[str, list[str]] = {}

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, train_ids: Iterable[str]) -> "TabularNormalizer":
        """Fit on the rows of ``train_ids`` (IDs without a row are ignored).

        Raises:
            ValueError: no training ID has a row in the table.
        """
        if self.table is None:
            raise ValueError("TabularNormalizer.fit needs a table: TabularNormalizer(table).fit(ids)")
        t = self.table
        rows = [i for i in (t.row_index(p) for p in train_ids) if i is not None]
        if not rows:
            raise ValueError(f"{t.source}: none of the training patients has a row in the "
                             f"tabular file of {t.name!r}; check the ID column and the split")
        num = t.numeric[rows]  # (N_train, F_num)
        with np.errstate(all="ignore"):
            count = (~np.isnan(num)).sum(axis=0)
            mean = np.where(count > 0, np.nansum(num, axis=0) / np.maximum(count, 1), 0.0)
            var = np.where(count > 0, np.nansum((num - mean) ** 2, axis=0) / np.maximum(count, 1), 1.0)
        std = np.sqrt(var)
        std = np.where(std > 1e-8, std, 1.0)
        self.mean, self.std = mean.astype(np.float64), std.astype(np.float64)
        self.vocab = {}
        for j, c in enumerate(t.categorical_columns):
            self.vocab[c] = sorted({v for v in t.categorical[rows, j] if v is not None})
        empty = [c for c, n in zip(t.numeric_columns, count) if n == 0]
        empty += [c for c in t.categorical_columns if not self.vocab[c]]
        if empty:  # one line per table, at fit time
            log.warning("%s: column(s) %s of %r are empty in every one of the %d training rows; they "
                        "carry no information (drop them from data.tabular.%s.columns)", t.source,
                        empty, t.name, len(rows), t.name)
        return self

    def dims(self) -> TabularDims:
        self._require_fitted()
        return TabularDims(num=len(self.numeric_columns),
                           cat_cardinalities=[len(self.vocab[c]) + 1 for c in self.categorical_columns])

    def transform(self, ids: Sequence[str], table: Optional[TabularTable] = None) -> dict[str, np.ndarray]:
        """Features of ``ids``; IDs without a row come back all missing.

        Args:
            ids: N patient IDs.
            table: the rows to read (default: the fitted table); must have the fitted columns.

        Returns:
            ``num`` (N, F_num) float32, ``num_missing`` (N, F_num) float32, ``cat`` (N, F_cat) int64.
        """
        self._require_fitted()
        t = table if table is not None else self.table
        if t is None:
            raise ValueError("TabularNormalizer.transform needs a table (pass table=...)")
        num_idx = self._column_index(t, self.numeric_columns, t.numeric_columns, "numeric")
        cat_idx = self._column_index(t, self.categorical_columns, t.categorical_columns, "categorical")
        n = len(ids)
        num = np.zeros((n, len(self.numeric_columns)), np.float32)  # (N, F_num)
        miss = np.ones((n, len(self.numeric_columns)), np.float32)  # (N, F_num)
        cat = np.zeros((n, len(self.categorical_columns)), np.int64)  # (N, F_cat)
        lookup = {c: {v: k + 1 for k, v in enumerate(self.vocab[c])} for c in self.categorical_columns}
        for i, pid in enumerate(ids):
            r = t.row_index(pid)
            if r is None:
                continue
            x = t.numeric[r, num_idx]  # (F_num,)
            ok = ~np.isnan(x)
            num[i] = np.where(ok, (np.nan_to_num(x) - self.mean) / self.std, 0.0)
            miss[i] = (~ok).astype(np.float32)
            for j, c in enumerate(self.categorical_columns):
                v = t.categorical[r, cat_idx[j]]
                cat[i, j] = lookup[c].get(v, 0) if v is not None else 0
        return {"num": num, "num_missing": miss, "cat": cat}

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (lists, strings, floats) for checkpoints."""
        self._require_fitted()
        return {
            "version": STATE_VERSION,
            "name": self.name,
            "numeric_columns": list(self.numeric_columns),
            "categorical_columns": list(self.categorical_columns),
            "mean": [float(x) for x in self.mean],  # type: ignore[union-attr]
            "std": [float(x) for x in self.std],  # type: ignore[union-attr]
            "vocab": {c: list(v) for c, v in self.vocab.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], table: Optional[TabularTable] = None) -> "TabularNormalizer":
        if int(state.get("version", -1)) != STATE_VERSION:
            raise ValueError(f"tabular normaliser state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}; re-train or convert the checkpoint")
        n = cls(None)
        n.table = table
        n.name = str(state["name"])
        n.numeric_columns = list(state["numeric_columns"])
        n.categorical_columns = list(state["categorical_columns"])
        n.mean = np.asarray(state["mean"], np.float64)
        n.std = np.asarray(state["std"], np.float64)
        n.vocab = {c: list(v) for c, v in state["vocab"].items()}
        return n

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise ValueError("TabularNormalizer is not fitted; call fit(train_ids) or from_state(...)")

    def _column_index(self, t: TabularTable, want: list[str], have: list[str], kind: str) -> list[int]:
        absent = [c for c in want if c not in have]
        if absent:
            raise ValueError(f"{t.source}: {kind} columns {absent} of {self.name!r} (used in training) "
                             f"are missing; {kind} columns found: {have}")
        return [have.index(c) for c in want]


# ------------------------------------------------------------------------------ outcomes
class Outcome(NamedTuple):
    """One patient's outcome; NaN where unknown. ``target`` is the label (classification), the
    value (regression) or the survival time (survival)."""

    target: float
    time: float
    event: float


def read_outcomes(path: str | Path, id_column: str = "patient_id", task: str = "classification",
                  label_column: str = "label", time_column: str = "survival_months",
                  event_column: str = "event", num_classes: Optional[int] = None,
                  ) -> tuple[dict[str, Outcome], list[Skip]]:
    """Read the outcome file.

    Args:
        path: CSV with the ID column plus label and/or time/event columns.
        task: ``classification`` (integer labels 0..C-1) | ``regression`` | ``survival``
            (time >= 0, event 0/1).
        num_classes: when given, classification labels must be below it.

    Returns:
        (ID -> Outcome, skips). A row whose outcome for ``task`` is missing is skipped (logged);
        time/event are read whenever their columns exist.

    Raises:
        FileNotFoundError / ValueError naming the file, line and what is allowed.
    """
    path = Path(path)
    if task not in ("classification", "regression", "survival"):
        raise ValueError(f"task {task!r} not in ['classification', 'regression', 'survival']")
    header, rows = _read_csv(path)
    keep, ids, skips = _ids(str(path), header, rows, id_column, "outcome file")
    needed = [label_column] if task != "survival" else [time_column, event_column]
    absent = [c for c in needed if c not in header]
    if absent:
        raise ValueError(f"{path}: task {task!r} needs columns {absent}; columns found: {header}. "
                         "Set data.label_column / data.time_column / data.event_column")
    out: dict[str, Outcome] = {}

    def num(row: Mapping[str, Any], col: str, line: int) -> float:
        if col not in row or is_missing(row[col]):
            return float("nan")
        x = _as_float(row[col])
        if x is None or not math.isfinite(x):
            raise ValueError(f"{path}: line {line}: {col!r} = {row[col]!r} is not a finite number")
        return x

    for r, pid in zip(keep, ids):
        row, line = rows[r], r + 2
        label, time, event = num(row, label_column, line), num(row, time_column, line), num(row, event_column, line)
        if not math.isnan(time) and time < 0:
            raise ValueError(f"{path}: line {line}: {time_column!r} = {time} is negative; times are >= 0")
        if not math.isnan(event) and event not in (0.0, 1.0):
            raise ValueError(f"{path}: line {line}: {event_column!r} = {row[event_column]!r}; "
                             "events are 0 (censored) or 1 (event)")
        if task == "classification" and not math.isnan(label):
            if label != int(label) or label < 0 or (num_classes is not None and label >= num_classes):
                allowed = f"0..{num_classes - 1}" if num_classes else "0, 1, 2, ..."
                raise ValueError(f"{path}: line {line}: {label_column!r} = {row[label_column]!r}; "
                                 f"class labels must be integers {allowed}")
        target = time if task == "survival" else label
        if math.isnan(target) or (task == "survival" and math.isnan(event)):
            s = Skip(f"{path}: patient {pid}", f"no {task} outcome (empty "
                     f"{'/'.join(needed)}); left out")
            log.warning("skipped %s", s)
            skips.append(s)
            continue
        out[pid] = Outcome(float(target), float(time), float(event))
    return out, skips
