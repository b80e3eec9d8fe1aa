"""seglab.experiments.e5_downstream: E5's steps, its headline numbers and its one inference call.

Exact small cases for the tables and the summary; one end-to-end pass of every step on a tiny
simulated cohort with the classical segmenter standing in for both models (no training).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seglab.config.params import load_params
from seglab.config.settings import MaskSettings
from seglab.downstream.cohort import Cohort
from seglab.downstream.correlate import Analysis
from seglab.experiments import e5_downstream as e5
from seglab.segment import cohort_prediction
from seglab.segment.cohort_prediction import CohortPrediction


def _prediction(name, n_predicted, wall_s, tiles=("a", "b", "c")) -> CohortPrediction:
    table = pd.DataFrame({"tile": list(tiles), "n_cells": [1] * len(tiles)})
    return CohortPrediction(name=name, folder=Path("."), table=table, record={"n_tiles": 7}, n_predicted=n_predicted,
                            wall_s=wall_s)


def _analysis(qs) -> Analysis:
    corr = pd.DataFrame({"marker": "m", "feature": "ratio", "outcome": [f"o{i}" for i in range(len(qs))],
                         "rho": 0.5, "q": qs})
    cohort = Cohort(donors=["1", "2", "3"], outcomes=pd.DataFrame(), features=pd.DataFrame(), missing_in_clinical=[],
                    missing_in_tiles=[])
    return Analysis(donors=pd.DataFrame(), correlations=corr, cohort=cohort, params={"alpha": 0.05})


def _counts(has_truth=True, tiles_per_pair=1) -> e5.TileCounts:
    manifest = pd.DataFrame({"tile_id": [f"t{i}" for i in range(4 * tiles_per_pair)],
                             "donor": np.repeat([1, 1, 2, 2], tiles_per_pair),
                             "marker": np.repeat(["x", "y", "x", "y"], tiles_per_pair)})
    t = manifest.assign(n_total_cells=[10, 11, 12, 13] * tiles_per_pair, n_marker_positive=[1, 2, 3, 4] * tiles_per_pair)
    tables = {"truth": t, "baseline": t.assign(n_total_cells=t["n_total_cells"] - 2),
              "finetuned": t.assign(n_marker_positive=t["n_marker_positive"] // 2)}
    if not has_truth:
        del tables["truth"]
    return e5.TileCounts(manifest=manifest, tables=tables, has_truth=has_truth)


def _recovery() -> e5.PlantedRecovery:
    per_model = pd.DataFrame({"model": ["truth", "baseline", "finetuned"], "recovered": [1 / 3, 0.25, 0.375],
                              "sign_correct": [1.0, 0.75, 1.0], "false_positives": [0, 2, 1],
                              "mean_abs_rho_diff_vs_truth": [math.nan, 0.07749, 0.0666]})
    latent = pd.DataFrame({"model": ["truth", "truth", "truth", "baseline", "baseline", "baseline", "finetuned",
                                     "finetuned", "finetuned"],
                           "marker": ["a", "b", "n"] * 3, "effect": [0.8, -0.5, 0.0] * 3, "null": [False, False, True] * 3,
                           "rho_latent": [0.9, -0.7, 0.3, 0.5, -0.1, -0.9, 0.6, 0.2, 0.0]})
    return e5.PlantedRecovery(per_test=pd.DataFrame(), per_model=per_model, latent=latent,
                              by_percentile=pd.DataFrame(), models=["truth", "baseline", "finetuned"])


def test_headline_names_every_number_of_the_summary():
    predictions = {"baseline": _prediction("baseline", 3, 2.0), "finetuned": _prediction("finetuned", 0, 1.0)}
    corr = e5.Correlations(analyses={"truth": _analysis([0.01, 0.2, 0.04]), "baseline": _analysis([0.5, 0.01, 0.2]),
                                     "finetuned": _analysis([0.01, 0.01, 0.01])},
                           side_by_side=pd.DataFrame(),
                           recovery=pd.DataFrame({"model": ["baseline", "finetuned"], "recovered": [0.6666, 0.9166],
                                                  "false_calls": [0.2, 0.21428]}),
                           donor_agreement=pd.DataFrame())
    numbers = e5.headline({"bootstrap_B": 200}, predictions, _counts(), corr, _recovery())
    assert numbers == {
        "n_tiles": 4, "n_tiles_cohort": 7, "n_donors": 2, "bootstrap_B": 200,
        "inference_tiles_predicted_baseline": 3, "inference_tiles_per_s_baseline": 1.5,
        "inference_tiles_predicted_finetuned": 0, "inference_tiles_per_s_finetuned": None,
        "sig_tests_truth": 2, "sig_tests_baseline": 1, "sig_tests_finetuned": 3,
        "truth_calls_recovered_baseline": 0.667, "false_calls_vs_truth_baseline": 0.2,
        "truth_calls_recovered_finetuned": 0.917, "false_calls_vs_truth_finetuned": 0.214,
        "recovery_truth": 0.333, "planted_sign_correct_truth": 1.0, "null_false_positives_truth": 0,
        "planted_latent_rho_mean_truth": 0.8,
        "recovery_baseline": 0.25, "planted_sign_correct_baseline": 0.75, "null_false_positives_baseline": 2,
        "mean_abs_rho_diff_vs_truth_baseline": 0.077, "planted_latent_rho_mean_baseline": 0.3,
        "recovery_finetuned": 0.375, "planted_sign_correct_finetuned": 1.0, "null_false_positives_finetuned": 1,
        "mean_abs_rho_diff_vs_truth_finetuned": 0.067, "planted_latent_rho_mean_finetuned": 0.2,
        "finetuned_recovers_at_least_as_well": True,
    }
    # real tiles: no truth masks, no planted effects -> only the counts, inference and significant tests
    bare = e5.Correlations(analyses={"baseline": _analysis([0.01]), "finetuned": _analysis([0.5])},
                           side_by_side=pd.DataFrame(), recovery=None, donor_agreement=None)
    numbers = e5.headline({"bootstrap_B": 0}, predictions, _counts(has_truth=False), bare, None)
    assert sorted(numbers) == sorted(["n_tiles", "n_tiles_cohort", "n_donors", "bootstrap_B",
                                      "inference_tiles_predicted_baseline", "inference_tiles_per_s_baseline",
                                      "inference_tiles_predicted_finetuned", "inference_tiles_per_s_finetuned",
                                      "sig_tests_baseline", "sig_tests_finetuned"])


def test_verdict_states_the_comparison_and_the_answer():
    text = e5.verdict(_recovery(), has_truth=True)
    assert text == ("planted tests recovered: fine-tuned 0.38 vs baseline 0.25 (truth masks 0.33); right sign: 1.00 vs "
                    "0.75; null false positives: 1 vs 2; mean |rho - rho_truth|: 0.067 vs 0.077\n"
                    "the fine-tuned model recovers the planted effects at least as well as the baseline: True")
    assert e5.verdict(None, has_truth=False).startswith("no truth.json")


def test_tile_counts_totals_models_note_and_outputs():
    counts = _counts()
    assert counts.models == ["truth", "baseline", "finetuned"]
    totals = counts.totals()
    assert totals.loc["n_total_cells"].tolist() == [46, 38, 46] and totals.loc["n_marker_positive"].tolist() == [10, 10, 4]
    params = {"shards": [0], "n_shards": 4}
    assert counts.describe(params) == ("4 tiles, 2 donors; truth masks for every tile: True\nNOTE: one tile per donor x "
                                       "marker (shards [0] of 4): resampling tiles within a donor x marker cannot vary, "
                                       "so the bootstrap intervals collapse onto rho; analyse more tiles for real stability")
    assert "NOTE" not in _counts(tiles_per_pair=2).describe(params)
    assert "marker: resampling" in counts.describe({"shards": None, "n_shards": 4})
    out = counts.outputs()
    assert list(out) == ["tiles_truth.csv", "tiles_baseline.csv", "tiles_finetuned.csv", "tile_counts_vs_truth.csv",
                         "tile_counts_vs_truth.png"]
    assert out["tile_counts_vs_truth.csv"]["n_total_cells_truth"].tolist() == [10, 11, 12, 13] * 2
    assert e5.figures(out) == [out["tile_counts_vs_truth.png"]]
    assert list(_counts(has_truth=False).outputs()) == ["tiles_baseline.csv", "tiles_finetuned.csv"]


def test_significant_tests_per_percentile_and_model():
    table = pd.DataFrame({"model": ["truth", "truth", "baseline", "baseline", "truth", "baseline"],
                          "percentile": [60.0, 60.0, 60.0, 60.0, 75.0, 75.0], "q": [0.01, 0.2, 0.04, 0.05, 0.001, np.nan]})
    sig = e5.Sensitivity(table=table, models=["truth", "baseline"], alpha=0.05).significant_by_percentile()
    assert list(sig.columns) == ["truth", "baseline"] and list(sig.index) == [60.0, 75.0]
    assert sig.to_numpy().tolist() == [[1, 1], [1, 0]]


def _params(cohort_dir, tmp_path, **changes) -> dict:
    params = load_params("05_downstream", "demo")[0]
    return {**params, "cohort_dir": str(cohort_dir), "predictions_dir": str(tmp_path / "predictions"),
            "diameter_px": None, "min_size": 5, **changes}


def test_the_notebook_and_the_prepare_items_make_the_same_predict_cohort_call(monkeypatch, tmp_path):
    calls = []

    def fake_predict_cohort(model, tiles_dir, mask, **kwargs):
        calls.append((model, Path(tiles_dir), mask, kwargs))
        return f"prediction of {model}"

    monkeypatch.setattr(cohort_prediction, "predict_cohort", fake_predict_cohort)
    monkeypatch.setattr(e5, "model_specs", lambda params: {"baseline": lambda: "base.pt", "finetuned": lambda: "ft.pt"})
    params = _params(tmp_path / "cohort", tmp_path, n_shards=3, shards=None, inference_jobs=2)
    assert e5.predict_all(params, log=print) == {"baseline": "prediction of base.pt", "finetuned": "prediction of ft.pt"}
    items = e5.work_items(params)
    assert [it.label for it in items] == [f"model={m} shard={i}/3" for m in ("baseline", "finetuned") for i in range(3)]
    items[4].run(print)
    notebook_call, item_call = calls[1], calls[2]
    expected = {"name": "finetuned", "root": params["predictions_dir"], "n_shards": 3, "batch_tiles": params["batch_tiles"],
                "batch_size": params["inference_batch_size"], "log": print}
    assert notebook_call == ("ft.pt", tmp_path / "cohort" / "tiles", MaskSettings.from_params(params),
                             {**expected, "shards": None, "n_jobs": 2})
    assert item_call == ("ft.pt", tmp_path / "cohort" / "tiles", MaskSettings.from_params(params),
                         {**expected, "shards": [1], "n_jobs": 1})


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    from seglab.data import simulate

    return simulate.simulate_cohort(tmp_path_factory.mktemp("e5") / "cohort", n_donors=8, tiles_per_marker=1,
                                    size_px=64, seed=1)


def test_every_step_on_a_tiny_cohort_with_one_model_twice(tiny_cohort, tmp_path, monkeypatch):
    """Both 'models' are the classical segmenter: their analyses, recovery and numbers must agree exactly."""
    monkeypatch.setattr(e5, "model_specs", lambda params: {"baseline": lambda: "classical",
                                                           "finetuned": lambda: "classical"})
    params = _params(tiny_cohort, tmp_path, n_shards=2, shards=None, inference_jobs=1, bootstrap_B=5,
                     percentiles=[70.0, 75.0], percentile=75.0)
    predictions = e5.predict_all(params, log=lambda *a: None)
    assert predictions["baseline"].folder == predictions["finetuned"].folder and predictions["finetuned"].n_predicted == 0
    counts = e5.tile_counts(params, predictions)
    assert counts.has_truth and counts.models == ["truth", "baseline", "finetuned"] and len(counts.manifest) == 40
    pd.testing.assert_frame_equal(counts.tables["baseline"], counts.tables["finetuned"])
    clinical = e5.clinical_table(params)
    corr = e5.correlations(counts, clinical, params)
    assert list(corr.overview().columns) == ["truth", "baseline", "finetuned"]
    assert list(corr.recovery["model"]) == ["baseline", "finetuned"]
    assert {"rho_heatmap_ratio.png", "rho_heatmap_positive_per_mpx.png"} == set(corr.heatmaps(params))
    assert list(corr.stability(params)) == ["stability_truth.png", "stability_baseline.png", "stability_finetuned.png"]
    sens = e5.sensitivity(counts, clinical, params)
    assert list(sens.significant_by_percentile().index) == [70.0, 75.0]
    recovery = e5.planted(e5.planted_effects(params), corr, sens, clinical, counts, params)
    assert list(recovery.by_percentile["percentile"].unique()) == [70.0, 75.0]
    assert list(recovery.latent_table().columns) == ["truth", "baseline", "finetuned"]
    numbers = e5.headline(params, predictions, counts, corr, recovery)
    for key in ("sig_tests", "recovery", "planted_sign_correct", "null_false_positives", "truth_calls_recovered",
                "planted_latent_rho_mean"):
        # NaN where the truth masks call nothing (8 donors: exact p-values rarely survive BH over 120 tests)
        assert numbers[f"{key}_baseline"] == pytest.approx(numbers[f"{key}_finetuned"], nan_ok=True), key
    assert numbers["n_tiles"] == numbers["n_tiles_cohort"] == 40 and numbers["finetuned_recovers_at_least_as_well"]
    assert numbers["inference_tiles_predicted_baseline"] == 40 and numbers["inference_tiles_per_s_finetuned"] is None


def test_min_donors_reaches_the_correlations_and_the_sensitivity(monkeypatch):
    """notebook 05's min_donors is the analysis' minimum of donors per test, in both steps that test."""
    seen = {}

    def fake_compare(tables, clinical, outcomes, **kwargs):
        seen["correlations"] = kwargs["min_donors"]
        return {"analyses": {}, "side_by_side": pd.DataFrame()}

    def fake_sensitivity(tiles, clinical, outcomes, **kwargs):
        seen.setdefault("sensitivity", []).append(kwargs["min_donors"])
        return pd.DataFrame({"percentile": [75.0], "q": [0.5]})

    monkeypatch.setattr(e5, "compare_segmentations", fake_compare)
    monkeypatch.setattr(e5, "threshold_sensitivity", fake_sensitivity)
    params = {**load_params("05_downstream", "demo")[0], "min_donors": 7}
    e5.correlations(_counts(), pd.DataFrame(), params)
    e5.sensitivity(_counts(), pd.DataFrame(), params)
    assert seen == {"correlations": 7, "sensitivity": [7, 7, 7]}
