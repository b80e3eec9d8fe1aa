"""Pure statistics for the downstream engine: Spearman on many rows at once and BH FDR.

Everything here works on plain NumPy arrays and is checked against the
reference implementations in ``tests/test_downstream.py`` and
``tests/test_small_n_stats.py``:

- :func:`spearman_grid` gives the same rho as ``scipy.stats.spearmanr`` (Pearson
  correlation of average ranks) for every pair (row of ``x``, row of ``y``),
  dropping the pairs where either value is missing, so one call handles
  ``B`` bootstrap resamples x ``K`` outcomes. With ``pvalues=True`` it also
  gives the two-sided p of every pair, by the method below.
- :func:`spearman_pvalue` is scipy's two-sided t approximation with ``n - 2``
  degrees of freedom (what ``spearmanr`` reports); no longer used for p, kept
  as the reference the benchmark compares with.
- :func:`bh_qvalues` equals ``statsmodels.stats.multitest.multipletests(p,
  method="fdr_bh")[1]`` along the last axis, ignoring NaN p-values (they stay
  NaN and do not count in the family size ``m``).

Which p-value, when (``spearman_grid(..., pvalues=True)``)
-----------------------------------------------------------
``n <= EXACT_MAX_N`` (9) donors: exact
    The permutation distribution of rho given the observed average ranks of
    both sides (ties included), by enumerating all ``n!`` pairings (9! =
    362,880). Two-sided p = twice the smaller one-sided tail, capped at 1: the
    convention of ``scipy.stats.permutation_test`` and equal to
    ``scipy.stats.spearmanrho(x, y, method=PermutationMethod(n_resamples=inf))``.
    The t approximation is badly wrong here: for a perfect correlation it
    says p = 0 where the exact p is ``2/n!`` (4 donors: 2/24 = 0.083, never
    significant). The distribution depends only on the two tie patterns (the
    sorted ranks), so it is computed once per pair of patterns and cached;
    every bootstrap resample with the same patterns is one ``searchsorted``.
    9 is where R's ``cor.test`` stops enumerating too (AS 89).
``n > EXACT_MAX_N``, ``|rho| < 1``: Monte Carlo permutation, seeded
    ``m = PERM_RESAMPLES`` (200,000) random pairings of the same average ranks
    (ties included), drawn from ``seed`` (``analyse``'s seed) and the donor
    count only: the same p for the same data on every run. Each tail is
    ``(b + 1) / (m + 1)`` (Phipson & Smyth: a valid p for any m, never 0),
    two-sided by doubling the smaller, as the exact path and
    ``scipy.stats.permutation_test``. Why 200,000: BH over ~120 tests at 0.05
    needs p down to 0.05/120 = 4.2e-4 (the smallest p, 2/200,001 = 1e-5, is
    well below), and the demo's calls sit at q 0.03-0.05, where a p of 0.005
    decides: there a tail holds ~500 of the 200,000 pairings, so the p is
    known to about +-4.5% (Monte Carlo sd; +-14% with 20,000, enough to move
    a q of 0.048 across 0.05 by the draw alone). Near 4.2e-4 a tail holds
    about 40 pairings (+-16%): whether a test at the very edge of BH's first
    step passes is partly the draw, but the p stays valid, so the FDR stays
    controlled; only power at the edge is lost.
    lost. The null sample is cached per pair of tie patterns (a sorted
    int64 array), so tests and resamples with the same patterns share it.
    It replaced scipy's t approximation, whose far tail is too light: a t p
    of 1e-4 is a permutation p of about 1.5e-4 at 24 donors, and over 1000
    null cohorts of 24 donors and 120 tests the mean false discovery
    proportion was 0.074 (se 0.008) at alpha 0.05 (``bench/bench_null_calibration.py``).
    In the bootstrap (``untie_x_null``) the resampled feature's ties are
    left out of the null (only the outcome's kept), so all resamples share
    one null per outcome pattern: otherwise each resample's ties would draw
    its own (~150x slower). For an untied feature the two are identical.
``n > EXACT_MAX_N``, a perfect correlation (``|rho| = 1``): exact, closed form
    The t approximation gives 0. The exact p is ``2 * prod(t_k!) / n!`` (t_k
    the sizes of the tie groups): only the pairings that keep every tie group
    together reach ``|rho| = 1``.
Never 0
    No permutation p can be below ``2 / n!`` (the observed pairing is one of
    the ``n!``), so the t approximation is floored there, and every p at the
    smallest positive double (``2 / n!`` underflows beyond ~170 donors); the
    Monte Carlo p is at least ``2 / (m + 1)``.

Examples
--------
>>> import numpy as np
>>> rho, n = spearman_grid(np.array([[1.0, 2, 3, 4]]), np.array([[2.0, 1, 4, 3]]))
>>> round(float(rho[0, 0]), 3), int(n[0, 0])
(0.6, 4)
>>> rho, n, p = spearman_grid(np.array([[1.0, 2, 3, 4]]), np.array([[1.0, 2, 3, 4]]), pvalues=True)
>>> round(float(rho[0, 0]), 6), round(float(p[0, 0]), 4)  # exact: 2 of the 4! pairings have |rho| = 1
(1.0, 0.0833)
>>> bh_qvalues(np.array([0.01, 0.04, np.nan, 0.03])).round(3).tolist()
[0.03, 0.04, nan, 0.04]
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import special
from scipy.stats import rankdata

MIN_N = 3  # below three pairs a rank correlation has no degrees of freedom left
EXACT_MAX_N = 9  # 9! = 362,880 pairings: enumerated once per pair of tie patterns in ~30 ms; 10! takes 10x that
PERM_RESAMPLES = 200_000  # Monte Carlo pairings above EXACT_MAX_N donors: the smallest p, 2/200,001 = 1e-5, is
#                           far below BH's first step over 120 tests (0.05/120 = 4.2e-4); the module notes give its error
_PERFECT = 1e-9  # |rho| this close to 1 is checked on the integer ranks for an exact tie (float rho may be 1 - 2e-16)


def spearman_grid(x: np.ndarray, y: np.ndarray, *, pvalues: bool = False, seed: int = 0,
                  n_resamples: int = PERM_RESAMPLES, untie_x_null: bool = False):
    """Spearman rho (and with ``pvalues`` its two-sided p) for every (row of ``x``, row of ``y``), NaN-aware.

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
    p : (R, K) float64, only with ``pvalues``
        Two-sided p: exact for ``n <= EXACT_MAX_N`` and for ``|rho| = 1``, else
        a Monte Carlo permutation p from ``n_resamples`` pairings drawn from
        ``seed`` (see the module notes); never 0; NaN where rho is. With
        ``untie_x_null`` that Monte Carlo null takes the rows of ``x`` as
        untied (ties of ``y`` kept): one cached null per outcome pattern for
        all bootstrap resamples, where the resampled features' ties would
        make one per resample (the module notes).

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
    p = np.full((R, K), np.nan) if pvalues else None
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
            r = _pearson_centred(rxc, ryc)
            rho[np.ix_(rows, cols)] = r
            if pvalues:
                p[np.ix_(rows, cols)] = _group_pvalues(r, nm, rxc, ryc, sub, seed, n_resamples, untie_x_null)
    if not pvalues:
        return rho, n
    floor = _min_pvalue(np.arange(int(n.max(initial=0)) + 1))
    return rho, n, np.maximum(p, floor[n])  # maximum, unlike fmax, keeps the NaN of an untested pair


def _group_pvalues(r, nm: int, rxc, ryc, sub, seed: int, n_resamples: int, untie: bool) -> np.ndarray:
    """Two-sided p of one group's rho (R, K) over ``nm`` donors: exact up to EXACT_MAX_N donors and
    for |rho| = 1, else Monte Carlo permutation (the module notes)."""
    if nm <= EXACT_MAX_N:
        return _exact_group_pvalues(r, nm, rxc, ryc, sub)
    a = _twice(rxc[:, sub])
    if untie:  # the untied ranks stand in for every row: one null per outcome pattern, compared on the rho scale
        a = np.broadcast_to(2 * np.arange(nm, dtype=np.int64) - (nm - 1), a.shape)
    p = _mc_pvalues(r, a, _twice(ryc[:, sub]), seed, n_resamples, on_rho=untie)
    if (np.abs(r) > 1 - _PERFECT).any():  # a perfect rank order: the closed form, not the Monte Carlo floor
        exact = _exact_group_pvalues(r, nm, rxc, ryc, sub)
        p = np.where(np.isnan(exact), p, exact)
    return p


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


def _exact_group_pvalues(r: np.ndarray, nm: int, rxc: np.ndarray, ryc: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """Exact two-sided p of one group's rho (R, K) over ``nm`` donors where the module notes ask for
    one (every cell up to EXACT_MAX_N donors, a perfect correlation above); NaN elsewhere.

    ``rxc`` (R, D) and ``ryc`` (K, D) are the centred average ranks, nonzero
    only on the donors ``sub`` of the test; twice them are integers, which
    makes the permutation statistic exact (no float tolerance).
    """
    if nm <= EXACT_MAX_N:
        return _exact_pvalues(r, _twice(rxc[:, sub]), _twice(ryc[:, sub]))
    p = np.full(r.shape, np.nan)
    ri, ki = np.nonzero(np.abs(r) > 1 - _PERFECT)
    a, b = _twice(rxc[ri][:, sub]), _twice(ryc[ki][:, sub])
    # a rho of 1 - 2e-16 may be perfect or (beyond ~2000 donors) not: the integer ranks decide
    perfect = (a == b).all(axis=1) | (a == -b).all(axis=1)
    p[ri[perfect], ki[perfect]] = _perfect_pvalue(a[perfect])
    return p


def _mc_pvalues(r: np.ndarray, a: np.ndarray, b: np.ndarray, seed: int, n_resamples: int, *,
                on_rho: bool = False) -> np.ndarray:
    """Monte Carlo two-sided permutation p of rho (R, K) from twice the centred ranks a (R, n) and b (K, n).

    As :func:`_exact_pvalues`, with the null of the integer statistic ``a.b``
    drawn (``n_resamples`` random pairings) instead of enumerated: one sorted
    sample per pair of tie patterns, cached, so the bootstrap resamples with
    the patterns of the observed data cost one ``searchsorted``. Each tail is
    ``(b + 1) / (m + 1)`` (b of the m pairings at least as extreme; the
    observed pairing counts as one), doubled for two sides, capped at 1.
    ``on_rho``: compare ``r`` with the null scaled to rho (``a`` then only
    names the null's pattern, not the data's ranks).
    """
    stat = r if on_rho else a @ b.T
    p = np.full(r.shape, np.nan)
    m1 = n_resamples + 1.0
    for pa, pb, cells in _by_tie_patterns(a, b, np.isfinite(r)):
        null = _mc_null(pa, pb, int(seed), int(n_resamples))
        s, tol = stat[cells], 0
        if on_rho:  # null rho values are >= 1 / (|a||b|) apart; 1e-9 only absorbs rounding
            va, vb = np.asarray(pa, dtype=np.float64), np.asarray(pb, dtype=np.float64)
            null = null / math.sqrt(float(va @ va) * float(vb @ vb))
            tol = 1e-9
        le = np.searchsorted(null, s + tol, side="right")  # integer statistics need no tolerance
        ge = null.size - np.searchsorted(null, s - tol, side="left")
        p[cells] = np.minimum(1.0, 2.0 * (np.minimum(le, ge) + 1) / m1)
    return p


def _by_tie_patterns(a: np.ndarray, b: np.ndarray, ok: np.ndarray):
    """Yield (pattern of a, pattern of b, cells) for every pair of tie patterns among the ``ok`` cells
    of the (R, K) grid of rows of ``a`` (R, n) x rows of ``b`` (K, n): a pattern is a row's sorted
    twice-centred ranks (a tuple, the null's cache key), ``cells`` the (R, K) mask of that pair."""
    if not ok.any():
        return
    ua, ia = np.unique(np.sort(a, axis=1), axis=0, return_inverse=True)
    ub, ib = np.unique(np.sort(b, axis=1), axis=0, return_inverse=True)
    pair = ia.ravel()[:, None] * len(ub) + ib.ravel()[None, :]
    for code in np.unique(pair[ok]):
        i, j = divmod(int(code), len(ub))
        yield tuple(ua[i].tolist()), tuple(ub[j].tolist()), ok & (pair == code)


def _mc_null(pa: tuple, pb: tuple, seed: int, n_resamples: int) -> np.ndarray:
    """Sorted Monte Carlo null of ``sum a_i b_pi(i)`` for tie patterns pa, pb; the pair in one order
    so the same data give the same sample whichever side is the feature."""
    return _mc_null_cached(*sorted((pa, pb)), seed, n_resamples)


@functools.lru_cache(maxsize=64)  # at most 64 x 200,000 int64: 100 MB (one null per pair of tie patterns)
def _mc_null_cached(pa: tuple, pb: tuple, seed: int, n_resamples: int) -> np.ndarray:
    n = len(pa)
    perms = _random_pairings(n, seed, n_resamples)
    va, vb = np.asarray(pa, dtype=np.int64), np.asarray(pb, dtype=np.int64)
    step = max(1, 4_000_000 // n)  # bound the (step, n) gathered block
    null = np.concatenate([vb[perms[k:k + step]] @ va for k in range(0, n_resamples, step)])
    null.sort()
    null.flags.writeable = False  # cached: shared by every caller
    return null


@functools.lru_cache(maxsize=4)
def _random_pairings(n: int, seed: int, n_resamples: int) -> np.ndarray:
    """(n_resamples, n) random permutations of range(n), from (seed, n) only: the same on every run and
    for every test over n donors (the p of each test is valid; tests share the draws)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), n]))
    dtype = np.int16 if n < 2**15 else np.int64
    perms = rng.permuted(np.tile(np.arange(n, dtype=dtype), (n_resamples, 1)), axis=1)
    perms.flags.writeable = False
    return perms


def _twice(c: np.ndarray) -> np.ndarray:
    """Twice the centred average ranks as integers (average ranks are multiples of 1/2)."""
    return np.rint(2.0 * c).astype(np.int64)


def _min_pvalue(n):
    """The smallest two-sided permutation p over n donors (int or array), 2 / n!, or the smallest
    positive double where that underflows."""
    return np.maximum(2.0 * np.exp(-special.gammaln(np.asarray(n, dtype=np.float64) + 1)), np.finfo(np.float64).tiny)


def _perfect_pvalue(a: np.ndarray) -> np.ndarray:
    """Exact two-sided p of |rho| = 1 for each row of ``a`` (m, n), twice the centred ranks of one side.

    The pairings reaching |rho| = 1 permute the donors within each tie group
    only: prod(t_k!) of the n!, in each tail; doubled for two sides.
    """
    s = np.sort(a, axis=1)
    n = a.shape[1]
    out = np.empty(len(a))
    for i, row in enumerate(s):
        _, sizes = np.unique(row, return_counts=True)
        out[i] = 2.0 * math.exp(sum(math.lgamma(t + 1) for t in sizes) - math.lgamma(n + 1))
    return np.maximum(np.minimum(out, 1.0), _min_pvalue(n))


def _exact_pvalues(r: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact two-sided permutation p of rho (R, K) from twice the centred ranks a (R, n) and b (K, n).

    rho is ``a.b / (|a||b|)`` and the norms do not change under a permutation,
    so the integer ``a.b`` is the statistic. Its null distribution depends
    only on the sorted a and b (the tie patterns): one cached table per pair.
    """
    stat = a @ b.T  # (R, K) integers
    p = np.full(r.shape, np.nan)
    for pa, pb, cells in _by_tie_patterns(a, b, np.isfinite(r)):
        values, le, ge = _null_table(pa, pb)
        k = np.searchsorted(values, stat[cells])  # the observed statistic is one of the values
        p[cells] = np.minimum(1.0, 2.0 * np.minimum(le[k], ge[k]))
    return p


def _null_table(pa: tuple, pb: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Permutation null of ``sum a_i b_pi(i)`` for tie patterns pa, pb (sorted twice-centred ranks).

    Returns the sorted distinct values and, for each, P(stat <= value) and
    P(stat >= value) over the n! pairings. Symmetric in (pa, pb), so the pair is
    put in one order before the cache.
    """
    return _null_table_cached(*sorted((pa, pb)))


@functools.lru_cache(maxsize=4096)
def _null_table_cached(pa: tuple, pb: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perms = _permutations(len(pa))
    stats = np.asarray(pb, dtype=np.int32)[perms] @ np.asarray(pa, dtype=np.int32)
    values, counts = np.unique(stats, return_counts=True)
    total = float(perms.shape[0])
    le = np.cumsum(counts) / total
    ge = np.cumsum(counts[::-1])[::-1] / total
    for arr in (values, le, ge):
        arr.flags.writeable = False  # cached: shared by every caller
    return values, le, ge


@functools.lru_cache(maxsize=EXACT_MAX_N + 1)
def _permutations(n: int) -> np.ndarray:
    """(n!, n) int8: every permutation of range(n), built by inserting each new element at every position."""
    perms = np.zeros((1, 0), dtype=np.int8)
    for k in range(n):  # perms holds every permutation of range(k)
        m = perms.shape[0]
        out = np.empty((m * (k + 1), k + 1), dtype=np.int8)
        for pos in range(k + 1):
            block = out[pos * m:(pos + 1) * m]
            block[:, :pos] = perms[:, :pos]
            block[:, pos] = k
            block[:, pos + 1:] = perms[:, pos:]
        perms = out
    perms.flags.writeable = False
    return perms


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
