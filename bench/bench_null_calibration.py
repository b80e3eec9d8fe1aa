"""Null calibration of the downstream tests: does BH keep the false discovery proportion <= alpha at 5, 8, 12 and 24 donors?

Data: ``--cohorts`` simulated cohorts per donor count (``seglab.downstream.synthetic.null_calibration``:
tile and clinical tables without images, 5 markers x 3 tiles per donor, the 8 outcomes of a ROSMAP-like
clinical table, four of them ordinal so that donors tie as on the Braak and CERAD scales, 5% of the
outcome values missing; 120 tests per cohort). Two scenarios:

- ``null``: no marker has an effect; every discovery is false (FDP is 1 or 0, so the mean FDP is the share
  of cohorts with any false discovery);
- ``mixed``: gfap and iba1 carry an effect (0.5 and 0.4 log-odds per SD of the latent score), neun, olig2
  and pecam none; the false discoveries are the tests of those three.

Methods, each BH over a cohort's tests at alpha:

- ``lib``: the library's p-values (exact permutation p up to 9 donors and for |rho| = 1, a Monte Carlo
  permutation p from 200,000 pairings above, seeded per cohort; tests below ``min_donors`` not done);
- ``t``: scipy's t approximation everywhere (the library before the exact p-values: p = 0 for a perfect
  rank correlation; above 9 donors its too-light far tail lifts the mean FDP over alpha);
- ``perm`` (with ``--permutation M``): an independent check of ``lib``, a Monte Carlo permutation p, (b + 1) / (M + 1), two-sided by
  doubling, for every test whose library p is below 0.02 (the others keep it: among 120 tests BH can only
  reach 0.02 with 48 discoveries).

Printed per scenario and donor count: cohorts, alpha, mean number of tests with a p-value, and per method
the mean FDP, its Monte Carlo standard error (se), z = (mean FDP - alpha) / se and the share of cohorts
with any false discovery; the smallest p seen and the number of p-values equal to 0.

Usage: .venv/bin/python bench/bench_null_calibration.py [--cohorts 200] [--donors 5 8 12 24] [--alpha 0.05]
[--scenarios null mixed] [--resamples M] [--permutation 50000]  (with the library's 200,000 pairings about
16 minutes per 200 cohorts x 3 donor counts (5, 8, 24) x 2 scenarios on one core of this CPU, most of it
at 24 donors; the independent permutation check adds about a third)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from seglab.downstream.correlate import MIN_DONORS
from seglab.downstream.synthetic import null_calibration

MARKERS = ("gfap", "iba1", "neun", "olig2", "pecam")
SCENARIOS = {"null": MARKERS, "mixed": {"gfap": 0.5, "iba1": 0.4, "neun": 0.0, "olig2": 0.0, "pecam": 0.0}}
PERM_BELOW = 0.02  # t p under which the permutation p is computed


def permutation_method(M: int, seed: int):
    """A ``null_calibration`` method: Monte Carlo permutation p of the tests with t p < PERM_BELOW."""
    rng = np.random.default_rng(seed)

    def pvalues(cohort, res: pd.DataFrame) -> np.ndarray:
        feats = cohort.features.set_index(["marker", "donor"])
        p = res["p"].to_numpy().copy()
        for r in np.flatnonzero(p < PERM_BELOW):
            row = res.iloc[r]
            x = feats.loc[row["marker"], row["feature"]].reindex(cohort.donors).to_numpy(np.float64)
            y = cohort.outcomes[row["outcome"]].to_numpy(np.float64)
            ok = np.isfinite(x) & np.isfinite(y)
            a, b = rankdata(x[ok]), rankdata(y[ok])
            a, b = a - a.mean(), b - b.mean()
            obs = a @ b
            null = rng.permuted(np.tile(b, (M, 1)), axis=1) @ a
            eps = 1e-9 * abs(obs) + 1e-12  # equal sums of products computed in another order
            ge = ((null >= obs - eps).sum() + 1) / (M + 1)
            le = ((null <= obs + eps).sum() + 1) / (M + 1)
            p[r] = min(1.0, 2 * min(ge, le))
        return p

    return pvalues


def summarise(runs: pd.DataFrame, scenario: str, n_donors: int, alpha: float, methods) -> dict:
    """One table row: the means over the cohorts of one scenario and donor count."""
    m = len(runs)
    row = {"scenario": scenario, "donors": n_donors, "cohorts": m, "alpha": alpha,
           "mean_tests": round(float(runs["n_tests"].mean()), 1)}
    for name in methods:
        fdp = runs[f"fdp_{name}"]
        se = float(fdp.std(ddof=1) / np.sqrt(m)) if m > 1 else float("nan")
        row[f"fdp_{name}"] = round(float(fdp.mean()), 4)
        row[f"se_{name}"] = round(se, 4)
        row[f"z_{name}"] = round((float(fdp.mean()) - alpha) / se, 1) if se > 0 else float("nan")
        row[f"any_{name}"] = round(float(runs[f"any_false_{name}"].mean()), 3)
    row["min_p"] = float(runs["min_p"].min())
    row["n_p_zero"] = int(runs["n_p_zero"].sum())
    return row


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", type=int, default=200)
    ap.add_argument("--donors", type=int, nargs="+", default=[5, 8, 12, 24])
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--min-donors", type=int, default=MIN_DONORS)
    ap.add_argument("--permutation", type=int, default=0, metavar="M",
                    help="also a Monte Carlo permutation p with M draws (0: no)")
    ap.add_argument("--seed", type=int, default=20_000)
    ap.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    ap.add_argument("--resamples", type=int, default=None, metavar="M",
                    help="Monte Carlo pairings of the library's p above 9 donors (default: the library's, 200,000)")
    args = ap.parse_args(argv)
    extra = {"perm": permutation_method(args.permutation, args.seed)} if args.permutation else {}
    names = ["lib", "t", *extra]
    rows = []
    t0 = time.perf_counter()
    for scenario, effects in ((k, SCENARIOS[k]) for k in args.scenarios):
        for n in args.donors:
            runs = null_calibration(n, args.cohorts, effects=effects, alpha=args.alpha, min_donors=args.min_donors,
                                    seed=args.seed, methods=extra, n_resamples=args.resamples)
            rows.append(summarise(runs, scenario, n, args.alpha, names))
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(f"BH at alpha = {args.alpha}, min_donors = {args.min_donors}; fdp: mean false discovery proportion, "
              "se: its Monte Carlo standard error, z = (fdp - alpha) / se, any: share of cohorts with a false "
              "discovery; methods: " + ", ".join(names))
        print(table.to_string(index=False))
    above = table[[f"z_{k}" for k in names]].gt(2)
    print("mean FDP above alpha by more than 2 se: "
          + ("; ".join(f"{k} at {r.scenario} {r.donors} donors" for k in names for r in table[above[f"z_{k}"]].itertuples())
             or "nowhere")
          + f"; p-values equal to 0 (library): {int(table['n_p_zero'].sum())}; {time.perf_counter() - t0:.0f} s")
    return table


if __name__ == "__main__":
    main()
