"""E7 volumes: which 3D method at which anisotropy?

On simulated nuclei volumes with planted truth (:mod:`seglab.data.simulate3d`), one dataset per
anisotropy (z step / xy pixel size, e.g. 1, 2 and 4) in the nnU-Net raw layout, the 2D tiny
generalist is fine-tuned on 2D slices of the training volumes (xy, xz and yz planes when the
voxels are isotropic, xy only otherwise; :func:`seglab.segment.volumes.train_on_dataset`), then
every test volume is segmented by each method (:mod:`seglab.segment.volumes`): ``orthoplane``
(consensus of the xy, xz and yz stacks on the isotropic grid), ``xy`` (orthoplane's fast mode:
the xy stack alone), ``cellpose3d`` (cellpose's ``do_3D`` with the anisotropy) and ``stitch``
(2D masks per native xy plane stitched by IoU). Every ``imagesTs_*`` folder is evaluated against
``instancesTs`` (:func:`seglab.evaluate.volumes.compare_methods`). Nothing is selected on the test
volumes: every method runs with the params' settings, and the test split is evaluated once per
method, recorded in the run's manifest.

Steps, in the notebook's order
------------------------------
1. :func:`make_datasets`: one simulated dataset per anisotropy (reused when it exists).
2. :func:`fine_tune`: one fine-tuned model per dataset (cached in the dataset's ``models/``).
3. :func:`predict_and_evaluate`: each method over each dataset's test volumes, then the
   comparison across every ``imagesTs_*`` folder; :func:`answer`: the best method per anisotropy.
4. :func:`stardist_check`: the same methods on StarDist's small 3D nuclei volume (skipped when
   stardist is not installed).
5. :func:`headline`: the run's ``summary.json`` numbers.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from seglab.config.settings import MaskSettings, TrainSettings
from seglab.core import paths
from seglab.data import simulate3d
from seglab.data import volumes as vdata
from seglab.evaluate import volumes as evol
from seglab.segment import models
from seglab.segment import volumes as svol

IOU = 0.5   # the headline threshold
STARDIST_ANISOTROPY = 2.0   # StarDist's test_image_nuclei_3d: nuclei about 7 planes deep and 14 px wide


def slug(anisotropy: float) -> str:
    """``aniso1``, ``aniso2``, ``aniso2p5``: the anisotropy's part of summary keys and folder names."""
    return "aniso" + f"{float(anisotropy):g}".replace(".", "p")


def dataset_dir(params: dict, anisotropy: float) -> Path:
    """``<volumes_dir>/Dataset70<k>_Nuclei3D_<slug>`` (k: the anisotropy's index in the params)."""
    k = list(params["anisotropies"]).index(anisotropy)
    return paths.resolve(params["volumes_dir"]) / f"Dataset{700 + k}_Nuclei3D_{slug(anisotropy)}"


def preflight(params: dict, cohort) -> None:
    """Before the notebook starts: anisotropies > 0 and distinct, methods known. Raises ParamConflict."""
    from seglab import SeglabError
    from seglab.experiments import ParamConflict

    for a in params["anisotropies"]:
        try:
            vdata.check_anisotropy(a)
        except SeglabError as exc:
            raise ParamConflict("anisotropies", str(exc), "give values > 0") from None
    if len(set(params["anisotropies"])) != len(params["anisotropies"]):
        raise ParamConflict("anisotropies", f"{params['anisotropies']} repeats a value", "list each anisotropy once")
    for name in params["methods"]:
        try:
            svol.settings_for(name)
        except SeglabError as exc:
            raise ParamConflict("methods", str(exc), "fix the method names") from None


def make_datasets(params: dict) -> dict[float, Path]:
    """Step 1: ``{anisotropy: dataset folder}``, each simulated once (same args: reused)."""
    out = {}
    for a in params["anisotropies"]:
        out[float(a)] = simulate3d.simulate_dataset(dataset_dir(params, a), n_train=params["n_train"],
                                                    n_test=params["n_test"], shape_um=tuple(params["shape_um"]),
                                                    anisotropy=float(a), seed=params["seed"])
    return out


def describe_datasets(datasets: dict[float, Path]) -> pd.DataFrame:
    """One row per dataset and split: anisotropy, split, volumes, shape (Z, Y, X), nuclei (planted objects)."""
    rows = []
    for a, ds in datasets.items():
        for split in ("train", "test"):
            cases = vdata.dataset_cases(ds, split)
            labs = [vdata.read_labels(c.labels) for c in cases]
            rows.append({"anisotropy": a, "split": split, "n_volumes": len(cases),
                         "shape_zyx": "x".join(map(str, labs[0].shape)) if labs else "",
                         "n_nuclei": int(sum(len(np.unique(lb)) - 1 for lb in labs)),
                         "dataset": ds.name})
    return pd.DataFrame(rows)


def training_key(params: dict) -> str:
    """A hash of what decides a fine-tuned model: base model identity, training settings, plane step."""
    rec = {"base": models.model_id(params["baseline_model"]), "training": TrainSettings.from_params(params).as_dict(),
           "plane_step": params["plane_step"]}
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Trained:
    """The fine-tuned model of each dataset (checkpoint paths) and the wall time of training (s)."""

    models: dict
    wall_s: float

    def table(self) -> pd.DataFrame:
        rows = []
        for a, path in self.models.items():
            meta = models.read_sidecar(path)
            rows.append({"anisotropy": a, "model": str(path), "n_slices": meta.get("n_slices"),
                         "planes": "xy, xz, yz" if abs(a - 1) < 1e-9 else "xy",
                         "final_train_loss": round(float((meta.get("losses") or {}).get("train", [np.nan])[-1]), 4)})
        return pd.DataFrame(rows)


def fine_tune(params: dict, datasets: dict[float, Path], progress: bool = False) -> Trained:
    """Step 2: one fine-tune per dataset on its training slices (``<dataset>/models/<key>/model.pt``,
    reused when there)."""
    t0 = time.monotonic()
    training = TrainSettings.from_params(params)
    key = training_key(params)
    out = {}
    for a, ds in datasets.items():
        out[a] = svol.train_on_dataset(params["baseline_model"], ds, training, ds / "models" / key,
                                       plane_step=params["plane_step"], progress=progress)
    return Trained(out, round(time.monotonic() - t0, 1))


def method_settings(params: dict, name: str) -> svol.VolumeSettings:
    """The :class:`~seglab.segment.volumes.VolumeSettings` of method ``name`` under ``params``."""
    return svol.settings_for(name, stitch_threshold=params["stitch_threshold"], consensus_iou=params["consensus_iou"],
                             downsample=params["downsample"], bsize=params["eval_bsize"])


def predict_and_evaluate(params: dict, datasets: dict[float, Path], trained: Trained, mask: MaskSettings,
                         before=None, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 3: each method over each dataset's ``imagesTs`` into ``imagesTs_<method>``, then every
    ``imagesTs_*`` folder evaluated against ``instancesTs``.

    ``before(name, config)`` is called before each method's test volumes are segmented (the run's
    ``record_test_evaluation``). Returns (comparison: one row per anisotropy x method x threshold with
    the pooled scores and ``seconds_per_megavoxel``; per_volume: every volume's rows).
    """
    comp, per_volume = [], []
    for a, ds in datasets.items():
        model = models.load(str(trained.models[a]))
        speed = {}
        for name in params["methods"]:
            settings = method_settings(params, name)
            if before is not None:
                before(f"{name}_{slug(a)}", {"model": str(trained.models[a]), "method": name,
                                             "anisotropy": a, **mask.as_dict()})
            res = svol.predict_folder(model, ds / "imagesTs", settings=settings, mask=mask, progress=progress,
                                      overwrite=True, log=None)
            voxels = sum(int(np.prod(vdata.read_labels(res.out / f"{c}{vdata.OUT_SUFFIX}").shape))
                         for c in res.seconds)
            speed[settings.label] = (sum(res.seconds.values()) / (voxels / 1e6)) if voxels else np.nan
        table = evol.compare_methods(ds, params["thresholds"], params["boundary_tol_voxels"])
        table = table[table["method"].isin([method_settings(params, n).label for n in params["methods"]])]
        comp.append(table.assign(anisotropy=a, seconds_per_megavoxel=table["method"].map(speed)))
        for folder in vdata.prediction_folders(ds):
            t = pd.read_csv(folder / "evaluation" / evol.RESULTS_FILE)
            per_volume.append(t.assign(method=vdata.method_of(folder), anisotropy=a))
    comparison = pd.concat(comp, ignore_index=True)
    comparison = comparison[["anisotropy"] + [c for c in comparison.columns if c != "anisotropy"]]
    return comparison, pd.concat(per_volume, ignore_index=True)


def stack_agreement(datasets: dict[float, Path], iou: float = IOU) -> pd.DataFrame:
    """Why the orthoplane consensus finds what it finds: per anisotropy, over the test volumes, the true
    nuclei matched (IoU >= ``iou``) by each orientation's stack (``tp_xy``, ``tp_xz``, ``tp_yz``, from the
    per-plane files), by at least one and at least two stacks, and by the consensus (``tp_consensus``).
    Datasets without ``imagesTs_orthoplane`` are left out."""
    from seglab.evaluate import metrics

    rows = []
    for a, ds in datasets.items():
        folder = ds / "imagesTs_orthoplane"
        if not folder.is_dir():
            continue
        row = {"anisotropy": a, "n_true": 0, **{f"tp_{ax}": 0 for ax in svol.AXES}, "found_by_at_least_1": 0,
               "found_by_at_least_2": 0, "tp_consensus": 0}
        for case in vdata.dataset_cases(ds, "test"):
            truth = vdata.read_labels(case.labels).astype(np.int64)
            hits = {}
            for ax in svol.AXES:
                stack = vdata.read_labels(folder / f"{case.name}_{ax}{vdata.OUT_SUFFIX}").astype(np.int64)
                hits[ax] = set(metrics.matched_pairs(truth, stack, iou)["true_id"].tolist())
                row[f"tp_{ax}"] += len(hits[ax])
            ids = set(np.unique(truth).tolist()) - {0}
            votes = {i: sum(i in h for h in hits.values()) for i in ids}
            cons = vdata.read_labels(folder / f"{case.name}{vdata.OUT_SUFFIX}").astype(np.int64)
            row["n_true"] += len(ids)
            row["found_by_at_least_1"] += sum(v >= 1 for v in votes.values())
            row["found_by_at_least_2"] += sum(v >= 2 for v in votes.values())
            row["tp_consensus"] += len(metrics.matched_pairs(truth, cons, iou))
        rows.append(row)
    return pd.DataFrame(rows)


def orthoslice_figures(params: dict, datasets: dict[float, Path]) -> dict:
    """{file name: figure}: orthogonal slices of the first test volume of the most anisotropic
    dataset, the truth against each method's prediction (``params["methods"]``), in that order."""
    from seglab.plots import volumes as plots_volumes

    a = max(datasets)
    ds = datasets[a]
    case = vdata.dataset_cases(ds, "test")[0]
    image, voxel = vdata.read_volume(case.image)
    truth = vdata.read_labels(case.labels).astype("int32")
    figures = {}
    for name in params["methods"]:
        label = method_settings(params, name).label
        pred = vdata.read_labels(ds / f"imagesTs_{label}" / f"{case.name}{vdata.OUT_SUFFIX}")
        figures[f"orthoslices_{label}_{slug(a)}.png"] = plots_volumes.plot_orthoslices(
            image, truth, pred.astype("int32"), anisotropy=voxel.anisotropy, title=f"{label}, anisotropy {a:g}: {case.name}")
    return figures


def answer(comparison: pd.DataFrame, metric: str = "ap", threshold: float = IOU) -> pd.DataFrame:
    """Per anisotropy, the methods ranked by pooled ``metric`` at ``threshold``: best method, its score,
    the runner-up and the margin (ties go to the faster method)."""
    sub = comparison[np.isclose(comparison["threshold"], threshold)]
    rows = []
    for a, g in sub.groupby("anisotropy", sort=True):
        g = g.sort_values([metric, "seconds_per_megavoxel"], ascending=[False, True])
        best, second = g.iloc[0], (g.iloc[1] if len(g) > 1 else None)
        rows.append({"anisotropy": a, "best_method": best["method"], f"best_{metric}": round(float(best[metric]), 4),
                     "runner_up": None if second is None else second["method"],
                     "margin": None if second is None else round(float(best[metric] - second[metric]), 4),
                     "ranking": " > ".join(f"{m} ({v:.3f})" for m, v in zip(g["method"], g[metric]))})
    return pd.DataFrame(rows)


def stardist_check(params: dict, trained: Trained, mask: MaskSettings) -> pd.DataFrame | None:
    """Step 4: the methods on StarDist's ``test_image_nuclei_3d`` (31 x 61 x 57 voxels, 51 nuclei) with
    the model fine-tuned at the anisotropy closest to its own (about 2), scored at IoU 0.5; None when
    stardist is not installed."""
    try:
        from stardist.data import test_image_nuclei_3d
    except ImportError:
        return None
    image, truth = test_image_nuclei_3d(return_mask=True)
    a = min(trained.models, key=lambda x: abs(x - STARDIST_ANISOTROPY))
    model = models.load(str(trained.models[a]))
    rows = []
    for name in params["methods"]:
        settings = method_settings(params, name)
        res = svol.segment_volume(model, image.astype(np.float32), STARDIST_ANISOTROPY, settings, mask)
        scores = evol.evaluate_volume(truth.astype(np.int32), res.labels.astype(np.int32), (IOU,),
                                      params["boundary_tol_voxels"]).iloc[0]
        rows.append({"method": settings.label, "model_anisotropy": a, "seconds": round(res.seconds, 2),
                     **{k: scores[k] for k in ("n_true", "n_pred", "tp", "ap", "f1", "boundary_f1",
                                               "foreground_dice", "n_split", "n_merged")}})
    return pd.DataFrame(rows)


def headline(comparison: pd.DataFrame, answers: pd.DataFrame, trained: Trained,
             stardist: pd.DataFrame | None = None) -> dict:
    """``test_ap50_<method>_<aniso>`` and ``test_f1_50_<method>_<aniso>``, ``test_boundary_f1_<method>_<aniso>``
    (pooled over the test volumes), ``best_method_<aniso>``, ``stardist_ap50_<method>`` (when run),
    ``n_anisotropies``, ``fit_wall_s`` (s; 0 when every model came from the dataset's cache). Scores rounded to 4 decimals."""
    out = {}
    sub = comparison[np.isclose(comparison["threshold"], IOU)]
    for r in sub.to_dict("records"):
        s = f"{r['method']}_{slug(r['anisotropy'])}"
        out[f"test_ap50_{s}"] = round(float(r["ap"]), 4)
        out[f"test_f1_50_{s}"] = round(float(r["f1"]), 4)
        out[f"test_boundary_f1_{s}"] = round(float(r["boundary_f1"]), 4)
    for r in answers.to_dict("records"):
        out[f"best_method_{slug(r['anisotropy'])}"] = r["best_method"]
    if stardist is not None:
        for r in stardist.to_dict("records"):
            out[f"stardist_ap50_{r['method']}"] = round(float(r["ap"]), 4)
    return {**out, "n_anisotropies": int(comparison["anisotropy"].nunique()), "fit_wall_s": trained.wall_s}
