"""Figures of E0 (notebook 00_data): coverage, donor split, example tiles, planted truth, realism.

Each function returns a matplotlib Figure (no pyplot). They take the tables of
:mod:`seglab.experiments.e0_data`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from seglab.plots.base import check_columns, new_figure
from seglab.plots.evaluation import composite_rgb

SOURCE = "seglab.experiments.e0_data"
SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
OUTLINE_COLOUR = (1.0, 1.0, 0.0)   # instance outlines over the composite: yellow
MISSING_COLOUR = "red"             # donor ids missing from the clinical table


def with_outlines(image: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """(2, Y, X) [DAPI, marker] -> (Y, X, 3) RGB composite (:func:`composite_rgb`) with the inner
    boundary of every instance of ``labels`` ((Y, X), 0 background) drawn in yellow."""
    from skimage.segmentation import find_boundaries

    rgb = composite_rgb(image)
    if labels is not None:
        rgb[find_boundaries(labels, mode="inner")] = OUTLINE_COLOUR
    return rgb


def coverage_figure(tiles: pd.DataFrame, annotated_grid: pd.DataFrame, annotated: pd.DataFrame,
                    missing_donors: Sequence[int] = ()):
    """Left: annotated / all tiles per donor (rows) and marker (columns), shaded by annotated tiles,
    donor ids missing from the clinical table in red. Right: annotated tiles per marker and split.

    tiles, annotated_grid : donors x markers crosstabs; annotated : splits x markers
    (:func:`seglab.experiments.e0_data.coverage_tables`).
    """
    fig = new_figure((12, max(4, 0.22 * len(tiles))))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    im = left.imshow(annotated_grid.to_numpy(), aspect="auto", cmap="Blues", vmin=0)
    for (i, j), n in np.ndenumerate(tiles.to_numpy()):
        left.text(j, i, f"{annotated_grid.iat[i, j]}/{n}", ha="center", va="center", fontsize=6)
    left.set_xticks(range(tiles.shape[1]), tiles.columns)
    left.set_yticks(range(tiles.shape[0]), tiles.index, fontsize=7)
    left.set_title("annotated / all tiles per donor and marker")
    fig.colorbar(im, ax=left, fraction=0.05, label="annotated tiles")
    missing = set(missing_donors or [])
    for label, donor in zip(left.get_yticklabels(), tiles.index):
        if donor in missing:
            label.set_color(MISSING_COLOUR)
    annotated.T.plot.bar(ax=right, rot=0)
    right.set_ylabel("annotated tiles")
    right.set_title("annotated tiles per marker and split")
    fig.suptitle(f"Coverage (donor ids in {MISSING_COLOUR}: missing from the clinical table)")
    return fig


def split_figure(split_table: pd.DataFrame):
    """Annotated tiles per donor, one bar each, coloured by split (train, val, test order); the legend
    gives each split's tiles and donors. ``split_table``: :func:`seglab.experiments.e0_data.split_donors`."""
    from matplotlib.patches import Patch

    check_columns(split_table, ["split", "donor", "n_annotated_tiles"], "split_figure", source=SOURCE)
    order = {s: i for i, s in enumerate(SPLIT_COLOURS)}
    table = split_table.sort_values(by="split", key=lambda s: s.map(order), kind="stable")
    fig = new_figure((12, 3))
    ax = fig.add_subplot()
    ax.bar(range(len(table)), table["n_annotated_tiles"], color=table["split"].map(SPLIT_COLOURS))
    ax.set_xticks(range(len(table)), table["donor"], rotation=90, fontsize=7)
    ax.set_ylabel("annotated tiles")
    handles = []
    for split, colour in SPLIT_COLOURS.items():
        part = table[table["split"] == split]
        # a patch per split: an empty bar's legend entry would take the default colour
        handles.append(Patch(color=colour, label=f"{split}: {int(part['n_annotated_tiles'].sum())} tiles, "
                                                 f"{part['donor'].nunique()} donors"))
    ax.legend(handles=handles)
    ax.set_title("donor-level split of the annotated tiles")
    return fig


def example_tiles_figure(rows: pd.DataFrame, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]):
    """One column per tile: DAPI, marker (grey, scaled to the 99.5th percentile) and the composite
    (marker red, DAPI blue) with the true instance outlines in yellow.

    rows : manifest rows (marker, donor, marker_channel); images : (2, Y, X); masks : (Y, X) labels.
    """
    n = max(1, len(images))
    fig = new_figure((3.2 * n, 9.6))
    axes = fig.subplots(3, n, squeeze=False)
    for j, (row, img, mask) in enumerate(zip(rows.to_dict("records"), images, masks)):
        axes[0, j].imshow(img[0], cmap="gray", vmax=np.percentile(img[0], 99.5))
        axes[0, j].set_title(f"{row['marker']} / donor {row['donor']}\nDAPI", fontsize=9)
        axes[1, j].imshow(img[1], cmap="gray", vmax=np.percentile(img[1], 99.5))
        axes[1, j].set_title(f"marker ({row['marker_channel']})", fontsize=9)
        axes[2, j].imshow(with_outlines(img, mask))
        axes[2, j].set_title(f"{len(np.unique(mask)) - 1} instances", fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    return fig


def planted_truth_figure(counts: pd.DataFrame, effects: pd.DataFrame):
    """One panel per marker (``effects`` order): each donor's true positive fraction against its latent
    score, titled with the planted effect and Pearson's r.

    counts : :func:`seglab.data.simulate.truth_counts`; effects : marker, effect per marker.
    """
    check_columns(counts, ["marker", "latent_score", "positive_fraction"], "planted_truth_figure", source=SOURCE)
    check_columns(effects, ["marker", "effect"], "planted_truth_figure", source=SOURCE)
    fig = new_figure((3.2 * len(effects), 3))
    axes = fig.subplots(1, len(effects), sharey=True, squeeze=False)[0]
    for ax, (marker, effect) in zip(axes, zip(effects["marker"], effects["effect"])):
        g = counts[counts["marker"] == marker]
        ax.scatter(g["latent_score"], g["positive_fraction"], s=12)
        r = np.corrcoef(g["latent_score"], g["positive_fraction"])[0, 1]
        ax.set_title(f"{marker}: effect {effect:+.2f}\nr = {r:.2f}", fontsize=9)
        ax.set_xlabel("latent score")
    axes[0].set_ylabel("true positive fraction")
    return fig


def realism_figure(per_image: pd.DataFrame, stats: Sequence[str], *, dsb_source: str = "dsb2018",
                   closest_group: str = "256x256"):
    """One histogram panel per statistic (clipped at its 97th percentile): all DSB2018 images, its
    ``closest_group`` and our tiles (every other source). ``per_image``: :func:`e0_data.realism`'s table."""
    check_columns(per_image, ["source", "group", *stats], "realism_figure", source=SOURCE)
    dsb = per_image["source"] == dsb_source
    groups = {"DSB2018 (all)": per_image[dsb], f"DSB2018 {closest_group}": per_image[dsb & (per_image["group"] == closest_group)],
              "ours": per_image[~dsb]}
    fig = new_figure((16, 3.2))
    axes = fig.subplots(1, len(stats), squeeze=False)[0]
    for ax, stat in zip(axes, stats):
        values = {name: g[stat].dropna() for name, g in groups.items()}
        hi = np.nanpercentile(np.concatenate(list(values.values())), 97)
        bins = np.linspace(0, hi, 30)
        for name, v in values.items():
            ax.hist(v.clip(upper=hi), bins=bins, density=True, histtype="step", lw=1.5, label=name)
        ax.set_xlabel(stat)
    axes[0].legend(fontsize=8)
    fig.suptitle("nucleus statistics per image: simulated DAPI vs real DSB2018 nuclei")
    return fig
