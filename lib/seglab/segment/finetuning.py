"""Fine-tunes kept in a content-addressed cache (``data/models/<variant>-<key>/``), run one or many at once.

A fine-tune is named by what decides its weights: the ``seglab train`` config
(:func:`finetune_config`: base, cohort, variant, markers or budget, and the
:class:`~seglab.config.settings.TrainSettings`), the bytes of its training and validation
tiles, and the base model's identity. So the same variant asked for by two notebooks, or
by a Slurm prepare array and then the notebook, is trained once; an interrupted one
resumes from its checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from seglab import SeglabError
from seglab.config.params import params_hash
from seglab.config.settings import TrainSettings
from seglab.core import io, paths, workers
from seglab.data import manifest as data
from seglab.evaluate import scoring
from seglab.segment import models

MODEL_CACHE = "data/models"


def _training_files_hash(cohort_dir: str, cfg: dict) -> str:
    """sha256 over the files (DAPI, marker, mask) of the tiles this config trains and validates on."""
    from seglab.segment import train

    manifest = data.cohort_manifest(paths.resolve(cohort_dir))
    rows = pd.concat([train.select_training_tiles(manifest, cfg, "train"),
                      train.select_training_tiles(manifest, {**cfg, "budget": None}, "val")])
    digest = []
    for _, r in rows.iterrows():
        for key in ("dapi_path", "marker_path", "mask_path"):
            digest.append(f"{r['tile_id']}:{key}:{io.sha256_file(r[key])}")
    return io.sha256_text("\n".join(digest))


def finetune_config(base: str, cohort_dir: str, variant: str, training: TrainSettings,
                    markers: Sequence[str] | None = None, budget: int | None = None, budget_seed: int = 0) -> dict:
    """The ``seglab train`` config of one fine-tune (what its cache key hashes, with the tiles and base)."""
    cfg = {"model": base, "cohort_dir": str(cohort_dir), "variant": variant, **training.cache_fields()}
    if markers:
        cfg["markers"] = list(markers)
    if budget is not None:
        cfg["budget"], cfg["budget_seed"] = int(budget), int(budget_seed)
    return cfg


def model_dir(base: str, cohort_dir: str, variant: str = "generic", *, training: TrainSettings,
              markers: Sequence[str] | None = None, budget: int | None = None, budget_seed: int = 0,
              cache_dir: str = MODEL_CACHE) -> Path:
    """The content-addressed folder :func:`finetune` trains into for these arguments (nothing is trained).

    The name hashes the training config, the files of the training and
    validation tiles, and the base model's identity (:func:`seglab.segment.models.model_id`: the
    sha256 of its weights, so another file stored under the same name is another folder).
    """
    cfg = finetune_config(base, cohort_dir, variant, training, markers, budget, budget_seed)
    key = params_hash({"cfg": cfg, "tiles": _training_files_hash(cohort_dir, cfg), "base": models.model_id(base)})
    return paths.resolve(cache_dir) / f"{variant}-{key[:16]}"


def finished_model(folder: Path) -> Path | None:
    """``folder/model.pt`` when training there finished (weights and sidecar present), else None."""
    done = Path(folder) / "model.pt"
    return done if done.is_file() and done.with_suffix(".pt.json").is_file() else None


def finetune(base: str, cohort_dir: str, variant: str = "generic", *, training: TrainSettings,
             markers: Sequence[str] | None = None, budget: int | None = None, budget_seed: int = 0,
             cache_dir: str = MODEL_CACHE, validate: bool = True, progress: bool = False, log=print) -> Path:
    """Fine-tune ``base`` on the cohort's annotated training tiles; returns the checkpoint path.

    Parameters
    ----------
    base : model spec to start from (``generalist``, ``cpsam``, a checkpoint path).
    cohort_dir : cohort folder (relative to the project root or absolute).
    variant : generic, marker_specific, marker_only, label_budget, leave_one_marker_out.
    training : :class:`~seglab.config.settings.TrainSettings` (epochs, learning rate, crops, seed, ...).
    markers, budget, budget_seed : as in ``seglab.segment.train.train_from_params``.
    cache_dir : parent of the content-addressed model folders (:func:`model_dir`); a
        finished model there is reused, an interrupted one resumes from its checkpoint.
    validate : score the final weights on the validation tiles into the sidecar
        (``seglab.segment.train.fit``'s ``final_validation``). Not part of the cache key: the
        weights are the same either way, so a model cached without it stays without it.
    """
    from seglab.segment import train

    cfg = finetune_config(base, cohort_dir, variant, training, markers, budget, budget_seed)
    out_dir = model_dir(base, cohort_dir, variant, training=training, markers=markers, budget=budget,
                        budget_seed=budget_seed, cache_dir=cache_dir)
    done = finished_model(out_dir)
    if done is not None:
        log(f"[finetuning] {variant}: reusing {paths.relative(out_dir)}")
        return done
    log(f"[finetuning] {variant}: fine-tuning {base} -> {out_dir}")
    return Path(train.train_from_params({**cfg, "out_dir": str(out_dir), "final_validation": bool(validate)},
                                        source=f"finetune({variant})", progress=progress))


def model_record(path: Path) -> dict:
    """What a run records about a checkpoint it used: path, sha256 and its sidecar's key fields."""
    from seglab.segment import models

    side = models.read_sidecar(path)
    keep = ("base_spec", "variant", "markers", "budget", "budget_seed", "train_tiles_hash", "n_train", "commit")
    return {"path": str(path), "sha256": io.sha256_file(path), **{k: side.get(k) for k in keep if k in side}}


def _finetune_logged(log, **kwargs) -> tuple[Path, bool, float]:
    """finetune, plus whether it reused a cached model and how long it took (s)."""
    said: list[str] = []

    def capture(msg):
        said.append(str(msg))
        if log is not None:
            log(msg)

    t0 = time.monotonic()
    path = finetune(log=capture, **kwargs)
    return Path(path), any("reusing" in m for m in said), round(time.monotonic() - t0, 1)


def cached_model(base: str, cohort_dir: str, variant: str = "generic", *, training: TrainSettings,
                 markers: Sequence[str] | None = None, budget: int | None = None, budget_seed: int = 0,
                 cache_dir: str = MODEL_CACHE, validate: bool = True) -> Path | None:
    """The finished checkpoint :func:`finetune` would reuse for these arguments, or None,
    without training anything, so that a batch of fine-tunes can skip starting worker
    processes when every model is cached. (``validate`` is accepted and ignored: it is not part
    of the cache key.)"""
    return finished_model(model_dir(base, cohort_dir, variant, training=training,
                                                markers=markers, budget=budget, budget_seed=budget_seed,
                                                cache_dir=cache_dir))


def _worker_finetune(job: dict) -> tuple[str, bool, float]:
    path, cached, fit_s = _finetune_logged(None, **job)
    return str(path), cached, fit_s


def finetune_many(jobs: Sequence[dict], *, n_jobs: int = 1, threads_per_job: int | None = 1,
                  log: Callable | None = print) -> list[dict]:
    """Run :func:`finetune` for each job (a dict of its keyword arguments), ``n_jobs`` at a time.

    Cached models are picked up first, in this process. The rest train in
    ``n_jobs`` worker processes (spawned; each with ``threads_per_job`` torch
    threads): tiny nets on a small CPU train faster as two one-thread
    processes than as one two-thread process. With ``n_jobs`` 1 they train here,
    one after the other (the choice on a GPU). Results do not depend on
    ``n_jobs``: each model is its own seeded, deterministic training run.

    Returns
    -------
    list of {"path": Path, "cached": bool, "fit_s": float}, in the order of ``jobs``.
    """
    from concurrent.futures import as_completed

    if int(n_jobs) < 1:
        raise SeglabError(f"n_jobs={n_jobs}: need at least 1 (parallel fine-tunes)")
    results: list = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        found = cached_model(**job)
        if found is not None:
            results[i] = {"path": found, "cached": True, "fit_s": 0.0}
            if log is not None:
                log(f"[finetuning] {job.get('variant', 'generic')}: reusing {paths.relative(found.parent)}")
        else:
            todo.append(i)
    if int(n_jobs) == 1 or len(todo) <= 1:
        for i in todo:
            path, cached, fit_s = _finetune_logged(log, **jobs[i])
            results[i] = {"path": path, "cached": cached, "fit_s": fit_s}
        return results
    if log is not None:
        log(f"[finetuning] fine-tuning {len(todo)} models, {min(int(n_jobs), len(todo))} at a time")
    with workers.worker_pool(min(int(n_jobs), len(todo)), threads_per_job) as pool:
        futures = {pool.submit(_worker_finetune, dict(jobs[i])): i for i in todo}
        for f in as_completed(futures):
            i = futures[f]
            path, cached, fit_s = f.result()
            results[i] = {"path": Path(path), "cached": cached, "fit_s": fit_s}
            if log is not None:
                job = jobs[i]
                what = ", ".join(f"{k} {job[k]}" for k in ("markers", "budget", "budget_seed") if job.get(k) is not None)
                log(f"[finetuning] {job.get('variant', 'generic')} ({what}) trained in {fit_s} s -> {paths.relative(Path(path).parent)}")
    return results


def trained_on(path: Path) -> tuple[list[str], list[str]]:
    """(tile ids the checkpoint was trained on, tile ids dropped for too few objects), from its sidecar."""
    side = models.read_sidecar(path)
    return [str(t) for t in side.get("train_tiles") or []], [str(t) for t in side.get("dropped_tiles") or []]


def reference_job(base: str, cohort_dir: str, *, training: TrainSettings, cache_dir: str = MODEL_CACHE) -> dict:
    """The :func:`finetune` arguments of the full-data generic model, the reference of
    E2 and E6 (the same cache entry as E1's generic model and E5's fine-tuned one)."""
    return dict(base=base, cohort_dir=cohort_dir, variant="generic", training=training, cache_dir=cache_dir)


def sidecar_val_scores(path: Path, n_expected: int | None = None) -> dict:
    """The validation AP@0.5 that ``seglab.segment.train.fit`` computed at the end of training (its sidecar).

    fit scores the final weights on the run's validation tiles with the default mask settings at
    IoU 0.5 (``seglab.experiments.e2_label_efficiency.TRAIN_VALIDATION_MASK``); reading it back saves a second
    pass over the validation tiles. Only ``ap_pooled``, ``ap_mean`` and
    ``n_images`` are known (and the counts ``tp``/``fp``/``fn`` where stored); the rest is NaN.
    """
    m = (models.read_sidecar(path).get("metrics") or {})
    if "val_ap50_pooled" not in m:
        raise SeglabError(f"{path}: its sidecar has no validation AP (trained without validation tiles?); "
                          "rescore the models (rescore_per_image: true)")
    n = int(m.get("val_n_images", 0))
    if n_expected is not None and n != n_expected:
        raise SeglabError(f"{path}: training scored {n} validation tiles, the notebook's validation split has "
                          f"{n_expected}; rescore the models (rescore_per_image: true)")
    out = {k: float("nan") for k in scoring.SCORE_COLUMNS}
    out.update(ap_pooled=float(m["val_ap50_pooled"]), ap_mean=float(m["val_ap50_mean"]), n_images=n)
    return out
