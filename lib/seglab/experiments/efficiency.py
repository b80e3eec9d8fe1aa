"""Label efficiency (E2) and leave-one-marker-out generalisation (E6): the loops behind notebooks 02 and 06.

Both experiments fine-tune many models through :func:`seglab.segment.finetuning.finetune`
(content-addressed cache under ``data/models/``, so a rerun with the same
inputs trains nothing) and score them with the same per-image matching as
every other notebook (:func:`seglab.evaluate.scoring.evaluate_masks`).

- E2: :func:`check_budgets`, :func:`label_budget_jobs`, :func:`label_budget_runs` (budgets x repeats,
  scored on validation), :func:`curve_summary`, :func:`plateau_budget`,
  :func:`plot_learning_curve`.
- E6: :func:`lomo_markers`, :func:`lomo_jobs`, :func:`finetune_lomo`, :func:`evaluate_lomo`,
  :func:`plot_marker_bars`.
- Shared: :func:`finetune_many` (cache first, then parallel worker processes),
  :func:`cached_model`, :func:`tile_ids_hash`, :func:`scores_from_per_image`,
  :func:`evaluate_model`, :func:`splitset.split_subset`.

Scores at one IoU threshold (0.5 in the study) are reported two ways:
``ap_pooled`` (tp / (tp + fp + fn) over the summed counts of all images) and
``ap_mean`` (the per-image AP averaged over images, with ``ap_sd``,
``ap_min``, ``ap_max`` across images). Images where truth and prediction are
both empty have nothing to score and are left out of the per-image statistics,
as in :func:`seglab.evaluate.metrics.evaluate`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings, TrainSettings
from seglab.segment import models
from seglab.core import paths
from seglab.data import splitset
from seglab.segment import output_cache
from seglab.segment import finetuning
from seglab.evaluate import scoring


# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------


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
    ev = scoring.evaluate_masks(split, masks, thresholds=(iou,))
    return scoring.scores_from_per_image(ev.per_image, iou), ev.per_image, masks


# --------------------------------------------------------------------------------------
# E2: label efficiency
# --------------------------------------------------------------------------------------

def check_budgets(manifest: pd.DataFrame, budgets: Sequence[int], repeats: int) -> list[int]:
    """Validate the budgets against the annotated training tiles before any training starts.

    Returns the budgets sorted and de-duplicated. Raises SeglabError naming the
    budget and the number of training tiles (a budget cannot exceed it).
    """
    from seglab.segment import train

    if int(repeats) < 1:
        raise SeglabError(f"repeats={repeats}: need at least one repeat per budget")
    budgets = sorted({int(b) for b in budgets})
    if not budgets:
        raise SeglabError("budgets: empty; give training budgets in tiles, e.g. [2, 5, 10, 20, 30]")
    n_train = len(train.select_training_tiles(manifest, {"variant": "label_budget"}, "train"))
    bad = [b for b in budgets if b < 1 or b > n_train]
    if bad:
        raise SeglabError(f"budgets {bad} are outside 1..{n_train} (the annotated training tiles of this cohort); "
                          f"lower them in params/<profile>/02_label_efficiency.yaml")
    return budgets


def label_budget_jobs(base: str, cohort_dir: str, budgets: Sequence[int], repeats: int, *, training: TrainSettings,
                      cache_dir: str = finetuning.MODEL_CACHE, validate: bool = True) -> list[dict]:
    """The :func:`seglab.segment.finetuning.finetune` arguments of every (budget, repeat), budget-major
    (for :func:`finetune_many`, e.g. together with the generic model). ``validate``: training
    scores its final weights on validation (what ``rescore=False`` reads back)."""
    return [dict(base=base, cohort_dir=cohort_dir, variant="label_budget", training=training, budget=int(b),
                 budget_seed=r, cache_dir=cache_dir, validate=bool(validate))
            for b in budgets for r in range(int(repeats))]


def label_budget_runs(base: str, cohort_dir: str, budgets: Sequence[int], repeats: int, *, training: TrainSettings,
                      val: splitset.SplitSet, mask: MaskSettings, iou: float = 0.5,
                      rescore: bool = True, cache_dir: str = finetuning.MODEL_CACHE, n_jobs: int = 1,
                      threads_per_job: int | None = 1, log: Callable | None = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fine-tune ``base`` on ``budget`` random training tiles, ``repeats`` draws each; score on ``val``.

    Repeat ``r`` draws its tiles with ``budget_seed=r`` (``seglab.segment.train``
    samples the annotated training tiles with that seed); the training seed
    itself stays ``training.seed``, so the spread across repeats is the
    spread due to *which* tiles were annotated. ``n_jobs`` / ``threads_per_job``:
    see :func:`finetune_many`.

    ``rescore`` True segments ``val`` with each model (per-tile scores, any
    settings). False reads the validation AP that training computed on the same
    tiles (:func:`sidecar_val_scores`; default settings only, no per-tile
    table, about a third less CPU per model on the demo machine).

    Returns
    -------
    runs : DataFrame, one row per (budget, repeat): budget, budget_seed,
        n_train_tiles, n_dropped_tiles, train_tiles_hash, train_tile_ids
        (";"-joined), model (path), cached, fit_s, eval_s, then ``SCORE_COLUMNS``.
    per_image : DataFrame, ``Evaluation.per_image`` rows with budget and budget_seed (empty without ``rescore``).
    """
    # rescored here, so training skips its own validation pass
    jobs = label_budget_jobs(base, cohort_dir, budgets, repeats, training=training, cache_dir=cache_dir,
                             validate=not rescore)
    grid = [(j["budget"], j["budget_seed"]) for j in jobs]
    if not rescore:  # before any training: the stored validation AP must mean what the caller asks
        check_training_validation_settings(mask, iou)
    fits = finetuning.finetune_many(jobs, n_jobs=n_jobs, threads_per_job=threads_per_job, log=log)
    if rescore:  # the network passes n_jobs at a time, into the output cache evaluate_model reads
        output_cache.segment_cached_many([dict(model=str(f["path"]), split=val, mask=mask)
                                   for f in fits], n_jobs=n_jobs, threads_per_job=threads_per_job, log=log)
    rows, per = [], []
    for (b, r), fit in zip(grid, fits):
        ids, dropped = finetuning.trained_on(fit["path"])
        t0 = time.monotonic()
        if rescore:
            scores, pi, _ = evaluate_model(fit["path"], val, mask, iou=iou, cached=True)
            per.append(pi.assign(budget=b, budget_seed=r))
        else:
            scores = finetuning.sidecar_val_scores(fit["path"], n_expected=len(val))
        eval_s = round(time.monotonic() - t0, 1)
        rows.append({"budget": b, "budget_seed": r, "n_train_tiles": len(ids),
                     "n_dropped_tiles": len(dropped), "train_tiles_hash": scoring.tile_ids_hash(ids + dropped),
                     "train_tile_ids": ";".join(sorted(ids + dropped)), "model": paths.relative(fit["path"]),
                     "cached": fit["cached"], "fit_s": fit["fit_s"], "eval_s": eval_s, **scores})
        if log is not None:
            log(f"[E2] budget {b} repeat {r}: val AP@{iou:g} pooled {scores['ap_pooled']:.3f}, "
                f"mean over tiles {scores['ap_mean']:.3f}")
    return pd.DataFrame(rows), (pd.concat(per, ignore_index=True) if per else pd.DataFrame())


# what training's own final validation pass used (seglab.segment.train.fit -> evaluate_ap50)
TRAIN_VALIDATION_MASK = MaskSettings()
TRAIN_VALIDATION_IOU = 0.5


def check_training_validation_settings(mask: MaskSettings, iou: float) -> None:
    """Fail unless ``mask`` and ``iou`` are what training's validation pass used, so the AP stored in
    a model's sidecar means what the caller asks (``rescore=False``)."""
    if mask != TRAIN_VALIDATION_MASK or float(iou) != TRAIN_VALIDATION_IOU:
        raise SeglabError(f"rescore=False reads the validation AP that training stored, made at "
                          f"{TRAIN_VALIDATION_MASK.as_dict()} and IoU {TRAIN_VALIDATION_IOU}; these settings "
                          f"({mask.as_dict()}, IoU {iou}) differ: rescore the models (rescore_per_image: true)")


def plot_learning_curve(runs: pd.DataFrame, metrics: Mapping[str, str], *, references: Mapping[str, Mapping[str, float]] | None = None,
                        plateau: Mapping[str, int] | None = None, tolerance: float | None = None,
                        figsize=None):
    """Learning curves, one panel per metric: each repeat as a dot, the mean as a line, min-max shaded, SD bars.

    Parameters
    ----------
    runs : the table of :func:`label_budget_runs`.
    metrics : {column: axis label}, e.g. {"ap_pooled": "val AP@0.5 (pooled)"}.
    references : {column: {label: value}} drawn as horizontal lines (baseline, full-data model).
    plateau : {column: budget} marked with a vertical line.
    tolerance : the plateau tolerance (AP), shown in the legend.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    metrics = dict(metrics)
    fig = Figure(figsize=figsize or (5.2 * len(metrics), 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    styles = [("tab:gray", "--"), ("tab:green", ":"), ("tab:purple", "-.")]
    for ax, (col, label) in zip(axes, metrics.items()):
        s = scoring.curve_summary(runs, col)
        x = s["budget"].to_numpy(float)
        ax.fill_between(x, s["min"], s["max"], color="tab:blue", alpha=0.15, lw=0, label="min-max over repeats")
        ax.errorbar(x, s["mean"], yerr=s["sd"], color="tab:blue", marker="o", capsize=3,
                    label="mean +- SD over repeats")
        rng = np.random.default_rng(0)  # jitter only; deterministic figure
        ax.scatter(runs["budget"] * np.exp(rng.uniform(-0.04, 0.04, len(runs))), runs[col], s=12, color="k",
                   alpha=0.6, zorder=3, lw=0, label="one repeat")
        for (name, value), (c, ls) in zip((references or {}).get(col, {}).items(), styles):
            if value is not None and np.isfinite(value):
                ax.axhline(value, color=c, ls=ls, lw=1.5, label=f"{name}: {value:.3f}")
        if plateau and col in plateau:
            tol = f" (within {tolerance:g} AP of the best mean)" if tolerance is not None else ""
            ax.axvline(plateau[col], color="tab:red", lw=1, alpha=0.7, label=f"plateau: {plateau[col]} tiles{tol}")
        ax.set_xscale("log")
        ax.set_xticks(x, [str(int(b)) for b in x])
        ax.minorticks_off()
        ax.set_xlabel("annotated training tiles (budget)")
        ax.set_ylabel(label)
        # zoom on the data and the reference lines (AP differences of a few points matter here)
        vals = np.concatenate([runs[col].to_numpy(float),
                               [v for v in (references or {}).get(col, {}).values() if v is not None]])
        vals = vals[np.isfinite(vals)]
        lo = max(0.0, float(vals.min()) - 0.15) if len(vals) else 0.0
        ax.set_ylim(lo, min(1.0, float(vals.max()) + 0.05) if len(vals) else 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return fig


# --------------------------------------------------------------------------------------
# E6: leave one marker out
# --------------------------------------------------------------------------------------

def lomo_markers(manifest: pd.DataFrame, markers: Sequence[str] | None = None) -> list[str]:
    """The markers to hold out: ``markers`` (checked against the cohort) or, if empty/None, every
    marker with annotated tiles in train and test."""
    ann = manifest[manifest["annotated"].astype(bool)]
    usable = sorted(set(ann.loc[ann["split"] == "train", "marker"]) & set(ann.loc[ann["split"] == "test", "marker"]))
    if not markers:
        if len(usable) < 2:
            raise SeglabError(f"leave-one-marker-out needs at least two markers with annotated train and test tiles "
                              f"(have {usable})")
        return usable
    bad = [m for m in markers if m not in usable]
    if bad:
        raise SeglabError(f"markers {bad} have no annotated train and test tiles in this cohort "
                          f"(usable: {', '.join(usable)}); fix 'markers' in params/<profile>/06_leave_one_marker_out.yaml")
    return list(dict.fromkeys(str(m) for m in markers))


def lomo_jobs(base: str, cohort_dir: str, markers: Sequence[str], *, training: TrainSettings,
              cache_dir: str = finetuning.MODEL_CACHE) -> list[dict]:
    """The :func:`seglab.segment.finetuning.finetune` arguments of each held-out marker's model (for :func:`finetune_many`).

    E6 scores these models on the held-out marker's tiles only, so training skips its final
    validation pass (over the other markers' validation tiles)."""
    return [dict(base=base, cohort_dir=cohort_dir, variant="leave_one_marker_out", training=training,
                 markers=[m], cache_dir=cache_dir, validate=False) for m in markers]


def finetune_lomo(base: str, cohort_dir: str, markers: Sequence[str], *, training: TrainSettings,
                  cache_dir: str = finetuning.MODEL_CACHE, n_jobs: int = 1, threads_per_job: int | None = 1,
                  log: Callable | None = print) -> pd.DataFrame:
    """Fine-tune ``base`` once per marker with that marker's tiles left out (train and validation).

    Returns one row per held-out marker: marker, model (path), n_train_tiles,
    train_tiles_hash, cached, fit_s. Checks that no training tile carries the
    held-out marker (it would be a leak). ``n_jobs`` / ``threads_per_job``: see :func:`finetune_many`.
    """
    from seglab.data import manifest as data

    manifest = data.cohort_manifest(paths.resolve(cohort_dir))
    marker_of = dict(zip(manifest["tile_id"].astype(str), manifest["marker"].astype(str)))
    jobs = lomo_jobs(base, cohort_dir, markers, training=training, cache_dir=cache_dir)
    rows = []
    for m, fit in zip(markers, finetuning.finetune_many(jobs, n_jobs=n_jobs, threads_per_job=threads_per_job, log=log)):
        path = fit["path"]
        ids, dropped = finetuning.trained_on(path)
        leaked = [t for t in ids if marker_of.get(t) == m]
        if leaked:
            raise SeglabError(f"leave-one-marker-out model {path} was trained on {len(leaked)} tiles of the held-out "
                              f"marker {m} (e.g. {leaked[0]}); delete the folder and rerun")
        rows.append({"marker": m, "model": paths.relative(path), "n_train_tiles": len(ids), "n_dropped_tiles": len(dropped),
                     "train_tiles_hash": scoring.tile_ids_hash(ids + dropped), "cached": fit["cached"],
                     "fit_s": fit["fit_s"]})
    return pd.DataFrame(rows)


def evaluate_lomo(lomo: pd.DataFrame, references: Mapping[str, object], split: splitset.SplitSet,
                  mask: MaskSettings, *, iou: float = 0.5,
                  before: Callable[[str, dict], object] | None = None, n_jobs: int = 1,
                  threads_per_job: int | None = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score each held-out marker's model on that marker's tiles of ``split``, and the reference models there too.

    Parameters
    ----------
    lomo : the table of :func:`finetune_lomo` (marker, model).
    references : {name: model spec / path / Model}, e.g. {"baseline": "generalist",
        "generic": path}; each runs once over all tiles of the held-out markers.
    split : the tiles to score (validation or test).
    before : called as ``before(name, config)`` right before each model's tiles
        are scored, e.g. ``run.record_test_evaluation`` for the test split.
    n_jobs, threads_per_job : network passes run at once in worker processes
        (:func:`seglab.segment.output_cache.segment_cached_many`). The outputs go through the cache of
        :func:`seglab.segment.output_cache.segment_cached`, so the references reuse notebook 01's
        passes over the same tiles.

    Returns
    -------
    table : one row per (marker, model) with model in ("lomo", *references):
        marker, model, then ``SCORE_COLUMNS``.
    per_image : ``Evaluation.per_image`` rows with a ``model`` column.
    """
    markers = list(lomo["marker"])
    held = splitset.split_subset(split, markers)
    settings = {**mask.as_dict(), "iou": iou}
    subs = {str(r["marker"]): splitset.split_subset(held, [r["marker"]]) for _, r in lomo.iterrows()}
    output_cache.segment_cached_many(
        [dict(model=str(paths.resolve(r["model"])), split=subs[str(r["marker"])], mask=mask) for _, r in lomo.iterrows()]
        + [dict(model=str(spec) if isinstance(spec, Path) else spec, split=held, mask=mask)
           for spec in references.values()], n_jobs=n_jobs, threads_per_job=threads_per_job, log=None)
    rows, per = [], []
    for _, r in lomo.iterrows():
        sub = subs[str(r["marker"])]
        if before is not None:
            before(f"lomo_{r['marker']}", {"model": r["model"], "held_out_marker": r["marker"], **settings})
        scores, pi, _ = evaluate_model(paths.resolve(r["model"]), sub, mask, iou=iou, cached=True)
        rows.append({"marker": r["marker"], "model": "lomo", **scores})
        per.append(pi.assign(model="lomo"))
    for name, spec in references.items():
        if before is not None:
            before(name, {"model": spec if isinstance(spec, str) else str(getattr(spec, "spec", spec)),
                          "markers": markers, **settings})
        _, pi, _ = evaluate_model(str(spec) if isinstance(spec, Path) else spec, held, mask, iou=iou, cached=True)
        per.append(pi.assign(model=name))
        for m in markers:
            rows.append({"marker": m, "model": name, **scoring.scores_from_per_image(pi[pi["marker"] == m], iou)})
    return pd.DataFrame(rows), pd.concat(per, ignore_index=True)


def plot_marker_bars(table: pd.DataFrame, per_image: pd.DataFrame | None = None, *, metric: str = "ap_pooled",
                     models_order: Sequence[str] | None = None, labels: Mapping[str, str] | None = None,
                     ylabel: str = "AP@0.5", iou: float = 0.5, figsize=None):
    """Grouped bars: one group per marker, one bar per model (``metric``); per-image AP as dots.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    order = list(models_order or dict.fromkeys(table["model"]))
    labels = dict(labels or {})
    markers = list(dict.fromkeys(table["marker"]))
    fig = Figure(figsize=figsize or (max(6.5, 1.5 + 0.6 * len(markers) * max(1, len(order))), 4.5),
                 layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(order))
    colors = ["#bdbdbd", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8"]
    rng = np.random.default_rng(0)
    for j, name in enumerate(order):
        vals = [table.loc[(table["marker"] == m) & (table["model"] == name), metric] for m in markers]
        heights = [float(v.iloc[0]) if len(v) else np.nan for v in vals]
        pos = np.arange(len(markers)) + (j - (len(order) - 1) / 2) * width
        bars = ax.bar(pos, heights, width=width * 0.95, color=colors[j % len(colors)], edgecolor="k", lw=0.5,
                      label=labels.get(name, name))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        if per_image is not None:
            sub = per_image[(per_image["model"] == name) & np.isclose(per_image["threshold"], iou)]
            for p, m in zip(pos, markers):
                v = sub.loc[sub["marker"] == m, "ap"].to_numpy(float)
                ax.scatter(p + rng.uniform(-width / 4, width / 4, len(v)), v, s=7, color="k", alpha=0.6, lw=0, zorder=3)
    ax.set_xticks(np.arange(len(markers)), markers)
    ax.set_xlabel("held-out marker (its tiles only)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=1, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    return fig
