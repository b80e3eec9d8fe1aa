"""The building blocks of notebooks 01-06: masks from outputs, sweeps, selection, gates, sensitivity, caches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from seglab.config.settings import MaskSettings
from seglab import SeglabError
from seglab.segment import postprocess
from seglab.data import splitset
from seglab.segment import dynamics
from seglab.segment import output_cache
from seglab.evaluate import scoring
from seglab.evaluate import sweeps


def _disks(shape=(64, 64), centres=((16, 16), (16, 46), (46, 30)), r=7, start=1):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.uint16)
    for k, (cy, cx) in enumerate(centres):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = start + k
    return lab


def _outputs(labels, seed=0, noise=0.3):
    """Network-like outputs of a label image: 5 x the true flows, cellprob logits +-4, plus noise."""
    from cellpose import dynamics

    rng = np.random.default_rng(seed)
    flows = dynamics.labels_to_flows([labels.astype(np.int64)], device=None)[0][2:]
    dP = (5.0 * flows + noise * rng.standard_normal(flows.shape)).astype(np.float32)
    cellprob = (np.where(labels > 0, 4.0, -4.0) + rng.standard_normal(labels.shape)).astype(np.float32)
    return {"dP": dP, "cellprob": cellprob, "niter": 200}


def _split(images, masks, markers, split="val"):
    rows = pd.DataFrame({"tile_id": [f"t{i}" for i in range(len(images))], "marker": markers,
                         "donor": [f"d{i}" for i in range(len(images))], "split": split})
    return splitset.SplitSet(split=split, rows=rows, images=list(images), masks=list(masks))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_set(one_thread):
    truths = [_disks(), _disks(centres=((20, 20), (40, 44)))]
    outs = [_outputs(t, seed=i) for i, t in enumerate(truths)]
    images = [np.stack([t.astype(np.float32), (t > 0).astype(np.float32)]) for t in truths]
    return _split(images, truths, ["gfap", "iba1"]), outs


def test_sweep_masks_equal_masks_from_outputs(small_set):
    from seglab.segment.dynamics import masks_from_outputs

    split, outs = small_set
    got = dynamics.sweep_masks(outs[0], [0.0, 0.4, 0.8], [-1.0, 0.0, 2.0], (0, 15, 200))
    assert len(got) == 27
    for (flow, cp, ms), m in got.items():
        ref = masks_from_outputs(outs[0], MaskSettings(flow_threshold=flow, cellprob_threshold=cp, min_size=ms))
        assert np.array_equal(m, ref), (flow, cp, ms)
    # min_size 200 px > a disk of radius 7 (~150 px): everything goes
    assert got[(0.4, 0.0, 200)].max() == 0
    assert len(np.unique(got[(0.4, 0.0, 15)])) - 1 == 3


def test_threshold_sweep_and_select_best(small_set):
    split, outs = small_set
    sw = sweeps.threshold_sweep(split, outs, [0.4, 0.8], [-1.0, 0.0, 6.0])
    assert list(sw.columns[:2]) == ["flow_threshold", "cellprob_threshold"] and len(sw) == 6
    # cellprob 6 is above every logit (4 + noise mostly): far fewer objects than at 0
    high = sw[sw["cellprob_threshold"] == 6.0]["n_pred"].max()
    assert high < sw[sw["cellprob_threshold"] == 0.0]["n_pred"].min()
    assert sw.loc[sw["cellprob_threshold"] == 0.0, "tp"].eq(5).all()
    best = sweeps.select_best(sw, "f1")
    # ties at f1 = 1 go to the row nearest cellpose's defaults (0.4, 0)
    assert best["f1"] == pytest.approx(1.0)
    assert (best["flow_threshold"], best["cellprob_threshold"]) == (0.4, 0.0)
    # the memo gives the same table
    memo = dynamics.MaskMemo(outs)
    assert sweeps.threshold_sweep(split, memo, [0.4, 0.8], [-1.0, 0.0, 6.0]).equals(sw)


def test_select_best_breaks_ties_towards_prefer():
    sw = pd.DataFrame({"flow_threshold": [0.3, 0.4, 0.5], "cellprob_threshold": [0.0, 0.0, 0.0],
                       "f1": [0.9, 0.9, 0.8]})
    assert sweeps.select_best(sw, "f1")["flow_threshold"] == 0.4
    assert sweeps.select_best(sw, "f1", prefer={"flow_threshold": 0.3})["flow_threshold"] == 0.3
    with pytest.raises(SeglabError):
        sweeps.select_best(sw.iloc[:0])


def test_compare_models_and_per_group_table(small_set):
    split, _ = small_set
    perfect = [m.copy() for m in split.masks]
    half = [m.copy() for m in split.masks]
    half[0][half[0] == 1] = 0  # one true nucleus missed on the first tile
    evs = {"a": scoring.evaluate_masks(split, perfect), "b": scoring.evaluate_masks(split, half)}
    table = scoring.compare_models(evs, 0.5)
    assert list(table["model"]) == ["a", "b"]
    assert table.set_index("model").at["a", "ap"] == pytest.approx(1.0)
    assert table.set_index("model").at["b", "fn"] == 1
    assert table.set_index("model").at["b", "ap"] == pytest.approx(4 / 5)
    pm = scoring.per_group_table(evs, "marker")
    row = pm[(pm["model"] == "b") & (pm["marker"] == "gfap") & np.isclose(pm["threshold"], 0.5)].iloc[0]
    assert row["ap"] == pytest.approx(2 / 3)
    long = scoring.per_image_long(evs, 0.5)
    assert len(long) == 4 and set(long["model"]) == {"a", "b"}
    with pytest.raises(SeglabError):
        scoring.compare_models(evs, 0.6)


def test_pick_examples_spreads_over_the_metric_and_markers():
    per_image = pd.DataFrame({"image": list("abcdef"), "threshold": 0.5, "ap": [0.1, 0.2, 0.5, 0.6, 0.9, 0.95],
                              "marker": ["x", "x", "y", "y", "z", "x"]})
    names = scoring.pick_examples(per_image, 3)
    assert names[0] == "a" and len(set(names)) == 3
    assert {per_image.set_index("image").at[n, "marker"] for n in names} == {"x", "y", "z"}
    assert len(scoring.pick_examples(per_image, 10)) == 6


def test_take_and_subset(small_set):
    split, outs = small_set
    sub, o = splitset.take(split, ["t1"], outs)
    assert sub.names == ["t1"] and o[0] is outs[1]
    with pytest.raises(SeglabError):
        splitset.take(split, ["nope"])
    assert splitset.subset(split, markers=["iba1"]).names == ["t1"]
    assert len(splitset.subset(split, n=1, seed=0)) == 1
    nodapi = splitset.zero_dapi(split)
    assert nodapi.images[0][0].max() == 0 and split.images[0][0].max() > 0


def test_gate_split_counts_removed_false_and_true_positives():
    truth = _disks()
    pred = truth.copy()
    pred[60:63, 60:63] = 9  # a 9 px false positive
    image = np.stack([np.zeros_like(truth, np.float32), (truth > 0).astype(np.float32)])
    image[1][60:63, 60:63] = 5.0  # bright, like lipofuscin
    split = _split([image], [truth], ["gfap"])
    gated, dec = postprocess.gate_split(split, [pred], postprocess.Gate(min_area_px=20))
    assert set(np.unique(gated[0])) == {0, 1, 2, 3}
    eff = postprocess.gate_effect(dec).set_index("reason")
    assert eff.at["area", "removed_fp"] == 1 and eff.at["all", "removed_tp"] == 0
    # an intensity gate that drops the brightest instance removes the same FP
    _, dec2 = postprocess.gate_split(split, [pred], postprocess.Gate(q_high=0.7))
    eff2 = postprocess.gate_effect(dec2).set_index("reason")
    assert eff2.at["bright", "removed_fp"] == 1 and eff2.at["bright", "removed_tp"] == 0
    items = postprocess.gate_items(split, [pred])
    sw = postprocess.sweep_gates(items, [postprocess.Gate(), postprocess.Gate(min_area_px=20)])
    assert list(sw["fp"]) == [1, 0]


def test_outputs_sensitivity_moves_one_setting(small_set):
    split, outs = small_set
    table = sweeps.outputs_sensitivity(split, outs, {"min_size": [0, 500], "cellprob_threshold": [0.0, 6.0]},
                                      MaskSettings(flow_threshold=0.4))
    assert list(table["parameter"]) == ["min_size", "min_size", "cellprob_threshold", "cellprob_threshold"]
    t = table.set_index(["parameter", "value"])
    assert t.at[("min_size", 0), "count_ratio"] == pytest.approx(1.0)
    assert t.at[("min_size", 500), "n_pred"] == 0
    assert t.at[("cellprob_threshold", 0.0), "ap"] == pytest.approx(1.0)
    with pytest.raises(SeglabError, match="rerun"):
        sweeps.outputs_sensitivity(split, outs, {"tile_overlap": [0.1]}, MaskSettings())
    with pytest.raises(SeglabError, match="unknown"):
        sweeps.rerun_sensitivity(None, split, {"gamma": [1]}, MaskSettings())


def test_segment_cached_reuses_the_network_outputs(tmp_path, monkeypatch, small_set):
    from seglab.segment import models

    split, _ = small_set
    model = models.load("tiny-xs", seed=0)
    first, out1 = output_cache.segment_cached(model, split, MaskSettings(diameter_px="native"), cache_dir=str(tmp_path), log=lambda *a: None)
    assert len(first) == 2 and all(m.shape == (64, 64) for m in first)

    def boom(*a, **k):
        raise AssertionError("the network ran again")

    monkeypatch.setattr(output_cache, "segment_split", boom)
    again, out2 = output_cache.segment_cached(model, split, MaskSettings(diameter_px="native"), cache_dir=str(tmp_path), log=lambda *a: None)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert np.array_equal(out1[0]["dP"], out2[0]["dP"])
    # other pixels (DAPI zeroed) are another cache entry
    with pytest.raises(AssertionError, match="again"):
        output_cache.segment_cached(model, splitset.zero_dapi(split), MaskSettings(diameter_px="native"), cache_dir=str(tmp_path),
                             log=lambda *a: None)


def test_rerun_sensitivity_runs_the_default_setting_once(small_set):
    from seglab.segment import models

    split, _ = small_set
    model = models.load("tiny-xs", seed=0)
    calls = []
    real = model.segment

    def counting(x, mask, **kw):
        calls.append((mask.diameter_px, kw["tile_overlap"], kw["augment"]))
        return real(x, mask, **kw)

    model.segment = counting
    table = sweeps.rerun_sensitivity(model, split, {"diameter_factor": [1.0, 2.0], "tile_overlap": [0.1],
                                                   "augment": [False]}, MaskSettings(min_size=0))
    assert list(table["parameter"]) == ["diameter_factor", "diameter_factor", "tile_overlap", "augment"]
    # default (factor 1, overlap 0.1, no augment) once, factor 2 once: two settings x two tiles
    assert len(calls) == 4
    assert table.iloc[0]["ap"] == table.iloc[2]["ap"] == table.iloc[3]["ap"]
    assert {c[2] for c in calls} == {False}


def test_segment_cached_many_fills_the_cache_in_workers(tmp_path, monkeypatch, small_set):
    from seglab.segment import models

    split, _ = small_set
    model = models.load("tiny-xs", seed=0)
    splits = [split, splitset.zero_dapi(split)]
    output_cache.segment_cached_many([dict(model=model, split=s, mask=MaskSettings(diameter_px="native"), cache_dir=str(tmp_path / "w"))
                               for s in splits], n_jobs=2, log=lambda *a: None)
    fresh = [output_cache.segment_cached(model, s, MaskSettings(diameter_px="native"), cache_dir=str(tmp_path / "here"), log=lambda *a: None)
             for s in splits]

    def boom(*a, **k):
        raise AssertionError("the network ran again")

    monkeypatch.setattr(output_cache, "segment_split", boom)
    for s, (masks, outs) in zip(splits, fresh):
        cached_masks, cached_outs = output_cache.segment_cached(model, s, MaskSettings(diameter_px="native"), cache_dir=str(tmp_path / "w"),
                                                         log=lambda *a: None)
        assert all(np.array_equal(a, b) for a, b in zip(masks, cached_masks))
        assert all(np.allclose(a["dP"], b["dP"], atol=1e-5) for a, b in zip(outs, cached_outs))
    with pytest.raises(SeglabError, match="n_jobs=0"):
        output_cache.segment_cached_many([], n_jobs=0)
