"""The all-subsets protocol: subset enumeration, summaries on hand-checked tables, the runner."""

import math

import pytest
import torch

from ClinFuseDiffCore.evaluation import protocol as P


def test_enumerate_subsets_count_order_and_uniqueness():
    mods = ["mri_t1", "mri_t1ce", "mri_t2", "mri_flair", "ct", "pet", "clinical"]
    subs = P.enumerate_subsets(mods)
    assert len(subs) == 2**7 - 1
    assert len(set(subs)) == len(subs)  # each once
    assert subs[:7] == [(m,) for m in mods]  # singletons in config order
    assert subs[7] == ("mri_t1", "mri_t1ce")  # then pairs, lexicographic by position
    assert subs[-1] == tuple(mods)  # full set last
    sizes = [len(s) for s in subs]
    assert sizes == sorted(sizes)
    for s in subs:  # names inside a subset keep the modality order
        assert list(s) == sorted(s, key=mods.index)


def test_enumerate_subsets_small_exact():
    assert P.enumerate_subsets(["a", "b", "c"]) == [
        ("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")
    ]
    with pytest.raises(ValueError, match="duplicates"):
        P.enumerate_subsets(["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        P.enumerate_subsets([])


def test_subset_masks_and_flatten_pairs_skip_unavailable():
    mods = ["a", "b", "c"]
    subs = P.enumerate_subsets(mods)
    masks = P.subset_masks(subs, mods)
    assert masks.tolist()[3] == [True, True, False]
    # patient 0 has everything, patient 1 lacks "a" and "b" (only "c").
    pav = torch.tensor([[True, True, True], [False, False, True]])
    s_idx, p_idx, avail = P.flatten_pairs(masks, pav)
    pairs = list(zip(s_idx.tolist(), p_idx.tolist()))
    # patient 1 appears only for subsets containing "c": c, a+c, b+c, a+b+c = indices 2, 4, 5, 6
    assert [s for s, p in pairs if p == 1] == [2, 4, 5, 6]
    assert [s for s, p in pairs if p == 0] == list(range(7))
    # its availability is the intersection: only "c"
    for (s, p), a in zip(pairs, avail.tolist()):
        if p == 1:
            assert a == [False, False, True]
    with pytest.raises(ValueError, match="not one of"):
        P.subset_masks([("a", "z")], mods)


def _table(values):
    return {k: {"auroc": v[0], "ece": v[1]} for k, v in values.items()}


def test_summaries_hand_checked_two_modalities():
    mods = ["a", "b"]
    subs = P.enumerate_subsets(mods)
    table = _table({"a": (0.8, 0.10), "b": (0.6, 0.20), "a+b": (0.7, 0.05)})
    s = P.summarise_subsets(table, subs, mods, excluded=[["b"]])
    au = s["auroc"]
    assert au["mean"] == pytest.approx(0.7)
    assert au["worst"] == pytest.approx(0.6) and au["worst_subset"] == "b"
    assert au["full"] == pytest.approx(0.7)
    assert au["drop_vs_full"] == pytest.approx(0.0)
    assert au["drop_vs_full_worst"] == pytest.approx(0.1)
    # pairs: a -> a+b (0.8 -> 0.7 hurts), b -> a+b (0.6 -> 0.7 helps)
    assert au["harm_pairs"] == 2 and au["harm_rate"] == pytest.approx(0.5)
    assert au["seen_mean"] == pytest.approx(0.75) and au["unseen_mean"] == pytest.approx(0.6)
    assert au["absent"] == {"a": pytest.approx(0.6), "b": pytest.approx(0.8)}
    ece = s["ece"]  # lower is better
    assert ece["worst"] == pytest.approx(0.20) and ece["worst_subset"] == "b"
    assert ece["drop_vs_full"] == pytest.approx((0.10 + 0.20 + 0.05) / 3 - 0.05)
    assert ece["harm_rate"] == 0.0


def test_harm_rate_counts_all_pairs_and_skips_nan():
    mods = ["a", "b", "c"]
    subs = P.enumerate_subsets(mods)
    # metric = number of modalities, except "a+b" which is worse than both a and b
    vals = {P.subset_key(s): float(len(s)) for s in subs}
    vals["a+b"] = 0.5
    s = P.summarise_subsets({k: {"auroc": v} for k, v in vals.items()}, subs, mods)
    # 3 * 2^2 - 3 = 9 pairs; harmful: a->a+b, b->a+b  (a+b -> a+b+c helps)
    assert s["auroc"]["harm_pairs"] == 9
    assert s["auroc"]["harm_rate"] == pytest.approx(2 / 9)
    vals["c"] = float("nan")  # drops the pairs that start or end at "c"
    s = P.summarise_subsets({k: {"auroc": v} for k, v in vals.items()}, subs, mods)
    # pairs with c as an endpoint: (c, a+c), (c, b+c) -> 7 pairs left
    assert s["auroc"]["harm_pairs"] == 7
    assert s["auroc"]["harm_rate"] == pytest.approx(2 / 7)
    seven = [f"m{i}" for i in range(7)]
    s7 = P.summarise_subsets(
        {P.subset_key(x): {"auroc": 0.5} for x in P.enumerate_subsets(seven)},
        P.enumerate_subsets(seven), seven,
    )
    assert s7["auroc"]["harm_pairs"] == 7 * 2**6 - 7  # 441
    assert s7["auroc"]["harm_rate"] == 0.0  # ties are not harm


def test_interval_student_t_hand_value():
    iv = P.interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * sd(=1) / sqrt(3)
    assert iv["mean"] == pytest.approx(2.0) and iv["std"] == pytest.approx(1.0)
    assert iv["ci_low"] == pytest.approx(2.0 - half) and iv["ci_high"] == pytest.approx(2.0 + half)
    one = P.interval([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["ci_low"]) and one["n"] == 1
    assert P.interval([float("nan"), 1.0, 3.0])["n"] == 2


def test_aggregate_summaries_over_seeds():
    mods = ["a", "b"]
    subs = P.enumerate_subsets(mods)
    s1 = P.summarise_subsets(_table({"a": (0.8, .1), "b": (0.6, .2), "a+b": (0.7, .1)}), subs, mods)
    s2 = P.summarise_subsets(_table({"a": (0.6, .1), "b": (0.8, .2), "a+b": (0.9, .1)}), subs, mods)
    agg = P.aggregate_summaries([s1, s2])
    assert agg["auroc"]["mean"]["mean"] == pytest.approx((0.7 + 2.3 / 3) / 2)
    assert agg["auroc"]["worst_subset"] == ["b", "a"]
    assert agg["auroc"]["harm_rate"]["mean"] == pytest.approx(0.25)


def _accuracy_metric(out, targets, p):
    pred = out.probs.argmax(-1)
    return {"accuracy": float((pred == targets.target[p]).float().mean())}


def _toy_method(name, tokens, calls, chunk_size=1000):
    """p(class 1) = sigmoid(mean over available modalities of token[..., 0])."""

    def fn(tok, avail, row_seeds):
        calls.append(int(tok.shape[0]))
        a = avail.float()  # (N, M)
        s = (tok[..., 0] * a).sum(-1) / a.sum(-1)
        p1 = torch.sigmoid(4 * s)
        return P.MethodOutput(probs=torch.stack([1 - p1, p1], -1), uncertainty=1.0 / a.sum(-1))

    return P.Method(name, tokens, fn, chunk_size=chunk_size)


def test_evaluate_all_subsets_end_to_end_hand_checked():
    mods = ["a", "b"]
    # modality "a" is informative (+1 for label 1, -1 for label 0); "b" is inverted noise.
    target = torch.tensor([1, 0, 1, 0])
    tokens = torch.zeros(4, 2, 3)
    tokens[:, 0, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    tokens[:, 1, 0] = torch.tensor([-3.0, 3.0, 0.5, 0.5])
    pav = torch.tensor([[True, True], [True, True], [True, True], [False, True]])  # p3 lacks a
    calls: list[int] = []
    methods = {0: [_toy_method("toy", tokens, calls)], 1: [_toy_method("toy", tokens, calls, 2)]}
    res = P.evaluate_all_subsets(methods, pav, P.Targets("classification", target), mods,
                                 metric_fn=_accuracy_metric, excluded_combinations=[["b"]])
    assert res["subsets"] == ["a", "b", "a+b"]
    ps = res["per_seed"]["0"]["toy"]
    # subset a: p0..p2 (p3 has no "a": skipped) -> all correct
    assert ps["a"]["n_patients"] == 3 and ps["a"]["metrics"]["accuracy"] == 1.0
    # subset b: all four; b predicts p0 wrong, p1 wrong, p2 (0.5 -> class 1) right, p3 (0.5->1) wrong
    assert ps["b"]["n_patients"] == 4 and ps["b"]["metrics"]["accuracy"] == pytest.approx(0.25)
    # a+b: means -1, 1, 0.75, p3 only b: 0.5 -> preds 0,1,1,1 -> p0 wrong, p1 wrong? label 0 pred 1
    assert ps["a+b"]["n_patients"] == 4 and ps["a+b"]["n_complete"] == 3
    assert ps["a+b"]["metrics"]["accuracy"] == pytest.approx(0.25)
    # 11 pairs, but p3's "a+b" episode is its "b" episode (it only has b): 10 distinct episodes
    assert calls[:1] == [10]  # one call with every episode for chunk_size 1000
    assert calls[1:] == [2] * 5  # chunked second seed: 10 episodes in chunks of 2
    # both seeds see the same numbers: interval has zero width
    acc = res["per_subset"]["toy"]["b"]["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.25) and acc["std"] == 0.0
    summ = res["summary"]["toy"]["accuracy"]
    assert summ["mean"]["mean"] == pytest.approx(0.5)
    assert summ["unseen_mean"]["mean"] == pytest.approx(0.25)
    assert res["per_subset"]["toy"]["b"]["seen"] is False
    # uncertainty = 1 / number available: by size 1 -> 1.0, size 2 -> mixes 1/2 and p3's 1/1
    u = res["uncertainty_by_size"]["toy"]
    assert u["1"]["mean"] == pytest.approx(1.0) and u["2"]["mean"] == pytest.approx(0.625)
    rel = res["reliability"]["toy"]
    assert sum(rel["count"]) == 22  # pooled over 2 seeds x 11 (subset, patient) rows
    assert res["patients_missing_modalities"] == 1


def test_evaluate_rejects_mismatched_methods():
    tok = torch.zeros(2, 2, 1)
    calls: list[int] = []
    with pytest.raises(ValueError, match="expected"):
        P.evaluate_all_subsets(
            {0: [_toy_method("x", tok, calls)], 1: [_toy_method("y", tok, calls)]},
            torch.ones(2, 2, dtype=torch.bool), P.Targets("classification", torch.tensor([0, 1])),
            ["a", "b"], metric_fn=_accuracy_metric,
        )


def test_write_report_files(tmp_path):
    import csv
    import json

    from ClinFuseDiffCore.evaluation.report import write_report

    mods = ["a", "b"]
    target = torch.tensor([1, 0, 1, 0])
    tokens = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []
    methods = {s: [_toy_method("toy", tokens, calls), _toy_method("other", -tokens, calls)]
               for s in (0, 1, 2)}
    res = P.evaluate_all_subsets(methods, torch.ones(4, 2, dtype=torch.bool),
                                 P.Targets("classification", target), mods,
                                 metric_fn=_accuracy_metric, reference_method="toy")
    res["primary_metric"] = "accuracy"
    paths = write_report(res, tmp_path / "out")
    loaded = json.loads(paths["json"].read_text(encoding="utf-8"))  # standard JSON (NaN written as null)
    assert loaded["subsets"] == ["a", "b", "a+b"] and loaded["seeds"] == [0, 1, 2]
    assert "toy - other" in loaded["comparisons"]
    rows = list(csv.DictReader(paths["csv"].open()))
    # 2 methods x 3 subsets x (accuracy, mean_uncertainty, mean_entropy)
    assert len(rows) == 18 and {r["metric"] for r in rows} == {"accuracy", "mean_uncertainty",
                                                                "mean_entropy"}
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "| a+b | 2 | yes | 4 |" in md and "## accuracy ↑" in md
    for k in ("heatmap", "reliability", "uncertainty"):
        assert paths[k].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multi_output_method_row_seeds_and_chunk_invariance():
    mods = ["a", "b", "c"]
    tokens = torch.zeros(3, 3, 2)
    pav = torch.tensor([[True, True, True], [True, False, True], [False, False, True]])
    seen_seeds: list[torch.Tensor] = []

    def fn(tok, avail, row_seeds):
        seen_seeds.append(row_seeds.clone())
        # "random" output from the row seed only: equal across chunkings iff the seeds are
        u = torch.stack([torch.rand(1, generator=torch.Generator().manual_seed(int(s)))[0]
                         for s in row_seeds])
        p = torch.stack([1 - u, u], -1)
        return {"x": P.MethodOutput(probs=p), "x+y": P.MethodOutput(probs=p.flip(-1))}

    def run(chunk):
        seen_seeds.clear()
        m = P.Method("x", tokens, fn, chunk_size=chunk, also=("x+y",))
        s_idx, p_idx, av, outs, _ = P.run_method(m, P.subset_masks(P.enumerate_subsets(mods), mods),
                                                 pav, seed=4)
        return s_idx, p_idx, av, outs, torch.cat(seen_seeds)

    s1, p1, av1, o1, seeds1 = run(1)
    s2, p2, av2, o2, seeds2 = run(100)
    assert torch.equal(o1["x"].probs, o2["x"].probs) and torch.equal(seeds1, seeds2)
    assert len(set(seeds1.tolist())) == len(seeds1)  # one seed per distinct episode
    assert torch.allclose(o1["x+y"].probs, o1["x"].probs.flip(-1))
    # patient 2 only has c: its 4 pairs (c, a+c, b+c, a+b+c) are one episode with one output
    rows = (p1 == 2).nonzero().flatten()
    assert len(rows) == 4 and bool((o1["x"].probs[rows] == o1["x"].probs[rows[0]]).all())
    tg = P.Targets("classification", torch.tensor([0, 1, 0]))
    res = P.evaluate_all_subsets({0: [P.Method("x", tokens, fn, also=("x+y",))]}, pav, tg, mods,
                                 metric_fn=_accuracy_metric)
    assert res["methods"] == ["x", "x+y"] and res["reference_method"] == "x+y"
    acc = lambda m: res["per_seed"]["0"][m]["a+b+c"]["metrics"]["accuracy"]  # noqa: E731
    # two classes: flipping the probabilities flips every prediction
    assert acc("x") + acc("x+y") == pytest.approx(1.0)


def test_default_metrics_name_missing_targets_or_outputs():
    p = torch.arange(3)
    surv = P.default_metric_fn("survival")
    with pytest.raises(ValueError, match=r"Targets\.event"):
        surv(P.MethodOutput(risk=torch.zeros(3)), P.Targets("survival", time=torch.ones(3)), p)
    cls = P.default_metric_fn("classification")
    with pytest.raises(ValueError, match=r"MethodOutput\.probs"):
        cls(P.MethodOutput(risk=torch.zeros(3)), P.Targets("classification", target=torch.zeros(3).long()), p)
    out = cls(P.MethodOutput(probs=torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])),
              P.Targets("classification", target=torch.tensor([0, 1, 1])), p)
    assert out["auroc"] == pytest.approx(1.0) and out["balanced_accuracy"] == pytest.approx(1.0)
