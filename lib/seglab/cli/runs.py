"""Subcommands that run notebooks and build reports: run, run-all, report, experiments."""

from __future__ import annotations

from seglab.core import paths


def _overrides(items):
    from seglab.config.params import parse_override
    return dict(parse_override(item) for item in items or [])


def cmd_run(args) -> int:
    from seglab.workflow.pipeline import execute
    execute(args.experiment, args.profile, overrides=_overrides(args.set), render=not args.no_report,
            upstream_check=not args.no_upstream_check)
    print(f"[seglab] status page: {paths.reports_dir() / 'index.html'}")
    return 0


def cmd_run_all(args) -> int:
    from seglab.workflow.pipeline import run_all
    run_all(args.profile, force=args.force, only=args.only)
    print(f"[seglab] status page: {paths.reports_dir() / 'index.html'}")
    return 0


def cmd_report(args) -> int:
    from seglab.workflow.report import build_index
    print(build_index())
    return 0


def cmd_experiments(args) -> int:
    from seglab.workflow.chain import load_experiments
    for e in load_experiments():
        needs = f"  (needs {', '.join(e.needs)})" if e.needs else ""
        print(f"{e.name:28s} {e.title}{needs}")
    return 0


def cmd_check_params(args) -> int:
    """Every notebook's params of the profile: validated, then the preflight checks (with the cohort
    when it is built). Each notebook gets a line; every distinct error is printed, exit 1 if any."""
    import sys

    from seglab import SeglabError
    from seglab.config.params import resolve_params
    from seglab.experiments import preflight
    from seglab.workflow.chain import load_experiments

    errors: list[str] = []
    for e in load_experiments():
        try:
            resolved = resolve_params(e.name, args.profile)
            note = preflight(e.name, resolved.params, resolved.where)
        except SeglabError as exc:
            if str(exc) not in errors:   # a bad defaults.yaml is every notebook's error: say it once
                errors.append(str(exc))
                print(f"seglab check-params: error: {exc}", file=sys.stderr)
            continue
        print(f"ok  {args.profile}/{e.name}" + (f"  ({note})" if note else ""))
    return 1 if errors else 0


def cmd_sync_parameters(args) -> int:
    from seglab.workflow.nbparams import sync_all
    stale = 0
    for name, keys in sync_all(args.profile, check=args.check).items():
        if keys:
            stale += 1
            print(f"{'stale' if args.check else 'updated'}  {name}: {', '.join(keys)}")
    return 1 if args.check and stale else 0


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="run one notebook with papermill into a new run folder")
    p.add_argument("experiment", help="number or name, e.g. 00 or 00_data")
    p.add_argument("--profile", default="demo", help="params profile (default: demo)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one param (YAML value)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--no-upstream-check", action="store_true",
                   help="start even when a notebook it needs (params/experiments.yaml) has no finished run "
                        "in this profile (its notebook then reads whatever it finds)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("run-all", help="run the chain in order, skipping notebooks that are up to date")
    p.add_argument("--profile", default="demo")
    p.add_argument("--force", action="store_true", help="rerun even when params and inputs are unchanged")
    p.add_argument("--only", nargs="+", metavar="NN", help="these notebooks and what they need")
    p.set_defaults(func=cmd_run_all)

    p = sub.add_parser("report", help="rebuild reports/index.html from the run manifests")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("experiments", help="list the notebook chain (params/experiments.yaml)")
    p.set_defaults(func=cmd_experiments)

    p = sub.add_parser("sync-parameters", help="rewrite each notebook's parameters cell from the demo profile")
    p.add_argument("--profile", default="demo")
    p.add_argument("--check", action="store_true", help="only report stale cells (exit 1 if any)")
    p.set_defaults(func=cmd_sync_parameters)

    p = sub.add_parser("check-params", help="validate every notebook's params of a profile, and check them "
                                            "against its cohort when 00_data has built it")
    p.add_argument("--profile", default="demo")
    p.set_defaults(func=cmd_check_params)
