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
# # E1 baseline vs fine-tuned: generic, marker-specific and marker-only models
#
# **Question.** Does fine-tuning the off-the-shelf segmenter on a few annotated tiles of *our*
# tissue improve instance segmentation, and does it matter what it is fine-tuned on?
#
# **How.** Four models (the baseline is `baseline_model`: Cellpose-SAM in the full profile, the
# committed tiny generalist pretrained on DSB2018 nuclei in the demo):
#
# | name | fine-tuned on | input at inference |
# |---|---|---|
# | `baseline` | nothing (off the shelf) | [DAPI, marker] |
# | `finetuned_generic` | all annotated training tiles, every marker | [DAPI, marker] |
# | `finetuned_marker_specific` | the training tiles of `markers` only | [DAPI, marker], tiles of `markers` |
# | `finetuned_marker_only` | all training tiles with DAPI zeroed | [0, marker] |
#
# Every model is evaluated on the **test** split at the default thresholds (AP@0.5, 0.75, 0.9,
# precision, recall, F1; overall and per marker). Then the cellpose thresholds
# (`flow_threshold` x `cellprob_threshold`) are swept on **validation** from the saved network
# outputs (no rerun of the network), the best setting by validation F1 is picked per model and
# applied **once** to test (the run records each test evaluation in its manifest).
#
# **Answer (demo profile).** Yes: the generic fine-tune raises pooled test AP@0.5 from 0.773 to
# 0.824 (+0.051, 95% t interval over the 6 test donors [0.025, 0.078]: the claim holds), mostly by
# removing false positives (precision 0.92 -> 0.97, recall 0.83 -> 0.84). What it is fine-tuned on
# matters less than that it sees DAPI: the marker-specific model (0.849 on the GFAP tiles) does not
# beat the generic model on the same tiles (0.865; the interval over their 5 donors includes 0),
# and the marker-only model, without DAPI, finds almost no nuclei (0.024). Thresholds selected on
# validation move the fine-tuned models' test AP up a little (generic 0.832) and the baseline's
# down (0.753).
#
# The steps are those of `seglab.experiments.e1_baseline_vs_finetune`. The fine-tunes land in the
# content-addressed cache `data/models/` (a Slurm prepare array trains the same ones with
# `seglab prepare 01`), so notebooks 02-06 reuse them, and the network outputs, cached in
# `data/cache/outputs/`, instead of training and segmenting again.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell; the demo values are the defaults)
cohort_dir = 'data/cohorts/demo'
seed = 0
baseline_model = 'generalist'
diameter_px = 13.6
epochs = 10
learning_rate = 0.002
weight_decay = 0.0001
batch_size = 8
bsize = 128
nimg_per_epoch = 24
flow_threshold = 0.4
cellprob_threshold = 0.0
min_size = 15
markers = ['gfap']
iou_thresholds = [0.5, 0.75, 0.9]
sweep_flow_thresholds = [0.4, 0.8]
sweep_cellprob_thresholds = [-1.0, 0.0, 1.0]
n_example_tiles = 3
torch_threads = 1
n_jobs = 2
run_dir = None
profile = "interactive"

# %%
import json
import time

from seglab.core import workers
from seglab.experiments import e1_baseline_vs_finetune as e1
from seglab.plots import claims as plots_claims
from seglab.plots import evaluation as plots
from seglab.workflow.runs import attach

t_start = time.monotonic()
run = attach("01_baseline_vs_finetune", run_dir, profile, globals())
params, mask = run.params, run.mask
print("run folder:", run.run_dir)
print("torch threads:", workers.set_threads(params["torch_threads"]))  # tiny nets: 1 thread per process
print("mask settings:", mask)

# %% [markdown]
# ## 1. The annotated tiles
#
# Validation and test tiles come from different donors than the training tiles (the split is by
# donor). The marker-only model sees the same tiles with the DAPI channel set to zero; the tiny
# nets estimate the nucleus diameter per tile from DAPI, so without DAPI (and with `diameter_px`
# null) that model is given the median diameter of the annotated training nuclei instead.

# %%
tiles = e1.annotated_tiles(params["cohort_dir"], params["markers"])
print(tiles.describe())
tiles.counts()

# %% [markdown]
# ## 2. Fine-tuning
#
# Three variants, each started from the baseline's weights with the shared training settings
# (`run.training`: `epochs`, `learning_rate`, `batch_size`, `bsize`, `nimg_per_epoch` from
# `params/<profile>/defaults.yaml`). A finished model is reused from the cache; `models.json` in the
# run folder records each checkpoint's path, sha256 and training tiles.

# %%
fits = e1.finetune_models(params)
run.save_json(fits.record, "models.json")
print(f"fine-tuning: {fits.seconds} s (0 when every model came from the cache)")
fig = plots.plot_training_loss(fits.losses)
run.save_figure(fig, "training_loss.png")
fig

# %% [markdown]
# ## 3. Network outputs on validation and test
#
# One network pass per model and tile (cached); masks at any threshold are rebuilt from these
# outputs. Which tiles each model sees: all tiles for the baseline and the generic model, the tiles
# of `markers` for the marker-specific model, DAPI-zeroed tiles for the marker-only model.

# %%
outputs = e1.network_outputs(fits.loaded, tiles, mask, n_jobs=params["n_jobs"],
                             threads_per_job=params["torch_threads"])
print(f"network outputs: {outputs.seconds} s")

# %% [markdown]
# ## 4. Test at the default thresholds
#
# `flow_threshold` and `cellprob_threshold` at cellpose's defaults (the params), the same for every
# model: the comparison the issue asks for. *Pooled* = TP, FP, FN summed over the tiles, then the
# ratio (AP = TP / (TP + FP + FN)); *mean* = the ratio per tile averaged over tiles (SD = spread).
# The rows `baseline[gfap]` and `finetuned_generic[gfap]` score the models fine-tuned on every
# marker on the tiles of `markers` alone, as the marker-specific model is scored.

# %%
default = e1.test_at_default(tiles, outputs, mask, params["iou_thresholds"], run.record_test_evaluation)
run.save_table(default.comparison, "test_default_thresholds.csv")
run.save_table(default.per_image, "test_per_image.csv")
default.at(0.5).round(3)

# %%
fig = plots.plot_model_bars(default.per_image_of(e1.MAIN_MODELS), ("ap", "precision", "recall", "f1"),
                            threshold=0.5, figsize=(8, 3.8),
                            title="test, default thresholds: each bar the mean over tiles (dots: tiles, bars: SD)")
run.save_figure(fig, "test_bars_default.png")
fig

# %%
fig = plots.plot_ap_by_iou(default.comparison, params["iou_thresholds"])
run.save_figure(fig, "test_ap_by_iou.png")
fig

# %% [markdown]
# ### Per marker
#
# The marker changes what surrounds the nuclei (astrocyte processes, microglia, vessels, neuronal
# soma), and with it the errors. Pooled AP@0.5 per marker on test (error bars: SD over tiles).

# %%
by_marker = e1.per_marker(default)
run.save_table(by_marker.pooled, "test_per_marker_pooled.csv")
run.save_table(by_marker.mean, "test_per_marker_mean.csv")
fig = plots.plot_group_model_bars(by_marker.bars, "marker", "ap", threshold=0.5, figsize=(9, 3.5),
                                  title="test AP@0.5 per marker (pooled; the marker-specific model only on its markers)")
run.save_figure(fig, "test_per_marker.png")
display(fig)
by_marker.ap.round(3)

# %% [markdown]
# ## 5. Threshold sweep on validation, applied once to test
#
# For each model: pooled precision, recall, F1 and AP@0.5 on the validation tiles over the grid
# `sweep_flow_thresholds` x `sweep_cellprob_thresholds`, rebuilt from the saved outputs. The best
# setting by validation F1 (ties: the one nearest cellpose's defaults) is then evaluated on test,
# once per model. The red square marks the selected setting.

# %%
sweep = e1.validation_sweep(tiles, outputs, params["sweep_flow_thresholds"], params["sweep_cellprob_thresholds"])
run.save_table(sweep.table, "val_threshold_sweep.csv")
print(f"sweep: {sweep.seconds} s")
fig = plots.plot_sweep_heatmaps(sweep.sweeps, sweep.selected, "f1", label="val F1")
run.save_figure(fig, "val_sweep_f1.png")
display(fig)
sweep.selected_table.round(3)

# %%
fig = plots.plot_sweep_heatmaps(sweep.sweeps, sweep.selected, "ap", label="val AP@0.5", cmap="magma")
run.save_figure(fig, "val_sweep_ap.png")
fig

# %%
selected = e1.test_at_selected(tiles, outputs, sweep, default, params["iou_thresholds"],
                               run.record_test_evaluation)
run.save_table(selected.table, "test_selected_thresholds.csv")
selected.table.round(3)

# %% [markdown]
# ## 6. How sure are we? Each claim with its interval
#
# Each claim compares two segmentations of the same test tiles: every fine-tuned variant against
# the baseline, and the marker-specific model against the baseline and the generic model on the
# tiles of `markers`. The tiles of one donor share tissue and imaging, so the donor is the unit of
# replication: each row is the difference B - A in pooled AP@0.5 with its **95% t interval over
# donors** (delete-one-donor jackknife SE, D - 1 degrees of freedom) and a donor-level paired
# permutation p-value (`seglab.evaluate.claims`). A claim "B beats A" (`<b>_beats_<a>` in
# `summary.json`) is made only when the whole interval lies above 0; with one donor there is no
# interval (no claim), with two it is very wide. Green: the interval lies above 0; red: below.

# %%
found = e1.claim_tables(default, selected, params["markers"])
run.save_table(found.table, "test_claims.csv")
fig = plots_claims.plot_differences(found.table, panel="thresholds",
                                    title="test: B - A in pooled AP@0.5, at the default and the selected thresholds")
run.save_figure(fig, "test_claims.png")
display(fig)
found.shown().round(4)

# %% [markdown]
# ## 7. Example test tiles
#
# True and predicted outlines, coloured by outcome at IoU 0.5: matched predictions (TP) green,
# unmatched predictions (FP) magenta, missed true nuclei (FN) yellow. Tiles are picked across the
# range of the fine-tuned generic model's AP (worst, middle, best), one marker each where possible;
# each model at its validation-selected thresholds.

# %%
shown = e1.examples(tiles, default, selected, params["n_example_tiles"])
fig = plots.plot_example_tiles(shown.images, shown.truths, shown.preds, shown.labels, 0.5)
run.save_figure(fig, "example_tiles_outlines.png")
fig

# %% [markdown]
# ## Summary
#
# Headline numbers (`summary.json`): test AP@0.5 (pooled) of each model at the default thresholds,
# the same after the validation-selected thresholds, the selected thresholds and their validation F1;
# each claim of section 6 as `test_ap50_diff_<b>_vs_<a>` with `_ci_low`, `_ci_high`, `_p_value`,
# `_n_donors` beside its flag `<b>_beats_<a>` (`_selected` at the selected thresholds).

# %%
run.save_json(e1.timings(fits, outputs, sweep, t_start), "timings.json")
summary = run.summary(**e1.headline(default.comparison, selected.table, params["markers"], len(tiles.test), found))
print(json.dumps(summary, indent=1))
