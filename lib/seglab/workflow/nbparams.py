"""Keep each notebook's ``parameters`` cell equal to its demo profile.

JupyterLab runs a notebook with the values in its ``parameters`` cell, and
papermill replaces that cell with the profile's; the two must agree, or
interactive exploration and the demo run differ silently
(tests/test_notebooks.py checks it). When ``params/demo/*.yaml`` change,
``seglab sync-parameters`` rewrites the assignments of the cell from the
resolved demo params (JSON-like literals: None, True, lists, strings), keeps
every other line (comments, ``run_dir``, ``profile``) and adds missing keys.
The notebook is written atomically and stays without outputs.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from seglab import SeglabError
from seglab.core import io
from seglab.core import paths
from seglab.workflow.chain import load_experiments
from seglab.config.params import load_params

ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=")


def _literal(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def parameters_cell(nb: dict, source: Path) -> dict:
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise SeglabError(f"{source}: needs exactly one cell tagged 'parameters', found {len(cells)}")
    return cells[0]


def cell_values(cell: dict) -> dict:
    """The literal assignments of a parameters cell."""
    values = {}
    for node in ast.parse("".join(cell["source"])).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def sync_notebook(name: str, profile: str = "demo", check: bool = False) -> list[str]:
    """Rewrite notebook ``name``'s parameters cell from ``profile``; returns the keys that changed.

    With ``check`` nothing is written.
    """
    root = paths.project_root()
    path = root / "notebooks" / f"{name}.ipynb"
    nb = json.loads(path.read_text())
    cell = parameters_cell(nb, path)
    params, _ = load_params(name, profile, root=root)
    lines = "".join(cell["source"]).splitlines()
    seen, changed, out = set(), [], []
    for line in lines:
        m = ASSIGN.match(line)
        key = m.group(1) if m else None
        if key in params:
            seen.add(key)
            new = f"{key} = {_literal(params[key])}"
            if ast.literal_eval(line.split("=", 1)[1].split("#")[0].strip() or "None") != params[key]:
                changed.append(key)
                line = new
        out.append(line)
    missing = [k for k in params if k not in seen]
    if missing:
        insert_at = next((i for i, l in enumerate(out) if l.startswith("run_dir")), len(out))
        out[insert_at:insert_at] = [f"{k} = {_literal(params[k])}" for k in missing]
        changed += missing
    if changed and not check:
        cell["source"] = [l + "\n" for l in out[:-1]] + [out[-1]] if out else []
        io.write_text(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed


def sync_all(profile: str = "demo", check: bool = False) -> dict[str, list[str]]:
    return {e.name: sync_notebook(e.name, profile, check) for e in load_experiments()}
