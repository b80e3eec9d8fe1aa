"""The cohort simulator: determinism, layout, planted truth, positivity rule, realism vs DSB2018."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from seglab import SeglabError
from seglab.core.io import sha256_tree
from seglab.data.simulate import (MARKERS, SimParams, _clinical, _donors, image_stats, positivity_agreement,
                             realism_summary, realism_table, render_tile, rule_positive, simulate_cohort,
                             truth_counts)

SMALL = dict(n_donors=4, tiles_per_marker=1, size_px=128)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return simulate_cohort(tmp_path_factory.mktemp("sim") / "c", seed=3, **SMALL)


@pytest.fixture(scope="module")
def cohort256(tmp_path_factory):
    """6 donors x 5 markers x 1 tile at the demo tile size (for the positivity rule)."""
    return simulate_cohort(tmp_path_factory.mktemp("sim256") / "c", n_donors=6, tiles_per_marker=1, seed=1)


def test_same_seed_byte_identical_other_seed_differs(small, tmp_path):
    again = simulate_cohort(tmp_path / "again", seed=3, **SMALL)
    assert sha256_tree(again) == sha256_tree(small)
    other = simulate_cohort(tmp_path / "other", seed=4, **SMALL)
    assert sha256_tree(other) != sha256_tree(small)


def test_layout_and_file_types(small):
    tiles = pd.read_csv(small / "tiles.csv")
    assert len(tiles) == 4 * 5
    for t in tiles.itertuples():
        dapi = tifffile.imread(small / "tiles" / f"{t.tile_id}_c0.tif")
        marker = tifffile.imread(small / "tiles" / f"{t.tile_id}_{t.marker_channel}.tif")
        other = "c2" if t.marker_channel == "c1" else "c1"
        assert not (small / "tiles" / f"{t.tile_id}_{other}.tif").exists()
        mask = tifffile.imread(small / "masks" / f"{t.tile_id}.tif")
        assert dapi.dtype == marker.dtype == mask.dtype == np.uint16
        assert dapi.shape == marker.shape == mask.shape == (128, 128)
        assert t.tile_id.startswith(f"ROSMAP_{t.donor}_{t.marker}_")
    for name in ("clinical.csv", "truth.json", "donor_splits.yaml", "annotated.csv", "cells.csv"):
        assert (small / name).is_file()
    assert not [p for p in small.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_truth_matches_masks_and_cells(small):
    truth = json.loads((small / "truth.json").read_text())
    assert set(truth["markers"]) == set(MARKERS)
    assert truth["markers"]["olig2"] == {"effect": 0.0, "null": True, "base_fraction": 0.3}
    assert truth["markers"]["gfap"]["null"] is False and truth["markers"]["gfap"]["effect"] > 0
    assert truth["params"]["seed"] == 3
    cells = pd.read_csv(small / "cells.csv")
    tiles = pd.read_csv(small / "tiles.csv")
    for t in tiles.itertuples():
        mask = tifffile.imread(small / "masks" / f"{t.tile_id}.tif")
        ids = set(np.unique(mask)) - {0}
        c = cells[cells["tile_id"] == t.tile_id]
        assert ids == set(c["label"])
        assert t.n_total == len(c) and t.n_positive == int(c["positive"].sum())
    counts = truth_counts(small)
    assert len(counts) == 4 * 5
    merged = tiles.groupby(["donor", "marker"])[["n_total", "n_positive"]].sum().reset_index()
    merged = merged.merge(counts, on=["donor", "marker"], suffixes=("", "_truth"))
    assert (merged["n_total"] == merged["n_total_truth"]).all()
    assert (merged["n_positive"] == merged["n_positive_truth"]).all()


def test_clinical_table_missing_donors_and_ranges(small):
    truth = json.loads((small / "truth.json").read_text())
    clin = pd.read_csv(small / "clinical.csv")
    assert list(clin.columns) == ["projid", "braaksc", "ceradsc", "cogdx", "dcfdx_lv", "plaq_d", "plaq_n", "nft", "gpath"]
    missing = truth["donors_missing_from_clinical"]
    assert len(missing) == 2
    assert not set(missing) & set(clin["projid"])
    assert set(map(int, truth["donors"])) - set(missing) <= set(clin["projid"])
    assert clin["braaksc"].dropna().between(0, 6).all() and clin["ceradsc"].dropna().between(1, 4).all()
    assert (clin[["plaq_d", "plaq_n", "nft", "gpath"]].dropna() >= 0).all().all()


def test_clinical_driven_by_latent_score():
    rng = np.random.default_rng(0)
    P = SimParams(n_missing_clinical=0, n_clinical_only=0)
    donors = _donors(rng, 300, P)
    clin, _ = _clinical(rng, donors, P)
    both = donors.merge(clin, on="projid")
    assert both["latent_score"].corr(both["braaksc"].astype(float), method="spearman") > 0.5
    assert both["latent_score"].corr(both["ceradsc"].astype(float), method="spearman") < -0.4
    assert both["latent_score"].corr(both["nft"], method="spearman") > 0.5
    assert clin.isna().any().any()  # a few values are missing


def test_positive_fraction_follows_probability():
    P = SimParams()
    low = [render_tile(np.random.default_rng([s]), "gfap", 0.1, 256, P)["cells"]["positive"].mean() for s in range(4)]
    high = [render_tile(np.random.default_rng([s]), "gfap", 0.6, 256, P)["cells"]["positive"].mean() for s in range(4)]
    assert np.mean(low) < 0.2 < 0.45 < np.mean(high)


def test_default_rule_recovers_planted_positivity(cohort256):
    agree = positivity_agreement(cohort256)
    assert len(agree) == 30
    assert agree["agreement"].mean() > 0.88
    # per tile, the rule's positive count follows the planted one
    assert np.corrcoef(agree["n_positive"], agree["n_positive_rule"])[0, 1] > 0.8


def test_rule_positive_on_a_built_tile():
    labels = np.zeros((20, 20), np.uint16)
    labels[2:6, 2:6] = 5
    labels[10:14, 10:14] = 9
    marker = np.ones((20, 20))
    marker[2:6, 2:6] = 10
    got = rule_positive(marker, labels)
    assert got.set_index("label")["positive_rule"].to_dict() == {5: True, 9: False}


def test_nuisances_change_the_pixels():
    base = SimParams()
    ref = render_tile(np.random.default_rng(1), "iba1", 0.3, 128, base)
    for change in ({"lipofuscin_per_tile": 20.0}, {"illumination": 0.0}, {"dim_fraction": 1.0}):
        other = render_tile(np.random.default_rng(1), "iba1", 0.3, 128, SimParams(**change))
        assert not np.array_equal(ref["marker"], other["marker"]), change
    sharp = render_tile(np.random.default_rng(1), "iba1", 0.3, 128, SimParams(blur_fraction=0.0))
    blurred = render_tile(np.random.default_rng(1), "iba1", 0.3, 128, SimParams(blur_fraction=1.0))
    assert not sharp["info"]["out_of_focus"] and blurred["info"]["out_of_focus"]
    lap = [np.abs(np.diff(t["dapi"].astype(float), 2, axis=1)).mean() for t in (sharp, blurred)]
    assert lap[1] < lap[0]  # out of focus: less high-frequency detail


def test_refuses_to_overwrite(tmp_path, small):
    with pytest.raises(SeglabError, match="different simulated cohort"):
        simulate_cohort(small, seed=99, **SMALL)
    (tmp_path / "stuff").mkdir()
    with pytest.raises(SeglabError, match="not a simulated cohort"):
        simulate_cohort(tmp_path / "stuff", **SMALL)
    assert simulate_cohort(small, seed=3, **SMALL) == small  # same args: reused as is


def test_bad_arguments(tmp_path):
    with pytest.raises(SeglabError, match="unknown parameter"):
        simulate_cohort(tmp_path / "x", n_donors=3, tiles_per_marker=1, size_px=64, blurr=1)
    with pytest.raises(SeglabError, match="effects must map markers"):
        simulate_cohort(tmp_path / "x", n_donors=3, effects={"cd68": 1.0})
    assert SimParams.from_kwargs(effects={"olig2": 0.7}).effects == {**SimParams().effects, "olig2": 0.7}
    with pytest.raises(SeglabError, match="n_donors"):
        simulate_cohort(tmp_path / "x", n_donors=2)
    assert not (tmp_path / "x").exists()


def test_image_stats_exact():
    img = np.full((100, 100), 10.0)
    lab = np.zeros((100, 100), np.int32)
    lab[10:20, 10:20] = 3
    img[10:20, 10:20] = 50
    s = image_stats(img, lab)
    assert s["n_objects"] == 1 and s["median_area_px"] == 100 and s["density_per_mpx"] == pytest.approx(100.0)
    assert s["contrast_ratio"] == pytest.approx(5.0)


def test_realism_against_dsb2018(small, dsb_dir):
    table = realism_table(small, dsb_dir, dsb_groups=["256x256"])
    summary = realism_summary(table).set_index(["source", "statistic"])["median"]
    # nucleus area within a factor 2 of the real 256x256 group, contrast in the same range
    ratio = summary[("simulated", "median_area_px")] / summary[("dsb2018", "median_area_px")]
    assert 0.5 < ratio < 2
    assert 2 < summary[("simulated", "contrast_ratio")] < 30
