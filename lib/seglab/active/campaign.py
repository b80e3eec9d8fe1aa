"""An active-learning campaign on disk: one folder, one subfolder per round, each step its own process.

Layout of a campaign folder::

    campaign.json                 the params (written once by :func:`init`)
    pool/<tile_id>.tif            every training candidate, (C, Y, X) float32 ([DAPI, marker])
    val/images/<tile_id>.tif      validation tiles and their masks (val/labels/<tile_id>.tif)
    rounds/round_000/labels/      the initial labelled tiles (output set ``labels``)
    rounds/round_NNN/selection/   round N >= 1: the batch chosen for correction (set ``selection``):
                                  selection.json (every score), selection.csv, and per tile
                                  <tile_id>_image.tif, <tile_id>_pred.tif (the model's labels,
                                  uint16/uint32: napari, Fiji and the Cellpose GUI open it),
                                  <tile_id>_overlay.png (outlines on the DAPI channel)
    rounds/round_NNN/labels/      the corrected masks of that batch (set ``labels``, by :func:`ingest`)
    rounds/round_NNN/train/       the fine-tune (:func:`seglab.segment.train.fit`'s run folder:
                                  model.pt + sidecar = the round's final checkpoint; resumable)
    rounds/round_NNN/round.json   the round's record (set ``round``): labelled tiles, validation
                                  AP@0.5 and F1, seconds, the best checkpoint so far
    history.csv                   one row per trained round (rebuilt from the round records)

A round moves through: selected -> labelled -> trained (round 0 starts labelled). Each step
(:func:`select`, :func:`ingest`, :func:`train`) checks that the previous one is complete, writes
its outputs as one set (all files or none, :func:`seglab.core.io.write_set`) and can be rerun:
a step killed half-way leaves no complete set and is simply run again (the selection is seeded, the
fine-tune resumes from its last chunk and ends with the same weights). No step asks anything at a
keyboard.

The labelled pool is the union of the complete ``labels`` sets; the unlabelled pool the rest of
``pool/``. Round N fine-tunes from round N-1's final checkpoint (round 0 from ``base_model``) on
every labelled tile. "best" is the checkpoint with the highest validation AP@0.5 over rounds
0..N (recorded in each round.json; ties keep the earlier round).

Stop rule (:func:`stop_reason`): after round N is trained, stop when N >= ``max_rounds``, or when
each of the last ``patience`` rounds improved validation AP@0.5 by less than ``min_improvement``
over the best AP of the rounds before it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.config.settings import MaskSettings, TrainSettings
from seglab.core import io

FORMAT = "seglab-active-campaign-1"
CONFIG = "campaign.json"
HISTORY = "history.csv"
LABELS_SET, SELECTION_SET, ROUND_SET = "labels", "selection", "round"
IOU = 0.5   # validation AP and F1 at this IoU threshold
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# campaign params (campaign.json) and their defaults; mask and training settings go in their own keys
DEFAULTS = {
    "base_model": "generalist",
    "weights": {"entropy": 1.0, "margin": 1.0, "tta_mask": 1.0, "ensemble": 1.0, "coreset": 0.5, "kmeans": 0.3},
    "batch_size": 20,
    "max_rounds": 10,
    "min_improvement": 0.01,
    "patience": 1,
    "seed": 0,
    "tta_views": 4,
    "ensemble_size": 2,
    "aggregation": "region",
    "boundary_px": 2,
    "top_k_fraction": 0.05,
}


# --------------------------------------------------------------------------- files


def _write_tiff(path: Path, arr: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, arr)


def read_array(path: Path) -> np.ndarray:
    """A campaign TIFF (image (C, Y, X) or label mask (Y, X)) as an array, without tifffile's log lines."""
    from seglab.data.manifest import read_tiff

    with io.quiet_tiff_log():
        return np.asarray(read_tiff(path))


def _check_id(tile_id: str) -> str:
    t = str(tile_id)
    if not _ID_RE.match(t):
        raise SeglabError(f"tile id {t!r}: use letters, digits, '_', '-' and '.' only (it becomes a file name)")
    return t


def _label_dtype(mask: np.ndarray) -> np.ndarray:
    from seglab.segment.models import as_label_dtype

    return as_label_dtype(mask)


def check_mask(mask: np.ndarray, shape: tuple, where: str) -> np.ndarray:
    """A corrected mask as uint16/uint32 labels, or SeglabError naming ``where`` (the file) and the fix:
    a float or bool image, negative ids, or a shape other than the tile's (Y, X) ``shape``."""
    m = np.asarray(mask)
    if m.dtype == bool or not np.issubdtype(m.dtype, np.integer):
        raise SeglabError(f"{where}: mask has dtype {m.dtype}, not integer labels; save the label image as 16- or "
                          f"32-bit unsigned integers (0 = background, one id per cell), not as a float or binary image")
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != tuple(shape):
        raise SeglabError(f"{where}: mask shape {tuple(m.shape)} differs from the tile's {tuple(shape)}; "
                          f"correct the exported <tile>_pred.tif of this tile (same size), do not crop or rescale it")
    if m.size and int(m.min()) < 0:
        raise SeglabError(f"{where}: mask has negative ids (min {int(m.min())}); ids must be 0 (background) or positive")
    return _label_dtype(m)


# --------------------------------------------------------------------------- the campaign


@dataclass
class Campaign:
    """An opened campaign folder (:func:`open_campaign`): ``root`` and its params ``config``."""

    root: Path
    config: dict

    # ---- paths
    def round_dir(self, k: int) -> Path:
        return self.root / "rounds" / f"round_{int(k):03d}"

    def rounds(self) -> list[int]:
        d = self.root / "rounds"
        return sorted(int(p.name[6:]) for p in d.glob("round_[0-9][0-9][0-9]") if p.is_dir()) if d.is_dir() else []

    def pool_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "pool").glob("*.tif"))

    def image(self, tile_id: str) -> np.ndarray:
        return read_array(self.root / "pool" / f"{tile_id}.tif")

    @property
    def mask(self) -> MaskSettings:
        return MaskSettings(**self.config["mask"])

    @property
    def training(self) -> TrainSettings:
        return TrainSettings(**self.config["training"])

    # ---- state of a round
    def selected(self, k: int) -> bool:
        return k == 0 or io.set_complete(self.round_dir(k) / "selection", SELECTION_SET)

    def labelled(self, k: int) -> bool:
        return io.set_complete(self.round_dir(k) / "labels", LABELS_SET)

    def trained(self, k: int) -> bool:
        return io.set_complete(self.round_dir(k), ROUND_SET)

    def stage(self, k: int) -> str:
        """``trained``, ``labelled``, ``selected`` or ``started`` (a step began and did not finish)."""
        if self.trained(k):
            return "trained"
        if self.labelled(k):
            return "labelled"
        if self.selected(k):
            return "selected"
        return "started"

    def selection(self, k: int) -> dict:
        """The ``selection.json`` of round k."""
        return json.loads((self.round_dir(k) / "selection" / "selection.json").read_text())

    def record(self, k: int) -> dict:
        """The ``round.json`` of trained round k."""
        return json.loads((self.round_dir(k) / "round.json").read_text())

    def labelled_ids(self, up_to: int | None = None) -> list[str]:
        """The labelled tiles: those of every complete ``labels`` set of rounds <= ``up_to``, in round order."""
        ids = []
        for k in self.rounds():
            if (up_to is None or k <= up_to) and self.labelled(k):
                ids += sorted(json.loads(io.set_marker(self.round_dir(k) / "labels", LABELS_SET).read_text())
                              ["files"])
        return [Path(f).stem for f in ids]

    def label(self, tile_id: str) -> np.ndarray:
        for k in self.rounds():
            f = self.round_dir(k) / "labels" / f"{tile_id}.tif"
            if f.is_file() and self.labelled(k):
                return read_array(f)
        raise SeglabError(f"tile {tile_id} has no ingested mask in {self.root}")

    def unlabelled_ids(self) -> list[str]:
        done = set(self.labelled_ids())
        return [t for t in self.pool_ids() if t not in done]

    def model_path(self, k: int) -> Path:
        """Round k's final checkpoint; SeglabError naming the file when the folder lost it."""
        p = self.round_dir(k) / "train" / "model.pt"
        if not p.is_file():
            raise SeglabError(f"{p}: round {k}'s checkpoint is missing (the round folder was edited or moved); "
                              f"restore the file, or delete {self.round_dir(k) / 'round.complete.json'} and "
                              f"{p.parent} and run `seglab active train` again")
        return p

    def model_chain(self, k: int) -> list[str]:
        """Specs of the base model and of rounds 0..k's final checkpoints (the ensemble's candidates)."""
        return [self.config["base_model"], *(str(self.model_path(j)) for j in range(k + 1))]

    def validation(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        ids = sorted(p.stem for p in (self.root / "val" / "images").glob("*.tif"))
        return ([read_array(self.root / "val" / "images" / f"{t}.tif") for t in ids],
                [read_array(self.root / "val" / "labels" / f"{t}.tif") for t in ids])


def _config(params: Mapping) -> dict:
    from seglab.active.diversity import check_weights

    unknown = sorted(set(params) - set(DEFAULTS) - {"mask", "training"})
    if unknown:
        raise SeglabError(f"campaign params: unknown keys {unknown}; known: {sorted(DEFAULTS) + ['mask', 'training']}")
    cfg = {**DEFAULTS, **{k: v for k, v in params.items() if k not in ("mask", "training")}}
    check_weights(cfg["weights"], "campaign params 'weights'")
    for key, low in (("batch_size", 1), ("max_rounds", 1), ("patience", 1), ("tta_views", 1), ("ensemble_size", 2)):
        if int(cfg[key]) < low:
            raise SeglabError(f"campaign params '{key}'={cfg[key]}: give at least {low}")
    cfg["mask"] = MaskSettings(**dict(params.get("mask") or {})).as_dict()
    cfg["training"] = TrainSettings(**dict(params.get("training") or {})).as_dict()
    return cfg


def init(folder: str | Path, pool: Mapping[str, np.ndarray], labelled: Mapping[str, np.ndarray],
         val_images: Mapping[str, np.ndarray], val_labels: Mapping[str, np.ndarray], params: Mapping) -> Campaign:
    """Create a campaign: the pool's images, the validation tiles, the initial labelled tiles as round 0.

    pool : {tile_id: (C, Y, X) image} every training candidate (the initial labelled ones included).
    labelled : {tile_id: (Y, X) mask} the initial labelled tiles (ids of ``pool``, at least one).
    val_images, val_labels : {tile_id: image}, {tile_id: mask} for the validation AP of each round.
    params : campaign params (see :data:`DEFAULTS`, plus ``mask`` and ``training`` settings dicts).
    Refuses a folder that already holds a campaign.
    """
    from seglab.segment.models import Model

    root = Path(folder)
    if (root / CONFIG).exists():
        raise SeglabError(f"{root / CONFIG}: a campaign is already here; use another folder or `seglab active status`")
    cfg = _config(params)
    if not labelled:
        raise SeglabError("init: no initial labelled tiles; give at least one (the first fine-tune needs them)")
    if not val_images or set(val_images) != set(val_labels):
        raise SeglabError("init: give validation images and a mask for each (the same tile ids)")
    missing = sorted(set(labelled) - set(pool))
    if missing:
        raise SeglabError(f"init: labelled tiles {missing[:5]} are not in the pool; every labelled tile needs its image")
    imgs = {}
    for t, x in pool.items():
        Model.as_network_input(x, name=f"pool tile {t}")   # checks the layout: (C, Y, X), C <= 3
        x = np.asarray(x, np.float32)
        imgs[_check_id(t)] = x[None] if x.ndim == 2 else x
    masks = {t: check_mask(m, imgs[t].shape[1:], f"initial mask of tile {t}") for t, m in labelled.items()}
    vimgs = {_check_id(t): np.asarray(x, np.float32) for t, x in val_images.items()}
    vmasks = {t: check_mask(val_labels[t], np.asarray(vimgs[t]).shape[-2:], f"validation mask of tile {t}")
              for t in vimgs}
    io.write_set(root / "pool", {f"{t}.tif": (lambda p, x=x: _write_tiff(p, x)) for t, x in imgs.items()}, name="pool")
    io.write_set(root / "val" / "images", {f"{t}.tif": (lambda p, x=x: _write_tiff(p, x)) for t, x in vimgs.items()},
                 name="images")
    io.write_set(root / "val" / "labels", {f"{t}.tif": (lambda p, m=m: _write_tiff(p, m)) for t, m in vmasks.items()},
                 name="labels")
    c = Campaign(root, cfg)
    c.round_dir(0).mkdir(parents=True, exist_ok=True)
    io.write_set(c.round_dir(0) / "labels", {f"{t}.tif": (lambda p, m=m: _write_tiff(p, m)) for t, m in masks.items()},
                 name=LABELS_SET)
    io.write_json(root / CONFIG, {"format": FORMAT, "params": cfg}, overwrite=False)
    return c


def open_campaign(folder: str | Path) -> Campaign:
    """The campaign in ``folder``; SeglabError when there is none."""
    root = Path(folder)
    f = root / CONFIG
    if not f.is_file():
        raise SeglabError(f"{root}: no campaign here ({CONFIG} missing); create one with `seglab active init`")
    try:
        data = json.loads(f.read_text())
    except ValueError as exc:
        raise SeglabError(f"{f}: not valid JSON ({exc}); restore it") from None
    if data.get("format") != FORMAT:
        raise SeglabError(f"{f}: not a seglab campaign (format {data.get('format')!r}, expected {FORMAT!r})")
    return Campaign(root, data["params"])


# --------------------------------------------------------------------------- stop rule and history


def stop_reason(aps: Sequence[float], max_rounds: int, min_improvement: float, patience: int) -> str | None:
    """Why to stop after the rounds whose validation AP@0.5 are ``aps`` (round 0 first), or None.

    max rounds: the last round is ``max_rounds``; no improvement: each of the last ``patience``
    rounds improved AP by less than ``min_improvement`` over the best AP of the rounds before it.
    """
    k = len(aps) - 1
    if k >= max_rounds:
        return f"max_rounds: round {k} is the last (max_rounds={max_rounds})"
    if k >= patience:
        gains = [aps[j] - max(aps[:j]) for j in range(k - patience + 1, k + 1)]
        if all(g < min_improvement for g in gains):
            return (f"min_improvement: validation AP@0.5 improved by {', '.join(f'{g:+.4f}' for g in gains)} over the "
                    f"last {patience} round(s), less than {min_improvement}")
    return None


def history(c: Campaign) -> pd.DataFrame:
    """One row per trained round: round, n_labelled, val_ap50, val_f1, improvement (over the best earlier
    round), best_round, selected (ids, ';'-joined), selected_scores (combined scores), select_s, train_s (s)."""
    rows = []
    for k in c.rounds():
        if c.trained(k):
            r = c.record(k)
            rows.append({key: r[key] for key in ("round", "n_labelled", "val_ap50", "val_f1", "improvement",
                                                 "best_round", "selected", "selected_scores", "select_s", "train_s")})
    return pd.DataFrame(rows, columns=["round", "n_labelled", "val_ap50", "val_f1", "improvement", "best_round",
                                       "selected", "selected_scores", "select_s", "train_s"])


def status(c: Campaign) -> dict:
    """{rounds: [(round, stage)], history: DataFrame, next: the next command, stop: reason or None}."""
    ks = c.rounds()
    hist = history(c)
    stop = (stop_reason(list(hist["val_ap50"]), int(c.config["max_rounds"]), float(c.config["min_improvement"]),
                        int(c.config["patience"])) if len(hist) else None)
    last = ks[-1] if ks else 0
    stage = c.stage(last)
    nxt = {"trained": "done" if stop else "select", "labelled": "train", "selected": "ingest",
           "started": "select"}[stage]
    if last == 0 and stage == "labelled":
        nxt = "train"
    return {"rounds": [(k, c.stage(k)) for k in ks], "history": hist, "next": nxt, "stop": stop}


# --------------------------------------------------------------------------- select


def _overlay_png(path: Path, image: np.ndarray, labels: np.ndarray) -> None:
    """Outlines of ``labels`` in yellow on the DAPI channel (percentile-normalised), as PNG."""
    from matplotlib.image import imsave
    from skimage.segmentation import find_boundaries

    d = np.asarray(image, np.float64)[0]
    lo, hi = np.percentile(d, [1, 99.8])
    g = np.clip((d - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = np.stack([g, g, g], axis=-1)
    rgb[find_boundaries(labels, mode="inner")] = (1.0, 0.85, 0.0)
    imsave(path, rgb, format="png")


def _load(spec: str):
    from seglab.segment import models

    return models.load(spec, gpu=None)


def select(c: Campaign, *, log: Callable | None = None) -> dict:
    """Score the unlabelled pool with the last trained round's model and export the batch as round N+1.

    Needs the last round trained and the stop rule not met. Rerunning after a complete selection
    returns it unchanged; after a killed run it selects again (seeded: the same batch).
    Returns the round's ``selection.json`` content.
    """
    from seglab.active import diversity, uncertainty

    ks = c.rounds()
    last = ks[-1]
    if c.stage(last) != "trained":
        if last > 0 and c.selected(last):
            return c.selection(last)
        if last > 0 and c.stage(last) == "started":
            last -= 1   # a selection that did not finish: redo it
        else:
            raise SeglabError(f"{c.round_dir(last)}: round {last} is {c.stage(last)}, not trained; run "
                              f"`seglab active {'ingest' if c.stage(last) == 'selected' else 'train'}` first")
    st = status(c)
    if st["stop"]:
        raise SeglabError(f"{c.root}: the campaign has stopped ({st['stop']}); raise max_rounds or min_improvement "
                          f"in {c.root / CONFIG} to go on")
    k = last + 1
    cfg = c.config
    t0 = time.monotonic()
    weights = diversity.check_weights(cfg["weights"], f"{c.root / CONFIG}: 'weights'")
    ids = c.unlabelled_ids()
    if int(cfg["batch_size"]) > len(ids):
        raise SeglabError(f"{c.root / CONFIG}: batch_size={cfg['batch_size']} is larger than the unlabelled pool "
                          f"({len(ids)} tiles); lower batch_size to at most {len(ids)} or add tiles to pool/")
    chain = c.model_chain(last)
    model = _load(chain[-1])
    measures = diversity.measures_needed(weights)
    ensemble = [_load(s) for s in chain[-int(cfg["ensemble_size"]):-1]] if "ensemble" in measures else []
    images = [c.image(t) for t in ids]
    if measures or "coreset" in weights or "kmeans" in weights:
        scored = uncertainty.score_pool(model, images, ids, c.mask, measures=measures,
                                        tta_views=int(cfg["tta_views"]), ensemble=ensemble, how=cfg["aggregation"],
                                        boundary_px=int(cfg["boundary_px"]), top_k_fraction=float(cfg["top_k_fraction"]))
    else:   # random alone needs no network pass over the pool: only the picked tiles are predicted below
        scored = uncertainty.Scored(table=pd.DataFrame({"tile_id": ids}), styles=None, masks={},
                                    seconds={"forward": 0.0, "pixel": 0.0, "tta": 0.0, "ensemble": 0.0})
    lab_feats = None
    if "coreset" in weights:
        lab_ids = c.labelled_ids()
        _, lab_outs = model.segment([c.image(t) for t in lab_ids], c.mask, return_outputs=True, return_styles=True)
        lab_feats = np.stack([o["style"] for o in lab_outs])
    picks = diversity.select_batch(scored.table, scored.styles, lab_feats, weights, int(cfg["batch_size"]),
                                   seed=int(cfg["seed"]) * 1000 + k, source=f"{c.root / CONFIG}: 'weights'")
    by_id = dict(zip(ids, images))
    for t in picks["tile_id"]:
        if t not in scored.masks:
            scored.masks[t] = model.segment(by_id[t], c.mask)
    select_s = round(time.monotonic() - t0, 2)
    sel = {"round": k, "model": chain[-1], "weights": weights, "batch_size": int(cfg["batch_size"]),
           "n_candidates": len(ids), "select_s": select_s, "scoring_s": scored.seconds,
           "selected": list(picks["tile_id"]), "picks": picks.to_dict("records"),
           "scores": scored.table.to_dict("records")}
    writers = {"selection.json": lambda p: p.write_text(io.json_text(sel)),
               "selection.csv": lambda p: picks.to_csv(p, index=False)}
    for t in sel["selected"]:
        writers[f"{t}_image.tif"] = lambda p, t=t: _write_tiff(p, by_id[t])
        writers[f"{t}_pred.tif"] = lambda p, t=t: _write_tiff(p, scored.masks[t])
        writers[f"{t}_overlay.png"] = lambda p, t=t: _overlay_png(p, by_id[t], scored.masks[t])
    io.write_set(c.round_dir(k) / "selection", writers, name=SELECTION_SET)
    if log:
        log(f"round {k}: selected {len(sel['selected'])} of {len(ids)} tiles in {select_s} s -> "
            f"{c.round_dir(k) / 'selection'}")
    return sel


# --------------------------------------------------------------------------- ingest


def corrected_files(folder: str | Path) -> dict[str, Path]:
    """{tile_id: file} of the corrected masks in ``folder``: ``<tile_id>.tif`` / ``.tiff``, or the exported
    names ``<tile_id>_pred.tif`` / ``<tile_id>_masks.tif`` edited in place."""
    out = {}
    for f in sorted(Path(folder).iterdir()):
        if f.suffix.lower() not in (".tif", ".tiff") or f.name.startswith("."):
            continue
        stem = f.stem
        if stem.endswith("_image"):
            continue
        for suffix in ("_pred", "_masks"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        if stem in out:
            raise SeglabError(f"{f}: a second mask for tile {stem} (also {out[stem].name}); keep one per tile")
        out[stem] = f
    return out


def ingest(c: Campaign, masks: Mapping[str, np.ndarray | str | Path], *, log: Callable | None = None) -> list[str]:
    """Ingest the corrected masks of the last selected round: every selected tile, nothing else.

    masks : {tile_id: (Y, X) labels or a TIFF file}. Each is checked (:func:`check_mask`: integer
    dtype, no negative ids, the tile's shape) and belongs to a tile of this round's selection; any
    failure raises SeglabError naming the file (or tile) and the fix, and nothing is written. The
    masks are then written as one set (all or none). Returns the ingested tile ids.
    """
    k = c.rounds()[-1]
    if k == 0 or c.stage(k) != "selected":
        raise SeglabError(f"{c.round_dir(k)}: round {k} is {c.stage(k)}; ingest follows `seglab active select` "
                          f"(the next step is `seglab active {status(c)['next']}`)")
    selected = c.selection(k)["selected"]
    where = {t: str(v) if isinstance(v, (str, Path)) else f"mask of tile {t}" for t, v in masks.items()}
    stray = [t for t in masks if t not in selected]
    if stray:
        raise SeglabError(f"{where[stray[0]]}: tile {stray[0]} was not selected in round {k} (selected: "
                          f"{', '.join(selected)}); remove that file, only the selected tiles are ingested")
    missing = [t for t in selected if t not in masks]
    if missing:
        raise SeglabError(f"round {k}: no corrected mask for selected tiles {missing}; give one per selected tile "
                          f"(<tile_id>.tif) so the batch is ingested whole")
    checked = {}
    for t in selected:
        v = masks[t]
        arr = read_array(Path(v)) if isinstance(v, (str, Path)) else np.asarray(v)
        checked[t] = check_mask(arr, c.image(t).shape[1:], where[t])
    io.write_set(c.round_dir(k) / "labels", {f"{t}.tif": (lambda p, m=m: _write_tiff(p, m))
                                             for t, m in checked.items()}, name=LABELS_SET)
    if log:
        log(f"round {k}: ingested {len(checked)} corrected masks")
    return list(checked)


# --------------------------------------------------------------------------- train


def train(c: Campaign, *, stop_after_epochs: int | None = None, progress: bool = False,
          log: Callable | None = None) -> dict | None:
    """Fine-tune the last labelled round from the previous round's final checkpoint (round 0: the base
    model) on every labelled tile, score it on the validation tiles and record the round.

    Resumable: a killed run continues from its last chunk (:func:`seglab.segment.train.fit`).
    ``stop_after_epochs``: stop as if killed (tests). Returns the round's record, or None when
    stopped early.
    """
    from seglab.evaluate import metrics
    from seglab.segment import train as seg_train

    k = c.rounds()[-1]
    if c.trained(k):
        return c.record(k)
    if not c.labelled(k):
        raise SeglabError(f"{c.round_dir(k)}: round {k} is {c.stage(k)}; train follows `seglab active ingest`")
    base = c.config["base_model"] if k == 0 else str(c.model_path(k - 1))
    ids = c.labelled_ids(k)
    t0 = time.monotonic()
    model = _load(base)
    val_x, val_y = c.validation()
    training = c.training.replace(seed=int(c.training.seed) + k)
    path = seg_train.fit(model, [c.image(t) for t in ids], [c.label(t) for t in ids], params=training,
                         run_dir=c.round_dir(k) / "train", ids=ids, progress=progress, final_validation=False,
                         meta={"variant": "active_learning", "round": k, "campaign": str(c.root)},
                         stop_after_epochs=stop_after_epochs)
    if path.name != "model.pt":
        return None
    model = _load(str(path))
    score = metrics.pooled_match(val_y, model.segment(list(val_x), c.mask),
                                 threshold=IOU)
    earlier = [c.record(j) for j in range(k)]
    best_before = max((r["val_ap50"] for r in earlier), default=None)
    ap = round(float(score["ap"]), 4)
    best = k if best_before is None or ap > best_before else max(earlier, key=lambda r: r["val_ap50"])["round"]
    sel = c.selection(k) if k > 0 else {"selected": [], "picks": [], "select_s": 0.0}
    record = {"round": k, "n_labelled": len(ids), "val_ap50": ap, "val_f1": round(float(score["f1"]), 4),
              "improvement": None if best_before is None else round(ap - best_before, 4), "best_round": best,
              "best_checkpoint": str((c.round_dir(best) / "train" / "model.pt").relative_to(c.root)),
              "final_checkpoint": str(path.relative_to(c.root)), "final_sha256": io.sha256_file(path),
              "base": base, "selected": ";".join(sel["selected"]),
              "selected_scores": ";".join(f"{p['combined']:.4f}" for p in sel["picks"]),
              "select_s": sel["select_s"], "train_s": round(time.monotonic() - t0, 2)}
    io.write_set(c.round_dir(k), {"round.json": lambda p: p.write_text(io.json_text(record))}, name=ROUND_SET)
    io.write_table(c.root / HISTORY, history(c))
    if log:
        log(f"round {k}: {len(ids)} labelled tiles, validation AP@0.5 {ap:.3f} (best: round {best})")
    return record
