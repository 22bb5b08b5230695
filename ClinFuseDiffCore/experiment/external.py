"""The finished sweep's models on an external cohort (e.g. strongly shifted scanner sites).

Nothing is trained on the external cohort. Its patients are encoded by the sweep's stage-1
encoders (tabular blocks normalised as the training cohort was), then each method whose weights
the sweep kept is scored on every modality subset:

* ``attention``             the dropout-trained attention model (the reference);
* ``attention_nested``      attention trained so that adding a modality does not hurt;
* ``attention_ttt``         attention + episodic MiDl TTT, settings tuned on the validation site;
* ``attention_ttt_online``  attention + online MiDl TTT per (subset, site) stream, likewise.

The external cohort's first site (sorted names) is the **validation site**: TTT's parameter set,
learning rate and acceptance threshold are chosen there; the other sites are the **test sites**.
Units are files (``<out>/s1_<k>/<method>/seed<r>.npz``), so a killed run continues; the verdict
(``results.json`` / ``results.md``) uses the same hierarchical bootstrap as the sweep.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..utils import atomic_write_json
from .data import load_tensors, prepare_data, save_tensors
from .methods import FusionHead, run_ttt, score_subsets, tune_ttt
from .sweep import Progress, _save_npz

log = logging.getLogger(__name__)

EXTERNAL_METHODS = ("attention", "attention_nested", "attention_ttt", "attention_ttt_online")


def _reference_tables(cfg, sweep_out: Path) -> tuple[dict, list[str]]:
    """The training cohort's tabular tables and training IDs (for the tabular normalisers)."""
    from ..data.discovery import load_cohort
    from ..modalities import ModalityRegistry

    d = cfg.data
    root = Path(d.root) if d.root else sweep_out / "cohort"
    registry = ModalityRegistry.from_config(d)
    cohort = load_cohort(dataclasses.replace(d, root=str(root)), registry)
    split = json.loads((sweep_out / "split.json").read_text(encoding="utf-8"))
    return cohort.tables, list(split["train"])


def run_external(cfg, sweep, sweep_out: str | Path, external_root: str | Path, out_dir: str | Path, *,
                 methods: Optional[list[str]] = None, progress: bool = True) -> dict[str, Any]:
    """Score the sweep's kept models on ``external_root`` and write the verdict into ``out_dir``."""
    from ..evaluation.protocol import enumerate_subsets
    from ..ttt.midl import MiDlTTT
    from .stage1 import Stage1Model, encode_all
    from .verdict import write_verdict

    t_start = time.perf_counter()
    sweep_out, out = Path(sweep_out), Path(out_dir)
    methods = list(methods or EXTERNAL_METHODS)
    bad = sorted(set(methods) - set(EXTERNAL_METHODS))
    if bad:
        raise ValueError(f"external methods {bad} not in {list(EXTERNAL_METHODS)}")
    missing = {}
    for m in methods:
        src = "attention_nested" if m == "attention_nested" else "attention"
        gone = [sweep_out / f"s1_{s1}" / src / f"seed{r}.pt" for s1 in sweep.stage1_seeds for r in sweep.seeds
                if not (sweep_out / f"s1_{s1}" / src / f"seed{r}.pt").is_file()]
        if gone:
            missing[m] = gone
    if len(missing) == len(methods):
        raise FileNotFoundError(f"{sweep_out} has no finished attention models for seeds {sweep.seeds} "
                                f"(e.g. {next(iter(missing.values()))[0]}): run the sweep first")
    if missing:
        log.warning("left out (the sweep has not saved their weights yet; rerun later to add them): %s",
                    "; ".join(f"{m} ({len(v)} missing, e.g. {v[0]})" for m, v in missing.items()))
        methods = [m for m in methods if m not in missing]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(sweep.threads))
    tables, train_ids = _reference_tables(cfg, sweep_out)
    t0 = time.perf_counter()
    data = prepare_data(cfg, sweep, out, progress=progress, external={
        "root": Path(external_root), "cache": out / "cache", "reference_tables": tables,
        "reference_train_ids": train_ids})
    data_seconds = time.perf_counter() - t0
    subsets = enumerate_subsets(data.modalities)
    masks = np.array([[m in s for m in data.modalities] for s in subsets], dtype=bool)
    val_idx, test_idx = data.parts["val"], data.parts["test"]
    sw = dataclasses.replace(sweep, methods=methods, reference="attention")
    atomic_write_json(out / "external.json", {
        "external_root": str(external_root), "sweep": str(sweep_out),
        "validation_site": sorted(set(data.sites or []))[:1], "n_val": int(len(val_idx)),
        "n_test": int(len(test_idx)), "sites": {s: int(n) for s, n in zip(*np.unique(data.sites, return_counts=True))}})

    units = [(m, (s1, r)) for s1 in sweep.stage1_seeds for r in sweep.seeds for m in methods]
    prog = Progress([("stage1", s1) for s1 in sweep.stage1_seeds] + units, progress)
    prog.say(f"external cohort: {len(data.ids)} patients ({len(val_idx)} validation site / {len(test_idx)} test sites)")
    for s1 in sweep.stage1_seeds:
        t_unit = time.perf_counter()
        f = out / f"s1_{s1}" / "tokens.pt"
        if not f.exists():
            st = load_tensors(sweep_out / f"s1_{s1}" / "stage1.pt")
            net = Stage1Model(cfg, data)
            net.load_state_dict(st["state"])
            save_tensors(f, {"tokens": encode_all(net, data)})
            prog.finish("stage1", time.perf_counter() - t_unit, f"encode with stage-1 seed {s1}")
        else:
            prog.finish("stage1", None, f"encode with stage-1 seed {s1}")
        tokens = load_tensors(f)["tokens"]
        y_val = data.labels[val_idx]
        for r in sweep.seeds:
            seed = 1000 * int(s1) + int(r)
            for m in methods:
                t_unit = time.perf_counter()
                uf = out / f"s1_{s1}" / m / f"seed{r}.npz"
                if uf.exists():
                    prog.finish(m, None, f"{m} seed {r}")
                    continue
                net = FusionHead("attention", cfg, 2)
                src = "attention_nested" if m == "attention_nested" else "attention"
                net.load_state_dict(load_tensors(sweep_out / f"s1_{s1}" / src / f"seed{r}.pt"))
                net.eval()
                meta: dict[str, Any] = {}
                if m in ("attention", "attention_nested"):
                    def scorer(tok, av, g, net=net):
                        with torch.no_grad():
                            return torch.softmax(net(tok, av), -1)[:, 1], None
                    vs, _ = score_subsets(scorer, tokens, data.present, val_idx, masks, seed)
                    ts, _ = score_subsets(scorer, tokens, data.present, test_idx, masks, seed + 7)
                else:
                    mode = "online" if m.endswith("online") else "episodic"
                    settings, meta = tune_ttt(net, tokens, data.present, val_idx, y_val, masks, seed, mode, data.sites)
                    ttt = MiDlTTT(net.fusion, net.head, settings)
                    rv = run_ttt(ttt, tokens, data.present, val_idx, masks, seed, mode, data.sites)
                    rt = run_ttt(ttt, tokens, data.present, test_idx, masks, seed + 7, mode, data.sites)
                    vs, ts = rv["p"], rt["p"]
                    meta.update(test_accept_rate=float(rt["accepted"].mean()),
                                test_mean_abs_change=float(np.abs(rt["p"] - rt["stored"]).mean()))
                meta["seconds"] = time.perf_counter() - t_unit
                _save_npz(uf, val=vs, test=ts, meta=np.array(json.dumps(meta)))
                prog.finish(m, time.perf_counter() - t_unit, f"{m} seed {r}")
    title = (f"External cohort {Path(external_root).name} — {len(test_idx)} test-site patients, "
             f"{len(sweep.seeds)} training seeds, {len(subsets)} subsets (TTT tuned on the validation site, "
             f"{len(val_idx)} patients)")
    return write_verdict(out, cfg, sw, data, subsets, [], wall_seconds=time.perf_counter() - t_start,
                         data_seconds=data_seconds, progress=prog.say, title=title)
