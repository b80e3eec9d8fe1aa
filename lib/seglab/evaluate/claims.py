"""Claims with their uncertainty: paired, donor-clustered intervals and tests for the difference
between two segmentations of the same test tiles.

Why
---
A notebook that says "the fine-tuned model beats the baseline" because 0.82 > 0.77 has not said
how sure it is. The tiles of one donor share tissue, staining and imaging, so they are not
independent replicates: an interval that resamples tiles as if they were is too narrow when a
model's advantage differs from donor to donor. Here the donor (any cluster column) is the unit
of replication, and the two segmentations are compared *paired*: both segmentations of a tile
always travel together, so what the tiles have in common (their difficulty) cancels.

What is computed
----------------
Inputs: for each tile i, IoU threshold t and segmentation (A, B of the same truth) the object
counts tp, fp, fn, and the tile's donor. The metrics are the pooled ones of
:attr:`seglab.evaluate.metrics.Evaluation.pooled`: counts summed over tiles, then
``ap = tp / (tp + fp + fn)``, ``f1 = 2 tp / (2 tp + fp + fn)``, ``precision = tp / (tp + fp)``,
``recall = tp / (tp + fn)``, each 0 when tp is 0. The point estimates come from
``metrics.scores`` itself; :func:`metric_values` is its vectorised form for the resamples (the
tests check that both agree). Everything is a fraction in [0, 1]; differences are ``B - A`` in
[-1, 1] (0.05 is five AP points).

- **Interval** (:func:`bootstrap_differences`, :func:`interval`). The default, ``t``: estimate
  +- the t quantile with D - 1 degrees of freedom times the delete-one-donor jackknife standard
  error (the only one that held its level with few donors, see below). The others come from a
  paired two-stage bootstrap: stage 1 draws D donors with replacement; stage 2 draws, for each
  drawn donor, as many tiles as it has, with replacement, from its tiles. A resample is a vector
  of integer weights per tile (how often the tile was drawn), so all resamples are one matrix
  product ``weights @ counts`` (R x N times N x 6T); ``percentile`` and ``bca``
  (bias-corrected and accelerated, acceleration from the delete-one-donor jackknife).
- **Test** (:func:`donor_flip_test`): a paired permutation test at the level of donors. Under the
  null hypothesis that A and B are exchangeable, swapping which segmentation is called A within a
  donor does not change the distribution; a swap flips the sign of that donor's count difference.
  Two-sided p of the difference in pooled metric: exact over all 2^D swaps when D <= 16 (then
  ``p = #{|stat| >= |observed|} / 2^D``; the smallest p is 2 / 2^D, e.g. 0.031 with 6 donors and
  0.0625 with 5: with 5 donors or fewer no difference reaches p <= 0.05), otherwise a seeded
  Monte Carlo sample of swaps with ``p = (b + 1) / (m + 1)``. Claim flags follow the interval.

Which interval (calibration)
----------------------------
``bench/bench_claims_calibration.py`` simulates test sets where A and B come from the same model
(true difference 0; also one where B is truly better) and counts how often each 95% interval
covers the true difference, over 1000 test sets per cell (Monte Carlo SE about 0.007). With 5-6
donors the percentile interval of a donors-only bootstrap covers only 0.82-0.86 (it ignores that
the spread between 6 donors is estimated from 6 donors), and BCa does not fix that. Resampling
tiles within donors as well adds the within-donor variance a second time: with 6 donors x 4
tiles that happens to compensate (0.92-0.97), with 24 donors it overcovers (0.96-0.99), and with
one tile per donor (one marker's tiles) it changes nothing (0.82-0.84). The t interval over
donors (delete-one-donor jackknife SE, D - 1 degrees of freedom) covered 0.939-0.965 in every
design and scenario (two runs), so it is :data:`DEFAULT_INTERVAL` (it needs no resampling: the
same for every seed); the bootstrap intervals stay available (``interval_method``). Resampling
tiles and ignoring donors covers only 0.80-0.87 when a model's advantage varies by donor.

Claims
------
:func:`claim_keys` turns one row into summary keys: ``<name>``, ``<name>_ci_low``,
``<name>_ci_high``, ``<name>_p_value`` and a flag such as ``finetuned_generic_beats_baseline``
that is True only when the whole interval lies on the claimed side of 0 (:func:`claim_holds`).
The notebooks name their keys through :func:`claim_summary` (``<split>_<metric>_diff_<b>_vs_<a>``
beside the flag ``<b>_beats_<a>``, with ``_n_donors`` and a ``_note`` when 0-2 donors leave no or a
very wide interval), which :func:`find_claims` reads back for the status page;
:func:`compare_pairs` with ``missing="nan"`` gives a model without tiles NaN rows (no claim) instead
of an error, and :func:`interval_label` says in words which interval a table holds.
:func:`grid_range` is the claim of E4 about one model: the range of a metric across the values
of one parameter, with an interval and a permutation test of "the parameter changes nothing".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.evaluate import metrics

METRICS = ("ap", "f1", "precision", "recall")
COUNTS = ("tp", "fp", "fn")
INTERVALS = ("percentile", "bca", "t")
DEFAULT_INTERVAL = "t"   # the one that held 95% in bench/bench_claims_calibration.py
EXACT_MAX_DONORS = 16
TABLE_COLUMNS = ["a", "b", "metric", "threshold", "estimate_a", "estimate_b", "difference", "ci_low", "ci_high",
                 "ci_level", "p_value", "n_donors", "n_tiles", "n_resamples", "n_permutations", "method"]
# rows of sign flips (or of within-donor permutations) evaluated at once: bounds memory at 2^16 x 6T floats
_BLOCK = 1 << 14


class ClaimsInputError(SeglabError, ValueError):
    """Bad input to a comparison: the message names the argument and the fix."""


# --------------------------------------------------------------------------- metrics of summed counts


def metric_values(sums: np.ndarray) -> np.ndarray:
    """ap, f1, precision, recall (:data:`METRICS` order) of summed counts, vectorised.

    Parameters
    ----------
    sums : array (..., 3) of tp, fp, fn (object counts summed over tiles; floats allowed).

    Returns
    -------
    array (..., 4) of fractions; every ratio is 0 where tp is 0, as in ``metrics.scores``.
    """
    sums = np.asarray(sums, dtype=float)
    tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
    scored = tp > 0

    def ratio(num, den):
        return np.where(scored, num / np.where(scored, den, 1.0), 0.0)

    return np.stack([ratio(tp, tp + fp + fn), ratio(2 * tp, 2 * tp + fp + fn), ratio(tp, tp + fp),
                     ratio(tp, tp + fn)], axis=-1)


def pooled_estimates(counts: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """(T, 4) pooled ap, f1, precision, recall of per-tile counts (N, T, 3), through the library's
    own definition (``metrics.scores``, what ``Evaluation.pooled`` reports)."""
    sums = np.asarray(counts, dtype=float).sum(axis=0)
    out = np.empty((len(thresholds), len(METRICS)))
    for j, th in enumerate(thresholds):
        tp, fp, fn = (float(v) for v in sums[j])
        row = metrics.scores(float(th), tp + fn, tp + fp, tp, 0.0)
        out[j] = [row[m] for m in METRICS]
    return out


# --------------------------------------------------------------------------- inputs


def _generator(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _codes(clusters, n: int) -> tuple[np.ndarray, list]:
    """Cluster codes (N,) 0..D-1 (sorted labels) and the labels."""
    clusters = np.asarray(clusters)
    if clusters.shape != (n,):
        raise ClaimsInputError(f"clusters has shape {clusters.shape}; give one donor (cluster) per tile, {n} in all")
    codes, labels = pd.factorize(pd.Series(clusters), sort=True)
    if (codes < 0).any():
        raise ClaimsInputError("clusters has missing values; every tile needs its donor")
    return codes.astype(np.int64), list(labels)


def _check_counts(counts_a, counts_b, clusters, thresholds=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Validated float arrays (N, T, 3), cluster codes (N,) 0..D-1 and the cluster labels."""
    ca, cb = (np.asarray(c, dtype=float) for c in (counts_a, counts_b))
    if ca.ndim != 3 or ca.shape[2] != 3 or ca.shape != cb.shape:
        raise ClaimsInputError(f"counts_a {ca.shape} and counts_b {cb.shape} must both be (tiles, thresholds, 3) "
                               f"arrays of tp, fp, fn for the same tiles and IoU thresholds")
    if ca.shape[0] == 0:
        raise ClaimsInputError("no tiles to compare; give the per-tile counts of at least one tile")
    thresholds = list(range(ca.shape[1])) if thresholds is None else list(thresholds)
    if len(thresholds) != ca.shape[1]:
        raise ClaimsInputError(f"{len(thresholds)} thresholds for {ca.shape[1]} threshold columns of the counts")
    for name, c in (("counts_a", ca), ("counts_b", cb)):
        if not np.isfinite(c).all() or (c < 0).any():
            raise ClaimsInputError(f"{name} has negative or non-finite counts; tp, fp, fn are object counts >= 0")
    if not np.allclose(ca[..., 0] + ca[..., 2], cb[..., 0] + cb[..., 2]):
        bad = np.argwhere(~np.isclose(ca[..., 0] + ca[..., 2], cb[..., 0] + cb[..., 2]))[0]
        raise ClaimsInputError(f"tile {bad[0]}, threshold {thresholds[bad[1]]}: tp + fn (true objects) differs "
                               f"between A and B, so they were not scored against the same truth; pair the "
                               f"tables by tile (check the tile order or a subset taken on one side only)")
    codes, labels = _codes(clusters, ca.shape[0])
    return ca, cb, codes, labels


@dataclass
class PairedCounts:
    """Two segmentations' per-tile counts, aligned.

    items : (N,) tile names; clusters : (N,) donor of each tile; thresholds : (T,) IoU thresholds;
    counts_a, counts_b : (N, T, 3) float arrays of tp, fp, fn.
    """

    items: np.ndarray
    clusters: np.ndarray
    thresholds: tuple[float, ...]
    counts_a: np.ndarray
    counts_b: np.ndarray


def _counts_table(per_image: pd.DataFrame, item: str, cluster: str, thresholds, name: str):
    """(items, clusters, thresholds, counts (N, T, 3)) of one per-tile table."""
    need = [item, cluster, "threshold", *COUNTS]
    missing = [c for c in need if c not in per_image.columns]
    if missing:
        raise ClaimsInputError(f"{name} lacks columns {missing}; pass Evaluation.per_image rows "
                               f"(image, donor, threshold, tp, fp, fn)")
    t = per_image[need].copy()
    t["threshold"] = t["threshold"].astype(float).round(9)
    if thresholds is not None:
        wanted = metrics.check_thresholds(thresholds)
        t = t[t["threshold"].isin([round(w, 9) for w in wanted])]
    if t.empty:
        raise ClaimsInputError(f"{name} has no rows at IoU thresholds {thresholds}")
    if t.duplicated([item, "threshold"]).any():
        raise ClaimsInputError(f"{name} has several rows for one tile and threshold; filter it to one model "
                               f"(e.g. per_image[per_image['model'] == ...]) first")
    if (t.groupby(item)[cluster].nunique(dropna=False) > 1).any():
        raise ClaimsInputError(f"{name}: a tile has more than one {cluster}")
    wide = t.pivot(index=item, columns="threshold", values=list(COUNTS)).sort_index()
    if wide.isna().any().any():
        raise ClaimsInputError(f"{name}: some tiles lack a row at some threshold; score every tile at every threshold")
    ths = tuple(float(v) for v in sorted(t["threshold"].unique()))
    counts = np.stack([wide[c][list(ths)].to_numpy(float) for c in COUNTS], axis=-1)
    clusters = t.groupby(item)[cluster].first().reindex(wide.index).to_numpy()
    return wide.index.to_numpy(), clusters, ths, counts


def paired_counts(per_image_a: pd.DataFrame, per_image_b: pd.DataFrame, *, cluster_column: str = "donor",
                  item_column: str = "image", thresholds=None) -> PairedCounts:
    """Align two per-tile tables (``Evaluation.per_image`` rows of one model each) by tile.

    Both must cover the same tiles at the same IoU thresholds (``thresholds``: keep only these)
    with the same donor per tile; raises :class:`ClaimsInputError` naming what differs.
    """
    ia, ka, ta, ca = _counts_table(per_image_a, item_column, cluster_column, thresholds, "per_image_a")
    ib, kb, tb, cb = _counts_table(per_image_b, item_column, cluster_column, thresholds, "per_image_b")
    if ta != tb:
        raise ClaimsInputError(f"IoU thresholds differ: A has {list(ta)}, B has {list(tb)}; pass thresholds=")
    if len(ia) != len(ib) or (ia != ib).any():
        only_a, only_b = sorted(set(ia) - set(ib)), sorted(set(ib) - set(ia))
        raise ClaimsInputError(f"the tables cover different tiles (only in A: {only_a[:3]}, only in B: {only_b[:3]}); "
                               f"a paired comparison needs both segmentations of the same tiles")
    if (pd.Series(ka).astype(str).to_numpy() != pd.Series(kb).astype(str).to_numpy()).any():
        raise ClaimsInputError(f"the {cluster_column} of some tiles differs between the two tables")
    return PairedCounts(items=ia, clusters=ka, thresholds=ta, counts_a=ca, counts_b=cb)


# --------------------------------------------------------------------------- bootstrap


def _counts_of_draws(draws: np.ndarray, rows: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """(n_rows, n_cols) how often each column index appears in ``draws`` per row (``rows``)."""
    return np.bincount(rows * n_cols + draws, minlength=n_rows * n_cols).reshape(n_rows, n_cols)


def _weights_block(codes: np.ndarray, n_resamples: int, rng: np.random.Generator, cluster: bool,
                   resample_tiles: bool) -> np.ndarray:
    n = len(codes)
    if not cluster:
        draws = rng.integers(0, n, (n_resamples, n))
        return _counts_of_draws(draws.ravel(), np.repeat(np.arange(n_resamples), n), n_resamples, n)
    sizes = np.bincount(codes)
    n_donors = len(sizes)
    picked = rng.integers(0, n_donors, (n_resamples, n_donors))
    copies = _counts_of_draws(picked.ravel(), np.repeat(np.arange(n_resamples), n_donors), n_resamples, n_donors)
    if not resample_tiles:
        return copies[:, codes]
    # each of the m copies of donor d draws n_d of its tiles: m * n_d uniform draws among them
    cell = np.repeat(np.arange(n_resamples * n_donors), (copies * sizes).ravel())
    donor = cell % n_donors
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    tiles = order[starts[donor] + (rng.random(len(cell)) * sizes[donor]).astype(np.int64)]
    return _counts_of_draws(tiles, cell // n_donors, n_resamples, n)


def bootstrap_weights(codes: np.ndarray, n_resamples: int, rng: np.random.Generator, *, cluster: bool = True,
                      resample_tiles: bool = True) -> np.ndarray:
    """(R, N) integer weights: how often each tile is drawn in each resample.

    ``codes``: (N,) donor of each tile, 0..D-1, every code present. ``cluster``: draw D donors
    with replacement, then (``resample_tiles``) each drawn donor's n_d tiles with replacement from
    its tiles; else every tile of a drawn donor once. ``cluster=False``: N tiles with replacement,
    donors ignored (the naive bootstrap, for comparison only).

    Vectorised over resamples: the draws of a block of resamples are one array of uniform
    integers, counted with ``np.bincount``; blocks keep about 4 million draws in memory.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    if n == 0 or (np.bincount(codes) == 0).any():
        raise ClaimsInputError("bootstrap_weights: codes must be 0..D-1 with every donor present")
    step = max(1, (1 << 22) // n)
    return np.concatenate([_weights_block(codes, min(step, n_resamples - s), rng, cluster, resample_tiles)
                           for s in range(0, n_resamples, step)])


def _group_sums(codes: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """(D, K) sums of the rows of ``flat`` (N, K) per group code."""
    out = np.zeros((int(codes.max()) + 1, flat.shape[1]))
    np.add.at(out, codes, flat)
    return out


@dataclass
class Bootstrap:
    """The bootstrap distribution of the differences B - A.

    estimate : (T, 4) difference on the data (fractions, :data:`METRICS` order).
    draws : (R, T, 4) the same over R resamples.
    jackknife : (G, T, 4) the difference with each group (donor; tile for ``cluster=False``) left out.
    scheme : how tiles were resampled, in words.
    """

    estimate: np.ndarray
    draws: np.ndarray
    jackknife: np.ndarray
    scheme: str

    @property
    def n_groups(self) -> int:
        return self.jackknife.shape[0]


def bootstrap_differences(counts_a, counts_b, clusters, *, n_resamples: int = 2000, seed=0, cluster: bool = True,
                          resample_tiles: bool = True) -> Bootstrap:
    """Paired bootstrap of the difference B - A in pooled ap, f1, precision, recall.

    Parameters
    ----------
    counts_a, counts_b : (N, T, 3) tp, fp, fn per tile and IoU threshold (the same tiles, same truth).
    clusters : (N,) the donor of each tile (any labels).
    n_resamples : R; seed : int or ``numpy.random.Generator``.
    cluster, resample_tiles : see :func:`bootstrap_weights`.
    """
    ca, cb, codes, _ = _check_counts(counts_a, counts_b, clusters)
    if int(n_resamples) < 1:
        raise ClaimsInputError(f"n_resamples={n_resamples}: need at least one resample (thousands for an interval)")
    n, t = ca.shape[:2]
    flat = np.concatenate([ca.reshape(n, -1), cb.reshape(n, -1)], axis=1)     # (N, 2 T 3)
    w = bootstrap_weights(codes, int(n_resamples), _generator(seed), cluster=cluster, resample_tiles=resample_tiles)
    values = metric_values((w.astype(float) @ flat).reshape(-1, 2, t, 3))      # (R, 2, T, 4)
    groups = codes if cluster else np.arange(n)
    left_out = metric_values((flat.sum(axis=0) - _group_sums(groups, flat)).reshape(-1, 2, t, 3))
    full = metric_values(flat.sum(axis=0).reshape(2, t, 3))
    scheme = ("donors, then tiles within each donor" if resample_tiles else "donors (all their tiles)") if cluster \
        else "tiles, ignoring donors"
    return Bootstrap(estimate=full[1] - full[0], draws=values[:, 1] - values[:, 0],
                     jackknife=left_out[:, 1] - left_out[:, 0], scheme=scheme)


def _quantiles(sorted_draws: np.ndarray, q) -> np.ndarray:
    """Linear-interpolated quantiles (as ``np.quantile``) of each column at its own level ``q``."""
    r = sorted_draws.shape[0]
    pos = np.broadcast_to(np.clip(q, 0.0, 1.0) * (r - 1), sorted_draws.shape[1:])
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, r - 1)
    below = np.take_along_axis(sorted_draws, lo[None], axis=0)[0]
    above = np.take_along_axis(sorted_draws, hi[None], axis=0)[0]
    return below + (pos - lo) * (above - below)


def _bca_levels(boot: Bootstrap, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The BCa quantile levels of the lower and upper bounds (Efron 1987), per column."""
    from scipy.stats import norm

    r = boot.draws.shape[0]
    below = (boot.draws < boot.estimate).sum(axis=0) + 0.5 * (boot.draws == boot.estimate).sum(axis=0)
    z0 = norm.ppf(np.clip(below / r, 0.5 / r, 1 - 0.5 / r))
    dev = boot.jackknife.mean(axis=0) - boot.jackknife
    den = 6.0 * (dev ** 2).sum(axis=0) ** 1.5
    accel = np.divide((dev ** 3).sum(axis=0), den, out=np.zeros_like(den), where=den > 0)
    levels = []
    for z in (norm.ppf(alpha / 2), norm.ppf(1 - alpha / 2)):
        levels.append(norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z))))
    return levels[0], levels[1]


def interval(boot: Bootstrap, method: str = DEFAULT_INTERVAL, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each (T, 4): the ``level`` interval of the difference by ``method``.

    ``percentile``: the alpha/2 and 1 - alpha/2 quantiles of the draws. ``bca``: the quantiles at
    bias-corrected, accelerated levels (acceleration from the delete-one-group jackknife).
    ``t``: estimate +- t(1 - alpha/2, G - 1) x jackknife standard error (G groups: donors),
    NaN with fewer than two groups. All three are [d, d] when every resample gives d.
    """
    if method not in INTERVALS:
        raise ClaimsInputError(f"interval method {method!r}: use one of {', '.join(INTERVALS)}")
    if not 0.0 < float(level) < 1.0:
        raise ClaimsInputError(f"ci_level={level}: give a fraction in (0, 1), e.g. 0.95")
    alpha = 1.0 - float(level)
    if method == "t":
        from scipy.stats import t as student

        g = boot.n_groups
        se = np.sqrt((g - 1) / g * ((boot.jackknife - boot.jackknife.mean(axis=0)) ** 2).sum(axis=0))
        half = student.ppf(1 - alpha / 2, g - 1) * se if g > 1 else np.full_like(se, np.nan)
        return boot.estimate - half, boot.estimate + half
    ordered = np.sort(boot.draws, axis=0)
    if method == "percentile":
        return _quantiles(ordered, alpha / 2), _quantiles(ordered, 1 - alpha / 2)
    low_q, high_q = _bca_levels(boot, alpha)
    return _quantiles(ordered, low_q), _quantiles(ordered, high_q)


# --------------------------------------------------------------------------- donor-level permutation test


def _flip_blocks(n_donors: int, exact: bool, n_permutations: int, rng: np.random.Generator):
    """Blocks of (rows, D) 0/1 swap indicators: all 2^D when ``exact``, else ``n_permutations`` random ones."""
    total = 2 ** n_donors if exact else int(n_permutations)
    for start in range(0, total, _BLOCK):
        stop = min(start + _BLOCK, total)
        if exact:
            yield ((np.arange(start, stop)[:, None] >> np.arange(n_donors)) & 1).astype(float)
        else:
            yield (rng.random((stop - start, n_donors)) < 0.5).astype(float)


@dataclass
class FlipTest:
    """The donor-level paired permutation test. p_value : (T, 4) two-sided p; n_flips : swap
    patterns evaluated; exact : all 2^D patterns (True) or a Monte Carlo sample."""

    p_value: np.ndarray
    n_flips: int
    exact: bool


def donor_flip_test(counts_a, counts_b, clusters, *, n_permutations: int = 9999,
                    exact_max_donors: int = EXACT_MAX_DONORS, seed=0) -> FlipTest:
    """Two-sided paired permutation test of B - A in pooled ap, f1, precision, recall, at the donor level.

    Each pattern swaps the A and B counts of a subset of donors (a sign flip of their count
    differences) and recomputes the pooled difference. With D <= ``exact_max_donors`` (at most 20)
    every one of the 2^D patterns is evaluated and ``p = #{|stat| >= |observed|} / 2^D``;
    otherwise ``n_permutations`` random patterns and ``p = (b + 1) / (m + 1)``.
    """
    ca, cb, codes, _ = _check_counts(counts_a, counts_b, clusters)
    if int(exact_max_donors) > 20:
        raise ClaimsInputError(f"exact_max_donors={exact_max_donors}: enumerating more than 2^20 patterns is too slow")
    n, t = ca.shape[:2]
    per_a, per_b = _group_sums(codes, ca.reshape(n, -1)), _group_sums(codes, cb.reshape(n, -1))
    n_donors = per_a.shape[0]
    exact = n_donors <= int(exact_max_donors)
    if not exact and int(n_permutations) < 1:
        raise ClaimsInputError(f"n_permutations={n_permutations}: need at least one (thousands for a p-value)")
    delta = per_b - per_a
    total_a, total_b = per_a.sum(axis=0), per_b.sum(axis=0)

    def stat(flips):
        shift = flips @ delta
        return (metric_values((total_b - shift).reshape(-1, t, 3))
                - metric_values((total_a + shift).reshape(-1, t, 3)))

    observed = np.abs(stat(np.zeros((1, n_donors))))[0]
    tol = 1e-12 * np.maximum(1.0, observed)   # equal statistics, computed in another order, still count as equal
    hits, seen = np.zeros_like(observed), 0
    for flips in _flip_blocks(n_donors, exact, int(n_permutations), _generator(seed)):
        hits += (np.abs(stat(flips)) >= observed - tol).sum(axis=0)
        seen += len(flips)
    p = hits / seen if exact else (hits + 1) / (seen + 1)
    return FlipTest(p_value=np.minimum(p, 1.0), n_flips=seen, exact=exact)


# --------------------------------------------------------------------------- the comparison table


def _method_text(boot: Bootstrap, method: str, test: FlipTest) -> str:
    flips = f"exact over 2^{int(np.log2(test.n_flips))} swaps" if test.exact else f"{test.n_flips} random swaps"
    unit = "donor" if "donors" in boot.scheme and "ignoring" not in boot.scheme else "tile"
    if method == "t":
        how = f"t interval (delete-one-{unit} jackknife SE, {boot.n_groups - 1} df)"
    else:
        how = f"{method} interval of a paired bootstrap of {boot.scheme}"
    return f"{how}; donor-level paired permutation test ({flips})"


def compare_counts(counts_a, counts_b, clusters, thresholds: Sequence[float], *, a: str = "a", b: str = "b",
                   n_resamples: int = 2000, ci_level: float = 0.95, interval_method: str = DEFAULT_INTERVAL,
                   n_permutations: int = 9999, exact_max_donors: int = EXACT_MAX_DONORS, seed=0,
                   cluster: bool = True, resample_tiles: bool = True) -> pd.DataFrame:
    """The difference B - A in pooled ap, f1, precision and recall at each IoU threshold, with its
    interval and p-value.

    Parameters
    ----------
    counts_a, counts_b : (N, T, 3) tp, fp, fn per tile and threshold, segmentations A and B of the
        same N tiles (same truth: tp + fn must agree).
    clusters : (N,) the donor of each tile.
    thresholds : (T,) the IoU thresholds of the counts' second axis.
    a, b : names of A and B (the ``a``/``b`` columns; :func:`claim_keys` builds the flag from them).
    n_resamples, ci_level, interval_method : bootstrap size, level (fraction) and interval
        (:func:`interval`). cluster, resample_tiles : :func:`bootstrap_weights`.
    n_permutations, exact_max_donors : :func:`donor_flip_test`.
    seed : int or Generator; the bootstrap and the test draw from independent child streams.

    Returns
    -------
    DataFrame, :data:`TABLE_COLUMNS`, one row per metric x threshold: estimate_a, estimate_b
    (pooled, fractions), difference (b - a), ci_low, ci_high, ci_level, p_value (two-sided),
    n_donors, n_tiles, n_resamples, n_permutations (swap patterns evaluated), method (in words).
    """
    ths = metrics.check_thresholds(thresholds)
    ca, cb, codes, _ = _check_counts(counts_a, counts_b, clusters, ths)
    boot_rng, test_rng = _generator(seed).spawn(2)
    boot = bootstrap_differences(ca, cb, codes, n_resamples=n_resamples, seed=boot_rng, cluster=cluster,
                                 resample_tiles=resample_tiles)
    low, high = interval(boot, interval_method, ci_level)
    test = donor_flip_test(ca, cb, codes, n_permutations=n_permutations, exact_max_donors=exact_max_donors,
                           seed=test_rng)
    est_a, est_b = pooled_estimates(ca, ths), pooled_estimates(cb, ths)
    method = _method_text(boot, interval_method, test)
    rows = [{"a": a, "b": b, "metric": m, "threshold": th, "estimate_a": est_a[j, k], "estimate_b": est_b[j, k],
             "difference": est_b[j, k] - est_a[j, k], "ci_low": low[j, k], "ci_high": high[j, k],
             "ci_level": float(ci_level), "p_value": test.p_value[j, k], "n_donors": int(codes.max()) + 1,
             "n_tiles": len(codes), "n_resamples": int(n_resamples), "n_permutations": test.n_flips,
             "method": method}
            for k, m in enumerate(METRICS) for j, th in enumerate(ths)]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def compare(per_image_a: pd.DataFrame, per_image_b: pd.DataFrame, *, a: str = "a", b: str = "b",
            cluster_column: str = "donor", item_column: str = "image", thresholds=None, **options) -> pd.DataFrame:
    """:func:`compare_counts` of two per-tile tables (``Evaluation.per_image`` rows, one model each:
    columns image, donor, threshold, tp, fp, fn), aligned by :func:`paired_counts`.

    ``cluster_column``: the column of the donor (the unit resampled and swapped); ``item_column``:
    the tile's name. ``options``: the keyword arguments of :func:`compare_counts` (n_resamples,
    ci_level, interval_method, n_permutations, exact_max_donors, seed, cluster (a bool: False
    ignores donors), resample_tiles).
    """
    pc = paired_counts(per_image_a, per_image_b, cluster_column=cluster_column, item_column=item_column,
                       thresholds=thresholds)
    return compare_counts(pc.counts_a, pc.counts_b, pc.clusters, pc.thresholds, a=a, b=b, **options)


def empty_comparison(a: str, b: str, thresholds: Sequence[float], why: str, *, ci_level: float = 0.95,
                     n_resamples: int = 0) -> pd.DataFrame:
    """:data:`TABLE_COLUMNS` rows of a comparison that cannot be made (``why``, e.g. a model with no
    tiles): NaN estimates and bounds, 0 donors and tiles, ``why`` as the method. Its claim flag is
    False (:func:`claim_holds` of NaN)."""
    nan = float("nan")
    rows = [{"a": a, "b": b, "metric": m, "threshold": float(th), "estimate_a": nan, "estimate_b": nan,
             "difference": nan, "ci_low": nan, "ci_high": nan, "ci_level": float(ci_level), "p_value": nan,
             "n_donors": 0, "n_tiles": 0, "n_resamples": int(n_resamples), "n_permutations": 0, "method": why}
            for m in METRICS for th in thresholds]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def compare_pairs(per_image: pd.DataFrame, pairs: Sequence[tuple[str, str]], *, by: str = "model",
                  missing: str = "raise", **options) -> pd.DataFrame:
    """:func:`compare` for each (a, b) of ``pairs`` from one long per-tile table with a ``by``
    column naming the segmentation (``scoring.per_image_long``), stacked.

    ``missing``: what a pair where A or B has no rows gives: ``"raise"`` (ClaimsInputError) or
    ``"nan"`` (:func:`empty_comparison` rows at the table's IoU thresholds, so a notebook whose
    profile gives a model no tiles still runs and its claim is not made).
    """
    if by not in per_image.columns:
        raise ClaimsInputError(f"per_image has no column {by!r} naming the segmentations")
    if missing not in ("raise", "nan"):
        raise ClaimsInputError(f"missing={missing!r}: 'raise' or 'nan'")
    wanted = options.get("thresholds")
    ths = metrics.check_thresholds(wanted) if wanted is not None else sorted(
        {float(t) for t in per_image["threshold"]}) if "threshold" in per_image.columns else []
    tables = []
    for a, b in pairs:
        ta, tb = per_image[per_image[by] == a], per_image[per_image[by] == b]
        if missing == "nan" and (ta.empty or tb.empty):
            why = f"no tiles for {a if ta.empty else b}: nothing to compare"
            tables.append(empty_comparison(a, b, ths, why, ci_level=options.get("ci_level", 0.95),
                                           n_resamples=options.get("n_resamples", 2000)))
        else:
            tables.append(compare(ta, tb, a=a, b=b, **options))
    return pd.concat(tables, ignore_index=True)


# --------------------------------------------------------------------------- claims


def claim_holds(ci_low: float, ci_high: float, direction: str = "greater") -> bool:
    """True only when the whole interval lies on the claimed side of 0: ``greater`` (B - A > 0,
    "B beats A") needs ci_low > 0, ``less`` needs ci_high < 0. False for a NaN bound."""
    if direction not in ("greater", "less"):
        raise ClaimsInputError(f"direction={direction!r}: 'greater' (b beats a) or 'less' (a beats b)")
    return bool(ci_low > 0) if direction == "greater" else bool(ci_high < 0)


def claim_keys(table: pd.DataFrame, name: str, *, metric: str = "ap", threshold: float = 0.5,
               claim: str | None = None, direction: str = "greater", digits: int = 4) -> dict:
    """Summary keys of one row of a :func:`compare` table.

    Returns ``{name: difference, name_ci_low, name_ci_high, name_p_value, flag: bool}`` where
    the flag is ``claim`` or ``<b>_beats_<a>`` (``<a>_beats_<b>`` for ``direction="less"``) and
    is :func:`claim_holds` of the unrounded bounds. Fractions rounded to ``digits``.
    """
    rows = table[(table["metric"] == metric) & np.isclose(table["threshold"].astype(float), threshold)]
    if len(rows) != 1:
        raise ClaimsInputError(f"claim_keys: {len(rows)} rows for metric {metric!r} at IoU {threshold}; "
                               f"pass the table of one comparison")
    r = rows.iloc[0]
    flag = claim or (f"{r['b']}_beats_{r['a']}" if direction == "greater" else f"{r['a']}_beats_{r['b']}")
    return {name: round(float(r["difference"]), digits), f"{name}_ci_low": round(float(r["ci_low"]), digits),
            f"{name}_ci_high": round(float(r["ci_high"]), digits), f"{name}_p_value": round(float(r["p_value"]), digits),
            flag: claim_holds(float(r["ci_low"]), float(r["ci_high"]), direction)}


# --------------------------------------------------------------------------- summary keys of the notebooks


def slug(name: str) -> str:
    """A segmentation's name as part of a summary key: ``baseline[gfap+iba1]`` -> ``baseline_gfap_iba1``."""
    return re.sub(r"[^0-9A-Za-z]+", "_", str(name)).strip("_")


def interval_note(n_donors: int) -> str:
    """Why a comparison of ``n_donors`` donors has no interval or a very wide one ('' when it is usable)."""
    if n_donors <= 0:
        return "no tiles: nothing to compare, no claim"
    if n_donors == 1:
        return "1 donor: no interval (the spread between donors needs at least 2), no claim"
    if n_donors == 2:
        return "2 donors: an interval from the spread between 2 donors (1 degree of freedom), very wide unless they agree"
    return ""


def claim_summary(table: pd.DataFrame, a: str, b: str, *, prefix: str, suffix: str = "", metric: str = "ap",
                  threshold: float = 0.5, digits: int = 4) -> dict:
    """The summary keys of the comparison (a, b) of a :func:`compare_pairs` table, named by the
    convention that :func:`find_claims` (and the status page) reads back:

    ``<prefix>_diff_<b>_vs_<a><suffix>`` (B - A, fraction) with ``_ci_low``, ``_ci_high``,
    ``_p_value``, ``_n_donors`` and, when the interval is missing or very wide, ``_note``
    (:func:`interval_note`); the flag ``<b>_beats_<a><suffix>``, True only when the interval lies
    above 0 (:func:`claim_keys`). Names pass through :func:`slug`; ``prefix`` is the split and
    metric, e.g. ``test_ap50``.
    """
    rows = table[(table["a"] == a) & (table["b"] == b)]
    name = f"{prefix}_diff_{slug(b)}_vs_{slug(a)}{suffix}"
    out = claim_keys(rows, name, metric=metric, threshold=threshold, claim=f"{slug(b)}_beats_{slug(a)}{suffix}",
                     digits=digits)
    n_donors = int(rows["n_donors"].iloc[0])
    out[f"{name}_n_donors"] = n_donors
    if interval_note(n_donors):
        out[f"{name}_note"] = interval_note(n_donors)
    return out


def interval_label(table: pd.DataFrame) -> str:
    """What the intervals of a :func:`compare` or :func:`grid_range` table are, in words for a
    figure or table: e.g. ``95% t interval over donors`` (the default)."""
    level = float(table["ci_level"].iloc[0]) if len(table) and "ci_level" in table else 0.95
    methods = [str(m) for m in table["method"] if not str(m).startswith("no tiles")] if "method" in table else []
    method = methods[0] if methods else "t interval (delete-one-donor jackknife SE)"
    if method.startswith("t interval"):
        return f"{level:.0%} t interval over {'donors' if 'one-donor' in method else 'tiles'}"
    kind = "BCa" if method.startswith("bca") else "percentile"
    over = ("tiles, ignoring donors" if "ignoring donors" in method
            else "donors, then tiles within donors" if "then tiles" in method else "donors")
    return f"{level:.0%} {kind} interval, bootstrap of {over}"


def find_claims(summary: dict) -> list[dict]:
    """The claims of a run's ``summary.json`` written by :func:`claim_summary`, in the summary's
    order: for each flag ``<x>_beats_<y>`` whose difference key ``..._diff_<x>_vs_<y>`` is there,
    {flag, holds, winner (x), loser (y), key, prefix, difference, ci_low, ci_high, p_value,
    n_donors, note}; the difference is x - y (a ``..._diff_<y>_vs_<x>`` key is turned around)."""
    def number(v, sign):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else sign * float(v)

    found = []
    for flag, holds in summary.items():
        if not isinstance(holds, bool) or "_beats_" not in flag:
            continue
        x, y = flag.split("_beats_", 1)
        for sign, tail in ((1.0, f"_diff_{x}_vs_{y}"), (-1.0, f"_diff_{y}_vs_{x}")):
            key = next((k for k in summary if k.endswith(tail) and f"{k}_ci_low" in summary), None)
            if key is None:
                continue
            bounds = [number(summary.get(f"{key}_ci_{side}"), sign) for side in ("low", "high")]
            found.append({"flag": flag, "holds": holds, "winner": x, "loser": y, "key": key,
                          "prefix": key[: -len(tail)], "difference": number(summary.get(key), sign),
                          "ci_low": bounds[0] if sign > 0 else bounds[1],
                          "ci_high": bounds[1] if sign > 0 else bounds[0], "p_value": summary.get(f"{key}_p_value"),
                          "n_donors": summary.get(f"{key}_n_donors"), "note": summary.get(f"{key}_note", "")})
            break
    return found


# --------------------------------------------------------------------------- one model across a parameter (E4)


def _setting_counts(per_image: pd.DataFrame, setting: str, cluster: str, item: str, thresholds):
    """(settings, codes, thresholds, counts (S, N, T, 3)) of a long table, every setting on the same tiles."""
    if setting not in per_image.columns:
        raise ClaimsInputError(f"per_image has no column {setting!r} naming the parameter's values")
    values = list(pd.unique(per_image[setting]))
    if len(values) < 2:
        raise ClaimsInputError(f"{setting!r} takes {len(values)} value(s); a range needs at least two")
    first = per_image[per_image[setting] == values[0]]
    tables = [paired_counts(first, per_image[per_image[setting] == v], cluster_column=cluster, item_column=item,
                            thresholds=thresholds) for v in values[1:]]
    counts = np.stack([tables[0].counts_a] + [pc.counts_b for pc in tables])
    codes, _ = _codes(tables[0].clusters, counts.shape[1])
    return values, codes, tables[0].thresholds, counts


def _range_null(per_donor: np.ndarray, n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """(m, T, 4) ranges over settings after permuting the settings' labels within each donor.

    ``per_donor``: (D, S, T, 3) counts summed per donor and setting.
    """
    n_donors, n_settings = per_donor.shape[:2]
    out, done = [], 0
    while done < n_permutations:
        m = min(_BLOCK // n_settings, n_permutations - done)
        perm = np.argsort(rng.random((m, n_donors, n_settings)), axis=2)
        sums = per_donor[np.arange(n_donors)[None, :, None], perm].sum(axis=1)     # (m, S, T, 3)
        values = metric_values(sums)
        out.append(values.max(axis=1) - values.min(axis=1))
        done += m
    return np.concatenate(out)


def grid_range(per_image: pd.DataFrame, *, setting: str = "value", cluster_column: str = "donor",
               item_column: str = "image", thresholds=None, n_resamples: int = 2000, ci_level: float = 0.95,
               n_permutations: int = 1999, seed=0, resample_tiles: bool = True) -> pd.DataFrame:
    """The range (max - min over the values of one parameter) of one model's pooled metrics on the
    same tiles, with a percentile interval and a permutation p-value.

    ``per_image``: ``Evaluation.per_image`` rows of one model with a ``setting`` column (the
    parameter's value); every value scored on the same tiles. The interval resamples donors
    then tiles (as :func:`compare_counts`), all settings together. It is for the size of a range
    that is clearly there: a range is never negative and its bootstrap is biased upwards, so the
    interval stays above 0 when the parameter changes nothing but the masks differ a little.
    Whether the parameter changes anything is the p-value: the settings' labels are permuted within each donor (Monte Carlo,
    ``(b + 1) / (m + 1)``, one-sided: a range at least as large).

    Returns one row per metric x threshold: metric, threshold, n_settings, setting_min,
    setting_max (values at the min and max), estimate_min, estimate_max, range, ci_low, ci_high,
    ci_level, p_value, n_donors, n_tiles, n_resamples, n_permutations, method.
    """
    values, codes, ths, counts = _setting_counts(per_image, setting, cluster_column, item_column, thresholds)
    boot_rng, test_rng = _generator(seed).spawn(2)
    n_set, n = counts.shape[:2]
    flat = counts.transpose(1, 0, 2, 3).reshape(n, -1)                               # (N, S T 3)
    w = bootstrap_weights(codes, int(n_resamples), boot_rng, resample_tiles=resample_tiles).astype(float)
    drawn = metric_values((w @ flat).reshape(-1, n_set, len(ths), 3))                # (R, S, T, 4)
    spread = drawn.max(axis=1) - drawn.min(axis=1)
    est = np.stack([pooled_estimates(c, ths) for c in counts])                       # (S, T, 4)
    observed = est.max(axis=0) - est.min(axis=0)
    alpha = 1.0 - float(ci_level)
    low, high = np.quantile(spread, [alpha / 2, 1 - alpha / 2], axis=0)
    per_donor = _group_sums(codes, flat).reshape(-1, n_set, len(ths), 3)
    null = _range_null(per_donor, int(n_permutations), test_rng)
    p = ((null >= observed - 1e-12).sum(axis=0) + 1) / (len(null) + 1)
    rows = [{"metric": m, "threshold": th, "n_settings": n_set, "setting_min": values[int(est[:, j, k].argmin())],
             "setting_max": values[int(est[:, j, k].argmax())], "estimate_min": est[:, j, k].min(),
             "estimate_max": est[:, j, k].max(), "range": observed[j, k], "ci_low": low[j, k], "ci_high": high[j, k],
             "ci_level": float(ci_level), "p_value": p[j, k], "n_donors": int(codes.max()) + 1, "n_tiles": n,
             "n_resamples": int(n_resamples), "n_permutations": len(null),
             "method": "bootstrap of donors, then tiles within each donor, percentile interval of the range; "
                       "settings permuted within donors for the p-value"}
            for k, m in enumerate(METRICS) for j, th in enumerate(ths)]
    return pd.DataFrame(rows)
