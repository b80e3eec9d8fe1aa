"""Running the notebook chain of a profile end to end through the real runner, into a temporary folder.

:func:`run_chain` runs it in the foreground (the demo chain, ``make test-slow``).
:class:`BackgroundChain` starts it in a subprocess and collects it later: the smoke chain runs
beside the rest of the test suite (tests/conftest.py starts it when the suite is collected),
because it is minutes of one-thread CPU work while most other tests wait on subprocesses, Slurm
or the disk. Run as a script, this module is that subprocess's driver.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from seglab.workflow.chain import load_experiments
from seglab.workflow.runs import read_manifest


def chain_env(repo_root: Path, out: Path, extra_env: dict | None = None) -> dict:
    """This environment with runs, reports and figures under ``out`` and ``extra_env`` on top."""
    return {**os.environ, "SEGLAB_RUNS_DIR": str(out / "runs"), "SEGLAB_REPORTS_DIR": str(out / "reports"),
            "SEGLAB_FIGURES_DIR": str(out / "figures"), "SEGLAB_ROOT": str(repo_root), **(extra_env or {})}


def latest_manifests(repo_root: Path, out: Path, profile: str) -> dict:
    """{notebook: manifest of its newest run under ``out``} for every notebook of the chain."""
    return {e.name: read_manifest(latest_run_dir(out, e.name, profile)) for e in load_experiments(repo_root)}


def run_chain(repo_root: Path, out: Path, profile: str, timeout_s: float = 3600,
              extra_env: dict | None = None) -> tuple[dict, dict, float]:
    """``seglab run-all --profile PROFILE`` with runs, reports and figures under ``out`` (the data/
    caches are the project's, content-addressed), and ``extra_env`` on top of this environment.
    Returns (environment used, {notebook: latest manifest}, wall seconds); fails with the tail of
    the output when the chain fails."""
    env = chain_env(repo_root, out, extra_env)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "seglab", "run-all", "--profile", profile], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return env, latest_manifests(repo_root, out, profile), wall


class BackgroundChain:
    """``seglab run-all --profile PROFILE`` into ``out``, in a driver subprocess (this module run as
    a script) started by :meth:`start` and collected by :meth:`wait`. With ``cpsam``, the driver
    first writes Cellpose-SAM's network with random weights as ``out/cellpose_models/cpsam``
    (:func:`write_random_cpsam`) and points ``CELLPOSE_LOCAL_MODELS_PATH`` there. The driver
    records the chain's exit code, wall time, output tails and the peak RSS of its largest process
    in ``out/chain.json``."""

    def __init__(self, repo_root: Path, out: Path, profile: str, *, cpsam: bool = False):
        self.repo_root, self.out, self.profile, self.cpsam = Path(repo_root), Path(out), profile, cpsam
        self.proc: subprocess.Popen | None = None

    @property
    def weights(self) -> Path:
        return self.out / "cellpose_models" / "cpsam"

    def start(self) -> "BackgroundChain":
        self.out.mkdir(parents=True, exist_ok=True)
        log = open(self.out / "driver.log", "wb")  # noqa: SIM115 - the child writes it while we go on
        args = [sys.executable, __file__, str(self.repo_root), str(self.out), self.profile] + (["--cpsam"] if self.cpsam else [])
        self.proc = subprocess.Popen(args, cwd=self.repo_root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def wait(self, timeout_s: float) -> tuple[dict, dict]:
        """(the driver's chain.json, {notebook: newest manifest}); fails with the output tails."""
        rc = self.proc.wait(timeout=timeout_s)
        tail = (self.out / "driver.log").read_text(errors="replace")[-3000:]
        assert rc == 0 and (self.out / "chain.json").is_file(), f"chain driver exit {rc}:\n{tail}"
        result = json.loads((self.out / "chain.json").read_text())
        assert result["returncode"] == 0, result["stdout_tail"] + result["stderr_tail"]
        return result, latest_manifests(self.repo_root, self.out, self.profile)

    def stop(self) -> None:
        """Kill the driver and the chain under it when the session ends before :meth:`wait`."""
        if self.proc is not None and self.proc.poll() is None:
            import signal

            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def remove(self) -> None:
        shutil.rmtree(self.out, ignore_errors=True)


def _drive(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="run a profile's chain and record how it went (BackgroundChain)")
    ap.add_argument("repo_root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("profile")
    ap.add_argument("--cpsam", action="store_true")
    args = ap.parse_args(argv)
    extra = {}
    if args.cpsam:
        extra["CELLPOSE_LOCAL_MODELS_PATH"] = str(write_random_cpsam(args.out / "cellpose_models").parent)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "seglab", "run-all", "--profile", args.profile], cwd=args.repo_root,
                          env=chain_env(args.repo_root, args.out, extra), capture_output=True, text=True)
    result = {"returncode": proc.returncode, "wall_s": round(time.monotonic() - t0, 1),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, 2),
              "stdout_tail": proc.stdout[-3000:], "stderr_tail": proc.stderr[-3000:]}
    (args.out / "chain.json").write_text(json.dumps(result, indent=1))


def latest_run_dir(out: Path, notebook: str, profile: str) -> Path:
    """The newest run folder of ``notebook`` in ``profile`` under ``out/runs`` (folder names sort by time)."""
    return sorted((out / "runs" / notebook / profile).iterdir())[-1]


def write_random_cpsam(folder: Path, seed: int = 0) -> Path:
    """Cellpose-SAM's network (``cellpose.vit.CPSAM``, 305 M parameters, float32) with seeded random
    weights, saved as ``folder/cpsam`` the way cellpose keeps its downloaded weights (a bare state
    dict), for ``CELLPOSE_LOCAL_MODELS_PATH=folder``. Equal seeds give equal bytes (saved through a
    buffer: ``torch.save`` to a path writes the file's name into the zip), hence equal model ids and
    fine-tune cache keys from one test run to the next."""
    import io

    import torch
    from cellpose.vit import CPSAM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CPSAM(dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpsam").write_bytes(buffer.getvalue())
    return folder / "cpsam"


def summary_of(manifest: dict) -> dict:
    return manifest.get("summary") or {}


def dump(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


if __name__ == "__main__":
    _drive(sys.argv[1:])
