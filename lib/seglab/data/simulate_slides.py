"""Simulated whole slides written as real files: CZI (pylibCZIrw) and OME-TIFF (tifffile).

A slide is an elliptical piece of tissue on an empty background (so tissue detection has
empty tiles to skip) holding nuclei whose truth is known: a ``DAPI`` channel (every nucleus)
and a marker channel (``CD45``: a ring around a fraction of the nuclei). Cells are uniform over
the tissue, so that many of them straddle any tile grid's borders; a few are large (the area
filter's upper end) and some are small debris (its lower end).

:func:`simulate_slide` writes ``<out>/<slide>.czi`` or ``.ome.tif`` and, unless
``write_truth=False``, ``<slide>.truth.tif`` (uint32 labels, tiled) and ``<slide>.truth.csv``
(one row per cell: label, centroid_y_px, centroid_x_px, area_px, kind, positive). ``kind``:
cell, large, debris (tiny: the area filter's lower end) and, with ``artefact_fraction`` > 0,
planted artefacts a person would reject (fragment, blob; :data:`ARTEFACT_KINDS`). The image is
rendered strip by strip into a disk-backed array, so memory stays far below the slide's size.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.core import io

FORMATS = {"czi": ".czi", "ome-tiff": ".ome.tif"}
CHANNELS = ("DAPI", "CD45")
STRIP_PX = 512
TIFF_TILE_PX = 512


@dataclass(frozen=True)
class SlideSim:
    """What a simulated slide looks like.

    pixel_size_um : um per px (written to the metadata unless ``write_pixel_size`` is False).
    density_per_mpx : nuclei per million px of tissue.
    radius_px, radius_sd : mean nucleus radius (px) and its log-normal SD.
    large_fraction, large_radius_px : fraction of large cells and their radius (px).
    debris_fraction, debris_radius_px : fraction of small debris objects and their radius (px).
    positive_fraction : fraction of cells with a marker (CD45) ring.
    tissue_fraction : semi-axes of the tissue ellipse as a fraction of the slide's half sides.
    min_gap : two centres are at least min_gap x the sum of their long semi-axes apart (< 1: some touch).
    dim_fraction : fraction of dim (out-of-plane) cells, at 0.35 of the brightness.
    background, signal : camera counts of the background and of a nucleus (before noise).
    artefact_fraction : fraction of the ordinary cells replaced by planted artefacts (E9): half
        fragments (radius ``fragment_radius_px`` px, elongated, ``fragment_brightness`` x a nucleus),
        half out-of-focus blobs (radius ``blob_radius_px`` px, soft-edged, ``blob_brightness``).
    """

    pixel_size_um: float = 0.35
    density_per_mpx: float = 750.0
    radius_px: float = 10.0
    radius_sd: float = 0.15
    large_fraction: float = 0.04
    large_radius_px: float = 20.0
    debris_fraction: float = 0.05
    debris_radius_px: float = 3.5
    positive_fraction: float = 0.3
    tissue_fraction: float = 0.85
    min_gap: float = 0.95
    dim_fraction: float = 0.1
    background: float = 100.0
    signal: float = 900.0
    # planted artefacts a person would reject (E9 curation); 0 = none, and then the slide is the same
    # as before these fields existed (no extra random draws, the same cache marker)
    artefact_fraction: float = 0.0
    fragment_radius_px: float = 7.5
    fragment_brightness: float = 1.3
    blob_radius_px: float = 10.0
    blob_brightness: float = 0.45


# kinds of the truth table: real cells (what a person answers "yes" to) and the rest
REAL_CELL_KINDS = ("cell", "large")
ARTEFACT_KINDS = ("fragment", "blob")
_ARTEFACT_FIELDS = ("artefact_fraction", "fragment_radius_px", "fragment_brightness", "blob_radius_px",
                    "blob_brightness")


def is_real_cell(kind) -> np.ndarray:
    """Boolean per truth ``kind``: a real cell (cell, large), not debris or a planted artefact."""
    return np.isin(np.asarray(kind, dtype=object), REAL_CELL_KINDS)


def _sim_record(sim: SlideSim) -> dict:
    """The simulation's fields as the cache marker records them: without the artefact fields when
    there are no artefacts, so the slides written before they existed are still found."""
    d = asdict(sim)
    if not sim.artefact_fraction:
        for k in _ARTEFACT_FIELDS:
            d.pop(k)
    return d


def _cells(rng: np.random.Generator, height: int, width: int, sim: SlideSim) -> pd.DataFrame:
    """Cell centres and shapes: uniform in the tissue ellipse, no two overlapping (a greedy grid check)."""
    cy, cx = height / 2, width / 2
    ay, ax = sim.tissue_fraction * height / 2, sim.tissue_fraction * width / 2
    n = int(rng.poisson(sim.density_per_mpx * math.pi * ay * ax / 1e6))
    kind = rng.choice(np.array(["cell", "large", "debris"]), size=n,
                      p=[1 - sim.large_fraction - sim.debris_fraction, sim.large_fraction, sim.debris_fraction])
    r = sim.radius_px * np.exp(rng.normal(0, sim.radius_sd, n))
    r = np.where(kind == "large", sim.large_radius_px * np.exp(rng.normal(0, 0.08, n)), r)
    r = np.where(kind == "debris", sim.debris_radius_px * np.exp(rng.normal(0, 0.1, n)), r)
    e = rng.uniform(0, 0.2, n)
    a, b = r * (1 + e), r / (1 + e)
    t = rng.uniform(0, 2 * math.pi, n)
    rho = np.sqrt(rng.uniform(0, 1, n))
    y, x = cy + ay * rho * np.sin(t), cx + ax * rho * np.cos(t)
    angle = rng.uniform(0, math.pi, n)
    positive = rng.uniform(0, 1, n) < sim.positive_fraction
    brightness = np.exp(rng.normal(0, 0.25, n)) * np.where(rng.uniform(0, 1, n) < sim.dim_fraction, 0.35, 1.0)
    if sim.artefact_fraction > 0:
        # planted artefacts, drawn after everything else so the cells' draws stay those of a slide without:
        # fragments (small, bright, elongated, no marker) and out-of-focus blobs (dim, larger, soft-edged);
        # their sizes and brightness overlap the real cells' partly (small cells, dim cells)
        art = (kind == "cell") & (rng.uniform(0, 1, n) < sim.artefact_fraction)
        frag = art & (rng.uniform(0, 1, n) < 0.5)
        blob = art & ~frag
        rf = sim.fragment_radius_px * np.exp(rng.normal(0, 0.15, n))
        ef = rng.uniform(0.25, 0.8, n)
        rb = sim.blob_radius_px * np.exp(rng.normal(0, 0.15, n))
        eb = rng.uniform(0.1, 0.5, n)
        bf = sim.fragment_brightness * np.exp(rng.normal(0, 0.25, n))
        bb = sim.blob_brightness * np.exp(rng.normal(0, 0.3, n))
        kind = np.where(frag, "fragment", np.where(blob, "blob", kind))
        a = np.where(frag, rf * (1 + ef), np.where(blob, rb * (1 + eb), a))
        b = np.where(frag, rf / (1 + ef), np.where(blob, rb / (1 + eb), b))
        brightness = np.where(frag, bf, np.where(blob, bb, brightness))
        positive = positive & ~art
    # reject crowding: a cell keeps its place when no kept cell's centre lies within min_gap x (a1 + a2) px
    cell = 2 * sim.large_radius_px * 1.3 + 2
    grid: dict = {}
    keep = np.zeros(n, bool)
    for i in range(n):
        gy, gx = int(y[i] // cell), int(x[i] // cell)
        ok = True
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                for j in grid.get((gy + dy, gx + dx), ()):
                    if (y[i] - y[j]) ** 2 + (x[i] - x[j]) ** 2 < (sim.min_gap * (a[i] + a[j])) ** 2:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            keep[i] = True
            grid.setdefault((gy, gx), []).append(i)
    df = pd.DataFrame({"y": y, "x": x, "a": a, "b": b, "angle": angle, "kind": kind, "positive": positive,
                       "brightness": brightness})[keep].reset_index(drop=True)
    df = df.sort_values("y", kind="stable").reset_index(drop=True)
    df.insert(0, "label", np.arange(1, len(df) + 1, dtype=np.int64))
    return df


def _render_strip(cells: pd.DataFrame, y0: int, y1: int, width: int, sim: SlideSim, seed: int, strip: int,
                  height: int) -> tuple[np.ndarray, np.ndarray]:
    """(2, y1-y0, width) uint16 image and (y1-y0, width) uint32 truth of rows [y0, y1)."""
    from scipy import ndimage as ndi

    pad = 6   # blur margin, px
    ya, yb = max(y0 - pad, 0), min(y1 + pad, height)
    h = yb - ya
    dapi = np.zeros((h, width), np.float32)
    ring = np.zeros((h, width), np.float32)
    labels = np.zeros((h, width), np.uint32)
    reach = 2 * sim.large_radius_px + 4
    lo, hi = np.searchsorted(cells["y"].to_numpy(), [ya - reach, yb + reach])
    for c in cells.iloc[lo:hi].itertuples(index=False):
        half = int(math.ceil(c.a * 1.25)) + 3
        iy, ix = int(round(c.y)), int(round(c.x))
        r0, r1 = max(iy - half, ya), min(iy + half + 1, yb)
        c0, c1 = max(ix - half, 0), min(ix + half + 1, width)
        if r0 >= r1 or c0 >= c1:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
        dy, dx = yy - c.y, xx - c.x
        cs, sn = math.cos(c.angle), math.sin(c.angle)
        u, v = dx * cs + dy * sn, -dx * sn + dy * cs
        rho = np.sqrt((u / c.a) ** 2 + (v / c.b) ** 2)
        inside = rho < 1.0
        sl = (slice(r0 - ya, r1 - ya), slice(c0, c1))
        if c.kind == "blob":   # out of focus: a soft edge instead of the nucleus' sharp one
            dapi[sl] += np.clip((1.25 - rho) / 0.5, 0, 1) * c.brightness
        else:
            dapi[sl] += inside * c.brightness
        labels[sl][inside] = c.label
        if c.positive:
            ring[sl] += ((rho >= 1.0) & (rho < 1.2)) * 0.8 * c.brightness
    # tissue autofluorescence: faint inside the ellipse, none outside
    yy = (np.arange(ya, yb, dtype=np.float32)[:, None] - height / 2) / (sim.tissue_fraction * height / 2)
    xx = (np.arange(width, dtype=np.float32)[None, :] - width / 2) / (sim.tissue_fraction * width / 2)
    tissue = ((yy ** 2 + xx ** 2) < 1.0).astype(np.float32) * 0.06
    rng = np.random.default_rng([seed, strip])
    out = np.empty((2, y1 - y0, width), np.uint16)
    for k, img in enumerate((dapi, ring)):
        img = ndi.gaussian_filter(img + tissue, 1.0) * sim.signal + sim.background
        img = rng.poisson(np.clip(img, 0, None) / 4.0).astype(np.float32) * 4.0 + rng.normal(0, 6, img.shape)
        out[k] = np.clip(img, 0, 65535).astype(np.uint16)[y0 - ya: y0 - ya + (y1 - y0)]
    return out, labels[y0 - ya: y0 - ya + (y1 - y0)]


def simulate_slide(out_dir: str | os.PathLike, name: str, *, size_px: int | tuple[int, int] = 4096, fmt: str = "ome-tiff",
                   seed: int = 0, sim: SlideSim | None = None, write_truth: bool = True,
                   write_pixel_size: bool = True) -> dict:
    """Write one simulated slide; returns {"path", "truth_labels", "truth_cells", "n_cells", "pixel_size_um"}.

    Parameters
    ----------
    out_dir : folder (created). name : the slide's id (file stem).
    size_px : side (or (height, width)) in px. fmt : ``czi`` or ``ome-tiff``.
    seed : the slide's cells and noise. sim : :class:`SlideSim` (defaults).
    write_truth : also write the truth labels (tiled TIFF) and table.
    write_pixel_size : False writes no pixel size into the metadata (to test that error).

    An existing slide of the same name is kept (the call is a no-op) when its marker
    ``<name>.sim.json`` records the same arguments; files are written atomically.
    """
    if fmt not in FORMATS:
        raise SeglabError(f"simulate_slide: fmt={fmt!r}; use one of {', '.join(FORMATS)}")
    sim = sim or SlideSim()
    h, w = (size_px, size_px) if isinstance(size_px, int) else (int(size_px[0]), int(size_px[1]))
    if min(h, w) < 64:
        raise SeglabError(f"simulate_slide: size_px={size_px} is too small (at least 64 px)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}{FORMATS[fmt]}"
    record = {"name": name, "size_px": [h, w], "fmt": fmt, "seed": int(seed), "sim": _sim_record(sim),
              "write_truth": write_truth, "write_pixel_size": write_pixel_size, "version": 1}
    marker = out_dir / f"{name}.sim.json"
    result = {"path": path, "truth_labels": out_dir / f"{name}.truth.tif" if write_truth else None,
              "truth_cells": out_dir / f"{name}.truth.csv" if write_truth else None,
              "pixel_size_um": sim.pixel_size_um}
    if marker.is_file() and path.is_file():
        import json

        old = json.loads(marker.read_text())
        if {k: v for k, v in old.items() if k != "n_cells"} == record:
            return {**result, "n_cells": old["n_cells"]}
    rng = np.random.default_rng(seed)
    cells = _cells(rng, h, w, sim)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}.render.") as tmp:
        img = np.lib.format.open_memmap(Path(tmp) / "img.npy", mode="w+", dtype=np.uint16, shape=(2, h, w))
        lab = np.lib.format.open_memmap(Path(tmp) / "lab.npy", mode="w+", dtype=np.uint32, shape=(h, w)) \
            if write_truth else None
        for s, y0 in enumerate(range(0, h, STRIP_PX)):
            y1 = min(y0 + STRIP_PX, h)
            im, lb = _render_strip(cells, y0, y1, w, sim, seed, s, h)
            img[:, y0:y1] = im
            if lab is not None:
                lab[y0:y1] = lb
        img.flush()
        _write_image(path, img, fmt, sim.pixel_size_um if write_pixel_size else None)
        if write_truth:
            truth = _truth_table(cells, lab)
            io.write_table(result["truth_cells"], truth)
            with io.atomic_path(result["truth_labels"]) as t:
                import tifffile

                tifffile.imwrite(t, lab, tile=(TIFF_TILE_PX, TIFF_TILE_PX), compression="zlib")
        del img, lab
    n = int(len(cells))
    io.write_json(marker, {**record, "n_cells": n})
    return {**result, "n_cells": n}


def _truth_table(cells: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    """The visible cells: label, centroid_y_px, centroid_x_px, area_px (drawn px), kind, positive."""
    from scipy import ndimage as ndi

    n = int(cells["label"].max()) if len(cells) else 0
    area = np.zeros(n + 1, np.int64)
    sy = np.zeros(n + 1)
    sx = np.zeros(n + 1)
    for y0 in range(0, labels.shape[0], STRIP_PX):
        block = np.asarray(labels[y0: y0 + STRIP_PX])
        idx = np.arange(n + 1)
        area += ndi.sum_labels(np.ones_like(block, np.int64), block, idx).astype(np.int64)
        yy = np.broadcast_to(np.arange(y0, y0 + block.shape[0])[:, None], block.shape)
        xx = np.broadcast_to(np.arange(block.shape[1])[None, :], block.shape)
        sy += ndi.sum_labels(yy, block, idx)
        sx += ndi.sum_labels(xx, block, idx)
    lab = cells["label"].to_numpy()
    a = area[lab]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = pd.DataFrame({"label": lab, "centroid_y_px": sy[lab] / a, "centroid_x_px": sx[lab] / a,
                            "area_px": a, "kind": cells["kind"].to_numpy(), "positive": cells["positive"].to_numpy()})
    return out[out["area_px"] > 0].reset_index(drop=True)


def _write_image(path: Path, img: np.ndarray, fmt: str, pixel_size_um: float | None) -> None:
    """(C, Y, X) uint16 -> a CZI (one subblock per 1024 px block and channel) or a tiled OME-TIFF."""
    if fmt == "czi":
        from pylibCZIrw import czi

        with io.atomic_path(path) as tmp:
            tmp.unlink()   # pylibCZIrw creates the file itself
            with czi.create_czi(str(tmp), exist_ok=False) as w:
                block = 1024
                for c in range(img.shape[0]):
                    for y in range(0, img.shape[1], block):
                        for x in range(0, img.shape[2], block):
                            w.write(data=np.ascontiguousarray(img[c, y:y + block, x:x + block]), plane={"C": c},
                                    location=(x, y))
                meta = {"channel_names": {i: n for i, n in enumerate(CHANNELS)}}
                if pixel_size_um is not None:
                    meta.update(scale_x=pixel_size_um * 1e-6, scale_y=pixel_size_um * 1e-6)
                w.write_metadata(**meta)
        return
    import tifffile

    md = {"axes": "CYX", "Channel": {"Name": list(CHANNELS)}}
    if pixel_size_um is not None:
        md.update(PhysicalSizeX=pixel_size_um, PhysicalSizeXUnit="µm", PhysicalSizeY=pixel_size_um,
                  PhysicalSizeYUnit="µm")
    with io.atomic_path(path) as tmp:
        tifffile.imwrite(tmp, img, ome=True, tile=(TIFF_TILE_PX, TIFF_TILE_PX), photometric="minisblack",
                         compression="zlib", metadata=md)


def read_truth(result_or_dir, name: str | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """(truth labels (Y, X) uint32, truth table) of a slide written by :func:`simulate_slide`."""
    import tifffile

    if isinstance(result_or_dir, dict):
        lab_path, cells_path = result_or_dir["truth_labels"], result_or_dir["truth_cells"]
    else:
        lab_path = Path(result_or_dir) / f"{name}.truth.tif"
        cells_path = Path(result_or_dir) / f"{name}.truth.csv"
    return tifffile.imread(lab_path), pd.read_csv(cells_path)


def render_region(size_px: int, seed: int = 0, sim: SlideSim | None = None) -> np.ndarray:
    """A (2, size_px, size_px) uint16 region of tissue full of simulated cells (no file written):
    what one tile of a slide looks like, e.g. to measure a worker's memory on a realistic tile."""
    sim = sim or SlideSim()
    sim = SlideSim(**{**asdict(sim), "tissue_fraction": 1.5})   # tissue everywhere in the region
    cells = _cells(np.random.default_rng(seed), size_px, size_px, sim)
    img, _ = _render_strip(cells, 0, size_px, size_px, sim, seed, 0, size_px)
    return img
