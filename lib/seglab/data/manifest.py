"""E0 data: tile discovery, the manifest, donor splits, the coverage audit and training-set export.

A tile is one field of view of one donor stained for one marker, stored as
one TIFF per channel: ``<study>_<donor>_<marker>_<tile>_c0.tif`` (DAPI) and
``..._c1.tif`` (marker). Some tiles store the marker as ``_c2``; discovery
falls back to it and the audit lists those tiles. Instance masks, where
there are any, are ``<masks_dir>/<tile_id>.tif``.

The manifest (a pandas DataFrame, saved as CSV) has one row per paired tile:

============== ==========================================================
tile_id        str, the file name without the channel suffix
donor          int, the donor id parsed from the name (``projid``)
marker         str
dapi_path      absolute path of the DAPI file
marker_path    absolute path of the marker file
marker_channel 'c1', or 'c2' where the fallback was used
mask_path      absolute path of the instance mask, or ''
annotated      bool: the mask is a curated annotation for training/evaluation
split          'train' / 'val' / 'test' for annotated tiles, '' otherwise
============== ==========================================================

Splits are by donor: :func:`check_splits` refuses a split in which a donor
sits on two sides, naming the donor.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.core import io

# <tile_id> = <study>_<donor>_<marker>_<tile>, then _c<k>.tif. The donor group is
# deliberately loose so that a non-numeric id is reported rather than silently skipped.
DEFAULT_PATTERN = r"^(?P<tile_id>(?P<study>[A-Za-z0-9]+)_(?P<donor>[^_]+)_(?P<marker>[^_]+)_(?P<tile>[^_]+))_(?P<channel>c\d+)\.tiff?$"
MANIFEST_COLUMNS = ["tile_id", "donor", "marker", "dapi_path", "marker_path", "marker_channel",
                    "mask_path", "annotated", "split"]
SPLITS = ("train", "val", "test")
TIFF_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------- TIFF checks


def tiff_info(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a TIFF's first series, read from its header; checks the data are all there.

    Raises SeglabError naming the file when it is not a readable TIFF or is truncated.
    """
    import tifffile

    path = Path(path)
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            series = tf.series[0]
            end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
            if end > size:
                raise SeglabError(f"{path}: truncated TIFF (image data ends at byte {end}, file has {size}); "
                                  f"copy the file again")
            return tuple(series.shape), np.dtype(series.dtype)
    except SeglabError:
        raise
    except Exception as exc:  # tifffile raises several types for broken files
        raise SeglabError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc}); "
                          f"re-export or copy the file again") from None


def read_tiff(path: str | os.PathLike) -> np.ndarray:
    """The pixels of a TIFF; SeglabError naming the file when it is corrupt or truncated."""
    import tifffile

    try:
        return tifffile.imread(path)
    except Exception as exc:
        raise SeglabError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc}); "
                          f"re-export or copy the file again") from None


def _plane(arr: np.ndarray, path) -> np.ndarray:
    """A 2-D plane from a channel file (a singleton leading axis is dropped)."""
    arr = np.squeeze(arr) if arr.ndim > 2 and all(s == 1 for s in arr.shape[:-2]) else arr
    if arr.ndim != 2:
        raise SeglabError(f"{path}: expected one 2-D channel (Y, X), got shape {arr.shape}")
    return arr


def load_tile(row) -> np.ndarray:
    """[DAPI, marker] of one manifest row as float32, shape (2, Y, X).

    Raises SeglabError naming the file when a file is unreadable, not 2-D,
    not numeric, or when the two channels differ in shape.
    """
    chans = []
    for key in ("dapi_path", "marker_path"):
        path = row[key]
        arr = _plane(read_tiff(path), path)
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise SeglabError(f"{path}: pixel type {arr.dtype} is not numeric")
        chans.append(arr)
    if chans[0].shape != chans[1].shape:
        raise SeglabError(f"{row['marker_path']}: marker channel shape {chans[1].shape} differs from the DAPI "
                          f"channel {row['dapi_path']} {chans[0].shape}; both channels of a tile must match")
    return np.stack(chans).astype(np.float32)


def check_mask(mask: np.ndarray, path, shape: tuple | None = None) -> np.ndarray:
    """Check an instance mask: 2-D, integer, non-negative, the image's shape. Returns it as is
    (signed integer masks become uint32)."""
    if mask.ndim != 2:
        raise SeglabError(f"{path}: a mask must be 2-D (Y, X) instance labels, got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise SeglabError(f"{path}: mask pixel type is {mask.dtype}; instance labels must be integers "
                          f"(0 = background), not float or bool: save the label image as uint16/uint32")
    if mask.size and mask.min() < 0:
        raise SeglabError(f"{path}: mask has negative labels (min {mask.min()}); labels must be >= 0, 0 = background")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise SeglabError(f"{path}: mask shape {mask.shape} differs from its image {tuple(shape)}")
    if np.issubdtype(mask.dtype, np.signedinteger):
        mask = mask.astype(np.uint32)
    return mask


def load_mask(row) -> np.ndarray:
    """The instance mask of one manifest row, (Y, X) integer labels, 0 = background.

    Raises SeglabError naming the file when there is no mask, it is unreadable,
    float or negative, or its shape differs from the tile's DAPI channel.
    """
    path = row["mask_path"]
    if not isinstance(path, str) or not path:
        raise SeglabError(f"tile {row['tile_id']} has no mask (mask_path is empty)")
    mask = _plane(read_tiff(path), path)
    dapi = row.get("dapi_path", "") if hasattr(row, "get") else ""
    shape = tiff_info(dapi)[0][-2:] if isinstance(dapi, str) and dapi else None
    return check_mask(mask, path, shape)


# --------------------------------------------------------------------------- splits


def check_splits(splits: Mapping[str, Iterable], source: str = "splits") -> dict[str, list[int]]:
    """Validate donor splits ``{train: [...], val: [...], test: [...]}``; donor ids become int.

    Raises SeglabError naming the donor when a donor is on two sides, and the
    key when a split name is unknown or an id is not numeric.
    """
    if not isinstance(splits, Mapping):
        raise SeglabError(f"{source}: expected a mapping train/val/test -> donor ids, got {type(splits).__name__}")
    out: dict[str, list[int]] = {}
    seen: dict[int, str] = {}
    for name, donors in splits.items():
        if name not in SPLITS:
            raise SeglabError(f"{source}: unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        if donors is None:
            donors = []
        if not isinstance(donors, (list, tuple, set)):
            raise SeglabError(f"{source}: split {name!r} must be a list of donor ids")
        ids = []
        for d in donors:
            try:
                d_int = int(str(d).strip())
            except ValueError:
                raise SeglabError(f"{source}: split {name!r}: donor id {d!r} is not numeric") from None
            if d_int in seen:
                where = "twice in " + name if seen[d_int] == name else f"in both {seen[d_int]} and {name}"
                raise SeglabError(f"{source}: donor {d_int} is {where}; a donor must be on one side "
                                  f"of the split only (fix the file)")
            seen[d_int] = name
            ids.append(d_int)
        out[name] = ids
    return out


def load_splits(path: str | os.PathLike) -> dict[str, list[int]]:
    """Read and check a ``donor_splits.yaml`` (``train: [ids]``, ``val: [...]``, ``test: [...]``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SeglabError(f"{path}: split file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SeglabError(f"{path}: not valid YAML: {exc}") from None
    return check_splits(raw or {}, str(path))


def save_splits(splits: Mapping[str, Iterable], path: str | os.PathLike) -> Path:
    """Write donor splits as YAML (checked first), atomically."""
    import yaml

    checked = check_splits(splits, str(path))
    return io.write_text(path, yaml.safe_dump(checked, sort_keys=False))


def generate_splits(manifest: pd.DataFrame, fractions=(0.6, 0.2, 0.2), seed: int = 0,
                    annotated_only: bool = True) -> dict[str, list[int]]:
    """Seeded donor-level splits with annotated tiles balanced by marker.

    Donors are shuffled with ``seed`` and, largest first, each goes to the split
    whose per-marker tile counts fall furthest below their target
    (``fractions`` x the tiles of that marker). Returns ``{train, val, test}``
    lists of donor ids; every donor is in exactly one.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise SeglabError(f"generate_splits: fractions {fractions} must be three numbers >= 0 summing to 1")
    tiles = manifest[manifest["annotated"]] if annotated_only else manifest
    if tiles.empty:
        raise SeglabError("generate_splits: no annotated tiles to split (annotated_only=True)")
    table = pd.crosstab(tiles["donor"], tiles["marker"])
    rng = np.random.default_rng(seed)
    donors = list(table.index)
    order = [donors[i] for i in rng.permutation(len(donors))]
    order.sort(key=lambda d: -int(table.loc[d].sum()))  # stable: ties keep the shuffled order
    target = {s: table.sum(axis=0).to_numpy() * f for s, f in zip(SPLITS, fractions)}
    have = {s: np.zeros(table.shape[1]) for s in SPLITS}
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for d in order:
        row = table.loc[d].to_numpy()
        # Deficit after adding this donor, summed over markers; pick the split it helps most.
        gains = {s: float(np.sum(np.abs(target[s] - have[s])) - np.sum(np.abs(target[s] - have[s] - row)))
                 for s in SPLITS if fractions[SPLITS.index(s)] > 0}
        best = max(gains, key=lambda s: (gains[s], -len(out[s])))
        have[best] += row
        out[best].append(int(d))
    return check_splits({s: sorted(v) for s, v in out.items()}, "generate_splits")


def apply_splits(manifest: pd.DataFrame, splits: Mapping[str, Iterable]) -> pd.DataFrame:
    """Set ``split`` of annotated tiles from donor splits ('' for unannotated tiles).

    Annotated tiles of a donor in no split keep '' (:func:`coverage_audit` lists them).
    """
    checked = check_splits(splits)
    by_donor = {d: s for s, ds in checked.items() for d in ds}
    out = manifest.copy()
    out["split"] = [by_donor.get(int(d), "") if a else "" for d, a in zip(out["donor"], out["annotated"])]
    return out


# --------------------------------------------------------------------------- discovery


def _read_annotated(annotated) -> set[str] | None:
    if annotated is None:
        return None
    if isinstance(annotated, (str, os.PathLike)):
        path = Path(annotated)
        if not path.is_file():
            raise SeglabError(f"{path}: annotated-tiles table not found")
        table = pd.read_csv(path, dtype=str)
        if "tile_id" not in table.columns:
            raise SeglabError(f"{path}: needs a column tile_id (has {', '.join(table.columns)})")
        return set(table["tile_id"])
    return {str(t) for t in annotated}


def read_clinical(path: str | os.PathLike, id_column: str = "projid") -> pd.DataFrame:
    """The clinical table (CSV or TSV) with its donor id column as int."""
    path = Path(path)
    if not path.is_file():
        raise SeglabError(f"{path}: clinical table not found")
    table = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    if id_column not in table.columns:
        raise SeglabError(f"{path}: no donor id column {id_column!r} (columns: {', '.join(map(str, table.columns))})")
    try:
        table[id_column] = table[id_column].astype("int64")
    except (ValueError, TypeError):
        raise SeglabError(f"{path}: column {id_column!r} must hold numeric donor ids (one is empty or not a number)") from None
    dup = table[id_column][table[id_column].duplicated()].tolist()
    if dup:
        raise SeglabError(f"{path}: donor {dup[0]} has more than one row")
    return table


def _list_tiffs(tiles_dir: Path) -> list[Path]:
    """The visible ``.tif``/``.tiff`` files under ``tiles_dir`` (recursive, sorted); SeglabError when
    the folder is missing or holds none."""
    if not tiles_dir.is_dir():
        raise SeglabError(f"{tiles_dir}: tiles folder not found")
    files = sorted(p for p in tiles_dir.rglob("*") if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise SeglabError(f"{tiles_dir}: no .tif/.tiff files found (empty folder?)")
    return files


def _compile_pattern(pattern: str) -> re.Pattern:
    """The file-name regex; SeglabError when it lacks a named group tile_id, donor, marker or channel."""
    regex = re.compile(pattern)
    missing_groups = {"tile_id", "donor", "marker", "channel"} - set(regex.groupindex)
    if missing_groups:
        raise SeglabError(f"pattern {pattern!r} lacks the named group(s) {sorted(missing_groups)}")
    return regex


def _group_channels(files: list[Path], regex: re.Pattern, tiles_dir: Path, pattern: str):
    """Group the files by tile id.

    Returns (channels, meta, unmatched): {tile_id: {channel: resolved path}}, {tile_id: (donor, marker)}
    and the files the pattern does not match. SeglabError on a non-numeric donor id, a tile id
    whose channel appears twice, or when no file matches.
    """
    channels: dict[str, dict[str, Path]] = {}
    meta: dict[str, tuple[int, str]] = {}
    unmatched: list[str] = []
    for f in files:
        m = regex.match(f.name)
        if not m:
            unmatched.append(str(f))
            continue
        tid, ch = m["tile_id"], m["channel"]
        try:
            donor = int(m["donor"])
        except ValueError:
            raise SeglabError(f"{f}: donor id {m['donor']!r} is not numeric; rename the file or pass a "
                              f"pattern whose 'donor' group captures the numeric id") from None
        slot = channels.setdefault(tid, {})
        if ch in slot:
            raise SeglabError(f"duplicate tile id {tid}: channel {ch} is both {slot[ch]} and {f}; "
                              f"remove one copy")
        slot[ch] = f.resolve()
        meta[tid] = (donor, m["marker"])
    if not channels:
        raise SeglabError(f"{tiles_dir}: none of the {len(files)} TIFF files matches the pattern {pattern!r} "
                          f"(e.g. {files[0].name}); pass pattern= to match your names")
    return channels, meta, unmatched


def _find_mask(masks_dir: Path | None, tile_id: str) -> str:
    """Resolved path of ``<masks_dir>/<tile_id>.tif`` (or ``.tiff``), or '' when there is none."""
    if masks_dir is not None:
        for suf in TIFF_SUFFIXES:
            if (masks_dir / f"{tile_id}{suf}").is_file():
                return str((masks_dir / f"{tile_id}{suf}").resolve())
    return ""


def _pair_tiles(channels: dict, meta: dict, masks_dir: Path | None, ann: set[str] | None, dapi_channel: str,
                marker_channels: tuple[str, ...], check_files: bool, strict: bool):
    """Pair each tile's DAPI and marker files (and mask) into manifest rows, in tile id order.

    Returns (rows, unpaired, excluded, fallbacks): the rows (dicts of :data:`MANIFEST_COLUMNS`,
    split ''), the tiles without a DAPI or marker channel, the tiles whose files failed
    :func:`_check_tile_files` (only without ``strict``; with it the error is raised) and the
    tiles whose marker is the fallback channel.
    """
    rows, unpaired, excluded, fallbacks = [], [], [], []
    for tid in sorted(channels):
        slot = channels[tid]
        donor, marker = meta[tid]
        if dapi_channel not in slot:
            unpaired.append({"tile_id": tid, "problem": f"no DAPI channel {dapi_channel}",
                             "files": [str(p) for p in slot.values()]})
            continue
        mch = next((c for c in marker_channels if c in slot), None)
        if mch is None:
            unpaired.append({"tile_id": tid, "problem": f"no marker channel ({' or '.join(marker_channels)})",
                             "files": [str(slot[dapi_channel])]})
            continue
        if mch != marker_channels[0]:
            fallbacks.append(tid)
        mask = _find_mask(masks_dir, tid)
        is_ann = bool(mask) if ann is None else tid in ann
        row = {"tile_id": tid, "donor": donor, "marker": marker, "dapi_path": str(slot[dapi_channel]),
               "marker_path": str(slot[mch]), "marker_channel": mch, "mask_path": mask,
               "annotated": is_ann, "split": ""}
        if check_files:
            try:
                _check_tile_files(row)
            except SeglabError as exc:
                if strict:
                    raise
                excluded.append({"tile_id": tid, "problem": str(exc)})
                continue
        rows.append(row)
    return rows, unpaired, excluded, fallbacks


def _manifest_frame(rows: list[dict], splits) -> pd.DataFrame:
    """The manifest DataFrame of the paired rows (typed columns), with ``split`` from the donor
    splits (YAML path or mapping; None leaves it '')."""
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest["donor"] = manifest["donor"].astype("int64")
    manifest["annotated"] = manifest["annotated"].astype(bool)
    if splits is not None:
        split_map = load_splits(splits) if isinstance(splits, (str, os.PathLike)) else check_splits(splits)
        manifest = apply_splits(manifest, split_map)
    return manifest


def discover(tiles_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None,
             pattern: str = DEFAULT_PATTERN, *, dapi_channel: str = "c0",
             marker_channels: tuple[str, ...] = ("c1", "c2"), annotated=None, splits=None,
             clinical=None, id_column: str = "projid", check_files: bool = True,
             strict: bool = True) -> tuple[pd.DataFrame, dict]:
    """Find the tiles in a folder, pair their channel files and build the manifest and the audit.

    Parameters
    ----------
    tiles_dir : folder searched recursively for ``.tif``/``.tiff`` files.
    masks_dir : folder of instance masks ``<tile_id>.tif`` (optional).
    pattern : regex with named groups ``tile_id``, ``donor`` (numeric), ``marker``, ``channel``.
    dapi_channel, marker_channels : channel tags; the first marker channel found is used
        (``c1``, falling back to ``c2``).
    annotated : which tiles carry curated masks: a CSV with a ``tile_id`` column, an
        iterable of tile ids, or None (= every tile with a mask).
    splits : donor splits (YAML path or mapping) giving ``split`` of annotated tiles.
    clinical : clinical table (path) to audit donor coverage against.
    check_files : read every file's TIFF header: unreadable or truncated files, channels
        of different shapes, masks that are not integer or differ in shape are found here.
    strict : raise on a tile with such a problem (default); with False the tile is left out
        of the manifest and listed in ``audit['excluded']``. A missing marker channel is
        never fatal: the tile is listed in ``audit['unpaired']``.

    Returns
    -------
    (manifest, audit): the manifest (columns :data:`MANIFEST_COLUMNS`, sorted by tile_id)
    and the coverage audit dict (see :func:`coverage_audit`).

    Raises
    ------
    SeglabError : empty folder, no file matching the pattern, an unparseable donor id, a
        duplicate tile id (same name in two places), a split with a donor on two sides,
        and (``strict``) a broken tile; the message names the file and what is wrong.
    """
    tiles_dir = Path(tiles_dir)
    files = _list_tiffs(tiles_dir)
    channels, meta, unmatched = _group_channels(files, _compile_pattern(pattern), tiles_dir, pattern)
    ann = _read_annotated(annotated)
    masks_dir = Path(masks_dir) if masks_dir is not None else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise SeglabError(f"{masks_dir}: masks folder not found")
    rows, unpaired, excluded, fallbacks = _pair_tiles(channels, meta, masks_dir, ann, dapi_channel,
                                                      marker_channels, check_files, strict)
    manifest = _manifest_frame(rows, splits)
    audit = coverage_audit(manifest, clinical=clinical, id_column=id_column)
    audit.update({
        "tiles_dir": str(tiles_dir.resolve()), "masks_dir": str(masks_dir.resolve()) if masks_dir else None,
        "pattern": pattern, "n_files": len(files),
        "fallbacks": fallbacks, "n_fallbacks": len(fallbacks),
        "unpaired": unpaired, "n_unpaired": len(unpaired),
        "excluded": excluded, "n_excluded": len(excluded),
        "unmatched_files": unmatched, "n_unmatched_files": len(unmatched),
    })
    if ann is not None:
        audit["annotated_not_found"] = sorted(ann - set(manifest["tile_id"]))
    return manifest, audit


def _one_plane(shape: tuple) -> tuple | None:
    """(Y, X) of a TIFF shape that is one 2-D plane (leading axes of length 1 allowed: the loaders drop
    them, :func:`_plane`), else None (a stack, a time series, RGB samples)."""
    return tuple(shape[-2:]) if len(shape) >= 2 and all(s == 1 for s in shape[:-2]) else None


def _check_tile_files(row: dict) -> None:
    """The audit of one tile's files from their TIFF headers: each channel one 2-D plane, both of one
    shape; the mask integer and one plane of the image's (Y, X), as :func:`load_tile` and
    :func:`load_mask` will read them. Raises SeglabError naming the file and the fix."""
    shape_d, dtype_d = tiff_info(row["dapi_path"])
    shape_m, _ = tiff_info(row["marker_path"])
    for path, shape in ((row["dapi_path"], shape_d), (row["marker_path"], shape_m)):
        if _one_plane(shape) is None:
            raise SeglabError(f"{path}: expected one 2-D channel (Y, X), got shape {shape}; "
                              f"save each channel of a tile as its own single-plane TIFF")
    if shape_d != shape_m:
        raise SeglabError(f"{row['marker_path']}: marker channel shape {shape_m} differs from the DAPI channel "
                          f"{row['dapi_path']} {shape_d}; both channels of a tile must match")
    if row["mask_path"]:
        shape_k, dtype_k = tiff_info(row["mask_path"])
        if not np.issubdtype(dtype_k, np.integer):
            raise SeglabError(f"{row['mask_path']}: mask pixel type is {dtype_k}; instance labels must be integers "
                              f"(0 = background): save the label image as uint16/uint32")
        # ndim first: a (Z, Y, X) mask has its image's last two axes and would pass a (Y, X) comparison
        if _one_plane(shape_k) is None:
            raise SeglabError(f"{row['mask_path']}: mask shape {shape_k} is not one 2-D plane of its image's shape "
                              f"{_one_plane(shape_d)} ({row['dapi_path']}); save the mask as one (Y, X) label "
                              f"image of the tile's size")
        if _one_plane(shape_k) != _one_plane(shape_d):
            raise SeglabError(f"{row['mask_path']}: mask shape {shape_k} differs from its image {shape_d}; "
                              f"the mask must be one (Y, X) label image of the tile's size")


def coverage_audit(manifest: pd.DataFrame, clinical=None, id_column: str = "projid") -> dict:
    """Coverage of a manifest: tiles per marker and donor, annotated tiles per split and marker,
    c2 fallbacks, and donor coverage against the clinical table (path or DataFrame) by id."""
    donors_tiles = sorted(int(d) for d in manifest["donor"].unique())
    ann = manifest[manifest["annotated"]]
    audit: dict = {
        "n_tiles_paired": int(len(manifest)),
        "n_donors_in_tiles": len(donors_tiles),
        "donors_in_tiles": donors_tiles,
        "markers": sorted(manifest["marker"].unique().tolist()),
        "tiles_per_marker": {str(k): int(v) for k, v in sorted(Counter(manifest["marker"]).items())},
        "tiles_per_donor": {str(k): int(v) for k, v in sorted(Counter(manifest["donor"]).items())},
        "n_c2_fallbacks": int((manifest["marker_channel"] != "c1").sum()),
        "n_with_mask": int((manifest["mask_path"] != "").sum()),
        "n_annotated": int(len(ann)),
        "annotated_per_split": {s: int((ann["split"] == s).sum()) for s in SPLITS},
        "annotated_without_split": sorted(ann.loc[ann["split"] == "", "tile_id"].tolist()),
        "annotated_without_mask": sorted(ann.loc[ann["mask_path"] == "", "tile_id"].tolist()),
        "annotated_per_marker_split": {m: {s: int(((g["split"] == s)).sum()) for s in SPLITS}
                                       for m, g in ann.groupby("marker")},
        "donors_per_split": {s: sorted(int(d) for d in ann.loc[ann["split"] == s, "donor"].unique()) for s in SPLITS},
    }
    if clinical is not None:
        table = clinical if isinstance(clinical, pd.DataFrame) else read_clinical(clinical, id_column)
        donors_clin = sorted(int(d) for d in table[id_column])
        audit.update({
            "clinical_file": None if isinstance(clinical, pd.DataFrame) else str(clinical),
            "n_donors_in_clinical": len(donors_clin),
            "donors_missing_from_clinical": sorted(set(donors_tiles) - set(donors_clin)),
            "donors_missing_from_tiles": sorted(set(donors_clin) - set(donors_tiles)),
            "n_donors_missing_from_clinical": len(set(donors_tiles) - set(donors_clin)),
            "n_donors_missing_from_tiles": len(set(donors_clin) - set(donors_tiles)),
        })
    return audit


def cohort_manifest(cohort_dir: str | os.PathLike, with_audit: bool = False, **kwargs):
    """The manifest of a simulated cohort (``seglab simulate``) in one call.

    Reads ``tiles/``, ``masks/``, ``annotated.csv``, ``donor_splits.yaml`` and
    ``clinical.csv``. Returns the manifest, or (manifest, audit) with ``with_audit``.
    """
    c = Path(cohort_dir)
    if not (c / "tiles").is_dir():
        raise SeglabError(f"{c}: not a cohort folder (no tiles/); make one with `seglab simulate --out {c}`")
    opts = {"masks_dir": c / "masks" if (c / "masks").is_dir() else None,
            "annotated": c / "annotated.csv" if (c / "annotated.csv").is_file() else None,
            "splits": c / "donor_splits.yaml" if (c / "donor_splits.yaml").is_file() else None,
            "clinical": c / "clinical.csv" if (c / "clinical.csv").is_file() else None}
    opts.update(kwargs)
    manifest, audit = discover(c / "tiles", **opts)
    return (manifest, audit) if with_audit else manifest


# --------------------------------------------------------------------------- manifest I/O


def save_manifest(manifest: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the manifest as CSV (or TSV by suffix), atomically; checks the columns first."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise SeglabError(f"save_manifest: columns {missing} missing (expected {MANIFEST_COLUMNS})")
    return io.write_table(path, manifest)


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest CSV/TSV written by :func:`save_manifest`, with its types restored."""
    path = Path(path)
    if not path.is_file():
        raise SeglabError(f"{path}: manifest not found")
    df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise SeglabError(f"{path}: manifest columns {missing} missing (expected {', '.join(MANIFEST_COLUMNS)})")
    try:
        df["donor"] = df["donor"].astype("int64")
    except ValueError:
        raise SeglabError(f"{path}: column donor must be numeric") from None
    bad = set(df["annotated"]) - {"True", "False", "true", "false", "1", "0"}
    if bad:
        raise SeglabError(f"{path}: column annotated must be True/False, found {sorted(bad)[:3]}")
    df["annotated"] = df["annotated"].isin(["True", "true", "1"])
    dup = df["tile_id"][df["tile_id"].duplicated()].tolist()
    if dup:
        raise SeglabError(f"{path}: duplicate tile id {dup[0]}")
    return df


# --------------------------------------------------------------------------- exports


def _atomic_dir(out_dir: Path):
    """A hidden sibling folder to build in; the caller renames it onto ``out_dir``."""
    if out_dir.exists():
        raise SeglabError(f"{out_dir} already exists; exports never overwrite: choose another folder or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    tmp.mkdir()
    return tmp


def _finish_dir(tmp: Path, out_dir: Path) -> Path:
    try:
        os.rename(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SeglabError(f"{out_dir} appeared while exporting; nothing was written there") from None
    return out_dir


def _select(manifest: pd.DataFrame, splits) -> pd.DataFrame:
    sel = manifest[manifest["annotated"] & manifest["split"].isin(list(splits))]
    if sel.empty:
        raise SeglabError(f"no annotated tiles in split(s) {list(splits)} to export")
    nomask = sel.loc[sel["mask_path"] == "", "tile_id"].tolist()
    if nomask:
        raise SeglabError(f"annotated tile {nomask[0]} has no mask file; fix masks_dir or the annotated table")
    return sel


def export_cellpose(manifest: pd.DataFrame, out_dir: str | os.PathLike, splits=("train", "val", "test")) -> Path:
    """Annotated tiles in Cellpose's training layout: ``<out>/<split>/<tile_id>.tif`` holding
    [DAPI, marker, 0] uint16 channel-first (3, Y, X) (train with ``channel_axis=0``) and
    ``<tile_id>_masks.tif`` (uint16 labels). Built in a sibling folder, then renamed; never overwrites.
    """
    import tifffile

    out_dir = Path(out_dir)
    sel = _select(manifest, splits)
    tmp = _atomic_dir(out_dir)
    try:
        for _, row in sel.iterrows():
            img = load_tile(row)
            mask = load_mask(row)
            stack = np.concatenate([img, np.zeros_like(img[:1])]).clip(0, 65535).astype(np.uint16)
            d = tmp / row["split"]
            d.mkdir(exist_ok=True)
            tifffile.imwrite(d / f"{row['tile_id']}.tif", stack, photometric="minisblack", compression="zlib")
            tifffile.imwrite(d / f"{row['tile_id']}_masks.tif", _labels16(mask, row["mask_path"]), compression="zlib")
        sel[MANIFEST_COLUMNS].to_csv(tmp / "manifest.csv", index=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish_dir(tmp, out_dir)


def _labels16(mask: np.ndarray, path) -> np.ndarray:
    if mask.size and mask.max() > 65535:
        return mask.astype(np.uint32)
    return mask.astype(np.uint16)


def export_nnunet(manifest: pd.DataFrame, out_dir: str | os.PathLike, train_splits=("train", "val"),
                  test_splits=("test",)) -> Path:
    """Annotated tiles in an nnU-Net-style layout: ``imagesTr/<tile_id>_0000.tif`` (DAPI),
    ``_0001.tif`` (marker), ``instancesTr/<tile_id>.tif``; test tiles in ``imagesTs``/``instancesTs``;
    ``dataset.json`` names the channels. Built in a sibling folder, then renamed; never overwrites."""
    import json

    import tifffile

    out_dir = Path(out_dir)
    groups = {"Tr": _select(manifest, train_splits) if train_splits else manifest.iloc[:0],
              "Ts": _select(manifest, test_splits) if test_splits else manifest.iloc[:0]}
    tmp = _atomic_dir(out_dir)
    try:
        for sub, sel in groups.items():
            (tmp / f"images{sub}").mkdir()
            (tmp / f"instances{sub}").mkdir()
            for _, row in sel.iterrows():
                img = load_tile(row).clip(0, 65535).astype(np.uint16)
                for k in range(2):
                    tifffile.imwrite(tmp / f"images{sub}" / f"{row['tile_id']}_{k:04d}.tif", img[k], compression="zlib")
                tifffile.imwrite(tmp / f"instances{sub}" / f"{row['tile_id']}.tif",
                                 _labels16(load_mask(row), row["mask_path"]), compression="zlib")
        meta = {"channel_names": {"0": "DAPI", "1": "marker"}, "file_ending": ".tif",
                "numTraining": int(len(groups["Tr"])), "numTest": int(len(groups["Ts"])),
                "labels": "instance labels, 0 = background", "source": "seglab.data.manifest.export_nnunet"}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        pd.concat(groups.values())[MANIFEST_COLUMNS].to_csv(tmp / "manifest.csv", index=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish_dir(tmp, out_dir)


def read_nnunet(folder: str | os.PathLike) -> pd.DataFrame:
    """Cases of an nnU-Net-style folder (ours or another tool's predictions).

    Returns one row per case: tile_id, subset ('Tr'/'Ts'), dapi_path, marker_path
    ('' where absent) and instance_path ('' where absent). Cases come from
    ``images*/<case>_0000.tif`` and from ``instances*/<case>.tif`` (a folder holding only
    predicted instances is fine).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SeglabError(f"{folder}: nnU-Net folder not found")
    rows: dict[tuple[str, str], dict] = {}
    chan = re.compile(r"^(?P<case>.+)_(?P<k>\d{4})\.tiff?$")
    for sub in ("Tr", "Ts"):
        for f in sorted((folder / f"images{sub}").glob("*.tif*")):
            m = chan.match(f.name)
            if not m:
                raise SeglabError(f"{f}: image names must end in _<4-digit channel>.tif (e.g. case_0000.tif)")
            r = rows.setdefault((sub, m["case"]), {"tile_id": m["case"], "subset": sub, "dapi_path": "",
                                                   "marker_path": "", "instance_path": ""})
            key = {0: "dapi_path", 1: "marker_path"}.get(int(m["k"]))
            if key:
                r[key] = str(f.resolve())
        for f in sorted((folder / f"instances{sub}").glob("*.tif*")):
            case = f.name.rsplit(".", 1)[0]
            r = rows.setdefault((sub, case), {"tile_id": case, "subset": sub, "dapi_path": "",
                                              "marker_path": "", "instance_path": ""})
            r["instance_path"] = str(f.resolve())
    if not rows:
        raise SeglabError(f"{folder}: no imagesTr/imagesTs/instancesTr/instancesTs files found")
    return pd.DataFrame(sorted(rows.values(), key=lambda r: (r["subset"], r["tile_id"])))
