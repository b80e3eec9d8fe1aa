"""Tiles -> tile table: instances, positivity thresholds and per-tile counts and densities (E5).

The downstream chain (``seglab.downstream``), one function per arrow::

    mask (Y, X) + marker (Y, X)  --measure_tile / tile_features-->  one tile row      features
    manifest of tiles            --tile_table-->                    tile table        features
    tile table                   --donor_features-->                donor x marker    cohort
    donor table + clinical       --join_clinical-->                 Cohort            cohort
    Cohort                       --correlate-->                     n, rho, p, q      correlate
    tile table + clinical        --analyse-->                       + bootstrap       correlate
    tile table + clinical        --threshold_sensitivity-->         per percentile    correlate
    {model: tile table}          --compare_segmentations-->                side by side      correlate

(:mod:`seglab.downstream.synthetic` makes tile and clinical tables with planted effects
without images, for tests and benchmarks.)

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from seglab import SeglabError

SENSITIVITY_PERCENTILES: tuple[float, ...] = (60, 70, 75, 80, 90)
DEFAULT_PERCENTILE = 75
RULES = ("percentile", "fixed", "otsu")
# Every tile and donor feature (the per-mm2 ones need pixel_size_um).
FEATURES = (
    "ratio",
    "positive_per_mpx",
    "total_per_mpx",
    "positive_per_mm2",
    "total_per_mm2",
    "n_marker_positive",
    "n_total_cells",
)
MPX = 1e6  # pixels in a megapixel
UM2_PER_MM2 = 1e6


# --------------------------------------------------------------------------- tiles


def _pct_name(q: float) -> str:
    """The column suffix of percentile q: 75 -> '75', 72.5 -> '72_5' (``marker_p<q>``, ``n_positive_p<q>``)."""
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


def densities(n_total, n_pos, area_px, area_um2=None) -> dict:
    """Ratio and densities from cell counts and areas (arrays of one shape, or scalars).

    Parameters
    ----------
    n_total, n_pos : float arrays
        Cells and marker-positive cells.
    area_px : float array
        Area the cells were counted on, px.
    area_um2 : float array, optional
        The same area in um^2; adds the per-mm2 densities.

    Returns
    -------
    dict of arrays of the same shape: ``ratio`` (positive / total, NaN where no
    cell), ``total_per_mpx``, ``positive_per_mpx`` (cells per 10^6 px) and, with
    ``area_um2``, ``total_per_mm2``, ``positive_per_mm2``.
    """
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
    """One tile-table row from a measured tile: counts at the rule's threshold, densities, and the
    marker percentile and positive count at each sensitivity percentile in ``qs``."""
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
    row.update({k: float(v) for k, v in densities(np.float64(m.n_total_cells), np.float64(n_pos), area_px, area_um2).items()})
    for q in qs:
        t = m.marker_percentiles[q]
        row[f"marker_p{_pct_name(q)}"] = t
        row[f"n_positive_p{_pct_name(q)}"] = int((m.mean_marker > t).sum())
    return row


# --------------------------------------------------------------------------- tile table


def _default_loaders():
    """(load_mask, load_marker) of :mod:`seglab.data.manifest`: row -> (Y, X) mask and marker channel."""
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
    d = densities(
        out["n_total_cells"].to_numpy(float),
        out[col].to_numpy(float),
        out["area_px"].to_numpy(float),
        out["area_um2"].to_numpy(float) if "area_um2" in out else None,
    )
    for k, v in d.items():
        out[k] = v
    out.attrs = {}
    return out
