"""Figures of E10 active learning: AP against labelled tiles per strategy, labels to 95% vs random."""

from __future__ import annotations

import pandas as pd

from seglab.plots.base import check_columns, new_figure


def plot_curves(curve: pd.DataFrame, reference: pd.DataFrame | None = None):
    """Validation and test AP@0.5 against labelled tiles, one line per strategy (mean over repeats,
    band: +- 1 sd), the all-tiles reference as a dashed line and its 95% as a dotted one.

    curve : :func:`seglab.experiments.e10_active_learning.curves`; reference: its ``reference`` table.
    """
    check_columns(curve, ["strategy", "n_labelled", "val_ap50_mean", "test_ap50_mean"], "plot_curves",
                  source="seglab.experiments.e10_active_learning.curves")
    fig = new_figure((10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, split in zip(axes, ("val", "test")):
        for s, sub in curve.groupby("strategy"):
            sub = sub.sort_values("n_labelled")
            m, sd = sub[f"{split}_ap50_mean"], sub[f"{split}_ap50_sd"].fillna(0)
            style = dict(color="black", lw=2.2) if s == "random" else dict(lw=1.3)
            line, = ax.plot(sub["n_labelled"], m, marker="o", ms=3, label=s, **style)
            ax.fill_between(sub["n_labelled"], m - sd, m + sd, color=line.get_color(), alpha=0.12)
        if reference is not None and len(reference):
            ref = float(reference[f"{split}_ap50"].mean())
            ax.axhline(ref, color="gray", ls="--", lw=1, label="all tiles")
            ax.axhline(0.95 * ref, color="gray", ls=":", lw=1, label="95% of all tiles")
        ax.set_xlabel("labelled tiles")
        ax.set_title(f"{'validation' if split == 'val' else 'test'} AP@0.5 (mean +- sd over repeats)")
    axes[0].set_ylabel("AP@0.5 (pooled over tiles)")
    axes[1].legend(fontsize=7, loc="lower right")
    return fig


def plot_labels_ratio(table: pd.DataFrame):
    """Labels to reach 95% of the all-tiles test AP, as a ratio of random's, per strategy (bar: mean curve;
    error bar: +- 1 sd of the per-repeat ratio); strategies that never reach it are marked."""
    check_columns(table, ["strategy", "ratio_vs_random", "ratio_sd"], "plot_labels_ratio",
                  source="seglab.experiments.e10_active_learning.labels_table")
    fig = new_figure((6, 3.2))
    ax = fig.subplots()
    t = table.reset_index(drop=True)
    ax.bar(range(len(t)), t["ratio_vs_random"].fillna(0), yerr=t["ratio_sd"].fillna(0), color="tab:blue",
           alpha=0.7, capsize=3)
    for i, v in enumerate(t["ratio_vs_random"]):
        if pd.isna(v):
            ax.text(i, 0.05, "not\nreached", ha="center", fontsize=7)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_xticks(range(len(t)), t["strategy"], rotation=30, ha="right")
    ax.set_ylabel("labels to 95% / random's")
    ax.set_title("labels needed relative to random (< 1 saves labels)")
    return fig
