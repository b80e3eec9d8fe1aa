"""E4 sensitivity: how much AP and cell counts move with the settings of inference.

Notebook ``04_sensitivity`` calls these steps in order, on the annotated **validation** tiles
(the test split stays untouched):

1. :func:`validation_tiles`, :func:`model_specs` (E1's fine-tuned generic model from the model
   cache, and the baseline), :func:`model_records`, :func:`load_models`;
2. :func:`network_outputs`: one network pass per model, from the content-addressed output cache
   that E1 fills (so nothing is recomputed after E1);
3. from the saved outputs (no rerun): :func:`flow_cellprob_grid` (both thresholds together) and
   :func:`outputs_sensitivity_table` (one setting at a time: flow_threshold, cellprob_threshold,
   min_size, niter);
4. with a network rerun: :func:`rerun_tiles` (``rerun_n_tiles`` validation tiles, seeded, per marker)
   and :func:`rerun_table` (diameter factor, tile overlap, test-time augmentation; first model only);
5. :func:`sensitivity_ranges` (the range of AP and of predicted / true cells per setting),
   :func:`range_claims` (the range of AP per setting with its interval, a bootstrap of donors then
   tiles, and the p-value of "the setting changes nothing", from the per-tile rows the steps 3-4
   return with ``per_image=True``) and :func:`headline` (the numbers of ``summary.json``).

The base mask settings are the notebook's ``run.mask`` (:class:`~seglab.config.settings.MaskSettings`).
E4 has no ``work_items``: its only heavy work, the generic fine-tune, is E1's work item
(:func:`seglab.experiments.items.reference_generic`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from seglab.config.settings import MaskSettings
from seglab.core import paths
from seglab.data import manifest as data
from seglab.data import splitset
from seglab.evaluate import claims, sweeps
from seglab.experiments.items import reference_generic
from seglab.segment import dynamics, finetuning, models, output_cache

BASELINE = "baseline"
FINETUNED = "finetuned_generic"
# where rerun_sensitivity's defaults stand (dotted lines in the rerun figure)
RERUN_MARKS = {"diameter_factor": 1.0, "tile_overlap": 0.1}


def preflight(params: Mapping, cohort: Callable) -> None:
    """Before the notebook starts (:func:`seglab.experiments.preflight`): every niter of the sweep is
    >= 1 and every diameter factor > 0, values the schema allows but the mask settings refuse (the
    notebook would fail halfway through the sweep). Needs no cohort. Raises ParamConflict."""
    from seglab.experiments import ParamConflict

    bad = [n for n in params["sens_niters"] if n < 1]
    if bad:
        raise ParamConflict("sens_niters", f"{params['sens_niters']}: {bad} are not >= 1 dynamics steps",
                            "give niter values >= 1")
    bad = [f for f in params["sens_diameter_factors"] if not f > 0]
    if bad:
        raise ParamConflict("sens_diameter_factors", f"{params['sens_diameter_factors']}: {bad} are not > 0 "
                            "(the diameter handed to the model is factor x its default)", "give factors > 0, e.g. 0.7")


def validation_tiles(params: Mapping) -> splitset.SplitSet:
    """The annotated validation tiles of ``params['cohort_dir']`` (tile_id order)."""
    manifest = data.cohort_manifest(paths.resolve(params["cohort_dir"]))
    return splitset.annotated_split(manifest, "val")


def model_specs(params: Mapping, *, log: Callable = print) -> dict[str, str]:
    """The models of ``params['sens_models']``, in that order: model name -> spec or checkpoint path.

    ``finetuned_generic`` is E1's generic fine-tune, the same cache entry (trained here only when
    absent, with the shared training settings)."""
    specs = {BASELINE: str(params["baseline_model"])}
    if FINETUNED in params["sens_models"]:
        specs[FINETUNED] = str(finetuning.finetune(**reference_generic(params), log=log))
    return {name: specs[name] for name in params["sens_models"]}


def model_records(specs: Mapping[str, str]) -> dict:
    """What the run records of each model (``models.json``): the checkpoint's path, sha256 and training
    record, or ``{"spec": ...}`` for the baseline."""
    return {name: {"spec": spec} if name == BASELINE else finetuning.model_record(spec)
            for name, spec in specs.items()}


def load_models(specs: Mapping[str, str]) -> dict:
    """Model name -> loaded :class:`seglab.segment.models.Model`."""
    return {name: models.load(spec) for name, spec in specs.items()}


def network_outputs(loaded: Mapping, split: splitset.SplitSet, mask: MaskSettings) -> dict[str, dynamics.MaskMemo]:
    """Model name -> the network outputs on ``split`` at ``mask``'s diameter (from the output cache,
    else one pass), as a :class:`~seglab.segment.dynamics.MaskMemo` that the sweeps share."""
    return {name: dynamics.MaskMemo(output_cache.segment_cached(model, split, mask)[1])
            for name, model in loaded.items()}


def n_true_objects(split: splitset.SplitSet) -> int:
    """Number of true objects over every tile of ``split``."""
    return int(sum(len(np.unique(t)) - 1 for t in split.masks))


def flow_cellprob_grid(split: splitset.SplitSet, memos: Mapping[str, dynamics.MaskMemo], params: Mapping,
                       mask: MaskSettings) -> pd.DataFrame:
    """Pooled scores at IoU 0.5 for every (flow_threshold, cellprob_threshold) of ``params``'
    ``sens_flow_thresholds`` x ``sens_cellprob_thresholds`` and every model, other settings at ``mask``.

    One row per model and pair: :func:`seglab.evaluate.sweeps.threshold_sweep`'s columns, model,
    count_ratio (predicted / true cells over the split)."""
    heat = pd.concat([sweeps.threshold_sweep(split, memo, params["sens_flow_thresholds"],
                                             params["sens_cellprob_thresholds"], mask).assign(model=name)
                      for name, memo in memos.items()], ignore_index=True)
    heat["count_ratio"] = heat["n_pred"] / n_true_objects(split)
    return heat


def outputs_grid(params: Mapping) -> dict[str, list]:
    """The mask settings moved from saved outputs, with their values: {parameter: values}."""
    return {"flow_threshold": params["sens_flow_thresholds"], "cellprob_threshold": params["sens_cellprob_thresholds"],
            "min_size": params["sens_min_sizes"], "niter": params["sens_niters"]}


def rerun_grid(params: Mapping) -> dict[str, list]:
    """The network-pass settings moved by rerunning the network: {parameter: values}."""
    return {"diameter_factor": params["sens_diameter_factors"], "tile_overlap": params["sens_tile_overlaps"],
            "augment": params["sens_augment"]}


def _with_model(results: Mapping[str, object], per_image: bool):
    """{model: table or (table, tiles)} stacked with a model column: a table, or (table, tiles)."""
    if not per_image:
        return pd.concat([t.assign(model=name) for name, t in results.items()], ignore_index=True)
    tables, tiles = zip(*[(t.assign(model=name), tl.assign(model=name)) for name, (t, tl) in results.items()])
    return pd.concat(tables, ignore_index=True), pd.concat(tiles, ignore_index=True)


def outputs_sensitivity_table(split: splitset.SplitSet, memos: Mapping[str, dynamics.MaskMemo], params: Mapping,
                              mask: MaskSettings, *, per_image: bool = False):
    """One setting of :func:`outputs_grid` moved at a time, the others at ``mask``, for every model:
    :func:`seglab.evaluate.sweeps.outputs_sensitivity`'s rows with a model column. ``per_image``:
    ``(table, tiles)``, tiles = every tile's counts per setting and model (for :func:`range_claims`)."""
    grid = outputs_grid(params)
    return _with_model({name: sweeps.outputs_sensitivity(split, memo, grid, mask, per_image=per_image)
                        for name, memo in memos.items()}, per_image)


def stored_niters(memos: Mapping[str, dynamics.MaskMemo]) -> list[int]:
    """The dynamics steps (niter) the first model's network pass used, over its tiles (sorted, unique)."""
    first = next(iter(memos.values()))
    return sorted({int(o["niter"]) for o in first.outputs})


def outputs_marks(mask: MaskSettings, memos: Mapping[str, dynamics.MaskMemo]) -> dict:
    """Where the base settings stand on each panel of the outputs figure: ``mask``'s thresholds and min
    size, and niter when the network pass used one niter on every tile (None otherwise)."""
    used = stored_niters(memos)
    base = {k: v for k, v in mask.as_dict().items() if k in sweeps.OUTPUT_PARAMS and v is not None}
    return {**base, "niter": used[0] if len(used) == 1 else None}


def rerun_tiles(split: splitset.SplitSet, params: Mapping) -> splitset.SplitSet:
    """``params['rerun_n_tiles']`` tiles of ``split`` (all with None), drawn per marker with ``params['seed']``."""
    return splitset.subset(split, n=params["rerun_n_tiles"], seed=params["seed"])


def rerun_table(loaded: Mapping, tiles: splitset.SplitSet, params: Mapping, mask: MaskSettings, *,
                per_image: bool = False):
    """The network reruns of :func:`rerun_grid` on ``tiles`` for the first model of ``params['sens_models']``:
    :func:`seglab.evaluate.sweeps.rerun_sensitivity`'s rows (with seconds) and a model column.
    ``mask``'s diameter is what factor 1.0 stands for. ``per_image``: ``(table, tiles)`` as
    :func:`outputs_sensitivity_table`."""
    first = params["sens_models"][0]
    result = sweeps.rerun_sensitivity(loaded[first], tiles, rerun_grid(params), mask, per_image=per_image)
    return _with_model({first: result}, per_image)


def sensitivity_ranges(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per model and setting: min, max and range of AP and of count_ratio over the values tried, and the
    number of values; rows sorted by model, then AP range (largest first)."""
    rows = pd.concat(list(tables), ignore_index=True)
    ranges = (rows.groupby(["model", "parameter"])
              .agg(ap_min=("ap", "min"), ap_max=("ap", "max"), count_ratio_min=("count_ratio", "min"),
                   count_ratio_max=("count_ratio", "max"), n_values=("value", "size")).reset_index())
    ranges["ap_range"] = ranges["ap_max"] - ranges["ap_min"]
    ranges["count_ratio_range"] = ranges["count_ratio_max"] - ranges["count_ratio_min"]
    return ranges.sort_values(["model", "ap_range"], ascending=[True, False])


IOU = 0.5   # the ranges with intervals are of AP at this IoU threshold
RANGE_COLUMNS = ["model", "parameter", "metric", "threshold", "n_settings", "setting_min", "setting_max",
                 "estimate_min", "estimate_max", "range", "ci_low", "ci_high", "ci_level", "p_value", "n_donors",
                 "n_tiles", "method", "note"]


def _one_range(sub: pd.DataFrame, options: Mapping) -> pd.DataFrame:
    """:func:`seglab.evaluate.claims.grid_range` of one model and parameter at IoU 0.5; no interval
    (NaN) with one donor, where it could only resample tiles and would ignore the donors."""
    table = claims.grid_range(sub, setting="value", thresholds=(IOU,), **options)
    note = claims.interval_note(int(table["n_donors"].iloc[0]))
    if int(table["n_donors"].iloc[0]) < 2:
        table[["ci_low", "ci_high"]] = float("nan")
    return table.assign(note=note)


def range_claims(tiles: Sequence[pd.DataFrame], **options) -> pd.DataFrame:
    """Per model and setting with at least two values: the range (max - min over the values tried)
    of pooled ap, f1, precision, recall at IoU 0.5 with its interval (a bootstrap of donors, then
    tiles within donors, percentile) and the p-value of "the setting changes nothing" (values
    permuted within donors): :func:`seglab.evaluate.claims.grid_range`, rows :data:`RANGE_COLUMNS`.

    ``tiles``: the per-tile tables of :func:`outputs_sensitivity_table` and :func:`rerun_table`
    (``per_image=True``). ``options``: grid_range's (n_resamples, n_permutations, seed, ...).
    """
    rows = pd.concat(list(tiles), ignore_index=True)
    out = [_one_range(sub, options).assign(model=model, parameter=param)
           for (model, param), sub in rows.groupby(["model", "parameter"], sort=False)
           if sub["value"].astype(str).nunique() > 1]
    if not out:
        return pd.DataFrame(columns=RANGE_COLUMNS)
    return pd.concat(out, ignore_index=True)[RANGE_COLUMNS]


def _range_numbers(name: str, found: pd.DataFrame) -> dict:
    """``val_ap50_range_<setting>_<model>_ci_low`` / ``_ci_high`` / ``_p_value`` / ``_n_donors`` of
    :func:`range_claims` at AP@0.5 (and ``_note`` under 3 donors), 4 decimals."""
    rows = found[(found["model"] == name) & (found["metric"] == "ap") & np.isclose(found["threshold"], IOU)]
    numbers = {}
    for _, r in rows.iterrows():
        key = f"val_ap50_range_{r['parameter']}_{name}"
        numbers.update({f"{key}_ci_low": round(float(r["ci_low"]), 4), f"{key}_ci_high": round(float(r["ci_high"]), 4),
                        f"{key}_p_value": round(float(r["p_value"]), 4), f"{key}_n_donors": int(r["n_donors"])})
        if r["note"]:
            numbers[f"{key}_note"] = r["note"]
    return numbers


def _model_numbers(name: str, lines: pd.DataFrame, heat: pd.DataFrame, ranges: pd.DataFrame,
                   flow_threshold: float) -> dict:
    """The headline numbers of one model (see :func:`headline`)."""
    numbers = {}
    at_default = lines[(lines["model"] == name) & (lines["parameter"] == "flow_threshold")
                       & np.isclose(lines["value"].astype(float), flow_threshold)]
    if len(at_default):
        numbers[f"val_ap50_{name}"] = round(float(at_default["ap"].iloc[0]), 4)
        numbers[f"val_count_ratio_{name}"] = round(float(at_default["count_ratio"].iloc[0]), 4)
    r = ranges[ranges["model"] == name].set_index("parameter")
    for p in r.index:
        numbers[f"val_ap50_range_{p}_{name}"] = round(float(r.at[p, "ap_range"]), 4)
        numbers[f"val_count_ratio_range_{p}_{name}"] = round(float(r.at[p, "count_ratio_range"]), 4)
    numbers[f"val_ap50_best_grid_{name}"] = round(float(heat.loc[heat["model"] == name, "ap"].max()), 4)
    return numbers


def headline(model_names: Sequence[str], lines: pd.DataFrame, heat: pd.DataFrame, ranges: pd.DataFrame,
             mask: MaskSettings, n_rerun_tiles: int, found: pd.DataFrame | None = None) -> dict:
    """The run's summary numbers, per model (4 decimals): ``val_ap50_<model>`` and ``val_count_ratio_<model>``
    (pooled AP@0.5 and predicted / true cells at ``mask``'s settings), ``val_ap50_range_<setting>_<model>``
    and ``val_count_ratio_range_<setting>_<model>`` (:func:`sensitivity_ranges`), ``val_ap50_best_grid_<model>``
    (the best AP of the threshold grid); and ``rerun_n_tiles``. With ``found`` (:func:`range_claims`):
    each AP range's ``_ci_low``, ``_ci_high``, ``_p_value``, ``_n_donors`` and ``claims_interval``."""
    numbers = {}
    for name in model_names:
        numbers.update(_model_numbers(name, lines, heat, ranges, mask.flow_threshold))
        if found is not None:
            numbers.update(_range_numbers(name, found))
    numbers["rerun_n_tiles"] = int(n_rerun_tiles)
    if found is not None and len(found):
        numbers["claims_interval"] = claims.interval_label(found)
    return numbers
