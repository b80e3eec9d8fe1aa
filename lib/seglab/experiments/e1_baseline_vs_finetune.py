"""E1, baseline vs fine-tuned: does fine-tuning the segmenter on a few annotated tiles of our tissue
help, and does it matter what it is fine-tuned on?

Four models: ``baseline`` (off the shelf) and three fine-tunes of it (:data:`E1_VARIANTS`):
``finetuned_generic`` (every marker), ``finetuned_marker_specific`` (the tiles of ``markers`` only,
scored on those tiles) and ``finetuned_marker_only`` (DAPI zeroed in training and at inference).

The notebook ``01_baseline_vs_finetune`` calls the steps in this order:

1. :func:`annotated_tiles`: validation and test tiles, and which tiles each model is scored on;
2. :func:`finetune_models`: the three fine-tunes (content-addressed cache; :func:`work_items`
   lists the same fine-tunes for a Slurm prepare array);
3. :func:`network_outputs`: one network pass per model and tile (output cache);
4. :func:`test_at_default` and :func:`per_marker`: test at the default thresholds;
5. :func:`validation_sweep` then :func:`test_at_selected`: thresholds selected on validation,
   applied once to test;
6. :func:`claim_tables`: each claim (every fine-tuned variant vs the baseline, the generic vs the
   marker-specific model on the marker's tiles) as a paired difference with its 95% t interval
   over donors (:mod:`seglab.evaluate.claims`), at the default and the selected thresholds;
7. :func:`examples`: test tiles with outlines;
8. :func:`headline`: the run's ``summary.json`` numbers (and :func:`timings`: ``timings.json``).

Every test evaluation goes through the ``record`` callable (``run.record_test_evaluation``),
once per model and configuration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from seglab.config.settings import DIAMETER_AUTO, MaskSettings, TrainSettings
from seglab.core import paths
from seglab.data import manifest as data
from seglab.data import splitset
from seglab.evaluate import claims, metrics, scoring, sweeps
from seglab.experiments.items import Item, finetune_item
from seglab.segment import dynamics, finetuning, models, output_cache

E1_VARIANTS = ("finetuned_generic", "finetuned_marker_specific", "finetuned_marker_only")
MODELS = ("baseline", *E1_VARIANTS)
# the models drawn side by side in the bar figures (the marker-specific one is scored on fewer tiles)
MAIN_MODELS = ("baseline", "finetuned_generic", "finetuned_marker_only")
# the models fine-tuned on all markers, scored again on the tiles of `markers` alone
MARKER_SUBSET_MODELS = ("baseline", "finetuned_generic")
EXAMPLE_MODELS = ("baseline", "finetuned_generic", "finetuned_marker_only")
HEADLINE_IOU = 0.5
SELECTED_BY = "validation F1 at IoU 0.5"

Record = Callable[[str, dict], object]  # run.record_test_evaluation(selected, config)


# --------------------------------------------------------------------------- work items


def e1_finetune_jobs(base: str, cohort_dir: str, *, training: TrainSettings, markers: Sequence[str],
                     cache_dir: str = finetuning.MODEL_CACHE) -> dict[str, dict]:
    """E1's three fine-tunes as :func:`finetune` keyword arguments, by model name (E1_VARIANTS):
    generic (every marker), marker-specific (the tiles of ``markers`` only) and marker-only
    (every marker, DAPI zeroed). One list for the notebook (``finetuning.finetune_many``) and
    for a Slurm array that trains them before the notebook runs."""
    common = dict(base=base, cohort_dir=cohort_dir, training=training, cache_dir=cache_dir)
    # E1 scores every model on validation itself (and E2 and E6 reuse those network passes through
    # the output cache), so training skips its own final validation pass
    return {"finetuned_generic": dict(common, variant="generic", validate=False),
            "finetuned_marker_specific": dict(common, variant="marker_specific", markers=list(markers), validate=False),
            "finetuned_marker_only": dict(common, variant="marker_only", validate=False)}


def preflight(params: dict, cohort: Callable[[], pd.DataFrame | None]) -> None:
    """Before the notebook starts (:func:`seglab.experiments.preflight`): with the cohort built, each
    of ``markers`` has annotated tiles in train (the marker-specific fine-tune), validation (its
    threshold sweep) and test (its score); otherwise the notebook would fail after fine-tuning.
    Raises ParamConflict."""
    from seglab.experiments import ParamConflict

    manifest = cohort()
    if manifest is None:
        return
    annotated = manifest[manifest["annotated"].astype(bool)]
    lacking = {m: [s for s in ("train", "val", "test") if not ((annotated["marker"] == m) & (annotated["split"] == s)).any()]
               for m in params["markers"]}
    lacking = {m: splits for m, splits in lacking.items() if splits}
    if lacking:
        have = sorted(set(annotated["marker"]))
        what = "; ".join(f"{m} has none in {'/'.join(splits)}" for m, splits in lacking.items())
        raise ParamConflict("markers", f"{list(params['markers'])}: annotated tiles of cohort {params['cohort_dir']}: "
                            f"{what} (markers with annotated tiles: {', '.join(have) or 'none'})",
                            "give markers with annotated train, validation and test tiles")


def work_items(params: dict) -> list[Item]:
    """E1's three fine-tunes as prepare items (one array task per model), from :func:`e1_finetune_jobs`."""
    jobs = e1_finetune_jobs(params["baseline_model"], params["cohort_dir"],
                            training=TrainSettings.from_params(params), markers=params["markers"])
    return [finetune_item(f"model={name}", job) for name, job in jobs.items()]


# --------------------------------------------------------------------------- 1. tiles


def marker_subset_name(model: str, markers: Sequence[str]) -> str:
    """``baseline[gfap+iba1]``: a model scored on the tiles of ``markers`` only."""
    return f"{model}[{'+'.join(markers)}]"


@dataclass
class E1Tiles:
    """The annotated validation and test tiles of E1, and what each model sees of them.

    Attributes
    ----------
    val, test : every annotated tile of the split ((2, Y, X) [DAPI, marker] images, true labels).
    markers : the markers of the marker-specific model.
    marker_tiles : {"val": tile ids, "test": tile ids} of ``markers``.
    train_diameter_px : median nucleus diameter (px) of the training annotations.
    inputs : {model: (val tiles, test tiles)} each model is segmented and scored on: every tile
        (baseline, generic), the tiles of ``markers`` (marker-specific), DAPI zeroed (marker-only).
    """

    val: splitset.SplitSet
    test: splitset.SplitSet
    markers: list[str]
    marker_tiles: dict[str, list[str]]
    train_diameter_px: float
    inputs: dict[str, tuple[splitset.SplitSet, splitset.SplitSet]]

    def counts(self) -> pd.DataFrame:
        """Annotated tiles per split (rows) and marker (columns)."""
        both = pd.concat([self.val.rows, self.test.rows], ignore_index=True)
        return pd.crosstab(both["split"], both["marker"])

    def describe(self) -> str:
        return (f"validation: {len(self.val)} tiles, test: {len(self.test)} tiles; tiles of {self.markers}: "
                f"{len(self.marker_tiles['val'])} val, {len(self.marker_tiles['test'])} test; median nucleus "
                f"diameter of the training annotations: {self.train_diameter_px:.1f} px")


def tiles_of_markers(split: splitset.SplitSet, markers: Sequence[str]) -> list[str]:
    """Tile ids of ``split`` whose marker is one of ``markers``, in the split's order."""
    return [n for n, m in zip(split.names, split.rows["marker"]) if m in markers]


def model_inputs(val: splitset.SplitSet, test: splitset.SplitSet,
                 marker_tiles: dict[str, list[str]]) -> dict[str, tuple[splitset.SplitSet, splitset.SplitSet]]:
    """{model: (val tiles, test tiles)} for :data:`MODELS` (see :class:`E1Tiles`)."""
    return {"baseline": (val, test), "finetuned_generic": (val, test),
            "finetuned_marker_specific": (splitset.take(val, marker_tiles["val"])[0],
                                          splitset.take(test, marker_tiles["test"])[0]),
            "finetuned_marker_only": (splitset.zero_dapi(val), splitset.zero_dapi(test))}


def annotated_tiles(cohort_dir: str, markers: Sequence[str]) -> E1Tiles:
    """Step 1: the annotated validation and test tiles of the cohort (split by donor) and the
    median training nucleus diameter (px; the marker-only model's diameter when the params leave
    it to the model, see :func:`mask_settings`)."""
    manifest = data.cohort_manifest(paths.resolve(cohort_dir))
    val = splitset.annotated_split(manifest, "val")
    test = splitset.annotated_split(manifest, "test")
    train_diameter_px = splitset.median_diameter_px(splitset.annotated_split(manifest, "train"))
    marker_tiles = {"val": tiles_of_markers(val, markers), "test": tiles_of_markers(test, markers)}
    return E1Tiles(val=val, test=test, markers=list(markers), marker_tiles=marker_tiles,
                   train_diameter_px=train_diameter_px, inputs=model_inputs(val, test, marker_tiles))


# --------------------------------------------------------------------------- 2. fine-tunes


@dataclass
class FineTunes:
    """E1's models. checkpoints: {fine-tuned model: weights path}; loaded: {model: Model} for
    :data:`MODELS` (baseline first); record: what ``models.json`` keeps (path, sha256, training
    tiles of each checkpoint, the training settings); losses: training loss per epoch (rows) and
    fine-tuned model (columns); seconds: wall time of the fine-tunes (about 0 when cached)."""

    checkpoints: dict[str, Path]
    loaded: dict[str, models.Model]
    record: dict
    losses: pd.DataFrame
    seconds: float


def finetune_models(params: dict, *, log: Callable | None = print) -> FineTunes:
    """Step 2: the three fine-tunes of :func:`e1_finetune_jobs` (reused from ``data/models/`` when
    cached; ``params["n_jobs"]`` at a time, ``params["torch_threads"]`` threads each), loaded."""
    t0 = time.monotonic()
    training = TrainSettings.from_params(params)
    base = params["baseline_model"]
    jobs = e1_finetune_jobs(base, params["cohort_dir"], training=training, markers=params["markers"])
    fits = finetuning.finetune_many(list(jobs.values()), n_jobs=params["n_jobs"],
                                    threads_per_job=params["torch_threads"], log=log)
    checkpoints = {name: fit["path"] for name, fit in zip(jobs, fits)}
    seconds = round(time.monotonic() - t0, 1)
    record = {"baseline": base, "training": training.as_dict(),
              **{name: finetuning.model_record(p) for name, p in checkpoints.items()}}
    loaded = {"baseline": models.load(base), **{name: models.load(p) for name, p in checkpoints.items()}}
    losses = pd.DataFrame({name: models.read_sidecar(p)["losses"]["train"] for name, p in checkpoints.items()})
    losses.index.name = "epoch"
    return FineTunes(checkpoints=checkpoints, loaded=loaded, record=record, losses=losses, seconds=seconds)


# --------------------------------------------------------------------------- 3. network outputs


def mask_settings(name: str, model: models.Model, mask: MaskSettings, train_diameter_px: float) -> MaskSettings:
    """The mask settings E1 segments model ``name`` with: ``mask`` itself, except for the
    marker-only model when ``mask.diameter_px`` is None and the model's default is to estimate the
    diameter per tile from DAPI (tiny nets): without DAPI it gets ``train_diameter_px`` (px, the
    median of the training annotations; a constant, like cpsam's)."""
    if name == "finetuned_marker_only" and mask.diameter_px is None and model.default_diameter == DIAMETER_AUTO:
        return mask.replace(diameter_px=float(train_diameter_px))
    return mask


@dataclass
class NetworkOutputs:
    """settings: {model: MaskSettings}; val / test: {model: network outputs per tile (dicts with
    ``dP``, ``cellprob``, ``niter``)}; test_masks: {model: (Y, X) labels per test tile at the
    settings}; seconds: wall time of the network passes (about 0 when cached)."""

    settings: dict[str, MaskSettings]
    val: dict[str, list[dict]]
    test: dict[str, list[dict]]
    test_masks: dict[str, list[np.ndarray]]
    seconds: float


def network_outputs(loaded: dict[str, models.Model], tiles: E1Tiles, mask: MaskSettings, *, n_jobs: int = 1,
                    threads_per_job: int | None = 1) -> NetworkOutputs:
    """Step 3: one network pass per model and tile of ``tiles.inputs`` (kept in the output cache, so
    notebooks 02-06 reuse them); masks at any threshold are rebuilt from these outputs."""
    t0 = time.monotonic()
    settings = {name: mask_settings(name, model, mask, tiles.train_diameter_px) for name, model in loaded.items()}
    # the network passes, n_jobs at a time (worker processes fill the output cache), then read back here
    output_cache.segment_cached_many([dict(model=model, split=s, mask=settings[name])
                                      for name, model in loaded.items() for s in tiles.inputs[name]],
                                     n_jobs=n_jobs, threads_per_job=threads_per_job)
    val, test, test_masks = {}, {}, {}
    for name, model in loaded.items():
        val_tiles, test_tiles = tiles.inputs[name]
        val[name] = output_cache.segment_cached(model, val_tiles, settings[name])[1]
        test_masks[name], test[name] = output_cache.segment_cached(model, test_tiles, settings[name])
    return NetworkOutputs(settings=settings, val=val, test=test, test_masks=test_masks,
                          seconds=round(time.monotonic() - t0, 1))


# --------------------------------------------------------------------------- 4. test at the default thresholds


def default_config(mask: MaskSettings) -> dict:
    """What a test evaluation at the default thresholds records: thresholds, min size (px), diameter."""
    return {"flow_threshold": mask.flow_threshold, "cellprob_threshold": mask.cellprob_threshold,
            "min_size": mask.min_size, "diameter_px": mask.diameter_px}


def tiles_column(models_: Sequence[str], markers: Sequence[str]) -> list[str]:
    """Which tiles each row's model was scored on: ``"gfap"`` (the markers, '+'-joined) or ``"all"``."""
    tag = "+".join(markers)
    return [tag if ("[" in m or m == "finetuned_marker_specific") else "all" for m in models_]


def comparison_table(evaluations: dict[str, metrics.Evaluation], iou_thresholds: Sequence[float],
                     markers: Sequence[str]) -> pd.DataFrame:
    """:func:`scoring.compare_models` at every IoU threshold (threshold-major), with the ``tiles``
    column of :func:`tiles_column` after ``model``."""
    table = pd.concat([scoring.compare_models(evaluations, th) for th in iou_thresholds], ignore_index=True)
    table.insert(1, "tiles", tiles_column(table["model"], markers))
    return table


@dataclass
class AtDefault:
    """Test at the default thresholds. evaluations: {model or ``model[markers]``: Evaluation};
    comparison: one row per model x IoU threshold (pooled ap, precision, recall, f1, counts; mean
    and SD over tiles; ``tiles``); per_image: every model's per-tile rows (``test_per_image.csv``)."""

    evaluations: dict[str, metrics.Evaluation]
    comparison: pd.DataFrame
    per_image: pd.DataFrame

    def at(self, iou: float = HEADLINE_IOU) -> pd.DataFrame:
        """The comparison rows at one IoU threshold, without the threshold column."""
        return self.comparison[np.isclose(self.comparison["threshold"], iou)].drop(columns="threshold")

    def per_image_of(self, names: Sequence[str] = MAIN_MODELS) -> pd.DataFrame:
        """The per-tile rows of the models ``names`` (for the bar figure)."""
        return scoring.per_image_long({k: self.evaluations[k] for k in names})


def test_at_default(tiles: E1Tiles, outputs: NetworkOutputs, mask: MaskSettings, iou_thresholds: Sequence[float],
                    record: Record) -> AtDefault:
    """Step 4: every model on its test tiles at the default thresholds (``mask``), recorded once per
    model as ``<model>@default_thresholds``; the models fine-tuned on all markers also on the tiles
    of ``tiles.markers`` alone (as the marker-specific model is)."""
    config = default_config(mask)
    evaluations = {}
    for name, masks in outputs.test_masks.items():
        record(f"{name}@default_thresholds", config)
        evaluations[name] = scoring.evaluate_masks(tiles.inputs[name][1], masks, thresholds=iou_thresholds)
    for name in MARKER_SUBSET_MODELS:
        sub, sub_masks = splitset.take(tiles.test, tiles.marker_tiles["test"], outputs.test_masks[name])
        evaluations[marker_subset_name(name, tiles.markers)] = scoring.evaluate_masks(sub, sub_masks,
                                                                                      thresholds=iou_thresholds)
    return AtDefault(evaluations=evaluations, comparison=comparison_table(evaluations, iou_thresholds, tiles.markers),
                         per_image=scoring.per_image_long(evaluations))


@dataclass
class PerMarker:
    """Test per marker at the default thresholds. pooled / mean: :func:`scoring.per_group_table`
    (counts summed over a marker's tiles / ratios averaged over them); bars: pooled values with the
    SD over tiles (``ap_sd``) for the bar figure; ap: pooled AP at IoU 0.5, marker x model."""

    pooled: pd.DataFrame
    mean: pd.DataFrame
    bars: pd.DataFrame
    ap: pd.DataFrame


def per_marker(default: AtDefault, names: Sequence[str] = (*MAIN_MODELS, "finetuned_marker_specific"),
               iou: float = HEADLINE_IOU) -> PerMarker:
    """Step 4b: the test tables per marker of the models ``names``."""
    chosen = {k: default.evaluations[k] for k in names}
    pooled = scoring.per_group_table(chosen, "marker", summary="pooled")
    mean = scoring.per_group_table(chosen, "marker", summary="mean_over_images")
    keys = ["model", "marker", "threshold"]
    bars = pooled.drop(columns=["ap_sd", "f1_sd"], errors="ignore").merge(mean[[*keys, "ap_sd"]], on=keys)
    ap = pooled[np.isclose(pooled["threshold"], iou)].pivot(index="marker", columns="model", values="ap")
    return PerMarker(pooled=pooled, mean=mean, bars=bars, ap=ap)


# --------------------------------------------------------------------------- 5. sweep on validation, test once


@dataclass
class ThresholdSweep:
    """The validation sweep. sweeps: {model: one row per (flow_threshold, cellprob_threshold) with
    pooled counts and ratios at IoU 0.5}; selected: {model: the row selected}; table: every sweep
    with a ``model`` column (``val_threshold_sweep.csv``); selected_table: one row per model, the
    selected thresholds and their validation metrics (``val_f1``, ...); seconds: wall time."""

    sweeps: dict[str, pd.DataFrame]
    selected: dict[str, dict]
    table: pd.DataFrame
    selected_table: pd.DataFrame
    seconds: float


def selected_table(selected: dict[str, dict]) -> pd.DataFrame:
    """One row per model: selected thresholds, then val_f1, val_ap, val_precision, val_recall."""
    scores = ("f1", "ap", "precision", "recall")
    table = pd.DataFrame([{"model": k, **{c: v[c] for c in ("flow_threshold", "cellprob_threshold", *scores)}}
                          for k, v in selected.items()])
    return table.rename(columns={c: f"val_{c}" for c in scores})


def validation_sweep(tiles: E1Tiles, outputs: NetworkOutputs, flow_thresholds: Sequence[float],
                     cellprob_thresholds: Sequence[float]) -> ThresholdSweep:
    """Step 5: per model, pooled precision, recall, F1 and AP@0.5 on its validation tiles over
    ``flow_thresholds`` x ``cellprob_thresholds`` (masks rebuilt from the outputs, no network pass);
    the best by validation F1 is selected (ties: nearest the default thresholds)."""
    t0 = time.monotonic()
    found, selected = {}, {}
    for name, outs in outputs.val.items():
        mask = outputs.settings[name]
        sw = sweeps.threshold_sweep(tiles.inputs[name][0], outs, flow_thresholds, cellprob_thresholds, mask)
        found[name] = sw.assign(model=name)
        selected[name] = sweeps.select_best(sw, "f1", prefer={"flow_threshold": mask.flow_threshold,
                                                              "cellprob_threshold": mask.cellprob_threshold})
    return ThresholdSweep(sweeps=found, selected=selected, table=pd.concat(found.values(), ignore_index=True),
                          selected_table=selected_table(selected), seconds=round(time.monotonic() - t0, 1))


@dataclass
class AtSelected:
    """Test at the validation-selected thresholds. masks: {model: labels per test tile};
    evaluations: {model: Evaluation}; table: the selected thresholds with validation F1/AP and test
    AP/F1 before (default) and after (``test_<metric>_selected``), one row per model."""

    masks: dict[str, list[np.ndarray]]
    evaluations: dict[str, metrics.Evaluation]
    table: pd.DataFrame


def selected_vs_default(sweep: ThresholdSweep, default: AtDefault, after: pd.DataFrame) -> pd.DataFrame:
    """``sweep.selected_table`` joined with each model's test AP and F1 at the default thresholds
    (``test_ap_default``, ``test_f1_default``) and its test scores at the selected ones (``after``:
    :func:`scoring.compare_models` rows; ``test_<metric>_selected``), all at IoU 0.5."""
    comparison = default.comparison
    before = comparison[np.isclose(comparison["threshold"], HEADLINE_IOU) & comparison["model"].isin(list(after["model"]))]
    before = before[["model", "ap", "f1"]].rename(columns={"ap": "test_ap_default", "f1": "test_f1_default"})
    after = after[["model", "ap", "precision", "recall", "f1"]].rename(
        columns=lambda c: c if c == "model" else f"test_{c}_selected")
    return sweep.selected_table.merge(before, on="model").merge(after, on="model")


def test_at_selected(tiles: E1Tiles, outputs: NetworkOutputs, sweep: ThresholdSweep, default: AtDefault,
                     iou_thresholds: Sequence[float], record: Record) -> AtSelected:
    """Step 5b: each model's validation-selected thresholds applied once to its test tiles
    (recorded as ``<model>@val_selected_thresholds``), masks rebuilt from the saved outputs."""
    masks, evaluations = {}, {}
    for name, outs in outputs.test.items():
        chosen = {k: float(sweep.selected[name][k]) for k in ("flow_threshold", "cellprob_threshold")}
        mask = outputs.settings[name].replace(**chosen)
        record(f"{name}@val_selected_thresholds", {**chosen, "min_size": mask.min_size, "selected_by": SELECTED_BY})
        masks[name] = dynamics.masks_at(outs, mask)
        evaluations[name] = scoring.evaluate_masks(tiles.inputs[name][1], masks[name], thresholds=iou_thresholds)
    after = scoring.compare_models(evaluations, HEADLINE_IOU)
    return AtSelected(masks=masks, evaluations=evaluations, table=selected_vs_default(sweep, default, after))


# --------------------------------------------------------------------------- 6. claims with their intervals


def claim_pairs(markers: Sequence[str]) -> list[tuple[str, str]]:
    """The (A, B) comparisons E1 claims, B - A: each fine-tuned variant vs the baseline on every
    test tile, and the marker-specific model vs the baseline and vs the generic model on the tiles
    of ``markers`` (``model[markers]`` rows)."""
    return [("baseline", "finetuned_generic"), ("baseline", "finetuned_marker_only"),
            (marker_subset_name("baseline", markers), "finetuned_marker_specific"),
            (marker_subset_name("finetuned_generic", markers), "finetuned_marker_specific")]


def with_marker_subsets(per_image: pd.DataFrame, markers: Sequence[str]) -> pd.DataFrame:
    """``per_image`` (``scoring.per_image_long`` rows) plus, where absent, the ``model[markers]`` rows
    of :data:`MARKER_SUBSET_MODELS`: their rows on the tiles of ``markers`` (the same per-tile counts
    :func:`test_at_default` scores those subsets with)."""
    extra = [per_image[(per_image["model"] == m) & per_image["marker"].isin(list(markers))]
             .assign(model=marker_subset_name(m, markers)) for m in MARKER_SUBSET_MODELS
             if marker_subset_name(m, markers) not in set(per_image["model"])]
    return pd.concat([per_image, *extra], ignore_index=True)


@dataclass
class Claims:
    """E1's claims. table: :func:`seglab.evaluate.claims.compare_pairs` rows of :func:`claim_pairs`
    (difference B - A in pooled ap, f1, precision, recall at each IoU threshold, with ci_low,
    ci_high, p_value, n_donors; fractions) and a ``thresholds`` column: ``default`` or
    ``selected`` (the validation-selected ones); interval: which interval, in words."""

    table: pd.DataFrame
    interval: str

    def of(self, thresholds: str = "default") -> pd.DataFrame:
        """The rows at the default or the selected thresholds."""
        return self.table[self.table["thresholds"] == thresholds]

    def shown(self, iou: float = HEADLINE_IOU) -> pd.DataFrame:
        """The AP rows at IoU ``iou``, readable: thresholds, a, b, the two pooled APs, the difference
        B - A, its interval, the p-value, donors and tiles, and whether the claim "B beats A" holds."""
        t = self.table[(self.table["metric"] == "ap") & np.isclose(self.table["threshold"], iou)]
        t = t[["thresholds", "a", "b", "estimate_a", "estimate_b", "difference", "ci_low", "ci_high", "p_value",
               "n_donors", "n_tiles"]]
        return t.assign(b_beats_a=[claims.claim_holds(lo, hi) for lo, hi in zip(t["ci_low"], t["ci_high"])])


def claim_tables(default: AtDefault, selected: AtSelected | None, markers: Sequence[str], **options) -> Claims:
    """Step 6: the paired, donor-clustered comparisons of :func:`claim_pairs` on the test tiles, at
    the default thresholds and (``selected`` given) at the validation-selected ones. A pair whose
    model has no tiles gives NaN rows (no claim). ``options``: :func:`seglab.evaluate.claims.compare`'s."""
    pairs = claim_pairs(markers)
    tables = [claims.compare_pairs(default.per_image, pairs, missing="nan", **options).assign(thresholds="default")]
    if selected is not None:
        per_image = with_marker_subsets(scoring.per_image_long(selected.evaluations), markers)
        tables.append(claims.compare_pairs(per_image, pairs, missing="nan", **options).assign(thresholds="selected"))
    table = pd.concat(tables, ignore_index=True)
    return Claims(table=table, interval=claims.interval_label(table))


# --------------------------------------------------------------------------- 7. examples


@dataclass
class Examples:
    """Test tiles to draw: images (2, Y, X), truths (Y, X) labels, preds {model: labels per tile}
    at the validation-selected thresholds, labels ("tile (marker)")."""

    images: list[np.ndarray]
    truths: list[np.ndarray]
    preds: dict[str, list[np.ndarray]]
    labels: list[str]


def examples(tiles: E1Tiles, default: AtDefault, selected: AtSelected, n: int,
             names: Sequence[str] = EXAMPLE_MODELS) -> Examples:
    """Step 6: ``n`` test tiles across the range of the generic model's AP@0.5 (worst, middle,
    best; one marker each where possible), with the masks of the models ``names``."""
    picked = scoring.pick_examples(default.evaluations["finetuned_generic"].per_image, n, "ap", HEADLINE_IOU,
                                   by="marker")
    sub, *masks = splitset.take(tiles.test, picked, *[selected.masks[k] for k in names])
    return Examples(images=sub.images, truths=sub.masks, preds=dict(zip(names, masks)),
                    labels=[f"{t} ({m})" for t, m in zip(sub.names, sub.rows["marker"])])


# --------------------------------------------------------------------------- 8. headline numbers


def claim_numbers(found: Claims, markers: Sequence[str]) -> dict:
    """The summary keys of each claim (:func:`seglab.evaluate.claims.claim_summary`, AP@0.5):
    ``test_ap50_diff_<b>_vs_<a>`` with ``_ci_low``, ``_ci_high``, ``_p_value``, ``_n_donors`` (and
    ``_note`` with fewer than 3 donors) beside the flag ``<b>_beats_<a>``; the same with the suffix
    ``_selected`` at the selected thresholds; ``claims_interval`` (which interval) and
    ``headline_claim`` (the status page shows it first)."""
    numbers = {}
    for which, suffix in (("default", ""), ("selected", "_selected")):
        table = found.of(which)
        if not table.empty:
            for a, b in claim_pairs(markers):
                numbers.update(claims.claim_summary(table, a, b, prefix="test_ap50", suffix=suffix,
                                                    threshold=HEADLINE_IOU))
    return {**numbers, "claims_interval": found.interval, "headline_claim": "finetuned_generic_beats_baseline"}


def headline(comparison: pd.DataFrame, selected: pd.DataFrame, markers: Sequence[str], n_test_tiles: int,
             found: Claims) -> dict:
    """The run's summary numbers.

    Parameters
    ----------
    comparison : :attr:`AtDefault.comparison` (rows at IoU 0.5 and 0.75 needed).
    selected : :attr:`AtSelected.table`; its models are the ones reported.
    markers : the marker-specific model's markers (``model[markers]`` rows of ``comparison``).
    n_test_tiles : annotated test tiles.
    found : :func:`claim_tables`.

    Returns
    -------
    dict: per model ``test_{ap50,precision,recall,f1,ap75}_<model>`` (pooled, default thresholds),
    ``test_ap50_<model>_selected``, ``val_f1_selected_<model>``, ``{flow,cellprob}_threshold_selected_<model>``;
    ``test_ap50_<model>_<markers>`` for :data:`MARKER_SUBSET_MODELS`; ``n_test_tiles``; the claims of
    :func:`claim_numbers`. ``finetuned_generic_beats_baseline`` is True only when the 95% interval
    of the AP@0.5 difference lies above 0 (before this, it compared the two point estimates).
    Fractions rounded to 4 decimals.
    """
    ap50 = comparison[np.isclose(comparison["threshold"], 0.5)].set_index("model")
    ap75 = comparison[np.isclose(comparison["threshold"], 0.75)].set_index("model")
    numbers = {}
    for _, s in selected.iterrows():
        name = s["model"]
        for metric, key in (("ap", "ap50"), ("precision", "precision"), ("recall", "recall"), ("f1", "f1")):
            numbers[f"test_{key}_{name}"] = round(float(ap50.at[name, metric]), 4)
        numbers[f"test_ap75_{name}"] = round(float(ap75.at[name, "ap"]), 4)
        numbers[f"test_ap50_{name}_selected"] = round(float(s["test_ap_selected"]), 4)
        numbers[f"val_f1_selected_{name}"] = round(float(s["val_f1"]), 4)
        numbers[f"flow_threshold_selected_{name}"] = float(s["flow_threshold"])
        numbers[f"cellprob_threshold_selected_{name}"] = float(s["cellprob_threshold"])
    for name in MARKER_SUBSET_MODELS:
        numbers[f"test_ap50_{name}_{'_'.join(markers)}"] = round(float(ap50.at[marker_subset_name(name, markers), "ap"]), 4)
    numbers["n_test_tiles"] = int(n_test_tiles)
    return {**numbers, **claim_numbers(found, markers)}


def timings(fits: FineTunes, outputs: NetworkOutputs, sweep: ThresholdSweep, started: float) -> dict:
    """``timings.json``: seconds of the fine-tunes, network passes and sweep, and since ``started``
    (a ``time.monotonic()`` reading at the notebook's start)."""
    return {"finetune_s": fits.seconds, "inference_s": outputs.seconds, "sweep_s": sweep.seconds,
            "total_s": round(time.monotonic() - started, 1)}
