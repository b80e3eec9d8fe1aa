"""seglab.experiments.e2_label_efficiency and e6_leave_one_marker_out: the label-budget (E2) and leave-one-marker-out (E6) loops, scores, plateau and figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from seglab import SeglabError
from seglab.config.settings import MaskSettings, TrainSettings
from seglab.data import manifest as data
from seglab.evaluate import metrics
from seglab.segment import models
from seglab.data import splitset
from seglab.segment import finetuning
from seglab.evaluate import scoring
from seglab.experiments import e2_label_efficiency
from seglab.experiments import e6_leave_one_marker_out
from seglab.plots import efficiency as efficiency_plots


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def manifest(cohort):
    return data.cohort_manifest(cohort)


TP = TrainSettings(epochs=1, learning_rate=0.01, weight_decay=1e-4, batch_size=4, bsize=64, nimg_per_epoch=4,
                   seed=0, min_train_masks=1)


def _disk(shape, cy, cx, r, label, out=None):
    out = np.zeros(shape, np.int32) if out is None else out
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = label
    return out


# ---- shared helpers ---------------------------------------------------------------------

def test_tile_ids_hash_is_order_free_and_set_sensitive():
    assert scoring.tile_ids_hash(["b", "a", "c"]) == scoring.tile_ids_hash(["c", "a", "b"])
    assert scoring.tile_ids_hash(["a", "b"]) != scoring.tile_ids_hash(["a", "c"])
    assert len(scoring.tile_ids_hash(["a"])) == 16
    with pytest.raises(SeglabError, match="no tile ids"):
        scoring.tile_ids_hash([])


def test_scores_from_per_image_pool_counts_and_spread():
    # image 1: 2 true disks, both found -> AP 1; image 2: 2 true, 1 found + 1 false -> tp 1, fp 1, fn 1
    a = _disk((64, 64), 16, 16, 6, 1)
    a = _disk((64, 64), 44, 44, 6, 2, a)
    b_true = _disk((64, 64), 16, 16, 6, 3)
    b_true = _disk((64, 64), 44, 44, 6, 7, b_true)
    b_pred = _disk((64, 64), 16, 16, 6, 5)
    b_pred = _disk((64, 64), 44, 12, 5, 9, b_pred)
    empty = np.zeros((64, 64), np.int32)
    ev = metrics.evaluate({"a": (a, a.copy()), "b": (b_true, b_pred), "e": (empty, empty)},
                          thresholds=(0.5, 0.75))
    s = scoring.scores_from_per_image(ev.per_image, 0.5)
    assert (s["tp"], s["fp"], s["fn"]) == (3, 1, 1)
    assert s["ap_pooled"] == pytest.approx(3 / 5)
    assert s["precision"] == pytest.approx(3 / 4) and s["recall"] == pytest.approx(3 / 4)
    # the empty pair is counted as an image but not scored per image
    assert s["n_images"] == 3
    assert s["ap_mean"] == pytest.approx((1 + 1 / 3) / 2)
    assert s["ap_min"] == pytest.approx(1 / 3) and s["ap_max"] == pytest.approx(1.0)
    assert s["ap_sd"] == pytest.approx(np.std([1, 1 / 3], ddof=1))
    # the same numbers as the evaluation engine's own pooled summary
    pooled = ev.pooled[np.isclose(ev.pooled["threshold"], 0.5)].iloc[0]
    assert s["ap_pooled"] == pytest.approx(pooled["ap"])
    with pytest.raises(SeglabError, match="0.9 was not evaluated"):
        scoring.scores_from_per_image(ev.per_image, 0.9)
    with pytest.raises(SeglabError, match="lacks columns"):
        scoring.scores_from_per_image(pd.DataFrame({"threshold": [0.5]}), 0.5)


def test_split_subset_keeps_rows_images_and_masks_aligned(manifest):
    val = splitset.annotated_split(manifest, "train")
    m = sorted(val.rows["marker"].unique())[0]
    sub = splitset.split_subset(val, [m])
    assert set(sub.rows["marker"]) == {m} and len(sub) == len(sub.images) == len(sub.masks) > 0
    for name, img in zip(sub.names, sub.images):
        i = val.names.index(name)
        assert img is val.images[i]
    with pytest.raises(SeglabError, match="no tiles of marker"):
        splitset.split_subset(val, ["nope"])


# ---- E2 ---------------------------------------------------------------------------------

def test_check_budgets_fails_before_training(manifest):
    n_train = int((manifest["annotated"] & (manifest["split"] == "train")).sum())
    assert e2_label_efficiency.check_budgets(manifest, [3, 1, 3], repeats=2) == [1, 3]
    with pytest.raises(SeglabError, match=rf"outside 1..{n_train}"):
        e2_label_efficiency.check_budgets(manifest, [1, n_train + 1], repeats=1)
    with pytest.raises(SeglabError, match="at least one repeat"):
        e2_label_efficiency.check_budgets(manifest, [1], repeats=0)


def test_curve_summary_and_plateau():
    runs = pd.DataFrame({"budget": [2, 2, 5, 5, 10, 10, 20, 20],
                         "ap_pooled": [0.2, 0.4, 0.5, 0.6, 0.62, 0.66, 0.63, 0.67]})
    s = scoring.curve_summary(runs, "ap_pooled")
    assert list(s["budget"]) == [2, 5, 10, 20] and list(s["n_repeats"]) == [2, 2, 2, 2]
    assert s.loc[0, "mean"] == pytest.approx(0.3) and s.loc[0, "sd"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert (s.loc[0, "min"], s.loc[0, "max"]) == (0.2, 0.4)
    # best mean 0.65 (budget 20); within 0.02 -> 10 (0.64); within 0.1 -> 5 (0.55); within 0 -> 20
    assert scoring.plateau_budget(s, 0.02) == 10
    assert scoring.plateau_budget(s, 0.1) == 5
    assert scoring.plateau_budget(s, 0.0) == 20
    one = scoring.curve_summary(runs.iloc[[0]], "ap_pooled")
    assert one.loc[0, "sd"] == 0.0
    with pytest.raises(SeglabError, match="tolerance"):
        scoring.plateau_budget(s, -0.1)
    with pytest.raises(SeglabError, match="need columns"):
        scoring.curve_summary(runs, "ap_mean")


def test_label_budget_runs_train_score_and_reuse(cohort, manifest, tmp_path):
    val = splitset.annotated_split(manifest, "val")
    cache = str(tmp_path / "models")
    kw = dict(training=TP, val=val, mask=MaskSettings(), cache_dir=cache, log=None)
    # without rescoring, training scores each model on validation and the notebook reads it back
    quick, none = e2_label_efficiency.label_budget_runs("tiny-xs", str(cohort), [2, 1], 1, rescore=False, **kw)
    assert none.empty and not quick["cached"].any()
    assert list(zip(quick["budget"], quick["budget_seed"])) == [(2, 0), (1, 0)]
    assert list(quick["n_train_tiles"] + quick["n_dropped_tiles"]) == [2, 1]
    for _, r in quick.iterrows():
        side = models.read_sidecar(r["model"])
        assert side["variant"] == "label_budget" and side["budget"] == r["budget"]
        assert r["train_tiles_hash"] == scoring.tile_ids_hash(side["train_tiles"] + side["dropped_tiles"])
        assert 0 <= r["ap_pooled"] <= 1 and r["n_images"] == len(val)
    # the same grid again trains nothing; rescoring segments every validation tile (two workers) and
    # gives the same pooled AP as training's own pass
    runs, per = e2_label_efficiency.label_budget_runs("tiny-xs", str(cohort), [2, 1], 1, n_jobs=2, **kw)
    assert runs["cached"].all() and len(per) == len(runs) * len(val)
    assert np.allclose(quick["ap_pooled"], runs["ap_pooled"], atol=1e-6)
    with pytest.raises(SeglabError, match="rescore_per_image"):
        e2_label_efficiency.label_budget_runs("tiny-xs", str(cohort), [1], 1, rescore=False,
                                     **{**kw, "mask": MaskSettings(flow_threshold=0.6)})
    # a model trained for rescoring skips training's validation pass: nothing to read back
    fresh, _ = e2_label_efficiency.label_budget_runs("tiny-xs", str(cohort), [1], 1, **{**kw, "cache_dir": str(tmp_path / "m2")})
    assert "val_ap50_pooled" not in (models.read_sidecar(fresh.loc[0, "model"]).get("metrics") or {})
    with pytest.raises(SeglabError, match="no validation AP"):
        finetuning.sidecar_val_scores(fresh.loc[0, "model"])
    fig = efficiency_plots.plot_learning_curve(runs, {"ap_pooled": "val AP", "ap_mean": "val AP (mean)"},
                                         references={"ap_pooled": {"baseline": 0.1, "all tiles": 0.5}},
                                         plateau={"ap_pooled": 2}, tolerance=0.02)
    assert e2_label_efficiency.label_budget_jobs("g", "c", [4, 12], 2, training=TP)[1] == dict(
        base="g", cohort_dir="c", variant="label_budget", training=TP, budget=4, budget_seed=1,
        cache_dir=finetuning.MODEL_CACHE, validate=True)
    assert len(fig.axes) == 2
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("plateau: 2 tiles" in lb for lb in labels) and any(lb.startswith("baseline") for lb in labels)


# ---- E6 ---------------------------------------------------------------------------------

def test_lomo_markers(manifest):
    ann = manifest[manifest["annotated"]]
    usable = sorted(set(ann.loc[ann.split == "train", "marker"]) & set(ann.loc[ann.split == "test", "marker"]))
    assert e6_leave_one_marker_out.lomo_markers(manifest) == usable
    assert e6_leave_one_marker_out.lomo_markers(manifest, []) == usable
    assert e6_leave_one_marker_out.lomo_markers(manifest, [usable[1], usable[0], usable[1]]) == [usable[1], usable[0]]
    with pytest.raises(SeglabError, match="'bogus'|bogus"):
        e6_leave_one_marker_out.lomo_markers(manifest, ["bogus"])


def test_lomo_finetune_evaluate_and_gap(cohort, manifest, tmp_path):
    markers = e6_leave_one_marker_out.lomo_markers(manifest)[:2]
    lomo = e6_leave_one_marker_out.finetune_lomo("tiny-xs", str(cohort), markers, training=TP,
                                    cache_dir=str(tmp_path / "models"), log=None)
    assert list(lomo["marker"]) == markers
    marker_of = dict(zip(manifest["tile_id"], manifest["marker"]))
    for _, r in lomo.iterrows():
        side = models.read_sidecar(r["model"])
        assert side["variant"] == "leave_one_marker_out" and side["markers"] == [r["marker"]]
        assert side["train_tiles"] and all(marker_of[t] != r["marker"] for t in side["train_tiles"])
    test = splitset.annotated_split(manifest, "test")
    calls = []
    table, per = e6_leave_one_marker_out.evaluate_lomo(lomo, {"baseline": "tiny-xs"}, test, MaskSettings(),
                                          before=lambda name, cfg: calls.append((name, cfg["iou"])))
    assert calls == [(f"lomo_{m}", 0.5) for m in markers] + [("baseline", 0.5)]
    assert sorted(zip(table["marker"], table["model"])) == sorted((m, k) for m in markers for k in ("lomo", "baseline"))
    # each lomo model only saw its held-out marker's test tiles
    for m in markers:
        n = int((test.rows["marker"] == m).sum())
        row = table[(table["marker"] == m) & (table["model"] == "lomo")].iloc[0]
        assert row["n_images"] == n
        assert set(per.loc[per["model"] == "lomo", "marker"]) <= set(markers)
    gaps = scoring.gap_table(table, reference="baseline")
    assert list(gaps.columns) == ["marker", "ap_pooled_baseline", "ap_pooled_lomo", "gap_baseline_minus_lomo"]
    assert np.allclose(gaps["gap_baseline_minus_lomo"], gaps["ap_pooled_baseline"] - gaps["ap_pooled_lomo"])
    with pytest.raises(SeglabError, match="no rows for model 'generic'"):
        scoring.gap_table(table)
    fig = efficiency_plots.plot_marker_bars(table, per, models_order=["baseline", "lomo"])
    assert len(fig.axes[0].patches) == 2 * len(markers)
    # the claims pair each held-out marker's tiles; the pooled AP of each side is the table's.
    # No generic model was scored here: its comparisons are NaN rows (no claim), not an error
    found = e6_leave_one_marker_out.marker_claims(per, markers)
    ap = found[found["metric"] == "ap"].set_index(["marker", "a", "b"])
    scores = table.set_index(["marker", "model"])["ap_pooled"]
    for m in markers:
        gain = ap.loc[(m, "baseline", "lomo")]
        assert gain["estimate_a"] == pytest.approx(scores[(m, "baseline")])
        assert gain["estimate_b"] == pytest.approx(scores[(m, "lomo")])
        assert gain["n_tiles"] == int((test.rows["marker"] == m).sum())
        assert ap.loc[(m, "lomo", "generic"), "n_donors"] == 0
    numbers = e6_leave_one_marker_out.claim_numbers(found)
    assert numbers[f"generic_beats_lomo_{markers[0]}"] is False
    assert numbers[f"test_ap50_diff_generic_vs_lomo_{markers[0]}_note"].startswith("no tiles")


def test_cached_model_names_the_folder_finetune_writes_and_parallel_jobs_fill_it(cohort, tmp_path):
    cache = str(tmp_path / "models")
    jobs = [dict(base="tiny-xs", cohort_dir=str(cohort), variant="label_budget", training=TP, budget=2,
                 budget_seed=s, cache_dir=cache) for s in (0, 1)]
    assert finetuning.cached_model(**jobs[0]) is None
    par = finetuning.finetune_many(jobs, n_jobs=2, log=None)
    assert [r["cached"] for r in par] == [False, False]
    for job, r in zip(jobs, par):
        assert finetuning.cached_model(**job) == r["path"]
        # finetuning.finetune itself reuses exactly that folder
        assert finetuning.finetune(**job, log=lambda m: None) == r["path"]
    again = finetuning.finetune_many(jobs, n_jobs=2, log=None)
    assert [r["cached"] for r in again] == [True, True] and [r["path"] for r in again] == [r["path"] for r in par]
    with pytest.raises(SeglabError, match="n_jobs"):
        finetuning.finetune_many(jobs, n_jobs=0)
