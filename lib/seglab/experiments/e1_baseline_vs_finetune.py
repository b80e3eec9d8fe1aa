"""TODO docstring"""

from __future__ import annotations

from typing import Sequence

from seglab.config.settings import TrainSettings
from seglab.experiments.items import Item, finetune_item
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


def work_items(params: dict) -> list[Item]:
    """E1's three fine-tunes as prepare items (one array task per model), from :func:`e1_finetune_jobs`."""
    jobs = e1_finetune_jobs(params["baseline_model"], params["cohort_dir"],
                            training=TrainSettings.from_params(params), markers=params["markers"])
    return [finetune_item(f"model={name}", job) for name, job in jobs.items()]
