"""Whole-slide inference: tiles with overlap, border objects resolved once, resumable per tile.

:func:`predict_slide` segments one slide (:func:`seglab.data.slides.open_slide`) into
``<out>/<slide>/``:

1. **Grid** (:func:`tile_grid`): cores of ``tile_px`` x ``tile_px`` px partition the slide; each
   tile is read with ``overlap_px`` of context on every side (``overlap_px`` >= the largest
   object's diameter, px; a tile smaller than its overlap is refused).
2. **Tissue** (:func:`tissue_fractions`): a thumbnail of the first channel (block means,
   ``thumb_factor`` px per thumbnail px, smoothed) is thresholded (Otsu); a tile whose core holds
   less than ``min_tissue_fraction`` tissue is skipped.
3. **Sample** (:func:`sample_tiles`): a seeded fraction of the tissue tiles (0.1 for an annotation
   round, 1.0 for the full run); a 10% sample is a subset of a 20% one with the same seed, so a
   full run after a sampled one reuses the sampled tiles. Recorded in ``run.json``.
4. **Tiles** (:func:`segment_tile`): each window is segmented once; an object is kept by the tile
   whose **core holds its centroid** (so none is cut in two or counted twice: with the overlap at
   least the object's size, the window holds the whole object). Each tile's kept objects are an
   output set ``tiles/<tile>.{npz,csv,json}`` (:func:`seglab.core.io.write_set`): a rerun skips
   complete tiles.
5. **Merge** (:func:`merge_slide`): the check that every selected tile was done exactly once
   with one model and one set of mask settings and that no object id repeats
   (``merge_check.json``); the um^2 area filter (:class:`seglab.core.units.AreaFilter`, the one
   conversion); the instance table ``instances.csv`` (object_id, label, centroid px and um,
   area_px, area_um2, mean intensity per channel, tile, ...); every detection with its filter
   verdict (``detections.csv``); with a curation classifier (``classifier=``, :mod:`seglab.curate`)
   its ``classifier_confidence`` per object and ``kept`` (confidence >= ``classifier_threshold``):
   ``instances.csv`` holds the objects kept by both filters, ``detections.csv`` every one with both
   verdicts, ``run.json`` the counts before and after the classifier; the label image as OME-Zarr (``labels.ome.zarr``, chunked);
   the QC thumbnail with outlines (``qc.png``); ``run.json``.

Object ids are stable: ``<slide>-<10 hex>`` from the slide id and the object's geometry (its
bounding box and area in px), so the same mask gets the same id in every run and export.
Devices are ``torch.device`` objects (:func:`as_device`); a string is converted once, at the
entry point, and checked against what torch sees.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings
from seglab.core import io
from seglab.core.objects import object_id
from seglab.core.units import AreaFilter, px_to_um, px_to_um2
from seglab.data import slides as slides_io

TILES = "tiles"
INSTANCES = "instances.csv"
DETECTIONS = "detections.csv"
TILE_TABLE = "tiles.csv"
RUN_RECORD = "run.json"
MERGE_CHECK = "merge_check.json"
LABELS = "labels.ome.zarr"
QC = "qc.png"
THUMB = "thumbnail.npz"
OUTPUT_SET = "slide"
LABEL_CHUNK_PX = 1024


# --------------------------------------------------------------------------- devices


def as_device(device=None):
    """A ``torch.device`` from a torch.device, a string (``"cpu"``, ``"cuda"``, ``"cuda:1"``) or None
    (``$SEGLAB_DEVICE`` via :func:`seglab.segment.models.requested_device`: CUDA when torch sees it).

    Raises SeglabError for an unknown name or a CUDA device torch cannot see, before any work.
    """
    import torch

    from seglab.segment import models

    if device is None:
        asked = models.requested_device()
        device = "cuda" if (asked == "cuda" or (asked == "auto" and torch.cuda.is_available())) else "cpu"
    if not isinstance(device, torch.device):
        try:
            device = torch.device(str(device))
        except (RuntimeError, TypeError) as exc:
            raise SeglabError(f"device {device!r}: not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SeglabError(f"device {device}: seglab runs on cpu or cuda")
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (device.index is not None and device.index >= n):
            raise SeglabError(f"device {device}: torch sees {n} CUDA GPU(s); run on a GPU node or use --device cpu")
    return device


def load_model(spec: str, device):
    """:func:`seglab.segment.models.load` on ``device`` (a torch.device)."""
    import torch

    from seglab.segment import models

    if not isinstance(device, torch.device):
        raise SeglabError(f"load_model: device must be a torch.device, got {type(device).__name__} {device!r}; "
                          "convert it once with seglab.segment.slides.as_device")
    model = models.load(spec, gpu=device.type == "cuda")
    if device.type == "cuda" and device.index not in (None, 0) and model.cp is not None:
        model.cp.device = device
        model.cp.net = model.cp.net.to(device)
    return model


# --------------------------------------------------------------------------- settings and grid


@dataclass(frozen=True)
class SlideSettings:
    """How a slide is tiled, sampled and filtered (params keys of the same names).

    tile_px : side of a tile's core, px. overlap_px : context read around each core, px
        (>= the largest object's diameter; at most tile_px).
    sample_fraction : fraction of the tissue tiles segmented (0 < f <= 1); seed : their draw.
    min_tissue_fraction : a tile whose core holds less tissue (fraction of its area) is skipped.
    thumb_px : the thumbnail's longer side, px (tissue detection and QC).
    channels : channel names read, the nucleus stain first (None: the file's channels).
    pixel_size_um : overrides the file's pixel size (um per px); None: from the metadata.
    area : the um^2 filter (:class:`AreaFilter`).
    """

    tile_px: int = 1024
    overlap_px: int = 64
    sample_fraction: float = 1.0
    seed: int = 0
    min_tissue_fraction: float = 0.05
    thumb_px: int = 1024
    channels: tuple | None = None
    pixel_size_um: float | None = None
    area: AreaFilter = AreaFilter()

    def __post_init__(self):
        if int(self.tile_px) < 64:
            raise SeglabError(f"tile_px={self.tile_px}: tiles must be at least 64 px")
        if int(self.overlap_px) < 0:
            raise SeglabError(f"overlap_px={self.overlap_px} must be >= 0 px")
        if int(self.tile_px) < int(self.overlap_px):
            raise SeglabError(f"tile_px={self.tile_px} is smaller than overlap_px={self.overlap_px}: give tiles at "
                              "least as large as the overlap (the overlap must hold the largest object; the tile "
                              "several times more)")
        if not 0 < float(self.sample_fraction) <= 1:
            raise SeglabError(f"sample_fraction={self.sample_fraction} must be in (0, 1] (0.1: a 10% sample)")
        if not 0 <= float(self.min_tissue_fraction) <= 1:
            raise SeglabError(f"min_tissue_fraction={self.min_tissue_fraction} must be in [0, 1]")
        if int(self.thumb_px) < 16:
            raise SeglabError(f"thumb_px={self.thumb_px} must be >= 16")

    @classmethod
    def from_params(cls, params: dict, source: str = "params") -> "SlideSettings":
        keys = ("tile_px", "overlap_px", "sample_fraction", "seed", "min_tissue_fraction", "thumb_px", "pixel_size_um")
        given = {k: params[k] for k in keys if params.get(k) is not None}
        chans = params.get("channels")
        return cls(**given, channels=tuple(chans) if chans else None, area=AreaFilter.from_params(params, source))

    def record(self) -> dict:
        d = asdict(self)
        d["area"] = self.area.as_dict()
        d["channels"] = list(self.channels) if self.channels else None
        return d


@dataclass(frozen=True)
class Tile:
    """One tile: its id (``r003_c012``), core [y0, y1) x [x0, x1) and window (core + overlap, clipped), px."""

    id: str
    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int
    wy0: int
    wy1: int
    wx0: int
    wx1: int


def tile_grid(height_px: int, width_px: int, tile_px: int, overlap_px: int) -> list[Tile]:
    """The tiles of a ``height_px`` x ``width_px`` slide, row by row: cores of ``tile_px`` (the last row
    and column smaller) partition the slide; windows add ``overlap_px`` on every side (clipped)."""
    if tile_px < overlap_px:
        raise SeglabError(f"tile_px={tile_px} is smaller than overlap_px={overlap_px}; give tiles at least as "
                          "large as the overlap")
    out = []
    for r, y0 in enumerate(range(0, height_px, tile_px)):
        for c, x0 in enumerate(range(0, width_px, tile_px)):
            y1, x1 = min(y0 + tile_px, height_px), min(x0 + tile_px, width_px)
            out.append(Tile(f"r{r:03d}_c{c:03d}", r, c, y0, y1, x0, x1, max(y0 - overlap_px, 0),
                            min(y1 + overlap_px, height_px), max(x0 - overlap_px, 0), min(x1 + overlap_px, width_px)))
    return out


# --------------------------------------------------------------------------- tissue and sampling


def thumbnail(slide, tiles: Sequence[Tile], factor: int) -> np.ndarray:
    """(ceil(H / factor), ceil(W / factor)) float32 block means of the slide's first channel, read
    core by core (never the whole slide at once)."""
    th, tw = math.ceil(slide.height_px / factor), math.ceil(slide.width_px / factor)
    out = np.zeros((th, tw), np.float32)
    for t in tiles:
        # read whole thumbnail blocks: a core edge that is not a multiple of factor still maps cleanly
        by0, bx0 = t.y0 // factor, t.x0 // factor
        by1, bx1 = math.ceil(t.y1 / factor), math.ceil(t.x1 / factor)
        block = slide.read(by0 * factor, bx0 * factor, (by1 - by0) * factor, (bx1 - bx0) * factor)[0]
        h, w = block.shape
        hp, wp = math.ceil(h / factor) * factor, math.ceil(w / factor) * factor
        padded = np.pad(block.astype(np.float32), ((0, hp - h), (0, wp - w)), mode="edge")
        out[by0:by0 + hp // factor, bx0:bx0 + wp // factor] = padded.reshape(
            hp // factor, factor, wp // factor, factor).mean(axis=(1, 3))
    return out


def thumb_factor(height_px: int, width_px: int, thumb_px: int) -> int:
    """Slide px per thumbnail px so that the thumbnail's longer side is at most ``thumb_px``."""
    return max(1, math.ceil(max(height_px, width_px) / thumb_px))


def tissue_mask(thumb: np.ndarray, factor: int) -> np.ndarray:
    """Boolean tissue mask of a thumbnail: smoothed over about 32 slide px, then Otsu's threshold.

    A slide without contrast (all background or all tissue) counts as all tissue: nothing is
    skipped that might hold cells."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    sm = ndi.gaussian_filter(thumb.astype(np.float32), max(32.0 / factor, 0.5))
    lo, hi = np.percentile(sm, [1, 99])
    if hi - lo <= 1e-6 * max(abs(hi), 1.0):
        return np.ones(thumb.shape, bool)
    return sm > threshold_otsu(sm)


def tissue_fractions(mask: np.ndarray, tiles: Sequence[Tile], factor: int) -> np.ndarray:
    """Per tile, the fraction of its core's thumbnail px that are tissue."""
    out = np.zeros(len(tiles))
    for i, t in enumerate(tiles):
        sub = mask[t.y0 // factor: max(math.ceil(t.y1 / factor), t.y0 // factor + 1),
                   t.x0 // factor: max(math.ceil(t.x1 / factor), t.x0 // factor + 1)]
        out[i] = float(sub.mean()) if sub.size else 0.0
    return out


def sample_tiles(tile_ids: Sequence[str], fraction: float, seed: int, slide: str) -> list[str]:
    """A seeded sample of ``fraction`` of ``tile_ids`` (at least one when any), in grid order.

    The draw is a permutation seeded by (seed, slide): a smaller fraction gives a prefix of the
    same permutation, so the 10% sample is inside the 100% run and its tiles are reused."""
    ids = list(tile_ids)
    if not ids:
        return []
    rng = np.random.default_rng([int(seed), zlib.crc32(slide.encode())])
    order = rng.permutation(len(ids))
    k = max(1, int(round(float(fraction) * len(ids))))
    keep = set(order[:k].tolist())
    return [t for i, t in enumerate(ids) if i in keep]


# --------------------------------------------------------------------------- one tile


def tile_objects(labels: np.ndarray, image: np.ndarray, tile: Tile, slide: str, pixel_size_um: float,
                 channel_names: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray, tuple[int, int]]:
    """The objects of a window's label image ``labels`` (window coords) whose centroid lies in the
    tile's core: (table, label crop of those objects with local ids 1..n, (y, x) offset of the crop
    in slide px). ``image`` (C, h, w) gives the mean intensity per channel (``mean_<name>``)."""
    from skimage.measure import regionprops

    rows, keep = [], []
    for rp in regionprops(labels):
        cy, cx = rp.centroid
        gy, gx = cy + tile.wy0, cx + tile.wx0
        if not (tile.y0 <= gy < tile.y1 and tile.x0 <= gx < tile.x1):
            continue   # the neighbour whose core holds the centroid keeps it
        by0, bx0, by1, bx1 = rp.bbox
        bbox = (by0 + tile.wy0, bx0 + tile.wx0, by1 + tile.wy0, bx1 + tile.wx0)
        area = int(rp.area)
        sl = rp.slice
        m = rp.image
        row = {"object_id": object_id(slide, bbox, area), "slide": slide, "tile": tile.id,
               "centroid_y_px": round(gy, 2), "centroid_x_px": round(gx, 2),
               "centroid_y_um": round(float(px_to_um(gy, pixel_size_um)), 3),
               "centroid_x_um": round(float(px_to_um(gx, pixel_size_um)), 3),
               "area_px": area, "area_um2": round(float(px_to_um2(area, pixel_size_um)), 4),
               "bbox_y0": bbox[0], "bbox_x0": bbox[1], "bbox_y1": bbox[2], "bbox_x1": bbox[3],
               # how close the centroid is to the nearest core border inside the slide (seam checks), px
               "seam_distance_px": round(_seam_distance(gy, gx, tile), 2),
               # cut by the window where it is not the slide's edge: the overlap was smaller than the object
               "touches_window_edge": bool((by0 == 0 and tile.wy0 > 0) or (bx0 == 0 and tile.wx0 > 0)
                                           or (by1 == labels.shape[0] and tile.wy1 > tile.y1)
                                           or (bx1 == labels.shape[1] and tile.wx1 > tile.x1))}
        for k, name in enumerate(channel_names):
            row[f"mean_{slides_io.safe_name(name)}"] = round(float(image[k][sl][m].mean()), 3)
        rows.append(row)
        keep.append(rp)
    cols = ["object_id", "slide", "tile", "local_id"]
    if not keep:
        return pd.DataFrame(rows, columns=cols), np.zeros((0, 0), np.uint32), (tile.y0, tile.x0)
    y0 = min(rp.bbox[0] for rp in keep)
    x0 = min(rp.bbox[1] for rp in keep)
    y1 = max(rp.bbox[2] for rp in keep)
    x1 = max(rp.bbox[3] for rp in keep)
    crop = np.zeros((y1 - y0, x1 - x0), np.uint32)
    for i, rp in enumerate(keep, start=1):
        by0, bx0, by1, bx1 = rp.bbox
        crop[by0 - y0: by1 - y0, bx0 - x0: bx1 - x0][rp.image] = i
    table = pd.DataFrame(rows)
    table.insert(3, "local_id", np.arange(1, len(keep) + 1))
    return table, crop, (y0 + tile.wy0, x0 + tile.wx0)


def _seam_distance(gy: float, gx: float, t: Tile) -> float:
    """Distance (px) from a point to the nearest border of tile ``t``'s core that is a seam (not the slide edge)."""
    d = [math.inf]
    if t.wy0 < t.y0:
        d.append(gy - t.y0)
    if t.wy1 > t.y1:
        d.append(t.y1 - gy)
    if t.wx0 < t.x0:
        d.append(gx - t.x0)
    if t.wx1 > t.x1:
        d.append(t.x1 - gx)
    return float(min(d))


def segment_tile(model, slide, tile: Tile, mask: MaskSettings, *, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(window image (C, h, w), window labels (h, w)) of one tile: read lazily, segmented once."""
    image = slide.read(tile.wy0, tile.wx0, tile.wy1 - tile.wy0, tile.wx1 - tile.wx0)
    net_in = image[:3].astype(np.float32)
    labels = model.segment(net_in, mask, batch_size=batch_size)
    return image, np.asarray(labels)


def _tile_done(folder: Path, tile_id: str) -> bool:
    return io.set_complete(folder, tile_id)


def write_tile(folder: Path, tile: Tile, table: pd.DataFrame, crop: np.ndarray, offset: tuple[int, int],
               record: dict) -> None:
    """The tile's output set: ``<tile>.csv`` (its objects), ``<tile>.npz`` (label crop and offset) and
    ``<tile>.json`` (what made it); all or none (:func:`seglab.core.io.write_set`)."""
    def npz(p):
        with open(p, "wb") as fh:
            np.savez_compressed(fh, labels=crop, offset=np.asarray(offset, np.int64))

    io.write_set(folder, {f"{tile.id}.csv": lambda p: table.to_csv(p, index=False), f"{tile.id}.npz": npz,
                          f"{tile.id}.json": lambda p: Path(p).write_text(io.json_text(record))}, name=tile.id)


# --------------------------------------------------------------------------- the slide


@dataclass
class SlideResult:
    """What :func:`predict_slide` made: the output folder, the instance table (filtered), every
    detection with its filter verdict, the tiles table and the run record."""

    out: Path
    instances: pd.DataFrame
    detections: pd.DataFrame
    tiles: pd.DataFrame
    record: dict

    @property
    def labels_path(self) -> Path:
        return self.out / LABELS


def plan_slide(slide, settings: SlideSettings, out: Path | None = None) -> tuple[list[Tile], pd.DataFrame, np.ndarray, int]:
    """(tiles, tiles table with tissue_fraction / tissue / selected, thumbnail, thumbnail factor) of a slide.

    The thumbnail is kept in ``out/thumbnail.npz`` (reused by a rerun with the same grid)."""
    tiles = tile_grid(slide.height_px, slide.width_px, int(settings.tile_px), int(settings.overlap_px))
    factor = thumb_factor(slide.height_px, slide.width_px, int(settings.thumb_px))
    thumb = None
    key = f"{slide.height_px}x{slide.width_px}:{settings.tile_px}:{factor}:{slide.names[0]}"
    tpath = None if out is None else out / THUMB
    if tpath is not None and tpath.is_file():
        with np.load(tpath) as z:
            if str(z["key"]) == key:
                thumb = z["thumb"]
    if thumb is None:
        thumb = thumbnail(slide, tiles, factor)
        if tpath is not None:
            with io.atomic_path(tpath) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, thumb=thumb, key=np.asarray(key))
    tissue = tissue_fractions(tissue_mask(thumb, factor), tiles, factor)
    is_tissue = tissue >= float(settings.min_tissue_fraction)
    ids = [t.id for t, ok in zip(tiles, is_tissue) if ok]
    chosen = set(sample_tiles(ids, settings.sample_fraction, settings.seed, slide.id))
    table = pd.DataFrame([{**asdict(t), "tissue_fraction": round(float(f), 4), "tissue": bool(ok),
                           "selected": t.id in chosen} for t, f, ok in zip(tiles, tissue, is_tissue)])
    return tiles, table, thumb, factor


def predict_slide(path: str | os.PathLike, out_dir: str | os.PathLike, model, settings: SlideSettings,
                  mask: MaskSettings | None = None, *, device=None, log: Callable | None = print,
                  batch_size: int | None = None, merge: bool = True,
                  shard: tuple[int, int] | None = None, classifier=None, classifier_threshold: float = 0.5,
                  allow_failed_gate: bool = False) -> SlideResult | None:
    """Segment one slide into ``out_dir/<slide id>/`` (see the module docstring); resumable per tile.

    Parameters
    ----------
    path : the slide file. out_dir : the folder of the study's slide outputs.
    model : a loaded :class:`seglab.segment.models.Model` or a spec (loaded on ``device``).
    settings : :class:`SlideSettings`. mask : :class:`MaskSettings` (its diameter in px).
    device : torch.device (or a string, converted once by :func:`as_device`); used when ``model`` is a spec.
    merge : False segments the tiles only (a worker of a parallel run); :func:`merge_slide` later.
    shard : (i, n): segment only every n-th of the tiles still to do, from the i-th (worker i of n).
    classifier : a curation classifier (path or :class:`seglab.curate.store.Classifier`; refused when
        it did not pass its gate unless ``allow_failed_gate``) whose confidence is computed per object
        at tile time (:func:`seglab.curate.features.object_features` of the object's px); objects below
        ``classifier_threshold`` (a fraction) are dropped from ``instances.csv``. Its sha256 and the
        threshold are recorded with every tile: a folder filtered by another classifier (or none) is
        refused. None: no filter, the outputs are those of a run without this option.

    Returns the :class:`SlideResult` (None without ``merge``).
    """
    mask = mask or MaskSettings()
    slide = slides_io.open_slide(path, pixel_size_um=settings.pixel_size_um, channels=settings.channels)
    try:
        out = Path(out_dir) / slide.id
        tiles, table, thumb, factor = plan_slide(slide, settings, out)
        folder = out / TILES
        folder.mkdir(parents=True, exist_ok=True)
        todo = [t for t, sel in zip(tiles, table["selected"]) if sel and not _tile_done(folder, t.id)]
        if shard is not None:
            todo = todo[int(shard[0])::int(shard[1])]
        if log:
            log(f"[seglab] {slide.describe()}: {len(tiles)} tiles, {int(table['tissue'].sum())} with tissue, "
                f"{int(table['selected'].sum())} selected (sample_fraction {settings.sample_fraction}), "
                f"{len(todo)} to segment")
        mrec = {"model": str(getattr(model, "spec", model)), "mask": mask.as_dict()}
        clf = None
        if classifier is not None:
            from seglab.curate import apply as curate_apply
            from seglab.curate.store import as_classifier

            clf = as_classifier(classifier, allow_failed_gate=allow_failed_gate)
            mrec["classifier"] = curate_apply.record(clf, classifier_threshold)
        check_classifier(folder, [t.id for t, sel in zip(tiles, table["selected"]) if sel], mrec.get("classifier"))
        if todo and isinstance(model, (str, os.PathLike)):
            model = load_model(str(model), as_device(device))
        for i, t in enumerate(todo):
            t0 = time.monotonic()
            image, labels = segment_tile(model, slide, t, mask, batch_size=batch_size)
            objs, crop, offset = tile_objects(labels, image, t, slide.id, slide.pixel_size_um, slide.names)
            if clf is not None:
                objs = classifier_confidence(clf, objs, crop, offset, image, t, slide)
            write_tile(folder, t, objs, crop, offset,
                       {"tile": t.id, **mrec, "n_objects": int(len(objs)), "seconds": round(time.monotonic() - t0, 3),
                        "host": socket.gethostname(), "pid": os.getpid(), "finished": time.time()})
            if log and (i + 1) % 10 == 0:
                log(f"[seglab] {slide.id}: {i + 1}/{len(todo)} tiles")
        if not merge:
            return None
        return merge_slide(slide, out, tiles, table, thumb, factor, settings, mask, mrec)
    finally:
        slide.close()


def classifier_confidence(clf, objs: pd.DataFrame, crop: np.ndarray, offset: tuple[int, int], image: np.ndarray,
                          tile: Tile, slide) -> pd.DataFrame:
    """``objs`` (a tile's kept objects, :func:`tile_objects`) with ``classifier_confidence``: the
    classifier's probability of "yes" from :func:`seglab.curate.features.object_features` of each
    object's px in ``crop`` (local ids, at ``offset`` in slide px) and the window ``image``."""
    from seglab.curate import apply as curate_apply
    from seglab.curate.features import object_features

    if not len(objs):
        return objs.assign(**{curate_apply.CONFIDENCE: pd.Series(dtype=float)})
    oy, ox = int(offset[0]) - tile.wy0, int(offset[1]) - tile.wx0
    sub = image[:, oy:oy + crop.shape[0], ox:ox + crop.shape[1]]
    feats = object_features(crop.astype(np.int64), sub, slide.pixel_size_um, slide.names, slide.id, offset=offset)
    conf = dict(zip(feats["object_id"], curate_apply.confidences(clf, feats)))
    return objs.assign(**{curate_apply.CONFIDENCE: objs["object_id"].map(conf).to_numpy(float)})


def check_classifier(folder: Path, tile_ids: Sequence[str], crec: dict | None) -> None:
    """Refuse (before any work) a slide folder whose done tiles were filtered by another classifier,
    another threshold, or none / one when this run asks for one / none (``crec``: the run's
    :func:`seglab.curate.apply.record`)."""
    def name(r):
        return "no classifier" if not r else f"classifier {str(r.get('sha256'))[:12]} at threshold {r.get('threshold')}"

    for t in tile_ids:
        f = folder / f"{t}.json"
        if not _tile_done(folder, t) or not f.is_file():
            continue
        rec = json.loads(f.read_text())
        if rec.get("classifier") != crec:
            raise SeglabError(f"{folder}: tile {t} was made with {name(rec.get('classifier'))}, this run asks for "
                              f"{name(crec)}; one folder holds one filter: delete {folder.parent} (or use another "
                              "--out) and rerun")


_WORKER_MODELS: dict = {}   # (spec, device) -> Model, loaded once per worker process


def _worker_tiles(path, out_dir, model_spec, settings, mask, device, shard, classifier=None, classifier_threshold=0.5):
    """One worker of :func:`run_slides`: its share of one slide's tiles (module level: it is pickled).
    The model is loaded once per worker process and kept for the next slides. ``classifier``: the
    path of one the caller loaded and checked against its gate."""
    key = (str(model_spec), str(device))
    if key not in _WORKER_MODELS:
        _WORKER_MODELS[key] = load_model(str(model_spec), device)
    predict_slide(path, out_dir, _WORKER_MODELS[key], settings, mask, device=device, log=None, merge=False,
                  shard=shard, classifier=classifier, classifier_threshold=classifier_threshold,
                  allow_failed_gate=True)
    return shard


def run_slides(slide_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, model_spec: str,
               settings: SlideSettings, mask: MaskSettings | None = None, *, device=None, workers: int = 1,
               log: Callable | None = print, classifier=None, classifier_threshold: float = 0.5,
               allow_failed_gate: bool = False) -> list[SlideResult]:
    """Segment every slide of ``slide_paths`` (:func:`predict_slide`), ``workers`` processes at once
    over each slide's tiles (one pool for all slides; each worker loads the model once and has one
    torch thread), then merge each slide in this process.

    ``device`` is converted once (:func:`as_device`) and handed to the workers as a torch.device.
    Check the memory plan before calling with several workers (:mod:`seglab.slurm.memory`).
    ``classifier`` (path or loaded): the curation filter of :func:`predict_slide`, loaded and checked
    against its gate here, once, before any work.
    """
    device = as_device(device)
    mask = mask or MaskSettings()
    if classifier is not None:
        from seglab.curate.store import as_classifier

        classifier = as_classifier(classifier, allow_failed_gate=allow_failed_gate)
    if workers > 1:
        from seglab.core.workers import worker_pool

        cpath = None if classifier is None else str(classifier.path)
        jobs = [(str(p), str(out_dir), model_spec, settings, mask, device, (i, workers), cpath, classifier_threshold)
                for p in slide_paths for i in range(workers)]
        with worker_pool(workers, 1) as pool:
            list(pool.map(_worker_tiles, *zip(*jobs)))
    model = load_model(model_spec, device) if workers == 1 else model_spec
    return [predict_slide(p, out_dir, model, settings, mask, device=device, log=log, classifier=classifier,
                          classifier_threshold=classifier_threshold, allow_failed_gate=True) for p in slide_paths]


def merge_check(folder: Path, table: pd.DataFrame, mrec: dict) -> dict:
    """Every selected tile done exactly once, by one model with one set of mask settings.

    Returns the check's record; raises SeglabError (naming the tiles and the fix) when a selected
    tile has no complete output or was made by another model / other mask settings."""
    selected = list(table.loc[table["selected"], "id"])
    missing = [t for t in selected if not _tile_done(folder, t)]
    if missing:
        raise SeglabError(f"{folder}: {len(missing)} selected tile(s) have no complete output ({', '.join(missing[:5])}"
                          f"{', ...' if len(missing) > 5 else ''}); rerun predict-slide on this slide: it resumes")
    other = []
    for t in selected:
        rec = json.loads((folder / f"{t}.json").read_text())
        if rec.get("tile") != t:
            other.append(f"{t} (its record names tile {rec.get('tile')})")
        elif rec.get("model") != mrec["model"] or rec.get("mask") != mrec["mask"]:
            other.append(f"{t} (model {rec.get('model')}, mask {rec.get('mask')})")
        elif rec.get("classifier") != mrec.get("classifier"):
            other.append(f"{t} (classifier {rec.get('classifier')})")
    if other:
        raise SeglabError(f"{folder}: tile(s) made by another model or other mask settings than this run's "
                          f"({mrec['model']}): {'; '.join(other[:3])}; delete {folder} (or use another --out) and rerun")
    extra = sorted({p.name.split(".")[0] for p in folder.glob("*.complete.json")} - set(selected))
    return {"n_selected": len(selected), "n_done": len(selected), "each_tile_once": True,
            "unselected_tiles_present": extra, **mrec}


def merge_slide(slide, out: Path, tiles: Sequence[Tile], table: pd.DataFrame, thumb: np.ndarray, factor: int,
                settings: SlideSettings, mask: MaskSettings, mrec: dict) -> SlideResult:
    """The merge step of :func:`predict_slide`: check, filter, instance table, label image, QC, record."""
    folder = out / TILES
    check = merge_check(folder, table, mrec)
    selected = list(table.loc[table["selected"], "id"])
    parts = [pd.read_csv(folder / f"{t}.csv") for t in selected]
    parts = [p for p in parts if len(p)]
    det = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["object_id", "tile", "local_id",
                                                                                    "area_px"])
    dup = det["object_id"][det["object_id"].duplicated()].tolist()
    if dup:
        raise SeglabError(f"{out}: object ids counted twice across tiles ({dup[:3]}); the tiles' outputs disagree: "
                          f"delete {folder} and rerun")
    det["passes_area_filter"] = settings.area.keep(det["area_px"].to_numpy(), slide.pixel_size_um) if len(det) else []
    n_area = int(det["passes_area_filter"].astype(bool).sum()) if len(det) else 0
    crec = mrec.get("classifier")
    if crec is not None:   # the curation filter: kept when the classifier's confidence reaches the threshold
        det["kept"] = det["classifier_confidence"].to_numpy(float) >= float(crec["threshold"]) if len(det) else []
        inst = det[det["passes_area_filter"].astype(bool) & det["kept"].astype(bool)]
        inst = inst.drop(columns=["passes_area_filter"]).copy()
    else:
        inst = det[det["passes_area_filter"].astype(bool)].drop(columns=["passes_area_filter"]).copy()
    inst = inst.sort_values(["centroid_y_px", "centroid_x_px"], kind="stable").reset_index(drop=True)
    inst.insert(1, "label", np.arange(1, len(inst) + 1, dtype=np.int64))
    # objects cut by their window: the overlap was smaller than they are (raise overlap_px)
    n_cut = int(det["touches_window_edge"].astype(bool).sum()) if "touches_window_edge" in det else 0
    check.update(n_objects=int(len(inst)), n_detections=int(len(det)), object_ids_unique=True,
                 n_cut_by_window=n_cut)
    tmp_labels = write_labels(out, slide, selected, folder, inst)
    from seglab.plots import slides as plots

    record = {"slide": slide.id, "path": str(slide.path), "format": slide.fmt, "height_px": slide.height_px,
              "width_px": slide.width_px, "pixel_size_um": slide.pixel_size_um,
              "pixel_size_source": slide.pixel_size_source, "channels": slide.names,
              "settings": settings.record(), "area_filter": settings.area.describe(slide.pixel_size_um),
              "area_filter_px": list(settings.area.px_bounds(slide.pixel_size_um)),
              "n_tiles": len(tiles), "n_tissue_tiles": int(table["tissue"].sum()),
              "n_selected_tiles": int(table["selected"].sum()), "sample_fraction": float(settings.sample_fraction),
              "sample_seed": int(settings.seed), "selected_tiles": selected,
              "n_detections": int(len(det)), "n_objects": int(len(inst)), "n_cut_by_window": n_cut,
              "thumb_factor": factor, **mrec}
    if crec is not None:
        record.update(n_objects_before_classifier=n_area, n_objects_after_classifier=int(len(inst)))

    def qc(p):
        fig = plots.qc_thumbnail(thumb, factor, table, inst, tmp_labels, title=f"{slide.id}: {len(inst)} objects")
        fig.savefig(p, format="png", dpi=100)
        import matplotlib.pyplot as plt
        plt.close(fig)

    io.write_set(out, {INSTANCES: lambda p: inst.to_csv(p, index=False),
                       DETECTIONS: lambda p: det.to_csv(p, index=False),
                       TILE_TABLE: lambda p: table.to_csv(p, index=False),
                       MERGE_CHECK: lambda p: Path(p).write_text(io.json_text(check)),
                       RUN_RECORD: lambda p: Path(p).write_text(io.json_text(record)),
                       QC: qc}, name=OUTPUT_SET)
    final = out / LABELS
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_labels, final)
    return SlideResult(out=out, instances=inst, detections=det, tiles=table, record=record)


def write_labels(out: Path, slide, selected: Sequence[str], folder: Path, inst: pd.DataFrame) -> Path:
    """The label image (uint32, 0 background, ids = ``inst.label``) as OME-Zarr in a temporary folder
    beside ``out/labels.ome.zarr`` (renamed into place by the caller once the tables are written).

    Each object is painted from its tile's crop; where two objects' masks overlap at a seam the
    first painted keeps the px (their areas in the tables are their own masks')."""
    import zarr

    tmp = out / f".{LABELS}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    root = zarr.open_group(str(tmp), mode="w")
    p = slide.pixel_size_um
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "name": f"{slide.id} labels", "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                                               {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [p, p]}]}]}]}
    chunk = min(LABEL_CHUNK_PX, slide.height_px), min(LABEL_CHUNK_PX, slide.width_px)
    arr = root.create_array("0", shape=(slide.height_px, slide.width_px), chunks=chunk, dtype="uint32",
                            fill_value=0, dimension_names=("y", "x"))
    glabel = dict(zip(inst["object_id"], inst["label"]))
    for t in selected:
        tab = pd.read_csv(folder / f"{t}.csv")
        if not len(tab):
            continue
        with np.load(folder / f"{t}.npz") as z:
            crop, (y0, x0) = z["labels"], z["offset"]
        lut = np.zeros(int(tab["local_id"].max()) + 1, np.uint32)
        for oid, lid in zip(tab["object_id"], tab["local_id"]):
            lut[int(lid)] = glabel.get(oid, 0)
        mapped = lut[crop]
        if not mapped.any():
            continue
        region = (slice(int(y0), int(y0) + crop.shape[0]), slice(int(x0), int(x0) + crop.shape[1]))
        cur = arr[region]
        cur = np.where((cur == 0) & (mapped > 0), mapped, cur)
        arr[region] = cur
    return tmp


def read_labels(out: str | os.PathLike, region: tuple[slice, slice] | None = None, step: int = 1) -> np.ndarray:
    """The label image of a slide's output folder (or a region / every ``step``-th px of it)."""
    import zarr

    arr = zarr.open_group(str(Path(out) / LABELS), mode="r")["0"]
    if region is None:
        region = (slice(None), slice(None))
    return np.asarray(arr[region[0].start or 0: region[0].stop: step, region[1].start or 0: region[1].stop: step]) \
        if step > 1 else np.asarray(arr[region])


def slide_done(out: str | os.PathLike) -> bool:
    """Whether a slide's output folder holds a complete, checked merge."""
    return io.set_complete(out, OUTPUT_SET) and (Path(out) / LABELS).is_dir()


def slide_features(slide_out: str | os.PathLike, slide_path: str | os.PathLike | None = None) -> pd.DataFrame:
    """:func:`seglab.curate.features.object_features` of every object a slide run kept in its tiles (``<slide_out>/tiles/``),
    read tile by tile (the crop of each tile and the slide region under it), ids equal to the
    run's ``instances.csv`` / ``detections.csv`` ``object_id``.

    ``slide_path``: the slide file (default: the one named in ``run.json``). Raises SeglabError
    when the run is not merged (no ``run.json``).
    """
    from seglab.curate.features import object_features

    out = Path(slide_out)
    rec_path = out / RUN_RECORD
    if not rec_path.is_file():
        raise SeglabError(f"{out}: no {RUN_RECORD} (the slide run was not merged); run seglab predict-slide first")
    rec = json.loads(rec_path.read_text())
    parts = []
    with slides_io.open_slide(slide_path or rec["path"], pixel_size_um=rec["pixel_size_um"],
                              channels=rec["channels"]) as slide:
        for t in rec["selected_tiles"]:
            with np.load(out / TILES / f"{t}.npz") as z:
                crop, (y0, x0) = z["labels"], z["offset"]
            if not crop.size or not crop.any():
                continue
            image = slide.read(int(y0), int(x0), crop.shape[0], crop.shape[1])
            f = object_features(crop.astype(np.int64), image, rec["pixel_size_um"], rec["channels"], rec["slide"],
                                offset=(int(y0), int(x0)))
            parts.append(f.assign(tile=t))
    return pd.concat(parts, ignore_index=True) if parts else object_features(
        np.zeros((1, 1), np.int64), np.zeros((len(rec["channels"]), 1, 1)), rec["pixel_size_um"], rec["channels"],
        rec["slide"]).assign(tile=pd.Series(dtype=str))


def study_features(slide_outs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """:func:`slide_features` of every slide run folder of ``slide_outs``, one table."""
    return pd.concat([slide_features(out) for out in slide_outs], ignore_index=True)


def export_instances(out: str | os.PathLike, area: AreaFilter) -> pd.DataFrame:
    """A slide's detections (``detections.csv``) filtered by ``area`` (um^2, through the one conversion),
    with ``area_px`` and ``area_um2``: what a later step (annotation, curation) takes. A run with a
    curation classifier adds ``classifier_confidence`` and ``kept`` and keeps the rejected objects
    here (a next curation round reviews them too); ``instances.csv`` holds only the kept ones."""
    out = Path(out)
    if not io.set_complete(out, OUTPUT_SET):
        raise SeglabError(f"{out}: no complete slide output (merge not done); run seglab predict-slide first")
    rec = json.loads((out / RUN_RECORD).read_text())
    det = pd.read_csv(out / DETECTIONS)
    return area.apply(det, rec["pixel_size_um"]).drop(columns=["passes_area_filter"]).reset_index(drop=True)
