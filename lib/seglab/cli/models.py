"""Subcommands for models: train, predict, pretrain-generalist."""

from __future__ import annotations

import json
import sys

from seglab import SeglabError


def _threads(n):
    if n:
        import torch

        torch.set_num_threads(int(n))


def cmd_train(args) -> int:
    from seglab.config import params as sparams
    from seglab.segment import train

    _threads(args.threads)
    cfg = sparams.read_yaml(args.params)
    if not isinstance(cfg, dict):
        raise SeglabError(f"{args.params}: expected a mapping of keys to values")
    if args.out:
        cfg["out_dir"] = args.out
    path = train.train_from_params(cfg, source=str(args.params), progress=not args.quiet)
    print(path)
    return 0


def mask_settings(args):
    """The profile's mask settings (params/<profile>/defaults.yaml, the notebooks' own values),
    with the flags the user gave on top."""
    from seglab.config.params import include_names, parse_override, shared_params
    from seglab.config.settings import MaskSettings
    from seglab.core import paths

    given = {"flow_threshold": args.flow_threshold, "cellprob_threshold": args.cellprob_threshold,
             "min_size": args.min_size}
    if args.diameter is not None:
        d = args.diameter.strip().lower()
        given["diameter_px"] = None if d in ("default", "null") else d if d in ("auto", "native") \
            else parse_override(f"diameter_px={args.diameter}")[1]
    given = {k: v for k, v in given.items() if v is not None}
    if "_shared" not in include_names():
        # tiles segmented outside a compendium (no params here): the library's defaults
        print(f"[seglab] no params/schema/_shared.yaml under {paths.project_root()}: mask settings are the "
              "library's defaults and the flags", file=sys.stderr)
        return MaskSettings(**given)
    return MaskSettings.from_params(shared_params(args.profile), **given)


def add_classifier_options(p, *, pixel_size: bool = False) -> None:
    """--classifier, --classifier-threshold, --allow-failed-gate (and --pixel-size-um for tiles)."""
    p.add_argument("--classifier", default=None,
                   help="curation classifier (.skops, seglab classifier train): each object gets classifier_confidence "
                        "and kept; refused unless it passed its validation gate")
    p.add_argument("--classifier-threshold", type=float, default=0.5,
                   help="keep objects whose classifier confidence is at least this (fraction, default 0.5)")
    p.add_argument("--allow-failed-gate", action="store_true",
                   help="filter with a classifier that did NOT pass its validation gate (an explicit override)")
    if pixel_size:
        p.add_argument("--pixel-size-um", type=float, default=None,
                       help="um per px of the tiles, for the classifier's um features (default: its training pixel size)")


def cmd_predict(args) -> int:
    """Exit 0 when every tile of the shard has a mask; ``predict.EXIT_TILES_FAILED`` (3) when
    ``--keep-going`` skipped unreadable tiles (listed in the table with status ``failed``)."""
    from seglab.segment import predict

    _threads(args.threads)
    mask = mask_settings(args)
    predict.parse_shard(args.shard)
    predict.discover_tiles(args.tiles)  # fail on an empty/missing folder before loading a model
    print(f"[seglab] mask settings ({args.profile} profile + flags): {mask.as_dict()}", file=sys.stderr)
    df = predict.predict(args.model, args.tiles, args.out, mask, shard=args.shard, batch_tiles=args.batch_tiles, batch_size=args.batch_size,
                         save_network_outputs=args.save_outputs, progress=not args.quiet,
                         gpu=False if args.cpu else None, overwrite=args.overwrite, keep_going=args.keep_going,
                         classifier=args.classifier, classifier_threshold=args.classifier_threshold,
                         pixel_size_um=args.pixel_size_um, allow_failed_gate=args.allow_failed_gate)
    done = df.attrs
    if args.classifier:
        print(f"[seglab] classifier {args.classifier} (threshold {args.classifier_threshold}): "
              f"{done['n_objects_before']} objects before, {done['n_objects_after']} kept; tables "
              f"{args.out}/{predict.OBJECTS_DIR}/<tile>.csv (masks unchanged)")
    table = f"{args.out}/{predict.table_name(args.shard)}"
    print(f"[seglab] {len(df)} tiles in shard {args.shard or '0/1'}: {done['n_segmented']} segmented, "
          f"{done['n_reused']} already complete" + (f", {done['n_failed']} failed" if done["n_failed"] else "")
          + f"; table {table}")
    if done["n_failed"]:
        names = sorted(done["failed"])
        print(f"seglab predict: {done['n_failed']} of {len(df)} tiles failed and were skipped: "
              f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''} (status 'failed', reason in {table}); "
              f"exit code {predict.EXIT_TILES_FAILED}", file=sys.stderr)
        return predict.EXIT_TILES_FAILED
    return 0


def cmd_pretrain(args) -> int:
    from seglab.segment import models
    from seglab.segment import train

    _threads(args.threads)
    recipe = train.GeneralistRecipe(preset=args.preset, diam_mean_px=args.diam_mean_px, epochs=args.epochs,
                                    nimg_per_epoch=args.nimg_per_epoch, batch_size=args.batch_size,
                                    bsize=args.bsize, learning_rate=args.learning_rate,
                                    weight_decay=args.weight_decay, scale_range=args.scale_range,
                                    checkpoint_every=args.checkpoint_every, seed=args.seed)
    metrics = train.pretrain_generalist(recipe, run_dir=args.run_dir, out_path=args.out or models.GENERALIST_PATH,
                                        progress=not args.quiet)
    print(json.dumps(metrics["headline"], indent=1))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model (wraps cellpose.train.train_seg); resumable")
    p.add_argument("--params", required=True, help="YAML: model, cohort_dir|manifest, out_dir, variant, epochs, ...")
    p.add_argument("--out", help="run folder (overrides out_dir); rerun with the same folder to resume")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment a folder of tiles (batched, resumable, --shard I/N)",
                       epilog="exit codes: 0 done; 1 bad input or a folder made by another model/settings; "
                              "3 --keep-going skipped tiles; 74 a file could not be written (no space, "
                              "permission, read-only)")
    p.add_argument("--model", required=True, help="cpsam, cpsam_v2, generalist, tiny, classical or a checkpoint .pt")
    p.add_argument("--tiles", required=True, help="tiles folder (cohort channel files or one TIFF per tile)")
    p.add_argument("--out", required=True, help="output folder: <tile>.tif masks + tiles_shard-I-of-N.tsv")
    p.add_argument("--shard", help="I/N: take tiles I, I+N, ... of the sorted list (Slurm arrays)")
    p.add_argument("--diameter", help="object diameter in px, 'auto' (estimated per tile), 'native' (no rescaling) "
                                      "or 'default' (the model's: auto for tiny nets, native for cpsam); "
                                      "default: the profile's diameter_px")
    p.add_argument("--profile", default="demo", help="params profile whose mask settings are the defaults "
                   "(params/<profile>/defaults.yaml: diameter_px, flow_threshold, cellprob_threshold, min_size)")
    p.add_argument("--flow-threshold", type=float, help="default: the profile's flow_threshold")
    p.add_argument("--cellprob-threshold", type=float, help="default: the profile's cellprob_threshold")
    p.add_argument("--min-size", type=int, help="smallest object kept (px); default: the profile's min_size")
    p.add_argument("--batch-tiles", type=int, default=8, help="tiles loaded and run together")
    p.add_argument("--batch-size", type=int, default=None,
                   help="network crops per forward pass (default: 8 on a GPU, 1 for tiny nets on the CPU)")
    p.add_argument("--save-outputs", action="store_true", help="also save flows + cellprob (outputs/<tile>.npz)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds another model's or other settings' predictions (predict.json): delete them, "
                        "in every shard, and predict again (without it such a folder is refused)")
    p.add_argument("--keep-going", action="store_true",
                   help="skip tiles that cannot be read: listed in the table with status 'failed' and the reason; "
                        "exit code 3 when any was skipped")
    p.add_argument("--cpu", action="store_true", help="do not use a GPU even if there is one")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_classifier_options(p, pixel_size=True)
    p.set_defaults(func=cmd_predict)

    from seglab.segment.train import GeneralistRecipe

    r = GeneralistRecipe()
    p = sub.add_parser("pretrain-generalist",
                       help="train the tiny demo generalist on DSB2018 nuclei and write it to lib/seglab/assets/")
    p.add_argument("--run-dir", default="runs/pretrain_generalist/current",
                   help="run folder (checkpoints, losses.tsv); rerun with the same folder to resume")
    p.add_argument("--out", help="weights path (default lib/seglab/assets/generalist_tiny.pt)")
    p.add_argument("--preset", default=r.preset, choices=["xs", "s", "m"])
    p.add_argument("--diam-mean-px", type=float, default=r.diam_mean_px, help="canonical nucleus diameter")
    p.add_argument("--epochs", type=int, default=r.epochs)
    p.add_argument("--nimg-per-epoch", type=int, default=r.nimg_per_epoch)
    p.add_argument("--batch-size", type=int, default=r.batch_size)
    p.add_argument("--bsize", type=int, default=r.bsize)
    p.add_argument("--learning-rate", type=float, default=r.learning_rate)
    p.add_argument("--weight-decay", type=float, default=r.weight_decay)
    p.add_argument("--scale-range", type=float, default=r.scale_range)
    p.add_argument("--checkpoint-every", type=int, default=r.checkpoint_every)
    p.add_argument("--seed", type=int, default=r.seed)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain)
