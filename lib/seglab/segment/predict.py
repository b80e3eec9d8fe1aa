"""Batched, resumable, shardable inference: ``seglab predict --model SPEC --tiles DIR --out DIR``.

Tiles
-----
``DIR`` is either a cohort tiles folder (one TIFF per channel,
``<study>_<donor>_<marker>_<tile>_c0.tif`` = DAPI, ``_c1``/``_c2`` = marker;
paired by :func:`seglab.data.manifest.discover`; a cohort folder holding ``tiles/`` is
accepted too), or a folder of single-file tiles (``<tile>.tif``: (Y, X) or
channel-first (C, Y, X), C <= 3). Tiles are taken in sorted order of their id;
shard ``I`` of ``N`` takes tiles ``I, I+N, I+2N, ...`` (round robin), so a
Slurm array splits thousands of tiles deterministically.

Outputs (in ``--out``)
----------------------
``<tile>.tif``
    instance labels, uint16 (uint32 beyond 65,535 objects), 0 = background,
    written atomically (temporary file + rename).
``tiles_shard-<I>-of-<N>.tsv``
    one row per tile: tile, shard ("I/N"), n_cells, seconds (wall time of the
    tile's share of its batch), diameter_px, mask_file, status (done/skipped).
``outputs/<tile>.npz`` (with ``dynamics.save_outputs``)
    the network outputs: ``dP`` (2, Y, X) float32 flows, ``cellprob`` (Y, X)
    float32 logits, ``niter``. :func:`dynamics.masks_from_outputs` rebuilds masks from
    them at any threshold without running the network again.

A rerun skips tiles whose mask is complete and redoes those whose file is
missing or unreadable. Only one batch of tiles is in memory at a time.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.config.settings import DIAMETER_AUTO, DIAMETER_NATIVE, MaskSettings
from seglab.core import io
from seglab.segment import models
from seglab.segment import dynamics

CHANNEL_RE = re.compile(r"_(c\d+)\.tiff?$", re.IGNORECASE)
TIFF_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tile:
    """One tile: its id and its channel files (one multi-channel file, or DAPI + marker)."""

    tile_id: str
    files: tuple

    def load(self) -> np.ndarray:
        """float32 (C, Y, X)."""
        from seglab.data import manifest as data

        if len(self.files) == 2:
            return data.load_tile({"dapi_path": self.files[0], "marker_path": self.files[1]})
        arr = data.read_tiff(self.files[0])
        arr = np.squeeze(arr) if arr.ndim > 3 else arr
        if arr.ndim == 3 and arr.shape[-1] <= 3 < arr.shape[0]:
            arr = np.moveaxis(arr, -1, 0)  # (Y, X, C) -> (C, Y, X)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[0] > 3):
            raise SeglabError(f"{self.files[0]}: expected (Y, X) or (C, Y, X) with C <= 3 channels "
                              f"([DAPI, marker]), got shape {arr.shape}")
        return np.asarray(arr, np.float32)


def _tiles_folder(tiles_dir) -> Path:
    d = Path(tiles_dir)
    if not d.is_dir():
        raise SeglabError(f"--tiles {d}: folder not found")
    if (d / "tiles").is_dir():
        d = d / "tiles"
    return d


def discover_tiles(tiles_dir: str | os.PathLike) -> list[Tile]:
    """All tiles under ``tiles_dir``, sorted by id (see the module docstring)."""
    from seglab.data import manifest as data

    d = _tiles_folder(tiles_dir)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise SeglabError(f"--tiles {d}: no .tif/.tiff tiles found (empty folder?)")
    if any(CHANNEL_RE.search(p.name) for p in files):
        manifest, audit = data.discover(d, check_files=False)
        if audit.get("n_unpaired"):
            print(f"seglab predict: warning: {audit['n_unpaired']} tiles lack a DAPI or marker channel and are "
                  f"skipped, e.g. {audit['unpaired'][0]['tile_id']}", file=sys.stderr)
        tiles = [Tile(r.tile_id, (r.dapi_path, r.marker_path)) for r in manifest.itertuples()]
    else:
        seen: dict[str, Path] = {}
        for p in files:
            tid = p.name.split(".")[0]
            if tid in seen:
                raise SeglabError(f"duplicate tile id {tid}: {seen[tid]} and {p}; rename one")
            seen[tid] = p
        tiles = [Tile(t, (str(p),)) for t, p in seen.items()]
    if not tiles:
        raise SeglabError(f"--tiles {d}: no complete tile found")
    return sorted(tiles, key=lambda t: t.tile_id)


def list_tiles(tiles_dir: str | os.PathLike) -> list[str]:
    """Tile ids under ``tiles_dir`` in the order shards are dealt (sorted)."""
    return [t.tile_id for t in discover_tiles(tiles_dir)]


def parse_shard(shard: str | tuple | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; None -> (0, 1)."""
    if shard is None:
        return 0, 1
    if isinstance(shard, tuple):
        i, n = shard
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
        if not m:
            raise SeglabError(f"--shard {shard!r}: expected I/N, e.g. 0/8 (shards are numbered from 0)")
        i, n = int(m[1]), int(m[2])
    if not (n >= 1 and 0 <= i < n):
        raise SeglabError(f"--shard {i}/{n}: need N >= 1 and 0 <= I < N (e.g. $SLURM_ARRAY_TASK_ID/8)")
    return i, n


def shard_of(index: int, n_shards: int) -> int:
    """The shard that takes the ``index``-th tile of the sorted list: round robin, the one rule of
    ``seglab predict --shard I/N``, the Slurm arrays and the shard checks."""
    return index % n_shards


def shard_slice(items: Sequence, shard) -> list:
    """The items of shard I of N (``"I/N"`` or (I, N)): indices I, I+N, ... by :func:`shard_of`."""
    i, n = parse_shard(shard)
    return [x for k, x in enumerate(items) if shard_of(k, n) == i]


# --------------------------------------------------------------------------------------
# the predict loop
# --------------------------------------------------------------------------------------

def mask_complete(path: Path) -> bool:
    """A mask file that reads back whole (an interrupted copy or a foreign file does not)."""
    if not path.is_file():
        return False
    try:
        import tifffile

        arr = tifffile.imread(path)
        return arr.ndim >= 2 and np.issubdtype(arr.dtype, np.integer)
    except Exception:  # noqa: BLE001
        return False


def write_mask(path, mask: np.ndarray) -> Path:
    """Atomically write labels as a compressed TIFF (uint16, or uint32 beyond 65,535 objects)."""
    import tifffile

    mask = models.as_label_dtype(mask)
    with io.atomic_path(path) as tmp:
        tifffile.imwrite(tmp, mask, compression="zlib")
    return Path(path)


def table_name(shard) -> str:
    i, n = parse_shard(shard)
    return f"tiles_shard-{i}-of-{n}.tsv"


def _batches(items: Sequence, size: int) -> Iterator[list]:
    for k in range(0, len(items), size):
        yield list(items[k:k + size])


def predict(model: models.Model | str, tiles_dir, out_dir, mask: MaskSettings | None = None, *, shard=None,
            batch_tiles: int = 8, batch_size: int | None = None, save_network_outputs: bool = False,
            progress: bool = True, gpu: bool | None = None) -> pd.DataFrame:
    """Segment the tiles of one shard into ``out_dir``; returns the per-tile table.

    Parameters
    ----------
    model : a loaded Model or a spec for ``seglab.segment.models.load``.
    tiles_dir : tiles folder (see the module docstring).
    out_dir : output folder (created).
    shard : ``"I/N"`` or (I, N); None = all tiles.
    mask : :class:`~seglab.config.settings.MaskSettings` (diameter, thresholds, min size);
        None: the defaults (``seglab predict`` takes them from the profile's params).
    batch_tiles : tiles loaded and sent through cellpose together (same shape
        and diameter share network batches).
    batch_size : network tiles (bsize x bsize crops) per forward pass; None: the model's default
        (``Model.default_batch_size``).
    save_network_outputs : also write ``outputs/<tile>.npz``.

    Returns
    -------
    DataFrame with columns tile, shard, n_cells, seconds, diameter_px, mask_file, status.
    """
    if isinstance(model, (str, os.PathLike)):
        model = models.load(model, gpu=gpu)
    mask = MaskSettings() if mask is None else mask
    i, n = parse_shard(shard)
    tiles = shard_slice(discover_tiles(tiles_dir), (i, n))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / table_name((i, n))
    rows, todo = _finished_rows(tiles, out, table_path, f"{i}/{n}", save_network_outputs)

    def flush():
        df = pd.DataFrame([rows[t.tile_id] for t in tiles if t.tile_id in rows], columns=TABLE_COLUMNS)
        io.write_table(table_path, df)
        return df

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tiles), initial=len(tiles) - len(todo), desc=f"predict {i}/{n}", unit="tile",
                   file=sys.stderr)
    last_flush = time.time()
    try:
        for batch in _batches(todo, max(1, int(batch_tiles))):
            t0 = time.time()
            results = _segment_batch(model, batch, mask, batch_size)
            sec = (time.time() - t0) / len(batch)
            for t, (mm, oo, d) in zip(batch, results):
                if save_network_outputs and oo is not None:
                    dynamics.save_outputs(out / "outputs" / f"{t.tile_id}.npz", oo)
                write_mask(out / f"{t.tile_id}.tif", mm)
                rows[t.tile_id] = {"tile": t.tile_id, "shard": f"{i}/{n}", "n_cells": int(mm.max() and len(np.unique(mm)) - 1),
                                   "seconds": round(sec, 4), "diameter_px": d, "mask_file": f"{t.tile_id}.tif",
                                   "status": "done"}
            del results
            if bar is not None:
                bar.update(len(batch))
            if time.time() - last_flush > 30:
                flush()
                last_flush = time.time()
    finally:
        if bar is not None:
            bar.close()
        df = flush()
    return df


TABLE_COLUMNS = ["tile", "shard", "n_cells", "seconds", "diameter_px", "mask_file", "status"]


def _finished_rows(tiles: Sequence[Tile], out: Path, table_path: Path, shard_label: str,
                   need_outputs: bool) -> tuple[dict[str, dict], list[Tile]]:
    """The table rows of the tiles whose mask is already complete in ``out`` (kept from the previous
    table, or counted from the mask), and the tiles still to segment."""
    previous = {}
    if table_path.is_file():
        try:
            prev = pd.read_csv(table_path, sep="\t", dtype={"tile": str})
            previous = {r["tile"]: r for r in prev.to_dict("records")}
        except Exception:  # noqa: BLE001 - an unreadable table is rebuilt
            previous = {}
    rows: dict[str, dict] = {}
    todo = []
    for t in tiles:
        mpath = out / f"{t.tile_id}.tif"
        need_out = need_outputs and not (out / "outputs" / f"{t.tile_id}.npz").is_file()
        if not mask_complete(mpath) or need_out:
            todo.append(t)
            continue
        old = previous.get(t.tile_id)
        if old is not None and old.get("status") == "done":
            rows[t.tile_id] = {**old, "shard": shard_label}
        else:
            import tifffile

            m = tifffile.imread(mpath)
            rows[t.tile_id] = {"tile": t.tile_id, "shard": shard_label, "n_cells": int(np.count_nonzero(np.unique(m))),
                               "seconds": np.nan, "diameter_px": np.nan, "mask_file": mpath.name, "status": "skipped"}
    return rows, todo


def _segment_batch(model: models.Model, batch: Sequence[Tile], mask: MaskSettings,
                   batch_size: int | None) -> list[tuple[np.ndarray, dict | None, float | None]]:
    """(mask (Y, X), network outputs or None, diameter px or None) per tile of ``batch``.

    The diameter is resolved per tile first, then one segment call runs per distinct diameter,
    so tiles of the same shape share network batches.
    """
    images = [t.load() for t in batch]
    diams = [model.resolve_diameter(models.Model.as_network_input(x, name=t.tile_id), mask.diameter_px)
             if model.kind == "cellpose" or mask.diameter_px == DIAMETER_AUTO else None
             for t, x in zip(batch, images)]
    groups: dict = {}
    for k, d in enumerate(diams):
        groups.setdefault(None if d is None else float(d), []).append(k)
    res: dict = {}
    for d, idx in groups.items():
        # resolved above: None means no rescaling
        at_d = mask.replace(diameter_px=DIAMETER_NATIVE if d is None else d)
        if model.kind == "cellpose":
            m, o = model.segment([images[k] for k in idx], at_d, batch_size=batch_size, return_outputs=True)
        else:
            m, o = model.segment([images[k] for k in idx], at_d), [None] * len(idx)
        for k, mm, oo in zip(idx, m, o):
            res[k] = (mm, oo, diams[k])
    return [res[k] for k in range(len(batch))]
