"""Uncertainty of a cellpose-family network on each tile, from its outputs.

Every score is "higher = more uncertain = more worth annotating"; a certain prediction scores
lower than an uncertain one (tests/test_active_uncertainty.py builds both).

Pixel measures of the cell probability p = sigmoid(cellprob logits) (cellpose's ``cellprob``
output is a logit; its default ``cellprob_threshold`` 0 is p = 0.5). The two classes of each
pixel are cell (p) and background (1 - p):

- ``entropy``: binary entropy of p in bits, in [0, 1] (1 at p = 0.5, 0 at p = 0 or 1);
- ``confidence``: 1 - max(p, 1 - p), in [0, 0.5] (least-confidence);
- ``margin``: 1 - |p - (1 - p)| = 1 - |2p - 1|, in [0, 1] (a small margin between the two
  classes is a high score).

Aggregation per tile (:func:`aggregate`): ``region`` (the default) takes the mean over the
predicted foreground (p > 0.5) dilated by ``boundary_px`` px, i.e. the cells and the band around
their boundaries where the network hesitates; a tile without predicted foreground uses all its
pixels (an empty-looking tile is not certain because it is empty). ``topk`` takes the mean of the
``top_k_fraction`` highest pixels of the whole tile; ``mean`` all pixels.

Test-time augmentation (TTA): the tile is segmented under the views of :data:`VIEWS` (flips and
90-degree rotations; the first ``n_views``), each view's outputs brought back to the tile's frame
(flow vectors rotated with the pixels, :func:`inverse_flow`). ``tta_mask`` = 1 - mean over the
augmented views of :func:`mask_agreement` with the identity view's mask; ``tta_flow`` = the
region mean of the per-pixel variance across views of the flows (dY and dX summed; cellpose's flow
units squared). A TTA score costs ``n_views`` network passes.

Ensemble: ``ensemble`` = 1 - mean pairwise :func:`mask_agreement` of the members' masks
(checkpoints of other seeds or rounds); one pass per member.

Mask agreement of two label images (:func:`mask_agreement`): the instances matched at IoU >= 0.5
(the study's matching, :func:`seglab.evaluate.metrics.matched_pairs`), sum of their IoUs divided
by the mean instance count of the two; an instance without a partner counts as IoU 0. 1 for
equal masks, 0 for disjoint ones; two empty masks agree (1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings

PIXEL_MEASURES = ("entropy", "confidence", "margin")
MEASURES = (*PIXEL_MEASURES, "tta_mask", "tta_flow", "ensemble")
AGGREGATIONS = ("region", "topk", "mean")
# (k, flip): flip X first (if flip), then rotate counter-clockwise by k * 90 degrees (np.rot90)
VIEWS = ((0, False), (0, True), (2, True), (1, False), (2, False), (3, False), (1, True), (3, True))
VIEW_NAMES = ("identity", "flip_x", "flip_y", "rot90", "rot180", "rot270", "transpose", "antitranspose")


# --------------------------------------------------------------------------- pixel measures


def cell_probability(cellprob: np.ndarray) -> np.ndarray:
    """p = sigmoid(cellprob) of cellpose's cell-probability logits (same shape, float64, in [0, 1])."""
    from scipy.special import expit

    return expit(np.asarray(cellprob, np.float64))


def entropy_map(p: np.ndarray) -> np.ndarray:
    """Binary entropy of p in bits, in [0, 1] (0 * log 0 = 0)."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(q > 0, q * np.log2(q), 0.0))
    return np.clip(h, 0.0, 1.0)


def confidence_map(p: np.ndarray) -> np.ndarray:
    """1 - max(p, 1 - p): least-confidence, in [0, 0.5]."""
    p = np.asarray(p, np.float64)
    return 1.0 - np.maximum(p, 1.0 - p)


def margin_map(p: np.ndarray) -> np.ndarray:
    """1 - |2p - 1|: one minus the margin between the two classes, in [0, 1]."""
    return 1.0 - np.abs(2.0 * np.asarray(p, np.float64) - 1.0)


PIXEL_FUNCTIONS = {"entropy": entropy_map, "confidence": confidence_map, "margin": margin_map}


def region(p: np.ndarray, boundary_px: int = 2) -> np.ndarray | None:
    """The pixels a tile's score averages over: predicted foreground (p > 0.5) dilated by
    ``boundary_px`` px (bool (Y, X)); None when nothing is predicted."""
    from scipy import ndimage as ndi

    fg = np.asarray(p) > 0.5
    if not fg.any():
        return None
    return ndi.binary_dilation(fg, iterations=int(boundary_px)) if boundary_px > 0 else fg


def aggregate(values: np.ndarray, p: np.ndarray, how: str = "region", *, boundary_px: int = 2,
              top_k_fraction: float = 0.05) -> float:
    """One number per tile from a pixel map ``values`` (Y, X) and the cell probability ``p`` (Y, X).

    how : ``region`` (mean over :func:`region`, all pixels when it is empty), ``topk`` (mean of the
        ``top_k_fraction`` highest pixels, at least one), ``mean`` (all pixels).
    """
    v = np.asarray(values, np.float64)
    if how == "region":
        r = region(p, boundary_px)
        return float(v.mean() if r is None else v[r].mean())
    if how == "topk":
        if not 0 < top_k_fraction <= 1:
            raise SeglabError(f"top_k_fraction={top_k_fraction}: give a fraction in (0, 1]")
        k = max(1, int(round(top_k_fraction * v.size)))
        return float(np.sort(v, axis=None)[-k:].mean())
    if how == "mean":
        return float(v.mean())
    raise SeglabError(f"aggregation {how!r}: use one of {', '.join(AGGREGATIONS)}")


def pixel_scores(output: dict, how: str = "region", **options) -> dict:
    """{entropy, confidence, margin} of one tile's outputs (``cellprob`` logits (Y, X)), aggregated
    by :func:`aggregate` (``how``, ``boundary_px``, ``top_k_fraction``)."""
    p = cell_probability(output["cellprob"])
    return {name: aggregate(f(p), p, how, **options) for name, f in PIXEL_FUNCTIONS.items()}


# --------------------------------------------------------------------------- views (TTA)


def _view(view) -> tuple[int, bool]:
    k, flip = view
    return int(k) % 4, bool(flip)


def transform_image(x: np.ndarray, view) -> np.ndarray:
    """``x`` (..., Y, X) seen under ``view`` = (k, flip): flip X when ``flip``, then np.rot90 by k."""
    k, flip = _view(view)
    y = x[..., ::-1] if flip else x
    return np.ascontiguousarray(np.rot90(y, k, axes=(-2, -1)))


def inverse_image(x: np.ndarray, view) -> np.ndarray:
    """The inverse of :func:`transform_image`."""
    k, flip = _view(view)
    y = np.rot90(x, -k, axes=(-2, -1))
    return np.ascontiguousarray(y[..., ::-1] if flip else y)


def _rot_vectors(dP: np.ndarray, k: int) -> np.ndarray:
    # np.rot90 by one step moves the pixel at (y, x) to (W-1-x, y): a vector (vy, vx) becomes (-vx, vy)
    vy, vx = dP[0], dP[1]
    for _ in range(k % 4):
        vy, vx = -vx, vy
    return np.stack([vy, vx])


def transform_flow(dP: np.ndarray, view) -> np.ndarray:
    """A flow field ``dP`` (2, Y, X) = (dY, dX) seen under ``view``: pixels moved and vectors turned."""
    k, flip = _view(view)
    d = np.asarray(dP)
    if flip:
        d = np.stack([d[0], -d[1]])[..., ::-1]
    return np.ascontiguousarray(_rot_vectors(np.rot90(d, k, axes=(-2, -1)), k))


def inverse_flow(dP: np.ndarray, view) -> np.ndarray:
    """The inverse of :func:`transform_flow` (a view's flows back in the tile's frame)."""
    k, flip = _view(view)
    d = _rot_vectors(np.rot90(np.asarray(dP), -k, axes=(-2, -1)), -k)
    if flip:
        d = np.stack([d[0], -d[1]])[..., ::-1]
    return np.ascontiguousarray(d)


def mask_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Instance agreement of two label images: sum of the IoUs of the pairs matched at IoU >= 0.5
    over the mean instance count of the two (1 equal, 0 disjoint; two empty masks: 1)."""
    from seglab.evaluate import metrics

    pairs = metrics.matched_pairs(np.asarray(a), np.asarray(b), threshold=0.5)
    n = (len(np.setdiff1d(np.unique(a), [0])) + len(np.setdiff1d(np.unique(b), [0]))) / 2.0
    return 1.0 if n == 0 else float(pairs["iou"].sum() / n)


def mean_pairwise_agreement(masks: Sequence[np.ndarray]) -> float:
    """Mean :func:`mask_agreement` over every pair of ``masks`` (at least two)."""
    if len(masks) < 2:
        raise SeglabError(f"ensemble disagreement needs at least two members' masks (have {len(masks)})")
    vals = [mask_agreement(masks[i], masks[j]) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    return float(np.mean(vals))


def ensemble_disagreement(masks: Sequence[np.ndarray]) -> float:
    """1 - :func:`mean_pairwise_agreement` of the members' masks of one tile, in [0, 1]."""
    return 1.0 - mean_pairwise_agreement(masks)


def tta_scores(views_outputs: Sequence[tuple[np.ndarray, dict]], how: str = "region", **options) -> dict:
    """{tta_mask, tta_flow} from (mask, outputs) per view, all in the tile's frame, the identity first
    (:func:`segment_views`)."""
    if len(views_outputs) < 2:
        raise SeglabError(f"TTA needs at least two views (have {len(views_outputs)}); set tta_views >= 2")
    ref_mask = views_outputs[0][0]
    agree = [mask_agreement(ref_mask, m) for m, _ in views_outputs[1:]]
    flows = np.stack([np.asarray(o["dP"], np.float64) for _, o in views_outputs])   # (V, 2, Y, X)
    var = flows.var(axis=0).sum(axis=0)
    p = cell_probability(views_outputs[0][1]["cellprob"])
    return {"tta_mask": 1.0 - float(np.mean(agree)), "tta_flow": aggregate(var, p, how, **options)}


def segment_views(model, image: np.ndarray, mask: MaskSettings, n_views: int) -> list[tuple[np.ndarray, dict]]:
    """(mask, outputs) of ``image`` (C, Y, X) under the first ``n_views`` of :data:`VIEWS`, brought
    back to the tile's frame (cellprob and masks moved back, flows moved and turned back)."""
    if not 1 <= n_views <= len(VIEWS):
        raise SeglabError(f"tta_views={n_views}: give 1 to {len(VIEWS)} views")
    out = []
    for view in VIEWS[:n_views]:
        m, o = model.segment(transform_image(np.asarray(image), view), mask, return_outputs=True)
        out.append((inverse_image(m, view), {**o, "dP": inverse_flow(o["dP"], view),
                                             "cellprob": inverse_image(o["cellprob"], view)}))
    return out


# --------------------------------------------------------------------------- scoring a pool


@dataclass
class Scored:
    """The scores of a pool of tiles under one model.

    table : one row per tile: tile_id, n_pred (objects predicted), then one column per measure asked.
    styles : (N, S) float32 L2-normalised style vectors, rows in ``table`` order.
    masks : {tile_id: (Y, X) predicted labels of the model (identity view)}.
    seconds : {"forward": s of the plain passes, "tta": s of the extra views, "ensemble": s of the
        other members' passes, "pixel": s of the pixel measures}.
    """

    table: pd.DataFrame
    styles: np.ndarray
    masks: dict
    seconds: dict = field(default_factory=dict)


def score_pool(model, images: Sequence[np.ndarray], ids: Sequence[str], mask: MaskSettings, *,
               measures: Sequence[str] = PIXEL_MEASURES, tta_views: int = 4, ensemble: Sequence = (),
               how: str = "region", boundary_px: int = 2, top_k_fraction: float = 0.05) -> Scored:
    """Score every tile of a pool: one pass of ``model`` per tile (masks, outputs, style vector), the
    pixel measures from its outputs, TTA views and the ensemble's passes only when asked.

    images : (C, Y, X) tiles; ids : their tile ids.
    measures : a subset of :data:`MEASURES`.
    ensemble : the other members (loaded :class:`~seglab.segment.models.Model`); ``ensemble`` is
        1 - mean pairwise agreement of ``model`` and these.
    how, boundary_px, top_k_fraction : :func:`aggregate`.
    """
    import time

    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise SeglabError(f"uncertainty measures {unknown} unknown; use {', '.join(MEASURES)}")
    if "ensemble" in measures and not ensemble:
        raise SeglabError("the ensemble measure needs at least one other member (checkpoint)")
    opts = dict(how=how, boundary_px=boundary_px, top_k_fraction=top_k_fraction)
    rows, styles, masks = [], [], {}
    secs = {"forward": 0.0, "pixel": 0.0, "tta": 0.0, "ensemble": 0.0}
    for tile_id, image in zip(ids, images, strict=True):
        t0 = time.perf_counter()
        m, out = model.segment(image, mask, return_outputs=True, return_styles=True)
        t1 = time.perf_counter()
        row = {"tile_id": str(tile_id), "n_pred": int(len(np.setdiff1d(np.unique(m), [0])))}
        if any(x in measures for x in PIXEL_MEASURES):
            row.update({k: v for k, v in pixel_scores(out, **opts).items() if k in measures})
        t2 = time.perf_counter()
        if "tta_mask" in measures or "tta_flow" in measures:
            views = [(m, out)] + segment_views(model, image, mask, tta_views)[1:]
            row.update({k: v for k, v in tta_scores(views, **opts).items() if k in measures})
        t3 = time.perf_counter()
        if "ensemble" in measures:
            row["ensemble"] = ensemble_disagreement([m] + [e.segment(image, mask) for e in ensemble])
        t4 = time.perf_counter()
        secs["forward"] += t1 - t0
        secs["pixel"] += t2 - t1
        secs["tta"] += t3 - t2
        secs["ensemble"] += t4 - t3
        rows.append(row)
        styles.append(out["style"])
        masks[str(tile_id)] = m
    cols = ["tile_id", "n_pred", *[x for x in MEASURES if x in measures]]
    return Scored(table=pd.DataFrame(rows, columns=cols), styles=np.stack(styles) if styles else np.zeros((0, 0)),
                  masks=masks, seconds={k: round(v, 3) for k, v in secs.items()})
