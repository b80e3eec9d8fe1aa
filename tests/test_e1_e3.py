"""E1's and E3's steps on small exact cases: which tiles each model is scored on, which test
evaluations are recorded, the tables the notebooks show and the headline numbers."""

from __future__ import annotations

import json

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from seglab import SeglabError
from seglab.config.settings import MaskSettings
from seglab.data import splitset
from seglab.evaluate import claims
from seglab.experiments import e1_baseline_vs_finetune as e1
from seglab.experiments import e3_gating as e3
from seglab.plots import evaluation as plots

pytestmark = pytest.mark.usefixtures("one_thread")


def _disks(centres, shape=(64, 64), r=7):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.uint16)
    for k, (cy, cx) in enumerate(centres):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k + 1
    return lab


TRUTHS = [_disks(((16, 16), (16, 46), (46, 30))), _disks(((20, 20), (40, 44)))]


def _split(split="test", truths=TRUTHS, markers=("gfap", "iba1")):
    rows = pd.DataFrame({"tile_id": [f"t{i}" for i in range(len(truths))], "marker": list(markers),
                         "donor": [f"d{i}" for i in range(len(truths))], "split": split})
    images = [np.stack([np.ones_like(t, np.float32), (t > 0).astype(np.float32)]) for t in truths]
    return splitset.SplitSet(split=split, rows=rows, images=images, masks=[t.copy() for t in truths])


def _tiles():
    val, test = _split("val"), _split("test")
    marker_tiles = {"val": e1.tiles_of_markers(val, ["gfap"]), "test": e1.tiles_of_markers(test, ["gfap"])}
    return e1.E1Tiles(val=val, test=test, markers=["gfap"], marker_tiles=marker_tiles, train_diameter_px=15.0,
                      inputs=e1.model_inputs(val, test, marker_tiles))


def _outputs(labels, seed=0):
    """Network-like outputs of a label image: 5 x the true flows, cellprob logits +-4, plus noise."""
    from cellpose import dynamics

    rng = np.random.default_rng(seed)
    flows = dynamics.labels_to_flows([labels.astype(np.int64)], device=None)[0][2:]
    dP = (5.0 * flows + 0.3 * rng.standard_normal(flows.shape)).astype(np.float32)
    cellprob = (np.where(labels > 0, 4.0, -4.0) + rng.standard_normal(labels.shape)).astype(np.float32)
    return {"dP": dP, "cellprob": cellprob, "niter": 200}


class Recorder:
    """Stands in for run.record_test_evaluation: keeps every (selected, config)."""

    def __init__(self):
        self.calls = []

    def __call__(self, selected, config):
        if any(s == selected for s, _ in self.calls):
            raise SeglabError(f"{selected} twice")
        self.calls.append((selected, config))


# --------------------------------------------------------------------------- E1


def test_model_inputs_give_each_model_its_tiles():
    tiles = _tiles()
    assert tiles.marker_tiles == {"val": ["t0"], "test": ["t0"]}
    assert list(tiles.inputs) == list(e1.MODELS)
    assert tiles.inputs["baseline"][1] is tiles.test and tiles.inputs["finetuned_generic"][0] is tiles.val
    assert tiles.inputs["finetuned_marker_specific"][1].names == ["t0"]
    nodapi = tiles.inputs["finetuned_marker_only"][1]
    assert nodapi.names == ["t0", "t1"] and nodapi.images[0][0].max() == 0 and tiles.test.images[0][0].max() == 1
    assert tiles.counts().to_dict() == {"gfap": {"test": 1, "val": 1}, "iba1": {"test": 1, "val": 1}}


def test_marker_only_model_gets_the_training_diameter_only_when_the_model_would_estimate_it():
    auto, native = SimpleNamespace(default_diameter="auto"), SimpleNamespace(default_diameter="native")
    unset = MaskSettings(diameter_px=None)
    assert e1.mask_settings("finetuned_marker_only", auto, unset, 14.5).diameter_px == 14.5
    assert e1.mask_settings("finetuned_marker_only", native, unset, 14.5) is unset
    assert e1.mask_settings("finetuned_generic", auto, unset, 14.5) is unset
    given = MaskSettings(diameter_px=13.6)
    assert e1.mask_settings("finetuned_marker_only", auto, given, 14.5) is given


def _test_masks(tiles):
    missed = [t.copy() for t in TRUTHS]
    missed[0][missed[0] == 1] = 0  # the generic model misses one nucleus of the GFAP tile
    return {"baseline": [t.copy() for t in TRUTHS], "finetuned_generic": missed,
            "finetuned_marker_specific": [TRUTHS[0].copy()],
            "finetuned_marker_only": [np.zeros_like(t) for t in TRUTHS]}


def test_test_at_default_records_each_model_once_and_scores_the_marker_subsets():
    tiles, record = _tiles(), Recorder()
    outputs = e1.NetworkOutputs(settings={}, val={}, test={}, test_masks=_test_masks(tiles), seconds=0.0)
    mask = MaskSettings(diameter_px=13.6)
    default = e1.test_at_default(tiles, outputs, mask, [0.5, 0.75], record)
    assert [s for s, _ in record.calls] == [f"{m}@default_thresholds" for m in e1.MODELS]
    assert record.calls[0][1] == {"flow_threshold": 0.4, "cellprob_threshold": 0.0, "min_size": 15,
                                  "diameter_px": 13.6}
    at50 = default.at(0.5).set_index("model")
    assert list(at50.index) == [*e1.MODELS, "baseline[gfap]", "finetuned_generic[gfap]"]
    assert list(at50["tiles"]) == ["all", "all", "gfap", "all", "gfap", "gfap"]
    assert at50["ap"].to_dict() == pytest.approx({"baseline": 1.0, "finetuned_generic": 4 / 5,
                                                  "finetuned_marker_specific": 1.0, "finetuned_marker_only": 0.0,
                                                  "baseline[gfap]": 1.0, "finetuned_generic[gfap]": 2 / 3})
    assert len(default.comparison) == 12 and set(default.per_image["model"]) == set(at50.index)
    assert set(default.per_image_of()["model"]) == set(e1.MAIN_MODELS)
    by_marker = e1.per_marker(default)
    assert by_marker.ap.loc["gfap", "finetuned_generic"] == pytest.approx(2 / 3)
    assert by_marker.ap.loc["iba1", "finetuned_generic"] == pytest.approx(1.0)
    assert np.isnan(by_marker.ap.loc["iba1", "finetuned_marker_specific"])
    assert "ap_sd" in by_marker.bars.columns and len(by_marker.bars) == len(by_marker.pooled)


@pytest.fixture(scope="module")
def swept(one_thread):
    tiles = _tiles()
    outs = {"val": [_outputs(t, 0) for t in TRUTHS], "test": [_outputs(t, 1) for t in TRUTHS]}
    val = {m: outs["val"] for m in e1.MODELS}
    test = {m: outs["test"] for m in e1.MODELS}
    val["finetuned_marker_specific"], test["finetuned_marker_specific"] = outs["val"][:1], outs["test"][:1]
    # a default flow threshold of 0.8 makes the tie at F1 = 1 go to 0.8 (selection prefers the defaults)
    settings = {m: MaskSettings(flow_threshold=0.8) for m in e1.MODELS}
    outputs = e1.NetworkOutputs(settings=settings, val=val, test=test, test_masks=_test_masks(tiles), seconds=0.0)
    default = e1.test_at_default(tiles, outputs, settings["baseline"], [0.5, 0.75], Recorder())
    sweep = e1.validation_sweep(tiles, outputs, [0.4, 0.8], [0.0, 6.0])
    record = Recorder()
    selected = e1.test_at_selected(tiles, outputs, sweep, default, [0.5, 0.75], record)
    return tiles, default, sweep, selected, record


def test_validation_sweep_selects_by_f1_then_nearest_the_defaults(swept):
    _, _, sweep, _, _ = swept
    assert len(sweep.table) == 4 * 4 and list(dict.fromkeys(sweep.table["model"])) == list(e1.MODELS)
    assert all((s["flow_threshold"], s["cellprob_threshold"], s["f1"]) == (0.8, 0.0, 1.0)
               for s in sweep.selected.values())
    assert list(sweep.selected_table.columns) == ["model", "flow_threshold", "cellprob_threshold", "val_f1", "val_ap",
                                                  "val_precision", "val_recall"]


def test_test_at_selected_records_the_selection_once_and_joins_default_and_selected(swept):
    _, _, _, selected, record = swept
    assert [s for s, _ in record.calls] == [f"{m}@val_selected_thresholds" for m in e1.MODELS]
    assert record.calls[0][1] == {"flow_threshold": 0.8, "cellprob_threshold": 0.0, "min_size": 15,
                                  "selected_by": "validation F1 at IoU 0.5"}
    table = selected.table.set_index("model")
    assert table["test_ap_selected"].to_dict() == pytest.approx({m: 1.0 for m in e1.MODELS})
    assert table["test_ap_default"].to_dict() == pytest.approx({"baseline": 1.0, "finetuned_generic": 0.8,
                                                                "finetuned_marker_specific": 1.0,
                                                                "finetuned_marker_only": 0.0})
    assert len(selected.masks["finetuned_marker_specific"]) == 1


def test_examples_take_the_selected_masks_of_the_tiles_picked(swept):
    tiles, default, _, selected, _ = swept
    shown = e1.examples(tiles, default, selected, 1)
    # the worst tile of the generic model (AP 2/3 on t0) comes first
    assert shown.labels == ["t0 (gfap)"] and list(shown.preds) == list(e1.EXAMPLE_MODELS)
    assert shown.truths[0] is tiles.test.masks[0] and len(shown.preds["baseline"]) == 1


def test_e1_claims_pair_each_variant_with_the_baseline_at_both_thresholds(swept):
    tiles, default, _, selected, _ = swept
    found = e1.claim_tables(default, selected, ["gfap"])
    assert found.interval == "95% t interval over donors"
    shown = found.shown()
    assert list(zip(shown["thresholds"], shown["a"], shown["b"])) == [
        (t, a, b) for t in ("default", "selected") for a, b in e1.claim_pairs(["gfap"])]
    at = shown.set_index(["thresholds", "a", "b"])
    generic = at.loc[("default", "baseline", "finetuned_generic")]
    # baseline AP 1 on both tiles; generic misses one of t0's 3 nuclei: 4/5 pooled
    assert (generic["estimate_a"], generic["estimate_b"]) == (1.0, 0.8)
    assert generic["difference"] == pytest.approx(-0.2) and (generic["n_donors"], generic["n_tiles"]) == (2, 2)
    # two donors: the jackknife SE is 1/6, the t quantile with 1 df 12.706
    half = 12.706204736 / 6
    assert (generic["ci_low"], generic["ci_high"]) == pytest.approx((-0.2 - half, -0.2 + half))
    # the gfap tiles are one tile of one donor: no interval, no claim
    one = at.loc[("default", "baseline[gfap]", "finetuned_marker_specific")]
    assert one["n_donors"] == 1 and np.isnan(one["ci_low"]) and not one["b_beats_a"]
    # at the selected thresholds every model is perfect: a zero-width interval at 0, no claim
    same = at.loc[("selected", "baseline", "finetuned_generic")]
    assert (same["difference"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0) and not same["b_beats_a"]
    # the subsets at the selected thresholds are the per-tile rows of the marker's tiles
    sub = at.loc[("selected", "finetuned_generic[gfap]", "finetuned_marker_specific")]
    assert (sub["n_tiles"], sub["estimate_a"]) == (1, 1.0)


def test_with_marker_subsets_gives_the_rows_test_at_default_scores(swept):
    _, default, _, _, _ = swept
    full = default.per_image
    plain = full[~full["model"].str.contains(r"\[", regex=True)]
    again = e1.with_marker_subsets(plain, ["gfap"])
    for name in ("baseline[gfap]", "finetuned_generic[gfap]"):
        mine = again[again["model"] == name].reset_index(drop=True)
        theirs = full[full["model"] == name].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine[theirs.columns], theirs)
    assert len(e1.with_marker_subsets(full, ["gfap"])) == len(full)   # present already: nothing added


def test_e1_headline_numbers(swept):
    tiles, default, _, selected, _ = swept
    found = e1.claim_tables(default, selected, ["gfap"])
    numbers = e1.headline(default.comparison, selected.table, ["gfap"], len(tiles.test), found)
    assert numbers["test_ap50_baseline"] == 1.0 and numbers["test_ap50_finetuned_generic"] == 0.8
    assert numbers["test_recall_finetuned_generic"] == 0.8 and numbers["test_precision_finetuned_generic"] == 1.0
    assert numbers["test_f1_finetuned_generic"] == round(8 / 9, 4)
    assert numbers["test_ap75_finetuned_marker_only"] == 0.0
    assert numbers["test_ap50_finetuned_generic_gfap"] == round(2 / 3, 4) == 0.6667
    assert numbers["test_ap50_baseline_gfap"] == 1.0
    assert numbers["test_ap50_finetuned_generic_selected"] == 1.0 and numbers["val_f1_selected_baseline"] == 1.0
    assert numbers["flow_threshold_selected_finetuned_marker_only"] == 0.8
    assert numbers["cellprob_threshold_selected_finetuned_marker_only"] == 0.0
    assert numbers["n_test_tiles"] == 2
    # the flag follows the interval: -0.2 [-2.32, 1.92] over 2 donors crosses 0
    key = "test_ap50_diff_finetuned_generic_vs_baseline"
    assert numbers[key] == -0.2 and numbers[f"{key}_ci_low"] < 0 < numbers[f"{key}_ci_high"]
    assert numbers["finetuned_generic_beats_baseline"] is False and numbers[f"{key}_n_donors"] == 2
    assert numbers[f"{key}_note"].startswith("2 donors")
    one = "test_ap50_diff_finetuned_marker_specific_vs_baseline_gfap"
    assert np.isnan(numbers[f"{one}_ci_low"]) and numbers["finetuned_marker_specific_beats_baseline_gfap"] is False
    assert numbers[f"{one}_note"].startswith("1 donor")
    assert numbers["test_ap50_diff_finetuned_generic_vs_baseline_selected"] == 0.0
    assert numbers["finetuned_generic_beats_baseline_selected"] is False
    assert numbers["claims_interval"] == "95% t interval over donors"
    assert numbers["headline_claim"] == "finetuned_generic_beats_baseline"
    flags = sorted(k for k in numbers if "_beats_" in k)
    assert flags == sorted(f"{b}_beats_{a}{s}" for s in ("", "_selected") for a, b in (
        ("baseline", "finetuned_generic"), ("baseline", "finetuned_marker_only"),
        ("baseline_gfap", "finetuned_marker_specific"), ("finetuned_generic_gfap", "finetuned_marker_specific")))
    # each claim: difference, ci_low, ci_high, p_value, n_donors, note (all have at most 2 donors), flag
    assert len(numbers) == 4 * 9 + 2 + 1 + 8 * 7 + 2


def test_e1_figures(swept):
    _, default, sweep, _, _ = swept
    losses = pd.DataFrame({"finetuned_generic": [1.0, 0.5], "finetuned_marker_only": [1.2, 0.9]})
    assert len(plots.plot_training_loss(losses).axes) == 1
    assert len(plots.plot_ap_by_iou(default.comparison, [0.5, 0.75]).axes) == 2
    # one heatmap and its colour bar per model
    assert len(plots.plot_sweep_heatmaps(sweep.sweeps, sweep.selected, "f1").axes) == 8
    with pytest.raises(SeglabError):
        plots.plot_training_loss(pd.DataFrame())


# --------------------------------------------------------------------------- E3


def _gate_case():
    """One tile, three true nuclei; the prediction adds a 9 px bright false positive."""
    truth = _disks(((16, 16), (16, 46), (46, 30)))
    pred = truth.copy()
    pred[60:63, 60:63] = 9
    image = np.stack([np.zeros_like(truth, np.float32), (truth > 0).astype(np.float32)])
    image[1][60:63, 60:63] = 5.0
    rows = pd.DataFrame({"tile_id": ["t0"], "marker": ["gfap"], "donor": ["d0"], "split": "val"})
    split = splitset.SplitSet(split="val", rows=rows, images=[image], masks=[truth])
    return split, {"baseline": {"val": [pred], "test": [pred]}}


PARAMS = {"gate_q_lows": [0.0], "gate_q_highs": [1.0, 0.7], "gate_min_areas_px": [0.0, 20.0],
          "gate_min_areas_um2": [0.0, 5.0], "pixel_size_um": None, "gate_channel": 1}


def test_gate_space_takes_the_area_unit_from_the_pixel_size():
    space = e3.gate_space(PARAMS)
    assert (space.area_unit, space.area_column, space.min_areas) == ("px", "min_area_px", (0.0, 20.0))
    assert len(space.grid()) == 4 and "areas in px" in space.describe()
    um = e3.gate_space({**PARAMS, "pixel_size_um": 0.5})
    assert (um.area_unit, um.area_column, um.min_areas) == ("um2", "min_area_um2", (0.0, 5.0))
    assert um.grid()[1].min_area_um2 == 5.0


def test_gate_sweep_selects_the_mildest_of_the_best_gates():
    split, preds = _gate_case()
    space = e3.gate_space(PARAMS)
    sweep = e3.gate_sweep(split, preds, space)
    # the area gate and the q_high gate each remove the one FP (F1 = 1); the tie goes to the gate
    # nearest no gate at all (summed distances: q_high 0.3 away, min area 20 px away)
    assert list(sweep.sweeps["baseline"]["fp"]) == [1, 0, 0, 0]
    best = sweep.selected["baseline"]
    assert (best["q_low"], best["q_high"], best["min_area_px"], best["f1"]) == (0.0, 0.7, 0.0, 1.0)
    assert list(sweep.selected_table.columns) == ["model", "q_low", "q_high", "min_area_px", "precision", "recall",
                                                  "f1", "fp"]
    assert sweep.n_gates == 4 and "4 gates x 1 models" in sweep.describe()
    instances = e3.validation_instances(split, preds, space)["baseline"]
    assert instances["matched"].tolist() == [True, True, True, False]


def test_test_before_after_records_twice_per_model_and_counts_what_the_gate_removed():
    split, preds = _gate_case()
    space, record = e3.gate_space(PARAMS), Recorder()
    selected = {"baseline": {"q_low": 0.0, "q_high": 1.0, "min_area_px": 20.0, "f1": 1.0}}
    result = e3.test_before_after(split, preds, selected, space, record)
    assert [s for s, _ in record.calls] == ["baseline@no_gate", "baseline@val_selected_gate"]
    assert record.calls[1][1] == {"q_low": 0.0, "q_high": 1.0, "min_area_px": 20.0, "min_area_um2": None,
                                  "channel": 1, "pixel_size_um": None, "selected_by": "validation F1 at IoU 0.5"}
    ba = result.before_after.set_index("gate")
    assert (ba.at["none", "fp"], ba.at["val_selected", "fp"]) == (1, 0)
    assert ba.at["none", "ap"] == pytest.approx(3 / 4) and ba.at["val_selected", "ap"] == pytest.approx(1.0)
    assert result.removed().loc["area", ("removed_fp", "baseline")] == 1
    assert sorted(result.tables()) == ["test_before_after.csv", "test_gate_decisions_baseline.csv",
                                       "test_per_image.csv", "test_removed_by_reason.csv"]
    assert list(result.per_image["model"]) == ["baseline", "baseline_gated"]
    assert list(result.per_image["fp"]) == [1, 0] and set(result.per_image["threshold"]) == {0.5}
    assert "q_low" in result.shown().columns and "n_pred" not in result.shown().columns
    numbers = e3.headline(result.before_after, result.effect, selected, "px", wall_s=1.234)
    assert numbers == {"test_ap50_baseline": 0.75, "test_ap50_baseline_gated": 1.0, "test_precision_baseline": 0.75,
                       "test_precision_baseline_gated": 1.0, "test_recall_baseline_gated": 1.0,
                       "test_fp_baseline": 1, "test_fp_baseline_gated": 0, "test_removed_fp_baseline": 1,
                       "test_removed_tp_baseline": 0, "val_f1_selected_baseline": 1.0, "gate_q_low_baseline": 0.0,
                       "gate_q_high_baseline": 1.0, "gate_min_area_px_baseline": 20.0, "gate_area_unit": "px",
                       "wall_s": 1.2}
    assert len(plots.plot_gate_before_after(result.before_after).axes) == 3
    # one tile of one donor: the gate's effect has no interval, so no claim
    found = e3.gate_claims(result)
    row = found[(found["metric"] == "ap")].iloc[0]
    assert (row["a"], row["b"], row["difference"], row["n_donors"]) == ("baseline", "baseline_gated", 0.25, 1)
    assert np.isnan(row["ci_low"]) and np.isnan(row["ci_high"])
    with_claims = e3.headline(result.before_after, result.effect, selected, "px", claims_table=found)
    key = "test_ap50_diff_baseline_gated_vs_baseline"
    assert {k: v for k, v in with_claims.items() if k not in numbers} == {
        key: 0.25, f"{key}_ci_low": with_claims[f"{key}_ci_low"], f"{key}_ci_high": with_claims[f"{key}_ci_high"],
        f"{key}_p_value": 1.0, f"{key}_n_donors": 1, f"{key}_note": claims.interval_note(1),
        "baseline_gated_beats_baseline": False, "claims_interval": "95% t interval over donors"}
    assert np.isnan(with_claims[f"{key}_ci_low"])


def _gate_test_of_donors(deltas):
    """A GateTest whose per-tile rows give the gated masks ``delta`` more true positives (fewer
    false negatives) than the ungated ones on each tile; one tile per donor."""
    rows = []
    for i, d in enumerate(deltas):
        for name, tp in (("baseline", 5), ("baseline_gated", 5 + d)):
            rows.append({"model": name, "image": f"t{i}", "donor": f"d{i}", "marker": "gfap", "threshold": 0.5,
                         "tp": tp, "fp": 2, "fn": 10 - tp})
    return e3.GateTest(before_after=pd.DataFrame(), effect=pd.DataFrame(), decisions={}, gated={},
                       per_image=pd.DataFrame(rows))


def test_e3_gate_claim_holds_only_when_the_interval_excludes_zero():
    clear = e3.gate_claims(_gate_test_of_donors([1, 2, 1, 2, 1]))
    row = clear[clear["metric"] == "ap"].iloc[0]
    assert row["ci_low"] > 0 and claims.claim_summary(clear, "baseline", "baseline_gated", prefix="test_ap50")[
        "baseline_gated_beats_baseline"] is True
    mixed = e3.gate_claims(_gate_test_of_donors([2, -2, 1, -1, 0]))
    keys = claims.claim_summary(mixed, "baseline", "baseline_gated", prefix="test_ap50")
    assert keys["test_ap50_diff_baseline_gated_vs_baseline_ci_low"] < 0 < keys[
        "test_ap50_diff_baseline_gated_vs_baseline_ci_high"]
    assert keys["baseline_gated_beats_baseline"] is False


def test_run_save_outputs_writes_each_kind_under_its_name(tmp_path):
    """The one way a step's outputs reach the run folder (E3's tables, E5's tables, figures and JSON)."""
    from seglab.plots.base import new_figure
    from seglab.workflow.runs import RunContext

    run = RunContext("03_gating", tmp_path, "smoke")
    written = run.save_outputs({"a.csv": pd.DataFrame({"x": [1]}), "b.png": new_figure((1, 1)), "c.json": {"k": 2}})
    assert written == [tmp_path / "a.csv", tmp_path / "figures" / "b.png", tmp_path / "c.json"]
    assert pd.read_csv(tmp_path / "a.csv")["x"].tolist() == [1] and (tmp_path / "figures" / "b.png").stat().st_size
    assert json.loads((tmp_path / "c.json").read_text()) == {"k": 2}


def test_e3_figures():
    split, preds = _gate_case()
    space = e3.gate_space(PARAMS)
    sweep = e3.gate_sweep(split, preds, space)
    assert len(plots.plot_gate_instances(e3.validation_instances(split, preds, space), 1).axes) == 1
    # heatmap, its colour bar and the area panel
    assert len(plots.plot_gate_grid(sweep.sweeps, sweep.selected, space.area_column).axes) == 3
