"""Figures of claims with their uncertainty: differences between two segmentations of the same
tiles, each drawn with its interval (:mod:`seglab.evaluate.claims`), never with an SD.

- :func:`plot_differences`: a forest plot, one row per comparison (B - A) with its interval and a
  line at 0 (E1, E3, E6);
- :func:`plot_difference_curve`: the differences against a numeric setting, e.g. each label budget
  minus the references (E2), with an optional tolerance line.

Every figure names its interval (``claims.interval_label``, e.g. "95% t interval over donors") in
its axis label or title. A comparison whose interval is NaN (one donor, no tiles) is drawn as a
dot without a bar and says why. Each function returns a headless matplotlib Figure (no pyplot).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from seglab import SeglabError
from seglab.evaluate import claims
from seglab.plots.base import check_columns, new_figure

SOURCE = "seglab.evaluate.claims.compare_pairs"
NEEDED = ["a", "b", "metric", "threshold", "difference", "ci_low", "ci_high", "n_donors"]
METRIC_WORDS = {"ap": "AP", "f1": "F1", "precision": "precision", "recall": "recall"}
# a claim that holds (interval above 0), one that holds the other way (below 0), no claim
COLOURS = {"above": "tab:green", "below": "tab:red", "none": "0.45"}


def rows_at(table: pd.DataFrame, metric: str = "ap", threshold: float = 0.5) -> pd.DataFrame:
    """The rows of a :func:`~seglab.evaluate.claims.compare_pairs` table at one metric and IoU threshold."""
    check_columns(table, NEEDED, "claims figure", source=SOURCE)
    rows = table[(table["metric"] == metric) & np.isclose(table["threshold"].astype(float), threshold)]
    if rows.empty:
        raise SeglabError(f"claims figure: no rows for metric {metric!r} at IoU {threshold}")
    return rows.reset_index(drop=True)


def side(low: float, high: float) -> str:
    """'above' when the interval lies above 0, 'below' when below, else 'none' (NaN included)."""
    return "above" if claims.claim_holds(low, high) else "below" if claims.claim_holds(low, high, "less") else "none"


def interval_text(row) -> str:
    """``+0.052 [0.021, 0.084], 6 donors``, or the difference and why it has no interval."""
    n = int(row["n_donors"])
    if not np.isfinite(row["difference"]):
        return claims.interval_note(n) or "no estimate"
    if not (np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"])):
        return f"{row['difference']:+.3f}, " + (claims.interval_note(n) or "no interval")
    return f"{row['difference']:+.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}], {n} donor{'s' * (n != 1)}"


def _draw_interval(ax, pos: float, row, *, vertical: bool, colour: str) -> None:
    """The estimate as a dot and its interval as a line with end caps (drawn as a line, not as
    error bars: a percentile interval need not contain its estimate)."""
    low, high, est = row["ci_low"], row["ci_high"], row["difference"]
    if np.isfinite(low) and np.isfinite(high):
        if vertical:
            ax.vlines(pos, low, high, color=colour, lw=2)
            ax.plot([pos, pos], [low, high], ls="none", marker="_", ms=10, color=colour)
        else:
            ax.hlines(pos, low, high, color=colour, lw=2)
            ax.plot([low, high], [pos, pos], ls="none", marker="|", ms=10, color=colour)
    if np.isfinite(est):
        ax.plot(*((pos, est) if vertical else (est, pos)), marker="o", color=colour, ms=5, zorder=3)


def _span(rows: pd.DataFrame) -> float:
    """Half-width of the x axis: every row's interval, except that one row more than 3 times
    farther from 0 than all the others (a model that fails outright) is left off scale, so the
    small differences stay readable; its numbers are still written beside it."""
    reach = np.nan_to_num(np.abs(rows[["difference", "ci_low", "ci_high"]].to_numpy(float)), nan=0.0).max(axis=1)
    ordered = np.sort(reach)[::-1]
    if len(ordered) > 1 and ordered[1] > 0 and ordered[0] > 3 * ordered[1]:
        return 1.3 * float(ordered[1])
    return 1.15 * float(ordered[0]) if len(ordered) and ordered[0] > 0 else 0.1


def _forest_panel(ax, rows: pd.DataFrame, labels: Sequence[str], title: str | None) -> None:
    y = np.arange(len(rows))[::-1]
    span = _span(rows)
    for pos, (_, row) in zip(y, rows.iterrows()):
        colour = COLOURS[side(row["ci_low"], row["ci_high"])]
        if abs(np.nan_to_num(row["difference"])) > span:   # off scale: an arrow at the edge
            edge = np.sign(row["difference"]) * span
            ax.annotate("", xy=(edge, pos), xytext=(edge * 0.6, pos),
                        arrowprops=dict(arrowstyle="->", color=colour, lw=2))
            continue
        _draw_interval(ax, pos, row, vertical=False, colour=colour)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlim(-span, span)
    ax.xaxis.set_major_locator(MaxNLocator(5))   # a few readable ticks whatever the span
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_yticks(y, labels)
    # the numbers beside each row: the figure and the summary keys say the same
    ax2 = ax.twinx()
    ax2.set_ylim(ax.get_ylim())
    ax2.set_yticks(y, [interval_text(r) for _, r in rows.iterrows()], fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)


def plot_differences(table: pd.DataFrame, *, metric: str = "ap", threshold: float = 0.5,
                     labels: Mapping[str, str] | None = None, panel: str | None = None,
                     title: str | None = None, panel_in: tuple[float, float] = (9.0, 0.55)):
    """A forest plot: per comparison (row of a :func:`~seglab.evaluate.claims.compare_pairs` table
    at ``metric`` and IoU ``threshold``) the difference B - A (fraction) as a dot and its interval as
    a bar, a line at 0; green when the interval lies above 0 (the claim "B beats A" holds), red
    below, grey when it crosses 0 or is missing. The interval and the donors are written beside
    each row; the x label says which interval (:func:`~seglab.evaluate.claims.interval_label`).

    Parameters
    ----------
    table : compare_pairs rows (a, b, metric, threshold, difference, ci_low, ci_high, n_donors, ...);
        a ``label`` column names the rows, else "b - a" (``labels`` maps model names to words).
    panel : a column of ``table`` with one panel per value (e.g. ``thresholds``: default / selected).
    panel_in : (width, height per row) in inches.
    """
    rows = rows_at(table, metric, threshold)
    words = dict(labels or {})
    names = (list(rows["label"]) if "label" in rows else
             [f"{words.get(b, b)} − {words.get(a, a)}" for a, b in zip(rows["a"], rows["b"])])
    rows = rows.assign(_label=names)
    groups = list(dict.fromkeys(rows[panel])) if panel else [None]
    n_rows = max(len(rows[rows[panel] == g]) if panel else len(rows) for g in groups)
    fig = new_figure((panel_in[0], (panel_in[1] * n_rows + 1.2) * len(groups)))
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, g in zip(axes, groups):
        sub = rows[rows[panel] == g] if panel else rows
        _forest_panel(ax, sub, list(sub["_label"]), f"{panel}: {g}" if panel else None)
    axes[-1].set_xlabel(f"difference in pooled {METRIC_WORDS.get(metric, metric)}@{threshold:g} (B − A, fraction); "
                        f"bars: {claims.interval_label(table)}")
    if title:
        fig.suptitle(title)
    return fig


def plot_difference_curve(table: pd.DataFrame, x: str, *, hue: str = "a", metric: str = "ap",
                          threshold: float = 0.5, labels: Mapping[str, str] | None = None,
                          tolerance: float | None = None, mark: tuple[float, str] | None = None,
                          xlabel: str | None = None, title: str | None = None, figsize=(6.5, 4)):
    """Differences B - A (fraction) against a numeric column ``x`` of the table (e.g. the label
    budget), one series per value of ``hue`` (e.g. the reference A), each point with its interval
    as a vertical bar; a line at 0, a dashed line at ``-tolerance`` when given, and ``mark`` = (x,
    label) as a vertical line (e.g. the plateau). The y label says which interval.
    """
    rows = rows_at(table, metric, threshold)
    check_columns(rows, [x, hue], "plot_difference_curve", source=SOURCE)
    words = dict(labels or {})
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    series = list(dict.fromkeys(rows[hue]))
    ticks = sorted({float(v) for v in rows[x]})
    for k, (name, colour) in enumerate(zip(series, ("tab:blue", "tab:orange", "tab:purple", "tab:brown"))):
        sub = rows[rows[hue] == name].sort_values(x)
        shift = np.exp(0.04 * (k - (len(series) - 1) / 2))   # side by side on the log axis
        for _, row in sub.iterrows():
            _draw_interval(ax, float(row[x]) * shift, row, vertical=True, colour=colour)
        ax.plot(sub[x].astype(float) * shift, sub["difference"], color=colour, lw=1, alpha=0.6,
                label=f"minus {words.get(name, name)}")
    ax.axhline(0.0, color="k", lw=0.8)
    if tolerance is not None:
        ax.axhline(-tolerance, color="tab:red", ls="--", lw=1, label=f"-{tolerance:g} (tolerance)")
    if mark is not None and mark[0] is not None:
        ax.axvline(mark[0], color="tab:red", lw=1, alpha=0.7, label=mark[1])
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(f"difference in pooled {METRIC_WORDS.get(metric, metric)}@{threshold:g}\n"
                  f"(bars: {claims.interval_label(table)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    return fig
