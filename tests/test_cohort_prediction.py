"""seglab.segment.cohort_prediction and seglab.downstream.planted: content-addressed, resumable cohort inference and planted-effect recovery."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from seglab import SeglabError
from seglab.config.settings import MaskSettings
from seglab.downstream.correlate import analyse
from seglab.downstream.features import tile_table
from seglab.downstream.synthetic import synthetic_tile_table
from seglab.segment import cohort_prediction
from seglab.downstream import planted
from seglab.plots import downstream

SETTINGS = MaskSettings(min_size=5)


def _write_tiles(folder, n=4, size=64, seed=0):
    """Single-file (2, Y, X) tiles with a few bright disks each (the classical model finds them)."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for i in range(n):
        dapi = np.zeros((size, size), np.float32)
        k = 2 + i
        for j in range(k):
            cy, cx = 12 + (j // 3) * 20, 12 + (j % 3) * 20
            dapi[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 200
        dapi += rng.normal(5, 1, dapi.shape).astype(np.float32)
        tifffile.imwrite(folder / f"t{i}.tif", np.stack([dapi, dapi * 0.5]))
        counts[f"t{i}"] = k
    return counts


@pytest.fixture()
def tiles(tmp_path):
    d = tmp_path / "tiles"
    return d, _write_tiles(d)


def test_prediction_key_is_content_addressed(tiles, tmp_path):
    d, _ = tiles
    th, n = cohort_prediction.tiles_sha256(d)
    assert n == 4
    k1 = cohort_prediction.prediction_key("a" * 64, SETTINGS, th)
    assert k1 == cohort_prediction.prediction_key("a" * 64, MaskSettings(min_size=5, diameter_px=None), th)
    assert k1.startswith("a" * 16 + "-")
    assert k1 != cohort_prediction.prediction_key("b" * 64, SETTINGS, th)
    assert k1 != cohort_prediction.prediction_key("a" * 64, SETTINGS.replace(flow_threshold=0.5), th)
    # a changed tile changes the folder
    import tifffile

    arr = tifffile.imread(d / "t0.tif")
    tifffile.imwrite(d / "t0.tif", arr + 1)
    assert cohort_prediction.tiles_sha256(d)[0] != th
    assert k1 != cohort_prediction.prediction_key("a" * 64, SETTINGS.replace(niter=3), th)




def test_predict_cohort_writes_resumes_and_reuses(tiles, tmp_path, monkeypatch):
    from seglab.segment import models

    d, counts = tiles
    root = tmp_path / "pred"
    first = cohort_prediction.predict_cohort("classical", d, SETTINGS, name="cl", root=root, log=lambda *a: None)
    assert first.n_tiles == 4 and first.n_predicted == 4 and first.n_reused == 0
    assert first.folder.parent == root and first.folder.name.startswith(models.model_id("classical")[:16])
    assert dict(zip(first.table["tile"], first.table["n_cells"])) == counts
    rec = json.loads((first.folder / cohort_prediction.RECORD).read_text())
    assert rec["settings"] == SETTINGS.as_dict() and rec["n_tiles"] == 4

    # everything there: reused without loading the model
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded when every tile is done")

    monkeypatch.setattr(models, "load", no_load)
    again = cohort_prediction.predict_cohort("classical", d, SETTINGS, root=root, log=lambda *a: None)
    assert again.folder == first.folder and again.n_predicted == 0 and again.n_reused == 4
    pd.testing.assert_frame_equal(again.table, first.table)
    monkeypatch.undo()

    # an interrupted run (one mask lost) redoes that tile only
    (first.folder / "t2.tif").unlink()
    resumed = cohort_prediction.predict_cohort("classical", d, SETTINGS, root=root, log=lambda *a: None)
    assert resumed.n_predicted == 1
    assert dict(zip(resumed.table["tile"], resumed.table["n_cells"])) == counts

    # other settings: another folder
    other = cohort_prediction.predict_cohort("classical", d, SETTINGS.replace(min_size=200), root=root, log=lambda *a: None)
    assert other.folder != first.folder and (other.table["n_cells"] == 0).all()


def test_shards_split_the_tiles_and_a_subset_is_a_sample(tiles, tmp_path):
    d, counts = tiles
    root = tmp_path / "pred"
    part = cohort_prediction.predict_cohort("classical", d, SETTINGS, root=root, n_shards=2, shards=[0], log=lambda *a: None)
    assert list(part.table["tile"]) == ["t0", "t2"] and part.n_predicted == 2
    with pytest.raises(SeglabError, match="2 of 4 tiles have no predicted mask"):
        cohort_prediction.collect_table(part.folder, list(counts))
    done = cohort_prediction.predict_cohort("classical", d, SETTINGS, root=root, n_shards=2, log=lambda *a: None)
    assert done.n_predicted == 2 and sorted(done.table["shard"]) == ["0/2", "0/2", "1/2", "1/2"]
    assert sorted((done.folder).glob("tiles_shard-*")) == [done.folder / "tiles_shard-0-of-2.tsv",
                                                           done.folder / "tiles_shard-1-of-2.tsv"]
    with pytest.raises(SeglabError, match="--shard 2/2"):
        cohort_prediction.predict_cohort("classical", d, SETTINGS, root=root, n_shards=2, shards=[2], log=lambda *a: None)


def test_shards_in_worker_processes_give_the_same_masks(tiles, tmp_path):
    import tifffile

    d, counts = tiles
    serial = cohort_prediction.predict_cohort("classical", d, SETTINGS, root=tmp_path / "a", n_shards=3, log=lambda *a: None)
    parallel = cohort_prediction.predict_cohort("classical", d, SETTINGS, root=tmp_path / "b", n_shards=3, n_jobs=2,
                                 log=lambda *a: None)
    assert parallel.n_predicted == 4 and dict(zip(parallel.table["tile"], parallel.table["n_cells"])) == counts
    for tid in counts:
        assert np.array_equal(tifffile.imread(serial.folder / f"{tid}.tif"), tifffile.imread(parallel.folder / f"{tid}.tif"))
    with pytest.raises(SeglabError, match="n_jobs=0"):
        cohort_prediction.predict_cohort("classical", d, SETTINGS, root=tmp_path / "c", n_jobs=0, log=lambda *a: None)


def test_a_folder_made_for_something_else_is_refused(tiles, tmp_path):
    d, _ = tiles
    root = tmp_path / "pred"
    p = cohort_prediction.predict_cohort("classical", d, SETTINGS, root=root, log=lambda *a: None)
    rec = json.loads((p.folder / cohort_prediction.RECORD).read_text())
    rec["model_id"] = "0" * 64
    (p.folder / cohort_prediction.RECORD).write_text(json.dumps(rec))
    with pytest.raises(SeglabError, match="another model"):
        cohort_prediction.predict_cohort("classical", d, SETTINGS, root=root, log=lambda *a: None)


def test_mask_loader_feeds_tile_table(tiles, tmp_path):
    d, counts = tiles
    p = cohort_prediction.predict_cohort("classical", d, SETTINGS, root=tmp_path / "pred", log=lambda *a: None)
    manifest = pd.DataFrame({"tile_id": list(counts), "donor": [1, 1, 2, 2], "marker": "gfap"})
    import tifffile

    t = tile_table(manifest, load_mask=cohort_prediction.mask_loader(p.folder),
                   load_marker=lambda r: tifffile.imread(d / f"{r['tile_id']}.tif")[1])
    assert dict(zip(t["tile_id"], t["n_total_cells"])) == counts
    with pytest.raises(SeglabError, match="no predicted mask for tile nope"):
        cohort_prediction.mask_loader(p.folder)({"tile_id": "nope"})


def _truth(effects, z):
    return {"markers": {m: {"effect": e, "null": e == 0} for m, e in effects.items()},
            "donors": {str(d): {"latent_score": float(v)} for d, v in z.items()}}


def test_planted_recovery_counts_signs_recoveries_and_false_positives():
    donors = np.arange(10) + 100
    z = dict(zip(donors, np.linspace(-1, 1, 10)))
    clinical = pd.DataFrame({"projid": donors, "up": np.linspace(0, 9, 10), "down": np.linspace(9, 0, 10)})
    truth = _truth({"a": 0.8, "b": -0.5, "n": 0.0}, z)

    def corr(rows):
        return pd.DataFrame([{"marker": m, "feature": "ratio", "outcome": o, "rho": r, "q": q}
                             for m, o, r, q in rows] + [{"marker": "a", "feature": "total_per_mpx", "outcome": "up",
                                                          "rho": -0.9, "q": 0.001}])

    truth_c = corr([("a", "up", 0.7, 0.01), ("a", "down", -0.7, 0.01), ("b", "up", -0.5, 0.02),
                    ("b", "down", 0.5, 0.02), ("n", "up", 0.1, 0.6), ("n", "down", 0.0, 0.9)])
    # model: a/up recovered; a/down right sign but not significant; b/up significant with the WRONG
    # sign; b/down rho NaN (not counted); one null false positive
    model_c = corr([("a", "up", 0.6, 0.01), ("a", "down", -0.2, 0.4), ("b", "up", 0.4, 0.03),
                    ("b", "down", np.nan, np.nan), ("n", "up", 0.5, 0.04), ("n", "down", 0.0, 0.9)])
    per, pm = planted.planted_recovery({"truth": truth_c, "model": model_c}, truth, clinical)
    exp = per[per["model"] == "truth"].set_index(["marker", "outcome"])["expected_sign"]
    assert exp[("a", "up")] == 1 and exp[("a", "down")] == -1 and exp[("b", "up")] == -1 and exp[("b", "down")] == 1
    assert exp[("n", "up")] == 0
    pm = pm.set_index("model")
    assert pm.loc["truth", "recovered"] == 1.0 and pm.loc["truth", "sign_correct"] == 1.0
    assert pm.loc["truth", "false_positives"] == 0 and np.isnan(pm.loc["truth", "mean_abs_rho_diff_vs_truth"])
    assert pm.loc["model", "n_planted_tests"] == 3
    assert pm.loc["model", "recovered"] == pytest.approx(1 / 3)
    assert pm.loc["model", "sign_correct"] == pytest.approx(2 / 3)
    assert pm.loc["model", "n_wrong_sign_significant"] == 1
    assert pm.loc["model", "false_positives"] == 1 and pm.loc["model", "false_positive_rate"] == 0.5
    # |0.6-0.7| + |-0.2+0.7| + |0.4+0.5| + |0.5-0.1| + 0 over the 5 finite pairs
    assert pm.loc["model", "mean_abs_rho_diff_vs_truth"] == pytest.approx((0.1 + 0.5 + 0.9 + 0.4 + 0) / 5)
    with pytest.raises(SeglabError, match="no planted effect"):
        planted.planted_recovery({"truth": truth_c.assign(marker="zzz")}, truth, clinical)


def test_planted_recovery_on_a_synthetic_cohort_with_the_downstream_engine():
    """End to end on synthetic tables: strong planted effects are recovered, the null marker is not."""
    effects = {"gfap": 1.2, "neun": -1.0, "olig2": 0.0}
    tiles, clin = synthetic_tile_table(n_donors=40, tiles_per_donor=4, markers=effects, outcomes=["o1", "o2"],
                                       seed=3, outcome_noise=0.3, missing_frac=0.0, cells_per_tile=150)
    clin["o2"] = -clin["o2"]  # an outcome that falls as the latent score rises (like ceradsc)
    truth = _truth(effects, dict(zip(clin["projid"], clin["latent_score"])))
    a = analyse(tiles, clin, ["o1", "o2"], B=0)
    per, pm = planted.planted_recovery({"truth": a.correlations}, truth, clin, reference=None)
    row = pm.iloc[0]
    assert row["n_planted_tests"] == 4 and row["recovered"] == 1.0 and row["false_positives"] == 0
    latent = planted.latent_rho({"truth": a.donors}, truth)
    lat = latent.set_index("marker")
    assert lat.loc["gfap", "rho_latent"] > 0.6 and lat.loc["neun", "rho_latent"] < -0.6
    assert abs(lat.loc["olig2", "rho_latent"]) < 0.4 and lat.loc["gfap", "n_donors"] == 40
    fig = downstream.recovery_figure(per, pm, latent)
    assert len(fig.axes) >= 3


def test_count_agreement_pairs_tiles():
    t = pd.DataFrame({"tile_id": ["a", "b"], "donor": [1, 2], "marker": "m", "n_total_cells": [3, 4],
                      "n_marker_positive": [1, 2]})
    out = planted.count_agreement({"truth": t, "m1": t.assign(n_total_cells=[5, 4])})
    assert list(out["n_total_cells"]) == [5, 4] and list(out["n_total_cells_truth"]) == [3, 4]
    with pytest.raises(SeglabError):
        planted.count_agreement({"m1": t})


def test_signed_latent_rho_mean_over_planted_markers_only():
    latent = pd.DataFrame({"model": ["m", "m", "m", "other"], "marker": ["a", "b", "n", "a"],
                           "effect": [0.8, -0.5, 0.0, 0.8], "null": [False, False, True, False],
                           "rho_latent": [0.9, -0.5, 0.7, -1.0]})
    assert planted.signed_latent_rho_mean(latent, "m") == pytest.approx((0.9 + 0.5) / 2)
    assert planted.signed_latent_rho_mean(latent, "other") == -1.0
    assert np.isnan(planted.signed_latent_rho_mean(latent, "absent"))


def test_recovery_by_percentile_is_planted_recovery_at_each_percentile():
    donors = np.arange(10) + 100
    z = dict(zip(donors, np.linspace(-1, 1, 10)))
    clinical = pd.DataFrame({"projid": donors, "up": np.linspace(0, 9, 10)})
    truth = _truth({"a": 0.8, "n": 0.0}, z)

    def rows(pct, rho_a, q_a, q_n):
        return [{"percentile": pct, "model": m, "marker": mk, "feature": "ratio", "outcome": "up", "rho": r, "q": q}
                for m in ("truth", "model") for mk, r, q in (("a", rho_a, q_a), ("n", 0.1, q_n))]

    sens = pd.DataFrame(rows(60.0, 0.7, 0.01, 0.5) + rows(75.0, -0.3, 0.01, 0.01))
    out = planted.recovery_by_percentile(sens, truth, clinical, ["truth", "model"])
    assert list(out["percentile"]) == [60.0, 60.0, 75.0, 75.0] and list(out["model"]) == ["truth", "model"] * 2
    assert list(out["recovered"]) == [1.0, 1.0, 0.0, 0.0] and list(out["false_positives"]) == [0, 0, 1, 1]
    _, at75 = planted.planted_recovery({m: g for m, g in sens[sens["percentile"] == 75.0].groupby("model", sort=False)},
                                       truth, clinical)
    pd.testing.assert_frame_equal(out[out["percentile"] == 75.0].drop(columns="percentile").reset_index(drop=True), at75)
