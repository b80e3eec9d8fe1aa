"""Figures of whole slides: the QC thumbnail with outlines, the filter's effect, counts against truth, seams."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from seglab.plots.base import check_columns, grouped_bars, new_figure


def _stretch(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def outlined_rgb(gray: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """(Y, X, 3) float: a grey image (stretched to 1-99.5 percentiles) with label outlines in red."""
    from skimage.segmentation import find_boundaries

    g = _stretch(gray.astype(np.float32))
    rgb = np.repeat(g[..., None], 3, axis=2)
    if labels is not None and labels.any():
        b = find_boundaries(labels, mode="inner")
        rgb[b] = (1.0, 0.15, 0.1)
    return rgb


def _grid(ax, tiles: pd.DataFrame, factor: int) -> None:
    from matplotlib.patches import Rectangle

    for t in tiles.itertuples(index=False):
        colour = "lime" if t.selected else ("gold" if t.tissue else None)
        if colour is None:
            continue
        ax.add_patch(Rectangle((t.x0 / factor - 0.5, t.y0 / factor - 0.5), (t.x1 - t.x0) / factor,
                               (t.y1 - t.y0) / factor, fill=False, lw=0.6, ec=colour, alpha=0.8))


def qc_thumbnail(thumb: np.ndarray, factor: int, tiles: pd.DataFrame, instances: pd.DataFrame,
                 labels_path: str | os.PathLike | None = None, *, title: str = ""):
    """The QC figure of one slide: the thumbnail (first channel, ``factor`` slide px per px) with the
    objects' outlines (from the label image's OME-Zarr at ``labels_path``, every ``factor``-th px),
    the tile grid (green: segmented; yellow: tissue not in the sample; none: no tissue) and, at
    full resolution, the region around a seam crossing (4 tiles' corner) with outlines."""
    import zarr

    labels = None
    arr = None
    if labels_path is not None and os.path.isdir(labels_path):
        arr = zarr.open_group(str(labels_path), mode="r")["0"]
        labels = np.asarray(arr[::factor, ::factor])[: thumb.shape[0], : thumb.shape[1]]
    fig = new_figure((11, 5.5))
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.6, 1])
    ax.imshow(outlined_rgb(thumb, labels if factor <= 4 else None))
    if factor > 4 and len(instances):
        ax.scatter(instances["centroid_x_px"] / factor, instances["centroid_y_px"] / factor, s=0.3, c="red", lw=0)
    _grid(ax, tiles, factor)
    ax.set_title(title + f" (1 px = {factor} slide px; green: segmented tiles, yellow: tissue not sampled)",
                 fontsize=8)
    ax.set_axis_off()
    sel = tiles[tiles["selected"]]
    ax2.set_axis_off()
    if arr is not None and len(sel):
        # the seam corner nearest the centre of the segmented tiles, 256 px around it
        inner = sel[(sel["y0"] > 0) & (sel["x0"] > 0)]
        t = (inner if len(inner) else sel).iloc[len(inner if len(inner) else sel) // 2]
        cy, cx = int(t["y0"]), int(t["x0"])
        y0, x0 = max(cy - 128, 0), max(cx - 128, 0)
        lab = np.asarray(arr[y0:y0 + 256, x0:x0 + 256])
        ax2.imshow(outlined_rgb(lab > 0, lab) if lab.any() else np.zeros((*lab.shape, 3)))
        ax2.axhline(cy - y0 - 0.5, color="cyan", lw=0.8, ls="--")
        ax2.axvline(cx - x0 - 0.5, color="cyan", lw=0.8, ls="--")
        ax2.set_title(f"objects at the tile corner y={cy}, x={cx} px (cyan: seams)", fontsize=8)
    return fig


def filter_effect(detections: pd.DataFrame, bounds_um2: tuple, bounds_px: tuple, pixel_size_um: float, *,
                  title: str = "area filter"):
    """Histogram of every detection's area in um^2 (bottom axis) and px (top axis), the filter's
    bounds drawn once from :class:`seglab.core.units.AreaFilter` (both units)."""
    from seglab.core.units import px_to_um2, um2_to_px

    check_columns(detections, ["area_um2", "area_px"], "filter_effect", source="seglab.segment.slides.predict_slide")
    fig = new_figure((6.5, 3.4))
    ax = fig.subplots()
    a = detections["area_um2"].to_numpy(float)
    bins = np.logspace(np.log10(max(a.min(), 0.5)), np.log10(a.max() + 1), 60) if len(a) else 10
    ax.hist(a, bins=bins, color="0.5")
    ax.set_xscale("log")
    for v, px, side in ((bounds_um2[0], bounds_px[0], "min"), (bounds_um2[1], bounds_px[1], "max")):
        if v is not None:
            ax.axvline(v, color="crimson", lw=1.2)
            ax.text(v, ax.get_ylim()[1] * 0.9, f" {side} {v:g} um$^2$\n = {px} px", color="crimson", fontsize=7)
    ax.set_xlabel("object area (um$^2$)")
    ax.set_ylabel("detections")
    top = ax.secondary_xaxis("top", functions=(lambda v: um2_to_px(v, pixel_size_um),
                                               lambda v: px_to_um2(v, pixel_size_um)))
    top.set_xlabel(f"area (px at {pixel_size_um:g} um/px)")
    ax.set_title(title, fontsize=9)
    return fig


def counts_figure(counts: pd.DataFrame):
    """Per slide: objects found (sampled pass scaled by its share of the tissue, full pass) against
    the truth, and density per mm^2 of tissue. ``counts``: slide, n_true, n_full, n_sample_scaled,
    density_true_per_mm2, density_full_per_mm2."""
    check_columns(counts, ["slide", "n_true", "n_full", "n_sample_scaled"], "counts_figure",
                  source="seglab.experiments.e8_slides.count_table")
    fig = new_figure((9, 3.4))
    ax, ax2 = fig.subplots(1, 2)
    grouped_bars(ax, counts["slide"], [(counts["n_true"], "truth (filtered)", "0.3"),
                                       (counts["n_full"], "full pass", "tab:blue"),
                                       (counts["n_sample_scaled"], "sample, scaled by tissue area", "tab:orange")],
                 ylabel="objects")
    if "density_true_per_mm2" in counts:
        ax2.scatter(counts["density_true_per_mm2"], counts["density_full_per_mm2"], label="full pass")
        if "density_sample_per_mm2" in counts:
            ax2.scatter(counts["density_true_per_mm2"], counts["density_sample_per_mm2"], label="10% sample",
                        marker="x")
        lo = float(np.nanmin(counts[[c for c in counts if c.startswith("density")]].to_numpy()))
        hi = float(np.nanmax(counts[[c for c in counts if c.startswith("density")]].to_numpy()))
        ax2.plot([lo, hi], [lo, hi], color="0.6", lw=0.8)
        ax2.set_xlabel("true density (cells / mm$^2$ of tissue)")
        ax2.set_ylabel("found density")
        ax2.legend(fontsize=7)
    return fig


def seam_figure(seams: pd.DataFrame):
    """Recall (and precision) of objects by distance of their centroid to the nearest seam (px).
    ``seams``: band, recall, precision, n_true (from seglab.experiments.e8_slides.seam_table)."""
    check_columns(seams, ["band", "recall", "n_true"], "seam_figure", source="seglab.experiments.e8_slides.seam_table")
    fig = new_figure((5.5, 3.2))
    ax = fig.subplots()
    x = np.arange(len(seams))
    ax.bar(x - 0.2, seams["recall"], 0.4, label="recall", color="tab:blue")
    if "precision" in seams:
        ax.bar(x + 0.2, seams["precision"], 0.4, label="precision", color="tab:green")
    ax.set_xticks(x, [f"{b}\n(n={n})" for b, n in zip(seams["band"], seams["n_true"])], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("at IoU 0.5")
    ax.set_xlabel("distance of the true centroid to the nearest seam")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def overview_figure(thumbs: Sequence[np.ndarray], names: Sequence[str], instances: Sequence[pd.DataFrame],
                    factors: Sequence[int]):
    """Every slide's thumbnail with its objects' centroids (red)."""
    n = len(thumbs)
    fig = new_figure((3.2 * n, 3.4))
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, th, name, inst, f in zip(axes, thumbs, names, instances, factors):
        ax.imshow(_stretch(th), cmap="gray")
        if len(inst):
            ax.scatter(inst["centroid_x_px"] / f, inst["centroid_y_px"] / f, s=0.2, c="red", lw=0)
        ax.set_title(f"{name}: {len(inst)} objects", fontsize=8)
        ax.set_axis_off()
    return fig
