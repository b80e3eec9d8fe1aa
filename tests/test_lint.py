"""ruff finds no mistakes in the library, the tests, the benchmarks and the notebooks' paired scripts.

The rules are pyproject.toml's [tool.ruff.lint] (syntax errors, undefined and unused
names, redefinitions); `make lint` runs the same check, `ruff check --fix ...` fixes
most of what it reports.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest


def _pinned_ruff(repo_root) -> str:
    test_extras = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    return next(d.split("==")[1] for d in test_extras if d.startswith("ruff=="))


def lint_targets(repo_root) -> list[str]:
    """What `make lint` checks: lib, tests, bench and notebooks/*.py (the jupytext pairs)."""
    scripts = sorted(p.relative_to(repo_root).as_posix() for p in (repo_root / "notebooks").glob("*.py"))
    return ["lib", "tests", "bench", *scripts]


def test_ruff_finds_nothing(repo_root):
    probe = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail("ruff is not installed in this environment: pip install -e '.[test]' "
                    f"(it is a pinned test dependency)\n{probe.stderr}")
    version = re.search(r"\d+\.\d+\.\d+", probe.stdout).group(0)
    assert version == _pinned_ruff(repo_root), (
        f"ruff {version} is installed but pyproject.toml pins {_pinned_ruff(repo_root)}: "
        "pip install -e '.[test]' (rules differ between versions)")
    targets = lint_targets(repo_root)
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           *targets], cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"ruff check {' '.join(targets)} (rules: pyproject.toml [tool.ruff.lint]) found problems; "
        f"fix them (many with `ruff check --fix`):\n{done.stdout}{done.stderr}")
