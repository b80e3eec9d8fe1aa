"""``seglab`` command line: one entry point, subcommands contributed by the modules.

Each module in ``COMMAND_MODULES`` defines ``add_commands(subparsers)`` and
sets ``func`` on its parsers; ``func(args)`` returns an exit code. Errors the
user can fix (:class:`seglab.SeglabError`) are printed as one paragraph, no
traceback; ``SEGLAB_DEBUG=1`` shows the traceback.

Any ``OSError`` a command meets (no space left, permission denied, read-only file
system, ...) is one line too: ``seglab <cmd>: error: <path>: <system's reason> — <fix>``,
the fix chosen by errno (:data:`OSERROR_FIXES`).

Exit codes: 0 done; 1 an error the user can fix (SeglabError); 2 a usage error (argparse);
3 ``seglab predict --keep-going`` skipped tiles it could not read (listed in its table);
74 an OSError (EX_IOERR of sysexits.h): nothing was left half-written, fix the cause and
rerun; 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from seglab import SeglabError, __version__
from seglab.core import paths

EXIT_OSERROR = 74

# What to do about an OSError, by errno; the reason itself is the system's (strerror).
OSERROR_FIXES = {
    errno.ENOSPC: "free space or write to another folder with --out",
    errno.EDQUOT: "disk quota exceeded: free space or write to another folder with --out",
    errno.EACCES: "check permissions",
    errno.EPERM: "check permissions",
    errno.EROFS: "read-only file system: write elsewhere",
    errno.ENOENT: "check that the path exists",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "a folder is where a file was expected: check the path",
    errno.EEXIST: "it exists already: remove it or choose another path",
    errno.EIO: "input/output error: check the disk or the network file system, then rerun",
    errno.ENAMETOOLONG: "shorten the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use smaller batches",
}

# Modules that contribute subcommands, in the order their commands are listed.
COMMAND_MODULES = [
    "seglab.cli.runs",
    "seglab.cli.data",
    "seglab.cli.evaluate",
    "seglab.cli.slurm",
    "seglab.cli.models",
    "seglab.cli.prepare",
    "seglab.cli.readme",
    "seglab.cli.slides",
    "seglab.cli.volumes",
    "seglab.cli.active",
    "seglab.cli.curate",
    "seglab.cli.classify",
]


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
    except OSError as exc:
        if os.environ.get("SEGLAB_DEBUG"):
            raise
        print(f"seglab {args.command}: error: {oserror_line(exc)}", file=sys.stderr)
        return EXIT_OSERROR
    except KeyboardInterrupt:
        print(f"seglab {args.command}: interrupted", file=sys.stderr)
        return 130


def oserror_line(exc: OSError) -> str:
    """``<path>: <system's reason> — <fix>`` for an OSError, on one line."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename is not None else exc.filename2
    fix = OSERROR_FIXES.get(exc.errno, "check the path and the file system, then rerun")
    text = f"{where}: {reason}" if where is not None else reason
    return " ".join(f"{text} — {fix}".split("\n"))
