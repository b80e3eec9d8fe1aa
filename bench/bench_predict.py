"""Benchmark ``seglab predict``: tiles/s and peak host memory at two tile counts, the share of
time in the network versus mask reconstruction, and predict's throughput as a ratio of the bare
network forward on the same tiles (the reference, measured in the same run).

Usage::

    .venv/bin/python bench/bench_predict.py [--model generalist] [--counts 100 1000] [--size 128]
        [--threads 1] [--gpu]

Each count runs in its own subprocess, so its peak RSS (ru_maxrss) is its own; memory must
not grow with the count. Synthetic 2-channel tiles (disks of ~12 px diameter) are written once
to a temporary folder. On a GPU node, ``--model cpsam-random`` times cpsam's architecture
with random weights (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_tiles(folder: Path, n: int, size: int, seed: int = 0) -> None:
    import numpy as np
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dapi = np.zeros((size, size), np.float32)
        for _ in range(size * size // 600):
            cy, cx = rng.integers(0, size, 2)
            r = rng.uniform(4.5, 7.5)
            dapi[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(120, 220)
        dapi += rng.normal(10, 4, dapi.shape)
        marker = np.clip(dapi * rng.uniform(0, 0.6) + rng.normal(5, 3, dapi.shape), 0, 255)
        tifffile.imwrite(folder / f"tile{i:05d}.tif", np.stack([dapi, marker]).clip(0, 255).astype(np.uint8))


def child(args) -> None:
    """Run predict on the first ``n`` tiles; print a JSON line with timing and peak RSS."""
    import resource

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from seglab.segment import models
    from seglab.config.settings import MaskSettings
    from seglab.segment import predict

    model = models.load(args.model, gpu=True if args.gpu else False)
    src = Path(args.tiles)
    sub = Path(args.out) / "tiles"
    sub.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.tif"))[: args.n]:
        os.symlink(p, sub / p.name)
    t0 = time.perf_counter()
    df = predict.predict(model, sub, Path(args.out) / "masks", MaskSettings(diameter_px=args.diameter), batch_tiles=8,
                         batch_size=8, progress=False)
    wall = time.perf_counter() - t0
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": args.n, "seconds": wall, "tiles_per_s": args.n / wall, "peak_rss_mib": rss_mib,
                      "cells": int(df["n_cells"].sum())}))


def split_times(model_spec: str, tiles: Path, n: int, diameter, threads, gpu) -> dict:
    """Network-only vs full eval on the same tiles, and the bare network forward."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    from cellpose import core, transforms

    from seglab.segment import models
    from seglab.segment import predict

    model = models.load(model_spec, gpu=True if gpu else False)
    tl = predict.discover_tiles(tiles)[:n]
    xs = [models.Model.as_network_input(t.load()) for t in tl]
    eff = model._eval_diameter(diameter)
    kw = dict(channel_axis=1, diameter=eff, bsize=model.bsize, batch_size=8)
    stack = np.stack(xs)
    # time the two halves of the same eval calls: cellpose's _run_net (normalised input ->
    # tiles -> network -> flows) and _compute_masks (dynamics), by wrapping them on the instance
    spent = {"net": 0.0, "masks": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    cp = model.cp
    cp._run_net = timed("net", cp._run_net)
    cp._compute_masks = timed("masks", cp._compute_masks)
    with models.quiet_cellpose():
        cp.eval(stack[:8], **kw)  # warm-up
        spent.update(net=0.0, masks=0.0)
        t0 = time.perf_counter()
        for k in range(0, n, 8):
            cp.eval(stack[k:k + 8], **kw)
        t_full = time.perf_counter() - t0
    t_net, t_masks = spent["net"], spent["masks"]
    # the bare forward: the same normalised, rescaled crops straight through the network
    rescale = 1.0 if eff is None else 30.0 / eff
    norm = transforms.normalize_img(stack.transpose(0, 2, 3, 1).copy(), axis=-1)
    t0 = time.perf_counter()
    for k in range(0, n, 8):
        core.run_net(model.cp.net, norm[k:k + 8], bsize=model.bsize, batch_size=8,
                     rsz=rescale if rescale != 1.0 else None)
    t_bare = time.perf_counter() - t0
    return {"eval_network_s": t_net, "eval_masks_s": t_masks, "eval_full_s": t_full, "bare_forward_s": t_bare,
            "n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="generalist")
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--size", type=int, default=128, help="tile side, px")
    ap.add_argument("--diameter", type=float, default=12.0, help="object diameter given to predict, px")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tiles", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tiles = Path(tmp) / "tiles"
        make_tiles(tiles, max(args.counts), args.size)
        print(f"model {args.model}, {args.size}x{args.size} px 2-channel tiles, diameter {args.diameter} px, "
              f"torch threads {args.threads}, {'GPU' if args.gpu else 'CPU'}")
        rows = []
        for n in args.counts:
            cmd = [sys.executable, __file__, "--child", "--n", str(n), "--tiles", str(tiles), "--out",
                   str(Path(tmp) / f"run{n}"), "--model", args.model, "--threads", str(args.threads),
                   "--diameter", str(args.diameter)] + (["--gpu"] if args.gpu else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"predict {r['n']:5d} tiles: {r['tiles_per_s']:.2f} tiles/s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                  f"{r['cells']} cells")
        growth = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
        print(f"peak RSS ratio {rows[-1]['n']} vs {rows[0]['n']} tiles: {growth:.2f} (flat = 1.0)")
        n_split = min(32, max(args.counts))
        s = split_times(args.model, tiles, n_split, args.diameter, args.threads, args.gpu)
        print(f"on {n_split} tiles: cellpose eval {s['eval_full_s']:.2f} s: network (tiling, forward, "
              f"rescaling) {s['eval_network_s']:.2f} s = {100 * s['eval_network_s'] / s['eval_full_s']:.0f}%, "
              f"mask reconstruction (dynamics) {s['eval_masks_s']:.2f} s = "
              f"{100 * s['eval_masks_s'] / s['eval_full_s']:.0f}%, rest (normalisation) "
              f"{100 * (1 - (s['eval_network_s'] + s['eval_masks_s']) / s['eval_full_s']):.0f}%")
        bare_tps = n_split / s["bare_forward_s"]
        ratio = rows[-1]["tiles_per_s"] / bare_tps  # the largest count: start-up amortised
        print(f"reference: bare network forward (cellpose.core.run_net on normalised tiles) {bare_tps:.2f} tiles/s")
        print(f"seglab predict ({rows[-1]['n']} tiles, with reading, masks, writing) {rows[-1]['tiles_per_s']:.2f} tiles/s")
        print(f"RESULT predict_throughput_vs_bare_forward {ratio:.3f} x")


if __name__ == "__main__":
    main()
