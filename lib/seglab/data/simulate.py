"""A simulated tissue cohort with a planted answer: tiles, instance masks, clinical table, truth.

The users' tiles (multiplexed fluorescence of aged human brain, DAPI plus one
marker per tile, about 70 donors) are private, so the demo profile and the
tests run on a cohort simulated here, whose answer is known.

What is planted
---------------
- Every donor has a latent pathology score ``z ~ N(0, 1)``. The clinical
  table (``clinical.csv``, donor id ``projid``) derives the seed study's
  outcome columns from ``z`` plus noise: braaksc (0-6), ceradsc (1-4, low =
  more plaques, as in ROSMAP), cogdx (1-6), dcfdx_lv (1-6) and the continuous
  plaq_d, plaq_n, nft, gpath (>= 0). A few values are missing, two donors that
  have tiles are absent from the table and two donors of the table have no
  tiles (``n_missing_clinical``, ``n_clinical_only``).
- Each marker has a planted effect ``beta`` (log-odds per SD of ``z``): the
  probability that a cell of a tile is marker-positive is
  ``sigmoid(logit(base_fraction) + beta * z + tile_sd * e)``, ``e ~ N(0, 1)``
  per tile, and the number of positive cells is Binomial(n_cells, p). Markers
  with ``beta == 0`` are null. ``truth.json`` holds every effect, every
  donor's latent score and true counts; ``cells.csv`` every cell's label and
  positivity; ``tiles.csv`` every tile's counts and nuisances.

How positivity shows in the pixels
----------------------------------
The instance mask of a cell is its nucleus (the DAPI object); labels are
uint16, 0 = background, ids not consecutive (cells lost to occlusion are
dropped). A positive cell carries marker signal over its whole nucleus
(``positive_intensity`` above the background, times a log-normal factor) plus
the marker's morphology outside it: GFAP star-shaped processes, IBA1 thin
branched processes on a small elongated nucleus, NeuN a large soma around a
large nucleus, OLIG2 nuclear signal only, PECAM vessel strands along which the
positive (endothelial, elongated) nuclei lie. A negative nucleus is darker
than the surrounding autofluorescent neuropil (nuclei displace it), so the
downstream default rule -- a cell is positive when its mean marker intensity
over its mask exceeds the tile's 75th percentile of marker pixels -- recovers
the planted positivity on the true masks (about 93 % of cells agree at the
defaults; dim cells, blur and lipofuscin make up most of the rest, see
:func:`positivity_agreement`).

Nuisances (each a parameter of :class:`SimParams`): touching and overlapping
nuclei, size and shape variation, dim (out-of-plane) cells, out-of-focus
tiles, uneven illumination, Poisson-Gaussian noise and bright autofluorescent
lipofuscin granules in both channels, the classic false positive of aged
brain tissue.

Files (``simulate_cohort``): ``tiles/ROSMAP_<projid>_<marker>_<tile>_c0.tif``
(DAPI) and ``_c1.tif`` (marker; about 5 % of tiles store it as ``_c2``),
``masks/ROSMAP_<projid>_<marker>_<tile>.tif``, ``clinical.csv``,
``truth.json``, ``donor_splits.yaml``, ``annotated.csv`` (the annotated tiles
with their split), ``tiles.csv``, ``cells.csv``. Same arguments give
byte-identical files; the folder is built beside the target and renamed into
place, and an existing different cohort is never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.core import io

SIM_VERSION = 1
MARKERS = ("gfap", "iba1", "neun", "olig2", "pecam")
STUDY = "ROSMAP"
CLINICAL_COLUMNS = ("braaksc", "ceradsc", "cogdx", "dcfdx_lv", "plaq_d", "plaq_n", "nft", "gpath")
# Fraction of a positive cell's soma/process signal that shows over another cell's nucleus.
SPILLOVER = 0.25
POSITIVITY_RULE = ("a cell is marker-positive when its mean marker intensity over its instance mask "
                   "exceeds the tile's 75th percentile of marker pixels")

# Planted log-odds effect per SD of the latent score: three markers respond, two are null.
DEFAULT_EFFECTS = {"gfap": 0.8, "iba1": 0.6, "neun": -0.5, "olig2": 0.0, "pecam": 0.0}
# Fraction of positive cells at z = 0.
DEFAULT_BASE_FRACTION = {"gfap": 0.30, "iba1": 0.25, "neun": 0.35, "olig2": 0.30, "pecam": 0.15}


@dataclass(frozen=True)
class SimParams:
    """Nuisance and signal parameters (intensities in arbitrary units: DAPI nucleus = 1).

    Attributes
    ----------
    density_per_mpx : mean nuclei per million pixels (500 = 33 per 256 x 256 tile);
        density_sd : log-normal SD of the per-tile density.
    radius_px : mean nucleus radius, px. radius_sd : log-normal SD of the radius.
    elongation_max : largest axis-ratio excess (a/b = (1+e)^2, e ~ U(0, max)).
    irregularity : amplitude of the radial harmonics 2-4 of the outline.
    touching_fraction, overlap_fraction : fraction of nuclei placed touching
        (centre distance 0.9-1.05 x r1+r2) or overlapping (0.55-0.8 x) an earlier one.
    min_area_px : visible fragments smaller than this are dropped from the mask.
    dim_fraction, dim_factor : fraction of out-of-plane cells and their brightness factor.
    blur_fraction : fraction of out-of-focus tiles; blur_sigma_px their mean Gaussian
        sigma (every tile has a 0.8 px PSF).
    illumination : amplitude of the smooth illumination field (0 = flat).
    photons_per_unit, gain, read_noise, offset : Poisson-Gaussian camera model,
        counts = gain * Poisson(photons_per_unit * intensity) + N(0, read_noise) + offset;
        exposure_sd : log-normal SD of the per-tile exposure (photons_per_unit).
    dapi_background, background_sd : DAPI background level and its per-tile log-normal SD.
    lipofuscin_per_tile : mean number of autofluorescent granule clusters per tile.
    lipofuscin_intensity : their brightness (both channels).
    marker_background : neuropil autofluorescence in the marker channel.
    positive_intensity : marker signal of a positive cell over its nucleus.
    tile_sd : SD of the per-tile logit noise of the positive fraction.
    c2_fraction : fraction of tiles whose marker file is ``_c2`` instead of ``_c1``.
    n_missing_clinical, n_clinical_only : donors with tiles but no clinical row, and the reverse.
    clinical_missing_fraction : fraction of clinical values left empty.
    annotated_train, annotated_val, annotated_test : annotated tiles per split (capped
        at the tiles available in that split).
    val_fraction, test_fraction : fraction of donors in val and test.
    effects, base_fraction : per-marker planted effect and base positive fraction.
    """

    density_per_mpx: float = 500.0
    density_sd: float = 0.25
    radius_px: float = 7.0
    radius_sd: float = 0.18
    elongation_max: float = 0.25
    irregularity: float = 0.06
    touching_fraction: float = 0.25
    overlap_fraction: float = 0.06
    min_area_px: int = 15
    dim_fraction: float = 0.08
    dim_factor: float = 0.4
    blur_fraction: float = 0.12
    blur_sigma_px: float = 2.0
    illumination: float = 0.25
    photons_per_unit: float = 150.0
    exposure_sd: float = 0.35
    dapi_background: float = 0.04
    background_sd: float = 0.5
    gain: float = 6.0
    read_noise: float = 12.0
    offset: float = 100.0
    lipofuscin_per_tile: float = 3.0
    lipofuscin_intensity: float = 2.5
    marker_background: float = 0.15
    positive_intensity: float = 0.9
    tile_sd: float = 0.25
    c2_fraction: float = 0.05
    n_missing_clinical: int = 2
    n_clinical_only: int = 2
    clinical_missing_fraction: float = 0.03
    annotated_train: int = 72
    annotated_val: int = 24
    annotated_test: int = 24
    val_fraction: float = 0.25
    test_fraction: float = 0.25
    effects: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_EFFECTS))
    base_fraction: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_BASE_FRACTION))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SimParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            import difflib
            close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
            raise SeglabError(f"simulate_cohort: unknown parameter(s) {unknown}"
                              + (f" (did you mean '{close[0]}'?)" if close else "") + f"; allowed: {sorted(names)}")
        for name, default in (("effects", DEFAULT_EFFECTS), ("base_fraction", DEFAULT_BASE_FRACTION)):
            if name in kwargs:  # a partial mapping overrides some markers and keeps the rest
                given = kwargs[name]
                if not isinstance(given, dict) or set(given) - set(MARKERS):
                    raise SeglabError(f"simulate_cohort: {name} must map markers ({', '.join(MARKERS)}) to numbers, "
                                      f"got {given!r}")
                kwargs[name] = {**default, **{m: float(v) for m, v in given.items()}}
        p = cls(**kwargs)
        p.check()
        return p

    def check(self) -> None:
        for name in ("effects", "base_fraction"):
            d = getattr(self, name)
            if set(d) != set(MARKERS):
                raise SeglabError(f"simulate_cohort: {name} must give exactly the markers {list(MARKERS)}, got {sorted(d)}")
        for m, f in self.base_fraction.items():
            if not 0 < f < 1:
                raise SeglabError(f"simulate_cohort: base_fraction[{m}]={f} must be in (0, 1)")
        for name in ("touching_fraction", "overlap_fraction", "dim_fraction", "blur_fraction",
                     "c2_fraction", "clinical_missing_fraction", "val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise SeglabError(f"simulate_cohort: {name}={v} must be in [0, 1]")
        if self.touching_fraction + self.overlap_fraction > 1:
            raise SeglabError("simulate_cohort: touching_fraction + overlap_fraction must be <= 1")
        for name in ("density_per_mpx", "radius_px", "photons_per_unit", "gain"):
            if getattr(self, name) <= 0:
                raise SeglabError(f"simulate_cohort: {name} must be > 0")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- small helpers


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def tile_name(projid: int, marker: str, tile: int, width: int = 2) -> str:
    """``ROSMAP_<projid>_<marker>_<tile>`` (the tile id; channel files add ``_c0``/``_c1``/``_c2``)."""
    return f"{STUDY}_{projid}_{marker}_{tile:0{width}d}"


def _smooth_field(rng, size: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit SD, (size, size) float32."""
    from scipy.ndimage import gaussian_filter, zoom

    if sigma >= 4:  # smooth at a quarter of the resolution and upsample: same look, 10x cheaper
        small = -(-size // 4)
        f = gaussian_filter(rng.standard_normal((small, small)).astype(np.float32), sigma / 4, mode="wrap")
        f = zoom(f, 4, order=1, grid_mode=True, mode="grid-wrap")[:size, :size]
    else:
        f = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma, mode="wrap")
    return f / (f.std() + 1e-8)


def _illumination(rng, size: int, amplitude: float) -> np.ndarray:
    """Smooth multiplicative field: a random tilt plus vignetting, mean about 1."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    gx, gy = rng.uniform(-1, 1, 2)
    cx, cy = rng.uniform(-0.5, 0.5, 2)
    field = 1 + amplitude * (0.5 * gx * x + 0.5 * gy * y - 0.5 * ((x - cx) ** 2 + (y - cy) ** 2) + 0.3)
    return np.clip(field, 0.3, None).astype(np.float32)


class _Canvas:
    """Float images of one tile and a helper to add a local patch at a position."""

    def __init__(self, size: int):
        self.size = size
        self.dapi = np.zeros((size, size), np.float32)
        self.marker = np.zeros((size, size), np.float32)
        self.labels = np.zeros((size, size), np.uint16)
        self.nuclei = np.zeros((size, size), bool)

    def window(self, cy: float, cx: float, half: int):
        """Slices of the tile and of a local (2*half+1)^2 grid centred on (cy, cx), plus local coords."""
        iy, ix = int(round(cy)), int(round(cx))
        y0, y1 = max(iy - half, 0), min(iy + half + 1, self.size)
        x0, x1 = max(ix - half, 0), min(ix + half + 1, self.size)
        if y0 >= y1 or x0 >= x1:
            return None
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        return (slice(y0, y1), slice(x0, x1)), yy - cy, xx - cx


def _nucleus_inside(dy, dx, a, b, angle, harm) -> np.ndarray:
    """Boolean mask of an irregular ellipse (semi-axes a, b px, rotated by angle) on local coords."""
    c, s = math.cos(angle), math.sin(angle)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    theta = np.arctan2(v, u)
    boundary = 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in harm)
    return rho < boundary


def _ray(dy, dx, oy, ox, phi, length, width) -> np.ndarray:
    """A tapered line (process) from local point (oy, ox) at angle phi: intensity in [0, 1]."""
    c, s = math.cos(phi), math.sin(phi)
    ry, rx = dy - oy, dx - ox
    along = rx * c + ry * s
    perp = -rx * s + ry * c
    inside = (along > 0) & (along < length)
    taper = 1 - 0.6 * np.clip(along / length, 0, 1)
    return np.where(inside, np.exp(-(perp ** 2) / (2 * (width / 2) ** 2)) * taper, 0).astype(np.float32)


def _vessel_path(rng, size: int) -> np.ndarray:
    """A smooth random curve entering the tile at an edge: (N, 2) points (y, x), 1 px apart."""
    side = rng.integers(4)
    t = rng.uniform(0.15, 0.85) * size
    start = {0: (0, t), 1: (size - 1, t), 2: (t, 0), 3: (t, size - 1)}[int(side)]
    heading = {0: math.pi / 2, 1: -math.pi / 2, 2: 0.0, 3: math.pi}[int(side)] + rng.uniform(-0.5, 0.5)
    pts = [start]
    y, x = start
    curv = 0.0
    for _ in range(int(size * 1.6)):
        curv = 0.9 * curv + rng.normal(0, 0.015)
        heading += curv
        y, x = y + math.sin(heading), x + math.cos(heading)
        if not (-2 <= y <= size + 1 and -2 <= x <= size + 1):
            break
        pts.append((y, x))
    return np.asarray(pts, np.float32)


# --------------------------------------------------------------------------- one tile


@dataclass
class _Cells:
    """The cells of one tile before rendering; every array has shape (n,).

    Attributes
    ----------
    positive, dim : bool, marker-positive and out-of-plane (dimmed) cells.
    r : nucleus radius, px (before the elongation).
    a, b : semi-axes of the nucleus ellipse, px.
    angle : orientation of the ellipse, rad (cells placed on a vessel take its direction).
    cy, cx : float32 centres, px (filled by :func:`_place_cells`).
    """

    positive: np.ndarray
    dim: np.ndarray
    r: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray
    cy: np.ndarray
    cx: np.ndarray

    @property
    def n(self) -> int:
        return int(self.positive.size)


def _draw_cells(rng, marker: str, p_positive: float, size: int, P: SimParams, density_factor: float) -> _Cells:
    """How many cells a ``size`` x ``size`` px tile holds, which are positive and dim, and their
    nucleus shapes (radius and semi-axes in px, angle in rad); centres are left at 0."""
    # Tissue density varies from field to field around the donor's level.
    density = P.density_per_mpx * density_factor * math.exp(rng.normal(0, P.density_sd))
    n = int(rng.poisson(density * size * size / 1e6))
    n_pos = int(rng.binomial(n, p_positive)) if n else 0
    positive = np.zeros(n, bool)
    positive[:n_pos] = True
    rng.shuffle(positive)
    # Positive cells first for PECAM (they sit on the vessels); otherwise a random order.
    order = np.argsort(~positive, kind="stable") if marker == "pecam" else np.arange(n)
    positive = positive[order]
    dim = rng.random(n) < P.dim_fraction

    r = P.radius_px * np.exp(rng.normal(0, P.radius_sd, n))
    e = rng.uniform(0, P.elongation_max, n)
    angle = rng.uniform(0, math.pi, n)
    if marker == "neun":  # neurons: large round nuclei
        r = np.where(positive, r * 1.35, r)
    elif marker == "iba1":  # microglia: small elongated nuclei
        r = np.where(positive, r * 0.85, r)
        e = np.where(positive, e + 0.25, e)
    elif marker == "pecam":  # endothelial: flat, elongated along the vessel
        e = np.where(positive, e + 0.45, e)
    return _Cells(positive=positive, dim=dim, r=r, a=r * (1 + e), b=r / (1 + e), angle=angle,
                  cy=np.zeros(n, np.float32), cx=np.zeros(n, np.float32))


def _draw_vessels(rng, n_positive: int, size: int) -> list[np.ndarray]:
    """One to three vessel paths ((N, 2) points (y, x), px) for a PECAM tile with ``n_positive`` positive cells."""
    n_vessels = 1 + int(n_positive > 6) + int(rng.random() < 0.3)
    return [_vessel_path(rng, size) for _ in range(n_vessels)]


def _place_on_vessel(rng, vessels: list[np.ndarray]):
    """A centre (2,) (y, x) px on a random point of a random vessel, jittered, and the vessel's
    direction there in rad (None on a path too short to have one)."""
    path = vessels[int(rng.integers(len(vessels)))]
    k = int(rng.integers(1, len(path) - 1)) if len(path) > 2 else 0
    centre = path[k] + rng.normal(0, 0.7, 2)
    if len(path) <= 2:
        return centre, None
    d = path[k + 1] - path[k - 1]
    return centre, math.atan2(float(d[0]), float(d[1]))


def _place_in_tissue(rng, cells: _Cells, i: int, placed: int, size: int, P: SimParams):
    """Centre (y, x) px of cell ``i``: touching or overlapping one of the ``placed`` earlier cells,
    or else a free spot (the first of 25 tries clear of the earlier nuclei, else the last try)."""
    cy, cx, r = cells.cy, cells.cx, cells.r
    u = rng.random()
    if placed and u < P.touching_fraction + P.overlap_fraction:
        j = int(rng.integers(placed))
        lo, hi = (0.9, 1.05) if u < P.touching_fraction else (0.55, 0.8)
        dist = (r[i] + r[j]) * rng.uniform(lo, hi)
        th = rng.uniform(0, 2 * math.pi)
        return cy[j] + dist * math.sin(th), cx[j] + dist * math.cos(th)
    for _ in range(25):
        y, x = rng.uniform(-3, size + 3, 2)
        if placed == 0 or np.min(np.hypot(cy[:placed] - y, cx[:placed] - x) / (r[:placed] + r[i])) > 1.1:
            break
    return y, x


def _place_cells(rng, cells: _Cells, vessels: list[np.ndarray], size: int, P: SimParams) -> None:
    """Fill ``cells.cy``/``cells.cx`` (px) in order: positive cells on the vessels (PECAM), the
    others touching, overlapping or free; a cell on a vessel takes its direction as ``angle``."""
    for i in range(cells.n):
        if vessels and cells.positive[i]:
            centre, direction = _place_on_vessel(rng, vessels)
            cells.cy[i], cells.cx[i] = centre
            if direction is not None:
                cells.angle[i] = direction
        else:
            cells.cy[i], cells.cx[i] = _place_in_tissue(rng, cells, i, i, size, P)


def _draw_looks(rng, cells: _Cells, P: SimParams):
    """Per cell: outline harmonics (list of n lists of (k, amplitude, phase)), DAPI brightness (n,)
    and marker level of a positive cell (n,), both in DAPI-nucleus units, dimmed for dim cells."""
    n = cells.n
    harm_all = [[(k, rng.normal(0, P.irregularity / (k - 1)), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4)]
                for _ in range(n)]
    brightness = np.exp(rng.normal(0, 0.2, n)) * np.where(cells.dim, P.dim_factor, 1.0)
    pos_level = P.positive_intensity * np.exp(rng.normal(0, 0.3, n)) * np.where(cells.dim, P.dim_factor, 1.0)
    return harm_all, brightness, pos_level


def _paint_nuclei(rng, cells: _Cells, harm_all, brightness: np.ndarray, size: int) -> _Canvas:
    """A canvas with every nucleus painted: DAPI (with chromatin texture), labels (a later nucleus
    occludes an earlier one; label = index + 1) and the nuclei footprint, all (size, size)."""
    canvas = _Canvas(size)
    texture = 1 + 0.3 * _smooth_field(rng, size, 1.2)  # chromatin texture of DAPI
    texture = np.clip(texture, 0.2, None)
    for i in range(cells.n):
        half = int(math.ceil(max(cells.a[i], cells.b[i]) * 1.4)) + 2
        w = canvas.window(cells.cy[i], cells.cx[i], half)
        if w is None:
            continue
        sl, dy, dx = w
        inside = _nucleus_inside(dy, dx, cells.a[i], cells.b[i], cells.angle[i], harm_all[i])
        canvas.dapi[sl] += inside * brightness[i]
        canvas.labels[sl][inside] = i + 1  # a later nucleus occludes an earlier one
        canvas.nuclei[sl] |= inside
    canvas.dapi *= texture
    return canvas


def _processes(rng, marker: str, dy, dx, sig: np.ndarray, lvl: float, n_proc: int, length: float) -> np.ndarray:
    """``sig`` (local window) with the cell's processes added: GFAP star-shaped, IBA1 thin and
    ramified (one or two side branches each); ``length`` px, ``lvl`` the cell's marker level."""
    phis = rng.uniform(0, 2 * math.pi) + np.arange(n_proc) * 2 * math.pi / n_proc + rng.normal(0, 0.3, n_proc)
    width = 1.6 if marker == "gfap" else 1.0
    rel = 0.7 if marker == "gfap" else 0.55
    for phi in phis:
        L = length * rng.uniform(0.7, 1.1)
        sig = np.maximum(sig, lvl * rel * _ray(dy, dx, 0.0, 0.0, phi, L, width))
        if marker == "iba1":  # ramified: one or two side branches per process
            for _ in range(int(rng.integers(1, 3))):
                t = L * rng.uniform(0.35, 0.75)
                oy, ox = t * math.sin(phi), t * math.cos(phi)
                sig = np.maximum(sig, lvl * rel * 0.8 * _ray(dy, dx, oy, ox, phi + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0),
                                                            L * rng.uniform(0.3, 0.5), width * 0.9))
    return sig


def _paint_positive_cell(rng, canvas: _Canvas, marker: str, cells: _Cells, i: int, harm, lvl: float) -> None:
    """Add positive cell ``i``'s marker morphology (soma, processes) to ``canvas.marker`` (max-blend);
    over another cell's nucleus only ``SPILLOVER`` of it shows."""
    a, b, angle = cells.a[i], cells.b[i], cells.angle[i]
    if marker in ("gfap", "iba1"):
        n_proc = int(rng.integers(4, 8)) if marker == "gfap" else int(rng.integers(3, 6))
        length = cells.r[i] * (rng.uniform(2.5, 4.0) if marker == "gfap" else rng.uniform(3.0, 5.0))
        half = int(math.ceil(length * 1.1)) + 3
    else:
        half = int(math.ceil(max(a, b) * 1.8)) + 2
    w = canvas.window(cells.cy[i], cells.cx[i], half)
    if w is None:
        return
    sl, dy, dx = w
    soma_scale = {"gfap": 1.25, "iba1": 1.15, "neun": 1.6, "olig2": 0.95, "pecam": 1.1}[marker]
    soma = _nucleus_inside(dy, dx, a * soma_scale, b * soma_scale, angle, harm).astype(np.float32)
    sig = soma * lvl
    if marker == "neun":  # cytoplasm a little weaker than the nucleus
        nuc = _nucleus_inside(dy, dx, a, b, angle, harm)
        sig = np.where(nuc, lvl, 0.7 * lvl * soma)
    elif marker in ("gfap", "iba1"):
        sig = _processes(rng, marker, dy, dx, sig, lvl, n_proc, length)
    # Another cell's nucleus lies in another plane of the section: the soma and processes
    # of this cell pass over it only faintly (some spill-over stays, as in real tissue).
    own = canvas.labels[sl]
    sig = np.where((own == 0) | (own == i + 1), sig, SPILLOVER * sig)
    canvas.marker[sl] = np.maximum(canvas.marker[sl], sig)


def _paint_vessels(rng, canvas: _Canvas, vessels: list[np.ndarray], positive: np.ndarray, P: SimParams) -> None:
    """Add a vessel wall (a blurred tube along each path) to ``canvas.marker``; over the nuclei of
    negative cells only ``SPILLOVER`` of it shows. ``positive``: (n,) bool."""
    from scipy.ndimage import gaussian_filter

    size = canvas.size
    for path in vessels:
        tube = np.zeros((size, size), np.float32)
        iy = np.clip(np.round(path[:, 0]).astype(int), 0, size - 1)
        ix = np.clip(np.round(path[:, 1]).astype(int), 0, size - 1)
        tube[iy, ix] = 1.0
        tube = gaussian_filter(tube, rng.uniform(1.2, 2.0))
        tube /= tube.max() + 1e-8
        tube = P.positive_intensity * 0.6 * np.clip(tube * 1.5, 0, 1)
        on_negative = (canvas.labels > 0) & ~np.isin(canvas.labels, np.flatnonzero(positive) + 1)
        canvas.marker = np.maximum(canvas.marker, np.where(on_negative, SPILLOVER * tube, tube))


def _with_backgrounds(rng, canvas: _Canvas, P: SimParams) -> tuple[np.ndarray, np.ndarray]:
    """(dapi, marker) float images (size, size) of the canvas plus their smooth backgrounds: the
    neuropil autofluorescence of the marker channel (dimmer over nuclei) and the DAPI background."""
    size = canvas.size
    # Neuropil autofluorescence in the marker channel; nuclei displace it (darker).
    bg = P.marker_background * np.clip(1 + 0.25 * _smooth_field(rng, size, 6.0), 0.3, None)
    bg = np.where(canvas.nuclei, 0.6 * bg, bg)
    marker_img = canvas.marker + bg
    dapi_bg = P.dapi_background * math.exp(rng.normal(0, P.background_sd))
    dapi_img = canvas.dapi + dapi_bg * np.clip(1 + 0.3 * _smooth_field(rng, size, 8.0), 0.2, None)
    return dapi_img, marker_img


def _add_granules(rng, dapi_img: np.ndarray, marker_img: np.ndarray, ly: float, lx: float, P: SimParams) -> None:
    """Add one lipofuscin cluster (3-8 bright round granules, radius 0.8-1.8 px) around (ly, lx) px
    to both (size, size) images in place (DAPI at 0.7 of the marker's brightness)."""
    size = dapi_img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(3, 9))):
        gy, gx = ly + rng.normal(0, 2.5), lx + rng.normal(0, 2.5)
        gr = rng.uniform(0.8, 1.8)
        y0, y1 = max(int(gy - 4), 0), min(int(gy + 5), size)
        x0, x1 = max(int(gx - 4), 0), min(int(gx + 5), size)
        if y0 >= y1 or x0 >= x1:
            continue
        blob = ((yy[y0:y1, x0:x1] - gy) ** 2 + (xx[y0:y1, x0:x1] - gx) ** 2) < gr ** 2
        amp = P.lipofuscin_intensity * rng.uniform(0.6, 1.2)
        dapi_img[y0:y1, x0:x1] += blob * amp * 0.7
        marker_img[y0:y1, x0:x1] += blob * amp


def _add_lipofuscin(rng, dapi_img: np.ndarray, marker_img: np.ndarray, cells: _Cells, P: SimParams) -> int:
    """Add Poisson(``P.lipofuscin_per_tile``) granule clusters to both images in place, most of them
    beside a nucleus; returns how many."""
    size = dapi_img.shape[0]
    n, n_lipo = cells.n, int(rng.poisson(P.lipofuscin_per_tile))
    for _ in range(n_lipo):
        if n and rng.random() < 0.6:
            j = int(rng.integers(n))
            ang = rng.uniform(0, 2 * math.pi)
            ly = cells.cy[j] + cells.r[j] * 1.1 * math.sin(ang)
            lx = cells.cx[j] + cells.r[j] * 1.1 * math.cos(ang)
        else:
            ly, lx = rng.uniform(0, size, 2)
        _add_granules(rng, dapi_img, marker_img, ly, lx, P)
    return n_lipo


def _acquire(rng, dapi_img: np.ndarray, marker_img: np.ndarray, P: SimParams):
    """The microscope: PSF or defocus blur, illumination, exposure and Poisson-Gaussian camera noise.

    Returns (dapi, marker) uint16 (size, size) count images, whether the tile is out of focus,
    and the blur sigma, px.
    """
    from scipy.ndimage import gaussian_filter

    size = dapi_img.shape[0]
    out_of_focus = bool(rng.random() < P.blur_fraction)
    sigma = float(rng.uniform(0.75, 1.5) * P.blur_sigma_px) if out_of_focus else 0.8
    illum = _illumination(rng, size, P.illumination)
    photons = P.photons_per_unit * math.exp(rng.normal(0, P.exposure_sd))  # exposure varies per field
    images = []
    for img in (dapi_img, marker_img):
        img = gaussian_filter(img.astype(np.float32), sigma) * illum
        counts = P.gain * rng.poisson(np.clip(img, 0, None) * photons).astype(np.float32)
        counts += rng.normal(P.offset, P.read_noise, img.shape).astype(np.float32)
        images.append(np.clip(np.round(counts), 0, 65535).astype(np.uint16))
    return images[0], images[1], out_of_focus, sigma


def _visible_cells(labels: np.ndarray, cells: _Cells, P: SimParams) -> pd.DataFrame:
    """Drop fragments under ``P.min_area_px`` from ``labels`` (uint16 (size, size), in place) and
    return the cells still visible: label, positive, dim, area_px, y, x (centre, px)."""
    n = cells.n
    area = np.bincount(labels.ravel(), minlength=n + 1)
    small = np.flatnonzero((area > 0) & (area < P.min_area_px))
    small = small[small > 0]
    if small.size:
        labels[np.isin(labels, small)] = 0
        area[small] = 0
    visible = np.flatnonzero(area[1:] > 0)
    return pd.DataFrame({"label": visible + 1, "positive": cells.positive[visible], "dim": cells.dim[visible],
                         "area_px": area[visible + 1], "y": np.round(cells.cy[visible], 2),
                         "x": np.round(cells.cx[visible], 2)})


def render_tile(rng: np.random.Generator, marker: str, p_positive: float, size: int,
                P: SimParams, density_factor: float = 1.0) -> dict:
    """Simulate one tile.

    Parameters
    ----------
    rng : the tile's own generator (the cohort derives one per tile from the seed).
    marker : one of :data:`MARKERS`; decides the morphology of positive cells.
    p_positive : probability that a cell is marker-positive.
    size : tile side, px.
    P : simulator parameters.
    density_factor : the donor's multiplier of ``P.density_per_mpx``.

    Returns
    -------
    dict with ``dapi`` and ``marker`` (uint16, (size, size)), ``labels`` (uint16
    instance mask, 0 = background), ``cells`` (DataFrame: label, positive, dim,
    area_px, y, x) and ``info`` (out_of_focus, blur_sigma_px, n_lipofuscin).

    Notes
    -----
    The steps draw from ``rng`` in this order (the cohort's bytes depend on it): cells,
    vessels (PECAM), placement, looks, nuclei, positive cells, vessel walls, backgrounds,
    lipofuscin, acquisition.
    """
    if marker not in MARKERS:
        raise SeglabError(f"render_tile: unknown marker {marker!r}; known: {', '.join(MARKERS)}")
    cells = _draw_cells(rng, marker, p_positive, size, P, density_factor)
    vessels = _draw_vessels(rng, int(cells.positive.sum()), size) if marker == "pecam" else []
    _place_cells(rng, cells, vessels, size, P)
    harm_all, brightness, pos_level = _draw_looks(rng, cells, P)
    canvas = _paint_nuclei(rng, cells, harm_all, brightness, size)
    for i in np.flatnonzero(cells.positive):  # marker morphologies of positive cells
        _paint_positive_cell(rng, canvas, marker, cells, i, harm_all[i], pos_level[i])
    _paint_vessels(rng, canvas, vessels, cells.positive, P)
    dapi_img, marker_img = _with_backgrounds(rng, canvas, P)
    n_lipo = _add_lipofuscin(rng, dapi_img, marker_img, cells, P)
    dapi, marker_counts, out_of_focus, sigma = _acquire(rng, dapi_img, marker_img, P)
    labels = canvas.labels
    cells_table = _visible_cells(labels, cells, P)
    return {"dapi": dapi, "marker": marker_counts, "labels": labels, "cells": cells_table,
            "info": {"out_of_focus": out_of_focus, "blur_sigma_px": round(sigma, 3), "n_lipofuscin": n_lipo}}


# --------------------------------------------------------------------------- donors and clinical table


def _donors(rng, n_donors: int, P: SimParams) -> pd.DataFrame:
    """Donor ids (8-digit, unique), latent scores and density factors for the donors with tiles
    and the ``n_clinical_only`` donors without."""
    total = n_donors + P.n_clinical_only
    ids: list[int] = []
    while len(ids) < total:
        x = int(rng.integers(10_000_000, 99_999_999))
        if x not in ids:
            ids.append(x)
    return pd.DataFrame({"projid": ids, "latent_score": rng.standard_normal(total),
                         "density_factor": np.exp(rng.normal(0, 0.1, total)),
                         "has_tiles": [True] * n_donors + [False] * P.n_clinical_only})


def _clinical(rng, donors: pd.DataFrame, P: SimParams) -> tuple[pd.DataFrame, list[int]]:
    """The clinical table driven by the latent score, and the tile donors left out of it."""
    z = donors["latent_score"].to_numpy()
    m = len(z)

    def ordinal(center, slope, noise, lo, hi):
        return np.clip(np.round(center + slope * z + rng.normal(0, noise, m)), lo, hi)

    def positive(scale, slope, noise):
        return np.round(scale * np.exp(slope * z + rng.normal(0, noise, m)) * (rng.random(m) > 0.05), 4)

    table = pd.DataFrame({
        "projid": donors["projid"].to_numpy(),
        "braaksc": ordinal(3.5, 1.3, 0.7, 0, 6),
        "ceradsc": ordinal(2.5, -0.8, 0.6, 1, 4),
        "cogdx": ordinal(2.8, 1.2, 0.9, 1, 6),
        "dcfdx_lv": ordinal(2.6, 1.1, 0.9, 1, 6),
        "plaq_d": positive(0.5, 0.8, 0.4),
        "plaq_n": positive(0.6, 0.8, 0.4),
        "nft": positive(0.4, 0.9, 0.4),
    })
    table["gpath"] = np.round((table["plaq_d"] + table["plaq_n"] + table["nft"]) / 3, 4)
    for col in CLINICAL_COLUMNS:
        miss = rng.random(m) < P.clinical_missing_fraction
        table.loc[miss, col] = np.nan
    for col in ("braaksc", "ceradsc", "cogdx", "dcfdx_lv"):
        table[col] = table[col].astype("Int64")
    tile_donors = donors.loc[donors["has_tiles"], "projid"].tolist()
    n_missing = min(P.n_missing_clinical, max(len(tile_donors) - 1, 0))
    missing = sorted(int(x) for x in rng.choice(tile_donors, n_missing, replace=False)) if n_missing else []
    table = table[~table["projid"].isin(missing)]
    table = table.sample(frac=1.0, random_state=int(rng.integers(2**31))).reset_index(drop=True)
    return table, missing


def _splits_and_annotated(rng, tile_donors: list[int], K: int, P: SimParams, width: int):
    """Donor splits (train/val/test) and the annotated tiles, spread over donors and markers."""
    order = [int(x) for x in rng.permutation(tile_donors)]
    n = len(order)
    n_val = max(1, int(round(P.val_fraction * n)))
    n_test = max(1, int(round(P.test_fraction * n)))
    if n - n_val - n_test < 1:
        raise SeglabError(f"simulate_cohort: {n} donors are too few for train/val/test splits (need >= 3)")
    splits = {"train": sorted(order[n_val + n_test:]), "val": sorted(order[:n_val]),
              "test": sorted(order[n_val:n_val + n_test])}
    targets = {"train": P.annotated_train, "val": P.annotated_val, "test": P.annotated_test}
    rows = []
    for split, donors in splits.items():
        want = min(targets[split], len(donors) * len(MARKERS) * K)
        # Order: per tile index, passes over the donors taking one marker each (rotated by
        # donor), so the first `want` tiles spread evenly over donors and markers.
        candidates = [(split, d, MARKERS[(mi + di + t) % len(MARKERS)], t)
                      for t in range(K) for mi in range(len(MARKERS)) for di, d in enumerate(donors)]
        rows.extend(candidates[:want])
    annotated = pd.DataFrame(
        [{"tile_id": tile_name(d, m, t, width), "donor": d, "marker": m, "tile": t, "split": s} for s, d, m, t in rows])
    annotated = annotated.sort_values("tile_id").reset_index(drop=True)
    return splits, annotated


# --------------------------------------------------------------------------- the cohort


def _params_record(n_donors, tiles_per_marker, size_px, seed, P: SimParams) -> dict:
    """The arguments of one cohort as stored in ``truth.json`` (``params``): what makes it this cohort."""
    return {"version": SIM_VERSION, "n_donors": int(n_donors), "tiles_per_marker": int(tiles_per_marker),
            "size_px": int(size_px), "seed": int(seed), "nuisance": P.as_dict()}


def _check_sizes(n_donors, tiles_per_marker, size_px) -> None:
    """SeglabError unless n_donors >= 3, tiles_per_marker >= 1 and size_px >= 64 are integers."""
    for name, v, lo in (("n_donors", n_donors, 3), ("tiles_per_marker", tiles_per_marker, 1), ("size_px", size_px, 64)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise SeglabError(f"simulate_cohort: {name}={v!r} must be an integer >= {lo}")


def _write_tile(tmp: Path, seed: int, job: tuple, donors: pd.DataFrame, size_px: int, P: SimParams,
                width: int) -> tuple[dict, pd.DataFrame]:
    """Render one tile from its own generator and write its DAPI, marker and mask TIFFs under ``tmp``.

    ``job`` is (donor index, donor id, marker index, marker, tile index). Returns the tile's row of
    ``tiles.csv`` and its cells (the columns of :func:`render_tile` plus tile_id).
    """
    import tifffile

    di, d, mi, m, t = job
    z = float(donors.loc[di, "latent_score"])
    trng = np.random.default_rng([int(seed), 1, di, mi, t])
    p = _sigmoid(_logit(P.base_fraction[m]) + P.effects[m] * z + P.tile_sd * trng.standard_normal())
    res = render_tile(trng, m, p, size_px, P, float(donors.loc[di, "density_factor"]))
    tid = tile_name(d, m, t, width)
    ch = "c2" if trng.random() < P.c2_fraction else "c1"
    opts = {"compression": "zlib", "photometric": "minisblack"}
    tifffile.imwrite(tmp / "tiles" / f"{tid}_c0.tif", res["dapi"], **opts)
    tifffile.imwrite(tmp / "tiles" / f"{tid}_{ch}.tif", res["marker"], **opts)
    tifffile.imwrite(tmp / "masks" / f"{tid}.tif", res["labels"], **opts)
    cells = res["cells"]
    n_total, n_pos = int(len(cells)), int(cells["positive"].sum())
    row = {"tile_id": tid, "donor": d, "marker": m, "tile": t, "marker_channel": ch,
           "p_positive": round(p, 6), "n_total": n_total, "n_positive": n_pos, **res["info"]}
    return row, cells.assign(tile_id=tid)


def _write_tiles(tmp: Path, seed: int, jobs: list[tuple], donors: pd.DataFrame, size_px: int, P: SimParams,
                 width: int, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Every tile of ``jobs`` in order (:func:`_write_tile`). Returns the tile table, the cell table
    (tile_id, label, positive, dim, area_px, y, x) and the true counts {donor: {marker: {n_total,
    n_positive, n_tiles}}}."""
    tile_rows, cell_tables = [], []
    counts: dict[int, dict[str, dict[str, int]]] = {}
    iterator = jobs
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(jobs, desc="simulate", unit="tile")
    for job in iterator:
        row, cells = _write_tile(tmp, seed, job, donors, size_px, P, width)
        c = counts.setdefault(row["donor"], {}).setdefault(row["marker"], {"n_total": 0, "n_positive": 0, "n_tiles": 0})
        c["n_total"] += row["n_total"]
        c["n_positive"] += row["n_positive"]
        c["n_tiles"] += 1
        tile_rows.append(row)
        cell_tables.append(cells)
    cells_all = pd.concat(cell_tables, ignore_index=True)[["tile_id", "label", "positive", "dim", "area_px", "y", "x"]]
    return pd.DataFrame(tile_rows), cells_all, counts


def _truth(record: dict, P: SimParams, donors: pd.DataFrame, missing: list[int], splits: dict,
           counts: dict, tiles: pd.DataFrame, annotated: pd.DataFrame) -> dict:
    """The content of ``truth.json``: the params, the positivity model, every marker's planted effect,
    every donor's latent score, split and true counts, and the cohort's sizes."""
    tile_donors = donors.loc[donors["has_tiles"], "projid"].tolist()
    z_by = dict(zip(donors["projid"], donors["latent_score"]))
    return {
        "params": record, "seed": record["seed"], "version": SIM_VERSION, "markers_order": list(MARKERS),
        "positivity": {"rule": POSITIVITY_RULE, "model": "p = sigmoid(logit(base_fraction) + effect * latent_score "
                                                          "+ tile_sd * N(0,1)); n_positive ~ Binomial(n_cells, p)",
                       "mask": "instance mask = nucleus; positive cells carry marker over the nucleus "
                               "plus marker morphology outside it"},
        "markers": {m: {"effect": float(P.effects[m]), "null": P.effects[m] == 0.0,
                        "base_fraction": float(P.base_fraction[m])} for m in MARKERS},
        "donors": {str(d): {"latent_score": round(float(z_by[d]), 6), "in_clinical": d not in missing,
                            "split": next(s for s, ds in splits.items() if d in ds), "counts": counts[d]}
                   for d in tile_donors},
        "clinical_only_donors": {str(d): {"latent_score": round(float(z_by[d]), 6)}
                                 for d in donors.loc[~donors["has_tiles"], "projid"]},
        "donors_missing_from_clinical": [int(x) for x in missing],
        "n_tiles": len(tiles), "n_annotated": len(annotated),
        "n_c2_fallbacks": int((tiles["marker_channel"] == "c2").sum()),
    }


def _write_tables(tmp: Path, truth: dict, clinical: pd.DataFrame, annotated: pd.DataFrame, tiles: pd.DataFrame,
                  cells: pd.DataFrame, splits: dict) -> None:
    """Write truth.json, clinical.csv, annotated.csv, tiles.csv, cells.csv and donor_splits.yaml under ``tmp``."""
    import yaml

    io.write_json(tmp / "truth.json", truth)
    clinical.to_csv(tmp / "clinical.csv", index=False)
    annotated.to_csv(tmp / "annotated.csv", index=False)
    tiles.to_csv(tmp / "tiles.csv", index=False)
    cells.to_csv(tmp / "cells.csv", index=False)
    (tmp / "donor_splits.yaml").write_text(
        "# donor-level splits of the annotated tiles (simulated cohort)\n"
        + yaml.safe_dump({k: [int(x) for x in v] for k, v in splits.items()}, sort_keys=False))


def simulate_cohort(out_dir: str | os.PathLike, n_donors: int = 24, tiles_per_marker: int = 4,
                    size_px: int = 256, seed: int = 0, progress: bool = False, **nuisance_params) -> Path:
    """Simulate a cohort into ``out_dir`` (see the module docstring for the layout and the truth).

    Parameters
    ----------
    out_dir : target folder; built in a hidden sibling and renamed into place. If it
        already holds a cohort made with the same arguments it is returned as is;
        if it holds anything else, SeglabError.
    n_donors : donors with tiles (>= 3).
    tiles_per_marker : tiles per marker per donor.
    size_px : tile side, px (>= 64).
    seed : the one seed; every tile draws from its own generator derived from it.
    progress : show a tqdm bar.
    **nuisance_params : fields of :class:`SimParams`.

    Returns
    -------
    Path of the cohort folder.
    """
    out_dir = Path(out_dir)
    _check_sizes(n_donors, tiles_per_marker, size_px)
    P = SimParams.from_kwargs(**nuisance_params)
    record = _params_record(n_donors, tiles_per_marker, size_px, seed, P)
    if out_dir.exists():
        return _existing_cohort(out_dir, record)

    t0 = time.monotonic()
    rng = np.random.default_rng([int(seed), 0])
    donors = _donors(rng, n_donors, P)
    clinical, missing = _clinical(rng, donors, P)
    tile_donors = donors.loc[donors["has_tiles"], "projid"].tolist()
    width = max(2, len(str(tiles_per_marker - 1)))
    splits, annotated = _splits_and_annotated(rng, tile_donors, tiles_per_marker, P, width)

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    (tmp / "tiles").mkdir(parents=True)
    (tmp / "masks").mkdir()
    jobs = [(di, d, mi, m, t) for di, d in enumerate(tile_donors) for mi, m in enumerate(MARKERS)
            for t in range(tiles_per_marker)]
    try:
        tiles, cells, counts = _write_tiles(tmp, seed, jobs, donors, size_px, P, width, progress)
        tiles["annotated"] = tiles["tile_id"].isin(set(annotated["tile_id"]))
        truth = _truth(record, P, donors, missing, splits, counts, tiles, annotated)
        _write_tables(tmp, truth, clinical, annotated, tiles, cells, splits)
        try:
            os.rename(tmp, out_dir)  # atomic; fails if out_dir appeared meanwhile
        except OSError:
            if out_dir.exists():
                return _existing_cohort(out_dir, record)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[seglab] simulated {len(jobs)} tiles of {n_donors} donors in {time.monotonic() - t0:.1f} s -> {out_dir}")
    return out_dir


def _existing_cohort(out_dir: Path, record: dict) -> Path:
    truth_file = out_dir / "truth.json"
    if not truth_file.is_file():
        raise SeglabError(f"{out_dir} exists and is not a simulated cohort (no truth.json); "
                          f"choose another --out or remove the folder")
    try:
        existing = json.loads(truth_file.read_text()).get("params")
    except json.JSONDecodeError:
        existing = None
    if existing != json.loads(json.dumps(record)):
        diff = sorted(k for k in record if (existing or {}).get(k) != json.loads(json.dumps(record[k])))
        raise SeglabError(f"{out_dir} holds a different simulated cohort (differs in {', '.join(diff) or 'params'}); "
                          f"it is never overwritten: choose another output folder or remove it")
    return out_dir


def load_truth(cohort_dir: str | os.PathLike) -> dict:
    """``truth.json`` of a simulated cohort."""
    f = Path(cohort_dir) / "truth.json"
    if not f.is_file():
        raise SeglabError(f"{f} not found: {cohort_dir} is not a simulated cohort (run `seglab simulate` first)")
    return json.loads(f.read_text())


def truth_counts(cohort_dir: str | os.PathLike) -> pd.DataFrame:
    """Per donor and marker: latent_score, n_total, n_positive, n_tiles, positive_fraction (one row each)."""
    truth = load_truth(cohort_dir)
    rows = []
    for d, rec in truth["donors"].items():
        for m, c in rec["counts"].items():
            rows.append({"donor": int(d), "marker": m, "latent_score": rec["latent_score"], **c,
                         "positive_fraction": c["n_positive"] / c["n_total"] if c["n_total"] else float("nan")})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- checks of the planted truth


def rule_positive(marker: np.ndarray, labels: np.ndarray, percentile: float = 75.0) -> pd.DataFrame:
    """The downstream default rule on one tile: per label, mean marker intensity and whether it
    exceeds the tile's ``percentile`` of marker pixels. Columns: label, mean_marker, positive_rule."""
    from scipy import ndimage

    ids = np.unique(labels)
    ids = ids[ids > 0]
    means = ndimage.mean(marker.astype(np.float64), labels, ids) if ids.size else np.array([])
    thr = np.percentile(marker, percentile)
    return pd.DataFrame({"label": ids, "mean_marker": np.asarray(means), "positive_rule": np.asarray(means) > thr})


def positivity_agreement(cohort_dir: str | os.PathLike, tile_ids=None) -> pd.DataFrame:
    """Per tile: planted vs rule-recovered positives on the true masks (n_total, n_positive,
    n_positive_rule, agreement = fraction of cells on which both agree)."""
    import tifffile

    cohort_dir = Path(cohort_dir)
    cells = pd.read_csv(cohort_dir / "cells.csv")
    tiles = pd.read_csv(cohort_dir / "tiles.csv")
    if tile_ids is not None:
        tiles = tiles[tiles["tile_id"].isin(list(tile_ids))]
    rows = []
    for t in tiles.itertuples():
        marker = tifffile.imread(cohort_dir / "tiles" / f"{t.tile_id}_{t.marker_channel}.tif")
        labels = tifffile.imread(cohort_dir / "masks" / f"{t.tile_id}.tif")
        got = rule_positive(marker, labels).merge(cells[cells["tile_id"] == t.tile_id], on="label")
        rows.append({"tile_id": t.tile_id, "marker": t.marker, "donor": t.donor, "n_total": len(got),
                     "n_positive": int(got["positive"].sum()), "n_positive_rule": int(got["positive_rule"].sum()),
                     "agreement": float((got["positive"] == got["positive_rule"]).mean()) if len(got) else float("nan")})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- realism vs DSB2018


def image_stats(image: np.ndarray, labels: np.ndarray) -> dict:
    """Realism statistics of one nuclear image and its instance mask.

    Returns n_objects, density_per_mpx (objects per 10^6 px), median_area_px,
    foreground_fraction, contrast_ratio (median foreground / median background
    intensity, scale-free) and snr (median foreground - median background over
    the background's robust SD (1.4826 x MAD)).
    """
    ids, area = np.unique(labels[labels > 0], return_counts=True)
    fg = labels > 0
    img = image.astype(np.float64)
    bg_vals = img[~fg] if (~fg).any() else img.ravel()
    fg_vals = img[fg] if fg.any() else np.array([np.nan])
    bg_med = float(np.median(bg_vals))
    mad = float(np.median(np.abs(bg_vals - bg_med))) * 1.4826
    fg_med = float(np.median(fg_vals))
    return {"n_objects": int(ids.size), "density_per_mpx": ids.size / labels.size * 1e6,
            "median_area_px": float(np.median(area)) if ids.size else float("nan"),
            "foreground_fraction": float(fg.mean()),
            "contrast_ratio": fg_med / bg_med if bg_med > 0 else float("nan"),
            "snr": (fg_med - bg_med) / mad if mad > 0 else float("nan")}


def realism_table(cohort_dir: str | os.PathLike | None = None, dsb_dir: str | os.PathLike | None = None,
                  max_tiles: int | None = None, dsb_groups=None, seed: int = 0) -> pd.DataFrame:
    """Per-image realism statistics (:func:`image_stats`) of the cohort's DAPI tiles and of DSB2018.

    Columns: source ('simulated' or 'dsb2018'), image, group (marker or DSB group), and the stats.
    ``max_tiles`` samples that many simulated tiles (seeded); ``dsb_groups`` restricts DSB2018
    to some groups (e.g. ['256x256']). Either source may be None.
    """
    import tifffile

    rows = []
    if cohort_dir is not None:
        tiles = pd.read_csv(Path(cohort_dir) / "tiles.csv")
        if max_tiles is not None and max_tiles < len(tiles):
            tiles = tiles.sample(n=max_tiles, random_state=seed).sort_values("tile_id")
        for t in tiles.itertuples():
            img = tifffile.imread(Path(cohort_dir) / "tiles" / f"{t.tile_id}_c0.tif")
            lab = tifffile.imread(Path(cohort_dir) / "masks" / f"{t.tile_id}.tif")
            rows.append({"source": "simulated", "image": t.tile_id, "group": t.marker, **image_stats(img, lab)})
    if dsb_dir is not None:
        from seglab.data.dsb import dsb2018_table, load_dsb2018

        table = dsb2018_table(dsb_dir)
        if dsb_groups is not None:
            table = table[table["group"].isin(list(dsb_groups))]
        for _, row in table.iterrows():
            img, lab = load_dsb2018(row)
            if img.ndim == 3:
                img = img[..., 0] if img.shape[-1] in (3, 4) else img[0]
            rows.append({"source": "dsb2018", "image": row["name"], "group": row["group"], **image_stats(img, lab)})
    return pd.DataFrame(rows)


def realism_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Median and interquartile range of each statistic per source (rows: source x statistic)."""
    stats = ["density_per_mpx", "median_area_px", "foreground_fraction", "contrast_ratio", "snr"]
    rows = []
    for source, g in table.groupby("source", sort=True):
        for s in stats:
            v = g[s].dropna()
            rows.append({"source": source, "statistic": s, "n_images": len(v), "median": float(v.median()),
                         "q25": float(v.quantile(0.25)), "q75": float(v.quantile(0.75))})
    return pd.DataFrame(rows)
