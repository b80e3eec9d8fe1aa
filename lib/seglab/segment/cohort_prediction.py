"""Inference over every tile of a cohort, cached by content and resumable (E5's heavy step).

One function per arrow::

    model + tiles + MaskSettings  --prediction_dir-->  data/predictions/<model id[:16]>-<settings+tiles hash[:16]>/
    the same                      --predict_cohort-->  masks <tile>.tif + per-tile table (CohortPrediction)
    prediction folder             --collect_table-->   one row per tile (merged shard tables)
    prediction folder             --mask_loader-->     load_mask(row) for seglab.downstream.features.tile_table

Where the predictions live
--------------------------
A prediction folder is named by what decides its masks, not by the run that
made it: ``<model id (sha256 of the weights)>[:16]-<hash of the mask settings
and of the tiles' files>[:16]``. A rerun of the notebook, another notebook, or
a Slurm array over shards (``seglab prepare 05``, ``seglab predict --shard I/N
--out <folder>``) writes to and reads from the same folder, so an interrupted
inference resumes and a finished one is reused. ``prediction.json`` in the
folder records the model, the settings and the tiles' hash; a folder whose
record disagrees is refused rather than mixed.

Shards are round robin over the sorted tile ids (tile k is in shard ``k % N``),
as :mod:`seglab.segment.predict` splits them; each shard writes its masks, then
its table ``tiles_shard-I-of-N.tsv`` last, so a shard with a table and every
mask is done.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
import numpy as np
import pandas as pd
from seglab import SeglabError
from seglab.core import io
from seglab.config.params import params_hash
from seglab.config.settings import MaskSettings
from seglab.core import paths, workers
from seglab.segment import models, predict


PREDICTIONS_DIR = "data/predictions"


RECORD = "prediction.json"


# bump when predict's output for the same model, settings and tiles changes meaning
# (2: the record names the model by models.model_id and the settings are a MaskSettings)
PREDICT_FORMAT = 2


def tiles_sha256(tiles_dir) -> tuple[str, int]:
    """One hash over the tiles ``seglab predict`` would segment (ids and file contents); and their count."""
    tiles = predict.discover_tiles(tiles_dir)
    lines = [f"{t.tile_id}:{Path(f).name}:{io.sha256_file(f)}" for t in tiles for f in t.files]
    return io.sha256_text("\n".join(lines)), len(tiles)


def prediction_key(model_id: str, mask: MaskSettings, tiles_hash: str) -> str:
    """``<model id[:16]>-<mask settings + tiles hash[:16]>``: the prediction folder's name."""
    h = params_hash({"settings": mask.as_dict(), "tiles": tiles_hash, "format": PREDICT_FORMAT})
    return f"{model_id[:16]}-{h[:16]}"


def prediction_dir(model, tiles_dir, mask: MaskSettings, *, root=PREDICTIONS_DIR) -> Path:
    """The content-addressed folder of ``model``'s predictions on ``tiles_dir`` with ``mask``."""
    th, _ = tiles_sha256(tiles_dir)
    return paths.resolve(root) / prediction_key(models.model_id(model), mask, th)


@dataclass
class CohortPrediction:
    """One model's masks over every tile of a cohort.

    Attributes
    ----------
    name : label of the model in the notebook (e.g. ``baseline``).
    folder : the prediction folder (``<tile>.tif`` masks, shard tables, prediction.json).
    table : one row per tile: tile, shard, n_cells, seconds, diameter_px, mask_file, status.
    record : contents of prediction.json.
    n_predicted : tiles segmented by this call (the rest were reused).
    wall_s : wall time of this call, s (hashing, loading the model and inference).
    """

    name: str
    folder: Path
    table: pd.DataFrame
    record: dict
    n_predicted: int
    wall_s: float

    @property
    def n_tiles(self) -> int:
        return int(len(self.table))

    @property
    def n_reused(self) -> int:
        return self.n_tiles - self.n_predicted

    @property
    def tiles_per_s(self) -> float:
        """Tiles segmented per second of this call (NaN when everything was reused)."""
        return self.n_predicted / self.wall_s if self.n_predicted and self.wall_s > 0 else math.nan

    def summary(self) -> dict:
        return {"model": self.name, "folder": paths.relative(self.folder), "n_tiles": self.n_tiles,
                "n_predicted": self.n_predicted, "n_reused": self.n_reused, "wall_s": round(self.wall_s, 2),
                "tiles_per_s": round(self.tiles_per_s, 3) if self.n_predicted else None,
                "model_id": self.record.get("model_id"), "n_cells": int(self.table["n_cells"].sum())}


def _check_record(folder: Path, record: dict) -> None:
    f = folder / RECORD
    if not f.is_file():
        io.write_json(f, record)
        return
    try:
        old = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = None
    keys = ("model_id", "settings", "tiles_sha256", "format")
    if not isinstance(old, dict) or any(old.get(k) != record.get(k) for k in keys):
        raise SeglabError(f"{f}: this prediction folder was made for another model, settings or tiles "
                          f"(recorded {None if old is None else {k: old.get(k) for k in keys}}); "
                          "delete the folder or point root= elsewhere")


def collect_table(folder, tile_ids: Sequence[str]) -> pd.DataFrame:
    """The per-tile table of a prediction folder: all shard tables merged, one row per tile.

    Raises SeglabError naming the tiles without a mask (shards not run yet).
    """
    folder = Path(folder)
    parts = []
    for f in sorted(folder.glob("tiles_shard-*-of-*.tsv")):
        try:
            parts.append(pd.read_csv(f, sep="\t", dtype={"tile": str}))
        except Exception:  # noqa: BLE001 - a damaged table is ignored; the masks decide
            continue
    cols = predict.TABLE_COLUMNS
    t = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
    # a tile segmented in two shardings: keep a "done" row (it has the timing) over "skipped"
    t = t.assign(_rank=(t["status"] != "done").astype(int)).sort_values(["tile", "_rank"], kind="stable")
    t = t.drop_duplicates("tile").drop(columns="_rank").set_index("tile")
    missing = [tid for tid in tile_ids if tid not in t.index or not (folder / f"{tid}.tif").is_file()]
    if missing:
        raise SeglabError(f"{folder}: {len(missing)} of {len(tile_ids)} tiles have no predicted mask yet "
                          f"(e.g. {missing[:3]}); run the remaining shards (predict_cohort or "
                          f"`seglab predict --out {folder} --shard I/N`)")
    return t.loc[list(tile_ids)].reset_index()[cols]


def predict_cohort(model, tiles_dir, mask: MaskSettings, *, name: str | None = None, root=PREDICTIONS_DIR,
                   n_shards: int = 1, shards: Sequence[int] | None = None, batch_tiles: int = 8,
                   batch_size: int | None = None, progress: bool = False, gpu: bool | None = None,
                   n_jobs: int = 1, threads_per_job: int | None = 1, log: Callable = print) -> CohortPrediction:
    """Segment every tile of ``tiles_dir`` with ``model`` into its content-addressed folder.

    Parameters
    ----------
    model : spec or checkpoint path (``seglab.segment.models.load``), or a loaded Model.
    tiles_dir : cohort folder or its ``tiles/`` (see :mod:`seglab.segment.predict`).
    mask : the mask settings (a diameter of None is the model's default).
    name : the model's label in tables (default: its spec).
    root : parent of the prediction folders (relative to the project root or absolute).
    n_shards, shards : run shards ``I/n_shards`` for I in ``shards`` (default: all, in turn);
        the same round-robin split as ``seglab predict --shard I/N`` on Slurm.
    batch_tiles, batch_size : tiles loaded per batch, network crops per forward pass.
    n_jobs, threads_per_job : shards segmented at once, each in a worker process (spawned)
        with that many torch threads. On the 2-core demo machine two one-thread workers
        segment about twice as many tiles per second as one process; on a GPU keep 1
        (Slurm arrays spread shards over GPUs instead). The masks do not depend on it.

    Returns
    -------
    CohortPrediction; its table covers every tile of the shards asked for (all tiles when
    ``shards`` is None; a subset is a deterministic 1/N sample: every N-th tile by sorted id).
    SeglabError when a tile of those shards still has no mask after this call.

    Tiles whose mask is already in the folder are not segmented again; the model is not
    even loaded when nothing is left to do.
    """
    t0 = time.monotonic()
    spec = str(getattr(model, "spec", model))
    th, n_tiles = tiles_sha256(tiles_dir)
    mid = models.model_id(model)
    folder = paths.resolve(root) / prediction_key(mid, mask, th)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format": PREDICT_FORMAT, "model_spec": spec, "model_id": mid, "settings": mask.as_dict(),
              "tiles_dir": paths.relative(paths.resolve(tiles_dir)), "tiles_sha256": th, "n_tiles": n_tiles}
    if spec not in (models.CPSAM_NAMES + ("generalist", "classical")) and Path(spec).is_file():
        try:
            record["model_sidecar"] = {k: v for k, v in models.read_sidecar(spec).items()
                                       if k in ("base_spec", "variant", "markers", "train_tiles_hash", "n_train")}
        except SeglabError:
            pass
    _check_record(folder, record)
    all_ids = predict.list_tiles(tiles_dir)
    if shards is None:
        shards, ids = list(range(n_shards)), all_ids
    else:
        shards = sorted({predict.parse_shard((int(i), n_shards))[0] for i in shards})
        wanted = {tid for i in shards for tid in predict.shard_slice(all_ids, (i, n_shards))}
        ids = [tid for tid in all_ids if tid in wanted]
    missing_before = [tid for tid in ids if not (folder / f"{tid}.tif").is_file()]
    if int(n_jobs) < 1:
        raise SeglabError(f"n_jobs={n_jobs}: need at least 1 (shards segmented at once)")
    if missing_before:
        log(f"[cohort_prediction] {name or spec}: {len(missing_before)} of {len(ids)} tiles to segment -> {paths.relative(folder)}")
        shard_kw = dict(tiles_dir=str(tiles_dir), out_dir=str(folder), n_shards=int(n_shards), mask=mask,
                        batch_tiles=batch_tiles, batch_size=batch_size)
        # a shard is done when its table and every mask are there (predict writes the table last)
        todo = [i for i in shards if not (folder / f"tiles_shard-{i}-of-{n_shards}.tsv").is_file()
                or any(not (folder / f"{tid}.tif").is_file() for tid in predict.shard_slice(all_ids, (i, n_shards)))]
        n_workers = min(int(n_jobs), len(todo))
        if n_workers > 1 and isinstance(model, (str, os.PathLike)):
            with workers.worker_pool(n_workers, threads_per_job, _worker_load_model, (spec, gpu)) as pool:
                list(pool.map(_worker_predict_shard, [dict(shard_kw, shard=i) for i in todo]))
        else:
            loaded = models.load(model, gpu=gpu) if isinstance(model, (str, os.PathLike)) else model
            for i in todo:
                _predict_shard(loaded, shard=i, progress=progress, **shard_kw)
    else:
        log(f"[cohort_prediction] {name or spec}: all {len(ids)} tiles already in {paths.relative(folder)} (reused)")
    table = collect_table(folder, ids)
    n_pred = sum(1 for tid in missing_before if (folder / f"{tid}.tif").is_file())
    return CohortPrediction(name=name or spec, folder=folder, table=table, record=record, n_predicted=n_pred,
                            wall_s=time.monotonic() - t0)


def _predict_shard(loaded, *, tiles_dir, out_dir, shard: int, n_shards: int, mask: MaskSettings, batch_tiles,
                   batch_size, progress: bool = False) -> None:
    predict.predict(loaded, tiles_dir, out_dir, mask, shard=(shard, n_shards), batch_tiles=batch_tiles,
                    batch_size=batch_size, progress=progress)


_WORKER_MODEL = None


def _worker_load_model(spec: str, gpu) -> None:
    """Each worker process loads the model once."""
    global _WORKER_MODEL
    _WORKER_MODEL = models.load(spec, gpu=gpu)


def _worker_predict_shard(kwargs: dict) -> int:
    _predict_shard(_WORKER_MODEL, **kwargs)
    return int(kwargs["shard"])


def mask_loader(folder) -> Callable[[pd.Series], np.ndarray]:
    """``load_mask(row)`` for :func:`seglab.downstream.features.tile_table`: reads ``<folder>/<tile_id>.tif``."""
    import tifffile

    folder = Path(folder)

    def load(row) -> np.ndarray:
        tid = row["tile_id"]
        p = folder / f"{tid}.tif"
        if not p.is_file():
            raise SeglabError(f"{p}: no predicted mask for tile {tid}; run predict_cohort on this folder first")
        m = tifffile.imread(p)
        if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
            raise SeglabError(f"{p}: not a 2-D integer label image (shape {m.shape}, dtype {m.dtype}); delete it "
                              "and rerun predict_cohort to redo the tile")
        return m

    return load
