"""Benchmark whole-slide inference (``seglab.segment.slides.predict_slide``): megapixels per second
and peak host memory on simulated OME-TIFF slides of 4k, 8k and 16k px with the tiny net on the
CPU, and the tiling + border-resolution overhead as a ratio of bare tile inference.

Usage::

    .venv/bin/python bench/bench_slides.py [--sizes 4096 8192 16384] [--tiles 6] [--tile-px 1024]
        [--overlap-px 64] [--model generalist] [--threads 1]

Each size runs in its own subprocess, so its peak RSS (ru_maxrss) is its own: memory must not grow
with the slide's size (a slide is read region by region; the label image is written chunk by chunk
into OME-Zarr). On this 2-core CPU a whole 16k slide would take about 20 minutes, so every size
segments a seeded sample of about ``--tiles`` tissue tiles (``sample_fraction`` = tiles / tissue
tiles, recorded); the thumbnail (tissue detection) still reads the whole slide. Mpx/s counts the
segmented tile cores' px over the tile phase's wall time, and end to end over everything
(thumbnail, tiles, merge, label image, QC).

Reference, measured in the same subprocess (the smallest size): bare tile inference, i.e.
``Model.segment`` on each segmented tile's core alone (already in memory: no reading, no overlap,
no object table, no writing). The overhead ratio is the tile phase's time over the bare time for
the same tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(slide: str, out: str, tiles: int, tile_px: int, overlap_px: int, model_spec: str, threads: int,
          reference: bool) -> dict:
    import numpy as np
    import torch

    from seglab.config.settings import MaskSettings
    from seglab.core import workers
    from seglab.data.slides import open_slide
    from seglab.segment import slides as seg

    workers.set_threads(threads)
    mask = MaskSettings(diameter_px=20.0)
    t0 = time.monotonic()
    model = seg.load_model(model_spec, torch.device("cpu"))
    load_s = time.monotonic() - t0
    with open_slide(slide) as s:
        # the tissue tiles first (the thumbnail pass), then the sample fraction that gives ~`tiles` tiles
        t0 = time.monotonic()
        _, table, _, _ = seg.plan_slide(s, seg.SlideSettings(tile_px=tile_px, overlap_px=overlap_px), Path(out) / s.id)
        plan_s = time.monotonic() - t0
    n_tissue = int(table["tissue"].sum())
    fraction = min(1.0, tiles / max(n_tissue, 1))
    st = seg.SlideSettings(tile_px=tile_px, overlap_px=overlap_px, sample_fraction=fraction)
    logs = []
    t0 = time.monotonic()
    res = seg.predict_slide(slide, out, model, st, mask, log=logs.append, merge=False)
    tiles_s = time.monotonic() - t0
    with open_slide(slide) as s:
        tiles_all, table, thumb, factor = seg.plan_slide(s, st, Path(out) / s.id)
        t1 = time.monotonic()
        res = seg.merge_slide(s, Path(out) / s.id, tiles_all, table, thumb, factor, st, mask,
                              {"model": model.spec, "mask": mask.as_dict()})
        merge_s = time.monotonic() - t1
        sel = table[table["selected"]]
        core_mpx = float(((sel["y1"] - sel["y0"]) * (sel["x1"] - sel["x0"])).sum()) / 1e6
        bare_s = None
        if reference:
            cores = [s.read(r.y0, r.x0, r.y1 - r.y0, r.x1 - r.x0)[:3].astype(np.float32) for r in sel.itertuples()]
            t1 = time.monotonic()
            for c in cores:
                model.segment(c, mask)
            bare_s = time.monotonic() - t1
    return {"slide_px": int(res.record["height_px"]), "n_tiles": int(len(table)), "n_tissue": n_tissue,
            "n_segmented": int(len(sel)), "sample_fraction": round(fraction, 4), "core_mpx": round(core_mpx, 3),
            "objects": int(len(res.instances)), "load_s": round(load_s, 2), "plan_s": round(plan_s, 2),
            "tiles_s": round(tiles_s, 2), "merge_s": round(merge_s, 2), "bare_s": None if bare_s is None else round(bare_s, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--tiles", type=int, default=6)
    ap.add_argument("--tile-px", type=int, default=1024)
    ap.add_argument("--overlap-px", type=int, default=64)
    ap.add_argument("--model", default="generalist")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=3, metavar=("SLIDE", "OUT", "REFERENCE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.tiles, a.tile_px, a.overlap_px, a.model, a.threads,
                               a.child[2] == "1")))
        return
    from seglab.data import simulate_slides as sim

    rows = []
    with tempfile.TemporaryDirectory(prefix="seglab-bench-slides-") as tmp:
        for i, size in enumerate(a.sizes):
            t0 = time.monotonic()
            r = sim.simulate_slide(Path(tmp) / "slides", f"B{size}", size_px=size, fmt="ome-tiff", seed=i,
                                   write_truth=False)
            write_s = time.monotonic() - t0
            cmd = [sys.executable, __file__, "--tiles", str(a.tiles), "--tile-px", str(a.tile_px), "--overlap-px",
                   str(a.overlap_px), "--model", a.model, "--threads", str(a.threads),
                   "--child", str(r["path"]), str(Path(tmp) / "out"), "1" if i == 0 else "0"]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            if p.returncode != 0:
                sys.exit(f"size {size} failed:\n{p.stderr[-3000:]}")
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["write_s"] = round(write_s, 1)
            row["file_mb"] = round(Path(r["path"]).stat().st_size / 1e6, 1)
            total = row["plan_s"] + row["tiles_s"] + row["merge_s"]
            row["tiles_mpx_per_s"] = round(row["core_mpx"] / row["tiles_s"], 4)
            row["end_to_end_mpx_per_s"] = round(row["core_mpx"] / total, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (Path(r["path"])).unlink()
    print(f"\n{'slide px':>9} {'tiles':>6} {'tissue':>6} {'done':>5} {'fraction':>8} {'core Mpx':>8} "
          f"{'tiles Mpx/s':>11} {'e2e Mpx/s':>9} {'thumb s':>7} {'merge s':>7} {'peak GB':>7}")
    for r in rows:
        print(f"{r['slide_px']:>9} {r['n_tiles']:>6} {r['n_tissue']:>6} {r['n_segmented']:>5} {r['sample_fraction']:>8} "
              f"{r['core_mpx']:>8} {r['tiles_mpx_per_s']:>11} {r['end_to_end_mpx_per_s']:>9} {r['plan_s']:>7} "
              f"{r['merge_s']:>7} {r['peak_rss_gb']:>7}")
    ref = rows[0]
    overhead = ref["tiles_s"] / ref["bare_s"]
    growth = rows[-1]["peak_rss_gb"] / rows[0]["peak_rss_gb"]
    print(f"\nreference: bare Model.segment on the {ref['n_segmented']} tile cores of the {ref['slide_px']} px slide: "
          f"{ref['bare_s']} s; the tile phase (read with {a.overlap_px} px overlap, segment, keep objects by "
          f"centroid, write per-tile outputs): {ref['tiles_s']} s")
    print(f"RESULT slides_peak_rss_growth_{rows[-1]['slide_px']}_vs_{rows[0]['slide_px']} {growth:.3f} x")
    print(f"RESULT slides_tiling_overhead_vs_bare_tiles {overhead:.3f} x")


if __name__ == "__main__":
    main()
