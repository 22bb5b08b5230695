"""Dataset, collate, missing-modality simulation, augmentation and split."""

import json

import numpy as np
import pytest
import torch

from ClinFuseDiffCore.data.dataset import (
    FeatureDataset,
    ModalityDropout,
    MultimodalDataset,
    PatientSample,
    collate,
    load_or_make_split,
    make_split,
    sample_rng,
)

MODS = ["mri_t1", "mri_t2", "ct", "clinical"]
IMG = ["mri_t1", "mri_t2", "ct"]
SHAPE = (8, 10, 12)


def _samples():
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        names = tuple(m for m in IMG if not (i == 1 and m == "ct") and not (i == 2 and m != "mri_t1"))
        tab = {} if i == 3 else {"clinical": {"num": rng.normal(size=3).astype(np.float32),
                                                "num_missing": np.zeros(3, np.float32),
                                                "cat": np.array([1 + i % 2], np.int64)}}
        out.append(PatientSample(f"p{i}", names, tab, target=i % 2, time=10.0 + i, event=1.0))
    return out


def _loader(pid):
    k = int(pid[1:])
    base = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) / 100.0 + k
    # the same anatomy in every modality, scaled differently
    return {m: base * (j + 1) for j, m in enumerate(IMG)}


def _dataset(**kw):
    return MultimodalDataset(_samples(), MODS, IMG, {"clinical": (3, 1)}, SHAPE, _loader, **kw)


def test_collate_shapes_and_masks():
    ds = _dataset()
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["images"].shape == (6, 3, 1, *SHAPE) and batch["images"].dtype == torch.float32
    assert batch["tabular"]["clinical"]["num"].shape == (6, 3)
    assert batch["tabular"]["clinical"]["cat"].dtype == torch.long
    assert batch["available"].shape == (6, 4) and batch["available"].dtype == torch.bool
    assert batch["target"].dtype == torch.long and batch["target"].tolist() == [0, 1, 0, 1, 0, 1]
    assert batch["patient_id"] == [f"p{i}" for i in range(6)]
    # really missing modalities are unavailable and zero-filled
    assert batch["available"][1].tolist() == [True, True, False, True]
    assert batch["available"][2].tolist() == [True, False, False, True]
    assert batch["available"][3].tolist() == [True, True, True, False]
    assert batch["images"][1, 2].abs().sum() == 0 and batch["images"][1, 0].abs().sum() > 0
    assert batch["tabular"]["clinical"]["num_missing"][3].tolist() == [1, 1, 1]
    assert torch.equal(batch["available"], batch["available_full"])  # no simulation outside training


def test_dropout_only_changes_the_mask_and_follows_epoch():
    drop = ModalityDropout(MODS, drop_prob=0.5, min_keep=1)
    ds = _dataset(dropout=drop, seed=3)
    clean = _dataset()
    changed = 0
    for i in range(len(ds)):
        a, b = ds[i], clean[i]
        assert torch.equal(a["images"], b["images"])  # data untouched
        assert not (a["available"] & ~a["available_full"]).any()  # never adds a modality
        changed += int(not torch.equal(a["available"], a["available_full"]))
    assert changed > 0
    # same (seed, epoch, index) -> same draw; another epoch -> other draws
    assert all(torch.equal(ds[i]["available"], ds[i]["available"]) for i in range(6))
    masks0 = torch.stack([ds[i]["available"] for i in range(6)])
    ds.set_epoch(1)
    masks1 = torch.stack([ds[i]["available"] for i in range(6)])
    assert not torch.equal(masks0, masks1)


def test_dropout_statistics_min_keep_and_excluded():
    mods = ["a", "b", "c", "d"]
    excluded = [["a", "b"], ["c"]]
    drop = ModalityDropout(mods, drop_prob=0.4, per_modality={"d": 0.9}, min_keep=2,
                           excluded_combinations=excluded)
    full = np.ones(4, bool)
    rng = np.random.default_rng(0)
    draws = np.stack([drop(full, rng) for _ in range(4000)])
    kept = draws.sum(1)
    assert kept.min() >= 2
    combos = {frozenset(np.array(mods)[d]) for d in draws}
    assert frozenset({"a", "b"}) not in combos and frozenset({"c"}) not in combos
    assert len(combos) >= 6  # the other allowed subsets do occur
    # per-modality probability is honoured: d is kept far less often than a
    assert draws[:, 3].mean() < 0.35 < draws[:, 0].mean()
    # the distribution equals independent drops conditioned on the constraints (rejection)
    ref = []
    while len(ref) < 4000:
        m = rng.random(4) >= np.array([0.4, 0.4, 0.4, 0.9])
        if m.sum() >= 2 and frozenset(np.array(mods)[m]) not in {frozenset(e) for e in excluded}:
            ref.append(m)
    ref = np.stack(ref)
    np.testing.assert_allclose(draws.mean(0), ref.mean(0), atol=0.04)
    # a patient with fewer modalities than min_keep keeps them all
    one = np.array([False, True, False, False])
    assert (np.stack([drop(one, rng) for _ in range(50)]) == one).all()
    # a patient whose only possible subset is excluded cannot be drawn
    only_c = np.array([False, False, True, False])
    assert not drop.can_sample(only_c)
    with pytest.raises(ValueError, match="no allowed modality subset"):
        drop(only_c, rng)


def test_dropout_bad_config():
    with pytest.raises(ValueError, match="drop_prob_per_modality"):
        ModalityDropout(["a"], per_modality={"zz": 0.1})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ModalityDropout(["a"], drop_prob=1.5)
    with pytest.raises(ValueError, match="excluded_combinations"):
        ModalityDropout(["a"], excluded_combinations=[["q"]])


def test_same_augmentation_on_all_modalities():
    ds = _dataset(augment=True, seed=1)
    n_changed = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in (0, 4):
            img = ds[i]["images"][:, 0]  # (M_img, D, H, W)
            # modality j was (j+1) * base before augmentation -> still proportional after
            np.testing.assert_allclose(img[1].numpy(), 2 * img[0].numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(img[2].numpy(), 3 * img[0].numpy(), rtol=1e-4, atol=1e-4)
            raw = torch.from_numpy(_loader(f"p{i}")["mri_t1"])
            n_changed += int(not torch.allclose(img[0], raw))
    assert n_changed > 0
    # reproducible for a fixed (seed, epoch, index)
    assert torch.equal(ds[0]["images"], ds[0]["images"])


def test_feature_dataset_and_collate():
    tokens = torch.randn(5, 4, 8)
    present = torch.ones(5, 4, dtype=torch.bool)
    present[2, 1] = False
    ds = FeatureDataset(tokens, present, [0, 1, 0, 1, 1], [1.0] * 5, [0.0] * 5, list("abcde"),
                        dropout=ModalityDropout(MODS, drop_prob=0.5), seed=0)
    b = collate([ds[i] for i in range(5)])
    assert b["tokens"].shape == (5, 4, 8) and b["available"].shape == (5, 4)
    assert not (b["available"] & ~b["available_full"]).any()
    assert torch.equal(b["tokens"], tokens)


def test_split_stratified_written_and_reused(tmp_path):
    ids = [f"p{i:03d}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    path = tmp_path / "split.json"
    split = load_or_make_split(path, ids, labels, 0.2, 0.2, seed=0)
    assert sorted(split["train"] + split["val"] + split["test"]) == ids
    assert len(split["test"]) == 8 and len(split["val"]) == 8
    lab = dict(zip(ids, labels))
    assert sum(lab[i] for i in split["test"]) == 4  # stratified
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk["train"] == split["train"]
    # reused even if asked with another seed
    again = load_or_make_split(path, ids, labels, 0.2, 0.2, seed=99)
    assert again == split
    assert make_split(ids, labels, 0.2, 0.2, seed=99) != split
    with pytest.raises(ValueError, match="does not match the cohort"):
        load_or_make_split(path, ids + ["new"], labels + [0], 0.2, 0.2)


def test_sample_rng_independent_streams():
    a = sample_rng(0, 0, 0, 0).random(3)
    assert not np.allclose(a, sample_rng(0, 0, 0, 1).random(3))
    assert np.allclose(a, sample_rng(0, 0, 0, 0).random(3))
