"""E6 leave-one-marker-out: does fine-tuning generalise to a marker it never saw?

Users will meet markers that no annotation covers. For each held-out marker m, E6 fine-tunes the
off-the-shelf model (``baseline_model``) on the annotated training tiles of **every other marker**
(variant ``leave_one_marker_out``: m's tiles are left out of training and of the training run's
validation) and scores it on **m's tiles only**, at IoU 0.5, with the shared default mask
settings (nothing is selected). Two references run on the same tiles: the generic model
fine-tuned on all markers (E1's model, from ``data/models/``) and the baseline without
fine-tuning. The **gap** AP(generic) - AP(leave-one-out) on m's tiles is what not annotating m
costs; near 0, the other markers' annotations transfer. Validation is reported beside test; the
test split is evaluated once per model and recorded in the run's manifest.

Steps, in the notebook's order
------------------------------
1. :func:`design`: the held-out markers and their validation and test tiles.
2. :func:`train_models`: one fine-tune per held-out marker plus the generic reference, through the
   content-addressed model cache (what :func:`work_items` lists for a Slurm prepare array), with
   the check that no training tile carries the held-out marker (``lomo_models.csv``,
   :func:`model_records` for ``models.json``).
3. :func:`score_split` (:func:`evaluate_lomo`) on validation, then on test (``val_scores.csv``, ``test_scores.csv`` and
   their per-tile tables); :func:`~seglab.evaluate.scoring.gap_table` and :func:`marker_gaps` give
   the gaps per marker (``test_gaps.csv``).
4. :func:`marker_claims`: per held-out marker (and over all of them), the gap generic - leave-one-out
   and the gain leave-one-out - baseline as paired differences with their 95% t interval over donors
   (:mod:`seglab.evaluate.claims`; ``test_claims.csv``).
5. :func:`headline`: the run's ``summary.json`` numbers (``test_ap50_<model>_<marker>`` ...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings, TrainSettings
from seglab.core import paths
from seglab.data import splitset
from seglab.evaluate import claims, scoring
from seglab.experiments.items import Item, ItemsUnknown, finetune_item, reference_generic
from seglab.segment import finetuning, output_cache

IOU = 0.5   # every score of E6 is AP at this IoU threshold
MODELS = ("lomo", "generic", "baseline")   # the models of the summary, per held-out marker
MODEL_LABELS = {"baseline": "baseline (no fine-tuning)", "generic": "fine-tuned generic (all markers)",
                "lomo": "fine-tuned without the held-out marker"}


# --------------------------------------------------------------------------- markers and jobs


def usable_markers(manifest: pd.DataFrame) -> list[str]:
    """The markers with annotated tiles in train and in test (those that can be held out), sorted."""
    ann = manifest[manifest["annotated"].astype(bool)]
    return sorted(set(ann.loc[ann["split"] == "train", "marker"]) & set(ann.loc[ann["split"] == "test", "marker"]))


def preflight(params: dict, cohort: Callable[[], pd.DataFrame | None]) -> None:
    """Before the notebook starts (:func:`seglab.experiments.preflight`): with the cohort built, each
    of ``lomo_markers`` has annotated train and test tiles there, or (``[]``) at least two markers
    have (what the notebook's first step checks). Raises ParamConflict."""
    from seglab.experiments import ParamConflict

    manifest = cohort()
    if manifest is None:
        return
    usable = usable_markers(manifest)
    wanted = params.get("lomo_markers") or []
    bad = [m for m in wanted if m not in usable]
    if bad:
        raise ParamConflict("lomo_markers", f"{wanted}: {bad} have no annotated train and test tiles in cohort "
                            f"{params['cohort_dir']} (usable: {', '.join(usable)})", "hold out usable markers only")
    if not wanted and len(usable) < 2:
        raise ParamConflict("lomo_markers", f"[] holds out every usable marker, but cohort {params['cohort_dir']} "
                            f"has {len(usable)} ({', '.join(usable) or 'none'})",
                            "leave-one-marker-out needs at least two: use a cohort with more annotated markers")


def lomo_markers(manifest: pd.DataFrame, markers: Sequence[str] | None = None) -> list[str]:
    """The markers to hold out: ``markers`` (checked against the cohort) or, if empty/None, every
    marker with annotated tiles in train and test."""
    usable = usable_markers(manifest)
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


def markers_of(params: dict) -> list[str]:
    """The held-out markers of ``params`` (``lomo_markers``, or every marker of the cohort when empty)."""
    from seglab.data import manifest as data

    cohort = paths.resolve(params["cohort_dir"])
    if not (cohort / "tiles").is_dir():
        if params.get("lomo_markers"):
            return list(dict.fromkeys(str(m) for m in params["lomo_markers"]))
        raise ItemsUnknown(f"06_leave_one_marker_out: lomo_markers is [] (every marker of the cohort) and the "
                           f"cohort {params['cohort_dir']} does not exist yet; run 00_data first")
    return lomo_markers(data.cohort_manifest(cohort), params.get("lomo_markers"))


def lomo_jobs(base: str, cohort_dir: str, markers: Sequence[str], *, training: TrainSettings,
              cache_dir: str = finetuning.MODEL_CACHE) -> list[dict]:
    """The :func:`seglab.segment.finetuning.finetune` arguments of each held-out marker's model
    (for :func:`~seglab.segment.finetuning.finetune_many`).

    E6 scores these models on the held-out marker's tiles only, so training skips its final
    validation pass (over the other markers' validation tiles)."""
    return [dict(base=base, cohort_dir=cohort_dir, variant="leave_one_marker_out", training=training,
                 markers=[m], cache_dir=cache_dir, validate=False) for m in markers]


def finetune_jobs(params: dict, markers: Sequence[str]) -> list[dict]:
    """Every fine-tune of E6 as ``finetune`` arguments: one per held-out marker, then the full-data
    generic reference. The notebook (:func:`train_models`) and the Slurm prepare array
    (:func:`work_items`) both train exactly these."""
    return lomo_jobs(params["baseline_model"], params["cohort_dir"], markers,
                     training=TrainSettings.from_params(params)) + [reference_generic(params)]


def items_need_upstream(params: dict) -> bool:
    """``lomo_markers: []`` means every marker of the cohort: the items need 00_data's cohort to be listed."""
    return not params.get("lomo_markers")


def work_items(params: dict) -> list[Item]:
    """E6's fine-tunes as prepare items (:func:`finetune_jobs`): one per held-out marker, then the
    full-data reference."""
    return [finetune_item(f"held_out={j['markers'][0]}" if j["variant"] == "leave_one_marker_out"
                          else "reference=finetuned_generic", j)
            for j in finetune_jobs(params, markers_of(params))]


# --------------------------------------------------------------------------- steps of the notebook


@dataclass
class Design:
    """What E6 holds out and scores on.

    markers : the held-out markers, in the order of the params (or sorted when all).
    val, test : the annotated validation and test tiles of those markers.
    """

    markers: list[str]
    val: splitset.SplitSet
    test: splitset.SplitSet

    def describe(self) -> str:
        return f"held-out markers: {self.markers}; validation tiles {len(self.val)}, test tiles {len(self.test)}"


def design(params: dict) -> Design:
    """Step 1: the held-out markers of ``params`` (checked against the cohort) and their
    validation and test tiles."""
    from seglab.data import manifest as data

    manifest = data.cohort_manifest(paths.resolve(params["cohort_dir"]))
    markers = lomo_markers(manifest, params["lomo_markers"])
    return Design(markers=markers,
                  val=splitset.split_subset(splitset.annotated_split(manifest, "val"), markers),
                  test=splitset.split_subset(splitset.annotated_split(manifest, "test"), markers))


@dataclass
class Trained:
    """The fine-tunes of one run.

    lomo : one row per held-out marker (:func:`lomo_table`): marker, model (path), n_train_tiles,
        n_dropped_tiles, train_tiles_hash, cached, fit_s (s).
    generic : the generic reference model's checkpoint.
    n_trained : models trained by this run (not found in the cache), the reference included.
    wall_s : wall-clock time of the whole batch (s).
    """

    lomo: pd.DataFrame
    generic: Path
    n_trained: int
    wall_s: float

    def references(self, baseline_model: str) -> dict:
        """{name: model} scored beside the leave-one-out models: the generic model, then the baseline."""
        return {"generic": str(self.generic), "baseline": baseline_model}


def train_models(params: dict, markers: Sequence[str], log: Callable | None = print) -> Trained:
    """Step 2: train what the model cache lacks of :func:`finetune_jobs`, ``n_jobs`` at a time
    (``torch_threads`` torch threads each; the generic model normally comes from E1), and check
    that no leave-one-out model saw its held-out marker."""
    from seglab.data import manifest as data

    t0 = time.monotonic()
    fits = finetuning.finetune_many(finetune_jobs(params, markers), n_jobs=params["n_jobs"],
                                    threads_per_job=params["torch_threads"] or 1, log=log)
    wall_s = round(time.monotonic() - t0, 1)
    manifest = data.cohort_manifest(paths.resolve(params["cohort_dir"]))
    return Trained(lomo=lomo_table(markers, fits[:-1], manifest), generic=fits[-1]["path"],
                   n_trained=int(sum(not f["cached"] for f in fits)), wall_s=wall_s)


def lomo_table(markers: Sequence[str], fits: Sequence[dict], manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per held-out marker from its fit ({"path", "cached", "fit_s"}): marker, model (path
    relative to the project), n_train_tiles, n_dropped_tiles, train_tiles_hash, cached, fit_s.

    Raises SeglabError when a model's training tiles include one of its held-out marker (a leak).
    """
    marker_of = dict(zip(manifest["tile_id"].astype(str), manifest["marker"].astype(str)))
    rows = []
    for m, fit in zip(markers, fits):
        path = fit["path"]
        ids, dropped = finetuning.trained_on(path)
        leaked = [t for t in ids if marker_of.get(t) == m]
        if leaked:
            raise SeglabError(f"leave-one-marker-out model {path} was trained on {len(leaked)} tiles of the held-out "
                              f"marker {m} (e.g. {leaked[0]}); delete the folder and rerun")
        rows.append({"marker": m, "model": paths.relative(path), "n_train_tiles": len(ids),
                     "n_dropped_tiles": len(dropped), "train_tiles_hash": scoring.tile_ids_hash(ids + dropped),
                     "cached": fit["cached"], "fit_s": fit["fit_s"]})
    return pd.DataFrame(rows)


def finetune_lomo(base: str, cohort_dir: str, markers: Sequence[str], *, training: TrainSettings,
                  cache_dir: str = finetuning.MODEL_CACHE, n_jobs: int = 1, threads_per_job: int | None = 1,
                  log: Callable | None = print) -> pd.DataFrame:
    """Fine-tune ``base`` once per marker with that marker's tiles left out (train and validation).

    Returns :func:`lomo_table` (checked for leaks). ``n_jobs`` / ``threads_per_job``: see
    :func:`~seglab.segment.finetuning.finetune_many`.
    """
    from seglab.data import manifest as data

    jobs = lomo_jobs(base, cohort_dir, markers, training=training, cache_dir=cache_dir)
    fits = finetuning.finetune_many(jobs, n_jobs=n_jobs, threads_per_job=threads_per_job, log=log)
    return lomo_table(markers, fits, data.cohort_manifest(paths.resolve(cohort_dir)))


def model_records(trained: Trained) -> dict:
    """What ``models.json`` records: {"generic": record, "lomo_<marker>": record, ...}
    (:func:`~seglab.segment.finetuning.model_record`: path, sha256, sidecar fields)."""
    records = {"generic": finetuning.model_record(trained.generic)}
    for marker, model in zip(trained.lomo["marker"], trained.lomo["model"]):
        records[f"lomo_{marker}"] = finetuning.model_record(paths.resolve(model))
    return records


def evaluate_lomo(lomo: pd.DataFrame, references: Mapping[str, object], split: splitset.SplitSet,
                  mask: MaskSettings, *, iou: float = IOU,
                  before: Callable[[str, dict], object] | None = None, n_jobs: int = 1,
                  threads_per_job: int | None = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score each held-out marker's model on that marker's tiles of ``split``, and the reference models there too.

    Parameters
    ----------
    lomo : the table of :func:`lomo_table` (marker, model).
    references : {name: model spec / path / Model}, e.g. {"generic": path, "baseline": "generalist"};
        each runs once over all tiles of the held-out markers.
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
    subs = {str(m): splitset.split_subset(held, [m]) for m in markers}
    output_cache.segment_cached_many(
        [dict(model=str(paths.resolve(r["model"])), split=subs[str(r["marker"])], mask=mask) for _, r in lomo.iterrows()]
        + [dict(model=_spec(spec), split=held, mask=mask) for spec in references.values()],
        n_jobs=n_jobs, threads_per_job=threads_per_job, log=None)
    rows, per = [], []
    for _, r in lomo.iterrows():
        if before is not None:
            before(f"lomo_{r['marker']}", {"model": r["model"], "held_out_marker": r["marker"], **settings})
        scores, pi, _ = scoring.evaluate_model(paths.resolve(r["model"]), subs[str(r["marker"])], mask, iou=iou,
                                               cached=True)
        rows.append({"marker": r["marker"], "model": "lomo", **scores})
        per.append(pi.assign(model="lomo"))
    for name, spec in references.items():
        if before is not None:
            before(name, {"model": spec if isinstance(spec, str) else str(getattr(spec, "spec", spec)),
                          "markers": markers, **settings})
        _, pi, _ = scoring.evaluate_model(_spec(spec), held, mask, iou=iou, cached=True)
        per.append(pi.assign(model=name))
        for m in markers:
            rows.append({"marker": m, "model": name, **scoring.scores_from_per_image(pi[pi["marker"] == m], iou)})
    return pd.DataFrame(rows), pd.concat(per, ignore_index=True)


def score_split(params: dict, trained: Trained, split: splitset.SplitSet, mask: MaskSettings,
                before: Callable[[str, dict], object] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 3: :func:`evaluate_lomo` of the run's models on ``split`` (validation or test) at IoU 0.5:
    each leave-one-out model on its held-out marker's tiles, then the generic model and the baseline
    (:meth:`Trained.references`) on every held-out marker's tiles, ``n_jobs`` network passes at once
    (``torch_threads`` threads each). ``before``: e.g. ``run.record_test_evaluation`` for test."""
    return evaluate_lomo(trained.lomo, trained.references(params["baseline_model"]), split, mask, iou=IOU,
                         before=before, n_jobs=params["n_jobs"], threads_per_job=params["torch_threads"] or 1)


def _spec(model):
    """A model as ``models.load`` and the output cache take it: a path as a string, anything else as is."""
    return str(model) if isinstance(model, Path) else model


def marker_gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Per held-out marker (``test_gaps.csv``): pooled AP of each model, ``gap_generic_minus_lomo``
    (what not annotating the marker costs) and ``gap_baseline_minus_lomo`` (what fine-tuning on the
    other markers gains over the baseline when negative), from :func:`evaluate_lomo`'s table."""
    gaps = scoring.gap_table(table)
    return gaps.merge(scoring.gap_table(table, reference="baseline")[["marker", "gap_baseline_minus_lomo"]],
                      on="marker")


# (A, B) of each claim per held-out marker, B - A: what holding the marker out costs (generic - lomo,
# the gap of marker_gaps) and what fine-tuning on the other markers gains (lomo - baseline)
CLAIM_PAIRS = (("lomo", "generic"), ("baseline", "lomo"))
ALL_MARKERS = "all"   # the marker column of the claims pooled over every held-out marker's tiles


def marker_claims(per_image: pd.DataFrame, markers: Sequence[str], **options) -> pd.DataFrame:
    """Per held-out marker, on its tiles: :data:`CLAIM_PAIRS` as paired differences B - A in pooled
    ap, f1, precision, recall with interval and p-value (:func:`seglab.evaluate.claims.compare_pairs`;
    NaN rows where a model has no tiles), with a ``marker`` column; then the same over the tiles of
    every held-out marker (marker :data:`ALL_MARKERS`; each tile scored by its own marker's
    leave-one-out model). A ``label`` column names each row for the figure ("neun: generic - lomo").

    ``per_image``: :func:`evaluate_lomo`'s per-tile rows (model in lomo, generic, baseline; marker,
    donor, image, threshold, tp, fp, fn). ``options``: :func:`seglab.evaluate.claims.compare`'s.
    """
    subsets = [(m, per_image[per_image["marker"] == m]) for m in markers] + [(ALL_MARKERS, per_image)]
    options = {"thresholds": (IOU,), **options}   # a marker without tiles still gets its (NaN) rows at IoU 0.5
    table = pd.concat([claims.compare_pairs(sub, CLAIM_PAIRS, missing="nan", **options).assign(marker=m)
                       for m, sub in subsets], ignore_index=True)
    return table.assign(label=[f"{m}: {b} - {a}" for m, a, b in zip(table["marker"], table["a"], table["b"])])


def claim_numbers(claims_table: pd.DataFrame) -> dict:
    """Summary keys of :func:`marker_claims` at AP@0.5 (:func:`seglab.evaluate.claims.claim_summary`):
    per marker m (and ``all``) ``test_ap50_diff_generic_vs_lomo_<m>`` (the gap) and
    ``test_ap50_diff_lomo_vs_baseline_<m>``, each with ``_ci_low``, ``_ci_high``, ``_p_value``,
    ``_n_donors`` (``_note`` under 3 donors), beside the flags ``generic_beats_lomo_<m>`` (holding m
    out costs) and ``lomo_beats_baseline_<m>``; ``claims_interval``."""
    numbers = {}
    for m in dict.fromkeys(claims_table["marker"]):
        sub = claims_table[claims_table["marker"] == m]
        for a, b in CLAIM_PAIRS:
            numbers.update(claims.claim_summary(sub, a, b, prefix="test_ap50", suffix=f"_{claims.slug(m)}",
                                                threshold=IOU))
    return {**numbers, "claims_interval": claims.interval_label(claims_table)}


def headline(markers: Sequence[str], test_table: pd.DataFrame, gaps: pd.DataFrame, val_gaps: pd.DataFrame,
             trained: Trained, claims_table: pd.DataFrame | None = None) -> dict:
    """The run's summary numbers.

    ``test_ap50_<model>_<marker>`` for model in lomo, generic, baseline: pooled test AP@0.5 on the
    marker's test tiles; ``test_ap50_<model>_mean``: their mean over markers;
    ``test_ap50_gap_mean`` / ``_max``: mean and max over markers of generic minus leave-one-out
    (positive: the held-out marker's annotations matter); ``val_ap50_gap_mean``: the same mean on
    validation; ``n_markers``, ``n_models_trained``, ``fit_wall_s`` (s); with ``claims_table``
    (:func:`marker_claims`) the claims of :func:`claim_numbers`. AP values are rounded to 4 decimals.
    """
    wide = test_table.pivot(index="marker", columns="model", values="ap_pooled")
    numbers = {}
    for m in markers:
        for name in MODELS:
            numbers[f"test_ap50_{name}_{m}"] = round(float(wide.loc[m, name]), 4)
    for name in MODELS:
        numbers[f"test_ap50_{name}_mean"] = round(float(wide[name].mean()), 4)
    return {**numbers,
            "test_ap50_gap_mean": round(float(gaps["gap_generic_minus_lomo"].mean()), 4),
            "test_ap50_gap_max": round(float(gaps["gap_generic_minus_lomo"].max()), 4),
            "val_ap50_gap_mean": round(float(val_gaps["gap_generic_minus_lomo"].mean()), 4),
            "n_markers": len(markers), "n_models_trained": trained.n_trained, "fit_wall_s": trained.wall_s,
            **(claim_numbers(claims_table) if claims_table is not None else {})}
