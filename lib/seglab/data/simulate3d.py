"""Simulated 3D nuclei volumes with planted truth, written in the nnU-Net raw layout.

What is planted
---------------
Nuclei are ellipsoids of varied size (semi-axes ``radius_um`` x 0.75-1.3) and random
orientation (a uniformly random rotation each), placed so that neighbours touch: centres
are drawn at least ``touch`` x (sum of the two mean radii) apart (``touch`` < 1 lets them
press into each other), and a voxel inside two ellipsoids goes to the one whose surface is
farther (the smaller normalised distance), so touching nuclei share a flat face. Labels are
``(Z, Y, X)`` uint16 ids 1..n of the nuclei with at least ``min_voxels`` voxels.

The image is acquired with a z step ``anisotropy`` times the xy pixel size (1 um): the
nuclei are drawn at physical coordinates, each with its own brightness (log-normal) and a
faint chromatin texture, on a dim background; the optics blur more along z (Gaussian PSF
sigma ``psf_xy_um`` in xy, ``psf_z_um`` = 2.5 x that along z, both in um), then
Poisson-Gaussian noise. Same arguments and seed give the same arrays.

:func:`simulate_dataset` writes ``DatasetNNN_Name/imagesTr|imagesTs/<case>_0000.tiff`` and
``instancesTr|instancesTs/<case>.tiff`` with the voxel size in each file's metadata, and a
``dataset.json`` (nnU-Net's: channel names, file ending, numTraining) plus ``simulation.json``
(every argument, so a rerun with the same arguments reuses the folder).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from seglab import SeglabError
from seglab.core import io
from seglab.data import volumes


@dataclass(frozen=True)
class Sim3DParams:
    """How a simulated volume looks (lengths in um; the xy pixel is 1 um).

    radius_um : mean nucleus semi-axis (um); each nucleus draws its three semi-axes from
        ``radius_um`` x U(0.75, 1.3).
    density : nuclei per 1000 um^3 of volume (before rejection of crowded positions).
    touch : neighbours' centres at least ``touch`` x (r_i + r_j) apart (1: just touching).
    psf_xy_um, psf_z_factor : Gaussian blur sigma in xy (um) and the factor along z.
    background, brightness_sd : background level (fraction of a mean nucleus) and the
        log-normal sd of nucleus brightness.
    photons, read_noise : Poisson scale (photons for a mean nucleus voxel) and Gaussian sd.
    min_voxels : smaller visible nuclei (cut by the volume's border) are not labelled.
    """

    radius_um: float = 7.0
    density: float = 1.3
    touch: float = 0.85
    psf_xy_um: float = 1.0
    psf_z_factor: float = 2.5
    background: float = 0.12
    brightness_sd: float = 0.25
    photons: float = 60.0
    read_noise: float = 0.03
    min_voxels: int = 30


def _rotation(rng) -> np.ndarray:
    """A uniformly random 3D rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def simulate_volume(shape_um: tuple[float, float, float], anisotropy: float, seed: int,
                    params: Sim3DParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One volume with planted nuclei.

    Parameters
    ----------
    shape_um : physical extent (z, y, x) in um; the xy pixel is 1 um, the z step ``anisotropy`` um,
        so the array has ``round(z / anisotropy)`` planes.
    anisotropy : z step / xy pixel size (> 0).
    seed : the same seed (and arguments) gives the same volume.

    Returns
    -------
    image : (Z, Y, X) float32, about 0-1.5 (a mean nucleus is 1).
    labels : (Z, Y, X) uint16, 0 background, nuclei 1..n.
    """
    from scipy import ndimage

    a = volumes.check_anisotropy(anisotropy)
    P = params or Sim3DParams()
    rng = np.random.default_rng([int(seed), int(round(a * 1000))])
    nz = max(1, int(round(shape_um[0] / a)))
    ny, nx = int(round(shape_um[1])), int(round(shape_um[2]))
    extent = np.array([nz * a, ny, nx], float)
    n_try = int(np.ceil(P.density * np.prod(extent) / 1000.0)) * 3
    mean_r = P.radius_um * rng.uniform(0.8, 1.2, n_try)
    # centres over the volume and a margin of one radius, so nuclei cut by the border appear too
    centres = rng.uniform(0, 1, size=(n_try, 3)) * (extent + 2 * P.radius_um) - P.radius_um
    kept = _place_from(centres, mean_r, P.touch)
    best = np.full((nz, ny, nx), np.inf, np.float32)
    labels = np.zeros((nz, ny, nx), np.int32)
    zc = (np.arange(nz) + 0.5) * a   # plane centres in um
    brightness = np.exp(rng.normal(0, P.brightness_sd, len(centres)))
    image_phys = np.zeros((nz, ny, nx), np.float32)
    for lab, i in enumerate(kept, start=1):
        semi = mean_r[i] * rng.uniform(0.75, 1.3, 3)
        rot = _rotation(rng)
        r = semi.max()
        c = centres[i]
        z0, z1 = np.searchsorted(zc, c[0] - r), np.searchsorted(zc, c[0] + r)
        y0, y1 = max(0, int(np.floor(c[1] - r))), min(ny, int(np.ceil(c[1] + r)) + 1)
        x0, x1 = max(0, int(np.floor(c[2] - r))), min(nx, int(np.ceil(c[2] + r)) + 1)
        if z1 <= z0 or y1 <= y0 or x1 <= x0:
            continue
        zz, yy, xx = np.meshgrid(zc[z0:z1] - c[0], np.arange(y0, y1) + 0.5 - c[1], np.arange(x0, x1) + 0.5 - c[2],
                                 indexing="ij")
        local = np.stack([zz, yy, xx], -1) @ rot   # coordinates in the nucleus's own axes
        d = np.sqrt(((local / semi) ** 2).sum(-1)).astype(np.float32)
        box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        take = (d < 1) & (d < best[box])
        best[box][take] = d[take]
        labels[box][take] = lab
        texture = 1 + 0.15 * np.cos(local[..., 0] * 1.3 + local[..., 1] * 0.9) * np.cos(local[..., 2] * 1.1)
        image_phys[box][take] = (brightness[i] * texture[take]).astype(np.float32)
    # label ids of the nuclei visible with enough voxels, renumbered 1..n
    counts = np.bincount(labels.ravel())
    keep_ids = np.flatnonzero(counts >= P.min_voxels)
    keep_ids = keep_ids[keep_ids > 0]
    lut = np.zeros(len(counts), np.uint16)
    lut[keep_ids] = np.arange(1, len(keep_ids) + 1)
    labels = lut[labels]
    image = image_phys + np.float32(P.background)
    sigma = (P.psf_xy_um * P.psf_z_factor / a, P.psf_xy_um, P.psf_xy_um)   # voxels
    image = ndimage.gaussian_filter(image, sigma, mode="nearest")
    image = rng.poisson(np.clip(image, 0, None) * P.photons) / P.photons
    image = image + rng.normal(0, P.read_noise, image.shape)
    return image.astype(np.float32), labels


def _place_from(centres: np.ndarray, radii: np.ndarray, touch: float) -> list[int]:
    """Indices of the centres kept in order: each at least touch * (r_i + r_j) from every kept one."""
    kept: list[int] = []
    for i, c in enumerate(centres):
        if not kept:
            kept.append(i)
            continue
        d = np.linalg.norm(centres[kept] - c, axis=1)
        if np.all(d >= touch * (radii[i] + radii[kept])):
            kept.append(i)
    return kept


def simulate_dataset(out_dir: str | os.PathLike, *, n_train: int, n_test: int, shape_um=(48, 96, 96),
                     anisotropy: float = 1.0, seed: int = 0, params: Sim3DParams | None = None,
                     name: str = "Nuclei3D") -> Path:
    """Write a simulated nnU-Net dataset (see the module docstring) at ``out_dir``; returns it.

    The folder is built beside the target and renamed into place; a folder with the same
    ``simulation.json`` is reused as it is, one with another is refused (never overwritten).
    Cases are ``<name>_<split>_<k>`` (k from 000), each from its own seed.
    """
    out = Path(out_dir)
    a = volumes.check_anisotropy(anisotropy)
    P = params or Sim3DParams()
    record = {"n_train": int(n_train), "n_test": int(n_test), "shape_um": [float(s) for s in shape_um],
              "anisotropy": a, "seed": int(seed), "params": asdict(P), "name": name}
    marker = out / "simulation.json"
    if out.exists():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = None
        if old == json.loads(io.json_text(record)):
            return out
        raise SeglabError(f"{out}: exists and was not made with these arguments (simulation.json differs or is "
                          "missing); remove it or choose another folder")
    if n_train < 0 or n_test < 1:
        raise SeglabError(f"simulate_dataset: n_train={n_train}, n_test={n_test}; need n_train >= 0 and n_test >= 1")
    voxel = volumes.VoxelSize.from_anisotropy(a)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for split, n, offset in (("train", n_train, 0), ("test", n_test, 10_000)):
            for k in range(n):
                image, labels = simulate_volume(shape_um, a, seed * 100_003 + offset + k, P)
                volumes.write_case(tmp, split, f"{name}_{split}_{k:03d}", image, labels, voxel)
        io.write_json(tmp / "dataset.json", {
            "channel_names": {"0": "nuclei"}, "labels": {"background": 0, "nucleus": 1},
            "numTraining": int(n_train), "file_ending": volumes.OUT_SUFFIX,
            "spacing_zyx_um": [voxel.z_um, voxel.y_um, voxel.x_um]})
        io.write_json(tmp / "simulation.json", record)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
