"""Every notebook of the chain runs end to end in the small smoke profile (params/smoke/), in CI.

The smoke cohort is tiny (10 donors x 5 markers x 1 tile of 128 px) and every model trains for one
epoch, so the numbers mean nothing; what is checked is that each notebook runs under papermill
with the runner, writes its summary and figures, and shows on the status page. The demo profile,
whose numbers the README reports, runs in tests/test_demo_chain.py (make test-slow).
"""

from __future__ import annotations

import math

from chain import dump, run_chain, summary_of


def test_every_notebook_runs_in_the_smoke_profile(repo_root, tmp_path):
    _, manifests, wall = run_chain(repo_root, tmp_path, "smoke", timeout_s=1500)
    print(f"smoke chain: {wall:.0f} s; per notebook (s): { {k: m['duration_s'] for k, m in manifests.items()} }")
    assert all(m["status"] == "done" for m in manifests.values()), dump({k: m["status"] for k, m in manifests.items()})
    for name, m in manifests.items():
        numbers = summary_of(m)
        assert numbers, f"{name}: no summary numbers"
        assert all(isinstance(v, (bool, int, float, str)) or v is None for v in numbers.values()), name
        assert not any(isinstance(v, float) and math.isinf(v) for v in numbers.values()), name
    # the test split was evaluated once per selected configuration
    selected = [r["selected"] for r in manifests["01_baseline_vs_finetune"]["test_evaluations"]]
    assert len(selected) == len(set(selected)) >= 2
    index = (tmp_path / "reports" / "index.html").read_text()
    assert all(name in index for name in manifests)
    assert "MISSING" not in index and "CHANGED" not in index
