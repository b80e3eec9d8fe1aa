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
# # E4 sensitivity of AP and cell counts to the inference settings
#
# **Question.** Downstream statistics count cells per tile, so a setting that shifts counts matters
# even when AP barely moves. Which inference settings move AP@0.5 and the number of cells found, and
# by how much, around the defaults?
#
# **Answer (demo profile).** For the fine-tuned generic model (val AP@0.5 about 0.87 at the defaults,
# about 0.9 predicted cells per true cell), `flow_threshold` and the diameter the image is rescaled
# for matter most (AP ranges of 0.11-0.12 each, count-ratio ranges of 0.14-0.18 over the values
# tried), then `min_size`; the dynamics steps (`niter`), the network tiles' overlap and test-time
# augmentation barely move either (ranges under 0.01). The baseline is most sensitive to
# `cellprob_threshold` (AP range 0.16) and its counts to `flow_threshold` (0.26). The best point of
# the threshold grid gains about 0.01 AP over the defaults, so the defaults are a sound choice for
# the fine-tuned model. Each AP range comes with an interval over the validation donors and a
# permutation p-value (section 4), so "barely moves" and "matters" are read from those, not from
# the point estimates alone.
#
# For the fine-tuned generic model (E1's, from the model cache) and the baseline, on the
# **validation** tiles (the test split stays untouched), this notebook moves one setting at a time
# around the defaults (`run.mask`) and records pooled AP@0.5, F1 and the ratio of predicted to true
# cells. Every step is a function of `seglab.experiments.e4_sensitivity`, every figure one of
# `seglab.plots.sensitivity`:
#
# - from the **saved network outputs** (no rerun): `flow_threshold`, `cellprob_threshold` (also as a
#   heatmap of both), `min_size` (px) and `niter` (steps of the flow dynamics);
# - with a **network rerun** (a subset of `rerun_n_tiles` validation tiles in the demo, first model
#   only): the diameter the image is rescaled for (`diameter_factor` x the model's default: the
#   per-tile estimate for tiny nets), the overlap of the network tiles (`tile_overlap`) and
#   test-time augmentation (`augment`).

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
sens_models = ['finetuned_generic', 'baseline']
sens_flow_thresholds = [0.2, 0.4, 0.6, 0.8]
sens_cellprob_thresholds = [-2.0, -1.0, 0.0, 1.0, 2.0]
sens_min_sizes = [0, 15, 30, 60, 100]
sens_niters = [25, 100, 200]
sens_diameter_factors = [0.7, 1.0, 1.4]
sens_tile_overlaps = [0.1, 0.5]
sens_augment = [False, True]
rerun_n_tiles = 3
torch_threads = 1
run_dir = None
profile = "interactive"

# %%
from seglab.workflow.runs import attach
run = attach("04_sensitivity", run_dir, profile, globals())

# %%
import json
import time

from seglab.core import workers
from seglab.experiments import e4_sensitivity as e4
from seglab.plots import sensitivity as plots

t_start = time.monotonic()
print("run folder:", run.run_dir)
print("torch threads:", workers.set_threads(run.params["torch_threads"]))
print("base mask settings:", run.mask)

# %% [markdown]
# ## The models and their network outputs
#
# The fine-tuned generic model is E1's (the same entry of the model cache), and each model's network
# pass over the validation tiles is E1's too (the content-addressed output cache): every setting below
# that does not change what the network sees rebuilds masks from those saved outputs.

# %%
val = e4.validation_tiles(run.params)
specs = e4.model_specs(run.params)
run.save_json(e4.model_records(specs), "models.json")
nets = e4.load_models(specs)
memos = e4.network_outputs(nets, val, run.mask)
print(f"{len(val)} validation tiles; network outputs ready after {time.monotonic() - t_start:.1f} s")

# %% [markdown]
# ## 1. flow_threshold x cellprob_threshold (from saved outputs)
#
# Left: pooled AP@0.5; right: predicted / true cells (1 = the right count). The square marks the
# defaults.

# %%
heat = e4.flow_cellprob_grid(val, memos, run.params, run.mask)
run.save_table(heat, "val_flow_cellprob_grid.csv")
fig = plots.flow_cellprob_heatmaps(heat, run.mask.as_dict())
run.save_figure(fig, "val_flow_cellprob_heatmaps.png")
fig

# %% [markdown]
# ## 2. One setting at a time (from saved outputs)
#
# Each panel moves one setting, the others at their defaults (dotted line). Top: pooled AP@0.5;
# bottom: predicted / true cells.

# %%
lines, lines_per_image = e4.outputs_sensitivity_table(val, memos, run.params, run.mask, per_image=True)
run.save_table(lines, "val_sensitivity_from_outputs.csv")
run.save_table(lines_per_image, "val_sensitivity_from_outputs_per_image.csv")
print("niter the network pass used:", e4.stored_niters(memos))
fig = plots.sensitivity_lines(lines, e4.outputs_marks(run.mask, memos))
run.save_figure(fig, "val_sensitivity_from_outputs.png")
fig

# %% [markdown]
# ## 3. Settings that need the network again
#
# Diameter (rescaling), tile overlap and test-time augmentation change what the network sees, so
# they rerun it: on `rerun_n_tiles` validation tiles (drawn per marker, seeded), for the first model
# in `sens_models`. `seconds` is the wall time of each setting on those tiles.

# %%
tiles = e4.rerun_tiles(val, run.params)
rerun, rerun_per_image = e4.rerun_table(nets, tiles, run.params, run.mask, per_image=True)
run.save_table(rerun, "val_sensitivity_rerun.csv")
run.save_table(rerun_per_image, "val_sensitivity_rerun_per_image.csv")
fig = plots.sensitivity_lines(rerun, e4.RERUN_MARKS)
run.save_figure(fig, "val_sensitivity_rerun.png")
display(fig)
print(f"reruns on {len(tiles)} tiles: {', '.join(tiles.names)}")
rerun[["parameter", "value", "ap", "f1", "count_ratio", "cells_per_tile", "seconds"]].round(3)

# %% [markdown]
# ## 4. Which settings matter
#
# For each setting: the range of AP@0.5 and of predicted / true cells over the values tried
# (largest first). A setting with a wide count range shifts downstream densities even when AP is flat.

# %%
ranges = e4.sensitivity_ranges([lines, rerun])
run.save_table(ranges, "sensitivity_ranges.csv")
ranges.round(3)

# %% [markdown]
# ### How sure are we? Each AP range with its interval
#
# The same ranges of AP@0.5 from every tile's counts: an interval from a bootstrap that resamples
# donors, then tiles within donors (the donor is the unit of replication; `seglab.evaluate.claims`),
# and a p-value for "the setting changes nothing" (its values permuted within donors). A range is
# never negative and its bootstrap is biased upwards, so the interval says how large a clear range
# is and the p-value whether there is one. With one donor there is no interval.

# %%
found = e4.range_claims([lines_per_image, rerun_per_image])
run.save_table(found, "sensitivity_range_claims.csv")
fig = plots.range_intervals(found)
run.save_figure(fig, "val_ranges_with_intervals.png")
display(fig)
found[found["metric"] == "ap"].round(4)

# %% [markdown]
# ## Summary
#
# Headline numbers (`e4_sensitivity.headline`: AP@0.5 and count ratio at the defaults, their ranges
# per setting with each AP range's `_ci_low`, `_ci_high`, `_p_value` and `_n_donors`, the best AP of
# the grid) go to `summary.json`, with the run's wall time.

# %%
numbers = e4.headline(run.params["sens_models"], lines, heat, ranges, run.mask, len(tiles), found)
summary = run.summary(**numbers, wall_s=round(time.monotonic() - t_start, 1))
print(json.dumps(summary, indent=1))
