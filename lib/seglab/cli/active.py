"""``seglab active init|select|ingest|train|status``: an active-learning campaign, one step per process.

Each step reads and writes the campaign folder only (:mod:`seglab.active.campaign`), asks nothing at
a keyboard and can be its own Slurm job: ``init`` once, then per round ``select`` (score the
unlabelled tiles, export the batch for correction), ``ingest --from DIR`` (the corrected masks),
``train`` (fine-tune from the previous round's checkpoint; rerun to resume), and ``status`` at any
time (the history table and the next step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from seglab import SeglabError


def _threads(n) -> None:
    from seglab.core import workers

    workers.set_threads(int(n) if n else 1)


def _folder_tiffs(folder: str, what: str) -> dict:
    from seglab.active.campaign import read_array

    d = Path(folder)
    if not d.is_dir():
        raise SeglabError(f"{what} {d}: no such folder")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in (".tif", ".tiff") and not f.name.startswith("."))
    if not files:
        raise SeglabError(f"{what} {d}: no .tif files (one <tile_id>.tif per tile)")
    return {f.stem: read_array(f) for f in files}


def cmd_init(args) -> int:
    from seglab.active import campaign as cmp
    from seglab.config import params as sparams

    cfg = {}
    if args.params:
        cfg = sparams.read_yaml(args.params)
        if not isinstance(cfg, dict):
            raise SeglabError(f"{args.params}: expected a mapping of campaign params (see docs/active_learning.md)")
    for item in args.set or []:
        key, value = sparams.parse_override(item)
        cfg[key] = value
    c = cmp.init(args.campaign, _folder_tiffs(args.pool, "--pool"), _folder_tiffs(args.labels, "--labels"),
                 _folder_tiffs(args.val_images, "--val-images"), _folder_tiffs(args.val_labels, "--val-labels"), cfg)
    print(f"campaign {c.root}: {len(c.pool_ids())} pool tiles, {len(c.labelled_ids())} labelled; "
          f"next: seglab active train {c.root}")
    return 0


def cmd_select(args) -> int:
    from seglab.active import campaign as cmp

    _threads(args.threads)
    c = cmp.open_campaign(args.campaign)
    sel = cmp.select(c, log=print)
    print(f"correct the masks in {c.round_dir(sel['round']) / 'selection'} (<tile>_pred.tif), then: "
          f"seglab active ingest {c.root} --from <folder of corrected masks>")
    return 0


def cmd_ingest(args) -> int:
    from seglab.active import campaign as cmp

    c = cmp.open_campaign(args.campaign)
    src = Path(args.source)
    if not src.is_dir():
        raise SeglabError(f"--from {src}: no such folder of corrected masks")
    ids = cmp.ingest(c, cmp.corrected_files(src), log=print)
    print(f"next: seglab active train {c.root}  ({len(ids)} tiles ingested)")
    return 0


def cmd_train(args) -> int:
    from seglab.active import campaign as cmp

    _threads(args.threads)
    c = cmp.open_campaign(args.campaign)
    rec = cmp.train(c, progress=not args.quiet, log=print)
    st = cmp.status(c)
    print(f"round {rec['round']}: validation AP@0.5 {rec['val_ap50']:.4f}, F1 {rec['val_f1']:.4f}; "
          + (f"stop: {st['stop']}" if st["stop"] else f"next: seglab active select {c.root}"))
    return 0


def cmd_status(args) -> int:
    from seglab.active import campaign as cmp

    c = cmp.open_campaign(args.campaign)
    st = cmp.status(c)
    if args.json:
        print(json.dumps({"rounds": st["rounds"], "next": st["next"], "stop": st["stop"],
                          "history": json.loads(st["history"].to_json(orient="records"))}, indent=1))
        return 0
    print(f"campaign {c.root}: {len(c.labelled_ids())} of {len(c.pool_ids())} pool tiles labelled")
    for k, stage in st["rounds"]:
        print(f"  round {k:3d}: {stage}")
    hist = st["history"]
    if len(hist):
        print(hist.drop(columns=["selected", "selected_scores"]).to_string(index=False))
    print(f"stop: {st['stop']}" if st["stop"] else f"next: seglab active {st['next']} {c.root}", file=sys.stdout)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("active", help="active learning: init, select, ingest, train, status of a campaign folder")
    steps = p.add_subparsers(dest="step", metavar="STEP")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    s = steps.add_parser("init", help="create a campaign: pool tiles, initial labelled masks, validation tiles")
    s.add_argument("campaign", help="campaign folder (created)")
    s.add_argument("--pool", required=True, help="folder of <tile_id>.tif images (C, Y, X), the candidates")
    s.add_argument("--labels", required=True, help="folder of <tile_id>.tif masks of the initially labelled pool tiles")
    s.add_argument("--val-images", required=True, help="folder of validation images <tile_id>.tif")
    s.add_argument("--val-labels", required=True, help="folder of validation masks <tile_id>.tif")
    s.add_argument("--params", help="YAML of campaign params (base_model, weights, batch_size, max_rounds, "
                                    "min_improvement, patience, seed, tta_views, ensemble_size, mask, training)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="a campaign param on top of --params")
    s.set_defaults(func=cmd_init)

    s = steps.add_parser("select", help="score the unlabelled tiles and export the next batch for correction")
    s.add_argument("campaign")
    s.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    s.set_defaults(func=cmd_select)

    s = steps.add_parser("ingest", help="ingest the corrected masks of the last selected batch (all or none)")
    s.add_argument("campaign")
    s.add_argument("--from", dest="source", required=True,
                   help="folder of corrected masks: <tile_id>.tif or the exported <tile_id>_pred.tif edited in place")
    s.set_defaults(func=cmd_ingest)

    s = steps.add_parser("train", help="fine-tune from the previous round's checkpoint; rerun to resume")
    s.add_argument("campaign")
    s.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train)

    s = steps.add_parser("status", help="the rounds, the history table and the next step")
    s.add_argument("campaign")
    s.add_argument("--json", action="store_true", help="as JSON")
    s.set_defaults(func=cmd_status)
