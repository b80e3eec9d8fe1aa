"""Calibration of seglab.evaluate.claims: do its intervals cover at their nominal rate, does its
test reject at its nominal rate, and how fast is it?

Simulated test sets (no images): per tile, n_true ~ 20 + Poisson(40) true nuclei; a donor
effect (logit sd 0.6 on detection, log sd 0.5 on false positives) and a tile effect (0.4, 0.3)
shared by both segmentations; then each segmentation draws tp ~ Binomial(n_true, p) and
fp ~ Poisson(rate) on its own. Scenarios:

- ``perturb``: A and B are the same masks with independent small perturbations (only the
  binomial / Poisson noise differs): true difference 0.
- ``seeds``: two seeds of the same fine-tune: each also has its own donor effect (logit sd 0.2)
  and tile effect (0.1), so one seed is better on some donors: true difference 0.
- ``seeds+shift``: as ``seeds``, B's detection logit 0.3 higher: the true difference is the
  population value of pooled AP(B) - AP(A), computed once from 400,000 donors' expected counts.

Designs: 6 donors x 4 tiles (the demo's test split), 24 donors x 4 tiles, and 5 donors x 1 tile
(one marker's test tiles in the demo: E1's marker subset, E6's held-out marker). For each test set
the three bootstrap schemes (donors then tiles, the default; donors only; tiles ignoring
donors) and the three intervals (percentile, BCa, t with the jackknife SE) at 95%, and the
donor-level permutation test at 0.05. Coverage is the fraction of intervals containing the true
difference, with its Monte Carlo standard error sqrt(c (1 - c) / sets).

Timing: 300 tiles (30 donors x 10) x 3 IoU thresholds x 2000 resamples, against one pass of the
library's pooled AP over the same 300 tiles (``scoring.scores_from_per_image``), both measured
here, best of several runs.

About 1-2 minutes on 2 free cores (1000 sets x 9 cells x 3 bootstraps of 500 resamples).

Usage: .venv/bin/python bench/bench_claims_calibration.py [--sets 1000] [--resamples 500] [--seed 20]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import expit

from seglab.evaluate import claims, scoring

LEVEL = 0.95
SCHEMES = {"donors+tiles": dict(cluster=True, resample_tiles=True),
           "donors": dict(cluster=True, resample_tiles=False),
           "tiles (naive)": dict(cluster=False)}


@dataclass(frozen=True)
class Scenario:
    name: str
    model_donor_sd: float      # each segmentation's own donor effect (logit of detection, log of fp rate)
    model_tile_sd: float       # each segmentation's own tile effect
    shift: float               # B's extra detection logit


SCENARIOS = (Scenario("perturb", 0.0, 0.0, 0.0), Scenario("seeds", 0.2, 0.1, 0.0),
             Scenario("seeds+shift", 0.2, 0.1, 0.3))
DESIGNS = ((6, 4), (24, 4), (5, 1))   # (5, 1): one marker's test tiles, one per donor


def expected_counts(rng, n_donors, n_tiles, s: Scenario):
    """Per tile: (n_true, expected tp of A and B, expected fp of A and B) and the donor of each tile."""
    donor = np.repeat(np.arange(n_donors), n_tiles)
    n = len(donor)
    n_true = 20 + rng.poisson(40, n)
    detect = 1.4 + rng.normal(0, 0.6, n_donors)[donor] + rng.normal(0, 0.4, n)
    log_fp = np.log(0.08) + rng.normal(0, 0.5, n_donors)[donor] + rng.normal(0, 0.3, n)
    tp, fp = [], []
    for shift in (0.0, s.shift):
        own = rng.normal(0, s.model_donor_sd, (2, n_donors))[:, donor] + rng.normal(0, s.model_tile_sd, (2, n))
        tp.append(n_true * expit(detect + shift + own[0]))
        fp.append(n_true * np.exp(log_fp + own[1]))
    return n_true, tp, fp, donor


def draw_test_set(rng, n_donors, n_tiles, s: Scenario):
    """(counts_a, counts_b) of shape (N, 1, 3) and the donor of each tile."""
    n_true, tp, fp, donor = expected_counts(rng, n_donors, n_tiles, s)
    counts = []
    for mean_tp, mean_fp in zip(tp, fp):
        hit = rng.binomial(n_true, mean_tp / n_true)
        counts.append(np.stack([hit, rng.poisson(mean_fp), n_true - hit], -1)[:, None, :].astype(float))
    return counts[0], counts[1], donor


def population_difference(s: Scenario, seed: int) -> float:
    """Pooled AP(B) - AP(A) of the population: expected counts summed over 400,000 donors."""
    if s.shift == 0:
        return 0.0   # A and B are exchangeable
    n_true, tp, fp, _ = expected_counts(np.random.default_rng(seed), 400_000, 4, s)
    ap = [t.sum() / (n_true.sum() + f.sum()) for t, f in zip(tp, fp)]
    return float(ap[1] - ap[0])


def one_cell(rng, design, s: Scenario, truth: float, sets: int, resamples: int) -> tuple[list[dict], dict]:
    """Coverage rows (scheme x interval) and the test's rejection row of one design and scenario."""
    covered = {(k, m): [] for k in SCHEMES for m in claims.INTERVALS}
    widths = {key: [] for key in covered}
    rejected = []
    for _ in range(sets):
        a, b, donor = draw_test_set(rng, *design, s)
        for scheme, options in SCHEMES.items():
            boot = claims.bootstrap_differences(a, b, donor, n_resamples=resamples, seed=rng, **options)
            for method in claims.INTERVALS:
                low, high = claims.interval(boot, method, LEVEL)
                covered[scheme, method].append(low[0, 0] <= truth <= high[0, 0])
                widths[scheme, method].append(high[0, 0] - low[0, 0])
        rejected.append(claims.donor_flip_test(a, b, donor, n_permutations=999, seed=rng).p_value[0, 0] <= 0.05)
    label = f"{design[0]} donors x {design[1]} tiles"
    rows = [{"design": label, "scenario": s.name, "scheme": k, "interval": m, "coverage": np.mean(c),
             "mc_se": np.sqrt(np.mean(c) * (1 - np.mean(c)) / sets), "mean_width": np.mean(widths[k, m])}
            for (k, m), c in covered.items()]
    rate = float(np.mean(rejected))
    test = {"design": label, "scenario": s.name, "true_difference": truth, "rejection_rate_at_0.05": rate,
            "mc_se": np.sqrt(rate * (1 - rate) / sets), "min_possible_p": 2 / 2 ** design[0] if design[0] <= 16 else None}
    return rows, test


def calibration(sets: int, resamples: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows, tests = [], []
    for s in SCENARIOS:
        truth = population_difference(s, seed + 1)
        for design in DESIGNS:
            t0 = time.perf_counter()
            cell_rows, test = one_cell(rng, design, s, truth, sets, resamples)
            rows += cell_rows
            tests.append(test)
            print(f"  {s.name:12s} {design[0]:>2d} x {design[1]} tiles: {time.perf_counter() - t0:.1f} s", flush=True)
    return pd.DataFrame(rows), pd.DataFrame(tests)


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def timing(seed: int) -> float:
    """Print the cost of 2000 resamples of 300 tiles against one pooled-AP pass; return resamples per pass."""
    rng = np.random.default_rng(seed)
    thresholds = (0.5, 0.75, 0.9)
    donors = np.repeat(np.arange(30), 10)
    n_true = rng.integers(20, 80, (300, 1)).repeat(3, axis=1)
    tps = [np.minimum(n_true, rng.binomial(n_true, q)) for q in (0.80, 0.83)]
    counts = [np.stack([tp, rng.poisson(5, tp.shape), n_true - tp], -1).astype(float) for tp in tps]
    per_image = pd.DataFrame({"image": np.repeat(np.arange(300), 3), "threshold": np.tile(thresholds, 300),
                              **{c: counts[0][..., k].ravel() for k, c in enumerate(claims.COUNTS)},
                              "n_true": n_true.ravel(), "n_pred": (counts[0][..., 0] + counts[0][..., 1]).ravel(),
                              "ap": 0.0})
    t_pass = best_time(lambda: scoring.scores_from_per_image(per_image, 0.5), 20)
    t_boot = best_time(lambda: claims.bootstrap_differences(*counts, donors, n_resamples=2000, seed=1), 5)
    t_all = best_time(lambda: claims.compare_counts(*counts, donors, thresholds, n_resamples=2000), 5)
    print(f"one pooled-AP pass (scoring.scores_from_per_image, 300 tiles, 1 threshold): {t_pass * 1e3:.2f} ms (reference)")
    print(f"bootstrap_differences, 2000 resamples x 3 thresholds x 4 metrics:         {t_boot * 1e3:.1f} ms "
          f"= {t_boot / t_pass:.1f} pooled-AP passes ({2000 / t_boot:,.0f} resamples/s)")
    print(f"compare_counts (bootstrap + interval + donor test, 9999 swaps):              {t_all * 1e3:.1f} ms "
          f"= {t_all / t_pass:.1f} pooled-AP passes")
    return 2000 * t_pass / t_boot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", type=int, default=1000, help="simulated test sets per design and scenario")
    parser.add_argument("--resamples", type=int, default=500, help="bootstrap resamples per test set")
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args()
    t0 = time.perf_counter()
    print(f"calibration: {args.sets} test sets per cell, {args.resamples} resamples, nominal {LEVEL:.0%}")
    cover, tests = calibration(args.sets, args.resamples, args.seed)
    pd.set_option("display.width", 200)
    print("\ncoverage of the true difference in pooled AP@0.5 (mc_se: Monte Carlo standard error)")
    print(cover.pivot_table(index=["scenario", "design", "scheme"], columns="interval",
                            values=["coverage", "mc_se", "mean_width"]).round(3).to_string())
    print("\ndonor-level permutation test: rejection rate at 0.05 (under seeds+shift: power)")
    print(tests.round(4).to_string(index=False))
    print(f"\ncalibration wall time {time.perf_counter() - t0:.0f} s\n")
    ratio = timing(args.seed)
    default = cover[(cover["scheme"] == "donors+tiles") & (cover["interval"] == claims.DEFAULT_INTERVAL)]
    print(f"RESULT claims_worst_coverage_default_interval {default['coverage'].min():.3f}")
    print(f"RESULT claims_resamples_per_pooled_ap_pass {ratio:.1f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
