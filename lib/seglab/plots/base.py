"""What every figure module shares: a new headless Figure and the check of a table's columns.

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
