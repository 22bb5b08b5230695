"""PreprocessCache: hits, misses, parameter and content invalidation, corruption, processes."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ClinFuseDiffCore.config import PreprocessingConfig
from ClinFuseDiffCore.data.cache import (
    CorruptEntry, PreprocessCache, cache_key, decode_entry, encode_entry,
)
from ClinFuseDiffCore.data.volume import Volume


class Record:  # the PatientRecord interface
    def __init__(self, pid: str, images: dict, seg=None):
        self.patient_id, self.images, self.seg, self.root = pid, images, seg, None


def _head(shape=(40, 44, 32), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    brain = ((idx / [0.7, 0.75, 0.7]) ** 2).sum(-1) <= 1
    arr = np.where(brain, 100.0, 0.0) + rng.normal(0, 2, shape)
    arr[16:24, 18:26, 12:20] += 150.0
    return arr.astype(np.float32)


def write_patient(folder: Path, seed: int = 0) -> Record:
    folder.mkdir(parents=True, exist_ok=True)
    a1 = np.diag([2.0, 2.0, 2.5, 1.0])
    a2 = np.diag([-2.0, -2.0, 2.5, 1.0])
    a2[:3, 3] = [78.0, 86.0, 0.0]  # LPS-flipped grid over the same space
    t1 = _head(seed=seed)
    nib.save(nib.Nifti1Image(t1, a1), folder / "mri_t1.nii.gz")
    nib.save(nib.Nifti1Image(t1[::-1, ::-1].copy() * 0.8, a2), folder / "mri_flair.nii.gz")
    nib.save(nib.Nifti1Image((t1 > 200).astype(np.uint8), a1), folder / "seg.nii.gz")
    return Record(folder.name, {"mri_t1": folder / "mri_t1.nii.gz",
                                "mri_flair": folder / "mri_flair.nii.gz"}, folder / "seg.nii.gz")


def cfg(**kw) -> PreprocessingConfig:
    base = dict(spacing=[2.0, 2.0, 2.0], target_shape=[40, 40, 40], mask_backend="fallback",
                crop_margin=2)
    base.update(kw)
    return PreprocessingConfig(**base)


def assert_same(a, b) -> None:
    assert a.modalities == b.modalities
    for m in a.images:
        np.testing.assert_array_equal(a.images[m], b.images[m])
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.seg, b.seg)
    np.testing.assert_array_equal(a.affine, b.affine)


def digests(folder: Path) -> dict[str, tuple[str, int]]:
    return {f.name: (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for f in sorted(folder.iterdir())}


@pytest.fixture
def patient(tmp_path) -> Record:
    return write_patient(tmp_path / "data" / "P01")


def test_miss_then_hit_returns_the_same_patient(tmp_path, patient):
    cache = PreprocessCache(tmp_path / "cache")
    first = cache.load_or_build(patient, cfg())
    assert cache.last_status == "built" and len(cache.entries()) == 1
    second = PreprocessCache(tmp_path / "cache").load_or_build(patient, cfg())
    assert_same(first, second)
    assert second.patient_id == "P01" and second.images["mri_t1"].shape == (40, 40, 40)
    cache.load_or_build(patient, cfg())
    assert cache.last_status == "hit" and dict(cache.stats) == {"built": 1, "hit": 1}


def test_entry_is_a_plain_npz_without_pickles(tmp_path, patient):
    cache = PreprocessCache(tmp_path / "cache")
    cache.load_or_build(patient, cfg())
    (entry,) = cache.entries()
    with np.load(entry, allow_pickle=False) as z:
        names = {"image__mri_t1", "image__mri_flair", "mask", "seg", "affine", "meta_json"}
        assert names <= set(z.files)
        assert z["image__mri_t1"].dtype == np.float32


def test_parameter_change_is_a_new_entry(tmp_path, patient):
    cache = PreprocessCache(tmp_path / "cache")
    a = cache.load_or_build(patient, cfg())
    b = cache.load_or_build(patient, cfg(mri_percentiles=[1.0, 99.0]))
    assert cache.last_status == "built" and len(cache.entries()) == 2
    assert not np.array_equal(a.images["mri_t1"], b.images["mri_t1"])
    cache.load_or_build(patient, cfg(target_shape=[32, 40, 40]))
    assert cache.last_status == "built" and len(cache.entries()) == 3
    # 2 and 2.0 are the same parameter
    cache.load_or_build(patient, cfg(spacing=[2, 2, 2]))
    assert cache.last_status == "hit"


def test_key_follows_content_not_name_or_mtime(tmp_path, patient):
    c = cfg()
    key = cache_key(patient, c)
    t1 = patient.images["mri_t1"]
    os.utime(t1, ns=(1_000_000_000, 1_000_000_000))  # touched: same content, same key
    assert cache_key(patient, c) == key
    moved = tmp_path / "elsewhere" / "P01"
    moved.mkdir(parents=True)
    for f in Path(t1).parent.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    assert cache_key(Record("other", {"mri_t1": moved / "mri_t1.nii.gz",
                                      "mri_flair": moved / "mri_flair.nii.gz"},
                            moved / "seg.nii.gz"), c) == key
    # one voxel changed, same size and mtime: a new key
    img = nib.load(moved / "mri_t1.nii.gz")
    arr = np.asarray(img.dataobj).copy()
    arr[5, 5, 5] += 1.0
    st = (moved / "mri_t1.nii.gz").stat()
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), moved / "mri_t1.nii.gz")
    os.utime(moved / "mri_t1.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = Record("P01", {"mri_t1": moved / "mri_t1.nii.gz",
                             "mri_flair": moved / "mri_flair.nii.gz"}, moved / "seg.nii.gz")
    assert cache_key(changed, c) != key
    # the ground-truth labelmap is part of the key; so is which modality a file is
    assert cache_key(Record("P01", dict(patient.images), None), c) != key
    swapped = {"mri_t1": patient.images["mri_flair"], "mri_flair": patient.images["mri_t1"]}
    assert cache_key(Record("P01", swapped, patient.seg), c) != key


def test_volume_inputs_are_keyed_by_array_and_affine(patient):
    vols = {m: Volume.from_file(p) for m, p in patient.images.items()}
    k = cache_key(vols, cfg())
    copies = {m: Volume(v.array.copy(), v.affine.copy()) for m, v in vols.items()}
    assert cache_key(copies, cfg()) == k
    shifted = dict(vols)
    aff = vols["mri_t1"].affine.copy()
    aff[0, 3] += 1.0
    shifted["mri_t1"] = Volume(vols["mri_t1"].array, aff)
    assert cache_key(shifted, cfg()) != k


def test_truncated_entry_is_detected_and_rebuilt(tmp_path, patient):
    cache = PreprocessCache(tmp_path / "cache")
    good = cache.load_or_build(patient, cfg())
    (entry,) = cache.entries()
    raw = entry.read_bytes()
    for cut in (len(raw) - 1, len(raw) - 100, len(raw) // 2, 10, 0):
        entry.write_bytes(raw[:cut])
        with pytest.raises(CorruptEntry):
            decode_entry(entry.stem, entry.read_bytes())
        again = cache.load_or_build(patient, cfg())
        assert cache.last_status == "rebuilt"
        assert_same(good, again)
        assert entry.read_bytes() == raw  # rebuilt entry is complete and identical


@pytest.mark.parametrize("where", ["start", "zip_header", "data", "central_directory",
                                   "comment_length", "comment"])
def test_flipped_bytes_are_detected_and_rebuilt(tmp_path, patient, where):
    cache = PreprocessCache(tmp_path / "cache")
    good = cache.load_or_build(patient, cfg())
    (entry,) = cache.entries()
    raw = bytearray(entry.read_bytes())
    n = len(raw)
    pos = {"start": 0, "zip_header": 8, "data": n // 2, "central_directory": n - 200,
           "comment_length": n - 92, "comment": n - 5}[where]
    raw[pos] ^= 0x01
    entry.write_bytes(bytes(raw))
    with pytest.raises(CorruptEntry):
        cache.load(entry.stem)
    again = cache.load_or_build(patient, cfg())
    assert cache.last_status == "rebuilt"
    assert_same(good, again)
    assert_same(good, cache.load(entry.stem))  # the rebuilt entry reads back whole


def test_every_single_byte_flip_is_caught(tmp_path, patient):
    """No byte of an entry escapes the check (sampled every 997 bytes plus the last 128)."""
    cache = PreprocessCache(tmp_path / "cache")
    p = cache.load_or_build(patient, cfg(target_shape=[16, 16, 16], mask_backend="none"))
    key = cache_key(patient, cfg(target_shape=[16, 16, 16], mask_backend="none"))
    raw = encode_entry(key, p)
    positions = list(range(0, len(raw), 997)) + list(range(len(raw) - 128, len(raw)))
    for pos in positions:
        bad = bytearray(raw)
        bad[pos] ^= 0x80
        with pytest.raises(CorruptEntry):
            decode_entry(key, bytes(bad))
    decode_entry(key, raw)  # the intact one passes


def test_entry_under_another_key_is_rejected(tmp_path, patient):
    cache = PreprocessCache(tmp_path / "cache")
    cache.load_or_build(patient, cfg())
    (entry,) = cache.entries()
    other = "f" * 64
    cache.path(other).parent.mkdir(parents=True, exist_ok=True)
    cache.path(other).write_bytes(entry.read_bytes())
    with pytest.raises(CorruptEntry, match="checksum"):
        cache.load(other)


def test_input_files_unchanged_and_nothing_written_beside_them(tmp_path, patient):
    folder = Path(patient.images["mri_t1"]).parent
    before = digests(folder)
    cache = PreprocessCache(tmp_path / "cache")
    cache.load_or_build(patient, cfg(skull_strip=True))
    cache.load_or_build(patient, cfg(skull_strip=True))
    assert digests(folder) == before
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == sorted(["P01", *before])
    # no temporary files left in the cache either
    files = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files == [cache.entries()[0].name]


def test_bad_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="64-digit"):
        PreprocessCache(tmp_path).path("../../etc/passwd")


def _worker(args):
    root, data = args
    rec = Record("P01", {"mri_t1": Path(data) / "mri_t1.nii.gz",
                         "mri_flair": Path(data) / "mri_flair.nii.gz"}, Path(data) / "seg.nii.gz")
    cache = PreprocessCache(root)
    out = []
    for _ in range(3):
        p = cache.load_or_build(rec, cfg())
        out.append((cache.last_status, hashlib.sha256(p.images["mri_t1"].tobytes()).hexdigest()))
    return out


def test_several_processes_share_one_cache(tmp_path, patient):
    """Two spawned processes build and read the same entries at once: every read is a verified,
    identical result, and no temporary file is left behind."""
    data = Path(patient.images["mri_t1"]).parent
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_worker, [(str(tmp_path / "cache"), str(data))] * 2)
    hashes = {h for r in results for _, h in r}
    assert len(hashes) == 1
    statuses = [s for r in results for s, _ in r]
    assert set(statuses) <= {"built", "hit"} and statuses.count("hit") >= 4
    cache = PreprocessCache(tmp_path / "cache")
    (entry,) = cache.entries()
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [entry.name]
    p = cache.load(entry.stem)
    assert hashlib.sha256(p.images["mri_t1"].tobytes()).hexdigest() in hashes
