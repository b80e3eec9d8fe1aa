"""3D evaluation: every ``imagesTs_*`` folder of a dataset against ``instancesTs``.

Per volume and pooled over volumes, at each IoU threshold: AP, precision, recall, F1 and the
object counts (true, predicted, matched) from :func:`seglab.evaluate.metrics.match` (the same
optimal matching as cellpose's ``average_precision``, which works on 3D labels); foreground
IoU and Dice (voxels); a boundary F1 at a tolerance in voxels; and the split and merged
counts (:func:`split_merge`).

Definitions
-----------
- boundary F1 at ``tol`` voxels: boundary voxels of each label volume are
  ``skimage.segmentation.find_boundaries(mode="inner")`` (object voxels next to another id);
  precision = fraction of predicted boundary voxels within ``tol`` (Euclidean, voxels) of a
  true boundary voxel, recall the converse, F1 their harmonic mean; NaN when neither has one.
- split: a true object with at least two predicted objects that each have more than half of
  their voxels inside it; merged: a predicted object with at least two true objects that each
  have more than half of their voxels inside it.
- pooled: counts (and voxel counts) summed over the volumes, then the ratios.

:func:`evaluate_folder` writes ``<folder>/evaluation/evaluation_results.csv`` (one row per
volume x threshold and the pooled rows, ``volume == "pooled"``) and
``evaluation_results_summary.txt`` as one set (:func:`seglab.core.io.write_set`). A volume whose
prediction is missing or cannot be scored is a row with ``status == "failed"`` and its
``error``; the others go on. :func:`compare_methods` does that for every ``imagesTs_*`` folder
and returns the comparison table (one row per method and threshold).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.core import io
from seglab.data import volumes as vdata
from seglab.evaluate import metrics

THRESHOLDS = (0.5, 0.75, 0.9)
BOUNDARY_TOL_VOXELS = 2.0
OUTPUT_SET = "evaluation"
RESULTS_FILE = "evaluation_results.csv"
SUMMARY_FILE = "evaluation_results_summary.txt"
COMPARISON_FILE = "evaluation_comparison.csv"
POOLED = "pooled"
COUNT_COLUMNS = ("n_true", "n_pred", "tp", "fp", "fn", "foreground_true_voxels", "foreground_pred_voxels",
                 "foreground_both_voxels", "boundary_pred_voxels", "boundary_true_voxels", "boundary_pred_hit",
                 "boundary_true_hit", "n_split", "n_merged")
COLUMNS = ["volume", "status", "error", "threshold", "n_true", "n_pred", "tp", "fp", "fn", "precision", "recall",
           "f1", "ap", "mean_matched_iou", "foreground_iou", "foreground_dice", "foreground_true_voxels",
           "foreground_pred_voxels", "foreground_both_voxels", "boundary_precision", "boundary_recall",
           "boundary_f1", "boundary_pred_voxels", "boundary_true_voxels", "boundary_pred_hit",
           "boundary_true_hit", "n_split", "n_merged"]


def boundary_scores(y_true: np.ndarray, y_pred: np.ndarray, tol: float = BOUNDARY_TOL_VOXELS) -> dict:
    """Boundary precision, recall and F1 at ``tol`` voxels (see the module docstring), with the counts
    ``boundary_true_voxels``, ``boundary_pred_voxels``, ``boundary_true_hit``, ``boundary_pred_hit``."""
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    bt = find_boundaries(y_true, mode="inner")
    bp = find_boundaries(y_pred, mode="inner")
    nt, np_ = int(bt.sum()), int(bp.sum())
    hit_p = int((ndimage.distance_transform_edt(~bt)[bp] <= tol).sum()) if nt and np_ else 0
    hit_t = int((ndimage.distance_transform_edt(~bp)[bt] <= tol).sum()) if nt and np_ else 0
    return {"boundary_true_voxels": nt, "boundary_pred_voxels": np_, "boundary_true_hit": hit_t,
            "boundary_pred_hit": hit_p, **_boundary_ratios(nt, np_, hit_t, hit_p)}


def _boundary_ratios(nt, np_, hit_t, hit_p) -> dict:
    if nt == 0 and np_ == 0:
        return {"boundary_precision": float("nan"), "boundary_recall": float("nan"), "boundary_f1": float("nan")}
    p = hit_p / np_ if np_ else 0.0
    r = hit_t / nt if nt else 0.0
    return {"boundary_precision": p, "boundary_recall": r, "boundary_f1": 2 * p * r / (p + r) if p + r else 0.0}


def split_merge(ov: metrics.Overlap) -> dict:
    """``n_split`` true objects and ``n_merged`` predicted objects (module docstring) from an overlap."""
    inter = ov.pair_intersection_px
    pred_inside = inter > ov.pred_area_px[ov.pair_pred] / 2   # most of the predicted object is in the true one
    true_inside = inter > ov.true_area_px[ov.pair_true] / 2
    per_true = np.bincount(ov.pair_true[pred_inside], minlength=ov.n_true)
    per_pred = np.bincount(ov.pair_pred[true_inside], minlength=ov.n_pred)
    return {"n_split": int((per_true >= 2).sum()), "n_merged": int((per_pred >= 2).sum())}


def evaluate_volume(y_true: np.ndarray, y_pred: np.ndarray, thresholds: Sequence[float] = THRESHOLDS,
                    tol: float = BOUNDARY_TOL_VOXELS) -> pd.DataFrame:
    """Scores of one ``(Z, Y, X)`` label volume pair: one row per threshold (columns of :data:`COLUMNS`
    but volume, status and error). Raises MetricsInputError on labels that cannot be compared."""
    ths = metrics.check_thresholds(thresholds)
    ov = metrics.overlap(y_true, y_pred)   # checks both label volumes and their shapes
    fg = metrics.foreground_iou_dice(y_true, y_pred)
    extra = {"foreground_iou": fg["foreground_iou"], "foreground_dice": fg["foreground_dice"],
             "foreground_true_voxels": fg["foreground_true_px"], "foreground_pred_voxels": fg["foreground_pred_px"],
             "foreground_both_voxels": fg["foreground_both_px"], **boundary_scores(y_true, y_pred, tol),
             **split_merge(ov)}
    rows = metrics.match(y_true, y_pred, thresholds=ths).to_dict("records")
    return pd.DataFrame([{**r, **extra} for r in rows])


def pooled_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per threshold over the scored volumes of ``table``: counts summed, then the ratios
    (``metrics.scores`` for detection, voxel counts for foreground and boundary)."""
    ok = table[table["status"] == "ok"]
    rows = []
    for th in sorted(ok["threshold"].unique()):
        sub = ok[ok["threshold"] == th]
        n_true, n_pred, tp = (int(sub[c].sum()) for c in ("n_true", "n_pred", "tp"))
        s = metrics.scores(float(th), n_true, n_pred, tp, float((sub["mean_matched_iou"] * sub["tp"]).sum()))
        sums = {c: int(sub[c].sum()) for c in ("foreground_true_voxels", "foreground_pred_voxels",
                                               "foreground_both_voxels", "boundary_true_voxels",
                                               "boundary_pred_voxels", "boundary_true_hit", "boundary_pred_hit",
                                               "n_split", "n_merged")}
        t, p, b = sums["foreground_true_voxels"], sums["foreground_pred_voxels"], sums["foreground_both_voxels"]
        rows.append({"volume": POOLED, "status": "ok", "error": "", **{k: s[k] for k in s if k in COLUMNS}, **sums,
                     "foreground_iou": b / (t + p - b) if t + p - b else float("nan"),
                     "foreground_dice": 2 * b / (t + p) if t + p else float("nan"),
                     **_boundary_ratios(sums["boundary_true_voxels"], sums["boundary_pred_voxels"],
                                        sums["boundary_true_hit"], sums["boundary_pred_hit"])})
    return pd.DataFrame(rows, columns=COLUMNS)


def score_folder(pred_dir: str | os.PathLike, labels_dir: str | os.PathLike, thresholds: Sequence[float] = THRESHOLDS,
                 tol: float = BOUNDARY_TOL_VOXELS, *, progress: bool = False) -> pd.DataFrame:
    """Score each case of ``labels_dir`` against ``pred_dir/<case>.tif(f)``: the per-volume rows, then
    the pooled rows. A failing volume is a ``failed`` row (one per threshold) and the others go on."""
    pred_dir, labels_dir = Path(pred_dir), Path(labels_dir)
    ths = metrics.check_thresholds(thresholds)
    labels = vdata.index_folder(labels_dir, "labels")
    if not labels:
        raise SeglabError(f"{labels_dir}: no .tif/.tiff label volumes")
    preds = vdata.index_folder(pred_dir, "predictions")
    frames = []
    from tqdm.auto import tqdm

    for case, lpath in tqdm(sorted(labels.items()), desc=f"evaluate {pred_dir.name}", unit="volume",
                            disable=not progress):
        try:
            if case not in preds:
                raise SeglabError(f"no prediction {case}.tiff in {pred_dir}")
            rows = evaluate_volume(vdata.read_labels(lpath), vdata.read_labels(preds[case]), ths, tol)
            frames.append(rows.assign(volume=case, status="ok", error=""))
        except SeglabError as exc:
            frames.append(pd.DataFrame([{"volume": case, "status": "failed", "error": str(exc), "threshold": th}
                                        for th in ths]))
    per_volume = pd.concat(frames, ignore_index=True).reindex(columns=COLUMNS)
    table = pd.concat([per_volume, pooled_rows(per_volume)], ignore_index=True)
    counts = [c for c in COLUMNS if c in COUNT_COLUMNS]
    table[counts] = table[counts].astype("Int64")   # failed rows hold no counts (<NA>), the others stay integers
    return table


def summary_text(table: pd.DataFrame, name: str, tol: float) -> str:
    """A few lines: volumes scored and failed, then per threshold the pooled scores."""
    vols = table[table["volume"] != POOLED]
    failed = sorted(vols.loc[vols["status"] == "failed", "volume"].unique())
    ok = sorted(vols.loc[vols["status"] == "ok", "volume"].unique())
    lines = [f"{name}: {len(ok)} volumes evaluated, {len(failed)} failed"]
    for v in failed:
        lines.append(f"  failed {v}: {vols.loc[vols['volume'] == v, 'error'].iloc[0]}")
    lines.append(f"{'threshold':>9} {'n_true':>7} {'n_pred':>7} {'tp':>6} {'ap':>7} {'prec':>7} {'recall':>7} {'f1':>7}")
    for r in table[table["volume"] == POOLED].to_dict("records"):
        lines.append(f"{r['threshold']:>9.3g} {int(r['n_true']):>7d} {int(r['n_pred']):>7d} {int(r['tp']):>6d} {r['ap']:>7.4f} "
                     f"{r['precision']:>7.4f} {r['recall']:>7.4f} {r['f1']:>7.4f}")
    pooled = table[table["volume"] == POOLED]
    if len(pooled):
        r = pooled.iloc[0]
        lines.append(f"foreground IoU {r['foreground_iou']:.4f}, Dice {r['foreground_dice']:.4f}; boundary F1 at "
                     f"{tol:g} voxels {r['boundary_f1']:.4f}; split {int(r['n_split'])}, merged {int(r['n_merged'])}")
    lines.append("pooled: counts summed over the volumes, then the ratios; ap = tp / (tp + fp + fn)")
    return "\n".join(lines) + "\n"


def evaluate_folder(pred_dir: str | os.PathLike, labels_dir: str | os.PathLike,
                    thresholds: Sequence[float] = THRESHOLDS, tol: float = BOUNDARY_TOL_VOXELS,
                    *, progress: bool = False) -> pd.DataFrame:
    """:func:`score_folder`, written to ``<pred_dir>/evaluation/`` (results CSV and summary text, one set)."""
    table = score_folder(pred_dir, labels_dir, thresholds, tol, progress=progress)
    text = summary_text(table, Path(pred_dir).name, tol)
    io.write_set(Path(pred_dir) / "evaluation", {
        RESULTS_FILE: lambda p: table.to_csv(p, index=False),
        SUMMARY_FILE: lambda p: p.write_text(text)}, name=OUTPUT_SET)
    return table


def compare_methods(dataset: str | os.PathLike, thresholds: Sequence[float] = THRESHOLDS,
                    tol: float = BOUNDARY_TOL_VOXELS, *, progress: bool = False, write: bool = True) -> pd.DataFrame:
    """Evaluate every ``imagesTs_*`` folder of ``dataset`` against ``instancesTs`` (:func:`evaluate_folder`)
    and return the comparison: the pooled rows with a ``method`` column, plus ``n_volumes`` and
    ``n_failed``; written to ``<dataset>/evaluation_comparison.csv`` with ``write``.

    Raises SeglabError when ``imagesTs`` or ``instancesTs`` is missing or no ``imagesTs_*`` folder exists.
    """
    dataset = Path(dataset)
    vdata.dataset_cases(dataset, "test")   # imagesTs and instancesTs exist, every case has its label
    folders = vdata.prediction_folders(dataset)
    if not folders:
        raise SeglabError(f"{dataset}: no imagesTs_<method> folder to evaluate; predict first (seglab predict-3d) "
                          "or put another tool's predictions in imagesTs_<tool>/")
    rows = []
    for folder in folders:
        table = evaluate_folder(folder, dataset / "instancesTs", thresholds, tol, progress=progress)
        vols = table[table["volume"] != POOLED]
        n_vol = vols["volume"].nunique()
        n_failed = vols.loc[vols["status"] == "failed", "volume"].nunique()
        pooled = table[table["volume"] == POOLED]
        if not len(pooled):
            pooled = pd.DataFrame([{"threshold": th} for th in metrics.check_thresholds(thresholds)])
        rows.append(pooled.drop(columns=["volume", "status", "error"], errors="ignore")
                    .assign(method=vdata.method_of(folder), n_volumes=n_vol, n_failed=n_failed))
    out = pd.concat(rows, ignore_index=True)
    out = out[["method", "n_volumes", "n_failed"] + [c for c in out.columns if c not in ("method", "n_volumes", "n_failed")]]
    if write:
        io.write_table(dataset / COMPARISON_FILE, out)
    return out
