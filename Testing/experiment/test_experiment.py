"""The research experiment end to end on a tiny cohort: deterministic rerun, resume of a killed
sweep (nothing finished is recomputed, same verdict), refusal of changed settings, and the parts
(split sizes, dedicated subsets, decoupled diffusion training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "sweep.n_train=16", "sweep.n_val=8", "sweep.n_test=16", "data.synth_shape=[32,32,24]",
    "preprocessing.target_shape=[16,16,16]", "sweep.stage1_epochs=1", "sweep.steps=15",
    "sweep.diffusion_steps=15", "sweep.seeds=[0,1]", "sweep.n_boot=40", "sweep.workers=1",
    "sweep.threads=1", "sweep.samples=2", "diffusion.num_inference_steps=2",
    "sweep.methods=[attention,mean,regressor,diffusion,oracle_full,oracle_hidden]",
]


def _cmd(out: Path, cohort: Path, extra=()) -> list[str]:
    args = [sys.executable, "-m", "ClinFuseDiffCore.cli", "experiment", "--out", str(out), "--no-progress"]
    for s in [*TINY, f"data.root={cohort}", *extra]:
        args += ["--set", s]
    return args


def _env() -> dict[str, str]:
    # An ASCII locale without UTF-8 coercion, as CI runs: output must still be written.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LC_ALL": "C",
            "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from ClinFuseDiffCore.data.synth import generate_cohort

    root = tmp_path_factory.mktemp("exp") / "cohort"
    generate_cohort(root, 40, shape=(32, 32, 24), seed=3, site_shift="mild", progress=False)
    return root


def _numbers(results: dict) -> dict:
    """results.json without timings and paths."""
    r = dict(results)
    for k in ("wall_seconds", "data_seconds", "settings"):
        r.pop(k, None)
    for m in r["diagnostics"].values():
        m.pop("train_seconds_mean", None)
    return r


@pytest.mark.slow
def test_deterministic_rerun_and_resume_of_killed_sweep(cohort, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # Run a in one process, run b (killed, then resumed) in 2 worker jobs: the numbers must agree.
    done = subprocess.run(_cmd(a, cohort, ["sweep.jobs=1"]), env=_env(), capture_output=True, encoding="utf-8",
                          errors="replace", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    res_a = json.loads((a / "results.json").read_text())
    assert res_a["schema"] == "clinfusediff.experiment/1"
    assert res_a["n_patients"] == {"train": 16, "val": 8, "test": 16}
    v = res_a["verdict"]["methods"]
    assert set(v) == {"attention", "mean", "regressor", "diffusion", "oracle_full", "oracle_hidden"}
    for m in v.values():
        for s in ("mean_over_subsets", "mean_singletons", "full_set"):  # linear summaries
            x = m["summaries"][s]
            assert x["low"] <= x["value"] <= x["high"], (s, x)
        for s in ("p10_over_subsets", "hurt_rate"):  # biased at 16 patients: only a valid interval
            x = m["summaries"][s]
            assert 0 <= x["low"] <= x["high"] <= 1, (s, x)
    assert v["attention"]["summaries"]["mean_over_subsets"]["diff_vs_reference"]["value"] == 0.0

    # Kill a second run after its first method unit is written, then continue it.
    proc = subprocess.Popen(_cmd(b, cohort), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = b / "s1_0" / "attention" / "seed0.npz"
    t0 = time.time()
    while not first.exists() and proc.poll() is None and time.time() - t0 < 500:
        time.sleep(0.2)
    assert first.exists(), "the sweep never wrote its first unit"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (b / "results.json").exists()
    # Finished units: every .npz (written last, it marks a unit done), stage 1, and a teacher's
    # weights whose unit finished (a .pt without its .npz belongs to an unfinished unit, which is redone).
    done_pt = [p for p in b.rglob("*.pt") if p.name == "stage1.pt" or p.with_suffix(".npz").exists()]
    before = {p: p.stat().st_mtime_ns for p in [*b.rglob("*.npz"), *done_pt]}
    assert before
    for p in b.glob("s1_*/*/seed*.npz"):  # a killed run leaves only whole unit files (a stray .tmp is never read)
        with np.load(p) as z:
            assert {"val", "test", "meta"} <= set(z.files), p
    done = subprocess.run(_cmd(b, cohort), env=_env(), capture_output=True, encoding="utf-8", errors="replace",
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for p, t in before.items():
        assert p.stat().st_mtime_ns == t, f"{p} was recomputed"
    res_b = json.loads((b / "results.json").read_text())
    # Same command, same seed: the same numbers (an uninterrupted run vs a killed-and-resumed one).
    assert _numbers(res_a) == _numbers(res_b)

    # A rerun into the same folder with other settings is refused, naming the key.
    bad = subprocess.run(_cmd(b, cohort, ["sweep.steps=16"]), env=_env(), capture_output=True, encoding="utf-8", errors="replace",
                         timeout=300)
    assert bad.returncode == 1 and "sweep.steps" in bad.stderr


def test_split_and_dedicated_subsets():
    from ClinFuseDiffCore.evaluation.protocol import enumerate_subsets
    from ClinFuseDiffCore.experiment.data import make_split
    from ClinFuseDiffCore.experiment.sweep import dedicated_subsets

    parts = make_split(50, 20, 10, 15, seed=1)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [20, 10, 15]
    allidx = np.concatenate(list(parts.values()))
    assert len(set(allidx.tolist())) == 45
    assert (make_split(50, 20, 10, 15, seed=1)["test"] == parts["test"]).all()
    subs = enumerate_subsets(["a", "b", "c", "d"])
    ded = dedicated_subsets(subs, 3, seed=0)
    sizes = [len(subs[i]) for i in ded]
    assert sizes.count(1) == 4 and sizes.count(4) == 1 and len(ded) == 8


def test_decoupled_diffusion_gets_no_head_gradient_and_leaves_the_teacher_untouched():
    """The denoiser trains on the diffusion loss alone: the teacher (fusion + head) is frozen and
    bit-identical afterwards, and the imputation moves towards the teacher's full-set fusion."""
    from ClinFuseDiffCore.experiment.methods import FusionHead, TokenData, fit_diffusion, fit_regressor, teacher_full
    from ClinFuseDiffCore.experiment.settings import load_research_config

    cfg, sweep = load_research_config("research", ["sweep.diffusion_steps=120", "sweep.batch_size=64",
                                                   "sweep.samples=2", "diffusion.num_inference_steps=5"])
    torch.manual_seed(0)
    P, M, E = 96, 7, cfg.model.embed_dim
    tokens = torch.randn(P, M, E)
    td = TokenData(tokens, np.ones((P, M), bool), torch.randint(0, 2, (P,)), np.arange(64))
    teacher = FusionHead("attention", cfg, 2).eval()
    snap = {k: v.clone() for k, v in teacher.state_dict().items()}
    _, scorer, meta = fit_diffusion(cfg, sweep, td, 0, teacher)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in snap.items())
    assert all(p.grad is None for p in teacher.parameters())
    av = torch.ones(8, M, dtype=torch.bool)
    z = scorer.impute(tokens[:8], av, torch.Generator().manual_seed(0))  # (K, 8, E)
    zf = teacher_full(teacher, tokens[:8], av)
    cos = torch.nn.functional.cosine_similarity(z, zf.unsqueeze(0), dim=-1).mean().item()
    assert cos > 0.3, cos  # random vectors on the sphere: ~0
    p, ps = scorer(tokens[:8], av, torch.Generator().manual_seed(0))
    assert p.shape == (8,) and ps.shape == (2, 8)
    _, rscorer, _ = fit_regressor(cfg, sweep, td, 0, teacher)
    zr = rscorer.impute(tokens[:8], av, None)
    assert torch.nn.functional.cosine_similarity(zr[0], zf, dim=-1).mean().item() > 0.3


def test_flow_matching_imputer_trains_alone_and_moves_towards_the_full_set_fusion():
    """Rectified flow: the teacher is untouched and gets no gradient; K few-step samples land near
    the teacher's full-set fusion; the Euler step count is the setting's."""
    from ClinFuseDiffCore.experiment.methods import FusionHead, TokenData, fit_flow, teacher_full
    from ClinFuseDiffCore.experiment.settings import load_research_config

    cfg, sweep = load_research_config("research", ["sweep.diffusion_steps=150", "sweep.batch_size=64",
                                                   "sweep.samples=3", "sweep.flow_steps=4"])
    torch.manual_seed(0)
    P, M, E = 96, 7, cfg.model.embed_dim
    tokens = torch.randn(P, M, E)
    td = TokenData(tokens, np.ones((P, M), bool), torch.randint(0, 2, (P,)), np.arange(64))
    teacher = FusionHead("attention", cfg, 2).eval()
    snap = {k: v.clone() for k, v in teacher.state_dict().items()}
    _, scorer, meta = fit_flow(cfg, sweep, td, 0, teacher)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in snap.items())
    assert all(p.grad is None for p in teacher.parameters())
    assert meta["flow_steps"] == 4
    av = torch.ones(8, M, dtype=torch.bool)
    z = scorer.impute(tokens[:8], av, torch.Generator().manual_seed(0))  # (K, 8, E)
    assert z.shape == (3, 8, E)
    zf = teacher_full(teacher, tokens[:8], av)
    assert torch.nn.functional.cosine_similarity(z, zf.unsqueeze(0), dim=-1).mean().item() > 0.3
    p, ps = scorer(tokens[:8], av, torch.Generator().manual_seed(0))
    assert p.shape == (8,) and ps.shape == (3, 8)
    p2, _ = scorer(tokens[:8], av, torch.Generator().manual_seed(0))
    assert torch.equal(p, p2)  # seeded sampling is reproducible


@pytest.mark.parametrize("kind", ["regressor", "flow"])
def test_token_imputer_recovers_missing_modality_tokens_on_a_case_built_for_it(kind):
    """Every modality's token is a fixed linear map of one patient factor, so any one modality
    determines the rest. The imputer recovers the missing tokens (cosine to the real ones well
    above the mean token's), keeps the available ones exactly, and the teacher is untouched."""
    from ClinFuseDiffCore.experiment.methods import FusionHead, TokenData, fit_token_imputer, token_diagnostics
    from ClinFuseDiffCore.experiment.settings import load_research_config

    steps = 1200 if kind == "flow" else 400  # flow matching needs more steps than regression here
    cfg, sweep = load_research_config("research", [f"sweep.diffusion_steps={steps}", "sweep.batch_size=64",
                                                   "sweep.samples=2", "sweep.flow_steps=4", "sweep.lr=3e-3"])
    g = torch.Generator().manual_seed(0)
    P, M, E = 256, 7, cfg.model.embed_dim
    maps = torch.randn(M, 8, E, generator=g)
    factor = torch.randn(P, 8, generator=g)
    tokens = torch.einsum("pk,mke->pme", factor, maps) + 0.05 * torch.randn(P, M, E, generator=g)
    present = np.ones((P, M), bool)
    td = TokenData(tokens, present, torch.randint(0, 2, (P,), generator=g), np.arange(192))
    teacher = FusionHead("attention", cfg, 2).eval()
    snap = {k: v.clone() for k, v in teacher.state_dict().items()}
    _, scorer, meta = fit_token_imputer(kind, cfg, sweep, td, 0, teacher)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in snap.items())
    assert all(p.grad is None for p in teacher.parameters())
    test = np.arange(192, P)
    av = np.zeros((len(test), M), bool)
    av[:, 0] = True
    full = scorer.complete(tokens[test], torch.from_numpy(av), torch.Generator().manual_seed(1))  # (K, n, M, E)
    assert full.shape == ((2 if kind == "flow" else 1), len(test), M, E)
    assert torch.allclose(full[:, :, 0], tokens[test][None, :, 0], atol=1e-5)  # available token kept
    masks = np.eye(M, dtype=bool)
    diag = token_diagnostics(scorer.complete, tokens, present, test, masks, 0)
    assert diag["token_cosine_by_size"][0] > diag["token_cosine_of_mean_token"] + 0.3, diag
    p, ps = scorer(tokens[test], torch.from_numpy(av), torch.Generator().manual_seed(1))
    assert p.shape == (len(test),) and (ps is None) == (kind == "regressor")


def test_mean_token_control_fills_missing_tokens_with_the_training_mean():
    """tokens_mean: missing tokens become the training patients' mean token (test patients never
    enter it); a complete row gives the teacher's full-set fusion itself."""
    from ClinFuseDiffCore.experiment.methods import FusionHead, TokenData, fit_mean_tokens, teacher_full
    from ClinFuseDiffCore.experiment.settings import load_research_config

    cfg, _ = load_research_config("research", [])
    torch.manual_seed(0)
    P, M, E = 40, 7, cfg.model.embed_dim
    tokens = torch.randn(P, M, E)
    td = TokenData(tokens, np.ones((P, M), bool), torch.randint(0, 2, (P,)), np.arange(30))
    teacher = FusionHead("attention", cfg, 2).eval()
    _, scorer, _ = fit_mean_tokens(td, teacher)
    full = torch.ones(10, M, dtype=torch.bool)
    assert torch.allclose(scorer.impute(tokens[30:], full, None)[0], teacher_full(teacher, tokens[30:], full), atol=1e-6)
    av = full.clone()
    av[:, 2:] = False
    expect = tokens[30:].clone()
    expect[:, 2:] = tokens[:30, 2:].mean(0)
    assert torch.allclose(scorer.impute(tokens[30:], av, None)[0], teacher_full(teacher, expect, full), atol=1e-5)
    tokens2 = tokens.clone()
    tokens2[30:] += 100.0  # test patients' tokens do not enter the mean
    _, sc2, _ = fit_mean_tokens(TokenData(tokens2, td.present, td.labels, td.train), teacher)
    assert torch.allclose(sc2.impute(tokens[30:], av, None), scorer.impute(tokens[30:], av, None))


def test_nested_masks_add_one_modality_the_patient_has():
    from ClinFuseDiffCore.experiment.methods import nested_masks

    rng = np.random.default_rng(0)
    present = rng.random((200, 7)) < 0.7
    present[:, 0] = True
    cond = present & (rng.random((200, 7)) < 0.5)
    cond[~cond.any(1), 0] = True
    sup = nested_masks(cond, present, rng)
    assert not (cond & ~sup).any()  # a superset
    assert not (sup & ~present).any()  # of what the patient has
    grow = sup.sum(1) - cond.sum(1)
    can = (present & ~cond).any(1)
    assert (grow[can] == 1).all() and (grow[~can] == 0).all()


def test_crossfit_head_never_trains_on_a_patients_own_imputations():
    """Each fold imputer imputes only patients it did not fit; together they impute every
    training patient; the teacher stays untouched and the scorer gives K samples."""
    from ClinFuseDiffCore.experiment.methods import FusionHead, TokenData, crossfit_folds, fit_crossfit_head
    from ClinFuseDiffCore.experiment.settings import load_research_config

    cfg, sweep = load_research_config("research", ["sweep.diffusion_steps=20", "sweep.steps=20", "sweep.batch_size=32"])
    torch.manual_seed(0)
    P, M, E = 60, 7, cfg.model.embed_dim
    tokens = torch.randn(P, M, E)
    train = np.arange(40)
    td = TokenData(tokens, np.ones((P, M), bool), torch.randint(0, 2, (P,)), train)
    folds = crossfit_folds(train, 2, 0)
    assert sorted(np.concatenate(folds).tolist()) == train.tolist()
    teacher = FusionHead("attention", cfg, 2).eval()
    snap = {k: v.clone() for k, v in teacher.state_dict().items()}
    head, scorer, meta = fit_crossfit_head("regressor", cfg, sweep, td, 0, teacher, folds=2, draws=2)
    seen = np.zeros(P, int)
    for part in scorer.plan:
        assert not set(part["fit"].tolist()) & set(part["imputed"].tolist())
        seen[part["imputed"]] += 1
    assert (seen[train] == 1).all() and (seen[40:] == 0).all()  # every training patient once, no test patient
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in snap.items())
    p, ps = scorer(tokens[40:], torch.ones(20, M, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert p.shape == (20,) and ps.shape == (2, 20)  # one sample per fold imputer
    assert meta["imputations"] == 40 * 2


@pytest.mark.slow
def test_external_shifted_cohort_scores_kept_models_and_tunes_ttt_on_its_validation_site(cohort, tmp_path):
    """`experiment --external`: the finished sweep's attention models (plain, nested, + MiDl TTT
    episodic and online) are scored on a strongly shifted cohort; its first site is the
    validation site, the others the test; a method whose weights the sweep did not keep is named
    and left out."""
    from ClinFuseDiffCore.data.synth import generate_cohort

    shifted = tmp_path / "shifted"
    generate_cohort(shifted, 30, shape=(32, 32, 24), seed=9, site_shift="strong", progress=False)
    sweep_dir = tmp_path / "sweep"
    run = subprocess.run(_cmd(sweep_dir, cohort, ["sweep.methods=[attention]", "sweep.seeds=[0]"]), env=_env(),
                         capture_output=True, encoding="utf-8", errors="replace", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    ext = subprocess.run(_cmd(sweep_dir, cohort, ["sweep.methods=[attention]", "sweep.seeds=[0]"])
                         + ["--external", str(shifted), "--external-out", str(tmp_path / "ext")],
                         env=_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=900)
    assert ext.returncode == 0, ext.stderr[-3000:]
    assert "attention_nested" in ext.stderr and "left out" in ext.stderr  # no nested weights in this sweep
    info = json.loads((tmp_path / "ext" / "external.json").read_text())
    assert info["validation_site"] == ["site_0"] and info["n_val"] + info["n_test"] == 30
    res = json.loads((tmp_path / "ext" / "results.json").read_text())
    assert set(res["verdict"]["methods"]) == {"attention", "attention_ttt", "attention_ttt_online"}
    assert res["n_patients"]["test"] == info["n_test"]
    for m in ("attention_ttt", "attention_ttt_online"):
        d = res["diagnostics"][m]
        assert d["chosen_per_seed"][0]["params"] in ("norm", "norm_qkv")
        assert 0 <= d["test_accept_rate_per_seed"][0] <= 1
    # Nothing was trained on the external cohort: the sweep's files are untouched.
    assert not (sweep_dir / "s1_0" / "attention_ttt").exists()


def test_unseen_combinations_are_never_drawn_in_training():
    from ClinFuseDiffCore.experiment.methods import TokenData, _batches
    from ClinFuseDiffCore.experiment.settings import load_research_config
    from ClinFuseDiffCore.experiment.sweep import unseen_subset_masks

    cfg, sweep = load_research_config("research", ["sweep.batch_size=512"])
    mods = cfg.data.modalities
    ex = unseen_subset_masks(sweep.unseen, mods)
    assert ex.shape == (6, len(mods)) and not ex[:, [mods.index(m) for m in mods if m.startswith("mri")]].any()
    P = 300
    td = TokenData(torch.zeros(P, len(mods), 4), np.ones((P, len(mods)), bool), torch.zeros(P, dtype=torch.long),
                   np.arange(P))
    get = _batches(td, sweep, 0, "uniform_subsets", excluded=ex)
    drawn = np.concatenate([get(s)[1].numpy() for s in range(20)])  # 10,240 draws
    hit = (drawn[:, None, :] == ex[None]).all(-1).any(1)
    assert not hit.any()
    plain = np.concatenate([_batches(td, sweep, 0, "uniform_subsets")(s)[1].numpy() for s in range(20)])
    assert (plain[:, None, :] == ex[None]).all(-1).any(1).sum() > 100  # ~6/127 of draws otherwise
    with pytest.raises(ValueError, match="sweep.unseen names"):
        unseen_subset_masks([["ct", "spect"]], mods)


def test_settings_added_since_a_run_at_their_default_are_not_a_change(tmp_path):
    """A sweep folder written before a setting existed (config or sweep section) is continued when
    the new setting is at its default, and refused, naming it, when it is not."""
    from ClinFuseDiffCore.experiment.settings import load_research_config
    from ClinFuseDiffCore.experiment.sweep import _check_settings

    cfg, sweep = load_research_config("research")
    _check_settings(tmp_path, cfg, sweep)
    old = json.loads((tmp_path / "settings.json").read_text())
    del old["config"]["ttt"]["midl_lr"], old["sweep"]["unseen"]  # as written by an older version
    (tmp_path / "settings.json").write_text(json.dumps(old))
    _check_settings(tmp_path, cfg, sweep)  # same settings + new keys at their defaults: accepted
    (tmp_path / "settings.json").write_text(json.dumps(old))
    cfg2, _ = load_research_config("research", ["ttt.midl_lr=0.5"])
    with pytest.raises(ValueError, match="config.ttt"):
        _check_settings(tmp_path, cfg2, sweep)
    _, sweep2 = load_research_config("research", ["sweep.steps=7"])
    with pytest.raises(ValueError, match="sweep.steps"):
        _check_settings(tmp_path, cfg, sweep2)
