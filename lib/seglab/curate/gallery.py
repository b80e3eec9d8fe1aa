"""The offline annotation gallery: ``seglab gallery`` exports cell crops people answer yes / no / unsure.

An export is a static, self-contained folder (it opens from ``file://`` and from any static host;
the page makes no network request: no CDN, no fonts, everything relative)::

    <out>/index.html            the gallery (one page; cards paginated by its script)
    <out>/gallery.json          the record (format seglab-gallery/1, below)
    <out>/gallery-data.js       the same record as a script (file:// pages cannot fetch JSON)
    <out>/assets/gallery.{js,css}
    <out>/crops/<source>/<object_id>.png

``gallery.json``: format, export_id (:func:`seglab.curate.answers.export_id`: sha256 of the sorted
object ids, the segmentation id and the area filter), segmentation_id (model + mask settings
hash from the slide run's ``run.json`` / the tile folder's ``predict.json``), area_filter
({"min_um2", "max_um2"}, um^2), pixel_size_um, cell_type, feature_columns, objects (object_id,
source, page, area_um2, area_px, area_text ``"119.0 um^2 | 4000 px"``, crop, feature values,
classifier_confidence where the table has it) and what made the export: sources, counts
(objects found, outside the area filter, left out by the sample), the sample, crop_px, channels.

Objects come from a slide run (``instances.csv``, ``labels.ome.zarr`` and the slide named in
``run.json``, :mod:`seglab.segment.slides`) or from a tile prediction folder (masks
``<tile>.tif`` + ``predict.json``, :mod:`seglab.segment.predict`) with its tiles. Ids are the
stable :func:`seglab.core.objects.object_id` (slide or tile id + bbox + area, px); feature
values are :mod:`seglab.curate.features`' (what the classifier sees).

Each card shows a fixed-size crop (``crop_px`` x ``crop_px`` px of the source, the object's
centroid at its centre; px beyond the source's edge are black): the channels in colour (first
channel, DAPI, blue; second, the marker, green; third red), each scaled between the 1st and
99.8th percentile of its source's crops, the object's outline in yellow and its neighbours'
in grey.

Nothing is left out silently: objects outside the gallery's area filter and those the sample
leaves out are counted in ``gallery.json`` and printed; an area filter wider than the slide
run's (whose label image holds only the objects inside its filter) is refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError, __version__
from seglab.core import io
from seglab.core.units import AreaFilter, check_pixel_size, px_to_um2
from seglab.curate import answers as ans
from seglab.data.slides import safe_name

DATA_JS = "gallery-data.js"
INDEX = "index.html"
ASSETS = ("gallery.js", "gallery.css")
DEFAULT_PER_PAGE = 300
DEFAULT_CELL_TYPE = "cell"
# RGB colour of channel k (additive): DAPI blue, marker green, a third channel red
CHANNEL_COLORS = ((0.15, 0.45, 1.0), (0.1, 1.0, 0.1), (1.0, 0.2, 0.2))
OUTLINE_RGB = (255, 230, 0)
NEIGHBOUR_RGB = (150, 150, 150)
PERCENTILES = (1.0, 99.8)
# crops per source the display range is measured on
RANGE_SAMPLE = 64
MIN_CROP_PX, MAX_CROP_PX = 48, 512


def area_text(area_um2: float, area_px: int) -> str:
    """The card's area line: ``"119.0 um^2 | 4000 px"``."""
    return f"{area_um2:.1f} um^2 | {area_px} px"


@dataclass
class Source:
    """One slide or tile of an export: its id, its objects (a table with object_id, label, bbox_*,
    centroid_*_px, area_px, feature columns, optional classifier_confidence) and how to read a
    region of its image (C, h, w) and of its labels (h, w)."""

    id: str
    objects: pd.DataFrame
    read_image: Callable[[int, int, int, int], np.ndarray]
    read_labels: Callable[[int, int, int, int], np.ndarray]
    shape: tuple[int, int]
    close: Callable[[], None] = field(default=lambda: None)


# --------------------------------------------------------------------------- the sources


def _run_filter(rec: dict, where) -> AreaFilter:
    return AreaFilter.from_params((rec.get("settings") or {}).get("area") or {}, source=str(where))


def _slide_folders(folder: Path) -> list[Path]:
    from seglab.segment import slides as seg

    if (folder / seg.RUN_RECORD).is_file() or (folder / seg.INSTANCES).is_file():
        found = [folder]
    else:
        found = sorted(p.parent for p in folder.glob(f"*/{seg.RUN_RECORD}"))
    if not found:
        raise SeglabError(f"--slide-run {folder}: no slide output here ({seg.RUN_RECORD} in it or in its sub-folders); "
                          "give the folder seglab predict-slide wrote (one slide's, or the study's)")
    for f in found:
        if not seg.slide_done(f):
            raise SeglabError(f"--slide-run {f}: the slide run is not complete (no checked merge or no "
                              f"{seg.LABELS}); rerun seglab predict-slide on it: it resumes")
    return found


def slide_sources(folder: str | os.PathLike, *, features: bool = True) -> tuple[list[Source], dict]:
    """The sources of a slide run folder (one slide's output or a folder of them) and what made them:
    {"segmentation_id", "pixel_size_um", "channels", "run_area": AreaFilter, "paths"}.

    Refuses slides made by different segmentations, at different pixel sizes or with different
    area filters (one export, one identity). ``features``: join :func:`seglab.segment.slides.slide_features`."""
    sources: list[Source] = []
    try:
        return _slide_sources(folder, features, sources)
    except BaseException:
        for s in sources:   # a later slide refused: close the ones opened
            s.close()
        raise


def _slide_sources(folder, features: bool, sources: list) -> tuple[list[Source], dict]:
    from seglab.data import slides as slides_io
    from seglab.segment import slides as seg

    made = None
    for out in _slide_folders(Path(folder)):
        rec = json.loads((out / seg.RUN_RECORD).read_text())
        this = {"segmentation_id": ans.segmentation_id(rec["model"], rec["mask"]),
                "pixel_size_um": float(rec["pixel_size_um"]), "channels": list(rec["channels"]),
                "run_area": _run_filter(rec, out / seg.RUN_RECORD), "paths": [str(out)]}
        if made is None:
            made = this
        else:
            for key, what in (("segmentation_id", "segmentation"), ("pixel_size_um", "pixel size (um/px)"),
                              ("channels", "channels"), ("run_area", "area filter")):
                if this[key] != made[key]:
                    raise SeglabError(f"--slide-run {folder}: {out.name} has {what} {this[key]!r} but "
                                      f"{made['paths'][0]} has {made[key]!r}; one gallery shows one segmentation "
                                      "of slides at one pixel size: export them separately")
            made["paths"].append(str(out))
        inst = pd.read_csv(out / seg.INSTANCES)
        if features and len(inst):
            f = seg.slide_features(out)
            cols = [c for c in f.columns if c not in inst.columns or c == "object_id"]
            inst = inst.merge(f[cols], on="object_id", how="left", validate="one_to_one")
        slide = slides_io.open_slide(rec["path"], pixel_size_um=rec["pixel_size_um"], channels=rec["channels"])
        shape = (int(rec["height_px"]), int(rec["width_px"]))

        def read_image(y, x, h, w, _s=slide):
            return _s.read(y, x, h, w)

        read_labels = ChunkCache(out / seg.LABELS).read

        sources.append(Source(rec["slide"], inst, read_image, read_labels, shape, slide.close))
    return sources, made


def tile_sources(predict_dir: str | os.PathLike, tiles_dir: str | os.PathLike, pixel_size_um: float,
                 channel_names: Sequence[str] | None = None, *, log: Callable | None = print) -> tuple[list[Source], dict]:
    """The sources of a tile prediction folder (``seglab predict --out``) and its tiles folder.

    Objects are :func:`seglab.curate.features.object_features` of each mask (ids from the tile id
    and geometry). Tiles without a mask are counted (``tiles_without_mask``), never dropped
    silently; a mask whose shape is not its tile's is refused."""
    from seglab.curate import features as feat
    from seglab.data.manifest import read_tiff
    from seglab.segment import predict as pr

    pred = Path(predict_dir)
    p = check_pixel_size(pixel_size_um, "--pixel-size-um")
    rec = pr.read_record(pred)
    if not rec:
        raise SeglabError(f"--predict {pred}: no readable {pr.RECORD_FILE}; give a folder seglab predict wrote")
    tiles = pr.discover_tiles(tiles_dir)
    given = Path(tiles_dir)
    resolved = str((given / "tiles" if (given / "tiles").is_dir() else given).resolve())   # as predict.json records it
    if log and rec.get("tiles_dir") and rec["tiles_dir"] != resolved:
        log(f"[seglab] note: {pred} was predicted from {rec['tiles_dir']}; showing the tiles of {resolved} "
            "(same tile ids and shapes are checked)")
    sources, missing = [], []
    names = None
    for t in tiles:
        mpath = pred / f"{t.tile_id}.tif"
        if not pr.mask_complete(mpath):
            missing.append(t.tile_id)
            continue
        labels = np.asarray(read_tiff(mpath)).astype(np.int64)
        image = t.load()
        image = image[None] if image.ndim == 2 else image
        if labels.shape != image.shape[1:]:
            raise SeglabError(f"{mpath}: mask {labels.shape} does not match its tile {t.files[0]} "
                              f"{image.shape[1:]}; give the tiles folder these masks were predicted from")
        names = feat.channel_names_for(channel_names or feat.DEFAULT_CHANNELS, image.shape[0])
        objs = feat.object_features(labels, image, p, names, t.tile_id)
        conf = pred / pr.OBJECTS_DIR / f"{t.tile_id}.csv"
        if conf.is_file():   # predicted with a curation classifier: its confidence per object
            c = pd.read_csv(conf)
            if "classifier_confidence" in c.columns:
                objs = objs.merge(c[["object_id", "classifier_confidence"]], on="object_id", how="left")

        def read_image(y, x, h, w, _im=image):
            return _im[:, y:y + h, x:x + w]

        def read_labels(y, x, h, w, _lab=labels):
            return _lab[y:y + h, x:x + w]

        sources.append(Source(t.tile_id, objs, read_image, read_labels, labels.shape))
    if not sources:
        raise SeglabError(f"--predict {pred}: none of the {len(tiles)} tiles of {tiles_dir} has a mask here; "
                          "give the tiles folder these masks were predicted from")
    return sources, {"segmentation_id": ans.segmentation_id(rec.get("model_id"), rec.get("settings") or {}),
                     "pixel_size_um": p, "channels": names, "run_area": AreaFilter(), "paths": [str(pred)],
                     "tiles_without_mask": missing}


class ChunkCache:
    """Regions of a slide's label image (``labels.ome.zarr``, array ``0``) read through its decoded
    chunks, the last ``keep`` of them kept: the cards' crops of neighbouring objects (instances are
    in centroid order) share chunks, so each chunk is decompressed about once instead of once per
    card (measured: 10 ms of 12 ms per card went to opening and decoding)."""

    def __init__(self, path: str | os.PathLike, keep: int = 16):
        import zarr

        self.arr = zarr.open_group(str(path), mode="r")["0"]
        self.chunks = tuple(int(c) for c in self.arr.chunks)
        self.keep = int(keep)
        self.cache: dict = {}

    def _chunk(self, i: int, j: int) -> np.ndarray:
        if (i, j) in self.cache:
            self.cache[(i, j)] = self.cache.pop((i, j))   # most recent last
        else:
            cy, cx = self.chunks
            self.cache[(i, j)] = np.asarray(self.arr[i * cy:(i + 1) * cy, j * cx:(j + 1) * cx])
            if len(self.cache) > self.keep:
                self.cache.pop(next(iter(self.cache)))
        return self.cache[(i, j)]

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The (h, w) region at (y, x) px (inside the image)."""
        cy, cx = self.chunks
        out = np.zeros((h, w), self.arr.dtype)
        for i in range(y // cy, (y + h - 1) // cy + 1):
            for j in range(x // cx, (x + w - 1) // cx + 1):
                b = self._chunk(i, j)
                y0, y1 = max(y, i * cy), min(y + h, i * cy + b.shape[0])
                x0, x1 = max(x, j * cx), min(x + w, j * cx + b.shape[1])
                if y1 > y0 and x1 > x0:
                    out[y0 - y:y1 - y, x0 - x:x1 - x] = b[y0 - i * cy:y1 - i * cy, x0 - j * cx:x1 - j * cx]
        return out


# --------------------------------------------------------------------------- crops


def crop_window(cy: float, cx: float, crop_px: int) -> tuple[int, int]:
    """(y0, x0) px of the ``crop_px`` square whose centre px holds the centroid (cy, cx)."""
    return int(math.floor(cy)) - crop_px // 2, int(math.floor(cx)) - crop_px // 2


def read_padded(read: Callable, shape: tuple[int, int], y0: int, x0: int, size: int, channels: int | None):
    """The ``size`` x ``size`` window at (y0, x0) of a source; px outside the source are 0."""
    h, w = shape
    ry0, rx0, ry1, rx1 = max(y0, 0), max(x0, 0), min(y0 + size, h), min(x0 + size, w)
    out = np.zeros((size, size) if channels is None else (channels, size, size), np.float32 if channels else np.int64)
    if ry1 > ry0 and rx1 > rx0:
        part = np.asarray(read(ry0, rx0, ry1 - ry0, rx1 - rx0))
        if channels is None:
            out[ry0 - y0: ry1 - y0, rx0 - x0: rx1 - x0] = part
        else:
            out[:, ry0 - y0: ry1 - y0, rx0 - x0: rx1 - x0] = part[:channels]
    return out


def render_crop(image: np.ndarray, labels: np.ndarray, label: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """RGB uint8 (h, w, 3) of a crop: channels (C, h, w) in :data:`CHANNEL_COLORS`, each scaled from
    ``lo[c]`` (black) to ``hi[c]`` (full colour); the outline of ``label`` in yellow, other
    objects' outlines in grey (inner boundaries, 1 px)."""
    from skimage.segmentation import find_boundaries

    rgb = np.zeros(labels.shape + (3,), np.float32)
    for c in range(min(image.shape[0], len(CHANNEL_COLORS))):
        v = np.clip((image[c] - lo[c]) / max(float(hi[c] - lo[c]), 1e-9), 0, 1)
        rgb += v[..., None] * np.asarray(CHANNEL_COLORS[c], np.float32)
    rgb = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    others = find_boundaries(np.where(labels == label, 0, labels), mode="inner") & (labels != label)
    rgb[others] = NEIGHBOUR_RGB
    rgb[find_boundaries(labels == label, mode="inner") & (labels == label)] = OUTLINE_RGB
    return rgb


def auto_crop_px(tables: Sequence[pd.DataFrame]) -> int:
    """A crop side (px) holding most objects with context: 1.5 x the 95th percentile of the objects'
    bbox side, a multiple of 8 in [48, 512]."""
    sides = np.concatenate([np.maximum(t["bbox_y1"] - t["bbox_y0"], t["bbox_x1"] - t["bbox_x0"]).to_numpy()
                            for t in tables if len(t)] or [np.zeros(0)])
    if not len(sides):
        return MIN_CROP_PX
    side = int(math.ceil(1.5 * float(np.percentile(sides, 95)) / 8.0) * 8)
    return int(min(max(side, MIN_CROP_PX), MAX_CROP_PX))


def display_range(src: Source, rows: pd.DataFrame, crop_px: int, n_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (lo, hi): the 1st and 99.8th percentiles of up to :data:`RANGE_SAMPLE` of the
    source's crops (the same scale for every card of a source, so a dim object looks dim)."""
    take = rows.iloc[np.linspace(0, len(rows) - 1, min(len(rows), RANGE_SAMPLE)).astype(int)]
    px = []
    for _, r in take.iterrows():
        y0, x0 = crop_window(r["centroid_y_px"], r["centroid_x_px"], crop_px)
        px.append(read_padded(src.read_image, src.shape, y0, x0, crop_px, n_channels).reshape(n_channels, -1))
    allpx = np.concatenate(px, axis=1)
    lo = np.percentile(allpx, PERCENTILES[0], axis=1)
    hi = np.percentile(allpx, PERCENTILES[1], axis=1)
    return lo, np.maximum(hi, lo + 1e-6)


def write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(path, format="PNG")


# --------------------------------------------------------------------------- the export


def _check_within(area: AreaFilter, run: AreaFilter, p: float) -> None:
    glo, ghi = area.px_bounds(p)
    rlo, rhi = run.px_bounds(p)
    if glo < rlo or (rhi is not None and (ghi is None or ghi > rhi)):
        raise SeglabError(f"area filter {area.describe(p)} reaches beyond the slide run's {run.describe(p)}: objects "
                          "outside the run's filter are not in its label image. Give bounds inside the run's, or "
                          "rerun seglab predict-slide with the wider filter")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SeglabError(f"--out {out}: is a file; give a folder for the gallery")
    if out.is_dir() and any(out.iterdir()):
        gj = out / ans.GALLERY_FILE
        if not gj.is_file():
            raise SeglabError(f"--out {out}: folder is not empty and holds no gallery export; give a new or empty "
                              "folder (an export replaces only an earlier export)")
        if not overwrite:
            try:
                old = json.loads(gj.read_text()).get("export_id", "?")
            except ValueError:
                old = "unreadable"
            raise SeglabError(f"--out {out}: holds gallery export {str(old)[:12]}; answers made on it stay valid only "
                              "with it. Give another --out, or --overwrite to replace it")


def export_gallery(sources: Sequence[Source], made: dict, out: str | os.PathLike, *,
                   area: AreaFilter | None = None, cell_type: str = DEFAULT_CELL_TYPE, per_page: int = DEFAULT_PER_PAGE,
                   sample: int | None = None, seed: int = 0, crop_px: int | None = None, overwrite: bool = False,
                   kind: str = "slide", log: Callable | None = print) -> dict:
    """Write a gallery export of ``sources`` (:func:`slide_sources` / :func:`tile_sources`) to ``out``.

    Parameters
    ----------
    area : the gallery's area filter (um^2; default the run's). For slides it must lie within the run's
        filter, and a bound it leaves open (None) is the run's.
    cell_type : the cell type people answer for (one gallery, one model per cell type).
    per_page : cards per page (300). sample, seed : show a seeded random sample of ``sample``
        objects (default all). crop_px : side of a crop, px (default :func:`auto_crop_px`).
    overwrite : replace an earlier export in ``out`` (another folder content is never replaced).

    The folder is written in a temporary folder beside ``out`` and renamed into place. Returns
    the gallery record (what ``gallery.json`` holds). The sources are closed on return or refusal.
    """
    try:
        return _export(sources, made, Path(out), area=area, cell_type=cell_type, per_page=per_page, sample=sample,
                       seed=seed, crop_px=crop_px, overwrite=overwrite, kind=kind, log=log)
    finally:
        for s in sources:
            s.close()


def _export(sources, made, out: Path, *, area, cell_type, per_page, sample, seed, crop_px, overwrite, kind, log) -> dict:
    p = float(made["pixel_size_um"])
    run_area = made.get("run_area") or AreaFilter()
    area = area or run_area
    if kind == "slide":
        # a slide run's label image holds only the objects inside its own filter: a bound not given
        # is the run's, and a bound beyond the run's is refused
        area = AreaFilter(run_area.min_um2 if area.min_um2 is None else area.min_um2,
                          run_area.max_um2 if area.max_um2 is None else area.max_um2, source=area.source)
        _check_within(area, run_area, p)
    if not isinstance(per_page, int) or per_page < 1:
        raise SeglabError(f"--per-page {per_page!r}: give a whole number of cards per page >= 1 (e.g. 300)")
    if not str(cell_type).strip():
        raise SeglabError("--cell-type: give the name of the cell type people answer for")
    _prepare_out(out, overwrite)
    try:
        from seglab.curate import features as feat

        known = feat.feature_columns(made.get("channels") or ())
    except ImportError:   # features not importable: show the intensity columns the table has
        known = None

    rows, n_found = [], 0
    for src in sources:
        t = src.objects.copy()
        n_found += len(t)
        if not len(t):
            continue
        t = area.apply(t, p)
        t = t.assign(_source=src.id)
        rows.append(t)
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["object_id", "area_px"])
    n_area = len(table)
    if sample is not None:
        if int(sample) < 1:
            raise SeglabError(f"--sample {sample}: give a number of objects >= 1")
        if int(sample) < len(table):
            pick = np.sort(np.random.default_rng(int(seed)).choice(len(table), int(sample), replace=False))
            table = table.iloc[pick].reset_index(drop=True)
    if not len(table):
        raise SeglabError(f"no object to show: {n_found} found, none inside the area filter {area.describe(p)}; "
                          "widen the filter or check the segmentation")
    dup = table["object_id"][table["object_id"].duplicated()].tolist()
    if dup:
        raise SeglabError(f"object ids repeat across sources ({dup[:3]}): give sources with distinct ids")
    fcols = [c for c in (known if known is not None else []) if c in table.columns]
    if not fcols:   # no features table: the intensity columns the instance table carries
        fcols = [c for c in table.columns if c.startswith("mean_")]
    has_conf = "classifier_confidence" in table.columns
    crop_px = int(crop_px) if crop_px else auto_crop_px([table])
    if crop_px < 8:
        raise SeglabError(f"--crop-px {crop_px}: give at least 8 px")
    area_rec = ans.area_filter_record(area.min_um2, area.max_um2)
    ids = table["object_id"].astype(str).tolist()
    eid = ans.export_id(ids, made["segmentation_id"], area_rec)

    objects = []
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        by_src = {s.id: s for s in sources}
        n_ch = len(made.get("channels") or []) or None
        for sid, part in table.groupby("_source", sort=False):
            src = by_src[sid]
            nc = n_ch or np.asarray(src.read_image(0, 0, 1, 1)).shape[0]
            lo, hi = display_range(src, part, crop_px, nc)
            for _, r in part.iterrows():
                y0, x0 = crop_window(r["centroid_y_px"], r["centroid_x_px"], crop_px)
                img = read_padded(src.read_image, src.shape, y0, x0, crop_px, nc)
                lab = read_padded(src.read_labels, src.shape, y0, x0, crop_px, None)
                label = int(r["label"])
                if not (lab == label).any():
                    raise SeglabError(f"{sid}: object {r['object_id']} (label {label}) is not in the label image "
                                      "at its place; the run's outputs disagree: rerun its merge")
                rel = f"crops/{safe_name(sid)}/{safe_name(r['object_id'])}.png"
                write_png(stage / rel, render_crop(img, lab, label, lo, hi))
                a_px = int(r["area_px"])
                a_um2 = float(px_to_um2(a_px, p))
                o = {"object_id": str(r["object_id"]), "source": str(sid), "area_px": a_px,
                     "area_um2": round(a_um2, 4), "area_text": area_text(a_um2, a_px), "crop": rel,
                     "label": label, "centroid_y_px": round(float(r["centroid_y_px"]), 2),
                     "centroid_x_px": round(float(r["centroid_x_px"]), 2)}
                for c in fcols:
                    v = r[c]
                    o[c] = None if pd.isna(v) else round(float(v), 4)
                if has_conf:
                    v = r["classifier_confidence"]
                    o["classifier_confidence"] = None if pd.isna(v) else round(float(v), 4)
                objects.append(o)
        for i, o in enumerate(objects):
            o["page"] = i // per_page + 1
        record = {"format": ans.GALLERY_FORMAT, "export_id": eid, "segmentation_id": made["segmentation_id"],
                  "area_filter": area_rec, "area_filter_px": list(area.px_bounds(p)),
                  "area_filter_text": area.describe(p), "pixel_size_um": p, "cell_type": str(cell_type),
                  "feature_columns": fcols, "has_confidence": bool(has_conf), "kind": kind,
                  "sources": [s.id for s in sources], "made_from": made.get("paths", []),
                  "channels": made.get("channels"), "channel_colors": [list(c) for c in CHANNEL_COLORS],
                  "crop_px": crop_px, "per_page": per_page, "n_pages": (len(objects) + per_page - 1) // per_page,
                  "counts": {"n_found": int(n_found), "n_outside_area_filter": int(n_found - n_area),
                             "n_left_out_by_sample": int(n_area - len(objects)), "n_objects": len(objects),
                             "tiles_without_mask": list(made.get("tiles_without_mask", []))},
                  "sample": None if sample is None else {"n": int(sample), "seed": int(seed)},
                  "created_at": ans.now_iso(), "seglab_version": __version__, "objects": objects}
        (stage / ans.GALLERY_FILE).write_text(io.json_text(record))
        (stage / DATA_JS).write_text("window.SEGLAB_GALLERY = " + json.dumps(record, sort_keys=True) + ";\n")
        (stage / "assets").mkdir()
        here = Path(__file__).parent / "assets"
        for a in ASSETS:
            shutil.copyfile(here / a, stage / "assets" / a)
        html = (here / "gallery.html").read_text()
        title = f"{cell_type}: {len(objects)} objects ({', '.join(record['sources'][:3])}" \
                f"{', ...' if len(record['sources']) > 3 else ''})"
        (stage / INDEX).write_text(html.replace("{{title}}", _html_escape(title)))
        os.chmod(stage, 0o777 & ~io.current_umask())
        _swap_in(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if log:
        c = record["counts"]
        log(f"[seglab] gallery {out}: {c['n_objects']} objects on {record['n_pages']} page(s) of {per_page}; "
            f"{c['n_found']} found, {c['n_outside_area_filter']} outside the area filter {area.describe(p)}, "
            f"{c['n_left_out_by_sample']} left out by the sample; export {eid[:12]}")
        if c["tiles_without_mask"]:
            log(f"[seglab] {len(c['tiles_without_mask'])} tile(s) have no mask and are not shown, e.g. "
                f"{c['tiles_without_mask'][0]}")
    return record


def _html_escape(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def _swap_in(stage: Path, out: Path) -> None:
    """Rename the staged export onto ``out``; an earlier export there is moved aside first and
    removed only once the new one is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old.tmp", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def gallery_from_slide_run(folder, out, *, area: AreaFilter | None = None, features: bool = True, **kw) -> dict:
    """:func:`export_gallery` of a slide run folder (``seglab predict-slide``'s output)."""
    sources, made = slide_sources(folder, features=features)
    return export_gallery(sources, made, out, area=area, kind="slide", **kw)


def gallery_from_predict(predict_dir, tiles_dir, out, *, pixel_size_um: float, channel_names=None,
                         area: AreaFilter | None = None, **kw) -> dict:
    """:func:`export_gallery` of a tile prediction folder (``seglab predict``'s ``--out``) and its tiles."""
    sources, made = tile_sources(predict_dir, tiles_dir, pixel_size_um, channel_names, log=kw.get("log", print))
    return export_gallery(sources, made, out, area=area, kind="tiles", **kw)
