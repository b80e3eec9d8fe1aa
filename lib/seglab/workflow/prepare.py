"""The heavy, embarrassingly parallel work of a notebook as a list of items ("prepare").

Notebooks 01, 02, 05 and 06 spend nearly all their time in work whose outputs
land in content-addressed caches: fine-tunes in ``data/models/`` (:func:`seglab.segment.finetuning.finetune`)
and cohort inference shards in ``data/predictions/`` (:func:`seglab.segment.cohort_prediction.predict_cohort`).
Each experiment module (:mod:`seglab.experiments`) lists that work once, as
``work_items(params)``, built from the same functions its notebook calls, so that a
Slurm array can run the items in parallel before the notebook; the notebook then
finds every model and mask in the cache and only reads. This module is the generic
side: it finds an experiment's items, numbers them and runs one.

- :func:`work_items` ``(experiment, params) -> list[Item]``: deterministic order; item
  ``i`` is array task ``i``; each has a stable ``label`` ("budget=12 repeat=1",
  "model=finetuned shard=3/8"), a ``key`` naming its output (two notebooks that train
  the same model have items with the same key) and ``done()`` (its output is cached).
- :func:`run_item` runs one item; a done item is skipped; a killed fine-tune resumes
  from its checkpoint and a killed shard from its last finished tile.
- :func:`check`: the merge step of an experiment whose module defines ``check(params, log)``
  (E5: every tile of the selected shards present exactly once, per model).

Experiments without heavy work (00, 03, 04) have no items.
"""

from __future__ import annotations

import time
from typing import Callable

from seglab import SeglabError
from seglab.core import workers
from seglab.experiments import experiment_module
from seglab.experiments.items import Item, ItemsUnknown

__all__ = ["Item", "ItemsUnknown", "check", "checked", "has_items", "listable_before_upstream", "load", "run_item",
           "work_items"]


def _name(experiment) -> str:
    return str(getattr(experiment, "name", experiment))


def has_items(experiment) -> bool:
    """Whether the experiment's module lists heavy work (defines ``work_items``)."""
    return hasattr(experiment_module(_name(experiment)), "work_items")


def checked(experiment) -> bool:
    """Whether the experiment's items are followed by a merge check (a Slurm job between the array
    and the notebook): its module defines ``check(params, log)``."""
    return hasattr(experiment_module(_name(experiment)), "check")


def check(experiment, params: dict, log: Callable = print) -> dict:
    """The experiment's merge check after its items (see its module's ``check``)."""
    name = _name(experiment)
    if not checked(name):
        raise SeglabError(f"{name}: has no merge check (only the experiments whose module defines check() do)")
    return experiment_module(name).check(params, log)


def listable_before_upstream(experiment, params: dict) -> bool:
    """Whether the item list follows from the params alone (not from an upstream notebook's outputs):
    the module's ``items_need_upstream(params)``, when it has one, says otherwise."""
    module = experiment_module(_name(experiment))
    return not (hasattr(module, "items_need_upstream") and module.items_need_upstream(params))


def work_items(experiment, params: dict) -> list[Item]:
    """The prepare items of ``experiment`` with resolved ``params``, in a deterministic order.

    Parameters
    ----------
    experiment : name (``02_label_efficiency``) or :class:`seglab.workflow.chain.Experiment`.
    params : ``seglab.config.params.load_params(name, profile, overrides)[0]``.

    Returns
    -------
    list of :class:`Item`, ``item.index`` = position (= Slurm array task id); [] for
    experiments without heavy work.
    """
    if not has_items(experiment):
        return []
    items = experiment_module(_name(experiment)).work_items(params)
    for i, it in enumerate(items):
        it.index = i
    return items


def load(experiment: str, profile: str, overrides: dict | None = None):
    """(Experiment, params, items) for a notebook reference (``02``, ``02_label_efficiency``) and profile."""
    from seglab.config.params import load_params
    from seglab.workflow.chain import find_experiment

    e = find_experiment(experiment)
    params, _ = load_params(e.name, profile, overrides or None)
    return e, params, work_items(e, params)


def run_item(experiment, params: dict, index: int, *, expect_label: str | None = None,
             log: Callable = print) -> dict:
    """Run item ``index`` of ``experiment`` (skipped when its output is already cached).

    ``expect_label``: the label recorded when the Slurm array was submitted; a
    different label (the params or the cohort changed since) is refused, so a task
    never runs another item than the one its id was given for.

    Returns {"index", "label", "status": "done" | "skipped", "seconds"}.
    """
    name = _name(experiment)
    items = work_items(name, params)
    if not items:
        raise SeglabError(f"{name} has no prepare items (only experiments with heavy work, whose module defines "
                          "work_items, have them)")
    try:
        index = int(index)
    except (TypeError, ValueError):
        raise SeglabError(f"--task {index!r}: not an integer; items are 0..{len(items) - 1}") from None
    if not 0 <= index < len(items):
        raise SeglabError(f"--task {index}: {name} has {len(items)} prepare items (0..{len(items) - 1}) with these "
                          f"params; list them with `seglab prepare {name[:2]} --profile PROFILE --list`")
    item = items[index]
    if expect_label is not None and item.label != expect_label:
        raise SeglabError(f"--task {index}: item {index} of {name} is now '{item.label}', but the job was submitted "
                          f"for '{expect_label}' (params or cohort changed since); submit again "
                          f"(`seglab submit {name[:2]}`)")
    if item.done():
        log(f"[prepare] {name} item {index} ({item.label}): already done (in the cache), skipped")
        return {"index": index, "label": item.label, "status": "skipped", "seconds": 0.0}
    # a CPU fine-tune's weights depend on torch's thread count (float sums in another order): run
    # with the notebook's own torch_threads, so an array task trains what the notebook would
    threads = workers.set_threads(params.get("torch_threads"))
    log(f"[prepare] {name} item {index} ({item.label}): running ({threads} torch threads)")
    t0 = time.monotonic()
    item.run(log)
    seconds = round(time.monotonic() - t0, 1)
    log(f"[prepare] {name} item {index} ({item.label}): done in {seconds} s")
    return {"index": index, "label": item.label, "status": "done", "seconds": seconds}
