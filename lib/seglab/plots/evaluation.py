"""Figures of the evaluation tables (a module of functions; each returns a matplotlib Figure).

The functions build a :class:`matplotlib.figure.Figure` directly (no pyplot, no
``plt.show()``), so they work headless, in notebooks (a returned Figure is
displayed) and in batch runs (``run.save_figure(fig, ...)`` or ``fig.savefig``).
They take the tables of :func:`seglab.evaluate.metrics.evaluate` (or an
:class:`seglab.evaluate.metrics.Evaluation` itself).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.plots.base import check_columns, new_figure

SOURCE = "seglab.evaluate.metrics.evaluate"  # where the tables these figures take come from
METRIC_LABELS = {
    "ap": "AP = TP / (TP + FP + FN)",
    "f1": "F1",
    "precision": "precision",
    "recall": "recall",
    "panoptic_quality": "panoptic quality",
    "mean_matched_iou": "mean IoU of matched pairs",
    "mean_true_score": "mean true score",
    "foreground_iou": "foreground pixel IoU",
    "foreground_dice": "foreground pixel Dice",
}


def _figure_and_axes(ax, figsize):
    """(figure, axes): a new figure with one axes, or the figure of the axes given."""
    if ax is None:
        fig = new_figure(figsize)
        return fig, fig.add_subplot()
    return ax.figure, ax


def _scored_images(per_image: pd.DataFrame) -> pd.DataFrame:
    """Rows of images with something to score (both-empty images have no ratio to plot)."""
    if "both_empty" in per_image.columns:
        return per_image[~per_image["both_empty"].astype(bool)]
    return per_image


def plot_metric_vs_threshold(result, metrics: Sequence[str] = ("ap", "f1"), *, summary: str = "pooled",
                             label: str | None = None, ax=None, figsize=(4.5, 3.5)):
    """Metrics against the IoU threshold, one line per metric.

    Parameters
    ----------
    result : Evaluation or DataFrame
        An :class:`~seglab.evaluate.metrics.Evaluation`, or a table with ``threshold`` and
        the metric columns (``pooled``, ``mean_over_images``, or :func:`seglab.evaluate.metrics.match`'s output).
    metrics : sequence of str
        Columns to draw, e.g. ("ap", "f1", "panoptic_quality").
    summary : "pooled" or "mean_over_images"
        Which summary of an Evaluation to draw; with "mean_over_images" a band
        shows +- one standard deviation across images.
    label : str, optional
        Prefix for the legend (e.g. the model name, to overlay models on one ``ax``).
    ax : matplotlib Axes, optional
        Draw into it (its Figure is returned) instead of a new Figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if hasattr(result, "pooled"):
        if summary not in ("pooled", "mean_over_images"):
            raise SeglabError(f"summary must be 'pooled' or 'mean_over_images', got {summary!r}")
        table = getattr(result, summary)
    else:
        table = result
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    check_columns(table, ["threshold", *metrics], "plot_metric_vs_threshold", source=SOURCE)
    fig, ax = _figure_and_axes(ax, figsize)
    table = table.sort_values("threshold")
    x = table["threshold"].to_numpy(float)
    for m in metrics:
        y = table[m].to_numpy(float)
        name = f"{label} {m}" if label else m
        (line,) = ax.plot(x, y, marker="o", ms=3, label=name)
        sd_col = f"{m}_sd"
        if sd_col in table.columns:
            sd = table[sd_col].to_numpy(float)
            ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel(METRIC_LABELS.get(metrics[0], metrics[0]) if len(metrics) == 1 else "score")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(min(x.min(), 0.5) - 0.02, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    if hasattr(result, "pooled"):
        ax.set_title(summary.replace("_", " "), fontsize="medium")
    return fig


def plot_group_bars(per_image: pd.DataFrame, group: str, metric: str = "ap", threshold: float = 0.5, *,
                    ax=None, figsize=(5, 3.5), seed: int = 0):
    """Bars per group (mean over images) with the spread across images: SD error bars and each image as a dot.

    Parameters
    ----------
    per_image : DataFrame or Evaluation
        :attr:`Evaluation.per_image` (one row per image x threshold, with the group column).
    group : str
        The grouping column, e.g. "marker" or "donor".
    metric : str
        The per-image metric, e.g. "ap", "f1", "foreground_dice".
    threshold : float
        The IoU threshold whose rows are drawn (must be one of the evaluated thresholds).
    seed : int
        Seed of the horizontal jitter of the dots (deterministic figures).

    Returns
    -------
    matplotlib.figure.Figure
        Images where both masks are empty are left out (as in ``mean_over_images``).
    """
    if hasattr(per_image, "per_image"):
        per_image = per_image.per_image
    check_columns(per_image, ["threshold", group, metric], "plot_group_bars", source=SOURCE)
    at = np.isclose(per_image["threshold"].to_numpy(float), threshold)
    if not at.any():
        raise SeglabError(f"plot_group_bars: threshold {threshold} was not evaluated "
                          f"(have {sorted(per_image['threshold'].unique())}); pick one of those")
    sub = per_image[at]
    sub = _scored_images(sub)
    groups = sorted(sub[group].dropna().unique(), key=str)
    rng = np.random.default_rng(seed)
    fig, ax = _figure_and_axes(ax, figsize)
    means, sds, counts = [], [], []
    for g in groups:
        vals = sub.loc[sub[group] == g, metric].to_numpy(float)
        vals = vals[np.isfinite(vals)]
        means.append(vals.mean() if len(vals) else np.nan)
        sds.append(vals.std(ddof=1) if len(vals) > 1 else 0.0)
        counts.append(len(vals))
    pos = np.arange(len(groups))
    ax.bar(pos, means, yerr=sds, capsize=3, color="#9ecae1", edgecolor="#3182bd", label="mean +- SD over images")
    for i, g in enumerate(groups):
        vals = sub.loc[sub[group] == g, metric].to_numpy(float)
        ax.scatter(i + rng.uniform(-0.25, 0.25, len(vals)), vals, s=8, color="k", alpha=0.6, zorder=3, lw=0)
    ax.set_xticks(pos, [f"{g}\n(n={n})" for g, n in zip(groups, counts)])
    ax.set_xlabel(group)
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} at IoU {threshold:g}")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    return fig


# --------------------------------------------------------------------------- study figures (E1, E3, E4)

OUTCOME_COLOURS = {"tp": (0.2, 0.9, 0.2), "fp": (1.0, 0.2, 0.8), "fn": (1.0, 0.85, 0.0)}


def plot_model_bars(per_image: pd.DataFrame, metrics: Sequence[str] = ("ap", "precision", "recall", "f1"),
                    threshold: float = 0.5, *, model_order: Sequence[str] | None = None, ax=None,
                    figsize=(8, 3.8), seed: int = 0, title: str | None = None):
    """Grouped bars: one group per metric, one bar per model (mean over images), SD error bars and
    each image as a dot (the spread over images).

    ``per_image``: per-image rows of several models with a ``model`` column
    (``seglab.evaluate.scoring.per_image_long``). Images where both masks are empty are left out.
    ``title``: the axes' title.
    """
    check_columns(per_image, ["model", "threshold", *metrics], "plot_model_bars", source=SOURCE)
    sub = per_image[np.isclose(per_image["threshold"].to_numpy(float), threshold)]
    sub = _scored_images(sub)
    models = list(model_order) if model_order else list(dict.fromkeys(sub["model"]))
    rng = np.random.default_rng(seed)
    fig, ax = _figure_and_axes(ax, figsize)
    width = 0.8 / max(1, len(models))
    colours = [f"C{i}" for i in range(len(models))]
    for j, model in enumerate(models):
        g = sub[sub["model"] == model]
        for i, m in enumerate(metrics):
            vals = g[m].to_numpy(float)
            vals = vals[np.isfinite(vals)]
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, vals.mean() if len(vals) else np.nan, width * 0.9,
                   yerr=vals.std(ddof=1) if len(vals) > 1 else 0, capsize=2, color=colours[j], alpha=0.75,
                   label=f"{model} (n={len(vals)})" if i == 0 else None)
            ax.scatter(x + rng.uniform(-width * 0.3, width * 0.3, len(vals)), vals, s=5, color="k", alpha=0.5,
                       lw=0, zorder=3)
    ax.set_xticks(range(len(metrics)), [m for m in metrics])
    ax.set_ylabel(f"per image at IoU {threshold:g} (mean +- SD)")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize="small", ncols=min(4, len(models)), loc="upper center",
              bbox_to_anchor=(0.5, -0.08))
    if title:
        ax.set_title(title, fontsize="medium")
    return fig


def plot_group_model_bars(table: pd.DataFrame, group: str = "marker", metric: str = "ap", *,
                          threshold: float = 0.5, model_order: Sequence[str] | None = None, ax=None,
                          figsize=(8, 3.5), title: str | None = None):
    """Bars per group value (e.g. marker) and model of a per-group table (``seglab.evaluate.scoring.per_group_table``),
    with the SD over images as error bars when the table has ``<metric>_sd``; ``title``: the axes' title."""
    check_columns(table, ["model", group, metric], "plot_group_model_bars", source=SOURCE)
    sub = table
    if "threshold" in table.columns:
        sub = table[np.isclose(table["threshold"].to_numpy(float), threshold)]
    models = list(model_order) if model_order else list(dict.fromkeys(sub["model"]))
    groups = sorted(sub[group].unique(), key=str)
    fig, ax = _figure_and_axes(ax, figsize)
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        g = sub[sub["model"] == model].set_index(group)
        vals = [float(g.at[k, metric]) if k in g.index else np.nan for k in groups]
        sd = None
        if f"{metric}_sd" in g.columns:
            sd = [float(g.at[k, f"{metric}_sd"]) if k in g.index else 0.0 for k in groups]
            sd = np.nan_to_num(sd)
        ax.bar(np.arange(len(groups)) - 0.4 + width * (j + 0.5), vals, width * 0.9, yerr=sd, capsize=2,
               color=f"C{j}", alpha=0.8, label=model)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel(group)
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} at IoU {threshold:g}")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize="small", ncols=min(4, len(models)))
    if title:
        ax.set_title(title, fontsize="medium")
    return fig


def plot_heatmap(table: pd.DataFrame, row: str, col: str, value: str, *, ax=None, figsize=(4.5, 3.2),
                 fmt: str = "{:.3f}", best: dict | None = None, cmap: str = "viridis", title: str | None = None,
                 center: float | None = None):
    """A heatmap of ``value`` over two parameters (e.g. flow_threshold x cellprob_threshold), each cell
    annotated; ``best`` ({row: v, col: v}) outlines one cell (the selected setting); ``center`` makes
    the colour scale symmetric around a value (e.g. 1 for predicted / true counts, with a diverging cmap)."""
    check_columns(table, [row, col, value], "plot_heatmap", source=SOURCE)
    grid = table.pivot_table(index=row, columns=col, values=value, aggfunc="mean").sort_index().sort_index(axis=1)
    fig, ax = _figure_and_axes(ax, figsize)
    arr = grid.to_numpy(float)
    finite = arr[np.isfinite(arr)]
    lim = {}
    if center is not None and len(finite):
        half = max(float(np.abs(finite - center).max()), 1e-9)
        lim = {"vmin": center - half, "vmax": center + half}
    im = ax.imshow(arr, cmap=cmap, aspect="auto", origin="lower", **lim)
    mid = (finite.min() + finite.max()) / 2 if len(finite) else 0
    for (i, j), v in np.ndenumerate(arr):
        if np.isfinite(v):
            dark = abs(v - center) < 0.5 * half if center is not None and len(finite) else v > mid
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="k" if dark else "w")
    ax.set_xticks(range(grid.shape[1]), [f"{c:g}" if isinstance(c, (int, float)) else c for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{r:g}" if isinstance(r, (int, float)) else r for r in grid.index])
    ax.set_xlabel(col)
    ax.set_ylabel(row)
    if best is not None:
        from matplotlib.patches import Rectangle

        i = int(np.argmin(np.abs(grid.index.to_numpy(float) - float(best[row]))))
        j = int(np.argmin(np.abs(grid.columns.to_numpy(float) - float(best[col]))))
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    fig.colorbar(im, ax=ax, label=value, fraction=0.06)
    if title:
        ax.set_title(title, fontsize="medium")
    return fig


def composite_rgb(image: np.ndarray) -> np.ndarray:
    """(2, Y, X) [DAPI, marker] -> (Y, X, 3) RGB in [0, 1]: marker red, DAPI blue (99.5th percentile scaling)."""
    image = np.asarray(image, float)
    chans = [np.clip(c / max(np.percentile(c, 99.5), 1e-6), 0, 1) for c in image[:2]]
    d = chans[0]
    m = chans[1] if len(chans) > 1 else np.zeros_like(d)
    return np.stack([m, 0.15 * m + 0.1 * d, d], axis=-1)


def plot_outlines(image: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5, *,
                  ax=None, title: str | None = None, figsize=(3.5, 3.5)):
    """One tile with outlines coloured by outcome at the IoU ``threshold``: matched predictions (TP)
    green, unmatched predictions (FP) magenta, missed true objects (FN) yellow (dashed-looking thin)."""
    from skimage.segmentation import find_boundaries

    from seglab.evaluate.metrics import matched_pairs

    pairs = matched_pairs(y_true, y_pred, threshold)
    tp_pred = pairs["pred_id"].to_numpy()
    tp_true = pairs["true_id"].to_numpy()
    fp = np.isin(y_pred, tp_pred, invert=True) & (y_pred != 0)
    fn = np.isin(y_true, tp_true, invert=True) & (y_true != 0)
    tp = np.isin(y_pred, tp_pred) & (y_pred != 0)
    rgb = composite_rgb(image)
    for mask, labels, key in ((tp, y_pred, "tp"), (fp, y_pred, "fp"), (fn, y_true, "fn")):
        edge = find_boundaries(np.where(mask, labels, 0), mode="inner")
        rgb[edge] = OUTCOME_COLOURS[key]
    fig, ax = _figure_and_axes(ax, figsize)
    ax.imshow(rgb)
    ax.set_axis_off()
    n_fp = len(np.setdiff1d(np.unique(y_pred), np.r_[0, tp_pred]))
    n_fn = len(np.setdiff1d(np.unique(y_true), np.r_[0, tp_true]))
    label = f"TP {len(tp_pred)}  FP {n_fp}  FN {n_fn}"
    ax.set_title(f"{title}\n{label}" if title else label, fontsize=8)
    return fig


def plot_example_tiles(images: Sequence[np.ndarray], truths: Sequence[np.ndarray], preds: dict,
                       names: Sequence[str], threshold: float = 0.5, *, cell_in: float = 2.6):
    """Rows = tiles, columns = models (``preds``: {model: list of masks aligned with ``images``}),
    each panel with TP / FP / FN outlines (see :func:`plot_outlines`) and a legend."""
    from matplotlib.lines import Line2D

    n, k = len(images), len(preds)
    fig = new_figure((cell_in * k, cell_in * n + 0.5))
    axes = fig.subplots(n, k, squeeze=False)
    for i in range(n):
        for j, (model, masks) in enumerate(preds.items()):
            plot_outlines(images[i], truths[i], masks[i], threshold, ax=axes[i, j],
                          title=f"{model}\n{names[i]}" if i == 0 else names[i])
    handles = [Line2D([], [], color=c, lw=2, label=l) for l, c in
               (("TP (prediction)", OUTCOME_COLOURS["tp"]), ("FP", OUTCOME_COLOURS["fp"]), ("FN (missed truth)", OUTCOME_COLOURS["fn"]))]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize="small")
    return fig


def plot_sensitivity(table: pd.DataFrame, metrics: Sequence[str] = ("ap", "count_ratio"), *,
                     hue: str | None = None, panel_in: float = 2.8, marks: dict | None = None):
    """One panel per parameter (column ``parameter``), ``value`` on x, one line per metric (and per
    ``hue`` value, e.g. model). ``marks``: {parameter: value} draws a dotted line at the default."""
    check_columns(table, ["parameter", "value", *metrics], "plot_sensitivity", source=SOURCE)
    params = list(dict.fromkeys(table["parameter"]))
    fig = new_figure((panel_in * len(params), panel_in * 0.95 * len(metrics)))
    axes = fig.subplots(len(metrics), len(params), squeeze=False)
    hues = list(dict.fromkeys(table[hue])) if hue else [None]
    for j, p in enumerate(params):
        sub = table[table["parameter"] == p]
        for i, m in enumerate(metrics):
            ax = axes[i, j]
            for h_i, h in enumerate(hues):
                g = sub if h is None else sub[sub[hue] == h]
                vals = g["value"].tolist()
                numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                              and v is not None for v in vals)
                x = np.asarray(vals, float) if numeric else np.arange(len(vals))
                ax.plot(x, g[m].to_numpy(float), marker="o", ms=3, color=f"C{h_i}", label=h)
                if not numeric:
                    ax.set_xticks(x, [str(v) for v in vals])
            if marks and p in marks and marks[p] is not None and not isinstance(marks[p], bool):
                ax.axvline(float(marks[p]), color="grey", ls=":", lw=1)
            if m == "count_ratio":
                ax.axhline(1.0, color="grey", lw=0.8)
            ax.grid(alpha=0.3)
            if i == len(metrics) - 1:
                ax.set_xlabel(p)
            if j == 0:
                ax.set_ylabel(m)
    if hue:
        axes[0, 0].legend(frameon=False, fontsize="x-small")
    return fig


# --------------------------------------------------------------------------- E1: fine-tuning and thresholds


def short_model_name(name: str, prefix: str = "ft ") -> str:
    """``finetuned_generic`` -> ``ft generic``: model names short enough for panel titles and ticks."""
    return str(name).replace("finetuned_", prefix)


def plot_training_loss(losses: pd.DataFrame, *, figsize=(5, 3), title: str = "fine-tuning loss"):
    """Training loss against epoch, one line per column of ``losses`` (a fine-tuned model; rows are
    epochs, as ``seglab.experiments.e1_baseline_vs_finetune.FineTunes.losses``)."""
    if losses.empty:
        raise SeglabError("plot_training_loss: no losses (no fine-tuned model, or none recorded its losses)")
    fig, ax = _figure_and_axes(None, figsize)
    for name in losses.columns:
        ax.plot(losses.index.to_numpy(), losses[name].to_numpy(float), marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize="small")
    return fig


def plot_ap_by_iou(comparison: pd.DataFrame, thresholds: Sequence[float], *, panel_in=(4.2, 3.2)):
    """One panel per IoU threshold, one bar per model: the pooled AP of a comparison table
    (``seglab.evaluate.scoring.compare_models`` rows at several thresholds, column ``threshold``)."""
    check_columns(comparison, ["model", "threshold", "ap"], "plot_ap_by_iou",
                  source="seglab.evaluate.scoring.compare_models")
    thresholds = list(thresholds)
    fig = new_figure((panel_in[0] * len(thresholds), panel_in[1]))
    axes = fig.subplots(1, len(thresholds), sharey=True, squeeze=False)[0]
    for ax, th in zip(axes, thresholds):
        sub = comparison[np.isclose(comparison["threshold"], th)]
        ax.bar(range(len(sub)), sub["ap"], color=[f"C{i}" for i in range(len(sub))])
        ax.set_xticks(range(len(sub)), [short_model_name(m, "ft_") for m in sub["model"]], rotation=60, ha="right",
                      fontsize=7)
        ax.set_title(f"pooled AP at IoU {th:g}")
        ax.grid(axis="y", alpha=0.3)
    return fig


def plot_sweep_heatmaps(sweeps: dict, selected: dict, value: str = "f1", *, row: str = "flow_threshold",
                        col: str = "cellprob_threshold", label: str = "val F1", cmap: str = "viridis",
                        panel_in=(4.0, 3.0)):
    """One heatmap of ``value`` over ``row`` x ``col`` per model, the selected setting outlined.

    ``sweeps``: {model: sweep table (``seglab.evaluate.sweeps.threshold_sweep``)}; ``selected``:
    {model: the selected row (``sweeps.select_best``)}; ``label`` ends each panel's title.
    """
    if not sweeps:
        raise SeglabError("plot_sweep_heatmaps: no sweeps")
    fig = new_figure((panel_in[0] * len(sweeps), panel_in[1]))
    axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
    for ax, (name, table) in zip(axes, sweeps.items()):
        plot_heatmap(table, row, col, value, ax=ax, best=selected[name], cmap=cmap,
                     title=f"{short_model_name(name)}: {label}")
    return fig


# --------------------------------------------------------------------------- E3: gates


def plot_gate_instances(decisions: dict, channel: int, *, panel_in=(5, 3.6)):
    """Per model, every predicted instance's mean intensity in ``channel`` against its area (px),
    log-log, true positives green and false positives red.

    ``decisions``: {model: ``seglab.segment.postprocess.gate_split`` decisions (columns area_px,
    mean_intensity, matched)}.
    """
    from matplotlib.ticker import NullFormatter

    if not decisions:
        raise SeglabError("plot_gate_instances: no decisions")
    fig = new_figure((panel_in[0] * len(decisions), panel_in[1]))
    axes = fig.subplots(1, len(decisions), squeeze=False)[0]
    for ax, (name, dec) in zip(axes, decisions.items()):
        check_columns(dec, ["area_px", "mean_intensity", "matched"], "plot_gate_instances",
                      source="seglab.segment.postprocess.gate_split")
        for matched, colour, outcome in ((True, "tab:green", "TP"), (False, "tab:red", "FP")):
            d = dec[dec["matched"] == matched]
            ax.scatter(d["area_px"], d["mean_intensity"], s=6, alpha=0.5, color=colour, label=f"{outcome} ({len(d)})",
                       lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("instance area (px)")
        ax.set_ylabel(f"mean intensity, channel {channel}")
        ax.set_title(f"{name}: validation instances")
        ax.legend(frameon=False, fontsize="small")
    return fig


def plot_gate_grid(sweeps: dict, selected: dict, area_column: str, *, panel_in=(4.2, 3.2)):
    """Per model two panels: validation F1 over q_low x q_high at the selected minimum area
    (selected gate outlined), and precision, recall, F1 against the minimum area at the selected
    quantiles. ``sweeps``: {model: ``seglab.segment.postprocess.sweep_gates`` table}; ``selected``:
    {model: its selected row}; ``area_column``: ``min_area_px`` or ``min_area_um2``."""
    if not sweeps:
        raise SeglabError("plot_gate_grid: no sweeps")
    fig = new_figure((panel_in[0] * 2 * len(sweeps), panel_in[1]))
    axes = fig.subplots(1, 2 * len(sweeps), squeeze=False)[0]
    for k, (name, table) in enumerate(sweeps.items()):
        best = selected[name]
        at_area = table[np.isclose(table[area_column], best[area_column])]
        plot_heatmap(at_area, "q_low", "q_high", "f1", ax=axes[2 * k], best=best,
                     title=f"{name}: val F1 ({area_column} = {best[area_column]:g})")
        at_q = table[np.isclose(table["q_low"], best["q_low"]) & np.isclose(table["q_high"], best["q_high"])]
        ax = axes[2 * k + 1]
        for metric in ("precision", "recall", "f1"):
            ax.plot(at_q[area_column], at_q[metric], marker="o", label=metric)
        ax.set_xlabel(area_column)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize="small")
        ax.set_title(f"{name}: val, q = [{best['q_low']:g}, {best['q_high']:g}]")
    return fig


GATE_PANEL_TITLES = {"fp": "false positives (test, IoU 0.5)", "precision": "precision", "ap": "AP@0.5"}


def plot_gate_before_after(before_after: pd.DataFrame, metrics: Sequence[str] = ("fp", "precision", "ap"), *,
                           figsize=(12, 3.3)):
    """One panel per metric, per model a bar without a gate (grey) and one with the
    validation-selected gate (blue). ``before_after``: rows with model, gate ('none' or
    'val_selected') and the metrics (``seglab.experiments.e3_gating.GateTest.before_after``)."""
    check_columns(before_after, ["model", "gate", *metrics], "plot_gate_before_after",
                  source="seglab.experiments.e3_gating.test_before_after")
    names = list(dict.fromkeys(before_after["model"]))
    x = np.arange(len(names))
    before = before_after[before_after["gate"] == "none"].set_index("model").loc[names]
    after = before_after[before_after["gate"] == "val_selected"].set_index("model").loc[names]
    fig = new_figure(figsize)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        ax.bar(x - 0.2, before[metric], 0.4, label="no gate", color="#bbbbbb")
        ax.bar(x + 0.2, after[metric], 0.4, label="validation-selected gate", color="tab:blue")
        ax.set_xticks(x, names)
        ax.set_title(GATE_PANEL_TITLES.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(frameon=False, fontsize="small")
    return fig
