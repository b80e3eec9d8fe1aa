"""Post-processing gates on predicted instances (E3): intensity quantiles and minimum area.

Two classic false positives of aged brain tissue are small and bright
(autofluorescent lipofuscin puncta) or dim (background texture the network
calls a cell). The gates here remove predicted instances by

- intensity: the instance's mean intensity in a chosen channel (the marker by
  default) must lie within [q_low, q_high] quantiles of the instance means of
  the same tile. Quantiles are fractions in [0, 1] over *instances*, not
  pixels, so a tile with few cells is gated relative to its own cells.
  ``q_low = 0`` and ``q_high = 1`` switch the gate off.
- area: the instance must cover at least ``min_area_px`` pixels, or
  ``min_area_um2`` square micrometres when ``pixel_size_um`` is given
  (micrometres per pixel; one pixel covers ``pixel_size_um ** 2`` um^2).

Gates only remove instances; they never change the pixels of those kept, and
ids are not renumbered. Per-instance statistics come from one ``bincount``
pass over the pixels, not a loop over objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.data import splitset
from seglab.evaluate import scoring

AREA_UNITS = ("px", "um2")


@dataclass(frozen=True)
class Gate:
    """One gate setting. Quantiles are fractions (0-1); areas in px or um^2."""

    q_low: float = 0.0
    q_high: float = 1.0
    min_area_px: float = 0.0
    min_area_um2: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.q_low <= self.q_high <= 1.0:
            raise SeglabError(f"gate: need 0 <= q_low <= q_high <= 1 (fractions), got q_low={self.q_low}, "
                              f"q_high={self.q_high}")
        if self.min_area_px < 0 or (self.min_area_um2 is not None and self.min_area_um2 < 0):
            raise SeglabError("gate: minimum areas must be >= 0")

    def as_dict(self) -> dict:
        return asdict(self)


def instance_stats(labels: np.ndarray, image: np.ndarray, pixel_size_um: float | None = None) -> pd.DataFrame:
    """Per instance: label, area_px, area_um2 (NaN without a pixel size), mean_intensity.

    labels: integer (Y, X) or (Z, Y, X), 0 = background. image: same shape, any numeric dtype.
    """
    labels = np.asarray(labels)
    image = np.asarray(image)
    if labels.shape != image.shape:
        raise SeglabError(f"labels shape {labels.shape} differs from image shape {image.shape}; "
                          "pass the channel the gate reads (e.g. tile[1] for the marker)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise SeglabError(f"labels must be an integer label image, got dtype {labels.dtype}")
    flat = labels.ravel()
    ids, inverse = np.unique(flat, return_inverse=True)
    area = np.bincount(inverse, minlength=len(ids))
    total = np.bincount(inverse, weights=image.ravel().astype(np.float64), minlength=len(ids))
    keep = ids != 0
    area_px = area[keep]
    table = pd.DataFrame({"label": ids[keep].astype(np.int64), "area_px": area_px.astype(np.int64),
                          "mean_intensity": total[keep] / np.maximum(area_px, 1)})
    table["area_um2"] = area_px * pixel_size_um ** 2 if pixel_size_um else np.nan
    return table


def decide(stats: pd.DataFrame, gate: Gate, pixel_size_um: float | None = None) -> pd.DataFrame:
    """``stats`` plus columns kept (bool) and reason ('', 'area', 'dim', 'bright')."""
    out = stats.copy()
    reason = np.full(len(out), "", dtype=object)
    if len(out):
        if gate.min_area_um2 is not None:
            if not pixel_size_um:
                raise SeglabError("gate: min_area_um2 needs pixel_size_um (micrometres per pixel)")
            too_small = out["area_um2"].to_numpy() < gate.min_area_um2
        else:
            too_small = out["area_px"].to_numpy() < gate.min_area_px
        means = out["mean_intensity"].to_numpy()
        lo, hi = np.quantile(means, [gate.q_low, gate.q_high])
        reason[means < lo] = "dim"
        reason[means > hi] = "bright"
        reason[too_small] = "area"
    out["kept"] = reason == ""
    out["reason"] = reason
    return out


def apply_gate(labels: np.ndarray, image: np.ndarray, gate: Gate,
               pixel_size_um: float | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """(gated labels, per-instance decisions). Removed instances become background (0)."""
    decisions = decide(instance_stats(labels, image, pixel_size_um), gate, pixel_size_um)
    removed = decisions.loc[~decisions["kept"], "label"].to_numpy()
    gated = np.where(np.isin(labels, removed), 0, labels).astype(labels.dtype, copy=False)
    return gated, decisions


def area_column(area_unit: str) -> str:
    """The Gate field (and sweep column) of the minimum area: ``min_area_px`` or ``min_area_um2``."""
    if area_unit not in AREA_UNITS:
        raise SeglabError(f"area_unit must be 'px' or 'um2', got {area_unit!r}")
    return f"min_area_{area_unit}"


def gate_from_row(row: Mapping, area_unit: str = "px") -> Gate:
    """The Gate of one row of :func:`sweep_gates` (e.g. the selected one): its quantiles and its
    minimum area in ``area_unit`` ('px' or 'um2'; the other area field stays at its default)."""
    return Gate(q_low=float(row["q_low"]), q_high=float(row["q_high"]),
                **{area_column(area_unit): float(row[area_column(area_unit)])})


def gate_grid(q_lows, q_highs, min_areas, area_unit: str = "px") -> list[Gate]:
    """Every combination, as Gates; ``area_unit`` 'px' or 'um2' says what ``min_areas`` are in."""
    area_column(area_unit)  # checks the unit
    grid = []
    for lo in q_lows:
        for hi in q_highs:
            if lo > hi:
                continue
            for a in min_areas:
                grid.append(Gate(lo, hi, min_area_px=a) if area_unit == "px" else Gate(lo, hi, min_area_um2=a))
    return grid


def sweep_gates(items, gates: list[Gate], threshold: float = 0.5, pixel_size_um: float | None = None) -> pd.DataFrame:
    """Pooled detection metrics for each gate over ``items`` (dicts with y_true, y_pred, image).

    Returns one row per gate: the gate's fields, tp, fp, fn, precision, recall,
    f1, ap at the IoU ``threshold``, pooled over images (counts summed first),
    and n_removed. Instance statistics are computed once per image.
    """
    from seglab.evaluate.metrics import pooled_match

    stats = [instance_stats(it["y_pred"], it["image"], pixel_size_um) for it in items]
    rows = []
    for gate in gates:
        preds, removed = [], 0
        for it, st in zip(items, stats):
            decisions = decide(st, gate, pixel_size_um)
            drop = decisions.loc[~decisions["kept"], "label"].to_numpy()
            preds.append(np.where(np.isin(it["y_pred"], drop), 0, it["y_pred"]) if len(drop) else it["y_pred"])
            removed += len(drop)
        pooled = pooled_match([it["y_true"] for it in items], preds, threshold)
        rows.append({**gate.as_dict(), **{k: pooled[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1", "ap")},
                     "n_removed": removed})
    return pd.DataFrame(rows)


def gate_items(split: splitset.SplitSet, masks: Sequence[np.ndarray], channel: int = 1) -> list[dict]:
    """``postprocess.sweep_gates``'s items: y_true, y_pred and the channel the gate reads (marker = 1)."""
    if len(masks) != len(split):
        raise SeglabError(f"gate_items: {len(masks)} masks for {len(split)} tiles")
    return [{"name": n, "y_true": t, "y_pred": p, "image": np.asarray(x[channel])}
            for n, t, p, x in zip(split.names, split.masks, masks, split.images)]


def gate_split(split: splitset.SplitSet, masks: Sequence[np.ndarray], gate, *, channel: int = 1,
               pixel_size_um: float | None = None, iou: float = 0.5) -> tuple[list, pd.DataFrame]:
    """Apply one gate to every tile; returns (gated masks, per-instance decisions).

    The decisions table has one row per predicted instance: image, marker,
    label, area_px, area_um2, mean_intensity, kept, reason ('', 'area', 'dim',
    'bright') and ``matched`` (True when the instance was a true positive at
    ``iou`` before gating), so removed FPs and lost TPs can be counted.
    """
    gated, frames = [], []
    for name, marker, t, p, x in zip(split.names, split.rows["marker"], split.masks, masks, split.images):
        g, dec = apply_gate(p, np.asarray(x[channel]), gate, pixel_size_um)
        dec = dec.assign(image=name, marker=marker)
        dec["matched"] = dec["label"].isin(scoring.outcome_labels(t, p, iou)["tp_pred"])
        gated.append(g)
        frames.append(dec)
    decisions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    lead = ["image", "marker", "label"]
    return gated, decisions[lead + [c for c in decisions.columns if c not in lead]]


def gate_effect(decisions: pd.DataFrame) -> pd.DataFrame:
    """Removed instances by reason: how many were false positives and how many true positives."""
    removed = decisions[~decisions["kept"]]
    rows = []
    for reason in ("area", "dim", "bright"):
        r = removed[removed["reason"] == reason]
        rows.append({"reason": reason, "removed": len(r), "removed_fp": int((~r["matched"]).sum()),
                     "removed_tp": int(r["matched"].sum())})
    rows.append({"reason": "all", "removed": len(removed), "removed_fp": int((~removed["matched"]).sum()),
                 "removed_tp": int(removed["matched"].sum())})
    return pd.DataFrame(rows)
