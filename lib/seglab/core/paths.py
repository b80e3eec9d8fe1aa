"""Where things live in the compendium: one place for every path (cookiecutter-data-science's `config`).

The project root is the folder holding ``params/experiments.yaml``. It is found,
in order, from ``set_root()`` (the CLI's ``--root``), the ``SEGLAB_ROOT``
environment variable, the current directory and its parents (so a notebook
opened in JupyterLab under ``notebooks/`` finds it), and finally the checkout
this package was installed from (editable install: ``lib/seglab`` -> root).
Relative paths in params files are relative to the root, never to the
notebook's folder, so a notebook gives the same answer in JupyterLab and under
papermill.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER_FILE = Path("params") / "experiments.yaml"
_root_override: Path | None = None


def set_root(path: str | os.PathLike | None) -> None:
    """Fix the project root for this process (the CLI's ``--root``); None clears it."""
    global _root_override
    _root_override = None if path is None else Path(path).resolve()


def project_root() -> Path:
    """The project root (a folder with ``params/experiments.yaml``)."""
    if _root_override is not None:
        return _root_override
    env = os.environ.get("SEGLAB_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / MARKER_FILE).is_file():
            return candidate
    return Path(__file__).resolve().parents[3]


def resolve(path: str | os.PathLike) -> Path:
    """A path from a params file, made absolute against the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def params_dir() -> Path:
    return project_root() / "params"


def runs_dir() -> Path:
    """``runs/<experiment>/<profile>/<run-id>/``; git-ignored; never overwritten."""
    return Path(os.environ.get("SEGLAB_RUNS_DIR") or project_root() / "runs")


def reports_dir() -> Path:
    """Rendered HTML of runs and the status page ``index.html``."""
    return Path(os.environ.get("SEGLAB_REPORTS_DIR") or project_root() / "reports")


def figures_dir() -> Path:
    """The paper's figures, copied from the run that drew them, with provenance."""
    return Path(os.environ.get("SEGLAB_FIGURES_DIR") or project_root() / "figures")


def data_dir() -> Path:
    """Generated data (simulated cohorts, predictions); git-ignored."""
    return project_root() / "data"


def relative(path: str | os.PathLike) -> str:
    """``path`` relative to the project root when it lies inside it (for logs and records), else as given."""
    p, root = Path(path), project_root()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def strip_suffix(path: str | os.PathLike, suffixes) -> str | None:
    """The file name of ``path`` without the longest of ``suffixes`` it ends with (case-insensitive;
    every other dot kept), or None when it ends with none of them.

    >>> strip_suffix("a/scan_1.5x.OME.TIF", (".tif", ".ome.tif")), strip_suffix("notes.txt", (".tif",))
    ('scan_1.5x', None)
    """
    name = Path(path).name
    lower = name.lower()
    for suf in sorted(suffixes, key=len, reverse=True):
        if lower.endswith(suf.lower()):
            return name[: -len(suf)]
    return None
