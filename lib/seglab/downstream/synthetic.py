"""Tile and clinical tables with planted donor effects and no images (for tests and benchmarks)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.special import ndtr

from seglab.downstream.cohort import OUTCOMES


def synthetic_tile_table(
    n_donors: int = 30,
    tiles_per_donor: int = 5,
    markers: Mapping[str, float] | Sequence[str] = ("gfap", "iba1", "neun", "olig2", "pecam"),
    outcomes: Sequence[str] = OUTCOMES,
    *,
    seed: int = 0,
    cells_per_tile: float = 80.0,
    base_ratio: float = 0.25,
    tile_sd: float = 0.3,
    outcome_noise: float = 1.0,
    missing_frac: float = 0.05,
    size_px: int = 256,
    ordinal_levels: Mapping[str, int] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A tile table and clinical table with planted donor effects (no images; for tests and benchmarks).

    Each donor has a latent score z ~ N(0, 1); every outcome is z plus
    N(0, outcome_noise) noise (a ``missing_frac`` of values blank). Each tile
    has Poisson(cells_per_tile) cells, of which Binomial(n, p) are positive
    with ``logit p = logit(base_ratio) + effect[marker] * z + N(0, tile_sd)``.
    ``markers`` maps marker -> effect (a list means all effects 0: a null cohort).
    ``ordinal_levels`` maps an outcome to a number of levels: its values are
    cut into 0..levels-1 at equal-probability points of its distribution, so
    donors tie as on a clinical scale (Braak stage, CERAD score); the random
    draws do not change, so the other columns stay those of the same seed.

    Returns
    -------
    tiles : DataFrame with tile_id, donor, marker, area_px, n_total_cells,
        n_marker_positive (donor ids are ints like a ``projid``)
    clinical : DataFrame with projid, latent_score and the outcome columns
    """
    rng = np.random.default_rng(seed)
    effects = dict(markers) if isinstance(markers, Mapping) else {m: 0.0 for m in markers}
    donors = np.arange(n_donors) + 10_000_000
    z = rng.standard_normal(n_donors)
    mk = np.array(list(effects), dtype=object)
    eff = np.array([effects[m] for m in mk], dtype=np.float64)
    d_idx = np.repeat(np.arange(n_donors), mk.size * tiles_per_donor)
    m_idx = np.tile(np.repeat(np.arange(mk.size), tiles_per_donor), n_donors)
    n_tiles = d_idx.size
    n_tot = rng.poisson(cells_per_tile, n_tiles)
    logit = np.log(base_ratio / (1 - base_ratio)) + eff[m_idx] * z[d_idx] + tile_sd * rng.standard_normal(n_tiles)
    n_pos = rng.binomial(n_tot, 1 / (1 + np.exp(-logit)))
    tiles = pd.DataFrame(
        {
            "tile_id": [f"t{i:06d}" for i in range(n_tiles)],
            "donor": donors[d_idx],
            "marker": mk[m_idx],
            "area_px": np.full(n_tiles, size_px * size_px, dtype=np.int64),
            "n_total_cells": n_tot,
            "n_marker_positive": n_pos,
        }
    )
    clin = {"projid": donors, "latent_score": z}
    for o in outcomes:
        v = z + outcome_noise * rng.standard_normal(n_donors)
        v[rng.random(n_donors) < missing_frac] = np.nan
        levels = (ordinal_levels or {}).get(o)
        if levels:
            # z + noise is N(0, 1 + noise^2): its CDF value is uniform, so the levels are equally likely
            v = np.minimum(np.floor(levels * ndtr(v / np.sqrt(1 + outcome_noise ** 2))), levels - 1)
        clin[o] = v
    return tiles, pd.DataFrame(clin)


# levels of the ordinal outcomes of a ROSMAP-like clinical table (Braak 0-6, CERAD 1-4, cognitive diagnoses 1-6)
CLINICAL_LEVELS: dict[str, int] = {"braaksc": 7, "ceradsc": 4, "cogdx": 6, "dcfdx_lv": 6}


def null_calibration(
    n_donors: int,
    n_cohorts: int,
    *,
    effects: Mapping[str, float] | Sequence[str] = ("gfap", "iba1", "neun", "olig2", "pecam"),
    outcomes: Sequence[str] = OUTCOMES,
    ordinal_levels: Mapping[str, int] | None = CLINICAL_LEVELS,
    alpha: float = 0.05,
    min_donors: int | None = None,
    seed: int = 0,
    tiles_per_donor: int = 3,
    cells_per_tile: float = 60.0,
    methods: Mapping[str, Callable] | None = None,
    n_resamples: int | None = None,
) -> pd.DataFrame:
    """False discoveries of :func:`seglab.downstream.correlate.correlate` over simulated cohorts.

    Each cohort is :func:`synthetic_tile_table` (seed ``seed + i``); the tests
    of markers with effect 0 are the null tests (a list of markers: every test
    is null). Every cohort is analysed with the library's p-values (exact up
    to 9 donors, Monte Carlo permutation above, drawn from seed ``seed + i``
    so the cohorts do not share their null draws; ``n_resamples`` pairings, None:
    the library's default), with scipy's t approximation everywhere (what the library
    did before) and with each of ``methods`` (name -> function of the
    :class:`~seglab.downstream.cohort.Cohort` and ``correlate``'s table giving
    one p per row), each BH over all tests at ``alpha``.

    Returns
    -------
    One row per cohort: n_tests (tests with a p-value), min_p, n_p_zero, and
    per method (suffix ``_lib``, ``_t``, ``_<name>``) n_discoveries, n_false,
    fdp (false / discoveries, 0 without any) and any_false.
    """
    from seglab.downstream.cohort import donor_features, join_clinical
    from seglab.downstream.correlate import MIN_DONORS, correlate
    from seglab.downstream.stats import bh_qvalues, spearman_pvalue

    eff = dict(effects) if isinstance(effects, Mapping) else {m: 0.0 for m in effects}
    null_markers = [m for m, e in eff.items() if e == 0]
    rows = []
    for i in range(n_cohorts):
        tiles, clin = synthetic_tile_table(n_donors, tiles_per_donor, eff, outcomes, seed=seed + i,
                                           cells_per_tile=cells_per_tile, ordinal_levels=ordinal_levels)
        cohort = join_clinical(donor_features(tiles), clin, outcomes)
        res = correlate(cohort, min_donors=MIN_DONORS if min_donors is None else min_donors, seed=seed + i,
                        **({} if n_resamples is None else {"n_resamples": int(n_resamples)}))
        null = res["marker"].isin(null_markers).to_numpy()
        p = res["p"].to_numpy()
        row = {"cohort": i, "n_tests": int(np.isfinite(p).sum()), "min_p": float(np.nanmin(p, initial=np.inf)),
               "n_p_zero": int((p == 0).sum())}
        qs = {"lib": res["q"].to_numpy(), "t": bh_qvalues(spearman_pvalue(res["rho"].to_numpy(), res["n"].to_numpy()))}
        qs.update({name: bh_qvalues(np.asarray(fn(cohort, res), dtype=np.float64)) for name, fn in (methods or {}).items()})
        for name, q in qs.items():
            disc = q < alpha  # NaN q: not a discovery
            row[f"n_discoveries_{name}"] = int(disc.sum())
            row[f"n_false_{name}"] = int((disc & null).sum())
            row[f"fdp_{name}"] = (disc & null).sum() / max(disc.sum(), 1)
            row[f"any_false_{name}"] = bool((disc & null).any())
        rows.append(row)
    return pd.DataFrame(rows)
