"""The annotated tiles of one split in memory (images, true masks, manifest rows), and subsets of them.

Every evaluation, sweep and network pass of notebooks 01-06 takes a :class:`SplitSet`:
:func:`annotated_split` loads one split of a manifest; :func:`subset`, :func:`split_subset`
and :func:`take` pick tiles of it without reading the disk again; :func:`zero_dapi` gives the
marker-only model's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.data import manifest as data


@dataclass
class SplitSet:
    """The annotated tiles of one split, in tile_id order.

    rows : manifest rows; images : (2, Y, X) float32 [DAPI, marker]; masks : (Y, X) labels.
    """

    split: str
    rows: pd.DataFrame
    images: list
    masks: list

    @property
    def names(self) -> list[str]:
        return list(self.rows["tile_id"])

    @property
    def groups(self) -> pd.DataFrame:
        """image, marker, donor: the grouping ``metrics.evaluate`` reports per group."""
        return pd.DataFrame({"image": self.names, "marker": list(self.rows["marker"]),
                             "donor": [str(d) for d in self.rows["donor"]]})

    def __len__(self) -> int:
        return len(self.rows)


def annotated_split(manifest: pd.DataFrame, split: str, markers: Sequence[str] | None = None,
                    zero_dapi: bool = False) -> SplitSet:
    """The annotated tiles of ``split`` (optionally only ``markers``); ``zero_dapi`` blanks channel 0."""
    rows = manifest[manifest["annotated"].astype(bool) & (manifest["split"] == split)]
    if markers:
        rows = rows[rows["marker"].isin(list(markers))]
    rows = rows.sort_values("tile_id").reset_index(drop=True)
    if rows.empty:
        raise SeglabError(f"no annotated tiles in split '{split}'" + (f" for markers {list(markers)}" if markers else "")
                          + "; check the cohort's donor_splits.yaml and annotated.csv")
    images, masks = [], []
    for _, r in rows.iterrows():
        x = data.load_tile(r)
        if zero_dapi:
            x = x.copy()
            x[0] = 0.0
        images.append(x)
        masks.append(data.load_mask(r))
    return SplitSet(split=split, rows=rows, images=images, masks=masks)


def take(split: SplitSet, names: Sequence[str], *lists):
    """The tiles ``names`` of ``split`` (a SplitSet) and the matching items of each list in ``lists``
    (e.g. masks, outputs aligned with ``split``): ``(subset, list1, list2, ...)``."""
    pos = {n: i for i, n in enumerate(split.names)}
    missing = [n for n in names if n not in pos]
    if missing:
        raise SeglabError(f"take: tiles {missing[:3]} are not in split '{split.split}'")
    idx = [pos[n] for n in names]
    sub = SplitSet(split=split.split, rows=split.rows.iloc[idx].reset_index(drop=True),
                   images=[split.images[i] for i in idx], masks=[split.masks[i] for i in idx])
    return (sub, *[None if lst is None else [lst[i] for i in idx] for lst in lists])


def zero_dapi(split: SplitSet) -> SplitSet:
    """The same tiles with channel 0 (DAPI) set to 0: the marker-only model's input."""
    images = []
    for x in split.images:
        x = np.array(x, copy=True)
        x[0] = 0.0
        images.append(x)
    return SplitSet(split=split.split, rows=split.rows, images=images, masks=split.masks)


def median_diameter_px(split: SplitSet) -> float:
    """Median object diameter (px, cellpose's: that of a disk of the median area) over the true masks
    of ``split``: the diameter to rescale for when the image cannot tell (e.g. DAPI zeroed)."""
    from cellpose.utils import diameters

    ds = [diameters(np.asarray(m))[0] for m in split.masks if np.asarray(m).max() > 0]
    if not ds:
        raise SeglabError(f"median_diameter_px: no objects in the masks of split '{split.split}'")
    return float(np.median(ds))


def subset(split: SplitSet, *, markers: Sequence[str] | None = None, n: int | None = None,
           seed: int = 0) -> SplitSet:
    """Some tiles of a split: those of ``markers``, then ``n`` drawn at random (seeded, stratified by
    marker when possible), kept in tile_id order."""
    keep = np.ones(len(split), bool)
    if markers:
        keep &= split.rows["marker"].isin(list(markers)).to_numpy()
    idx = np.flatnonzero(keep)
    if not len(idx):
        raise SeglabError(f"subset: no tiles of markers {list(markers or [])} in split '{split.split}'")
    if n is not None and n < len(idx):
        rng = np.random.default_rng(seed)
        rows = split.rows.iloc[idx]
        # round robin over markers so a small subset still covers each one
        by_marker = [list(rng.permutation(np.flatnonzero(rows["marker"].to_numpy() == m)))
                     for m in sorted(rows["marker"].unique())]
        picked = []
        while len(picked) < n:
            for lst in by_marker:
                if lst and len(picked) < n:
                    picked.append(idx[lst.pop()])
        idx = np.sort(np.array(picked))
    return SplitSet(split=split.split, rows=split.rows.iloc[idx].reset_index(drop=True),
                    images=[split.images[i] for i in idx], masks=[split.masks[i] for i in idx])


def split_subset(split: SplitSet, markers: Sequence[str]) -> SplitSet:
    """The tiles of ``split`` whose marker is in ``markers`` (no reloading from disk)."""
    markers = [str(m) for m in markers]
    keep = [i for i, m in enumerate(split.rows["marker"]) if str(m) in markers]
    if not keep:
        raise SeglabError(f"split '{split.split}' has no tiles of marker(s) {markers} "
                          f"(markers there: {sorted(split.rows['marker'].unique())})")
    return SplitSet(split=split.split, rows=split.rows.iloc[keep].reset_index(drop=True),
                    images=[split.images[i] for i in keep], masks=[split.masks[i] for i in keep])
