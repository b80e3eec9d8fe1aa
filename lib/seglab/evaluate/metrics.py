"""Instance matching and segmentation metrics, identical to Cellpose's and StarDist's, and faster.

Everything the compendium claims rests on these numbers. :func:`match` gives,
for one pair of label images, exactly the true positives, false positives and
false negatives of ``cellpose.metrics.average_precision`` and the precision,
recall, F1, mean matched IoU, mean true score and panoptic quality of
``stardist.matching.matching`` (tests/test_metrics.py checks both on random,
constructed, empty, 3D and real DSB2018 masks), from one pass over the pixels.

How it works (and why it is fast)
---------------------------------
1. One pass over the pixels finds the *runs*: stretches of consecutive pixels
   (in memory order) whose (true id, predicted id) pair does not change. Label
   images are spatially coherent, so a 2048 x 2048 image with 2,000 objects has
   a few hundred thousand runs instead of four million pixels; everything after
   this works on runs only.
2. Ids are relabelled with ``np.unique`` on the runs (any positive ids, not
   assumed consecutive, any integer dtype, up to uint64), the object areas and
   the intersections of overlapping (true, pred) pairs are run-length sums
   (``np.bincount``). The IoU is computed only for pairs that overlap (sparse);
   Cellpose builds a dense ``(max id + 1)^2`` matrix instead.
3. Matching at each threshold is optimal with the same objective as both
   references: the largest number of pairs with IoU >= threshold, ties broken
   by the largest total IoU (``scipy.optimize.linear_sum_assignment`` on the
   cost ``-(iou >= t) - iou / (2 n)``). Pairs that do not overlap never change
   that optimum, so the problem splits into the connected components of the
   overlap graph: where no object has two partners at or above the threshold
   (always the case for thresholds above 0.5, since an object can have IoU
   > 0.5 with at most one other) the matching is those pairs, and only the
   components with a conflict are solved with ``linear_sum_assignment``.

Definitions, edge cases and where the references differ
--------------------------------------------------------
- ``n_true``/``n_pred``: the number of distinct positive ids. Cellpose counts
  ``len(np.unique(y)) - 1``, which undercounts by one when no pixel is 0
  (an image entirely covered by objects); there we agree with StarDist.
- ``tp``: matched pairs with IoU >= threshold; ``fp = n_pred - tp``;
  ``fn = n_true - tp``. The IoU is computed in float64 exactly as Cellpose does
  (``intersection / (area_true + area_pred - intersection)``), so ``tp`` equals
  Cellpose's, ties included (IoU 90/100 matches at threshold 0.9). StarDist
  compares IoU and threshold in float32, so it differs only when a threshold
  lies within float32 precision (about 1e-7) of an IoU without equalling it
  (e.g. 0.9 + 1e-9 matches 90/100 there, not here nor in Cellpose).
- ``precision = tp / n_pred``, ``recall = tp / n_true``,
  ``f1 = 2 tp / (n_true + n_pred)``, ``ap = tp / (tp + fp + fn)`` (what Cellpose
  and the Data Science Bowl call AP; StarDist calls it accuracy). Like StarDist,
  each ratio is 0 when ``tp`` is 0, so an empty prediction scores 0 and no
  ratio is ever NaN. Both images empty: Cellpose's ap is NaN (0/0); we give 0
  like StarDist's accuracy, and flag the case (``n_true == n_pred == 0``) so
  that :func:`evaluate` can leave such images out of its mean over images
  rather than penalise a correct empty prediction. One image empty: every
  ratio is 0, as in both references.
- ``mean_matched_iou``: the mean IoU of the matched pairs (StarDist's
  ``mean_matched_score``), 0 when ``tp`` is 0. ``mean_true_score``: the summed
  IoU of the matched pairs divided by ``n_true`` (0 when ``n_true`` is 0).
  ``panoptic_quality``: summed IoU / (tp + fp/2 + fn/2) (Kirillov et al. 2019),
  0 when both images are empty. These are float64 here and float32 in StarDist
  (agreement to about 1e-6).
- Foreground pixel IoU and Dice (:func:`foreground_iou_dice`) are NaN when
  both images have no foreground pixel (0/0; there is no reference value).

Inputs
------
Label images are numpy arrays, 2D (Y, X) or 3D (Z, Y, X), of any integer dtype,
0 = background, any positive ids. Anything else (shapes that differ, float or
boolean arrays, negative ids, NaN, lists) raises :class:`MetricsInputError`, a
:class:`seglab.SeglabError` and ``ValueError`` that names the argument and the fix.

Examples
--------
>>> import numpy as np
>>> from seglab.evaluate.metrics import match
>>> y_true = np.zeros((100, 100), np.uint16)
>>> y_true[10:20, 10:20] = 1
>>> y_pred = np.roll(y_true, 5, axis=0)          # IoU = 50 / 150 = 1/3
>>> match(y_true, y_pred, thresholds=(0.3, 0.5))[["threshold", "tp", "fp", "fn", "ap"]]
   threshold  tp  fp  fn   ap
0        0.3   1   0   0  1.0
1        0.5   0   1   1  0.0
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError

DEFAULT_THRESHOLDS = (0.5, 0.75, 0.9)

# The columns of match(), in order; evaluate() adds image (and group columns) in front.
MATCH_COLUMNS = [
    "threshold", "n_true", "n_pred", "tp", "fp", "fn",
    "precision", "recall", "f1", "ap",
    "mean_matched_iou", "mean_true_score", "panoptic_quality",
]
COUNT_COLUMNS = ["n_true", "n_pred", "tp", "fp", "fn"]
RATIO_COLUMNS = ["precision", "recall", "f1", "ap", "mean_matched_iou", "mean_true_score", "panoptic_quality"]


class MetricsInputError(SeglabError, ValueError):
    """Bad input to the metrics: the message names the argument and the fix."""


# --------------------------------------------------------------------------- checks

def check_labels(y: Any, name: str = "labels") -> np.ndarray:
    """Return ``y`` if it is a valid label image, else raise :class:`MetricsInputError`.

    Valid: a numpy array, 2D or 3D, integer dtype, no negative ids (0 = background).
    """
    if not isinstance(y, np.ndarray):
        raise MetricsInputError(
            f"{name} must be a numpy array of integer labels, got {type(y).__name__}; "
            f"convert it with np.asarray({name}) (read TIFF masks with tifffile.imread)")
    if y.ndim not in (2, 3):
        raise MetricsInputError(
            f"{name} must be a 2D (Y, X) or 3D (Z, Y, X) label image, got shape {y.shape}; "
            f"squeeze singleton axes or evaluate channels/planes one at a time")
    if y.dtype == bool:
        raise MetricsInputError(
            f"{name} is a boolean mask, not instance labels; label its connected objects first, "
            f"e.g. skimage.measure.label({name}), or use foreground_iou_dice for pixel scores")
    if not np.issubdtype(y.dtype, np.integer):
        has_nan = np.issubdtype(y.dtype, np.floating) and bool(np.isnan(y).any())
        why = " and contains NaN" if has_nan else ""
        raise MetricsInputError(
            f"{name} has dtype {y.dtype}{why}; label images must have an integer dtype "
            f"(0 = background, positive ids). If the values are whole numbers (a mask saved as float), "
            f"convert with {name}.astype(np.int32); NaN has no meaning as a label, set it to 0 first")
    if np.issubdtype(y.dtype, np.signedinteger) and y.size and y.min() < 0:
        raise MetricsInputError(
            f"{name} has negative ids (min {int(y.min())}); labels must be 0 (background) or positive. "
            f"Set ignored pixels to 0, or relabel with skimage.segmentation.relabel_sequential")
    return y


def check_thresholds(thresholds: Any, name: str = "thresholds") -> tuple[float, ...]:
    """IoU thresholds as a tuple of floats in (0, 1]; a single number is allowed."""
    values = np.atleast_1d(np.asarray(thresholds, dtype=object))
    out = []
    for v in values.ravel():
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise MetricsInputError(f"{name}: {v!r} is not a number; give IoU thresholds in (0, 1], e.g. 0.5 0.75 0.9") from None
        if not (0.0 < f <= 1.0):  # also rejects NaN
            raise MetricsInputError(
                f"{name}: {v!r} is outside (0, 1]; an IoU threshold of 0 would match objects that do not "
                f"overlap at all. Give thresholds in (0, 1], e.g. 0.5 0.75 0.9")
        out.append(f)
    if not out:
        raise MetricsInputError(f"{name} is empty; give at least one IoU threshold in (0, 1]")
    return tuple(out)


def _check_pair(y_true, y_pred) -> None:
    check_labels(y_true, "y_true")
    check_labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise MetricsInputError(
            f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}; they must be the same "
            f"image (check the file pairing, a resize of the prediction, or a channel/plane axis left in)")


# --------------------------------------------------------------------------- overlap table

@dataclass
class Overlap:
    """Sparse overlap of two label images (from one pass over the pixels).

    Attributes
    ----------
    true_ids, pred_ids : (n_true,), (n_pred,) arrays
        The positive ids present, sorted.
    true_area_px, pred_area_px : (n_true,), (n_pred,) int64 arrays
        Object areas (voxels in 3D).
    pair_true, pair_pred : (n_pairs,) int64 arrays
        Indices into ``true_ids``/``pred_ids`` of each overlapping pair.
    pair_intersection_px : (n_pairs,) int64 array
    pair_iou : (n_pairs,) float64 array
        ``intersection / (area_true + area_pred - intersection)``, computed as Cellpose does.
    foreground_true_px, foreground_pred_px, foreground_both_px : int
        Pixel counts of the foreground masks and of their intersection.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area_px: np.ndarray
    pred_area_px: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    pair_intersection_px: np.ndarray
    pair_iou: np.ndarray
    foreground_true_px: int
    foreground_pred_px: int
    foreground_both_px: int
    _components: tuple | None = field(default=None, repr=False)

    @property
    def n_true(self) -> int:
        return len(self.true_ids)

    @property
    def n_pred(self) -> int:
        return len(self.pred_ids)

    def table(self) -> pd.DataFrame:
        """One row per overlapping pair: true_id, pred_id, intersection_px, true_area_px, pred_area_px, iou."""
        return pd.DataFrame({
            "true_id": self.true_ids[self.pair_true],
            "pred_id": self.pred_ids[self.pair_pred],
            "intersection_px": self.pair_intersection_px,
            "true_area_px": self.true_area_px[self.pair_true],
            "pred_area_px": self.pred_area_px[self.pair_pred],
            "iou": self.pair_iou,
        })

    def components(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Connected components of the overlap graph: (label per true object, label per pred object, count)."""
        if self._components is None:
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            n = self.n_true + self.n_pred
            graph = coo_matrix((np.ones(len(self.pair_true), np.int8),
                                (self.pair_true, self.n_true + self.pair_pred)), shape=(n, n))
            count, labels = connected_components(graph, directed=False)
            self._components = (labels[: self.n_true], labels[self.n_true:], count)
        return self._components


def _relabel(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted positive ids, index of each value into them; -1 for 0).

    A lookup table when the largest id is small enough (linear time), else
    ``np.unique`` (a sort; handles ids up to the uint64 maximum).
    """
    top = int(values.max()) if len(values) else 0
    if top <= max(1 << 20, 8 * len(values)):
        present = np.zeros(top + 1, bool)
        present[values] = True
        present[0] = False
        ids = np.flatnonzero(present).astype(values.dtype)
        lut = np.cumsum(present, dtype=np.int64) - 1  # lut[0] == -1
        return ids, lut[values]
    positive = values != 0
    ids, inverse = np.unique(values[positive], return_inverse=True)
    index = np.full(len(values), -1, np.int64)
    index[positive] = inverse
    return ids, index


def overlap(y_true: np.ndarray, y_pred: np.ndarray, *, check: bool = True) -> Overlap:
    """The sparse overlap of two label images of the same shape, from one pass over the pixels.

    Parameters
    ----------
    y_true, y_pred : ndarray, (Y, X) or (Z, Y, X), integer
        Label images, 0 = background, any positive ids.
    check : bool
        Validate the inputs first (:class:`MetricsInputError` on bad input).

    Returns
    -------
    Overlap
        Object ids and areas, and intersection and IoU of every overlapping pair.
    """
    if check:
        _check_pair(y_true, y_pred)
    t = y_true.ravel()  # a view when contiguous; memory order does not matter for counting
    p = y_pred.ravel()
    n = t.size
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Overlap(empty, empty, empty, empty, empty, empty, empty, np.zeros(0), 0, 0, 0)
    # Run starts: pixels whose (true, pred) pair differs from the previous pixel's.
    change = np.empty(n, bool)
    change[0] = True
    np.not_equal(t[1:], t[:-1], out=change[1:])
    change[1:] |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=n).astype(np.float64)  # bincount weights; exact below 2**53
    true_ids, ti = _relabel(t[starts])
    pred_ids, pi = _relabel(p[starts])
    nt, np_ = len(true_ids), len(pred_ids)
    # Index 0 of each axis is background (-1 + 1), dropped afterwards.
    true_area = np.bincount(ti + 1, weights=lengths, minlength=nt + 1)[1:].astype(np.int64)
    pred_area = np.bincount(pi + 1, weights=lengths, minlength=np_ + 1)[1:].astype(np.int64)
    # Intersections: run-length sums per (true, pred) key over the runs inside both objects.
    width = max(np_, 1)
    both = (ti >= 0) & (pi >= 0)
    keys, kinv = np.unique(ti[both] * width + pi[both], return_inverse=True)
    inter = np.bincount(kinv, weights=lengths[both], minlength=len(keys)).astype(np.int64)
    pair_true, pair_pred = np.divmod(keys, width)
    pair_true = pair_true.astype(np.int64)
    pair_pred = pair_pred.astype(np.int64)
    union = true_area[pair_true] + pred_area[pair_pred] - inter
    iou = inter / union  # float64, the same operation as Cellpose's dense matrix
    return Overlap(
        true_ids=true_ids, pred_ids=pred_ids, true_area_px=true_area, pred_area_px=pred_area,
        pair_true=pair_true, pair_pred=pair_pred, pair_intersection_px=inter, pair_iou=iou,
        foreground_true_px=int(true_area.sum()), foreground_pred_px=int(pred_area.sum()),
        foreground_both_px=int(inter.sum()),
    )


# --------------------------------------------------------------------------- matching

def _match_threshold(ov: Overlap, th: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the pair arrays) of the optimally matched pairs with IoU >= th.

    The optimum of ``-(iou >= th) - iou / (2 n)`` over all assignments, as in
    Cellpose and StarDist: the most pairs at or above the threshold, then the
    largest total IoU (sub-threshold pairs included, as the references do).
    Returns (matched pair indices, their IoU).
    """
    iou = ov.pair_iou
    sel = iou >= th
    if not sel.any():
        return np.zeros(0, np.int64), np.zeros(0)
    deg_t = np.bincount(ov.pair_true[sel], minlength=ov.n_true)
    deg_p = np.bincount(ov.pair_pred[sel], minlength=ov.n_pred)
    if deg_t.max() <= 1 and deg_p.max() <= 1:
        # The thresholded pairs already form a matching: it is the only one of maximum size.
        idx = np.flatnonzero(sel)
        return idx, iou[idx]

    from scipy.optimize import linear_sum_assignment

    comp_t, comp_p, n_comp = ov.components()
    conflict = np.zeros(n_comp, bool)
    conflict[comp_t[deg_t > 1]] = True
    conflict[comp_p[deg_p > 1]] = True
    pair_comp = comp_t[ov.pair_true]
    in_conflict = conflict[pair_comp]
    matched = [np.flatnonzero(sel & ~in_conflict)]
    # Solve each component with a conflict on its own (zero-overlap pairs never change the optimum).
    cidx = np.flatnonzero(in_conflict)
    order = cidx[np.argsort(pair_comp[cidx], kind="stable")]
    bounds = np.flatnonzero(np.diff(pair_comp[order])) + 1
    for group in np.split(order, bounds):
        rows, r = np.unique(ov.pair_true[group], return_inverse=True)
        cols, c = np.unique(ov.pair_pred[group], return_inverse=True)
        m = np.zeros((len(rows), len(cols)))
        m[r, c] = iou[group]
        n_min = min(m.shape)
        costs = -(m >= th).astype(float) - m / (2 * n_min)
        ri, ci = linear_sum_assignment(costs)
        ok = m[ri, ci] >= th
        lookup = np.full(m.shape, -1, np.int64)
        lookup[r, c] = group
        matched.append(lookup[ri[ok], ci[ok]])
    idx = np.sort(np.concatenate(matched))
    return idx, iou[idx]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def scores(th: float, n_true: int, n_pred: int, tp: int, sum_iou: float) -> dict:
    """The scores of one threshold from counts: the one definition of AP (tp / (tp + fp + fn)),
    precision, recall, F1 and PQ here (fractions), used for images, pools and claims."""
    fp = n_pred - tp
    fn = n_true - tp
    # StarDist's convention: every ratio is 0 when tp is 0 (so never NaN)
    nz = tp > 0
    return {
        "threshold": th, "n_true": n_true, "n_pred": n_pred, "tp": tp, "fp": fp, "fn": fn,
        "precision": _ratio(tp, tp + fp) if nz else 0.0,
        "recall": _ratio(tp, tp + fn) if nz else 0.0,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn) if nz else 0.0,
        "ap": _ratio(tp, tp + fp + fn) if nz else 0.0,
        "mean_matched_iou": _ratio(sum_iou, tp),
        "mean_true_score": _ratio(sum_iou, n_true),
        "panoptic_quality": _ratio(sum_iou, tp + fp / 2 + fn / 2),
    }


def _match_rows(ov: Overlap, thresholds: Sequence[float]) -> list[dict]:
    rows = []
    for th in thresholds:
        _, matched_iou = _match_threshold(ov, th)
        rows.append(scores(th, ov.n_true, ov.n_pred, len(matched_iou), float(matched_iou.sum())))
    return rows


def pooled_match(y_trues: Sequence[np.ndarray], y_preds: Sequence[np.ndarray], threshold: float = 0.5) -> dict:
    """One IoU threshold over many image pairs, pooled: n_true, n_pred, tp, fp, fn summed over
    the images first, then precision, recall, f1, ap (and the IoU scores) from the sums, with
    :func:`match`'s conventions (every ratio 0 when tp is 0).

    The cheap form of ``evaluate(...).pooled`` for sweeps that score many settings.
    """
    (th,) = check_thresholds(threshold)
    n_true = n_pred = tp = 0
    sum_iou = 0.0
    for y_true, y_pred in zip(y_trues, y_preds, strict=True):
        ov = overlap(y_true, y_pred)
        _, matched_iou = _match_threshold(ov, th)
        n_true, n_pred, tp = n_true + ov.n_true, n_pred + ov.n_pred, tp + len(matched_iou)
        sum_iou += float(matched_iou.sum())
    return scores(th, n_true, n_pred, tp, sum_iou)


def match(y_true: np.ndarray, y_pred: np.ndarray, thresholds=DEFAULT_THRESHOLDS) -> pd.DataFrame:
    """Match the objects of two label images and score them at each IoU threshold.

    Parameters
    ----------
    y_true, y_pred : ndarray, (Y, X) or (Z, Y, X), integer dtype
        Ground truth and predicted instance labels of the same shape; 0 is
        background, ids are any positive integers (not assumed consecutive).
    thresholds : float or sequence of float, in (0, 1]
        IoU thresholds; a pair counts as a true positive when IoU >= threshold.

    Returns
    -------
    pandas.DataFrame
        One row per threshold, columns ``MATCH_COLUMNS``: threshold, n_true,
        n_pred, tp, fp, fn (counts of objects), precision, recall, f1, ap
        (= tp / (tp + fp + fn)), mean_matched_iou, mean_true_score,
        panoptic_quality. See the module docstring for the definitions and
        the empty cases; tp/fp/fn equal ``cellpose.metrics.average_precision``'s
        and the ratios equal ``stardist.matching.matching``'s.

    Raises
    ------
    MetricsInputError
        Inputs that are not integer label images of the same shape, or thresholds outside (0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> t = np.zeros((8, 8), np.uint8); t[:4, :4] = 3; t[4:, 4:] = 7
    >>> match(t, t, thresholds=0.5)[["tp", "fp", "fn", "ap"]].iloc[0].tolist()
    [2.0, 0.0, 0.0, 1.0]
    """
    ths = check_thresholds(thresholds)
    ov = overlap(y_true, y_pred)
    return pd.DataFrame(_match_rows(ov, ths), columns=MATCH_COLUMNS)


def matched_pairs(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    """The matched pairs at one IoU threshold: true_id, pred_id, intersection_px, areas and iou.

    The same matching as :func:`match` (so ``len(result) == tp``); ids are the
    original label values. Useful for per-object analysis (size of missed cells...).
    """
    (th,) = check_thresholds(threshold, "threshold")
    ov = overlap(y_true, y_pred)
    idx, _ = _match_threshold(ov, th)
    return ov.table().iloc[idx].reset_index(drop=True)


def foreground_iou_dice(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Pixel (foreground vs background) IoU and Dice of two label images.

    Parameters
    ----------
    y_true, y_pred : ndarray, (Y, X) or (Z, Y, X), integer or boolean dtype
        Label images (or foreground masks) of the same shape; every nonzero pixel is foreground.

    Returns
    -------
    dict
        ``foreground_iou`` = |T & P| / |T | P|, ``foreground_dice`` =
        2 |T & P| / (|T| + |P|), and the pixel counts ``foreground_true_px``,
        ``foreground_pred_px``, ``foreground_both_px``. Both scores are NaN when
        neither image has a foreground pixel (0/0, nothing to score).
    """
    # boolean foreground masks are fine here (no instances needed): check them as uint8
    _check_pair(*(y.view(np.uint8) if isinstance(y, np.ndarray) and y.dtype == bool else y for y in (y_true, y_pred)))
    ft = y_true != 0
    fp = y_pred != 0
    return _foreground(int(np.count_nonzero(ft)), int(np.count_nonzero(fp)), int(np.count_nonzero(ft & fp)))


def _foreground(n_t: int, n_p: int, n_both: int) -> dict:
    union = n_t + n_p - n_both
    return {
        "foreground_iou": n_both / union if union else float("nan"),
        "foreground_dice": 2 * n_both / (n_t + n_p) if (n_t + n_p) else float("nan"),
        "foreground_true_px": n_t, "foreground_pred_px": n_p, "foreground_both_px": n_both,
    }


# --------------------------------------------------------------------------- datasets

@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes
    ----------
    per_image : DataFrame
        One row per image x threshold: image, group columns, MATCH_COLUMNS,
        foreground_iou, foreground_dice, both_empty.
    pooled : DataFrame
        One row per threshold: tp, fp, fn, n_true, n_pred summed over all
        images, then the ratios computed from the sums (detection ratios only;
        mean_matched_iou, mean_true_score and panoptic_quality from the summed IoU).
    mean_over_images : DataFrame
        One row per threshold: each ratio averaged over images (and its
        standard deviation across images, ``<metric>_sd``), leaving out images
        where both masks are empty (nothing to score; counted in ``n_images_both_empty``).
    per_group : DataFrame
        For each group column and value, both summaries: ``summary`` is
        "pooled" or "mean_over_images". Empty when no groups were given.
    unpaired : dict
        Filled by the CLI: files with no partner, by side.
    """

    per_image: pd.DataFrame
    pooled: pd.DataFrame
    mean_over_images: pd.DataFrame
    per_group: pd.DataFrame
    group_columns: list[str]
    thresholds: tuple[float, ...]
    unpaired: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """A JSON-ready dict: thresholds, image count, pooled and mean_over_images per threshold, per group."""
        def records(df):
            return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in df.to_dict("records")]
        return {
            "thresholds": list(self.thresholds),
            "n_images": int(self.per_image["image"].nunique()) if len(self.per_image) else 0,
            "pooled": records(self.pooled),
            "mean_over_images": records(self.mean_over_images),
            "per_group": records(self.per_group),
            "group_columns": list(self.group_columns),
            "unpaired": self.unpaired,
            "definitions": {
                "pooled": "tp, fp, fn summed over images, then the ratios",
                "mean_over_images": "each image's ratio, averaged over images with at least one object "
                                    "in either mask (sd: standard deviation across those images)",
                "ap": "tp / (tp + fp + fn), as cellpose.metrics.average_precision",
            },
        }

    def text(self) -> str:
        """A short human-readable summary (a few lines per threshold)."""
        lines = [f"{self.summary()['n_images']} images evaluated"]
        if self.unpaired:
            for side, names in self.unpaired.items():
                if names:
                    lines.append(f"unpaired {side} files ({len(names)}): {', '.join(names[:10])}"
                                 + (" ..." if len(names) > 10 else ""))
        lines.append(f"{'threshold':>9}  {'tp':>7} {'fp':>7} {'fn':>7}  {'pooled_ap':>9} {'pooled_f1':>9}  "
                     f"{'mean_ap':>7} {'mean_f1':>7}")
        for p, m in zip(self.pooled.to_dict("records"), self.mean_over_images.to_dict("records")):
            lines.append(f"{p['threshold']:>9.3g}  {p['tp']:>7d} {p['fp']:>7d} {p['fn']:>7d}  {p['ap']:>9.4f} "
                         f"{p['f1']:>9.4f}  {m['ap']:>7.4f} {m['f1']:>7.4f}")
        lines.append("pooled: tp/fp/fn summed over images, then the ratio; mean: the ratio averaged over images")
        return "\n".join(lines) + "\n"


def _load(item, what: str) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise MetricsInputError(f"{what}: file {path} does not exist")
        import tifffile
        try:
            arr = tifffile.imread(path)
        except Exception as exc:  # a corrupt or non-TIFF file
            raise MetricsInputError(f"{what}: cannot read {path} as TIFF ({exc}); give label masks as .tif files") from exc
        return arr
    return item


def _pooled(per_image: pd.DataFrame, thresholds) -> pd.DataFrame:
    rows = []
    for th in thresholds:
        sub = per_image[per_image["threshold"] == th]
        n_true, n_pred, tp = (int(sub[c].sum()) for c in ("n_true", "n_pred", "tp"))
        sum_iou = float((sub["mean_matched_iou"] * sub["tp"]).sum())
        row = scores(th, n_true, n_pred, tp, sum_iou)
        row["n_images"] = int(len(sub))
        rows.append(row)
    return pd.DataFrame(rows, columns=MATCH_COLUMNS + ["n_images"])


def _mean(per_image: pd.DataFrame, thresholds) -> pd.DataFrame:
    rows = []
    for th in thresholds:
        sub = per_image[per_image["threshold"] == th]
        scored = sub[~sub["both_empty"]]
        row = {"threshold": th, "n_images": int(len(scored)), "n_images_both_empty": int(sub["both_empty"].sum())}
        for c in RATIO_COLUMNS + ["foreground_iou", "foreground_dice"]:
            vals = scored[c].to_numpy(float)
            vals = vals[np.isfinite(vals)]
            row[c] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{c}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate(pairs, groups=None, thresholds=DEFAULT_THRESHOLDS, *, progress: bool = False) -> Evaluation:
    """Score many image pairs: per image x threshold, pooled, mean over images, and per group.

    Parameters
    ----------
    pairs : mapping or sequence
        ``{image_name: (y_true, y_pred)}`` or a sequence of ``(y_true, y_pred)``
        (named "0", "1", ...) or of ``(image_name, y_true, y_pred)``. Each mask
        is a label array or a path to a TIFF (read when its turn comes, so
        thousands of tiles need not fit in memory).
    groups : None, mapping, or DataFrame
        Group membership per image: ``{image_name: {"marker": ..., "donor": ...}}``,
        ``{image_name: "CD3"}`` (one column named ``group``), or a DataFrame with
        an ``image`` column and one column per grouping. Every image must be covered.
    thresholds : float or sequence of float in (0, 1]

    Returns
    -------
    Evaluation
        ``per_image``, ``pooled``, ``mean_over_images``, ``per_group`` tables
        (see :class:`Evaluation`); ``.summary()`` for JSON, ``.text()`` for print.
    """
    ths = check_thresholds(thresholds)
    if isinstance(pairs, Mapping):
        items = [(str(k), *v) for k, v in pairs.items()]
    else:
        items = []
        for i, item in enumerate(pairs):
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise MetricsInputError(f"pairs[{i}] must be (y_true, y_pred) or (image_name, y_true, y_pred), got {type(item).__name__}")
            items.append((str(i), *item) if len(item) == 2 else (str(item[0]), item[1], item[2]))
    if not items:
        raise MetricsInputError("pairs is empty; give at least one (y_true, y_pred) pair")
    names = [it[0] for it in items]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise MetricsInputError(f"pairs: image names must be unique, repeated: {dup[:5]}")
    group_table = _group_table(groups, names)
    group_columns = [c for c in group_table.columns if c != "image"] if group_table is not None else []

    iterator = items
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(items, desc="evaluate", unit="image")
    rows = []
    for name, yt, yp in iterator:
        yt, yp = _load(yt, f"y_true of image {name}"), _load(yp, f"y_pred of image {name}")
        try:
            _check_pair(yt, yp)
        except MetricsInputError as exc:
            raise MetricsInputError(f"image {name}: {exc}") from None
        ov = overlap(yt, yp, check=False)
        fg = _foreground(ov.foreground_true_px, ov.foreground_pred_px, ov.foreground_both_px)
        for r in _match_rows(ov, ths):
            r.update(image=name, foreground_iou=fg["foreground_iou"], foreground_dice=fg["foreground_dice"],
                     both_empty=ov.n_true == 0 and ov.n_pred == 0)
            rows.append(r)
    per_image = pd.DataFrame(rows, columns=["image"] + MATCH_COLUMNS + ["foreground_iou", "foreground_dice", "both_empty"])
    if group_table is not None:
        per_image = group_table.merge(per_image, on="image", how="right")
        per_image = per_image[["image"] + group_columns + [c for c in per_image.columns if c not in group_columns and c != "image"]]

    per_group = []
    for col in group_columns:
        for value, sub in per_image.groupby(col, sort=True, dropna=False):
            for kind, table in (("pooled", _pooled(sub, ths)), ("mean_over_images", _mean(sub, ths))):
                table.insert(0, "summary", kind)
                table.insert(0, "group", value)
                table.insert(0, "group_by", col)
                per_group.append(table)
    per_group = pd.concat(per_group, ignore_index=True) if per_group else pd.DataFrame()
    return Evaluation(per_image=per_image, pooled=_pooled(per_image, ths), mean_over_images=_mean(per_image, ths),
                      per_group=per_group, group_columns=group_columns, thresholds=ths)


def _group_table(groups, names) -> pd.DataFrame | None:
    if groups is None:
        return None
    if isinstance(groups, pd.DataFrame):
        if "image" not in groups.columns:
            raise MetricsInputError("groups: the DataFrame needs an 'image' column naming each image, plus one column per grouping (e.g. marker, donor)")
        table = groups.copy()
        table["image"] = table["image"].astype(str)
    elif isinstance(groups, Mapping):
        recs = []
        for k, v in groups.items():
            recs.append({"image": str(k), **(dict(v) if isinstance(v, Mapping) else {"group": v})})
        table = pd.DataFrame(recs)
    else:
        raise MetricsInputError(f"groups must be a mapping image -> group(s) or a DataFrame with an 'image' column, got {type(groups).__name__}")
    if table["image"].duplicated().any():
        raise MetricsInputError(f"groups: images listed twice: {sorted(table.loc[table['image'].duplicated(), 'image'])[:5]}")
    missing = sorted(set(names) - set(table["image"]))
    if missing:
        raise MetricsInputError(f"groups: no group given for {len(missing)} image(s), e.g. {missing[:5]}; add them (every image needs its group)")
    return table[table["image"].isin(set(names))].reset_index(drop=True)
