"""seglab.active.uncertainty and .diversity on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from seglab import SeglabError
from seglab.active import diversity as dv
from seglab.active import uncertainty as un


# --------------------------------------------------------------------------- pixel measures


def test_pixel_measures_at_certain_and_undecided_probabilities():
    p = np.array([0.0, 1.0, 0.5, 0.25])
    assert un.entropy_map(p) == pytest.approx([0.0, 0.0, 1.0, 0.8112781244591328])
    assert un.confidence_map(p) == pytest.approx([0.0, 0.0, 0.5, 0.25])
    assert un.margin_map(p) == pytest.approx([0.0, 0.0, 1.0, 0.5])
    assert un.cell_probability(np.array([0.0]))[0] == 0.5


def _outputs(logit_in: float, logit_out: float = -10.0) -> dict:
    """A 20 x 20 tile: a 6 x 6 cell with logit ``logit_in``, background at ``logit_out``."""
    cp = np.full((20, 20), logit_out, np.float32)
    cp[7:13, 7:13] = logit_in
    return {"cellprob": cp, "dP": np.zeros((2, 20, 20), np.float32)}


def test_a_certain_prediction_scores_lower_than_an_uncertain_one_for_each_pixel_measure():
    certain = un.pixel_scores(_outputs(10.0))
    unsure = un.pixel_scores(_outputs(0.5, -0.5))
    for m in un.PIXEL_MEASURES:
        assert certain[m] < 0.01 < unsure[m], m


def test_region_aggregation_is_the_mean_over_the_cells_and_their_boundary_band():
    p = np.zeros((10, 10))
    p[4:6, 4:6] = 0.9                      # a 2 x 2 cell
    values = np.zeros((10, 10))
    values[4:6, 4:6] = 1.0
    # dilated by 1 px (cross-shaped structuring element): 4 + 8 pixels -> 4 / 12
    assert un.aggregate(values, p, "region", boundary_px=1) == pytest.approx(4 / 12)
    assert un.aggregate(values, p, "mean") == pytest.approx(0.04)
    assert un.aggregate(values, p, "topk", top_k_fraction=0.02) == pytest.approx(1.0)
    assert un.aggregate(values, np.zeros((10, 10)), "region") == pytest.approx(0.04)   # no cell: every pixel
    with pytest.raises(SeglabError, match="aggregation 'median'"):
        un.aggregate(values, p, "median")


# --------------------------------------------------------------------------- views


@pytest.mark.parametrize("view", un.VIEWS)
def test_views_invert_and_turn_flow_vectors_with_the_pixels(view):
    yy, xx = np.mgrid[0:9, 0:13].astype(float)
    f = (yy - 3.0) ** 2 + 0.5 * (xx - 8.0) ** 3 + yy * xx           # no symmetry
    grad = np.stack(np.gradient(f))                                 # (dY, dX) of f
    img = np.random.default_rng(0).random((2, 9, 13))
    assert np.array_equal(un.inverse_image(un.transform_image(img, view), view), img)
    # the gradient of the transformed function is the transformed gradient
    assert np.allclose(un.transform_flow(grad, view), np.stack(np.gradient(un.transform_image(f, view))))
    assert np.allclose(un.inverse_flow(un.transform_flow(grad, view), view), grad)


# --------------------------------------------------------------------------- agreement, TTA, ensemble


def _squares(*boxes, shape=(20, 20)):
    m = np.zeros(shape, np.uint16)
    for i, (y, x, s) in enumerate(boxes, start=1):
        m[y:y + s, x:x + s] = i
    return m


def test_mask_agreement_known_values():
    a = _squares((0, 0, 4), (10, 10, 5))
    assert un.mask_agreement(a, a) == 1.0
    assert un.mask_agreement(a, _squares((15, 0, 3))) == 0.0
    assert un.mask_agreement(np.zeros((5, 5), np.uint8), np.zeros((5, 5), np.uint8)) == 1.0
    # the 4 x 4 square shifted by one column: IoU 12 / 20 = 0.6; the other square missing
    b = _squares((0, 1, 4))
    assert un.mask_agreement(a, b) == pytest.approx(0.6 / 1.5)


def test_ensemble_and_tta_disagreement_are_zero_for_agreeing_members_and_grow_when_they_differ():
    a = _squares((0, 0, 4), (10, 10, 5))
    assert un.ensemble_disagreement([a, a, a]) == 0.0
    assert un.ensemble_disagreement([a, a, _squares((0, 1, 4))]) == pytest.approx(1 - (1 + 0.4 + 0.4) / 3)
    with pytest.raises(SeglabError, match="at least two"):
        un.ensemble_disagreement([a])
    out = _outputs(10.0)
    same = un.tta_scores([(a, out), (a, out), (a, out)])
    assert same == {"tta_mask": 0.0, "tta_flow": 0.0}
    moved = {**out, "dP": np.ones((2, 20, 20), np.float32)}
    diff = un.tta_scores([(a, out), (_squares((0, 1, 4)), moved)])
    assert diff["tta_mask"] == pytest.approx(0.6) and diff["tta_flow"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- core-set, k-means, combination


def test_k_center_greedy_follows_the_known_greedy_order():
    x = np.array([[0.0], [1.0], [3.0], [10.0], [11.5]])
    # from the labelled point 0: 11.5 is farthest; then 3 (3 from 0); then 10 (1.5 from 11.5) before 1 (1 from 0)
    assert dv.k_center_greedy(x, 3, labelled=np.array([[0.0]])) == [4, 2, 3]
    # nothing labelled: the point nearest the mean (5.1 -> 3) first, then 11.5, then 0
    assert dv.k_center_greedy(x, 3) == [2, 4, 0]
    picks = dv.select_batch(pd.DataFrame({"tile_id": list("abcde")}), x, np.array([[0.0]]), {"coreset": 1.0}, 3, 0)
    assert list(picks["tile_id"]) == ["e", "c", "d"]
    assert list(picks["w_coreset"]) == pytest.approx([1.0, 1.0, 1.0])   # each pick is the farthest now
    # ties: k_center_greedy takes the lower index; select_batch its seeded order
    tied = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    assert dv.k_center_greedy(tied, 3, labelled=np.array([[0.0]])) == [4, 2, 1]


def test_kmeans_alone_takes_the_central_tile_of_each_cluster():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    x = np.concatenate([c + rng.normal(0, 0.3, (5, 2)) for c in centres] + [centres])   # centres last
    ids = [f"t{i}" for i in range(len(x))]
    picks = dv.select_batch(pd.DataFrame({"tile_id": ids}), x, None, {"kmeans": 1.0}, 3, seed=0)
    clusters = {tuple(np.round(x[ids.index(t)] / 10)) for t in picks["tile_id"]}
    assert len(clusters) == 3   # one per cluster


def test_uncertainty_alone_picks_the_most_uncertain_tiles_in_order():
    scores = pd.DataFrame({"tile_id": ["a", "b", "c", "d"], "entropy": [0.1, 0.9, 0.5, 0.7]})
    picks = dv.select_batch(scores, None, None, {"entropy": 1.0}, 3, seed=0)
    assert list(picks["tile_id"]) == ["b", "d", "c"]
    assert list(picks["w_entropy"]) == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert picks.columns.tolist()[:3] == ["pick", "tile_id", "combined"]


def test_combination_weights_the_scaled_scores():
    scores = pd.DataFrame({"tile_id": ["a", "b", "c"], "entropy": [0.9, 0.5, 0.1], "margin": [0.1, 0.2, 0.95]})
    # ranks: entropy a=1, b=.5, c=0; margin a=0, b=.5, c=1; weights 1 and 3 -> c (3) beats a (1) and b (2)
    assert dv.select_batch(scores, None, None, {"entropy": 1, "margin": 3}, 1, 0)["tile_id"].iloc[0] == "c"
    assert dv.select_batch(scores, None, None, {"entropy": 3, "margin": 1}, 1, 0)["tile_id"].iloc[0] == "a"


def test_random_is_seeded():
    scores = pd.DataFrame({"tile_id": [f"t{i}" for i in range(20)]})
    a = dv.select_batch(scores, None, None, {"random": 1}, 5, seed=3)
    assert a.equals(dv.select_batch(scores, None, None, {"random": 1}, 5, seed=3))
    assert list(a["tile_id"]) != list(dv.select_batch(scores, None, None, {"random": 1}, 5, seed=4)["tile_id"])


def test_bad_selection_requests_are_refused_with_the_param_and_the_fix():
    scores = pd.DataFrame({"tile_id": ["a", "b"], "entropy": [0.1, 0.2]})
    with pytest.raises(SeglabError, match=r"batch_size=3 is larger than the unlabelled pool \(2 tiles\); lower"):
        dv.select_batch(scores, None, None, {"entropy": 1}, 3, 0)
    with pytest.raises(SeglabError, match="params.yaml: every weight is 0.*at least one strategy a weight > 0"):
        dv.select_batch(scores, None, None, {"entropy": 0, "coreset": 0.0}, 1, 0, source="params.yaml")
    with pytest.raises(SeglabError, match="unknown strategies"):
        dv.check_weights({"entrpy": 1})
    with pytest.raises(SeglabError, match=">= 0"):
        dv.check_weights({"entropy": -1})
    with pytest.raises(SeglabError, match="no scores were computed"):
        dv.select_batch(scores, None, None, {"margin": 1}, 1, 0)


def test_core_set_of_15000_tiles_stays_in_memory_chunks():
    x = np.random.default_rng(0).normal(size=(15000, 16)).astype(np.float32)
    picks = dv.k_center_greedy(x, 5, labelled=x[:10])
    assert len(set(picks)) == 5 and not set(picks) & set(range(10))


# --------------------------------------------------------------------------- styles from the network


def test_styles_are_unit_vectors_per_image_and_leave_masks_and_outputs_unchanged():
    import torch

    from seglab.config.settings import MaskSettings
    from seglab.segment import models

    torch.set_num_threads(1)
    m = models.load("tiny-xs", gpu=False, seed=0)
    rng = np.random.default_rng(0)
    imgs = [rng.random((2, 64, 64)).astype(np.float32) for _ in range(2)]
    mask = MaskSettings(diameter_px=30.0)
    plain, outs = m.segment(imgs, mask, return_outputs=True)
    styled, souts = m.segment(imgs, mask, return_outputs=True, return_styles=True)
    for a, b, o, s in zip(plain, styled, outs, souts):
        assert np.array_equal(a, b)
        assert np.array_equal(o["dP"], s["dP"]) and np.array_equal(o["cellprob"], s["cellprob"])
        assert s["style"].shape == (64,) and np.linalg.norm(s["style"]) == pytest.approx(1.0, abs=1e-5)
    # the style of an image does not depend on the other images of the call
    _, one = m.segment(imgs[1], mask, return_outputs=True, return_styles=True)
    assert np.allclose(one["style"], souts[1]["style"], atol=1e-5)
    assert not np.allclose(souts[0]["style"], souts[1]["style"])
    with pytest.raises(SeglabError, match="return_outputs=True"):
        m.segment(imgs[0], mask, return_styles=True)


# --------------------------------------------------------------------------- E10's numbers


def test_labels_to_target_interpolates_between_rounds():
    from seglab.experiments import e10_active_learning as e10

    assert e10.labels_to_target([4, 8, 12], [0.5, 0.6, 0.8], 0.7) == pytest.approx(10.0)
    assert e10.labels_to_target([4, 8], [0.9, 0.95], 0.7) == 4.0
    assert np.isnan(e10.labels_to_target([4, 8], [0.5, 0.6], 0.7))


def test_labels_table_ratios_against_random_per_repeat():
    from seglab.experiments import e10_active_learning as e10

    rows = []
    for r in (0, 1):
        for n, a_rand, a_ent in ((4, 0.5, 0.5), (8, 0.6, 0.8), (12, 0.8, 0.85)):
            rows += [dict(strategy="random", repeat=r, round=n // 4 - 1, n_labelled=n, test_ap50=a_rand, val_ap50=a_rand),
                     dict(strategy="entropy", repeat=r, round=n // 4 - 1, n_labelled=n, test_ap50=a_ent, val_ap50=a_ent)]
    runs = pd.DataFrame(rows)
    ref = pd.DataFrame({"repeat": [0, 1], "test_ap50": [0.8, 0.8], "val_ap50": [0.8, 0.8]})
    t = e10.labels_table(runs, ref).set_index("strategy")
    # target 0.76: random reaches it at 8 + 0.16 / 0.2 * 4 = 11.2 tiles, entropy at 4 + 0.26 / 0.3 * 4
    assert t.loc["random", "labels"] == pytest.approx(11.2)
    assert t.loc["entropy", "labels"] == pytest.approx(4 + 0.26 / 0.3 * 4)
    assert t.loc["entropy", "ratio_vs_random"] == pytest.approx((4 + 0.26 / 0.3 * 4) / 11.2)
    assert t.loc["entropy", "ratio_sd"] == pytest.approx(0.0) and t.loc["entropy", "n_reached"] == 2
    assert "entropy" in e10.verdict(t.reset_index())
    summary = e10.headline(t.reset_index(), ref, runs)
    assert summary["labels_to_95_ratio_random"] == 1.0 and summary["test_ap50_all_tiles"] == 0.8


def test_e10_preflight_refuses_impossible_designs():
    from seglab.config.params import load_params
    from seglab.experiments import ParamConflict
    from seglab.experiments import e10_active_learning as e10

    params = load_params("10_active_learning", "demo")[0]
    e10.preflight(params, lambda: None)
    with pytest.raises(ParamConflict, match="pool_tiles.*needs 40"):
        e10.preflight({**params, "rounds": 9}, lambda: None)
    with pytest.raises(ParamConflict, match="lacks random"):
        e10.preflight({**params, "strategies": ["entropy"]}, lambda: None)
    with pytest.raises(ParamConflict, match="weights"):
        e10.preflight({**params, "weights": {"entropy": 0}}, lambda: None)
