"""TODO docstring"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings, TrainSettings
from seglab.core import paths
from seglab.data import splitset
from seglab.evaluate import scoring
from seglab.experiments.items import Item, ItemsUnknown, finetune_item, reference_generic
from seglab.segment import finetuning, output_cache


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
        scores, pi, _ = scoring.evaluate_model(paths.resolve(r["model"]), sub, mask, iou=iou, cached=True)
        rows.append({"marker": r["marker"], "model": "lomo", **scores})
        per.append(pi.assign(model="lomo"))
    for name, spec in references.items():
        if before is not None:
            before(name, {"model": spec if isinstance(spec, str) else str(getattr(spec, "spec", spec)),
                          "markers": markers, **settings})
        _, pi, _ = scoring.evaluate_model(str(spec) if isinstance(spec, Path) else spec, held, mask, iou=iou, cached=True)
        per.append(pi.assign(model=name))
        for m in markers:
            rows.append({"marker": m, "model": name, **scoring.scores_from_per_image(pi[pi["marker"] == m], iou)})
    return pd.DataFrame(rows), pd.concat(per, ignore_index=True)


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


def items_need_upstream(params: dict) -> bool:
    """``lomo_markers: []`` means every marker of the cohort: the items need 00_data's cohort to be listed."""
    return not params.get("lomo_markers")


def work_items(params: dict) -> list[Item]:
    """E6's fine-tunes as prepare items: one per held-out marker, then the full-data reference."""

    markers = markers_of(params)
    jobs = lomo_jobs(params["baseline_model"], params["cohort_dir"], markers,
                                training=TrainSettings.from_params(params))
    items = [finetune_item(f"held_out={j['markers'][0]}", j) for j in jobs]
    items.append(finetune_item("reference=finetuned_generic", reference_generic(params)))
    return items
