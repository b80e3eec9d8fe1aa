"""Running the notebook chain of a profile end to end through the real runner, into a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from seglab.workflow.chain import load_experiments
from seglab.workflow.runs import read_manifest


def run_chain(repo_root: Path, out: Path, profile: str, timeout_s: float = 3600) -> tuple[dict, dict, float]:
    """``seglab run-all --profile PROFILE`` with runs, reports and figures under ``out`` (the data/
    caches are the project's, content-addressed). Returns (environment used, {notebook: latest
    manifest}, wall seconds); fails with the tail of the output when the chain fails."""
    env = {**os.environ, "SEGLAB_RUNS_DIR": str(out / "runs"), "SEGLAB_REPORTS_DIR": str(out / "reports"),
           "SEGLAB_FIGURES_DIR": str(out / "figures"), "SEGLAB_ROOT": str(repo_root)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "seglab", "run-all", "--profile", profile], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifests = {}
    for e in load_experiments(repo_root):
        folders = sorted((out / "runs" / e.name / profile).iterdir())
        manifests[e.name] = read_manifest(folders[-1])
    return env, manifests, wall


def summary_of(manifest: dict) -> dict:
    return manifest.get("summary") or {}


def dump(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
