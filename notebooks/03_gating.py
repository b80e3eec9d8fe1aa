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
# # E3 post-processing gates: intensity quantiles and minimum area
#
# **Question.** Two classic false positives in aged brain tissue are small, very bright
# autofluorescent lipofuscin granules, and dim background texture that the network calls a nucleus.
# Does a simple gate after segmentation remove them without losing true nuclei, and does it still
# help once the model is fine-tuned?
#
# **How.** A gate removes predicted instances after segmentation (`seglab.segment.postprocess`):
#
# - **intensity**: the instance's mean intensity in `gate_channel` (the marker by default) must lie
#   between the `q_low` and `q_high` quantiles of the instance means *of the same tile*;
# - **area**: the instance must cover at least `min_area_px` pixels, or `min_area_um2` square
#   micrometres when `pixel_size_um` is given.
#
# The grid `gate_q_lows` x `gate_q_highs` x minimum areas is scored on **validation** (pooled F1 at
# IoU 0.5); the best gate per model is applied **once** to test. Predictions are those of E1's models
# (the baseline and the fine-tuned generic model, from the model cache) at the default cellpose
# thresholds; their network outputs come from the output cache when E1 ran first.
#
# **Answer (demo profile).** Barely. Validation selects no intensity gate for either model, only a
# 30 px minimum area. On test it removes 3 of the baseline's 58 false positives (AP@0.5 0.773 ->
# 0.775, no true nucleus lost); the fine-tuned model has few false positives left (20, precision
# 0.97), and the gate only costs it one true nucleus (AP@0.5 0.824 -> 0.823). Neither change is a
# claim: the baseline's +0.003 AP has a 95% t interval over the 6 test donors of about [-0.001,
# 0.006] (section 5). Fine-tuning removes far more false positives than any gate.
#
# The steps are those of `seglab.experiments.e3_gating`.

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
gate_channel = 1
gate_q_lows = [0.0, 0.05, 0.1]
gate_q_highs = [1.0, 0.98, 0.95]
gate_min_areas_px = [0.0, 30.0, 60.0]
pixel_size_um = None
gate_min_areas_um2 = [0.0, 10.0, 20.0, 30.0]
gate_models = ['baseline', 'finetuned_generic']
torch_threads = 1
run_dir = None
profile = "interactive"

# %%
import json
import time

from seglab.core import workers
from seglab.experiments import e3_gating as e3
from seglab.plots import claims as plots_claims
from seglab.plots import evaluation as plots
from seglab.workflow.runs import attach

t_start = time.monotonic()
run = attach("03_gating", run_dir, profile, globals())
params, mask = run.params, run.mask
print("run folder:", run.run_dir)
print("torch threads:", workers.set_threads(params["torch_threads"]))
space = e3.gate_space(params)
print(space.describe())

# %% [markdown]
# ## 1. Predictions of the baseline and the fine-tuned generic model
#
# The fine-tuned model is E1's (same training settings, so the same cache folder in `data/models/`).

# %%
tiles = e3.annotated_tiles(params["cohort_dir"])
specs = e3.gate_models(params)
run.save_json(e3.models_record(specs), "models.json")
preds = e3.predictions(specs, tiles, mask)
print(f"predictions ready after {time.monotonic() - t_start:.1f} s")

# %% [markdown]
# ## 2. What the gates see on validation
#
# Mean marker intensity against area of every predicted instance, coloured by whether it matched a
# true nucleus (IoU >= 0.5). False positives that sit at the extremes of intensity or at small
# areas are what a gate can remove without losing true nuclei.

# %%
fig = plots.plot_gate_instances(e3.validation_instances(tiles.val, preds, space), space.channel)
run.save_figure(fig, "val_instances_intensity_area.png")
fig

# %% [markdown]
# ## 3. The gate grid on validation
#
# Pooled TP, FP, FN, precision, recall, F1 and AP@0.5 over the validation tiles for every gate.
# The selected gate maximises F1 (ties: the mildest gate). Heatmap: F1 over q_low x q_high at the
# selected minimum area; beside it, precision, recall and F1 against the minimum area at the
# selected quantiles.

# %%
sweep = e3.gate_sweep(tiles.val, preds, space)
run.save_table(sweep.table, "val_gate_sweep.csv")
print(sweep.describe())
fig = plots.plot_gate_grid(sweep.sweeps, sweep.selected, space.area_column)
run.save_figure(fig, "val_gate_grid.png")
display(fig)
sweep.selected_table.round(3)

# %% [markdown]
# ## 4. The selected gates on test, once
#
# Before (no gate) and after (the validation-selected gate), pooled over the test tiles at IoU 0.5,
# and what the removed instances were: false positives (good riddance) or true positives (lost
# nuclei), by the reason they were removed.

# %%
gated = e3.test_before_after(tiles.test, preds, sweep.selected, space, run.record_test_evaluation)
run.save_outputs(gated.tables())
gated.shown().round(3)

# %%
gated.removed()

# %%
fig = plots.plot_gate_before_after(gated.before_after)
run.save_figure(fig, "test_gate_before_after.png")
fig

# %% [markdown]
# ## 5. Does the gate change AP? The difference with its interval
#
# Per model, gated minus ungated pooled AP@0.5 on the same test tiles, with its **95% t interval
# over donors** (the donor is the unit of replication; `seglab.evaluate.claims`) and a donor-level
# paired permutation p-value. `<model>_gated_beats_<model>` in `summary.json` is true only when the
# whole interval lies above 0.

# %%
found = e3.gate_claims(gated)
run.save_table(found, "test_claims.csv")
fig = plots_claims.plot_differences(found, title="test: gated - ungated, pooled AP@0.5")
run.save_figure(fig, "test_gate_claims.png")
display(fig)
found[found["metric"] == "ap"].round(4)

# %% [markdown]
# ## Summary
#
# Headline numbers (`summary.json`): test AP@0.5, precision and false positives of each model
# without and with its gate, what the gate removed, and the selected gate; the gate's AP difference
# as `test_ap50_diff_<model>_gated_vs_<model>` with `_ci_low`, `_ci_high`, `_p_value`, `_n_donors`
# beside the flag `<model>_gated_beats_<model>`.

# %%
numbers = e3.headline(gated.before_after, gated.effect, sweep.selected, space.area_unit,
                      wall_s=time.monotonic() - t_start, claims_table=found)
print(json.dumps(run.summary(**numbers), indent=1))
