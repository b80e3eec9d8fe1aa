"""Benchmark active-learning selection: scoring cost per tile of each strategy as a ratio of one
forward pass, and the core-set selection time for 15,000 tiles.

Usage::

    .venv/bin/python bench/bench_active.py [--model generalist] [--tiles 12] [--size 96] [--tta-views 4]
        [--pool 15000] [--dim 256] [--batch 20] [--threads 1] [--repeats 2]

Reference (measured in the same run, on the same simulated tiles, right before and after each
strategy; a strategy's ratio is over the mean of those two, the median over ``--repeats`` rounds): one plain pass per tile, ``Model.segment`` with outputs and masks, which is
what predicting a tile costs. Each strategy then scores the same tiles through
:func:`seglab.active.uncertainty.score_pool` (its one pass includes the style vector; pixel measures
add array work; TTA adds ``tta_views - 1`` passes; the ensemble one pass per other member), and its
seconds per tile are divided by the reference's. Random needs no pass at all (ratio 0 by
construction, not measured). Core-set: :func:`seglab.active.diversity.select_batch` with
``{coreset: 1}`` picking ``--batch`` tiles among ``--pool`` random ``--dim``-wide style vectors,
50 of them labelled, and the same with k-means added (``{coreset: 0.5, kmeans: 0.3}``).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="generalist")
    ap.add_argument("--tiles", type=int, default=12)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--tta-views", type=int, default=4)
    ap.add_argument("--pool", type=int, default=15000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the strategies (medians reported)")
    args = ap.parse_args()

    import numpy as np
    import pandas as pd

    from seglab.active import diversity, uncertainty
    from seglab.config.settings import MaskSettings
    from seglab.core import workers
    from seglab.data import simulate
    from seglab.segment import models

    workers.set_threads(args.threads)
    P = simulate.SimParams(density_per_mpx=1500)
    tiles = [simulate.render_tile(np.random.default_rng(i), simulate.MARKERS[i % 5], 0.3, args.size, P)
             for i in range(args.tiles)]
    images = [np.stack([t["dapi"], t["marker"]]).astype(np.float32) for t in tiles]
    ids = [f"t{i}" for i in range(len(images))]
    mask = MaskSettings(diameter_px=13.6)
    model = models.load(args.model, gpu=False)
    other = models.load(args.model, gpu=False)   # a second ensemble member (its passes cost the same)
    model.segment(images[0], mask, return_outputs=True)   # warm-up

    def reference() -> float:
        t0 = time.perf_counter()
        for x in images:
            model.segment(x, mask, return_outputs=True)
        return (time.perf_counter() - t0) / len(images)

    strategies = {"entropy": ["entropy"], "confidence": ["confidence"], "margin": ["margin"],
                  "tta": ["tta_mask", "tta_flow"], "ensemble": ["ensemble"], "coreset (style only)": [],
                  "combined (entropy+margin+tta+ensemble)": ["entropy", "margin", "tta_mask", "ensemble"]}
    per_tile, ratios, refs = {}, {}, []
    last = reference()
    for _ in range(args.repeats):
        for name, measures in strategies.items():
            t0 = time.perf_counter()
            uncertainty.score_pool(model, images, ids, mask, measures=measures, tta_views=args.tta_views,
                                   ensemble=[other] if "ensemble" in measures else ())
            s = (time.perf_counter() - t0) / len(images)
            after = reference()   # the reference on either side: a shared machine's load slows both alike
            per_tile.setdefault(name, []).append(s)
            ratios.setdefault(name, []).append(s / ((last + after) / 2))
            refs.append(after)
            last = after
    ref = statistics.median(refs)
    print(f"reference: one plain pass (Model.segment with masks) per {args.size} px tile: median {ref * 1000:.0f} ms "
          f"(model {args.model}, {args.threads} thread(s), {args.tiles} tiles; measured before and after each "
          f"strategy, {args.repeats} round(s); ratios: medians of each strategy over the mean of its two references)")
    rows = [{"strategy": "random", "s_per_tile": 0.0, "ratio_vs_one_pass": 0.0}]
    rows += [{"strategy": k, "s_per_tile": round(statistics.median(v), 4),
              "ratio_vs_one_pass": round(statistics.median(ratios[k]), 2)} for k, v in per_tile.items()]
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"(TTA uses {args.tta_views} views: about {args.tta_views} passes; the ensemble 2 members: about 2)")

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(args.pool, args.dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    lab = feats[:50]
    cand = pd.DataFrame({"tile_id": [f"p{i}" for i in range(args.pool - 50)]})
    t0 = time.perf_counter()
    diversity.select_batch(cand, feats[50:], lab, {"coreset": 1.0}, args.batch, seed=0)
    core_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    diversity.select_batch(cand, feats[50:], lab, {"coreset": 0.5, "kmeans": 0.3}, args.batch, seed=0)
    both_s = time.perf_counter() - t0
    print(f"core-set selection of {args.batch} among {args.pool - 50} tiles ({args.dim}-wide styles, 50 labelled): "
          f"{core_s:.2f} s; with k-means (k={args.batch}, n_init 4): {both_s:.2f} s")
    print(f"RESULT active_tta_cost_vs_one_pass {statistics.median(ratios['tta']):.2f} x")
    print(f"RESULT active_coreset_select_{args.pool}_tiles {core_s:.2f} s")


if __name__ == "__main__":
    main()
