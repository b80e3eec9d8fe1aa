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
# # E0 data: simulated cohort, tile discovery, donor splits, coverage audit
#
# **Question.** Is the cohort the rest of the study runs on sound: every tile paired with its channels,
# the annotated tiles split by donor with no donor on two sides, the donors covered by the clinical
# table, a planted answer that the downstream rule can recover, and nuclei that look like real ones?
#
# **Answer (demo profile).** 480 paired tiles from 24 donors (29 fall back to the `_c2` marker channel,
# none unpaired or excluded); 120 annotated tiles split 72 / 24 / 24 by donor; two donors lack clinical
# rows and two clinical donors lack tiles, each named in the audit. On the true masks the downstream
# positivity rule agrees with the planted positivity on about 94% of cells per tile, the ceiling that
# segmentation can only lower. Simulated nuclei match DSB2018's closest acquisition group in size and
# SNR and are somewhat denser and less contrasted.
#
# The users' tiles (multiplexed fluorescence of aged human brain: DAPI plus one marker per tile,
# about 70 donors, a clinical table keyed by `projid`) are private. This notebook builds the
# cohort the rest of the study runs on in the demo profile: a **simulated** cohort with a
# planted answer (`seglab.data.simulate`), then does what E0 does on real data (`seglab.data.manifest`);
# every step is a function of `seglab.experiments.e0_data`, every figure one of `seglab.plots.data`:
#
# 1. discover the tiles from their file names and pair the channel files (`_c0` DAPI with `_c1`
#    marker, falling back to `_c2`);
# 2. build the manifest (tile, donor, marker, channel files, mask, annotated, split);
# 3. check the donor-level split (a donor on two sides is refused);
# 4. audit coverage against the clinical table (donors missing on either side, by id);
# 5. show example tiles with their instance outlines, the planted truth, and how realistic
#    the nuclei are compared with the real DSB2018 fluorescence nuclei.
#
# Set `tiles_dir` (and `masks_dir`, `clinical_csv`, `splits_yaml`, `annotated_csv`) to run the
# same audit on real tiles instead of the simulated cohort.

# %% tags=["parameters"]
# Parameters (papermill replaces this cell; the demo values are the defaults)
cohort_dir = "data/cohorts/demo"
seed = 0
n_donors = 24
tiles_per_marker = 4
size_px = 256
nuisance = {}
tiles_dir = None
masks_dir = None
clinical_csv = None
splits_yaml = None
annotated_csv = None
filename_pattern = None
n_example_tiles = 5
realism_max_tiles = 120
run_dir = None
profile = "interactive"

# %%
from seglab.workflow.runs import attach
run = attach("00_data", run_dir, profile, globals())

# %%
import json

from seglab.data import manifest as data
from seglab.data.dsb import find_dsb2018
from seglab.experiments import e0_data as e0
from seglab.plots import data as plots

print("run folder:", run.run_dir)

# %% [markdown]
# ## 1. The cohort
#
# In the simulated cohort every donor has a latent pathology score. The clinical table is driven by
# it; the fraction of marker-positive cells per tile follows it through a marker-specific planted
# effect (log-odds per SD of the score; two markers are null). Nuisances: touching and overlapping
# nuclei, size and shape variation, dim out-of-plane cells, out-of-focus tiles, uneven
# illumination, Poisson-Gaussian noise and autofluorescent lipofuscin granules in both channels.
# The cohort is generated once into `cohort_dir` (git-ignored); the same arguments give
# byte-identical files, and a different cohort is never written over it. Real tiles are discovered
# and paired instead; without a splits file their annotated tiles are split by donor here (seeded).

# %%
cohort = e0.prepare_cohort(run.params)
data.save_manifest(cohort.manifest, run.path("manifest.csv"))
run.save_json(cohort.audit, "audit.json")
if cohort.generated_splits is not None:   # real tiles without a splits file: the split made here
    data.save_splits(cohort.generated_splits, run.path("donor_splits.yaml"))
cohort.manifest.head()

# %% [markdown]
# ## 2. Coverage audit
#
# Paired tiles, the `_c2` fallbacks, tiles per marker, donors in the tiles and in the clinical
# table, and the donors missing on either side (by id). The full audit is `audit.json` in the run
# folder; the manifest is `manifest.csv`.

# %%
print(json.dumps(e0.audit_brief(cohort.audit), indent=1))

# %% [markdown]
# Every donor has tiles of every marker; a few of each donor's tiles are annotated. Donor ids in red
# have no row in the clinical table: they still go through segmentation, but drop out of the
# donor-level statistics of E5.

# %%
coverage = e0.coverage_tables(cohort.manifest)
run.save_table(coverage.tiles.reset_index(), "tiles_per_donor_marker.csv")
run.save_table(coverage.annotated.reset_index(), "annotated_per_split_marker.csv")
fig = plots.coverage_figure(coverage.tiles, coverage.annotated_grid, coverage.annotated,
                            missing_donors=cohort.audit.get("donors_missing_from_clinical"))
run.save_figure(fig, "coverage.png")
fig

# %% [markdown]
# ## 3. The donor split
#
# Annotated tiles are split by donor (train / val / test), never by tile: a donor on two sides is
# refused with its id. Unannotated tiles carry no split; every tile goes through inference later.

# %%
split_table = e0.split_donors(cohort.manifest)
run.save_table(split_table, "split_donors.csv")
fig = plots.split_figure(split_table)
run.save_figure(fig, "split.png")
fig

# %% [markdown]
# ## 4. Example tiles with their instance outlines
#
# One annotated tile per marker: DAPI, marker, and both together (marker red, DAPI blue) with the
# instance outlines in yellow. Note the marker morphologies: GFAP star-shaped astrocyte processes,
# IBA1 thin ramified microglia, NeuN large neuronal soma, OLIG2 nuclear signal, PECAM vessel strands;
# and the bright lipofuscin granules in both channels.

# %%
examples = e0.example_tiles(cohort.manifest, run.params["n_example_tiles"], seed=run.params["seed"])
fig = plots.example_tiles_figure(examples.rows, examples.images, examples.masks)
run.save_figure(fig, "example_tiles.png")
fig

# %% [markdown]
# ## 5. The planted truth
#
# `truth.json` holds each marker's planted effect and every donor's latent score and true counts.
# Below: the true positive fraction per donor against the latent score, and how well the downstream
# default rule (a cell is positive when its mean marker intensity over its mask exceeds the tile's
# 75th percentile of marker pixels) recovers the planted positivity **on the true masks** of the
# annotated tiles. This is the ceiling that segmentation can only lower.

# %%
truth = e0.planted_truth(cohort)   # None for real tiles: they have no planted answer
if truth is None:
    print("real tiles: no planted truth")
else:
    run.save_table(truth.effects, "planted_effects.csv")
    run.save_table(truth.counts, "truth_counts.csv")
    run.save_table(truth.agreement, "positivity_rule_on_true_masks.csv")
    fig = plots.planted_truth_figure(truth.counts, truth.effects)
    run.save_figure(fig, "planted_truth.png")
    display(fig)
    print(f"mean per-tile agreement of the 75th-percentile rule with the planted positivity: "
          f"{truth.rule_agreement:.3f}")
    display(truth.by_marker.round(3))

# %% [markdown]
# ## 6. Realism against real nuclei (DSB2018)
#
# Per image: nucleus density (objects per 10^6 px), median nucleus area (px), foreground fraction,
# contrast ratio (median nucleus / median background intensity; scale-free, so 8-bit DSB2018 and
# 16-bit tiles compare) and SNR (nucleus minus background median over the background's robust SD).
# DSB2018 mixes acquisition groups whose nucleus size differs about threefold; its 256x256 group is
# the closest in size to our tiles and is shown apart. The table gives the median per image of each
# statistic and source.

# %%
realism = e0.realism(cohort, find_dsb2018(), max_tiles=run.params["realism_max_tiles"], seed=run.params["seed"])
if realism is None:
    print("DSB2018 not found beside the checkout (../shared/data/dsb2018_fluo): realism comparison skipped")
else:
    run.save_table(realism.per_image, "realism_per_image.csv")
    run.save_table(realism.summary, "realism_summary.csv")
    fig = plots.realism_figure(realism.per_image, e0.REALISM_STATS)
    run.save_figure(fig, "realism_vs_dsb2018.png")
    display(fig)
    display(realism.medians.round(3))

# %% [markdown]
# ## Summary
#
# Headline numbers (`e0_data.headline`) go to `summary.json` in the run folder (and the status page).

# %%
summary = run.summary(**e0.headline(cohort, truth, realism))
print(json.dumps(summary, indent=1))
