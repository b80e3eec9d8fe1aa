"""Subcommand readme-numbers: README's headline-numbers table from the latest done runs."""

from __future__ import annotations

import sys

from seglab import SeglabError
from seglab.core import paths


def cmd_readme_numbers(args) -> int:
    from seglab.core.io import write_text
    from seglab.workflow import readme

    target = paths.project_root() / args.readme
    text = target.read_text()
    # the table of modules each notebook calls follows the notebooks, not the runs
    modules = readme.render_modules_block(sorted((paths.project_root() / "notebooks").glob("*.ipynb")))
    with_modules = readme.replace_modules_block(text, modules, str(target))
    if args.check and with_modules != text:
        print(f"{args.readme}: the table of the modules each notebook calls is out of date; rewrite it with: "
              f"seglab readme-numbers --profile {args.profile}", file=sys.stderr)
        return 1
    text = with_modules
    summaries, run_ids = readme.collect(args.profile)
    expected = readme.render_block(summaries, args.profile, run_ids)
    current = readme.extract_block(text, str(target))
    differ = readme.differing_rows(current, expected)
    if args.check:
        if differ:
            print(f"{args.readme}: the headline-numbers table differs from the latest done {args.profile} runs "
                  f"in {len(differ)} row(s):", file=sys.stderr)
            for line in differ:
                print(f"  {line}", file=sys.stderr)
            print(f"rewrite it with: seglab readme-numbers --profile {args.profile}", file=sys.stderr)
            return 1
        print(f"{args.readme}: headline numbers agree with the latest done {args.profile} runs")
        return 0
    absent = [nb for nb, s in summaries.items() if s is None]
    if absent and not args.allow_missing:
        raise SeglabError(f"no done {args.profile} run of {', '.join(absent)}: run `seglab run-all --profile "
                          f"{args.profile}` first, or pass --allow-missing to write 'no run' in those rows")
    write_text(target, readme.replace_block(text, expected, str(target)))
    print(f"{args.readme}: headline numbers from the {args.profile} runs ({len(differ)} row(s) changed)")
    for line in differ:
        print(f"  {line}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("readme-numbers", help="write README's headline-numbers table from the latest done runs and "
                                              "its table of the modules each notebook calls (--check: only "
                                              "compare, exit 1 naming what differs)")
    p.add_argument("--profile", default="demo")
    p.add_argument("--check", action="store_true", help="compare only; exit 1 if a row differs")
    p.add_argument("--allow-missing", action="store_true",
                   help="write the table even when a notebook has no done run ('no run' in its rows)")
    p.add_argument("--readme", default="README.md", help="relative to the project root (default README.md)")
    p.set_defaults(func=cmd_readme_numbers)
