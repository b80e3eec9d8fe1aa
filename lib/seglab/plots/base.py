"""What every figure module shares: a new headless Figure, the check of a table's columns, grouped bars.

The figure functions of :mod:`seglab.plots` build a :class:`matplotlib.figure.Figure`
directly (no pyplot, no ``plt.show()``), so they work headless, in notebooks and in
batch runs; :func:`new_figure` is where that Figure is made.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from seglab import SeglabError


def new_figure(figsize):
    """A new matplotlib Figure, constrained layout, ``figsize`` (width, height) in inches."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def check_columns(df: pd.DataFrame, columns: Sequence[str], what: str, *, source: str) -> None:
    """SeglabError naming the missing columns of ``df`` (the table ``what`` needs) and the function
    whose table to pass (``source``, e.g. 'seglab.evaluate.metrics.evaluate')."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SeglabError(f"{what}: missing column(s) {missing} (have {list(df.columns)}); "
                          f"pass a table from {source}")


def grouped_bars(ax, groups: Sequence[str], bars: Sequence[tuple], *, ylabel: str, width: float = 0.27) -> None:
    """Side-by-side bars on ``ax``: one group per entry of ``groups`` (x tick labels), one bar per
    (values, label, color) of ``bars`` within each group, centred on the tick; a small legend."""
    import numpy as np

    x = np.arange(len(groups))
    for k, (values, label, color) in enumerate(bars):
        ax.bar(x + (k - (len(bars) - 1) / 2) * width, values, width, label=label, color=color)
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
