"""Content-addressed cache of :class:`~ClinFuseDiffCore.data.preprocess.PreprocessedPatient`.

Key: SHA-256 over the *contents* of every input file (each image, the ground-truth labelmap;
for a DICOM folder every file in it) — or the array bytes and affine of in-memory ``Volume`` s —
plus the preprocessing parameters and ``preprocess.PIPELINE_VERSION``. Renaming or touching a file
keeps its entry; changing one voxel or one parameter makes a new key.

Entry: ``ROOT/<key[:2]>/<key>.npz``, a plain ``.npz`` (``np.load(..., allow_pickle=False)``
opens it) whose zip comment holds ``CFDCACHE1 <length> <sha256>``: the length of and a SHA-256
over every byte before the comment (plus the key). A truncated file, a flipped byte anywhere, or
a file copied under another key fails the check and is rebuilt, never used.

Writes go to a temporary file beside the entry and are renamed onto it (``utils.atomic_path``),
so readers in other processes see either no entry or a complete one; two processes building the
same key write identical content and the last rename wins. Readers read the whole file in one
call and verify it before parsing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ..config import PreprocessingConfig
from ..utils import (EnvironmentFault, atomic_path, atomic_write_json, environment_fault,
                     is_environment_fault, remove_stale_temps)
from .preprocess import PreprocessedPatient, config_params, preprocess_patient
from .volume import Volume

log = logging.getLogger(__name__)

_MAGIC = b"CFDCACHE1"
# "CFDCACHE1 " + 16-digit length + " " + 64 hex digits
_COMMENT_LEN = len(_MAGIC) + 1 + 16 + 1 + 64
_EOCD_SIG = b"PK\x05\x06"
_CHUNK = 1 << 20


class CorruptEntry(ValueError):
    """A cache entry that failed verification (truncated, altered, or not an entry)."""


# --------------------------------------------------------------------------------------------
# Content hashing
# --------------------------------------------------------------------------------------------
def hash_file(path: Union[str, Path]) -> str:
    """SHA-256 hex digest of a file's bytes, or of a folder's files (names and bytes, sorted).

    Raises:
        FileNotFoundError: the path does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input file not found")
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def hash_volume(vol: Volume) -> str:
    """SHA-256 hex digest of a ``Volume``'s array (shape, dtype, bytes) and affine."""
    h = hashlib.sha256()
    arr = np.ascontiguousarray(vol.array)
    h.update(f"{arr.shape}{arr.dtype.str}".encode())
    h.update(arr.tobytes())
    h.update(np.ascontiguousarray(vol.affine, dtype=np.float64).tobytes())
    return h.hexdigest()


def _hash_input(x: Any) -> str:
    if isinstance(x, Volume):
        return hash_volume(x)
    return hash_file(x)


def cache_key(record_or_volumes: Any, cfg: PreprocessingConfig, seg: Any = None) -> str:
    """The content key of one patient's preprocessing (64 hex digits).

    Args:
        record_or_volumes: a ``PatientRecord`` or a dict modality -> ``Volume``/path.
        cfg: the preprocessing config.
        seg: ground-truth labelmap (``Volume``/path); default ``record.seg``.
    """
    if isinstance(record_or_volumes, Mapping):
        images = dict(record_or_volumes)
    else:
        images = dict(record_or_volumes.images)
        if seg is None:
            seg = getattr(record_or_volumes, "seg", None)
    material = {
        "params": config_params(cfg),
        "images": {m: _hash_input(images[m]) for m in sorted(images)},
        "seg": _hash_input(seg) if seg is not None else None,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Entry format
# --------------------------------------------------------------------------------------------
def encode_entry(key: str, patient: PreprocessedPatient) -> bytes:
    """The bytes of an entry: an uncompressed ``.npz`` with the integrity comment."""
    buf = io.BytesIO()
    np.savez(buf, **patient.to_arrays())
    data = buf.getvalue()
    # A zip without a comment ends with the 22-byte end-of-central-directory record whose last
    # two bytes are the comment length (0).
    assert data[-22:-18] == _EOCD_SIG and data[-2:] == b"\0\0", "numpy wrote an unexpected zip"
    body = data[:-2]
    digest = hashlib.sha256(key.encode() + body).hexdigest()
    comment = b"%s %016d %s" % (_MAGIC, len(body), digest.encode())
    assert len(comment) == _COMMENT_LEN
    return body + len(comment).to_bytes(2, "little") + comment


def decode_entry(key: str, raw: bytes, where: str = "<entry>") -> PreprocessedPatient:
    """Verify and parse an entry's bytes.

    Raises:
        CorruptEntry: truncated, altered, or written for another key.
    """
    if len(raw) < _COMMENT_LEN + 24:
        raise CorruptEntry(f"{where}: {len(raw)} bytes, too short to be a cache entry")
    comment = raw[-_COMMENT_LEN:]
    parts = comment.split(b" ")
    if len(parts) != 3 or parts[0] != _MAGIC or not parts[1].isdigit():
        raise CorruptEntry(f"{where}: no integrity record at the end (truncated or not an entry)")
    if raw[-_COMMENT_LEN - 2:-_COMMENT_LEN] != _COMMENT_LEN.to_bytes(2, "little"):
        raise CorruptEntry(f"{where}: zip comment length altered")
    body = raw[:-_COMMENT_LEN - 2]
    if len(body) != int(parts[1]):
        raise CorruptEntry(f"{where}: length {len(body)} != recorded {int(parts[1])} (truncated)")
    if hashlib.sha256(key.encode() + body).hexdigest().encode() != parts[2]:
        raise CorruptEntry(f"{where}: checksum mismatch (altered bytes or another key's entry)")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        return PreprocessedPatient.from_arrays(arrays)
    except Exception as e:  # verified bytes that still do not parse: treat as corrupt
        raise CorruptEntry(f"{where}: cannot parse ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------
class PreprocessCache:
    """Preprocessed patients under ``root``, keyed by input content and parameters.

    Args:
        root: the cache folder (created on first write). Nothing is written elsewhere.

    Example::

        cache = PreprocessCache("outputs/demo/cache")
        patient = cache.load_or_build(record, cfg.preprocessing)
        cache.last_status  # "hit" | "built" | "rebuilt"
    """

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self.stats: Counter[str] = Counter()  # hit / built / rebuilt
        self.last_status: Optional[str] = None
        self.last_key: Optional[str] = None

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key {key!r} is not a 64-digit hex SHA-256")
        return self.root / key[:2] / f"{key}.npz"

    def load(self, key: str) -> Optional[PreprocessedPatient]:
        """The verified entry, or None when absent.

        Raises:
            CorruptEntry: the entry exists but fails verification.
        """
        p = self.path(key)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            if is_environment_fault(e):
                raise environment_fault(e, "read the cache entry", p) from e
            raise
        return decode_entry(key, raw, str(p))

    def save(self, key: str, patient: PreprocessedPatient) -> Path:
        """Write an entry atomically (temp file + rename); returns its path.

        Raises:
            EnvironmentFault: the entry cannot be written (disk full, read-only, no permission,
                I/O error...): a fault of the machine that stops the run, never a bad patient.
        """
        p = self.path(key)
        data = encode_entry(key, patient)
        try:
            with atomic_path(p, suffix=".npz") as tmp:
                tmp.write_bytes(data)
        except OSError as e:
            raise environment_fault(e, "write the cache entry", p) from e
        return p

    def load_or_build(self, record_or_volumes: Any, cfg: PreprocessingConfig, *,
                      seg: Any = None, backend: Any = None,
                      patient_id: Optional[str] = None) -> PreprocessedPatient:
        """The cached result for these inputs and parameters, building (and storing) it if absent
        or corrupt.

        Args:
            record_or_volumes, cfg, seg, backend, patient_id: as
                :func:`~ClinFuseDiffCore.data.preprocess.preprocess_patient`.

        Returns:
            :class:`PreprocessedPatient` (``patient_id`` set from the record, since identical
            inputs of two patients share one entry). ``self.last_status`` says what happened,
            ``self.last_key`` is the entry's key.
        """
        key = cache_key(record_or_volumes, cfg, seg)
        pid = patient_id or getattr(record_or_volumes, "patient_id", None)
        status = "built"
        try:
            patient = self.load(key)
        except CorruptEntry as e:
            log.warning("cache entry rebuilt: %s", e)
            patient, status = None, "rebuilt"
        if patient is not None:
            status = "hit"
        else:
            patient = preprocess_patient(record_or_volumes, cfg, seg, backend=backend,
                                         patient_id=pid)
            self.save(key, patient)
        if pid is not None:
            patient.patient_id = pid
        self.stats[status] += 1
        self.last_status, self.last_key = status, key
        return patient

    def entries(self) -> list[Path]:
        """Every entry file under the root."""
        return sorted(self.root.glob("??/*.npz")) if self.root.is_dir() else []

    def __repr__(self) -> str:
        return f"PreprocessCache({str(self.root)!r}, {dict(self.stats)})"


# --------------------------------------------------------------------------------------------
# A whole cohort
# --------------------------------------------------------------------------------------------
@dataclass
class CacheReport:
    """What :func:`build_cache` did.

    Args:
        statuses: patient ID -> ``"built"`` | ``"hit"`` | ``"rebuilt"``.
        keys: patient ID -> cache key.
        failed: (patient ID, reason) for patients whose preprocessing raised a user-facing error.
        seconds: wall-clock time.
    """

    statuses: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        c = Counter(self.statuses.values())
        return {"built": c["built"], "hit": c["hit"], "rebuilt": c["rebuilt"],
                "failed": len(self.failed)}


_WORKER_BACKENDS: dict[str, Any] = {}


def _write_index(path: Path, obj: dict) -> None:
    try:
        atomic_write_json(path, obj)
    except OSError as e:
        raise environment_fault(e, "write the cache index", path) from e


def _build_one(args: tuple) -> tuple[str, Optional[str], Optional[str], Optional[str]]:
    """One patient in a worker process: (patient ID, status, key, error)."""
    record, cfg, root = args
    if cfg.mask_backend not in _WORKER_BACKENDS:
        from .preprocess import make_backend

        _WORKER_BACKENDS[cfg.mask_backend] = make_backend(cfg)
    cache = PreprocessCache(root)
    try:
        cache.load_or_build(record, cfg, backend=_WORKER_BACKENDS[cfg.mask_backend])
        return record.patient_id, cache.last_status, cache.last_key, None
    except EnvironmentFault:
        raise  # the machine, not the patient: stop the run
    except OSError as e:
        if is_environment_fault(e):
            raise environment_fault(e, "read") from e
        return record.patient_id, None, None, f"{type(e).__name__}: {e}"
    except (ValueError, RuntimeError) as e:
        return record.patient_id, None, None, f"{type(e).__name__}: {e}"


def build_cache(records: Sequence[Any], cfg: PreprocessingConfig, root: Union[str, Path], *,
                workers: int = 1, progress: bool = True,
                callback: Optional[Callable[[int, int], None]] = None) -> CacheReport:
    """Preprocess every record into the cache at ``root`` (cached entries are reused).

    Args:
        records: ``PatientRecord`` s (``discovery.discover_patients``).
        cfg: the preprocessing config.
        root: the cache folder.
        workers: processes (``spawn``); 1 = in this process.
        progress: a tqdm bar on stderr.
        callback: ``callback(done, total)`` after each patient (GUI progress).

    Returns:
        :class:`CacheReport`. A patient whose inputs are unusable (corrupt file, NaN voxels,
        modalities that do not overlap, ...) is listed in ``failed`` with the reason and logged;
        the others are still processed. ``ROOT/index.json`` records the run. Temporary files
        left in the cache by a killed run are removed first.

    Raises:
        EnvironmentFault: a fault of the machine (disk full, read-only or unwritable cache,
            I/O error, an input the process may not read): the run stops, naming the path.
    """
    import time

    from tqdm.auto import tqdm

    from .preprocess import make_backend, validate_preprocessing_config

    validate_preprocessing_config(cfg)
    # Fail fast (missing optional package, no weights) before any patient; reused in-process.
    _WORKER_BACKENDS[cfg.mask_backend] = make_backend(cfg)
    t0 = time.perf_counter()
    removed = remove_stale_temps(root, recursive=True)
    if removed:
        log.info("removed %d temporary files left in %s by a killed run", len(removed), root)
    report = CacheReport()
    jobs = [(r, cfg, str(root)) for r in records]
    bar = tqdm(total=len(jobs), desc="preprocess", unit="patient", disable=not progress)

    def done(result: tuple) -> None:
        pid, status, key, error = result
        if error is not None:
            log.warning("skipped patient %s: %s", pid, error)
            report.failed.append((pid, error))
        else:
            report.statuses[pid], report.keys[pid] = status, key
        bar.update(1)
        bar.set_postfix(report.counts(), refresh=False)
        if callback is not None:
            callback(bar.n, len(jobs))

    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                done(_build_one(job))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
                for result in ex.map(_build_one, jobs, chunksize=1):
                    done(result)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    _write_index(Path(root) / "index.json", {
        "params": config_params(cfg), "keys": report.keys, "statuses": report.statuses,
        "failed": [{"patient_id": p, "reason": r} for p, r in report.failed],
        "failed_count": len(report.failed),
        "seconds": round(report.seconds, 2),
    })
    return report


__all__ = ["CacheReport", "CorruptEntry", "PreprocessCache", "build_cache", "cache_key",
           "decode_entry", "encode_entry", "hash_file", "hash_volume"]
