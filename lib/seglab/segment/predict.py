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
    one row per tile of the shard: tile, shard ("I/N"), n_cells, seconds (the tile's share of
    its batch's reading and network pass plus its own masks and writing; the pipeline overlaps
    them with other tiles', so the column sums to more than the wall time), diameter_px,
    mask_file, status, model_id, unused_channels, reason. ``status``: ``done`` (segmented,
    by this run or an earlier one), ``skipped`` (its mask was found complete without a table
    row, and counted), ``failed`` (unreadable with ``--keep-going``; ``reason`` says why; no mask).
``predict.json``
    what made the folder: ``format`` (:data:`RECORD_FORMAT`), ``model_id``
    (:func:`seglab.segment.models.model_id`), ``model_spec``, ``settings`` (the
    MaskSettings dict) and ``tiles_dir`` (resolved). Created once, atomically and only if
    absent, so the shards of a Slurm array writing into one folder at once agree on it or
    are refused. ``.predict.lock`` serialises those claims (flock, where the file system
    has it).
``objects/<tile>.csv`` (with a curation classifier, ``classifier=``)
    one row per object of the tile's mask: :func:`seglab.curate.features.object_features`
    (object_id from the tile id and the object's geometry, morphology in um, intensities) with
    ``classifier_confidence`` (probability of a real cell) and ``kept`` (confidence >=
    ``classifier_threshold``). The masks stay the raw ones; ``predict.json`` records the
    classifier's sha256 and the threshold, so a folder filtered by another classifier is refused.
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

Pipeline
--------
The network and the masks overlap: the main thread loads a batch and runs the network on it
(cellpose's eval without its dynamics), while one background thread rebuilds the previous
batch's masks from the network outputs (:func:`dynamics.masks_from_outputs`, the same
cellpose dynamics eval runs, on the model's device: equal masks) and writes them, in tile
order. A queue of :data:`PIPELINE_DEPTH` batch between them bounds memory to about three
batches (one in the network, one waiting, one in the mask thread). An error in either stage
stops the run with that error once the thread has stopped; the batches the network finished
before an error in the main thread are finished first (as the sequential loop had done),
Ctrl-C stops the thread after its current tile. ``pipeline=False`` runs today's sequential
loop (eval computes the masks), for comparison (bench/bench_predict.py).

``keep_going=True`` (``--keep-going``) skips tiles that cannot be read and lists them as
``failed``; without it the first unreadable tile stops the run with one line naming it.
``seglab predict`` then exits with :data:`EXIT_TILES_FAILED`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.config.settings import DIAMETER_AUTO, DIAMETER_NATIVE, MaskSettings
from seglab.core import io, paths
from seglab.segment import models
from seglab.segment import dynamics

CHANNEL_RE = re.compile(r"^(?P<tile_id>.+)_(?P<channel>c\d+)\.tiff?$", re.IGNORECASE)
TIFF_SUFFIXES = (".tif", ".tiff")
DAPI_CHANNEL = "c0"
MARKER_CHANNELS = ("c1", "c2")   # the first present is the marker

RECORD_FILE = "predict.json"
# bump when the record's keys or what a mask means for the same record change
RECORD_FORMAT = 1
# what must agree to resume; "classifier" is absent (None) in a folder filtered by none
RECORD_KEYS = ("format", "model_id", "settings", "tiles_dir", "classifier")
OBJECTS_DIR = "objects"
LOCK_FILE = ".predict.lock"

EXIT_TILES_FAILED = 3   # seglab predict --keep-going skipped at least one tile
# batches queued between the network and the mask thread beyond the one the thread is finishing:
# 1 keeps the network busy while memory holds ~3 batches (network, queue, masks)
PIPELINE_DEPTH = 1


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
    stem = paths.strip_suffix(path, TIFF_SUFFIXES)
    return Path(path).name if stem is None else stem


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
    if rec.get("classifier") != other.get("classifier"):
        c = rec.get("classifier")
        parts.append("no classifier" if not c else
                     f"classifier {str(c.get('sha256'))[:12]} at threshold {c.get('threshold')}")
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
    ids = set(tile_ids)
    tables = list(out.glob("tiles_shard-*-of-*.tsv"))
    for table in tables:
        with contextlib.suppress(Exception):  # a damaged table: the tile ids below still go
            ids |= set(pd.read_csv(table, sep="\t", dtype={"tile": str}, usecols=["tile"])["tile"])
    if old and old.get("tiles_dir") and Path(old["tiles_dir"]).is_dir():
        with contextlib.suppress(SeglabError, OSError):
            ids |= {t.tile_id for t in discover_tiles(old["tiles_dir"])}
    for tid in ids:
        for f in (out / f"{tid}.tif", out / "outputs" / f"{tid}.npz", out / OBJECTS_DIR / f"{tid}.csv"):
            f.unlink(missing_ok=True)
    io.clean_temps(out, [f"{t}.tif" for t in ids] + [t.name for t in tables])
    for f in [*tables, out / MERGED_TABLE, out / CHECK_FILE]:
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


# the files the merge step of sharded inference (seglab.segment.shards) adds to a predict folder
CHECK_FILE = "shards_check.json"   # what the merge found: every tile exactly once, or not
MERGED_TABLE = "tiles.tsv"          # the shard tables in one

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
            keep_going: bool = False, pipeline: bool = True, mask_device: str | None = None,
            classifier=None, classifier_threshold: float = 0.5, pixel_size_um: float | None = None,
            allow_failed_gate: bool = False) -> pd.DataFrame:
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
    pipeline : masks of one batch are made in a background thread while the network runs on
        the next (module docstring, Pipeline); False: one batch after the other, eval making
        the masks. The masks are the same.
    mask_device : torch device of the pipeline's mask dynamics (``"cpu"``, ``"cuda"``); None:
        the model's, as cellpose's eval does (the masks then equal ``Model.segment``'s).
    classifier : a curation classifier (path or :class:`seglab.curate.store.Classifier`; one that
        failed its gate is refused unless ``allow_failed_gate``): ``objects/<tile>.csv`` per tile
        with ``classifier_confidence`` and ``kept`` (>= ``classifier_threshold``, a fraction).
        ``pixel_size_um``: um per px of the tiles (default: the classifier's training pixel size).
        None: no objects tables, the folder is what it was without this option.

    Returns
    -------
    DataFrame with columns :data:`ALL_COLUMNS`, one row per tile of the shard. ``attrs`` holds
    this call's work: ``n_segmented``, ``n_reused`` (complete before), ``n_failed`` and
    ``failed`` ({tile: reason}); with a classifier also ``n_objects_before`` and
    ``n_objects_after`` (objects of the shard's tiles before / after the filter).
    """
    mask = MaskSettings() if mask is None else mask
    i, n = parse_shard(shard)
    all_tiles = discover_tiles(tiles_dir, warn=True)
    out = _out_folder(out_dir, tiles_dir)
    if isinstance(model, (str, os.PathLike)):
        model = models.load(model, gpu=gpu)
    device = _mask_device(model, mask_device)
    mid = models.model_id(model)
    record = folder_record(mid, mask, tiles_dir, getattr(model, "spec", None))
    clf = None
    if classifier is not None:
        from seglab.curate import apply as curate_apply
        from seglab.curate.store import as_classifier

        clf = as_classifier(classifier, allow_failed_gate=allow_failed_gate)
        pixel_size_um = pixel_size_um if pixel_size_um is not None else clf.sidecar.get("pixel_size_um")
        if pixel_size_um is None:
            raise SeglabError(f"{clf.path}: records no pixel size; give the tiles' pixel_size_um (--pixel-size-um)")
        record["classifier"] = curate_apply.record(clf, classifier_threshold)
        record["classifier_path"] = str(Path(clf.path).resolve())
        record["pixel_size_um"] = float(pixel_size_um)
    claim_folder(out, record, tile_ids=[t.tile_id for t in all_tiles], overwrite=overwrite)
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

    bar = _progress_bar(len(tiles), len(tiles) - len(todo), f"predict {i}/{n}") if progress else None
    stage = _MaskStage(out, mask, f"{i}/{n}", mid, rows, flush, bar, save_network_outputs, device)
    try:
        _segment_tiles(todo, model, mask, stage, failed, batch_tiles=batch_tiles, batch_size=batch_size,
                       keep_going=keep_going, pipeline=pipeline)
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
    if clf is not None:
        before, after = write_objects(out, [t for t in tiles if t.tile_id not in failed], clf,
                                      classifier_threshold, float(pixel_size_um))
        df.attrs.update(n_objects_before=before, n_objects_after=after)
    return df


def write_objects(out: Path, tiles: Sequence[Tile], clf, threshold: float, pixel_size_um: float) -> tuple[int, int]:
    """``objects/<tile>.csv`` of each tile with a complete mask (resumable: a complete table is kept):
    features, ``classifier_confidence`` and ``kept``. Returns the objects before and after the filter
    (px of the masks are never changed)."""
    import tifffile

    from seglab.curate import apply as curate_apply
    from seglab.curate.features import channel_names_for, object_features

    folder = out / OBJECTS_DIR
    folder.mkdir(exist_ok=True)
    io.clean_temps(folder, [f"{t.tile_id}.csv" for t in tiles])
    before = after = 0
    for t in tiles:
        path = folder / f"{t.tile_id}.csv"
        mpath = out / f"{t.tile_id}.tif"
        if not mask_complete(mpath):
            continue
        if path.is_file():
            tab = pd.read_csv(path)
        else:
            image = t.load()
            labels = tifffile.imread(mpath).astype(np.int64)
            ch = channel_names_for(clf.sidecar.get("channels"), image.shape[0])
            feats = object_features(labels, image, pixel_size_um, ch, t.tile_id)
            tab = curate_apply.apply(clf, feats, threshold)
            io.write_table(path, tab.assign(tile=t.tile_id))
        before += len(tab)
        after += int(tab[curate_apply.KEPT].astype(bool).sum())
    return before, after


def _progress_bar(total: int, done: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="tile", file=sys.stderr)


def _mask_device(model: models.Model, mask_device: str | None):
    """The torch device of the mask dynamics (None for a classical model, which has none)."""
    if model.kind != "cellpose":
        return None
    if mask_device is None:
        return model.device  # what cellpose's eval uses: the pipeline's masks equal eval's
    import torch  # deferred: importing torch + cellpose costs seconds

    try:
        dev = torch.device(mask_device)
    except (RuntimeError, TypeError):
        raise SeglabError(f"mask_device {mask_device!r}: use 'cpu', 'cuda' or None (the model's device)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SeglabError(f"mask_device {mask_device!r}: torch sees no CUDA GPU; use 'cpu' or None")
    return dev


@dataclass
class _Job:
    """One batch on its way from the network (main thread) to its masks and files (the mask stage)."""

    batch: list      # the batch's tiles, read or not
    loaded: list     # the tiles that were read, in the order of ``results``
    results: list    # per loaded tile: (mask (Y, X) or None, network outputs or None, diameter px or None)
    seconds: float   # wall time of reading and the network pass, whole batch
    failed: dict     # {tile id: reason} of the batch's unreadable tiles (keep_going)


class _MaskStage:
    """Finishes batches in tile order: masks from network outputs where the network pass left
    them out, network outputs and masks written, table rows, progress and the 30 s table flush.
    Only this stage writes ``rows`` while a run is on, so the mask thread needs no lock."""

    def __init__(self, out: Path, mask: MaskSettings, label: str, mid: str, rows: dict, flush, bar,
                 save_outputs: bool, device):
        self.out, self.mask, self.label, self.mid = out, mask, label, mid
        self.rows, self.flush, self.bar = rows, flush, bar
        self.save_outputs, self.device = save_outputs, device
        self.last_flush = time.time()

    def __call__(self, job: _Job, cancel: threading.Event) -> None:
        for t in job.batch:
            if t.tile_id in job.failed:
                self.rows[t.tile_id] = _row(t, self.label, self.mid, status="failed", reason=job.failed[t.tile_id])
        share = job.seconds / len(job.batch)
        for t, (mm, oo, d) in zip(job.loaded, job.results):
            if cancel.is_set():  # Ctrl-C: the rest of the batch is redone by the next run
                return
            t0 = time.time()
            if mm is None:
                mm = dynamics.masks_from_outputs(oo, self.mask, device=self.device)
            if self.save_outputs and oo is not None:
                dynamics.save_outputs(self.out / "outputs" / f"{t.tile_id}.npz", oo)
            write_mask(self.out / f"{t.tile_id}.tif", mm)
            self.rows[t.tile_id] = _row(t, self.label, self.mid, n_cells=int(mm.max() and len(np.unique(mm)) - 1),
                                        seconds=round(share + time.time() - t0, 4), diameter_px=d,
                                        mask_file=f"{t.tile_id}.tif", status="done")
        if self.bar is not None:
            self.bar.update(len(job.batch))
        if time.time() - self.last_flush > 30:
            self.flush()
            self.last_flush = time.time()


class _Pipeline:
    """Runs a mask stage on the jobs it is given: in one background thread fed through a queue of
    ``depth`` jobs (``threaded``), else at once in the caller's thread.

    A thread rather than a process: the network's torch kernels and most of cellpose's dynamics
    (torch, scipy, fastremap) release the GIL (measured on the 2-core CPU, one torch thread: the
    network beside a thread running the dynamics nonstop is 2-7% slower, 1.95 cores busy; a
    process in its place did no better), the outputs need no copying, and a process would import
    torch and cellpose again (13-17 s here) and, on a GPU, need its own CUDA context. The thread's first error is kept and raised in the caller's thread by
    :meth:`check`; after it the thread drains the queue without work, so the producer never blocks.
    """

    def __init__(self, stage, *, threaded: bool, depth: int = PIPELINE_DEPTH, device=None):
        self.stage, self.threaded, self.device = stage, threaded, device
        self.error: BaseException | None = None
        self.cancel = threading.Event()
        if threaded:
            self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
            self.thread = threading.Thread(target=self._run, name="seglab-predict-masks", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        with _side_stream(self.device):
            while (job := self.queue.get()) is not None:
                if self.error is None and not self.cancel.is_set():
                    try:
                        self.stage(job, self.cancel)
                    except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                        self.error = exc

    def submit(self, job: _Job) -> None:
        self.check()
        if self.threaded:
            self.queue.put(job)
        else:
            self.stage(job, self.cancel)

    def check(self) -> None:
        """Raise the mask thread's error, if it had one."""
        if self.error is not None:
            raise self.error

    def close(self, *, cancel: bool = False) -> None:
        """Finish the queued jobs (or, with ``cancel``, stop after the current tile) and join the thread."""
        if not self.threaded or not self.thread.is_alive():
            return
        if cancel:
            self.cancel.set()
        self.queue.put(None)
        self.thread.join()


def _side_stream(device):
    """On a GPU the mask thread's kernels go to a CUDA stream of their own, so that they run beside
    the network's (default stream) instead of queueing behind them; a no-op elsewhere."""
    if device is None or device.type != "cuda":
        return contextlib.nullcontext()
    import torch  # deferred: importing torch + cellpose costs seconds

    return torch.cuda.stream(torch.cuda.Stream(device))


def _segment_tiles(todo: Sequence[Tile], model: models.Model, mask: MaskSettings, stage: _MaskStage, failed: dict,
                   *, batch_tiles: int, batch_size: int | None, keep_going: bool, pipeline: bool) -> None:
    """Segment ``todo`` batch by batch: read and run the network here, hand each batch to ``stage``
    (in a background thread with ``pipeline``); ``failed`` collects {tile: reason} of unreadable tiles."""
    # masks in eval (the sequential loop) unless the mask thread makes them, or another device does
    in_eval = not pipeline and stage.device == model.device
    pipe = _Pipeline(stage, threaded=pipeline, device=stage.device)
    # the cellpose logger is held quiet for the whole run: quiet_cellpose entered and left by two
    # threads at once could restore the wrong level and leave it silenced
    with models.quiet_cellpose():
        try:
            for batch in _batches(todo, max(1, int(batch_tiles))):
                pipe.check()  # a failed mask stage stops the network before its next batch
                t0 = time.time()
                mine: dict = {}
                loaded, images = _load_batch(batch, keep_going, mine)
                failed.update(mine)
                results = (_segment_batch(model, loaded, images, mask, batch_size, compute_masks=in_eval)
                           if loaded else [])
                del images
                pipe.submit(_Job(batch, loaded, results, time.time() - t0, mine))
        except Exception:
            # the batches the network finished are finished (the sequential loop had written them);
            # the mask thread's error concerns an earlier tile than this one, so it is reported first
            pipe.close()
            pipe.check()
            raise
        except BaseException:  # Ctrl-C: stop after the current tile
            pipe.close(cancel=True)
            raise
        pipe.close()
        pipe.check()


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
                   batch_size: int | None, *, compute_masks: bool = True
                   ) -> list[tuple[np.ndarray | None, dict | None, float | None]]:
    """(mask (Y, X), network outputs or None, diameter px or None) per tile of ``batch``.

    ``images``: the tiles' pixels, float32 (C, Y, X). The diameter is resolved per tile first,
    then one segment call runs per distinct diameter, so tiles of the same shape share network
    batches. ``compute_masks=False``: a network model's masks are None (the network pass only;
    the pipeline's mask thread makes them from the outputs); a classical model's are made anyway.
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
            m, o = model.segment([images[k] for k in idx], at_d, batch_size=batch_size, return_outputs=True,
                                 compute_masks=compute_masks)
        else:
            m, o = model.segment([images[k] for k in idx], at_d), [None] * len(idx)
        for k, mm, oo in zip(idx, m, o):
            res[k] = (mm, oo, diams[k])
    return [res[k] for k in range(len(batch))]
