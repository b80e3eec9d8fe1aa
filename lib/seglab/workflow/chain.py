"""The notebook chain, read from ``params/experiments.yaml`` (the one place it is declared)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from seglab import SeglabError
from seglab.core import paths
from seglab.config.params import read_yaml

NAME_RE = re.compile(r"^(\d\d)_[a-z0-9_]+$")


@dataclass(frozen=True)
class Experiment:
    name: str          # "00_data"
    title: str
    needs: tuple[str, ...]
    notebook: Path     # notebooks/00_data.ipynb

    @property
    def number(self) -> str:
        return self.name[:2]


def load_experiments(root: Path | None = None) -> list[Experiment]:
    """Every experiment, in declared order; checks names, files and that ``needs`` point backwards."""
    root = root or paths.project_root()
    source = root / "params" / "experiments.yaml"
    raw = read_yaml(source).get("experiments") or {}
    out: list[Experiment] = []
    for name, spec in raw.items():
        if not NAME_RE.match(str(name)):
            raise SeglabError(f"{source}: experiment name {name!r} must look like NN_name (e.g. 00_data)")
        spec = spec or {}
        unknown = set(spec) - {"title", "needs"}
        if unknown:
            raise SeglabError(f"{source}: experiment {name}: unknown field(s) {sorted(unknown)}; allowed: needs, title")
        needs = tuple(spec.get("needs") or ())
        earlier = {e.name for e in out}
        for need in needs:
            if need not in earlier:
                raise SeglabError(f"{source}: {name} needs {need!r}, which is not declared before it")
        out.append(Experiment(name=name, title=str(spec.get("title", name)), needs=needs,
                              notebook=root / "notebooks" / f"{name}.ipynb"))
    return out


def find_experiment(ref: str, root: Path | None = None) -> Experiment:
    """An experiment by number (``0``, ``00``), full name (``00_data``) or name part (``data``)."""
    experiments = load_experiments(root)
    ref = str(ref)
    for e in experiments:
        if ref in (e.name, e.name[3:]) or (ref.isdigit() and int(ref) == int(e.number)):
            return e
    known = ", ".join(e.name for e in experiments)
    raise SeglabError(f"no experiment {ref!r}; known: {known} (declared in params/experiments.yaml)")


def with_upstream(targets: list[Experiment], root: Path | None = None) -> list[Experiment]:
    """``targets`` plus everything they need, transitively, in declared order."""
    experiments = load_experiments(root)
    by_name = {e.name: e for e in experiments}
    wanted: set[str] = set()
    stack = [t.name for t in targets]
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(by_name[name].needs)
    return [e for e in experiments if e.name in wanted]
