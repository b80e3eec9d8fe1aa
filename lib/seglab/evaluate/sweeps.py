"""Sweeps of mask settings on one split, from saved network outputs or by rerunning the network.

- :func:`threshold_sweep` and :func:`select_best`: the validation sweep of (flow, cellprob)
  thresholds that E1 selects with (selection on validation only; the test split is scored
  once per selected configuration).
- :func:`outputs_sensitivity` (mask settings rebuilt from outputs) and
  :func:`rerun_sensitivity` (diameter, tile overlap, augmentation: a network pass each): E4. With
  ``per_image=True`` both also return every tile's counts per setting (``Evaluation.per_image``
  rows with parameter and value columns), what :func:`seglab.evaluate.claims.grid_range` needs for
  an interval of the range of AP over a parameter's values.
"""

from __future__ import annotations

from itertools import product
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings
from seglab.evaluate import scoring
from seglab.data import splitset
from seglab.segment import dynamics


def threshold_sweep(split: splitset.SplitSet, outputs: Sequence[dict], flow_thresholds: Sequence[float],
                    cellprob_thresholds: Sequence[float], mask: MaskSettings | None = None, *,
                    iou: float = 0.5) -> pd.DataFrame:
    """Pooled metrics at ``iou`` for every (flow_threshold, cellprob_threshold), from saved outputs.

    Returns one row per pair: flow_threshold, cellprob_threshold, tp, fp, fn,
    n_pred, precision, recall, f1, ap. The network is not rerun, and the
    dynamics run once per tile and cellprob_threshold (see :func:`dynamics.sweep_masks`).
    ``outputs`` may be a :class:`dynamics.MaskMemo` shared with other sweeps of the same tiles;
    ``mask`` gives the settings that do not move (min size, niter; None: the defaults).
    """
    mask = MaskSettings() if mask is None else mask
    if outputs is None:
        raise SeglabError("threshold_sweep: this model has no network outputs (classical); sweep a network model")
    if len(outputs) != len(split):
        raise SeglabError(f"threshold_sweep: {len(outputs)} outputs for {len(split)} tiles")
    memo = outputs if isinstance(outputs, dynamics.MaskMemo) else dynamics.MaskMemo(outputs)
    rows = []
    for flow, cellprob in product(flow_thresholds, cellprob_thresholds):
        preds = memo.masks(mask.replace(flow_threshold=flow, cellprob_threshold=cellprob))
        rows.append({"flow_threshold": float(flow), "cellprob_threshold": float(cellprob),
                     **scoring.pooled_counts(split.masks, preds, iou)})
    return pd.DataFrame(rows)


def select_best(sweep: pd.DataFrame, metric: str = "f1", prefer: dict | None = None) -> dict:
    """The row of ``sweep`` with the highest ``metric``; ties go to the row closest to ``prefer``
    (the default :class:`MaskSettings` thresholds unless given), then to the first row."""
    if sweep.empty:
        raise SeglabError("select_best: the sweep is empty")
    default = MaskSettings()
    prefer = prefer or {"flow_threshold": default.flow_threshold, "cellprob_threshold": default.cellprob_threshold}
    best = sweep[metric].max()
    tied = sweep[np.isclose(sweep[metric], best)].copy()
    distance = sum((tied[k] - v).abs() for k, v in prefer.items() if k in tied)
    tied["_distance"] = distance if not isinstance(distance, int) else 0
    return tied.sort_values("_distance", kind="stable").iloc[0].drop("_distance").to_dict()


OUTPUT_PARAMS = ("flow_threshold", "cellprob_threshold", "min_size", "niter")


RERUN_PARAMS = ("diameter_factor", "tile_overlap", "augment")


def _count_row(split: splitset.SplitSet, preds: Sequence[np.ndarray], iou: float) -> dict:
    row = scoring.pooled_counts(split.masks, preds, iou)
    n_true = int(sum(len(np.unique(t)) - 1 for t in split.masks))
    row.update(n_true=n_true, cells_per_tile=row["n_pred"] / max(1, len(preds)),
               count_ratio=row["n_pred"] / n_true if n_true else float("nan"))
    return row


def _tile_rows(split: splitset.SplitSet, preds: Sequence[np.ndarray], iou: float, param: str, value) -> pd.DataFrame:
    """Every tile's ``Evaluation.per_image`` row at ``iou`` (image, marker, donor, tp, fp, fn, ...)
    for one setting, with ``parameter`` and ``value`` columns."""
    per_image = scoring.evaluate_masks(split, preds, thresholds=(iou,)).per_image
    return per_image.assign(parameter=param, value=[value] * len(per_image))


def _stacked(rows: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def outputs_sensitivity(split: splitset.SplitSet, outputs: Sequence[dict], grid: dict, base: MaskSettings, *,
                        iou: float = 0.5, per_image: bool = False):
    """AP, F1 and cell counts when one mask setting moves and the others stay at ``base``.

    Parameters
    ----------
    grid : {parameter: values} for parameters in ``OUTPUT_PARAMS`` (flow_threshold,
        cellprob_threshold, min_size (px), niter (Euler steps; None = what eval used)).
    base : the settings of the parameters that do not move.

    Returns one row per (parameter, value): parameter, value, tp, fp, fn,
    n_pred, precision, recall, f1, ap (pooled at ``iou``), n_true,
    cells_per_tile, count_ratio (predicted / true cells). From saved outputs only
    (``outputs`` may be a :class:`dynamics.MaskMemo` shared with :func:`threshold_sweep`).
    ``per_image``: return ``(table, tiles)``, tiles = every tile's ``Evaluation.per_image`` row at
    ``iou`` per setting, with parameter and value columns (the same masks, scored per tile).
    """
    bad = [k for k in grid if k not in OUTPUT_PARAMS]
    if bad:
        raise SeglabError(f"outputs_sensitivity: {bad} need a network rerun or are unknown; "
                          f"from outputs: {', '.join(OUTPUT_PARAMS)}")
    memo = outputs if isinstance(outputs, dynamics.MaskMemo) else dynamics.MaskMemo(outputs)
    rows, tiles = [], []
    for param, values in grid.items():
        for v in values:
            preds = memo.masks(base.replace(**{param: v}))
            rows.append({"parameter": param, "value": v, **_count_row(split, preds, iou)})
            if per_image:
                tiles.append(_tile_rows(split, preds, iou, param, v))
    return (pd.DataFrame(rows), _stacked(tiles)) if per_image else pd.DataFrame(rows)


def rerun_sensitivity(model, split: splitset.SplitSet, grid: dict, base: MaskSettings, *, iou: float = 0.5,
                      batch_size: int | None = None, per_image: bool = False):
    """AP, F1 and cell counts when a setting of the network pass moves (the network reruns).

    Parameters
    ----------
    grid : {parameter: values} for ``diameter_factor`` (the diameter handed to the
        model is factor x its default per tile: the estimated diameter for tiny
        nets, the canonical one for cpsam; the image is rescaled by 1 / factor
        relative to the default), ``tile_overlap`` (fraction of the network tile)
        and ``augment`` (test-time flips of overlapping tiles).
    base : the mask settings; its ``diameter_px`` is what factor 1.0 stands for (None: the
        model's default per tile, see ``grid``).

    Returns one row per (parameter, value) like :func:`outputs_sensitivity`, plus seconds (wall time
    of the network pass and masks; the default setting runs once and its rows share its time).
    ``per_image``: return ``(table, tiles)`` as :func:`outputs_sensitivity` does.
    """
    import time

    bad = [k for k in grid if k not in RERUN_PARAMS]
    if bad:
        raise SeglabError(f"rerun_sensitivity: unknown parameter(s) {bad}; use {', '.join(RERUN_PARAMS)} "
                          f"(and outputs_sensitivity for {', '.join(OUTPUT_PARAMS)})")
    default_d = [model.resolve_diameter(model.as_network_input(x), base.diameter_px) or model.diam_mean_px
                 for x in split.images]
    defaults = {"diameter_factor": 1.0, "tile_overlap": 0.1, "augment": False}
    done: dict = {}  # the default setting appears once per parameter: run it once
    rows, tiles = [], []
    for param, values in grid.items():
        for v in values:
            setting = {**defaults, param: bool(v) if param == "augment" else float(v)}
            key = tuple(sorted(setting.items()))
            t0 = time.perf_counter()
            if key not in done:
                preds = [model.segment(x, base.replace(diameter_px=setting["diameter_factor"] * d),
                                       batch_size=batch_size, tile_overlap=setting["tile_overlap"],
                                       augment=setting["augment"])
                         for x, d in zip(split.images, default_d)]
                done[key] = (_count_row(split, preds, iou), round(time.perf_counter() - t0, 2),
                             _tile_rows(split, preds, iou, "", None) if per_image else None)
            counts, seconds, per_tile = done[key]
            rows.append({"parameter": param, "value": v, **counts, "seconds": seconds})
            if per_image:
                tiles.append(per_tile.assign(parameter=param, value=[v] * len(per_tile)))
    return (pd.DataFrame(rows), _stacked(tiles)) if per_image else pd.DataFrame(rows)
