"""E0 data: the cohort the study runs on, its donor splits, coverage audit, planted truth and realism.

Notebook ``00_data`` calls these steps in order (each returns the tables its figures need):

1. :func:`prepare_cohort`: simulate (or reuse) the cohort, or discover real tiles; the manifest
   (one row per paired tile) and the coverage audit;
2. :func:`audit_brief` and :func:`coverage_tables`: what the audit says, and tiles per donor and marker;
3. :func:`split_donors`: the annotated tiles per donor and split (a donor on two sides is refused);
4. :func:`example_tiles`: one annotated tile per marker (seeded) with its true instances;
5. :func:`planted_truth`: the planted effects, true counts, and how the downstream positivity
   rule does on the true masks (simulated cohorts only);
6. :func:`realism`: nucleus statistics per image against the real DSB2018 nuclei;
7. :func:`headline`: the numbers of ``summary.json``.

E0 has no heavy parallel work (no ``work_items``): the cohort is made once, in seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.core import paths
from seglab.data import manifest as data
from seglab.data import simulate

# what the notebook prints of the audit (the whole audit is audit.json in the run folder)
BRIEF_KEYS = ("n_files", "n_tiles_paired", "n_donors_in_tiles", "tiles_per_marker", "n_fallbacks", "fallbacks",
              "n_unpaired", "n_excluded", "n_unmatched_files", "n_annotated", "annotated_per_split",
              "n_donors_in_clinical", "donors_missing_from_clinical", "donors_missing_from_tiles")
SPLIT_ORDER = ("train", "val", "test")
# the nucleus statistics compared with DSB2018, in the figure's and the summary's order
REALISM_STATS = ("median_area_px", "density_per_mpx", "contrast_ratio", "snr")
DSB_SOURCE = "dsb2018"
DSB_CLOSEST_GROUP = "256x256"   # the DSB2018 acquisition group closest in nucleus size to our tiles
DSB_CLOSEST_SOURCE = "dsb2018 256x256"


@dataclass
class Cohort:
    """The tiles the study runs on.

    manifest : one row per paired tile (columns of :data:`seglab.data.manifest.MANIFEST_COLUMNS`).
    audit : the coverage audit (:func:`seglab.data.manifest.discover`).
    simulated : True for the simulated cohort (planted truth available), False for real tiles.
    cohort_dir : the simulated cohort's folder (None for real tiles).
    generation_s : seconds spent generating the cohort (None when it was reused or real).
    generated_splits : donor splits made here (real tiles without a splits file), else None.
    """

    manifest: pd.DataFrame
    audit: dict
    simulated: bool
    cohort_dir: Path | None = None
    generation_s: float | None = None
    generated_splits: dict | None = None


def prepare_cohort(params: Mapping, *, log: Callable = print) -> Cohort:
    """The simulated cohort of ``params`` (generated once into ``cohort_dir``, reused after), or the
    real tiles of ``params['tiles_dir']`` when it is set; with the manifest and coverage audit."""
    if params["tiles_dir"] is None:
        return _simulated_cohort(params, log)
    return _real_tiles(params)


def _simulated_cohort(params: Mapping, log: Callable) -> Cohort:
    cohort = paths.resolve(params["cohort_dir"])
    existed = cohort.exists()
    t0 = time.monotonic()
    # the same arguments give byte-identical files; a different cohort is never written over this one
    simulate.simulate_cohort(cohort, n_donors=params["n_donors"], tiles_per_marker=params["tiles_per_marker"],
                             size_px=params["size_px"], seed=params["seed"], progress=not existed,
                             **params["nuisance"])
    generation_s = None if existed else round(time.monotonic() - t0, 1)
    log(f"cohort: {cohort} ({'reused' if existed else f'generated in {generation_s} s'})")
    manifest, audit = data.cohort_manifest(cohort, with_audit=True)
    return Cohort(manifest=manifest, audit=audit, simulated=True, cohort_dir=cohort, generation_s=generation_s)


def _resolved(value) -> Path | None:
    return paths.resolve(value) if value else None


def _real_tiles(params: Mapping) -> Cohort:
    """Real tiles: discovered and paired; without a splits file, annotated tiles are split by donor here
    (seeded) and the audit is redone on the split manifest."""
    clinical = _resolved(params["clinical_csv"])
    kwargs = dict(masks_dir=_resolved(params["masks_dir"]), annotated=_resolved(params["annotated_csv"]),
                  splits=_resolved(params["splits_yaml"]), clinical=clinical, strict=False)
    if params["filename_pattern"]:
        kwargs["pattern"] = params["filename_pattern"]
    manifest, audit = data.discover(paths.resolve(params["tiles_dir"]), **kwargs)
    splits = None
    if params["splits_yaml"] is None and manifest["annotated"].any():
        splits = data.generate_splits(manifest, seed=params["seed"])
        manifest = data.apply_splits(manifest, splits)
        audit.update(data.coverage_audit(manifest, clinical=clinical))
    return Cohort(manifest=manifest, audit=audit, simulated=False, generated_splits=splits)


def audit_brief(audit: Mapping) -> dict:
    """The audit's headline entries (:data:`BRIEF_KEYS`; None where the audit lacks one)."""
    return {k: audit.get(k) for k in BRIEF_KEYS}


@dataclass
class Coverage:
    """Tile counts of a manifest.

    tiles : donors x markers, number of tiles (a crosstab; index ``donor``).
    annotated : splits (train, val, test present) x markers, number of annotated tiles.
    annotated_grid : donors x markers (aligned with ``tiles``), number of annotated tiles.
    """

    tiles: pd.DataFrame
    annotated: pd.DataFrame
    annotated_grid: pd.DataFrame


def coverage_tables(manifest: pd.DataFrame) -> Coverage:
    """Tiles and annotated tiles per donor and marker, and annotated tiles per split and marker."""
    tiles = pd.crosstab(manifest["donor"], manifest["marker"])
    ann = manifest["annotated"]
    annotated = pd.crosstab(manifest.loc[ann, "split"], manifest.loc[ann, "marker"])
    annotated = annotated.reindex([s for s in SPLIT_ORDER if s in annotated.index])
    grid = (pd.crosstab(manifest["donor"], manifest["marker"], values=manifest["annotated"], aggfunc="sum")
            .reindex_like(tiles).fillna(0).astype(int))
    return Coverage(tiles=tiles, annotated=annotated, annotated_grid=grid)


def split_donors(manifest: pd.DataFrame) -> pd.DataFrame:
    """Annotated tiles per (split, donor), sorted by split then donor: columns split, donor,
    n_annotated_tiles. Raises SeglabError naming the donors whose tiles are on two sides."""
    ann = manifest[manifest["annotated"]]
    sides = ann.groupby("donor")["split"].nunique()
    twice = sorted(sides.index[sides > 1].tolist())
    if twice:
        raise SeglabError(f"donors {twice} have annotated tiles on two sides of the split; splits are by donor")
    return (ann.groupby(["split", "donor"]).size().rename("n_annotated_tiles").reset_index()
            .sort_values(["split", "donor"]))


def annotated_with_masks(manifest: pd.DataFrame) -> pd.DataFrame:
    """The annotated tiles that have an instance mask file."""
    return manifest[manifest["annotated"] & (manifest["mask_path"] != "")]


@dataclass
class ExampleTiles:
    """Tiles to show: rows (manifest rows), images ((2, Y, X) [DAPI, marker]), masks ((Y, X) labels)."""

    rows: pd.DataFrame
    images: list
    masks: list


def example_tiles(manifest: pd.DataFrame, n: int, seed: int = 0) -> ExampleTiles:
    """One annotated tile per marker (markers in sorted order, each drawn at random with ``seed``),
    the first ``n`` of them, loaded with their instance masks."""
    rng = np.random.default_rng(seed)
    # one draw per marker, for every marker, before keeping n: the picks do not depend on n
    picks = [g.iloc[int(rng.integers(len(g)))] for _, g in annotated_with_masks(manifest).groupby("marker")][:n]
    rows = pd.DataFrame(picks).reset_index(drop=True)
    return ExampleTiles(rows=rows, images=[data.load_tile(r) for r in picks], masks=[data.load_mask(r) for r in picks])


@dataclass
class PlantedTruth:
    """What the simulated cohort planted, and what the downstream positivity rule recovers of it.

    effects : one row per marker: marker, effect (log-odds per SD of the latent score), ...
    counts : one row per donor and marker: latent_score, n_total, n_positive, positive_fraction, ...
    agreement : one row per annotated tile: planted vs rule positives on the true masks
        (n_total, n_positive, n_positive_rule, agreement as a fraction of cells).
    by_marker : agreement per marker (mean agreement; summed counts).
    rule_agreement : mean per-tile agreement (fraction).
    """

    effects: pd.DataFrame
    counts: pd.DataFrame
    agreement: pd.DataFrame
    by_marker: pd.DataFrame
    rule_agreement: float


def planted_truth(cohort: Cohort) -> PlantedTruth | None:
    """The planted truth of a simulated cohort and the 75th-percentile rule on its annotated tiles'
    true masks (the ceiling segmentation can only lower); None for real tiles."""
    if not cohort.simulated:
        return None
    truth = simulate.load_truth(cohort.cohort_dir)
    effects = pd.DataFrame([{"marker": m, **v} for m, v in truth["markers"].items()])
    agreement = simulate.positivity_agreement(cohort.cohort_dir,
                                              tile_ids=cohort.manifest.loc[cohort.manifest["annotated"], "tile_id"])
    by_marker = agreement.groupby("marker").agg(agreement=("agreement", "mean"), n_positive=("n_positive", "sum"),
                                                n_positive_rule=("n_positive_rule", "sum"),
                                                n_total=("n_total", "sum"))
    return PlantedTruth(effects=effects, counts=simulate.truth_counts(cohort.cohort_dir), agreement=agreement,
                        by_marker=by_marker, rule_agreement=float(agreement["agreement"].mean()))


@dataclass
class Realism:
    """Nucleus statistics of our tiles against DSB2018.

    per_image : one row per image: source ('simulated', 'tiles' or 'dsb2018'), image, group, and the
        :func:`seglab.data.simulate.image_stats` columns.
    summary : median and quartiles per source and statistic, plus the source 'dsb2018 256x256'.
    ours : the source name of our tiles ('simulated' or 'tiles').
    """

    per_image: pd.DataFrame
    summary: pd.DataFrame
    ours: str

    @property
    def medians(self) -> pd.DataFrame:
        """statistic x source, the median per image."""
        return self.summary.pivot(index="statistic", columns="source", values="median")


def realism(cohort: Cohort, dsb_dir: str | Path | None, *, max_tiles: int | None, seed: int = 0) -> Realism | None:
    """Per-image nucleus statistics of ``max_tiles`` of our DAPI tiles (sampled with ``seed``; real tiles:
    the first annotated ones with masks) and of every DSB2018 image; None when DSB2018 is absent."""
    if dsb_dir is None:
        return None
    if cohort.simulated:
        table = simulate.realism_table(cohort.cohort_dir, dsb_dir, max_tiles=max_tiles, seed=seed)
    else:
        rows = [{"source": "tiles", "image": r["tile_id"], "group": r["marker"],
                 **simulate.image_stats(data.load_tile(r)[0], data.load_mask(r))}
                for _, r in annotated_with_masks(cohort.manifest).head(max_tiles).iterrows()]
        table = pd.concat([pd.DataFrame(rows), simulate.realism_table(None, dsb_dir)], ignore_index=True)
    closest = table[(table["source"] == DSB_SOURCE) & (table["group"] == DSB_CLOSEST_GROUP)]
    summary = pd.concat([simulate.realism_summary(table),
                         simulate.realism_summary(closest).assign(source=DSB_CLOSEST_SOURCE)], ignore_index=True)
    return Realism(per_image=table, summary=summary, ours="simulated" if cohort.simulated else "tiles")


def realism_numbers(found: Realism) -> dict:
    """``realism_<statistic>_<source>`` (source ours, dsb2018, dsb256): the median per image, 3 decimals."""
    med = found.summary.set_index(["source", "statistic"])["median"]
    sources = (("ours", found.ours), ("dsb2018", DSB_SOURCE), ("dsb256", DSB_CLOSEST_SOURCE))
    return {f"realism_{s}_{key}": round(float(med[(src, s)]), 3) for s in REALISM_STATS for key, src in sources}


def headline(cohort: Cohort, truth: PlantedTruth | None, found: Realism | None) -> dict:
    """The run's summary numbers: tiles, donors and annotated tiles per split, fallbacks and exclusions,
    donors missing on either side, generation time (s), the rule's agreement on true masks (fraction)
    and the realism medians (:func:`realism_numbers`)."""
    audit = cohort.audit
    per_split = audit["annotated_per_split"]
    return {
        "n_tiles": int(audit["n_tiles_paired"]), "n_donors": int(audit["n_donors_in_tiles"]),
        "n_annotated": int(audit["n_annotated"]),
        "n_train": int(per_split["train"]), "n_val": int(per_split["val"]), "n_test": int(per_split["test"]),
        "n_c2_fallbacks": int(audit["n_fallbacks"]), "n_unpaired": int(audit["n_unpaired"]),
        "n_excluded": int(audit["n_excluded"]),
        "n_donors_missing_clinical": len(audit.get("donors_missing_from_clinical") or []),
        "n_donors_missing_tiles": len(audit.get("donors_missing_from_tiles") or []),
        "generation_s": cohort.generation_s,
        "rule_agreement_true_masks": None if truth is None else truth.rule_agreement,
        **({} if found is None else realism_numbers(found)),
    }
