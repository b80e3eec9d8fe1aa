"""E5 (notebook 05_downstream): does the choice of segmentation model change the biology?

Every tile of the cohort is segmented by the off-the-shelf baseline and by the
fine-tuned generic model (E1's, read from the model cache). Each model's masks,
and the ground-truth masks ("truth"), go through the same downstream chain
(:mod:`seglab.downstream`): tile counts -> donor features -> Spearman rho with
every clinical outcome -> BH FDR over a model's tests -> bootstrap stability
(tiles resampled within donor x marker, the same draws for every model). The
analysis is repeated over positivity thresholds, and on a simulated cohort each
model's calls are scored against the effects ``truth.json`` planted.

The steps, in the notebook's order (each returns tables and what the figures need;
a result's ``outputs()`` names the files the run folder keeps, ``run.save_outputs``
writes them)::

    model_table(params)              the two models, identified by their weights   models.json
    predict_all(params)              both models' masks of every tile (cached)     predictions_<model>.csv, inference.*
    tile_counts(params, predictions) TileCounts: tile tables of truth and models   tiles_<model>.csv, tile_counts_vs_truth.*
    correlations(counts, ...)        Correlations: rho, q, bootstrap per model     <model>_correlations.csv, side_by_side.csv, ...
    sensitivity(counts, ...)         Sensitivity: the analysis at each percentile  threshold_sensitivity.*
    planted(truth, corr, sens, ...)  PlantedRecovery (None for real tiles)         planted_recovery*.csv, planted_*.png
    headline(...), verdict(...)      summary.json's numbers; the answer in words

The heavy work is described once, here: :func:`predict_model` is the one
``predict_cohort`` call of E5; :func:`work_items` runs it for one (model, shard)
per Slurm array task, :func:`predict_all` for every selected shard in the
notebook (which then finds every mask cached and segments nothing), and
:func:`check` is the merge check after the array.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from seglab import SeglabError
from seglab.config.params import params_hash
from seglab.config.settings import MaskSettings
from seglab.core import io, paths
from seglab.data import manifest as data_manifest
from seglab.downstream import planted as planted_truth
from seglab.downstream.correlate import Analysis, compare_segmentations, threshold_sensitivity
from seglab.downstream.features import tile_table
from seglab.experiments.items import Item, finetune_key, reference_generic
from seglab.plots import downstream as plots_downstream
from seglab.segment import cohort_prediction, finetuning, models, predict
from seglab.segment import shards as sharding
from seglab.segment.cohort_prediction import CohortPrediction

MODELS = ("baseline", "finetuned")   # the segmentation models compared, in table order
TRUTH = "truth"                      # the ground-truth masks, analysed like a model


# --------------------------------------------------------------------------- run outputs


def figures(outputs: Mapping[str, object]) -> list:
    """The matplotlib Figures among a step's outputs, in order (to display them)."""
    return [obj for obj in outputs.values() if hasattr(obj, "savefig")]


# --------------------------------------------------------------------------- models


def model_specs(params: dict) -> dict[str, Callable[[], str]]:
    """Notebook 05's models, by name, as functions giving the spec (the fine-tuned one must be cached)."""

    generic = reference_generic(params)

    def finetuned() -> str:
        found = finetuning.cached_model(**generic)
        if found is None:
            raise SeglabError(
                f"05_downstream: the fine-tuned generic model ({params['baseline_model']} on {params['cohort_dir']}, "
                "the shared training settings) is not in data/models yet; 05 needs 01: run it first (`seglab run 01` "
                "or `seglab prepare 01 --all`). E5's prepare does not train it, so that N shard tasks never train "
                "one model at once")
        return str(found)

    return {"baseline": lambda: str(params["baseline_model"]), "finetuned": finetuned}


def describe_model(spec: str) -> dict:
    """What a run records about one model: its spec, the weights' path and sha256 and, for a seglab
    checkpoint, its sidecar's key fields (base, variant, training tiles); a built-in without a
    seglab sidecar (cpsam) gets its spec and :func:`seglab.segment.models.model_id`."""
    try:
        return {"spec": str(spec), **finetuning.model_record(models.GENERALIST_PATH if spec == "generalist" else spec)}
    except (SeglabError, OSError):
        return {"spec": str(spec), "sha256": models.model_id(spec)}


def model_table(params: dict) -> tuple[dict, pd.DataFrame]:
    """The models of this run: ({model: :func:`describe_model`} for ``models.json``, and a table
    with one row per model: model, spec, sha256)."""
    records = {name: describe_model(spec_of()) for name, spec_of in model_specs(params).items()}
    table = pd.DataFrame([{"model": name, **rec} for name, rec in records.items()])[["model", "spec", "sha256"]]
    return records, table


# --------------------------------------------------------------------------- inference


def tiles_dir(params: dict) -> Path:
    """The cohort's ``tiles/`` folder (absolute)."""
    return paths.resolve(params["cohort_dir"]) / "tiles"


def predict_model(params: dict, name: str, spec: str, shards, *, n_jobs: int = 1,
                  log: Callable = print) -> CohortPrediction:
    """E5's one ``predict_cohort`` call: ``spec``'s masks of the tiles of ``shards`` (of
    ``n_shards``; None: all) into its content-addressed prediction folder, with the run's mask
    settings. A prepare item runs it for one shard; the notebook (:func:`predict_all`) for the
    run's shards with ``inference_jobs`` workers (the masks do not depend on the workers)."""
    return cohort_prediction.predict_cohort(spec, tiles_dir(params), MaskSettings.from_params(params), name=name,
                                            root=params["predictions_dir"], n_shards=int(params["n_shards"]),
                                            shards=shards, batch_tiles=params["batch_tiles"],
                                            batch_size=params["inference_batch_size"], n_jobs=n_jobs, log=log)


def shards_of(params: dict) -> tuple[int, list[int]]:
    """(n_shards, the shards this run covers, sorted): every shard when ``shards`` is null."""
    n = int(params["n_shards"])
    shards = params.get("shards")
    wanted = list(range(n)) if shards is None else sorted({int(i) for i in shards})
    bad = [i for i in wanted if not 0 <= i < n]
    if bad:
        raise SeglabError(f"05_downstream: shards {bad} are outside 0..{n - 1} (n_shards {n}); fix 'shards' in "
                          "params/<profile>/05_downstream.yaml")
    return n, wanted


def preflight(params: dict, cohort: Callable[[], pd.DataFrame | None]) -> None:
    """Before the notebook starts (:func:`seglab.experiments.preflight`): ``shards`` within
    0..n_shards-1 (the check :func:`shards_of` makes inside the notebook). Raises ParamConflict."""
    from seglab.experiments import ParamConflict

    n, shards = int(params["n_shards"]), params.get("shards")
    bad = sorted({int(i) for i in shards or [] if not 0 <= int(i) < n})
    if bad:
        raise ParamConflict("shards", f"{list(shards)}: {bad} outside 0..{n - 1}", f"give shards below n_shards={n}",
                            also=("n_shards",))


def work_items(params: dict) -> list[Item]:
    """E5's inference shards as prepare items: every (model, shard), each :func:`predict_model`
    for that one shard (what the notebook's :func:`predict_all` then finds cached)."""
    n, shards = shards_of(params)
    settings = MaskSettings.from_params(params)
    folders: dict[str, Path] = {}

    def folder(name, spec_of) -> Path:   # hashing the weights and tiles once per model, not per shard
        if name not in folders:
            folders[name] = cohort_prediction.prediction_dir(spec_of(), tiles_dir(params), settings,
                                                             root=params["predictions_dir"])
        return folders[name]

    # what decides a shard's output folder, without hashing weights or tiles (the fine-tuned model by its training)
    common = {"cohort": str(paths.resolve(params["cohort_dir"])), "settings": settings,
              "root": str(paths.resolve(params["predictions_dir"]))}
    model_key = {"baseline": params_hash({**common, "model": params["baseline_model"]})[:24],
                 "finetuned": params_hash({**common, "model": finetune_key(reference_generic(params))})[:24]}
    items = []
    for name, spec_of in model_specs(params).items():
        for i in shards:
            def done(name=name, spec_of=spec_of, i=i) -> bool:
                return sharding.shard_complete(tiles_dir(params), folder(name, spec_of), i, n)

            def run(log, name=name, spec_of=spec_of, i=i):
                return predict_model(params, name, spec_of(), [i], log=log)

            items.append(Item(index=-1, label=f"model={name} shard={i}/{n}", kind="predict",
                              key=f"predict:{model_key[name]}:{i}/{n}",
                              args={"model": name, "shard": i, "n_shards": n}, _done=done, _run=run))
    return items


def predict_all(params: dict, log: Callable = print) -> dict[str, CohortPrediction]:
    """Both models over the run's shards (``shards``; null: every tile), ``inference_jobs`` shards
    at once: {model: CohortPrediction}. Masks already in the cache (a prepare array, an earlier
    run) are read, not segmented again."""
    return {name: predict_model(params, name, spec_of(), params["shards"], n_jobs=int(params["inference_jobs"]),
                                log=log)
            for name, spec_of in model_specs(params).items()}


def inference_outputs(params: dict, predictions: Mapping[str, CohortPrediction]) -> dict:
    """The files of the inference step: ``predictions_<model>.csv`` (one row per tile),
    ``inference.csv`` (one row per model: tiles, reused, cells, tiles/s) and ``inference.json``."""
    out = {f"predictions_{name}.csv": p.table for name, p in predictions.items()}
    out["inference.csv"] = inference_table(predictions)
    out["inference.json"] = {"settings": MaskSettings.from_params(params).as_dict(), "n_shards": params["n_shards"],
                             "shards": params["shards"],
                             "models": {k: {**p.summary(), "record": p.record} for k, p in predictions.items()}}
    return out


def inference_table(predictions: Mapping[str, CohortPrediction]) -> pd.DataFrame:
    """One row per model: folder, tiles, segmented here and reused, wall s, tiles/s, model id, cells."""
    return pd.DataFrame([p.summary() for p in predictions.values()])


# --------------------------------------------------------------------------- tile counts


@dataclass
class TileCounts:
    """The tile tables of one run: one row per analysed tile, per model.

    Attributes
    ----------
    manifest : the tiles analysed (those both models predicted), sorted by tile_id.
    tables : {model: tile table} (:func:`seglab.downstream.features.tile_table`): ``truth``
        (the ground-truth masks, when every tile has one), ``baseline``, ``finetuned``.
    has_truth : every tile has a ground-truth mask (simulated cohorts).
    """

    manifest: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    has_truth: bool

    @property
    def models(self) -> list[str]:
        """The analysed mask sources in table order: truth (when present), baseline, finetuned."""
        return [m for m in (TRUTH, *MODELS) if m in self.tables]

    def totals(self) -> pd.DataFrame:
        """Cells and marker-positive cells summed over the tiles, one column per model."""
        return pd.DataFrame({m: t[["n_total_cells", "n_marker_positive"]].sum() for m, t in self.tables.items()})

    def agreement(self) -> pd.DataFrame | None:
        """Per tile, each model's counts beside the truth's (None without ground-truth masks)."""
        return planted_truth.count_agreement(self.tables) if self.has_truth else None

    def describe(self, params: dict) -> str:
        """Tiles, donors and whether truth masks exist; a note when the bootstrap cannot vary (one
        tile per donor x marker: every resample is the original)."""
        text = (f"{len(self.manifest)} tiles, {self.manifest['donor'].nunique()} donors; truth masks for every tile: "
                f"{self.has_truth}")
        if self.manifest.groupby(["donor", "marker"]).size().max() <= 1:
            subset = f" (shards {params['shards']} of {params['n_shards']})" if params["shards"] is not None else ""
            text += (f"\nNOTE: one tile per donor x marker{subset}: resampling tiles within a donor x marker cannot "
                     "vary, so the bootstrap intervals collapse onto rho; analyse more tiles for real stability")
        return text

    def outputs(self) -> dict:
        """``tiles_<model>.csv`` and, with truth, ``tile_counts_vs_truth.csv`` and its figure."""
        out: dict = {f"tiles_{m}.csv": t for m, t in self.tables.items()}
        agree = self.agreement()
        if agree is not None:
            out["tile_counts_vs_truth.csv"] = agree
            out["tile_counts_vs_truth.png"] = plots_downstream.count_agreement_figure(agree)
        return out


def analysed_manifest(params: dict, predictions: Mapping[str, CohortPrediction]) -> pd.DataFrame:
    """The cohort's manifest restricted to the tiles every model predicted, sorted by tile_id."""
    manifest = data_manifest.cohort_manifest(paths.resolve(params["cohort_dir"]))
    predicted = set.intersection(*(set(p.table["tile"]) for p in predictions.values()))
    return manifest[manifest["tile_id"].isin(predicted)].sort_values("tile_id").reset_index(drop=True)


def tile_counts(params: dict, predictions: Mapping[str, CohortPrediction]) -> TileCounts:
    """Tile tables (cells, marker-positive cells at ``percentile`` and at every sensitivity
    percentile, densities) of the ground-truth masks (when every tile has one) and of each model."""
    manifest = analysed_manifest(params, predictions)
    has_truth = bool((manifest["mask_path"].astype(str) != "").all())
    common = dict(rule="percentile", percentile=params["percentile"], pixel_size_um=params["pixel_size_um"],
                  sensitivity_percentiles=params["percentiles"])
    tables = {TRUTH: tile_table(manifest, **common)} if has_truth else {}
    for name, p in predictions.items():
        tables[name] = tile_table(manifest, load_mask=cohort_prediction.mask_loader(p.folder), **common)
    return TileCounts(manifest=manifest, tables=tables, has_truth=has_truth)


# --------------------------------------------------------------------------- correlations


def clinical_table(params: dict) -> pd.DataFrame:
    """The cohort's ``clinical.csv`` (one row per donor: projid and the outcomes)."""
    return pd.read_csv(paths.resolve(params["cohort_dir"]) / "clinical.csv")


def planted_effects(params: dict) -> dict | None:
    """The cohort's ``truth.json`` (planted effect per marker, latent score per donor), or None
    for real tiles."""
    f = paths.resolve(params["cohort_dir"]) / "truth.json"
    return json.loads(f.read_text()) if f.is_file() else None


@dataclass
class Correlations:
    """Every model's analysis on the same tiles (:func:`seglab.downstream.correlate.compare_segmentations`).

    Attributes
    ----------
    analyses : {model: Analysis} (donor features, one row per test with rho, q and bootstrap stability).
    side_by_side : one row per test, ``<stat>_<model>`` columns.
    recovery : per model, the truth's significant tests recovered and the false calls (None without truth).
    donor_agreement : per model, marker and feature, rho of the donor feature with the truth's (None without truth).
    """

    analyses: dict[str, Analysis]
    side_by_side: pd.DataFrame
    recovery: pd.DataFrame | None
    donor_agreement: pd.DataFrame | None

    def overview(self) -> pd.DataFrame:
        """Tests, computed tests, significant tests (q < alpha) and joined donors, one column per model."""
        rows = ["n_tests", "n_tests_computed", "n_significant", "n_donors_joined"]
        return pd.DataFrame({m: a.summary() for m, a in self.analyses.items()}).loc[rows]

    def outputs(self) -> dict:
        """Per model ``<model>_donor_features.csv``, ``<model>_correlations.csv``, ``<model>_downstream.json``
        (as :meth:`Analysis.save`); ``side_by_side.csv``; with truth ``recovery_of_truth_calls.csv`` and
        ``donor_agreement.csv``."""
        out: dict = {}
        for m, a in self.analyses.items():
            out[f"{m}_donor_features.csv"] = a.donors
            out[f"{m}_correlations.csv"] = a.correlations
            out[f"{m}_downstream.json"] = {"params": a.params, **a.summary()}
        out["side_by_side.csv"] = self.side_by_side
        if self.recovery is not None:
            out["recovery_of_truth_calls.csv"] = self.recovery
            out["donor_agreement.csv"] = self.donor_agreement
        return out

    def heatmaps(self, params: dict) -> dict:
        """``rho_heatmap_<feature>.png`` for the first two features: rho per marker x outcome, one
        panel per model, ``*`` where q < alpha."""
        models_ = list(self.analyses)
        return {f"rho_heatmap_{feat}.png": plots_downstream.compare_heatmaps(self.side_by_side, models_, feat,
                                                                            alpha=params["alpha"])
                for feat in params["features"][:2]}

    def stability(self, params: dict) -> dict:
        """``stability_<model>.png``: rho of the ratio with each outcome and its bootstrap 95% CI."""
        return {f"stability_{m}.png": plots_downstream.stability_plot(
                    a.correlations, "ratio", figsize=(9, 3.5),
                    title=f"{m}: rho of the ratio with each outcome, bootstrap 95% CI (B = {params['bootstrap_B']})")
                for m, a in self.analyses.items()}


def correlations(counts: TileCounts, clinical: pd.DataFrame, params: dict) -> Correlations:
    """Donor features, Spearman per marker x feature x outcome, BH q over each model's tests and
    ``bootstrap_B`` paired resamples, for truth and both models (see :class:`Correlations`). A test
    over fewer than ``min_donors`` donors keeps its rho, gets no p or q and a ``reason``."""
    cmp = compare_segmentations({m: counts.tables[m] for m in counts.models}, clinical, params["outcomes"],
                         truth=TRUTH if counts.has_truth else None, features=params["features"],
                         B=params["bootstrap_B"], seed=params["seed"], alpha=params["alpha"],
                         min_donors=params["min_donors"])
    return Correlations(analyses=cmp["analyses"], side_by_side=cmp["side_by_side"],
                        recovery=cmp.get("recovery"), donor_agreement=cmp.get("donor_agreement"))


# --------------------------------------------------------------------------- threshold sensitivity


@dataclass
class Sensitivity:
    """The analysis of every model at every positivity percentile (each its own FDR family).

    table : :func:`seglab.downstream.correlate.threshold_sensitivity` rows of every model, with ``model``.
    models : the models in table order.
    alpha : BH level of a significant test.
    """

    table: pd.DataFrame
    models: list[str]
    alpha: float

    def significant_by_percentile(self) -> pd.DataFrame:
        """Significant tests (q < alpha) per percentile (rows) and model (columns)."""
        sig = self.table.assign(sig=self.table["q"] < self.alpha)
        return sig.groupby(["model", "percentile"])["sig"].sum().unstack("model")[self.models]

    def outputs(self) -> dict:
        """``threshold_sensitivity.csv`` and its figure (rho of the ratio per marker and percentile)."""
        return {"threshold_sensitivity.csv": self.table,
                "threshold_sensitivity.png": plots_downstream.sensitivity_panels(self.table, self.models, "ratio")}


def sensitivity(counts: TileCounts, clinical: pd.DataFrame, params: dict) -> Sensitivity:
    """Each model's analysis re-thresholded at every one of ``percentiles`` (``sensitivity_B``
    resamples each), stacked."""
    parts = [threshold_sensitivity(counts.tables[m], clinical, params["outcomes"], percentiles=params["percentiles"],
                                   features=params["features"], B=params["sensitivity_B"], seed=params["seed"],
                                   alpha=params["alpha"], min_donors=params["min_donors"]).assign(model=m)
             for m in counts.models]
    return Sensitivity(table=pd.concat(parts, ignore_index=True), models=counts.models, alpha=params["alpha"])


# --------------------------------------------------------------------------- planted truth


@dataclass
class PlantedRecovery:
    """How each model recovers the planted effects (:mod:`seglab.downstream.planted`).

    per_test : one row per (model, marker, outcome) of the ratio: rho, q, expected sign, recovered.
    per_model : one row per model: sign_correct, recovered, false_positives, mean |rho - rho_truth|.
    latent : per model and marker, rho of the donor ratio with the latent score.
    by_percentile : ``per_model`` at every positivity percentile.
    models : the models in table order.
    """

    per_test: pd.DataFrame
    per_model: pd.DataFrame
    latent: pd.DataFrame
    by_percentile: pd.DataFrame
    models: list[str]

    def latent_table(self) -> pd.DataFrame:
        """rho of the donor ratio with the latent score: markers x models (2 decimals)."""
        return self.latent.pivot(index="marker", columns="model", values="rho_latent")[self.models].round(2)

    def outputs(self) -> dict:
        return {"planted_recovery_per_test.csv": self.per_test, "planted_recovery.csv": self.per_model,
                "planted_latent_rho.csv": self.latent, "planted_recovery_by_percentile.csv": self.by_percentile,
                "planted_recovery.png": plots_downstream.recovery_figure(self.per_test, self.per_model, self.latent,
                                                                         models=self.models),
                "planted_recovery_by_percentile.png": plots_downstream.recovery_by_percentile_plot(
                    self.by_percentile, self.models)}


def planted(truth: Mapping | None, corr: Correlations, sens: Sensitivity, clinical: pd.DataFrame,
            counts: TileCounts, params: dict) -> PlantedRecovery | None:
    """Recovery of ``truth.json``'s planted effects by each model (None for real tiles): per test,
    per model, with the latent score, and at every positivity percentile."""
    if truth is None:
        return None
    reference = TRUTH if counts.has_truth else None
    per_test, per_model = planted_truth.planted_recovery(
        {m: corr.analyses[m].correlations for m in counts.models}, truth, clinical, alpha=params["alpha"],
        reference=reference)
    latent = planted_truth.latent_rho({m: corr.analyses[m].donors for m in counts.models}, truth)
    by_pct = planted_truth.recovery_by_percentile(sens.table, truth, clinical, counts.models, alpha=params["alpha"],
                                                  reference=reference)
    return PlantedRecovery(per_test=per_test, per_model=per_model, latent=latent, by_percentile=by_pct,
                           models=counts.models)


# --------------------------------------------------------------------------- headline


def headline(params: dict, predictions: Mapping[str, CohortPrediction], counts: TileCounts, corr: Correlations,
             recovery: PlantedRecovery | None) -> dict:
    """The run's summary numbers (``summary.json``, timing keys aside).

    - n_tiles, n_donors (analysed), n_tiles_cohort (every tile of the cohort), bootstrap_B;
    - per model: inference_tiles_predicted_<model> (segmented by this run; 0 when every mask was
      cached) and inference_tiles_per_s_<model> (None then);
    - sig_tests_<model> (q < alpha) for truth, baseline, finetuned;
    - with truth masks: truth_calls_recovered_<model>, false_calls_vs_truth_<model> (fractions);
    - with planted effects: recovery_<model>, planted_sign_correct_<model> (fractions),
      null_false_positives_<model> (tests), mean_abs_rho_diff_vs_truth_<model>,
      planted_latent_rho_mean_<model>, finetuned_recovers_at_least_as_well (bool).
    Fractions and rho are rounded to 3 decimals.
    """
    numbers = {"n_tiles": int(len(counts.manifest)), "n_tiles_cohort": int(predictions["baseline"].record["n_tiles"]),
               "n_donors": int(counts.manifest["donor"].nunique()), "bootstrap_B": int(params["bootstrap_B"])}
    numbers.update(inference_numbers(predictions))
    numbers.update({f"sig_tests_{m}": int(a.summary()["n_significant"]) for m, a in corr.analyses.items()})
    if corr.recovery is not None:
        numbers.update(truth_call_numbers(corr.recovery))
    if recovery is not None:
        numbers.update(planted_numbers(recovery, has_truth=counts.has_truth))
    return numbers


def inference_numbers(predictions: Mapping[str, CohortPrediction]) -> dict:
    """inference_tiles_predicted_<model> and inference_tiles_per_s_<model> (None when nothing was segmented)."""
    out = {}
    for name, p in predictions.items():
        out[f"inference_tiles_predicted_{name}"] = int(p.n_predicted)
        out[f"inference_tiles_per_s_{name}"] = round(p.tiles_per_s, 3) if p.n_predicted else None
    return out


def truth_call_numbers(recovery: pd.DataFrame) -> dict:
    """truth_calls_recovered_<model> and false_calls_vs_truth_<model> of compare_segmentations' recovery table."""
    rec = recovery.set_index("model")
    out = {}
    for m in MODELS:
        out[f"truth_calls_recovered_{m}"] = round(float(rec.loc[m, "recovered"]), 3)
        out[f"false_calls_vs_truth_{m}"] = round(float(rec.loc[m, "false_calls"]), 3)
    return out


def planted_numbers(recovery: PlantedRecovery, *, has_truth: bool) -> dict:
    """The planted-effect numbers of every model and whether the fine-tuned model recovers at least
    as many planted tests as the baseline."""
    pm = recovery.per_model.set_index("model")
    out = {}
    for m in recovery.models:
        out[f"recovery_{m}"] = round(float(pm.loc[m, "recovered"]), 3)
        out[f"planted_sign_correct_{m}"] = round(float(pm.loc[m, "sign_correct"]), 3)
        out[f"null_false_positives_{m}"] = int(pm.loc[m, "false_positives"])
        if m != TRUTH and has_truth:
            out[f"mean_abs_rho_diff_vs_truth_{m}"] = round(float(pm.loc[m, "mean_abs_rho_diff_vs_truth"]), 3)
        out[f"planted_latent_rho_mean_{m}"] = round(planted_truth.signed_latent_rho_mean(recovery.latent, m), 3)
    out["finetuned_recovers_at_least_as_well"] = bool(pm.loc["finetuned", "recovered"] >= pm.loc["baseline", "recovered"])
    return out


def verdict(recovery: PlantedRecovery | None, *, has_truth: bool) -> str:
    """The answer in words: planted tests recovered, right signs, null false positives and mean
    |rho - rho_truth| of the fine-tuned model against the baseline's."""
    if recovery is None:
        return "no truth.json: real tiles, no planted effects to recover"
    pm = recovery.per_model.set_index("model")
    fb, ff = pm.loc["baseline"], pm.loc["finetuned"]
    truth_rec = f"{pm.loc[TRUTH, 'recovered']:.2f}" if TRUTH in pm.index else "n/a"
    text = (f"planted tests recovered: fine-tuned {ff['recovered']:.2f} vs baseline {fb['recovered']:.2f} "
            f"(truth masks {truth_rec}); right sign: {ff['sign_correct']:.2f} vs {fb['sign_correct']:.2f}; "
            f"null false positives: {int(ff['false_positives'])} vs {int(fb['false_positives'])}")
    if has_truth:
        text += (f"; mean |rho - rho_truth|: {ff['mean_abs_rho_diff_vs_truth']:.3f} vs "
                 f"{fb['mean_abs_rho_diff_vs_truth']:.3f}")
    ok = bool(ff["recovered"] >= fb["recovered"])
    return text + f"\nthe fine-tuned model recovers the planted effects at least as well as the baseline: {ok}"


# --------------------------------------------------------------------------- merge check


def check(params: dict, log: Callable = print) -> dict:
    """The merge step after the shards of E5: every tile of the selected shards exactly once, per model.

    For each model's prediction folder: the shard tables of ``n_shards`` list every
    tile of the selected shards exactly once, no tile outside them, and every mask
    reads back. Writes ``shards_check.json`` (all shards; with ``tiles.tsv``, as
    ``seglab merge-shards``) or ``shards_check_partial.json`` (a subset) in the folder.

    Returns {model: check record}. Raises SeglabError naming the missing, doubled,
    unexpected and unreadable tiles.
    """
    n, shards = shards_of(params)
    tiles = tiles_dir(params)
    settings = MaskSettings.from_params(params)
    all_tiles = predict.list_tiles(tiles)
    wanted = [t for k, t in enumerate(all_tiles) if predict.shard_of(k, n) in shards]
    out, problems = {}, []
    for model, spec_of in model_specs(params).items():
        folder = cohort_prediction.prediction_dir(spec_of(), tiles, settings, root=params["predictions_dir"])
        if shards == list(range(n)):
            try:
                c = sharding.merge_shards(tiles, folder, n, log=log)
                out[model] = {**c.__dict__, "ok": True, "folder": str(folder)}
            except SeglabError as exc:
                problems.append(f"{model}: {exc}")
            continue
        tables = {i: t for i, t in sharding.read_shard_tables(folder, n).items() if i in shards} if folder.is_dir() \
            else {i: [] for i in shards}
        c = sharding.check_shards(wanted, tables)
        listed = {t for names in tables.values() for t in names}
        broken = sorted(t for t in listed & set(wanted) if not predict.mask_complete(folder / f"{t}.tif"))
        record = {**c.__dict__, "ok": c.ok and not broken, "unreadable_masks": broken, "shards": shards,
                  "folder": str(folder), "checked": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if folder.is_dir():
            io.write_json(folder / "shards_check_partial.json", record)
        out[model] = record
        if not record["ok"]:
            problems.append(f"{model}: {len(c.missing)} missing {c.missing[:5]}, {len(c.duplicated)} in two shards "
                            f"{list(c.duplicated)[:5]}, {len(c.unexpected)} not in shards {shards} {c.unexpected[:5]}, "
                            f"{len(broken)} masks unreadable {broken[:5]} in {folder}")
        else:
            log(f"[prepare] {model}: {len(wanted)} tiles of shards {shards} of {n}, each exactly once in {folder}")
    if problems:
        raise SeglabError("05_downstream: the inference shards do not give every tile exactly once: "
                          + "; ".join(problems) + ". Run the missing items again (`seglab prepare 05 --all`, or "
                          "`seglab submit 05`): finished tiles are skipped")
    return out
