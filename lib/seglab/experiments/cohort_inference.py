"""Inference over every tile of a cohort, cached by content, and recovery of planted effects (E5).

The chain of notebook 05_downstream, one function per arrow::

    model + tiles + inference settings  --prediction_dir-->   data/predictions/<model>-<settings+tiles>/
    the same                            --predict_cohort-->   masks <tile>.tif + per-tile table (resumable)
    prediction folder                   --mask_loader-->      load_mask(row) for downstream.features.tile_table
    correlations of each model + truth.json --planted_recovery--> per test and per model: sign, q, rho vs truth

Where the predictions live
--------------------------
A prediction folder is named by what decides its masks, not by the run that
made it: ``<sha256 of the model weights>[:16]-<hash of the inference settings
and of the tiles' files>[:16]``. A rerun of the notebook, another notebook, or
a Slurm array over shards (``seglab predict --shard I/N --out <folder>``)
writes to and reads from the same folder, so an interrupted inference resumes
and a finished one is reused. ``prediction.json`` in the folder records the
model, the settings and the tiles' hash; a folder whose record disagrees is
refused rather than mixed.

Planted-effect recovery (simulated cohorts)
-------------------------------------------
``truth.json`` plants a log-odds effect per marker on the fraction of
marker-positive cells (``effect`` per SD of each donor's latent score; null
markers have 0). Each clinical outcome follows the latent score up or down
(ceradsc falls as pathology rises), measured here as the sign of the Spearman
correlation of the outcome with the latent score over the donors. The expected
sign of a test (marker, ``ratio``, outcome) is therefore
``sign(effect) * direction(outcome)``. Per model:

``sign_correct``
    fraction of the planted (non-null) tests whose rho has the expected sign;
``recovered``
    fraction of the planted tests significant (BH q < alpha) with the expected sign;
``false_positives``
    number of null-marker tests with q < alpha (``false_positive_rate`` = / tests);
``mean_abs_rho_diff_vs_truth``
    mean |rho_model - rho_truth| over all tests of the feature, where "truth" is
    the same analysis on the ground-truth masks.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.core import io
from seglab.core import paths, workers

PREDICTIONS_DIR = "data/predictions"
RECORD = "prediction.json"
# bump when predict's output for the same model, settings and tiles changes meaning
PREDICT_FORMAT = 1
SETTINGS_KEYS = ("diameter_px", "flow_threshold", "cellprob_threshold", "min_size")


# --------------------------------------------------------------------------- addressing


def model_sha256(model) -> str:
    """sha256 of what decides a model's predictions: its weights file (or its spec for built-ins).

    ``model`` is a spec (``generalist``, ``cpsam``, a checkpoint path, ``classical``,
    ``tiny``) or a loaded :class:`seglab.segment.models.Model`.
    """
    from seglab.segment import models

    spec = str(getattr(model, "spec", model))
    if spec == "generalist":
        p = models.GENERALIST_PATH
    elif spec in models.CPSAM_NAMES:
        p = models.cpsam_path(spec)
    else:
        p = Path(spec).expanduser()
        if not p.is_file():
            p = paths.resolve(spec)
    if p.is_file():
        return io.sha256_file(p)
    if spec == "classical" or spec == "tiny" or spec.startswith("tiny-") or spec == "cpsam-random":
        seed = (getattr(model, "meta", {}) or {}).get("seed", 0)
        return io.sha256_text(f"builtin:{spec}:seed={seed}")
    raise SeglabError(f"model {spec!r}: no weights file to hash ({p} not found); pass a checkpoint path "
                      "or a built-in spec (generalist, cpsam, classical, tiny)")


def tiles_sha256(tiles_dir) -> tuple[str, int]:
    """One hash over the tiles ``seglab predict`` would segment (ids and file contents); and their count."""
    from seglab.segment import predict

    tiles = predict.discover_tiles(tiles_dir)
    lines = [f"{t.tile_id}:{Path(f).name}:{io.sha256_file(f)}" for t in tiles for f in t.files]
    return io.sha256_text("\n".join(lines)), len(tiles)


def inference_settings(params: Mapping) -> dict:
    """The inference keys of a notebook's params (the shared block): diameter, thresholds, min_size."""
    missing = [k for k in SETTINGS_KEYS if k not in params]
    if missing:
        raise SeglabError(f"inference_settings: params lack {missing}; declare them in the notebook's schema")
    out = {k: params[k] for k in SETTINGS_KEYS}
    out["flow_threshold"] = float(out["flow_threshold"])
    out["cellprob_threshold"] = float(out["cellprob_threshold"])
    out["min_size"] = int(out["min_size"])
    if out["diameter_px"] is not None:
        out["diameter_px"] = float(out["diameter_px"])
    return out


def prediction_key(model_hash: str, settings: Mapping, tiles_hash: str) -> str:
    """``<model sha256[:16]>-<settings + tiles hash[:16]>``: the prediction folder's name."""
    from seglab.config.params import params_hash

    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise SeglabError(f"inference settings {unknown} are not known (known: {list(SETTINGS_KEYS)})")
    h = params_hash({"settings": dict(settings), "tiles": tiles_hash, "format": PREDICT_FORMAT})
    return f"{model_hash[:16]}-{h[:16]}"


def prediction_dir(model, tiles_dir, settings: Mapping, *, root=PREDICTIONS_DIR) -> Path:
    """The content-addressed folder of ``model``'s predictions on ``tiles_dir`` with ``settings``."""
    th, _ = tiles_sha256(tiles_dir)
    return paths.resolve(root) / prediction_key(model_sha256(model), settings, th)


# --------------------------------------------------------------------------- inference


@dataclass
class CohortPrediction:
    """One model's masks over every tile of a cohort.

    Attributes
    ----------
    name : label of the model in the notebook (e.g. ``baseline``).
    folder : the prediction folder (``<tile>.tif`` masks, shard tables, prediction.json).
    table : one row per tile: tile, shard, n_cells, seconds, diameter_px, mask_file, status.
    record : contents of prediction.json.
    n_predicted : tiles segmented by this call (the rest were reused).
    wall_s : wall time of this call, s (hashing, loading the model and inference).
    """

    name: str
    folder: Path
    table: pd.DataFrame
    record: dict
    n_predicted: int
    wall_s: float

    @property
    def n_tiles(self) -> int:
        return int(len(self.table))

    @property
    def n_reused(self) -> int:
        return self.n_tiles - self.n_predicted

    @property
    def tiles_per_s(self) -> float:
        """Tiles segmented per second of this call (NaN when everything was reused)."""
        return self.n_predicted / self.wall_s if self.n_predicted and self.wall_s > 0 else math.nan

    def summary(self) -> dict:
        return {"model": self.name, "folder": paths.relative(self.folder), "n_tiles": self.n_tiles,
                "n_predicted": self.n_predicted, "n_reused": self.n_reused, "wall_s": round(self.wall_s, 2),
                "tiles_per_s": round(self.tiles_per_s, 3) if self.n_predicted else None,
                "model_sha256": self.record.get("model_sha256"), "n_cells": int(self.table["n_cells"].sum())}



def _check_record(folder: Path, record: dict) -> None:
    f = folder / RECORD
    if not f.is_file():
        io.write_json(f, record)
        return
    try:
        old = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = None
    keys = ("model_sha256", "settings", "tiles_sha256", "format")
    if not isinstance(old, dict) or any(old.get(k) != record.get(k) for k in keys):
        raise SeglabError(f"{f}: this prediction folder was made for another model, settings or tiles "
                          f"(recorded {None if old is None else {k: old.get(k) for k in keys}}); "
                          "delete the folder or point root= elsewhere")


def collect_table(folder, tile_ids: Sequence[str]) -> pd.DataFrame:
    """The per-tile table of a prediction folder: all shard tables merged, one row per tile.

    Raises SeglabError naming the tiles without a mask (shards not run yet).
    """
    folder = Path(folder)
    parts = []
    for f in sorted(folder.glob("tiles_shard-*-of-*.tsv")):
        try:
            parts.append(pd.read_csv(f, sep="\t", dtype={"tile": str}))
        except Exception:  # noqa: BLE001 - a damaged table is ignored; the masks decide
            continue
    cols = ["tile", "shard", "n_cells", "seconds", "diameter_px", "mask_file", "status"]
    t = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
    # a tile segmented in two shardings: keep a "done" row (it has the timing) over "skipped"
    t = t.assign(_rank=(t["status"] != "done").astype(int)).sort_values(["tile", "_rank"], kind="stable")
    t = t.drop_duplicates("tile").drop(columns="_rank").set_index("tile")
    missing = [tid for tid in tile_ids if tid not in t.index or not (folder / f"{tid}.tif").is_file()]
    if missing:
        raise SeglabError(f"{folder}: {len(missing)} of {len(tile_ids)} tiles have no predicted mask yet "
                          f"(e.g. {missing[:3]}); run the remaining shards (predict_cohort or "
                          f"`seglab predict --out {folder} --shard I/N`)")
    return t.loc[list(tile_ids)].reset_index()[cols]


def predict_cohort(model, tiles_dir, settings: Mapping, *, name: str | None = None, root=PREDICTIONS_DIR,
                   n_shards: int = 1, shards: Sequence[int] | None = None, batch_tiles: int = 8,
                   batch_size: int | None = None, progress: bool = False, gpu: bool | None = None,
                   n_jobs: int = 1, threads_per_job: int | None = 1, log: Callable = print) -> CohortPrediction:
    """Segment every tile of ``tiles_dir`` with ``model`` into its content-addressed folder.

    Parameters
    ----------
    model : spec or checkpoint path (``seglab.segment.models.load``), or a loaded Model.
    tiles_dir : cohort folder or its ``tiles/`` (see :mod:`seglab.segment.predict`).
    settings : :func:`inference_settings` (diameter_px None = the model's default).
    name : the model's label in tables (default: its spec).
    root : parent of the prediction folders (relative to the project root or absolute).
    n_shards, shards : run shards ``I/n_shards`` for I in ``shards`` (default: all, in turn);
        the same round-robin split as ``seglab predict --shard I/N`` on Slurm.
    batch_tiles, batch_size : tiles loaded per batch, network crops per forward pass.
    n_jobs, threads_per_job : shards segmented at once, each in a worker process (spawned)
        with that many torch threads. On the 2-core demo machine two one-thread workers
        segment about twice as many tiles per second as one process; on a GPU keep 1
        (Slurm arrays spread shards over GPUs instead). The masks do not depend on it.

    Returns
    -------
    CohortPrediction; its table covers every tile of the shards asked for (all tiles when
    ``shards`` is None; a subset is a deterministic 1/N sample: every N-th tile by sorted id).
    SeglabError when a tile of those shards still has no mask after this call.

    Tiles whose mask is already in the folder are not segmented again; the model is not
    even loaded when nothing is left to do.
    """
    from seglab.segment import models
    from seglab.segment import predict

    t0 = time.monotonic()
    settings = dict(settings)
    spec = str(getattr(model, "spec", model))
    th, n_tiles = tiles_sha256(tiles_dir)
    mh = model_sha256(model)
    folder = paths.resolve(root) / prediction_key(mh, settings, th)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format": PREDICT_FORMAT, "model_spec": spec, "model_sha256": mh, "settings": settings,
              "tiles_dir": paths.relative(paths.resolve(tiles_dir)), "tiles_sha256": th, "n_tiles": n_tiles}
    if spec not in (models.CPSAM_NAMES + ("generalist", "classical")) and Path(spec).is_file():
        try:
            record["model_sidecar"] = {k: v for k, v in models.read_sidecar(spec).items()
                                       if k in ("base_spec", "variant", "markers", "train_tiles_hash", "n_train")}
        except SeglabError:
            pass
    _check_record(folder, record)
    all_ids = predict.list_tiles(tiles_dir)
    if shards is None:
        shards, ids = list(range(n_shards)), all_ids
    else:
        shards = sorted({predict.parse_shard((int(i), n_shards))[0] for i in shards})
        wanted = {tid for i in shards for tid in predict.shard_slice(all_ids, (i, n_shards))}
        ids = [tid for tid in all_ids if tid in wanted]
    missing_before = [tid for tid in ids if not (folder / f"{tid}.tif").is_file()]
    diameter = "default" if settings.get("diameter_px") is None else settings["diameter_px"]
    if int(n_jobs) < 1:
        raise SeglabError(f"n_jobs={n_jobs}: need at least 1 (shards segmented at once)")
    if missing_before:
        log(f"[cohort_inference] {name or spec}: {len(missing_before)} of {len(ids)} tiles to segment -> {paths.relative(folder)}")
        shard_kw = dict(tiles_dir=str(tiles_dir), out_dir=str(folder), n_shards=int(n_shards), diameter_px=diameter,
                        flow_threshold=settings["flow_threshold"], cellprob_threshold=settings["cellprob_threshold"],
                        min_size=settings["min_size"], batch_tiles=batch_tiles, batch_size=batch_size)
        # a shard is done when its table and every mask are there (predict writes the table last)
        todo = [i for i in shards if not (folder / f"tiles_shard-{i}-of-{n_shards}.tsv").is_file()
                or any(not (folder / f"{tid}.tif").is_file() for tid in predict.shard_slice(all_ids, (i, n_shards)))]
        n_workers = min(int(n_jobs), len(todo))
        if n_workers > 1 and isinstance(model, (str, os.PathLike)):
            with workers.worker_pool(n_workers, threads_per_job, _worker_load_model, (spec, gpu)) as pool:
                list(pool.map(_worker_predict_shard, [dict(shard_kw, shard=i) for i in todo]))
        else:
            loaded = models.load(model, gpu=gpu) if isinstance(model, (str, os.PathLike)) else model
            for i in todo:
                _predict_shard(loaded, shard=i, progress=progress, **shard_kw)
    else:
        log(f"[cohort_inference] {name or spec}: all {len(ids)} tiles already in {paths.relative(folder)} (reused)")
    table = collect_table(folder, ids)
    n_pred = sum(1 for tid in missing_before if (folder / f"{tid}.tif").is_file())
    return CohortPrediction(name=name or spec, folder=folder, table=table, record=record, n_predicted=n_pred,
                            wall_s=time.monotonic() - t0)


def _predict_shard(loaded, *, tiles_dir, out_dir, shard: int, n_shards: int, diameter_px, flow_threshold,
                   cellprob_threshold, min_size, batch_tiles, batch_size, progress: bool = False) -> None:
    from seglab.segment import predict

    predict.predict(loaded, tiles_dir, out_dir, shard=(shard, n_shards), diameter_px=diameter_px,
                    flow_threshold=flow_threshold, cellprob_threshold=cellprob_threshold, min_size=min_size,
                    batch_tiles=batch_tiles, batch_size=batch_size, progress=progress)


_WORKER_MODEL = None


def _worker_load_model(spec: str, gpu) -> None:
    """Each worker process loads the model once."""
    global _WORKER_MODEL
    from seglab.segment import models

    _WORKER_MODEL = models.load(spec, gpu=gpu)


def _worker_predict_shard(kwargs: dict) -> int:
    _predict_shard(_WORKER_MODEL, **kwargs)
    return int(kwargs["shard"])


def mask_loader(folder) -> Callable[[pd.Series], np.ndarray]:
    """``load_mask(row)`` for :func:`seglab.downstream.features.tile_table`: reads ``<folder>/<tile_id>.tif``."""
    import tifffile

    folder = Path(folder)

    def load(row) -> np.ndarray:
        tid = row["tile_id"]
        p = folder / f"{tid}.tif"
        if not p.is_file():
            raise SeglabError(f"{p}: no predicted mask for tile {tid}; run predict_cohort on this folder first")
        m = tifffile.imread(p)
        if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
            raise SeglabError(f"{p}: not a 2-D integer label image (shape {m.shape}, dtype {m.dtype}); delete it "
                              "and rerun predict_cohort to redo the tile")
        return m

    return load


def count_agreement(tables: Mapping[str, pd.DataFrame], truth: str = "truth") -> pd.DataFrame:
    """Per tile: each model's n_total_cells and n_marker_positive beside the truth's (long format).

    Columns: tile_id, donor, marker, model, n_total_cells, n_marker_positive,
    n_total_cells_truth, n_marker_positive_truth.
    """
    if truth not in tables:
        raise SeglabError(f"count_agreement: no {truth!r} table among {list(tables)}")
    cols = ["tile_id", "n_total_cells", "n_marker_positive"]
    ref = tables[truth][cols].rename(columns={"n_total_cells": "n_total_cells_truth",
                                              "n_marker_positive": "n_marker_positive_truth"})
    parts = []
    for m, t in tables.items():
        if m == truth:
            continue
        parts.append(t[["tile_id", "donor", "marker", "n_total_cells", "n_marker_positive"]].assign(model=m)
                     .merge(ref, on="tile_id", how="left"))
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- planted truth


def latent_scores(truth: Mapping) -> pd.Series:
    """Every donor's latent score from ``truth.json`` (donors with tiles and clinical-only donors),
    indexed by normalised donor id text."""
    from seglab.downstream.cohort import normalise_id

    z = {normalise_id(d): float(r["latent_score"]) for d, r in truth.get("donors", {}).items()}
    z.update({normalise_id(d): float(r["latent_score"]) for d, r in truth.get("clinical_only_donors", {}).items()})
    if not z:
        raise SeglabError("truth.json has no donors with a latent_score; is this a simulated cohort's truth?")
    return pd.Series(z, name="latent_score")


def outcome_directions(clinical: pd.DataFrame, truth: Mapping, outcomes: Sequence[str], *,
                       donor_col: str = "projid") -> pd.Series:
    """Sign (+1 / -1) of each outcome's Spearman correlation with the latent score over the donors."""
    from scipy.stats import spearmanr

    from seglab.downstream.cohort import normalise_ids

    z = latent_scores(truth)
    ids = normalise_ids(clinical[donor_col])
    zz = pd.Series(ids).map(z).to_numpy(float)
    out = {}
    for o in outcomes:
        if o not in clinical.columns:
            raise SeglabError(f"outcome {o!r} is not a column of the clinical table ({list(clinical.columns)})")
        v = pd.to_numeric(clinical[o], errors="coerce").to_numpy(float)
        ok = np.isfinite(v) & np.isfinite(zz)
        r = spearmanr(v[ok], zz[ok]).statistic if ok.sum() >= 3 else math.nan
        out[o] = float(np.sign(r)) if np.isfinite(r) and r != 0 else math.nan
    return pd.Series(out, name="direction")


def expected_signs(truth: Mapping, directions: pd.Series) -> pd.DataFrame:
    """One row per (marker, outcome): effect, null, direction and the expected sign of rho (0 for null)."""
    rows = []
    for m, rec in truth["markers"].items():
        for o, d in directions.items():
            eff = float(rec["effect"])
            null = bool(rec.get("null", eff == 0))
            rows.append({"marker": m, "outcome": o, "effect": eff, "null": null, "direction": d,
                         "expected_sign": 0.0 if null else float(np.sign(eff) * d)})
    return pd.DataFrame(rows)


def planted_recovery(correlations: Mapping[str, pd.DataFrame], truth: Mapping, clinical: pd.DataFrame, *,
                     feature: str = "ratio", alpha: float = 0.05, reference: str | None = "truth",
                     donor_col: str = "projid") -> tuple[pd.DataFrame, pd.DataFrame]:
    """How each model's analysis recovers the planted effects.

    Parameters
    ----------
    correlations : {model: Analysis.correlations} (marker, feature, outcome, rho, q).
    truth : the cohort's ``truth.json`` (planted effect per marker, latent score per donor).
    clinical : the clinical table (outcome directions are measured on it).
    feature : the donor feature that carries the planted effect (``ratio``).
    reference : the model whose rho the others are compared with (ground-truth masks), or None.

    Returns
    -------
    per_test : one row per (model, marker, outcome) of ``feature``: rho, q, expected_sign,
        null, sign_correct, significant, recovered, false_positive, rho_reference.
    per_model : one row per model: n_planted_tests, sign_correct, recovered,
        n_wrong_sign_significant, n_null_tests, false_positives, false_positive_rate,
        mean_abs_rho_diff_vs_truth (NaN for the reference itself or without one).
    """
    if not correlations:
        raise SeglabError("planted_recovery: no model's correlations given")
    if reference is not None and reference not in correlations:
        raise SeglabError(f"planted_recovery: reference {reference!r} is not among the models {list(correlations)}")
    outcomes = None
    parts = []
    for m, c in correlations.items():
        t = c[c["feature"] == feature][["marker", "outcome", "rho", "q"]]
        if t.empty:
            raise SeglabError(f"planted_recovery: model {m!r} has no test of feature {feature!r}")
        outcomes = outcomes or list(dict.fromkeys(t["outcome"]))
        parts.append(t.assign(model=m))
    per = pd.concat(parts, ignore_index=True)
    unknown = sorted(set(per["marker"]) - set(truth["markers"]))
    if unknown:
        raise SeglabError(f"planted_recovery: markers {unknown} have no planted effect in truth.json")
    exp = expected_signs(truth, outcome_directions(clinical, truth, outcomes, donor_col=donor_col))
    per = per.merge(exp, on=["marker", "outcome"], how="left")
    sign = np.sign(per["rho"].to_numpy(float))
    per["significant"] = (per["q"].to_numpy(float) < alpha)  # NaN q compares False
    per["sign_correct"] = np.where(per["null"], np.nan, (sign == per["expected_sign"]).astype(float))
    per.loc[~per["null"] & per["rho"].isna(), "sign_correct"] = np.nan
    per["recovered"] = ~per["null"] & per["significant"] & (sign == per["expected_sign"])
    per["false_positive"] = per["null"] & per["significant"]
    if reference is not None:
        ref = per[per["model"] == reference].set_index(["marker", "outcome"])["rho"]
        per["rho_reference"] = per.set_index(["marker", "outcome"]).index.map(ref).to_numpy(float)
    else:
        per["rho_reference"] = np.nan
    rows = []
    for m in correlations:
        g = per[per["model"] == m]
        planted = g[~g["null"] & g["rho"].notna() & (g["expected_sign"] != 0) & g["expected_sign"].notna()]
        nul = g[g["null"]]
        diff = np.abs(g["rho"] - g["rho_reference"])
        rows.append({
            "model": m,
            "n_planted_tests": int(len(planted)),
            "sign_correct": float(planted["sign_correct"].mean()) if len(planted) else math.nan,
            "recovered": float(planted["recovered"].mean()) if len(planted) else math.nan,
            "n_recovered": int(planted["recovered"].sum()),
            "n_wrong_sign_significant": int((planted["significant"] & (planted["sign_correct"] == 0)).sum()),
            "n_null_tests": int(nul["rho"].notna().sum()),
            "false_positives": int(nul["false_positive"].sum()),
            "false_positive_rate": float(nul["false_positive"].sum() / max(nul["rho"].notna().sum(), 1)),
            "mean_abs_rho_diff_vs_truth": (float(np.nanmean(diff)) if m != reference and diff.notna().any()
                                           else math.nan),
        })
    return per, pd.DataFrame(rows)


def latent_rho(donor_tables: Mapping[str, pd.DataFrame], truth: Mapping, *, feature: str = "ratio") -> pd.DataFrame:
    """Per model and marker: Spearman rho of the donor feature with the donors' latent score.

    The cleanest view of the planted effect (no clinical noise, no FDR): with the
    ground-truth masks it approaches ``sign(effect)``; a null marker stays near 0.
    ``donor_tables`` are ``Analysis.donors`` (donor, marker, <feature>). Returns
    model, marker, effect, null, n_donors, rho_latent.
    """
    from scipy.stats import spearmanr

    z = latent_scores(truth)
    rows = []
    for m, d in donor_tables.items():
        for mk, g in d.groupby("marker", sort=True):
            v = g[feature].to_numpy(float)
            zz = g["donor"].astype(str).map(z).to_numpy(float)
            ok = np.isfinite(v) & np.isfinite(zz)
            r = spearmanr(v[ok], zz[ok]).statistic if ok.sum() >= 3 and np.ptp(v[ok]) > 0 else math.nan
            rec = truth["markers"].get(mk, {})
            rows.append({"model": m, "marker": mk, "effect": rec.get("effect", math.nan),
                         "null": rec.get("null"), "n_donors": int(ok.sum()), "rho_latent": float(r)})
    return pd.DataFrame(rows)


def recovery_figure(per_test: pd.DataFrame, per_model: pd.DataFrame, latent: pd.DataFrame | None = None, *,
                    models: Sequence[str] | None = None, figsize=None):
    """Three panels: rho of each model against the ground-truth-mask rho per test (planted and null
    markers marked); recovered / sign-correct / false-positive rates per model; and, with
    ``latent``, rho with the latent score per marker and model. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    models = list(models or per_model["model"])
    ncol = 3 if latent is not None else 2
    fig = Figure(figsize=figsize or (5 * ncol, 4), layout="constrained")
    axes = fig.subplots(1, ncol)
    ax = axes[0]
    others = [m for m in models if per_test.loc[per_test["model"] == m, "rho_reference"].notna().any()
              and not np.allclose(per_test.loc[per_test["model"] == m, "rho"].fillna(0),
                                  per_test.loc[per_test["model"] == m, "rho_reference"].fillna(0))]
    for k, m in enumerate(others):
        g = per_test[per_test["model"] == m]
        for null, mk in ((False, "o"), (True, "x")):
            h = g[g["null"] == null]
            ax.scatter(h["rho_reference"], h["rho"], marker=mk, s=22, color=f"C{k}",
                       label=f"{m} ({'null' if null else 'planted'} markers)")
    ax.plot([-1, 1], [-1, 1], color="k", lw=0.6)
    ax.axhline(0, color="0.7", lw=0.5)
    ax.axvline(0, color="0.7", lw=0.5)
    ax.set_xlabel("rho on the ground-truth masks")
    ax.set_ylabel("rho on the model's masks")
    ax.set_title("each test (marker x outcome)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    pm = per_model.set_index("model").reindex(models)
    x = np.arange(len(models))
    for j, (col, lab) in enumerate((("recovered", "recovered (q < alpha, right sign)"),
                                    ("sign_correct", "right sign (any q)"),
                                    ("false_positive_rate", "false positives on null markers"))):
        ax.bar(x + (j - 1) * 0.27, pm[col].to_numpy(float), 0.27, label=lab)
    ax.set_xticks(x, models)
    ax.set_ylim(0, 1.05)
    ax.set_title("planted-effect recovery per model", fontsize=9)
    ax.legend(fontsize=7)
    if latent is not None:
        ax = axes[2]
        piv = latent.pivot(index="marker", columns="model", values="rho_latent").reindex(columns=models)
        w = 0.8 / max(len(models), 1)
        xm = np.arange(len(piv))
        for k, m in enumerate(models):
            ax.bar(xm + (k - (len(models) - 1) / 2) * w, piv[m].to_numpy(float), w, label=m)
        eff = latent.drop_duplicates("marker").set_index("marker").reindex(piv.index)["effect"]
        ax.set_xticks(xm, [f"{mk}\n({e:+.1f})" for mk, e in zip(piv.index, eff)])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(-1, 1)
        ax.set_ylabel("Spearman rho, donor ratio vs latent score")
        ax.set_title("planted effect (log-odds per SD) per marker", fontsize=9)
        ax.legend(fontsize=7)
    return fig
