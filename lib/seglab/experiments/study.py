"""Building blocks of the study's notebooks (E1-E6): splits, cached fine-tuning, sweeps, selection.

Notebooks 01-06 tell the story and draw the figures; the loops over tiles,
models and settings live here so that every notebook uses the same code.

- :func:`annotated_split` loads the annotated tiles of one split as
  ``[DAPI, marker]`` images (2, Y, X) float32 and their instance masks (Y, X).
- :func:`finetune` fine-tunes one variant through ``seglab.segment.train`` into a
  content-addressed folder under ``data/models/``: the folder name is a hash
  of the training config and of the training tiles' files, so a rerun with
  the same inputs reuses the finished model (the weights would be identical,
  training is deterministic on the CPU) and an interrupted one resumes from
  its last checkpoint.
- :func:`segment_split` runs the network once per tile and keeps its outputs
  (flows, cell probability); :func:`threshold_sweep` rebuilds masks from those
  outputs for each (flow_threshold, cellprob_threshold), so a sweep never
  reruns the network.
- :func:`select_best` picks a setting on validation; the notebook then
  evaluates the test split once with it (``RunContext.record_test_evaluation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.data import manifest as data
from seglab.core import io
from seglab.evaluate import metrics
from seglab.core import paths
from seglab.config.params import params_hash

MODEL_CACHE = "data/models"


@dataclass
class SplitSet:
    """The annotated tiles of one split, in tile_id order.

    rows : manifest rows; images : (2, Y, X) float32 [DAPI, marker]; masks : (Y, X) labels.
    """

    split: str
    rows: pd.DataFrame
    images: list
    masks: list

    @property
    def names(self) -> list[str]:
        return list(self.rows["tile_id"])

    @property
    def groups(self) -> pd.DataFrame:
        """image, marker, donor: the grouping ``metrics.evaluate`` reports per group."""
        return pd.DataFrame({"image": self.names, "marker": list(self.rows["marker"]),
                             "donor": [str(d) for d in self.rows["donor"]]})

    def __len__(self) -> int:
        return len(self.rows)


def annotated_split(manifest: pd.DataFrame, split: str, markers: Sequence[str] | None = None,
                    zero_dapi: bool = False) -> SplitSet:
    """The annotated tiles of ``split`` (optionally only ``markers``); ``zero_dapi`` blanks channel 0."""
    rows = manifest[manifest["annotated"].astype(bool) & (manifest["split"] == split)]
    if markers:
        rows = rows[rows["marker"].isin(list(markers))]
    rows = rows.sort_values("tile_id").reset_index(drop=True)
    if rows.empty:
        raise SeglabError(f"no annotated tiles in split '{split}'" + (f" for markers {list(markers)}" if markers else "")
                          + "; check the cohort's donor_splits.yaml and annotated.csv")
    images, masks = [], []
    for _, r in rows.iterrows():
        x = data.load_tile(r)
        if zero_dapi:
            x = x.copy()
            x[0] = 0.0
        images.append(x)
        masks.append(data.load_mask(r))
    return SplitSet(split=split, rows=rows, images=images, masks=masks)


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


def _base_model_hash(base: str) -> str:
    from seglab.segment import models

    if base == "generalist":
        return io.sha256_file(models.GENERALIST_PATH) if models.GENERALIST_PATH.is_file() else "missing"
    p = paths.resolve(base)
    return io.sha256_file(p) if p.is_file() else base


TRAIN_PARAM_KEYS = ("epochs", "learning_rate", "weight_decay", "batch_size", "bsize", "nimg_per_epoch", "seed")


def train_params(params: dict) -> dict:
    """The fine-tuning keys of a notebook's params (the shared block of params/<profile>/defaults.yaml).

    Every notebook passes exactly these to :func:`finetune`, so the same
    variant trained by two notebooks hits the same cache folder.
    """
    missing = [k for k in TRAIN_PARAM_KEYS if k not in params]
    if missing:
        raise SeglabError(f"train_params: params lack {missing}; declare them in the notebook's schema "
                          "(the shared block) and set them in params/<profile>/defaults.yaml")
    out = {k: params[k] for k in TRAIN_PARAM_KEYS}
    if out["nimg_per_epoch"] is None:
        del out["nimg_per_epoch"]
    return out


def _finetune_config(base, cohort_dir, variant, train_params, markers, budget, budget_seed) -> dict:
    cfg = {"model": base, "cohort_dir": str(cohort_dir), "variant": variant, **train_params}
    if markers:
        cfg["markers"] = list(markers)
    if budget is not None:
        cfg["budget"], cfg["budget_seed"] = int(budget), int(budget_seed)
    return cfg


def model_dir(base: str, cohort_dir: str, variant: str = "generic", *, train_params: dict,
              markers: Sequence[str] | None = None, budget: int | None = None, budget_seed: int = 0,
              cache_dir: str = MODEL_CACHE) -> Path:
    """The content-addressed folder :func:`finetune` trains into for these arguments (nothing is trained).

    The name hashes the training config, the files of the training and
    validation tiles, and the base model's weights.
    """
    cfg = _finetune_config(base, cohort_dir, variant, train_params, markers, budget, budget_seed)
    key = params_hash({"cfg": cfg, "tiles": _training_files_hash(cohort_dir, cfg), "base": _base_model_hash(base)})
    return paths.resolve(cache_dir) / f"{variant}-{key[:16]}"


def finished_model(folder: Path) -> Path | None:
    """``folder/model.pt`` when training there finished (weights and sidecar present), else None."""
    done = Path(folder) / "model.pt"
    return done if done.is_file() and done.with_suffix(".pt.json").is_file() else None


def finetune(base: str, cohort_dir: str, variant: str = "generic", *, train_params: dict,
             markers: Sequence[str] | None = None, budget: int | None = None, budget_seed: int = 0,
             cache_dir: str = MODEL_CACHE, validate: bool = True, progress: bool = False, log=print) -> Path:
    """Fine-tune ``base`` on the cohort's annotated training tiles; returns the checkpoint path.

    Parameters
    ----------
    base : model spec to start from (``generalist``, ``cpsam``, a checkpoint path).
    cohort_dir : cohort folder (relative to the project root or absolute).
    variant : generic, marker_specific, marker_only, label_budget, leave_one_marker_out.
    train_params : seglab.segment.train keys (epochs, learning_rate, batch_size, bsize, ...).
    markers, budget, budget_seed : as in ``seglab.segment.train.train_from_params``.
    cache_dir : parent of the content-addressed model folders (:func:`model_dir`); a
        finished model there is reused, an interrupted one resumes from its checkpoint.
    validate : score the final weights on the validation tiles into the sidecar
        (``seglab.segment.train.fit``'s ``final_validation``). Not part of the cache key: the
        weights are the same either way, so a model cached without it stays without it.
    """
    from seglab.segment import train

    cfg = _finetune_config(base, cohort_dir, variant, train_params, markers, budget, budget_seed)
    out_dir = model_dir(base, cohort_dir, variant, train_params=train_params, markers=markers, budget=budget,
                        budget_seed=budget_seed, cache_dir=cache_dir)
    done = finished_model(out_dir)
    if done is not None:
        root = paths.project_root()
        log(f"[study] {variant}: reusing {out_dir.relative_to(root) if out_dir.is_relative_to(root) else out_dir}")
        return done
    log(f"[study] {variant}: fine-tuning {base} -> {out_dir}")
    return Path(train.train_from_params({**cfg, "out_dir": str(out_dir), "final_validation": bool(validate)},
                                        source=f"finetune({variant})", progress=progress))


E1_VARIANTS = ("finetuned_generic", "finetuned_marker_specific", "finetuned_marker_only")


def e1_finetune_jobs(base: str, cohort_dir: str, *, train_params: dict, markers: Sequence[str],
                     cache_dir: str = MODEL_CACHE) -> dict[str, dict]:
    """E1's three fine-tunes as :func:`finetune` keyword arguments, by model name (E1_VARIANTS):
    generic (every marker), marker-specific (the tiles of ``markers`` only) and marker-only
    (every marker, DAPI zeroed). One list for the notebook (``efficiency.finetune_many``) and
    for a Slurm array that trains them before the notebook runs."""
    common = dict(base=base, cohort_dir=cohort_dir, train_params=train_params, cache_dir=cache_dir)
    # E1 scores every model on validation itself (and E2 and E6 reuse those network passes through
    # the output cache), so training skips its own final validation pass
    return {"finetuned_generic": dict(common, variant="generic", validate=False),
            "finetuned_marker_specific": dict(common, variant="marker_specific", markers=list(markers), validate=False),
            "finetuned_marker_only": dict(common, variant="marker_only", validate=False)}


def model_record(path: Path) -> dict:
    """What a run records about a checkpoint it used: path, sha256 and its sidecar's key fields."""
    from seglab.segment import models

    side = models.read_sidecar(path)
    keep = ("base_spec", "variant", "markers", "budget", "budget_seed", "train_tiles_hash", "n_train", "commit")
    return {"path": str(path), "sha256": io.sha256_file(path), **{k: side.get(k) for k in keep if k in side}}


def segment_split(model, split: SplitSet, *, diameter_px="default", flow_threshold: float = 0.4,
                  cellprob_threshold: float = 0.0, min_size: int = 15, batch_size: int | None = None):
    """(masks, network outputs) for every tile of ``split``; one network pass per tile."""
    if model.kind == "classical":
        masks = model.segment(split.images, diameter_px=diameter_px, min_size=min_size)
        return masks, None
    return model.segment(split.images, diameter_px=diameter_px, flow_threshold=flow_threshold,
                         cellprob_threshold=cellprob_threshold, min_size=min_size, batch_size=batch_size,
                         return_outputs=True)


OUTPUT_CACHE = "data/cache/outputs"


def _model_hash(model) -> str:
    """sha256 of the weights a model (a loaded Model, or its spec / checkpoint path) runs with
    (file hash for checkpoints and the generalist; the spec for built-ins)."""
    from seglab.segment import models

    if isinstance(model, (str, Path)):
        spec, side = str(model), None
        if spec != "generalist" and Path(spec).is_file() and models.sidecar_path(spec).is_file():
            side = models.read_sidecar(spec).get("weights_sha256")
        kind = "classical" if spec == "classical" else "cellpose"
    else:
        spec, side, kind = model.spec, model.meta.get("weights_sha256"), model.kind
    if kind == "classical":
        return "classical"
    if spec == "generalist":
        return io.sha256_file(models.GENERALIST_PATH)
    if side:
        return side
    p = Path(spec)
    return io.sha256_file(p) if p.is_file() else str(spec)


def _images_hash(split: SplitSet) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, x in zip(split.names, split.images):
        h.update(name.encode())
        h.update(np.ascontiguousarray(x, np.float32).tobytes())
    return h.hexdigest()


def _cached_output_files(model, split: SplitSet, diameter_px, cache_dir: str) -> list[Path]:
    """Where :func:`segment_cached` keeps the outputs of ``model`` (Model or spec) on ``split``."""
    key = params_hash({"model": _model_hash(model), "images": _images_hash(split), "diameter_px": diameter_px})
    folder = paths.resolve(cache_dir) / key[:24]
    return [folder / f"{name}.npz" for name in split.names]


def segment_cached(model, split: SplitSet, *, diameter_px="default", flow_threshold: float = 0.4,
                   cellprob_threshold: float = 0.0, min_size: int = 15, batch_size: int | None = None,
                   cache_dir: str = OUTPUT_CACHE, log=print):
    """:func:`segment_split`, with the network outputs kept in a content-addressed cache.

    The key hashes the model's weights, the tiles' pixels (so a DAPI-zeroed
    split is another entry) and ``diameter_px``; the thresholds only shape the
    masks, which are rebuilt from the cached outputs. So notebooks 03-06 reuse
    the network pass of 01 on the same tiles, as they reuse its models.
    Returns (masks, outputs) like :func:`segment_split`.
    """
    if model.kind == "classical":
        return segment_split(model, split, diameter_px=diameter_px, min_size=min_size)
    files = _cached_output_files(model, split, diameter_px, cache_dir)
    folder = files[0].parent
    if all(f.is_file() for f in files):
        from seglab.segment.predict import load_outputs

        try:
            outputs = [load_outputs(f) for f in files]
        except SeglabError:
            outputs = None
        if outputs is not None:
            log(f"[study] network outputs of {len(files)} {split.split} tiles: reusing {folder.name}")
    else:
        outputs = None
    if outputs is None:
        _, outputs = segment_split(model, split, diameter_px=diameter_px, flow_threshold=flow_threshold,
                                   cellprob_threshold=cellprob_threshold, min_size=min_size, batch_size=batch_size)
        from seglab.segment.predict import save_outputs

        folder.mkdir(parents=True, exist_ok=True)
        for f, o in zip(files, outputs):
            save_outputs(f, o)
    # masks always rebuilt from the outputs, so a cached and a fresh pass give identical masks
    key_m = (float(flow_threshold), float(cellprob_threshold), int(min_size))
    masks = [sweep_masks(o, [key_m[0]], [key_m[1]], [key_m[2]])[key_m] for o in outputs]
    return masks, outputs


_WORKER_MODELS: dict = {}


def _worker_segment(task: dict) -> str:
    from seglab.segment import models

    spec = task.pop("model")
    if spec not in _WORKER_MODELS:
        _WORKER_MODELS[spec] = models.load(spec)
    segment_cached(_WORKER_MODELS[spec], log=lambda *a: None, **task)
    return spec


def _worker_init(root: str, threads: int | None, then=None, then_args: tuple = ()) -> None:
    paths.set_root(root)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if then is not None:
        then(*then_args)


def worker_pool(n_workers: int, threads_per_job: int | None = 1, then=None, then_args: tuple = ()):
    """A ProcessPoolExecutor of ``n_workers`` spawned processes (no fork of a process holding torch
    threads), each with this project root and ``threads_per_job`` torch threads, then ``then(*then_args)``
    (a module-level function, e.g. one that loads a model once per worker). Shared by the parallel
    fine-tunes, network passes and inference shards of the CPU demo."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=int(n_workers), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init,
                               initargs=(str(paths.project_root()), threads_per_job, then, tuple(then_args)))


def segment_cached_many(tasks: Sequence[dict], *, n_jobs: int = 1, threads_per_job: int | None = 1,
                        log=print) -> None:
    """Fill the network-output cache of :func:`segment_cached` for several (model, split) pairs at once.

    Each task is ``segment_cached``'s keyword arguments with ``model`` given as a
    spec or checkpoint path (``Model.spec``) and ``split`` a SplitSet. The tasks run
    in ``n_jobs`` worker processes (spawned; ``threads_per_job`` torch threads each,
    every worker loading each model it needs once); afterwards ``segment_cached`` in
    the caller finds every output in the cache. On the 2-core demo machine two
    one-thread workers segment about twice as many tiles per second as one process;
    with ``n_jobs`` 1 (a GPU) nothing is done here and the caller's own calls compute.
    The outputs do not depend on ``n_jobs``.
    """
    if int(n_jobs) < 1:
        raise SeglabError(f"n_jobs={n_jobs}: need at least 1 (segmentations run at once)")
    tasks = [dict(t, model=str(getattr(t["model"], "spec", t["model"]))) for t in tasks]
    # what the cache already holds is not redone (nor are workers started for it)
    tasks = [t for t in tasks if t["model"] != "classical" and not all(
        f.is_file() for f in _cached_output_files(t["model"], t["split"], t.get("diameter_px", "default"),
                                                  t.get("cache_dir", OUTPUT_CACHE)))]
    if int(n_jobs) == 1 or len(tasks) <= 1:
        return
    # larger splits first, so the two workers end together
    tasks.sort(key=lambda t: -len(t["split"]))
    if log is not None:
        log(f"[study] network passes over {sum(len(t['split']) for t in tasks)} tiles "
            f"({len(tasks)} model x split pairs), {min(int(n_jobs), len(tasks))} at a time")
    with worker_pool(min(int(n_jobs), len(tasks)), threads_per_job) as pool:
        list(pool.map(_worker_segment, tasks))


def take(split: SplitSet, names: Sequence[str], *lists):
    """The tiles ``names`` of ``split`` (a SplitSet) and the matching items of each list in ``lists``
    (e.g. masks, outputs aligned with ``split``): ``(subset, list1, list2, ...)``."""
    pos = {n: i for i, n in enumerate(split.names)}
    missing = [n for n in names if n not in pos]
    if missing:
        raise SeglabError(f"take: tiles {missing[:3]} are not in split '{split.split}'")
    idx = [pos[n] for n in names]
    sub = SplitSet(split=split.split, rows=split.rows.iloc[idx].reset_index(drop=True),
                   images=[split.images[i] for i in idx], masks=[split.masks[i] for i in idx])
    return (sub, *[None if lst is None else [lst[i] for i in idx] for lst in lists])


def evaluate_masks(split: SplitSet, masks: Sequence[np.ndarray], thresholds=(0.5, 0.75, 0.9)) -> metrics.Evaluation:
    """Per image x threshold, pooled, mean over images and per marker/donor."""
    pairs = {name: (t, p) for name, t, p in zip(split.names, split.masks, masks)}
    return metrics.evaluate(pairs, groups=split.groups, thresholds=thresholds)


POOLED_KEYS = ("tp", "fp", "fn", "n_pred", "precision", "recall", "f1", "ap")


def pooled_counts(truths: Sequence[np.ndarray], preds: Sequence[np.ndarray], iou: float = 0.5) -> dict:
    """tp, fp, fn summed over images at one IoU threshold, then precision, recall, f1, ap; n_pred
    (``metrics.pooled_match``, trimmed to the columns of the sweep tables)."""
    pooled = metrics.pooled_match(truths, preds, iou)
    return {k: pooled[k] for k in POOLED_KEYS}


def _raw_masks(output: dict, cellprob_threshold: float, niter: int | None, max_size_fraction: float = 0.4):
    """cellpose's masks before the flow check and the size filter, and each mask's flow error.

    The same calls as ``cellpose.dynamics.compute_masks`` (follow_flows, get_masks_torch,
    flow_error), split so that every flow_threshold and min_size reuse one run of the dynamics.
    """
    from cellpose import dynamics

    torch = _torch_cpu()
    dP = np.asarray(output["dP"], np.float32)
    cellprob = np.asarray(output["cellprob"], np.float32)
    n = int(niter if niter is not None else output.get("niter", 200))
    device = torch.device("cpu")
    with _quiet():
        raw = dynamics.compute_masks(dP, cellprob, niter=n, cellprob_threshold=cellprob_threshold,
                                     flow_threshold=0.0, min_size=-1, max_size_fraction=max_size_fraction,
                                     device=device)
        errors = dynamics.flow_error(raw, dP, device)[0] if raw.max() > 0 else np.zeros(0)
    return raw, errors


def _finish_masks(raw: np.ndarray, errors: np.ndarray, flow_threshold: float, min_size: int) -> np.ndarray:
    """``remove_bad_flow_masks`` at ``flow_threshold`` then ``fill_holes_and_remove_small_masks``."""
    import fastremap
    from cellpose import utils

    from seglab.segment import models

    m = raw.copy()
    if m.max() > 0 and flow_threshold is not None and flow_threshold > 0:
        bad = 1 + np.nonzero(errors > flow_threshold)[0]
        fastremap.mask(m, bad, in_place=True)
        fastremap.renumber(m, in_place=True)
    if m.max() < 2 ** 16 and m.dtype != np.uint16:
        m = m.astype(np.uint16)
    m = utils.fill_holes_and_remove_small_masks(m, min_size=min_size)
    return models._as_label_dtype(m)


def _torch_cpu():
    from seglab.segment import models

    return models._torch()


class _quiet:
    def __enter__(self):
        from seglab.segment import models

        self._q = models._quiet_cellpose()
        self._q.__enter__()

    def __exit__(self, *exc):
        self._q.__exit__(*exc)


def sweep_masks(output: dict, flow_thresholds: Sequence[float], cellprob_thresholds: Sequence[float],
                min_sizes: Sequence[int] = (15,), niter: int | None = None) -> dict:
    """Masks of one tile's saved outputs at every (flow_threshold, cellprob_threshold, min_size).

    Equal to :func:`seglab.segment.predict.masks_from_outputs` at each setting, but the
    dynamics run once per cellprob_threshold and the flow errors are computed
    once per run (a flow_threshold only decides which masks to drop).

    Returns {(flow_threshold, cellprob_threshold, min_size): (Y, X) labels}.
    """
    out = {}
    for cp in cellprob_thresholds:
        raw, errors = _raw_masks(output, float(cp), niter)
        for flow in flow_thresholds:
            for ms in min_sizes:
                out[(float(flow), float(cp), int(ms))] = _finish_masks(raw, errors, float(flow), int(ms))
    return out


class MaskMemo:
    """Masks of many tiles' saved outputs at many settings, running the dynamics once per tile and
    (cellprob_threshold, niter); flow_threshold and min_size reuse that run (see :func:`sweep_masks`)."""

    def __init__(self, outputs: Sequence[dict]):
        if outputs is None:
            raise SeglabError("MaskMemo: no network outputs (classical model?)")
        self.outputs = list(outputs)
        self._raw: dict = {}

    def __len__(self) -> int:
        return len(self.outputs)

    def masks(self, flow_threshold: float = 0.4, cellprob_threshold: float = 0.0, min_size: int = 15,
              niter: int | None = None) -> list[np.ndarray]:
        out = []
        for i, o in enumerate(self.outputs):
            key = (i, float(cellprob_threshold), None if niter is None else int(niter))
            if key not in self._raw:
                self._raw[key] = _raw_masks(o, float(cellprob_threshold), niter)
            raw, errors = self._raw[key]
            out.append(_finish_masks(raw, errors, float(flow_threshold), int(min_size)))
        return out


def threshold_sweep(split: SplitSet, outputs: Sequence[dict], flow_thresholds: Sequence[float],
                    cellprob_thresholds: Sequence[float], *, min_size: int = 15, iou: float = 0.5,
                    niter: int | None = None) -> pd.DataFrame:
    """Pooled metrics at ``iou`` for every (flow_threshold, cellprob_threshold), from saved outputs.

    Returns one row per pair: flow_threshold, cellprob_threshold, tp, fp, fn,
    n_pred, precision, recall, f1, ap. The network is not rerun, and the
    dynamics run once per tile and cellprob_threshold (see :func:`sweep_masks`).
    ``outputs`` may be a :class:`MaskMemo` shared with other sweeps of the same tiles.
    """
    if outputs is None:
        raise SeglabError("threshold_sweep: this model has no network outputs (classical); sweep a network model")
    if len(outputs) != len(split):
        raise SeglabError(f"threshold_sweep: {len(outputs)} outputs for {len(split)} tiles")
    memo = outputs if isinstance(outputs, MaskMemo) else MaskMemo(outputs)
    rows = []
    for flow, cellprob in product(flow_thresholds, cellprob_thresholds):
        preds = memo.masks(flow, cellprob, min_size, niter)
        rows.append({"flow_threshold": float(flow), "cellprob_threshold": float(cellprob),
                     **pooled_counts(split.masks, preds, iou)})
    return pd.DataFrame(rows)


def select_best(sweep: pd.DataFrame, metric: str = "f1", prefer: dict | None = None) -> dict:
    """The row of ``sweep`` with the highest ``metric``; ties go to the row closest to ``prefer``
    (cellpose's defaults, flow 0.4 and cellprob 0, unless given), then to the first row."""
    if sweep.empty:
        raise SeglabError("select_best: the sweep is empty")
    prefer = prefer or {"flow_threshold": 0.4, "cellprob_threshold": 0.0}
    best = sweep[metric].max()
    tied = sweep[np.isclose(sweep[metric], best)].copy()
    distance = sum((tied[k] - v).abs() for k, v in prefer.items() if k in tied)
    tied["_distance"] = distance if not isinstance(distance, int) else 0
    return tied.sort_values("_distance", kind="stable").iloc[0].drop("_distance").to_dict()


def headline(evaluation: metrics.Evaluation, threshold: float = 0.5) -> dict:
    """ap, precision, recall, f1 pooled over images at one IoU threshold (the study's headline)."""
    row = evaluation.pooled[np.isclose(evaluation.pooled["threshold"], threshold)].iloc[0]
    return {k: float(row[k]) for k in ("ap", "precision", "recall", "f1")}


def save_masks(folder: Path, names: Sequence[str], masks: Sequence[np.ndarray]) -> Path:
    """Write predicted masks as ``<tile_id>.tif`` (atomic), e.g. for ``seglab evaluate`` later."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    for name, m in zip(names, masks):
        with io.atomic_path(folder / f"{name}.tif") as tmp:
            tifffile.imwrite(tmp, m, compression="zlib")
    return folder


def set_threads(n: int | None = 1) -> int:
    """Torch CPU threads for this process (None: leave torch's default); returns the number in use.

    On a small shared CPU one thread is much faster: several threads per process
    spin against other processes' threads (a 256 px tile's mask dynamics took 10 s
    with 2 threads under load, 0.15 s with one).
    """
    torch = _torch_cpu()
    if n:
        torch.set_num_threads(int(n))
    return int(torch.get_num_threads())


# --------------------------------------------------------------------------------------
# E1: comparing models on one split
# --------------------------------------------------------------------------------------

def masks_at(outputs: Sequence[dict], *, flow_threshold: float = 0.4, cellprob_threshold: float = 0.0,
             min_size: int = 15, niter: int | None = None) -> list[np.ndarray]:
    """Masks rebuilt from saved network outputs at one setting (no network pass)."""
    from seglab.segment.predict import masks_from_outputs

    if outputs is None:
        raise SeglabError("masks_at: this model has no network outputs (classical); use its masks as they are")
    return [masks_from_outputs(o, flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold,
                               min_size=min_size, niter=niter) for o in outputs]


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


def zero_dapi(split: SplitSet) -> SplitSet:
    """The same tiles with channel 0 (DAPI) set to 0: the marker-only model's input."""
    images = []
    for x in split.images:
        x = np.array(x, copy=True)
        x[0] = 0.0
        images.append(x)
    return SplitSet(split=split.split, rows=split.rows, images=images, masks=split.masks)


def median_diameter_px(split: SplitSet) -> float:
    """Median object diameter (px, cellpose's: that of a disk of the median area) over the true masks
    of ``split``: the diameter to rescale for when the image cannot tell (e.g. DAPI zeroed)."""
    from cellpose.utils import diameters

    ds = [diameters(np.asarray(m))[0] for m in split.masks if np.asarray(m).max() > 0]
    if not ds:
        raise SeglabError(f"median_diameter_px: no objects in the masks of split '{split.split}'")
    return float(np.median(ds))


def subset(split: SplitSet, *, markers: Sequence[str] | None = None, n: int | None = None,
           seed: int = 0) -> SplitSet:
    """Some tiles of a split: those of ``markers``, then ``n`` drawn at random (seeded, stratified by
    marker when possible), kept in tile_id order."""
    keep = np.ones(len(split), bool)
    if markers:
        keep &= split.rows["marker"].isin(list(markers)).to_numpy()
    idx = np.flatnonzero(keep)
    if not len(idx):
        raise SeglabError(f"subset: no tiles of markers {list(markers or [])} in split '{split.split}'")
    if n is not None and n < len(idx):
        rng = np.random.default_rng(seed)
        rows = split.rows.iloc[idx]
        # round robin over markers so a small subset still covers each one
        by_marker = [list(rng.permutation(np.flatnonzero(rows["marker"].to_numpy() == m)))
                     for m in sorted(rows["marker"].unique())]
        picked = []
        while len(picked) < n:
            for lst in by_marker:
                if lst and len(picked) < n:
                    picked.append(idx[lst.pop()])
        idx = np.sort(np.array(picked))
    return SplitSet(split=split.split, rows=split.rows.iloc[idx].reset_index(drop=True),
                    images=[split.images[i] for i in idx], masks=[split.masks[i] for i in idx])


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


# --------------------------------------------------------------------------------------
# E3: gates on predicted instances
# --------------------------------------------------------------------------------------

def gate_items(split: SplitSet, masks: Sequence[np.ndarray], channel: int = 1) -> list[dict]:
    """``postprocess.sweep_gates``'s items: y_true, y_pred and the channel the gate reads (marker = 1)."""
    if len(masks) != len(split):
        raise SeglabError(f"gate_items: {len(masks)} masks for {len(split)} tiles")
    return [{"name": n, "y_true": t, "y_pred": p, "image": np.asarray(x[channel])}
            for n, t, p, x in zip(split.names, split.masks, masks, split.images)]


def gate_split(split: SplitSet, masks: Sequence[np.ndarray], gate, *, channel: int = 1,
               pixel_size_um: float | None = None, iou: float = 0.5) -> tuple[list, pd.DataFrame]:
    """Apply one gate to every tile; returns (gated masks, per-instance decisions).

    The decisions table has one row per predicted instance: image, marker,
    label, area_px, area_um2, mean_intensity, kept, reason ('', 'area', 'dim',
    'bright') and ``matched`` (True when the instance was a true positive at
    ``iou`` before gating), so removed FPs and lost TPs can be counted.
    """
    from seglab.segment import postprocess

    gated, frames = [], []
    for name, marker, t, p, x in zip(split.names, split.rows["marker"], split.masks, masks, split.images):
        g, dec = postprocess.apply_gate(p, np.asarray(x[channel]), gate, pixel_size_um)
        dec = dec.assign(image=name, marker=marker)
        dec["matched"] = dec["label"].isin(outcome_labels(t, p, iou)["tp_pred"])
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


# --------------------------------------------------------------------------------------
# E4: sensitivity to inference parameters
# --------------------------------------------------------------------------------------

OUTPUT_PARAMS = ("flow_threshold", "cellprob_threshold", "min_size", "niter")
RERUN_PARAMS = ("diameter_factor", "tile_overlap", "augment")


def _count_row(split: SplitSet, preds: Sequence[np.ndarray], iou: float) -> dict:
    row = pooled_counts(split.masks, preds, iou)
    n_true = int(sum(len(np.unique(t)) - 1 for t in split.masks))
    row.update(n_true=n_true, cells_per_tile=row["n_pred"] / max(1, len(preds)),
               count_ratio=row["n_pred"] / n_true if n_true else float("nan"))
    return row


def outputs_sensitivity(split: SplitSet, outputs: Sequence[dict], grid: dict, base: dict, *,
                        iou: float = 0.5) -> pd.DataFrame:
    """AP, F1 and cell counts when one mask setting moves and the others stay at ``base``.

    Parameters
    ----------
    grid : {parameter: values} for parameters in ``OUTPUT_PARAMS`` (flow_threshold,
        cellprob_threshold, min_size (px), niter (Euler steps; None = what eval used)).
    base : the other settings (flow_threshold, cellprob_threshold, min_size, niter).

    Returns one row per (parameter, value): parameter, value, tp, fp, fn,
    n_pred, precision, recall, f1, ap (pooled at ``iou``), n_true,
    cells_per_tile, count_ratio (predicted / true cells). From saved outputs only
    (``outputs`` may be a :class:`MaskMemo` shared with :func:`threshold_sweep`).
    """
    bad = [k for k in grid if k not in OUTPUT_PARAMS]
    if bad:
        raise SeglabError(f"outputs_sensitivity: {bad} need a network rerun or are unknown; "
                          f"from outputs: {', '.join(OUTPUT_PARAMS)}")
    settings = {"flow_threshold": 0.4, "cellprob_threshold": 0.0, "min_size": 15, "niter": None,
                **{k: v for k, v in base.items() if k in OUTPUT_PARAMS}}
    memo = outputs if isinstance(outputs, MaskMemo) else MaskMemo(outputs)
    rows = []
    for param, values in grid.items():
        for v in values:
            preds = memo.masks(**{**settings, param: v})
            rows.append({"parameter": param, "value": v, **_count_row(split, preds, iou)})
    return pd.DataFrame(rows)


def rerun_sensitivity(model, split: SplitSet, grid: dict, base: dict, *, iou: float = 0.5,
                      batch_size: int | None = None, diameter_px=None) -> pd.DataFrame:
    """AP, F1 and cell counts when a setting of the network pass moves (the network reruns).

    Parameters
    ----------
    grid : {parameter: values} for ``diameter_factor`` (the diameter handed to the
        model is factor x its default per tile: the estimated diameter for tiny
        nets, the canonical one for cpsam; the image is rescaled by 1 / factor
        relative to the default), ``tile_overlap`` (fraction of the network tile)
        and ``augment`` (test-time flips of overlapping tiles).
    base : flow_threshold, cellprob_threshold, min_size for the masks.
    diameter_px : the diameter (px) factor 1.0 stands for, as the notebooks' ``diameter_px``
        param; None: the model's default per tile (see ``grid``).

    Returns one row per (parameter, value) like :func:`outputs_sensitivity`, plus seconds (wall time
    of the network pass and masks; the default setting runs once and its rows share its time).
    """
    import time

    bad = [k for k in grid if k not in RERUN_PARAMS]
    if bad:
        raise SeglabError(f"rerun_sensitivity: unknown parameter(s) {bad}; use {', '.join(RERUN_PARAMS)} "
                          f"(and outputs_sensitivity for {', '.join(OUTPUT_PARAMS)})")
    mask_kw = {k: base[k] for k in ("flow_threshold", "cellprob_threshold", "min_size") if k in base}
    default_d = [model.resolve_diameter(model.as_network_input(x), "default" if diameter_px is None else diameter_px)
                 or model.diam_mean_px for x in split.images]
    defaults = {"diameter_factor": 1.0, "tile_overlap": 0.1, "augment": False}
    done: dict = {}  # the default setting appears once per parameter: run it once
    rows = []
    for param, values in grid.items():
        for v in values:
            setting = {**defaults, param: bool(v) if param == "augment" else float(v)}
            key = tuple(sorted(setting.items()))
            t0 = time.perf_counter()
            if key not in done:
                preds = [model.segment(x, diameter_px=setting["diameter_factor"] * d, batch_size=batch_size,
                                       tile_overlap=setting["tile_overlap"], augment=setting["augment"], **mask_kw)
                         for x, d in zip(split.images, default_d)]
                done[key] = (_count_row(split, preds, iou), round(time.perf_counter() - t0, 2))
            counts, seconds = done[key]
            rows.append({"parameter": param, "value": v, **counts, "seconds": seconds})
    return pd.DataFrame(rows)
