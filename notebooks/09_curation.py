# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # E9 curation: people's answers train a classifier that filters detections
#
# **Question.** Segmentation finds things that are not the cells we want (fragments, out-of-focus
# blobs). People curate a sample of detections by eye (yes / no / unsure in a gallery); a balanced
# random forest learns their answers; a validation gate decides whether it may filter the full run.
# How many answers does the gate need, how well does the filter separate real cells from
# artefacts, and what does it do to counts and densities?
#
# **How.** Simulated slides with planted artefacts (`artefact_fraction` of the ordinary cells
# replaced by bright elongated fragments and dim, soft-edged blobs whose size and brightness
# overlap small and dim real cells; `seglab.data.simulate_slides`) are segmented tile by tile as in
# E8 (`seglab.segment.slides`). A gallery of a seeded sample of each slide's detections is exported
# (`seglab.curate.gallery`) and answered by a simulated annotator who follows the truth with a
# small error rate (`seglab.curate.annotator`). The answers and the objects' regionprops features
# (`seglab.curate.features`) make the training table; the learning curve repeats the
# cross-validation, grouped by slide, on growing numbers of answers (`seglab.curate.classifier`);
# the gate (`seglab.curate.gate`) checks accuracy, recall and precision of "yes"; the classifier is
# stored with skops and loaded back with the trusted-types check (`seglab.curate.store`), then
# filters every detection (`seglab.curate.apply`). The truth is used only to score.
#
# **Answer (demo profile: 4 slides of 1280 px, 30% of the ordinary cells replaced by artefacts, 600
# answers with 5% wrong and 3% unsure, tiny CPU net).** The segmenter finds the artefacts: 41% more
# objects than real cells. The gate (accuracy >= 0.75, recall and precision of "yes" >= 0.70,
# cross-validated by slide) passes from 50 answers on every draw of the learning curve (20 and 30
# answers mostly cannot be cross-validated: fewer than 10 "no"); on all 583 sure answers:
# accuracy 0.918, recall 0.946, precision 0.937 (the annotator's 5% errors cap it). On the 1,051
# detections nobody answered, the filter raises the share of real cells from 0.70 to 0.98 and
# keeps 97% of them; counts go from +41% to -2% of the true cells (-1% to -6% per slide). Here the
# artefacts are easy to tell apart (brightness and shape); real curation rounds are harder, which
# is what the learning curve is for.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell; the demo values are the defaults)
slides_dir = "data/slides/curation_demo"
n_slides = 4
slide_px = 1280
seed = 0
artefact_fraction = 0.3
model = "generalist"
cell_diameter_px = 20.0
tile_px = 1280
overlap_px = 64
min_tissue_fraction = 0.05
channels = ["DAPI", "CD45"]
min_area_um2 = 10.0
max_area_um2 = 300.0
workers = 2
torch_threads = 1
cell_type = "cell"
n_answers = 600
annotator_error_rate = 0.05
annotator_unsure_rate = 0.03
morphology_only = False
n_estimators = 100
curve_sizes = [20, 30, 50, 100, 200, 400]
curve_repeats = 3
min_accuracy = 0.75
min_recall = 0.70
min_precision = 0.70
classifier_threshold = 0.5
pipeline_check = True
run_dir = None
profile = "interactive"

# %%
import json
import time

import pandas as pd

from seglab.core import workers as worker_threads
from seglab.core.units import AreaFilter
from seglab.experiments import e9_curation as e9
from seglab.plots import curation as plots
from seglab.workflow.runs import attach

run = attach("09_curation", run_dir, profile, globals())
params = run.params
worker_threads.set_threads(params["torch_threads"])  # tiny nets: 1 thread beats 2 oversubscribed ones
t_start = time.monotonic()
area = AreaFilter.from_params(params, source="params 09_curation")
print("run folder:", run.run_dir)

# %% [markdown]
# ## 1. Slides with planted artefacts, segmented
#
# Every tissue tile, no classifier yet: what the segmenter finds, artefacts included. Each
# detection's truth kind is the truth label under its centroid (`none`: no object there).

# %%
slides = e9.make_slides(params)
t0 = time.monotonic()
results = e9.segment(params, slides, run.path("slides"))
segment_s = round(time.monotonic() - t0, 1)
truth = e9.truth_of_detections(slides, results)
run.save_table(truth, "detections_truth.csv")
print(f"segmented in {segment_s} s;", truth["truth_kind"].value_counts().to_dict())

# %% [markdown]
# ## 2. The gallery and the (simulated) annotator
#
# One gallery export per slide (a static folder: open `gallery/<slide>/index.html`), each a seeded
# sample of its detections; the annotator answers yes for real cells, no for the rest, wrong on
# `annotator_error_rate` of them and unsure on `annotator_unsure_rate`. The answers files are read
# back with every check against their gallery (`seglab.curate.answers.load_answers`).

# %%
galleries = e9.export_galleries(params, results, run.path("gallery"))
answer_files = e9.annotate(params, galleries, truth, run.path("answers"))
features = e9.features_of(results)
table = e9.training_table(features, answer_files)
run.save_table(table, "training_table.csv")
print(pd.Series(table.attrs).drop("not_found").to_dict())

# %% [markdown]
# ## 3. The learning curve: how many answers does the gate need?
#
# Random subsets of the answers, cross-validated by slide (no slide on both sides of a fold),
# `curve_repeats` draws per size. `n_needed`: the smallest size whose mean metrics pass the gate
# (and every larger size too); `rising`: the last step still gains more than 0.01.

# %%
curve, verdict = e9.learning_curve(params, table)
run.save_table(curve, "learning_curve.csv")
run.save_json(verdict, "learning_curve_verdict.json")
fig = plots.learning_curve_figure(curve, e9.GateThresholds.from_params(params).as_dict(), verdict["n_needed"])
run.save_figure(fig, "curation_learning_curve.png")
display(fig)
print(pd.Series(verdict)[["n_needed", "rising", "more_answers_needed"]].to_dict())
curve.groupby("n_answers")[["accuracy", "recall", "precision"]].agg(["mean", "min", "max"]).round(3)

# %% [markdown]
# ## 4. The gate
#
# Cross-validated by slide on every answer; the classifier is trained on all of them, stored with
# skops beside its sidecar, and loaded back with the trusted-types check. A classifier that fails
# the gate is stored marked as failed and refused for filtering.

# %%
cv, classifier = e9.train_and_gate(params, table, run.path("classifier.skops"), verdict,
                                   results[0].record["pixel_size_um"])
run.save_json(cv.report.as_dict(), "gate.json")
print(cv.report.describe())
print("confusion [[tn, fp], [fn, tp]]:", cv.report.metrics["confusion"])
cv.report.per_group.round(3)

# %% [markdown]
# ## 5. The filter against the truth
#
# Every detection gets `classifier_confidence`; those at or above `classifier_threshold` are kept.
# Precision and recall of real cells are scored on the detections nobody answered (the
# classifier never saw them), with the filter and without it.

# %%
filtered = e9.filter_all(classifier, features, truth, params["classifier_threshold"], table["object_id"])
truth_scores = e9.truth_metrics(filtered)
run.save_table(filtered, "filtered.csv")
run.save_json(truth_scores, "truth_metrics.json")
fig = plots.confidence_figure(filtered, params["classifier_threshold"])
run.save_figure(fig, "curation_confidence.png")
display(fig)
truth_scores

# %% [markdown]
# ## 6. Counts and densities per slide, before and after the filter
#
# The truth is filtered by the same `AreaFilter`; real cells are `cell` and `large`. Then the
# first slide is segmented again by `predict_slide` with the classifier as its filter (the
# deployed path): its `instances.csv` should hold exactly the objects kept above.

# %%
counts = e9.count_table(slides, results, filtered, area)
run.save_table(counts, "counts.csv")
fig = plots.counts_figure(counts)
run.save_figure(fig, "curation_counts.png")
display(fig)
check = e9.pipeline_check(params, slides[0], classifier, run.path("filtered"), filtered) \
    if params["pipeline_check"] and classifier is not None else None
print("predict_slide with the classifier:", check)
counts

# %% [markdown]
# ## Summary
#
# `curve_n_needed`: answers at which the learning curve's mean metrics pass the gate;
# `gate_passed`, `cv_*`: the gate on every answer (cross-validated by slide);
# `truth_precision_*` / `truth_recall_filtered`: real cells among kept / kept among real, on
# unanswered detections; `count_error_*_mean`: found / true real cells - 1, before and after.

# %%
summary = run.summary(**e9.headline(table, verdict, cv, truth_scores, counts, check),
                      segment_s=segment_s, notebook_s=round(time.monotonic() - t_start, 1))
print(json.dumps(summary, indent=1))
