"""E3, post-processing gates: do an intensity-quantile gate and a minimum-area gate remove false
positives (lipofuscin puncta, dim background texture) without losing true nuclei?

The gates are :mod:`seglab.segment.postprocess`'s; the predictions are those of E1's baseline and
fine-tuned generic model at the default thresholds (models and network outputs from the caches
that notebook 01 filled). The notebook ``03_gating`` calls the steps in this order:

1. :func:`gate_space`: the grid of gates from the params (areas in px, or um^2 with a pixel size);
2. :func:`annotated_tiles`, :func:`gate_models`, :func:`predictions`: the tiles and masks gated;
3. :func:`validation_instances`: every predicted instance on validation, matched or not;
4. :func:`gate_sweep`: the grid scored on validation, the best gate per model selected;
5. :func:`test_before_after`: the selected gates applied once to test (pooled and per tile);
6. :func:`gate_claims`: gated vs ungated per model, the paired AP difference with its 95% t
   interval over donors (:mod:`seglab.evaluate.claims`);
7. :func:`headline`: the run's ``summary.json`` numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from seglab.config.settings import MaskSettings
from seglab.core import paths
from seglab.data import manifest as data
from seglab.data import splitset
from seglab.evaluate import claims, scoring, sweeps
from seglab.experiments.items import reference_generic
from seglab.segment import finetuning, models, output_cache, postprocess

GATE_MODELS = ("baseline", "finetuned_generic")
IOU = 0.5
SELECTED_BY = "validation F1 at IoU 0.5"
SHOWN_COLUMNS = ("model", "gate", "q_low", "q_high", "min_area_px", "min_area_um2", "tp", "fp", "fn", "precision",
                 "recall", "f1", "ap")

Record = Callable[[str, dict], object]  # run.record_test_evaluation(selected, config)


# --------------------------------------------------------------------------- 1. the gates


@dataclass(frozen=True)
class GateSpace:
    """The gates E3 scores: every (q_low, q_high, minimum area) with q_low <= q_high.

    q_lows, q_highs : intensity quantiles (fractions 0-1 over a tile's predicted instances).
    min_areas : minimum instance areas, in ``area_unit`` ('px', or 'um2' when ``pixel_size_um`` is given).
    channel : the channel whose instance mean intensity the quantile gate reads (1 = marker).
    pixel_size_um : micrometres per pixel, or None.
    """

    q_lows: tuple[float, ...]
    q_highs: tuple[float, ...]
    min_areas: tuple[float, ...]
    area_unit: str
    channel: int
    pixel_size_um: float | None

    @property
    def area_column(self) -> str:
        return postprocess.area_column(self.area_unit)

    def grid(self) -> list[postprocess.Gate]:
        return postprocess.gate_grid(self.q_lows, self.q_highs, self.min_areas, area_unit=self.area_unit)

    def describe(self) -> str:
        where = (f" (pixel size {self.pixel_size_um} um)" if self.pixel_size_um
                 else " (no pixel size given: areas in px)")
        return f"area gate in {self.area_unit}: {list(self.min_areas)}{where}"


def gate_space(params: dict) -> GateSpace:
    """Step 1: the gate grid of the params; areas in um^2 (``gate_min_areas_um2``) when
    ``pixel_size_um`` is given, else in px (``gate_min_areas_px``)."""
    pixel_size_um = params["pixel_size_um"]
    areas = params["gate_min_areas_um2"] if pixel_size_um else params["gate_min_areas_px"]
    return GateSpace(q_lows=tuple(params["gate_q_lows"]), q_highs=tuple(params["gate_q_highs"]),
                     min_areas=tuple(areas), area_unit="um2" if pixel_size_um else "px",
                     channel=int(params["gate_channel"]), pixel_size_um=pixel_size_um)


def preflight(params: dict, cohort: Callable) -> None:
    """Before the notebook starts (:func:`seglab.experiments.preflight`): quantiles are fractions in
    [0, 1], minimum areas are >= 0, and some q_low <= q_high, so the grid has a gate (the notebook
    would fail only at the gate sweep, after predicting every tile). Needs no cohort. Raises ParamConflict."""
    from seglab.experiments import ParamConflict

    for key in ("gate_q_lows", "gate_q_highs"):
        bad = [q for q in params[key] if not 0.0 <= q <= 1.0]
        if bad:
            raise ParamConflict(key, f"{params[key]}: {bad} are not fractions in [0, 1]",
                                "give quantiles as fractions (0.05, not 5)")
    area_key = "gate_min_areas_um2" if params["pixel_size_um"] else "gate_min_areas_px"
    if any(a < 0 for a in params[area_key]):
        raise ParamConflict(area_key, f"{params[area_key]}: minimum areas must be >= 0", "drop the negative areas")
    if not gate_space(params).grid():
        raise ParamConflict("gate_q_highs", f"{params['gate_q_highs']}: every value is below every gate_q_lows value "
                            f"{params['gate_q_lows']}, so the grid has no gate (a gate needs q_low <= q_high)",
                            "give q_highs at or above some q_low (1.0 = no upper gate)", also=["gate_q_lows"])


# --------------------------------------------------------------------------- 2. tiles, models, masks


@dataclass
class Tiles:
    """The annotated validation (selection) and test (once) tiles."""

    val: splitset.SplitSet
    test: splitset.SplitSet


def annotated_tiles(cohort_dir: str) -> Tiles:
    """Step 2: the cohort's annotated validation and test tiles (split by donor)."""
    manifest = data.cohort_manifest(paths.resolve(cohort_dir))
    return Tiles(val=splitset.annotated_split(manifest, "val"), test=splitset.annotated_split(manifest, "test"))


def gate_models(params: dict, *, log: Callable | None = print) -> dict[str, str | Path]:
    """{model: spec or checkpoint} of ``params["gate_models"]``, baseline first: the baseline spec
    and E1's fine-tuned generic model (the same cache entry; trained here only if 01 did not run)."""
    specs: dict[str, str | Path] = {"baseline": params["baseline_model"]}
    if "finetuned_generic" in params["gate_models"]:
        specs["finetuned_generic"] = finetuning.finetune(**reference_generic(params), log=log)
    return {k: v for k, v in specs.items() if k in params["gate_models"]}


def models_record(specs: dict[str, str | Path]) -> dict:
    """``models.json``: the baseline's spec, each checkpoint's path, sha256 and training tiles."""
    return {k: (finetuning.model_record(v) if k != "baseline" else {"spec": v}) for k, v in specs.items()}


def predictions(specs: dict[str, str | Path], tiles: Tiles, mask: MaskSettings) -> dict[str, dict[str, list]]:
    """{model: {"val": labels per tile, "test": labels per tile}} at ``mask`` (network outputs from
    the output cache when E1 made them)."""
    preds = {}
    for name, spec in specs.items():
        model = models.load(spec)
        preds[name] = {"val": output_cache.segment_cached(model, tiles.val, mask)[0],
                       "test": output_cache.segment_cached(model, tiles.test, mask)[0]}
    return preds


# --------------------------------------------------------------------------- 3-4. validation


def validation_instances(val: splitset.SplitSet, preds: dict, space: GateSpace) -> dict[str, pd.DataFrame]:
    """Step 3: {model: one row per predicted validation instance (area_px, mean_intensity in
    ``space.channel``, ``matched`` = a true positive at IoU 0.5, ...)}, before any gate."""
    no_gate = postprocess.Gate()
    return {name: postprocess.gate_split(val, p["val"], no_gate, channel=space.channel,
                                         pixel_size_um=space.pixel_size_um)[1] for name, p in preds.items()}


@dataclass
class GateSweep:
    """The gate grid on validation. sweeps: {model: one row per gate (its fields, pooled tp, fp,
    fn, precision, recall, f1, ap at IoU 0.5, n_removed)}; selected: {model: the selected row};
    table: every sweep with a ``model`` column (``val_gate_sweep.csv``); selected_table: one row
    per selected gate; n_gates; seconds: wall time."""

    sweeps: dict[str, pd.DataFrame]
    selected: dict[str, dict]
    table: pd.DataFrame
    selected_table: pd.DataFrame
    n_gates: int
    seconds: float

    def describe(self) -> str:
        return f"gate grid: {self.n_gates} gates x {len(self.sweeps)} models in {self.seconds:.1f} s"


def gate_sweep(val: splitset.SplitSet, preds: dict, space: GateSpace) -> GateSweep:
    """Step 4: every gate of ``space`` on each model's validation masks; the gate with the best
    pooled F1 at IoU 0.5 is selected (ties: the mildest gate, nearest no gate at all)."""
    t0 = time.monotonic()
    grid = space.grid()
    found, selected = {}, {}
    mildest = {"q_low": 0.0, "q_high": 1.0, space.area_column: 0.0}
    for name, p in preds.items():
        items = postprocess.gate_items(val, p["val"], space.channel)
        found[name] = postprocess.sweep_gates(items, grid, IOU, space.pixel_size_um)
        selected[name] = sweeps.select_best(found[name], "f1", prefer=mildest)
    table = pd.concat([s.assign(model=k) for k, s in found.items()], ignore_index=True)
    columns = ("q_low", "q_high", space.area_column, "precision", "recall", "f1", "fp")
    chosen = pd.DataFrame([{"model": k, **{c: v[c] for c in columns}} for k, v in selected.items()])
    return GateSweep(sweeps=found, selected=selected, table=table, selected_table=chosen, n_gates=len(grid),
                     seconds=round(time.monotonic() - t0, 1))


# --------------------------------------------------------------------------- 5. test, once


@dataclass
class GateTest:
    """The selected gates on test. before_after: per model a ``none`` and a ``val_selected`` row
    (the gate's fields, pooled tp, fp, fn, n_pred, precision, recall, f1, ap at IoU 0.5); effect:
    removed instances by reason and model (removed_fp, removed_tp); decisions: {model: one row per
    predicted test instance, kept or removed and why}; gated: {model: gated labels per tile};
    per_image: ``Evaluation.per_image`` rows at IoU 0.5 (image, marker, donor, tp, fp, fn, ...) with a
    ``model`` column: ``<model>`` without a gate, ``<model>_gated`` with it (``test_per_image.csv``)."""

    before_after: pd.DataFrame
    effect: pd.DataFrame
    decisions: dict[str, pd.DataFrame]
    gated: dict[str, list[np.ndarray]]
    per_image: pd.DataFrame = field(default_factory=pd.DataFrame)

    def shown(self) -> pd.DataFrame:
        """The before/after table's readable columns."""
        return self.before_after[[c for c in SHOWN_COLUMNS if c in self.before_after.columns]]

    def removed(self) -> pd.DataFrame:
        """Removed false and true positives, reason (rows) x model (columns)."""
        return self.effect.pivot(index="reason", columns="model", values=["removed_fp", "removed_tp"])

    def tables(self) -> dict[str, pd.DataFrame]:
        """{file name: table} of the run: before/after, removed by reason, decisions per model."""
        return {"test_before_after.csv": self.before_after, "test_removed_by_reason.csv": self.effect,
                "test_per_image.csv": self.per_image,
                **{f"test_gate_decisions_{name}.csv": d for name, d in self.decisions.items()}}


def test_before_after(test: splitset.SplitSet, preds: dict, selected: dict[str, dict], space: GateSpace,
                      record: Record) -> GateTest:
    """Step 5: per model, the test tiles without a gate (recorded as ``<model>@no_gate``) and with
    the validation-selected gate (``<model>@val_selected_gate``), pooled at IoU 0.5, and which
    instances the gate removed (false or true positives, by reason); per tile for :func:`gate_claims`."""
    rows, effects, decisions, gated, per_image = [], [], {}, {}, []
    for name, p in preds.items():
        gate = postprocess.gate_from_row(selected[name], space.area_unit)
        record(f"{name}@no_gate", {"gate": None})
        before = scoring.pooled_counts(test.masks, p["test"], IOU)
        record(f"{name}@val_selected_gate", {**gate.as_dict(), "channel": space.channel,
                                            "pixel_size_um": space.pixel_size_um, "selected_by": SELECTED_BY})
        gated[name], decisions[name] = postprocess.gate_split(test, p["test"], gate, channel=space.channel,
                                                              pixel_size_um=space.pixel_size_um, iou=IOU)
        after = scoring.pooled_counts(test.masks, gated[name], IOU)
        rows += [{"model": name, "gate": "none", **before},
                 {"model": name, "gate": "val_selected", **gate.as_dict(), **after}]
        effects.append(postprocess.gate_effect(decisions[name]).assign(model=name))
        per_image += [scoring.evaluate_masks(test, masks, (IOU,)).per_image.assign(model=label)
                      for label, masks in ((name, p["test"]), (f"{name}_gated", gated[name]))]
    return GateTest(before_after=pd.DataFrame(rows), effect=pd.concat(effects, ignore_index=True),
                    decisions=decisions, gated=gated, per_image=pd.concat(per_image, ignore_index=True))


def gate_claims(gated: GateTest, **options) -> pd.DataFrame:
    """Step 6: per model, its gated test masks vs its ungated ones (A = ``<model>``, B =
    ``<model>_gated``): the paired difference B - A in pooled ap, f1, precision, recall at IoU 0.5
    with its interval and p-value (:func:`seglab.evaluate.claims.compare_pairs`; NaN rows for a model
    without test tiles). ``options``: :func:`seglab.evaluate.claims.compare`'s."""
    names = [m for m in dict.fromkeys(gated.per_image["model"]) if not str(m).endswith("_gated")]
    return claims.compare_pairs(gated.per_image, [(m, f"{m}_gated") for m in names], missing="nan", **options)


# --------------------------------------------------------------------------- 6. headline numbers


def headline(before_after: pd.DataFrame, effect: pd.DataFrame, selected: dict[str, dict], area_unit: str,
             wall_s: float | None = None, claims_table: pd.DataFrame | None = None) -> dict:
    """The run's summary numbers.

    Parameters
    ----------
    before_after, effect : :attr:`GateTest.before_after` and :attr:`GateTest.effect`.
    selected : :attr:`GateSweep.selected` ({model: the validation-selected gate row}).
    area_unit : 'px' or 'um2' (the gate's minimum area key is ``gate_min_area_<unit>_<model>``).
    wall_s : seconds of the whole notebook, reported as ``wall_s`` when given.
    claims_table : :func:`gate_claims`; adds per model ``test_ap50_diff_<model>_gated_vs_<model>``
        with ``_ci_low``, ``_ci_high``, ``_p_value``, ``_n_donors`` (``_note`` under 3 donors) and
        the flag ``<model>_gated_beats_<model>`` (True only when the interval lies above 0), and
        ``claims_interval`` (:func:`seglab.evaluate.claims.claim_summary`).

    Returns
    -------
    dict: per model ``test_{ap50,precision}_<model>`` (no gate) and ``..._gated``,
    ``test_recall_<model>_gated``, ``test_fp_<model>`` and ``..._gated``,
    ``test_removed_{fp,tp}_<model>``, ``val_f1_selected_<model>``, ``gate_q_{low,high}_<model>``,
    ``gate_min_area_<unit>_<model>``; ``gate_area_unit``. Fractions rounded to 4 decimals.
    """
    area_col = postprocess.area_column(area_unit)
    ba = before_after.set_index(["model", "gate"])
    numbers: dict = {}
    for name, chosen in selected.items():
        b, a = ba.loc[(name, "none")], ba.loc[(name, "val_selected")]
        e = effect[(effect["model"] == name) & (effect["reason"] == "all")].iloc[0]
        numbers.update({
            f"test_ap50_{name}": round(float(b["ap"]), 4), f"test_ap50_{name}_gated": round(float(a["ap"]), 4),
            f"test_precision_{name}": round(float(b["precision"]), 4),
            f"test_precision_{name}_gated": round(float(a["precision"]), 4),
            f"test_recall_{name}_gated": round(float(a["recall"]), 4),
            f"test_fp_{name}": int(b["fp"]), f"test_fp_{name}_gated": int(a["fp"]),
            f"test_removed_fp_{name}": int(e["removed_fp"]), f"test_removed_tp_{name}": int(e["removed_tp"]),
            f"val_f1_selected_{name}": round(float(chosen["f1"]), 4),
            f"gate_q_low_{name}": float(chosen["q_low"]), f"gate_q_high_{name}": float(chosen["q_high"]),
            f"gate_{area_col}_{name}": float(chosen[area_col]),
        })
        if claims_table is not None:
            numbers.update(claims.claim_summary(claims_table, name, f"{name}_gated", prefix="test_ap50", threshold=IOU))
    numbers["gate_area_unit"] = area_unit
    if claims_table is not None:
        numbers["claims_interval"] = claims.interval_label(claims_table)
    if wall_s is not None:
        numbers["wall_s"] = round(float(wall_s), 1)
    return numbers
