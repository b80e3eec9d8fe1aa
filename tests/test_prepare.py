"""seglab.workflow.prepare and `seglab prepare`: a notebook's heavy work as items (fine-tunes, inference shards).

Without Slurm: the item lists against the library calls the notebooks make, the command line
(--list, --task, $SLURM_ARRAY_TASK_ID, bad indices), idempotence, and E5's shards with the
merge check. The Slurm arrays themselves are tested in test_slurm.py (real sbatch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seglab.config.settings import MaskSettings, TrainSettings
from seglab import SeglabError
from seglab.core import paths
from seglab.workflow import prepare
from seglab.config.params import load_params
from seglab.segment import finetuning
from seglab.segment import cohort_prediction
from seglab.experiments import e2_label_efficiency
from seglab.experiments import e1_baseline_vs_finetune

pytestmark = pytest.mark.usefixtures("one_thread")

SEGLAB = [sys.executable, "-m", "seglab"]


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """3 donors x 5 markers x 1 tile of 64 px: a fine-tune of tiny-xs takes a few seconds."""
    from seglab.data import simulate

    return simulate.simulate_cohort(tmp_path_factory.mktemp("cohort") / "c", n_donors=3, tiles_per_marker=1,
                                    size_px=64, seed=0)


@pytest.fixture()
def project(tmp_path, small_cohort, monkeypatch):
    from prepare_project import make_prepare_project

    root = make_prepare_project(tmp_path / "project", small_cohort)
    monkeypatch.setenv("SEGLAB_ROOT", str(root))
    paths.set_root(None)
    yield root
    paths.set_root(None)


def params_of(name: str, **overrides) -> dict:
    return load_params(name, "tiny", overrides or None)[0]


def cli(root: Path, *args, env: dict | None = None):
    full = {**os.environ, "SEGLAB_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    full.pop("SLURM_ARRAY_TASK_ID", None)
    full.update(env or {})
    return subprocess.run([*SEGLAB, *args], cwd=root, env=full, capture_output=True, text=True, timeout=300)


def test_items_are_the_notebooks_own_fine_tunes_and_shards_in_a_fixed_order(project, small_cohort):
    p2 = params_of("02_label_efficiency", budgets=[2, 1, 2], repeats=2)
    items = prepare.work_items("02_label_efficiency", p2)
    assert [it.label for it in items] == ["budget=1 repeat=0", "budget=1 repeat=1", "budget=2 repeat=0",
                                         "budget=2 repeat=1", "reference=finetuned_generic"]
    assert [it.index for it in items] == [0, 1, 2, 3, 4]
    tp = TrainSettings.from_params(p2)
    assert [it.args for it in items[:4]] == e2_label_efficiency.label_budget_jobs("tiny-xs", str(small_cohort), [1, 2], 2,
                                                                         training=tp)
    # the same generic model in 01, 02 and 06: one key, so one array trains it
    e1 = prepare.work_items("01_baseline_vs_finetune", params_of("01_baseline_vs_finetune"))
    assert [it.label for it in e1] == [f"model={m}" for m in e1_baseline_vs_finetune.E1_VARIANTS]
    assert [it.args for it in e1] == list(e1_baseline_vs_finetune.e1_finetune_jobs("tiny-xs", str(small_cohort), training=tp,
                                                                 markers=["gfap"]).values())
    e6 = prepare.work_items("06_leave_one_marker_out", params_of("06_leave_one_marker_out", lomo_markers=[]))
    assert [it.label for it in e6] == ["held_out=gfap", "held_out=iba1", "held_out=neun", "held_out=olig2",
                                       "held_out=pecam", "reference=finetuned_generic"]
    assert e1[0].key == items[-1].key == e6[-1].key and len({it.key for it in items}) == 5
    e5 = prepare.work_items("05_downstream", params_of("05_downstream"))
    assert [it.label for it in e5] == ["model=baseline shard=0/2", "model=baseline shard=1/2",
                                       "model=finetuned shard=0/2", "model=finetuned shard=1/2"]
    assert [it.label for it in prepare.work_items("05_downstream", params_of("05_downstream", n_shards=4, shards=[3, 1]))] \
        == ["model=baseline shard=1/4", "model=baseline shard=3/4", "model=finetuned shard=1/4", "model=finetuned shard=3/4"]
    assert prepare.work_items("03_gating", {}) == [] and not prepare.has_items("00_data")
    assert not any(it.done() for it in items + e5)    # nothing cached yet (and no error from done())
    with pytest.raises(SeglabError, match=r"budgets \[99\] are outside 1\.\.5"):
        prepare.work_items("02_label_efficiency", params_of("02_label_efficiency", budgets=[1, 99]))


def test_cli_lists_runs_one_item_skips_it_when_done_and_refuses_bad_indices(project):
    listed = cli(project, "prepare", "02", "--profile", "tiny", "--list")
    assert listed.returncode == 0, listed.stderr
    assert "3 prepare items, 0 done, 3 to do" in listed.stdout and "   1  todo  budget=2 repeat=0" in listed.stdout
    ran = cli(project, "prepare", "02", "--profile", "tiny", "--task", "1")
    assert ran.returncode == 0, ran.stderr
    assert "item 1 (budget=2 repeat=0): running" in ran.stdout and "done in" in ran.stdout
    folder = finetuning.model_dir(**{k: v for k, v in prepare.work_items("02_label_efficiency", params_of(
        "02_label_efficiency"))[1].args.items() if k != "validate"})   # validate: not part of the cache key
    assert finetuning.finished_model(folder) is not None          # in the cache the notebook reads
    listed = cli(project, "prepare", "02", "--profile", "tiny", "--list").stdout
    assert "1 done, 2 to do" in listed and "   1  done  budget=2 repeat=0" in listed
    again = cli(project, "prepare", "02", "--profile", "tiny", env={"SLURM_ARRAY_TASK_ID": "1"})  # as an array task
    assert again.returncode == 0 and "already done (in the cache), skipped" in again.stdout
    bad = cli(project, "prepare", "02", "--profile", "tiny", "--task", "7")
    assert bad.returncode == 1 and "--task 7: 02_label_efficiency has 3 prepare items (0..2)" in bad.stderr
    assert "Traceback" not in bad.stderr and "--list" in bad.stderr
    moved = cli(project, "prepare", "02", "--profile", "tiny", "--task", "0", "--expect-label", "budget=9 repeat=0")
    assert moved.returncode == 1 and "now 'budget=1 repeat=0'" in moved.stderr and "submit again" in moved.stderr
    none = cli(project, "prepare", "02", "--profile", "tiny")
    assert none.returncode == 1 and "give --list, --task I, --all or --check" in none.stderr
    with pytest.raises(SeglabError, match="has no prepare items"):
        prepare.run_item("03_gating", {}, 0)


def test_e5_shards_fill_the_notebooks_prediction_folders_and_the_merge_check_catches_lost_and_doubled_tiles(project):
    from seglab.segment import predict

    p5 = params_of("05_downstream")
    items = prepare.work_items("05_downstream", p5)
    with pytest.raises(SeglabError, match="fine-tuned generic model .* not in data/models yet.*05 needs 01"):
        prepare.run_item("05_downstream", p5, 2, log=lambda *_: None)
    prepare.run_item("01_baseline_vs_finetune", params_of("01_baseline_vs_finetune"), 0, log=lambda *_: None)
    for it in items:
        assert prepare.run_item("05_downstream", p5, it.index, log=lambda *_: None)["status"] == "done"
    assert all(it.done() for it in prepare.work_items("05_downstream", p5))
    checked = prepare.check("05_downstream", p5, log=lambda *_: None)
    assert set(checked) == {"baseline", "finetuned"} and all(c["ok"] for c in checked.values())
    # the notebook's own call (every shard, in one process) finds every tile done and segments none
    tiles_dir = paths.resolve(p5["cohort_dir"]) / "tiles"
    generic = finetuning.cached_model(**prepare.work_items("01_baseline_vs_finetune",
                                                            params_of("01_baseline_vs_finetune"))[0].args)
    for spec in ("tiny-xs", str(generic)):
        pred = cohort_prediction.predict_cohort(spec, tiles_dir, MaskSettings.from_params(p5), root=p5["predictions_dir"],
                                 n_shards=2, shards=None, log=lambda *_: None)
        assert pred.n_predicted == 0 and pred.n_tiles == 15
    folder = Path(checked["baseline"]["folder"])
    tiles = predict.list_tiles(tiles_dir)
    (folder / f"{tiles[1]}.tif").unlink()                  # a lost mask (shard 1 of 2)
    assert not items[1].done() and items[0].done()
    with pytest.raises(SeglabError, match=rf"baseline: .*1 masks unreadable \[.{tiles[1]}.\]"):
        prepare.check("05_downstream", p5, log=lambda *_: None)
    assert prepare.run_item("05_downstream", p5, 1, log=lambda *_: None)["status"] == "done"   # resumes: one tile
    table = folder / predict.table_name((0, 2))
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines + [lines[1]]) + "\n")   # a tile listed twice
    with pytest.raises(SeglabError, match=rf"1 in two shards \['{lines[1].split(chr(9))[0]}'\]"):
        prepare.check("05_downstream", p5, log=lambda *_: None)
    partial = params_of("05_downstream", shards=[1])
    assert prepare.check("05_downstream", partial, log=lambda *_: None)["baseline"]["ok"]   # shard 1 alone is fine
    with pytest.raises(SeglabError, match="has no merge check"):
        prepare.check("02_label_efficiency", params_of("02_label_efficiency"))


def test_submit_all_dry_run_plans_prepare_arrays_before_their_notebooks(project):
    (project / "slurm").mkdir()
    (project / "slurm" / "cluster.yaml").write_text(
        "gpus: 0\ncpus: 1\nmem: 1G\ntime: '00:10:00'\njobs:\n  prepare: {max_parallel: 2, gpus: 1}\n"
        "  02_label_efficiency:prepare: {cpus: 3}\n")
    e6 = project / "params" / "tiny" / "06_leave_one_marker_out.yaml"
    e6.write_text(e6.read_text().replace("lomo_markers:\n- gfap", "lomo_markers: []"))
    proc = cli(project, "submit-all", "--profile", "tiny", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    graph = out[out.index("dry run: nothing submitted"):]
    assert "01_baseline_vs_finetune:prepare prepare array: 3 of 3 items" in graph
    assert "01_baseline_vs_finetune  one job  <- afterok 01_baseline_vs_finetune:prepare" in graph
    # the generic reference of 02 is 01's generic model: trained once, by 01's array; 02 waits on that too
    assert "[done] task 2: reference=finetuned_generic  (run by 01_baseline_vs_finetune:prepare)" in graph
    assert ("02_label_efficiency      one job  <- afterok 01_baseline_vs_finetune:prepare, "
            "afterok 02_label_efficiency:prepare") in graph
    assert "05_downstream:merge      merge check" in graph and "<- afterok 05_downstream:prepare" in graph
    assert "05_downstream            one job  <- afterok 01_baseline_vs_finetune, afterok 05_downstream:prepare, " \
           "afterok 05_downstream:merge" in graph
    # E6 over every marker: its items are known once the cohort is, so here one job runs them in turn
    assert "06_leave_one_marker_out:prepare one job, items in turn" in graph
    # task id -> item, in each array's script; resources: defaults < prepare < NN:prepare
    assert "0) TASK_ARGS=(--task 0 --expect-label 'budget=1 repeat=0') ;;  # budget=1 repeat=0" in out
    assert "#SBATCH --array=0-2%2" in out and "#SBATCH --array=0-1%2" in out and "#SBATCH --gres=gpu:1" in out
    script_02 = out[out.index("# ---- 02_label_efficiency.prepare.sbatch"):out.index("# ---- 02_label_efficiency.sbatch")]
    assert "#SBATCH --cpus-per-task=3" in script_02 and "02_label_efficiency.prepare-%A_%a.out" in script_02
    # a job that asks for GPUs requires one (a node whose GPU torch cannot see fails at the first model
    # load, see models.requested_device); a CPU job leaves the choice to torch
    assert "export SEGLAB_DEVICE=cuda" in script_02   # prepare: {gpus: 1}
    notebook_02 = out[out.index("# ---- 02_label_efficiency.sbatch"):].split("# ---- ")[1]
    assert "--gres" not in notebook_02 and "SEGLAB_DEVICE" not in notebook_02
    assert "seglab prepare 06_leave_one_marker_out --profile tiny --all" in out
    assert not (project / "runs" / "_slurm").exists()
    # a prepare entry with an array grid, or a stage of an unknown notebook, is refused in cluster.yaml
    (project / "slurm" / "cluster.yaml").write_text("jobs:\n  07_nope:prepare: {cpus: 2}\n")
    bad = cli(project, "submit-all", "--profile", "tiny", "--dry-run")
    assert bad.returncode == 1 and "unknown job '07_nope:prepare'" in bad.stderr


def test_an_item_runs_with_the_notebooks_torch_threads(monkeypatch):
    """A CPU fine-tune's weights depend on torch's thread count: a prepare item (a Slurm array task)
    must train with the notebook's torch_threads, or the cached model differs from the notebook's."""
    import torch

    from seglab.experiments.items import Item

    seen = []
    item = Item(index=0, label="probe", kind="finetune", key="k", args={},
                _run=lambda log: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(prepare, "work_items", lambda name, params: [item])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        prepare.run_item("02_label_efficiency", {"torch_threads": 1}, 0, log=lambda *_: None)
        assert seen == [1]
    finally:
        torch.set_num_threads(before)
