"""3D segmentation with a 2D network: orthogonal-plane consensus, cellpose's do_3D, stitching.

Methods (:data:`METHODS`), each on a ``(Z, Y, X)`` volume with its anisotropy (z step / xy
pixel size):

``orthoplane``
    The volume is resampled to isotropic voxels (z zoomed by the anisotropy, linear), the 2D
    model segments every plane of each orientation in ``axes`` (xy, xz, yz: any subset), and the
    2D masks of each orientation are stitched into 3D instances by IoU (cellpose's own
    ``stitch_threshold`` path of ``CellposeModel.eval``, along that orientation). The stacks,
    brought back to the volume's grid (nearest), are merged by :func:`consensus`: objects of
    different stacks matched one-to-one at IoU >= ``consensus_iou``
    (:func:`seglab.evaluate.metrics.matched_pairs`) form one object, kept when at least
    ``min_votes`` stacks (2 of 3; all of 1 or 2) hold it, and each voxel goes to the object that
    at least ``min_votes`` stacks agree on there (majority vote). ``axes=("xy",)`` is the fast
    mode ("xy-only"): the xy stack alone, on the isotropic grid.
``cellpose3d``
    cellpose's ``do_3D``: the 2D network on YX, ZY and ZX slices, flows summed, masks from the
    3D dynamics; ``anisotropy`` is handed to cellpose. Its ``flow_threshold`` is unused and
    ``min_size`` counts voxels.
``stitch``
    2D masks on each xy plane of the native grid, stitched by IoU >= ``stitch_threshold``
    (cellpose's ``stitch3D``), then holes filled and objects under ``min_size`` voxels removed.

``downsample`` (>= 1) shrinks the volume by that factor along every axis before the network
(memory and time fall by its cube) and the diameter with it; labels come back to the full grid
by nearest-neighbour resampling.

:func:`predict_folder` runs one method over a folder of volumes into ``imagesTs_<method>/``:
``<case>.tiff`` per volume (``_0000`` stripped), for orthoplane also ``<case>_xy.tiff``,
``<case>_xz.tiff``, ``<case>_yz.tiff``; resumable per volume (a volume whose ``<case>.tiff``
exists under the same settings is skipped), progress bars per volume and per plane, and a
volume that fails is reported in ``prediction_failures.json`` while the others go on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from seglab import SeglabError
from seglab.config.settings import DIAMETER_AUTO, DIAMETER_NATIVE, MaskSettings
from seglab.core import io
from seglab.data import volumes as vdata
from seglab.segment import models

METHODS = ("orthoplane", "cellpose3d", "stitch")
AXES = ("xy", "xz", "yz")
SETTINGS_FILE = "prediction_settings.json"
FAILURES_FILE = "prediction_failures.json"
TIMING_DIR = "timing"   # timing/<case>.json: the seconds a case took, one file per case (Slurm tasks write at once)


@dataclass(frozen=True)
class VolumeSettings:
    """How a volume is segmented (see the module docstring).

    method : one of :data:`METHODS`.
    axes : orthoplane's orientations (any non-empty subset of xy, xz, yz).
    stitch_threshold : IoU that links 2D masks of neighbouring planes (stitch, and each
        orthoplane stack); cellpose's ``stitch_threshold``.
    consensus_iou : IoU at which objects of two orthoplane stacks are the same object.
    min_votes : stacks that must agree (per object and per voxel); None: a majority
        (2 of 3, 2 of 2, 1 of 1).
    downsample : shrink factor (>= 1) along every axis before the network.
    bsize : network tile size in px (None: the model's); a multiple of 16 for tiny nets.
    """

    method: str = "orthoplane"
    axes: tuple = AXES
    stitch_threshold: float = 0.5
    consensus_iou: float = 0.3
    min_votes: int | None = None
    downsample: float = 1.0
    bsize: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise SeglabError(f"method {self.method!r}: use one of {', '.join(METHODS)}")
        axes = tuple(dict.fromkeys(str(a) for a in self.axes))
        bad = [a for a in axes if a not in AXES]
        if not axes or bad:
            raise SeglabError(f"axes {list(self.axes)}: give a non-empty subset of xy xz yz")
        object.__setattr__(self, "axes", axes)
        if not 0 < float(self.stitch_threshold) <= 1:
            raise SeglabError(f"stitch_threshold {self.stitch_threshold}: must be in (0, 1]")
        if not 0 < float(self.consensus_iou) <= 1:
            raise SeglabError(f"consensus_iou {self.consensus_iou}: must be in (0, 1]")
        if self.min_votes is not None and not 1 <= int(self.min_votes) <= len(axes):
            raise SeglabError(f"min_votes {self.min_votes}: must be 1..{len(axes)} (the number of axes) or null")
        if not (math.isfinite(float(self.downsample)) and float(self.downsample) >= 1):
            raise SeglabError(f"downsample {self.downsample}: must be >= 1 (1 = full resolution)")
        if self.bsize is not None and (int(self.bsize) < 16 or int(self.bsize) % 16):
            raise SeglabError(f"bsize {self.bsize}: must be a multiple of 16, >= 16, or null")

    @property
    def label(self) -> str:
        """The folder name's method part: orthoplane, xy (orthoplane with xy only), cellpose3d, stitch;
        orthoplane on a subset is ``orthoplane_xy_xz``."""
        if self.method != "orthoplane" or set(self.axes) == set(AXES):
            return self.method
        return "xy" if self.axes == ("xy",) else "orthoplane_" + "_".join(self.axes)

    def votes(self) -> int:
        return int(self.min_votes) if self.min_votes is not None else len(self.axes) // 2 + 1


@dataclass
class VolumeResult:
    """Labels ``(Z, Y, X)`` of one volume; ``per_plane`` the orthoplane stacks by axis; timing in s."""

    labels: np.ndarray
    per_plane: dict = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- resampling


def resample_nearest(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``labels`` brought to ``shape`` by nearest-neighbour sampling of voxel centres (exact for labels)."""
    idx = [np.minimum(((np.arange(n) + 0.5) * s / n).astype(np.int64), s - 1) for n, s in zip(shape, labels.shape)]
    return labels[np.ix_(*idx)]


def resample_linear(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``volume`` (float) zoomed to ``shape`` with linear interpolation (scipy.ndimage.zoom, order 1)."""
    from scipy import ndimage

    if tuple(shape) == volume.shape:
        return volume
    zoom = [n / s for n, s in zip(shape, volume.shape)]
    return ndimage.zoom(volume, zoom, order=1, mode="nearest", grid_mode=True).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- consensus


def consensus(stacks: Sequence[np.ndarray], *, iou: float = 0.5, min_votes: int | None = None) -> np.ndarray:
    """Merge instance label volumes of the same shape (one per orientation) into one.

    Objects of every pair of stacks are matched one-to-one at IoU >= ``iou`` (the optimal
    matching of :func:`seglab.evaluate.metrics.matched_pairs`); matched objects are joined
    (transitively) into one candidate. A candidate is kept when objects of at least ``min_votes``
    stacks belong to it (None: a majority, ``len(stacks) // 2 + 1``), and a voxel belongs to the
    kept candidate that at least ``min_votes`` stacks put it in (else background).

    Returns ``(Z, Y, X)`` labels (uint16, uint32 beyond 65,535 objects), ids 1..n in the order of
    each object's first voxel.
    """
    from seglab.evaluate import metrics

    stacks = [np.asarray(s) for s in stacks]
    if not stacks:
        raise SeglabError("consensus: no stacks given")
    for i, s in enumerate(stacks):
        metrics.check_labels(s, f"stack {i}")
        if s.shape != stacks[0].shape:
            raise SeglabError(f"consensus: stack {i} has shape {s.shape}, stack 0 {stacks[0].shape}; "
                              "bring them to one grid first")
    k = len(stacks)
    votes = k // 2 + 1 if min_votes is None else int(min_votes)
    if not 1 <= votes <= k:
        raise SeglabError(f"consensus: min_votes {votes} must be 1..{k}")
    if k == 1:
        return models.as_label_dtype(_renumber(stacks[0]))
    # union-find over (stack, id)
    ids = [np.unique(s[s > 0]) for s in stacks]
    offset = np.cumsum([0] + [len(i) for i in ids])
    parent = np.arange(offset[-1])

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a in range(k):
        for b in range(a + 1, k):
            pairs = metrics.matched_pairs(stacks[a], stacks[b], threshold=iou)
            ia = offset[a] + np.searchsorted(ids[a], pairs["true_id"].to_numpy())
            ib = offset[b] + np.searchsorted(ids[b], pairs["pred_id"].to_numpy())
            for x, y in zip(ia, ib):
                rx, ry = find(x), find(y)
                if rx != ry:
                    parent[max(rx, ry)] = min(rx, ry)
    root = np.array([find(x) for x in range(offset[-1])], np.int64)
    stack_of = np.repeat(np.arange(k), np.diff(offset))
    support = {}
    for r, s in zip(root, stack_of):
        support.setdefault(int(r), set()).add(int(s))
    kept = {r for r, s in support.items() if len(s) >= votes}
    # each stack's labels as candidate ids (root + 1; 0 = background or dropped)
    cand = []
    for s, (lab, sid) in enumerate(zip(stacks, ids)):
        lut = np.zeros(int(lab.max()) + 1 if lab.size else 1, np.int64)
        roots = root[offset[s]:offset[s + 1]]
        lut[sid] = np.where(np.isin(roots, list(kept)), roots + 1, 0)
        cand.append(lut[lab])
    out = np.zeros(stacks[0].shape, np.int64)
    for s in range(k):
        agree = np.zeros(out.shape, np.int16)
        for t in range(k):
            agree += (cand[t] == cand[s])
        take = (cand[s] > 0) & (agree >= votes) & (out == 0)
        out[take] = cand[s][take]
    return models.as_label_dtype(_renumber(out))


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Ids 1..n in the order of each object's first voxel (C order); 0 stays 0."""
    flat = labels.ravel()
    vals, first = np.unique(flat, return_index=True)
    order = vals[np.argsort(first)]
    order = order[order > 0]
    lut = np.zeros(int(vals.max()) + 1 if len(vals) else 1, np.int64)
    lut[order] = np.arange(1, len(order) + 1)
    return lut[labels]


# --------------------------------------------------------------------------- the network


def _eval_diameter(model: models.Model, volume: np.ndarray, mask: MaskSettings, scale: float) -> float | None:
    """The ``diameter`` for cellpose's eval so that it rescales objects of ``mask.diameter_px`` (px of
    the full-resolution volume, shrunk by ``scale``) to the network's canonical diameter."""
    d = mask.diameter_px if mask.diameter_px is not None else model.default_diameter
    if d == DIAMETER_NATIVE:
        return None
    if d == DIAMETER_AUTO:
        d = models.estimate_diameter(volume[volume.shape[0] // 2])
    # cellpose rescales by 30 / diameter; the network wants objects of diam_mean_px
    return float(d) / scale * models.CELLPOSE_REF_DIAMETER_PX / model.diam_mean_px


def _cp_eval(model: models.Model, volume: np.ndarray, mask: MaskSettings, diameter, *, bsize, **kwargs) -> np.ndarray:
    """cellpose's eval of a ``(Z, Y, X)`` volume (as ``[volume, 0, 0]`` channels) -> ``(Z, Y, X)`` labels."""
    x = np.zeros((volume.shape[0], 3, *volume.shape[1:]), np.float32)
    x[:, 0] = volume
    with models.quiet_cellpose():
        m, _, _ = model.cp.eval(x, channel_axis=1, z_axis=0, diameter=diameter,
                                cellprob_threshold=mask.cellprob_threshold, flow_threshold=mask.flow_threshold,
                                min_size=mask.min_size, niter=mask.niter, bsize=int(bsize or model.bsize),
                                batch_size=model.default_batch_size, **kwargs)
    m = np.asarray(m)
    if m.ndim == 2:   # one plane: eval squeezes the z axis away
        m = m[None]
    return m


def segment_volume(model: models.Model, volume: np.ndarray, anisotropy: float = 1.0,
                   settings: VolumeSettings | None = None, mask: MaskSettings | None = None, *,
                   progress: bool = False, name: str = "volume") -> VolumeResult:
    """Segment one ``(Z, Y, X)`` volume with ``settings.method`` (see the module docstring).

    ``anisotropy`` : z step / xy pixel size (> 0). ``mask`` : diameter (px in xy), thresholds,
    ``min_size`` (px per plane for 2D masks; voxels for cellpose3d and after stitching).
    Returns a :class:`VolumeResult` (labels on the volume's grid; orthoplane's stacks in
    ``per_plane``).
    """
    settings = settings or VolumeSettings()
    mask = mask or MaskSettings()
    a = vdata.check_anisotropy(anisotropy)
    vol = np.asarray(volume, np.float32)
    if vol.ndim != 3:
        raise SeglabError(f"{name}: shape {vol.shape}; segment_volume needs (Z, Y, X)")
    if model.kind != "cellpose":
        raise SeglabError(f"model {model.spec!r}: 3D methods need a network model (generalist, tiny, cpsam, a checkpoint)")
    t0 = time.perf_counter()
    ds = float(settings.downsample)
    full = vol.shape
    diameter = _eval_diameter(model, vol, mask, ds)
    if settings.method == "cellpose3d":
        small = resample_linear(vol, [max(1, round(n / ds)) for n in full])
        lab = _cp_eval(model, small, mask, diameter, bsize=settings.bsize, do_3D=True, anisotropy=a)
        return VolumeResult(models.as_label_dtype(resample_nearest(lab, full)), seconds=time.perf_counter() - t0)
    if settings.method == "stitch":
        small = resample_linear(vol, [max(1, round(full[0] / ds)), *(max(1, round(n / ds)) for n in full[1:])])
        lab = _cp_eval(model, small, mask, diameter, bsize=settings.bsize, stitch_threshold=settings.stitch_threshold)
        return VolumeResult(models.as_label_dtype(resample_nearest(lab, full)), seconds=time.perf_counter() - t0)
    # orthoplane: isotropic grid (z zoomed by the anisotropy), shrunk by the downsampling factor
    iso_shape = [max(1, round(full[0] * a / ds)), max(1, round(full[1] / ds)), max(1, round(full[2] / ds))]
    iso = resample_linear(vol, iso_shape)
    stacks = {}
    bar = _bar(len(settings.axes), f"{name}: planes", progress)
    for axis in settings.axes:
        planes = vdata.planes_first(iso, axis)
        if bar is not None:
            bar.set_postfix(axis=axis, planes=planes.shape[0])
        lab = _cp_eval(model, np.ascontiguousarray(planes), mask, diameter, bsize=settings.bsize,
                       stitch_threshold=settings.stitch_threshold)
        stacks[axis] = models.as_label_dtype(resample_nearest(vdata.from_planes_first(lab, axis), full))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    merged = consensus(list(stacks.values()), iou=settings.consensus_iou, min_votes=settings.votes())
    return VolumeResult(merged, per_plane=stacks, seconds=time.perf_counter() - t0)


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="axis", file=sys.stderr, leave=False)


# --------------------------------------------------------------------------- folders


def output_folder(images_dir: str | os.PathLike, settings: VolumeSettings) -> Path:
    """``imagesTs_<label>`` beside ``images_dir`` (``imagesTs_orthoplane``, ``imagesTs_xy``, ...)."""
    images_dir = Path(images_dir)
    return images_dir.parent / f"{images_dir.name}_{settings.label}"


def _record(model: models.Model, settings: VolumeSettings, mask: MaskSettings, anisotropy, channel) -> dict:
    return {"model": str(model.spec), "model_id": models.model_id(model), "settings": asdict(settings),
            "mask": mask.as_dict(), "anisotropy": anisotropy, "channel": channel}


def case_outputs(out: Path, case: str, settings: VolumeSettings) -> list[Path]:
    """The files a volume's prediction writes: ``<case>.tiff`` and, for orthoplane with more than
    one axis, ``<case>_<axis>.tiff`` per axis."""
    files = [out / f"{case}{vdata.OUT_SUFFIX}"]
    if settings.method == "orthoplane" and len(settings.axes) > 1:
        files += [out / f"{case}_{axis}{vdata.OUT_SUFFIX}" for axis in settings.axes]
    return files


@dataclass
class FolderResult:
    """What :func:`predict_folder` did: the folder, cases predicted now, skipped (done before), failed, and
    the seconds each case took (also for skipped cases, from ``timing/<case>.json``)."""

    out: Path
    predicted: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def predict_folder(model: models.Model | str, images_dir: str | os.PathLike, *, settings: VolumeSettings | None = None,
                   mask: MaskSettings | None = None, anisotropy: float | None = None, channel: int | None = None,
                   out_dir: str | os.PathLike | None = None, cases: Sequence[str] | None = None,
                   progress: bool = True, log: Callable[[str], object] | None = print,
                   overwrite: bool = False) -> FolderResult:
    """Segment every volume of ``images_dir`` (``<case>_0000.tif(f)``) into ``out_dir``
    (default ``imagesTs_<method>`` beside it; see :func:`case_outputs` for the files).

    anisotropy : None: each file's metadata (1 when it has none); given: for every volume.
    channel : the channel of 4D ``(Z, C, Y, X)`` files.
    cases : only these cases (a Slurm array task takes one).
    Resumable: a case whose files all exist is skipped when the folder was written with the same
    model and settings (``prediction_settings.json``); other settings are refused (choose another
    folder, or pass ``overwrite`` to replace them). A volume that fails (unreadable, 2D, 4D without channel) is reported in
    ``prediction_failures.json`` and on ``log``; the others go on.
    """
    if anisotropy is not None:   # checked before the model loads: a bad param fails at once
        vdata.check_anisotropy(anisotropy, "--anisotropy")
    if not isinstance(model, models.Model):
        model = models.load(model)
    settings = settings or VolumeSettings()
    mask = mask or MaskSettings()
    images_dir = Path(images_dir)
    found = vdata.index_folder(images_dir, "images")
    if not found:
        raise SeglabError(f"{images_dir}: no .tif/.tiff volumes; put <case>_0000.tif files there")
    if cases is not None:
        unknown = [c for c in cases if c not in found]
        if unknown:
            raise SeglabError(f"{images_dir}: no volume for case(s) {unknown}; cases are {sorted(found)[:5]}...")
        found = {c: found[c] for c in cases}
    out = Path(out_dir) if out_dir is not None else output_folder(images_dir, settings)
    record = _record(model, settings, mask, anisotropy, channel)
    _claim(out, record, overwrite)
    result = FolderResult(out)
    failures = _read_json(out / FAILURES_FILE) or {}
    from tqdm.auto import tqdm

    items = list(found.items())
    for case, path in tqdm(items, desc=f"predict-3d {settings.label}", unit="volume", file=sys.stderr,
                           disable=not progress):
        files = case_outputs(out, case, settings)
        if all(f.is_file() for f in files):
            result.skipped.append(case)
            timing = _read_json(out / TIMING_DIR / f"{case}.json")
            if timing is not None:
                result.seconds[case] = timing.get("seconds")
            continue
        try:
            vol, voxel = vdata.read_volume(path, channel=channel, anisotropy=anisotropy)
            res = segment_volume(model, vol, voxel.anisotropy, settings, mask, progress=progress, name=case)
            try:
                for axis, lab in res.per_plane.items():
                    if len(settings.axes) > 1:
                        vdata.write_volume(out / f"{case}_{axis}{vdata.OUT_SUFFIX}", lab, voxel)
                vdata.write_volume(files[0], res.labels, voxel)   # last: its presence marks the case done
            except BaseException:
                for f in files:   # no per-plane file without its consensus (a full disk, an interrupt)
                    f.unlink(missing_ok=True)
                raise
        except SeglabError as exc:
            result.failed[case] = str(exc)
            if log is not None:
                log(f"predict-3d: {case} failed: {exc}; the other volumes go on")
            continue
        failures.pop(case, None)
        result.predicted.append(case)
        result.seconds[case] = round(res.seconds, 3)
        io.write_json(out / TIMING_DIR / f"{case}.json", {"seconds": result.seconds[case], "shape_zyx": list(vol.shape)})
    failures.update(result.failed)
    if failures:
        io.write_json(out / FAILURES_FILE, failures)
    elif (out / FAILURES_FILE).exists():
        (out / FAILURES_FILE).unlink()
    return result


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _claim(out: Path, record: dict, overwrite: bool = False) -> None:
    """Write the folder's settings record, or check that an existing one matches (resume). With
    ``overwrite``, a folder of other settings loses its predictions, failures and evaluation first."""
    old = _read_json(out / SETTINGS_FILE)
    new = json.loads(io.json_text(record))
    if old is not None and old != new and overwrite:
        import shutil

        for f in out.iterdir():
            if f.is_file() and (f.name.lower().endswith(vdata.TIFF_SUFFIXES) or f.name == FAILURES_FILE):
                f.unlink()
        shutil.rmtree(out / "evaluation", ignore_errors=True)
        shutil.rmtree(out / TIMING_DIR, ignore_errors=True)
        (out / SETTINGS_FILE).unlink()
        old = None
    if old is not None and old != new:
        changed = sorted(k for k in new if old.get(k) != new.get(k))
        raise SeglabError(f"{out}: holds predictions made with other settings ({', '.join(changed)} differ, see "
                          f"{SETTINGS_FILE}); choose another --out folder or remove it")
    if old is None:
        io.write_json(out / SETTINGS_FILE, record)


# --------------------------------------------------------------------------- methods by name and training


def settings_for(name: str, **options) -> VolumeSettings:
    """The settings of a method name as folders and params use it: ``orthoplane``, ``xy`` (orthoplane on
    xy planes only), ``orthoplane_xy_xz`` (a subset), ``cellpose3d``, ``stitch``; ``options`` are the
    other :class:`VolumeSettings` fields."""
    if name == "xy":
        return VolumeSettings(method="orthoplane", axes=("xy",), **options)
    if name.startswith("orthoplane_"):
        return VolumeSettings(method="orthoplane", axes=tuple(name[len("orthoplane_"):].split("_")), **options)
    if name not in METHODS:
        raise SeglabError(f"method {name!r}: use one of orthoplane, xy, orthoplane_<axes> (e.g. orthoplane_xy_xz), "
                          "cellpose3d, stitch")
    return VolumeSettings(method=name, **options)


def train_on_dataset(base: models.Model | str, dataset: str | os.PathLike, training, run_dir: str | os.PathLike, *,
                     anisotropy: float | None = None, channel: int | None = None, plane_step: int = 1,
                     progress: bool = True) -> Path:
    """Fine-tune ``base`` on 2D slices of a 3D nnU-Net dataset's training volumes (imagesTr/instancesTr):
    xy planes, and xz and yz planes too when the voxels are isotropic
    (:func:`seglab.data.volumes.training_slices`; every ``plane_step``-th plane, planes with fewer than
    ``training.min_train_masks`` objects left out), through the one fine-tuning wrapper
    :func:`seglab.segment.train.fit`. Returns the checkpoint (``<run_dir>/model.pt``); an existing one
    made from the same slices and settings is returned as it is, and an interrupted run resumes.
    """
    from seglab.segment import train

    run_dir = Path(run_dir)
    if (run_dir / "model.pt").is_file():
        return run_dir / "model.pt"
    cases = vdata.dataset_cases(dataset, "train")
    vols, labs, anis = [], [], []
    for c in cases:
        v, voxel = vdata.read_volume(c.image, channel=channel, anisotropy=anisotropy)
        lab = vdata.read_labels(c.labels)
        if lab.shape != v.shape:
            raise SeglabError(f"{c.labels}: labels of shape {lab.shape} but the volume {c.image.name} is {v.shape}; "
                              "give each case its own label volume of the same shape")
        vols.append(v)
        labs.append(lab)
        anis.append(voxel.anisotropy)
    xs, ys, ids = vdata.training_slices(vols, labs, anis, min_objects=int(training.min_train_masks), step=plane_step)
    if not xs:
        raise SeglabError(f"{dataset}: no training plane has {training.min_train_masks} objects or more; "
                          "lower min_train_masks or add training volumes")
    if not isinstance(base, models.Model):
        base = models.load(base)
    return train.fit(base, xs, ys, params=training, run_dir=run_dir, ids=ids, progress=progress,
                     meta={"variant": "3d_slices", "dataset": str(dataset), "anisotropies": sorted(set(anis)),
                           "n_slices": len(xs)})
