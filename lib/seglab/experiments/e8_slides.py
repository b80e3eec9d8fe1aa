"""E8 whole slides: a simulated multi-slide study, sampled then full, seams checked against the truth.

Users segment whole slides: first a seeded sample of the tiles (10%, for annotation), then all
of them. E8 writes simulated slides (half CZI, half OME-TIFF; :mod:`seglab.data.simulate_slides`)
whose cells are known, segments them tile by tile (:mod:`seglab.segment.slides`) with the
``sample_fraction`` pass first and the full pass after it (which reuses the sampled tiles), and
checks the result against the truth: counts and densities per slide, the um^2 area filter's
effect (one conversion, :class:`seglab.core.units.AreaFilter`, applied to the truth and the
predictions alike), and the seams: objects near tile borders recovered as well as elsewhere and
as well as one-window inference away from any border.

Steps, in the notebook's order
------------------------------
1. :func:`make_slides`: the simulated slides (cached in ``slides_dir`` by their arguments).
2. :func:`predict_pass` with ``sample_fraction``, then with 1.0, into the same folder.
3. :func:`count_table`: per slide, truth vs sampled pass vs full pass, counts and densities.
4. :func:`evaluate_slide` per slide (:func:`accuracy_table`), :func:`seam_table` (recall by distance
   to the nearest seam), :func:`single_window_reference` (one window, away from borders).
5. :func:`headline`: ``summary.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings
from seglab.core import paths
from seglab.core.units import AreaFilter
from seglab.data import simulate_slides as sim
from seglab.segment import slides as seg

SEAM_BANDS_PX = (0, 16, 32, 64, math.inf)   # distance of a true centroid to the nearest seam, px
IOU = 0.5


def preflight(params: dict, cohort: Callable) -> None:
    """Before the notebook starts: the tiling and the filter can be built from the params."""
    from seglab.experiments import ParamConflict

    try:
        settings(params)
    except SeglabError as exc:
        key = next((k for k in ("min_area_um2", "overlap_px", "tile_px", "sample_fraction") if k in str(exc)),
                   "tile_px")
        raise ParamConflict(key, str(exc), "change it there") from None


def settings(params: dict, fraction: float | None = None) -> seg.SlideSettings:
    """The :class:`SlideSettings` of the params (``fraction`` overrides ``sample_fraction``)."""
    p = dict(params)
    if fraction is not None:
        p["sample_fraction"] = fraction
    return seg.SlideSettings.from_params(p, source="params/<profile>/08_slides.yaml")


def mask_settings(params: dict) -> MaskSettings:
    """The mask settings of E8: ``cell_diameter_px``, the library's defaults for the rest."""
    return MaskSettings(diameter_px=params["cell_diameter_px"])


def make_slides(params: dict, log: Callable | None = print) -> list[dict]:
    """Step 1: ``n_slides`` simulated slides of ``slide_px`` px in ``slides_dir`` (CZI for even
    indices, OME-TIFF for odd), seeds ``seed + i``; reused when already written with the same arguments."""
    out = paths.resolve(params["slides_dir"])
    made = []
    for i in range(int(params["n_slides"])):
        fmt = "czi" if i % 2 == 0 else "ome-tiff"
        r = sim.simulate_slide(out, f"S{i + 1:02d}", size_px=int(params["slide_px"]), fmt=fmt,
                               seed=int(params["seed"]) + i, sim=sim.SlideSim(pixel_size_um=0.35))
        made.append({**r, "slide": f"S{i + 1:02d}", "fmt": fmt})
        if log:
            log(f"[seglab] slide {made[-1]['slide']} ({fmt}): {r['n_cells']} simulated cells -> {paths.relative(r['path'])}")
    return made


def predict_pass(params: dict, slides: Sequence[dict], out: Path, fraction: float,
                 log: Callable | None = print) -> list[seg.SlideResult]:
    """Step 2: one pass over every slide at ``fraction`` of its tissue tiles (``workers`` processes)."""
    mask = mask_settings(params)
    return seg.run_slides([s["path"] for s in slides], out, params["model"], settings(params, fraction), mask,
                          device=None, workers=int(params["workers"]), log=log)


def keep_sample_tables(results: Sequence[seg.SlideResult], dest: Path) -> pd.DataFrame:
    """Copy each slide's instance table, tile table and run record of a sampled pass to
    ``dest/<slide>/`` (the full pass rewrites the slide folders); one row per slide: slide,
    n_selected_tiles, n_objects."""
    import shutil

    rows = []
    for r in results:
        to = Path(dest) / r.record["slide"]
        to.mkdir(parents=True, exist_ok=True)
        for name in (seg.INSTANCES, seg.TILE_TABLE, seg.RUN_RECORD):
            shutil.copy2(r.out / name, to / name)
        rows.append({"slide": r.record["slide"], "n_selected_tiles": r.record["n_selected_tiles"],
                     "n_objects": len(r.instances)})
    return pd.DataFrame(rows)


def merge_checks(results: Sequence[seg.SlideResult]) -> dict:
    """{slide: its merge check record (``merge_check.json``)}."""
    import json

    return {r.record["slide"]: json.loads((r.out / seg.MERGE_CHECK).read_text()) for r in results}


def overview_figures(results: Sequence[seg.SlideResult]) -> dict:
    """{file name: figure}: every slide's thumbnail with its objects, and the first slide's QC
    thumbnail (tiles and outlines)."""
    from seglab.plots import slides as plots

    thumbs = [np.load(r.out / seg.THUMB)["thumb"] for r in results]
    first = results[0]
    return {"slides_overview.png": plots.overview_figure(thumbs, [r.record["slide"] for r in results],
                                                          [r.instances for r in results],
                                                          [r.record["thumb_factor"] for r in results]),
            "slides_qc.png": plots.qc_thumbnail(thumbs[0], first.record["thumb_factor"], first.tiles,
                                                     first.instances, first.labels_path, title=first.record["slide"])}


def _truth_filtered(slide: dict, area: AreaFilter, pixel_size_um: float) -> tuple[np.ndarray, pd.DataFrame]:
    """The truth labels with the objects the area filter drops removed, and the kept truth rows."""
    labels, cells = sim.read_truth(slide)
    keep = cells[area.keep(cells["area_px"].to_numpy(), pixel_size_um)]
    lut = np.zeros(int(labels.max()) + 1, labels.dtype)
    lut[keep["label"].to_numpy()] = keep["label"].to_numpy()
    return lut[labels], keep.reset_index(drop=True)


def _in_cores(y: np.ndarray, x: np.ndarray, tiles: pd.DataFrame) -> np.ndarray:
    sel = tiles[tiles["selected"]]
    inside = np.zeros(len(y), bool)
    for t in sel.itertuples(index=False):
        inside |= (y >= t.y0) & (y < t.y1) & (x >= t.x0) & (x < t.x1)
    return inside


def seam_distance(y: np.ndarray, x: np.ndarray, height_px: int, width_px: int, tile_px: int) -> np.ndarray:
    """Distance (px) of each point to the nearest seam (an inner border of the tile grid)."""
    d = np.full(len(y), np.inf)
    for coord, size in ((np.asarray(y, float), height_px), (np.asarray(x, float), width_px)):
        seams = np.arange(tile_px, size, tile_px, dtype=float)
        if len(seams):
            d = np.minimum(d, np.abs(coord[:, None] - seams[None, :]).min(axis=1))
    return d


def evaluate_slide(slide: dict, result: seg.SlideResult, area: AreaFilter) -> tuple[dict, pd.DataFrame]:
    """Score one slide's stitched labels against its truth (both filtered by ``area``), on the tiles
    the pass segmented.

    Returns (row, per-truth-object table). The row: slide, n_true, n_pred, tp, fp, fn, ap50,
    precision, recall, n_split_or_double (true objects overlapped by two or more predictions,
    each covering >= 20% of it: cut in two or counted twice). The table: label, centroid,
    seam_distance_px, matched (IoU >= 0.5).
    """
    from seglab.evaluate import metrics

    rec = result.record
    truth, kept = _truth_filtered(slide, area, rec["pixel_size_um"])
    inside = _in_cores(kept["centroid_y_px"].to_numpy(), kept["centroid_x_px"].to_numpy(), result.tiles)
    drop = kept["label"].to_numpy()[~inside]
    if len(drop):
        truth = np.where(np.isin(truth, drop), 0, truth)
    kept = kept[inside].reset_index(drop=True)
    pred = seg.read_labels(result.out)
    ov = metrics.overlap(truth, pred)
    m = metrics.match(truth, pred, thresholds=(IOU,)).iloc[0]
    pairs = metrics.matched_pairs(truth, pred, IOU)
    tab = ov.table()
    big = tab[tab["intersection_px"] >= 0.2 * tab["true_area_px"]]
    doubles = int((big.groupby("true_id").size() >= 2).sum())
    per = kept.assign(seam_distance_px=seam_distance(kept["centroid_y_px"], kept["centroid_x_px"], rec["height_px"],
                                                     rec["width_px"], rec["settings"]["tile_px"]),
                      matched=kept["label"].isin(pairs["true_id"]), slide=rec["slide"])
    row = {"slide": rec["slide"], "format": rec["format"], "n_true": int(m["n_true"]), "n_pred": int(m["n_pred"]),
           "tp": int(m["tp"]), "fp": int(m["fp"]), "fn": int(m["fn"]), "ap50": round(float(m["ap"]), 4),
           "precision": round(float(m["precision"]), 4), "recall": round(float(m["recall"]), 4),
           "n_split_or_double": doubles}
    return row, per


def accuracy_table(slides: Sequence[dict], results: Sequence[seg.SlideResult], area: AreaFilter) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`evaluate_slide` of every slide: (one row per slide, every true object)."""
    rows, per = [], []
    for s, r in zip(slides, results):
        row, p = evaluate_slide(s, r, area)
        rows.append(row)
        per.append(p)
    return pd.DataFrame(rows), pd.concat(per, ignore_index=True)


def seam_table(per_object: pd.DataFrame, bands: Sequence[float] = SEAM_BANDS_PX) -> pd.DataFrame:
    """Recall at IoU 0.5 of true objects by the distance of their centroid to the nearest seam (px)."""
    rows = []
    for lo, hi in zip(bands[:-1], bands[1:]):
        sub = per_object[(per_object["seam_distance_px"] >= lo) & (per_object["seam_distance_px"] < hi)]
        rows.append({"band": f"{lo:g}-{hi:g} px" if math.isfinite(hi) else f">= {lo:g} px", "n_true": len(sub),
                     "recall": round(float(sub["matched"].mean()), 4) if len(sub) else float("nan")})
    return pd.DataFrame(rows)


def single_window_reference(params: dict, slide: dict, model, area: AreaFilter) -> dict:
    """One window of ``tile_px + 2 overlap_px`` px at the slide's centre, segmented in one pass; its
    objects whose centroid lies in the central ``tile_px`` core are scored against the truth there
    (filtered by ``area``): what single-tile inference gives away from any border (ap50, recall, n_true)."""
    from seglab.data.slides import open_slide
    from seglab.evaluate import metrics

    st = settings(params)
    with open_slide(slide["path"], pixel_size_um=st.pixel_size_um, channels=st.channels) as s:
        t = st.tile_px
        cy, cx = s.height_px // 2, s.width_px // 2
        y0, x0 = max(cy - t // 2, 0), max(cx - t // 2, 0)
        tile = seg.Tile("centre", 0, 0, y0, min(y0 + t, s.height_px), x0, min(x0 + t, s.width_px),
                        max(y0 - st.overlap_px, 0), min(y0 + t + st.overlap_px, s.height_px),
                        max(x0 - st.overlap_px, 0), min(x0 + t + st.overlap_px, s.width_px))
        image, labels = seg.segment_tile(model, s, tile, mask_settings(params))
        objs, crop, (oy, ox) = seg.tile_objects(labels, image, tile, s.id, s.pixel_size_um, s.names)
        keep = area.keep(objs["area_px"].to_numpy(), s.pixel_size_um) if len(objs) else np.zeros(0, bool)
        lut = np.zeros(len(objs) + 1, np.uint32)
        lut[objs["local_id"].to_numpy()[keep]] = objs["local_id"].to_numpy()[keep]
        pred = np.zeros((tile.wy1 - tile.wy0, tile.wx1 - tile.wx0), np.uint32)
        if crop.size:
            pred[oy - tile.wy0: oy - tile.wy0 + crop.shape[0], ox - tile.wx0: ox - tile.wx0 + crop.shape[1]] = lut[crop]
        truth, kept = _truth_filtered(slide, area, s.pixel_size_um)
        truth = truth[tile.wy0:tile.wy1, tile.wx0:tile.wx1]
        core = kept[(kept["centroid_y_px"] >= tile.y0) & (kept["centroid_y_px"] < tile.y1)
                    & (kept["centroid_x_px"] >= tile.x0) & (kept["centroid_x_px"] < tile.x1)]
        truth = np.where(np.isin(truth, core["label"].to_numpy()), truth, 0)
    m = metrics.match(truth, pred, thresholds=(IOU,)).iloc[0]
    return {"slide": slide["slide"], "window_px": int(tile.wy1 - tile.wy0), "n_true": int(m["n_true"]),
            "ap50": round(float(m["ap"]), 4), "recall": round(float(m["recall"]), 4),
            "precision": round(float(m["precision"]), 4)}


def tissue_mm2(tiles: pd.DataFrame, pixel_size_um: float) -> float:
    """Tissue area (mm^2) of the selected tiles' cores: core px x tissue fraction (thumbnail)."""
    sel = tiles[tiles["selected"]]
    return float(((sel["y1"] - sel["y0"]) * (sel["x1"] - sel["x0"]) * sel["tissue_fraction"]).sum()) \
        * pixel_size_um ** 2 / 1e6


def count_table(slides: Sequence[dict], sample: Sequence[seg.SlideResult], full: Sequence[seg.SlideResult],
                area: AreaFilter) -> pd.DataFrame:
    """Per slide: true objects (filtered) on all tissue tiles and on the sampled tiles; found by the
    full pass and by the sampled pass, and the sample scaled up by its share of the tissue area
    (:func:`tissue_mm2`; a tile at the tissue's edge holds less of it); densities per mm^2 of
    tissue (truth, full, sample)."""
    rows = []
    for s, rs, rf in zip(slides, sample, full):
        p = rf.record["pixel_size_um"]
        _, kept = sim.read_truth(s)
        kept = kept[area.keep(kept["area_px"].to_numpy(), p)]
        y, x = kept["centroid_y_px"].to_numpy(), kept["centroid_x_px"].to_numpy()
        n_true = int(_in_cores(y, x, rf.tiles).sum())
        n_true_s = int(_in_cores(y, x, rs.tiles).sum())
        full_mm2, sample_mm2 = tissue_mm2(rf.tiles, p), tissue_mm2(rs.tiles, p)
        rows.append({"slide": rf.record["slide"], "format": rf.record["format"],
                     "n_tissue_tiles": rf.record["n_tissue_tiles"], "n_sample_tiles": rs.record["n_selected_tiles"],
                     "tissue_mm2": round(full_mm2, 4), "sample_tissue_mm2": round(sample_mm2, 4),
                     "n_true": n_true, "n_full": len(rf.instances), "n_true_sample": n_true_s,
                     "n_sample": len(rs.instances), "n_sample_scaled": round(len(rs.instances) * full_mm2 / sample_mm2, 1),
                     "count_error_full": round(len(rf.instances) / max(n_true, 1) - 1, 4),
                     "density_true_per_mm2": round(n_true / full_mm2, 1),
                     "density_full_per_mm2": round(len(rf.instances) / full_mm2, 1),
                     "density_sample_per_mm2": round(len(rs.instances) / sample_mm2, 1)})
    return pd.DataFrame(rows)


def filter_numbers(results: Sequence[seg.SlideResult], area: AreaFilter) -> pd.DataFrame:
    """Per slide: detections, kept by the filter, dropped below / above, with the bounds in um^2 and px."""
    rows = []
    for r in results:
        p = r.record["pixel_size_um"]
        lo, hi = area.px_bounds(p)
        a = r.detections["area_px"].to_numpy()
        rows.append({"slide": r.record["slide"], "n_detections": len(a), "n_kept": int(area.keep(a, p).sum()),
                     "n_below_min": int((a < lo).sum()), "n_above_max": int((a > hi).sum()) if hi is not None else 0,
                     "min_area_um2": area.min_um2, "max_area_um2": area.max_um2, "min_area_px": lo, "max_area_px": hi,
                     "pixel_size_um": p})
    return pd.DataFrame(rows)


def headline(counts: pd.DataFrame, accuracy: pd.DataFrame, seams: pd.DataFrame, reference: dict,
             sample_fraction: float) -> dict:
    """The run's summary: ``full_ap50_stitched`` (pooled over slides), ``single_ap50_window`` (one window
    away from borders), ``full_recall_near_seams`` (true centroid < 16 px from a seam) and
    ``full_recall_away`` (>= 64 px), ``full_count_error_mean`` (found / true - 1, mean over slides),
    ``full_n_split_or_double``, ``n_slides``, ``sample_fraction``, ``sample_tiles``, ``full_tiles``."""
    tp, fp, fn = accuracy["tp"].sum(), accuracy["fp"].sum(), accuracy["fn"].sum()
    near = seams.iloc[0]
    away = seams.iloc[-1]
    return {"full_ap50_stitched": round(float(tp / max(tp + fp + fn, 1)), 4),
            "single_ap50_window": reference["ap50"],
            "full_recall_near_seams": float(near["recall"]), "full_recall_away": float(away["recall"]),
            "full_count_error_mean": round(float(counts["count_error_full"].mean()), 4),
            "full_n_split_or_double": int(accuracy["n_split_or_double"].sum()),
            "n_slides": int(len(counts)), "sample_fraction": float(sample_fraction),
            "sample_tiles": int(counts["n_sample_tiles"].sum()), "full_tiles": int(counts["n_tissue_tiles"].sum())}
