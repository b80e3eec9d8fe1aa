"""Benchmark ``seglab predict``: its throughput as a ratio of the bare network forward on the same
tiles (the reference, measured in the same process), pipelined (masks of batch k made in a thread
while the network runs on batch k+1) against the sequential loop (eval makes the masks), peak host
memory at two tile counts, and the share of eval's time in the network versus mask reconstruction.

Usage::

    .venv/bin/python bench/bench_predict.py [--model generalist] [--counts 100 1000] [--size 128]
        [--threads 1] [--gpu] [--modes pipelined sequential] [--repeats 1] [--mask-device cpu]

Each count runs in its own subprocess, so its peak RSS (ru_maxrss) is its own; memory must not
grow with the count. In it, ``--repeats`` rounds each run the bare forward (``cellpose.core.run_net``
on the normalised tiles, warm: no reading, masks or writing), then predict in each mode on the same
tiles (the order alternating between rounds), and a last bare forward; a mode's ratio is its tiles/s
over the mean of the bare forwards just before and after it, so a shared machine's drifting load
slows both alike. The RESULT lines are the medians over the rounds. "cores busy" is the process's
CPU seconds over the wall time: about 1 for the sequential loop with one torch thread, up to 2 when
the mask thread overlaps the network on a machine with a core to spare. Synthetic 2-channel tiles
(disks of ~12 px diameter) are written once to a temporary folder. On a GPU node,
``--model cpsam-random`` times cpsam's architecture with random weights (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("pipelined", "sequential")


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


def bare_forward_s(model, tiles, diameter_px, batch_size: int = 8) -> float:
    """Seconds of the bare network forward over ``tiles``: the normalised, rescaled crops straight
    through ``cellpose.core.run_net`` (what eval's network pass does, without reading, masks or
    writing), after one untimed warm-up batch. Tiles are read and normalised a batch at a time,
    untimed, so memory stays that of one batch, whatever the count."""
    import numpy as np
    from cellpose import core, transforms

    from seglab.segment import models

    eff = model._eval_diameter(diameter_px)
    rescale = 1.0 if eff is None else models.CELLPOSE_REF_DIAMETER_PX / eff

    def normalised(k):
        stack = np.stack([models.Model.as_network_input(t.load()) for t in tiles[k:k + batch_size]])
        return transforms.normalize_img(stack.transpose(0, 2, 3, 1).copy(), axis=-1)

    def run(x):
        core.run_net(model.cp.net, x, bsize=model.bsize, batch_size=batch_size, rsz=rescale if rescale != 1.0 else None)

    run(normalised(0))
    spent = 0.0
    for k in range(0, len(tiles), batch_size):
        x = normalised(k)
        t0 = time.perf_counter()
        run(x)
        spent += time.perf_counter() - t0
    return spent


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (user + system)."""
    t = os.times()
    return t.user + t.system


def child(args) -> None:
    """Rounds on the first ``n`` tiles: the bare forward, then predict in each mode (the order
    alternating between rounds) into a fresh folder, and a last bare forward. Each predict is
    compared with the mean of the bare forwards just before and after it, so the slow drift of a
    shared machine's load cancels. Prints a JSON line with the rounds and the peak memory."""
    import resource

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from seglab.config.settings import MaskSettings
    from seglab.segment import models
    from seglab.segment import predict

    model = models.load(args.model, gpu=True if args.gpu else False)
    sub = Path(args.out) / "tiles"
    sub.mkdir(parents=True, exist_ok=True)
    for p in sorted(Path(args.tiles).glob("*.tif"))[: args.n]:
        os.symlink(p, sub / p.name)
    tiles = predict.discover_tiles(sub)

    def bare() -> float:
        with models.quiet_cellpose():
            return args.n / bare_forward_s(model, tiles, args.diameter)

    rounds, bare_tps = [], [bare()]
    for r in range(args.repeats):
        runs = {}
        for mode in (args.modes if r % 2 == 0 else args.modes[::-1]):
            t0, c0 = time.perf_counter(), _cpu_s()
            df = predict.predict(model, sub, Path(args.out) / f"masks-{mode}-{r}", MaskSettings(diameter_px=args.diameter),
                                 batch_tiles=8, batch_size=8, progress=False, pipeline=mode == "pipelined",
                                 mask_device=args.mask_device)
            wall = time.perf_counter() - t0
            runs[mode] = {"tiles_per_s": args.n / wall, "cores": (_cpu_s() - c0) / wall, "cells": int(df["n_cells"].sum())}
        bare_tps.append(bare())
        ref = (bare_tps[-2] + bare_tps[-1]) / 2
        rounds.append({"bare_tiles_per_s": ref, "bare_drift": bare_tps[-1] / bare_tps[-2],
                       **{m: dict(v, ratio=v["tiles_per_s"] / ref) for m, v in runs.items()}})
    print(json.dumps({"n": args.n, "rounds": rounds,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if args.gpu else None}))


def split_times(model_spec: str, tiles: Path, n: int, diameter, threads, gpu) -> dict:
    """Seconds of cellpose's eval on the first ``n`` tiles, whole and its two halves: the network pass
    (``_run_net``) and the mask reconstruction (``_compute_masks``)."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
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
    return {"eval_network_s": spent["net"], "eval_masks_s": spent["masks"], "eval_full_s": t_full, "n": n}


def _run_child(args, tiles: Path, tmp: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--tiles", str(tiles), "--out",
           str(Path(tmp) / f"run{n}"), "--model", args.model, "--threads", str(args.threads),
           "--diameter", str(args.diameter), "--repeats", str(args.repeats), "--modes", *args.modes]
    cmd += (["--gpu"] if args.gpu else []) + (["--mask-device", args.mask_device] if args.mask_device else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for k, r in enumerate(res["rounds"]):
        for mode in args.modes:
            print(f"{n:5d} tiles, round {k}, {mode:10s}: {r[mode]['tiles_per_s']:.2f} tiles/s = {r[mode]['ratio']:.3f} x "
                  f"the bare forward ({r['bare_tiles_per_s']:.2f} tiles/s, after/before {r['bare_drift']:.2f}), "
                  f"{r[mode]['cores']:.2f} cores busy, {r[mode]['cells']} cells", flush=True)
    gpu = f", peak GPU {res['peak_gpu_mib']:.0f} MiB" if res["peak_gpu_mib"] is not None else ""
    print(f"{n:5d} tiles: peak RSS {res['peak_rss_mib']:.0f} MiB{gpu}", flush=True)
    return res


def _print_split(args, tiles: Path) -> None:
    n_split = min(32, max(args.counts))
    s = split_times(args.model, tiles, n_split, args.diameter, args.threads, args.gpu)
    print(f"on {n_split} tiles: cellpose eval {s['eval_full_s']:.2f} s: network (tiling, forward, "
          f"rescaling) {s['eval_network_s']:.2f} s = {100 * s['eval_network_s'] / s['eval_full_s']:.0f}%, "
          f"mask reconstruction (dynamics) {s['eval_masks_s']:.2f} s = "
          f"{100 * s['eval_masks_s'] / s['eval_full_s']:.0f}%, rest (normalisation) "
          f"{100 * (1 - (s['eval_network_s'] + s['eval_masks_s']) / s['eval_full_s']):.0f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="generalist")
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--size", type=int, default=128, help="tile side, px")
    ap.add_argument("--diameter", type=float, default=12.0, help="object diameter given to predict, px")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                    help="predict pipelined (the default of seglab predict) and/or sequential (eval makes the masks)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds per count (bare forward, then each mode)")
    ap.add_argument("--mask-device", help="predict(mask_device=...): cpu or cuda; default the model's device")
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
              f"torch threads {args.threads}, {'GPU' if args.gpu else 'CPU'}, mask device "
              f"{args.mask_device or 'the model' + chr(39) + 's'}", flush=True)
        res = {n: _run_child(args, tiles, tmp, n) for n in args.counts}
        lo, top = min(args.counts), max(args.counts)
        print(f"peak RSS ratio {top} vs {lo} tiles: {res[top]['peak_rss_mib'] / res[lo]['peak_rss_mib']:.2f} "
              "(flat = 1.0)")
        _print_split(args, tiles)
        ratio = {m: statistics.median(r[m]["ratio"] for r in res[top]["rounds"]) for m in args.modes}
        for mode in args.modes:
            print(f"RESULT predict_throughput_vs_bare_forward {mode} {ratio[mode]:.3f} x "
                  f"(median of {args.repeats} rounds, {top} tiles)")
        if set(MODES) <= set(args.modes):
            paired = statistics.median(r["pipelined"]["tiles_per_s"] / r["sequential"]["tiles_per_s"]
                                       for r in res[top]["rounds"])
            print(f"RESULT pipelined_vs_sequential {paired:.3f} x (median of the rounds' ratios)")


if __name__ == "__main__":
    main()
