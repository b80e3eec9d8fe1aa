"""Recovery of the planted effects of a simulated cohort by each model's analysis (E5).

One function per arrow::

    {model: tile table}                       --count_agreement-->     per tile: counts beside the truth's
    truth.json                                --latent_scores-->       each donor's latent score
    clinical + truth.json                     --outcome_directions-->  sign of each outcome vs the latent score
    {model: correlations} + truth + clinical  --planted_recovery-->    per test and per model: sign, q, rho vs truth
    {model: donor features} + truth           --latent_rho-->          per model and marker: rho with the latent score
    latent_rho's table                        --signed_latent_rho_mean--> per model: mean rho x sign(effect)
    sensitivity table + truth + clinical      --recovery_by_percentile--> planted_recovery at each percentile

Planted-effect recovery
-----------------------
``truth.json`` plants a log-odds effect per marker on the fraction of
marker-positive cells (``effect`` per SD of each donor's latent score; null
markers have 0). Each clinical outcome follows the latent score up or down
(ceradsc falls as pathology rises), measured here as the sign of the Spearman
correlation of the outcome with the latent score over the donors. The expected
sign of a test (marker, ``ratio``, outcome) is therefore
``sign(effect) * direction(outcome)``. Per model:

``sign_correct``
    fraction of the planted (non-null) tests whose rho has the expected sign;
``recovered``
    fraction of the planted tests significant (BH q < alpha) with the expected sign;
``false_positives``
    number of null-marker tests with q < alpha (``false_positive_rate`` = / tests);
``mean_abs_rho_diff_vs_truth``
    mean |rho_model - rho_truth| over all tests of the feature, where "truth" is
    the same analysis on the ground-truth masks.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError


def count_agreement(tables: Mapping[str, pd.DataFrame], truth: str = "truth") -> pd.DataFrame:
    """Per tile: each model's n_total_cells and n_marker_positive beside the truth's (long format).

    Columns: tile_id, donor, marker, model, n_total_cells, n_marker_positive,
    n_total_cells_truth, n_marker_positive_truth.
    """
    if truth not in tables:
        raise SeglabError(f"count_agreement: no {truth!r} table among {list(tables)}")
    cols = ["tile_id", "n_total_cells", "n_marker_positive"]
    ref = tables[truth][cols].rename(columns={"n_total_cells": "n_total_cells_truth",
                                              "n_marker_positive": "n_marker_positive_truth"})
    parts = []
    for m, t in tables.items():
        if m == truth:
            continue
        parts.append(t[["tile_id", "donor", "marker", "n_total_cells", "n_marker_positive"]].assign(model=m)
                     .merge(ref, on="tile_id", how="left"))
    return pd.concat(parts, ignore_index=True)


def latent_scores(truth: Mapping) -> pd.Series:
    """Every donor's latent score from ``truth.json`` (donors with tiles and clinical-only donors),
    indexed by normalised donor id text."""
    from seglab.downstream.cohort import normalise_id

    z = {normalise_id(d): float(r["latent_score"]) for d, r in truth.get("donors", {}).items()}
    z.update({normalise_id(d): float(r["latent_score"]) for d, r in truth.get("clinical_only_donors", {}).items()})
    if not z:
        raise SeglabError("truth.json has no donors with a latent_score; is this a simulated cohort's truth?")
    return pd.Series(z, name="latent_score")


def outcome_directions(clinical: pd.DataFrame, truth: Mapping, outcomes: Sequence[str], *,
                       donor_col: str = "projid") -> pd.Series:
    """Sign (+1 / -1) of each outcome's Spearman correlation with the latent score over the donors."""
    from scipy.stats import spearmanr

    from seglab.downstream.cohort import normalise_ids

    z = latent_scores(truth)
    ids = normalise_ids(clinical[donor_col])
    zz = pd.Series(ids).map(z).to_numpy(float)
    out = {}
    for o in outcomes:
        if o not in clinical.columns:
            raise SeglabError(f"outcome {o!r} is not a column of the clinical table ({list(clinical.columns)})")
        v = pd.to_numeric(clinical[o], errors="coerce").to_numpy(float)
        ok = np.isfinite(v) & np.isfinite(zz)
        r = spearmanr(v[ok], zz[ok]).statistic if ok.sum() >= 3 else math.nan
        out[o] = float(np.sign(r)) if np.isfinite(r) and r != 0 else math.nan
    return pd.Series(out, name="direction")


def expected_signs(truth: Mapping, directions: pd.Series) -> pd.DataFrame:
    """One row per (marker, outcome): effect, null, direction and the expected sign of rho (0 for null)."""
    rows = []
    for m, rec in truth["markers"].items():
        for o, d in directions.items():
            eff = float(rec["effect"])
            null = bool(rec.get("null", eff == 0))
            rows.append({"marker": m, "outcome": o, "effect": eff, "null": null, "direction": d,
                         "expected_sign": 0.0 if null else float(np.sign(eff) * d)})
    return pd.DataFrame(rows)


def planted_recovery(correlations: Mapping[str, pd.DataFrame], truth: Mapping, clinical: pd.DataFrame, *,
                     feature: str = "ratio", alpha: float = 0.05, reference: str | None = "truth",
                     donor_col: str = "projid") -> tuple[pd.DataFrame, pd.DataFrame]:
    """How each model's analysis recovers the planted effects.

    Parameters
    ----------
    correlations : {model: Analysis.correlations} (marker, feature, outcome, rho, q).
    truth : the cohort's ``truth.json`` (planted effect per marker, latent score per donor).
    clinical : the clinical table (outcome directions are measured on it).
    feature : the donor feature that carries the planted effect (``ratio``).
    reference : the model whose rho the others are compared with (ground-truth masks), or None.

    Returns
    -------
    per_test : one row per (model, marker, outcome) of ``feature``: rho, q, expected_sign,
        null, sign_correct, significant, recovered, false_positive, rho_reference.
    per_model : one row per model: n_planted_tests, sign_correct, recovered,
        n_wrong_sign_significant, n_null_tests, false_positives, false_positive_rate,
        mean_abs_rho_diff_vs_truth (NaN for the reference itself or without one).
    """
    if not correlations:
        raise SeglabError("planted_recovery: no model's correlations given")
    if reference is not None and reference not in correlations:
        raise SeglabError(f"planted_recovery: reference {reference!r} is not among the models {list(correlations)}")
    outcomes = None
    parts = []
    for m, c in correlations.items():
        t = c[c["feature"] == feature][["marker", "outcome", "rho", "q"]]
        if t.empty:
            raise SeglabError(f"planted_recovery: model {m!r} has no test of feature {feature!r}")
        outcomes = outcomes or list(dict.fromkeys(t["outcome"]))
        parts.append(t.assign(model=m))
    per = pd.concat(parts, ignore_index=True)
    unknown = sorted(set(per["marker"]) - set(truth["markers"]))
    if unknown:
        raise SeglabError(f"planted_recovery: markers {unknown} have no planted effect in truth.json")
    exp = expected_signs(truth, outcome_directions(clinical, truth, outcomes, donor_col=donor_col))
    per = per.merge(exp, on=["marker", "outcome"], how="left")
    sign = np.sign(per["rho"].to_numpy(float))
    per["significant"] = (per["q"].to_numpy(float) < alpha)  # NaN q compares False
    per["sign_correct"] = np.where(per["null"], np.nan, (sign == per["expected_sign"]).astype(float))
    per.loc[~per["null"] & per["rho"].isna(), "sign_correct"] = np.nan
    per["recovered"] = ~per["null"] & per["significant"] & (sign == per["expected_sign"])
    per["false_positive"] = per["null"] & per["significant"]
    if reference is not None:
        ref = per[per["model"] == reference].set_index(["marker", "outcome"])["rho"]
        per["rho_reference"] = per.set_index(["marker", "outcome"]).index.map(ref).to_numpy(float)
    else:
        per["rho_reference"] = np.nan
    rows = []
    for m in correlations:
        g = per[per["model"] == m]
        planted = g[~g["null"] & g["rho"].notna() & (g["expected_sign"] != 0) & g["expected_sign"].notna()]
        nul = g[g["null"]]
        diff = np.abs(g["rho"] - g["rho_reference"])
        rows.append({
            "model": m,
            "n_planted_tests": int(len(planted)),
            "sign_correct": float(planted["sign_correct"].mean()) if len(planted) else math.nan,
            "recovered": float(planted["recovered"].mean()) if len(planted) else math.nan,
            "n_recovered": int(planted["recovered"].sum()),
            "n_wrong_sign_significant": int((planted["significant"] & (planted["sign_correct"] == 0)).sum()),
            "n_null_tests": int(nul["rho"].notna().sum()),
            "false_positives": int(nul["false_positive"].sum()),
            "false_positive_rate": float(nul["false_positive"].sum() / max(nul["rho"].notna().sum(), 1)),
            "mean_abs_rho_diff_vs_truth": (float(np.nanmean(diff)) if m != reference and diff.notna().any()
                                           else math.nan),
        })
    return per, pd.DataFrame(rows)


def latent_rho(donor_tables: Mapping[str, pd.DataFrame], truth: Mapping, *, feature: str = "ratio") -> pd.DataFrame:
    """Per model and marker: Spearman rho of the donor feature with the donors' latent score.

    The cleanest view of the planted effect (no clinical noise, no FDR): with the
    ground-truth masks it approaches ``sign(effect)``; a null marker stays near 0.
    ``donor_tables`` are ``Analysis.donors`` (donor, marker, <feature>). Returns
    model, marker, effect, null, n_donors, rho_latent.
    """
    from scipy.stats import spearmanr

    z = latent_scores(truth)
    rows = []
    for m, d in donor_tables.items():
        for mk, g in d.groupby("marker", sort=True):
            v = g[feature].to_numpy(float)
            zz = g["donor"].astype(str).map(z).to_numpy(float)
            ok = np.isfinite(v) & np.isfinite(zz)
            r = spearmanr(v[ok], zz[ok]).statistic if ok.sum() >= 3 and np.ptp(v[ok]) > 0 else math.nan
            rec = truth["markers"].get(mk, {})
            rows.append({"model": m, "marker": mk, "effect": rec.get("effect", math.nan),
                         "null": rec.get("null"), "n_donors": int(ok.sum()), "rho_latent": float(r)})
    return pd.DataFrame(rows)


def signed_latent_rho_mean(latent: pd.DataFrame, model: str) -> float:
    """One model's mean over the planted (non-null) markers of ``rho_latent * sign(effect)``: 1 when
    every planted marker's donor ratio follows the latent score in the planted direction, 0 when
    none does on average. ``latent`` is :func:`latent_rho`'s table; NaN when the model has no
    planted marker there."""
    lat = latent[(latent["model"] == model) & ~latent["null"].astype(bool)]
    return float((lat["rho_latent"] * np.sign(lat["effect"])).mean())


def recovery_by_percentile(sensitivity: pd.DataFrame, truth: Mapping, clinical: pd.DataFrame,
                           models: Sequence[str], *, alpha: float = 0.05,
                           reference: str | None = "truth") -> pd.DataFrame:
    """:func:`planted_recovery`'s per-model table at every positivity percentile of a threshold
    sensitivity table (:func:`seglab.downstream.correlate.threshold_sensitivity` rows of every
    model stacked with a ``model`` column); one row per (percentile, model), column ``percentile``
    last. ``models`` fixes the row order within a percentile."""
    parts = []
    for pct, g in sensitivity.groupby("percentile"):
        _, per_model = planted_recovery({m: g[g["model"] == m] for m in models}, truth, clinical, alpha=alpha,
                                        reference=reference)
        parts.append(per_model.assign(percentile=pct))
    return pd.concat(parts, ignore_index=True)
