"""seglab.evaluate.metrics against the references users trust: cellpose.metrics.average_precision
(tp, fp, fn, ap) and stardist.matching.matching (precision, recall, f1, mean scores, PQ).

stardist is a test dependency only. Where the references disagree with each
other or have a quirk, the test states the case and what we give.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from seglab import SeglabError
from seglab.evaluate import metrics as M

THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
STARDIST_FIELDS = {  # ours -> stardist's name
    "precision": "precision", "recall": "recall", "f1": "f1", "ap": "accuracy",
    "mean_matched_iou": "mean_matched_score", "mean_true_score": "mean_true_score",
    "panoptic_quality": "panoptic_quality",
}


@pytest.fixture(scope="module")
def refs():
    cp_metrics = pytest.importorskip("cellpose.metrics")
    sd_matching = pytest.importorskip("stardist.matching")
    return cp_metrics.average_precision, sd_matching.matching


def assert_same_as_references(refs, y_true, y_pred, thresholds=THRESHOLDS):
    """tp/fp/fn (and ap) exactly as Cellpose; every StarDist field as StarDist.

    StarDist compares IoU and threshold in float32: where a pair's IoU is within
    float32 precision of a threshold but not equal to it, the rounding can flip
    the match (see test_float32_near_tie); those thresholds are left out of
    the StarDist comparison only. Returns the number of thresholds compared with StarDist.
    """
    average_precision, matching = refs
    ours = M.match(y_true, y_pred, thresholds)
    with np.errstate(divide="ignore", invalid="ignore"):  # Cellpose's 0/0 on empty images
        ap, tp, fp, fn = average_precision(y_true, y_pred, threshold=list(thresholds))
    np.testing.assert_array_equal(ours["tp"].to_numpy(), tp)
    np.testing.assert_array_equal(ours["fp"].to_numpy(), fp)
    np.testing.assert_array_equal(ours["fn"].to_numpy(), fn)
    both_empty = ours["n_true"].iloc[0] == 0 and ours["n_pred"].iloc[0] == 0
    if both_empty:
        assert np.isnan(ap).all() and (ours["ap"] == 0).all()  # Cellpose 0/0; ours 0 (documented)
    else:
        np.testing.assert_allclose(ours["ap"].to_numpy(), ap, rtol=1e-6)
    ious = M.overlap(y_true, y_pred).pair_iou
    compared = 0
    for row, th in zip(ours.to_dict("records"), thresholds):
        if np.any((ious.astype(np.float32) >= np.float32(th)) != (ious >= th)):
            continue
        s = matching(y_true, y_pred, thresh=th)
        assert (row["tp"], row["fp"], row["fn"], row["n_true"], row["n_pred"]) == (s.tp, s.fp, s.fn, s.n_true, s.n_pred)
        for ours_name, sd_name in STARDIST_FIELDS.items():
            assert row[ours_name] == pytest.approx(float(getattr(s, sd_name)), rel=1e-5, abs=1e-6), (th, ours_name)
        compared += 1
    return compared


# --------------------------------------------------------------------------- constructions

def blocky_labels(rng, shape, n_ids, block, id_pool=None, dtype=np.uint16):
    """Random labels on a coarse grid (objects of several blocks), background guaranteed."""
    coarse = tuple(-(-s // block) for s in shape)
    ids = rng.integers(0, n_ids + 1, coarse)
    ids.flat[0] = 0
    if id_pool is not None:
        lut = np.concatenate([[0], rng.choice(id_pool, n_ids, replace=False)])
        ids = lut[ids]
    big = ids
    for ax in range(len(shape)):
        big = np.repeat(big, block, axis=ax)
    out = big[tuple(slice(0, s) for s in shape)].astype(dtype)
    out.flat[0] = 0  # Cellpose counts objects as len(unique) - 1: keep one background pixel
    return out


def disk(shape, center, radius):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius ** 2


def balls(rng, shape, n, rmin, rmax):
    out = np.zeros(shape, np.int32)
    zz, yy, xx = np.ogrid[tuple(slice(0, s) for s in shape)]
    for i in range(1, n + 1):
        c = rng.uniform(0, shape)
        r = rng.uniform(rmin, rmax)
        out[((zz - c[0]) / (r / 2)) ** 2 + ((yy - c[1]) / r) ** 2 + ((xx - c[2]) / r) ** 2 <= 1] = i
    return out


# --------------------------------------------------------------------------- random images

@pytest.mark.parametrize("seed", range(12))
def test_random_label_images_match_references(refs, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(20, 90, 2))
    yt = blocky_labels(rng, shape, int(rng.integers(1, 25)), int(rng.integers(2, 7)))
    if seed % 2:
        # an independent prediction: low IoUs, many conflicts at low thresholds
        yp = blocky_labels(rng, shape, int(rng.integers(1, 25)), int(rng.integers(2, 7)), dtype=np.int32)
    else:
        # a prediction made from the truth: shifted, with ids remapped and some objects merged
        lut = rng.integers(1, 40, int(yt.max()) + 1)
        lut[0] = 0
        yp = np.roll(lut[yt], tuple(rng.integers(-2, 3, 2)), axis=(0, 1)).astype(np.uint32)
        yp.flat[0] = 0
    assert assert_same_as_references(refs, yt, yp) >= 5


def test_overlap_table_equals_brute_force():
    rng = np.random.default_rng(3)
    yt = blocky_labels(rng, (40, 50), 12, 4, id_pool=np.arange(1, 1000))
    yp = blocky_labels(rng, (40, 50), 9, 3, id_pool=np.arange(1, 1000), dtype=np.int64)
    table = M.overlap(yt, yp).table()
    expected = []
    for i in np.unique(yt[yt > 0]):
        for j in np.unique(yp[yp > 0]):
            inter = np.count_nonzero((yt == i) & (yp == j))
            if inter:
                union = np.count_nonzero((yt == i) | (yp == j))
                expected.append((i, j, inter, inter / union))
    got = sorted(zip(table.true_id, table.pred_id, table.intersection_px, table.iou))
    assert [(a, b, c) for a, b, c, _ in got] == [(a, b, c) for a, b, c, _ in sorted(expected)]
    np.testing.assert_allclose([d for *_, d in got], [d for *_, d in sorted(expected)], rtol=1e-12)


def test_relabelling_does_not_change_the_result():
    rng = np.random.default_rng(5)
    yt = blocky_labels(rng, (64, 64), 20, 4)
    yp = np.roll(yt, 2, axis=1)
    base = M.match(yt, yp, THRESHOLDS)
    # huge, non-consecutive ids in other dtypes (Cellpose would build a dense max_id^2 matrix)
    lut_t = np.concatenate([[0], rng.choice(2**40, int(yt.max()), replace=False) + 1]).astype(np.uint64)
    lut_p = np.concatenate([[0], rng.choice(2**31 - 2, int(yp.max()), replace=False) + 1]).astype(np.int32)
    pd.testing.assert_frame_equal(M.match(lut_t[yt], lut_p[yp], THRESHOLDS), base)
    # memory order does not matter either
    pd.testing.assert_frame_equal(M.match(np.asfortranarray(yt), yp.T.copy().T, THRESHOLDS), base)


# --------------------------------------------------------------------------- constructed cases

@pytest.mark.parametrize("shift", [1, 3, 5, 8, 12])
def test_shifted_disks_at_known_iou(refs, shift):
    """StarDist's construction: a disk against a shifted copy; matched just below the IoU, not just above."""
    shape = (64, 64)
    a = disk(shape, (32, 32), 15)
    b = np.roll(a, shift, axis=1)
    iou = np.count_nonzero(a & b) / np.count_nonzero(a | b)
    yt = a.astype(np.uint16) * 3
    yp = b.astype(np.int32) * 11
    ths = [iou - 1e-4, iou + 1e-4]
    got = M.match(yt, yp, ths)
    assert got["tp"].tolist() == [1, 0]
    assert got["fp"].tolist() == [0, 1] and got["fn"].tolist() == [0, 1]
    assert got["mean_matched_iou"].iloc[0] == pytest.approx(iou, rel=1e-12)
    assert got["panoptic_quality"].iloc[0] == pytest.approx(iou, rel=1e-12)
    assert assert_same_as_references(refs, yt, yp, ths) == 2


def test_shifted_disk_grid(refs):
    """Several disks with different shifts in one image: each flips at its own IoU."""
    shape = (128, 256)
    yt = np.zeros(shape, np.uint16)
    yp = np.zeros(shape, np.uint16)
    ious = []
    for k, shift in enumerate([1, 2, 4, 6, 9]):
        a = disk(shape, (64, 25 + 50 * k), 12)
        b = np.roll(a, shift, axis=0)
        yt[a] = 10 + k
        yp[b] = 100 - k
        ious.append(np.count_nonzero(a & b) / np.count_nonzero(a | b))
    ths = sorted([i - 1e-4 for i in ious] + [i + 1e-4 for i in ious])
    got = M.match(yt, yp, ths)
    expected = [sum(i >= th for i in ious) for th in ths]
    assert got["tp"].tolist() == expected
    assert assert_same_as_references(refs, yt, yp, ths) == len(ths)


def test_optimal_matching_beats_greedy(refs):
    """One true object split in two halves: at 0.5 exactly one half matches (IoU 0.5), never both."""
    yt = np.zeros((20, 20), np.uint8)
    yt[5:15, 5:15] = 1            # 100 px
    yp = np.zeros_like(yt)
    yp[5:10, 5:15] = 4            # 50 px: IoU 0.5
    yp[10:15, 5:15] = 9           # 50 px: IoU 0.5
    got = M.match(yt, yp, [0.3, 0.5, 0.6])
    assert got["tp"].tolist() == [1, 1, 0]
    assert got["fp"].tolist() == [1, 1, 2]
    assert assert_same_as_references(refs, yt, yp, [0.3, 0.5, 0.6]) == 3
    # Which pair is matched: the references' cost breaks ties by the total IoU of
    # the whole assignment, sub-threshold pairs included. At 0.2 one pair can
    # match: true 1 with pred 1 (IoU 2/8) or with pred 2 (IoU 3/9). Taking pred 1
    # frees pred 2 for true 2 (IoU 1/10, below threshold): total 0.35 > 0.333.
    yt = np.zeros((2, 30), np.uint8)
    yt[0, 12:20] = 1
    yt[0, 20:27] = 2
    yp = np.zeros_like(yt)
    yp[0, 15:17] = 1
    yp[0, 17:21] = 2
    got = M.match(yt, yp, [0.2]).iloc[0]
    assert got.tp == 1 and got.mean_matched_iou == pytest.approx(0.25)
    assert M.matched_pairs(yt, yp, 0.2)[["true_id", "pred_id"]].values.tolist() == [[1, 1]]
    assert assert_same_as_references(refs, yt, yp, [0.2, 0.3]) == 2


def test_empty_images(refs):
    empty = np.zeros((32, 32), np.uint16)
    one = empty.copy()
    one[4:12, 4:12] = 7
    two = one.copy()
    two[20:28, 20:28] = 300
    for yt, yp in [(empty, empty), (empty, one), (two, empty), (one, one), (one, two)]:
        assert_same_as_references(refs, yt, yp)
    both = M.match(empty, empty, THRESHOLDS)
    assert (both[["tp", "fp", "fn", "n_true", "n_pred"]] == 0).all().all()
    assert (both[M.RATIO_COLUMNS] == 0).all().all()  # never NaN
    pred_only = M.match(empty, two, [0.5]).iloc[0]
    assert (pred_only.fp, pred_only.fn, pred_only.precision, pred_only.ap) == (2, 0, 0.0, 0.0)
    single = M.match(one, two, [0.5]).iloc[0]
    assert (single.tp, single.fp, single.fn) == (1, 1, 0)
    assert single.precision == 0.5 and single.recall == 1.0 and single.ap == 0.5


def test_3d_volume(refs):
    rng = np.random.default_rng(11)
    yt = balls(rng, (16, 48, 48), 14, 4, 9)
    yp = np.roll(yt, (1, 1, 0), axis=(0, 1, 2))
    yp[yp == 3] = 0                          # a dropped object
    yp[(yt == 5) & (yp == 5)] = 500          # an id change
    yp[0:4, 0:10, 0:10] = np.where(yp[0:4, 0:10, 0:10] == 0, 77, yp[0:4, 0:10, 0:10])  # an added object
    yt[0, 0, 0] = 0
    yp[0, 0, 0] = 0
    assert M.match(yt, yp, THRESHOLDS)["tp"].iloc[0] > 5
    assert assert_same_as_references(refs, yt, yp) >= 5


# --------------------------------------------------------------------------- documented divergences

def test_no_background_pixel_cellpose_undercounts(refs):
    """Cellpose counts objects as len(unique) - 1: with no 0 pixel it misses one. We count positive ids."""
    average_precision, matching = refs
    yt = np.ones((10, 10), np.uint8)
    yt[:, 5:] = 2                            # two objects, no background
    yp = yt.copy()
    ours = M.match(yt, yp, [0.5]).iloc[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        _, tp, fp, fn = average_precision(yt, yp, threshold=[0.5])
    assert (ours.n_true, ours.tp, ours.fp, ours.fn, ours.ap) == (2, 2, 0, 0, 1.0)
    assert (tp[0], fp[0], fn[0]) == (2, -1, -1)   # Cellpose's quirk
    s = matching(yt, yp, thresh=0.5)
    assert (s.tp, s.fp, s.fn) == (2, 0, 0)        # StarDist agrees with us


def test_float32_near_tie(refs):
    """IoU 0.9 (90 / 100) at thresholds at, and a hair above, 0.9.

    At 0.9 all three match. At 0.9 + 1e-9 Cellpose and we (float64) do not, but
    StarDist compares in float32, where 0.9 + 1e-9 rounds to 0.9, and matches.
    """
    average_precision, matching = refs
    yt = np.zeros((20, 20), np.uint8)
    yt[0:10, 0:10] = 1                       # 100 px
    yp = np.zeros_like(yt)
    yp[0:9, 0:10] = 1                        # 90 px inside: IoU 90/100
    assert M.match(yt, yp, [0.9, 0.9 + 1e-9])["tp"].tolist() == [1, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        assert average_precision(yt, yp, threshold=[0.9, 0.9 + 1e-9])[1].tolist() == [1, 0]
    assert [matching(yt, yp, thresh=t).tp for t in (0.9, 0.9 + 1e-9)] == [1, 1]


# --------------------------------------------------------------------------- real DSB2018 masks

def _centroids(labels):
    ids = np.unique(labels[labels > 0])
    return ids, np.array(ndi.center_of_mass(labels > 0, labels, ids))


def perturbations(mask, rng):
    """Prediction-like copies of a real mask: eroded, dilated, merged, split, dropped, added, all at once."""
    from skimage.segmentation import expand_labels

    out = {}
    same = ndi.minimum_filter(mask, 3) == ndi.maximum_filter(mask, 3)
    out["eroded"] = np.where(same, mask, 0)
    out["dilated"] = expand_labels(mask, 2)
    ids, cents = _centroids(mask)
    lut = np.arange(int(mask.max()) + 1)
    for i in rng.choice(len(ids), max(1, len(ids) // 4), replace=False):
        d = np.hypot(*(cents - cents[i]).T)
        d[i] = np.inf
        lut[ids[i]] = ids[np.argmin(d)]          # merged with its nearest neighbour
    out["merged"] = lut[expand_labels(mask, 1)]
    split = mask.astype(np.int64).copy()
    rows = np.indices(mask.shape)[0]
    for k, i in enumerate(rng.choice(len(ids), max(1, len(ids) // 3), replace=False)):
        split[(mask == ids[i]) & (rows < cents[i][0])] = 10_000 + k   # upper half gets a new id
    out["split"] = split
    out["dropped"] = np.where(np.isin(mask, rng.choice(ids, max(1, len(ids) // 5), replace=False)), 0, mask)
    added = mask.astype(np.int64).copy()
    for k in range(8):
        c = rng.uniform(0, mask.shape)
        added[disk(mask.shape, c, rng.uniform(3, 9)) & (mask == 0)] = 20_000 + k
    out["added"] = added
    combo = np.roll(out["split"], 1, axis=1)
    combo = np.where(np.isin(combo, rng.choice(ids, len(ids) // 6, replace=False)), 0, combo)
    out["all"] = np.where((combo == 0) & (added >= 20_000), added, combo)
    return out


def test_dsb2018_real_masks_against_perturbed_copies(refs, dsb_dir):
    from seglab.data.dsb import dsb2018_table, load_dsb2018

    table = dsb2018_table(dsb_dir)
    # a handful of images from different acquisition groups, with at least a few nuclei
    picks = (table[(table.n_objects >= 5) & (table.height * table.width <= 520 * 700)]
             .sort_values("name").groupby("group").head(1).head(5))
    assert len(picks) >= 3
    rng = np.random.default_rng(2018)
    for _, row in picks.iterrows():
        _, mask = load_dsb2018(row)
        assert (mask == 0).any()  # Cellpose's object count needs a background pixel
        for name, pred in perturbations(mask, rng).items():
            pred = pred.astype(np.int32)
            if (pred != 0).all():
                continue
            assert assert_same_as_references(refs, mask, pred) >= 5, (row["name"], name)
        perfect = M.match(mask, mask, THRESHOLDS)
        assert (perfect["ap"] == 1).all() and (perfect["tp"] == len(np.unique(mask)) - 1).all()


# --------------------------------------------------------------------------- other API

def test_matched_pairs_are_the_tp():
    rng = np.random.default_rng(8)
    yt = blocky_labels(rng, (60, 60), 30, 5, id_pool=np.arange(1, 500))
    yp = np.roll(yt, 1, axis=0)
    for th in (0.3, 0.5, 0.8):
        pairs = M.matched_pairs(yt, yp, th)
        assert len(pairs) == M.match(yt, yp, th)["tp"].iloc[0]
        assert (pairs.iou >= th).all()
        assert pairs.true_id.is_unique and pairs.pred_id.is_unique
        assert set(pairs.true_id) <= set(np.unique(yt))


def test_foreground_iou_dice():
    yt = np.zeros((10, 10), np.uint16)
    yp = np.zeros((10, 10), np.int8)
    assert np.isnan(M.foreground_iou_dice(yt, yp)["foreground_iou"])
    yt[0:4, 0:5] = 1                         # 20 px
    yt[5:9, 0:5] = 2                         # 20 px
    yp[0:4, 0:10] = 3                        # 40 px, 20 shared
    got = M.foreground_iou_dice(yt, yp)
    assert got["foreground_iou"] == pytest.approx(20 / 60)
    assert got["foreground_dice"] == pytest.approx(40 / 80)
    assert (got["foreground_true_px"], got["foreground_pred_px"], got["foreground_both_px"]) == (40, 40, 20)
    assert M.foreground_iou_dice(yt > 0, yp != 0) == got        # boolean masks work too
    with pytest.raises(M.MetricsInputError, match="y_pred"):
        M.foreground_iou_dice(yt, yp.astype(float))


@pytest.mark.parametrize("y_true, y_pred, words", [
    (np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8), ["y_pred", "shape"]),
    (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8), ["y_true", "float32", "astype"]),
    (np.zeros((4, 4), bool), np.zeros((4, 4), np.uint8), ["y_true", "boolean", "label"]),
    (np.zeros((4, 4), np.uint8), np.full((4, 4), np.nan), ["y_pred", "NaN"]),
    (np.zeros((4, 4), np.uint8), -np.ones((4, 4), np.int16), ["y_pred", "negative"]),
    ([[0, 1], [1, 0]], np.zeros((2, 2), np.uint8), ["y_true", "numpy array", "np.asarray"]),
    (np.zeros(4, np.uint8), np.zeros(4, np.uint8), ["y_true", "2D", "3D"]),
])
def test_bad_input_names_argument_and_fix(y_true, y_pred, words):
    with pytest.raises(M.MetricsInputError) as info:
        M.match(y_true, y_pred)
    assert isinstance(info.value, SeglabError) and isinstance(info.value, ValueError)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "x", []])
def test_bad_thresholds(bad):
    y = np.zeros((4, 4), np.uint8)
    with pytest.raises(M.MetricsInputError, match="threshold"):
        M.match(y, y, bad)


# --------------------------------------------------------------------------- evaluate

def _three_images():
    a = np.zeros((30, 30), np.uint16)
    a[2:12, 2:12] = 1
    a[15:25, 15:25] = 2
    pred_a = a.copy()                        # perfect: 2 tp
    b = np.zeros((30, 30), np.uint16)
    b[5:15, 5:15] = 9
    b[18:28, 2:12] = 4
    b[2:8, 20:28] = 5
    pred_b = np.zeros_like(b)
    pred_b[5:15, 5:15] = 1                   # 1 tp, 2 fn, 1 fp
    pred_b[20:25, 20:25] = 2
    empty = np.zeros((30, 30), np.uint16)
    return {"a": (a, pred_a), "b": (b, pred_b), "e": (empty, empty)}


def test_evaluate_pooled_vs_mean_and_groups(tmp_path):
    pairs = _three_images()
    groups = {"a": {"marker": "CD3", "donor": "d1"}, "b": {"marker": "CD8", "donor": "d1"},
              "e": {"marker": "CD8", "donor": "d2"}}
    res = M.evaluate(pairs, groups=groups, thresholds=[0.5, 0.9])
    assert len(res.per_image) == 6
    assert {"image", "marker", "donor", "threshold", "tp", "ap", "foreground_iou", "both_empty"} <= set(res.per_image.columns)
    pooled = res.pooled.set_index("threshold").loc[0.5]
    assert (pooled.tp, pooled.fp, pooled.fn, pooled.n_images) == (3, 1, 2, 3)
    assert pooled.ap == pytest.approx(3 / 6)                 # sums first, then the ratio
    mean = res.mean_over_images.set_index("threshold").loc[0.5]
    assert mean.n_images == 2 and mean.n_images_both_empty == 1
    assert mean.ap == pytest.approx((1.0 + 1 / 4) / 2)       # the ratio per image, then the mean
    pg = res.per_group
    cd8 = pg[(pg.group_by == "marker") & (pg.group == "CD8") & (pg.threshold == 0.5)]
    assert cd8[cd8.summary == "pooled"].ap.iloc[0] == pytest.approx(1 / 4)
    assert cd8[cd8.summary == "mean_over_images"].n_images.iloc[0] == 1
    assert set(pg.group_by) == {"marker", "donor"}
    fg = res.per_image.set_index(["image", "threshold"]).loc[("b", 0.5)]
    assert fg.foreground_iou == pytest.approx(M.foreground_iou_dice(*pairs["b"])["foreground_iou"])
    summary = res.summary()
    assert summary["pooled"][0]["tp"] == 3 and "mean_over_images" in summary
    assert "pooled" in res.text() and "mean" in res.text()
    # same result from TIFF paths, and from a list of (name, true, pred)
    import tifffile
    items = []
    for name, (t, p) in pairs.items():
        tifffile.imwrite(tmp_path / f"{name}_t.tif", t)
        tifffile.imwrite(tmp_path / f"{name}_p.tif", p)
        items.append((name, tmp_path / f"{name}_t.tif", str(tmp_path / f"{name}_p.tif")))
    pd.testing.assert_frame_equal(M.evaluate(items, thresholds=[0.5, 0.9]).pooled, res.pooled)


def test_evaluate_errors_name_the_image():
    pairs = _three_images()
    pairs["bad"] = (np.zeros((5, 5), np.uint8), np.zeros((5, 6), np.uint8))
    with pytest.raises(SeglabError, match="image bad"):
        M.evaluate(pairs)
    with pytest.raises(SeglabError, match="no group given"):
        M.evaluate(_three_images(), groups={"a": "x"})


# --------------------------------------------------------------------------- CLI and plots

def test_cli_evaluate_pairs_files_and_writes_outputs(tmp_path, capsys):
    import json

    import tifffile

    from seglab.cli import main

    true_dir, pred_dir, out = tmp_path / "true", tmp_path / "pred", tmp_path / "out"
    true_dir.mkdir()
    pred_dir.mkdir()
    pairs = _three_images()
    for name, (t, p) in pairs.items():
        tifffile.imwrite(true_dir / f"{name}.tif", t)
        tifffile.imwrite(pred_dir / f"{name}_0000.tiff", p)     # nnU-Net style suffix, other extension
    tifffile.imwrite(true_dir / "orphan.tif", pairs["a"][0])
    tifffile.imwrite(pred_dir / "stray_cp_masks.tif", pairs["a"][0])
    (pred_dir / "notes.txt").write_text("not a mask")
    rc = main(["evaluate", "--true", str(true_dir), "--pred", str(pred_dir), "--out", str(out),
               "--thresholds", "0.5", "0.75", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "orphan.tif" in captured.err and "stray_cp_masks.tif" in captured.err
    table = pd.read_csv(out / "evaluation_results.csv")
    assert sorted(table.image.unique()) == ["a", "b", "e"] and len(table) == 6
    summary = json.loads((out / "evaluation_summary.json").read_text())
    assert summary["unpaired"] == {"true": ["orphan.tif"], "pred": ["stray_cp_masks.tif"]}
    assert summary["pooled"][0]["tp"] == 3 and summary["thresholds"] == [0.5, 0.75]
    assert "pooled" in (out / "evaluation_summary.txt").read_text()
    assert not [f for f in out.iterdir() if f.name.startswith(".")]   # no temporary files left
    # --strict refuses unpaired files; bad thresholds and missing folders are one-line errors
    assert main(["evaluate", "--true", str(true_dir), "--pred", str(pred_dir), "--out", str(out), "--strict", "--quiet"]) == 1
    assert main(["evaluate", "--true", str(true_dir), "--pred", str(pred_dir), "--out", str(out), "--thresholds", "0"]) == 1
    assert main(["evaluate", "--true", str(tmp_path / "nope"), "--pred", str(pred_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--strict" in err and "(0, 1]" in err and "not a folder" in err and "Traceback" not in err


def test_pairing_key():
    from seglab.cli.evaluate import pairing_key

    assert pairing_key("x/img_0000.tif") == pairing_key("img.TIFF") == pairing_key("img_cp_masks.tif") == "img"
    assert pairing_key("img_masks.tiff") == "img" and pairing_key("img_0001.tif") == "img_0001"
    assert pairing_key("img.png") is None


def test_plots_return_figures(tmp_path):
    from matplotlib.figure import Figure

    from seglab.plots import evaluation as plots

    res = M.evaluate(_three_images(), groups={"a": "CD3", "b": "CD8", "e": "CD8"}, thresholds=THRESHOLDS)
    fig = plots.plot_metric_vs_threshold(res, ["ap", "f1", "panoptic_quality"])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.lines) == 3
    np.testing.assert_allclose(ax.lines[0].get_ydata(), res.pooled["ap"])
    fig2 = plots.plot_metric_vs_threshold(res, "ap", summary="mean_over_images")
    np.testing.assert_allclose(fig2.axes[0].lines[0].get_ydata(), res.mean_over_images["ap"])
    fig3 = plots.plot_group_bars(res.per_image, "group", "ap", threshold=0.5)
    heights = [p.get_height() for p in fig3.axes[0].patches]
    assert heights == pytest.approx([1.0, 0.25])   # the empty pair is left out of CD8's mean
    fig3.savefig(tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 1000
    with pytest.raises(SeglabError, match="not evaluated"):
        plots.plot_group_bars(res, "group", "ap", threshold=0.55)


def test_pooled_match_equals_evaluate_pooled():
    from seglab.evaluate.metrics import evaluate, pooled_match

    rng = np.random.default_rng(7)
    truths, preds = [], []
    for _ in range(4):
        t = np.zeros((40, 40), np.uint16)
        for k in range(1, 6):
            y, x = rng.integers(0, 32, 2)
            t[y:y + 7, x:x + 7] = k
        truths.append(t)
        preds.append(np.roll(t, int(rng.integers(0, 3)), axis=1))
    preds[2][:] = 0
    pooled = evaluate(list(zip(truths, preds)), thresholds=(0.5,)).pooled.iloc[0]
    ours = pooled_match(truths, preds, 0.5)
    for key in ("n_true", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1", "ap", "panoptic_quality"):
        assert ours[key] == pytest.approx(pooled[key]), key
