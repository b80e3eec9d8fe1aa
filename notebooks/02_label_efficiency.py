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
# # E2 label efficiency: how many annotated tiles does fine-tuning need?
#
# **Question.** Annotating tiles is the expensive part of fine-tuning. How much of the gain of
# fine-tuning on every annotated training tile does a smaller annotation budget already buy, and
# where does the curve flatten?
#
# **How.** The off-the-shelf model (`baseline_model`: Cellpose-SAM in the full profile, the
# committed tiny generalist in the demo) is fine-tuned on **budgets** of annotated training tiles,
# each budget drawn `repeats` times at random, and every model is scored on the **validation**
# split at IoU 0.5 (AP pooled over tiles, and the mean of the per-tile AP). Two reference lines
# frame the curve: the baseline (no fine-tuning) and the generic model fine-tuned on all training
# tiles (notebook 01's model, reused from the cache `data/models/`).
#
# **Answer (demo profile).** Every budget helps and more tiles keep helping: pooled validation
# AP@0.5 rises from 0.760 without fine-tuning to 0.800 with 4 tiles, 0.821 with 12 and 0.855 with
# 36, against 0.867 with all 72. Within the budgets tried the curve has not flattened (the
# plateau, within 0.02 AP of the best budget, is the largest budget, 36 tiles): half the
# annotations recover most, but not all, of the full-data gain. With 95% t intervals over the 6
# validation donors: from 12 tiles on, every budget beats the baseline (4 tiles: +0.04 AP, an
# interval that reaches below 0), and no budget is shown to be within 0.02 AP of all 72 tiles (36
# tiles: -0.012 [-0.025, 0.001]), so there is no plateau by the interval. Per marker, GFAP gains
# most from more labels; PECAM flattens after 12 tiles.
#
# Design choices:
# - Repeat `r` draws its tiles with `budget_seed = r`; the training seed and every training setting
#   stay the shared ones (`run.training`), so the spread across repeats is the spread due to
#   *which* tiles were annotated.
# - With `nimg_per_epoch` set, every model takes the same number of optimizer steps whatever its
#   budget: the curve compares data, not compute. (With `nimg_per_epoch: null`, an epoch is one pass
#   over the budget's tiles, so small budgets would also get fewer steps.)
# - The **plateau** is the smallest budget whose mean validation AP@0.5 (pooled) is within
#   `plateau_tolerance_ap` of the best budget's mean: annotating more buys at most that much.
#   The **plateau by the interval** (section 6) asks more: the smallest budget whose 95% interval of
#   (budget - all tiles) stays above `-plateau_tolerance_ap`.
# - Nothing is selected here and the test split is never touched: E2 is a validation-only study.
#
# The steps are those of `seglab.experiments.e2_label_efficiency`; a Slurm prepare array trains the
# same fine-tunes beforehand (`seglab prepare 02`), and this notebook then finds them in the cache.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell; the demo values are the defaults)
cohort_dir = "data/cohorts/demo"
seed = 0
baseline_model = "generalist"
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
budgets = [4, 12, 36]
repeats = 2
plateau_tolerance_ap = 0.02
reference_full_data = True
torch_threads = 1
n_jobs = 2
rescore_per_image = True
run_dir = None
profile = "interactive"

# %%
import json
import time

from seglab.core import workers
from seglab.experiments import e2_label_efficiency as e2
from seglab.plots import claims as plots_claims
from seglab.plots import efficiency as plots_efficiency
from seglab.workflow.runs import attach

run = attach("02_label_efficiency", run_dir, profile, globals())
params = run.params
workers.set_threads(params["torch_threads"])  # tiny nets: 1 thread beats 2 oversubscribed ones
t_start = time.monotonic()
print("run folder:", run.run_dir)

# %% [markdown]
# ## 1. Budgets and the validation split
#
# The budgets are checked against the number of annotated training tiles before anything trains.

# %%
design = e2.design(params)
print(design.describe())
print("training settings (shared with every notebook):", run.training)

# %% [markdown]
# ## 2. Fine-tune every (budget, repeat), and the generic model on all training tiles
#
# Models already in the cache `data/models/` are reused (the generic one normally comes from 01,
# the rest from `seglab prepare 02`); the rest train `n_jobs` at a time, each in its own process.

# %%
trained = e2.train_models(params, design.budgets)
print(trained.describe())

# %% [markdown]
# ## 3. Reference lines: the baseline and the generic model fine-tuned on all training tiles
#
# Both are scored on the validation tiles like every budget model; notebook 01 made these network
# passes, so they come from the output cache `data/cache/outputs/`.

# %%
references = e2.score_references(params, design, trained, run.mask)
run.save_table(references.table, "val_references.csv")
run.save_table(references.per_image, "val_references_per_image.csv")
if references.generic_record:
    run.save_json(references.generic_record, "generic_model.json")
references.table[e2.REFERENCE_COLUMNS].round(3)

# %% [markdown]
# ## 4. Score every (budget, repeat) on validation
#
# One row per model: the budget, the draw (`budget_seed`), the tiles it trained on (ids and a hash
# of the set, so identical draws are visible), whether the model came from the cache, and its
# validation scores. With `rescore_per_image` each model segments the validation tiles (per-tile
# scores in `val_per_image.csv`); without it the validation AP is the one training computed at its
# end on the same tiles with the default mask settings, which saves one validation pass per model.

# %%
runs, per_image = e2.score_budgets(params, design, trained, run.mask)
run.save_table(runs, "budget_runs.csv")
if params["rescore_per_image"]:
    run.save_table(per_image, "val_per_image.csv")
runs[e2.RUN_COLUMNS].round(3)

# %% [markdown]
# ## 5. The learning curve and its plateau
#
# Left: AP@0.5 pooled over the validation tiles; right: the mean of the per-tile AP@0.5. Each dot is
# one draw; the line is the mean over draws with SD bars, the band the min-max over draws. (The
# spread of the per-tile AP across tiles, for each model, is `ap_sd`, `ap_min`, `ap_max` in
# `budget_runs.csv` when the models are rescored.)

# %%
curve = e2.learning_curve(runs)
run.save_table(curve, "learning_curve.csv")
plateau = e2.plateaus(curve, params["plateau_tolerance_ap"])
print(e2.describe_plateau(curve, plateau, params["plateau_tolerance_ap"]))
curve.round(3)

# %%
fig = plots_efficiency.plot_learning_curve(
    runs, e2.CURVE_METRICS, references=e2.reference_lines(references, design.n_train_tiles),
    plateau=plateau, tolerance=params["plateau_tolerance_ap"],
    title=f"label efficiency: {design.repeats} draws per budget, validation split ({len(design.val)} tiles)")
run.save_figure(fig, "learning_curve.png")
fig

# %% [markdown]
# ## 6. How sure are we? Each budget against all tiles and the baseline, with its interval
#
# Each budget's draws are averaged per validation tile (tp, fp, fn), and the budget is compared with
# the model fine-tuned on all tiles and with the baseline on the same tiles: the difference in pooled
# AP@0.5 with its **95% t interval over donors** (the donor is the unit of replication;
# `seglab.evaluate.claims`). The **plateau by the interval** is the smallest budget whose interval
# of (budget - all tiles) stays above `-plateau_tolerance_ap`: the data cannot show that it falls
# short of all tiles by more than the tolerance. The interval is over validation tiles and donors
# for these draws; the spread between draws is the curve's above. Needs `rescore_per_image: true`.

# %%
found = e2.budget_claims(per_image, references)
run.save_table(found, "val_claims.csv")
plateau_ci = e2.plateau_by_interval(found, params["plateau_tolerance_ap"])
print(e2.describe_plateau_ci(found, params["plateau_tolerance_ap"]))
if not found.empty:
    fig = plots_claims.plot_difference_curve(
        found, "budget", labels={"finetuned_generic": f"all {design.n_train_tiles} tiles", "baseline": "baseline"},
        tolerance=params["plateau_tolerance_ap"], mark=(plateau_ci, f"plateau by the interval: {plateau_ci}"),
        xlabel="annotated training tiles (budget)", title="validation: budget minus each reference")
    run.save_figure(fig, "val_claims.png")
    display(fig)
found[found["metric"] == "ap"].round(4)

# %% [markdown]
# ## 7. Which markers need the labels?
#
# Pooled validation AP@0.5 per marker and budget (mean over draws). A marker whose AP keeps
# climbing with the budget is where new annotations pay off most. Needs the per-tile scores
# (`rescore_per_image: true`).

# %%
if params["rescore_per_image"]:
    marker_curve = e2.marker_curve(per_image)
    run.save_table(marker_curve, "learning_curve_per_marker.csv")
    fig = plots_efficiency.plot_marker_learning_curve(marker_curve, design.budgets)
    run.save_figure(fig, "learning_curve_per_marker.png")
    display(fig)
else:
    print("per-marker curves skipped: rescore_per_image is false (the models were not rescored per tile)")

# %% [markdown]
# ## Summary
#
# `val_ap50_budget_<b>_mean` / `_sd`: pooled validation AP@0.5 at budget b, mean and SD over draws;
# `val_ap50img_budget_<b>_mean`: the same for the mean over tiles; `plateau_budget` (pooled) and
# `plateau_budget_img` (mean over tiles); the two reference lines `val_ap50_baseline` and
# `val_ap50_finetuned_generic`; per budget b and reference r `val_ap50_diff_budget_<b>_vs_<r>` with
# `_ci_low`, `_ci_high`, `_p_value`, `_n_donors` beside the flag `budget_<b>_beats_<r>`, and
# `plateau_budget_ci`, the plateau by the interval (`e2.headline`).

# %%
summary = run.summary(**e2.headline(curve, plateau, params["plateau_tolerance_ap"], references, runs, trained,
                                    found),
                      notebook_s=round(time.monotonic() - t_start, 1))
print(json.dumps(summary, indent=1))
