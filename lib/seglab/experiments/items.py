"""Heavy work of an experiment as items: what a Slurm prepare array runs before the notebook.

An experiment module with heavy, embarrassingly parallel work (fine-tunes, inference
shards) defines ``work_items(params) -> list[Item]``, built from the same functions its
notebook calls, so the notebook and the array describe that work once. Each item's
output lands in a content-addressed cache (``data/models/``, ``data/predictions/``); the
notebook then finds it there and only reads. :mod:`seglab.workflow.prepare` lists and
runs the items; :mod:`seglab.slurm` submits them as arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from seglab import SeglabError
from seglab.config.params import params_hash
from seglab.config.settings import TrainSettings
from seglab.core import paths
from seglab.segment import finetuning


class ItemsUnknown(SeglabError):
    """The item list depends on an upstream output that does not exist yet (e.g. the cohort)."""


@dataclass
class Item:
    """One unit of prepare work.

    Attributes
    ----------
    index : position in the experiment's item list (= Slurm array task id).
    label : stable, human-readable description ("budget=12 repeat=1").
    kind : "finetune" or "predict".
    key : identifies the output: items with equal keys write the same cache entry.
    args : what the item runs with (finetune: ``finetuning.finetune`` kwargs; predict: model, shard).
    """

    index: int
    label: str
    kind: str
    key: str
    args: dict
    _done: Callable[[], bool] = field(repr=False, default=lambda: False)
    _run: Callable[[Callable], Any] = field(repr=False, default=lambda log: None)

    def done(self) -> bool:
        """True when the item's output is already in the cache (any error reading it: False)."""
        try:
            return bool(self._done())
        except (SeglabError, OSError, ValueError, KeyError):
            return False

    def run(self, log: Callable = print):
        return self._run(log)


def finetune_key(job: dict) -> str:
    """Equal for two ``finetuning.finetune`` calls that train into the same cache folder (defaults
    filled in, as ``finetuning.model_dir`` reads them), without reading the cohort."""
    cfg = finetuning.finetune_config(job["base"], job["cohort_dir"], job.get("variant", "generic"), job["training"],
                                     job.get("markers"), job.get("budget"), job.get("budget_seed", 0))
    cache = str(paths.resolve(job.get("cache_dir", finetuning.MODEL_CACHE)))
    return "finetune:" + params_hash({"cfg": cfg, "cache": cache})[:24]


def finetune_item(label: str, job: dict) -> Item:
    """The item of one ``finetuning.finetune(**job)`` call."""

    def done() -> bool:
        return finetuning.cached_model(**job) is not None

    def run(log):
        return finetuning.finetune(**job, log=log)

    return Item(index=-1, label=label, kind="finetune", key=finetune_key(job), args=dict(job),
                _done=done, _run=run)


def reference_generic(params: dict) -> dict:
    """The ``finetune`` arguments of the full-data generic model that E1 trains and E2, E5 and E6
    reuse as their reference (one cache entry, one array task)."""
    return finetuning.reference_job(params["baseline_model"], params["cohort_dir"],
                                    training=TrainSettings.from_params(params))
