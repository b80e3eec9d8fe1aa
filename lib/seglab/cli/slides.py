"""Subcommands for whole slides: predict-slide, plan (memory), submit-slides (one Slurm array task per slide)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from seglab import SeglabError


def _settings(args):
    from seglab.core.units import AreaFilter
    from seglab.segment.slides import SlideSettings

    area = AreaFilter(args.min_area_um2, args.max_area_um2, source="--min-area-um2 / --max-area-um2")
    return SlideSettings(tile_px=args.tile_px, overlap_px=args.overlap_px, sample_fraction=args.sample_fraction,
                         seed=args.seed, min_tissue_fraction=args.min_tissue_fraction,
                         channels=tuple(args.channels.split(",")) if args.channels else None,
                         pixel_size_um=args.pixel_size_um, area=area)


def _slides(items) -> list[Path]:
    from seglab.data.slides import list_slides

    out = []
    for item in items:
        p = Path(item)
        out += list_slides(p) if p.is_dir() else [p]
    for p in out:
        if not p.is_file():
            raise SeglabError(f"{p}: slide not found")
    return out


def _job_mem_gb(args) -> float | None:
    from seglab.slurm.memory import parse_mem_gb

    if args.job_mem_gb:
        return float(args.job_mem_gb)
    if os.environ.get("SLURM_MEM_PER_NODE"):
        return parse_mem_gb(os.environ["SLURM_MEM_PER_NODE"] + "M")
    return None


def launch_plan(model: str, device_type: str, tile_px: int, overlap_px: int, workers: int, job_mem_gb: float | None,
                gpus: int, gpu_mem_gb: float | None, margin: float, *, required: bool, log=print):
    """The memory check of a launch: the stored measure of this model, device and window size
    against the job; refuses (PlanDoesNotFit) before any work. Without a measure: refused when
    ``required`` (several workers, or a Slurm submission), else a note."""
    from seglab.slurm import memory

    window = int(tile_px) + 2 * int(overlap_px)
    w = memory.load_measure(model, device_type, window)
    if w is None:
        msg = (f"no stored memory measure for {model} on {device_type} with {window} px windows; measure one worker "
               f"first: seglab plan --measure --model {model} --device {device_type} --tile-px {tile_px} "
               f"--overlap-px {overlap_px}")
        if required:
            raise SeglabError(msg)
        if log:
            log(f"[seglab] memory plan not checked: {msg}")
        return None
    if job_mem_gb is None:
        if required:
            raise SeglabError("the memory plan needs the job's memory: give --job-mem-gb (or run inside Slurm)")
        return None
    plan = memory.check_plan(memory.plan_workers(w, workers=workers, job_mem_gb=job_mem_gb, gpus=gpus,
                                                 gpu_mem_gb=gpu_mem_gb, margin=margin), "seglab launch")
    if log:
        log(f"[seglab] memory plan fits: {plan.describe()}")
    return plan


def cmd_predict_slide(args) -> int:
    from seglab.config.settings import MaskSettings
    from seglab.core import workers as pool
    from seglab.segment.slides import as_device, run_slides

    settings = _settings(args)
    slides = _slides(args.slides)
    device = as_device(args.device)
    launch_plan(args.model, device.type, args.tile_px, args.overlap_px, args.workers, _job_mem_gb(args),
                int(args.gpus or (1 if device.type == "cuda" else 0)), args.gpu_mem_gb, args.margin,
                required=args.workers > 1)
    mask = MaskSettings(diameter_px=args.diameter_px, flow_threshold=args.flow_threshold,
                        cellprob_threshold=args.cellprob_threshold)
    pool.set_threads(args.threads)
    results = run_slides(slides, args.out, args.model, settings, mask, device=device, workers=args.workers,
                         classifier=args.classifier, classifier_threshold=args.classifier_threshold,
                         allow_failed_gate=args.allow_failed_gate)
    for r in results:
        rec = r.record
        filt = (f", classifier kept {rec['n_objects_after_classifier']} of {rec['n_objects_before_classifier']}"
                if "classifier" in rec else "")
        print(f"{rec['slide']}: {rec['n_objects']} objects ({rec['n_detections']} detected, filter "
              f"{rec['area_filter']}{filt}) on {rec['n_selected_tiles']} of {rec['n_tissue_tiles']} tissue tiles "
              f"-> {r.out}")
    return 0


def cmd_plan(args) -> int:
    from seglab.segment.slides import as_device
    from seglab.slurm import memory

    window = int(args.tile_px) + 2 * int(args.overlap_px)
    dev_type = str(args.device).split(":")[0]
    if dev_type not in ("cpu", "cuda"):
        raise SeglabError(f"--device {args.device}: use cpu or cuda")
    if args.measure:   # measuring needs the device here; planning for a GPU job does not
        w = memory.measure_worker(args.model, as_device(args.device), window, diameter_px=args.diameter_px)
        print(f"measured one worker: {w.host_gb:g} GB host, {w.gpu_gb:g} GB GPU ({w.model}, {w.device}, "
              f"{window} px window) -> {memory.store(w)}")
    w = memory.load_measure(args.model, dev_type, window)
    if w is None:
        raise SeglabError(f"no stored measure for {args.model} on {dev_type} with {window} px windows; "
                          "add --measure to measure one worker now")
    if args.job_mem_gb is None:
        print(f"worker: {w.host_gb:g} GB host, {w.gpu_gb:g} GB GPU (measured {w.measured} on {w.host}); give "
              "--job-mem-gb to plan")
        return 0
    gpus = int(args.gpus or 0)
    plan = memory.plan_workers(w, workers=args.workers, job_mem_gb=args.job_mem_gb, gpus=gpus,
                               gpu_mem_gb=args.gpu_mem_gb, margin=args.margin)
    memory.check_plan(plan, "seglab plan")
    print(f"fits: {plan.describe()}")
    return 0


def cmd_submit_slides(args) -> int:
    from seglab.slurm.cluster import load_cluster
    from seglab.slurm.memory import parse_mem_gb
    from seglab.slurm.plan import Job, Plan
    from seglab.slurm.submit import submit

    settings = _settings(args)   # bad tile/overlap/filter values fail here, before anything is written
    slides = [p.resolve() for p in _slides(args.slides)]
    cluster = load_cluster(args.cluster)
    res = cluster.resources("predict")
    gpus = int(res.get("gpus") or 0)
    # the node's device is checked on the node (as_device there); the plan here needs its type only
    dev_type = "cuda" if gpus else "cpu"
    launch_plan(args.model, dev_type, settings.tile_px, settings.overlap_px,
                args.workers, parse_mem_gb(res["mem"]), gpus, args.gpu_mem_gb, args.margin, required=True)
    out = str(Path(args.out).resolve())
    base = ["seglab", "predict-slide", "--model", args.model, "--out", out, "--workers", str(args.workers),
            "--tile-px", str(settings.tile_px), "--overlap-px", str(settings.overlap_px),
            "--sample-fraction", str(settings.sample_fraction), "--seed", str(settings.seed),
            "--device", dev_type, "--job-mem-gb", str(parse_mem_gb(res["mem"]))]
    for flag, v in (("--channels", args.channels), ("--pixel-size-um", args.pixel_size_um),
                    ("--min-area-um2", args.min_area_um2), ("--max-area-um2", args.max_area_um2),
                    ("--diameter-px", args.diameter_px), ("--gpu-mem-gb", args.gpu_mem_gb)):
        if v is not None:
            base += [flag, str(v)]
    if args.classifier:   # checked here (trusted types, gate) before anything is submitted
        from seglab.curate.store import load

        clf = load(args.classifier, allow_failed_gate=args.allow_failed_gate)
        base += ["--classifier", str(clf.path.resolve()), "--classifier-threshold", str(args.classifier_threshold)]
        if args.allow_failed_gate:
            base.append("--allow-failed-gate")
    tasks = [{"id": i, "args": [str(p)], "label": p.name} for i, p in enumerate(slides)]
    job = Job(name="predict-slides", kind="slides", title=f"predict-slide {args.model} on {len(slides)} slide(s)",
              command=base, resources=res, tasks=tasks, task_ids=[t["id"] for t in tasks],
              meta={"slides": [str(p) for p in slides], "out": out}, note=f"array of {len(slides)} slide(s)")
    submit(Plan(profile=None, jobs=[job], skipped=[], reused=[]), cluster, shlex.join(["seglab", *sys.argv[1:]]),
           dry_run=args.dry_run)
    return 0


def _common(p, *, slides=True):
    if slides:
        p.add_argument("slides", nargs="+", help="slide files (.czi, .ome.tif, .tif) or folders of them")
    p.add_argument("--model", default="generalist", help="model spec (cpsam on a GPU; generalist: the tiny CPU net)")
    p.add_argument("--tile-px", type=int, default=1024, help="tile core side, px")
    p.add_argument("--overlap-px", type=int, default=64, help="context around each tile, px (>= the largest object)")
    p.add_argument("--workers", type=int, default=1, help="worker processes over a slide's tiles (memory plan checked)")
    p.add_argument("--gpu-mem-gb", type=float, default=None, help="memory of each GPU, GB (GPU plans)")
    p.add_argument("--margin", type=float, default=0.15, help="fraction of memory kept free (default 0.15)")


def add_commands(sub) -> None:
    p = sub.add_parser("predict-slide", help="segment whole slides in tiles with overlap; seams resolved once; "
                                             "resumable per tile")
    _common(p)
    p.add_argument("--out", required=True, help="output folder (one subfolder per slide)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: $SEGLAB_DEVICE, else CUDA when seen)")
    p.add_argument("--sample-fraction", type=float, default=1.0, help="seeded fraction of tissue tiles (0.1: annotation round)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tile sample")
    p.add_argument("--min-tissue-fraction", type=float, default=0.05, help="skip tiles with less tissue (fraction)")
    p.add_argument("--channels", default=None, help="channel names, comma-separated, nucleus stain first")
    p.add_argument("--pixel-size-um", type=float, default=None, help="um per px (overrides the file's metadata)")
    p.add_argument("--min-area-um2", type=float, default=None, help="smallest object kept, um^2")
    p.add_argument("--max-area-um2", type=float, default=None, help="largest object kept, um^2")
    p.add_argument("--diameter-px", type=float, default=None, help="object diameter, px (null: the model's default)")
    p.add_argument("--flow-threshold", type=float, default=0.4)
    p.add_argument("--cellprob-threshold", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--job-mem-gb", type=float, default=None, help="the job's memory, GB ($SLURM_MEM_PER_NODE inside Slurm)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs of the job (default: 1 on cuda, else 0)")
    from seglab.cli.models import add_classifier_options

    add_classifier_options(p)
    p.set_defaults(func=cmd_predict_slide)

    p = sub.add_parser("plan", help="memory plan: measure a worker once, then how many fit a job (refuses what does not)")
    _common(p, slides=False)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the device the workers use)")
    p.add_argument("--measure", action="store_true", help="measure one worker now (subprocess) and store it")
    p.add_argument("--diameter-px", type=float, default=None, help="object diameter of the measured tile's mask settings, px")
    p.add_argument("--job-mem-gb", type=float, default=None, help="the job's host memory, GB")
    p.add_argument("--gpus", type=int, default=0, help="GPUs of the job")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("submit-slides", help="one Slurm array task per slide (predict-slide), memory plan checked first")
    _common(p)
    p.add_argument("--out", required=True, help="output folder (one subfolder per slide)")
    p.add_argument("--sample-fraction", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-tissue-fraction", type=float, default=0.05)
    p.add_argument("--channels", default=None)
    p.add_argument("--pixel-size-um", type=float, default=None)
    p.add_argument("--min-area-um2", type=float, default=None)
    p.add_argument("--max-area-um2", type=float, default=None)
    p.add_argument("--diameter-px", type=float, default=None)
    p.add_argument("--cluster", default=None, help="cluster settings (default slurm/cluster.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    add_classifier_options(p)
    p.set_defaults(func=cmd_submit_slides)
