"""Planted truth: on a small simulated cohort, features from the ground-truth masks recover the planted effects.

The cohort (``seglab.data.simulate.simulate_cohort``: 24 donors x 5 markers x 2
tiles of 256 px, about 10 s) plants a log-odds effect per marker on the
fraction of positive cells (gfap, iba1, neun non-null; olig2, pecam null) and
writes every donor's true counts and latent score to ``truth.json``. The
reference rho of each test is the one computed from those true counts (the
planted positivity), over the same donors and outcomes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seglab.downstream.cohort import OUTCOMES, donor_features
from seglab.downstream.correlate import analyse, compare_segmentations
from seglab.downstream.features import tile_table

ALPHA = 0.05
SIZE_PX = 256


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from seglab.data import manifest as data
    from seglab.data.simulate import load_truth, simulate_cohort, truth_counts

    cohort = simulate_cohort(tmp_path_factory.mktemp("planted") / "cohort", n_donors=24, tiles_per_marker=2,
                             size_px=SIZE_PX, seed=4)
    truth = load_truth(cohort)
    manifest = data.cohort_manifest(cohort)
    tiles = tile_table(manifest)  # ground-truth masks, default loaders of seglab.data.manifest
    clinical = pd.read_csv(cohort / "clinical.csv")
    # the latent score as one more "outcome": the planted truth without clinical noise
    z = {int(d): rec["latent_score"] for d, rec in truth["donors"].items()}
    clinical["latent_score"] = clinical["projid"].map(z)
    outcomes = [*OUTCOMES, "latent_score"]
    tc = truth_counts(cohort)
    true_tiles = tc.assign(tile_id=tc["donor"].astype(str) + "_" + tc["marker"], area_px=tc["n_tiles"] * SIZE_PX ** 2,
                           n_total_cells=tc["n_total"], n_marker_positive=tc["n_positive"])
    got = analyse(tiles, clinical, outcomes, B=100, seed=0, alpha=ALPHA)
    ref = analyse(true_tiles, clinical, outcomes, B=0, alpha=ALPHA)
    key = ["marker", "feature", "outcome"]
    both = got.correlations.merge(ref.correlations[key + ["rho", "q"]], on=key, suffixes=("", "_truth"))
    return {"truth": truth, "truth_dir": str(cohort), "tiles": tiles, "true_tiles": true_tiles, "got": got, "both": both, "clinical": clinical}


def test_ground_truth_masks_give_the_true_cell_counts(planted):
    d = donor_features(planted["tiles"]).merge(
        donor_features(planted["true_tiles"]), on=["donor", "marker"], suffixes=("", "_truth"))
    assert len(d) == 24 * 5
    np.testing.assert_array_equal(d["n_total_cells"], d["n_total_cells_truth"])
    assert (d["n_tiles"] == 2).all()


def test_missing_donors_reported_by_id(planted):
    rep = planted["got"].cohort.report()
    truth = planted["truth"]
    assert sorted(rep["missing_in_clinical"]) == sorted(str(x) for x in truth["donors_missing_from_clinical"])
    assert sorted(rep["missing_in_tiles"]) == sorted(str(x) for x in truth["clinical_only_donors"])


def test_planted_effects_recovered_with_the_right_sign(planted):
    truth, both = planted["truth"], planted["both"]
    clin = planted["clinical"]
    ratio = both[both["feature"] == "ratio"].set_index(["marker", "outcome"])
    for marker, rec in truth["markers"].items():
        if rec["null"]:
            continue
        sign = np.sign(rec["effect"])
        lat = ratio.loc[(marker, "latent_score")]
        assert np.sign(lat["rho"]) == sign and abs(lat["rho"]) > 0.5 and lat["q"] < ALPHA, marker
        assert lat["frac_same_sign"] == 1.0
        for outcome in OUTCOMES:
            r = ratio.loc[(marker, outcome)]
            # the outcome's own direction (ceradsc falls as pathology rises)
            direction = np.sign(clin[outcome].astype(float).corr(clin["latent_score"], method="spearman"))
            if abs(r["rho_truth"]) > 0.3:
                assert np.sign(r["rho"]) == sign * direction, (marker, outcome)
            assert abs(r["rho"] - r["rho_truth"]) < 0.15, (marker, outcome, r["rho"], r["rho_truth"])


def test_null_markers_stay_at_the_declared_rate(planted):
    truth, both = planted["truth"], planted["both"]
    null = [m for m, rec in truth["markers"].items() if rec["null"]]
    assert null, "the simulator plants at least one null marker"
    ratio = both[both["feature"] == "ratio"]
    is_null = ratio["marker"].isin(null)
    disc = ratio["q"] < ALPHA
    # false discovery proportion of this cohort's planted-feature tests (BH over all tests of the model)
    assert (disc & is_null).sum() / max(disc.sum(), 1) <= ALPHA
    lat = ratio[is_null & (ratio["outcome"] == "latent_score")]
    assert (lat["rho"].abs() < 0.5).all()


def test_compare_segmentations_on_the_simulated_cohort(planted, tmp_path):
    """A degraded "model" (every nucleus dilated by 2 px, so it picks up its neighbours' marker signal)
    against the ground-truth masks: side by side, paired bootstrap, recovery of the truth's calls."""
    from scipy import ndimage

    from seglab.data import manifest as data

    tiles = planted["tiles"]
    manifest = data.cohort_manifest(Path(planted["truth_dir"]))

    def dilated(row):
        m = data.load_mask(row)
        grown = ndimage.grey_dilation(m, size=5)
        return np.where(m > 0, m, grown)

    model = tile_table(manifest, load_mask=dilated)
    outs = ["braaksc", "gpath", "latent_score"]
    cmp = compare_segmentations({"truth": tiles, "dilated": model, "copy": tiles.copy()}, planted["clinical"], outs,
                         truth="truth", B=50, seed=0)
    rec = cmp["recovery"].set_index("model")
    assert rec.loc["copy", "recovered"] == 1.0 and rec.loc["copy", "false_calls"] == 0.0
    assert 0 <= rec.loc["dilated", "recovered"] <= 1 and rec.loc["dilated", "n_truth_significant"] > 0
    side = cmp["side_by_side"]
    np.testing.assert_array_equal(side["frac_significant_copy"], side["frac_significant_truth"])
    agree = cmp["donor_agreement"].set_index(["model", "marker", "feature"])
    # dilation keeps every cell: the total densities agree exactly with the truth's
    assert (agree.xs("dilated").xs("total_per_mpx", level="feature")["median_abs_rel_error"] == 0).all()
