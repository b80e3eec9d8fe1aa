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
# # E10 active learning: does letting the model choose the tiles to annotate save labels?
#
# **Question.** Annotating tiles is the expensive step of every fine-tune. If the model picks the
# next tiles to annotate (those it is least sure about, or those least like what it has seen), does
# it reach the accuracy of training on every tile with fewer annotated tiles than a random choice?
#
# **How.** A simulated pool of tiles stands in for the unannotated tiles; the simulator's planted
# masks are the annotator (`annotation_noise` drops a fraction of objects, as a tired annotator
# would). Per strategy and repeat, one campaign (`seglab.active.campaign`, the same code as
# `seglab active init|select|ingest|train`): the same random initial tiles per repeat for every
# strategy, round 0 fine-tunes `baseline_model`, then each round selects `batch_tiles` tiles, ingests
# their corrections and fine-tunes from the previous round's checkpoint.
#
# - Strategies: random; entropy, margin (and confidence) of the cell probability; TTA agreement of
#   the masks under flips and rotations (`tta`); ensemble disagreement of the last two checkpoints
#   (`ensemble`); core-set on the network's style vectors (`coreset`); the weighted combination of
#   `weights` (`combined`). Definitions: `seglab.active.uncertainty`, `seglab.active.diversity`.
# - Scores: validation and test AP@0.5 (pooled over tiles) of each round's model against the
#   labelled tiles, mean and spread over repeats. Nothing is selected on test.
# - Headline: the labelled tiles each strategy needs to reach 95% of the test AP of training on
#   **all** pool tiles, as a ratio of random's (below 1 saves labels), with the per-repeat spread.
#
# **Answer (demo profile): not shown at this size.** On the mean test curves (2 repeats, a pool of 24
# simulated tiles, 4 initial + 3 rounds of 4), margin reaches 95% of the all-tiles test AP@0.5 (0.687
# of 0.723) with 9.9 labelled tiles, core-set with 10.5, entropy 11.2, the combination 11.3, the
# ensemble 11.5, random 13.0 and TTA 14.6: ratios to random of 0.76, 0.81, 0.86, 0.87, 0.89 and 1.12.
# But random reached the target in only one of its two repeats, the spread of AP between repeats
# (sd 0.01-0.08) is as large as the gaps between strategies, and at 16 labelled tiles random has the
# highest mean test AP (0.736). These ratios are a hint, not a claim; the note under section 3 says why.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell; the demo values are the defaults)
seed = 0
baseline_model = "generalist"
pool_tiles = 24
val_tiles = 8
test_tiles = 12
tile_px = 96
nuisance = {"density_per_mpx": 1500, "blur_fraction": 0.3, "touching_fraction": 0.5, "dim_fraction": 0.2}
initial_tiles = 4
batch_tiles = 4
rounds = 3
repeats = 2
strategies = ["random", "entropy", "margin", "tta", "ensemble", "coreset", "combined"]
weights = {"entropy": 1.0, "margin": 1.0, "tta_mask": 1.0, "ensemble": 1.0, "coreset": 0.5, "kmeans": 0.3}
tta_views = 3
ensemble_size = 2
aggregation = "region"
annotation_noise = 0.0
diameter_px = 13.6
flow_threshold = 0.4
cellprob_threshold = 0.0
min_size = 15
epochs = 10
learning_rate = 0.002
weight_decay = 0.0001
batch_size = 8
bsize = 64
nimg_per_epoch = None
min_train_masks = 1
torch_threads = 1
n_jobs = 2
run_dir = None
profile = "interactive"

# %%
import json
import time

from seglab.core import workers
from seglab.experiments import e10_active_learning as e10
from seglab.plots import active as plots_active
from seglab.workflow.runs import attach

run = attach("10_active_learning", run_dir, profile, globals())
params = run.params
workers.set_threads(params["torch_threads"])  # tiny nets: 1 thread beats 2 oversubscribed ones
t_start = time.monotonic()
print("run folder:", run.run_dir)

# %% [markdown]
# ## 1. The pool
#
# Simulated tiles of every marker in turn; pool, validation and test tiles are drawn from separate
# seeded generators.

# %%
pool = e10.make_pool(params)
print(pool.describe())

# %% [markdown]
# ## 2. The campaigns
#
# One campaign folder per strategy and repeat under the run folder (`campaigns/`), each with its
# rounds, selections (images, predicted label TIFFs, overlays, `selection.json`) and `history.csv`.
# A killed run resumes where it stopped. The reference fine-tunes on every pool tile.

# %%
folder = run.path("campaigns")
runs = e10.run_campaigns(params, pool, folder)
run.save_table(runs, "runs.csv")
ref = e10.reference(params, pool, folder)
run.save_table(ref, "reference.csv")
curve = e10.curves(runs)
run.save_table(curve, "curves.csv")
curve.round(3)

# %%
fig = plots_active.plot_curves(curve, ref)
run.save_figure(fig, "active_learning_curves.png")
fig

# %% [markdown]
# ## 3. Labels to reach 95% of the all-tiles AP
#
# `labels`: labelled tiles where the mean test curve first reaches 95% of the reference's mean test
# AP@0.5 (linear between rounds; empty when it never does); `ratio_vs_random`: that over random's;
# `ratio_mean` / `ratio_sd`: the same ratio per repeat (each against its own random campaign),
# over the repeats where both reached the target (`n_reached` of `n_repeats`).

# %%
labels = e10.labels_table(runs, ref)
run.save_table(labels, "labels_to_95.csv")
print(e10.verdict(labels))
labels.round(3)

# %%
fig = plots_active.plot_labels_ratio(labels)
run.save_figure(fig, "labels_to_95_ratio.png")
fig

# %% [markdown]
# **Why no strategy clearly beats random here.** The demo's pool is small (24 tiles) and
# homogeneous: every tile comes from the same simulator, with the same nucleus size and the same
# kinds of nuisance, so a random batch of 4 is already fairly representative, and each strategy
# can choose among only 20 candidates in round 1 and 12 in round 3. Each round adds 4 tiles and
# trains 10 epochs, so the noise of one fine-tune (the spread over repeats, on 12 test tiles) is as
# large as the differences between strategies; two repeats cannot separate them. The campaigns also
# train cumulatively (round N starts from round N-1's weights), while the all-tiles reference is
# one fine-tune from the base model, which is why 16 selected tiles can match it. The full
# profile (2,000 tiles, Cellpose-SAM, 10 rounds of 20, 5 repeats) is where the question can be
# answered.
#
# ## 4. Scoring cost per tile
#
# Seconds per candidate tile of each part of a selection: the plain network pass with masks
# (`forward`), the pixel measures, the extra TTA views and the ensemble's other members.

# %%
speed = e10.speed_table(folder, params["strategies"], params["repeats"])
run.save_table(speed, "scoring_seconds.csv")
speed.round(3)

# %% [markdown]
# ## Summary
#
# `labels_to_95_<s>` (tiles) and `labels_to_95_ratio_<s>` (vs random; `_ratio_sd_` over repeats),
# `test_ap50_all_tiles`, `test_ap50_final_<s>` (mean test AP@0.5 at the last round).

# %%
summary = run.summary(**e10.headline(labels, ref, runs), notebook_s=round(time.monotonic() - t_start, 1))
print(json.dumps(summary, indent=1))
