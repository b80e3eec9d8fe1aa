"""E2 label efficiency: how many annotated tiles does fine-tuning need?

Annotating tiles is the expensive part of fine-tuning. E2 fine-tunes the off-the-shelf model
(``baseline_model``) on **budgets** of annotated training tiles, each budget drawn ``repeats``
times at random (repeat ``r`` draws with ``budget_seed=r``; the training seed and every other
training setting stay the shared ones), and scores every model on the **validation** split at
IoU 0.5. Two reference lines frame the curve: the baseline without fine-tuning and the generic
model fine-tuned on all training tiles (E1's model, reused from ``data/models/``). The
**plateau** is the smallest budget whose mean AP is within ``plateau_tolerance_ap`` of the best
budget's mean; **by the interval** (:func:`budget_claims`), the smallest budget whose 95% t
interval over donors of (budget - all tiles) stays above ``-plateau_tolerance_ap``. E2 selects
nothing and never touches the test split.

Steps, in the notebook's order
------------------------------
1. :func:`design`: the budgets (checked against the cohort), the validation split and the number
   of annotated training tiles.
2. :func:`train_models`: every (budget, repeat) fine-tune and the full-data reference, through the
   content-addressed model cache (what :func:`work_items` lists for a Slurm prepare array).
3. :func:`score_references`: validation scores of the baseline and the generic model
   (``val_references.csv``; the network passes come from the output cache E1 filled).
4. :func:`score_budgets`: one row per (budget, repeat) with its tiles and validation scores
   (``budget_runs.csv``, per-tile ``val_per_image.csv``).
5. :func:`learning_curve`, :func:`plateaus`, :func:`reference_lines`: the curve over repeats
   (``learning_curve.csv``) and what its figure draws; :func:`marker_curve` per marker
   (``learning_curve_per_marker.csv``).
6. :func:`budget_claims`: each budget (its draws' counts averaged per tile) vs all tiles and vs
   the baseline, paired per tile with the interval over donors (``val_claims.csv``), and
   :func:`~seglab.evaluate.scoring.plateau_budget_ci`, the plateau by the interval.
7. :func:`headline`: the run's ``summary.json`` numbers (``val_ap50_budget_<b>_mean`` ...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings, TrainSettings
from seglab.core import paths
from seglab.data import splitset
from seglab.evaluate import claims, scoring
from seglab.experiments.items import Item, finetune_item, reference_generic
from seglab.segment import finetuning, output_cache

IOU = 0.5   # every score of E2 is AP at this IoU threshold
# the two learning-curve panels: summary column of a budget run -> axis label
CURVE_METRICS = {"ap_pooled": "validation AP@0.5 (pooled over tiles)",
                 "ap_mean": "validation AP@0.5 (mean over tiles)"}
# the columns of the reference and budget tables the notebook shows
REFERENCE_COLUMNS = ["model", "ap_pooled", "ap_mean", "ap_sd", "precision", "recall", "f1", "n_images"]
RUN_COLUMNS = ["budget", "budget_seed", "n_train_tiles", "train_tiles_hash", "cached", "fit_s",
               "ap_pooled", "ap_mean", "ap_sd", "ap_min", "ap_max"]

# what training's own final validation pass used (seglab.segment.train.fit -> evaluate_ap50)
TRAIN_VALIDATION_MASK = MaskSettings()
TRAIN_VALIDATION_IOU = 0.5


# --------------------------------------------------------------------------- budgets and jobs


def check_budgets(manifest: pd.DataFrame, budgets: Sequence[int], repeats: int) -> list[int]:
    """Validate the budgets against the annotated training tiles before any training starts.

    Returns the budgets sorted and de-duplicated. Raises SeglabError naming the
    budget and the number of training tiles (a budget cannot exceed it).
    """
    if int(repeats) < 1:
        raise SeglabError(f"repeats={repeats}: need at least one repeat per budget")
    budgets = sorted({int(b) for b in budgets})
    if not budgets:
        raise SeglabError("budgets: empty; give training budgets in tiles, e.g. [2, 5, 10, 20, 30]")
    n_train = n_training_tiles(manifest)
    bad = [b for b in budgets if b < 1 or b > n_train]
    if bad:
        raise SeglabError(f"budgets {bad} are outside 1..{n_train} (the annotated training tiles of this cohort); "
                          f"lower them in params/<profile>/02_label_efficiency.yaml")
    return budgets


def n_training_tiles(manifest: pd.DataFrame) -> int:
    """The annotated training tiles a budget is drawn from (what training samples with ``budget``)."""
    from seglab.segment import train

    return len(train.select_training_tiles(manifest, {"variant": "label_budget"}, "train"))


def preflight(params: dict, cohort: Callable[[], pd.DataFrame | None]) -> None:
    """Before the notebook starts (:func:`seglab.experiments.preflight`): every budget at most the
    cohort's annotated training tiles, when ``cohort()`` gives the cohort (else the notebook's first
    step would fail, in a run folder). Raises ParamConflict."""
    from seglab.experiments import ParamConflict

    manifest = cohort()
    if manifest is None:
        return
    n_train = n_training_tiles(manifest)
    too_big = sorted({int(b) for b in params["budgets"] if int(b) > n_train})
    if too_big:
        which = f"budgets {too_big} are" if len(too_big) > 1 else f"budget {too_big[0]} is"
        raise ParamConflict("budgets", f"{params['budgets']}: {which} larger than the {n_train} annotated training "
                            f"tiles of cohort {params['cohort_dir']}", f"give budgets of at most {n_train}")


def budgets_of(params: dict) -> list[int]:
    """The budgets of ``params``, checked against the cohort when it exists (sorted, unique)."""
    from seglab.data import manifest as data

    cohort = paths.resolve(params["cohort_dir"])
    if (cohort / "tiles").is_dir():   # checked against the cohort as the notebook does: a bad budget fails now
        return check_budgets(data.cohort_manifest(cohort), params["budgets"], params["repeats"])
    return sorted({int(b) for b in params["budgets"]})   # the same order check_budgets gives


def label_budget_jobs(base: str, cohort_dir: str, budgets: Sequence[int], repeats: int, *, training: TrainSettings,
                      cache_dir: str = finetuning.MODEL_CACHE, validate: bool = True) -> list[dict]:
    """The :func:`seglab.segment.finetuning.finetune` arguments of every (budget, repeat), budget-major
    (for :func:`~seglab.segment.finetuning.finetune_many`, e.g. together with the generic model).
    ``validate``: training scores its final weights on validation (what ``rescore=False`` reads back)."""
    return [dict(base=base, cohort_dir=cohort_dir, variant="label_budget", training=training, budget=int(b),
                 budget_seed=r, cache_dir=cache_dir, validate=bool(validate))
            for b in budgets for r in range(int(repeats))]


def finetune_jobs(params: dict, budgets: Sequence[int]) -> list[dict]:
    """Every fine-tune of E2 as ``finetune`` arguments: each (budget, repeat), budget-major, then the
    full-data generic reference when ``reference_full_data``. The notebook (:func:`train_models`)
    and the Slurm prepare array (:func:`work_items`) both train exactly these.

    Models that the notebook rescores (``rescore_per_image``) skip training's own validation
    pass; otherwise training stores the validation AP that :func:`score_budgets` reads back.
    """
    jobs = label_budget_jobs(params["baseline_model"], params["cohort_dir"], budgets, int(params["repeats"]),
                             training=TrainSettings.from_params(params),
                             validate=not params.get("rescore_per_image", True))
    if params.get("reference_full_data"):
        jobs.append(reference_generic(params))
    return jobs


def work_items(params: dict) -> list[Item]:
    """E2's fine-tunes as prepare items (:func:`finetune_jobs`): every (budget, repeat), then the
    full-data reference."""
    return [finetune_item(f"budget={j['budget']} repeat={j['budget_seed']}" if j["variant"] == "label_budget"
                          else "reference=finetuned_generic", j)
            for j in finetune_jobs(params, budgets_of(params))]


# --------------------------------------------------------------------------- steps of the notebook


@dataclass
class Design:
    """What E2 trains and scores on.

    budgets : training budgets in annotated tiles, sorted, unique, checked against the cohort.
    repeats : random draws of tiles per budget.
    val : the annotated validation tiles (every model is scored on all of them).
    n_train_tiles : annotated training tiles of the cohort (the generic model's budget).
    """

    budgets: list[int]
    repeats: int
    val: splitset.SplitSet
    n_train_tiles: int

    def describe(self) -> str:
        return (f"budgets {self.budgets} x {self.repeats} repeats = {len(self.budgets) * self.repeats} fine-tunes; "
                f"{self.n_train_tiles} annotated training tiles; {len(self.val)} validation tiles")


def design(params: dict) -> Design:
    """Step 1: the budgets (failing now when one exceeds the annotated training tiles, or when
    ``rescore_per_image: false`` meets mask settings training's validation pass did not use), the
    validation split and the number of annotated training tiles of ``params['cohort_dir']``."""
    from seglab.data import manifest as data

    if not params["rescore_per_image"]:   # fail now, not in step 4 after every model has trained
        check_training_validation_settings(MaskSettings.from_params(params), IOU)
    manifest = data.cohort_manifest(paths.resolve(params["cohort_dir"]))
    budgets = check_budgets(manifest, params["budgets"], params["repeats"])
    n_train = int((manifest["annotated"] & (manifest["split"] == "train")).sum())
    return Design(budgets=budgets, repeats=int(params["repeats"]), val=splitset.annotated_split(manifest, "val"),
                  n_train_tiles=n_train)


@dataclass
class Trained:
    """The fine-tunes of one run, as :func:`~seglab.segment.finetuning.finetune_many` returned them.

    budget_fits : one {"path", "cached", "fit_s"} per (budget, repeat), budget-major.
    reference : the same for the full-data generic model (None without ``reference_full_data``).
    wall_s : wall-clock time of the whole batch (s).
    """

    budget_fits: list[dict]
    reference: dict | None
    wall_s: float

    @property
    def n_trained(self) -> int:
        """Models trained by this run (not found in the cache), the reference included."""
        fits = self.budget_fits + ([self.reference] if self.reference else [])
        return int(sum(not f["cached"] for f in fits))

    def describe(self) -> str:
        n = len(self.budget_fits) + (self.reference is not None)
        return f"{self.n_trained} of {n} models trained in {self.wall_s} s"


def train_models(params: dict, budgets: Sequence[int], log: Callable | None = print) -> Trained:
    """Step 2: train what the model cache lacks of :func:`finetune_jobs`, ``n_jobs`` at a time
    (``torch_threads`` torch threads each); cached models (the generic one normally comes from E1,
    the rest from a prepare array) are reused."""
    jobs = finetune_jobs(params, budgets)
    t0 = time.monotonic()
    fits = finetuning.finetune_many(jobs, n_jobs=params["n_jobs"], threads_per_job=params["torch_threads"] or 1,
                                    log=log)
    wall_s = round(time.monotonic() - t0, 1)
    with_reference = bool(params.get("reference_full_data"))
    return Trained(budget_fits=fits[:len(fits) - with_reference], reference=fits[-1] if with_reference else None,
                   wall_s=wall_s)


@dataclass
class References:
    """The reference lines of the curve, scored on the validation split.

    scores : {"baseline": scores, "finetuned_generic": scores + n_train_tiles} (``SCORE_COLUMNS``).
    table : one row per reference model (``val_references.csv``).
    generic_record : :func:`~seglab.segment.finetuning.model_record` of the generic model, or None.
    per_image : ``Evaluation.per_image`` rows at IoU 0.5 of the reference models with a ``model``
        column (``val_references_per_image.csv``; what :func:`budget_claims` pairs the budgets with).
    """

    scores: dict
    table: pd.DataFrame
    generic_record: dict | None
    per_image: pd.DataFrame = field(default_factory=pd.DataFrame)


def score_references(params: dict, design: Design, trained: Trained, mask: MaskSettings) -> References:
    """Step 3: the baseline and (with ``reference_full_data``) the generic model on validation at IoU 0.5.

    Both go through the network-output cache, so E1's passes over the same tiles are reused.
    The generic model's row carries ``n_train_tiles`` (all annotated training tiles), the
    budget it stands for on the curve.
    """
    baseline, baseline_tiles, _ = scoring.evaluate_model(params["baseline_model"], design.val, mask, iou=IOU,
                                                         cached=True)
    scores, per_image, record = {"baseline": baseline}, [baseline_tiles.assign(model="baseline")], None
    if trained.reference is not None:
        path = trained.reference["path"]
        generic, generic_tiles, _ = scoring.evaluate_model(path, design.val, mask, iou=IOU, cached=True)
        scores["finetuned_generic"] = {**generic, "n_train_tiles": design.n_train_tiles}
        per_image.append(generic_tiles.assign(model="finetuned_generic"))
        record = finetuning.model_record(path)
    table = pd.DataFrame([{"model": k, **v} for k, v in scores.items()])
    return References(scores=scores, table=table, generic_record=record,
                      per_image=pd.concat(per_image, ignore_index=True))


def score_budgets(params: dict, design: Design, trained: Trained, mask: MaskSettings,
                  log: Callable | None = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 4: every (budget, repeat) model on validation (:func:`label_budget_runs`), with
    ``cached`` and ``fit_s`` as step 2 recorded them (here every model is found in the cache).

    Returns (runs, per_image): see :func:`label_budget_runs`.
    """
    runs, per_image = label_budget_runs(
        params["baseline_model"], params["cohort_dir"], design.budgets, design.repeats,
        training=TrainSettings.from_params(params), val=design.val, mask=mask, iou=IOU,
        rescore=params["rescore_per_image"], n_jobs=params["n_jobs"],
        threads_per_job=params["torch_threads"] or 1, log=log)
    runs["cached"] = [f["cached"] for f in trained.budget_fits]
    runs["fit_s"] = [f["fit_s"] for f in trained.budget_fits]
    return runs, per_image


def learning_curve(runs: pd.DataFrame) -> pd.DataFrame:
    """Step 5: per metric of :data:`CURVE_METRICS` and budget: n_repeats, mean, sd, min, max over the
    repeats (:func:`~seglab.evaluate.scoring.curve_summary`), stacked (``learning_curve.csv``)."""
    return pd.concat([scoring.curve_summary(runs, m) for m in CURVE_METRICS], ignore_index=True)


def plateaus(curve: pd.DataFrame, tolerance_ap: float) -> dict[str, int]:
    """{metric: plateau budget}: per curve, the smallest budget whose mean is within ``tolerance_ap``
    (AP) of the best budget's mean (:func:`~seglab.evaluate.scoring.plateau_budget`)."""
    return {m: scoring.plateau_budget(curve[curve["metric"] == m], tolerance_ap) for m in CURVE_METRICS}


def describe_plateau(curve: pd.DataFrame, plateau: Mapping[str, int], tolerance_ap: float) -> str:
    """One sentence: the plateau budgets and the best budget's mean pooled AP."""
    best = curve[curve["metric"] == "ap_pooled"].sort_values("mean").iloc[-1]
    return (f"plateau (pooled AP): {plateau['ap_pooled']} tiles, within {tolerance_ap} AP of the best mean "
            f"{best['mean']:.3f} (budget {int(best['budget'])}); per-tile mean: {plateau['ap_mean']} tiles")


def reference_lines(references: References, n_train_tiles: int) -> dict[str, dict[str, float]]:
    """{metric: {legend label: value}}: the reference models as horizontal lines of each curve panel."""
    label = {"baseline": "baseline (no fine-tuning)", "finetuned_generic": f"fine-tuned on all {n_train_tiles} tiles"}
    return {m: {label[k]: v[m] for k, v in references.scores.items()} for m in CURVE_METRICS}


def marker_curve(per_image: pd.DataFrame, iou: float = IOU) -> pd.DataFrame:
    """Per marker and budget: mean, min and max over the repeats of the AP pooled over that marker's
    validation tiles (``learning_curve_per_marker.csv``).

    ``per_image``: the per-tile table of :func:`score_budgets` (rows per tile, threshold, budget and
    budget_seed with tp, fp, fn); pooled AP = tp / (tp + fp + fn) of the summed counts (0 without objects).
    """
    at = per_image[np.isclose(per_image["threshold"], iou)]
    pooled = at.groupby(["budget", "budget_seed", "marker"])[["tp", "fp", "fn"]].sum().reset_index()
    pooled["ap_pooled"] = pooled["tp"] / (pooled["tp"] + pooled["fp"] + pooled["fn"]).clip(lower=1)
    return pooled.groupby(["marker", "budget"])["ap_pooled"].agg(["mean", "min", "max"]).reset_index()


REFERENCES = ("finetuned_generic", "baseline")   # what each budget is compared with, in this order


def budget_name(budget: int) -> str:
    """``budget_12``: a budget as a segmentation of :func:`budget_claims` (and in summary keys)."""
    return f"budget_{int(budget)}"


def mean_over_draws(per_image: pd.DataFrame) -> pd.DataFrame:
    """Per budget, tile and IoU threshold: tp, fp, fn averaged over the budget's draws (float
    counts; tp + fn, the true objects, stays the tile's), with ``model`` = :func:`budget_name`.
    The budget is then one segmentation whose pooled AP is about the mean over its draws.

    ``per_image``: :func:`score_budgets`' per-tile rows (budget, budget_seed, image, donor, threshold, tp, fp, fn).
    """
    keys = ["budget", "image", "donor", "threshold"]
    out = per_image.groupby(keys, sort=True)[["tp", "fp", "fn"]].mean().reset_index()
    return out.assign(model=[budget_name(b) for b in out["budget"]])


def budget_claims(per_image: pd.DataFrame, references: References, **options) -> pd.DataFrame:
    """Step 6: each budget B vs each reference A of :data:`REFERENCES` that was scored (the generic
    model fine-tuned on all tiles, the baseline): the paired difference B - A on the validation tiles
    in pooled ap, f1, precision, recall at IoU 0.5 with its interval over donors and p-value
    (:func:`seglab.evaluate.claims.compare_pairs`), the budget's draws averaged per tile
    (:func:`mean_over_draws`); a ``budget`` column. The interval is over validation tiles and
    donors for these draws; the spread between draws is the learning curve's.

    Empty (no rows) without per-tile scores (``rescore_per_image: false``).
    ``options``: :func:`seglab.evaluate.claims.compare`'s.
    """
    if per_image.empty or references.per_image.empty:
        return pd.DataFrame(columns=[*claims.TABLE_COLUMNS, "budget"])
    budgets = mean_over_draws(per_image)
    refs = references.per_image[["model", "image", "donor", "threshold", "tp", "fp", "fn"]]
    long = pd.concat([refs, budgets.drop(columns="budget")], ignore_index=True)
    pairs = [(ref, budget_name(b)) for b in sorted(budgets["budget"].unique()) for ref in REFERENCES
             if ref in set(refs["model"])]
    table = claims.compare_pairs(long, pairs, missing="nan", thresholds=(IOU,), **options)
    return table.assign(budget=[int(str(b).rsplit("_", 1)[1]) for b in table["b"]])


def plateau_by_interval(table: pd.DataFrame, tolerance_ap: float) -> int | None:
    """The plateau by the interval (:func:`~seglab.evaluate.scoring.plateau_budget_ci`) of
    :func:`budget_claims`' table: the smallest budget whose interval of (budget - all tiles) stays
    above ``-tolerance_ap``; None without the generic reference or per-tile scores, or when no
    budget qualifies."""
    return None if table.empty else scoring.plateau_budget_ci(table, tolerance_ap, threshold=IOU)


def describe_plateau_ci(table: pd.DataFrame, tolerance_ap: float) -> str:
    """One sentence: the plateau by the interval, or why there is none."""
    if table.empty:
        return "no plateau by the interval: no per-tile scores (rescore_per_image: false)"
    if "finetuned_generic" not in set(table["a"]):
        return "no plateau by the interval: no model fine-tuned on all tiles (reference_full_data: false)"
    found = plateau_by_interval(table, tolerance_ap)
    rule = f"the {claims.interval_label(table)} of (budget - all tiles) above -{tolerance_ap:g} AP"
    return (f"plateau by the interval: {found} tiles, the smallest budget with {rule}" if found is not None
            else f"no plateau by the interval: no budget has {rule}")


def claim_numbers(table: pd.DataFrame, tolerance_ap: float) -> dict:
    """Summary keys of :func:`budget_claims` at AP@0.5 (:func:`seglab.evaluate.claims.claim_summary`):
    per budget b and reference r, ``val_ap50_diff_budget_<b>_vs_<r>`` with ``_ci_low``, ``_ci_high``,
    ``_p_value``, ``_n_donors`` (``_note`` under 3 donors) beside the flag ``budget_<b>_beats_<r>``;
    ``plateau_budget_ci`` (:func:`plateau_by_interval`, None when no budget qualifies) and
    ``claims_interval``. Empty without per-tile scores."""
    if table.empty:
        return {}
    numbers = {}
    for a, b in dict.fromkeys(zip(table["a"], table["b"])):
        numbers.update(claims.claim_summary(table, a, b, prefix="val_ap50", threshold=IOU))
    return {**numbers, "plateau_budget_ci": plateau_by_interval(table, tolerance_ap),
            "claims_interval": claims.interval_label(table)}


def headline(curve: pd.DataFrame, plateau: Mapping[str, int], tolerance_ap: float, references: References,
             runs: pd.DataFrame, trained: Trained, claims_table: pd.DataFrame | None = None) -> dict:
    """Step 6: the run's summary numbers.

    ``val_ap50_budget_<b>_mean`` / ``_sd``: pooled validation AP@0.5 at budget b, mean and SD over
    draws; ``val_ap50img_budget_<b>_mean``: the mean over tiles; ``plateau_budget`` (pooled) and
    ``plateau_budget_img`` (mean over tiles) with ``plateau_tolerance_ap``; the reference lines
    ``val_ap50_baseline`` and ``val_ap50_finetuned_generic`` (None without it); ``n_models``,
    ``n_models_trained`` (not found in the cache, the reference included) and ``fit_wall_s`` (s);
    with ``claims_table`` (:func:`budget_claims`) the keys of :func:`claim_numbers`, among them
    ``plateau_budget_ci``, the plateau by the interval. AP values are rounded to 4 decimals.
    """
    pooled = curve[curve["metric"] == "ap_pooled"].set_index("budget")
    img = curve[curve["metric"] == "ap_mean"].set_index("budget")
    numbers = {}
    for b in pooled.index:
        numbers[f"val_ap50_budget_{b}_mean"] = round(float(pooled.loc[b, "mean"]), 4)
        numbers[f"val_ap50_budget_{b}_sd"] = round(float(pooled.loc[b, "sd"]), 4)
        numbers[f"val_ap50img_budget_{b}_mean"] = round(float(img.loc[b, "mean"]), 4)
    generic = references.scores.get("finetuned_generic")
    return {**numbers, "plateau_budget": int(plateau["ap_pooled"]), "plateau_budget_img": int(plateau["ap_mean"]),
            "plateau_tolerance_ap": tolerance_ap,
            "val_ap50_baseline": round(references.scores["baseline"]["ap_pooled"], 4),
            "val_ap50_finetuned_generic": None if generic is None else round(generic["ap_pooled"], 4),
            "n_models": int(len(runs)), "n_models_trained": trained.n_trained, "fit_wall_s": trained.wall_s,
            **(claim_numbers(claims_table, tolerance_ap) if claims_table is not None else {})}


# --------------------------------------------------------------------------- the budget loop


def check_training_validation_settings(mask: MaskSettings, iou: float) -> None:
    """Fail unless ``mask`` and ``iou`` are what training's validation pass used, so the AP stored in
    a model's sidecar means what the caller asks (``rescore=False``)."""
    if mask != TRAIN_VALIDATION_MASK or float(iou) != TRAIN_VALIDATION_IOU:
        raise SeglabError(f"rescore=False reads the validation AP that training stored, made at "
                          f"{TRAIN_VALIDATION_MASK.as_dict()} and IoU {TRAIN_VALIDATION_IOU}; these settings "
                          f"({mask.as_dict()}, IoU {iou}) differ: rescore the models (rescore_per_image: true)")


def label_budget_runs(base: str, cohort_dir: str, budgets: Sequence[int], repeats: int, *, training: TrainSettings,
                      val: splitset.SplitSet, mask: MaskSettings, iou: float = 0.5,
                      rescore: bool = True, cache_dir: str = finetuning.MODEL_CACHE, n_jobs: int = 1,
                      threads_per_job: int | None = 1, log: Callable | None = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fine-tune ``base`` on ``budget`` random training tiles, ``repeats`` draws each; score on ``val``.

    Repeat ``r`` draws its tiles with ``budget_seed=r`` (``seglab.segment.train``
    samples the annotated training tiles with that seed); the training seed
    itself stays ``training.seed``, so the spread across repeats is the
    spread due to *which* tiles were annotated. ``n_jobs`` / ``threads_per_job``:
    see :func:`~seglab.segment.finetuning.finetune_many`.

    ``rescore`` True segments ``val`` with each model (per-tile scores, any
    settings). False reads the validation AP that training computed on the same
    tiles (:func:`~seglab.segment.finetuning.sidecar_val_scores`; default settings only, no per-tile
    table, about a third less CPU per model on the demo machine).

    Returns
    -------
    runs : DataFrame, one row per (budget, repeat): budget, budget_seed,
        n_train_tiles, n_dropped_tiles, train_tiles_hash, train_tile_ids
        (";"-joined), model (path), cached, fit_s, eval_s (s), then ``SCORE_COLUMNS``.
    per_image : DataFrame, ``Evaluation.per_image`` rows with budget and budget_seed (empty without ``rescore``).
    """
    # rescored here, so training skips its own validation pass
    jobs = label_budget_jobs(base, cohort_dir, budgets, repeats, training=training, cache_dir=cache_dir,
                             validate=not rescore)
    if not rescore:  # before any training: the stored validation AP must mean what the caller asks
        check_training_validation_settings(mask, iou)
    fits = finetuning.finetune_many(jobs, n_jobs=n_jobs, threads_per_job=threads_per_job, log=log)
    if rescore:  # the network passes n_jobs at a time, into the output cache evaluate_model reads
        output_cache.segment_cached_many([dict(model=str(f["path"]), split=val, mask=mask) for f in fits],
                                         n_jobs=n_jobs, threads_per_job=threads_per_job, log=log)
    rows, per = [], []
    for job, fit in zip(jobs, fits):
        row, per_image = _budget_run(job, fit, val, mask, iou, rescore)
        rows.append(row)
        if per_image is not None:
            per.append(per_image)
        if log is not None:
            log(f"[E2] budget {row['budget']} repeat {row['budget_seed']}: val AP@{iou:g} pooled "
                f"{row['ap_pooled']:.3f}, mean over tiles {row['ap_mean']:.3f}")
    return pd.DataFrame(rows), (pd.concat(per, ignore_index=True) if per else pd.DataFrame())


def _budget_run(job: dict, fit: dict, val: splitset.SplitSet, mask: MaskSettings, iou: float,
                rescore: bool) -> tuple[dict, pd.DataFrame | None]:
    """One row of :func:`label_budget_runs` and its per-tile scores (None without ``rescore``)."""
    b, r = job["budget"], job["budget_seed"]
    ids, dropped = finetuning.trained_on(fit["path"])
    t0 = time.monotonic()
    per_image = None
    if rescore:
        scores, per_image, _ = scoring.evaluate_model(fit["path"], val, mask, iou=iou, cached=True)
        per_image = per_image.assign(budget=b, budget_seed=r)
    else:
        scores = finetuning.sidecar_val_scores(fit["path"], n_expected=len(val))
    eval_s = round(time.monotonic() - t0, 1)
    row = {"budget": b, "budget_seed": r, "n_train_tiles": len(ids),
           "n_dropped_tiles": len(dropped), "train_tiles_hash": scoring.tile_ids_hash(ids + dropped),
           "train_tile_ids": ";".join(sorted(ids + dropped)), "model": paths.relative(fit["path"]),
           "cached": fit["cached"], "fit_s": fit["fit_s"], "eval_s": eval_s, **scores}
    return row, per_image
