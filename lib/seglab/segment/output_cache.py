"""TODO docstring"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from seglab import SeglabError
from seglab.config.params import params_hash
from seglab.core import io, paths, workers
from seglab.data import splitset
from seglab.segment import dynamics


def segment_split(model, split: splitset.SplitSet, *, diameter_px="default", flow_threshold: float = 0.4,
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


def _images_hash(split: splitset.SplitSet) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, x in zip(split.names, split.images):
        h.update(name.encode())
        h.update(np.ascontiguousarray(x, np.float32).tobytes())
    return h.hexdigest()


def _cached_output_files(model, split: splitset.SplitSet, diameter_px, cache_dir: str) -> list[Path]:
    """Where :func:`segment_cached` keeps the outputs of ``model`` (Model or spec) on ``split``."""
    key = params_hash({"model": _model_hash(model), "images": _images_hash(split), "diameter_px": diameter_px})
    folder = paths.resolve(cache_dir) / key[:24]
    return [folder / f"{name}.npz" for name in split.names]


def segment_cached(model, split: splitset.SplitSet, *, diameter_px="default", flow_threshold: float = 0.4,
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
        from seglab.segment.dynamics import load_outputs

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
        from seglab.segment.dynamics import save_outputs

        folder.mkdir(parents=True, exist_ok=True)
        for f, o in zip(files, outputs):
            save_outputs(f, o)
    # masks always rebuilt from the outputs, so a cached and a fresh pass give identical masks
    key_m = (float(flow_threshold), float(cellprob_threshold), int(min_size))
    masks = [dynamics.sweep_masks(o, [key_m[0]], [key_m[1]], [key_m[2]])[key_m] for o in outputs]
    return masks, outputs


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
        f.is_file() for f in _cached_output_files(t["model"], t["split"], t.get("diameter_px", "default"),
                                                  t.get("cache_dir", OUTPUT_CACHE)))]
    if int(n_jobs) == 1 or len(tasks) <= 1:
        return
    # larger splits first, so the two workers end together
    tasks.sort(key=lambda t: -len(t["split"]))
    if log is not None:
        log(f"[study] network passes over {sum(len(t['split']) for t in tasks)} tiles "
            f"({len(tasks)} model x split pairs), {min(int(n_jobs), len(tasks))} at a time")
    with workers.worker_pool(min(int(n_jobs), len(tasks)), threads_per_job) as pool:
        list(pool.map(_worker_segment, tasks))
