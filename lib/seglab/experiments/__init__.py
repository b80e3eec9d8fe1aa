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
  ``<split>_<metric>_<model>`` where that fits;
- ``preflight(params, cohort)`` where a value that passes the schema can still not be used:
  with other keys (E2's ``rescore_per_image`` with non-default mask settings, E3's gate
  quantiles) or with the cohort (E2's budgets against its annotated training tiles, E6's
  markers). ``cohort()`` gives the cohort's manifest, or None when it is not built yet (or
  must not be read: ``run-all`` checks every notebook's params up front, before 00 rebuilds
  the cohort); checks that need it are then skipped. It raises :class:`ParamConflict`, which
  :func:`preflight` turns into one line naming the file that holds the key.

:func:`preflight` runs that hook, after the checks every notebook gets (the
:class:`~seglab.config.settings.TrainSettings` / ``MaskSettings`` a notebook builds from its
params), for ``seglab run`` and ``run-all`` right before a notebook starts and for
``seglab check-params``.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Callable, Sequence

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


# --------------------------------------------------------------------------- preflight checks


class ParamConflict(SeglabError):
    """A value the schema accepts but the experiment cannot use (with other keys or the cohort).

    key : the param to change; ``also`` : the other params of the conflict.
    problem : what is wrong, with the value (``"[1, 6]: budget 6 is larger than ..."``).
    fix : what to do (``"give budgets of at most 5"``).
    :func:`preflight` names the file holding each key; the message alone names none.
    """

    def __init__(self, key: str, problem: str, fix: str, also: Sequence[str] = ()):
        super().__init__(f"key '{key}': {problem}; {fix}")
        self.key, self.problem, self.fix, self.also = key, problem, fix, tuple(also)

    def render(self, where: Callable[[str], str]) -> str:
        """One line: the file of ``key`` (``where(key)``), the key, the problem, the other keys' files, the fix."""
        others = "".join(f" (with '{k}' from {where(k)})" for k in self.also)
        return f"{where(self.key)}: key '{self.key}': {self.problem}{others}; {self.fix}"


def built_cohort(params: dict):
    """The manifest of ``params['cohort_dir']`` (:func:`seglab.data.manifest.cohort_manifest`), or
    None when the notebook has no cohort_dir or 00_data has not built it yet (no ``tiles/``)."""
    from seglab.core import paths
    from seglab.data import manifest as data

    if not params.get("cohort_dir"):
        return None
    cohort = paths.resolve(params["cohort_dir"])
    return data.cohort_manifest(cohort) if (cohort / "tiles").is_dir() else None


def check_settings(params: dict) -> None:
    """The settings a notebook builds from its params (``run.training``, ``run.mask``) refuse some
    values the schemas allow (learning_rate 0, bsize not a multiple of 8, ...): build them now,
    one key at a time so that the error names the key."""
    from seglab.config.settings import MaskSettings, TrainSettings

    for cls in (TrainSettings, MaskSettings):
        for key in (k for k in cls.keys() if k in params):
            try:
                cls.from_params({key: params[key]})
            except SeglabError as exc:
                raise ParamConflict(key, f"{params[key]!r} cannot be used ({exc})", "change it there") from None


def preflight(notebook: str, params: dict, where: Callable[[str], str], read_cohort: bool = True) -> str | None:
    """Check ``params`` of ``notebook`` before it runs: :func:`check_settings`, then the experiment
    module's ``preflight(params, cohort)`` hook (see the module docstring).

    ``where(key)`` names the file holding a key (:meth:`seglab.config.params.Resolved.where`);
    ``read_cohort`` False: the hook's checks that need the cohort are skipped.
    Returns a note when such checks were skipped (the cohort is not built), else None.
    Raises :class:`~seglab.config.params.ParamsError` naming the file, the key and the fix.
    """
    from seglab.config.params import ParamsError

    hook = getattr(experiment_module(notebook), "preflight", None)
    read: dict = {}

    def cohort():
        if "manifest" not in read:
            read["manifest"] = built_cohort(params) if read_cohort else None
        return read["manifest"]

    try:
        check_settings(params)
        if hook is not None:
            hook(params, cohort)
    except ParamConflict as exc:
        raise ParamsError(exc.render(where)) from None
    if read_cohort and "manifest" in read and read["manifest"] is None:
        return f"data checks skipped: cohort not built yet: {params.get('cohort_dir')}, which 00_data builds"
    return None
