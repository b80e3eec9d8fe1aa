"""Shared fixtures. Tests never touch the network; data from ../shared is read in place."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

SMOKE_CHAIN_TEST = "test_smoke_chain.py::test_every_notebook_runs_in_the_smoke_profile"
SMOKE_CHAIN = pytest.StashKey()


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected what they deselect
def pytest_collection_modifyitems(session, config, items):
    """Start the smoke chain now, beside the rest of the suite, when its test is selected; its test
    goes last and collects it. The chain is minutes of one-thread CPU work (Cellpose-SAM's E1),
    most other tests wait on subprocesses, Slurm or the disk: on the 2-core CI machine the two
    overlap instead of adding up."""
    smoke = [item for item in items if item.nodeid.endswith(SMOKE_CHAIN_TEST)]
    if not smoke or config.option.collectonly:
        return
    items.remove(smoke[0])
    items.append(smoke[0])
    from chain import BackgroundChain

    out = Path(tempfile.mkdtemp(prefix="seglab-smoke-chain-"))
    config.stash[SMOKE_CHAIN] = BackgroundChain(REPO, out, "smoke", cpsam=True).start()
    yield_the_core_to_the_chain()


def yield_the_core_to_the_chain() -> None:
    """The rest of the suite (this process, its threads and every command a test starts) runs at
    a lower CPU priority than the chain, and torch runs one thread here. The chain's critical
    path is Cellpose-SAM's one-thread E1: on a 2-core machine any test running two threads, or two
    tests' processes at once, took half of its core (E1 276 s alone, 508 s beside the suite of
    stop 13, whose 3D, slide and active-learning tests run torch in this process with its default
    two threads, which OMP_NUM_THREADS set per test does not reach once torch is imported). At nice
    10 the suite gets what the chain leaves, and both cores while the chain waits on its kernels."""
    os.setpriority(os.PRIO_PROCESS, 0, 10)  # Linux: this thread; threads and children made later inherit it
    import torch

    torch.set_num_threads(1)


def pytest_unconfigure(config):
    chain = config.stash.get(SMOKE_CHAIN, None)
    if chain is not None:
        chain.stop()
        if getattr(chain, "passed", False):
            chain.remove()  # 1.2 GB of cpsam weights; kept for a look when the test failed


@pytest.fixture(scope="session")
def smoke_chain(request):
    """The smoke chain started at collection (see :func:`pytest_collection_modifyitems`)."""
    chain = request.config.stash.get(SMOKE_CHAIN, None)
    if chain is None:
        pytest.fail("the smoke chain was not started at collection (tests/conftest.py)")
    return chain


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


@pytest.fixture(autouse=True)
def one_thread_subprocesses(request, monkeypatch):
    """Every fast test and the commands it starts use one CPU thread: the smoke chain runs beside the
    suite on one core (Cellpose-SAM's E1, minutes), and a test's subprocess with torch's default of
    two threads on a 2-core machine oversubscribes it (the chain's E1 went from 276 s to 512 s when
    the 3D and slide tests' commands ran beside it). The slow demo chain keeps its own settings."""
    if request.node.get_closest_marker("slow") is None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.setenv(name, "1")
    yield


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
