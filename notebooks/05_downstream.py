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
# # E5 downstream: does the choice of segmentation model change the biology?
#
# **Question.** A study counts marker-positive cells per tile, sums them per donor and correlates the donor
# features with clinical outcomes. If the off-the-shelf segmentation model is replaced by one fine-tuned on
# the cohort's own annotations, do the biological conclusions change, and are they closer to the truth?
#
# **How.** Every tile of the cohort is segmented by the baseline (`baseline_model`: cpsam in the full
# profile, the committed DSB2018 generalist in the demo) and by the fine-tuned generic model of E1 (read
# from the model cache). Each model's masks, and the ground-truth masks ("truth"), go through the same
# downstream chain: tile counts -> donor features -> Spearman rho with every outcome -> BH FDR over a
# model's tests -> bootstrap stability; the analysis is repeated over positivity thresholds; and, because
# the cohort is simulated, each model's calls are scored against the effects `truth.json` planted.
#
# **Answer (demo profile, 480 tiles of 24 donors).** The model changes the calls; the fine-tuned one is closer
# to the truth in its correlations and makes no call the truth does not, but with honest p-values it calls
# fewer tests. With the ground-truth masks 10 of the 120 tests are significant. The baseline calls 10: 6 of the
# truth's and 4 the truth does not make (0.4 of its calls). The fine-tuned masks call 4, all among the truth's
# (none spurious). On the planted ratio tests the fine-tuned rho lie closer to the truth-mask rho (mean
# |rho - rho_truth| 0.067 against 0.077) and the donor ratios follow the planted latent score as the truth's
# do (mean rho 0.811; truth 0.809, baseline 0.789), but they reach q < 0.05 on 0.125 of the planted tests
# against the baseline's 0.25 (the ground-truth masks: 0.25). Every planted test has the right sign with all
# three, and no null marker is called. So, on this cohort, the fine-tuned masks give the more faithful
# correlations and the baseline the more significant ones, some of them not the truth's.
#
# **Why this changed, and why the margin is fragile.** Above 9 donors the p-value is a permutation p (200,000
# seeded pairings, `seglab.downstream.stats`), not scipy's t approximation, whose too-light tail called false
# discoveries in 7-8% of simulated null cohorts of 24 donors at alpha 0.05 (issue 13). Under the t
# approximation this notebook reported 14 significant tests for the fine-tuned masks, 12 for the truth and 10
# for the baseline; those 14 sat at q 0.028-0.048, just inside the BH line, and moved out of it with a p that
# is 20-40% larger there. Many tests sit near the line for every mask source: read the verdict together with
# the threshold sensitivity (section 5) and the bootstrap stability (section 4), not as a single number.
#
# The experiment is described once in `seglab.experiments.e5_downstream`: its steps are called below in
# order, and its inference is the same call a Slurm prepare array makes (`seglab prepare 05`), so this
# notebook reads the cached masks when the array ran first.

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
predictions_dir = "data/predictions"
n_shards = 4
shards = None
batch_tiles = 16
inference_batch_size = None
percentile = 75
percentiles = [60, 70, 75, 80, 90]
features = ["ratio", "positive_per_mpx", "total_per_mpx"]
outcomes = None
pixel_size_um = None
alpha = 0.05
bootstrap_B = 200
sensitivity_B = 0
inference_jobs = 2
min_donors = 5
run_dir = None
profile = "interactive"

# %%
# %matplotlib inline
import time

from seglab.experiments import e5_downstream as e5
from seglab.workflow.runs import attach

t_start = time.monotonic()
run = attach("05_downstream", run_dir, profile, globals())
print("run folder:", run.run_dir)

# %% [markdown]
# ## 1. The two models
#
# The baseline is used as it comes. The fine-tuned model is E1's generic variant (all markers, the annotated
# training tiles, the shared training settings), found in the content-addressed model cache `data/models/`;
# E5 never trains it (run 01, or `seglab prepare 01 --all`, first). Each model is identified by the sha256 of
# its weights.

# %%
model_records, models_table = e5.model_table(run.params)
run.save_json(model_records, "models.json")
models_table

# %% [markdown]
# ## 2. Inference over every tile (sharded, resumable)
#
# Each model's masks go to its own prediction folder, named by the sha256 of its weights and a hash of the mask
# settings (diameter, flow and cell-probability thresholds, min_size) and of the tiles' files. A tile already
# segmented there is not segmented again, whether a previous run, another notebook or a Slurm prepare array
# (`seglab prepare 05`, one task per model and shard) made it. `shards` picks which of the `n_shards`
# round-robin shards (every N-th tile by sorted id) this run covers; null, as in the demo and full profiles,
# means every tile. The table gives, per model, the tiles segmented here and reused, and tiles/s.

# %%
predictions = e5.predict_all(run.params)
run.save_outputs(e5.inference_outputs(run.params, predictions))
e5.inference_table(predictions)

# %% [markdown]
# ## 3. Tile counts: each model's masks and the ground-truth masks
#
# One pass over each tile's marker channel and mask gives the cells, their mean marker intensity, and the
# marker-positive cells (mean intensity above the tile's `percentile`-th percentile of marker pixels) at that
# and every sensitivity percentile. The ground-truth masks exist for every tile of the simulated cohort; on
# real tiles only the annotated ones have masks, and the comparison with truth is then left out.
#
# In the demo both models find about nine in ten of the true cells (per-tile Pearson r 0.96 for cells, 0.92-0.93
# for marker-positive cells); the scatter shows, per tile, the count of each model against the true count.

# %%
counts = e5.tile_counts(run.params, predictions)
count_outputs = counts.outputs()
run.save_outputs(count_outputs)
print(counts.describe(run.params))
display(counts.totals())
display(*e5.figures(count_outputs))

# %% [markdown]
# ## 4. Correlations with the clinical outcomes, FDR and bootstrap stability
#
# Per model: donor features (counts summed over the donor's tiles of one marker, then the ratio and the
# densities), one Spearman test per marker x feature x outcome, BH q over all tests of the model, and
# `bootstrap_B` resamples of the tiles within each donor x marker (the same draws for every model: a paired
# bootstrap). With one tile per donor x marker every resample is the original and the intervals collapse onto
# rho (the cell above says so when it happens).
#
# In the demo the ground-truth masks give 10 significant tests, the baseline 10 and the fine-tuned model 4;
# the heatmaps show where they agree (`*`: q < alpha).

# %%
clinical = e5.clinical_table(run.params)
corr = e5.correlations(counts, clinical, run.params)
run.save_outputs(corr.outputs())
corr.overview()

# %%
heatmaps = corr.heatmaps(run.params)
run.save_outputs(heatmaps)
display(*heatmaps.values())

# %%
stability = corr.stability(run.params)
run.save_outputs(stability)
display(*stability.values())

# %% [markdown]
# ## 5. Threshold sensitivity
#
# The positivity threshold moves over the percentiles of each tile's marker pixels; each percentile is its own
# FDR family. A finding that holds only at one percentile is fragile. In the demo the number of significant
# tests swings with the threshold for every mask source (the table: significant tests per percentile and model;
# truth 11, 8, 10, 8, 3 at the 60th, 70th, 75th, 80th and 90th; baseline 2, 2, 10, 11, 5; fine-tuned 1, 3, 4,
# 11, 4), most at the low percentiles, where both models lose most of the truth's calls.

# %%
sens = e5.sensitivity(counts, clinical, run.params)
sens_outputs = sens.outputs()
run.save_outputs(sens_outputs)
display(*e5.figures(sens_outputs))
sens.significant_by_percentile()

# %% [markdown]
# ## 6. Recovery of the planted effects
#
# `truth.json` plants a log-odds effect per marker on the fraction of positive cells (per SD of the donors'
# latent score; two markers are null). The expected sign of each ratio test is the sign of the effect times
# the outcome's own direction (ceradsc falls as pathology rises). Per model: the fraction of the planted tests
# **recovered** (q < alpha with the right sign), the fraction with the **right sign** whatever q, the **false
# positives** on the null markers, and how far its rho lies from the rho on the ground-truth masks. The last
# panel shows the planted effect itself without clinical noise: the Spearman rho of each donor's ratio with
# its latent score. The second figure repeats the recovery at every positivity percentile.
#
# In the demo, at the 75th percentile the fine-tuned masks recover 0.125 of the planted tests, the baseline's
# 0.25 and the ground-truth masks' 0.25, with every sign right and no null marker called. Across percentiles the
# fine-tuned model is level with the baseline at 70 and 80 (0.083 and 0.25) and behind at 60, 75 and 90, while
# its rho lie closer to the truth's at 60, 75 and 80 and level at 70 and 90: closer correlations, fewer of them
# past the BH line.

# %%
truth = e5.planted_effects(run.params)
recovery = e5.planted(truth, corr, sens, clinical, counts, run.params)
recovery_outputs = recovery.outputs() if recovery is not None else {}
run.save_outputs(recovery_outputs)
display(*e5.figures(recovery_outputs))
recovery.per_model.round(3) if recovery is not None else "no truth.json: real tiles, no planted effects to recover"

# %%
recovery.latent_table() if recovery is not None else None

# %% [markdown]
# ## Verdict and summary
#
# The issue asks that the fine-tuned model recover the planted effects at least as well as the baseline. The
# cell below states whether it does on this run, by the fraction of planted tests recovered and, as a
# tie-breaker, by the false positives on the null markers and the distance of rho from the truth-mask rho;
# `summary.json` keeps the headline numbers of every step. On the demo it does not (0.125 against 0.25), while
# its rho are closer to the truth's and none of its calls is one the truth does not make
# (`false_calls_vs_truth_*`: 0.0 against 0.4).

# %%
print(e5.verdict(recovery, has_truth=counts.has_truth))
summary = run.summary(**e5.headline(run.params, predictions, counts, corr, recovery),
                      wall_s=round(time.monotonic() - t_start, 1))
summary
