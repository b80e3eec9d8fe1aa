"""Subcommands for 3D volumes: predict-3d, test-3d, train-3d (with --test-after-training).

``seglab predict-3d``: one method over a folder of volumes (``<case>_0000.tif(f)``) into
``imagesTs_<method>/`` beside it (:func:`seglab.segment.volumes.predict_folder`).
``seglab test-3d``: every method of ``--methods`` over a dataset's ``imagesTs``, then every
``imagesTs_*`` folder (ours and other tools') evaluated against ``instancesTs``
(:func:`seglab.evaluate.volumes.compare_methods`), with ``evaluation_comparison.csv`` and
``evaluation_comparison.png`` in the dataset folder.
``seglab train-3d``: the 2D model fine-tuned on slices of a dataset's training volumes
(:func:`seglab.segment.volumes.train_on_dataset`, the one fine-tuning path
:func:`seglab.segment.train.fit`); ``--test-after-training`` then runs test-3d with the new model.

Exit codes: 0 done; 3 some volumes failed to predict or evaluate (reported; the others were done).
"""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_VOLUMES_FAILED = 3
METHOD_NAMES = ["orthoplane", "xy", "cellpose3d", "stitch"]


def _threads(n):
    if n:
        import torch

        torch.set_num_threads(int(n))


def _mask(args):
    from seglab.config.params import parse_override
    from seglab.config.settings import MaskSettings

    given = {"flow_threshold": args.flow_threshold, "cellprob_threshold": args.cellprob_threshold,
             "min_size": args.min_size}
    if args.diameter is not None:
        d = args.diameter.strip().lower()
        given["diameter_px"] = d if d in ("auto", "native") else parse_override(f"diameter_px={args.diameter}")[1]
    return MaskSettings(**{k: v for k, v in given.items() if v is not None})


def _settings(args, method: str):
    from seglab.segment import volumes as svol

    options = dict(stitch_threshold=args.stitch_threshold, consensus_iou=args.consensus_iou,
                   downsample=args.downsample, bsize=args.bsize, min_votes=args.min_votes)
    if method == "orthoplane" and getattr(args, "axes", None):
        return svol.VolumeSettings(method="orthoplane", axes=tuple(args.axes), **options)
    return svol.settings_for(method, **options)


def _predict(args, model, images: Path, method: str, out=None):
    from seglab.segment import volumes as svol

    res = svol.predict_folder(model, images, settings=_settings(args, method), mask=_mask(args),
                              anisotropy=args.anisotropy, channel=args.channel, out_dir=out,
                              cases=args.case or None, progress=not args.quiet, overwrite=args.overwrite,
                              log=lambda m: print(f"[seglab] {m}", file=sys.stderr))
    print(f"[seglab] {res.out}: {len(res.predicted)} predicted, {len(res.skipped)} already there, "
          f"{len(res.failed)} failed", file=sys.stderr)
    return res


def cmd_predict_3d(args) -> int:
    from seglab.segment import models

    _threads(args.threads)
    model = models.load(args.model, gpu=False if args.cpu else None)
    res = _predict(args, model, Path(args.images), args.method, args.out)
    print(res.out)
    return EXIT_VOLUMES_FAILED if res.failed else 0


def _test(args, model_spec) -> int:
    from seglab.data import volumes as vdata
    from seglab.evaluate import volumes as evol
    from seglab.plots import volumes as pvol
    from seglab.segment import models
    from seglab.core import io

    dataset = Path(args.dataset)
    vdata.dataset_cases(dataset, "test")   # imagesTs and instancesTs there, every case labelled
    failed = 0
    if model_spec is not None:
        model = models.load(model_spec, gpu=False if args.cpu else None)
        for method in args.methods:
            failed += len(_predict(args, model, dataset / "imagesTs", method).failed)
    table = evol.compare_methods(dataset, args.thresholds, args.boundary_tol, progress=not args.quiet)
    fig = pvol.plot_method_comparison(table, threshold=min(args.thresholds, key=lambda t: abs(t - 0.5)),
                                      title=f"{dataset.name}: every imagesTs_* folder, pooled")
    with io.atomic_path(dataset / "evaluation_comparison.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    cols = ["method", "n_volumes", "n_failed", "threshold", "n_true", "n_pred", "tp", "ap", "f1",
            "foreground_dice", "boundary_f1", "n_split", "n_merged"]
    print(table[cols].round(4).to_string(index=False))
    print(dataset / evol.COMPARISON_FILE)
    failed += int(table.groupby("method")["n_failed"].first().sum())
    return EXIT_VOLUMES_FAILED if failed else 0


def cmd_test_3d(args) -> int:
    _threads(args.threads)
    return _test(args, args.model)


def cmd_train_3d(args) -> int:
    from seglab.config.settings import TrainSettings
    from seglab.segment import volumes as svol

    _threads(args.threads)
    training = TrainSettings(epochs=args.epochs, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                             batch_size=args.batch_size, bsize=args.train_bsize, nimg_per_epoch=args.nimg_per_epoch,
                             min_train_masks=args.min_train_masks, seed=args.seed)
    path = svol.train_on_dataset(args.model, args.dataset, training, args.out, anisotropy=args.anisotropy,
                                 channel=args.channel, plane_step=args.plane_step, progress=not args.quiet)
    print(path)
    if args.test_after_training:
        return _test(args, str(path))
    return 0


def cmd_submit_predict_3d(args) -> int:
    import shlex

    from seglab.slurm.cluster import load_cluster
    from seglab.slurm.plan import plan_predict_3d
    from seglab.slurm.submit import submit

    cluster = load_cluster(args.cluster)
    plan = plan_predict_3d(args.model, args.images, args.out, cluster, extra_args=args.predict_args, force=args.force)
    submit(plan, cluster, "seglab " + shlex.join(sys.argv[1:]), dry_run=args.dry_run)
    return 0


def _inference_args(p, *, methods: bool) -> None:
    if methods:
        p.add_argument("--methods", nargs="+", default=["orthoplane", "xy", "cellpose3d", "stitch"],
                       help="methods to predict with: orthoplane, xy (orthoplane's xy-only fast mode), "
                            "orthoplane_<axes> (e.g. orthoplane_xy_xz), cellpose3d, stitch")
    p.add_argument("--anisotropy", type=float, help="z step / xy pixel size for every volume (default: each file's "
                   "metadata, else 1)")
    p.add_argument("--channel", type=int, help="channel index of 4D (Z, C, Y, X) volumes")
    p.add_argument("--diameter", help="nucleus diameter in xy px, 'auto' or 'native' (default: the model's)")
    p.add_argument("--flow-threshold", type=float, help="2D masks' flow error threshold (unused by cellpose3d)")
    p.add_argument("--cellprob-threshold", type=float)
    p.add_argument("--min-size", type=int, help="smallest object: px per plane for 2D masks, voxels in 3D")
    p.add_argument("--stitch-threshold", type=float, default=0.5, help="IoU linking masks of neighbouring planes")
    p.add_argument("--consensus-iou", type=float, default=0.3, help="IoU at which two orthoplane stacks' objects agree")
    p.add_argument("--min-votes", type=int, help="stacks that must agree (default: a majority, 2 of 3)")
    p.add_argument("--downsample", type=float, default=1.0, help="shrink every axis by this factor first (memory)")
    p.add_argument("--bsize", type=int, help="network tile size in px at inference (default: the model's)")
    p.add_argument("--case", action="append", help="only this case (repeatable; a Slurm array task takes one)")
    p.add_argument("--overwrite", action="store_true", help="replace predictions made with other settings")
    p.add_argument("--cpu", action="store_true", help="do not use a GPU even if there is one")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _eval_args(p) -> None:
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.75, 0.9], help="IoU thresholds")
    p.add_argument("--boundary-tol", type=float, default=2.0, help="boundary F1 tolerance in voxels")


def add_commands(sub) -> None:
    p = sub.add_parser("predict-3d", help="segment a folder of 3D volumes: orthoplane consensus, xy, cellpose3d "
                       "(do_3D) or stitch; resumable per volume")
    p.add_argument("--model", required=True, help="generalist, tiny, cpsam or a checkpoint .pt")
    p.add_argument("--images", required=True, help="folder of volumes <case>_0000.tif(f) (e.g. a dataset's imagesTs)")
    p.add_argument("--method", default="orthoplane", help="orthoplane, xy, orthoplane_<axes>, cellpose3d, stitch")
    p.add_argument("--axes", nargs="+", choices=["xy", "xz", "yz"], help="orthoplane's orientations (any subset)")
    p.add_argument("--out", help="output folder (default: imagesTs_<method> beside --images)")
    _inference_args(p, methods=False)
    p.set_defaults(func=cmd_predict_3d)

    p = sub.add_parser("submit-predict-3d", help="Slurm: one array task per volume of `seglab predict-3d --case`")
    p.add_argument("--model", required=True, help="model spec, as for predict-3d")
    p.add_argument("--images", required=True, help="folder of volumes <case>_0000.tif(f)")
    p.add_argument("--out", required=True, help="output folder (e.g. DatasetNNN/imagesTs_orthoplane), shared by the tasks")
    p.add_argument("predict_args", nargs="*", metavar="-- PREDICT_ARGS", help="further predict-3d arguments, after --")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument("--force", action="store_true", help="submit every volume, also those predicted")
    p.add_argument("--cluster", metavar="FILE", help="cluster settings (default: slurm/cluster.yaml or $SEGLAB_CLUSTER)")
    p.set_defaults(func=cmd_submit_predict_3d)

    p = sub.add_parser("test-3d", help="predict a 3D dataset's imagesTs with each method, then evaluate every "
                       "imagesTs_* folder against instancesTs")
    p.add_argument("--dataset", required=True, help="nnU-Net dataset folder (imagesTs/, instancesTs/)")
    p.add_argument("--model", help="model to predict with; omitted: only evaluate the imagesTs_* folders there")
    _inference_args(p, methods=True)
    _eval_args(p)
    p.set_defaults(func=cmd_test_3d)

    p = sub.add_parser("train-3d", help="fine-tune a 2D model on slices of a 3D nnU-Net dataset (imagesTr/"
                       "instancesTr); --test-after-training then runs test-3d")
    p.add_argument("--dataset", required=True, help="nnU-Net dataset folder (imagesTr/, instancesTr/)")
    p.add_argument("--model", default="generalist", help="the model to fine-tune (generalist, cpsam, a checkpoint)")
    p.add_argument("--out", required=True, help="run folder (model.pt is written there; rerun to resume)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--learning-rate", type=float, default=0.002)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-bsize", type=int, default=64, help="training crop size in px (256 for cpsam)")
    p.add_argument("--nimg-per-epoch", type=int, default=24)
    p.add_argument("--min-train-masks", type=int, default=5, help="slices with fewer objects are left out")
    p.add_argument("--plane-step", type=int, default=2, help="every n-th slice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-after-training", action="store_true",
                   help="then predict imagesTs with --methods and evaluate every imagesTs_* folder")
    _inference_args(p, methods=True)
    _eval_args(p)
    p.set_defaults(func=cmd_train_3d)
