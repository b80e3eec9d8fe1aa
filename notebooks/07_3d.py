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
# # E7 volumes: which 3D method at which anisotropy?
#
# **Question.** Users segment 3D stacks of nuclei with a 2D network. Four ways to get 3D instances
# from it: the **orthoplane** consensus (the model on every xy, xz and yz plane of the volume
# resampled to isotropic voxels, each orientation's masks stitched into 3D, objects kept where at
# least two of the three stacks agree, voxels by majority vote), its fast mode **xy** (the xy stack
# alone), cellpose's **cellpose3d** (`do_3D`: the network on YX, ZY and ZX slices, flows summed,
# `anisotropy` given) and **stitch** (2D masks per native xy plane linked by IoU,
# `stitch_threshold`). Which is best, and does the answer change with the anisotropy (z step / xy
# pixel size)?
#
# **How.** One simulated nnU-Net dataset per anisotropy (1, 2, 4; ellipsoid nuclei of varied size
# and orientation, touching neighbours, blur stronger along z, noise; planted truth). The tiny 2D
# generalist is fine-tuned on 2D slices of the training volumes (xy, xz and yz when isotropic, xy
# only otherwise), then each method segments the test volumes into `imagesTs_<method>/`, and every
# `imagesTs_*` folder is evaluated against `instancesTs`: AP, precision, recall and F1 at IoU 0.5,
# 0.75, 0.9, foreground IoU and Dice, boundary F1 at 2 voxels, split and merged counts. Nothing is
# selected on the test volumes.
#
# **Answer (demo profile).** `cellpose3d` at every anisotropy: pooled test AP@0.5 0.690, 0.675 and
# 0.583 at anisotropy 1, 2 and 4, against 0.32-0.45 for the three 2D-per-plane methods (precision
# 0.85-0.92, no split nucleus; summing the flows of the three orientations before the dynamics
# separates touching nuclei that per-plane masks merge). Its lead shrinks as z gets coarser (margin
# over the runner-up 0.30, 0.29, 0.13). Among the others, `stitch` overtakes at anisotropy 4
# (0.449, where each nucleus spans only 2-4 planes), `xy` and `orthoplane` are close at 2 and 4;
# the `orthoplane` consensus has the highest precision of the 2D methods (0.78-0.82) and the fewest
# merges but the lowest recall: each stack's 3D objects (2D masks stitched across its planes) merge
# touching nuclei differently, so fewer objects find a partner in a second stack (at anisotropy 1,
# 102 of 149 nuclei are matched by at least one stack, 49 by at least two, 51 by the consensus). With this tiny
# fine-tuned net, prefer `cellpose3d`; `stitch` is the fast choice (5-17x less time per megavoxel than cellpose3d)
# for strongly anisotropic stacks. On StarDist's real-looking volume the ranking is the same
# (cellpose3d AP@0.5 0.62, orthoplane 0.38, xy and stitch about 0.05-0.07: they merge its nuclei).

# %% tags=["parameters"]
# Parameters (papermill replaces this cell; the demo values are the defaults)
volumes_dir = "data/volumes/demo"
anisotropies = [1.0, 2.0, 4.0]
n_train = 2
n_test = 1
shape_um = [32.0, 96.0, 96.0]
seed = 0
baseline_model = "generalist"
epochs = 10
learning_rate = 0.002
weight_decay = 0.0001
batch_size = 8
bsize = 64
nimg_per_epoch = 24
plane_step = 2
diameter_px = 14.0
flow_threshold = 0.4
cellprob_threshold = 0.0
min_size = 15
methods = ["orthoplane", "xy", "cellpose3d", "stitch"]
stitch_threshold = 0.5
consensus_iou = 0.3
downsample = 1.0
eval_bsize = 128
thresholds = [0.5, 0.75, 0.9]
boundary_tol_voxels = 2.0
stardist_check = True
torch_threads = 1
run_dir = None
profile = "interactive"

# %%
import json
import time

from seglab.core import workers
from seglab.experiments import e7_3d as e7
from seglab.plots import volumes as plots_volumes
from seglab.workflow.runs import attach

run = attach("07_3d", run_dir, profile, globals())
params = run.params
workers.set_threads(params["torch_threads"])  # tiny nets: 1 thread beats 2 oversubscribed ones
t_start = time.monotonic()
print("run folder:", run.run_dir)

# %% [markdown]
# ## 1. Simulated volumes, one dataset per anisotropy
#
# Each dataset is in the nnU-Net raw layout (`imagesTr/<case>_0000.tiff`, `instancesTr/<case>.tiff`,
# `imagesTs/`, `instancesTs/`), the voxel size in each file's metadata. The same physical extent at
# every anisotropy, so a larger anisotropy means fewer planes.

# %%
datasets = e7.make_datasets(params)
data_table = e7.describe_datasets(datasets)
run.save_table(data_table, "datasets.csv")
data_table

# %% [markdown]
# ## 2. Fine-tuning the 2D model on slices
#
# One model per dataset, cached in the dataset's `models/` folder (keyed by the base model and the
# training settings).

# %%
trained = e7.fine_tune(params, datasets)
run.save_table(trained.table(), "models.csv")
trained.table()

# %% [markdown]
# ## 3. Every method on the test volumes, every `imagesTs_*` folder evaluated
#
# `run.record_test_evaluation` is called before each method's test volumes are segmented.
# Pooled over the test volumes; `seconds_per_megavoxel` is the prediction time on this CPU.

# %%
comparison, per_volume = e7.predict_and_evaluate(params, datasets, trained, run.mask,
                                                 before=run.record_test_evaluation)
run.save_table(comparison, "test_comparison.csv")
run.save_table(per_volume, "test_per_volume.csv")
cols = ["anisotropy", "method", "n_true", "n_pred", "tp", "ap", "precision", "recall", "f1", "foreground_dice",
        "boundary_f1", "n_split", "n_merged", "seconds_per_megavoxel"]
comparison[comparison["threshold"] == 0.5][cols].round(3)

# %%
answer = e7.answer(comparison)
run.save_table(answer, "answer.csv")
answer

# %% [markdown]
# Why the consensus finds what it finds: the true nuclei each orientation's stack matches at IoU 0.5
# (from the per-plane files `<case>_xy|xz|yz.tiff`), how many at least one and at least two stacks
# match, and how many the consensus matches. The consensus can only keep what two stacks agree on.

# %%
agreement = e7.stack_agreement(datasets)
run.save_table(agreement, "orthoplane_stack_agreement.csv")
agreement

# %%
fig = plots_volumes.plot_method_comparison(comparison, group="anisotropy", methods=list(dict.fromkeys(comparison["method"])),
                                           title="test volumes, pooled: method x anisotropy")
run.save_figure(fig, "method_comparison.png")
fig

# %% [markdown]
# ## 4. What the errors look like
#
# Orthogonal slices through the centre of the first test volume at the largest anisotropy, for
# each method: matched predictions green, false positives red, missed nuclei orange (IoU 0.5).

# %%
orthoslices = e7.orthoslice_figures(params, datasets)
run.save_outputs(orthoslices)
display(*orthoslices.values())

# %% [markdown]
# ## 5. A real-looking volume: StarDist's `test_image_nuclei_3d`
#
# The small 3D nuclei volume StarDist ships with its package (31 x 61 x 57 voxels, 51 nuclei,
# anisotropy about 2), segmented by each method with the model fine-tuned at the closest
# anisotropy. Skipped when stardist is not installed (or `stardist_check` is false).

# %%
stardist = e7.stardist_check(params, trained, run.mask) if params["stardist_check"] else None
if stardist is None:
    print("StarDist check skipped (stardist not installed or stardist_check false)")
else:
    run.save_table(stardist, "stardist_check.csv")
    display(stardist.round(3))

# %% [markdown]
# ## Summary
#
# `test_ap50_<method>_aniso<a>`, `test_f1_50_<method>_aniso<a>`, `test_boundary_f1_<method>_aniso<a>`:
# pooled over the test volumes of the dataset at anisotropy a; `best_method_aniso<a>`: the best
# method there by AP@0.5; `stardist_ap50_<method>`: AP@0.5 on StarDist's volume (`e7.headline`).

# %%
summary = run.summary(**e7.headline(comparison, answer, trained, stardist),
                      notebook_s=round(time.monotonic() - t_start, 1))
print(json.dumps(summary, indent=1))
