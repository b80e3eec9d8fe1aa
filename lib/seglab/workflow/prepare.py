"""The heavy, embarrassingly parallel work of a notebook as a list of items ("prepare").

Notebooks 01, 02, 05 and 06 spend nearly all their time in work whose outputs
land in content-addressed caches: fine-tunes in ``data/models/`` (:func:`seglab.segment.finetuning.finetune`)
and cohort inference shards in ``data/predictions/`` (:func:`seglab.segment.cohort_prediction.predict_cohort`).
This module lists that work, one item per fine-tune or shard, built from the SAME
library calls the notebooks make (``study.e1_finetune_jobs``, ``efficiency.label_budget_jobs``,
``efficiency.lomo_jobs``, ``predict_cohort(..., n_shards=N, shards=[I])``), so that a
Slurm array can run the items in parallel before the notebook; the notebook then
finds every model and mask in the cache and only reads.

- :func:`work_items` ``(experiment, params) -> list[Item]``: deterministic order; item
  ``i`` is array task ``i``; each has a stable ``label`` ("budget=12 repeat=1",
  "model=finetuned shard=3/8"), a ``key`` naming its output (two notebooks that train
  the same model have items with the same key) and ``done()`` (its output is cached).
- :func:`run_item` runs one item; a done item is skipped; a killed fine-tune resumes
  from its checkpoint and a killed shard from its last finished tile.
- :func:`check` (E5 only): the merge step; every tile of the selected shards present
  exactly once, per model, with a mask that reads back.

Experiments without heavy work (00, 03, 04) have no items.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from seglab import SeglabError
from seglab.core import paths
from seglab.config.params import params_hash
from seglab.config.settings import MaskSettings, TrainSettings
from seglab.segment import finetuning
from seglab.segment import cohort_prediction


class ItemsUnknown(SeglabError):
    """The item list depends on an upstream output that does not exist yet (e.g. the cohort)."""


@dataclass
class Item:
    """One unit of prepare work.

    Attributes
    ----------
    index : position in :func:`work_items` (= Slurm array task id).
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


# --------------------------------------------------------------------------- fine-tunes

def _finetune_item(label: str, job: dict) -> Item:

    def done() -> bool:
        return finetuning.cached_model(**job) is not None

    def run(log):
        return finetuning.finetune(**job, log=log)

    return Item(index=-1, label=label, kind="finetune", key=_finetune_key(job), args=dict(job),
                _done=done, _run=run)


def _finetune_key(job: dict) -> str:
    """Equal for two ``finetuning.finetune`` calls that train into the same cache folder (defaults filled in,
    as ``finetuning.model_dir`` reads them), without reading the cohort."""

    cfg = finetuning.finetune_config(job["base"], job["cohort_dir"], job.get("variant", "generic"), job["training"],
                                 job.get("markers"), job.get("budget"), job.get("budget_seed", 0))
    cache = str(paths.resolve(job.get("cache_dir", finetuning.MODEL_CACHE)))
    return "finetune:" + params_hash({"cfg": cfg, "cache": cache})[:24]


def _reference_generic(params: dict) -> dict:

    # the full-data reference of 02 and 06 (and E1's generic model, and E5's fine-tuned model)
    return finetuning.reference_job(params["baseline_model"], params["cohort_dir"],
                                    training=TrainSettings.from_params(params))


def _e1_items(params: dict) -> list[Item]:
    from seglab.experiments import study

    jobs = study.e1_finetune_jobs(params["baseline_model"], params["cohort_dir"],
                                  training=TrainSettings.from_params(params), markers=params["markers"])
    return [_finetune_item(f"model={name}", job) for name, job in jobs.items()]


def _budgets(params: dict) -> list[int]:
    from seglab.data import manifest as data
    from seglab.experiments import efficiency

    cohort = paths.resolve(params["cohort_dir"])
    if (cohort / "tiles").is_dir():   # checked against the cohort as the notebook does: a bad budget fails now
        return efficiency.check_budgets(data.cohort_manifest(cohort), params["budgets"], params["repeats"])
    return sorted({int(b) for b in params["budgets"]})   # the same order check_budgets gives


def _e2_items(params: dict) -> list[Item]:
    from seglab.experiments import efficiency

    budgets = _budgets(params)
    repeats = int(params["repeats"])
    jobs = efficiency.label_budget_jobs(params["baseline_model"], params["cohort_dir"], budgets, repeats,
                                        training=TrainSettings.from_params(params))
    items = [_finetune_item(f"budget={j['budget']} repeat={j['budget_seed']}", j) for j in jobs]
    if params.get("reference_full_data"):
        items.append(_finetune_item("reference=finetuned_generic", _reference_generic(params)))
    return items


def _e6_markers(params: dict) -> list[str]:
    from seglab.data import manifest as data
    from seglab.experiments import efficiency

    cohort = paths.resolve(params["cohort_dir"])
    if not (cohort / "tiles").is_dir():
        if params.get("lomo_markers"):
            return list(dict.fromkeys(str(m) for m in params["lomo_markers"]))
        raise ItemsUnknown(f"06_leave_one_marker_out: lomo_markers is [] (every marker of the cohort) and the "
                           f"cohort {params['cohort_dir']} does not exist yet; run 00_data first")
    return efficiency.lomo_markers(data.cohort_manifest(cohort), params.get("lomo_markers"))


def _e6_items(params: dict) -> list[Item]:
    from seglab.experiments import efficiency

    markers = _e6_markers(params)
    jobs = efficiency.lomo_jobs(params["baseline_model"], params["cohort_dir"], markers,
                                training=TrainSettings.from_params(params))
    items = [_finetune_item(f"held_out={j['markers'][0]}", j) for j in jobs]
    items.append(_finetune_item("reference=finetuned_generic", _reference_generic(params)))
    return items


# --------------------------------------------------------------------------- E5: inference shards

def _e5_models(params: dict) -> dict[str, Callable[[], str]]:
    """Notebook 05's models, by name, as functions giving the spec (the fine-tuned one must be cached)."""

    generic = _reference_generic(params)

    def finetuned() -> str:
        found = finetuning.cached_model(**generic)
        if found is None:
            raise SeglabError(
                f"05_downstream: the fine-tuned generic model ({params['baseline_model']} on {params['cohort_dir']}, "
                "the shared training settings) is not in data/models yet; 05 needs 01: run it first (`seglab run 01` "
                "or `seglab prepare 01 --all`). E5's prepare does not train it, so that N shard tasks never train "
                "one model at once")
        return str(found)

    return {"baseline": lambda: str(params["baseline_model"]), "finetuned": finetuned}


def _e5_shards(params: dict) -> tuple[int, list[int]]:
    n = int(params["n_shards"])
    shards = params.get("shards")
    wanted = list(range(n)) if shards is None else sorted({int(i) for i in shards})
    bad = [i for i in wanted if not 0 <= i < n]
    if bad:
        raise SeglabError(f"05_downstream: shards {bad} are outside 0..{n - 1} (n_shards {n}); fix 'shards' in "
                          "params/<profile>/05_downstream.yaml")
    return n, wanted


def _e5_items(params: dict) -> list[Item]:
    from seglab.experiments import cohort_inference as ci
    from seglab.segment import shards as sharding

    n, shards = _e5_shards(params)
    tiles_dir = paths.resolve(params["cohort_dir"]) / "tiles"
    settings = MaskSettings.from_params(params)
    folders: dict[str, Path] = {}

    def folder(name, spec_of) -> Path:   # hashing the weights and tiles once per model, not per shard
        if name not in folders:
            folders[name] = cohort_prediction.prediction_dir(spec_of(), tiles_dir, settings, root=params["predictions_dir"])
        return folders[name]

    # what decides a shard's output folder, without hashing weights or tiles (the fine-tuned model by its training)
    common = {"cohort": str(paths.resolve(params["cohort_dir"])), "settings": settings,
              "root": str(paths.resolve(params["predictions_dir"]))}
    model_key = {"baseline": params_hash({**common, "model": params["baseline_model"]})[:24],
                 "finetuned": params_hash({**common, "model": _finetune_key(_reference_generic(params))})[:24]}
    items = []
    for name, spec_of in _e5_models(params).items():
        for i in shards:
            def done(name=name, spec_of=spec_of, i=i) -> bool:
                return sharding.shard_complete(tiles_dir, folder(name, spec_of), i, n)

            def run(log, name=name, spec_of=spec_of, i=i):
                # exactly the notebook's call, for one shard
                return cohort_prediction.predict_cohort(spec_of(), tiles_dir, settings, name=name, root=params["predictions_dir"],
                                         n_shards=n, shards=[i], batch_tiles=params["batch_tiles"],
                                         batch_size=params["inference_batch_size"], log=log)

            items.append(Item(index=-1, label=f"model={name} shard={i}/{n}", kind="predict",
                              key=f"predict:{model_key[name]}:{i}/{n}",
                              args={"model": name, "shard": i, "n_shards": n}, _done=done, _run=run))
    return items


def check(experiment: str, params: dict, log: Callable = print) -> dict:
    """The merge step after the shards of E5: every tile of the selected shards exactly once, per model.

    For each model's prediction folder: the shard tables of ``n_shards`` list every
    tile of the selected shards exactly once, no tile outside them, and every mask
    reads back. Writes ``shards_check.json`` (all shards; with ``tiles.tsv``, as
    ``seglab merge-shards``) or ``shards_check_partial.json`` (a subset) in the folder.

    Returns {model: check record}. Raises SeglabError naming the missing, doubled,
    unexpected and unreadable tiles.
    """
    import datetime as _dt

    from seglab.experiments import cohort_inference as ci
    from seglab.core import io
    from seglab.segment import predict
    from seglab.segment import shards as sharding

    name = _name(experiment)
    if name != "05_downstream":
        raise SeglabError(f"{name}: has no merge check (only 05_downstream's inference shards have one)")
    n, shards = _e5_shards(params)
    tiles_dir = paths.resolve(params["cohort_dir"]) / "tiles"
    settings = MaskSettings.from_params(params)
    all_tiles = predict.list_tiles(tiles_dir)
    wanted = [t for k, t in enumerate(all_tiles) if sharding.shard_of(k, n) in shards]
    out, problems = {}, []
    for model, spec_of in _e5_models(params).items():
        folder = cohort_prediction.prediction_dir(spec_of(), tiles_dir, settings, root=params["predictions_dir"])
        if shards == list(range(n)):
            try:
                c = sharding.merge_shards(tiles_dir, folder, n, log=log)
                out[model] = {**c.__dict__, "ok": True, "folder": str(folder)}
            except SeglabError as exc:
                problems.append(f"{model}: {exc}")
            continue
        tables = {i: t for i, t in sharding.read_shard_tables(folder, n).items() if i in shards} if folder.is_dir() \
            else {i: [] for i in shards}
        c = sharding.check_shards(wanted, tables)
        listed = {t for names in tables.values() for t in names}
        broken = sorted(t for t in listed & set(wanted) if not sharding.mask_ok(folder / f"{t}.tif"))
        record = {**c.__dict__, "ok": c.ok and not broken, "unreadable_masks": broken, "shards": shards,
                  "folder": str(folder), "checked": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if folder.is_dir():
            io.write_json(folder / "shards_check_partial.json", record)
        out[model] = record
        if not record["ok"]:
            problems.append(f"{model}: {len(c.missing)} missing {c.missing[:5]}, {len(c.duplicated)} in two shards "
                            f"{list(c.duplicated)[:5]}, {len(c.unexpected)} not in shards {shards} {c.unexpected[:5]}, "
                            f"{len(broken)} masks unreadable {broken[:5]} in {folder}")
        else:
            log(f"[prepare] {model}: {len(wanted)} tiles of shards {shards} of {n}, each exactly once in {folder}")
    if problems:
        raise SeglabError("05_downstream: the inference shards do not give every tile exactly once: "
                          + "; ".join(problems) + ". Run the missing items again (`seglab prepare 05 --all`, or "
                          "`seglab submit 05`): finished tiles are skipped")
    return out


# --------------------------------------------------------------------------- the registry

PREPARERS: dict[str, Callable[[dict], list[Item]]] = {
    "01_baseline_vs_finetune": _e1_items,
    "02_label_efficiency": _e2_items,
    "05_downstream": _e5_items,
    "06_leave_one_marker_out": _e6_items,
}
# experiments whose items are followed by a merge check (a Slurm job between the array and the notebook)
CHECKED = ("05_downstream",)


def _name(experiment) -> str:
    return str(getattr(experiment, "name", experiment))


def has_items(experiment) -> bool:
    return _name(experiment) in PREPARERS


def listable_before_upstream(experiment, params: dict) -> bool:
    """Whether the item list follows from the params alone (not from an upstream notebook's outputs).

    Only E6 with ``lomo_markers: []`` needs the cohort (its markers) to list its items.
    """
    return not (_name(experiment) == "06_leave_one_marker_out" and not params.get("lomo_markers"))


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
    builder = PREPARERS.get(_name(experiment))
    if builder is None:
        return []
    items = builder(params)
    for i, it in enumerate(items):
        it.index = i
    return items


def load(experiment: str, profile: str, overrides: dict | None = None):
    """(Experiment, params, items) for a notebook reference (``02``, ``02_label_efficiency``) and profile."""
    from seglab.workflow.chain import find_experiment
    from seglab.config.params import load_params

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
        raise SeglabError(f"{name} has no prepare items (only {', '.join(PREPARERS)} do)")
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
    log(f"[prepare] {name} item {index} ({item.label}): running")
    t0 = time.monotonic()
    item.run(log)
    seconds = round(time.monotonic() - t0, 1)
    log(f"[prepare] {name} item {index} ({item.label}): done in {seconds} s")
    return {"index": index, "label": item.label, "status": "done", "seconds": seconds}
