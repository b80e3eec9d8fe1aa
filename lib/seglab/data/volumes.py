"""3D volumes: TIFF reading and writing, voxel size, and the nnU-Net raw layout users keep.

Volumes
-------
A volume is a TIFF holding ``(Z, Y, X)`` or, with a channel param, ``(Z, C, Y, X)``.
:func:`read_volume` returns ``(Z, Y, X)`` float32 (one channel) and its voxel size in um
``(z, y, x)`` from the file's metadata (ImageJ ``spacing`` for z, the resolution tags for
y and x) or from the caller. Anisotropy is the z step over the xy pixel size (1 for
isotropic voxels, 4 for a z step four times the pixel size). Label volumes are
``(Z, Y, X)`` integer arrays, 0 = background (:func:`read_labels`). Everything is written
as ``.tiff`` through :mod:`seglab.core.io` (atomic), with the voxel size in the metadata
(:func:`write_volume`).

nnU-Net raw layout
------------------
``DatasetNNN_Name/imagesTr/<case>_0000.tif(f)`` with ``instancesTr/<case>.tif(f)``, and
``imagesTs/`` with ``instancesTs/``. The ``_0000`` channel suffix is stripped from case names
(:func:`case_name`), so outputs are ``<case>.tiff``; ``.tif`` and ``.tiff`` are both read.
Predictions of any tool sit beside ``imagesTs`` as ``imagesTs_<method>/<case>.tiff``.

Bad input (each a :class:`~seglab.SeglabError` naming the file and the fix): a 2D image
given as a volume, a 4D array without a channel param, anisotropy <= 0, a volume and
its label of different shapes, labels that are not integers, a case with no label file.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from seglab import SeglabError
from seglab.core import io, paths
from seglab.data.manifest import TIFF_SUFFIXES

OUT_SUFFIX = ".tiff"
CHANNEL_SUFFIX_RE = re.compile(r"_(\d{4})$")   # nnU-Net's channel suffix, _0000 for the first channel
SPLITS = {"train": ("imagesTr", "instancesTr"), "test": ("imagesTs", "instancesTs")}
PREDICTION_PREFIX = "imagesTs_"


# --------------------------------------------------------------------------- voxel size


def check_anisotropy(value, source: str = "anisotropy") -> float:
    """``value`` as a float > 0 (z step / xy pixel size); SeglabError naming ``source`` otherwise."""
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise SeglabError(f"{source}: {value!r} is not a number; give the z step divided by the xy pixel size "
                          "(1 for isotropic voxels, e.g. 2 or 4 for thicker z steps)") from None
    if not math.isfinite(a) or a <= 0:
        raise SeglabError(f"{source}: {value!r} must be > 0 (the z step divided by the xy pixel size; "
                          "1 for isotropic voxels)")
    return a


@dataclass(frozen=True)
class VoxelSize:
    """Voxel size in um along (z, y, x); ``anisotropy`` = z / mean(y, x)."""

    z_um: float
    y_um: float
    x_um: float

    @property
    def anisotropy(self) -> float:
        return self.z_um / ((self.y_um + self.x_um) / 2)

    @classmethod
    def from_anisotropy(cls, anisotropy: float, xy_um: float = 1.0) -> "VoxelSize":
        a = check_anisotropy(anisotropy)
        return cls(a * xy_um, xy_um, xy_um)


# --------------------------------------------------------------------------- files


def case_name(path: str | os.PathLike) -> str:
    """The case of an nnU-Net file: the name without ``.tif``/``.tiff`` and ``_0000``.

    >>> case_name("imagesTs/cell_07_0000.tif"), case_name("instancesTs/cell_07.tiff")
    ('cell_07', 'cell_07')
    """
    stem = paths.strip_suffix(path, TIFF_SUFFIXES)
    return CHANNEL_SUFFIX_RE.sub("", Path(path).name if stem is None else stem)


def _tiffs(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                  and f.name.lower().endswith(TIFF_SUFFIXES))


def index_folder(folder: str | os.PathLike, what: str = "volumes") -> dict[str, Path]:
    """``{case: file}`` of the TIFFs in ``folder`` (``_0000`` and the extension stripped).

    Only channel ``_0000`` is read: other channels (``_0001``) are left out. Two files of one
    case (``a.tif`` and ``a.tiff``) are an error naming both.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SeglabError(f"{folder}: no such folder of {what}; check the dataset path")
    found: dict[str, Path] = {}
    for f in _tiffs(folder):
        stem = f.name[: f.name.lower().rfind(".tif")]
        m = CHANNEL_SUFFIX_RE.search(stem)
        if m and m.group(1) != "0000":
            continue
        key = case_name(f)
        if key in found:
            raise SeglabError(f"{folder}: {found[key].name} and {f.name} are both case '{key}'; keep one of them")
        found[key] = f
    return found


def _read_tiff(path: Path):
    import tifffile

    if not path.is_file():
        raise SeglabError(f"{path}: no such file")
    try:
        with io.quiet_tiff_log(), tifffile.TiffFile(path) as tf:
            arr = tf.asarray()
            page = tf.pages.first
            meta = tf.imagej_metadata or {}
            res = page.tags.get("XResolution"), page.tags.get("YResolution")
            res = [r.value for r in res] if all(r is not None for r in res) else None
    except Exception as exc:  # noqa: BLE001 - a damaged or non-TIFF file
        raise SeglabError(f"{path}: cannot be read as TIFF ({type(exc).__name__}: {exc}); "
                          "replace the file with a readable .tif/.tiff") from None
    return arr, meta, res


def _voxel_from_meta(meta: dict, res) -> VoxelSize | None:
    """The voxel size stored by ImageJ (``spacing``) and the resolution tags, or None when absent."""
    spacing = meta.get("spacing")
    if spacing is None or res is None:
        return None
    try:
        xy = [float(d) / float(n) for n, d in res]   # tags hold pixels per unit: (num, den)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if float(spacing) <= 0 or min(xy) <= 0:
        return None
    return VoxelSize(float(spacing), xy[1], xy[0])


def read_volume(path: str | os.PathLike, *, channel: int | None = None,
                anisotropy: float | None = None) -> tuple[np.ndarray, VoxelSize]:
    """A volume as ``(Z, Y, X)`` float32 and its voxel size.

    Parameters
    ----------
    path : a ``.tif``/``.tiff`` holding ``(Z, Y, X)``, or ``(Z, C, Y, X)`` with ``channel``.
    channel : the channel to take from a 4D file (index along axis 1).
    anisotropy : z step / xy pixel size; None: from the file's metadata, else 1 (isotropic).
        Given, it wins over the metadata (the xy size is kept, z = anisotropy * xy).

    Raises
    ------
    SeglabError : a 2D image, a 4D array without ``channel``, a channel out of range, more
        than 4 axes, anisotropy <= 0, an unreadable file.
    """
    path = Path(path)
    arr, meta, res = _read_tiff(path)
    arr = np.squeeze(arr) if arr.ndim > 4 else arr
    if arr.ndim == 2:
        raise SeglabError(f"{path}: a 2D image {arr.shape}, not a volume; 3D prediction needs (Z, Y, X) "
                          "or (Z, C, Y, X): use seglab predict for 2D tiles")
    if arr.ndim == 4:
        if channel is None:
            raise SeglabError(f"{path}: a 4D array {arr.shape} (Z, C, Y, X) needs a channel: pass --channel "
                              "(param 'channel') with the index of the nucleus channel")
        if not 0 <= int(channel) < arr.shape[1]:
            raise SeglabError(f"{path}: channel {channel} out of range for {arr.shape[1]} channels (axis 1 of "
                              f"{arr.shape}); give 0..{arr.shape[1] - 1}")
        arr = arr[:, int(channel)]
    elif arr.ndim != 3:
        raise SeglabError(f"{path}: array of shape {arr.shape}; a volume must be (Z, Y, X) or (Z, C, Y, X)")
    voxel = _voxel_from_meta(meta, res)
    if anisotropy is not None:
        a = check_anisotropy(anisotropy)
        xy = voxel.y_um if voxel is not None else 1.0
        voxel = VoxelSize(a * xy, xy, voxel.x_um if voxel is not None else 1.0)
    return arr.astype(np.float32, copy=False), voxel or VoxelSize(1.0, 1.0, 1.0)


def check_label_volume(arr: np.ndarray, path) -> np.ndarray:
    """``arr`` if it is a ``(Z, Y, X)`` integer label volume, else SeglabError naming ``path``."""
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        whole = np.issubdtype(arr.dtype, np.floating) and bool(np.all(np.isfinite(arr))) \
            and bool(np.all(arr == np.round(arr)))
        hint = " (its values are whole numbers: save it with an integer dtype, e.g. arr.astype(np.uint16))" \
            if whole else ""
        raise SeglabError(f"{path}: labels have dtype {arr.dtype}, not integers; an instance label volume "
                          f"needs an integer dtype, 0 = background{hint}")
    if arr.ndim != 3:
        raise SeglabError(f"{path}: labels of shape {arr.shape}; a label volume must be (Z, Y, X)")
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
        raise SeglabError(f"{path}: labels have negative ids (min {int(arr.min())}); use 0 for background")
    return arr


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """A ``(Z, Y, X)`` integer label volume (:func:`check_label_volume`)."""
    arr, _, _ = _read_tiff(Path(path))
    return check_label_volume(arr, path)


def write_volume(path: str | os.PathLike, arr: np.ndarray, voxel: VoxelSize | None = None) -> Path:
    """Write ``arr`` ``(Z, Y, X)`` as a zlib-compressed TIFF atomically, with the voxel size in um
    (ImageJ ``spacing`` and the resolution tags) when given. Labels keep their integer dtype."""
    import tifffile

    arr = np.asarray(arr)
    kwargs = {}
    imagej = arr.dtype in (np.uint8, np.uint16, np.float32)   # ImageJ's hyperstack dtypes
    if voxel is not None:
        kwargs["resolution"] = (1.0 / voxel.x_um, 1.0 / voxel.y_um)
        if imagej:
            kwargs["metadata"] = {"spacing": voxel.z_um, "unit": "um", "axes": "ZYX"}
    with io.atomic_path(path) as tmp:
        # photometric: a volume of 3 or 4 planes would otherwise be stored as an RGB(A) image
        tifffile.imwrite(tmp, arr, imagej=imagej and voxel is not None, photometric="minisblack",
                         compression=None if (imagej and voxel is not None) else "zlib", **kwargs)
    return Path(path)


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Case:
    """One volume of a dataset: its name, image file and label file (None where there is none)."""

    name: str
    image: Path
    labels: Path | None


def dataset_cases(dataset: str | os.PathLike, split: str = "test", *, need_labels: bool = True) -> list[Case]:
    """The cases of ``split`` ("train": imagesTr/instancesTr, "test": imagesTs/instancesTs).

    Raises SeglabError naming the folder when ``images*`` (or, with ``need_labels``,
    ``instances*``) is missing, when it holds no TIFF, and when a case has no label file.
    """
    dataset = Path(dataset)
    if split not in SPLITS:
        raise SeglabError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    img_dir, lab_dir = (dataset / d for d in SPLITS[split])
    if not img_dir.is_dir():
        raise SeglabError(f"{img_dir}: missing; an nnU-Net dataset holds {SPLITS[split][0]}/<case>_0000.tif "
                          f"beside {SPLITS[split][1]}/<case>.tif; check the dataset path")
    images = index_folder(img_dir, "images")
    if not images:
        raise SeglabError(f"{img_dir}: no .tif/.tiff volumes; put <case>_0000.tif files there")
    if not need_labels:
        labels = index_folder(lab_dir, "labels") if lab_dir.is_dir() else {}
        return [Case(c, f, labels.get(c)) for c, f in images.items()]
    if not lab_dir.is_dir():
        raise SeglabError(f"{lab_dir}: missing; the labels of {img_dir.name} go there as <case>.tif "
                          "(instance ids, 0 = background)")
    labels = index_folder(lab_dir, "labels")
    missing = [c for c in images if c not in labels]
    if missing:
        raise SeglabError(f"{img_dir}: case(s) {missing[:5]} have no label file in {lab_dir}; add "
                          f"{lab_dir.name}/{missing[0]}.tif or remove the image")
    return [Case(c, f, labels[c]) for c, f in images.items()]


def prediction_folders(dataset: str | os.PathLike) -> list[Path]:
    """Every ``imagesTs_<method>`` folder beside ``imagesTs`` (ours and other tools'), sorted."""
    dataset = Path(dataset)
    return sorted(p for p in dataset.iterdir() if p.is_dir() and p.name.startswith(PREDICTION_PREFIX))


def method_of(folder: str | os.PathLike) -> str:
    """``imagesTs_orthoplane`` -> ``orthoplane``."""
    return Path(folder).name[len(PREDICTION_PREFIX):]


def write_case(dataset: str | os.PathLike, split: str, name: str, image: np.ndarray, labels: np.ndarray,
               voxel: VoxelSize | None = None) -> tuple[Path, Path]:
    """Write one case in the nnU-Net layout: ``images*/<name>_0000.tiff`` and ``instances*/<name>.tiff``."""
    img_dir, lab_dir = (Path(dataset) / d for d in SPLITS[split])
    return (write_volume(img_dir / f"{name}_0000{OUT_SUFFIX}", image.astype(np.float32), voxel),
            write_volume(lab_dir / f"{name}{OUT_SUFFIX}", labels, voxel))


def training_slices(volumes: Sequence[np.ndarray], labels: Sequence[np.ndarray], anisotropies: Sequence[float], *,
                    min_objects: int = 1, step: int = 1, isotropic_tol: float = 1e-6):
    """2D training slices of volumes: xy planes always; xz and yz planes too when the voxels are
    isotropic (anisotropy 1), where they look like xy planes to a 2D network.

    Returns (images as ``(Y, X)`` float32, labels ``(Y, X)``, ids ``<i>_<axis><k>``); planes with
    fewer than ``min_objects`` objects are skipped, every ``step``-th plane is taken.
    """
    xs, ys, ids = [], [], []
    for i, (v, lb, a) in enumerate(zip(volumes, labels, anisotropies, strict=True)):
        axes = ("xy", "xz", "yz") if abs(float(a) - 1.0) <= isotropic_tol else ("xy",)
        for axis in axes:
            vv, ll = planes_first(v, axis), planes_first(lb, axis)
            for k in range(0, vv.shape[0], max(1, int(step))):
                n = len(np.unique(ll[k])) - (1 if (ll[k] == 0).any() else 0)
                if n >= min_objects:
                    xs.append(np.ascontiguousarray(vv[k], np.float32))
                    ys.append(np.ascontiguousarray(ll[k]))
                    ids.append(f"{i}_{axis}{k}")
    return xs, ys, ids


AXIS_ORDER = {"xy": (0, 1, 2), "xz": (1, 0, 2), "yz": (2, 0, 1)}


def planes_first(vol: np.ndarray, axis: str) -> np.ndarray:
    """``vol`` (Z, Y, X) transposed so that its ``axis`` planes come first: xy -> (Z, Y, X),
    xz -> (Y, Z, X), yz -> (X, Z, Y)."""
    return np.transpose(vol, AXIS_ORDER[axis])




def from_planes_first(vol: np.ndarray, axis: str) -> np.ndarray:
    """The inverse of :func:`planes_first`: back to (Z, Y, X)."""
    return np.transpose(vol, np.argsort(AXIS_ORDER[axis]))
