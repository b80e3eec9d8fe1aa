"""Figures of the downstream tables (each function returns a matplotlib Figure; no pyplot).

They take the tables of :mod:`seglab.downstream.correlate`: ``Analysis.correlations``,
:func:`~seglab.downstream.correlate.threshold_sensitivity` and
:func:`~seglab.downstream.correlate.compare_segmentations`'s ``side_by_side``; and the tables of
:mod:`seglab.downstream.planted` (count agreement, planted-effect recovery).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.plots.base import check_columns, new_figure


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    """SeglabError unless ``df`` (a table of :mod:`seglab.downstream.correlate`) has ``cols``."""
    check_columns(df, cols, what, source="seglab.downstream.correlate")


def _heat(ax, table: pd.DataFrame, feature: str, rho_col: str, q_col: str, alpha: float, title: str):
    t = table[table["feature"] == feature]
    if t.empty:
        raise SeglabError(f"no test of feature {feature!r} in the table (have {sorted(table['feature'].unique())})")
    rho = t.pivot(index="marker", columns="outcome", values=rho_col)
    q = t.pivot(index="marker", columns="outcome", values=q_col).reindex_like(rho)
    outcomes = [o for o in t["outcome"].drop_duplicates()]
    rho, q = rho[outcomes], q[outcomes]
    im = ax.imshow(rho.to_numpy(float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(outcomes)), outcomes, rotation=45, ha="right")
    ax.set_yticks(range(len(rho.index)), rho.index)
    for i in range(rho.shape[0]):
        for j in range(rho.shape[1]):
            r, qq = rho.iat[i, j], q.iat[i, j]
            if np.isfinite(r):
                star = "*" if np.isfinite(qq) and qq < alpha else ""
                ax.text(j, i, f"{r:.2f}{star}", ha="center", va="center", fontsize=7,
                        color="white" if abs(r) > 0.6 else "black")
            else:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="grey")
    ax.set_title(title, fontsize=9)
    return im


def rho_heatmap(correlations: pd.DataFrame, feature: str = "ratio", *, alpha: float = 0.05,
                title: str | None = None, figsize=(6, 3.2)):
    """Spearman rho by marker x outcome for one feature; ``*`` marks q < alpha (BH)."""
    _need(correlations, ["marker", "feature", "outcome", "rho", "q"], "rho_heatmap")
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    im = _heat(ax, correlations, feature, "rho", "q", alpha, title or f"Spearman rho, {feature} (* q < {alpha:g})")
    fig.colorbar(im, ax=ax, label="rho")
    return fig


def compare_heatmaps(side_by_side: pd.DataFrame, models: Sequence[str], feature: str = "ratio", *,
                     alpha: float = 0.05, figsize=None):
    """One rho heatmap per model, side by side (columns ``rho_<model>``, ``q_<model>``)."""
    for m in models:
        _need(side_by_side, [f"rho_{m}", f"q_{m}"], "compare_heatmaps")
    fig = new_figure(figsize or (4.2 * len(models), 3.2))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    im = None
    for ax, m in zip(axes, models):
        im = _heat(ax, side_by_side, feature, f"rho_{m}", f"q_{m}", alpha, f"{m}: {feature} (* q < {alpha:g})")
    fig.colorbar(im, ax=list(axes), label="rho")
    return fig


def stability_plot(correlations: pd.DataFrame, feature: str = "ratio", *, figsize=(6, 3.5),
                   title: str | None = None):
    """rho with its bootstrap percentile CI per test, sorted by rho; colour = fraction significant;
    ``title`` above the panel (fontsize 9) when given."""
    _need(correlations, ["marker", "feature", "outcome", "rho", "rho_ci_low", "rho_ci_high", "frac_significant"],
          "stability_plot")
    t = correlations[correlations["feature"] == feature].dropna(subset=["rho"]).sort_values("rho")
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    x = np.arange(len(t))
    ax.vlines(x, t["rho_ci_low"], t["rho_ci_high"], color="0.6", lw=1)
    sc = ax.scatter(x, t["rho"], c=t["frac_significant"], cmap="viridis", vmin=0, vmax=1, s=14, zorder=3)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x, [f"{m}/{o}" for m, o in zip(t["marker"], t["outcome"])], rotation=90, fontsize=6)
    ax.set_ylabel("Spearman rho (bootstrap CI)")
    fig.colorbar(sc, ax=ax, label="fraction of resamples with q < alpha")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _sensitivity_lines(ax, sensitivity: pd.DataFrame, feature: str, outcome: str | None) -> None:
    """On ``ax``: rho against the percentile, one line per marker (``outcome``'s rho, or the mean
    over outcomes when None)."""
    t = sensitivity[sensitivity["feature"] == feature]
    if outcome is not None:
        t = t[t["outcome"] == outcome]
    g = t.groupby(["marker", "percentile"])["rho"].mean().unstack("marker")
    for m in g.columns:
        ax.plot(g.index, g[m].to_numpy(), marker="o", label=m)
    ax.axhline(0, color="k", lw=0.5)


def sensitivity_plot(sensitivity: pd.DataFrame, feature: str = "ratio", outcome: str | None = None, *,
                     figsize=(5, 3.5)):
    """rho against the positivity percentile, one line per marker (for one outcome, or the mean over outcomes)."""
    _need(sensitivity, ["percentile", "marker", "feature", "outcome", "rho"], "sensitivity_plot")
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    _sensitivity_lines(ax, sensitivity, feature, outcome)
    ax.set_xlabel("positivity threshold: percentile of the tile's marker pixels")
    ax.set_ylabel(f"rho ({outcome or 'mean over outcomes'})")
    ax.legend(fontsize=7)
    return fig


def sensitivity_panels(sensitivity: pd.DataFrame, models: Sequence[str], feature: str = "ratio", *,
                       figsize=None):
    """:func:`sensitivity_plot` for each model side by side (one panel per model, shared rho axis):
    rho of ``feature`` (mean over outcomes) against the positivity percentile, one line per marker.
    ``sensitivity`` stacks every model's threshold-sensitivity rows with a ``model`` column."""
    _need(sensitivity, ["model", "percentile", "marker", "feature", "outcome", "rho"], "sensitivity_panels")
    fig = new_figure(figsize or (4.6 * len(models), 3.6))
    axes = fig.subplots(1, len(models), sharey=True, squeeze=False)[0]
    for ax, m in zip(axes, models):
        _sensitivity_lines(ax, sensitivity[sensitivity["model"] == m], feature, None)
        ax.set_title(f"{m}", fontsize=9)
        ax.set_xlabel("positivity percentile of marker pixels")
    axes[0].set_ylabel(f"rho of the {feature} (mean over outcomes)")
    axes[-1].legend(fontsize=7)
    return fig


def recovery_bars(recovery: pd.DataFrame | Mapping, *, figsize=(4.5, 3)):
    """Per model: fraction of the truth's significant tests recovered, and fraction of false calls."""
    r = pd.DataFrame(recovery)
    _need(r, ["model", "recovered", "false_calls"], "recovery_bars")
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    x = np.arange(len(r))
    ax.bar(x - 0.2, r["recovered"], 0.4, label="recovered (truth significant, same sign)")
    ax.bar(x + 0.2, r["false_calls"], 0.4, label="false calls (not significant on truth)")
    ax.set_xticks(x, r["model"])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return fig


def recovery_figure(per_test: pd.DataFrame, per_model: pd.DataFrame, latent: pd.DataFrame | None = None, *,
                    models: Sequence[str] | None = None, figsize=None):
    """Three panels: rho of each model against the ground-truth-mask rho per test (planted and null
    markers marked); recovered / sign-correct / false-positive rates per model; and, with
    ``latent``, rho with the latent score per marker and model. Returns a matplotlib Figure."""
    models = list(models or per_model["model"])
    ncol = 3 if latent is not None else 2
    fig = new_figure(figsize or (5 * ncol, 4))
    axes = fig.subplots(1, ncol)
    ax = axes[0]
    others = [m for m in models if per_test.loc[per_test["model"] == m, "rho_reference"].notna().any()
              and not np.allclose(per_test.loc[per_test["model"] == m, "rho"].fillna(0),
                                  per_test.loc[per_test["model"] == m, "rho_reference"].fillna(0))]
    for k, m in enumerate(others):
        g = per_test[per_test["model"] == m]
        for null, mk in ((False, "o"), (True, "x")):
            h = g[g["null"] == null]
            ax.scatter(h["rho_reference"], h["rho"], marker=mk, s=22, color=f"C{k}",
                       label=f"{m} ({'null' if null else 'planted'} markers)")
    ax.plot([-1, 1], [-1, 1], color="k", lw=0.6)
    ax.axhline(0, color="0.7", lw=0.5)
    ax.axvline(0, color="0.7", lw=0.5)
    ax.set_xlabel("rho on the ground-truth masks")
    ax.set_ylabel("rho on the model's masks")
    ax.set_title("each test (marker x outcome)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    pm = per_model.set_index("model").reindex(models)
    x = np.arange(len(models))
    for j, (col, lab) in enumerate((("recovered", "recovered (q < alpha, right sign)"),
                                    ("sign_correct", "right sign (any q)"),
                                    ("false_positive_rate", "false positives on null markers"))):
        ax.bar(x + (j - 1) * 0.27, pm[col].to_numpy(float), 0.27, label=lab)
    ax.set_xticks(x, models)
    ax.set_ylim(0, 1.05)
    ax.set_title("planted-effect recovery per model", fontsize=9)
    ax.legend(fontsize=7)
    if latent is not None:
        ax = axes[2]
        piv = latent.pivot(index="marker", columns="model", values="rho_latent").reindex(columns=models)
        w = 0.8 / max(len(models), 1)
        xm = np.arange(len(piv))
        for k, m in enumerate(models):
            ax.bar(xm + (k - (len(models) - 1) / 2) * w, piv[m].to_numpy(float), w, label=m)
        eff = latent.drop_duplicates("marker").set_index("marker").reindex(piv.index)["effect"]
        ax.set_xticks(xm, [f"{mk}\n({e:+.1f})" for mk, e in zip(piv.index, eff)])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(-1, 1)
        ax.set_ylabel("Spearman rho, donor ratio vs latent score")
        ax.set_title("planted effect (log-odds per SD) per marker", fontsize=9)
        ax.legend(fontsize=7)
    return fig


def count_agreement_figure(agreement: pd.DataFrame, *, figsize=(10, 4)):
    """Two panels (cells per tile, marker-positive cells per tile): each model's count against the
    count on the ground-truth masks, one point per tile, with the identity line; the legend gives
    Pearson r and the model's total as a multiple of the truth's. ``agreement`` is
    :func:`seglab.downstream.planted.count_agreement`'s table."""
    check_columns(agreement, ["model", "n_total_cells", "n_marker_positive", "n_total_cells_truth",
                              "n_marker_positive_truth"], "count_agreement_figure",
                  source="seglab.downstream.planted.count_agreement")
    fig = new_figure(figsize)
    axes = fig.subplots(1, 2)
    for ax, col in zip(axes, ("n_total_cells", "n_marker_positive")):
        for k, (m, g) in enumerate(agreement.groupby("model", sort=False)):
            r = np.corrcoef(g[col], g[col + "_truth"])[0, 1]
            ratio = g[col].sum() / max(g[col + "_truth"].sum(), 1)
            ax.scatter(g[col + "_truth"], g[col], s=6, alpha=0.5, color=f"C{k + 1}",
                       label=f"{m}: r = {r:.2f}, total {ratio:.2f} x truth")
        hi = max(agreement[col].max(), agreement[col + "_truth"].max())
        ax.plot([0, hi], [0, hi], color="k", lw=0.6)
        ax.set_xlabel(f"{col} per tile, ground-truth masks")
        ax.set_ylabel(f"{col} per tile, model")
        ax.legend(fontsize=7)
    fig.suptitle("per-tile counts against the ground-truth masks")
    return fig


def recovery_by_percentile_plot(by_percentile: pd.DataFrame, models: Sequence[str] | None = None, *,
                                figsize=(5, 3.5)):
    """Per model: the fraction of planted tests recovered (solid) and the false-positive rate on the
    null markers (dashed) against the positivity percentile. ``by_percentile`` is
    :func:`seglab.downstream.planted.recovery_by_percentile`'s table."""
    check_columns(by_percentile, ["model", "percentile", "recovered", "false_positive_rate"],
                  "recovery_by_percentile_plot", source="seglab.downstream.planted.recovery_by_percentile")
    models = list(models or dict.fromkeys(by_percentile["model"]))
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    for k, m in enumerate(models):
        g = by_percentile[by_percentile["model"] == m]
        ax.plot(g["percentile"], g["recovered"], marker="o", color=f"C{k}", label=f"{m}: recovered")
        ax.plot(g["percentile"], g["false_positive_rate"], marker="x", ls="--", color=f"C{k}",
                label=f"{m}: false pos.")
    ax.set_xlabel("positivity percentile")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("planted-effect recovery across thresholds", fontsize=9)
    return fig
