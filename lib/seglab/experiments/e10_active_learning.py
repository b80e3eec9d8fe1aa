"""E10 active learning: does choosing the tiles to annotate by uncertainty or diversity save labels?

A simulated pool (:func:`make_pool`, tiles of :func:`seglab.data.simulate.render_tile`, markers in
turn) stands in for a folder of unannotated tiles; the simulator's planted masks are the annotator
(optionally noisy: ``annotation_noise`` is the fraction of objects an annotator misses, dropped
from each corrected mask, seeded). For each strategy and repeat, one campaign
(:mod:`seglab.active.campaign`) runs in its own folder: the same ``initial_tiles`` random labelled
tiles per repeat for every strategy, round 0 fine-tunes ``base_model`` on them, then each round
selects ``batch_tiles`` tiles by the strategy, ingests their simulated corrections and fine-tunes
from the previous round's checkpoint, for ``rounds`` rounds (the stop rule is off so that every
curve has every point: ``min_improvement`` -1). Each round's model is scored on the validation and
the test tiles (AP@0.5, pooled over tiles). The reference: the same fine-tune on **all** pool tiles
(one per repeat seed).

The headline: the labelled tiles each strategy needs to reach 95% of the reference's test AP
(mean over repeats, linear between rounds; :func:`labels_to_target`), divided by random's; below 1
saves labels. Per repeat the same ratio gives the spread.

Steps, in the notebook's order
------------------------------
1. :func:`make_pool`: pool, validation and test tiles.
2. :func:`run_campaigns`: every (strategy, repeat) campaign, ``n_jobs`` at a time, resumable
   (``runs.csv``: strategy, repeat, round, n_labelled, val_ap50, val_f1, test_ap50, select_s, train_s).
3. :func:`reference`: the all-tiles fine-tunes (``reference.csv``).
4. :func:`curves`, :func:`labels_table`: mean and spread per strategy and labelled count; the labels to
   95% per strategy and its ratio to random (``labels_to_95.csv``).
5. :func:`headline`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.active import campaign as cmp
from seglab.active.diversity import strategy_weights
from seglab.config.settings import MaskSettings, TrainSettings

IOU = 0.5
TARGET_FRACTION = 0.95   # of the all-tiles reference's test AP@0.5
STRATEGY_NAMES = ("random", "entropy", "confidence", "margin", "tta", "tta_flow", "ensemble", "coreset", "kmeans",
                  "combined")


def preflight(params: dict, cohort: Callable) -> None:
    """The strategies are known, the weights of the combination are not all zero, the batches fit the pool."""
    from seglab.active.diversity import check_weights
    from seglab.experiments import ParamConflict

    bad = [s for s in params["strategies"] if s not in STRATEGY_NAMES]
    if bad:
        raise ParamConflict("strategies", f"{params['strategies']}: {bad} unknown",
                            f"use some of {', '.join(STRATEGY_NAMES)}")
    if "random" not in params["strategies"]:
        raise ParamConflict("strategies", f"{params['strategies']} lacks random", "add random: it is the reference")
    if "combined" in params["strategies"]:
        try:
            check_weights(params["weights"], "weights")
        except SeglabError as exc:
            raise ParamConflict("weights", str(exc).split(": ", 1)[-1], "give at least one weight > 0") from None
    need = params["initial_tiles"] + params["rounds"] * params["batch_tiles"]
    if need > params["pool_tiles"]:
        raise ParamConflict("pool_tiles", f"{params['pool_tiles']} tiles, but initial_tiles + rounds x batch_tiles "
                            f"needs {need}", "raise pool_tiles or lower rounds / batch_tiles",
                            also=("initial_tiles", "rounds", "batch_tiles"))


# --------------------------------------------------------------------------- the pool


@dataclass
class Pool:
    """Simulated tiles: ``images`` {tile_id: (2, Y, X) float32 [DAPI, marker]} and ``labels``
    {tile_id: (Y, X) planted masks} of the pool (``pool_ids``), validation and test tiles."""

    images: dict
    labels: dict
    pool_ids: list
    val_ids: list
    test_ids: list

    def describe(self) -> str:
        n = [int(len(np.unique(self.labels[t])) - 1) for t in self.pool_ids]
        return (f"pool {len(self.pool_ids)} tiles ({sum(n)} cells, {min(n)}-{max(n)} per tile), validation "
                f"{len(self.val_ids)}, test {len(self.test_ids)}; tile {next(iter(self.images.values())).shape}")


def make_pool(params: dict) -> Pool:
    """``pool_tiles`` + ``val_tiles`` + ``test_tiles`` tiles of ``tile_px`` px, markers in turn, each from
    its own seeded generator (seed, index): the same params give the same pixels. ``nuisance``
    overrides :class:`seglab.data.simulate.SimParams` (denser, more blurred tiles make a pool
    where some tiles are harder than others)."""
    from seglab.data import simulate

    P = simulate.SimParams(**dict(params.get("nuisance") or {}))
    images, labels, groups = {}, {}, {"pool": [], "val": [], "test": []}
    i = 0
    for split, n in (("pool", params["pool_tiles"]), ("val", params["val_tiles"]), ("test", params["test_tiles"])):
        for j in range(n):
            marker = simulate.MARKERS[i % len(simulate.MARKERS)]
            t = simulate.render_tile(np.random.default_rng([int(params["seed"]), i]), marker, 0.3,
                                     int(params["tile_px"]), P)
            tid = f"{split}{j:04d}_{marker}"
            images[tid] = np.stack([t["dapi"], t["marker"]]).astype(np.float32)
            labels[tid] = t["labels"]
            groups[split].append(tid)
            i += 1
    return Pool(images, labels, groups["pool"], groups["val"], groups["test"])


def annotate(labels: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """The simulated annotator's correction of a tile: its planted ``labels`` with a fraction ``noise``
    of the objects dropped (each independently), as a missing annotation would."""
    out = np.array(labels, copy=True)
    if noise > 0:
        ids = np.setdiff1d(np.unique(out), [0])
        out[np.isin(out, ids[rng.random(len(ids)) < noise])] = 0
    return out


# --------------------------------------------------------------------------- campaigns


def campaign_params(params: dict, strategy: str, repeat: int) -> dict:
    """The :mod:`seglab.active.campaign` params of one (strategy, repeat)."""
    training = TrainSettings.from_params(params).replace(seed=int(params["seed"]) + 100 * repeat)
    return {"base_model": params["baseline_model"], "weights": strategy_weights(strategy, params["weights"]),
            "batch_size": params["batch_tiles"], "max_rounds": params["rounds"], "min_improvement": -1.0,
            "patience": 1, "seed": int(params["seed"]) + 100 * repeat, "tta_views": params["tta_views"],
            "ensemble_size": params["ensemble_size"], "aggregation": params["aggregation"],
            "mask": MaskSettings.from_params(params).as_dict(), "training": training.as_dict()}


def initial_ids(pool: Pool, n: int, seed: int, repeat: int) -> list[str]:
    """The repeat's initial labelled tiles: the same for every strategy (seeded by seed and repeat)."""
    rng = np.random.default_rng([int(seed), int(repeat), 7])
    return sorted(rng.choice(pool.pool_ids, size=int(n), replace=False).tolist())


def _test_ap(c: cmp.Campaign, k: int, pool: Pool) -> float:
    """Test AP@0.5 of round k's model, stored beside the round (``test.json``) so a resumed run reuses it."""
    import json

    from seglab.core import io
    from seglab.evaluate import metrics
    from seglab.segment import models

    f = c.round_dir(k) / "test.json"
    sha = c.record(k)["final_sha256"]
    if f.is_file():
        rec = json.loads(f.read_text())
        if rec.get("final_sha256") == sha:
            return rec["test_ap50"]
    model = models.load(str(c.model_path(k)), gpu=None)
    preds = model.segment([pool.images[t] for t in pool.test_ids], c.mask)
    ap = round(float(metrics.pooled_match([pool.labels[t] for t in pool.test_ids], preds, IOU)["ap"]), 4)
    io.write_json(f, {"final_sha256": sha, "test_ap50": ap})
    return ap


def run_one(folder: str, params: dict, pool: Pool, strategy: str, repeat: int, initial: Sequence[str]) -> list[dict]:
    """One campaign from init to its last round (resuming whatever is on disk); a row per trained round."""
    root = Path(folder)
    if (root / cmp.CONFIG).is_file():
        c = cmp.open_campaign(root)
    else:
        c = cmp.init(root, {t: pool.images[t] for t in pool.pool_ids}, {t: pool.labels[t] for t in initial},
                     {t: pool.images[t] for t in pool.val_ids}, {t: pool.labels[t] for t in pool.val_ids},
                     campaign_params(params, strategy, repeat))
    cmp.train(c)
    while True:
        st = cmp.status(c)
        if st["next"] == "done":
            break
        if st["next"] == "select":
            cmp.select(c)
        elif st["next"] == "ingest":
            k = c.rounds()[-1]
            rng = np.random.default_rng([int(params["seed"]), repeat, k, 11])
            cmp.ingest(c, {t: annotate(pool.labels[t], params["annotation_noise"], rng)
                           for t in c.selection(k)["selected"]})
        else:
            cmp.train(c)
    hist = cmp.history(c)
    return [{"strategy": strategy, "repeat": repeat, "round": int(r["round"]), "n_labelled": int(r["n_labelled"]),
             "val_ap50": r["val_ap50"], "val_f1": r["val_f1"], "test_ap50": _test_ap(c, int(r["round"]), pool),
             "select_s": r["select_s"], "train_s": r["train_s"]} for _, r in hist.iterrows()]


def _run_job(job: dict) -> list[dict]:
    return run_one(**job)


def _jobs(params: dict, pool: Pool, folder: Path, strategies: Sequence[str]) -> list[dict]:
    return [dict(folder=str(folder / f"{s}_r{r}"), params=params, pool=pool, strategy=s, repeat=r,
                 initial=initial_ids(pool, params["initial_tiles"], params["seed"], r))
            for r in range(params["repeats"]) for s in strategies]


def _run_jobs(jobs: list[dict], n_jobs: int, threads: int | None, log: Callable | None) -> list[dict]:
    from seglab.core import workers

    rows: list = []
    if n_jobs <= 1 or len(jobs) <= 1:
        for j in jobs:
            rows += run_one(**j)
            if log:
                log(f"{Path(j['folder']).name}: done")
        return rows
    with workers.worker_pool(n_jobs, threads) as ex:
        for j, out in zip(jobs, ex.map(_run_job, jobs)):
            rows += out
            if log:
                log(f"{Path(j['folder']).name}: done")
    return rows


def run_campaigns(params: dict, pool: Pool, folder: str | Path, log: Callable | None = print) -> pd.DataFrame:
    """Step 2: every (strategy, repeat) campaign under ``folder``; one row per trained round:
    strategy, repeat, round, n_labelled, val_ap50, val_f1, test_ap50, select_s, train_s (s)."""
    rows = _run_jobs(_jobs(params, pool, Path(folder), params["strategies"]), int(params["n_jobs"]),
                     params["torch_threads"], log)
    return pd.DataFrame(rows).sort_values(["strategy", "repeat", "round"], ignore_index=True)


def reference(params: dict, pool: Pool, folder: str | Path, log: Callable | None = print) -> pd.DataFrame:
    """Step 3: per repeat, the fine-tune on every pool tile (a campaign whose round 0 labels them all):
    repeat, n_labelled, val_ap50, test_ap50."""
    # round 0 only (train is called once); max_rounds 1 is the campaign's minimum
    jobs = [dict(folder=str(Path(folder) / f"all_tiles_r{r}"), params={**params, "rounds": 1}, repeat=r)
            for r in range(params["repeats"])]
    rows = []
    for j in jobs:
        root = Path(j["folder"])
        c = cmp.open_campaign(root) if (root / cmp.CONFIG).is_file() else cmp.init(
            root, {t: pool.images[t] for t in pool.pool_ids}, {t: pool.labels[t] for t in pool.pool_ids},
            {t: pool.images[t] for t in pool.val_ids}, {t: pool.labels[t] for t in pool.val_ids},
            campaign_params(j["params"], "random", j["repeat"]))
        rec = cmp.train(c)
        rows.append({"repeat": j["repeat"], "n_labelled": rec["n_labelled"], "val_ap50": rec["val_ap50"],
                     "test_ap50": _test_ap(c, 0, pool)})
        if log:
            log(f"all tiles, repeat {j['repeat']}: test AP@0.5 {rows[-1]['test_ap50']:.3f}")
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- curves and labels to 95%


def curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and labelled count: mean and sd over repeats of val and test AP@0.5, n_repeats."""
    g = runs.groupby(["strategy", "n_labelled"])
    out = g.agg(val_ap50_mean=("val_ap50", "mean"), val_ap50_sd=("val_ap50", "std"),
                test_ap50_mean=("test_ap50", "mean"), test_ap50_sd=("test_ap50", "std"),
                n_repeats=("repeat", "nunique")).reset_index()
    return out


def labels_to_target(n_labelled: Sequence[float], ap: Sequence[float], target: float) -> float:
    """The labelled tiles at which the curve (``ap`` at ``n_labelled``, increasing counts) first reaches
    ``target``: linear between the two points around the crossing; the first count when the first point
    reaches it already; NaN when it never does."""
    n = np.asarray(n_labelled, float)
    a = np.asarray(ap, float)
    for i in range(len(n)):
        if a[i] >= target:
            if i == 0:
                return float(n[0])
            return float(n[i - 1] + (target - a[i - 1]) / (a[i] - a[i - 1]) * (n[i] - n[i - 1]))
    return math.nan


def labels_table(runs: pd.DataFrame, ref: pd.DataFrame, metric: str = "test_ap50",
                 fraction: float = TARGET_FRACTION) -> pd.DataFrame:
    """Per strategy: the labels to reach ``fraction`` of the all-tiles reference's mean ``metric``, on the
    mean curve (``labels``) and its ratio to random's (``ratio_vs_random``; < 1 saves labels); per repeat
    (each against the same repeat's random and reference): ``ratio_mean``, ``ratio_sd``, ``n_reached``
    (repeats whose curve reached the target), ``n_repeats``; ``target`` the AP aimed at."""
    target = fraction * float(ref[metric].mean())
    mean = curves(runs)
    col = f"{metric}_mean"
    out = []
    per_rep = {}
    for (s, r), sub in runs.groupby(["strategy", "repeat"]):
        t_r = fraction * float(ref.loc[ref["repeat"] == r, metric].mean())
        per_rep[(s, r)] = labels_to_target(sub["n_labelled"], sub[metric], t_r)
    rand = {r: v for (s, r), v in per_rep.items() if s == "random"}
    labels = {s: labels_to_target(sub["n_labelled"], sub[col], target) for s, sub in mean.groupby("strategy")}
    for s in labels:
        ratios = [per_rep[(s, r)] / rand[r] for (s2, r) in per_rep if s2 == s and r in rand
                  and not math.isnan(per_rep[(s, r)]) and not math.isnan(rand[r])]
        reps = [r for (s2, r) in per_rep if s2 == s]
        out.append({"strategy": s, "target": round(target, 4), "labels": labels[s],
                    "ratio_vs_random": labels[s] / labels["random"] if labels.get("random") else math.nan,
                    "ratio_mean": float(np.mean(ratios)) if ratios else math.nan,
                    "ratio_sd": float(np.std(ratios, ddof=1)) if len(ratios) > 1 else math.nan,
                    "n_reached": int(sum(not math.isnan(per_rep[(s, r)]) for r in reps)), "n_repeats": len(reps)})
    return pd.DataFrame(out)


def verdict(table: pd.DataFrame, margin: float = 0.1) -> str:
    """One honest sentence: which strategies need at least ``margin`` fewer labels than random (mean-curve
    ratio <= 1 - margin, and per-repeat mean ratio below 1), or that none does."""
    t = table[table["strategy"] != "random"]
    wins = t[(t["ratio_vs_random"] <= 1 - margin) & (t["ratio_mean"] < 1)]
    if wins.empty:
        return ("no strategy beats random by 10% or more of the labels at this size: see the notebook for why "
                "(a pool this small and alike leaves little for uncertainty or diversity to find)")
    rand = table[table["strategy"] == "random"].iloc[0]
    thin = [r.strategy for r in wins.itertuples() if not r.ratio_sd >= 0]   # NaN: fewer than 2 repeat ratios
    caveat = ""
    if thin:
        caveat = (f"; but random reached the target in {int(rand.n_reached)} of {int(rand.n_repeats)} repeats and "
                  f"{', '.join(thin)} have fewer than two per-repeat ratios, so their spread is unknown: "
                  "a hint, not a claim")
    return "beat random by at least 10% of the labels on the mean curve: " + ", ".join(
        f"{r.strategy} ({r.ratio_vs_random:.2f}x)" for r in wins.itertuples()) + caveat


def headline(table: pd.DataFrame, ref: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """``labels_to_95_<s>`` (tiles), ``labels_to_95_ratio_<s>`` (vs random, mean curve), with
    ``_ratio_sd_<s>`` over repeats; ``test_ap50_all_tiles``; ``test_ap50_final_<s>`` (mean over repeats at
    the last round); ``n_repeats``, ``n_strategies``. Rounded to 4 decimals; NaN (never reached) is null."""
    def r4(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)

    out = {"test_ap50_all_tiles": r4(ref["test_ap50"].mean()), "val_ap50_all_tiles": r4(ref["val_ap50"].mean())}
    for row in table.itertuples():
        out[f"labels_to_95_{row.strategy}"] = r4(row.labels)
        out[f"labels_to_95_ratio_{row.strategy}"] = r4(row.ratio_vs_random)
        out[f"labels_to_95_ratio_sd_{row.strategy}"] = r4(row.ratio_sd)
    last = runs[runs["round"] == runs["round"].max()].groupby("strategy")["test_ap50"].mean()
    out.update({f"test_ap50_final_{s}": r4(v) for s, v in last.items()})
    return {**out, "n_repeats": int(runs["repeat"].nunique()), "n_strategies": int(runs["strategy"].nunique())}


def speed_table(folder: str | Path, strategies: Sequence[str], repeats: int) -> pd.DataFrame:
    """Per strategy: mean seconds of a selection's scoring parts (forward, pixel, tta, ensemble) per
    candidate tile, from the campaigns' selection.json files."""
    import json

    rows = []
    for s in strategies:
        for r in range(repeats):
            for f in sorted(Path(folder, f"{s}_r{r}", "rounds").glob("round_*/selection/selection.json")):
                sel = json.loads(f.read_text())
                n = max(1, sel["n_candidates"])
                rows.append({"strategy": s, **{f"{k}_s_per_tile": v / n for k, v in sel["scoring_s"].items()},
                             "select_s_per_tile": sel["select_s"] / n})
    return pd.DataFrame(rows).groupby("strategy").mean().reset_index() if rows else pd.DataFrame()

