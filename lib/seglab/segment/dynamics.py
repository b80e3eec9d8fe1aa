"""Network outputs and the one place masks are rebuilt from them (cellpose's own dynamics).

Outputs of a network pass (``Model.segment(..., return_outputs=True)``, ``seglab predict
--save-outputs``, the output cache) are a dict per tile: ``dP`` (2, Y, X) float32 flows,
``cellprob`` (Y, X) float32 logits and ``niter`` (the Euler steps eval used), stored as
``.npz`` by :func:`save_outputs`. Masks at any :class:`~seglab.config.settings.MaskSettings`
come back without the network:

- :func:`masks_from_outputs`: one tile, cellpose's ``resize_and_compute_masks`` (what
  ``CellposeModel.eval`` calls);
- :class:`MaskMemo` / :func:`sweep_masks`: many settings, the same dynamics split in two
  (follow the flows once per cell-probability threshold and niter, then drop masks by
  flow error and size per setting), equal mask for mask (tests/test_study.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from seglab import SeglabError
from seglab.config.settings import MaskSettings
from seglab.core import io
from seglab.segment import models


def _raw_masks(output: dict, cellprob_threshold: float, niter: int | None, max_size_fraction: float = 0.4):
    """cellpose's masks before the flow check and the size filter, and each mask's flow error.

    The same calls as ``cellpose.dynamics.compute_masks`` (follow_flows, get_masks_torch,
    flow_error), split so that every flow_threshold and min_size reuse one run of the dynamics.
    """
    import torch
    from cellpose import dynamics

    dP = np.asarray(output["dP"], np.float32)
    cellprob = np.asarray(output["cellprob"], np.float32)
    n = int(niter if niter is not None else output.get("niter", 200))
    device = torch.device("cpu")
    with models.quiet_cellpose():
        raw = dynamics.compute_masks(dP, cellprob, niter=n, cellprob_threshold=cellprob_threshold,
                                     flow_threshold=0.0, min_size=-1, max_size_fraction=max_size_fraction,
                                     device=device)
        errors = dynamics.flow_error(raw, dP, device)[0] if raw.max() > 0 else np.zeros(0)
    return raw, errors


def _finish_masks(raw: np.ndarray, errors: np.ndarray, flow_threshold: float, min_size: int) -> np.ndarray:
    """``remove_bad_flow_masks`` at ``flow_threshold`` then ``fill_holes_and_remove_small_masks``."""
    import fastremap
    from cellpose import utils

    from seglab.segment import models

    m = raw.copy()
    if m.max() > 0 and flow_threshold is not None and flow_threshold > 0:
        bad = 1 + np.nonzero(errors > flow_threshold)[0]
        fastremap.mask(m, bad, in_place=True)
        fastremap.renumber(m, in_place=True)
    if m.max() < 2 ** 16 and m.dtype != np.uint16:
        m = m.astype(np.uint16)
    m = utils.fill_holes_and_remove_small_masks(m, min_size=min_size)
    return models.as_label_dtype(m)


def sweep_masks(output: dict, flow_thresholds: Sequence[float], cellprob_thresholds: Sequence[float],
                min_sizes: Sequence[int] = (MaskSettings.min_size,), niter: int | None = None) -> dict:
    """Masks of one tile's saved outputs at every (flow_threshold, cellprob_threshold, min_size).

    Equal to :func:`seglab.segment.dynamics.masks_from_outputs` at each setting, but the
    dynamics run once per cellprob_threshold and the flow errors are computed
    once per run (a flow_threshold only decides which masks to drop).

    Returns {(flow_threshold, cellprob_threshold, min_size): (Y, X) labels}.
    """
    out = {}
    for cp in cellprob_thresholds:
        raw, errors = _raw_masks(output, float(cp), niter)
        for flow in flow_thresholds:
            for ms in min_sizes:
                out[(float(flow), float(cp), int(ms))] = _finish_masks(raw, errors, float(flow), int(ms))
    return out


class MaskMemo:
    """Masks of many tiles' saved outputs at many settings, running the dynamics once per tile and
    (cellprob_threshold, niter); flow_threshold and min_size reuse that run (see :func:`sweep_masks`)."""

    def __init__(self, outputs: Sequence[dict]):
        if outputs is None:
            raise SeglabError("MaskMemo: no network outputs (classical model?)")
        self.outputs = list(outputs)
        self._raw: dict = {}

    def __len__(self) -> int:
        return len(self.outputs)

    def masks(self, mask: MaskSettings | None = None) -> list[np.ndarray]:
        """(Y, X) labels of every tile at ``mask``'s thresholds, min size and niter (its diameter
        was fixed by the network pass that made the outputs)."""
        mask = MaskSettings() if mask is None else mask
        out = []
        for i, o in enumerate(self.outputs):
            key = (i, mask.cellprob_threshold, mask.niter)
            if key not in self._raw:
                self._raw[key] = _raw_masks(o, mask.cellprob_threshold, mask.niter)
            raw, errors = self._raw[key]
            out.append(_finish_masks(raw, errors, mask.flow_threshold, mask.min_size))
        return out


def save_masks(folder: Path, names: Sequence[str], masks: Sequence[np.ndarray]) -> Path:
    """Write predicted masks as ``<tile_id>.tif`` (atomic), e.g. for ``seglab evaluate`` later."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    for name, m in zip(names, masks):
        with io.atomic_path(folder / f"{name}.tif") as tmp:
            tifffile.imwrite(tmp, m, compression="zlib")
    return folder


def masks_at(outputs: Sequence[dict], mask: MaskSettings | None = None) -> list[np.ndarray]:
    """Masks rebuilt from saved network outputs at one setting (no network pass)."""
    if outputs is None:
        raise SeglabError("masks_at: this model has no network outputs (classical); use its masks as they are")
    return [masks_from_outputs(o, mask) for o in outputs]


def masks_from_outputs(outputs: dict, mask: MaskSettings | None = None, *, max_size_fraction: float = 0.4,
                       device=None) -> np.ndarray:
    """Rebuild masks from saved network outputs, with cellpose's own dynamics.

    Equal to re-running ``Model.segment`` with these thresholds (the network
    part is skipped): the same ``dynamics.resize_and_compute_masks`` call that
    ``CellposeModel.eval`` makes.

    Parameters
    ----------
    outputs : dict (or a path to an ``.npz``) with ``dP`` (2, Y, X) flows,
        ``cellprob`` (Y, X) logits and ``niter`` (the Euler steps eval used).
    mask : thresholds, min size and niter (None: the stored number of dynamics steps);
        None: the defaults of :class:`~seglab.config.settings.MaskSettings`.
    max_size_fraction : masks larger than this fraction of the image are removed (cellpose's).

    Returns
    -------
    (Y, X) uint16 labels (uint32 beyond 65,535 objects).
    """
    import torch
    from cellpose import dynamics

    if isinstance(outputs, (str, os.PathLike)):
        outputs = load_outputs(outputs)
    try:
        dP, cellprob = np.asarray(outputs["dP"], np.float32), np.asarray(outputs["cellprob"], np.float32)
    except KeyError as exc:
        raise SeglabError(f"masks_from_outputs: outputs lack {exc}; pass what segment(return_outputs=True) "
                          "or seglab predict --save-outputs wrote") from None
    if dP.ndim != cellprob.ndim + 1 or dP.shape[1:] != cellprob.shape:
        raise SeglabError(f"masks_from_outputs: dP {dP.shape} does not fit cellprob {cellprob.shape}")
    mask = MaskSettings() if mask is None else mask
    n = int(mask.niter if mask.niter is not None else outputs.get("niter", 200))
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    with models.quiet_cellpose():
        m = dynamics.resize_and_compute_masks(dP, cellprob, niter=n, cellprob_threshold=mask.cellprob_threshold,
                                              flow_threshold=mask.flow_threshold, min_size=mask.min_size,
                                              max_size_fraction=max_size_fraction, resize=None, device=device,
                                              do_3D=cellprob.ndim == 3)
    return models.as_label_dtype(m)


def save_outputs(path, outputs: dict) -> Path:
    with io.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, dP=outputs["dP"], cellprob=outputs["cellprob"], niter=np.int64(outputs["niter"]))
    return Path(path)


def load_outputs(path) -> dict:
    try:
        with np.load(path) as z:
            return {"dP": z["dP"], "cellprob": z["cellprob"], "niter": int(z["niter"])}
    except Exception as exc:  # noqa: BLE001
        raise SeglabError(f"{path}: not a readable network-outputs file ({exc}); rerun seglab predict "
                          "--save-outputs for that tile") from None
