"""Every notebook of the chain runs end to end in the small smoke profile (params/smoke/), in CI.

The smoke cohort is tiny (10 donors x 5 markers x 1 tile of 128 px; 2 annotated validation and 2
test tiles) and every model trains for one epoch, so the numbers mean nothing; what is checked is
that each notebook runs under papermill with the runner, writes its summary and figures, and shows
on the status page. E1 runs the study's own model, Cellpose-SAM's architecture (random weights
written as the file ``cpsam`` of a temporary ``CELLPOSE_LOCAL_MODELS_PATH``), through the same
load, fine-tune and segmentation code as the full profile. The demo profile, whose numbers the
README reports, runs in tests/test_demo_chain.py (make test-slow). The chain runs in a subprocess
started when the suite is collected, beside the other tests (tests/conftest.py); this test, run
last, collects and checks it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from seglab.segment import models

from chain import dump, latest_run_dir, summary_of


def test_every_notebook_runs_in_the_smoke_profile(smoke_chain, capsys):
    # started by tests/conftest.py when the suite was collected; it ran beside the other tests
    result, manifests = smoke_chain.wait(timeout_s=1800)
    weights, out = smoke_chain.weights, smoke_chain.out
    with capsys.disabled():  # the CI log keeps the chain's timings
        print(f"\nsmoke chain: {result['wall_s']:.0f} s; per notebook (s): "
              f"{ {k: m['duration_s'] for k, m in manifests.items()} }; peak RSS of one process: {result['peak_rss_gb']} GB")
    assert all(m["status"] == "done" for m in manifests.values()), dump({k: m["status"] for k, m in manifests.items()})
    for name, m in manifests.items():
        numbers = summary_of(m)
        assert numbers, f"{name}: no summary numbers"
        assert all(isinstance(v, (bool, int, float, str)) or v is None for v in numbers.values()), name
        assert not any(isinstance(v, float) and math.isinf(v) for v in numbers.values()), name
    # E1 fine-tuned Cellpose-SAM's architecture: the baseline is the cpsam file, each checkpoint says so
    e1_models = json.loads((latest_run_dir(out, "01_baseline_vs_finetune", "smoke") / "models.json").read_text())
    assert e1_models["baseline"] == "cpsam"
    for name in ("finetuned_generic", "finetuned_marker_specific", "finetuned_marker_only"):
        checkpoint = Path(e1_models[name]["path"])
        assert models.read_sidecar(checkpoint)["arch"] == "cpsam", name
        assert models.read_sidecar(checkpoint)["base_sha256"] == models.model_id(weights), name
    # the test split was evaluated once per selected configuration
    selected = [r["selected"] for r in manifests["01_baseline_vs_finetune"]["test_evaluations"]]
    assert len(selected) == len(set(selected)) >= 2
    index = (out / "reports" / "index.html").read_text()
    assert all(name in index for name in manifests)
    assert "MISSING" not in index and "CHANGED" not in index
    smoke_chain.passed = True
