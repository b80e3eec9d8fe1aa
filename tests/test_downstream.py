"""seglab.downstream: exact against scipy/statsmodels, planted and null cohorts, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.stats import spearmanr
from statsmodels.stats.multitest import multipletests

from seglab import SeglabError
from seglab.downstream.cohort import ZERO_CELLS, donor_features, join_clinical
from seglab.downstream.correlate import (analyse, bootstrap_replicates, compare_segmentations, correlate, stability_summary,
                                         threshold_sensitivity)
from seglab.downstream.features import SENSITIVITY_PERCENTILES, at_percentile, measure_tile, tile_features, tile_table
from seglab.downstream.synthetic import synthetic_tile_table
from seglab.downstream.stats import bh_qvalues, spearman_grid, spearman_pvalue

TOL = dict(rtol=0, atol=1e-12)


def _scipy_spearman(x, y):
    m = np.isfinite(x) & np.isfinite(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = spearmanr(x[m], y[m])
    return float(r.statistic), float(r.pvalue), int(m.sum())


def _pair_permutation_p(x, y, *, seed=0, untie_x_null=False):
    """The library's p of one pair computed on its own (the permutation p above 9 donors is seeded, so
    scipy's t p is no reference; ``tests/test_small_n_stats.py`` checks it against scipy's permutation test)."""
    m = np.isfinite(x) & np.isfinite(y)
    return float(spearman_grid(x[m][None], y[m][None], pvalues=True, seed=seed, untie_x_null=untie_x_null)[2][0, 0])


# --------------------------------------------------------------------------- stats


def test_spearman_grid_equals_scipy_with_ties_and_missing():
    rng = np.random.default_rng(3)
    x = rng.poisson(3, (40, 25)).astype(float)  # many ties
    y = np.vstack([rng.poisson(2, (3, 25)), rng.normal(size=(3, 25))]).astype(float)
    x[4, [1, 2]] = np.nan  # rows with their own missing donors
    x[9, 0] = np.nan
    y[1, 3] = np.nan
    y[2, [0, 5, 7]] = np.nan
    x[11] = 2.0  # a constant row
    rho, n = spearman_grid(x, y)
    p = spearman_pvalue(rho, n)
    for i in range(x.shape[0]):
        for k in range(y.shape[0]):
            r_ref, p_ref, n_ref = _scipy_spearman(x[i], y[k])
            assert n[i, k] == n_ref
            if i == 11:
                assert np.isnan(rho[i, k]) and np.isnan(r_ref)
                continue
            np.testing.assert_allclose(rho[i, k], r_ref, **TOL)
            np.testing.assert_allclose(p[i, k], p_ref, **TOL)


def test_spearman_grid_fewer_than_three_is_nan():
    rho, n = spearman_grid(np.array([[1.0, 2.0, np.nan]]), np.array([[3.0, 1.0, 2.0]]))
    assert n[0, 0] == 2 and np.isnan(rho[0, 0]) and np.isnan(spearman_pvalue(rho, n)[0, 0])


def test_bh_equals_statsmodels_rows_nan_and_groups():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(6, 40)) ** 3
    p[:, 5] = p[:, 6]  # ties
    p[2, [1, 9]] = np.nan
    p[3, 0] = 1.0
    q = bh_qvalues(p)
    for i in range(p.shape[0]):
        ok = np.isfinite(p[i])
        np.testing.assert_allclose(q[i, ok], multipletests(p[i, ok], method="fdr_bh")[1], **TOL)
        assert np.isnan(q[i, ~ok]).all()
    groups = np.repeat([0, 1, 2, 3], 10)
    qg = bh_qvalues(p[0], groups)
    for g in range(4):
        sel = groups == g
        np.testing.assert_allclose(qg[sel], multipletests(p[0, sel], method="fdr_bh")[1], **TOL)


# --------------------------------------------------------------------------- tiles


def _toy_tile():
    mask = np.zeros((20, 30), dtype=np.uint32)
    mask[2:6, 2:6] = 7
    mask[10:14, 3:9] = 1000
    mask[15:19, 20:28] = 3
    mask[1:4, 20:23] = 4_000_000_000 % 2**32  # large sparse id
    marker = np.zeros((20, 30), dtype=np.float32)
    marker[2:6, 2:6] = 10.0
    marker[10:14, 3:9] = 3.0
    marker[15:19, 20:28] = 1.0
    marker[1:4, 20:23] = 8.0
    marker[5, 29] = 50.0  # background pixel, counted in the percentile
    return mask, marker


def test_instance_means_equal_ndimage_and_threshold_uses_all_pixels():
    mask, marker = _toy_tile()
    m = measure_tile(mask, marker, (75, 90))
    ids = np.unique(mask[mask > 0])
    np.testing.assert_array_equal(m.labels, ids)
    np.testing.assert_allclose(m.mean_marker, ndimage.mean(marker, mask, ids), **TOL)
    np.testing.assert_array_equal(m.area_px, ndimage.sum(np.ones_like(mask), mask, ids))
    # the threshold is the percentile of ALL Y*X marker pixels, background included
    assert m.marker_percentiles[75.0] == pytest.approx(np.percentile(marker.astype(float), 75))
    row = tile_features(mask, marker, percentile=75)
    assert row["threshold"] == pytest.approx(np.percentile(marker.astype(float), 75))
    # 75th over all pixels is 0 here (mostly background): every instance with mean > 0 is positive
    assert row["n_total_cells"] == 4 and row["n_marker_positive"] == 4


def test_rules_fixed_otsu_strictly_above_and_densities():
    mask, marker = _toy_tile()
    row = tile_features(mask, marker, rule="fixed", fixed_threshold=3.0, pixel_size_um=0.5)
    # means 10, 3, 1, 8: strictly above 3 -> 2 positive (the instance AT 3 is not)
    assert (row["n_total_cells"], row["n_marker_positive"], row["ratio"]) == (4, 2, 0.5)
    assert row["total_per_mpx"] == pytest.approx(4 / (600 / 1e6))
    assert row["positive_per_mm2"] == pytest.approx(2 / (600 * 0.25 / 1e6))
    from skimage.filters import threshold_otsu

    r_otsu = tile_features(mask, marker, rule="otsu")
    means = ndimage.mean(marker, mask, np.unique(mask[mask > 0]))
    assert r_otsu["threshold"] == pytest.approx(threshold_otsu(np.asarray(means)))
    assert r_otsu["n_marker_positive"] == int((means > threshold_otsu(np.asarray(means))).sum())
    with pytest.raises(SeglabError, match="fixed_threshold"):
        tile_features(mask, marker, rule="fixed")
    with pytest.raises(SeglabError, match="unknown positivity rule"):
        tile_features(mask, marker, rule="mean")


def test_empty_tile_and_single_instance_otsu():
    z = tile_features(np.zeros((8, 8), np.uint16), np.ones((8, 8)))
    assert z["n_total_cells"] == 0 and z["n_marker_positive"] == 0 and np.isnan(z["ratio"])
    one = np.zeros((8, 8), np.uint16)
    one[2:4, 2:4] = 5
    r = tile_features(one, np.ones((8, 8)), rule="otsu")
    assert r["n_total_cells"] == 1 and r["n_marker_positive"] == 0


def test_bad_tiles_are_refused_with_the_tile_named():
    mask, marker = _toy_tile()
    with pytest.raises(SeglabError, match=r"tile t9.*shape \(20, 29\).*\(20, 30\)"):
        measure_tile(mask, marker[:, :29], name="tile t9")
    with pytest.raises(SeglabError, match="integer labels"):
        measure_tile(mask.astype(float), marker)
    bad = marker.copy()
    bad[0, 0] = np.nan
    with pytest.raises(SeglabError, match="NaN"):
        measure_tile(mask, bad)


def _manifest_and_images(seed=0, n_donors=4, tiles=3, markers=("gfap", "iba1")):
    rng = np.random.default_rng(seed)
    rows, images = [], {}
    for d in range(n_donors):
        for mk in markers:
            for t in range(tiles):
                tid = f"ROSMAP_{100 + d}_{mk}_{t}"
                mask = np.zeros((32, 32), np.uint16)
                k = 0
                for y in range(2, 30, 7):
                    for x in range(2, 30, 7):
                        if rng.random() < 0.8:
                            k += 1
                            mask[y : y + 5, x : x + 5] = 3 * k + 1  # non-consecutive ids
                marker = rng.gamma(2.0, 1.0, (32, 32)).astype(np.float32)
                images[tid] = (mask, marker)
                rows.append({"tile_id": tid, "donor": f"{100 + d:08d}", "marker": mk})
    return pd.DataFrame(rows), images


def test_tile_table_sensitivity_columns_equal_recomputing():
    man, images = _manifest_and_images()
    tt = tile_table(man, load_mask=lambda r: images[r.tile_id][0], load_marker=lambda r: images[r.tile_id][1],
                    pixel_size_um=0.65, keep_instances=True)
    assert len(tt) == len(man) and {"n_positive_p60", "marker_p90", "area_um2", "total_per_mm2"} <= set(tt.columns)
    assert len(tt.attrs["instances"]) == tt["n_total_cells"].sum()
    for q in SENSITIVITY_PERCENTILES:
        re = at_percentile(tt, q)
        for _, r in re.iterrows():
            direct = tile_features(*images[r.tile_id], percentile=q, pixel_size_um=0.65)
            assert r["n_marker_positive"] == direct["n_marker_positive"]
            assert r["threshold"] == pytest.approx(direct["threshold"])
            assert r["ratio"] == pytest.approx(direct["ratio"])
            assert r["positive_per_mm2"] == pytest.approx(direct["positive_per_mm2"])
    with pytest.raises(SeglabError, match="n_positive_p65"):
        at_percentile(tt, 65)


def test_tile_table_bad_manifest():
    man, images = _manifest_and_images()
    with pytest.raises(SeglabError, match="'donor'"):
        tile_table(man.drop(columns="donor"), load_mask=lambda r: None, load_marker=lambda r: None)
    with pytest.raises(SeglabError, match="repeats tile ids"):
        tile_table(pd.concat([man, man.iloc[:1]]), load_mask=lambda r: None, load_marker=lambda r: None)
    with pytest.raises(SeglabError, match="shape"):
        tile_table(man, load_mask=lambda r: images[r.tile_id][0], load_marker=lambda r: images[r.tile_id][1][:-1])


# --------------------------------------------------------------------------- donors and clinical


def _tiles(rows):
    return pd.DataFrame(rows, columns=["tile_id", "donor", "marker", "area_px", "n_total_cells", "n_marker_positive"])


def test_donor_features_sum_counts_not_mean_of_ratios():
    t = _tiles([
        ("a", 1, "gfap", 1000, 2, 2),      # tile ratio 1.0 from 2 cells
        ("b", 1, "gfap", 1000, 198, 0),    # tile ratio 0.0 from 198 cells
        ("c", 2, "gfap", 2000, 0, 0),      # a donor with zero cells
        ("d", 1, "iba1", 500, 10, 5),
    ])
    d = donor_features(t).set_index(["donor", "marker"])
    assert d.loc[("1", "gfap"), "ratio"] == pytest.approx(2 / 200)  # not (1.0 + 0.0) / 2
    assert d.loc[("1", "gfap"), "n_tiles"] == 2
    assert d.loc[("1", "gfap"), "total_per_mpx"] == pytest.approx(200 / 0.002)
    assert np.isnan(d.loc[("2", "gfap"), "ratio"]) and d.loc[("2", "gfap"), "reason"] == ZERO_CELLS
    assert d.loc[("2", "gfap"), "total_per_mpx"] == 0.0
    assert d.loc[("1", "iba1"), "reason"] == ""
    bad = t.astype({"n_total_cells": float})
    bad.loc[1, "n_total_cells"] = np.nan
    with pytest.raises(SeglabError, match=r"\['b'\].*missing or negative 'n_total_cells'"):
        donor_features(bad)
    with pytest.raises(SeglabError, match=r"\['d'\].*more positive cells"):
        donor_features(t.assign(n_marker_positive=[2, 0, 0, 11]))


def test_join_reports_missing_donors_and_normalises_ids():
    t = _tiles([(f"t{i}", f"{d:08d}", "gfap", 100, 10, i % 4) for i, d in enumerate([11, 12, 13, 99, 11, 12])])
    clin = pd.DataFrame({"projid": [11, 12, 13, 55], "braaksc": [1, 2, 3, 4]})
    c = join_clinical(donor_features(t), clin, ["braaksc"])
    assert c.donors == ["11", "12", "13"]
    assert c.missing_in_clinical == ["99"] and c.missing_in_tiles == ["55"]
    assert c.report()["missing_in_clinical"] == ["99"]


def test_bad_clinical_tables():
    t = _tiles([(f"t{i}", i, "gfap", 100, 10, 3) for i in range(5)])
    donors = donor_features(t)
    with pytest.raises(SeglabError, match="no donor column 'projid'.*donor_col="):
        join_clinical(donors, pd.DataFrame({"id": range(5), "braaksc": range(5)}), ["braaksc"])
    bad = pd.DataFrame({"projid": range(5), "braaksc": ["1", "2", "III", "4", ""]})
    with pytest.raises(SeglabError, match=r"'braaksc' is not numeric.*III"):
        join_clinical(donors, bad, ["braaksc"])
    with pytest.raises(SeglabError, match="more than once"):
        join_clinical(donors, pd.DataFrame({"projid": [1, 1, 2], "braaksc": [1, 2, 3]}), ["braaksc"])
    with pytest.raises(SeglabError, match="no outcome column"):
        join_clinical(donors, pd.DataFrame({"projid": [1], "braaksc": [1]}), ["cogdx"])
    ok = join_clinical(donors, pd.DataFrame({"projid": range(5), "braaksc": ["1", "2", "", "4", "5"]}), ["braaksc"])
    assert np.isnan(ok.outcomes.loc["2", "braaksc"])  # blank = missing, kept as NaN


# --------------------------------------------------------------------------- correlations


@pytest.fixture(scope="module")
def cohort_tables():
    tiles, clin = synthetic_tile_table(
        30, 4, {"gfap": 0.9, "iba1": 0.0, "neun": -0.6}, outcomes=("braaksc", "cogdx", "gpath"), seed=5
    )
    clin.loc[3, "cogdx"] = np.nan
    return tiles, clin


def test_correlate_equals_scipy_and_statsmodels(cohort_tables):
    tiles, clin = cohort_tables
    # a donor with zero gfap cells and one donor absent from the clinical table
    tiles = tiles.copy()
    z = (tiles["donor"] == tiles["donor"].iloc[0]) & (tiles["marker"] == "gfap")
    tiles.loc[z, ["n_total_cells", "n_marker_positive"]] = 0
    clin = clin[clin["projid"] != tiles["donor"].max()]
    donors = donor_features(tiles)
    c = join_clinical(donors, clin, ["braaksc", "cogdx", "gpath"])
    assert c.missing_in_clinical == [str(tiles["donor"].max())]
    res = correlate(c)
    assert len(res) == 3 * 3 * 3
    wide = donors.set_index(["donor", "marker"])
    for _, r in res.iterrows():
        x = wide.xs(r.marker, level="marker")[r.feature].reindex(c.donors).to_numpy(float)
        y = c.outcomes[r.outcome].to_numpy(float)
        rho, _, n = _scipy_spearman(x, y)
        assert r.n == n
        np.testing.assert_allclose([r.rho, r.p], [rho, _pair_permutation_p(x, y)], **TOL)
    ok = res["p"].notna()
    np.testing.assert_allclose(res.loc[ok, "q"], multipletests(res.loc[ok, "p"], method="fdr_bh")[1], **TOL)
    zrow = res[(res.marker == "gfap") & (res.feature == "ratio") & (res.outcome == "cogdx")].iloc[0]
    assert zrow.n + zrow.n_dropped == 29 and zrow.n_dropped >= 2
    assert f"{tiles['donor'].iloc[0]}(zero cells)" in zrow.dropped and "(cogdx missing)" in zrow.dropped
    assert res.loc[(res.marker == "gfap") & (res.feature == "ratio"), "rho"].min() > 0.3


def test_correlate_family_per_marker(cohort_tables):
    tiles, clin = cohort_tables
    c = join_clinical(donor_features(tiles), clin, ["braaksc", "cogdx", "gpath"])
    res = correlate(c, family=("marker",))
    for _, g in res.groupby("marker"):
        np.testing.assert_allclose(g["q"], multipletests(g["p"], method="fdr_bh")[1], **TOL)
    with pytest.raises(SeglabError, match="family"):
        correlate(c, family=("donor",))


def test_too_few_donors_and_constant_outcome_give_nan_with_reason():
    t = _tiles([(f"t{i}", i, "gfap", 100, 10, i) for i in range(4)])
    clin = pd.DataFrame({"projid": range(4), "braaksc": [1, np.nan, np.nan, 2.0], "cogdx": [3.0] * 4})
    res = correlate(join_clinical(donor_features(t), clin, ["braaksc", "cogdx"]), features=["ratio"])
    r = res.set_index("outcome")
    assert np.isnan(r.loc["braaksc", "rho"]) and r.loc["braaksc", "n"] == 2 and "fewer than 3" in r.loc["braaksc", "reason"]
    assert np.isnan(r.loc["cogdx", "rho"]) and r.loc["cogdx", "reason"] == "constant cogdx"
    assert res["q"].isna().all()


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_equals_plain_loop_on_the_same_draws(cohort_tables):
    tiles, clin = cohort_tables
    tiles = tiles.copy()
    # donor 0 has cells in only one of its 4 gfap tiles: some resamples have zero cells (ratio NaN)
    sel = np.flatnonzero((tiles["donor"] == tiles["donor"].iloc[0]) & (tiles["marker"] == "gfap"))[1:]
    tiles.loc[tiles.index[sel], ["n_total_cells", "n_marker_positive"]] = 0
    outcomes = ["braaksc", "cogdx", "gpath"]
    c = join_clinical(donor_features(tiles), clin, outcomes)
    tests, rho, q, draws = bootstrap_replicates(tiles, c, B=12, seed=11, return_draws=True)
    by_id = tiles.set_index(tiles["tile_id"].astype(str))
    zero_resamples = 0
    for b in range(12):
        rs = pd.concat([by_id.loc[ids[idx[b]]] for ids, idx in draws.values()], ignore_index=True)
        d = donor_features(rs)
        zero_resamples += int((d["reason"] == ZERO_CELLS).any())
        cb = join_clinical(d, clin, outcomes)
        wide = d.set_index(["donor", "marker"])
        p_ref, r_ref = [], []
        for _, tst in tests.iterrows():
            x = wide.xs(tst.marker, level="marker")[tst.feature].reindex(cb.donors).to_numpy(float)
            r_, _, _ = _scipy_spearman(x, cb.outcomes[tst.outcome].to_numpy(float))
            p_ = _pair_permutation_p(x, cb.outcomes[tst.outcome].to_numpy(float), seed=11, untie_x_null=True)
            r_ref.append(r_)
            p_ref.append(p_)
        np.testing.assert_allclose(rho[b], r_ref, **TOL)
        np.testing.assert_allclose(q[b], multipletests(p_ref, method="fdr_bh")[1], **TOL)
    assert 0 < zero_resamples < 12  # both kinds of resample were checked
    # every resample keeps each (donor, marker)'s tile count and draws only its own tiles
    ids, idx = draws["gfap"]
    donor_of = by_id.loc[ids, "donor"].to_numpy()
    assert (donor_of[idx] == donor_of[None, :]).all()


def test_bootstrap_seeded_and_stability_summary(cohort_tables):
    tiles, clin = cohort_tables
    a1 = analyse(tiles, clin, ["braaksc", "cogdx", "gpath"], B=200, seed=1)
    a2 = analyse(tiles, clin, ["braaksc", "cogdx", "gpath"], B=200, seed=1)
    a3 = analyse(tiles, clin, ["braaksc", "cogdx", "gpath"], B=200, seed=2)
    cols = ["rho_ci_low", "rho_ci_high", "frac_same_sign", "frac_significant"]
    pd.testing.assert_frame_equal(a1.correlations[cols], a2.correlations[cols])
    assert not a1.correlations[cols].equals(a3.correlations[cols])
    c = a1.correlations
    strong = c[(c.marker == "gfap") & (c.feature == "ratio")]
    assert (strong["frac_same_sign"] == 1).all()
    # tests significant in the data stay significant in many resamples; clearly null ones rarely are
    assert c.loc[c.q < 0.05, "frac_significant"].mean() > 0.4
    assert c.loc[c.q > 0.2, "frac_significant"].max() < 0.1
    assert ((c["rho_ci_low"] <= c["rho_ci_high"]) & c["frac_same_sign"].between(0, 1)).all()
    # the CI brackets the observed rho for a well-behaved test
    assert ((strong["rho_ci_low"] <= strong["rho"]) & (strong["rho"] <= strong["rho_ci_high"])).all()
    # stability_summary against direct numpy on a small array
    rho = np.array([[0.5, -0.1], [0.2, 0.3], [np.nan, 0.1], [0.4, -0.2]])
    q = np.array([[0.01, 0.5], [0.2, 0.04], [np.nan, 0.9], [0.03, 0.2]])
    s = stability_summary(np.array([0.3, 0.2]), rho, q, alpha=0.05, ci=0.5)
    assert s["frac_same_sign"].tolist() == [1.0, 0.5] and s["frac_significant"].tolist() == [0.5, 0.25]
    assert s["n_boot_valid"].tolist() == [3, 4]
    assert s.loc[0, "rho_ci_low"] == pytest.approx(np.percentile([0.5, 0.2, 0.4], 25))


def test_threshold_sensitivity_and_compare_segmentations():
    man, images = _manifest_and_images(seed=2, n_donors=6, tiles=2)
    load_marker = lambda r: images[r.tile_id][1]  # noqa: E731
    truth = tile_table(man, load_mask=lambda r: images[r.tile_id][0], load_marker=load_marker)

    def eroded(r):  # a "model" that loses the rim of every cell
        m = images[r.tile_id][0]
        return np.where(ndimage.grey_erosion(m, size=3) == m, m, 0)

    model = tile_table(man, load_mask=eroded, load_marker=load_marker)
    clin = pd.DataFrame({"projid": np.arange(100, 106), "braaksc": [0, 1, 2, 3, 4, 5.0], "gpath": [1, 0, 3, 2, 5, 4.0]})
    sens = threshold_sensitivity(truth, clin, ["braaksc", "gpath"], B=50, seed=0)
    assert sorted(sens["percentile"].unique()) == [60, 70, 75, 80, 90]
    at75 = sens[sens.percentile == 75].drop(columns="percentile").reset_index(drop=True)
    direct = analyse(truth, clin, ["braaksc", "gpath"], B=50, seed=0).correlations
    pd.testing.assert_frame_equal(at75, direct)
    cmp = compare_segmentations({"truth": truth, "model": model, "same": truth.copy()}, clin, ["braaksc", "gpath"],
                         truth="truth", B=50, seed=0)
    side = cmp["side_by_side"]
    np.testing.assert_array_equal(side["rho_same"], side["rho_truth"])
    assert (side["abs_rho_diff_vs_truth_same"].fillna(0) == 0).all() and side["same_call_as_truth_same"].all()
    # paired bootstrap: identical tiles give identical stability
    np.testing.assert_array_equal(side["frac_same_sign_same"], side["frac_same_sign_truth"])
    agree = cmp["donor_agreement"].set_index(["model", "marker", "feature"])
    assert (agree.xs("same")["median_abs_rel_error"] == 0).all()
    assert (agree.xs("model").loc[("gfap", "total_per_mpx"), "rho_vs_truth"]) > 0.5
    with pytest.raises(SeglabError, match="different tiles"):
        compare_segmentations({"truth": truth, "model": model.iloc[1:]}, clin, ["braaksc"], B=0)


# --------------------------------------------------------------------------- calibration


def test_null_calibration_bh_controls_fdr_over_200_cohorts():
    """200 simulated cohorts, 2 markers with an effect and 3 null: the mean FDP after BH is at most alpha.

    The false discoveries are tests of the null markers (their features are
    independent of every outcome). As a check that the test can fail: without
    the correction, the same cohorts' FDP is far above alpha.
    """
    alpha = 0.05
    effects = {"gfap": 0.5, "iba1": 0.4, "neun": 0.0, "olig2": 0.0, "pecam": 0.0}
    outs = ["braaksc", "cogdx", "gpath", "nft"]
    fdp_bh, fdp_raw, power = [], [], []
    for s in range(200):
        tiles, clin = synthetic_tile_table(25, 3, effects, outcomes=outs, seed=1000 + s, cells_per_tile=60)
        # 20,000 pairings: a valid, coarser p (the default 200,000 is for the BH edge of one study)
        res = correlate(join_clinical(donor_features(tiles), clin, outs), n_resamples=20_000)
        null = res["marker"].isin(["neun", "olig2", "pecam"]).to_numpy()
        for disc, acc in ((res["q"] < alpha, fdp_bh), (res["p"] < alpha, fdp_raw)):
            disc = disc.to_numpy()
            acc.append((disc & null).sum() / max(disc.sum(), 1))
        power.append(((res["q"] < alpha).to_numpy() & ~null & (res["feature"] != "total_per_mpx").to_numpy()).mean())
    assert len(fdp_bh) >= 200
    assert np.mean(fdp_bh) <= alpha
    assert np.mean(fdp_raw) > 1.5 * alpha  # uncorrected: the null markers' hits pile up
    assert np.mean(power) > 0.1  # and there are true discoveries to protect


def test_plots_draw_headless_and_mark_significance(cohort_tables, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from seglab.plots import downstream as pdn

    tiles, clin = cohort_tables
    outs = ["braaksc", "cogdx", "gpath"]
    a = analyse(tiles, clin, outs, B=30, seed=0)
    fig = pdn.rho_heatmap(a.correlations, "ratio")
    texts = [t.get_text() for t in fig.axes[0].texts]
    ratio = a.correlations[a.correlations.feature == "ratio"]
    assert len(texts) == len(ratio) == 9
    assert sum(t.endswith("*") for t in texts) == int((ratio["q"] < 0.05).sum())
    fig.savefig(tmp_path / "heat.png")
    man, images = _manifest_and_images(seed=2, n_donors=6, tiles=2)
    img_tiles = tile_table(man, load_mask=lambda r: images[r.tile_id][0], load_marker=lambda r: images[r.tile_id][1])
    img_clin = pd.DataFrame({"projid": np.arange(100, 106), "braaksc": [0, 1, 2, 3, 4, 5.0]})
    sens = threshold_sensitivity(img_tiles, img_clin, ["braaksc"], B=0)
    cmp = compare_segmentations({"a": tiles, "b": tiles.copy()}, clin, outs, truth="a", B=20, seed=0)
    for f in (pdn.stability_plot(a.correlations), pdn.sensitivity_plot(sens),
              pdn.compare_heatmaps(cmp["side_by_side"], ["a", "b"]), pdn.recovery_bars(cmp["recovery"])):
        f.savefig(tmp_path / "f.png")
    with pytest.raises(SeglabError, match="missing column"):
        pdn.rho_heatmap(a.correlations.drop(columns="q"))
    paths = a.save(tmp_path / "out")
    back = pd.read_csv(paths["correlations"])
    assert len(back) == len(a.correlations) and (tmp_path / "out" / "downstream.json").is_file()


def test_e5_figures_one_panel_per_model_with_the_right_lines(tmp_path):
    """sensitivity_panels (one panel per model, one line per marker), stability_plot's title,
    count_agreement_figure and recovery_by_percentile_plot, on exact small tables."""
    import matplotlib

    matplotlib.use("Agg")
    from seglab.plots import downstream as pdn

    sens = pd.DataFrame({"model": np.repeat(["truth", "baseline"], 8), "percentile": np.tile([60.0, 60, 75, 75], 4),
                         "marker": np.tile(np.repeat(["gfap", "neun"], 4), 2), "feature": "ratio",
                         "outcome": np.tile(["o1", "o2"], 8), "rho": np.arange(16) / 10})
    fig = pdn.sensitivity_panels(sens, ["truth", "baseline"])
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["truth", "baseline"]
    # truth, gfap: mean over o1/o2 of rho (0.0, 0.1) at 60 and (0.2, 0.3) at 75
    gfap = panels[0].get_lines()[0]
    assert list(gfap.get_xdata()) == [60.0, 75.0] and np.allclose(gfap.get_ydata(), [0.05, 0.25])
    assert len([ln for ln in panels[1].get_lines() if ln.get_marker() == "o"]) == 2
    one = pdn.sensitivity_plot(sens[sens["model"] == "truth"])
    assert np.allclose(one.axes[0].get_lines()[1].get_ydata(), [0.45, 0.65])   # neun
    corr = pd.DataFrame({"marker": ["gfap", "neun"], "feature": "ratio", "outcome": "o1", "rho": [0.5, -0.2],
                         "rho_ci_low": [0.3, -0.4], "rho_ci_high": [0.7, 0.0], "frac_significant": [1.0, 0.0]})
    assert pdn.stability_plot(corr, title="truth: B = 5")._suptitle.get_text() == "truth: B = 5"
    agree = pd.DataFrame({"model": ["m1", "m1", "m2", "m2"], "n_total_cells": [4, 6, 5, 5],
                          "n_marker_positive": [1, 2, 1, 3], "n_total_cells_truth": [5, 6, 5, 6],
                          "n_marker_positive_truth": [1, 3, 1, 3]})
    fig = pdn.count_agreement_figure(agree)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["m1: r = 1.00, total 0.91 x truth", "m2: r = nan, total 0.91 x truth"]
    rec = pd.DataFrame({"model": ["truth", "baseline"] * 2, "percentile": [60.0, 60.0, 75.0, 75.0],
                        "recovered": [0.5, 0.25, 0.75, 0.5], "false_positive_rate": [0.0, 0.1, 0.0, 0.2]})
    fig = pdn.recovery_by_percentile_plot(rec)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["truth: recovered", "truth: false pos.", "baseline: recovered",
                                                "baseline: false pos."]
    assert list(lines[2].get_ydata()) == [0.25, 0.5]
    fig.savefig(tmp_path / "rec.png")
    with pytest.raises(SeglabError, match="missing column"):
        pdn.count_agreement_figure(agree.drop(columns="n_total_cells_truth"))
