"""TODO docstring"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from seglab import SeglabError
from seglab.config.params import params_hash
from seglab.config.settings import MaskSettings
from seglab.core import paths
from seglab.experiments.items import Item, finetune_key, reference_generic
from seglab.segment import cohort_prediction, finetuning


def model_specs(params: dict) -> dict[str, Callable[[], str]]:
    """Notebook 05's models, by name, as functions giving the spec (the fine-tuned one must be cached)."""

    generic = reference_generic(params)

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


def shards_of(params: dict) -> tuple[int, list[int]]:
    n = int(params["n_shards"])
    shards = params.get("shards")
    wanted = list(range(n)) if shards is None else sorted({int(i) for i in shards})
    bad = [i for i in wanted if not 0 <= i < n]
    if bad:
        raise SeglabError(f"05_downstream: shards {bad} are outside 0..{n - 1} (n_shards {n}); fix 'shards' in "
                          "params/<profile>/05_downstream.yaml")
    return n, wanted


def work_items(params: dict) -> list[Item]:
    """E5's inference shards as prepare items: every (model, shard), each exactly the notebook's
    ``predict_cohort`` call for one shard."""
    from seglab.segment import shards as sharding

    n, shards = shards_of(params)
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
                 "finetuned": params_hash({**common, "model": finetune_key(reference_generic(params))})[:24]}
    items = []
    for name, spec_of in model_specs(params).items():
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




def check(params: dict, log: Callable = print) -> dict:
    """The merge step after the shards of E5: every tile of the selected shards exactly once, per model.

    For each model's prediction folder: the shard tables of ``n_shards`` list every
    tile of the selected shards exactly once, no tile outside them, and every mask
    reads back. Writes ``shards_check.json`` (all shards; with ``tiles.tsv``, as
    ``seglab merge-shards``) or ``shards_check_partial.json`` (a subset) in the folder.

    Returns {model: check record}. Raises SeglabError naming the missing, doubled,
    unexpected and unreadable tiles.
    """
    import datetime as _dt

    from seglab.core import io
    from seglab.segment import predict
    from seglab.segment import shards as sharding

    n, shards = shards_of(params)
    tiles_dir = paths.resolve(params["cohort_dir"]) / "tiles"
    settings = MaskSettings.from_params(params)
    all_tiles = predict.list_tiles(tiles_dir)
    wanted = [t for k, t in enumerate(all_tiles) if sharding.shard_of(k, n) in shards]
    out, problems = {}, []
    for model, spec_of in model_specs(params).items():
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
        broken = sorted(t for t in listed & set(wanted) if not predict.mask_complete(folder / f"{t}.tif"))
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
