"""The steps and headline numbers of E2 (label efficiency) and E6 (leave one marker out) on exact,
hand-made tables: no training, no network passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seglab import SeglabError
from seglab.config.settings import TrainSettings
from seglab.experiments import e2_label_efficiency as e2
from seglab.experiments import e6_leave_one_marker_out as e6
from seglab.plots import efficiency as plots_efficiency
from seglab.segment import finetuning

PARAMS = {"cohort_dir": "data/cohorts/does-not-exist", "baseline_model": "generalist", "epochs": 2, "seed": 0,
          "budgets": [12, 4, 12], "repeats": 2, "reference_full_data": True, "rescore_per_image": True,
          "n_jobs": 1, "torch_threads": 1, "lomo_markers": ["neun", "gfap"]}


def _runs() -> pd.DataFrame:
    """Two budgets x two repeats with round AP values."""
    return pd.DataFrame({"budget": [4, 4, 12, 12], "budget_seed": [0, 1, 0, 1],
                         "ap_pooled": [0.5, 0.7, 0.8, 0.8], "ap_mean": [0.4, 0.6, 0.75, 0.85]})


def _references(with_generic: bool = True) -> e2.References:
    scores = {"baseline": {"ap_pooled": 0.123456, "ap_mean": 0.2}}
    if with_generic:
        scores["finetuned_generic"] = {"ap_pooled": 0.876549, "ap_mean": 0.9, "n_train_tiles": 72}
    return e2.References(scores=scores, table=pd.DataFrame(), generic_record=None)


def _fit(cached: bool, fit_s: float = 1.0, path: str = "m.pt") -> dict:
    return {"path": Path(path), "cached": cached, "fit_s": fit_s}


# ---- E2 ---------------------------------------------------------------------------------

def test_e2_finetune_jobs_are_the_work_items_without_a_cohort():
    jobs = e2.finetune_jobs(PARAMS, [4, 12])
    training = TrainSettings.from_params(PARAMS)
    assert [(j["variant"], j.get("budget"), j.get("budget_seed")) for j in jobs] == [
        ("label_budget", 4, 0), ("label_budget", 4, 1), ("label_budget", 12, 0), ("label_budget", 12, 1),
        ("generic", None, None)]
    # rescored models skip training's own validation pass; the reference is E1's generic model
    assert all(j["validate"] is False for j in jobs[:-1]) and all(j["training"] == training for j in jobs)
    assert jobs[-1] == finetuning.reference_job("generalist", PARAMS["cohort_dir"], training=training)
    assert e2.finetune_jobs({**PARAMS, "rescore_per_image": False}, [4])[0]["validate"] is True
    assert len(e2.finetune_jobs({**PARAMS, "reference_full_data": False}, [4, 12])) == 4
    # the cohort does not exist: budgets sorted and unique, as check_budgets gives them
    items = e2.work_items(PARAMS)
    assert [i.label for i in items] == ["budget=4 repeat=0", "budget=4 repeat=1", "budget=12 repeat=0",
                                        "budget=12 repeat=1", "reference=finetuned_generic"]
    assert [i.args for i in items] == jobs


def test_e2_learning_curve_plateaus_and_description():
    curve = e2.learning_curve(_runs())
    assert list(curve["metric"]) == ["ap_pooled", "ap_pooled", "ap_mean", "ap_mean"]
    assert list(curve["budget"]) == [4, 12, 4, 12] and list(curve["n_repeats"]) == [2, 2, 2, 2]
    assert np.allclose(curve["mean"], [0.6, 0.8, 0.5, 0.8])
    assert np.allclose(curve["sd"], [np.std([0.5, 0.7], ddof=1), 0.0, np.std([0.4, 0.6], ddof=1),
                                     np.std([0.75, 0.85], ddof=1)])
    # best means 0.8 (budget 12) on both curves; 4 is 0.2 / 0.3 below
    assert e2.plateaus(curve, 0.02) == {"ap_pooled": 12, "ap_mean": 12}
    assert e2.plateaus(curve, 0.25) == {"ap_pooled": 4, "ap_mean": 12}
    assert e2.describe_plateau(curve, {"ap_pooled": 12, "ap_mean": 12}, 0.02) == (
        "plateau (pooled AP): 12 tiles, within 0.02 AP of the best mean 0.800 (budget 12); per-tile mean: 12 tiles")


def test_e2_reference_lines_name_the_models_per_panel():
    lines = e2.reference_lines(_references(), 72)
    assert lines == {"ap_pooled": {"baseline (no fine-tuning)": 0.123456, "fine-tuned on all 72 tiles": 0.876549},
                     "ap_mean": {"baseline (no fine-tuning)": 0.2, "fine-tuned on all 72 tiles": 0.9}}
    assert e2.reference_lines(_references(False), 72)["ap_pooled"] == {"baseline (no fine-tuning)": 0.123456}


def test_e2_marker_curve_pools_counts_per_draw_then_averages():
    rows = [  # (budget, seed, marker, tp, fp, fn) at IoU 0.5, two tiles of marker a in draw (4, 0)
        (4, 0, "a", 3, 1, 0), (4, 0, "a", 1, 0, 1), (4, 1, "a", 2, 0, 0), (4, 0, "b", 0, 0, 0),
        (4, 1, "b", 1, 1, 0), (12, 0, "a", 5, 0, 0)]
    per_image = pd.DataFrame(rows, columns=["budget", "budget_seed", "marker", "tp", "fp", "fn"]).assign(threshold=0.5)
    noise = per_image.assign(threshold=0.75, tp=0)   # another threshold: ignored
    curve = e2.marker_curve(pd.concat([per_image, noise], ignore_index=True))
    got = {(r.marker, r.budget): (r.mean, r.min, r.max) for r in curve.itertuples()}
    # a, 4: draw 0 pools 4 / (4 + 1 + 1) = 2/3, draw 1 is 1; b, 4: draw 0 has no objects (0), draw 1 is 1/2
    assert got.keys() == {("a", 4), ("a", 12), ("b", 4)}
    assert np.allclose(got[("a", 4)], ((2 / 3 + 1) / 2, 2 / 3, 1.0))
    assert np.allclose(got[("b", 4)], (0.25, 0.0, 0.5))
    assert np.allclose(got[("a", 12)], (1.0, 1.0, 1.0))
    fig = plots_efficiency.plot_marker_learning_curve(curve, [4, 12])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["4", "12"]
    assert fig.axes[0].get_legend_handles_labels()[1] == ["a", "b"]
    with pytest.raises(SeglabError, match="missing column"):
        plots_efficiency.plot_marker_learning_curve(curve.drop(columns="min"))


def test_e2_headline_numbers_and_keys():
    runs = _runs()
    curve = e2.learning_curve(runs)
    trained = e2.Trained(budget_fits=[_fit(True), _fit(False), _fit(False), _fit(True)], reference=_fit(False),
                         wall_s=12.5)
    assert trained.n_trained == 3 and trained.describe() == "3 of 5 models trained in 12.5 s"
    numbers = e2.headline(curve, {"ap_pooled": 12, "ap_mean": 4}, 0.02, _references(), runs, trained)
    assert numbers == {
        "val_ap50_budget_4_mean": 0.6, "val_ap50_budget_4_sd": round(float(np.std([0.5, 0.7], ddof=1)), 4),
        "val_ap50img_budget_4_mean": 0.5,
        "val_ap50_budget_12_mean": 0.8, "val_ap50_budget_12_sd": 0.0, "val_ap50img_budget_12_mean": 0.8,
        "plateau_budget": 12, "plateau_budget_img": 4, "plateau_tolerance_ap": 0.02,
        "val_ap50_baseline": 0.1235, "val_ap50_finetuned_generic": 0.8765,
        "n_models": 4, "n_models_trained": 3, "fit_wall_s": 12.5}
    assert all(type(v) in (int, float) for v in numbers.values())
    without = e2.headline(curve, {"ap_pooled": 12, "ap_mean": 4}, 0.02, _references(False), runs,
                          e2.Trained(budget_fits=[_fit(True)] * 4, reference=None, wall_s=0.0))
    assert without["val_ap50_finetuned_generic"] is None and without["n_models_trained"] == 0


def test_e2_training_validation_settings_are_the_defaults_only():
    from seglab.config.settings import MaskSettings

    e2.check_training_validation_settings(MaskSettings(), 0.5)
    with pytest.raises(SeglabError, match="rescore_per_image"):
        e2.check_training_validation_settings(MaskSettings(diameter_px=13.6), 0.5)
    with pytest.raises(SeglabError, match="IoU 0.75"):
        e2.check_training_validation_settings(MaskSettings(), 0.75)


# ---- E6 ---------------------------------------------------------------------------------

def _table() -> pd.DataFrame:
    """Pooled AP per (marker, model) of two held-out markers."""
    rows = [("gfap", "lomo", 0.80), ("neun", "lomo", 0.60), ("gfap", "generic", 0.85), ("neun", "generic", 0.70),
            ("gfap", "baseline", 0.50), ("neun", "baseline", 0.65)]
    return pd.DataFrame(rows, columns=["marker", "model", "ap_pooled"])


def test_e6_finetune_jobs_are_the_work_items_without_a_cohort():
    jobs = e6.finetune_jobs(PARAMS, ["neun", "gfap"])
    assert [(j["variant"], j.get("markers")) for j in jobs] == [
        ("leave_one_marker_out", ["neun"]), ("leave_one_marker_out", ["gfap"]), ("generic", None)]
    assert [j["validate"] for j in jobs[:-1]] == [False, False]
    items = e6.work_items(PARAMS)   # no cohort: the markers as the params give them
    assert [i.label for i in items] == ["held_out=neun", "held_out=gfap", "reference=finetuned_generic"]
    assert [i.args for i in items] == jobs


def test_e6_lomo_table_keeps_fit_records_and_refuses_a_leak(monkeypatch):
    manifest = pd.DataFrame({"tile_id": ["t1", "t2", "t3"], "marker": ["gfap", "neun", "gfap"]})
    trained_on = {"a.pt": (["t2"], []), "b.pt": (["t1"], ["t3"]), "leak.pt": (["t1", "t3"], [])}
    monkeypatch.setattr(finetuning, "trained_on", lambda path: trained_on[Path(path).name])
    table = e6.lomo_table(["gfap", "neun"], [_fit(True, 0.0, "/x/a.pt"), _fit(False, 7.5, "/x/b.pt")], manifest)
    assert list(table.columns) == ["marker", "model", "n_train_tiles", "n_dropped_tiles", "train_tiles_hash",
                                   "cached", "fit_s"]
    assert table[["marker", "n_train_tiles", "n_dropped_tiles", "cached", "fit_s"]].values.tolist() == [
        ["gfap", 1, 0, True, 0.0], ["neun", 1, 1, False, 7.5]]
    with pytest.raises(SeglabError, match="2 tiles of the held-out marker gfap"):
        e6.lomo_table(["gfap"], [_fit(False, 1.0, "/x/leak.pt")], manifest)


def test_e6_marker_gaps_and_headline():
    gaps = e6.marker_gaps(_table())
    assert list(gaps.columns) == ["marker", "ap_pooled_baseline", "ap_pooled_generic", "ap_pooled_lomo",
                                  "gap_generic_minus_lomo", "gap_baseline_minus_lomo"]
    assert np.allclose(gaps["gap_generic_minus_lomo"], [0.05, 0.10])
    assert np.allclose(gaps["gap_baseline_minus_lomo"], [-0.30, 0.05])
    val_gaps = pd.DataFrame({"marker": ["gfap", "neun"], "gap_generic_minus_lomo": [0.01, -0.04]})
    trained = e6.Trained(lomo=pd.DataFrame(), generic=Path("g.pt"), n_trained=2, wall_s=3.25)
    assert trained.references("generalist") == {"generic": "g.pt", "baseline": "generalist"}
    numbers = e6.headline(["gfap", "neun"], _table(), gaps, val_gaps, trained)
    assert numbers == {
        "test_ap50_lomo_gfap": 0.8, "test_ap50_generic_gfap": 0.85, "test_ap50_baseline_gfap": 0.5,
        "test_ap50_lomo_neun": 0.6, "test_ap50_generic_neun": 0.7, "test_ap50_baseline_neun": 0.65,
        "test_ap50_lomo_mean": 0.7, "test_ap50_generic_mean": 0.775, "test_ap50_baseline_mean": 0.575,
        "test_ap50_gap_mean": 0.075, "test_ap50_gap_max": 0.1, "val_ap50_gap_mean": -0.015,
        "n_markers": 2, "n_models_trained": 2, "fit_wall_s": 3.25}


def test_e6_marker_bars_draw_one_bar_per_model_and_marker_with_a_title():
    fig = plots_efficiency.plot_marker_bars(_table(), models_order=["baseline", "generic", "lomo"],
                                            labels=e6.MODEL_LABELS, title="held out")
    assert len(fig.axes[0].patches) == 6 and fig._suptitle.get_text() == "held out"
    assert fig.axes[0].get_legend_handles_labels()[1] == [e6.MODEL_LABELS[m] for m in ("baseline", "generic", "lomo")]
    with pytest.raises(SeglabError, match="missing column"):
        plots_efficiency.plot_marker_bars(_table().drop(columns="ap_pooled"))


# ---- claims with their intervals (issue #20) ------------------------------------------------

def _tile_rows(model_or_budget, tp, *, seed=None, markers=None, n_true=10, fp=1):
    """Per-tile rows at IoU 0.5, one tile per donor d0, d1, ...: ``tp[i]`` of ``n_true`` objects found."""
    n = len(tp)
    rows = pd.DataFrame({"image": [f"t{i}" for i in range(n)], "donor": [f"d{i}" for i in range(n)],
                         "marker": markers or ["gfap"] * n, "threshold": 0.5, "tp": tp, "fp": fp,
                         "fn": [n_true - t for t in tp]})
    if seed is None:
        return rows.assign(model=model_or_budget)
    return rows.assign(budget=model_or_budget, budget_seed=seed)


def _e2_claims_case():
    per_image = pd.concat([_tile_rows(4, [6, 7, 6, 7], seed=0), _tile_rows(4, [7, 7, 7, 8], seed=1),
                           _tile_rows(12, [9, 9, 8, 9], seed=0), _tile_rows(12, [9, 9, 9, 8], seed=1)],
                          ignore_index=True)
    refs = pd.concat([_tile_rows("baseline", [5, 6, 5, 6]), _tile_rows("finetuned_generic", [9, 9, 9, 9])])
    return per_image, e2.References(scores={}, table=pd.DataFrame(), generic_record=None, per_image=refs)


def test_e2_budgets_average_their_draws_per_tile_and_pair_with_each_reference():
    per_image, references = _e2_claims_case()
    means = e2.mean_over_draws(per_image)
    assert means[means["budget"] == 4]["tp"].tolist() == [6.5, 7.0, 6.5, 7.5] and set(means["model"]) == {
        "budget_4", "budget_12"}
    assert (means["tp"] + means["fn"] == 10).all()   # the truth of each tile stays the tile's
    table = e2.budget_claims(per_image, references)
    ap = table[table["metric"] == "ap"]
    assert list(zip(ap["a"], ap["b"], ap["budget"])) == [
        ("finetuned_generic", "budget_4", 4), ("baseline", "budget_4", 4),
        ("finetuned_generic", "budget_12", 12), ("baseline", "budget_12", 12)]
    # pooled AP of the averaged counts: tp / (n_true + fp) = sum(tp) / 44
    row = ap.iloc[0]
    assert row["estimate_b"] == pytest.approx(27.5 / 44) and row["estimate_a"] == pytest.approx(36 / 44)
    assert row["ci_high"] < 0 and (ap["n_donors"] == 4).all()
    beats = ap[ap["a"] == "baseline"]
    assert (beats["ci_low"] > 0).all()                 # every budget beats the baseline on every donor


def test_e2_plateau_by_the_interval_and_its_keys():
    per_image, references = _e2_claims_case()
    table = e2.budget_claims(per_image, references)
    twelve = table[(table["metric"] == "ap") & (table["b"] == "budget_12") & (table["a"] == "finetuned_generic")].iloc[0]
    assert -0.1 < twelve["ci_low"] < 0
    # the smallest budget whose interval of (budget - all tiles) stays above -tolerance
    assert e2.plateau_by_interval(table, 0.1) == 12 and e2.plateau_by_interval(table, 0.0) is None
    assert e2.plateau_by_interval(table, 1.0) == 4
    numbers = e2.claim_numbers(table, 0.1)
    assert numbers["plateau_budget_ci"] == 12 and numbers["claims_interval"] == "95% t interval over donors"
    assert numbers["budget_4_beats_baseline"] is True and numbers["budget_12_beats_finetuned_generic"] is False
    key = "val_ap50_diff_budget_4_vs_finetuned_generic"
    assert numbers[key] == round(27.5 / 44 - 36 / 44, 4) and numbers[f"{key}_n_donors"] == 4
    assert {f"{key}_ci_low", f"{key}_ci_high", f"{key}_p_value"} <= set(numbers)
    # the headline keeps every earlier key and adds these
    runs = _runs()
    curve = e2.learning_curve(runs)
    trained = e2.Trained(budget_fits=[_fit(True)] * 4, reference=_fit(True), wall_s=0.0)
    plain = e2.headline(curve, {"ap_pooled": 12, "ap_mean": 4}, 0.1, _references(), runs, trained)
    full = e2.headline(curve, {"ap_pooled": 12, "ap_mean": 4}, 0.1, _references(), runs, trained, table)
    assert {k: full[k] for k in plain} == plain and set(full) - set(plain) == set(numbers)


def test_e2_claims_without_per_tile_scores_or_generic_reference():
    per_image, references = _e2_claims_case()
    empty = e2.budget_claims(pd.DataFrame(), references)
    assert empty.empty and e2.claim_numbers(empty, 0.02) == {} and e2.plateau_by_interval(empty, 0.02) is None
    baseline_only = e2.References(scores={}, table=pd.DataFrame(), generic_record=None,
                                  per_image=references.per_image[references.per_image["model"] == "baseline"])
    table = e2.budget_claims(per_image, baseline_only)
    assert set(table["a"]) == {"baseline"} and e2.claim_numbers(table, 0.02)["plateau_budget_ci"] is None
    # one donor: no interval, no claim, and the reason in the summary
    one = e2.budget_claims(per_image[per_image["donor"] == "d0"], e2.References(
        scores={}, table=pd.DataFrame(), generic_record=None,
        per_image=references.per_image[references.per_image["donor"] == "d0"]))
    numbers = e2.claim_numbers(one, 1.0)
    assert numbers["budget_4_beats_baseline"] is False and numbers["plateau_budget_ci"] is None
    assert numbers["val_ap50_diff_budget_4_vs_baseline_note"].startswith("1 donor")


def _e6_per_image():
    """Three held-out-marker cases: gfap on 4 donors (lomo clearly below generic), neun on one donor."""
    rows = [_tile_rows("lomo", [6, 6, 7, 6]), _tile_rows("generic", [8, 8, 9, 8]), _tile_rows("baseline", [5, 5, 5, 5])]
    neun = [_tile_rows(m, [tp], markers=["neun"]).assign(image="n0", donor="d9")
            for m, tp in (("lomo", 7), ("generic", 7), ("baseline", 6))]
    return pd.concat(rows + neun, ignore_index=True)


def test_e6_claims_per_held_out_marker_and_over_all():
    found = e6.marker_claims(_e6_per_image(), ["gfap", "neun"])
    ap = found[found["metric"] == "ap"]
    assert list(zip(ap["marker"], ap["a"], ap["b"])) == [
        (m, a, b) for m in ("gfap", "neun", "all") for a, b in e6.CLAIM_PAIRS]
    gap = ap[(ap["marker"] == "gfap") & (ap["a"] == "lomo")].iloc[0]
    assert gap["difference"] == pytest.approx((33 - 25) / 44) and gap["ci_low"] > 0 and gap["n_donors"] == 4
    one = ap[(ap["marker"] == "neun") & (ap["a"] == "lomo")].iloc[0]
    assert one["n_donors"] == 1 and np.isnan(one["ci_low"])
    assert ap[ap["marker"] == "all"]["n_donors"].tolist() == [5, 5]
    numbers = e6.claim_numbers(found)
    assert numbers["generic_beats_lomo_gfap"] is True and numbers["lomo_beats_baseline_gfap"] is True
    assert numbers["generic_beats_lomo_neun"] is False
    assert numbers["test_ap50_diff_generic_vs_lomo_neun_note"].startswith("1 donor")
    assert numbers["test_ap50_diff_generic_vs_lomo_gfap"] == round((33 - 25) / 44, 4)
    assert "generic_beats_lomo_all" in numbers and numbers["claims_interval"] == "95% t interval over donors"
    # a held-out marker without test tiles: NaN rows, no claim, no error
    none = e6.marker_claims(_e6_per_image(), ["gfap", "olig2"])
    assert none[none["marker"] == "olig2"]["n_donors"].eq(0).all()
    assert e6.claim_numbers(none)["generic_beats_lomo_olig2"] is False


def test_e6_headline_adds_the_claims_and_keeps_every_earlier_key():
    gaps = e6.marker_gaps(_table())
    val_gaps = pd.DataFrame({"marker": ["gfap", "neun"], "gap_generic_minus_lomo": [0.01, -0.04]})
    trained = e6.Trained(lomo=pd.DataFrame(), generic=Path("g.pt"), n_trained=2, wall_s=3.25)
    plain = e6.headline(["gfap", "neun"], _table(), gaps, val_gaps, trained)
    found = e6.marker_claims(_e6_per_image(), ["gfap", "neun"])
    full = e6.headline(["gfap", "neun"], _table(), gaps, val_gaps, trained, found)
    assert {k: full[k] for k in plain} == plain and set(full) - set(plain) == set(e6.claim_numbers(found))
