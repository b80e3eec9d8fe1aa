"""Shared fixtures. Tests never touch the network; data from ../shared is read in place."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def dsb_dir() -> Path:
    """The real DSB2018 nuclei beside the checkout; the test skips cleanly when absent."""
    from seglab.data.dsb import find_dsb2018

    found = find_dsb2018()
    if found is None:
        pytest.skip("DSB2018 data (../shared/data/dsb2018_fluo) is not here; set SEGLAB_DSB2018_DIR")
    return found


@pytest.fixture()
def probe_root(tmp_path, monkeypatch) -> Path:
    """A temporary compendium (tests/probe_project.py) set as the project root for this test."""
    from probe_project import make_probe_project
    from seglab.core import paths

    root = make_probe_project(tmp_path / "project")
    monkeypatch.setenv("SEGLAB_ROOT", str(root))
    monkeypatch.delenv("SEGLAB_RUNS_DIR", raising=False)
    monkeypatch.delenv("SEGLAB_REPORTS_DIR", raising=False)
    paths.set_root(None)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny nets on a shared 2-core machine run several times
    faster single-threaded than oversubscribed (measured ~9x while other processes were busy)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A tiny simulated cohort (3 donors x 5 markers x 1 tile of 96 px), one per test module."""
    from seglab.data import simulate

    return simulate.simulate_cohort(tmp_path_factory.mktemp("cohort") / "c", n_donors=3, tiles_per_marker=1,
                                    size_px=96, seed=0)
