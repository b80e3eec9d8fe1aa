"""E9 curation: a classifier trained on people's answers filters detections; how many answers it needs.

Simulated slides carry planted artefacts (:class:`seglab.data.simulate_slides.SlideSim`
``artefact_fraction``: bright fragments and out-of-focus blobs the segmenter finds but a person
rejects; their size and brightness overlap small and dim real cells). E9 segments the slides
(:mod:`seglab.segment.slides`, as E8), exports a gallery of a seeded sample of the detections
(:mod:`seglab.curate.gallery`), answers it with a simulated annotator who follows the truth with
a small error rate (:mod:`seglab.curate.annotator`), draws the learning curve (grouped
cross-validation by slide on growing numbers of answers), trains and gates the classifier
(:mod:`seglab.curate.classifier`, :mod:`seglab.curate.gate`), stores it (skops,
:mod:`seglab.curate.store`) and filters every detection with it; then checks, against the truth,
the classifier's precision and recall and what the filter does to counts and densities.

Steps, in the notebook's order
------------------------------
1. :func:`make_slides`; :func:`segment` (full pass, no classifier).
2. :func:`truth_of_detections`: each detection's truth kind (the truth label under its centroid).
3. :func:`export_galleries` (per slide, a seeded sample: ``n_answers`` objects in all) and :func:`annotate`.
4. :func:`training_table`; :func:`learning_curve`; :func:`train_and_gate` (saved, then loaded with
   every check).
5. :func:`filter_all` (the classifier on every detection), :func:`truth_metrics`,
   :func:`count_table`; :func:`pipeline_check` (the same slide through ``predict_slide`` with the
   classifier gives the same kept objects).
6. :func:`headline`: ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.core import paths
from seglab.core.units import AreaFilter
from seglab.curate import apply as curate_apply
from seglab.curate import classifier as clf
from seglab.curate.gate import GateThresholds
from seglab.data import simulate_slides as sim
from seglab.experiments import e8_slides as e8
from seglab.segment import slides as seg

SOURCE = "params/<profile>/09_curation.yaml"


def preflight(params: dict, cohort: Callable) -> None:
    """Before the notebook starts: tiling, filter and gate thresholds can be built from the params."""
    from seglab.experiments import ParamConflict

    try:
        settings(params)
        GateThresholds.from_params(params)
    except SeglabError as exc:
        key = next((k for k in ("min_area_um2", "overlap_px", "tile_px", "min_accuracy", "min_recall",
                                "min_precision") if k in str(exc)), "tile_px")
        raise ParamConflict(key, str(exc), "change it there") from None


def settings(params: dict) -> seg.SlideSettings:
    """The :class:`SlideSettings` of the params: every tissue tile (sample_fraction 1)."""
    return seg.SlideSettings.from_params({**params, "sample_fraction": 1.0}, source=SOURCE)


def spec(params: dict) -> clf.ClassifierSpec:
    """The classifier of the params (``cell_type``, ``channels``, ``morphology_only``, ``n_estimators``, ``seed``)."""
    return clf.ClassifierSpec(cell_type=params["cell_type"], channels=tuple(params["channels"]),
                              morphology_only=bool(params["morphology_only"]), n_estimators=int(params["n_estimators"]),
                              seed=int(params["seed"]), n_splits=int(params["n_slides"]))


def make_slides(params: dict, log: Callable | None = print) -> list[dict]:
    """Step 1: ``n_slides`` simulated slides of ``slide_px`` px with ``artefact_fraction`` planted
    artefacts in ``slides_dir`` (OME-TIFF), seeds ``seed + i``; reused when already written."""
    out = paths.resolve(params["slides_dir"])
    s = sim.SlideSim(pixel_size_um=0.35, artefact_fraction=float(params["artefact_fraction"]))
    made = []
    for i in range(int(params["n_slides"])):
        r = sim.simulate_slide(out, f"C{i + 1:02d}", size_px=int(params["slide_px"]), fmt="ome-tiff",
                               seed=int(params["seed"]) + i, sim=s)
        made.append({**r, "slide": f"C{i + 1:02d}", "fmt": "ome-tiff"})
        if log:
            log(f"[seglab] slide {made[-1]['slide']}: {r['n_cells']} simulated objects -> {paths.relative(r['path'])}")
    return made


def segment(params: dict, slides: Sequence[dict], out: Path, classifier=None, log: Callable | None = print
            ) -> list[seg.SlideResult]:
    """Every tissue tile of every slide (``workers`` processes), with ``classifier`` as the filter or none."""
    return seg.run_slides([s["path"] for s in slides], out, params["model"], settings(params),
                          e8.mask_settings(params), device=None, workers=int(params["workers"]), log=log,
                          classifier=classifier, classifier_threshold=float(params["classifier_threshold"]))


def truth_of_detections(slides: Sequence[dict], results: Sequence[seg.SlideResult]) -> pd.DataFrame:
    """Per detection (area-filtered instances): object_id, slide, truth_label (the truth label under
    its centroid; 0 = none), truth_kind (cell, large, debris, fragment, blob or none) and
    real_cell (a person would say yes)."""
    parts = []
    for s, r in zip(slides, results):
        labels, cells = sim.read_truth(s)
        inst = r.instances
        y = np.clip(np.round(inst["centroid_y_px"].to_numpy()).astype(int), 0, labels.shape[0] - 1)
        x = np.clip(np.round(inst["centroid_x_px"].to_numpy()).astype(int), 0, labels.shape[1] - 1)
        lab = labels[y, x].astype(np.int64)
        kinds = dict(zip(cells["label"], cells["kind"]))
        kind = np.array([kinds.get(int(v), "none") if v else "none" for v in lab], dtype=object)
        parts.append(pd.DataFrame({"object_id": inst["object_id"].to_numpy(), "slide": r.record["slide"],
                                   "truth_label": lab, "truth_kind": kind, "real_cell": sim.is_real_cell(kind)}))
    return pd.concat(parts, ignore_index=True)


def export_galleries(params: dict, results: Sequence[seg.SlideResult], gallery_dir: Path) -> list[tuple[Path, dict]]:
    """Step 3: one gallery export per slide (:func:`seglab.curate.gallery.gallery_from_slide_run`), each
    a seeded sample of ``n_answers / n_slides`` of its objects (the annotation round). Returns
    [(export folder, gallery record)]."""
    from seglab.curate.gallery import gallery_from_slide_run

    per = max(1, int(params["n_answers"]) // len(results))
    out = []
    for r in results:
        folder = gallery_dir / r.record["slide"]
        out.append((folder, gallery_from_slide_run(r.out, folder, sample=per, seed=int(params["seed"]),
                                                   cell_type=params["cell_type"], overwrite=True, log=None)))
    return out


def annotate(params: dict, galleries: Sequence[tuple[Path, dict]], truth: pd.DataFrame, folder: Path
             ) -> list[tuple[Path, Path]]:
    """The simulated annotator's answers file for each gallery (``annotator_error_rate``,
    ``annotator_unsure_rate``, seeded): [(answers file, its gallery folder)]."""
    from seglab.curate.annotator import answer_gallery

    truth_yes = dict(zip(truth["object_id"], truth["real_cell"].astype(bool)))
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for k, (gdir, g) in enumerate(galleries):
        path, _ = answer_gallery(folder / f"answers_{gdir.name}.json", g, truth_yes,
                                 error_rate=float(params["annotator_error_rate"]),
                                 unsure_rate=float(params["annotator_unsure_rate"]), seed=int(params["seed"]) + k)
        made.append((path, gdir))
    return made


def features_of(results: Sequence[seg.SlideResult]) -> pd.DataFrame:
    """:func:`seglab.segment.slides.slide_features` of every slide's detections."""
    return seg.study_features([r.out for r in results])


def training_table(features: pd.DataFrame, answer_files: Sequence[tuple[Path, Path]]) -> pd.DataFrame:
    """Step 4: the answers files (each loaded with every check against its gallery) joined with the features."""
    from seglab.curate.answers import load_answer_files
    from seglab.curate.features import training_table as join

    answers = load_answer_files(answer_files)
    return join(features, answers, source=", ".join(p.name for p, _ in answer_files))


def learning_curve(params: dict, table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Grouped CV (by slide) on ``curve_sizes`` answers, ``curve_repeats`` draws each, and its verdict."""
    th = GateThresholds.from_params(params)
    curve = clf.learning_curve(table, spec(params), params["curve_sizes"], int(params["curve_repeats"]), "source",
                               th, int(params["seed"]))
    return curve, clf.curve_verdict(curve, th)


def train_and_gate(params: dict, table: pd.DataFrame, path: Path, verdict: dict, pixel_size_um: float):
    """Cross-validate (the gate), train on every answer, save (skops + sidecar) and load it back
    with every check (:func:`seglab.curate.store.load`; refused if the gate failed). Returns
    (:class:`~seglab.curate.classifier.CVResult`, the loaded classifier or None when it failed)."""
    from seglab.curate import store

    cv, saved = clf.train_gate_save(table, spec(params), path, group_col="source",
                                    thresholds=GateThresholds.from_params(params), source=str(path.name),
                                    pixel_size_um=pixel_size_um, curve=verdict)
    loaded = store.load(saved) if cv.report.passed else None
    return cv, loaded


def filter_all(classifier, features: pd.DataFrame, truth: pd.DataFrame, threshold: float,
               answered: Sequence[str]) -> pd.DataFrame:
    """Every area-filtered detection with its truth, ``classifier_confidence``, ``kept`` and
    ``answered`` (in the training answers: left out of the truth metrics)."""
    feats = features[features["object_id"].isin(truth["object_id"])]
    out = curate_apply.apply(classifier, feats, threshold).merge(truth, on="object_id", validate="one_to_one")
    out["answered"] = out["object_id"].isin(set(answered))
    return out


def truth_metrics(filtered: pd.DataFrame) -> dict:
    """Against the truth, on the detections NOT answered (unseen by the classifier): precision
    (real cells among the kept) and recall (kept among the real cells), with the classifier and
    without it (everything kept), and the artefacts among the detections."""
    d = filtered[~filtered["answered"]]
    real, kept = d["real_cell"].astype(bool), d["kept"].astype(bool)
    return {"n_unseen": int(len(d)), "n_real": int(real.sum()), "n_not_real": int((~real).sum()),
            "precision_unfiltered": round(float(real.mean()), 4) if len(d) else float("nan"),
            "precision_filtered": round(float(real[kept].mean()), 4) if kept.any() else float("nan"),
            "recall_filtered": round(float(kept[real].mean()), 4) if real.any() else float("nan"),
            "artefacts_removed": round(float((~kept[~real]).mean()), 4) if (~real).any() else float("nan")}


def count_table(slides: Sequence[dict], results: Sequence[seg.SlideResult], filtered: pd.DataFrame,
                area: AreaFilter) -> pd.DataFrame:
    """Per slide: true real cells (area-filtered truth, on the segmented tiles) and planted artefacts;
    detections before the classifier and kept after it; densities per mm^2 of tissue; count error
    (found / true real cells - 1) before and after."""
    rows = []
    for s, r in zip(slides, results):
        p = r.record["pixel_size_um"]
        _, cells = sim.read_truth(s)
        cells = area.apply(cells, p)
        inside = e8._in_cores(cells["centroid_y_px"].to_numpy(), cells["centroid_x_px"].to_numpy(), r.tiles)
        cells = cells[inside]
        n_real = int(sim.is_real_cell(cells["kind"]).sum())
        n_art = int(cells["kind"].isin(sim.ARTEFACT_KINDS).sum())
        f = filtered[filtered["slide"] == r.record["slide"]]
        mm2 = e8.tissue_mm2(r.tiles, p)
        n_det, n_kept = int(len(f)), int(f["kept"].sum())
        rows.append({"slide": r.record["slide"], "tissue_mm2": round(mm2, 4), "n_true_cells": n_real,
                     "n_true_artefacts": n_art, "n_detected": n_det, "n_kept": n_kept,
                     "n_kept_real": int((f["kept"] & f["real_cell"]).sum()),
                     "n_kept_not_real": int((f["kept"] & ~f["real_cell"]).sum()),
                     "density_true_per_mm2": round(n_real / mm2, 1), "density_detected_per_mm2": round(n_det / mm2, 1),
                     "density_kept_per_mm2": round(n_kept / mm2, 1),
                     "count_error_detected": round(n_det / max(n_real, 1) - 1, 4),
                     "count_error_kept": round(n_kept / max(n_real, 1) - 1, 4)})
    return pd.DataFrame(rows)


def pipeline_check(params: dict, slide: dict, classifier, out: Path, filtered: pd.DataFrame) -> dict:
    """One slide segmented again by ``predict_slide`` with the classifier as its filter (into ``out``):
    its ``instances.csv`` should hold exactly the objects :func:`filter_all` kept (same ids, same
    confidences). Returns the comparison and the run's counts before / after."""
    r = segment(params, [slide], out, classifier=classifier, log=None)[0]
    mine = filtered[(filtered["slide"] == slide["slide"]) & filtered["kept"]]
    conf = dict(zip(r.detections["object_id"], r.detections[curate_apply.CONFIDENCE]))
    same_conf = bool(np.allclose([conf[i] for i in mine["object_id"]], mine[curate_apply.CONFIDENCE], atol=1e-4))
    return {"slide": slide["slide"], "n_before": r.record["n_objects_before_classifier"],
            "n_after": r.record["n_objects_after_classifier"],
            "same_kept_ids": set(r.instances["object_id"]) == set(mine["object_id"]),
            "same_confidence": same_conf, "classifier_sha256": r.record["classifier"]["sha256"][:12]}


def headline(table: pd.DataFrame, verdict: dict, cv, truth: dict, counts: pd.DataFrame, check: dict | None) -> dict:
    """The run's summary: answers (yes / no / unsure), the learning curve's ``curve_n_needed`` and
    ``curve_rising``, ``more_answers_needed``, the gate (``cv_*``, ``gate_passed``), against the truth
    on unseen detections (``truth_precision_*``, ``truth_recall_filtered``), count errors before
    and after the filter (mean over slides) and whether ``predict_slide`` kept the same objects."""
    m = cv.report.metrics
    a = table.attrs
    return {"n_answers": int(a["n_answers"]), "n_yes": int(a["n_yes"]), "n_no": int(a["n_no"]),
            "n_unsure": int(a["n_unsure"]), "curve_n_needed": verdict["n_needed"], "curve_rising": verdict["rising"],
            "more_answers_needed": bool(verdict["more_answers_needed"]), "gate_passed": bool(cv.report.passed),
            "cv_accuracy": round(float(m["accuracy"]), 4), "cv_recall": round(float(m["recall"]), 4),
            "cv_precision": round(float(m["precision"]), 4),
            "truth_precision_unfiltered": truth["precision_unfiltered"],
            "truth_precision_filtered": truth["precision_filtered"], "truth_recall_filtered": truth["recall_filtered"],
            "truth_artefacts_removed": truth["artefacts_removed"],
            "count_error_detected_mean": round(float(counts["count_error_detected"].mean()), 4),
            "count_error_kept_mean": round(float(counts["count_error_kept"].mean()), 4),
            "pipeline_same_kept": None if check is None else bool(check["same_kept_ids"] and check["same_confidence"])}
