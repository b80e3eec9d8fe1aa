"""seglab.evaluate.claims: paired, donor-clustered intervals and tests on cases with a known answer."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from seglab.evaluate import claims, metrics

THS = (0.5, 0.75)


def simulate(rng, n_donors, n_tiles, donor_sd, tile_sd=0.0, shift=0.0):
    """Counts of A and B on the same truth: B's detection probability differs from A's by
    ``shift`` + a per-donor effect (sd ``donor_sd``) + a per-tile effect (sd ``tile_sd``)."""
    n = n_donors * n_tiles
    donors = np.repeat(np.arange(n_donors), n_tiles)
    n_true = rng.integers(40, 80, n)
    base = rng.uniform(0.6, 0.8, n)
    effect = shift + rng.normal(0, donor_sd, n_donors)[donors] + rng.normal(0, tile_sd, n)
    out = []
    for p in (base, np.clip(base + effect, 0.05, 0.99)):
        tp = np.round(n_true * p)
        fp = np.round(n_true * 0.1)
        out.append(np.stack([tp, fp, n_true - tp], axis=-1)[:, None, :])
    return out[0], out[1], donors


def test_metric_values_are_the_library_scores():
    rng = np.random.default_rng(0)
    sums = rng.integers(0, 4, (500, 3)).astype(float)     # many zeros: tp = 0, fp = 0, fn = 0 cases
    ours = claims.metric_values(sums)
    for row, got in zip(sums, ours):
        tp, fp, fn = row
        ref = metrics.scores(0.5, tp + fn, tp + fp, tp, 0.0)
        assert got.tolist() == [ref[m] for m in claims.METRICS]


def disks(shape, centres, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    out = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = i
    return out


def test_estimates_agree_with_evaluate_on_label_images():
    rng = np.random.default_rng(1)
    pairs_a, pairs_b, groups = {}, {}, []
    for k in range(6):
        centres = [(y, x) for y in range(10, 90, 20) for x in range(10, 90, 20) if rng.random() < 0.8]
        truth = disks((100, 100), centres, 7)
        shifted = np.roll(truth, rng.integers(1, 5), axis=1)      # IoU drops: some fall below 0.75
        dropped = truth.copy()
        dropped[np.isin(dropped, rng.choice(np.arange(1, truth.max() + 1), 2, replace=False))] = 0
        dropped[90:97, 90:97] = 99                                 # a spurious object: a false positive
        pairs_a[f"t{k}"], pairs_b[f"t{k}"] = (truth, shifted), (truth, dropped)
        groups.append({"image": f"t{k}", "donor": f"d{k // 2}"})
    ev_a = metrics.evaluate(pairs_a, groups=pd.DataFrame(groups), thresholds=THS)
    ev_b = metrics.evaluate(pairs_b, groups=pd.DataFrame(groups), thresholds=THS)
    table = claims.compare(ev_a.per_image, ev_b.per_image, a="shifted", b="dropped", n_resamples=200)
    for _, row in table.iterrows():
        pa = ev_a.pooled[ev_a.pooled["threshold"] == row["threshold"]].iloc[0]
        pb = ev_b.pooled[ev_b.pooled["threshold"] == row["threshold"]].iloc[0]
        assert row["estimate_a"] == pa[row["metric"]] and row["estimate_b"] == pb[row["metric"]]
        assert row["difference"] == pytest.approx(pb[row["metric"]] - pa[row["metric"]], abs=1e-15)
        assert row["n_donors"] == 3 and row["n_tiles"] == 6
    pc = claims.paired_counts(ev_a.per_image, ev_b.per_image)
    boot = claims.bootstrap_differences(pc.counts_a, pc.counts_b, pc.clusters, n_resamples=10)
    np.testing.assert_allclose(boot.estimate.T.ravel(), table["difference"], atol=1e-15)
    assert table.loc[(table["metric"] == "ap") & (table["threshold"] == 0.75), "difference"].iloc[0] > 0


@pytest.mark.parametrize("method", claims.INTERVALS)
def test_identical_segmentations_give_zero_width_interval_and_p_one(method):
    rng = np.random.default_rng(2)
    a, _, donors = simulate(rng, 6, 4, donor_sd=0.1, tile_sd=0.1)
    table = claims.compare_counts(a, a.copy(), donors, (0.5,), interval_method=method, n_resamples=500)
    assert (table["difference"] == 0).all()
    assert (table["ci_low"] == 0).all() and (table["ci_high"] == 0).all()
    assert (table["p_value"] == 1).all()
    assert table["n_permutations"].iloc[0] == 64


def test_constant_per_tile_ap_gives_the_difference_exactly():
    rng = np.random.default_rng(3)
    j = rng.integers(1, 20, 40).astype(float)[:, None]      # tile sizes vary, 40 j true objects each
    a = np.stack([30 * j, 10 * j, 10 * j], -1)               # AP 30 / 50 = 0.6 on every tile
    b = np.stack([32 * j, 0 * j, 8 * j], -1)                 # AP 32 / 40 = 0.8 on every tile
    donors = np.repeat(np.arange(10), 4)
    for method in claims.INTERVALS:
        row = claims.compare_counts(a, b, donors, (0.5,), interval_method=method, n_resamples=300).iloc[0]
        assert row["metric"] == "ap"
        assert row["difference"] == pytest.approx(0.2)
        assert row["ci_low"] == pytest.approx(0.2) and row["ci_high"] == pytest.approx(0.2)


def test_constant_improvement_gives_a_narrow_interval_around_it():
    rng = np.random.default_rng(4)
    n_true = rng.integers(60, 100, 32).astype(float)
    tp_a = np.round(0.7 * n_true)
    fp = np.round(0.1 * n_true)
    a = np.stack([tp_a, fp, n_true - tp_a], -1)[:, None, :]
    b = np.stack([tp_a + 3, fp, n_true - tp_a - 3], -1)[:, None, :]   # three more cells found on every tile
    donors = np.repeat(np.arange(8), 4)
    table = claims.compare_counts(a, b, donors, (0.5,), n_resamples=2000)
    row = table[table["metric"] == "ap"].iloc[0]
    sums_a, sums_b = a.sum(axis=0)[0], b.sum(axis=0)[0]
    truth = sums_b[0] / sums_b.sum() - sums_a[0] / sums_a.sum()
    assert row["difference"] == pytest.approx(truth)
    assert row["ci_low"] < truth < row["ci_high"]
    assert row["ci_high"] - row["ci_low"] < 0.2 * truth
    assert row["ci_low"] > 0
    assert row["p_value"] == 2 / 2 ** 8      # every donor better: only the identity and its mirror reach it


def interval_width(table):
    row = table[table["metric"] == "ap"].iloc[0]
    return row["ci_high"] - row["ci_low"]


def test_donor_clustering_widens_the_interval_when_a_donors_tiles_agree():
    rng = np.random.default_rng(5)
    a, b, donors = simulate(rng, 8, 10, donor_sd=0.08, tile_sd=0.01, shift=0.03)
    for method in claims.INTERVALS:
        clustered = claims.compare_counts(a, b, donors, (0.5,), interval_method=method)
        naive = claims.compare_counts(a, b, donors, (0.5,), interval_method=method, cluster=False)
        assert interval_width(clustered) > 2.0 * interval_width(naive), method
        assert ("delete-one-tile" if method == "t" else "ignoring donors") in naive["method"].iloc[0]
    # the same tiles with the donor effect gone: the two intervals are of the same order
    a, b, donors = simulate(rng, 8, 10, donor_sd=0.0, tile_sd=0.03, shift=0.03)
    ratio = interval_width(claims.compare_counts(a, b, donors, (0.5,), cluster=False)) / interval_width(
        claims.compare_counts(a, b, donors, (0.5,), resample_tiles=False))
    assert 0.7 < ratio < 1.4


def test_claim_flag_only_when_the_interval_excludes_zero():
    assert claims.claim_holds(0.01, 0.05) and not claims.claim_holds(-0.01, 0.05)
    assert not claims.claim_holds(0.0, 0.05)
    assert claims.claim_holds(-0.05, -0.01, "less") and not claims.claim_holds(-0.05, 0.01, "less")
    assert not claims.claim_holds(float("nan"), 0.1)
    rng = np.random.default_rng(6)
    a, b, donors = simulate(rng, 6, 4, donor_sd=0.05, tile_sd=0.05, shift=0.0)
    crossing = claims.compare_counts(a, b, donors, (0.5,), a="baseline", b="finetuned")
    keys = claims.claim_keys(crossing, "test_ap50_gain")
    assert keys["test_ap50_gain_ci_low"] < 0 < keys["test_ap50_gain_ci_high"]
    assert keys["finetuned_beats_baseline"] is False
    a, b, donors = simulate(rng, 6, 4, donor_sd=0.01, tile_sd=0.01, shift=0.1)
    clear = claims.compare_counts(a, b, donors, (0.5,), a="baseline", b="finetuned")
    keys = claims.claim_keys(clear, "test_ap50_gain", claim="finetuned_generic_beats_baseline")
    assert keys["test_ap50_gain_ci_low"] > 0 and keys["finetuned_generic_beats_baseline"] is True
    assert set(keys) == {"test_ap50_gain", "test_ap50_gain_ci_low", "test_ap50_gain_ci_high",
                         "test_ap50_gain_p_value", "finetuned_generic_beats_baseline"}
    assert claims.claim_keys(clear, "loss", direction="less")["baseline_beats_finetuned"] is False


def brute_force_p(a, b, donors, metric, th_index):
    """Two-sided p over every swap of A and B within donors, with the library's pooled scores."""
    def pooled(counts):
        tp, fp, fn = counts.sum(axis=0)[th_index]
        return metrics.scores(0.5, tp + fn, tp + fp, tp, 0.0)[metric]

    ids = np.unique(donors)
    stats = []
    for flips in itertools.product([False, True], repeat=len(ids)):
        swap = np.isin(donors, ids[list(flips)])[:, None, None]
        stats.append(pooled(np.where(swap, a, b)) - pooled(np.where(swap, b, a)))
    stats = np.abs(stats)
    return float(np.mean(stats >= stats[0] - 1e-12))


def test_permutation_p_equals_brute_force_enumeration():
    rng = np.random.default_rng(7)
    donors = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 4])      # unequal donors
    n_true = rng.integers(5, 40, (12, 2))
    a = np.stack([n_true // 2, rng.integers(0, 9, (12, 2)), n_true - n_true // 2], -1)
    tp_b = np.minimum(n_true, n_true // 2 + rng.integers(-3, 6, (12, 2)))
    b = np.stack([tp_b, rng.integers(0, 9, (12, 2)), n_true - tp_b], -1)
    test = claims.donor_flip_test(a, b, donors)
    assert test.exact and test.n_flips == 32
    for k, metric in enumerate(claims.METRICS):
        for j in range(2):
            assert test.p_value[j, k] == pytest.approx(brute_force_p(a, b, donors, metric, j), abs=1e-12)


def test_monte_carlo_p_is_close_to_the_exact_one():
    rng = np.random.default_rng(8)
    a, b, donors = simulate(rng, 10, 3, donor_sd=0.03, tile_sd=0.03, shift=0.01)
    exact = claims.donor_flip_test(a, b, donors)
    sampled = claims.donor_flip_test(a, b, donors, exact_max_donors=4, n_permutations=20000, seed=1)
    assert exact.exact and exact.n_flips == 1024 and not sampled.exact and sampled.n_flips == 20000
    np.testing.assert_allclose(sampled.p_value, exact.p_value, atol=0.015)
    same = claims.donor_flip_test(a, a, donors, exact_max_donors=4, n_permutations=99)
    assert (same.p_value == 1).all()


def test_two_stage_weights_have_the_right_distribution():
    from scipy.stats import binom

    rng = np.random.default_rng(9)
    codes = np.array([1, 0, 1, 1])          # donor 1 has three tiles, donor 0 one
    w = claims.bootstrap_weights(codes, 200_000, rng)
    # donor 1 is drawn m ~ Bin(2, 1/2) times, then each of its tiles ~ Bin(3 m, 1/3)
    expected = sum(binom.pmf(m, 2, 0.5) * binom.pmf(np.arange(7), 3 * m, 1 / 3) for m in range(3))
    for tile in (0, 2, 3):
        np.testing.assert_allclose(np.bincount(w[:, tile], minlength=7)[:7] / len(w), expected, atol=0.004)
    np.testing.assert_allclose(np.bincount(w[:, 1], minlength=3) / len(w), [0.25, 0.5, 0.25], atol=0.004)
    whole = claims.bootstrap_weights(codes, 1000, rng, resample_tiles=False)
    assert (whole[:, 0] == whole[:, 2]).all() and (whole[:, 0] == whole[:, 3]).all()
    assert (claims.bootstrap_weights(codes, 50, rng, cluster=False).sum(axis=1) == 4).all()


def test_bca_matches_scipy_when_every_tile_is_its_own_donor():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(10)
    a, b, _ = simulate(rng, 40, 1, donor_sd=0.05, tile_sd=0.0, shift=0.02)
    donors = np.arange(40)

    def stat(*cols, axis=-1):
        sums = [np.sum(c, axis=axis) for c in cols]
        return (claims.metric_values(np.stack(sums[3:], -1))[..., 0]
                - claims.metric_values(np.stack(sums[:3], -1))[..., 0])

    data = [c for counts in (a, b) for c in np.moveaxis(counts[:, 0, :], 1, 0)]
    ref = bootstrap(data, stat, paired=True, vectorized=True, n_resamples=20000, method="BCa",
                    random_state=np.random.default_rng(11)).confidence_interval
    boot = claims.bootstrap_differences(a, b, donors, n_resamples=20000, seed=12)
    low, high = claims.interval(boot, "bca")
    width = ref.high - ref.low
    assert abs(low[0, 0] - ref.low) < 0.05 * width and abs(high[0, 0] - ref.high) < 0.05 * width


def test_same_seed_same_table_and_inputs_checked():
    rng = np.random.default_rng(13)
    a, b, donors = simulate(rng, 6, 4, donor_sd=0.05, tile_sd=0.05)
    one = claims.compare_counts(a, b, donors, (0.5,), seed=3, interval_method="percentile")
    pd.testing.assert_frame_equal(one, claims.compare_counts(a, b, donors, (0.5,), seed=3, interval_method="percentile"))
    assert not one["ci_low"].equals(claims.compare_counts(a, b, donors, (0.5,), seed=4,
                                                          interval_method="percentile")["ci_low"])
    # the t interval is the jackknife's: no resampling, the same whatever the seed
    pd.testing.assert_series_equal(claims.compare_counts(a, b, donors, (0.5,), seed=3)["ci_low"],
                                   claims.compare_counts(a, b, donors, (0.5,), seed=4)["ci_low"])
    wrong_truth = b.copy()
    wrong_truth[0, 0, 2] += 1
    with pytest.raises(claims.ClaimsInputError, match="same truth"):
        claims.compare_counts(a, wrong_truth, donors, (0.5,))
    with pytest.raises(claims.ClaimsInputError, match="one donor"):
        claims.compare_counts(a, b, donors[:-1], (0.5,))
    with pytest.raises(claims.ClaimsInputError, match="interval method"):
        claims.compare_counts(a, b, donors, (0.5,), interval_method="normal")


def per_image_table(counts, donors, model, thresholds=(0.5,)):
    rows = []
    for i, (tile, donor) in enumerate(zip(counts, donors)):
        for j, th in enumerate(thresholds):
            tp, fp, fn = tile[j]
            rows.append({"model": model, "image": f"tile{i:03d}", "donor": f"d{donor}", "threshold": th,
                         "tp": tp, "fp": fp, "fn": fn})
    return pd.DataFrame(rows)


def test_tables_are_paired_by_tile_and_checked():
    rng = np.random.default_rng(14)
    a, b, donors = simulate(rng, 5, 3, donor_sd=0.05, tile_sd=0.05, shift=0.05)
    long = pd.concat([per_image_table(a, donors, "baseline"), per_image_table(b, donors, "tuned")])
    shuffled = long.sample(frac=1.0, random_state=0)
    table = claims.compare_pairs(shuffled, [("baseline", "tuned")])
    direct = claims.compare_counts(a, b, [f"d{d}" for d in donors], (0.5,), a="baseline", b="tuned")
    pd.testing.assert_frame_equal(table, direct)
    with pytest.raises(claims.ClaimsInputError, match="different tiles"):
        claims.compare(long[long["model"] == "baseline"], long[long["model"] == "tuned"].iloc[1:])
    with pytest.raises(claims.ClaimsInputError, match="several rows"):
        claims.compare(long, long)
    with pytest.raises(claims.ClaimsInputError, match="lacks columns"):
        claims.compare(long.drop(columns="donor"), long)


def test_grid_range_of_one_model_across_a_parameter():
    rng = np.random.default_rng(15)
    a, _, donors = simulate(rng, 6, 4, donor_sd=0.0, tile_sd=0.05)
    flat = pd.concat([per_image_table(a, donors, "m").assign(value=v) for v in (0.2, 0.4, 0.6)])
    still = claims.grid_range(flat, n_resamples=300, n_permutations=199)
    assert (still["range"] == 0).all() and (still["p_value"] == 1).all() and (still["ci_high"] == 0).all()
    worse = a.copy()
    worse[..., 0] -= 8
    worse[..., 2] += 8
    moved = pd.concat([flat, per_image_table(worse, donors, "m").assign(value=0.8)])
    row = claims.grid_range(moved, n_resamples=500, n_permutations=499).iloc[0]
    assert row["metric"] == "ap" and row["setting_min"] == 0.8 and row["n_settings"] == 4
    assert row["ci_low"] <= row["range"] <= row["ci_high"] and row["ci_low"] > 0
    assert row["p_value"] <= 0.01
