"""Tile and clinical tables with planted donor effects and no images (for tests and benchmarks)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A tile table and clinical table with planted donor effects (no images; for tests and benchmarks).

    Each donor has a latent score z ~ N(0, 1); every outcome is z plus
    N(0, outcome_noise) noise (a ``missing_frac`` of values blank). Each tile
    has Poisson(cells_per_tile) cells, of which Binomial(n, p) are positive
    with ``logit p = logit(base_ratio) + effect[marker] * z + N(0, tile_sd)``.
    ``markers`` maps marker -> effect (a list means all effects 0: a null cohort).

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
        clin[o] = v
    return tiles, pd.DataFrame(clin)
