"""Benchmark the curation loop (notebook 09's steps) on the demo's simulated slides: what the
classifier filter adds to slide inference, and what a gallery export and the features cost.

Usage::

    .venv/bin/python bench/bench_curation.py [--profile demo] [--threads 1]

Steps, each timed in this process with one torch thread (slides written to a temporary folder):
simulate the profile's slides (planted artefacts), segment every tissue tile once to warm up, then again without a
classifier (the reference), export one gallery per slide (crops, pages) and answer it with the simulated
annotator, measure every object's features, cross-validate + train + save the classifier, then
segment the same slides again with the classifier as the filter (into another folder, so every
tile is segmented again).

Printed as ratios against references measured in the same run:

- ``curation_filter_overhead_vs_plain_inference``: slide inference with the classifier over the
  same inference without it (the features of each tile's objects and one forest prediction per
  tile are the extra work);
- ``curation_gallery_export_vs_inference``: a gallery export (per card) over the inference (per
  object found), i.e. how a card compares with finding its object;
- ``curation_features_vs_inference``: :func:`seglab.segment.slides.slide_features` over the
  inference, per object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo", help="params profile of 09_curation (default: demo)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    from seglab.config.params import load_params
    from seglab.core import workers
    from seglab.experiments import e9_curation as e9

    workers.set_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="seglab-bench-curation-") as tmp:
        tmp = Path(tmp)
        params, _ = load_params("09_curation", a.profile, overrides={"slides_dir": str(tmp / "slides"), "workers": 1})
        slides = e9.make_slides(params, log=None)
        t = {}

        def timed(name, fn, *args, **kw):
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            t[name] = time.perf_counter() - t0
            return out

        timed("warm_up", e9.segment, params, slides, tmp / "warm", log=None)  # imports, first-call costs
        plain = timed("inference", e9.segment, params, slides, tmp / "plain", log=None)
        n_objects = sum(len(r.instances) for r in plain)
        galleries = timed("gallery", e9.export_galleries, params, plain, tmp / "gallery")
        n_cards = sum(len(g["objects"]) for _, g in galleries)
        truth = e9.truth_of_detections(slides, plain)
        answers = e9.annotate(params, galleries, truth, tmp / "answers")
        features = timed("features", e9.features_of, plain)
        table = e9.training_table(features, answers)
        pixel = float(plain[0].record["pixel_size_um"])
        cv, classifier = timed("train", e9.train_and_gate, params, table, tmp / "classifier.skops", {}, pixel)
        if classifier is None:
            from seglab.curate import store

            classifier = store.load(tmp / "classifier.skops", allow_failed_gate=True)
        filtered = timed("inference_filtered", e9.segment, params, slides, tmp / "filtered", classifier=classifier,
                         log=None)
        kept = sum(len(r.instances) for r in filtered)

    per_object = t["inference"] / max(n_objects, 1)
    print(f"{len(slides)} slides of {params['slide_px']} px, {n_objects} objects found, {kept} kept by the classifier; "
          f"{n_cards} gallery cards, {len(table)} answers (gate passed: {cv.report.passed})")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    print(f"RESULT curation_filter_overhead_vs_plain_inference {t['inference_filtered'] / t['inference']:.3f} x")
    print(f"RESULT curation_gallery_export_vs_inference {t['gallery'] / max(n_cards, 1) / per_object:.3f} x per card/object")
    print(f"RESULT curation_features_vs_inference {t['features'] / max(n_objects, 1) / per_object:.3f} x per object")


if __name__ == "__main__":
    main()
