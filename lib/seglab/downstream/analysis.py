"""Tile counts -> donor features -> clinical correlations, FDR, bootstrap stability (E5).

The chain, one function per arrow::

    mask (Y, X) + marker (Y, X)  --measure_tile / tile_features-->  one tile row
    manifest of tiles            --tile_table-->                    tile table
    tile table                   --donor_features-->                donor x marker table
    donor table + clinical       --join_clinical-->                 Cohort (ids reported)
    Cohort                       --correlate-->                     n, rho, p, q per test
    tile table + clinical        --analyse-->                       + bootstrap stability
    tile table + clinical        --threshold_sensitivity-->         the above per percentile
    {model: tile table}          --compare_models-->                side by side (+ vs truth)

Definitions (the study's, made exact)
-------------------------------------
Instance
    A connected set of mask pixels sharing one positive label (ids need not be
    consecutive; 0 is background).
Mean marker intensity of an instance
    The mean of the marker channel over the instance's pixels, computed for all
    instances at once with one ``np.bincount`` pass.
Positive instance
    Mean marker intensity strictly greater than the tile's threshold.
Thresholds (which pixels)
    ``rule="percentile"`` (default, 75th): the q-th percentile (NumPy's default
    linear interpolation) of **all** ``Y * X`` pixels of the tile's marker
    channel, background included. Chosen over "foreground only" so that the
    threshold does not depend on the segmentation: two models compared on one
    tile face the same threshold, and only their instances differ.
    ``rule="fixed"``: one intensity in the marker channel's units for every tile.
    ``rule="otsu"``: Otsu's threshold (``skimage.filters.threshold_otsu``)
    over the tile's **instance means** (not pixels); with fewer than two
    distinct instance means it is undefined, the threshold is set to that one
    mean and no instance is positive.
Tile features
    ``n_total_cells``, ``n_marker_positive``, ``ratio = positive / total``
    (NaN when the tile has no cell), ``total_per_mpx`` and ``positive_per_mpx``
    (cells per 10^6 tile pixels) and, with ``pixel_size_um``, ``*_per_mm2``.
    The tile table also stores the marker percentiles 60, 70, 75, 80, 90
    (``marker_p60`` ...) and the positive count at each (``n_positive_p60``
    ...), so threshold sensitivity re-uses the one pass over the pixels.
Donor features
    Counts and areas are **summed** over the donor's tiles of one marker, then
    ``ratio = sum positive / sum total`` and densities = sum count / sum area.
    Never the mean of tile ratios (that would weight a 3-cell tile like a
    300-cell one). ``n_tiles`` is kept. A donor with zero cells for a marker has
    ``ratio`` NaN and ``reason = "zero cells: ratio undefined"``; it is left
    out of that marker's ratio tests, and the test's ``n`` and ``dropped``
    columns say so.
Donor ids
    Compared as text with surrounding blanks removed; an id made only of
    digits is compared as an integer, so ``"00402800"`` (a file name) joins
    ``402800`` (a CSV that lost its zeros).
Test
    One Spearman correlation per (marker, feature, outcome) over the donors
    that have both values; ``n`` is reported per test; fewer than 3 donors, or a
    constant side, gives NaN with the reason.
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
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.downstream.stats import MIN_N, bh_qvalues, spearman_grid, spearman_pvalue

SENSITIVITY_PERCENTILES: tuple[float, ...] = (60, 70, 75, 80, 90)
DEFAULT_PERCENTILE = 75
RULES = ("percentile", "fixed", "otsu")
DEFAULT_FEATURES: tuple[str, ...] = ("ratio", "positive_per_mpx", "total_per_mpx")
FEATURES = (
    "ratio",
    "positive_per_mpx",
    "total_per_mpx",
    "positive_per_mm2",
    "total_per_mm2",
    "n_marker_positive",
    "n_total_cells",
)
OUTCOMES: tuple[str, ...] = ("braaksc", "ceradsc", "cogdx", "dcfdx_lv", "plaq_d", "plaq_n", "nft", "gpath")
ZERO_CELLS = "zero cells: ratio undefined"
MPX = 1e6  # pixels in a megapixel
UM2_PER_MM2 = 1e6


# --------------------------------------------------------------------------- tiles


def _pct_name(q: float) -> str:
    return f"{q:g}".replace(".", "_")


@dataclass(frozen=True)
class TileMeasure:
    """One pass over a tile: what every positivity rule needs, kept for re-thresholding.

    Attributes
    ----------
    labels : (n,) int64
        Instance ids present in the mask (sorted).
    mean_marker : (n,) float64
        Mean marker intensity of each instance (marker channel units).
    area_px : (n,) int64
        Pixels of each instance.
    height_px, width_px : int
        Tile shape.
    marker_percentiles : dict {q: value}
        Percentile q of all Y*X marker pixels (background included).
    """

    labels: np.ndarray
    mean_marker: np.ndarray
    area_px: np.ndarray
    height_px: int
    width_px: int
    marker_percentiles: dict[float, float] = field(default_factory=dict)

    @property
    def tile_area_px(self) -> int:
        return self.height_px * self.width_px

    @property
    def n_total_cells(self) -> int:
        return int(self.labels.size)


def measure_tile(
    mask: np.ndarray,
    marker: np.ndarray,
    percentiles: Iterable[float] = SENSITIVITY_PERCENTILES,
    *,
    name: str = "tile",
) -> TileMeasure:
    """Instance means and marker-pixel percentiles of one tile, in one pass.

    Parameters
    ----------
    mask : (Y, X) integer array
        Instance labels, 0 = background, any positive ids.
    marker : (Y, X) float array
        The marker channel (any units; finite values).
    percentiles : iterable of float in [0, 100]
        Marker-pixel percentiles to store (over all Y*X pixels).
    name : str
        Used in error messages (the tile id).
    """
    mask = np.asarray(mask)
    marker = np.asarray(marker)
    if mask.ndim != 2:
        raise SeglabError(f"{name}: the mask must be 2-D (Y, X); got shape {mask.shape}")
    if marker.shape != mask.shape:
        raise SeglabError(
            f"{name}: the marker channel has shape {marker.shape} but its mask has {mask.shape}; "
            "pass the (Y, X) marker channel of the same tile as the mask"
        )
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise SeglabError(f"{name}: the mask has dtype {mask.dtype}; instance masks must be integer labels")
    if mask.size and mask.min() < 0:
        raise SeglabError(f"{name}: the mask has negative labels; use 0 for background and positive ids")
    marker = marker.astype(np.float64, copy=False)
    if not np.isfinite(marker).all():
        raise SeglabError(f"{name}: the marker channel has NaN or infinite pixels; fix or mask them before counting")
    flat = mask.ravel().astype(np.int64, copy=False)
    vals = marker.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1024:
        # ids small enough for a direct bincount (no sort)
        area = np.bincount(flat, minlength=top + 1)
        total = np.bincount(flat, weights=vals, minlength=top + 1)
        labels = np.flatnonzero(area)
        labels = labels[labels > 0]
        area, total = area[labels], total[labels]
    else:  # huge sparse ids: compress them first
        uniq, inv = np.unique(flat, return_inverse=True)
        area = np.bincount(inv, minlength=uniq.size)
        total = np.bincount(inv, weights=vals, minlength=uniq.size)
        keep = uniq > 0
        labels, area, total = uniq[keep], area[keep], total[keep]
    qs = [float(q) for q in percentiles]
    pv = np.percentile(vals, qs) if (qs and vals.size) else np.full(len(qs), np.nan)
    return TileMeasure(
        labels=labels.astype(np.int64),
        mean_marker=total / area,
        area_px=area.astype(np.int64),
        height_px=int(mask.shape[0]),
        width_px=int(mask.shape[1]),
        marker_percentiles=dict(zip(qs, (float(v) for v in pv))),
    )


def positivity_threshold(
    measure: TileMeasure,
    rule: str = "percentile",
    *,
    percentile: float = DEFAULT_PERCENTILE,
    fixed_threshold: float | None = None,
) -> float:
    """The tile's positivity threshold (marker units) under one rule; see the module notes."""
    if rule == "percentile":
        q = float(percentile)
        if q not in measure.marker_percentiles:
            raise SeglabError(
                f"percentile {q:g} was not stored for this tile (stored: "
                f"{sorted(measure.marker_percentiles)}); pass it in measure_tile(percentiles=...)"
            )
        return measure.marker_percentiles[q]
    if rule == "fixed":
        if fixed_threshold is None or not np.isfinite(fixed_threshold):
            raise SeglabError("rule='fixed' needs fixed_threshold=<intensity in marker units>")
        return float(fixed_threshold)
    if rule == "otsu":
        means = measure.mean_marker
        if np.unique(means).size < 2:
            # Otsu needs two distinct values; with one (or none) nothing is "above the cut"
            return float(means[0]) if means.size else math.nan
        from skimage.filters import threshold_otsu

        return float(threshold_otsu(means))
    raise SeglabError(f"unknown positivity rule {rule!r}; use one of {RULES}")


def _densities(n_total, n_pos, area_px, area_um2=None) -> dict:
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        out["ratio"] = np.where(n_total > 0, n_pos / np.where(n_total > 0, n_total, 1), np.nan)
        mpx = area_px / MPX
        out["total_per_mpx"] = n_total / mpx
        out["positive_per_mpx"] = n_pos / mpx
        if area_um2 is not None:
            mm2 = area_um2 / UM2_PER_MM2
            out["total_per_mm2"] = n_total / mm2
            out["positive_per_mm2"] = n_pos / mm2
    return out


def tile_features(
    mask: np.ndarray,
    marker: np.ndarray,
    *,
    rule: str = "percentile",
    percentile: float = DEFAULT_PERCENTILE,
    fixed_threshold: float | None = None,
    pixel_size_um: float | None = None,
    sensitivity_percentiles: Iterable[float] = SENSITIVITY_PERCENTILES,
    name: str = "tile",
) -> dict:
    """Counts and densities of one tile (one row of the tile table).

    Returns a dict with height_px, width_px, area_px, n_total_cells, threshold,
    n_marker_positive, ratio, total_per_mpx, positive_per_mpx (and area_um2,
    total_per_mm2, positive_per_mm2 with ``pixel_size_um``), plus
    ``marker_p<q>`` and ``n_positive_p<q>`` for each sensitivity percentile.

    Examples
    --------
    >>> import numpy as np
    >>> mask = np.zeros((4, 4), np.uint16); mask[:2, :2] = 7; mask[2:, 2:] = 9
    >>> marker = np.zeros((4, 4)); marker[2:, 2:] = 5.0
    >>> row = tile_features(mask, marker, rule="fixed", fixed_threshold=1.0)
    >>> row["n_total_cells"], row["n_marker_positive"], row["ratio"]
    (2, 1, 0.5)
    """
    qs = tuple(float(q) for q in sensitivity_percentiles)
    need = qs + ((float(percentile),) if rule == "percentile" and float(percentile) not in qs else ())
    m = measure_tile(mask, marker, need, name=name)
    return _row_from_measure(m, rule, percentile, fixed_threshold, pixel_size_um, qs)


def _row_from_measure(m: TileMeasure, rule, percentile, fixed_threshold, pixel_size_um, qs) -> dict:
    thr = positivity_threshold(m, rule, percentile=percentile, fixed_threshold=fixed_threshold)
    n_pos = int((m.mean_marker > thr).sum())
    area_px = m.tile_area_px
    row = {
        "height_px": m.height_px,
        "width_px": m.width_px,
        "area_px": area_px,
        "n_total_cells": m.n_total_cells,
        "threshold": thr,
        "n_marker_positive": n_pos,
    }
    area_um2 = None
    if pixel_size_um is not None:
        if not (pixel_size_um > 0):
            raise SeglabError(f"pixel_size_um must be a positive number of micrometres; got {pixel_size_um!r}")
        area_um2 = area_px * float(pixel_size_um) ** 2
        row["area_um2"] = area_um2
    row.update({k: float(v) for k, v in _densities(np.float64(m.n_total_cells), np.float64(n_pos), area_px, area_um2).items()})
    for q in qs:
        t = m.marker_percentiles[q]
        row[f"marker_p{_pct_name(q)}"] = t
        row[f"n_positive_p{_pct_name(q)}"] = int((m.mean_marker > t).sum())
    return row


def _default_loaders():
    try:
        from seglab.data import manifest as data
    except ImportError as exc:  # pragma: no cover - only before seglab.data.manifest exists
        raise SeglabError("tile_table needs load_mask= and load_marker= (seglab.data.manifest is not available)") from exc

    def load_marker(row):
        # read the marker file only (load_tile would read DAPI too); same checks on the plane
        path = row.get("marker_path", "") if hasattr(row, "get") else ""
        if not (isinstance(path, str) and path):
            return data.load_tile(row)[1]
        arr = np.squeeze(data.read_tiff(path))
        if arr.ndim != 2:
            raise SeglabError(f"{path}: expected one 2-D marker channel (Y, X), got shape {arr.shape}")
        return arr

    return data.load_mask, load_marker


def tile_table(
    manifest: pd.DataFrame,
    *,
    load_mask: Callable[[pd.Series], np.ndarray] | None = None,
    load_marker: Callable[[pd.Series], np.ndarray] | None = None,
    rule: str = "percentile",
    percentile: float = DEFAULT_PERCENTILE,
    fixed_threshold: float | None = None,
    pixel_size_um: float | None = None,
    sensitivity_percentiles: Iterable[float] = SENSITIVITY_PERCENTILES,
    tile_col: str = "tile_id",
    donor_col: str = "donor",
    marker_col: str = "marker",
    keep_instances: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """The tile table of a manifest: one row per tile, features from its mask and marker.

    Parameters
    ----------
    manifest : DataFrame
        One row per tile with ``tile_col``, ``donor_col``, ``marker_col`` and
        whatever the loaders read (paths).
    load_mask, load_marker : callable(row) -> (Y, X) array
        Read the tile's instance mask and marker channel. Default:
        ``seglab.data.manifest.load_mask(row)`` and ``seglab.data.manifest.load_tile(row)[1]``.
        To count another model's predictions, pass a ``load_mask`` that reads
        that model's mask for the row.
    rule, percentile, fixed_threshold : positivity (see the module notes)
    pixel_size_um : float, optional
        Pixel edge in micrometres; adds area_um2 and ``*_per_mm2``.
    keep_instances : bool
        Also return the per-instance table (tile_id, label, area_px,
        mean_marker) in ``table.attrs["instances"]`` for re-thresholding
        with other rules without reading the images again.

    Returns
    -------
    DataFrame with tile_id, donor, marker and the columns of :func:`tile_features`.
    """
    if not isinstance(manifest, pd.DataFrame):
        raise SeglabError("tile_table needs the manifest as a pandas DataFrame (one row per tile)")
    for col in (tile_col, donor_col, marker_col):
        if col not in manifest.columns:
            raise SeglabError(
                f"the manifest has no {col!r} column (columns: {list(manifest.columns)}); "
                f"pass tile_col=/donor_col=/marker_col= to name it"
            )
    dup = manifest[tile_col][manifest[tile_col].duplicated()]
    if len(dup):
        raise SeglabError(f"the manifest repeats tile ids {sorted(map(str, dup.unique()))[:5]}; each tile once")
    if rule not in RULES:
        raise SeglabError(f"unknown positivity rule {rule!r}; use one of {RULES}")
    if load_mask is None or load_marker is None:
        dm, dk = _default_loaders()
        load_mask = load_mask or dm
        load_marker = load_marker or dk
    qs = tuple(float(q) for q in sensitivity_percentiles)
    need = qs + ((float(percentile),) if rule == "percentile" and float(percentile) not in qs else ())
    rows, inst = [], []
    it = manifest.iterrows()
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(manifest), desc="tiles")
    for _, r in it:
        tid = r[tile_col]
        m = measure_tile(load_mask(r), load_marker(r), need, name=f"tile {tid}")
        row = {"tile_id": tid, "donor": r[donor_col], "marker": r[marker_col]}
        row.update(_row_from_measure(m, rule, percentile, fixed_threshold, pixel_size_um, qs))
        rows.append(row)
        if keep_instances:
            inst.append(pd.DataFrame({"tile_id": tid, "label": m.labels, "area_px": m.area_px, "mean_marker": m.mean_marker}))
    out = pd.DataFrame(rows)
    if keep_instances:
        out.attrs["instances"] = pd.concat(inst, ignore_index=True) if inst else pd.DataFrame(
            columns=["tile_id", "label", "area_px", "mean_marker"]
        )
    return out


def at_percentile(tiles: pd.DataFrame, percentile: float) -> pd.DataFrame:
    """The tile table re-thresholded at a stored percentile (no image is read again).

    Replaces threshold, n_marker_positive, ratio and the positive densities with
    the values at ``percentile`` (which must be one of the stored
    ``n_positive_p<q>`` columns).
    """
    name = _pct_name(float(percentile))
    col = f"n_positive_p{name}"
    if col not in tiles.columns:
        stored = sorted(c[len("n_positive_p"):] for c in tiles.columns if c.startswith("n_positive_p"))
        raise SeglabError(
            f"the tile table has no {col!r} (stored percentiles: {stored}); rebuild it with "
            "tile_table(..., sensitivity_percentiles=...) including this percentile"
        )
    out = tiles.copy()
    out["threshold"] = out[f"marker_p{name}"]
    out["n_marker_positive"] = out[col]
    d = _densities(
        out["n_total_cells"].to_numpy(float),
        out[col].to_numpy(float),
        out["area_px"].to_numpy(float),
        out["area_um2"].to_numpy(float) if "area_um2" in out else None,
    )
    for k, v in d.items():
        out[k] = v
    out.attrs = {}
    return out


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


def _norm_ids(values) -> np.ndarray:
    codes, uniques = pd.factorize(pd.Series(values, dtype=object))  # missing ids get code -1
    norm = np.array([normalise_id(u) for u in uniques] + [""], dtype=object)
    return norm[codes]


def _check_tiles(tiles: pd.DataFrame, cols: Sequence[str]) -> None:
    if not isinstance(tiles, pd.DataFrame):
        raise SeglabError("expected the tile table as a pandas DataFrame (from tile_table)")
    missing = [c for c in ("donor", "marker", *cols) if c not in tiles.columns]
    if missing:
        raise SeglabError(
            f"the tile table lacks columns {missing} (columns: {list(tiles.columns)}); build it with tile_table()"
        )
    name = tiles["tile_id"].astype(str).to_numpy() if "tile_id" in tiles else np.arange(len(tiles)).astype(str)
    ids = _norm_ids(tiles["donor"])
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
    _check_tiles(tiles, ("n_total_cells", positive_col, "area_px"))
    t = pd.DataFrame(
        {
            "donor": _norm_ids(tiles["donor"]),
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
    d = _densities(
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
    ids = _norm_ids(clinical[donor_col])
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
    tile_donors = sorted(set(_norm_ids(donors["donor"])))
    clin_donors = set(cl.index)
    both = sorted(set(tile_donors) & clin_donors, key=_id_key)
    feats = donors.assign(donor=_norm_ids(donors["donor"]))
    return Cohort(
        donors=both,
        outcomes=cl.loc[both],
        features=feats[feats["donor"].isin(both)].reset_index(drop=True),
        missing_in_clinical=sorted(set(tile_donors) - clin_donors, key=_id_key),
        missing_in_tiles=sorted(clin_donors - set(tile_donors), key=_id_key),
    )


def _id_key(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


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
    if family in (None, "all"):
        return None
    cols = [family] if isinstance(family, str) else list(family)
    bad = [c for c in cols if c not in ("marker", "feature", "outcome")]
    if bad:
        raise SeglabError(f"family must be 'all' or columns among marker/feature/outcome; got {family!r}")
    return table.groupby(cols, sort=False).ngroup().to_numpy()


def _tests_frame(markers, features, outcomes) -> pd.DataFrame:
    idx = pd.MultiIndex.from_product([markers, features, outcomes], names=["marker", "feature", "outcome"])
    return idx.to_frame(index=False)


def correlate(
    cohort: Cohort,
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    markers: Sequence[str] | None = None,
    family="all",
) -> pd.DataFrame:
    """Spearman per (marker x feature x outcome) with BH over the family.

    Returns
    -------
    DataFrame with marker, feature, outcome, n, rho, p, q, reason, n_dropped,
    dropped (donor ids left out of that test and why). ``reason`` is "" for a
    computed test, else why rho is NaN.
    """
    markers = sorted(cohort.features["marker"].unique()) if markers is None else list(markers)
    outs = list(cohort.outcomes.columns)
    Y = cohort.outcomes.to_numpy(np.float64).T  # (K, D)
    donors = np.array(cohort.donors, dtype=object)
    recs = []
    features = list(features)
    cube, present, zero = _feature_cube(cohort, markers, features)
    vy = np.isfinite(Y)
    for a, mk in enumerate(markers):
        rho, n = spearman_grid(cube[a], Y)  # (F, K): every feature x outcome of this marker at once
        p = spearman_pvalue(rho, n)
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
                reason = ""
                if nk < MIN_N:
                    reason = f"fewer than {MIN_N} donors with data (n={nk})"
                elif not np.isfinite(rho[j, k]):
                    m = vx & vy[k]
                    reason = "constant feature" if np.ptp(x[m]) == 0 else f"constant {oc}"
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
    marker: str
    donor_pos: np.ndarray  # (G,) position of each donor group in cohort.donors
    starts: np.ndarray  # (G,) first tile of each group in the sorted arrays
    sizes: np.ndarray  # (G,) tiles per group
    cols: dict[str, np.ndarray]  # column -> (N,) float64 tile values, sorted by group
    tile_ids: np.ndarray  # (N,) tile ids in the sorted order the draws index


def _marker_tiles(tiles: pd.DataFrame, cohort: Cohort, positive_col: str) -> list[_MarkerTiles]:
    pos = {d: i for i, d in enumerate(cohort.donors)}
    t = pd.DataFrame(
        {
            "donor": _norm_ids(tiles["donor"]),
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
    dens = _densities(sums["n_total_cells"], sums["n_marker_positive"], sums["area_px"], sums.get("area_um2"))
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
):
    """rho and q of every test in every resample (vectorised; see the module notes).

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
    _check_tiles(tiles, ("n_total_cells", positive_col, "area_px"))
    mts = _marker_tiles(tiles, cohort, positive_col)
    Y = cohort.outcomes.to_numpy(np.float64).T
    D = len(cohort.donors)
    outs = list(cohort.outcomes.columns)
    tests = _tests_frame([mt.marker for mt in mts], list(features), outs)
    rho = np.full((B, len(tests)), np.nan)
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
                r, nn = spearman_grid(fx[f], Y)
                sl = slice(col + j * K, col + (j + 1) * K)
                rho[b0:b1, sl] = r
                n[b0:b1, sl] = nn
        col += len(features) * K
    q = bh_qvalues(spearman_pvalue(rho, n), _family_groups(tests, family))
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
    params : dict   what was run (B, seed, alpha, family, features, positive_col)
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
) -> Analysis:
    """Tile table + clinical table -> donor features, Spearman, BH q and bootstrap stability.

    ``B=0`` skips the bootstrap (the stability columns are then NaN).
    """
    if not 0 < alpha < 1:
        raise SeglabError(f"alpha must be in (0, 1); got {alpha!r}")
    donors = donor_features(tiles, positive_col=positive_col)
    cohort = join_clinical(donors, clinical, outcomes, donor_col=donor_col)
    if not cohort.donors:
        raise SeglabError(
            f"no donor is in both the tiles and the clinical table (tiles: {cohort.missing_in_clinical[:5]}..., "
            f"clinical: {cohort.missing_in_tiles[:5]}...); check donor_col={donor_col!r} and the id format"
        )
    corr = correlate(cohort, features=features, family=family)
    if B:
        tests, rho, q = bootstrap_replicates(
            tiles, cohort, features=features, positive_col=positive_col, B=B, seed=seed, family=family
        )
        key = ["marker", "feature", "outcome"]
        order = pd.MultiIndex.from_frame(tests[key]).get_indexer(pd.MultiIndex.from_frame(corr[key]))
        pad = np.full((rho.shape[0], 1), np.nan)  # a test the bootstrap did not see stays NaN
        rho, q = np.hstack([rho, pad]), np.hstack([q, pad])
        stab = stability_summary(corr["rho"].to_numpy(), rho[:, order], q[:, order], alpha=alpha, ci=ci)
    else:
        stab = stability_summary(corr["rho"].to_numpy(), np.empty((0, len(corr))), np.empty((0, len(corr))))
    corr = pd.concat([corr.reset_index(drop=True), stab], axis=1)
    corr["significant"] = corr["q"] < alpha
    params = dict(B=B, seed=seed, alpha=alpha, ci=ci, family=family, features=list(features), positive_col=positive_col)
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


def compare_models(
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
        raise SeglabError("compare_models needs at least two models' tile tables")
    if truth is not None and truth not in tiles_by_model:
        raise SeglabError(f"truth={truth!r} is not one of the models {list(tiles_by_model)}")
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
    analyses = {m: analyse(t, clinical, outcomes, **kwargs) for m, t in tiles_by_model.items()}
    key = ["marker", "feature", "outcome"]
    stats_cols = ["n", "rho", "q", "rho_ci_low", "rho_ci_high", "frac_same_sign", "frac_significant"]
    side = None
    for m, a in analyses.items():
        part = a.correlations[key + stats_cols].rename(columns={c: f"{c}_{m}" for c in stats_cols})
        side = part if side is None else side.merge(part, on=key, how="outer")
    result = {"analyses": analyses, "side_by_side": side}
    if truth is None:
        return result
    alpha = analyses[truth].params["alpha"]
    tr = analyses[truth].correlations
    t_sig = (tr["q"] < alpha).to_numpy()
    t_sign = np.sign(tr["rho"].to_numpy())
    agree, rec = [], []
    tdon = analyses[truth].donors.set_index(["donor", "marker"])
    feats = analyses[truth].params["features"]
    for m, a in analyses.items():
        if m == truth:
            continue
        c = a.correlations.set_index(key).reindex(tr.set_index(key).index)
        side[f"abs_rho_diff_vs_truth_{m}"] = np.abs(side[f"rho_{m}"] - side[f"rho_{truth}"])
        m_sig = (c["q"] < alpha).to_numpy()
        m_sign = np.sign(c["rho"].to_numpy())
        same_call = (m_sig == t_sig) & (~t_sig | (m_sign == t_sign))
        side[f"same_call_as_truth_{m}"] = side.set_index(key).index.map(
            dict(zip(tr.set_index(key).index, same_call))
        ).to_numpy(bool)
        rec.append(
            {
                "model": m,
                "n_truth_significant": int(t_sig.sum()),
                "recovered": float((m_sig & t_sig & (m_sign == t_sign)).sum() / t_sig.sum()) if t_sig.any() else math.nan,
                "n_model_significant": int(m_sig.sum()),
                "false_calls": float((m_sig & ~t_sig).sum() / m_sig.sum()) if m_sig.any() else 0.0,
                "mean_abs_rho_diff": float(np.nanmean(np.abs(c["rho"].to_numpy() - tr["rho"].to_numpy()))),
            }
        )
        md = a.donors.set_index(["donor", "marker"])
        for mk in sorted(tdon.index.get_level_values("marker").unique()):
            for f in feats:
                tv = tdon.xs(mk, level="marker")[f]
                mv = md.xs(mk, level="marker")[f].reindex(tv.index) if mk in md.index.get_level_values("marker") else tv * np.nan
                ok = tv.notna() & mv.notna()
                r, _ = spearman_grid(mv[ok].to_numpy()[None], tv[ok].to_numpy()[None])
                with np.errstate(divide="ignore", invalid="ignore"):
                    rel = np.abs(mv[ok] - tv[ok]) / np.abs(tv[ok])
                agree.append(
                    {
                        "model": m,
                        "marker": mk,
                        "feature": f,
                        "n_donors": int(ok.sum()),
                        "rho_vs_truth": float(r[0, 0]),
                        "median_abs_rel_error": float(np.nanmedian(rel[np.isfinite(rel)])) if np.isfinite(rel).any() else math.nan,
                    }
                )
    result["donor_agreement"] = pd.DataFrame(agree)
    result["recovery"] = pd.DataFrame(rec)
    return result


# --------------------------------------------------------------------------- synthetic tables


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
