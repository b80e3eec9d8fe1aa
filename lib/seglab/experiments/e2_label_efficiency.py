"""TODO docstring"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings, TrainSettings
from seglab.core import paths
from seglab.data import splitset
from seglab.evaluate import scoring
from seglab.experiments.items import Item, finetune_item, reference_generic
from seglab.segment import finetuning, output_cache


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
            scores, pi, _ = scoring.evaluate_model(fit["path"], val, mask, iou=iou, cached=True)
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


def budgets_of(params: dict) -> list[int]:
    """The budgets of ``params``, checked against the cohort when it exists (sorted, unique)."""
    from seglab.data import manifest as data

    cohort = paths.resolve(params["cohort_dir"])
    if (cohort / "tiles").is_dir():   # checked against the cohort as the notebook does: a bad budget fails now
        return check_budgets(data.cohort_manifest(cohort), params["budgets"], params["repeats"])
    return sorted({int(b) for b in params["budgets"]})   # the same order check_budgets gives


def work_items(params: dict) -> list[Item]:
    """E2's fine-tunes as prepare items: every (budget, repeat), then the full-data reference."""

    budgets = budgets_of(params)
    repeats = int(params["repeats"])
    jobs = label_budget_jobs(params["baseline_model"], params["cohort_dir"], budgets, repeats,
                                        training=TrainSettings.from_params(params))
    items = [finetune_item(f"budget={j['budget']} repeat={j['budget_seed']}", j) for j in jobs]
    if params.get("reference_full_data"):
        items.append(finetune_item("reference=finetuned_generic", reference_generic(params)))
    return items
