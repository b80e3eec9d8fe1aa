"""Subcommand ``prepare``: list or run a notebook's heavy work items (fine-tunes, inference shards).

``seglab prepare 02 --profile full --list`` prints index, done/todo and label;
``--task I`` runs item I (default: ``$SLURM_ARRAY_TASK_ID``: a Slurm array task);
``--all`` runs every item not done, in order; ``--check`` is E5's merge check.
"""

from __future__ import annotations

import os


def _overrides(items: list[str] | None) -> dict | None:
    from seglab.config.params import parse_override

    return dict(parse_override(s) for s in items) if items else None


def cmd_prepare(args) -> int:
    from seglab import SeglabError
    from seglab.workflow import prepare

    modes = [m for m in ("list", "all", "check") if getattr(args, m)] + (["task"] if args.task is not None else [])
    if len(modes) > 1:
        raise SeglabError(f"seglab prepare: give one of --list, --task I, --all, --check (got {', '.join(modes)})")
    task = args.task
    if not modes:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        if task is None:
            raise SeglabError("seglab prepare: give --list, --task I, --all or --check (no $SLURM_ARRAY_TASK_ID "
                              "either: this is not a Slurm array task)")
    e, params, items = prepare.load(args.experiment, args.profile, _overrides(args.set))
    if args.list:
        if not items:
            print(f"{e.name} ({args.profile}): no prepare items (it has no heavy work: its experiment module lists no work_items)")
            return 0
        done = [it.done() for it in items]
        print(f"{e.name} ({args.profile}): {len(items)} prepare items, {sum(done)} done, {len(items) - sum(done)} to do")
        for it, d in zip(items, done):
            print(f"  {it.index:4d}  {'done' if d else 'todo'}  {it.label}")
        return 0
    if args.check:
        prepare.check(e, params)
        return 0
    if args.all:
        if not items:
            print(f"{e.name} ({args.profile}): no prepare items; nothing to do")
            return 0
        for it in items:
            prepare.run_item(e, params, it.index)
        if prepare.checked(e):
            prepare.check(e, params)
        return 0
    prepare.run_item(e, params, task, expect_label=args.expect_label)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="a notebook's heavy work (fine-tunes, inference shards) as items: "
                                       "list them, run one (a Slurm array task) or all")
    p.add_argument("experiment", help="number or name, e.g. 02 or 02_label_efficiency")
    p.add_argument("--profile", default="full", help="params profile (default: full)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param (repeatable)")
    p.add_argument("--list", action="store_true", help="print every item: index, done/todo, label")
    p.add_argument("--task", metavar="I", help="run item I (default: $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--all", action="store_true", help="run every item not done, in order (then E5's merge check)")
    p.add_argument("--check", action="store_true",
                   help="05: check that the inference shards give every tile exactly once (the merge step)")
    p.add_argument("--expect-label", metavar="LABEL",
                   help="refuse to run unless item I still has this label (Slurm jobs pass the label they were submitted for)")
    p.set_defaults(func=cmd_prepare)
