"""Per-notebook overhead of the runner (papermill + manifest + HTML render), against a bare interpreter.

Builds the probe project of tests/probe_project.py in a temporary folder and
times, in this one run and this venv:
  reference: `python -c pass`
  `seglab run --no-report` (papermill, kernel start, manifest, hashes)
  `seglab run` (the same plus nbconvert HTML, index page, figure publishing)
Prints medians and ratios; the last line is the headline figure.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from probe_project import make_probe_project  # noqa: E402

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def timed(cmd, env, cwd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_probe_project(Path(tmp) / "project")
        env = {**os.environ, "SEGLAB_ROOT": str(root)}
        bare = [timed([sys.executable, "-c", "pass"], env, root) for _ in range(REPEATS)]
        no_report = [timed([sys.executable, "-m", "seglab", "run", "10", "--profile", "test", "--no-report"], env, root)
                     for _ in range(REPEATS)]
        full = [timed([sys.executable, "-m", "seglab", "run", "10", "--profile", "test"], env, root)
                for _ in range(REPEATS)]
    b, n, f = (statistics.median(x) for x in (bare, no_report, full))
    print(f"reference: python -c pass          median {b * 1000:8.1f} ms over {REPEATS}")
    print(f"seglab run --no-report (papermill) median {n * 1000:8.1f} ms  = {n / b:6.1f} x bare")
    print(f"seglab run (papermill + HTML)      median {f * 1000:8.1f} ms  = {f / b:6.1f} x bare")
    print(f"render + index share of a run: {(f - n) / f:.0%}")
    print(f"runner overhead per notebook: {f:.2f} s")
    print(f"RESULT runner_overhead_vs_bare_python {f / b:.1f} x")


if __name__ == "__main__":
    main()
