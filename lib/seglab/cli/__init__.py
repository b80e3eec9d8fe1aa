"""``seglab`` command line: one entry point, subcommands contributed by the modules.

Each module in ``COMMAND_MODULES`` defines ``add_commands(subparsers)`` and
sets ``func`` on its parsers; ``func(args)`` returns an exit code. Errors the
user can fix (:class:`seglab.SeglabError`) are printed as one paragraph, no
traceback; ``SEGLAB_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from seglab import SeglabError, __version__
from seglab.core import paths

# Modules that contribute subcommands, in the order their commands are listed.
COMMAND_MODULES = ["seglab.cli.runs", "seglab.cli.data", "seglab.cli.evaluate", "seglab.cli.slurm", "seglab.cli.models", "seglab.cli.prepare", "seglab.cli.readme"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seglab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"seglab {__version__}")
    parser.add_argument("--root", help="project root (default: found from the current folder)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.root:
        paths.set_root(args.root)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SeglabError as exc:
        if os.environ.get("SEGLAB_DEBUG"):
            raise
        print(f"seglab {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print(f"seglab {args.command}: interrupted", file=sys.stderr)
        return 130
