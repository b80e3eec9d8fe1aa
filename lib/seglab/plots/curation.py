"""Figures of curation (E9): the learning curve against the gate, confidences by truth, counts before/after."""

from __future__ import annotations

import numpy as np
import pandas as pd

from seglab.plots.base import check_columns, grouped_bars, new_figure

METRIC_COLOURS = {"accuracy": "tab:blue", "recall": "tab:green", "precision": "tab:orange"}


def learning_curve_figure(curve: pd.DataFrame, thresholds: dict, n_needed: int | None = None):
    """Cross-validated accuracy, recall and precision (mean and every repeat) against the number of
    answers, with each gate threshold as a dashed line and the gate's answer count marked.
    ``curve``: :func:`seglab.curate.classifier.learning_curve`; ``thresholds``: min_accuracy, ... ."""
    check_columns(curve, ["n_answers", "accuracy", "recall", "precision"], "learning_curve_figure",
                  source="seglab.curate.classifier.learning_curve")
    fig = new_figure((6.5, 3.6))
    ax = fig.subplots()
    mean = curve.groupby("n_answers")[list(METRIC_COLOURS)].mean()
    for m, c in METRIC_COLOURS.items():
        ax.scatter(curve["n_answers"], curve[m], s=8, color=c, alpha=0.35)
        ax.plot(mean.index, mean[m], "-o", ms=3, color=c, label=f"{m} (CV by slide)")
        ax.axhline(thresholds[f"min_{m}"], color=c, ls="--", lw=0.8)
    if n_needed is not None:
        ax.axvline(n_needed, color="0.3", lw=0.8)
        ax.annotate(f"gate passes from {n_needed} answers", (n_needed, 0.05), fontsize=7, xytext=(4, 0),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xticks(list(mean.index), [str(int(n)) for n in mean.index])
    ax.minorticks_off()
    ax.set_xlabel("answers (yes / no)")
    ax.set_ylabel("cross-validated metric (fraction)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def confidence_figure(filtered: pd.DataFrame, threshold: float):
    """Histogram of ``classifier_confidence`` of the detections by their truth kind, with the threshold.
    ``filtered``: :func:`seglab.experiments.e9_curation.filter_all`."""
    check_columns(filtered, ["classifier_confidence", "truth_kind"], "confidence_figure",
                  source="seglab.experiments.e9_curation.filter_all")
    fig = new_figure((6.5, 3.2))
    ax = fig.subplots()
    bins = np.linspace(0, 1, 21)
    kinds = sorted(filtered["truth_kind"].unique())
    ax.hist([filtered.loc[filtered["truth_kind"] == k, "classifier_confidence"] for k in kinds], bins=bins,
            stacked=True, label=kinds)
    ax.axvline(threshold, color="k", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    ax.set_xlabel("classifier confidence (probability of a real cell)")
    ax.set_ylabel("detections")
    ax.legend(fontsize=7)
    return fig


def counts_figure(counts: pd.DataFrame):
    """Per slide: true cells, detections and objects kept by the classifier (bars), and densities
    per mm^2 of tissue against the truth. ``counts``: :func:`seglab.experiments.e9_curation.count_table`."""
    check_columns(counts, ["slide", "n_true_cells", "n_detected", "n_kept", "density_true_per_mm2",
                           "density_detected_per_mm2", "density_kept_per_mm2"], "counts_figure",
                  source="seglab.experiments.e9_curation.count_table")
    fig = new_figure((9, 3.4))
    ax, ax2 = fig.subplots(1, 2)
    grouped_bars(ax, counts["slide"], [(counts["n_true_cells"], "true cells", "0.3"),
                                       (counts["n_detected"], "detected (area filter)", "tab:red"),
                                       (counts["n_kept"], "kept by the classifier", "tab:blue")], ylabel="objects")
    ax2.scatter(counts["density_true_per_mm2"], counts["density_detected_per_mm2"], color="tab:red",
                label="detected")
    ax2.scatter(counts["density_true_per_mm2"], counts["density_kept_per_mm2"], color="tab:blue", label="kept")
    vals = counts[["density_true_per_mm2", "density_detected_per_mm2", "density_kept_per_mm2"]].to_numpy(float)
    lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
    ax2.plot([lo, hi], [lo, hi], color="0.6", lw=0.8)
    ax2.set_xlabel("true density (cells / mm$^2$ of tissue)")
    ax2.set_ylabel("density found")
    ax2.legend(fontsize=7)
    return fig
