"""Fine-tuning: a resumable, seeded wrapper around ``cellpose.train.train_seg``.

``fit`` trains a cellpose-family network (``tiny`` or cpsam) on lists of images
and instance masks. The run is cut into chunks of ``checkpoint_every`` epochs,
each one ``train_seg`` call; after each chunk the weights, the AdamW state and
the losses are written atomically to ``<run_dir>/checkpoint/state.pt``. A run
killed in chunk k restarts at chunk k and ends with bit-identical weights (on
the CPU), because an uninterrupted run takes the very same chunks.

Two things would otherwise differ from one long ``train_seg`` call, and are
taken over here through a global optimizer pre-step hook (scoped to our
optimizer and removed afterwards):

- the learning rate: ``train_seg`` warms up from 0 over its first 10 epochs,
  so every chunk would restart the warm-up. The hook sets each step's rate from
  cellpose's own schedule (``lr_schedule``) evaluated at the *global* epoch.
- the optimizer: ``train_seg`` builds a fresh AdamW per call; the hook loads the
  previous chunk's AdamW state before the chunk's first step.

``train_seg`` reseeds numpy with the *local* epoch index each epoch; each chunk
therefore gets the training images in its own seeded order, so a chunk does
not replay the previous chunk's crops.

``train_from_params`` adds the study's variants on top of a cohort manifest
(generic, marker-specific, marker-only, label budget, leave-one-marker-out)
and is what ``seglab train --params FILE`` runs.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.core import io
from seglab.config.settings import MaskSettings, TrainSettings
from seglab.segment import models

log = logging.getLogger(__name__)

STATE_FORMAT = "seglab-train-state-1"


def lr_schedule(learning_rate: float, n_epochs: int) -> np.ndarray:
    """cellpose 4.2's ``train_seg`` learning rate per epoch (copied, so chunks can share it).

    Linear warm-up from 0 over 10 epochs, then constant; for > 99 epochs the
    last 50 are halved every 5 (for > 300, the last 100 every 10).
    """
    LR = np.linspace(0, learning_rate, 10)
    LR = np.append(LR, learning_rate * np.ones(max(0, n_epochs - 10)))
    if n_epochs > 300:
        LR = LR[:-100]
        for _ in range(10):
            LR = np.append(LR, LR[-1] / 2 * np.ones(10))
    elif n_epochs > 99:
        LR = LR[:-50]
        for _ in range(10):
            LR = np.append(LR, LR[-1] / 2 * np.ones(5))
    return LR[:n_epochs] if len(LR) >= n_epochs else np.append(LR, np.full(n_epochs - len(LR), LR[-1]))


def count_objects(label: np.ndarray) -> int:
    u = np.unique(np.asarray(label))
    return int((u != 0).sum())


def drop_sparse(images, labels, ids, min_train_masks: int):
    """Drop images with fewer than ``min_train_masks`` objects, warning loudly which.

    ``train_seg`` would drop them silently (a log line at most); here the ids
    are named on stderr and in a ``UserWarning``.
    """
    counts = [count_objects(lb) for lb in labels]
    keep = [i for i, c in enumerate(counts) if c >= min_train_masks]
    dropped = [(ids[i], counts[i]) for i in range(len(labels)) if counts[i] < min_train_masks]
    if dropped:
        names = ", ".join(f"{t} ({c} objects)" for t, c in dropped[:20])
        more = f" and {len(dropped) - 20} more" if len(dropped) > 20 else ""
        msg = (f"WARNING: {len(dropped)} of {len(labels)} training images have fewer than "
               f"min_train_masks={min_train_masks} objects and are DROPPED from training: {names}{more}. "
               "Lower min_train_masks to keep them.")
        print(msg, file=sys.stderr)
        warnings.warn(msg, UserWarning, stacklevel=3)
    if not keep:
        raise SeglabError(f"no training image has >= min_train_masks={min_train_masks} objects "
                          f"({len(labels)} given); lower min_train_masks or add annotated tiles")
    return [images[i] for i in keep], [labels[i] for i in keep], [ids[i] for i in keep], [d for d, _ in dropped]


def _flows(labels, device):
    from cellpose import dynamics

    with models.quiet_cellpose():
        return dynamics.labels_to_flows([np.array(lb, dtype=np.int64, copy=True) for lb in labels],
                                        device=device)


def tiles_hash(ids: Sequence[str], images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> str:
    """One sha256 over the training tiles' ids, pixels and masks (order-sensitive)."""
    import hashlib

    h = hashlib.sha256()
    for t, x, y in zip(ids, images, labels):
        h.update(str(t).encode() + b"\0")
        h.update(np.ascontiguousarray(x, np.float32).tobytes())
        h.update(np.ascontiguousarray(y, np.int64).tobytes())
    return h.hexdigest()


def fit(model: models.Model, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], *,
        params: TrainSettings, run_dir: str | Path, ids: Sequence[str] | None = None,
        val_images: Sequence[np.ndarray] | None = None, val_labels: Sequence[np.ndarray] | None = None,
        meta: dict | None = None, stop_after_epochs: int | None = None, progress: bool = True,
        final_validation: bool = True) -> Path:
    """Fine-tune ``model``'s network; returns the path of the final checkpoint.

    Parameters
    ----------
    model : a cellpose-family ``seglab.segment.models.Model`` (tiny, generalist, cpsam, a checkpoint).
    images : (C, Y, X) arrays, C <= 3 ([DAPI, marker]); padded to [DAPI, marker, 0].
    labels : (Y, X) instance masks, 0 = background.
    params : :class:`~seglab.config.settings.TrainSettings`.
    run_dir : the run folder: ``checkpoint/state.pt`` (resume state after each chunk but the last;
        removed once ``model.pt`` is written),
        ``losses.tsv`` (epoch, lr, train_loss, val_loss), ``model.pt`` + sidecar.
        If ``checkpoint/state.pt`` exists, training resumes from it.
    ids : tile ids for the sidecar and the min_train_masks warning.
    val_images, val_labels : optional validation set (loss every chunk).
    meta : extra sidecar fields (e.g. ``variant``, ``markers``).
    stop_after_epochs : stop (as if killed) once this many epochs are done; for tests.
    final_validation : score the final weights on the validation set (AP@0.5 into the
        sidecar's ``metrics``): one network pass over every validation tile, about a
        third of a demo fine-tune's CPU time. The weights do not depend on it.

    Returns
    -------
    Path of ``model.pt`` (or of ``checkpoint/state.pt`` when stopped early).
    """
    import torch

    if model.kind != "cellpose":
        raise SeglabError(f"model '{model.spec}' has no network to train; use tiny, generalist, cpsam or a checkpoint")
    xs, ys, ids, dropped = _training_set(images, labels, ids, params)
    rescale = params.rescale if params.rescale is not None else model.arch == "tiny_unet"
    run_dir = Path(run_dir)
    (run_dir / "checkpoint").mkdir(parents=True, exist_ok=True)
    # Reproducible on the CPU: seeded numpy and torch, deterministic kernels.
    np.random.seed(params.seed)
    torch.manual_seed(params.seed)
    flows = _flows(ys, model.device)
    val_x = [models.Model.as_network_input(x, name="validation image") for x in (val_images or [])]
    run = _ChunkedRun(model=model, params=params, run_dir=run_dir, xs=xs, flows=flows, val_x=val_x,
                      val_flows=_flows(list(val_labels), model.device) if val_x else None, rescale=bool(rescale),
                      tiles_sha256=tiles_hash(ids, xs, ys))
    run.resume()
    target = run.n_epochs if stop_after_epochs is None else min(run.n_epochs, int(stop_after_epochs))
    run.train_until(target, progress)
    if target < run.n_epochs:
        return run.state_path
    sidecar = _final_sidecar(model, meta, params, run, ids, dropped)
    if val_x and val_labels is not None and final_validation:
        # validation AP@0.5 of the final weights, at the model's default rescaling
        v = evaluate_ap50(model, val_x, list(val_labels))
        sidecar["metrics"].update({"val_ap50_mean": v["ap50_mean"], "val_ap50_pooled": v["ap50_pooled"],
                                   "val_n_images": v["n_images"]})
    path = models.save_checkpoint(model.net, run_dir / "model.pt", sidecar)
    run.state_path.unlink(missing_ok=True)  # an earlier chunk's resume state: model.pt supersedes it
    return path


def _training_set(images, labels, ids, params: TrainSettings):
    """Checked network inputs (3, Y, X) float32 and masks, with the sparse tiles dropped (loudly).

    Returns (xs, ys, ids, dropped ids)."""
    if len(images) != len(labels):
        raise SeglabError(f"fit: {len(images)} images but {len(labels)} label images")
    if not len(images):
        raise SeglabError("fit: empty training set; check the split / markers / budget in the params")
    ids = [str(i) for i in (ids if ids is not None else range(len(images)))]
    xs = [models.Model.as_network_input(x, name=f"training image {t}") for x, t in zip(images, ids)]
    for x, y, t in zip(xs, labels, ids):
        if np.asarray(y).shape != x.shape[1:]:
            raise SeglabError(f"training tile {t}: mask shape {np.asarray(y).shape} differs from image {x.shape[1:]}")
    return drop_sparse(xs, list(labels), ids, int(params.min_train_masks))


class _LearningRateHook:
    """An optimizer pre-step hook that carries AdamW's state across chunks and sets each step's rate.

    ``train_seg`` builds a fresh optimizer per call (per chunk of epochs); the hook restores the
    previous chunk's moments into it at its first step and sets the learning rate of the epoch
    the step belongs to, so chunked training follows one uninterrupted schedule.
    """

    def __init__(self, net, lr_per_epoch: np.ndarray, steps_per_epoch: int):
        self.own = {id(p) for p in net.parameters()}
        self.lr_per_epoch, self.steps_per_epoch = lr_per_epoch, steps_per_epoch
        self.start(0, None)

    def start(self, first_epoch: int, optim_state: dict | None) -> None:
        self.opt, self.step, self.first_epoch, self.optim_state = None, 0, first_epoch, optim_state

    def __call__(self, optimizer, args, kwargs) -> None:
        if not self.own.issuperset(id(p) for g in optimizer.param_groups for p in g["params"]):
            return  # someone else's optimizer
        if self.opt is not optimizer:
            self.opt = optimizer
            if self.optim_state is not None:
                # restore AdamW moments and step counts from the previous chunk;
                # the rate is overwritten just below
                optimizer.load_state_dict(copy.deepcopy(self.optim_state))
        epoch = self.first_epoch + self.step // self.steps_per_epoch
        for g in optimizer.param_groups:
            g["lr"] = float(self.lr_per_epoch[min(epoch, len(self.lr_per_epoch) - 1)])
        self.step += 1


@dataclass
class _ChunkedRun:
    """One fine-tune, trained in chunks of ``checkpoint_every`` epochs with a resume state after each."""

    model: models.Model
    params: TrainSettings
    run_dir: Path
    xs: list
    flows: list
    val_x: list
    val_flows: list | None
    rescale: bool
    tiles_sha256: str
    done: int = 0
    optim_state: dict | None = None

    def __post_init__(self):
        self.n_epochs = int(self.params.epochs)
        self.lr = lr_schedule(self.params.learning_rate, self.n_epochs)
        self.nper = int(self.params.nimg_per_epoch or len(self.xs))
        self.state_path = self.run_dir / "checkpoint" / "state.pt"
        self.params_sha256 = io.sha256_text(repr(sorted({**asdict(self.params), "rescale": self.rescale,
                                                         "base": self.model.spec}.items())))
        self.losses = pd.DataFrame({"epoch": np.arange(self.n_epochs), "lr": self.lr, "train_loss": np.nan,
                                    "val_loss": np.nan})

    def resume(self) -> None:
        """Load the resume state when there is one (refusing a state of another run)."""
        import torch

        if not self.state_path.is_file():
            return
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT or state.get("tiles_sha256") != self.tiles_sha256 \
                or state.get("params_sha256") != self.params_sha256:
            raise SeglabError(f"{self.state_path}: belongs to a different training run (other tiles or params); "
                              "use a new run folder or delete the checkpoint folder to start over")
        self.model.net.load_state_dict(state["net"])
        self.optim_state = state["optim"]
        self.done = int(state["epoch"])
        self.losses[["train_loss", "val_loss"]] = state["losses"].numpy()
        log.info("resuming %s at epoch %d of %d", self.run_dir, self.done, self.n_epochs)

    def train_until(self, target: int, progress: bool) -> None:
        """Train chunk after chunk until ``target`` epochs are done, saving the state after each."""
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        hook = _LearningRateHook(self.model.net, self.lr, math.ceil(self.nper / int(self.params.batch_size)))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=target, initial=self.done, desc="train (epochs)", unit="ep", file=sys.stderr)
        handle = register_optimizer_step_pre_hook(hook)
        old_level = logging.getLogger("cellpose").level
        try:
            logging.getLogger("cellpose").setLevel(logging.WARNING)
            with tempfile.TemporaryDirectory(prefix="seglab-train-") as tmp, warnings.catch_warnings():
                # train_seg wraps float32 CPU steps in autocast, which warns and does nothing
                warnings.filterwarnings("ignore", message="In CPU autocast")
                while self.done < target:
                    e1 = self._train_chunk(hook, tmp)
                    if bar is not None:
                        bar.update(e1 - bar.n)
                        bar.set_postfix(loss=f"{self.losses.loc[e1 - 1, 'train_loss']:.3f}")
        finally:
            handle.remove()
            logging.getLogger("cellpose").setLevel(old_level)
            if bar is not None:
                bar.close()
            self.model.net.eval()

    def _train_chunk(self, hook: _LearningRateHook, tmp: str) -> int:
        """One ``train_seg`` call over the epochs up to the next checkpoint; returns the epochs done."""
        from cellpose import train as cp_train

        p, net, e0 = self.params, self.model.net, self.done
        e1 = min(self.n_epochs, (e0 // p.checkpoint_every + 1) * p.checkpoint_every)
        order = np.random.default_rng([p.seed, e0 // p.checkpoint_every]).permutation(len(self.xs))
        hook.start(e0, self.optim_state)
        net.train()
        _, tr, te = cp_train.train_seg(
            # copies: cellpose normalises float32 images in place, and a second
            # chunk must not see the first chunk's normalised pixels
            net, train_data=[self.xs[i].copy() for i in order], train_labels=[self.flows[i] for i in order],
            test_data=[v.copy() for v in self.val_x] or None, test_labels=self.val_flows, channel_axis=0,
            load_files=False, batch_size=int(p.batch_size), learning_rate=float(p.learning_rate),  # the hook sets each step's rate
            weight_decay=float(p.weight_decay), n_epochs=e1 - e0, normalize=bool(p.normalize), save_path=tmp,
            save_every=10**9, nimg_per_epoch=self.nper, rescale=self.rescale, scale_range=float(p.scale_range),
            bsize=int(p.bsize), min_train_masks=0, model_name="chunk")
        if hook.opt is None:
            raise SeglabError("training did not take a single optimizer step; check batch_size and the data")
        last = e1 == self.n_epochs
        # AdamW's moments (twice the weights: 2.4 GB for cpsam) are copied only for a next chunk
        self.optim_state = None if last else copy.deepcopy(hook.opt.state_dict())
        self.losses.loc[e0:e1 - 1, "train_loss"] = np.asarray(tr, float)
        te = np.asarray(te, float)
        if self.val_x:
            for j in range(e1 - e0):
                if j == 5 or j % 10 == 0:
                    self.losses.loc[e0 + j, "val_loss"] = te[j]
        self.done = e1
        if last:
            # the final weights go straight into model.pt (fit): a resume state written now would
            # be 3 x the weights (3.6 GB for cpsam) of disk writes no run can need
            io.write_table(self.run_dir / "losses.tsv", self.losses.iloc[:self.done])
        else:
            self._save_state()
        return e1

    def _save_state(self) -> None:
        import torch

        state = {"format": STATE_FORMAT, "epoch": self.done, "n_epochs": self.n_epochs,
                 "tiles_sha256": self.tiles_sha256, "params_sha256": self.params_sha256,
                 "net": {k: v.detach().cpu() for k, v in self.model.net.state_dict().items()},
                 "optim": self.optim_state,
                 "losses": torch.tensor(self.losses[["train_loss", "val_loss"]].to_numpy())}
        with io.atomic_path(self.state_path) as tmp_state:
            torch.save(state, tmp_state)
        io.write_table(self.run_dir / "losses.tsv", self.losses.iloc[:self.done])


def _final_sidecar(model: models.Model, meta: dict | None, params: TrainSettings, run: _ChunkedRun,
                   ids: list, dropped: list) -> dict:
    """The checkpoint's sidecar: what was trained from what, on which tiles, and the losses."""
    sidecar = dict(meta or {})
    sidecar.update({
        "base_spec": sidecar.get("base_spec", model.spec),
        "base_sha256": model.meta.get("weights_sha256"),
        "params": {**asdict(params), "rescale": run.rescale},
        "train_tiles": ids,
        "n_train_tiles": len(ids),
        "dropped_tiles": dropped,
        "train_tiles_sha256": run.tiles_sha256,
        "losses": {"train": [float(v) for v in run.losses["train_loss"]],
                   "val": [None if np.isnan(v) else float(v) for v in run.losses["val_loss"]]},
        "eval_bsize": model.bsize,
    })
    sidecar["metrics"] = dict(sidecar.get("metrics") or {})
    return sidecar


# --------------------------------------------------------------------------------------
# the demo generalist: a tiny net pretrained on DSB2018 nuclei
# --------------------------------------------------------------------------------------

GENERALIST_TEST_GROUPS = ("360x360", "512x640")
GENERALIST_VAL_GROUPS = ("256x320", "260x347")


@dataclass
class GeneralistRecipe:
    """The recipe of the committed generalist (``seglab pretrain-generalist``).

    Objects are rescaled to ``diam_mean_px`` in training (``rescale=True``);
    at inference each image is rescaled from a given or estimated diameter.
    Split by DSB2018 ``group`` (acquisition proxy): ``test_groups`` are held out.
    """

    preset: str = "s"
    diam_mean_px: float = 20.0
    epochs: int = 120
    nimg_per_epoch: int = 96
    batch_size: int = 8
    bsize: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    scale_range: float = 0.5
    checkpoint_every: int = 10
    seed: int = 0
    test_groups: tuple = GENERALIST_TEST_GROUPS
    val_groups: tuple = GENERALIST_VAL_GROUPS
    max_train_images: int | None = None  # smoke tests only
    max_test_images: int | None = None


def dsb_split(table: pd.DataFrame, test_groups, val_groups) -> pd.Series:
    """'train' / 'val' / 'test' per row, by acquisition group (never by image)."""
    missing = sorted((set(test_groups) | set(val_groups)) - set(table["group"]))
    if missing:
        raise SeglabError(f"DSB2018 groups {missing} do not exist; groups are {sorted(table['group'].unique())}")
    split = pd.Series("train", index=table.index)
    split[table["group"].isin(val_groups)] = "val"
    split[table["group"].isin(test_groups)] = "test"
    return split


def evaluate_ap50(model: models.Model, images, labels, *, diameters=None) -> dict:
    """Mean per-image and pooled AP@0.5 (cellpose.metrics.average_precision) of ``model`` on a set.

    ``diameters``: per-image object diameter (px) to rescale for; None: the model's default.
    """
    from cellpose.metrics import average_precision

    preds = []
    for i, x in enumerate(images):
        preds.append(model.segment(x, MaskSettings(diameter_px=None if diameters is None else diameters[i])))
    ap, tp, fp, fn = average_precision([np.asarray(y) for y in labels], preds, threshold=[0.5])
    tp, fp, fn = tp[:, 0].sum(), fp[:, 0].sum(), fn[:, 0].sum()
    return {"ap50_mean": float(np.mean(ap[:, 0])), "ap50_pooled": float(tp / max(1, tp + fp + fn)),
            "n_images": len(images), "tp": int(tp), "fp": int(fp), "fn": int(fn)}


def pretrain_generalist(recipe: GeneralistRecipe, *, run_dir: str | Path, out_path: str | Path | None = None,
                        dsb_root=None, progress: bool = True) -> dict:
    """Train the ``tiny`` generalist on DSB2018 and write it with sidecar and held-out metrics.

    Resumable: rerun with the same ``run_dir`` after a kill. Writes
    ``out_path`` (default ``lib/seglab/assets/generalist_tiny.pt``), its sidecar
    and ``<stem>_metrics.json``; returns the metrics.
    """
    import time

    import torch

    tr, tr_x, tr_y, va_x, va_y, te, te_x, te_y = _dsb_sets(recipe, dsb_root)
    net = models.build_tiny_net(models.TINY_PRESETS[recipe.preset], seed=recipe.seed,
                                diam_mean_px=recipe.diam_mean_px)
    model = models.Model(spec=f"tiny-{recipe.preset}", kind="cellpose", arch="tiny_unet",
                         cp=models.wrap_net(net, torch.device("cpu"), f"tiny-{recipe.preset}"),
                         diam_mean_px=recipe.diam_mean_px, default_diameter="auto")
    params = TrainSettings(epochs=recipe.epochs, learning_rate=recipe.learning_rate,
                         weight_decay=recipe.weight_decay, batch_size=recipe.batch_size, bsize=recipe.bsize,
                         nimg_per_epoch=recipe.nimg_per_epoch, scale_range=recipe.scale_range, rescale=True,
                         min_train_masks=1, checkpoint_every=recipe.checkpoint_every, seed=recipe.seed)
    t0 = time.time()
    ck = fit(model, tr_x, tr_y, params=params, run_dir=run_dir, ids=list(tr["name"]), val_images=va_x,
             val_labels=va_y, progress=progress,
             meta={"base_spec": f"tiny-{recipe.preset} (random init, seed {recipe.seed})",
                   "recipe": asdict(recipe), "data": "DSB2018 stage1_train fluorescence (BBBC038v1, CC0)",
                   # trained on [nucleus, 0, 0]: at inference only channel 0 (DAPI) is given to it
                   "input_channels": [0]})
    train_s = time.time() - t0
    trained = models.load_checkpoint(ck)
    metrics = {"split": {"test_groups": list(recipe.test_groups), "val_groups": list(recipe.val_groups),
                         "n_train": len(tr_x), "n_val": len(va_x), "n_test": len(te_x)},
               "train_seconds": round(train_s, 1), "torch_threads": torch.get_num_threads(),
               **_held_out_metrics(trained, te, te_x, te_y, recipe.test_groups)}
    out_path = Path(out_path) if out_path else models.GENERALIST_PATH
    meta = models.read_sidecar(ck)
    meta["metrics"] = metrics["headline"]
    for k in ("format", "weights_file", "weights_sha256"):
        meta.pop(k, None)
    models.save_checkpoint(trained.net, out_path, meta)
    io.write_json(out_path.with_name(out_path.stem + "_metrics.json"), metrics)
    return metrics


def _dsb_sets(recipe: GeneralistRecipe, dsb_root):
    """DSB2018 split by acquisition group: (train rows, images, masks, val images, masks, test rows,
    images, masks); images (1, Y, X) float32, masks (Y, X) labels."""
    from seglab.data import dsb

    table = dsb.dsb2018_table(dsb_root)
    table["split"] = dsb_split(table, recipe.test_groups, recipe.val_groups)

    def load(rows):
        xs, ys = [], []
        for _, r in rows.iterrows():
            im, mk = dsb.load_dsb2018(r)
            xs.append(im[None].astype(np.float32))
            ys.append(mk)
        return xs, ys

    tr = table[table.split == "train"]
    te = table[table.split == "test"]
    if recipe.max_train_images:
        tr = tr.sample(n=min(len(tr), recipe.max_train_images), random_state=recipe.seed)
    if recipe.max_test_images:
        te = te.groupby("group", group_keys=False).head(recipe.max_test_images)
    tr_x, tr_y = load(tr)
    va_x, va_y = load(table[table.split == "val"])
    te_x, te_y = load(te)
    return tr, tr_x, tr_y, va_x, va_y, te, te_x, te_y


def _held_out_metrics(trained: models.Model, te: pd.DataFrame, te_x: list, te_y: list, test_groups) -> dict:
    """AP@0.5 of the generalist (estimated and true diameters) and of the classical reference on the
    held-out groups, per group and pooled: {"groups", "test", "headline"}."""
    from cellpose.utils import diameters as cp_diameters

    classical = models.load("classical")
    metrics: dict = {"groups": {}}
    for g in test_groups:
        idx = [i for i, grp in enumerate(te["group"]) if grp == g]
        xs, ys = [te_x[i] for i in idx], [te_y[i] for i in idx]
        true_d = [float(cp_diameters(y)[0]) for y in ys]
        metrics["groups"][g] = {
            "generalist_estimated_diameter": evaluate_ap50(trained, xs, ys),
            "generalist_true_diameter": evaluate_ap50(trained, xs, ys, diameters=true_d),
            "classical": evaluate_ap50(classical, xs, ys),
        }
    all_x, all_y = te_x, te_y
    true_all = [float(cp_diameters(y)[0]) for y in all_y]
    metrics["test"] = {
        "generalist_estimated_diameter": evaluate_ap50(trained, all_x, all_y),
        "generalist_true_diameter": evaluate_ap50(trained, all_x, all_y, diameters=true_all),
        "classical": evaluate_ap50(classical, all_x, all_y),
    }
    metrics["headline"] = {
        "test_ap50_generalist": metrics["test"]["generalist_estimated_diameter"]["ap50_mean"],
        "test_ap50_generalist_true_diameter": metrics["test"]["generalist_true_diameter"]["ap50_mean"],
        "test_ap50_classical": metrics["test"]["classical"]["ap50_mean"],
    }
    return metrics


# --------------------------------------------------------------------------------------
# the study's variants, from a params file (``seglab train --params FILE``)
# --------------------------------------------------------------------------------------

VARIANTS = ("generic", "marker_specific", "marker_only", "label_budget", "leave_one_marker_out")
RUN_KEYS = {"model": str, "cohort_dir": str, "manifest": str, "out_dir": str, "variant": str,
            "markers": list, "budget": int, "budget_seed": int, "diameter_px": float, "gpu": bool,
            "final_validation": bool}


def _train_key_types() -> dict:
    """{TrainSettings field: the type a params file gives it}, from the dataclass's annotations."""
    import types
    import typing

    out = {}
    for k, hint in typing.get_type_hints(TrainSettings).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
        out[k] = args[0]
    return out


TRAIN_KEYS = _train_key_types()


def check_train_config(cfg: dict, source: str = "params") -> dict:
    """Validate a ``seglab train`` params mapping; SeglabError names the key and the fix."""
    allowed = {**RUN_KEYS, **TRAIN_KEYS}
    for k, v in cfg.items():
        if k not in allowed:
            import difflib

            near = difflib.get_close_matches(k, allowed, n=1)
            raise SeglabError(f"{source}: unknown key '{k}'" + (f" (did you mean '{near[0]}'?)" if near else "")
                              + f"; allowed: {', '.join(sorted(allowed))}")
        want = allowed[k]
        if v is None and k in ("nimg_per_epoch", "rescale", "diameter_px", "budget", "markers"):
            continue
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise SeglabError(f"{source}: '{k}' must be {want.__name__}, got {v!r}")
    for k in ("model", "out_dir"):
        if k not in cfg:
            raise SeglabError(f"{source}: missing key '{k}'")
    if "cohort_dir" not in cfg and "manifest" not in cfg:
        raise SeglabError(f"{source}: give 'cohort_dir' (a simulated/real cohort folder) or 'manifest' (a manifest CSV)")
    variant = cfg.get("variant", "generic")
    if variant not in VARIANTS:
        raise SeglabError(f"{source}: variant '{variant}' is not one of {', '.join(VARIANTS)}")
    if variant in ("marker_specific", "leave_one_marker_out") and not cfg.get("markers"):
        raise SeglabError(f"{source}: variant '{variant}' needs 'markers' (a list of marker names)")
    if variant == "label_budget" and not cfg.get("budget"):
        raise SeglabError(f"{source}: variant 'label_budget' needs 'budget' (number of training tiles, >= 1)")
    if cfg.get("budget") is not None and cfg["budget"] < 1:
        raise SeglabError(f"{source}: budget={cfg['budget']} must be >= 1")
    return cfg


def select_training_tiles(manifest: pd.DataFrame, cfg: dict, split: str = "train") -> pd.DataFrame:
    """The annotated tiles of ``split`` that the variant trains on (sorted by tile_id)."""
    variant = cfg.get("variant", "generic")
    rows = manifest[(manifest["annotated"].astype(bool)) & (manifest["split"] == split)]
    known = sorted(manifest["marker"].unique())
    markers = cfg.get("markers") or []
    bad = [m for m in markers if m not in known]
    if bad:
        raise SeglabError(f"markers {bad} are not in the cohort (markers there: {', '.join(known)})")
    if variant == "marker_specific" or (variant in ("marker_only", "label_budget", "generic") and markers):
        rows = rows[rows["marker"].isin(markers)]
    elif variant == "leave_one_marker_out":
        rows = rows[~rows["marker"].isin(markers)]
    rows = rows.sort_values("tile_id")
    if split == "train" and cfg.get("budget") is not None:
        if cfg["budget"] > len(rows):
            raise SeglabError(f"budget={cfg['budget']} is larger than the {len(rows)} annotated training tiles "
                              f"of this variant; lower the budget")
        rows = rows.sample(n=int(cfg["budget"]), random_state=int(cfg.get("budget_seed", 0))).sort_values("tile_id")
    return rows


def train_from_params(cfg: dict, *, source: str = "params", progress: bool = True,
                      stop_after_epochs: int | None = None) -> Path:
    """Run one fine-tuning from a validated config; returns the checkpoint path.

    Input to the network is ``[DAPI, marker, 0]``; ``marker_only`` zeroes DAPI.
    """
    from seglab.data import manifest as data
    from seglab.core import paths

    cfg = check_train_config(dict(cfg), source)
    try:
        params = TrainSettings.from_params(cfg)
    except SeglabError as exc:
        raise SeglabError(f"{source}: {exc}") from None
    if "manifest" in cfg:
        manifest = data.load_manifest(paths.resolve(cfg["manifest"]))
    else:
        manifest = data.cohort_manifest(paths.resolve(cfg["cohort_dir"]))
    tr = select_training_tiles(manifest, cfg, "train")
    va = select_training_tiles(manifest, {**cfg, "budget": None}, "val")
    if tr.empty:
        raise SeglabError(f"{source}: no annotated training tiles for variant {cfg.get('variant', 'generic')} "
                          f"(markers {cfg.get('markers')}); check the cohort's splits and markers")

    def load(rows):
        xs, ys = [], []
        for _, r in rows.iterrows():
            x = data.load_tile(r)
            if cfg.get("variant") == "marker_only":
                x = x.copy()
                x[0] = 0.0  # the study's marker-only variant: no nuclear stain
            xs.append(x)
            ys.append(data.load_mask(r))
        return xs, ys

    tr_x, tr_y = load(tr)
    va_x, va_y = load(va) if len(va) else ([], [])
    model = models.load(cfg["model"], gpu=cfg.get("gpu"), seed=params.seed)
    run_dir = paths.resolve(cfg["out_dir"])
    meta = {"base_spec": cfg["model"], "variant": cfg.get("variant", "generic"), "markers": cfg.get("markers"),
            "budget": cfg.get("budget"), "budget_seed": cfg.get("budget_seed"), "config": cfg,
            "val_tiles": list(va["tile_id"])}
    return fit(model, tr_x, tr_y, params=params, run_dir=run_dir, ids=list(tr["tile_id"]),
               val_images=va_x or None, val_labels=va_y or None, meta=meta, progress=progress,
               stop_after_epochs=stop_after_epochs, final_validation=bool(cfg.get("final_validation", True)))
