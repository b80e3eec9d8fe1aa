"""Network outputs kept in a content-addressed cache, so every notebook reuses one network pass.

``segment_cached(model, split, mask)`` runs the network once per (model identity, tiles'
pixels, diameter) and keeps the outputs (flows, cell probability) under
``data/cache/outputs/<key>/<tile>.npz``; masks at any thresholds are rebuilt from them
(:mod:`seglab.segment.dynamics`). ``segment_cached_many`` fills the cache for several
(model, split) pairs in worker processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from seglab import SeglabError
from seglab.config.params import params_hash
from seglab.core import paths, workers
from seglab.data import splitset
from seglab.config.settings import MaskSettings
from seglab.segment import dynamics, models


OUTPUT_CACHE = "data/cache/outputs"


def segment_split(model, split: splitset.SplitSet, mask: MaskSettings, *, batch_size: int | None = None):
    """(masks, network outputs) for every tile of ``split``; one network pass per tile.

    masks : list of (Y, X) labels; outputs : list of dicts (``dP``, ``cellprob``, ``niter``),
    None for the classical model (it has no network).
    """
    if model.kind == "classical":
        return model.segment(split.images, mask), None
    return model.segment(split.images, mask, batch_size=batch_size, return_outputs=True)


def _images_hash(split: splitset.SplitSet) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, x in zip(split.names, split.images):
        h.update(name.encode())
        h.update(np.ascontiguousarray(x, np.float32).tobytes())
    return h.hexdigest()


def cached_output_files(model, split: splitset.SplitSet, mask: MaskSettings, cache_dir: str = OUTPUT_CACHE) -> list[Path]:
    """Where :func:`segment_cached` keeps the outputs of ``model`` (Model or spec) on ``split``.

    The key is the model's identity (:func:`seglab.segment.models.model_id`), the tiles' pixels
    and the diameter: the only settings the network outputs depend on.
    """
    key = params_hash({"model": models.model_id(model), "images": _images_hash(split),
                       "diameter_px": mask.diameter_px})
    folder = paths.resolve(cache_dir) / key[:24]
    return [folder / f"{name}.npz" for name in split.names]


def segment_cached(model, split: splitset.SplitSet, mask: MaskSettings, *, batch_size: int | None = None,
                   cache_dir: str = OUTPUT_CACHE, log=print):
    """:func:`segment_split`, with the network outputs kept in a content-addressed cache.

    The key hashes the model's identity, the tiles' pixels (so a DAPI-zeroed
    split is another entry) and the diameter; the thresholds only shape the
    masks, which are rebuilt from the cached outputs. So notebooks 03-06 reuse
    the network pass of 01 on the same tiles, as they reuse its models.
    Returns (masks, outputs) like :func:`segment_split`.
    """
    if model.kind == "classical":
        return segment_split(model, split, mask)
    files = cached_output_files(model, split, mask, cache_dir)
    folder = files[0].parent
    outputs = None
    if all(f.is_file() for f in files):
        try:
            outputs = [dynamics.load_outputs(f) for f in files]
        except SeglabError:
            outputs = None
        if outputs is not None:
            log(f"[output_cache] network outputs of {len(files)} {split.split} tiles: reusing {folder.name}")
    if outputs is None:
        _, outputs = segment_split(model, split, mask, batch_size=batch_size)
        folder.mkdir(parents=True, exist_ok=True)
        for f, o in zip(files, outputs):
            dynamics.save_outputs(f, o)
    # masks always rebuilt from the outputs, so a cached and a fresh pass give identical masks
    return dynamics.MaskMemo(outputs).masks(mask), outputs


_WORKER_MODELS: dict = {}


def _worker_segment(task: dict) -> str:
    from seglab.segment import models

    spec = task.pop("model")
    if spec not in _WORKER_MODELS:
        _WORKER_MODELS[spec] = models.load(spec)
    segment_cached(_WORKER_MODELS[spec], log=lambda *a: None, **task)
    return spec


def segment_cached_many(tasks: Sequence[dict], *, n_jobs: int = 1, threads_per_job: int | None = 1,
                        log=print) -> None:
    """Fill the network-output cache of :func:`segment_cached` for several (model, split) pairs at once.

    Each task is ``segment_cached``'s keyword arguments with ``model`` given as a
    spec or checkpoint path (``Model.spec``) and ``split`` a splitset.SplitSet. The tasks run
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
        f.is_file() for f in cached_output_files(t["model"], t["split"], t["mask"], t.get("cache_dir", OUTPUT_CACHE)))]
    if int(n_jobs) == 1 or len(tasks) <= 1:
        return
    # larger splits first, so the two workers end together
    tasks.sort(key=lambda t: -len(t["split"]))
    if log is not None:
        log(f"[output_cache] network passes over {sum(len(t['split']) for t in tasks)} tiles "
            f"({len(tasks)} model x split pairs), {min(int(n_jobs), len(tasks))} at a time")
    with workers.worker_pool(min(int(n_jobs), len(tasks)), threads_per_job) as pool:
        list(pool.map(_worker_segment, tasks))
