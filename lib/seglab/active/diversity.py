"""Diversity and the choice of a batch: core-set, k-means clusters, random, and their weighted combination.

Features are the network's style vectors (one L2-normalised vector per tile,
:func:`seglab.segment.models.capture_styles`), compared by Euclidean distance.

- :func:`k_center_greedy`: the k-center greedy core-set (Sener and Savarese 2018): each pick is
  the tile farthest from its nearest labelled-or-already-picked tile. With nothing labelled the
  first pick is the tile nearest the mean of the pool.
- :func:`kmeans_clusters`: k-means (scikit-learn, seeded) with k = the batch size on the
  unlabelled tiles; a batch takes the tile nearest each centre first.
- random: a seeded uniform score per tile.

The weighted combination (:func:`select_batch`) picks the batch one tile at a time. At each pick
every candidate's score is

    sum over enabled strategies s of  weight_s * score_s

with the scores of the strategies each scaled to [0, 1] over the candidates:

- an uncertainty measure (entropy, confidence, margin, tta_mask, tta_flow, ensemble): its rank
  among the candidates, scaled to [0, 1] (ranks, because the measures have different units and
  spreads; the most uncertain tile is 1);
- ``coreset``: distance to the nearest labelled or already picked tile, divided by the largest such
  distance now (recomputed after each pick, as the greedy core-set does);
- ``kmeans``: 0 for a tile whose cluster already has a pick in this batch, else
  1 - 0.5 * (distance to its centre / the largest distance to a centre in that cluster), so the
  central tile of each uncovered cluster comes first;
- ``random``: the tile's seeded uniform draw.

A strategy with weight 0 is not computed. Ties go to the candidate first in a seeded random order.
With a single strategy enabled, the combination is that strategy: core-set alone is
:func:`k_center_greedy` (up to the order of ties), k-means alone picks the tile nearest each centre.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.active.uncertainty import MEASURES

DIVERSITY = ("coreset", "kmeans", "random")
STRATEGIES = (*MEASURES, *DIVERSITY)
CHUNK_ROWS = 4096   # rows of a distance block: 4096 x 15,000 float32 is 245 MB at most


def _min_dist(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Distance of each row of ``x`` (N, D) to its nearest row of ``centers`` (M, D); inf when M = 0."""
    out = np.full(len(x), np.inf, np.float64)
    if len(centers) == 0:
        return out
    c2 = (centers.astype(np.float64) ** 2).sum(1)
    for s in range(0, len(x), CHUNK_ROWS):
        xb = x[s:s + CHUNK_ROWS].astype(np.float64)
        d2 = (xb ** 2).sum(1)[:, None] + c2[None, :] - 2.0 * xb @ centers.T.astype(np.float64)
        out[s:s + CHUNK_ROWS] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return out


def _dist_to(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(((x.astype(np.float64) - c.astype(np.float64)) ** 2).sum(1), 0.0))


def k_center_greedy(features: np.ndarray, n: int, labelled: np.ndarray | None = None) -> list[int]:
    """Indices of ``n`` rows of ``features`` (N, D) picked by k-center greedy, in pick order.

    labelled : (M, D) features of the labelled tiles (the initial centres), or None / empty.
    Each pick is the row farthest from its nearest centre (ties: the lowest index), which then
    becomes a centre. With no labelled tiles the first pick is the row nearest the mean.
    """
    x = np.asarray(features, np.float64)
    if n > len(x):
        raise SeglabError(f"core-set: batch of {n} tiles from a pool of {len(x)}; lower the batch size")
    lab = np.zeros((0, x.shape[1])) if labelled is None or len(labelled) == 0 else np.asarray(labelled, np.float64)
    d = _min_dist(x, lab)
    picks: list[int] = []
    for _ in range(n):
        if np.isinf(d).all():
            i = int(np.argmin(_dist_to(x, x.mean(axis=0))))
        else:
            d_masked = d.copy()
            d_masked[picks] = -1.0
            i = int(np.argmax(d_masked))
        picks.append(i)
        d = np.minimum(d, _dist_to(x, x[i]))
    return picks


def kmeans_clusters(features: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of each row (N,), distance of each row to its centre (N,)) of k-means with ``k``
    clusters (scikit-learn, ``n_init=4``, ``random_state=seed``); k is capped at N."""
    from sklearn.cluster import KMeans

    x = np.asarray(features, np.float64)
    k = max(1, min(int(k), len(x)))
    km = KMeans(n_clusters=k, n_init=4, random_state=int(seed)).fit(x)
    return km.labels_.astype(int), _dist_to(x, km.cluster_centers_[km.labels_])


def rank_scale(values: np.ndarray) -> np.ndarray:
    """Ranks of ``values`` scaled to [0, 1] (the largest 1; ties share their mean rank; one value: 1)."""
    v = pd.Series(np.asarray(values, np.float64))
    if len(v) <= 1:
        return np.ones(len(v))
    r = v.rank(method="average").to_numpy()
    return (r - 1.0) / (len(v) - 1.0)


def check_weights(weights: Mapping[str, float], source: str = "weights") -> dict:
    """The enabled strategies of ``weights`` ({strategy: weight >= 0}); SeglabError naming ``source``
    for an unknown strategy, a negative weight, or all weights zero."""
    unknown = sorted(set(weights) - set(STRATEGIES))
    if unknown:
        raise SeglabError(f"{source}: unknown strategies {unknown}; use {', '.join(STRATEGIES)}")
    bad = {k: v for k, v in weights.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad:
        raise SeglabError(f"{source}: weights must be numbers >= 0 (got {bad})")
    enabled = {k: float(v) for k, v in weights.items() if v > 0}
    if not enabled:
        raise SeglabError(f"{source}: every weight is 0, so nothing decides which tiles to pick; give at least one "
                          f"strategy a weight > 0 (e.g. random: 1.0)")
    return enabled


def select_batch(scores: pd.DataFrame, features: np.ndarray | None, labelled_features: np.ndarray | None,
                 weights: Mapping[str, float], batch_size: int, seed: int, *,
                 source: str = "weights") -> pd.DataFrame:
    """Pick ``batch_size`` tiles by the weighted combination of the module docstring.

    scores : one row per candidate tile: tile_id and a column per uncertainty measure with a weight.
    features : (N, D) style vectors of the candidates (rows in ``scores`` order); needed for
        ``coreset`` and ``kmeans``. labelled_features : (M, D) of the labelled tiles (or None).
    weights : {strategy: weight}; see :func:`check_weights` (``source`` names the params key).

    Returns the picked tiles in pick order: pick (1..), tile_id, combined (score at its pick),
    and per enabled strategy ``w_<s>`` (its scaled score at the pick) and the raw columns of ``scores``.
    """
    enabled = check_weights(weights, source)
    n = len(scores)
    if batch_size < 1:
        raise SeglabError(f"batch_size={batch_size}: give at least 1")
    if batch_size > n:
        raise SeglabError(f"batch_size={batch_size} is larger than the unlabelled pool ({n} tiles); "
                          f"lower batch_size to at most {n} (or add tiles to the pool)")
    missing = [s for s in enabled if s in MEASURES and s not in scores.columns]
    if missing:
        raise SeglabError(f"{source}: strategies {missing} have weights but no scores were computed for them")
    rng = np.random.default_rng(int(seed))
    order = rng.permutation(n)           # tie-break: earlier in this order wins
    tie = np.empty(n)
    tie[order] = np.arange(n)[::-1] / max(n, 1) * 1e-9
    fixed = {s: rank_scale(scores[s].to_numpy()) for s in enabled if s in MEASURES}
    if "random" in enabled:
        fixed["random"] = rng.random(n)
    x = None
    if "coreset" in enabled or "kmeans" in enabled:
        if features is None or len(features) != n:
            raise SeglabError("core-set / k-means need one style vector per candidate tile")
        x = np.asarray(features, np.float64)
    if "coreset" in enabled:
        lab = np.zeros((0, x.shape[1])) if labelled_features is None or len(labelled_features) == 0 \
            else np.asarray(labelled_features, np.float64)
        dmin = _min_dist(x, lab)
    if "kmeans" in enabled:
        cluster, dc = kmeans_clusters(x, batch_size, seed)
        top = pd.Series(dc).groupby(cluster).transform("max").to_numpy()
        central = 1.0 - 0.5 * np.divide(dc, top, out=np.zeros_like(dc), where=top > 0)
        covered: set = set()
    taken = np.zeros(n, bool)
    rows = []
    for pick in range(1, batch_size + 1):
        parts = dict(fixed)
        if "coreset" in enabled:
            if np.isinf(dmin).all():   # nothing labelled yet: the tile nearest the mean first
                d0 = _dist_to(x, x.mean(axis=0))
                parts["coreset"] = 1.0 - d0 / d0.max() if d0.max() > 0 else np.ones(n)
            else:
                top_d = dmin[~taken].max()
                parts["coreset"] = dmin / top_d if top_d > 0 else np.zeros(n)
        if "kmeans" in enabled:
            parts["kmeans"] = np.where(np.isin(cluster, list(covered)), 0.0, central)
        combined = sum(enabled[s] * parts[s] for s in enabled) + tie
        combined = np.where(taken, -np.inf, combined)
        i = int(np.argmax(combined))
        taken[i] = True
        row = {"pick": pick, "tile_id": str(scores["tile_id"].iloc[i]), "combined": float(combined[i] - tie[i])}
        row.update({f"w_{s}": float(parts[s][i]) for s in enabled})
        row.update({c: scores[c].iloc[i] for c in scores.columns if c != "tile_id"})
        rows.append(row)
        if "coreset" in enabled:
            dmin = np.minimum(dmin, _dist_to(x, x[i]))
        if "kmeans" in enabled:
            covered.add(int(cluster[i]))
    return pd.DataFrame(rows)


def strategy_weights(strategy: str, combination: Mapping[str, float]) -> dict:
    """The weights of a named strategy: ``combined`` -> ``combination``; any other strategy of
    :data:`STRATEGIES` -> {strategy: 1.0}; ``tta`` is ``tta_mask``."""
    if strategy == "combined":
        return dict(combination)
    s = "tta_mask" if strategy == "tta" else strategy
    if s not in STRATEGIES:
        raise SeglabError(f"strategy {strategy!r}: use combined, tta or one of {', '.join(STRATEGIES)}")
    return {s: 1.0}


def measures_needed(weights: Mapping[str, float]) -> list[str]:
    """The uncertainty measures a selection with ``weights`` needs computed (weight > 0)."""
    return [m for m in MEASURES if weights.get(m, 0) > 0]

