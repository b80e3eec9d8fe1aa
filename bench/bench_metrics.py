"""Benchmark: seglab.evaluate.metrics.match against cellpose.metrics.average_precision and stardist.matching.matching.

Two synthetic pairs, built with a fixed seed: a 2048 x 2048 image with about
2,000 objects and a 64 x 512 x 512 volume, each against a perturbed copy
(shifted, eroded/dilated, objects dropped, added, merged and split, ids
shuffled), the kind of errors a segmenter makes. Each
function is timed on the same pair (best of several runs, after a warm-up that
also compiles StarDist's numba kernel); the counts are asserted equal.

Run: ``.venv/bin/python bench/bench_metrics.py`` (about a minute on 2 cores).
The last line is the headline: the smaller of the 2D and 3D speedups over Cellpose.
"""

from __future__ import annotations

import sys
import time

import numpy as np

THRESHOLDS = [0.5, 0.75, 0.9]


def draw_objects(shape, n_objects, radius_range, rng):
    """Random balls/disks (later ones overwrite earlier ones), ids 1..n; uint32."""
    labels = np.zeros(shape, np.uint32)
    ndim = len(shape)
    centers = np.column_stack([rng.uniform(0, s, n_objects) for s in shape])
    radii = rng.uniform(*radius_range, size=(n_objects, ndim))
    if ndim == 3:
        radii[:, 0] /= 3  # anisotropic voxels: fewer planes per object
    for i, (c, r) in enumerate(zip(centers, radii), start=1):
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        inside = sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(grids, c, r)) <= 1
        view = labels[tuple(slice(a, b) for a, b in zip(lo, hi))]
        view[inside] = i
    return labels


def perturb(labels, rng):
    """A prediction-like copy: shift, erode/dilate, drop, add, merge, split, permute ids."""
    from scipy import ndimage as ndi
    from skimage.segmentation import expand_labels

    pred = np.roll(labels, shift=tuple(int(s) for s in rng.integers(-1, 2, labels.ndim)),
                   axis=tuple(range(labels.ndim))).copy()
    ids = np.unique(pred)
    ids = ids[ids > 0]
    # dilate every object by one pixel (where free), then erode a random third back
    pred = expand_labels(pred, distance=1)
    eroded = ndi.grey_erosion(pred, size=3)
    chosen = np.isin(pred, rng.choice(ids, len(ids) // 3, replace=False))
    pred[chosen & (eroded != pred)] = 0
    # drop 5% of the objects
    pred[np.isin(pred, rng.choice(ids, len(ids) // 20, replace=False))] = 0
    # merge 3%: give each chosen object the id of the next one
    merge = rng.choice(ids[:-1], len(ids) // 33, replace=False)
    lut = np.arange(int(pred.max()) + 1, dtype=np.int64)
    lut[merge] = merge + 1
    pred = lut[pred]
    # split 3%: the half of the object above its centre row gets a new id
    big = int(pred.max()) + 1
    for k, i in enumerate(rng.choice(ids, len(ids) // 33, replace=False)):
        where = np.nonzero(pred == i)
        if len(where[0]) == 0:
            continue
        upper = where[0] < np.median(where[0])
        pred[tuple(w[upper] for w in where)] = big + k
    # add 5% spurious objects
    extra = draw_objects(labels.shape, len(ids) // 20, (3, 8), rng)
    pred = np.where((pred == 0) & (extra > 0), extra.astype(np.int64) + 10 * big, pred)
    # relabel 1..n in a shuffled order: ids unrelated to the true ones, but consecutive, as
    # Cellpose writes them (Cellpose's dense (max id + 1)^2 matrix would be unfair otherwise)
    uniq = np.unique(pred)
    new = np.zeros(len(uniq), np.int64)
    new[1:] = rng.permutation(len(uniq) - 1) + 1
    return new[np.searchsorted(uniq, pred)].astype(np.uint32)


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_pair(name, y_true, y_pred):
    from cellpose.metrics import average_precision
    from stardist.matching import matching

    from seglab.evaluate.metrics import match

    n_true = len(np.unique(y_true)) - 1
    n_pred = len(np.unique(y_pred)) - 1
    print(f"[{name}] shape {y_true.shape}, {n_true} true objects, {n_pred} predicted objects, thresholds {THRESHOLDS}")
    t_read, _ = best_time(lambda: (int(y_true.max()), int(y_pred.max())), 5)
    t_ours, ours = best_time(lambda: match(y_true, y_pred, THRESHOLDS), 7)
    t_cp, (ap, tp, fp, fn) = best_time(lambda: average_precision(y_true, y_pred, threshold=THRESHOLDS), 2)
    matching(y_true[:64, :64], y_pred[:64, :64], thresh=0.5)  # compile numba outside the timing
    t_sd, sd = best_time(lambda: matching(y_true, y_pred, thresh=THRESHOLDS), 2)

    assert np.array_equal(ours["tp"].to_numpy(), tp), (ours["tp"].tolist(), tp.tolist())
    assert np.array_equal(ours["fp"].to_numpy(), fp) and np.array_equal(ours["fn"].to_numpy(), fn)
    assert np.allclose(ours["ap"].to_numpy(), ap, rtol=1e-6)
    assert [s.tp for s in sd] == ours["tp"].tolist()
    assert np.allclose(ours["panoptic_quality"], [s.panoptic_quality for s in sd], rtol=1e-5)
    print(f"[{name}] tp {ours['tp'].tolist()}  ap {np.round(ours['ap'].to_numpy(), 4).tolist()}  (equal to cellpose and stardist)")
    print(f"[{name}] reading both arrays once (max): {t_read * 1e3:8.1f} ms")
    print(f"[{name}] cellpose.metrics.average_precision:  {t_cp * 1e3:8.1f} ms  (reference)")
    print(f"[{name}] stardist.matching.matching:          {t_sd * 1e3:8.1f} ms  (reference)")
    print(f"[{name}] seglab.evaluate.metrics.match:                {t_ours * 1e3:8.1f} ms")
    print(f"[{name}] speedup vs cellpose {t_cp / t_ours:.1f} x, vs stardist {t_sd / t_ours:.1f} x")
    return t_cp / t_ours


def main() -> int:
    rng = np.random.default_rng(20261126)
    t0 = time.perf_counter()
    y2 = draw_objects((2048, 2048), 2000, (10, 22), rng)
    p2 = perturb(y2, rng)
    y3 = draw_objects((64, 512, 512), 1500, (8, 16), rng)
    p3 = perturb(y3, rng)
    print(f"built the pairs in {time.perf_counter() - t0:.1f} s")
    s2 = bench_pair("2D 2048x2048", y2, p2)
    s3 = bench_pair("3D 64x512x512", y3, p3)
    print(f"RESULT metrics_speedup_vs_cellpose_2d {s2:.1f} x")
    print(f"RESULT metrics_speedup_vs_cellpose_3d {s3:.1f} x")
    print("headline: the smaller of the 2D and 3D speedups over cellpose.metrics.average_precision")
    print(f"RESULT metrics_speedup_vs_cellpose {min(s2, s3):.1f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
