"""The conda environment carries exactly the pins of pyproject.toml."""

from __future__ import annotations

import re
import tomllib

import yaml

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)$")


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        m = PIN.match(line.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_environment_yml_pins_equal_pyproject(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    unpinned = [d for d in declared if not PIN.match(d)]
    assert not unpinned, f"pyproject.toml: dependencies must be pinned with ==: {unpinned}"
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _pins(pip_section) == _pins(declared)


def test_torch_and_torchvision_pinned_together(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    pins = _pins(project["dependencies"])
    assert (pins["torch"], pins["torchvision"]) == ("2.14.1", "0.29.1")
