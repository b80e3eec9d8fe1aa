"""Tile table -> donor x marker features, joined with the clinical table into a :class:`Cohort` (E5).

Definitions
-----------
Donor features
    Counts and areas are **summed** over the donor's tiles of one marker, then
    ``ratio = sum positive / sum total`` and densities = sum count / sum area
    (:func:`seglab.downstream.features.densities`). Never the mean of tile
    ratios (that would weight a 3-cell tile like a 300-cell one). ``n_tiles`` is
    kept. A donor with zero cells for a marker has ``ratio`` NaN and
    ``reason = "zero cells: ratio undefined"``; it is left out of that marker's
    ratio tests, and the test's ``n`` and ``dropped`` columns say so.
Donor ids
    Compared as text with surrounding blanks removed; an id made only of
    digits is compared as an integer, so ``"00402800"`` (a file name) joins
    ``402800`` (a CSV that lost its zeros).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.downstream.features import densities

OUTCOMES: tuple[str, ...] = ("braaksc", "ceradsc", "cogdx", "dcfdx_lv", "plaq_d", "plaq_n", "nft", "gpath")
ZERO_CELLS = "zero cells: ratio undefined"


# --------------------------------------------------------------------------- donors


def normalise_id(v) -> str:
    """A donor id as comparison text: blanks stripped; all-digit ids as integers."""
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return ""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))  # a numeric CSV column read as float because of a blank
    s = str(v).strip()
    return str(int(s)) if s.isdigit() else s


def normalise_ids(values) -> np.ndarray:
    """(n,) object array of :func:`normalise_id` of each of ``values`` (n,); missing ids become ''."""
    codes, uniques = pd.factorize(pd.Series(values, dtype=object))  # missing ids get code -1
    norm = np.array([normalise_id(u) for u in uniques] + [""], dtype=object)
    return norm[codes]


def check_tile_table(tiles: pd.DataFrame, cols: Sequence[str]) -> None:
    """SeglabError unless ``tiles`` has donor, marker and ``cols``, every tile a donor id, the count
    columns ``cols`` finite and >= 0, and (with two or more) ``cols[1]`` (positive) <= ``cols[0]`` (total)."""
    if not isinstance(tiles, pd.DataFrame):
        raise SeglabError("expected the tile table as a pandas DataFrame (from tile_table)")
    missing = [c for c in ("donor", "marker", *cols) if c not in tiles.columns]
    if missing:
        raise SeglabError(
            f"the tile table lacks columns {missing} (columns: {list(tiles.columns)}); build it with tile_table()"
        )
    name = tiles["tile_id"].astype(str).to_numpy() if "tile_id" in tiles else np.arange(len(tiles)).astype(str)
    ids = normalise_ids(tiles["donor"])
    if (ids == "").any():
        raise SeglabError(f"tiles {name[ids == ''][:5].tolist()} have no donor id; fix the manifest")
    for c in cols:
        v = pd.to_numeric(tiles[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(v) | (v < 0)
        if bad.any():
            raise SeglabError(
                f"tiles {name[bad][:5].tolist()} have a missing or negative {c!r}; a tile that could not be "
                "counted must be fixed or removed from the table explicitly (it is never dropped silently)"
            )
    if len(cols) >= 2 and (tiles[cols[1]].to_numpy(float) > tiles[cols[0]].to_numpy(float)).any():
        bad = tiles[cols[1]].to_numpy(float) > tiles[cols[0]].to_numpy(float)
        raise SeglabError(f"tiles {name[bad][:5].tolist()} have more positive cells ({cols[1]!r}) than cells")


def donor_features(
    tiles: pd.DataFrame,
    *,
    positive_col: str = "n_marker_positive",
) -> pd.DataFrame:
    """Sum the tile counts per (donor, marker), then ratios and densities.

    Returns
    -------
    DataFrame, one row per (donor, marker): donor (normalised id text), marker,
    n_tiles, n_total_cells, n_marker_positive, area_px, [area_um2], ratio,
    total_per_mpx, positive_per_mpx, [total_per_mm2, positive_per_mm2], reason
    ("" or "zero cells: ratio undefined").
    """
    check_tile_table(tiles, ("n_total_cells", positive_col, "area_px"))
    t = pd.DataFrame(
        {
            "donor": normalise_ids(tiles["donor"]),
            "marker": tiles["marker"].astype(str).to_numpy(),
            "n_total_cells": tiles["n_total_cells"].to_numpy(np.int64),
            "n_marker_positive": tiles[positive_col].to_numpy(np.int64),
            "area_px": tiles["area_px"].to_numpy(np.float64),
        }
    )
    has_um2 = "area_um2" in tiles.columns
    if has_um2:
        t["area_um2"] = tiles["area_um2"].to_numpy(np.float64)
    g = t.groupby(["donor", "marker"], sort=True)
    out = g.sum().reset_index()
    out.insert(2, "n_tiles", g.size().to_numpy())
    d = densities(
        out["n_total_cells"].to_numpy(float),
        out["n_marker_positive"].to_numpy(float),
        out["area_px"].to_numpy(float),
        out["area_um2"].to_numpy(float) if has_um2 else None,
    )
    for k, v in d.items():
        out[k] = v
    out["reason"] = np.where(out["n_total_cells"].to_numpy() == 0, ZERO_CELLS, "")
    return out


# --------------------------------------------------------------------------- clinical


@dataclass
class Cohort:
    """Donor features joined with the clinical table.

    Attributes
    ----------
    donors : list of str
        Donors present in both (normalised ids, sorted), the correlation's rows.
    outcomes : DataFrame
        Numeric outcomes indexed by donor (rows = ``donors``), NaN = missing.
    features : DataFrame
        The donor x marker table restricted to ``donors``.
    missing_in_clinical : list of str
        Donors with tiles but no clinical row (left out of every test).
    missing_in_tiles : list of str
        Donors in the clinical table without any tile.
    """

    donors: list[str]
    outcomes: pd.DataFrame
    features: pd.DataFrame
    missing_in_clinical: list[str]
    missing_in_tiles: list[str]

    def report(self) -> dict:
        """n_donors_joined and the donor ids missing on either side."""
        return {
            "n_donors_joined": len(self.donors),
            "missing_in_clinical": list(self.missing_in_clinical),
            "missing_in_tiles": list(self.missing_in_tiles),
        }


def clean_clinical(
    clinical: pd.DataFrame,
    outcomes: Sequence[str] | None = None,
    *,
    donor_col: str = "projid",
) -> pd.DataFrame:
    """Validate the clinical table: donor column, unique ids, numeric outcomes.

    Returns a DataFrame indexed by normalised donor id with the outcome columns
    as float64 (blank / NA cells become NaN; any other text raises).
    """
    if not isinstance(clinical, pd.DataFrame):
        raise SeglabError("expected the clinical table as a pandas DataFrame (e.g. pd.read_csv('clinical.csv'))")
    if donor_col not in clinical.columns:
        raise SeglabError(
            f"the clinical table has no donor column {donor_col!r} (columns: {list(clinical.columns)}); "
            "pass donor_col= with the name of its donor id column"
        )
    if outcomes is None:
        outcomes = [c for c in OUTCOMES if c in clinical.columns]
        if not outcomes:
            raise SeglabError(
                f"the clinical table has none of the default outcomes {list(OUTCOMES)}; pass outcomes=[...]"
            )
    outcomes = list(outcomes)
    absent = [c for c in outcomes if c not in clinical.columns]
    if absent:
        raise SeglabError(f"the clinical table has no outcome column(s) {absent} (columns: {list(clinical.columns)})")
    ids = normalise_ids(clinical[donor_col])
    if (ids == "").any():
        rows = np.flatnonzero(ids == "").tolist()
        raise SeglabError(f"clinical rows {rows[:5]} have an empty {donor_col!r}; fill or remove them")
    s = pd.Series(ids)
    dup = s[s.duplicated()].unique().tolist()
    if dup:
        raise SeglabError(f"the clinical table lists donor(s) {dup[:5]} more than once in {donor_col!r}; keep one row each")
    out = {}
    for c in outcomes:
        col = clinical[c]
        if pd.api.types.is_bool_dtype(col):
            out[c] = col.astype(np.float64).to_numpy()
            continue
        num = pd.to_numeric(col, errors="coerce")
        bad = num.isna() & col.notna() & ~col.astype(str).str.strip().isin(["", "NA", "NaN", "nan", "None"])
        if bad.any():
            examples = col[bad].astype(str).unique().tolist()[:3]
            raise SeglabError(
                f"outcome column {c!r} is not numeric: values {examples} (e.g. row {int(np.flatnonzero(bad.to_numpy())[0])}); "
                "recode it as numbers (missing as empty) or leave it out of outcomes="
            )
        out[c] = num.to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.DataFrame(out, index=pd.Index(ids, name="donor"))


def join_clinical(
    donors: pd.DataFrame,
    clinical: pd.DataFrame,
    outcomes: Sequence[str] | None = None,
    *,
    donor_col: str = "projid",
) -> Cohort:
    """Join the donor x marker table with the clinical table by donor id.

    Donors on only one side are listed by id in the result (and never enter a
    test); outcome values that are missing are dropped per test.
    """
    cl = clean_clinical(clinical, outcomes, donor_col=donor_col)
    tile_donors = sorted(set(normalise_ids(donors["donor"])))
    clin_donors = set(cl.index)
    both = sorted(set(tile_donors) & clin_donors, key=_id_key)
    feats = donors.assign(donor=normalise_ids(donors["donor"]))
    return Cohort(
        donors=both,
        outcomes=cl.loc[both],
        features=feats[feats["donor"].isin(both)].reset_index(drop=True),
        missing_in_clinical=sorted(set(tile_donors) - clin_donors, key=_id_key),
        missing_in_tiles=sorted(clin_donors - set(tile_donors), key=_id_key),
    )


def _id_key(s: str):
    """Sort key of a normalised id: numeric ids first, by value, then the others as text."""
    return (0, int(s), "") if s.isdigit() else (1, 0, s)
