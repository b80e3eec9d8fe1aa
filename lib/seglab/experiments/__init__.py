"""One module per notebook: ``NN_name`` is described by ``seglab.experiments.eN_name``.

A notebook tells the story and draws the figures; its module holds what the
experiment does, once, for the notebook and for Slurm alike:

- its steps: the functions the notebook calls in order, each returning tables (and
  the data the figures need);
- ``work_items(params)`` where the experiment has heavy, parallel work (fine-tunes,
  inference shards): the items a Slurm prepare array runs before the notebook
  (:mod:`seglab.experiments.items`); ``items_need_upstream(params)`` when listing them
  needs an upstream output, and ``check(params, log)`` when a merge check follows them;
- ``headline(...)``: the summary numbers of the run (``summary.json``), named
  ``<split>_<metric>_<model>`` where that fits.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

from seglab import SeglabError

_NAME_RE = re.compile(r"^(\d\d)_([a-z0-9_]+)$")


def module_name(notebook: str) -> str:
    """``05_downstream`` -> ``seglab.experiments.e5_downstream`` (the notebook's number without
    its leading zero, then its name)."""
    m = _NAME_RE.match(str(notebook))
    if not m:
        raise SeglabError(f"{notebook!r} is not a notebook name like 05_downstream")
    return f"seglab.experiments.e{int(m.group(1))}_{m.group(2)}"


def experiment_module(notebook: str) -> ModuleType:
    """The experiment module of notebook ``notebook`` (an empty stand-in when it has none)."""
    name = module_name(notebook)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return ModuleType(name, f"{notebook} has no experiment module")
