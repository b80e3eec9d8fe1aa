"""Subcommands that drive Slurm: submit, submit-all, submit-predict, status, cancel-dependants, merge-shards."""

from __future__ import annotations

import shlex
import sys


def _command_line() -> str:
    return "seglab " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("seglab", "__main__.py")) \
        else "seglab"


def cmd_submit(args) -> int:
    from seglab.slurm.cluster import load_cluster, parse_grid
    from seglab.slurm.plan import plan_chain
    from seglab.slurm.submit import submit
    cluster = load_cluster(args.cluster)
    plan = plan_chain(args.profile, [args.experiment], cluster, force=args.force,
                      grid_override=parse_grid(args.array), upstream=False)
    submit(plan, cluster, _command_line(), dry_run=args.dry_run)
    return 0


def cmd_submit_all(args) -> int:
    from seglab.slurm.cluster import load_cluster
    from seglab.slurm.plan import plan_chain
    from seglab.slurm.submit import submit
    cluster = load_cluster(args.cluster)
    plan = plan_chain(args.profile, args.only, cluster, force=args.force)
    submit(plan, cluster, _command_line(), dry_run=args.dry_run)
    return 0


def cmd_submit_predict(args) -> int:
    from seglab.slurm.cluster import load_cluster
    from seglab.slurm.plan import plan_predict
    from seglab.slurm.submit import submit
    cluster = load_cluster(args.cluster)
    plan = plan_predict(args.model, args.tiles, args.out, args.shards, cluster,
                        extra_args=args.predict_args, force=args.force)
    submit(plan, cluster, _command_line(), dry_run=args.dry_run)
    return 0


def cmd_status(args) -> int:
    from seglab.slurm.commands import FAILED_STATES, scancel
    from seglab.slurm.status import format_status, status
    result = status(args.submission)
    print(format_status(result))
    if args.cancel_orphans:
        orphans = [r["job_id"] for r in result["rows"]
                   if r["state"] == "PENDING" and (r["reason"] or "").startswith("DependencyNeverSatisfied")]
        if orphans:
            scancel(orphans)
            print(f"[seglab] cancelled {', '.join(orphans)}: a job they wait on failed")
    bad = [r for r in result["rows"] if r["state"] in FAILED_STATES or r["run_status"] in ("failed", "interrupted")]
    return 1 if bad and args.fail_on_error else 0


def cmd_cancel_dependants(args) -> int:
    from seglab.slurm.status import cancel_dependants
    cancel_dependants(args.job_id)
    return 0


def cmd_merge_shards(args) -> int:
    from seglab.segment.shards import merge_shards
    merge_shards(args.tiles, args.out, args.shards)
    return 0


def add_commands(sub) -> None:
    def common(p, profile=True):
        if profile:
            p.add_argument("--profile", default="full", help="params profile (default: full)")
        p.add_argument("--dry-run", action="store_true", help="print every sbatch script and the dependency graph; submit nothing")
        p.add_argument("--force", action="store_true", help="submit even what finished and is up to date")
        p.add_argument("--cluster", metavar="FILE", help="cluster settings (default: slurm/cluster.yaml or $SEGLAB_CLUSTER)")

    p = sub.add_parser("submit", help="submit one notebook as a Slurm job (an array when cluster.yaml or --array gives a grid)")
    p.add_argument("experiment", help="number or name, e.g. 02 or 02_budget")
    p.add_argument("--array", action="append", metavar="KEY=[V1,V2]",
                   help="fan out over these param values (repeat for a product grid); task ids follow the order")
    common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("submit-all", help="submit the chain of params/experiments.yaml with afterok dependencies")
    p.add_argument("--only", nargs="+", metavar="NN", help="these notebooks and what they need")
    common(p)
    p.set_defaults(func=cmd_submit_all)

    p = sub.add_parser("submit-predict", help="sharded inference: an array of `seglab predict --shard I/N` and a merge check")
    p.add_argument("--model", required=True, help="model spec, as for seglab predict")
    p.add_argument("--tiles", required=True, help="tiles folder")
    p.add_argument("--out", required=True, help="output folder (shared by the shards)")
    p.add_argument("--shards", type=int, required=True, help="number of array tasks")
    p.add_argument("predict_args", nargs="*", metavar="-- PREDICT_ARGS", help="further seglab predict arguments, after --")
    common(p, profile=False)
    p.set_defaults(func=cmd_submit_predict)

    p = sub.add_parser("status", help="the jobs of a submission: queue state joined with run manifests; failures with their log")
    p.add_argument("submission", nargs="?", help="submission id or prefix (default: the newest)")
    p.add_argument("--cancel-orphans", action="store_true",
                   help="cancel jobs pending forever because a job they wait on failed")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 when a job failed")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel-dependants", help="cancel the jobs waiting (afterok) on a failed job (job scripts call this)")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel_dependants)

    p = sub.add_parser("merge-shards", help="check that sharded inference wrote every tile exactly once")
    p.add_argument("--tiles", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, required=True)
    p.set_defaults(func=cmd_merge_shards)
