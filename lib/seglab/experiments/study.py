"""Building blocks of the study's notebooks (E1-E6): splits, cached fine-tuning, sweeps, selection.

Notebooks 01-06 tell the story and draw the figures; the loops over tiles,
models and settings live here so that every notebook uses the same code.

- :func:`splitset.annotated_split` loads the annotated tiles of one split as
  ``[DAPI, marker]`` images (2, Y, X) float32 and their instance masks (Y, X).
- :func:`finetune` fine-tunes one variant through ``seglab.segment.train`` into a
  content-addressed folder under ``data/models/``: the folder name is a hash
  of the training config and of the training tiles' files, so a rerun with
  the same inputs reuses the finished model (the weights would be identical,
  training is deterministic on the CPU) and an interrupted one resumes from
  its last checkpoint.
- :func:`output_cache.segment_split` runs the network once per tile and keeps its outputs
  (flows, cell probability); :func:`threshold_sweep` rebuilds masks from those
  outputs for each (flow_threshold, cellprob_threshold), so a sweep never
  reruns the network.
- :func:`select_best` picks a setting on validation; the notebook then
  evaluates the test split once with it (``RunContext.record_test_evaluation``).
"""

from __future__ import annotations

from typing import Sequence


from seglab.config.settings import TrainSettings
from seglab.segment import finetuning


E1_VARIANTS = ("finetuned_generic", "finetuned_marker_specific", "finetuned_marker_only")


def e1_finetune_jobs(base: str, cohort_dir: str, *, training: TrainSettings, markers: Sequence[str],
                     cache_dir: str = finetuning.MODEL_CACHE) -> dict[str, dict]:
    """E1's three fine-tunes as :func:`finetune` keyword arguments, by model name (E1_VARIANTS):
    generic (every marker), marker-specific (the tiles of ``markers`` only) and marker-only
    (every marker, DAPI zeroed). One list for the notebook (``efficiency.finetune_many``) and
    for a Slurm array that trains them before the notebook runs."""
    common = dict(base=base, cohort_dir=cohort_dir, training=training, cache_dir=cache_dir)
    # E1 scores every model on validation itself (and E2 and E6 reuse those network passes through
    # the output cache), so training skips its own final validation pass
    return {"finetuned_generic": dict(common, variant="generic", validate=False),
            "finetuned_marker_specific": dict(common, variant="marker_specific", markers=list(markers), validate=False),
            "finetuned_marker_only": dict(common, variant="marker_only", validate=False)}


# --------------------------------------------------------------------------------------
# E1: comparing models on one split
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# E3: gates on predicted instances
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# E4: sensitivity to inference parameters
# --------------------------------------------------------------------------------------


