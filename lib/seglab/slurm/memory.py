"""Memory plans before launch: a worker's measured host / GPU memory, and how many workers fit.

An earlier pipeline started 16 workers, each loading its own models (about 7.5 GB of host
memory and 4 GB of GPU memory each), in a 128 GB job: it ran out after 8 minutes and 20 of 64
tiles, with no warning. Here:

- :func:`measure_worker` measures one worker once, in a fresh subprocess (model loaded, one
  tile of the planned size segmented): its peak host memory (``ru_maxrss``) and peak GPU
  memory (``torch.cuda.max_memory_allocated``), stored as JSON under ``data/memory/``
  (:func:`store`, :func:`load_measure`).
- :func:`plan_workers` computes how many workers fit the job's host memory and its GPUs with a
  safety margin; :func:`check_plan` refuses, before any work starts, a plan that does not fit,
  naming the numbers and the largest worker count that fits. ``seglab plan`` prints it;
  ``seglab predict-slide --workers N`` and ``seglab submit-slides`` check it at launch.

Each worker process loads its own model: cellpose's ``CellposeModel`` is not shared between
processes, so GPU memory per worker includes the weights (``share_model_per_gpu`` in a plan
counts the weights once per GPU for a runner that serves several workers from one model, e.g.
threads of one process; seglab's own workers are processes and do not).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from seglab import SeglabError
from seglab.core import io, paths

MEMORY_DIR = Path("data") / "memory"
DEFAULT_MARGIN = 0.15
# Measured on the 2-core CPU machine (DESIGN.md), not on a GPU: one cpsam process peaked at 12.9 GB
# of host memory (build, save, load, one training epoch and one 256 px eval); its weights are 1.2 GB.
CPSAM_HOST_PEAK_GB = 12.9
CPSAM_WEIGHTS_GB = 1.2


@dataclass(frozen=True)
class WorkerMemory:
    """One worker's measured peak memory.

    model : the model spec. device : ``cpu`` / ``cuda`` (the device type it ran on).
    tile_px : side of the tile it segmented (with its overlap), px.
    host_gb : peak resident host memory of the worker process, GB (1e9 bytes).
    gpu_gb : peak GPU memory allocated by torch, GB (0 on the CPU). weights_gb : the weights' size, GB.
    host, measured : where and when (UTC) it was measured; note : how (or "not measured").
    """

    model: str
    device: str
    tile_px: int
    host_gb: float
    gpu_gb: float = 0.0
    weights_gb: float = 0.0
    host: str = ""
    measured: str = ""
    note: str = ""


def memory_path(model: str, device: str, tile_px: int) -> Path:
    from seglab.data.slides import safe_name

    return paths.resolve(MEMORY_DIR) / f"{safe_name(Path(str(model)).name)}_{device}_{int(tile_px)}.json"


def store(w: WorkerMemory) -> Path:
    """Write the measure to ``data/memory/<model>_<device>_<tile>.json`` (atomically); returns the path."""
    return io.write_json(memory_path(w.model, w.device, w.tile_px), asdict(w))


def load_measure(model: str, device: str, tile_px: int) -> WorkerMemory | None:
    """The stored measure of this model, device type and tile size, or None."""
    p = memory_path(model, device, tile_px)
    if not p.is_file():
        return None
    try:
        return WorkerMemory(**json.loads(p.read_text()))
    except (ValueError, TypeError) as exc:
        raise SeglabError(f"{p}: not a worker memory record ({exc}); delete it and measure again with "
                          "seglab plan --measure") from None


def measure_worker(model: str, device, tile_px: int, *, channels: int = 2, diameter_px: float | None = None,
                   timeout_s: float = 1800) -> WorkerMemory:
    """Measure one worker in a fresh subprocess: load ``model`` on ``device`` (a torch.device) and
    segment one simulated ``tile_px`` x ``tile_px`` tile (cells of about 20 px; ``diameter_px``: the
    mask settings' diameter, None the model's default); returns (and does not store) the measure."""
    import torch

    if not isinstance(device, torch.device):
        raise SeglabError(f"measure_worker: device must be a torch.device, got {device!r}")
    code = ("import sys, json; from seglab.slurm.memory import measure_here; "
            "d = None if sys.argv[5] == 'None' else float(sys.argv[5]); "
            "print(json.dumps(measure_here(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), d)))")
    env = {**os.environ, "SEGLAB_ROOT": str(paths.project_root())}
    proc = subprocess.run([sys.executable, "-c", code, str(model), str(device), str(int(tile_px)), str(channels),
                           str(diameter_px)],
                          capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SeglabError(f"measuring a worker of {model} on {device} failed: {tail[0]}")
    return WorkerMemory(**json.loads(proc.stdout.strip().splitlines()[-1]))


def measure_here(model: str, device: str, tile_px: int, channels: int, diameter_px: float | None = None) -> dict:
    """In the measuring subprocess: load, segment one tile, report peaks."""
    import resource

    import numpy as np
    import torch

    from seglab.core import workers
    from seglab.segment.slides import as_device, load_model

    workers.set_threads(1)
    dev = as_device(device)
    m = load_model(model, dev)
    from seglab.config.settings import MaskSettings
    from seglab.data.simulate_slides import render_region

    # a realistic tile (simulated tissue full of cells): noise alone would make the mask step's
    # memory unlike a real tile's
    img = render_region(tile_px, seed=0)[:channels].astype(np.float32)
    m.segment(img, MaskSettings(diameter_px=diameter_px))
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9   # Linux: kB
    gpu = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else 0.0
    weights = sum(p.numel() * p.element_size() for p in m.net.parameters()) / 1e9 if m.net is not None else 0.0
    return asdict(WorkerMemory(model=model, device=dev.type, tile_px=tile_px, host_gb=round(host, 3),
                               gpu_gb=round(gpu, 3), weights_gb=round(weights, 4), host=socket.gethostname(),
                               measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               note="peak ru_maxrss of a fresh process after loading and one tile"))


def parse_mem_gb(text) -> float:
    """``"128G"``, ``"64000M"``, ``"1T"``, a number of GB -> GB (Slurm's --mem units: K, M, G, T; bare = MB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip().upper()
    units = {"K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}
    try:
        if s and s[-1] in units:
            return float(s[:-1]) * units[s[-1]]
        return float(s) * 1e-3   # Slurm: a bare --mem is in MB
    except ValueError:
        raise SeglabError(f"memory {text!r}: give it like 128G, 64000M or 1T") from None


@dataclass(frozen=True)
class MemoryPlan:
    """Whether ``workers`` workers fit a job.

    host_usable_gb : job memory x (1 - margin); host_needed_gb : workers x host_gb.
    gpu_usable_gb : per GPU, its memory x (1 - margin); gpu_needed_gb : on the busiest GPU.
    max_workers : the largest count that fits both; fits : workers <= max_workers.
    """

    workers: int
    job_mem_gb: float
    gpus: int
    gpu_mem_gb: float | None
    margin: float
    host_gb: float
    gpu_gb: float
    host_usable_gb: float
    host_needed_gb: float
    gpu_usable_gb: float | None
    gpu_needed_gb: float | None
    max_workers: int
    fits: bool
    share_model_per_gpu: bool = False
    weights_gb: float = 0.0

    def describe(self) -> str:
        gpu = ""
        if self.gpus:
            gpu = (f"; GPU: {self.gpu_needed_gb:.1f} GB on the busiest of {self.gpus} GPU(s) of {self.gpu_mem_gb:g} GB "
                   f"({self.gpu_usable_gb:.1f} GB usable)")
        return (f"{self.workers} worker(s) x {self.host_gb:g} GB host = {self.host_needed_gb:.1f} GB of "
                f"{self.job_mem_gb:g} GB ({self.host_usable_gb:.1f} GB usable with a {self.margin:.0%} margin){gpu}; "
                f"at most {self.max_workers} worker(s) fit")


def plan_workers(worker: WorkerMemory, *, workers: int, job_mem_gb: float, gpus: int = 0,
                 gpu_mem_gb: float | None = None, margin: float = DEFAULT_MARGIN,
                 share_model_per_gpu: bool = False) -> MemoryPlan:
    """How many of ``worker`` fit a job of ``job_mem_gb`` GB host memory and ``gpus`` GPUs of
    ``gpu_mem_gb`` GB each, keeping ``margin`` (fraction) free; workers spread evenly over the GPUs.
    ``share_model_per_gpu``: the weights count once per GPU (a runner serving its workers from one model)."""
    if int(workers) < 1:
        raise SeglabError(f"workers={workers}: give at least 1")
    if not 0 <= margin < 1:
        raise SeglabError(f"margin={margin} must be in [0, 1)")
    if job_mem_gb <= 0:
        raise SeglabError(f"job memory {job_mem_gb} GB must be > 0")
    if gpus and worker.device == "cuda" and not gpu_mem_gb:
        raise SeglabError("a GPU plan needs the GPUs' memory: give --gpu-mem-gb")
    host_usable = job_mem_gb * (1 - margin)
    max_host = int(math.floor(host_usable / worker.host_gb + 1e-9)) if worker.host_gb > 0 else 10 ** 6
    gpu_usable = gpu_need = None
    max_w = max_host
    use_gpu = gpus > 0 and worker.device == "cuda"
    if use_gpu:
        gpu_usable = float(gpu_mem_gb) * (1 - margin)
        per = worker.gpu_gb - (worker.weights_gb if share_model_per_gpu else 0.0)
        fixed = worker.weights_gb if share_model_per_gpu else 0.0
        per_gpu = int(math.floor((gpu_usable - fixed) / per + 1e-9)) if per > 0 else 10 ** 6
        max_w = min(max_host, max(per_gpu, 0) * gpus)
        busiest = math.ceil(int(workers) / gpus)
        gpu_need = fixed + busiest * per
    return MemoryPlan(workers=int(workers), job_mem_gb=float(job_mem_gb), gpus=int(gpus),
                      gpu_mem_gb=None if gpu_mem_gb is None else float(gpu_mem_gb), margin=float(margin),
                      host_gb=worker.host_gb, gpu_gb=worker.gpu_gb, host_usable_gb=round(host_usable, 3),
                      host_needed_gb=round(int(workers) * worker.host_gb, 3), gpu_usable_gb=gpu_usable,
                      gpu_needed_gb=gpu_need, max_workers=max(int(max_w), 0), fits=int(workers) <= max_w,
                      share_model_per_gpu=share_model_per_gpu, weights_gb=worker.weights_gb)


class PlanDoesNotFit(SeglabError):
    """A memory plan that would not fit, raised before any work starts."""


def check_plan(plan: MemoryPlan, source: str = "plan") -> MemoryPlan:
    """``plan`` when it fits; else PlanDoesNotFit naming the numbers and the largest count that fits."""
    if plan.fits:
        return plan
    fix = (f"use at most {plan.max_workers} worker(s)" if plan.max_workers >= 1
           else "one worker does not fit: ask for more memory (or a larger GPU)")
    raise PlanDoesNotFit(f"{source}: memory plan does not fit: {plan.describe()}; {fix}, or more job memory")


def cpsam_arithmetic(job_mem_gb: float = 128.0, gpu_mem_gb: float = 80.0, margin: float = DEFAULT_MARGIN) -> dict:
    """Workers per GPU for cpsam from the figures measured on the CPU (DESIGN.md: 12.9 GB host peak
    per process, 1.2 GB of weights); NOT measured on a GPU. GPU memory per worker is taken as the
    weights x 2 (activations of a 256 px batch assumed no larger than the weights): an assumption."""
    host_fit = math.floor(job_mem_gb * (1 - margin) / CPSAM_HOST_PEAK_GB)
    gpu_per_worker = 2 * CPSAM_WEIGHTS_GB
    gpu_fit = math.floor(gpu_mem_gb * (1 - margin) / gpu_per_worker)
    return {"job_mem_gb": job_mem_gb, "gpu_mem_gb": gpu_mem_gb, "margin": margin,
            "host_gb_per_worker": CPSAM_HOST_PEAK_GB, "gpu_gb_per_worker_assumed": gpu_per_worker,
            "workers_by_host": host_fit, "workers_per_gpu_by_gpu": gpu_fit,
            "workers_per_gpu": min(host_fit, gpu_fit), "measured_on_gpu": False}
