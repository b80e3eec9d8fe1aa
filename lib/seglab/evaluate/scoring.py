"""Scores of predicted masks against the truth, and the tables the experiments compare models with.

- :func:`evaluate_masks` / :func:`evaluate_model`: a split's predictions scored per tile, pooled,
  averaged over tiles and per marker / donor (:func:`seglab.evaluate.metrics.evaluate`);
- :func:`compare_models`, :func:`per_group_table`, :func:`per_image_long`: several models'
  evaluations side by side (E1);
- :func:`pooled_counts`: TP, FP, FN summed over tiles at one IoU, then the ratios (sweeps, E3);
- :func:`scores_from_per_image`, :func:`curve_summary`, :func:`plateau_budget` (and by the
  interval, :func:`plateau_budget_ci`), :func:`gap_table`:
  E2's and E6's tables; :func:`pick_examples`, :func:`outcome_labels`: tiles and objects to draw.

AP is ``TP / (TP + FP + FN)`` (cellpose's), a fraction; IoU thresholds are fractions.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings
from seglab.data import splitset
from seglab.evaluate import metrics
from seglab.segment import models, output_cache


def evaluate_masks(split: splitset.SplitSet, masks: Sequence[np.ndarray], thresholds=(0.5, 0.75, 0.9)) -> metrics.Evaluation:
    """Per image x threshold, pooled, mean over images and per marker/donor."""
    pairs = {name: (t, p) for name, t, p in zip(split.names, split.masks, masks)}
    return metrics.evaluate(pairs, groups=split.groups, thresholds=thresholds)


POOLED_KEYS = ("tp", "fp", "fn", "n_pred", "precision", "recall", "f1", "ap")


def pooled_counts(truths: Sequence[np.ndarray], preds: Sequence[np.ndarray], iou: float = 0.5) -> dict:
    """tp, fp, fn summed over images at one IoU threshold, then precision, recall, f1, ap; n_pred
    (``metrics.pooled_match``, trimmed to the columns of the sweep tables)."""
    pooled = metrics.pooled_match(truths, preds, iou)
    return {k: pooled[k] for k in POOLED_KEYS}


def headline(evaluation: metrics.Evaluation, threshold: float = 0.5) -> dict:
    """ap, precision, recall, f1 pooled over images at one IoU threshold (the study's headline)."""
    row = evaluation.pooled[np.isclose(evaluation.pooled["threshold"], threshold)].iloc[0]
    return {k: float(row[k]) for k in ("ap", "precision", "recall", "f1")}


def compare_models(evaluations: dict, threshold: float = 0.5) -> pd.DataFrame:
    """One row per model at one IoU threshold: pooled ap, precision, recall, f1, tp, fp, fn, n_pred,
    n_true, and the mean and SD over images of ap and f1 (``ap_mean``, ``ap_sd``, ...).

    ``evaluations``: {model name: :class:`seglab.evaluate.metrics.Evaluation`}.
    """
    rows = []
    for name, ev in evaluations.items():
        p = ev.pooled[np.isclose(ev.pooled["threshold"], threshold)]
        m = ev.mean_over_images[np.isclose(ev.mean_over_images["threshold"], threshold)]
        if p.empty:
            raise SeglabError(f"compare_models: IoU threshold {threshold} was not evaluated for '{name}' "
                              f"(have {list(ev.thresholds)})")
        p, m = p.iloc[0], m.iloc[0]
        rows.append({"model": name, "threshold": float(threshold), "n_images": int(p["n_images"]),
                     **{k: float(p[k]) for k in ("ap", "precision", "recall", "f1")},
                     **{k: int(p[k]) for k in ("tp", "fp", "fn", "n_pred", "n_true")},
                     "ap_mean": float(m["ap"]), "ap_sd": float(m["ap_sd"]),
                     "f1_mean": float(m["f1"]), "f1_sd": float(m["f1_sd"])})
    return pd.DataFrame(rows)


def per_group_table(evaluations: dict, group_by: str = "marker", summary: str = "pooled") -> pd.DataFrame:
    """Per model, group value and IoU threshold: ap, precision, recall, f1, tp, fp, fn (one summary)."""
    frames = []
    for name, ev in evaluations.items():
        g = ev.per_group
        if g.empty:
            continue
        g = g[(g["group_by"] == group_by) & (g["summary"] == summary)]
        keep = [c for c in ("group", "threshold", "n_images", "ap", "precision", "recall", "f1", "tp", "fp", "fn",
                            "ap_sd", "f1_sd") if c in g.columns]
        frames.append(g[keep].rename(columns={"group": group_by}).assign(model=name))
    if not frames:
        raise SeglabError(f"per_group_table: no per-group rows for '{group_by}'; evaluate with groups")
    out = pd.concat(frames, ignore_index=True)
    return out[["model", *[c for c in out.columns if c != "model"]]]


def per_image_long(evaluations: dict, threshold: float | None = None) -> pd.DataFrame:
    """The per-image tables of several models stacked, with a ``model`` column (optionally one threshold)."""
    frames = []
    for name, ev in evaluations.items():
        t = ev.per_image
        if threshold is not None:
            t = t[np.isclose(t["threshold"], threshold)]
        frames.append(t.assign(model=name))
    out = pd.concat(frames, ignore_index=True)
    return out[["model", *[c for c in out.columns if c != "model"]]]


def outcome_labels(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5) -> dict:
    """Which objects are TP, FP and FN at one IoU threshold (as :func:`seglab.evaluate.metrics.matched_pairs`).

    Returns dict with ``tp_pred`` (matched predicted ids), ``fp`` (unmatched
    predicted ids), ``fn`` (unmatched true ids), ``tp_true`` (matched true ids).
    """
    pairs = metrics.matched_pairs(y_true, y_pred, threshold)
    pred_ids = np.setdiff1d(np.unique(y_pred), [0])
    true_ids = np.setdiff1d(np.unique(y_true), [0])
    tp_pred = pairs["pred_id"].to_numpy()
    tp_true = pairs["true_id"].to_numpy()
    return {"tp_pred": tp_pred, "tp_true": tp_true, "fp": np.setdiff1d(pred_ids, tp_pred),
            "fn": np.setdiff1d(true_ids, tp_true)}


def pick_examples(per_image: pd.DataFrame, n: int, metric: str = "ap", threshold: float = 0.5,
                  by: str = "marker") -> list[str]:
    """``n`` image names spread over the range of ``metric`` (worst, middle, best), with distinct
    ``by`` values (markers) where possible: example tiles that show failures and successes."""
    t = per_image[np.isclose(per_image["threshold"], threshold)].sort_values([metric, "image"]).reset_index(drop=True)
    if t.empty:
        raise SeglabError("pick_examples: no rows at that threshold")
    n = min(int(n), len(t))
    targets = np.linspace(0, len(t) - 1, n).round().astype(int)
    chosen: list[int] = []
    used: set = set()
    for target in targets:
        # the nearest-ranked image not yet chosen, preferring an unused group
        order = np.argsort(np.abs(np.arange(len(t)) - target), kind="stable")
        free = [i for i in order if i not in chosen]
        fresh = [i for i in free if by not in t.columns or t.at[i, by] not in used]
        k = (fresh or free)[0]
        chosen.append(k)
        if by in t.columns:
            used.add(t.at[k, by])
    return [t.at[i, "image"] for i in chosen]


SCORE_COLUMNS = ("ap_pooled", "ap_mean", "ap_sd", "ap_min", "ap_max", "precision", "recall", "f1",
                 "tp", "fp", "fn", "n_true", "n_pred", "n_images")


def tile_ids_hash(ids: Sequence[str], length: int = 16) -> str:
    """A short, order-free fingerprint of a set of tile ids (sha256 of the sorted ids, hex).

    Two runs trained on the same tiles have the same hash, whichever order the
    ids came in; the table of E2 carries it so that repeats drawing the same
    subset are visible at a glance.

    >>> tile_ids_hash(["b", "a"]) == tile_ids_hash(["a", "b"])
    True
    """
    ids = sorted(str(i) for i in ids)
    if not ids:
        raise SeglabError("tile_ids_hash: no tile ids given")
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:length]


def scores_from_per_image(per_image: pd.DataFrame, iou: float = 0.5) -> dict:
    """Pooled and per-image summaries at one IoU threshold from ``Evaluation.per_image`` rows.

    Parameters
    ----------
    per_image : DataFrame
        Rows of :attr:`seglab.evaluate.metrics.Evaluation.per_image` (columns threshold,
        tp, fp, fn, n_true, n_pred, ap, precision, recall, f1, both_empty), any subset of images.
    iou : float
        The IoU threshold whose rows are summarised (must have been evaluated).

    Returns
    -------
    dict with ``SCORE_COLUMNS``: ``ap_pooled``, ``precision``, ``recall``,
    ``f1`` from the summed counts; ``ap_mean``, ``ap_sd`` (ddof=1; 0 for one
    image), ``ap_min``, ``ap_max`` across images; the summed counts; ``n_images``.
    """
    need = ["threshold", "tp", "fp", "fn", "n_true", "n_pred", "ap"]
    missing = [c for c in need if c not in per_image.columns]
    if missing:
        raise SeglabError(f"scores_from_per_image: per_image lacks columns {missing}; pass Evaluation.per_image")
    sub = per_image[np.isclose(per_image["threshold"].to_numpy(float), iou)]
    if sub.empty:
        raise SeglabError(f"scores_from_per_image: IoU threshold {iou} was not evaluated "
                          f"(have {sorted(per_image['threshold'].unique())})")
    tp, fp, fn = (int(sub[c].sum()) for c in ("tp", "fp", "fn"))
    scored = sub[~sub["both_empty"].astype(bool)] if "both_empty" in sub.columns else sub
    ap = scored["ap"].to_numpy(float)
    return {
        "ap_pooled": tp / (tp + fp + fn) if tp + fp + fn else 0.0,
        "ap_mean": float(ap.mean()) if len(ap) else float("nan"),
        "ap_sd": float(ap.std(ddof=1)) if len(ap) > 1 else 0.0,
        "ap_min": float(ap.min()) if len(ap) else float("nan"),
        "ap_max": float(ap.max()) if len(ap) else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "tp": tp, "fp": fp, "fn": fn, "n_true": int(sub["n_true"].sum()), "n_pred": int(sub["n_pred"].sum()),
        "n_images": int(len(sub)),
    }


def curve_summary(runs: pd.DataFrame, metric: str = "ap_pooled") -> pd.DataFrame:
    """Per budget: n_repeats, mean, sd (ddof=1; 0 for one repeat), min, max of ``metric`` across repeats."""
    if metric not in runs.columns or "budget" not in runs.columns:
        raise SeglabError(f"curve_summary: runs need columns budget and {metric} (have {list(runs.columns)})")
    g = runs.groupby("budget")[metric]
    out = pd.DataFrame({"n_repeats": g.size(), "mean": g.mean(), "sd": g.std(ddof=1).fillna(0.0),
                        "min": g.min(), "max": g.max()}).reset_index()
    out.insert(1, "metric", metric)
    return out


def plateau_budget(summary: pd.DataFrame, tolerance: float) -> int:
    """The smallest budget whose mean is within ``tolerance`` of the best mean over budgets.

    This is the study's definition of the plateau: annotating more tiles than
    this buys at most ``tolerance`` (in AP) on validation.

    >>> plateau_budget(pd.DataFrame({"budget": [2, 5, 10], "mean": [0.3, 0.58, 0.6]}), 0.05)
    5
    """
    if tolerance < 0:
        raise SeglabError(f"plateau tolerance {tolerance} must be >= 0 (AP units)")
    if summary.empty:
        raise SeglabError("plateau_budget: empty summary")
    s = summary.sort_values("budget")
    best = s["mean"].max()
    return int(s.loc[s["mean"] >= best - tolerance - 1e-12, "budget"].iloc[0])


def plateau_budget_ci(budget_claims: pd.DataFrame, tolerance: float, *, reference: str = "finetuned_generic",
                      metric: str = "ap", threshold: float = 0.5) -> int | None:
    """The plateau by the interval: the smallest budget whose interval of (budget - ``reference``)
    has its lower bound at or above ``-tolerance`` (AP, a fraction), i.e. the data cannot show that
    the budget falls more than ``tolerance`` short of the reference. None when no budget qualifies
    (or no interval exists: one donor, no per-tile scores).

    ``budget_claims``: compare rows with a ``budget`` column, A = ``reference``
    (``seglab.experiments.e2_label_efficiency.budget_claims``).

    >>> t = pd.DataFrame({"a": "finetuned_generic", "budget": [2, 5, 10], "metric": "ap", "threshold": 0.5,
    ...                   "ci_low": [-0.2, -0.04, -0.01]})
    >>> plateau_budget_ci(t, 0.05)
    5
    """
    if tolerance < 0:
        raise SeglabError(f"plateau tolerance {tolerance} must be >= 0 (AP units)")
    rows = budget_claims[(budget_claims["a"] == reference) & (budget_claims["metric"] == metric)
                         & np.isclose(budget_claims["threshold"].astype(float), threshold)]
    within = rows[rows["ci_low"].astype(float) >= -tolerance - 1e-12]   # NaN bounds never qualify
    return int(within["budget"].min()) if len(within) else None


def gap_table(table: pd.DataFrame, metric: str = "ap_pooled", reference: str = "generic",
              other: str = "lomo") -> pd.DataFrame:
    """One row per marker: ``metric`` of each model side by side and ``gap = reference - other``.

    A positive gap is what the held-out marker costs: the model that saw it
    in training does better on it than the one that did not.
    """
    wide = table.pivot(index="marker", columns="model", values=metric)
    for need in (reference, other):
        if need not in wide.columns:
            raise SeglabError(f"gap_table: no rows for model '{need}' (have {list(wide.columns)})")
    wide.columns = [f"{metric}_{c}" for c in wide.columns]
    wide[f"gap_{reference}_minus_{other}"] = wide[f"{metric}_{reference}"] - wide[f"{metric}_{other}"]
    return wide.reset_index()


def evaluate_model(model, split: splitset.SplitSet, mask: MaskSettings, *, iou: float = 0.5, cached: bool = False):
    """Segment every tile of ``split`` once with ``model`` and score it at ``iou``.

    Parameters
    ----------
    model : a ``seglab.segment.models.Model`` or a spec / checkpoint path for ``models.load``.
    split : the tiles (see :func:`seglab.data.splitset.annotated_split`).
    mask : the mask settings (diameter, thresholds, min size).
    cached : take the network outputs from (and put them into) the cache of
        :func:`seglab.segment.output_cache.segment_cached`, so a pass another notebook made on the
        same tiles with the same weights is reused.

    Returns
    -------
    (scores, per_image, masks) : the dict of :func:`scores_from_per_image`,
    ``Evaluation.per_image`` (with marker and donor columns) and the predicted masks.
    """
    if not isinstance(model, models.Model):
        model = models.load(model)
    segment = output_cache.segment_cached if cached else output_cache.segment_split
    extra = {"log": lambda *a: None} if cached else {}
    masks, _ = segment(model, split, mask, **extra)
    ev = evaluate_masks(split, masks, thresholds=(iou,))
    return scores_from_per_image(ev.per_image, iou), ev.per_image, masks
