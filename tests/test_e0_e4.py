"""The steps and headline numbers of E0 (seglab.experiments.e0_data) and E4 (seglab.experiments.e4_sensitivity),
and their figures (seglab.plots.data, seglab.plots.sensitivity): exact small cases, exact values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from matplotlib.figure import Figure

from seglab import SeglabError
from seglab.config.settings import MaskSettings
from seglab.data import splitset
from seglab.data.manifest import cohort_manifest
from seglab.data.simulate import positivity_agreement
from seglab.experiments import e0_data as e0
from seglab.experiments import e4_sensitivity as e4
from seglab.plots import data as plots_data
from seglab.plots import sensitivity as plots_sens
from seglab.segment import dynamics

SIM = dict(n_donors=3, tiles_per_marker=1, size_px=96, seed=0)   # the conftest `cohort` fixture's arguments


def e0_params(cohort_dir, **changes) -> dict:
    params = dict(cohort_dir=str(cohort_dir), nuisance={}, tiles_dir=None, masks_dir=None, clinical_csv=None,
                  splits_yaml=None, annotated_csv=None, filename_pattern=None, n_example_tiles=5,
                  realism_max_tiles=10, **SIM)
    params.update(changes)
    return params


def small_manifest() -> pd.DataFrame:
    """Three donors, two markers: donor 1 (train) 2 annotated tiles, donor 2 (val) 1 of 2, donor 3 none."""
    return pd.DataFrame({
        "tile_id": ["a", "b", "c", "d", "e"], "donor": [1, 1, 2, 2, 3], "marker": ["gfap", "iba1", "gfap", "iba1", "gfap"],
        "annotated": [True, True, True, False, False], "split": ["train", "train", "val", "", ""],
        "mask_path": ["m/a.tif", "m/b.tif", "", "", ""]})


# --------------------------------------------------------------------------- E0


def test_prepare_cohort_simulates_once_then_reuses(tmp_path):
    said = []
    first = e0.prepare_cohort(e0_params(tmp_path / "c"), log=said.append)
    again = e0.prepare_cohort(e0_params(tmp_path / "c"), log=said.append)
    assert first.simulated and first.cohort_dir == tmp_path / "c" and first.generated_splits is None
    assert first.generation_s is not None and again.generation_s is None
    assert "generated in" in said[0] and said[1].endswith("(reused)")
    pd.testing.assert_frame_equal(first.manifest, again.manifest)
    assert len(first.manifest) == 15 and first.audit["n_tiles_paired"] == 15


def test_prepare_cohort_real_tiles_are_split_by_donor_here(cohort):
    params = e0_params(cohort, tiles_dir=str(cohort / "tiles"), masks_dir=str(cohort / "masks"),
                       clinical_csv=str(cohort / "clinical.csv"), annotated_csv=str(cohort / "annotated.csv"))
    real = e0.prepare_cohort(params)
    assert not real.simulated and real.cohort_dir is None and real.generation_s is None
    assert set(real.generated_splits) == {"train", "val", "test"}
    ann = real.manifest[real.manifest["annotated"]]
    assert len(ann) and (ann["split"] != "").all()
    assert sum(real.audit["annotated_per_split"].values()) == len(ann)
    assert e0.planted_truth(real) is None


def test_audit_brief_keeps_the_brief_keys_in_order():
    brief = e0.audit_brief({"n_files": 4, "n_annotated": 2, "other": 1})
    assert list(brief) == list(e0.BRIEF_KEYS)
    assert brief["n_files"] == 4 and brief["n_annotated"] == 2 and brief["fallbacks"] is None


def test_coverage_tables_exact():
    cov = e0.coverage_tables(small_manifest())
    assert cov.tiles.to_dict() == {"gfap": {1: 1, 2: 1, 3: 1}, "iba1": {1: 1, 2: 1, 3: 0}}
    assert cov.annotated_grid.to_dict() == {"gfap": {1: 1, 2: 1, 3: 0}, "iba1": {1: 1, 2: 0, 3: 0}}
    assert list(cov.annotated.index) == ["train", "val"]
    assert cov.annotated.to_dict() == {"gfap": {"train": 1, "val": 1}, "iba1": {"train": 1, "val": 0}}


def test_split_donors_exact_and_refuses_a_donor_on_two_sides():
    table = e0.split_donors(small_manifest())
    assert table.to_dict("records") == [{"split": "train", "donor": 1, "n_annotated_tiles": 2},
                                        {"split": "val", "donor": 2, "n_annotated_tiles": 1}]
    leak = small_manifest().assign(split=["train", "val", "val", "", ""])
    with pytest.raises(SeglabError, match=r"donors \[1\] have annotated tiles on two sides"):
        e0.split_donors(leak)


def test_annotated_with_masks():
    assert list(e0.annotated_with_masks(small_manifest())["tile_id"]) == ["a", "b"]


def test_example_tiles_one_per_marker_and_independent_of_n(cohort):
    manifest = cohort_manifest(cohort)
    five = e0.example_tiles(manifest, 5, seed=0)
    two = e0.example_tiles(manifest, 2, seed=0)
    assert list(five.rows["marker"]) == sorted(manifest["marker"].unique())
    assert list(two.rows["tile_id"]) == list(five.rows["tile_id"])[:2]
    assert len(two.images) == len(two.masks) == 2
    assert two.images[0].shape == (2, 96, 96) and two.masks[0].shape == (96, 96)
    assert list(e0.example_tiles(manifest, 5, seed=0).rows["tile_id"]) == list(five.rows["tile_id"])


def test_planted_truth_of_the_simulated_cohort(cohort):
    found = e0.planted_truth(e0.prepare_cohort(e0_params(cohort)))
    manifest = cohort_manifest(cohort)
    agree = positivity_agreement(cohort, tile_ids=manifest.loc[manifest["annotated"], "tile_id"])
    assert found.rule_agreement == float(agree["agreement"].mean())
    assert found.effects.columns[0] == "marker" and "effect" in found.effects and len(found.effects) == 5
    assert found.by_marker["n_total"].sum() == agree["n_total"].sum()


def _fake_dsb(folder, groups=("256x256", "520x696")):
    """A DSB2018-shaped folder: one image per group with two square nuclei (areas 16 and 36 px)."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    names = []
    for k, group in enumerate(groups):
        lab = np.zeros((20, 20), np.uint16)
        lab[2:6, 2:6], lab[10:16, 10:16] = 1, 2
        img = np.where(lab > 0, 100 + 10 * k, 10).astype(np.uint8)
        tifffile.imwrite(folder / "images" / f"im{k}.tif", img)
        tifffile.imwrite(folder / "masks" / f"im{k}.tif", lab)
        names.append({"name": f"im{k}", "group": group})
    pd.DataFrame(names).to_csv(folder / "metadata.csv", index=False)
    return folder


def test_realism_against_a_small_dsb_folder(cohort, tmp_path):
    found_cohort = e0.prepare_cohort(e0_params(cohort))
    assert e0.realism(found_cohort, None, max_tiles=3) is None
    found = e0.realism(found_cohort, _fake_dsb(tmp_path / "dsb"), max_tiles=3, seed=0)
    assert found.ours == "simulated"
    assert (found.per_image["source"] == "simulated").sum() == 3
    med = found.medians
    assert list(med.columns) == ["dsb2018", "dsb2018 256x256", "simulated"]
    assert med.at["median_area_px", "dsb2018"] == 26.0 and med.at["median_area_px", "dsb2018 256x256"] == 26.0
    assert med.at["contrast_ratio", "dsb2018 256x256"] == 10.0 and med.at["contrast_ratio", "dsb2018"] == 10.5
    numbers = e0.realism_numbers(found)
    assert len(numbers) == 12 and numbers["realism_median_area_px_dsb256"] == 26.0
    assert numbers["realism_contrast_ratio_dsb2018"] == 10.5


def test_e0_headline_exact():
    audit = {"n_tiles_paired": 480, "n_donors_in_tiles": 24, "n_annotated": 120,
             "annotated_per_split": {"train": 72, "val": 24, "test": 24}, "n_fallbacks": 29, "n_unpaired": 0,
             "n_excluded": 0, "donors_missing_from_clinical": [5, 7], "donors_missing_from_tiles": [9]}
    cohort = e0.Cohort(manifest=pd.DataFrame(), audit=audit, simulated=True, generation_s=12.4)
    truth = e0.PlantedTruth(*(pd.DataFrame(),) * 4, rule_agreement=0.9382792074512324)
    summary = pd.DataFrame([{"source": src, "statistic": s, "median": m}
                            for src, m in (("simulated", 1.23456), ("dsb2018", 2.0), ("dsb2018 256x256", 3.0))
                            for s in e0.REALISM_STATS])
    numbers = e0.headline(cohort, truth, e0.Realism(per_image=pd.DataFrame(), summary=summary, ours="simulated"))
    assert {k: v for k, v in numbers.items() if not k.startswith("realism_")} == {
        "n_tiles": 480, "n_donors": 24, "n_annotated": 120, "n_train": 72, "n_val": 24, "n_test": 24,
        "n_c2_fallbacks": 29, "n_unpaired": 0, "n_excluded": 0, "n_donors_missing_clinical": 2,
        "n_donors_missing_tiles": 1, "generation_s": 12.4, "rule_agreement_true_masks": 0.9382792074512324}
    assert numbers["realism_snr_ours"] == 1.235 and numbers["realism_snr_dsb2018"] == 2.0
    assert numbers["realism_density_per_mpx_dsb256"] == 3.0
    bare = e0.headline(e0.Cohort(manifest=pd.DataFrame(), audit={**audit, "donors_missing_from_clinical": None},
                                 simulated=False), None, None)
    assert bare["rule_agreement_true_masks"] is None and bare["n_donors_missing_clinical"] == 0
    assert bare["generation_s"] is None and not any(k.startswith("realism_") for k in bare)


def test_e0_figures(cohort, tmp_path):
    manifest = cohort_manifest(cohort)
    cov = e0.coverage_tables(manifest)
    fig = plots_data.coverage_figure(cov.tiles, cov.annotated_grid, cov.annotated,
                                     missing_donors=[int(manifest["donor"].iloc[0])])
    ex = e0.example_tiles(manifest, 2)
    truth = e0.planted_truth(e0.prepare_cohort(e0_params(cohort)))
    realism = e0.realism(e0.prepare_cohort(e0_params(cohort)), _fake_dsb(tmp_path / "dsb"), max_tiles=3)
    figs = [fig, plots_data.split_figure(e0.split_donors(manifest)),
            plots_data.example_tiles_figure(ex.rows, ex.images, ex.masks),
            plots_data.planted_truth_figure(truth.counts, truth.effects),
            plots_data.realism_figure(realism.per_image, e0.REALISM_STATS)]
    assert all(isinstance(f, Figure) for f in figs)
    assert len(figs[2].axes) == 6 and len(figs[3].axes) == 5 and len(figs[4].axes) == 4
    legend = figs[1].axes[0].get_legend()
    assert len({tuple(h.get_facecolor()) for h in legend.legend_handles}) == 3   # one colour per split
    rgb = plots_data.with_outlines(ex.images[0], ex.masks[0])
    assert rgb.shape == (96, 96, 3) and (rgb == plots_data.OUTLINE_COLOUR).all(axis=-1).any()


# --------------------------------------------------------------------------- E4


def _square(shape=(16, 16), box=(4, 10)):
    lab = np.zeros(shape, np.uint16)
    lab[box[0]:box[1], box[0]:box[1]] = 1
    return lab


def _split(n=2, markers=("gfap", "iba1")):
    masks = [_square() for _ in range(n)]
    rows = pd.DataFrame({"tile_id": [f"t{i}" for i in range(n)], "marker": [markers[i % len(markers)] for i in range(n)],
                         "donor": [f"d{i}" for i in range(n)], "split": "val"})
    images = [np.stack([m.astype(np.float32), m.astype(np.float32)]) for m in masks]
    return splitset.SplitSet(split="val", rows=rows, images=images, masks=masks)


class TruthMemo(dynamics.MaskMemo):
    """Stands for saved outputs: the true masks when cellprob_threshold <= 0 and min_size <= 36 px
    (the squares' area), else nothing."""

    def __init__(self, split, niters=(200,)):
        super().__init__([{"niter": niters[i % len(niters)]} for i in range(len(split))])
        self.truth = split.masks

    def masks(self, mask=None):
        keep = mask.cellprob_threshold <= 0 and mask.min_size <= 36
        return [t if keep else np.zeros_like(t) for t in self.truth]


E4_PARAMS = dict(sens_models=["finetuned_generic", "baseline"], sens_flow_thresholds=[0.4, 0.8],
                 sens_cellprob_thresholds=[0.0, 1.0], sens_min_sizes=[15, 100], sens_niters=[100],
                 sens_diameter_factors=[1.0, 2.0], sens_tile_overlaps=[0.1], sens_augment=[False],
                 rerun_n_tiles=2, seed=0, baseline_model="generalist")


def test_flow_cellprob_grid_exact():
    split = _split()
    heat = e4.flow_cellprob_grid(split, {"finetuned_generic": TruthMemo(split)}, E4_PARAMS, MaskSettings())
    assert e4.n_true_objects(split) == 2
    assert list(zip(heat["flow_threshold"], heat["cellprob_threshold"], heat["ap"], heat["count_ratio"])) == [
        (0.4, 0.0, 1.0, 1.0), (0.4, 1.0, 0.0, 0.0), (0.8, 0.0, 1.0, 1.0), (0.8, 1.0, 0.0, 0.0)]
    assert set(heat["model"]) == {"finetuned_generic"}


def test_outputs_sensitivity_table_moves_one_setting_per_model():
    split = _split()
    memos = {"finetuned_generic": TruthMemo(split), "baseline": TruthMemo(split)}
    lines = e4.outputs_sensitivity_table(split, memos, E4_PARAMS, MaskSettings())
    assert len(lines) == 2 * 7 and list(dict.fromkeys(lines["model"])) == ["finetuned_generic", "baseline"]
    one = lines[lines["model"] == "baseline"].set_index(["parameter", "value"])["count_ratio"]
    assert one.to_dict() == {("flow_threshold", 0.4): 1.0, ("flow_threshold", 0.8): 1.0,
                             ("cellprob_threshold", 0.0): 1.0, ("cellprob_threshold", 1.0): 0.0,
                             ("min_size", 15): 1.0, ("min_size", 100): 0.0, ("niter", 100): 1.0}


def test_stored_niters_and_marks():
    split = _split(3)
    assert e4.stored_niters({"a": TruthMemo(split)}) == [200]
    assert e4.outputs_marks(MaskSettings(diameter_px=13.6), {"a": TruthMemo(split)}) == {
        "flow_threshold": 0.4, "cellprob_threshold": 0.0, "min_size": 15, "niter": 200}
    mixed = {"a": TruthMemo(split, niters=(100, 150))}
    assert e4.stored_niters(mixed) == [100, 150] and e4.outputs_marks(MaskSettings(), mixed)["niter"] is None


def test_rerun_tiles_are_the_seeded_subset():
    split = _split(6, markers=("gfap", "iba1", "neun"))
    tiles = e4.rerun_tiles(split, E4_PARAMS)
    assert tiles.names == splitset.subset(split, n=2, seed=0).names and len(tiles) == 2
    assert len(e4.rerun_tiles(split, {**E4_PARAMS, "rerun_n_tiles": None})) == 6


class EchoModel:
    """Stands for a network: predicts channel 0 of the image as labels when the diameter given is 10 px
    (factor 1), nothing otherwise; records every call's settings."""

    diam_mean_px = 30.0

    def __init__(self):
        self.calls = []

    @staticmethod
    def as_network_input(x):
        return x

    def resolve_diameter(self, x, diameter_px):
        return 10.0

    def segment(self, x, mask, *, batch_size=None, tile_overlap=0.1, augment=False):
        self.calls.append((mask.diameter_px, tile_overlap, augment))
        return x[0].astype(np.uint16) if mask.diameter_px == 10.0 else np.zeros(x[0].shape, np.uint16)


def test_rerun_table_runs_the_first_model_only():
    split = _split()
    first, other = EchoModel(), EchoModel()
    table = e4.rerun_table({"finetuned_generic": first, "baseline": other}, split, E4_PARAMS, MaskSettings())
    assert other.calls == [] and set(table["model"]) == {"finetuned_generic"}
    assert list(zip(table["parameter"], table["value"], table["ap"])) == [
        ("diameter_factor", 1.0, 1.0), ("diameter_factor", 2.0, 0.0), ("tile_overlap", 0.1, 1.0),
        ("augment", False, 1.0)]
    assert sorted(set(first.calls)) == [(10.0, 0.1, False), (20.0, 0.1, False)]   # the default runs once


def test_model_specs_and_records_of_the_baseline_alone():
    specs = e4.model_specs({**E4_PARAMS, "sens_models": ["baseline"]})
    assert specs == {"baseline": "generalist"}
    assert e4.model_records(specs) == {"baseline": {"spec": "generalist"}}


def _lines():
    rows = []
    for model, aps in (("finetuned_generic", (0.8, 0.9, 0.85)), ("baseline", (0.7, 0.72, 0.6))):
        rows += [{"model": model, "parameter": "flow_threshold", "value": v, "ap": a, "count_ratio": c}
                 for v, a, c in zip((0.2, 0.4, 0.6), aps, (0.8, 0.9, 1.2))]
        rows += [{"model": model, "parameter": "min_size", "value": v, "ap": a, "count_ratio": 1.0}
                 for v, a in ((0, 0.9), (15, 0.85))]
    return pd.DataFrame(rows)


def test_sensitivity_ranges_exact():
    rerun = pd.DataFrame([{"model": "finetuned_generic", "parameter": "augment", "value": v, "ap": 0.5,
                           "count_ratio": c} for v, c in ((False, 1.0), (True, 1.5))])
    ranges = e4.sensitivity_ranges([_lines(), rerun])
    assert list(zip(ranges["model"], ranges["parameter"])) == [
        ("baseline", "flow_threshold"), ("baseline", "min_size"), ("finetuned_generic", "flow_threshold"),
        ("finetuned_generic", "min_size"), ("finetuned_generic", "augment")]
    got = ranges.set_index(["model", "parameter"])
    assert got.at[("baseline", "min_size"), "ap_range"] == pytest.approx(0.9 - 0.85)
    assert got.at[("baseline", "flow_threshold"), "ap_range"] == pytest.approx(0.72 - 0.6)
    assert got.at[("finetuned_generic", "flow_threshold"), "count_ratio_range"] == pytest.approx(0.4)
    assert got.at[("finetuned_generic", "augment"), "count_ratio_range"] == 0.5
    assert got.at[("finetuned_generic", "augment"), "n_values"] == 2


def test_e4_headline_exact():
    lines = _lines()
    heat = pd.DataFrame({"model": ["finetuned_generic", "finetuned_generic", "baseline"], "ap": [0.91234, 0.5, 0.75]})
    ranges = e4.sensitivity_ranges([lines])
    numbers = e4.headline(["finetuned_generic", "baseline"], lines, heat, ranges, MaskSettings(flow_threshold=0.4), 3)
    assert numbers == {
        "val_ap50_finetuned_generic": 0.9, "val_count_ratio_finetuned_generic": 0.9,
        "val_ap50_range_flow_threshold_finetuned_generic": 0.1, "val_count_ratio_range_flow_threshold_finetuned_generic": 0.4,
        "val_ap50_range_min_size_finetuned_generic": 0.05, "val_count_ratio_range_min_size_finetuned_generic": 0.0,
        "val_ap50_best_grid_finetuned_generic": 0.9123,
        "val_ap50_baseline": 0.72, "val_count_ratio_baseline": 0.9,
        "val_ap50_range_flow_threshold_baseline": 0.12, "val_count_ratio_range_flow_threshold_baseline": 0.4,
        "val_ap50_range_min_size_baseline": 0.05, "val_count_ratio_range_min_size_baseline": 0.0,
        "val_ap50_best_grid_baseline": 0.75, "rerun_n_tiles": 3}
    off_grid = e4.headline(["baseline"], lines, heat, ranges, MaskSettings(flow_threshold=0.5), 1)
    assert "val_ap50_baseline" not in off_grid and off_grid["val_ap50_best_grid_baseline"] == 0.75


def test_e4_figures():
    split = _split()
    memos = {"finetuned_generic": TruthMemo(split), "baseline": TruthMemo(split)}
    heat = e4.flow_cellprob_grid(split, memos, E4_PARAMS, MaskSettings())
    fig = plots_sens.flow_cellprob_heatmaps(heat, MaskSettings().as_dict())
    assert isinstance(fig, Figure) and len([a for a in fig.axes if a.get_title()]) == 4
    lines = e4.outputs_sensitivity_table(split, memos, E4_PARAMS, MaskSettings())
    fig = plots_sens.sensitivity_lines(lines, e4.outputs_marks(MaskSettings(), memos))
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 4
    with pytest.raises(SeglabError, match="sensitivity_lines: missing column"):
        plots_sens.sensitivity_lines(lines.drop(columns="model"))


# --------------------------------------------------------------------------- E4: ranges with intervals (issue #20)


def test_sweeps_return_the_per_tile_rows_of_the_same_masks():
    split = _split(3)
    memos = {"finetuned_generic": TruthMemo(split), "baseline": TruthMemo(split)}
    plain = e4.outputs_sensitivity_table(split, memos, E4_PARAMS, MaskSettings())
    lines, tiles = e4.outputs_sensitivity_table(split, memos, E4_PARAMS, MaskSettings(), per_image=True)
    pd.testing.assert_frame_equal(lines, plain)
    assert len(tiles) == 2 * 7 * 3 and set(tiles["threshold"]) == {0.5}
    assert {"image", "donor", "marker", "tp", "fp", "fn", "parameter", "value", "model"} <= set(tiles.columns)
    summed = tiles.groupby(["model", "parameter", "value"], sort=False)[["tp", "fp", "fn"]].sum().reset_index()
    pd.testing.assert_frame_equal(summed[["tp", "fp", "fn"]], lines[["tp", "fp", "fn"]], check_dtype=False)
    first = EchoModel()
    rerun, rerun_tiles = e4.rerun_table({"finetuned_generic": first}, split, E4_PARAMS, MaskSettings(), per_image=True)
    assert sorted(set(first.calls)) == [(10.0, 0.1, False), (20.0, 0.1, False)]   # still once per setting
    assert list(rerun_tiles.groupby(["parameter", "value"], sort=False)["tp"].sum()) == list(rerun["tp"])
    assert rerun_tiles[rerun_tiles["parameter"] == "augment"]["value"].tolist() == [False] * 3


def test_range_claims_give_each_range_its_interval_and_p_value():
    split = _split(4)
    memos = {"finetuned_generic": TruthMemo(split)}
    lines, tiles = e4.outputs_sensitivity_table(split, memos, E4_PARAMS, MaskSettings(), per_image=True)
    found = e4.range_claims([tiles], n_resamples=200, n_permutations=99)
    assert list(found.columns) == e4.RANGE_COLUMNS
    ap = found[found["metric"] == "ap"].set_index("parameter")
    # niter has one value: no range; the others match sensitivity_ranges
    assert set(ap.index) == {"flow_threshold", "cellprob_threshold", "min_size"}
    ranges = e4.sensitivity_ranges([lines]).set_index("parameter")
    for p in ap.index:
        assert ap.at[p, "range"] == pytest.approx(ranges.at[p, "ap_range"])
    # the cellprob threshold 1.0 loses every nucleus on every tile: the range 1 on every resample
    assert (ap.at["cellprob_threshold", "ci_low"], ap.at["cellprob_threshold", "ci_high"]) == (1.0, 1.0)
    assert ap.at["flow_threshold", "range"] == 0 and ap.at["flow_threshold", "p_value"] == 1.0
    assert (ap["n_donors"] == 4).all() and (ap["note"] == "").all()
    assert "95% percentile interval, bootstrap of donors" in plots_sens.range_intervals(found).get_supxlabel()
    numbers = e4.headline(["finetuned_generic"], lines, lines.assign(ap=lines["ap"]), e4.sensitivity_ranges([lines]),
                          MaskSettings(), 2, found)
    key = "val_ap50_range_cellprob_threshold_finetuned_generic"
    # 2 settings x 4 donors: 2 of the 16 within-donor swaps keep a range of 1, p about 1/8
    assert numbers[key] == 1.0 and numbers[f"{key}_ci_low"] == 1.0 and numbers[f"{key}_p_value"] == pytest.approx(
        0.125, abs=0.07)
    assert numbers[f"{key}_n_donors"] == 4 and "val_ap50_range_niter_finetuned_generic_ci_low" not in numbers
    assert numbers["claims_interval"].startswith("95% percentile interval")
    plain = e4.headline(["finetuned_generic"], lines, lines, e4.sensitivity_ranges([lines]), MaskSettings(), 2)
    assert {k: numbers[k] for k in plain} == plain


def test_range_claims_with_one_donor_have_no_interval():
    split = _split(2)
    split.rows["donor"] = "d0"
    _, tiles = e4.outputs_sensitivity_table(split, {"baseline": TruthMemo(split)}, E4_PARAMS, MaskSettings(),
                                            per_image=True)
    found = e4.range_claims([tiles], n_resamples=50, n_permutations=19)
    assert found["ci_low"].isna().all() and found["ci_high"].isna().all()
    assert found["note"].str.startswith("1 donor").all()
    numbers = e4._range_numbers("baseline", found)
    assert numbers["val_ap50_range_min_size_baseline_note"].startswith("1 donor")
    fig = plots_sens.range_intervals(found)
    assert isinstance(fig, Figure) and "percentile interval" in fig.get_supxlabel()
    assert e4.range_claims([tiles[tiles["parameter"] == "niter"]]).empty
