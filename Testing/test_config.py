import pytest
import yaml

from ClinFuseDiffCore.config import (
    Config,
    ConfigError,
    load_config,
    save_config,
    seed_everything,
)
from ClinFuseDiffCore.modalities import ModalityRegistry


@pytest.mark.parametrize("name", ["default", "demo"])
def test_shipped_configs_load_and_round_trip(tmp_path, name):
    cfg = load_config(name)
    out = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(out)
    assert again == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_scales():
    default, demo = load_config("default"), load_config("demo")
    assert default.preprocessing.target_shape == [128, 128, 128]
    assert default.model.image_encoder == "resnet50"
    assert default.diffusion.num_train_timesteps == 1000
    assert 4 <= default.training.batch_size <= 8 and default.training.amp != "none"
    assert max(demo.preprocessing.target_shape) <= 64
    assert demo.model.image_encoder in ("resnet10", "resnet18")


def test_overrides_parse_types():
    cfg = load_config("demo", ["training.lr=1e-4", "model.fusion=mean", "data.modalities=[ct,pet]",
                               "experiment.deterministic=true", "data.root=null"])
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.model.fusion == "mean"
    assert cfg.data.modalities == ["ct", "pet"]
    assert cfg.experiment.deterministic is True
    assert cfg.data.root is None


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.lrr=1", "'training.lrr'"),
        ("trainin.lr=1", "'trainin'"),
        ("training.lr=abc", "expected float"),
        ("training.epochs=1.5", "expected int"),
        ("training.epochs=true", "expected int"),
        ("model.fusion=sum", "not one of"),
        ("data.modalities=mri_t1", "expected list"),
        ("training.lr", "section.key=value"),
    ],
)
def test_bad_keys_and_types_are_rejected_with_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert fragment in str(e.value)


def test_unknown_key_lists_allowed_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"embed_dimm": 3}}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "embed_dim" in str(e.value) and "embed_dimm" in str(e.value)


def test_seed_everything_repeats_all_generators():
    import random

    import numpy as np
    import torch

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(5)
    a = draw()
    seed_everything(5)
    assert draw() == a
    seed_everything(6)
    assert draw() != a


def test_modality_registry():
    reg = ModalityRegistry(extra_tabular=["labs", "genomics"])
    assert reg.split(["mri_t1", "labs", "ct", "clinical"]) == (["mri_t1", "ct"], ["labs", "clinical"])
    with pytest.raises(ValueError) as e:
        reg.get("mri_t3")
    assert "mri_t1ce" in str(e.value) and "labs" in str(e.value)
    with pytest.raises(ValueError):
        ModalityRegistry().get("labs")  # not declared
    with pytest.raises(ValueError):
        reg.validate(["ct", "ct"])
    cfg = load_config("demo", ["data.tabular={clinical: {file: c.csv}, labs: {file: l.csv}}"])
    assert ModalityRegistry.from_config(cfg.data).get("labs").kind == "tabular"


def test_atomic_write_leaves_no_temp_and_normal_permissions(tmp_path):
    import os

    from ClinFuseDiffCore.utils import atomic_path, atomic_write_text

    out = atomic_write_text(tmp_path / "a.txt", "hello")
    assert out.read_text(encoding="utf-8") == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask)
    # a failing writer leaves neither the target nor a temp file behind
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_safe_id_and_safe_join(tmp_path):
    from ClinFuseDiffCore.utils import safe_id, safe_join

    assert safe_id("patient_001") == "patient_001"
    for bad in ["../x", "a/b", "..", ".hidden", "a\\b", ""]:
        with pytest.raises(ValueError):
            safe_id(bad)
    with pytest.raises(ValueError):
        safe_join(tmp_path, "..", "etc")
    assert safe_join(tmp_path, "p1", "x.nii.gz").parent.name == "p1"


def test_atomic_write_text_is_utf8_whatever_the_locale(tmp_path):
    import subprocess
    import sys

    # Reports contain arrows and the like; an ASCII locale (CI, cron) must not break them.
    code = ("from ClinFuseDiffCore.utils import atomic_write_text; "
            f"atomic_write_text({str(tmp_path / 'u.md')!r}, 'AUROC \\u2191')")
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
           "PYTHONCOERCECLOCALE": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert (tmp_path / "u.md").read_text(encoding="utf-8") == "AUROC \u2191"


@pytest.mark.parametrize("name", ["demo", "default", None])
@pytest.mark.parametrize("task, subset_metric, full_metric", [
    ("classification", "val_mean_subsets_auroc", "val_auroc"),
    ("survival", "val_mean_subsets_c_index", "val_c_index"),
    ("regression", "val_mean_subsets_mae", "val_mae"),
])
def test_default_monitors_follow_the_task(name, task, subset_metric, full_metric, tmp_path):
    """Issue 14 item 1: `--config demo data.task=survival` stopped with "training.monitor=
    'val_auroc' is not a validation metric of task 'survival'"; the shipped defaults now name the
    task's metric, and the resolved (saved) config says which one."""
    from ClinFuseDiffCore.config import save_config
    from ClinFuseDiffCore.training.trainer import VAL_METRICS

    cfg = load_config(name, [f"data.task={task}"])
    tc = cfg.training
    assert tc.monitor in VAL_METRICS[task]
    assert tc.encoder_monitor is None or tc.encoder_monitor in VAL_METRICS[task]
    if name == "demo":
        assert (tc.monitor, tc.encoder_monitor) == (subset_metric, full_metric)
    if name == "default":
        assert tc.monitor == full_metric
    if name is None:
        assert tc.monitor == subset_metric
    saved = yaml.safe_load(save_config(cfg, tmp_path / "c.yaml").read_text(encoding="utf-8"))
    assert saved["training"]["monitor"] == tc.monitor
    # an explicit choice is kept as given (and still checked by the trainer)
    assert load_config(name, [f"data.task={task}", "training.monitor=val_loss"]).training.monitor == "val_loss"
