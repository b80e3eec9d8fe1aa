"""Benchmark fine-tuning: seconds per optimizer step of each architecture, as a ratio of one forward
pass of the same batch (the reference, measured in the same process), and the peak host memory.

Usage::

    .venv/bin/python bench/bench_finetune.py [--nets cpsam-random tiny-s tiny-xs] [--threads 2]

Each net runs in its own subprocess (its peak RSS, ru_maxrss, is its own). A step is timed through
the study's own training path, ``seglab.segment.train.fit`` (cellpose's ``train_seg`` underneath):
one fit of 1 epoch and one of 3 epochs, one optimizer step per epoch (``nimg_per_epoch`` =
``batch_size``), so the difference over 2 is the cost of a step without the per-fit overheads
(label flows, checkpoint writing). The forward pass is the bare network on a batch of the same shape
(no gradients), the cost a step is counted in. cpsam's architecture runs with random weights
(``cpsam-random``, 305 M parameters, float32 on the CPU; bfloat16 is slower there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# net -> (crops per step, crop side in px): cpsam as the full profile trains it (256 px crops; one
# crop keeps a CPU step near half a minute), the tiny nets as the demo does (8 crops of 128 px)
BATCHES = {"cpsam-random": (1, 256), "tiny-s": (8, 128), "tiny-xs": (8, 128), "tiny-m": (8, 128)}


def training_tiles(n: int, size: int, seed: int = 0):
    """``n`` synthetic (2, size, size) float32 tiles of bright disks (about 12 px across) and their
    instance labels (uint16)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n):
        lab = np.zeros((size, size), np.uint16)
        for k in range(1, size * size // 500):
            cy, cx = rng.integers(8, size - 8, 2)
            lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(4.5, 7.5) ** 2) & (lab == 0)] = k
        dapi = (lab > 0) * rng.uniform(120, 220) + rng.normal(10, 4, lab.shape)
        images.append(np.stack([dapi, 0.3 * dapi]).astype(np.float32))
        labels.append(lab)
    return images, labels


def forward_seconds(model, batch: int, size: int, repeats: int = 2) -> float:
    """Best of ``repeats`` bare forward passes of a (batch, 3, size, size) input, seconds."""
    import torch

    x = torch.randn(batch, 3, size, size, device=model.device)
    net = model.net
    net.eval()
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - t0)
    return best


def fit_seconds(spec: str, images, labels, *, epochs: int, batch: int, size: int, run_dir: Path) -> float:
    """Wall seconds of one ``train.fit`` of ``epochs`` one-step epochs, from a freshly loaded model."""
    from seglab.config.settings import TrainSettings
    from seglab.segment import models, train

    model = models.load(spec, gpu=False)
    settings = TrainSettings(epochs=epochs, batch_size=batch, nimg_per_epoch=batch, bsize=size,
                             learning_rate=1e-5, checkpoint_every=epochs, min_train_masks=1)
    t0 = time.perf_counter()
    train.fit(model, images, labels, params=settings, run_dir=run_dir, progress=False, final_validation=False)
    return time.perf_counter() - t0


def child(spec: str, threads: int) -> dict:
    import resource

    import torch

    from seglab.segment import models

    torch.set_num_threads(threads)
    batch, size = BATCHES[spec]
    images, labels = training_tiles(max(batch, 2), size)
    forward = forward_seconds(models.load(spec, gpu=False), batch, size)
    with tempfile.TemporaryDirectory() as tmp:
        one = fit_seconds(spec, images, labels, epochs=1, batch=batch, size=size, run_dir=Path(tmp) / "e1")
        three = fit_seconds(spec, images, labels, epochs=3, batch=batch, size=size, run_dir=Path(tmp) / "e3")
    step = (three - one) / 2
    return {"net": spec, "batch": f"{batch} x {size} px", "forward_s": round(forward, 3), "step_s": round(step, 3),
            "step_per_forward": round(step / forward, 2), "fit_overhead_s": round(one - step, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2), "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["cpsam-random", "tiny-s", "tiny-xs"], choices=sorted(BATCHES))
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per net")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads)))
        return
    rows = []
    for spec in args.nets:
        proc = subprocess.run([sys.executable, __file__, "--child", spec, "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'net':14s} {'batch':14s} {'forward s':>10s} {'step s':>8s} {'step/forward':>13s} {'peak RSS GB':>12s}")
    for r in rows:
        print(f"{r['net']:14s} {r['batch']:14s} {r['forward_s']:10.3f} {r['step_s']:8.3f} {r['step_per_forward']:13.2f} "
              f"{r['peak_rss_gb']:12.2f}")


if __name__ == "__main__":
    main()
