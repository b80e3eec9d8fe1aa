"""``slurm/cluster.yaml``: resources per job, the environment lines, array grids.

- :func:`load_cluster` reads ``slurm/cluster.yaml`` (or ``$SEGLAB_CLUSTER``), validated like
  params files: a typo fails with the file, the key and the allowed keys.
- :class:`Cluster` answers the resources of one job (defaults, then the job's stage, then its
  own entry) and a notebook's array grid in a profile.
- :func:`grid_tasks` and :func:`parse_grid`: array task id -> param overrides.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from seglab import SeglabError
from seglab.core import paths
from seglab.config.params import ParamsError, Schema, Spec, read_yaml, validate

SPECIAL_JOBS = ("predict", "merge", "prepare")
STAGES = ("prepare", "merge")   # per-notebook jobs: "<notebook>:prepare", "05_downstream:merge"

_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


def _spec(key, type_, default, help_="", **kw) -> Spec:
    return Spec(key=key, type=type_, default=default, help=help_, **kw)


_RESOURCE_SPECS = [
    _spec("partition", "str", None, "sbatch --partition", nullable=True),
    _spec("account", "str", None, "sbatch --account", nullable=True),
    _spec("gpus", "int", 1, "GPUs per job (--gres=gpu:N)", min=0, max=64),
    _spec("gpu_type", "str", None, "GPU type in --gres=gpu:TYPE:N", nullable=True),
    _spec("cpus", "int", 4, "--cpus-per-task", min=1, max=1024),
    _spec("mem", "str", "16G", "--mem, e.g. 32G"),
    _spec("time", "str", "04:00:00", "--time, [days-]hours:minutes:seconds"),
    _spec("signal_before_s", "int", 300, "seconds of warning (SIGTERM) before the time limit", min=0),
    _spec("requeue", "bool", True, "--requeue after preemption"),
    _spec("max_parallel", "int", None, "at most N array tasks at once", nullable=True, min=1),
    _spec("extra_sbatch", "list", [], "further sbatch options", items="str"),
]


CLUSTER_SCHEMA = Schema(name="cluster.yaml", source=Path("slurm/cluster.yaml"), specs={
    **{s.key: s for s in _RESOURCE_SPECS},
    "activate": _spec("activate", "str", None, "shell line that activates the environment", nullable=True),
    "setup": _spec("setup", "list", [], "further shell lines run before seglab", items="str"),
    "jobs": _spec("jobs", "mapping", {}, "per-notebook (or predict/merge) resources and arrays"),
})


JOB_SCHEMA = Schema(name="cluster.yaml jobs entry", source=Path("slurm/cluster.yaml"), specs={
    **{s.key: Spec(**{**s.__dict__, "default": None, "nullable": True}) for s in _RESOURCE_SPECS},
    "array": _spec("array", "mapping", None, "{grid: {key: [values]}, profiles: [..]}", nullable=True),
})


@dataclass
class Cluster:
    source: Path
    settings: dict
    jobs: dict = field(default_factory=dict)   # name -> validated entry (None = not set)

    def resources(self, name: str) -> dict:
        """The settings for job ``name``: defaults, then its ``jobs`` entry.

        A notebook's stage (``02_label_efficiency:prepare``) takes the defaults, then the
        entry of the stage (``prepare``), then its own entry.
        """
        out = dict(self.settings)
        layers = [name]
        if ":" in name:
            layers = [name.split(":", 1)[1], name]
        for layer in layers:
            for key, value in (self.jobs.get(layer) or {}).items():
                if value is not None and key != "array":
                    out[key] = value
        return out

    def array_grid(self, name: str, profile: str) -> dict | None:
        entry = (self.jobs.get(name) or {}).get("array")
        if not entry:
            return None
        profiles = entry.get("profiles")
        if profiles is not None and profile not in profiles:
            return None
        return entry["grid"]


def cluster_file(path: str | os.PathLike | None = None) -> Path:
    if path:
        return Path(path)
    env = os.environ.get("SEGLAB_CLUSTER")
    return Path(env) if env else paths.project_root() / "slurm" / "cluster.yaml"


def load_cluster(path: str | os.PathLike | None = None, experiments: list[str] | None = None) -> Cluster:
    """Read and check ``slurm/cluster.yaml`` (or ``$SEGLAB_CLUSTER``, or ``path``).

    A typo fails with the file, the key and the allowed keys; ``jobs`` entries must
    name a notebook of ``params/experiments.yaml`` (or ``predict``/``merge``).
    """
    source = cluster_file(path)
    if not source.is_file():
        raise SeglabError(f"{source}: cluster settings not found; copy slurm/cluster.yaml from the "
                          "compendium or pass --cluster FILE")
    raw = read_yaml(source)
    settings = validate(raw, Schema(CLUSTER_SCHEMA.name, source, CLUSTER_SCHEMA.specs), source)
    _check_formats(settings, source, "")
    if experiments is None:
        from seglab.workflow.chain import load_experiments
        experiments = [e.name for e in load_experiments()]
    jobs = {}
    for name, entry in (settings.pop("jobs") or {}).items():
        allowed = [*experiments, *SPECIAL_JOBS]
        if str(name) not in allowed and not (":" in str(name) and str(name).split(":", 1)[0] in experiments
                                             and str(name).split(":", 1)[1] in STAGES):
            import difflib
            close = difflib.get_close_matches(str(name), allowed, n=1)
            raise ParamsError(f"{source}: jobs: unknown job '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                              + f"; allowed: {', '.join(allowed)} (notebooks of params/experiments.yaml, predict, merge, "
                              "prepare, or NN_name:prepare)")
        entry = validate(entry or {}, Schema(f"jobs.{name}", source, JOB_SCHEMA.specs), f"{source}: jobs.{name}")
        _check_formats(entry, source, f"jobs.{name}.")
        if entry.get("array") is not None:
            if ":" in str(name) or name in SPECIAL_JOBS:
                raise ParamsError(f"{source}: jobs.{name}.array: only a notebook's entry takes an array grid "
                                  "(prepare arrays are made from the notebook's work items)")
            entry["array"] = _check_array(entry["array"], source, name)
        jobs[name] = entry
    return Cluster(source=source, settings=settings, jobs=jobs)


def _check_formats(settings: dict, source: Path, prefix: str) -> None:
    if settings.get("mem") is not None and not _MEM_RE.match(str(settings["mem"])):
        raise ParamsError(f"{source}: key '{prefix}mem': {settings['mem']!r} is not a memory size like 16G or 8000M")
    if settings.get("time") is not None and not _TIME_RE.match(str(settings["time"])):
        raise ParamsError(f"{source}: key '{prefix}time': {settings['time']!r} is not a Slurm time like 04:00:00 or 1-00:00:00")


def _check_array(array: dict, source: Path, name: str) -> dict:
    where = f"{source}: jobs.{name}.array"
    unknown = set(array) - {"grid", "profiles"}
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: grid, profiles")
    grid = array.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ParamsError(f"{where}.grid: needs a mapping of param -> list of values, e.g. {{seed: [0, 1, 2]}}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ParamsError(f"{where}.grid.{key}: needs a non-empty list of values")
    profiles = array.get("profiles")
    if profiles is not None and not (isinstance(profiles, list) and all(isinstance(p, str) for p in profiles)):
        raise ParamsError(f"{where}.profiles: needs a list of profile names, e.g. [full]")
    return {"grid": grid, "profiles": profiles}


def grid_tasks(grid: dict[str, list]) -> list[dict]:
    """Array task id -> overrides: the product of the grid in key order (task 0 = first values).

    >>> grid_tasks({"budget": [10, 20], "repeat": [0, 1]})[1]
    {'budget': 10, 'repeat': 1}
    """
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def parse_grid(items: list[str] | None) -> dict | None:
    """``--array KEY=[v1,v2]`` from the command line (values read as YAML lists)."""
    import yaml
    if not items:
        return None
    grid = {}
    for text in items:
        key, sep, value = text.partition("=")
        try:
            values = yaml.safe_load(value) if sep else None
        except yaml.YAMLError:
            values = None
        if not sep or not isinstance(values, list) or not values:
            raise SeglabError(f"--array {text!r}: expected KEY=[v1, v2, ...], e.g. --array seed=[0,1,2]")
        grid[key.strip()] = values
    return grid
