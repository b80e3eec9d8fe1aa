"""Cohort -> Spearman per test with BH FDR and bootstrap stability; threshold and model comparisons (E5).

Definitions
-----------
Test
    One Spearman correlation per (marker, feature, outcome) over the donors
    that have both values; ``n`` is reported per test; fewer than 3 donors, or a
    constant side, gives NaN with the reason. The p-value is exact (permutation)
    up to 9 donors and for a perfect correlation, else scipy's t approximation
    (:mod:`seglab.downstream.stats` says why); it is never 0.
Minimum donors
    A test over fewer than ``min_donors`` donors (default :data:`MIN_DONORS`)
    keeps its rho but gets no p or q (NaN), is never significant, does not
    count in its BH family, and its ``reason`` says so.
FDR family
    By default (``family="all"``) every test of one analysis: all markers x
    features x outcomes of one model at one threshold. ``family`` may instead
    name columns (e.g. ``("marker",)``) to run BH within each group.
Bootstrap
    Tiles are resampled with replacement **within each (donor, marker)**
    group, keeping each group's tile count; donor features and every test are
    recomputed for all ``B`` resamples at once (index arrays, ``np.add.reduceat``,
    one ``rankdata`` over resamples x donors and a matrix product), and BH is
    applied per resample over the same family. The donors and outcomes stay
    fixed. Reported: percentile CI of rho, the fraction of resamples whose rho
    has the observed sign, the fraction with q < alpha. With the same seed and
    the same tiles, two models get the same resampled tiles (a paired bootstrap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.downstream.cohort import Cohort, check_tile_table, donor_features, join_clinical, normalise_ids
from seglab.downstream.features import FEATURES, SENSITIVITY_PERCENTILES, at_percentile, densities
from seglab.downstream.stats import MIN_N, PERM_RESAMPLES, bh_qvalues, spearman_grid

DEFAULT_FEATURES: tuple[str, ...] = ("ratio", "positive_per_mpx", "total_per_mpx")
# the fewest donors whose exact two-sided p can reach 0.05: 2/5! = 0.017, while 4 donors give at best 2/4! = 0.083
MIN_DONORS = 5
TEST_KEY = ["marker", "feature", "outcome"]  # the columns naming one test


# --------------------------------------------------------------------------- correlations


def _feature_cube(cohort: Cohort, markers: Sequence[str], features: Sequence[str]):
    """(M, F, D) donor features over cohort.donors (NaN where a donor has no tile of that marker),
    and (M, D) flags: donor has tiles of the marker; donor has zero cells for it."""
    f = cohort.features
    absent = [ft for ft in features if ft not in f.columns]
    if absent:
        raise SeglabError(
            f"donor feature(s) {absent} not in the table (have: {[c for c in FEATURES if c in f.columns]}); "
            "per-mm2 features need pixel_size_um in tile_table"
        )
    d_pos = {d: i for i, d in enumerate(cohort.donors)}
    m_pos = {m: i for i, m in enumerate(markers)}
    di = f["donor"].map(d_pos).to_numpy()
    mi = f["marker"].map(m_pos).to_numpy()
    ok = ~(pd.isna(di) | pd.isna(mi))
    di, mi = di[ok].astype(np.int64), mi[ok].astype(np.int64)
    cube = np.full((len(markers), len(features), len(cohort.donors)), np.nan)
    cube[mi, :, di] = f.loc[ok, list(features)].to_numpy(np.float64)
    present = np.zeros((len(markers), len(cohort.donors)), dtype=bool)
    present[mi, di] = True
    zero = np.zeros_like(present)
    zero[mi, di] = f.loc[ok, "n_total_cells"].to_numpy() == 0
    return cube, present, zero


def _family_groups(table: pd.DataFrame, family) -> np.ndarray | None:
    """(T,) BH family number of each test row of ``table``, or None for one family of all tests."""
    if family in (None, "all"):
        return None
    cols = [family] if isinstance(family, str) else list(family)
    bad = [c for c in cols if c not in ("marker", "feature", "outcome")]
    if bad:
        raise SeglabError(f"family must be 'all' or columns among marker/feature/outcome; got {family!r}")
    return table.groupby(cols, sort=False).ngroup().to_numpy()


def _check_min_donors(min_donors) -> int:
    """min_donors as an int, or SeglabError unless it is an integer >= MIN_N."""
    if isinstance(min_donors, bool) or not isinstance(min_donors, (int, np.integer)) or min_donors < MIN_N:
        raise SeglabError(f"min_donors must be an integer >= {MIN_N} (a rank correlation needs 3 donors); "
                          f"got {min_donors!r}")
    return int(min_donors)


def _test_reason(nk: int, min_donors: int, rho: float, x: np.ndarray, y: np.ndarray, outcome: str) -> str:
    """Why the test of x and y (D,) over their nk common donors, rho, has no p-value ("" when it has one).

    An undefined rho (too few donors, a constant side) is named before min_donors: it is the
    deeper reason.
    """
    if nk < MIN_N:
        return f"fewer than {MIN_N} donors with data (n={nk})"
    if not np.isfinite(rho):
        m = np.isfinite(x) & np.isfinite(y)
        return "constant feature" if np.ptp(x[m]) == 0 else f"constant {outcome}"
    if nk < min_donors:
        return f"fewer than min_donors={min_donors} donors with data (n={nk}): rho shown, not tested"
    return ""


def _tests_frame(markers, features, outcomes) -> pd.DataFrame:
    """Every (marker, feature, outcome) test in that nested order, one row each (TEST_KEY columns)."""
    idx = pd.MultiIndex.from_product([markers, features, outcomes], names=TEST_KEY)
    return idx.to_frame(index=False)


def correlate(
    cohort: Cohort,
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    markers: Sequence[str] | None = None,
    family="all",
    min_donors: int = MIN_DONORS,
    seed: int = 0,
    n_resamples: int = PERM_RESAMPLES,
) -> pd.DataFrame:
    """Spearman per (marker x feature x outcome) with BH over the family.

    p: exact permutation p up to 9 donors and for |rho| = 1, above that a
    Monte Carlo permutation p from ``n_resamples`` pairings drawn from ``seed``
    (the same p for the same data and seed on every run); see
    :mod:`seglab.downstream.stats`. Fewer pairings give a valid but coarser p
    (calibration studies over hundreds of cohorts use 20,000).

    Returns
    -------
    DataFrame with marker, feature, outcome, n, rho, p, q, reason, n_dropped,
    dropped (donor ids left out of that test and why). ``reason`` is "" for a
    computed test, else why rho, or p and q, are NaN (fewer than ``min_donors``
    donors: rho kept, p and q NaN).
    """
    min_donors = _check_min_donors(min_donors)
    markers = sorted(cohort.features["marker"].unique()) if markers is None else list(markers)
    outs = list(cohort.outcomes.columns)
    Y = cohort.outcomes.to_numpy(np.float64).T  # (K, D)
    donors = np.array(cohort.donors, dtype=object)
    recs = []
    features = list(features)
    cube, present, zero = _feature_cube(cohort, markers, features)
    vy = np.isfinite(Y)
    for a, mk in enumerate(markers):
        rho, n, p = spearman_grid(cube[a], Y, pvalues=True, seed=seed, n_resamples=n_resamples)  # (F, K): every feature x outcome of this marker
        p[n < min_donors] = np.nan  # not a test: out of the BH family, never significant
        for j, ft in enumerate(features):
            x = cube[a, j]
            vx = np.isfinite(x)
            for k, oc in enumerate(outs):
                drops = []
                for i in np.flatnonzero(~vx | ~vy[k]):
                    if not present[a, i]:
                        why = "no tiles"
                    elif not vx[i]:
                        why = "zero cells" if zero[a, i] else "feature undefined"
                    else:
                        why = f"{oc} missing"
                    drops.append(f"{donors[i]}({why})")
                nk = int(n[j, k])
                reason = _test_reason(nk, min_donors, rho[j, k], x, Y[k], oc)
                recs.append(
                    {
                        "marker": mk,
                        "feature": ft,
                        "outcome": oc,
                        "n": nk,
                        "rho": float(rho[j, k]),
                        "p": float(p[j, k]),
                        "reason": reason,
                        "n_dropped": len(drops),
                        "dropped": ";".join(drops),
                    }
                )
    table = pd.DataFrame(recs, columns=["marker", "feature", "outcome", "n", "rho", "p", "reason", "n_dropped", "dropped"])
    table.insert(6, "q", bh_qvalues(table["p"].to_numpy(), _family_groups(table, family)) if len(table) else [])
    return table


# --------------------------------------------------------------------------- bootstrap


@dataclass
class _MarkerTiles:
    """One marker's tiles sorted into (donor) groups, the unit the bootstrap resamples within."""

    marker: str
    donor_pos: np.ndarray  # (G,) position of each donor group in cohort.donors
    starts: np.ndarray  # (G,) first tile of each group in the sorted arrays
    sizes: np.ndarray  # (G,) tiles per group
    cols: dict[str, np.ndarray]  # column -> (N,) float64 tile values, sorted by group
    tile_ids: np.ndarray  # (N,) tile ids in the sorted order the draws index


def _marker_tiles(tiles: pd.DataFrame, cohort: Cohort, positive_col: str) -> list[_MarkerTiles]:
    """The joined donors' tiles per marker (sorted by marker), in a fixed order for paired draws."""
    pos = {d: i for i, d in enumerate(cohort.donors)}
    t = pd.DataFrame(
        {
            "donor": normalise_ids(tiles["donor"]),
            "marker": tiles["marker"].astype(str).to_numpy(),
            "tile_id": tiles["tile_id"].astype(str).to_numpy() if "tile_id" in tiles else np.arange(len(tiles)).astype(str),
            "n_total_cells": tiles["n_total_cells"].to_numpy(np.float64),
            "n_marker_positive": tiles[positive_col].to_numpy(np.float64),
            "area_px": tiles["area_px"].to_numpy(np.float64),
        }
    )
    if "area_um2" in tiles.columns:
        t["area_um2"] = tiles["area_um2"].to_numpy(np.float64)
    t = t[t["donor"].isin(pos)]
    t = t.assign(_pos=t["donor"].map(pos).astype(np.int64))
    # a fixed order (marker, donor, tile id) makes draws reproducible and paired across models
    t = t.sort_values(["marker", "_pos", "tile_id"], kind="stable")
    out = []
    colnames = [c for c in ("n_total_cells", "n_marker_positive", "area_px", "area_um2") if c in t.columns]
    for mk, tm in t.groupby("marker", sort=True):
        p = tm["_pos"].to_numpy()
        starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
        sizes = np.diff(np.r_[starts, p.size])
        out.append(
            _MarkerTiles(
                mk, p[starts], starts, sizes, {c: tm[c].to_numpy(np.float64) for c in colnames}, tm["tile_id"].to_numpy()
            )
        )
    return out


def resample_indices(starts: np.ndarray, sizes: np.ndarray, B: int, rng: np.random.Generator) -> np.ndarray:
    """(B, N) tile indices: each group's tiles drawn with replacement from that group.

    Slot j of group g (``starts[g] <= j < starts[g] + sizes[g]``) holds a tile
    drawn uniformly from group g, so every resample keeps each group's size.
    """
    N = int(sizes.sum())
    g_of_slot = np.repeat(np.arange(sizes.size), sizes)
    off = rng.integers(0, sizes[g_of_slot], size=(B, N), dtype=np.int64)
    return (starts[g_of_slot] + off).astype(np.int32 if N < 2**31 else np.int64)


def _donor_feature_rows(mt: _MarkerTiles, idx: np.ndarray | None, D: int, feats: Sequence[str]) -> dict[str, np.ndarray]:
    """Donor features (R, D) per feature, for resampled tile indices idx (R, N) or the data itself."""
    sums = {}
    for c, v in mt.cols.items():
        vals = v[None, :] if idx is None else v[idx]
        sums[c] = np.add.reduceat(vals, mt.starts, axis=1)  # (R, G)
    dens = densities(sums["n_total_cells"], sums["n_marker_positive"], sums["area_px"], sums.get("area_um2"))
    dens["n_total_cells"] = sums["n_total_cells"]
    dens["n_marker_positive"] = sums["n_marker_positive"]
    R = next(iter(sums.values())).shape[0]
    out = {}
    for f in feats:
        if f not in dens:
            raise SeglabError(f"feature {f!r} needs pixel_size_um in tile_table (per-mm2 features)")
        full = np.full((R, D), np.nan)
        full[:, mt.donor_pos] = dens[f]
        out[f] = full
    return out


def bootstrap_replicates(
    tiles: pd.DataFrame,
    cohort: Cohort,
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    positive_col: str = "n_marker_positive",
    B: int = 1000,
    seed: int = 0,
    family="all",
    max_cells: int = 20_000_000,
    return_draws: bool = False,
    min_donors: int = MIN_DONORS,
):
    """rho and q of every test in every resample (vectorised; see the module notes).

    p-values as in :func:`correlate` with the same ``seed`` (exact up to 9
    donors, Monte Carlo permutation above, both from null samples cached per
    tie pattern; above 9 donors the resampled feature is taken as untied in
    the null, so every resample shares one null per outcome pattern instead
    of drawing its own), NaN below ``min_donors`` donors.

    Returns
    -------
    tests : DataFrame (T rows: marker, feature, outcome), the column order of the arrays
    rho : (B, T) float64
    q : (B, T) float64, BH within each resample over the family
    draws : dict, only with ``return_draws``
        marker -> (tile_ids (N,), indices (B, N)): resample b of that marker
        is ``tile_ids[indices[b]]`` (for checking against a plain loop).
    """
    if not (isinstance(B, (int, np.integer)) and B >= 1):
        raise SeglabError(f"B (bootstrap resamples) must be a positive integer; got {B!r}")
    min_donors = _check_min_donors(min_donors)
    check_tile_table(tiles, ("n_total_cells", positive_col, "area_px"))
    mts = _marker_tiles(tiles, cohort, positive_col)
    Y = cohort.outcomes.to_numpy(np.float64).T
    D = len(cohort.donors)
    outs = list(cohort.outcomes.columns)
    tests = _tests_frame([mt.marker for mt in mts], list(features), outs)
    rho = np.full((B, len(tests)), np.nan)
    p = np.full((B, len(tests)), np.nan)
    n = np.zeros((B, len(tests)), dtype=np.int64)
    ss = np.random.SeedSequence(seed)
    K = len(outs)
    col = 0
    draws = {}
    for mt, child in zip(mts, ss.spawn(len(mts))):  # one stream per marker: adding a marker leaves the others' draws
        rng = np.random.default_rng(child)
        N = int(mt.sizes.sum())
        chunk = max(1, min(B, max_cells // max(N, 1)))  # bound the (chunk, N) index arrays
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            idx = resample_indices(mt.starts, mt.sizes, b1 - b0, rng)
            if return_draws:
                draws.setdefault(mt.marker, (mt.tile_ids, []))[1].append(idx)
            fx = _donor_feature_rows(mt, idx, D, features)
            for j, f in enumerate(features):
                r, nn, pp = spearman_grid(fx[f], Y, pvalues=True, seed=seed, untie_x_null=True)
                sl = slice(col + j * K, col + (j + 1) * K)
                rho[b0:b1, sl] = r
                p[b0:b1, sl] = pp
                n[b0:b1, sl] = nn
        col += len(features) * K
    p[n < min_donors] = np.nan
    q = bh_qvalues(p, _family_groups(tests, family))
    if return_draws:
        return tests, rho, q, {m: (ids, np.concatenate(parts)) for m, (ids, parts) in draws.items()}
    return tests, rho, q


def stability_summary(
    rho_obs: np.ndarray, rho: np.ndarray, q: np.ndarray, *, alpha: float = 0.05, ci: float = 0.95
) -> pd.DataFrame:
    """Per test: percentile CI of rho, fraction same sign, fraction q < alpha, valid resamples."""
    lo, hi = 50 * (1 - ci), 50 * (1 + ci)
    valid = np.isfinite(rho)
    nvalid = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"), _quiet_nan():
        cil = np.nanpercentile(rho, lo, axis=0) if rho.size else np.full(rho.shape[1], np.nan)
        cih = np.nanpercentile(rho, hi, axis=0) if rho.size else np.full(rho.shape[1], np.nan)
        same = (np.sign(rho) == np.sign(rho_obs)[None, :]) & valid
        frac_same = np.where(nvalid > 0, same.sum(0) / np.maximum(nvalid, 1), np.nan)
        frac_sig = (np.nan_to_num(q, nan=1.0) < alpha).mean(axis=0)
    frac_same = np.where(np.isfinite(rho_obs), frac_same, np.nan)
    return pd.DataFrame(
        {
            "rho_ci_low": cil,
            "rho_ci_high": cih,
            "frac_same_sign": frac_same,
            "frac_significant": frac_sig,
            "n_boot_valid": nvalid,
        }
    )


class _quiet_nan:
    """Context that silences RuntimeWarnings (all-NaN slices of resamples are expected)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


# --------------------------------------------------------------------------- analyses


@dataclass
class Analysis:
    """One model's downstream analysis.

    Attributes
    ----------
    donors : DataFrame   donor x marker features (all donors with tiles)
    correlations : DataFrame   one row per test: n, rho, p, q, reason, stability columns
    cohort : Cohort   the join (missing donors by id)
    params : dict   what was run (B, seed, alpha, family, features, positive_col, min_donors)
    """

    donors: pd.DataFrame
    correlations: pd.DataFrame
    cohort: Cohort
    params: dict

    def summary(self) -> dict:
        c = self.correlations
        alpha = self.params["alpha"]
        return {
            "n_tests": int(len(c)),
            "n_tests_computed": int(c["rho"].notna().sum()),
            "n_tests_with_p": int(c["q"].notna().sum()),  # q is NaN exactly where p is (below min_donors, no rho)
            "n_significant": int((c["q"] < alpha).sum()),
            **self.cohort.report(),
        }

    def save(self, out_dir, *, prefix: str = "") -> dict:
        """Write ``<prefix>donor_features.csv``, ``<prefix>correlations.csv`` and
        ``<prefix>downstream.json`` (params, summary, missing donors) atomically; returns the paths."""
        from pathlib import Path

        from seglab.core import io

        out_dir = Path(out_dir)
        paths = {
            "donor_features": io.write_table(out_dir / f"{prefix}donor_features.csv", self.donors),
            "correlations": io.write_table(out_dir / f"{prefix}correlations.csv", self.correlations),
            "summary": io.write_json(out_dir / f"{prefix}downstream.json", {"params": self.params, **self.summary()}),
        }
        return paths


def analyse(
    tiles: pd.DataFrame,
    clinical: pd.DataFrame,
    outcomes: Sequence[str] | None = None,
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    positive_col: str = "n_marker_positive",
    donor_col: str = "projid",
    B: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    ci: float = 0.95,
    family="all",
    min_donors: int = MIN_DONORS,
) -> Analysis:
    """Tile table + clinical table -> donor features, Spearman, BH q and bootstrap stability.

    ``B=0`` skips the bootstrap (the stability columns are then NaN). A test
    over fewer than ``min_donors`` donors is reported with its rho and a
    ``reason``, without p or q, and is never significant.
    """
    if not 0 < alpha < 1:
        raise SeglabError(f"alpha must be in (0, 1); got {alpha!r}")
    min_donors = _check_min_donors(min_donors)
    donors = donor_features(tiles, positive_col=positive_col)
    cohort = join_clinical(donors, clinical, outcomes, donor_col=donor_col)
    if not cohort.donors:
        raise SeglabError(
            f"no donor is in both the tiles and the clinical table (tiles: {cohort.missing_in_clinical[:5]}..., "
            f"clinical: {cohort.missing_in_tiles[:5]}...); check donor_col={donor_col!r} and the id format"
        )
    corr = correlate(cohort, features=features, family=family, min_donors=min_donors, seed=seed)
    if B:
        tests, rho, q = bootstrap_replicates(
            tiles, cohort, features=features, positive_col=positive_col, B=B, seed=seed, family=family,
            min_donors=min_donors,
        )
        order = pd.MultiIndex.from_frame(tests[TEST_KEY]).get_indexer(pd.MultiIndex.from_frame(corr[TEST_KEY]))
        pad = np.full((rho.shape[0], 1), np.nan)  # a test the bootstrap did not see stays NaN
        rho, q = np.hstack([rho, pad]), np.hstack([q, pad])
        stab = stability_summary(corr["rho"].to_numpy(), rho[:, order], q[:, order], alpha=alpha, ci=ci)
    else:
        stab = stability_summary(corr["rho"].to_numpy(), np.empty((0, len(corr))), np.empty((0, len(corr))))
    corr = pd.concat([corr.reset_index(drop=True), stab], axis=1)
    corr["significant"] = corr["q"] < alpha
    params = dict(B=B, seed=seed, alpha=alpha, ci=ci, family=family, features=list(features), positive_col=positive_col,
                  min_donors=min_donors)
    return Analysis(donors=donors, correlations=corr, cohort=cohort, params=params)


def threshold_sensitivity(
    tiles: pd.DataFrame,
    clinical: pd.DataFrame,
    outcomes: Sequence[str] | None = None,
    *,
    percentiles: Iterable[float] = SENSITIVITY_PERCENTILES,
    **kwargs,
) -> pd.DataFrame:
    """The whole analysis at each stored positivity percentile, stacked with a ``percentile`` column.

    Uses the tile table's ``n_positive_p<q>`` columns (one pass over the
    images made them); each percentile is its own FDR family.
    """
    parts = []
    for q in percentiles:
        a = analyse(at_percentile(tiles, q), clinical, outcomes, **kwargs)
        parts.append(a.correlations.assign(percentile=float(q)))
    out = pd.concat(parts, ignore_index=True)
    return out[["percentile", *[c for c in out.columns if c != "percentile"]]]


def _check_same_tiles(tiles_by_model: Mapping[str, pd.DataFrame]) -> None:
    """SeglabError unless every model's tile table holds the first model's tile ids (naming up to
    five missing and five extra ones)."""
    ref_name = next(iter(tiles_by_model))
    ref_ids = set(map(str, tiles_by_model[ref_name]["tile_id"]))
    for name, t in tiles_by_model.items():
        ids = set(map(str, t["tile_id"]))
        if ids != ref_ids:
            only_ref = sorted(ref_ids - ids)[:5]
            only_this = sorted(ids - ref_ids)[:5]
            raise SeglabError(
                f"model {name!r} has different tiles than {ref_name!r} (missing {only_ref}, extra {only_this}); "
                "compare models on the same tiles"
            )


def _side_by_side(analyses: Mapping[str, Analysis]) -> pd.DataFrame:
    """One row per test (outer join over models), columns ``<stat>_<model>`` for n, rho, q, the CI
    of rho, frac_same_sign and frac_significant."""
    stats_cols = ["n", "rho", "q", "rho_ci_low", "rho_ci_high", "frac_same_sign", "frac_significant"]
    side = None
    for m, a in analyses.items():
        part = a.correlations[TEST_KEY + stats_cols].rename(columns={c: f"{c}_{m}" for c in stats_cols})
        side = part if side is None else side.merge(part, on=TEST_KEY, how="outer")
    return side


def _recovery_row(model: str, c: pd.DataFrame, tr: pd.DataFrame, m_sig, m_sign, t_sig, t_sign) -> dict:
    """How one model's calls recover the truth's: ``c`` and ``tr`` are the model's and the truth's
    correlations in the same test order, ``*_sig`` (T,) bool q < alpha and ``*_sign`` (T,) sign of rho."""
    return {
        "model": model,
        "n_truth_significant": int(t_sig.sum()),
        "recovered": float((m_sig & t_sig & (m_sign == t_sign)).sum() / t_sig.sum()) if t_sig.any() else math.nan,
        "n_model_significant": int(m_sig.sum()),
        "false_calls": float((m_sig & ~t_sig).sum() / m_sig.sum()) if m_sig.any() else 0.0,
        "mean_abs_rho_diff": float(np.nanmean(np.abs(c["rho"].to_numpy() - tr["rho"].to_numpy()))),
    }


def _donor_agreement(model: str, donors: pd.DataFrame, truth_donors: pd.DataFrame,
                     features: Sequence[str]) -> list[dict]:
    """Per marker and feature: Spearman of the model's donor feature with the truth's over the donors
    having both, and the median absolute relative error (|model - truth| / |truth|)."""
    tdon = truth_donors.set_index(["donor", "marker"])
    md = donors.set_index(["donor", "marker"])
    rows = []
    for mk in sorted(tdon.index.get_level_values("marker").unique()):
        for f in features:
            tv = tdon.xs(mk, level="marker")[f]
            mv = md.xs(mk, level="marker")[f].reindex(tv.index) if mk in md.index.get_level_values("marker") else tv * np.nan
            ok = tv.notna() & mv.notna()
            r, _ = spearman_grid(mv[ok].to_numpy()[None], tv[ok].to_numpy()[None])
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.abs(mv[ok] - tv[ok]) / np.abs(tv[ok])
            rows.append(
                {
                    "model": model,
                    "marker": mk,
                    "feature": f,
                    "n_donors": int(ok.sum()),
                    "rho_vs_truth": float(r[0, 0]),
                    "median_abs_rel_error": float(np.nanmedian(rel[np.isfinite(rel)])) if np.isfinite(rel).any() else math.nan,
                }
            )
    return rows


def _versus_truth(analyses: Mapping[str, Analysis], truth: str,
                  side: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compare every other model with ``truth``: adds ``abs_rho_diff_vs_truth_<model>`` and
    ``same_call_as_truth_<model>`` to ``side`` (in place) and returns (donor_agreement, recovery)."""
    alpha = analyses[truth].params["alpha"]
    tr = analyses[truth].correlations
    t_sig = (tr["q"] < alpha).to_numpy()
    t_sign = np.sign(tr["rho"].to_numpy())
    agree, rec = [], []
    for m, a in analyses.items():
        if m == truth:
            continue
        c = a.correlations.set_index(TEST_KEY).reindex(tr.set_index(TEST_KEY).index)
        side[f"abs_rho_diff_vs_truth_{m}"] = np.abs(side[f"rho_{m}"] - side[f"rho_{truth}"])
        m_sig = (c["q"] < alpha).to_numpy()
        m_sign = np.sign(c["rho"].to_numpy())
        same_call = (m_sig == t_sig) & (~t_sig | (m_sign == t_sign))
        side[f"same_call_as_truth_{m}"] = side.set_index(TEST_KEY).index.map(
            dict(zip(tr.set_index(TEST_KEY).index, same_call))
        ).to_numpy(bool)
        rec.append(_recovery_row(m, c, tr, m_sig, m_sign, t_sig, t_sign))
        agree.extend(_donor_agreement(m, a.donors, analyses[truth].donors, analyses[truth].params["features"]))
    return pd.DataFrame(agree), pd.DataFrame(rec)


def compare_segmentations(
    tiles_by_model: Mapping[str, pd.DataFrame],
    clinical: pd.DataFrame,
    outcomes: Sequence[str] | None = None,
    *,
    truth: str | None = None,
    **kwargs,
) -> dict:
    """Several models (e.g. baseline, fine-tuned, and ``truth`` = ground-truth masks) on the same tiles.

    Every model's tile table must hold the same tile ids (else SeglabError
    naming the missing tiles). With the same seed the bootstrap is paired: each
    resample draws the same tiles for every model.

    Returns
    -------
    dict with
    ``analyses`` : {model: Analysis}
    ``side_by_side`` : DataFrame, one row per test, columns ``<stat>_<model>``
        for rho, q, n, rho_ci_low, rho_ci_high, frac_same_sign, frac_significant;
        with ``truth``: ``abs_rho_diff_vs_truth_<model>`` and
        ``same_call_as_truth_<model>`` (significance and sign agree).
    ``donor_agreement`` : DataFrame (only with ``truth``): per model, marker and
        feature, Spearman of the model's donor feature with the truth's over
        donors, and the median absolute relative error.
    ``recovery`` : DataFrame (only with ``truth``): per model, the fraction
        of the truth's significant tests also significant with the same sign
        (sensitivity), and the fraction of the model's significant tests that
        the truth does not call (false calls).
    """
    if len(tiles_by_model) < 2:
        raise SeglabError("compare_segmentations needs at least two models' tile tables")
    if truth is not None and truth not in tiles_by_model:
        raise SeglabError(f"truth={truth!r} is not one of the models {list(tiles_by_model)}")
    _check_same_tiles(tiles_by_model)
    analyses = {m: analyse(t, clinical, outcomes, **kwargs) for m, t in tiles_by_model.items()}
    side = _side_by_side(analyses)
    result = {"analyses": analyses, "side_by_side": side}
    if truth is None:
        return result
    result["donor_agreement"], result["recovery"] = _versus_truth(analyses, truth, side)
    return result
