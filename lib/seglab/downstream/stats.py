"""Pure statistics for the downstream engine: Spearman on many rows at once and BH FDR.

Everything here works on plain NumPy arrays and is checked against the
reference implementations in ``tests/test_downstream.py``:

- :func:`spearman_grid` gives the same rho as ``scipy.stats.spearmanr`` (Pearson
  correlation of average ranks) for every pair (row of ``x``, row of ``y``),
  dropping the pairs where either value is missing, so one call handles
  ``B`` bootstrap resamples x ``K`` outcomes.
- :func:`spearman_pvalue` is scipy's two-sided t approximation with ``n - 2``
  degrees of freedom (what ``spearmanr`` reports).
- :func:`bh_qvalues` equals ``statsmodels.stats.multitest.multipletests(p,
  method="fdr_bh")[1]`` along the last axis, ignoring NaN p-values (they stay
  NaN and do not count in the family size ``m``).

Examples
--------
>>> import numpy as np
>>> rho, n = spearman_grid(np.array([[1.0, 2, 3, 4]]), np.array([[2.0, 1, 4, 3]]))
>>> round(float(rho[0, 0]), 3), int(n[0, 0])
(0.6, 4)
>>> bh_qvalues(np.array([0.01, 0.04, np.nan, 0.03])).round(3).tolist()
[0.03, 0.04, nan, 0.04]
"""

from __future__ import annotations

import numpy as np
from scipy import special
from scipy.stats import rankdata

MIN_N = 3  # below three pairs a rank correlation has no degrees of freedom left


def spearman_grid(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman rho for every (row of ``x``, row of ``y``), NaN-aware.

    Parameters
    ----------
    x : (R, D) float array
        R rows (e.g. bootstrap resamples) of one feature over D donors; NaN = missing.
    y : (K, D) float array
        K outcomes over the same D donors; NaN = missing.

    Returns
    -------
    rho : (R, K) float64
        Pearson correlation of the average ranks over the donors where both
        values are present. NaN when fewer than 3 such donors or when either
        side is constant over them.
    n : (R, K) int64
        Number of donors used.

    Notes
    -----
    Rows are grouped by their missingness pattern, and outcomes by the combined
    pattern, so the ranking and the products are done once per group: the
    usual case (the same donors missing in every resample) is one ``rankdata``
    over ``(R, D)`` and one matrix product.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"spearman_grid needs x (R, D) and y (K, D); got {x.shape} and {y.shape}")
    R, _ = x.shape
    K = y.shape[0]
    rho = np.full((R, K), np.nan)
    n = np.zeros((R, K), dtype=np.int64)
    vx = np.isfinite(x)
    vy = np.isfinite(y)
    if vx.all():
        row_groups = [(np.arange(R), np.ones(x.shape[1], bool))]
    else:
        pats, inv = np.unique(vx, axis=0, return_inverse=True)
        inv = inv.ravel()
        row_groups = [(np.flatnonzero(inv == i), pats[i]) for i in range(len(pats))]
    for rows, pat in row_groups:
        masks = pat[None, :] & vy
        mpats, minv = np.unique(masks, axis=0, return_inverse=True)
        minv = minv.ravel()
        keep = np.flatnonzero(pat)
        xs = x[np.ix_(rows, keep)]
        # one sort per row group; every outcome's donor subset is ranked from it
        order = np.argsort(xs, axis=1, kind="stable")
        ties = _tie_bounds(np.take_along_axis(xs, order, axis=1))
        for mi, m in enumerate(mpats):
            cols = np.flatnonzero(minv == mi)
            nm = int(m.sum())
            n[np.ix_(rows, cols)] = nm
            if nm < MIN_N:
                continue
            sub = m[keep]  # the subset, over the kept donors
            rxc = _centred_subset_ranks(order, ties, sub, nm)
            ry = rankdata(y[np.ix_(cols, keep[sub])], axis=1)
            ryc = np.zeros((cols.size, keep.size))
            ryc[:, sub] = ry - (nm + 1) / 2.0
            rho[np.ix_(rows, cols)] = _pearson_centred(rxc, ryc)
    return rho, n


def _tie_bounds(sv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last position of each element's run of equal values in sorted rows sv (R, D)."""
    R, D = sv.shape
    pos = np.broadcast_to(np.arange(D), (R, D))
    new = np.ones((R, D), dtype=bool)
    new[:, 1:] = sv[:, 1:] != sv[:, :-1]
    end = np.ones((R, D), dtype=bool)
    end[:, :-1] = new[:, 1:]
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
    last = np.minimum.accumulate(np.where(end, pos, D - 1)[:, ::-1], axis=1)[:, ::-1]
    return first, last


def _centred_subset_ranks(order: np.ndarray, ties, sub: np.ndarray, nm: int) -> np.ndarray:
    """Average ranks of the donors in ``sub`` (others 0), minus their mean, in donor order.

    The rank of a kept value v is (kept values < v) + (kept values == v + 1) / 2,
    read from running counts along the sorted row: no sort per subset.
    """
    first, last = ties
    inc = sub[order]  # (R, D) kept flag in sorted order
    c = np.cumsum(inc, axis=1, dtype=np.int64)
    before = np.where(first > 0, np.take_along_axis(c, np.maximum(first - 1, 0), axis=1), 0)
    in_run = np.take_along_axis(c, last, axis=1) - before
    ranks = before + (in_run + 1) / 2.0
    centred = np.where(inc, ranks - (nm + 1) / 2.0, 0.0)
    out = np.empty_like(centred)
    np.put_along_axis(out, order, centred, axis=1)
    return out


def _pearson_centred(ac: np.ndarray, bc: np.ndarray) -> np.ndarray:
    """Pearson r of centred rows (zeros outside the subset): a (R, D), b (K, D) -> (R, K)."""
    num = ac @ bc.T
    sa = np.sqrt(np.einsum("ij,ij->i", ac, ac))
    sb = np.sqrt(np.einsum("ij,ij->i", bc, bc))
    den = sa[:, None] * sb[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num / den
    r[den == 0] = np.nan  # a constant side: correlation undefined (scipy says the same)
    return np.clip(r, -1.0, 1.0)


def spearman_pvalue(rho: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Two-sided p of Spearman's rho by the t approximation (as ``scipy.stats.spearmanr``).

    ``t = rho * sqrt((n - 2) / ((1 + rho)(1 - rho)))`` on ``n - 2`` degrees of
    freedom. NaN where rho is NaN or ``n < 3``.
    """
    rho = np.asarray(rho, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n), rho.shape)
    dof = (n - 2).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = rho * np.sqrt((dof / ((rho + 1.0) * (1.0 - rho))).clip(0))
        p = 2.0 * special.stdtr(dof, -np.abs(t))
    return np.where((n >= MIN_N) & np.isfinite(rho), p, np.nan)


def bh_qvalues(p: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q) along the last axis.

    Parameters
    ----------
    p : (..., T) float array
        p-values; NaN entries are not tests (they stay NaN and do not count in m).
    groups : (T,) int array, optional
        Family label of each of the T tests; BH runs separately within each
        family. Default: all T tests form one family.

    Returns
    -------
    q : array of p's shape
        Equal to ``statsmodels.stats.multitest.multipletests(p_family,
        method="fdr_bh")[1]`` for each row and family.
    """
    p = np.asarray(p, dtype=np.float64)
    if groups is None:
        return _bh_last_axis(p)
    groups = np.asarray(groups)
    q = np.full_like(p, np.nan)
    for g in np.unique(groups):
        sel = np.flatnonzero(groups == g)
        q[..., sel] = _bh_last_axis(p[..., sel])
    return q


def _bh_last_axis(p: np.ndarray) -> np.ndarray:
    if p.shape[-1] == 0:
        return p.copy()
    order = np.argsort(p, axis=-1)  # NaN sort last
    ps = np.take_along_axis(p, order, axis=-1)
    m = np.isfinite(ps).sum(axis=-1, keepdims=True).astype(np.float64)
    rank = np.arange(1, p.shape[-1] + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # statsmodels divides by the ecdf factor rank / m; do the same for equal floats
        raw = ps / (rank / m)
    # running minimum from the largest p down; fmin skips the NaN tail
    qs = np.fmin.accumulate(raw[..., ::-1], axis=-1)[..., ::-1]
    qs = np.minimum(qs, 1.0)
    qs[~np.isfinite(ps)] = np.nan
    q = np.empty_like(qs)
    np.put_along_axis(q, order, qs, axis=-1)
    return q
