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
# # E6 leave-one-marker-out: does fine-tuning generalise to a marker it never saw?
#
# **Question.** The users will meet markers that no annotation covers. Does a model fine-tuned on
# the other markers segment a new marker's tiles as well as one whose training included it?
#
# **How.** For each marker m the off-the-shelf model (`baseline_model`) is fine-tuned on the
# annotated training tiles of **every other marker** (variant `leave_one_marker_out`; m's tiles are
# left out of training and of the training run's validation) and scored on **m's tiles only**. Two
# references run on the same tiles: the generic model fine-tuned on all markers (the same model as
# in 01, reused from the cache `data/models/`) and the baseline without fine-tuning.
#
# - gap = AP(generic) - AP(leave-one-out) on m's tiles: what not annotating m costs. A gap near 0
#   means the other markers' annotations transfer; the leave-one-out model beating the baseline means
#   fine-tuning on other markers still helps.
# - Selection: none. Every model uses the shared default thresholds (`flow_threshold`,
#   `cellprob_threshold`); validation (m's validation tiles) is reported beside test so the two can
#   be compared, and the test split is evaluated once per model, recorded in the run's manifest.
#
# **Answer (demo profile).** Yes, the annotations transfer: on the held-out marker's test tiles the
# leave-one-out models reach a mean pooled AP@0.5 of 0.818 against 0.821 for the generic model that
# saw every marker (mean gap 0.002; 0.009 on validation), and beat the baseline (0.771) on every
# marker. The one marker that costs something when left out is NeuN (gap 0.041); on the other four
# the leave-one-out model is as good as or slightly better than the generic one. With one test tile
# per donor and marker, no gap is a claim: every marker's 95% t interval over its 4-5 donors
# includes 0, and over all held-out tiles the gap is about +0.002 with an interval of about +-0.02,
# while the leave-one-out models beat the baseline there (about +0.05, the interval above 0).
#
# The steps are those of `seglab.experiments.e6_leave_one_marker_out`; a Slurm prepare array trains
# the same fine-tunes beforehand (`seglab prepare 06`), and this notebook then finds them in the cache.

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
lomo_markers = []
torch_threads = 1
n_jobs = 2
run_dir = None
profile = "interactive"

# %%
import json
import time

from seglab.core import workers
from seglab.evaluate import scoring
from seglab.experiments import e6_leave_one_marker_out as e6
from seglab.plots import claims as plots_claims
from seglab.plots import efficiency as plots_efficiency
from seglab.workflow.runs import attach

run = attach("06_leave_one_marker_out", run_dir, profile, globals())
params = run.params
workers.set_threads(params["torch_threads"])  # tiny nets: 1 thread beats 2 oversubscribed ones
t_start = time.monotonic()
print("run folder:", run.run_dir)

# %% [markdown]
# ## 1. Markers, splits and models
#
# One fine-tune per held-out marker, plus the generic model (cached by 01 when the shared training
# settings agree; the rest normally by `seglab prepare 06`). The table lists, per held-out marker,
# the model, how many tiles it trained on and a hash of that tile set; no training tile carries the
# held-out marker (checked).

# %%
design = e6.design(params)
trained = e6.train_models(params, design.markers)
run.save_table(trained.lomo, "lomo_models.csv")
run.save_json(e6.model_records(trained), "models.json")
print(design.describe())
trained.lomo

# %% [markdown]
# ## 2. Validation: each held-out marker's validation tiles
#
# Nothing is chosen from these numbers (every model uses the default thresholds); they show what a
# user would see before touching test.

# %%
val_table, val_per_image = e6.score_split(params, trained, design.val, run.mask)
run.save_table(val_table, "val_scores.csv")
run.save_table(val_per_image, "val_per_image.csv")
val_gaps = scoring.gap_table(val_table)
val_gaps.round(3)

# %% [markdown]
# ## 3. Test: each held-out marker's test tiles, evaluated once per model
#
# `run.record_test_evaluation` is called right before each model's test tiles are segmented (one
# record per leave-one-out model, one for the generic model, one for the baseline).

# %%
test_table, test_per_image = e6.score_split(params, trained, design.test, run.mask,
                                            before=run.record_test_evaluation)
run.save_table(test_table, "test_scores.csv")
run.save_table(test_per_image, "test_per_image.csv")
gaps = e6.marker_gaps(test_table)
run.save_table(gaps, "test_gaps.csv")
gaps.round(3)

# %%
fig = plots_efficiency.plot_marker_bars(test_table, test_per_image, models_order=["baseline", "generic", "lomo"],
                                        labels=e6.MODEL_LABELS, ylabel="test AP@0.5 (bars: pooled; dots: per tile)",
                                        title="leave-one-marker-out: each marker's test tiles")
run.save_figure(fig, "lomo_test_bars.png")
fig

# %% [markdown]
# ## 4. How sure are we? Each held-out marker's gap with its interval
#
# Per held-out marker, on its test tiles (and over every held-out marker's tiles, `all`): the gap
# generic - leave-one-out (what not annotating the marker costs) and leave-one-out - baseline (what
# fine-tuning on the other markers gains), as paired differences in pooled AP@0.5 with their **95% t
# interval over donors** (the donor is the unit of replication; `seglab.evaluate.claims`). A claim
# such as `generic_beats_lomo_neun` is made only when the whole interval lies above 0; with one
# donor there is no interval.

# %%
found = e6.marker_claims(test_per_image, design.markers)
run.save_table(found, "test_claims.csv")
fig = plots_claims.plot_differences(found, title="test: paired differences per held-out marker, pooled AP@0.5")
run.save_figure(fig, "lomo_test_claims.png")
display(fig)
found[found["metric"] == "ap"].round(4)

# %% [markdown]
# ## Summary
#
# `test_ap50_lomo_<m>`, `test_ap50_generic_<m>`, `test_ap50_baseline_<m>`: pooled test AP@0.5 on
# marker m's test tiles; `test_ap50_gap_mean`: the mean over markers of generic minus leave-one-out
# (positive: the held-out marker's annotations matter); `val_ap50_gap_mean`: the same on validation;
# per marker m (and `all`) `test_ap50_diff_generic_vs_lomo_<m>` and `test_ap50_diff_lomo_vs_baseline_<m>`
# with `_ci_low`, `_ci_high`, `_p_value`, `_n_donors` beside the flags `generic_beats_lomo_<m>` and
# `lomo_beats_baseline_<m>` (`e6.headline`).

# %%
summary = run.summary(**e6.headline(design.markers, test_table, gaps, val_gaps, trained, found),
                      notebook_s=round(time.monotonic() - t_start, 1))
print(json.dumps(summary, indent=1))
