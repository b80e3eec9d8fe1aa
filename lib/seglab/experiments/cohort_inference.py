"""Inference over every tile of a cohort, cached by content, and recovery of planted effects (E5).

The chain of notebook 05_downstream, one function per arrow::

    model + tiles + inference settings  --prediction_dir-->   data/predictions/<model>-<settings+tiles>/
    the same                            --predict_cohort-->   masks <tile>.tif + per-tile table (resumable)
    prediction folder                   --mask_loader-->      load_mask(row) for downstream.features.tile_table
    correlations of each model + truth.json --planted_recovery--> per test and per model: sign, q, rho vs truth

Where the predictions live
--------------------------
A prediction folder is named by what decides its masks, not by the run that
made it: ``<sha256 of the model weights>[:16]-<hash of the inference settings
and of the tiles' files>[:16]``. A rerun of the notebook, another notebook, or
a Slurm array over shards (``seglab predict --shard I/N --out <folder>``)
writes to and reads from the same folder, so an interrupted inference resumes
and a finished one is reused. ``prediction.json`` in the folder records the
model, the settings and the tiles' hash; a folder whose record disagrees is
refused rather than mixed.

Planted-effect recovery (simulated cohorts)
-------------------------------------------
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

from typing import Sequence

import numpy as np
import pandas as pd



# --------------------------------------------------------------------------- addressing


# --------------------------------------------------------------------------- inference


# --------------------------------------------------------------------------- planted truth


def recovery_figure(per_test: pd.DataFrame, per_model: pd.DataFrame, latent: pd.DataFrame | None = None, *,
                    models: Sequence[str] | None = None, figsize=None):
    """Three panels: rho of each model against the ground-truth-mask rho per test (planted and null
    markers marked); recovered / sign-correct / false-positive rates per model; and, with
    ``latent``, rho with the latent score per marker and model. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    models = list(models or per_model["model"])
    ncol = 3 if latent is not None else 2
    fig = Figure(figsize=figsize or (5 * ncol, 4), layout="constrained")
    axes = fig.subplots(1, ncol)
    ax = axes[0]
    others = [m for m in models if per_test.loc[per_test["model"] == m, "rho_reference"].notna().any()
              and not np.allclose(per_test.loc[per_test["model"] == m, "rho"].fillna(0),
                                  per_test.loc[per_test["model"] == m, "rho_reference"].fillna(0))]
    for k, m in enumerate(others):
        g = per_test[per_test["model"] == m]
        for null, mk in ((False, "o"), (True, "x")):
            h = g[g["null"] == null]
            ax.scatter(h["rho_reference"], h["rho"], marker=mk, s=22, color=f"C{k}",
                       label=f"{m} ({'null' if null else 'planted'} markers)")
    ax.plot([-1, 1], [-1, 1], color="k", lw=0.6)
    ax.axhline(0, color="0.7", lw=0.5)
    ax.axvline(0, color="0.7", lw=0.5)
    ax.set_xlabel("rho on the ground-truth masks")
    ax.set_ylabel("rho on the model's masks")
    ax.set_title("each test (marker x outcome)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    pm = per_model.set_index("model").reindex(models)
    x = np.arange(len(models))
    for j, (col, lab) in enumerate((("recovered", "recovered (q < alpha, right sign)"),
                                    ("sign_correct", "right sign (any q)"),
                                    ("false_positive_rate", "false positives on null markers"))):
        ax.bar(x + (j - 1) * 0.27, pm[col].to_numpy(float), 0.27, label=lab)
    ax.set_xticks(x, models)
    ax.set_ylim(0, 1.05)
    ax.set_title("planted-effect recovery per model", fontsize=9)
    ax.legend(fontsize=7)
    if latent is not None:
        ax = axes[2]
        piv = latent.pivot(index="marker", columns="model", values="rho_latent").reindex(columns=models)
        w = 0.8 / max(len(models), 1)
        xm = np.arange(len(piv))
        for k, m in enumerate(models):
            ax.bar(xm + (k - (len(models) - 1) / 2) * w, piv[m].to_numpy(float), w, label=m)
        eff = latent.drop_duplicates("marker").set_index("marker").reindex(piv.index)["effect"]
        ax.set_xticks(xm, [f"{mk}\n({e:+.1f})" for mk, e in zip(piv.index, eff)])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(-1, 1)
        ax.set_ylabel("Spearman rho, donor ratio vs latent score")
        ax.set_title("planted effect (log-odds per SD) per marker", fontsize=9)
        ax.legend(fontsize=7)
    return fig
