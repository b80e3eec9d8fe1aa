"""Batched, resumable, shardable inference: ``seglab predict --model SPEC --tiles DIR --out DIR``.

Tiles
-----
``DIR`` is any folder of TIFF images (searched recursively; a folder holding ``tiles/`` means
that ``tiles/``), in one of two layouts:

- channel files, ``<tile>_c<k>.tif``: ``_c0`` is DAPI, ``_c1`` the marker (``_c2`` when a tile
  has no ``_c1``). A tile with both ``_c1`` and ``_c2`` uses ``_c1``; the unused channel
  files are named in the table's ``unused_channels`` column and in a warning line. The tile
  id is everything before ``_c<k>``: no donor id or other structure is needed (a study's
  cohort discovery, :func:`seglab.data.manifest.discover`, is where donors are parsed).
- one file per tile, ``<tile>.tif``: (Y, X) or channel-first (C, Y, X), C <= 3.

The tile id keeps every dot except the extension's (``img.001.tif`` -> ``img.001``,
``scan_1.5x.tiff`` -> ``scan_1.5x``), so masks pair with their images by name. Tiles are
taken in sorted order of their id; shard ``I`` of ``N`` takes tiles ``I, I+N, I+2N, ...``
(round robin), so a Slurm array splits thousands of tiles deterministically.

Outputs (in ``--out``)
----------------------
``<tile>.tif``
    instance labels, uint16 (uint32 beyond 65,535 objects), 0 = background,
    written atomically (temporary file + rename).
``tiles_shard-<I>-of-<N>.tsv``
    one row per tile of the shard: tile, shard ("I/N"), n_cells, seconds (wall time of
    the tile's share of its batch), diameter_px, mask_file, status, model_id,
    unused_channels, reason. ``status``: ``done`` (segmented, by this run or an earlier
    one), ``skipped`` (its mask was found complete without a table row, and counted),
    ``failed`` (unreadable with ``--keep-going``; ``reason`` says why; no mask).
``predict.json``
    what made the folder: ``format`` (:data:`RECORD_FORMAT`), ``model_id``
    (:func:`seglab.segment.models.model_id`), ``model_spec``, ``settings`` (the
    MaskSettings dict) and ``tiles_dir`` (resolved). Created once, atomically and only if
    absent, so the shards of a Slurm array writing into one folder at once agree on it or
    are refused. ``.predict.lock`` serialises those claims (flock, where the file system
    has it).
``outputs/<tile>.npz`` (with ``dynamics.save_outputs``)
    the network outputs: ``dP`` (2, Y, X) float32 flows, ``cellprob`` (Y, X)
    float32 logits, ``niter``. :func:`dynamics.masks_from_outputs` rebuilds masks from
    them at any threshold without running the network again.

A rerun with the same model, settings and tiles folder resumes: it skips tiles whose mask
is complete and redoes those whose file is missing or unreadable (and removes the
temporary files a killed run left). A run with another model, other settings or another
tiles folder is refused, naming what is there and what was asked; ``overwrite=True``
(``--overwrite``) deletes the folder's predictions first: every mask, network output and
shard table of the other maker, in all shards (a shard that kept its old masks would mix
two models in one folder). A later shard of the same overwriting run finds the new
``predict.json`` and resumes, so every task of an array may carry ``--overwrite``.
Only one batch of tiles is in memory at a time.

``keep_going=True`` (``--keep-going``) skips tiles that cannot be read and lists them as
``failed``; without it the first unreadable tile stops the run with one line naming it.
``seglab predict`` then exits with :data:`EXIT_TILES_FAILED`.
"""

from __future__ import annotations

import contextlib
import json
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

CHANNEL_RE = re.compile(r"^(?P<tile_id>.+)_(?P<channel>c\d+)\.tiff?$", re.IGNORECASE)
TIFF_SUFFIXES = (".tif", ".tiff")
DAPI_CHANNEL = "c0"
MARKER_CHANNELS = ("c1", "c2")   # the first present is the marker

RECORD_FILE = "predict.json"
# bump when the record's keys or what a mask means for the same record change
RECORD_FORMAT = 1
RECORD_KEYS = ("format", "model_id", "settings", "tiles_dir")   # what must agree to resume
LOCK_FILE = ".predict.lock"

EXIT_TILES_FAILED = 3   # seglab predict --keep-going skipped at least one tile


# --------------------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tile:
    """One tile: its id, its channel files (one multi-channel file, or DAPI + marker) and the
    channel tags of files present but not used (e.g. ``("c2",)`` beside a ``c1``)."""

    tile_id: str
    files: tuple
    unused: tuple = ()

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


def tile_id_of(path: str | os.PathLike) -> str:
    """A single-file tile's id: its file name without the .tif/.tiff extension (other dots kept)."""
    name = Path(path).name
    for ext in TIFF_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def discover_tiles(tiles_dir: str | os.PathLike, *, warn: bool = False) -> list[Tile]:
    """All tiles under ``tiles_dir``, sorted by id (see the module docstring).

    ``warn``: print a warning line on stderr for channel files left out (no DAPI or marker
    partner, no channel suffix) and for tiles with unused channel files.
    """
    d = _tiles_folder(tiles_dir)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise SeglabError(f"--tiles {d}: no .tif/.tiff tiles found (empty folder?)")
    if any(CHANNEL_RE.match(p.name) for p in files):
        tiles = _channel_tiles(files, warn)
    else:
        tiles = _single_file_tiles(files)
    if not tiles:
        raise SeglabError(f"--tiles {d}: no complete tile found (a tile of channel files needs "
                          f"<tile>_c0.tif and <tile>_c1.tif or _c2.tif)")
    return sorted(tiles, key=lambda t: t.tile_id)


def _single_file_tiles(files: Sequence[Path]) -> list[Tile]:
    seen: dict[str, Path] = {}
    for p in files:
        tid = tile_id_of(p)
        if tid in seen:
            raise SeglabError(f"duplicate tile id {tid}: {seen[tid]} and {p}; rename one")
        seen[tid] = p
    return [Tile(t, (str(p),)) for t, p in seen.items()]


def _channel_tiles(files: Sequence[Path], warn: bool) -> list[Tile]:
    """Tiles of ``<tile>_c<k>.tif`` files: DAPI ``c0`` + the first marker channel present."""
    groups: dict[str, dict[str, Path]] = {}
    loose = []
    for p in files:
        m = CHANNEL_RE.match(p.name)
        if not m:
            loose.append(p.name)
            continue
        tid, ch = m["tile_id"], m["channel"].lower()
        slot = groups.setdefault(tid, {})
        if ch in slot:
            raise SeglabError(f"duplicate tile id {tid}: channel {ch} is both {slot[ch]} and {p}; remove one copy")
        slot[ch] = p.resolve()
    tiles, unpaired = [], []
    for tid, slot in groups.items():
        marker = next((c for c in MARKER_CHANNELS if c in slot), None)
        if DAPI_CHANNEL not in slot or marker is None:
            unpaired.append(tid)
            continue
        unused = tuple(sorted(set(slot) - {DAPI_CHANNEL, marker}, key=lambda c: int(c[1:])))
        tiles.append(Tile(tid, (str(slot[DAPI_CHANNEL]), str(slot[marker])), unused))
    if warn:
        _warn_left_out(sorted(unpaired), loose, sorted(tiles, key=lambda t: t.tile_id))
    return tiles


def _warn_left_out(unpaired: list[str], loose: list[str], tiles: list[Tile]) -> None:
    """One warning line per kind of channel file a folder of channel files does not use."""
    def say(text: str) -> None:
        print(f"seglab predict: warning: {text}", file=sys.stderr)

    def many(n: int, one: str, more: str) -> str:
        return f"{n} {one if n == 1 else more}"

    both = [t.tile_id for t in tiles if "c2" in t.unused]
    extra = [t.tile_id for t in tiles if set(t.unused) - {"c2"}]
    if unpaired:
        say(f"{many(len(unpaired), 'tile lacks', 'tiles lack')} a _c0 DAPI or a _c1/_c2 marker file and "
            f"{'is' if len(unpaired) == 1 else 'are'} skipped, e.g. {unpaired[0]}")
    if loose:
        say(f"{many(len(loose), '.tif file has', '.tif files have')} no _c<k> channel suffix and "
            f"{'is' if len(loose) == 1 else 'are'} left out (this is a folder of channel files), e.g. {loose[0]}")
    if both:
        say(f"{many(len(both), 'tile has', 'tiles have')} _c1 and _c2 files: _c1 is used as the marker, _c2 is "
            f"not (column unused_channels of the table), e.g. {both[0]}")
    if extra:
        say(f"{many(len(extra), 'tile has', 'tiles have')} channel files beyond _c0-_c2, which are not used "
            f"(column unused_channels of the table), e.g. {extra[0]}")


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
# what made an output folder
# --------------------------------------------------------------------------------------

def folder_record(model_id: str, mask: MaskSettings, tiles_dir, model_spec: str | None = None) -> dict:
    """The ``predict.json`` of a folder of ``model_id``'s masks of ``tiles_dir`` with ``mask``,
    as it reads back from the file."""
    rec = {"format": RECORD_FORMAT, "model_id": model_id, "settings": mask.as_dict(),
           "tiles_dir": str(_tiles_folder(tiles_dir).resolve())}
    if model_spec is not None:
        rec["model_spec"] = str(model_spec)
    return json.loads(io.json_text(rec))


def read_record(out: Path) -> dict | None:
    """The folder's ``predict.json``; None when there is none, {} when it cannot be read."""
    f = Path(out) / RECORD_FILE
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _same_maker(old: dict, new: dict) -> bool:
    return all(old.get(k) == new.get(k) for k in RECORD_KEYS)


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.predict.lock`` (flock) so that shards claiming one folder at once take turns.
    Where the file system has no locks (some Lustre mounts) the claim still cannot race into two
    makers: the record is created only if absent (a hard link)."""
    import fcntl

    with io.naming_target(out, out / LOCK_FILE):
        fh = open(out / LOCK_FILE, "a")
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        fh.close()  # releases the lock


def claim_folder(out: Path, record: dict, *, tile_ids: Sequence[str] = (), overwrite: bool = False) -> str:
    """Make ``out`` a folder of ``record``'s predictions, or refuse.

    Returns ``"new"`` (record written), ``"resumed"`` (the folder's record is this one) or
    ``"overwritten"`` (another maker's predictions deleted, record replaced; ``overwrite``).
    Raises SeglabError naming what made the folder and what was asked when they differ and
    ``overwrite`` is False, and for a folder holding predictions without a record (an older
    seglab's or copied by hand) whose maker is unknown. ``tile_ids``: every tile of the run
    (all shards), whose masks in ``out`` count as predictions.
    """
    out = Path(out)
    with io.naming_target(out):
        out.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        io.clean_temps(out, [RECORD_FILE])
        old = read_record(out)
        if old is None and not _holds_predictions(out, tile_ids):
            try:
                io.write_json(out / RECORD_FILE, record, overwrite=False)
                return "new"
            except FileExistsError:  # another shard created it first (no lock on this file system)
                old = read_record(out)
        if old is not None and _same_maker(old, record):
            return "resumed"
        if not overwrite:
            raise SeglabError(_refusal(out, old, record))
        _clear_predictions(out, old, tile_ids)
        io.write_json(out / RECORD_FILE, record)
        return "overwritten"


def _holds_predictions(out: Path, tile_ids: Sequence[str]) -> bool:
    return any(out.glob("tiles_shard-*-of-*.tsv")) or any((out / f"{t}.tif").is_file() for t in tile_ids)


def _describe(rec: dict | None, other: dict) -> str:
    """What made (or would make) a folder, as far as it differs from ``other``."""
    if rec is None:
        return ("an unknown maker (masks or shard tables but no predict.json: an older seglab, or "
                "copied by hand)")
    if not rec:
        return f"an unknown maker ({RECORD_FILE} unreadable)"
    parts = []
    if rec.get("model_id") != other.get("model_id") or rec.get("format") != other.get("format"):
        mid = str(rec.get("model_id"))
        parts.append(f"model {rec.get('model_spec', '?')} (model_id {mid if len(mid) <= 12 else mid[:12] + '…'})")
    mine, theirs = rec.get("settings") or {}, other.get("settings") or {}
    diff = [f"{k}={mine.get(k)}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if diff:
        parts.append("settings " + ", ".join(diff))
    if rec.get("tiles_dir") != other.get("tiles_dir"):
        parts.append(f"tiles {rec.get('tiles_dir')}")
    if rec.get("format") != other.get("format"):
        parts.append(f"format {rec.get('format')}")
    return ", ".join(parts)


def _refusal(out: Path, old: dict | None, record: dict) -> str:
    was = _describe(old, record)
    return (f"{out}: this folder holds predictions {'of' if not old else 'made with'} {was}; asked for "
            f"{_describe(record, old or {})}. Rerun with --overwrite (overwrite=True) to delete its masks "
            f"and predict again, or give another --out folder")


def _clear_predictions(out: Path, old: dict | None, tile_ids: Sequence[str]) -> None:
    """Delete the masks, network outputs and tables of every shard of another maker's run."""
    from seglab.segment import shards

    ids = set(tile_ids)
    tables = list(out.glob("tiles_shard-*-of-*.tsv"))
    for table in tables:
        with contextlib.suppress(Exception):  # a damaged table: the tile ids below still go
            ids |= set(pd.read_csv(table, sep="\t", dtype={"tile": str}, usecols=["tile"])["tile"])
    if old and old.get("tiles_dir") and Path(old["tiles_dir"]).is_dir():
        with contextlib.suppress(SeglabError, OSError):
            ids |= {t.tile_id for t in discover_tiles(old["tiles_dir"])}
    for tid in ids:
        for f in (out / f"{tid}.tif", out / "outputs" / f"{tid}.npz"):
            f.unlink(missing_ok=True)
    io.clean_temps(out, [f"{t}.tif" for t in ids] + [t.name for t in tables])
    for f in [*tables, out / "tiles.tsv", out / shards.CHECK_FILE]:
        f.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# the predict loop
# --------------------------------------------------------------------------------------

def mask_complete(path: Path) -> bool:
    """A mask file that reads back whole (an interrupted copy or a foreign file does not)."""
    if not path.is_file():
        return False
    try:
        import tifffile

        with io.quiet_tiff_log():
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


# Columns every shard table has, old or new: what readers (cohort_prediction.collect_table,
# the merge step) select. Tables written now add EXTRA_COLUMNS.
TABLE_COLUMNS = ["tile", "shard", "n_cells", "seconds", "diameter_px", "mask_file", "status"]
EXTRA_COLUMNS = ["model_id", "unused_channels", "reason"]
ALL_COLUMNS = TABLE_COLUMNS + EXTRA_COLUMNS


def _batches(items: Sequence, size: int) -> Iterator[list]:
    for k in range(0, len(items), size):
        yield list(items[k:k + size])


def _out_folder(out_dir, tiles_dir) -> Path:
    """``out_dir`` created; SeglabError when it is a file, the tiles folder or inside it (its masks
    would replace the images, or be read as tiles by the next run)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SeglabError(f"--out {out}: is a file, not a folder; give a folder for the masks (created if missing)")
    tiles = _tiles_folder(tiles_dir).resolve()
    where = out.resolve()
    if where == tiles or tiles in where.parents:
        raise SeglabError(f"--out {out}: is the tiles folder or inside it (the masks <tile>.tif would replace the "
                          f"images or be read as tiles); give a folder outside {tiles}")
    with io.naming_target(out):
        out.mkdir(parents=True, exist_ok=True)
    return out


def predict(model: models.Model | str, tiles_dir, out_dir, mask: MaskSettings | None = None, *, shard=None,
            batch_tiles: int = 8, batch_size: int | None = None, save_network_outputs: bool = False,
            progress: bool = True, gpu: bool | None = None, overwrite: bool = False,
            keep_going: bool = False) -> pd.DataFrame:
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
    overwrite : delete another model's / other settings' predictions in ``out_dir`` first
        (all shards); without it such a folder is refused (see :func:`claim_folder`).
    keep_going : skip tiles that cannot be read (status ``failed``, ``reason``) instead of
        stopping at the first.

    Returns
    -------
    DataFrame with columns :data:`ALL_COLUMNS`, one row per tile of the shard. ``attrs`` holds
    this call's work: ``n_segmented``, ``n_reused`` (complete before), ``n_failed`` and
    ``failed`` ({tile: reason}).
    """
    mask = MaskSettings() if mask is None else mask
    i, n = parse_shard(shard)
    all_tiles = discover_tiles(tiles_dir, warn=True)
    out = _out_folder(out_dir, tiles_dir)
    if isinstance(model, (str, os.PathLike)):
        model = models.load(model, gpu=gpu)
    mid = models.model_id(model)
    claim_folder(out, folder_record(mid, mask, tiles_dir, getattr(model, "spec", None)),
                 tile_ids=[t.tile_id for t in all_tiles], overwrite=overwrite)
    tiles = shard_slice(all_tiles, (i, n))
    table_path = out / table_name((i, n))
    io.clean_temps(out, [f"{t.tile_id}.tif" for t in tiles] + [table_path.name])
    io.clean_temps(out / "outputs", [f"{t.tile_id}.npz" for t in tiles])
    rows, todo = _finished_rows(tiles, out, table_path, f"{i}/{n}", save_network_outputs, mid)
    n_reused, failed = len(rows), {}

    def flush():
        df = pd.DataFrame([rows[t.tile_id] for t in tiles if t.tile_id in rows], columns=ALL_COLUMNS)
        io.write_table(table_path, df)
        return df

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tiles), initial=len(tiles) - len(todo), desc=f"predict {i}/{n}", unit="tile",
                   file=sys.stderr)
    try:
        _segment_tiles(todo, model, mid, f"{i}/{n}", out, mask, rows, failed, flush, bar,
                       batch_tiles=batch_tiles, batch_size=batch_size, save_network_outputs=save_network_outputs,
                       keep_going=keep_going)
    except BaseException:
        # keep the table of the tiles done so far (a resume reads it); a full disk that stopped
        # the run may refuse this write too: the first error is the one to report
        with contextlib.suppress(OSError):
            flush()
        raise
    finally:
        if bar is not None:
            bar.close()
    df = flush()
    df.attrs.update(n_segmented=int(len(df) - n_reused - len(failed)), n_reused=n_reused,
                    n_failed=len(failed), failed=dict(failed))
    return df


def _segment_tiles(todo: Sequence[Tile], model: models.Model, mid: str, label: str, out: Path, mask: MaskSettings,
                   rows: dict, failed: dict, flush, bar, *, batch_tiles: int, batch_size: int | None,
                   save_network_outputs: bool, keep_going: bool) -> None:
    """Segment ``todo`` batch by batch into ``out``, filling ``rows`` ({tile: table row}) and
    ``failed`` ({tile: reason}); ``flush()`` writes the table at most every 30 s on the way."""
    last_flush = time.time()
    for batch in _batches(todo, max(1, int(batch_tiles))):
        t0 = time.time()
        loaded, images = _load_batch(batch, keep_going, failed)
        for t in batch:
            if t.tile_id in failed:
                rows[t.tile_id] = _row(t, label, mid, status="failed", reason=failed[t.tile_id])
        results = _segment_batch(model, loaded, images, mask, batch_size) if loaded else []
        sec = (time.time() - t0) / len(batch)
        for t, (mm, oo, d) in zip(loaded, results):
            if save_network_outputs and oo is not None:
                dynamics.save_outputs(out / "outputs" / f"{t.tile_id}.npz", oo)
            write_mask(out / f"{t.tile_id}.tif", mm)
            rows[t.tile_id] = _row(t, label, mid, n_cells=int(mm.max() and len(np.unique(mm)) - 1),
                                   seconds=round(sec, 4), diameter_px=d, mask_file=f"{t.tile_id}.tif",
                                   status="done")
        del results, images
        if bar is not None:
            bar.update(len(batch))
        if time.time() - last_flush > 30:
            flush()
            last_flush = time.time()


def _row(t: Tile, shard_label: str, model_id: str, **values) -> dict:
    """A table row of tile ``t`` (:data:`ALL_COLUMNS`); missing values NaN / ''."""
    row = {"tile": t.tile_id, "shard": shard_label, "n_cells": np.nan, "seconds": np.nan, "diameter_px": np.nan,
           "mask_file": "", "status": "", "model_id": model_id, "unused_channels": ",".join(t.unused),
           "reason": ""}
    row.update(values)
    return row


def _load_batch(batch: Sequence[Tile], keep_going: bool, failed: dict) -> tuple[list[Tile], list[np.ndarray]]:
    """The tiles of ``batch`` that load and their images, float32 (C, Y, X).

    A tile that cannot be read stops the run with one line naming its file, or, with
    ``keep_going``, goes into ``failed`` ({tile id: reason}) and is left out.
    """
    loaded, images = [], []
    for t in batch:
        try:
            with io.quiet_tiff_log():
                images.append(t.load())
            loaded.append(t)
        except (SeglabError, OSError) as exc:
            reason = " ".join(str(exc).split())  # one line, and a TSV cell
            if not keep_going:
                if isinstance(exc, OSError):
                    raise
                raise SeglabError(f"{reason} (or rerun with --keep-going to skip unreadable tiles and list "
                                  f"them in the table)") from None
            failed[t.tile_id] = reason
    return loaded, images


def _finished_rows(tiles: Sequence[Tile], out: Path, table_path: Path, shard_label: str,
                   need_outputs: bool, model_id: str) -> tuple[dict[str, dict], list[Tile]]:
    """The table rows of the tiles whose mask is already complete in ``out`` (kept from the previous
    table, or counted from the mask), and the tiles still to segment.

    The folder's record (:func:`claim_folder`) vouches that those masks are ``model_id``'s.
    """
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
            keep = {k: old[k] for k in ("n_cells", "seconds", "diameter_px") if k in old}
            rows[t.tile_id] = _row(t, shard_label, model_id, mask_file=mpath.name, status="done", **keep)
        else:
            import tifffile

            m = tifffile.imread(mpath)
            rows[t.tile_id] = _row(t, shard_label, model_id, n_cells=int(np.count_nonzero(np.unique(m))),
                                   mask_file=mpath.name, status="skipped")
    return rows, todo


def _segment_batch(model: models.Model, batch: Sequence[Tile], images: Sequence[np.ndarray], mask: MaskSettings,
                   batch_size: int | None) -> list[tuple[np.ndarray, dict | None, float | None]]:
    """(mask (Y, X), network outputs or None, diameter px or None) per tile of ``batch``.

    ``images``: the tiles' pixels, float32 (C, Y, X). The diameter is resolved per tile first,
    then one segment call runs per distinct diameter, so tiles of the same shape share network
    batches.
    """
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
