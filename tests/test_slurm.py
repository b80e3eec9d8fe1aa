"""Slurm submission, tested through a real one-node Slurm (scripts/slurm-local.sh) and a probe project.

The session fixture starts munged, slurmctld and slurmd (installing Debian's packages if they
are missing) and stops them at the end if it started them. Jobs run the probe notebooks of
tests/probe_project.py through the real sbatch; a job takes about 5 s here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seglab import SeglabError
from seglab.segment import shards
from seglab.slurm.cluster import grid_tasks
from seglab.slurm.commands import ACTIVE_STATES
from seglab.slurm.script import array_ranges
from seglab.slurm.status import status as submission_status
from seglab.slurm.submissions import read_submission

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm-local.sh"
SEGLAB = [sys.executable, "-m", "seglab"]
VENV_BIN = Path(sys.executable).parent

CLUSTER_YAML = f"""\
gpus: 0
cpus: 1
mem: 400M
time: "00:05:00"
signal_before_s: 10
activate: "export PATH={VENV_BIN}:$PATH"
jobs:
  10_probe:
    array: {{profiles: [sweep], grid: {{n: [1, 2, 3]}}}}
"""


# --------------------------------------------------------------------------- fixtures and helpers

def _free_port_pair() -> int:
    """A port P with P and P+1 free (slurmctld and slurmd of a private test cluster)."""
    import socket
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="session")
def slurm_conf(tmp_path_factory):
    """A running local cluster; SLURM_CONF set for this session. Skips only if Slurm cannot be installed.

    The cluster is this session's own (a temporary folder and free ports), so two test sessions
    never share or stop each other's; with SEGLAB_SLURM_DIR set, that cluster is used (and
    left running if it was running before).
    """
    env = dict(os.environ)
    if not env.get("SEGLAB_SLURM_DIR"):
        env["SEGLAB_SLURM_DIR"] = str(tmp_path_factory.mktemp("cluster"))
        env["SEGLAB_SLURM_PORT"] = str(_free_port_pair())
    was_running = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True).returncode == 0
    proc = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
            pytest.skip(f"Slurm is not installed and could not be installed: {proc.stderr.strip()[-300:]}")
        pytest.fail(f"scripts/slurm-local.sh start failed:\n{proc.stderr}")
    conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if not was_running:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The probe compendium plus slurm/cluster.yaml, a `sweep` profile and a `failing` profile."""
    sys.path.insert(0, str(Path(__file__).parent))
    from probe_project import make_probe_project
    root = make_probe_project(tmp_path_factory.mktemp("slurm") / "project")
    (root / "slurm").mkdir()
    (root / "slurm" / "cluster.yaml").write_text(CLUSTER_YAML)
    for profile, probe in (("sweep", "n: 1\n"), ("failing", "n: 2\nfail: true\n"), ("gpu", "n: 5\n"),
                           ("slow", "n: 2\nsleep_s: 3\n")):
        (root / "params" / profile).mkdir()
        (root / "params" / profile / "10_probe.yaml").write_text(probe)
        (root / "params" / profile / "11_after.yaml").write_text("factor: 2\n")
    return root


def cli(root: Path, *args, path: str | None = None, timeout=120):
    env = {**os.environ, "SEGLAB_ROOT": str(root)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([*SEGLAB, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for(job_ids: list[str], timeout: float = 90) -> None:
    """Until none of the jobs (arrays included) is pending or running.

    A failing squeue (slurmctld busy under load: "Socket timed out") says nothing: poll again,
    never take its empty output for "all done".
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%T"],
                              capture_output=True, text=True)
        if proc.returncode == 0 and not any(s in ACTIVE_STATES for s in proc.stdout.split()):
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs {job_ids} still queued after {timeout} s")


# These helpers read files that other processes (the jobs) write while the test polls: through the
# library's tolerant readers, which give None for a file not written yet (a run folder is made with
# an exclusive mkdir and its manifest.json written a moment later; a submission folder is made before
# its first sbatch). A poll then sees "not yet" instead of crashing on the half-made folder.

def submissions(root: Path) -> list[Path]:
    base = root / "runs" / "_slurm"
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def last_record(root: Path) -> dict:
    record = read_submission(submissions(root)[-1])
    assert record is not None, f"{submissions(root)[-1]} has no complete submission.json"
    return record


def manifests(root: Path, experiment: str, profile: str) -> list[dict]:
    """The readable manifests of the run folders of ``experiment`` in ``profile``, oldest first;
    a folder whose manifest.json is missing or half-written (a run starting) is left out."""
    from seglab.workflow.runs import read_manifest
    base = root / "runs" / experiment / profile
    found = [read_manifest(d) for d in sorted(base.iterdir()) if d.is_dir()] if base.is_dir() else []
    return [m for m in found if m is not None]


def started_run(root: Path, experiment: str, profile: str, marker: str, timeout: float = 60) -> dict:
    """The manifest of the first run of ``experiment`` once its notebook wrote ``marker`` (a file the
    notebook writes atomically, so its presence means the kernel is inside the notebook)."""
    from seglab.workflow.runs import read_manifest
    deadline = time.monotonic() + timeout
    base = root / "runs" / experiment / profile
    while time.monotonic() < deadline:
        for d in sorted(base.iterdir()) if base.is_dir() else []:
            m = read_manifest(d)
            if m is not None and (d / marker).is_file():
                return m
        time.sleep(0.2)
    raise AssertionError(f"no run of {experiment} ({profile}) wrote {marker} within {timeout} s")


# --------------------------------------------------------------------------- without a cluster

def test_grid_tasks_are_the_product_in_key_order():
    tasks = grid_tasks({"budget": [10, 20, 50], "repeat": [0, 1]})
    assert len(tasks) == 6
    assert tasks[0] == {"budget": 10, "repeat": 0} and tasks[1] == {"budget": 10, "repeat": 1}
    assert tasks[5] == {"budget": 50, "repeat": 1}
    assert array_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and array_ranges([3]) == "3"


def test_merge_check_finds_missing_and_doubled_tiles_on_synthetic_shards():
    tiles = [f"t{i:02d}" for i in range(10)]
    good = {s: [t for i, t in enumerate(tiles) if i % 3 == s] for s in range(3)}
    assert shards.check_shards(tiles, good).ok
    assert shards.check_shards(tiles, good).per_shard == {0: 4, 1: 3, 2: 3}
    lost = {0: good[0], 1: good[1][:-1], 2: good[2]}
    check = shards.check_shards(tiles, lost)
    assert not check.ok and check.missing == [good[1][-1]] and not check.duplicated
    doubled = {0: good[0] + ["t01"], 1: good[1], 2: good[2] + ["zz"]}
    check = shards.check_shards(tiles, doubled)
    assert check.duplicated == {"t01": [0, 1]} and check.unexpected == ["zz"] and not check.missing


def test_cluster_yaml_typo_names_the_key_and_the_allowed_keys(project, tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text(CLUSTER_YAML + "partiton: gpu\n")
    proc = cli(project, "submit-all", "--profile", "test", "--cluster", str(bad), "--dry-run")
    assert proc.returncode == 1
    assert "unknown key 'partiton'" in proc.stderr and "did you mean 'partition'" in proc.stderr
    assert "allowed keys" in proc.stderr and "Traceback" not in proc.stderr
    bad.write_text(CLUSTER_YAML.replace("10_probe:", "10_prob:"))
    proc = cli(project, "submit-all", "--profile", "test", "--cluster", str(bad), "--dry-run")
    assert "unknown job '10_prob'" in proc.stderr and "10_probe" in proc.stderr
    bad.write_text(CLUSTER_YAML.replace('"00:05:00"', '"5 minutes"'))
    assert "not a Slurm time" in cli(project, "submit", "10", "--profile", "test", "--cluster", str(bad)).stderr
    assert not submissions(project)


def test_dry_run_prints_scripts_and_graph_and_submits_nothing(project):
    proc = cli(project, "submit-all", "--profile", "sweep", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("#!/bin/bash") == 2 and "#SBATCH --array=0-2" in proc.stdout
    assert "0) TASK_ARGS=(--set n=1)" in proc.stdout and "2) TASK_ARGS=(--set n=3)" in proc.stdout
    assert "11_after                 one job  <- afterok 10_probe" in proc.stdout
    assert "dry run: nothing submitted" in proc.stdout
    assert not submissions(project)


def test_missing_sbatch_is_a_clear_error_and_records_nothing(project):
    proc = cli(project, "submit", "10", "--profile", "test", path=str(VENV_BIN))
    assert proc.returncode == 1 and "'sbatch' is not on PATH" in proc.stderr, proc.stderr
    assert not submissions(project)


def _half_made_runs(root: Path, experiment: str, profile: str) -> dict[str, Path]:
    """Run folders as a poll can find them while runs start: one with no manifest.json yet, one whose
    manifest.json is cut short (truncated JSON), beside one complete run."""
    base = root / "runs" / experiment / profile
    made = {}
    for name, text in (("complete", None), ("truncated", '{"experiment": "%s", "status": "runn' % experiment),
                       ("missing", None)):
        d = base / f"20260101T00000{len(made)}Z-{name[:4]}"
        d.mkdir(parents=True)
        made[name] = d
        if name == "complete":
            (d / "manifest.json").write_text(json.dumps({"experiment": experiment, "profile": profile,
                                                          "status": "done", "run_id": d.name}))
        elif text is not None:
            (d / "manifest.json").write_text(text)
    return made


def test_poll_helpers_skip_run_folders_and_submissions_not_written_yet(tmp_path):
    """The race of issue #19: a helper polling run folders read manifest.json before the runner wrote it."""
    made = _half_made_runs(tmp_path, "10_probe", "gpu")
    assert [m["run_id"] for m in manifests(tmp_path, "10_probe", "gpu")] == [made["complete"].name]
    base = tmp_path / "runs" / "_slurm"
    (base / "20260101T000000.000Z-aaaa").mkdir(parents=True)
    (base / "20260101T000000.000Z-aaaa" / "submission.json").write_text(json.dumps({"id": "a", "jobs": []}))
    (base / "20260101T000001.000Z-bbbb" / "logs").mkdir(parents=True)       # made, first sbatch not answered yet
    assert read_submission(base / "20260101T000001.000Z-bbbb") is None
    (base / "20260101T000001.000Z-bbbb" / "submission.json").write_text('{"id": "b", "jo')
    assert read_submission(base / "20260101T000001.000Z-bbbb") is None
    assert read_submission(base / "20260101T000000.000Z-aaaa") == {"id": "a", "jobs": []}


FAKE_SQUEUE = """#!/bin/sh
# squeue of a fake cluster: job 9001 (10_probe) running, 9002 (11_after) waiting on it
printf '%s\n' '9001|9001|N/A|RUNNING|None|node1|' '9002|9002|N/A|PENDING|Dependency||afterok:9001(unfulfilled)'
"""


def test_status_shows_a_running_job_whose_run_folder_has_no_manifest_yet_as_starting(tmp_path):
    """`seglab status` while a job's run folder is made but its manifest is missing or cut short."""
    from probe_project import make_probe_project
    root = make_probe_project(tmp_path / "project")
    made = _half_made_runs(root, "10_probe", "test")
    sub = root / "runs" / "_slurm" / "20260101T000000.000Z-aaaa"
    (sub / "logs").mkdir(parents=True)
    jobs = [{"name": name, "kind": "notebook", "experiment": name, "profile": "test", "job_id": jid,
             "dependency": dep, "log": f"runs/_slurm/{sub.name}/logs/{name}-{jid}.out", "array": None, "meta": None}
            for name, jid, dep in (("10_probe", "9001", []), ("11_after", "9002", ["9001"]))]
    (sub / "submission.json").write_text(json.dumps({"id": sub.name, "command": "seglab submit-all",
                                                      "status": "submitted", "jobs": jobs}))
    (root / "runs" / "_slurm" / "20260101T000001.000Z-bbbb" / "logs").mkdir(parents=True)   # being submitted
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FAKE_SQUEUE)
    (bin_dir / "squeue").chmod(0o755)
    proc = cli(root, "status", path=f"{bin_dir}:{VENV_BIN}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  1")}
    assert "RUNNING" in lines["10_probe"] and "run starting (no manifest yet)" in lines["10_probe"], proc.stdout
    assert "PENDING" in lines["11_after"] and "no run yet" in lines["11_after"], proc.stdout
    assert made["complete"].name not in proc.stdout     # a run of no job of this submission
    page = cli(root, "report", path=f"{bin_dir}:{VENV_BIN}")
    assert page.returncode == 0 and "Traceback" not in page.stderr, page.stderr


# --------------------------------------------------------------------------- on the local cluster


@pytest.mark.slurm
def test_local_cluster_script_is_idempotent(slurm_conf):
    env = {**os.environ, "SEGLAB_SLURM_DIR": str(Path(slurm_conf).parent),
           "SEGLAB_SLURM_PORT": next(line.split("=")[1] for line in Path(slurm_conf).read_text().splitlines()
                                     if line.startswith("SlurmctldPort="))}
    again = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already running" in again.stderr
    assert again.stdout.strip() == f"export SLURM_CONF={slurm_conf}"
    assert subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True).returncode == 0
    info = subprocess.run(["sinfo", "-h", "-o", "%G %c"], capture_output=True, text=True).stdout
    assert "gpu:2" in info


@pytest.mark.slurm
def test_chain_runs_in_order_with_afterok_and_resubmission_skips_it(slurm_conf, project):
    proc = cli(project, "submit-all", "--profile", "test")
    assert proc.returncode == 0, proc.stderr
    record = last_record(project)
    first, second = record["jobs"]
    assert (first["experiment"], second["experiment"]) == ("10_probe", "11_after")
    assert second["dependency"] == [first["job_id"]] and first["dependency"] == []
    wait_for([first["job_id"], second["job_id"]])
    (m10,), (m11,) = manifests(project, "10_probe", "test"), manifests(project, "11_after", "test")
    assert m10["status"] == m11["status"] == "done"
    assert m10["slurm"]["job_id"] == first["job_id"] and m11["slurm"]["job_id"] == second["job_id"]
    assert m11["started"] >= m10["ended"]            # afterok: the second began after the first ended
    assert m11["summary"]["scaled"] == 14 * 3        # it read the first one's output
    for m, job in ((m10, first), (m11, second)):
        assert Path(m["slurm"]["log"]) == project / job["log"] and Path(m["slurm"]["log"]).is_file()
        script = Path(m["slurm"]["script"])
        assert script == project / job["script"] and script.read_text().startswith("#!/bin/bash")
        assert m["slurm"]["node"] and Path(m["slurm"]["submission"]) == submissions(project)[-1]
    status = cli(project, "status")
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 2 and "run done" in status.stdout
    n_before = len(submissions(project))
    again = cli(project, "submit-all", "--profile", "test")
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert "10_probe                 skipped: up to date" in again.stdout
    assert len(submissions(project)) == n_before     # nothing recorded: nothing was submitted


@pytest.mark.slurm
def test_array_tasks_map_to_params_and_resubmission_runs_only_the_unfinished_task(slurm_conf, project):
    proc = cli(project, "submit-all", "--profile", "sweep", "--only", "10_probe")
    assert proc.returncode == 0, proc.stderr
    job = last_record(project)["jobs"][0]
    assert job["array"]["spec"] == "0-2" and [t["overrides"] for t in job["array"]["tasks"]] == [{"n": 1}, {"n": 2}, {"n": 3}]
    wait_for([job["job_id"]])
    runs_ = manifests(project, "10_probe", "sweep")
    assert len(runs_) == 3 and all(m["status"] == "done" for m in runs_)
    by_task = {int(m["slurm"]["array_task_id"]): m for m in runs_}
    for task_id, m in by_task.items():              # task id -> params, recorded in the manifest
        assert m["slurm"]["array_job_id"] == job["job_id"]
        assert m["overrides"] == {"n": task_id + 1} and m["summary"]["n"] == task_id + 1
    (project / by_task[1]["run_dir"] / "squares.csv").unlink()   # task 1's output lost
    again = cli(project, "submit-all", "--profile", "sweep", "--only", "10_probe")
    assert again.returncode == 0, again.stderr
    job2 = last_record(project)["jobs"][0]
    assert job2["array"]["spec"] == "1" and job2["array"]["submitted_tasks"] == [1]
    wait_for([job2["job_id"]])
    rerun = [m for m in manifests(project, "10_probe", "sweep") if m["slurm"]["array_job_id"] == job2["job_id"]]
    assert len(rerun) == 1 and rerun[0]["overrides"] == {"n": 2} and rerun[0]["status"] == "done"
    third = cli(project, "submit-all", "--profile", "sweep", "--only", "10_probe")
    assert "all 3 array tasks done" in third.stdout


@pytest.mark.slurm
def test_failed_job_cancels_its_dependant_and_status_names_it_and_its_log(slurm_conf, project):
    # Beside it, a long run that gets Slurm's warning signal (as before a time limit or preemption).
    sleeper = cli(project, "submit", "10", "--profile", "gpu", "--array", "sleep_s=[60]")
    assert sleeper.returncode == 0, sleeper.stderr
    sleeper_job, sleeper_submission = last_record(project)["jobs"][0], submissions(project)[-1].name
    proc = cli(project, "submit-all", "--profile", "failing")
    assert proc.returncode == 0, proc.stderr
    first, second = last_record(project)["jobs"]
    started_run(project, "10_probe", "gpu", "squares.csv")   # the cell before the sleep has run
    time.sleep(0.5)   # into the notebook's sleep
    subprocess.run(["scancel", "--batch", "--signal=TERM", sleeper_job["job_id"]], check=True)
    wait_for([first["job_id"], second["job_id"], sleeper_job["job_id"]])
    (interrupted,) = manifests(project, "10_probe", "gpu")
    assert interrupted["status"] == "interrupted" and interrupted["duration_s"] < 50
    log = (project / sleeper_job["log"].replace("%a", "0")).read_text()
    assert "SIGTERM (time limit or preemption)" in log and "was interrupted" in log
    status = cli(project, "status", "--fail-on-error")
    assert status.returncode == 1
    out = status.stdout
    assert f"job {first['job_id']}" in out and "FAILED" in out and "ValueError: boom on purpose" in out
    assert f"log: {first['log']}" in out and (project / first["log"]).is_file()
    assert "CANCELLED" in out and f"waited (afterok) on failed job {first['job_id']}" in out
    assert manifests(project, "11_after", "failing") == []     # the dependant never ran
    assert "INTERRUPTED (SIGTERM" in cli(project, "status", sleeper_submission[:20]).stdout
    rows = {r["name"]: r for r in slurm_status(project)["rows"]}
    assert rows["11_after"]["state"] == "CANCELLED" and rows["11_after"]["cancelled_because"] == [first["job_id"]]


@pytest.mark.slurm
def test_gpu_job_accepted_queued_work_not_submitted_twice_and_a_single_submit_waits_on_it(
        slurm_conf, project, tmp_path):
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(CLUSTER_YAML.replace("gpus: 0", "gpus: 1"))
    first = cli(project, "submit", "10", "--profile", "slow", "--cluster", str(gpu))
    assert first.returncode == 0, first.stderr
    job = last_record(project)["jobs"][0]
    parent = job["job_id"]
    assert "#SBATCH --gres=gpu:1" in (project / job["script"]).read_text()
    second = cli(project, "submit", "11", "--profile", "slow")    # 10 has no finished run, but is queued
    assert second.returncode == 0, second.stderr
    child = last_record(project)["jobs"][0]
    assert child["experiment"] == "11_after" and child["dependency"] == [parent]
    n_before = len(submissions(project))
    again = cli(project, "submit-all", "--profile", "slow")
    assert "nothing to submit" in again.stdout and f"already queued: job {parent}" in again.stdout
    assert f"already queued: job {child['job_id']}" in again.stdout and len(submissions(project)) == n_before
    wait_for([parent, child["job_id"]])
    (m10,), (m11,) = manifests(project, "10_probe", "slow"), manifests(project, "11_after", "slow")
    assert m10["status"] == m11["status"] == "done" and m11["started"] >= m10["ended"]
    assert "GPUs: 0" in (project / job["log"]).read_text()    # the fake GPU node set CUDA_VISIBLE_DEVICES
    lonely = cli(project, "submit", "11", "--profile", "failing", "--dry-run")
    assert lonely.returncode == 1 and "needs 10_probe, which has no finished run" in lonely.stderr


def slurm_status(root: Path) -> dict:
    from seglab.core import paths
    paths.set_root(root)
    try:
        return submission_status()
    finally:
        paths.set_root(None)


@pytest.mark.slurm
def test_unknown_partition_gives_sbatch_text_and_cancels_what_this_submission_queued(slurm_conf, project, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CLUSTER_YAML.replace("gpus: 0", "gpus: 0\npartition: nosuch"))
    n_before = len(submissions(project))
    proc = cli(project, "submit", "10", "--profile", "gpu", "--cluster", str(bad), "--force")
    assert proc.returncode == 1 and "sbatch refused 10_probe.sbatch" in proc.stderr
    assert "invalid partition" in proc.stderr.lower() and "sinfo" in proc.stderr
    assert len(submissions(project)) == n_before      # nothing submitted, nothing recorded
    # The second job of a chain refused: the first, already queued, is cancelled and the record says so.
    bad.write_text(CLUSTER_YAML.replace("jobs:", "jobs:\n  11_after: {partition: nosuch}"))
    proc = cli(project, "submit-all", "--profile", "sweep", "--cluster", str(bad), "--force")
    assert proc.returncode == 1 and "Cancelled the job(s) of this submission already queued" in proc.stderr
    record = last_record(project)
    assert record["status"] == "aborted" and [j["name"] for j in record["jobs"]] == ["10_probe"]
    assert record["jobs"][0]["cancelled"] == "submission aborted"
    wait_for([record["jobs"][0]["job_id"]])


@pytest.mark.slurm
def test_sharded_predict_merge_and_a_shard_killed_midway_resumes_with_no_tile_lost_or_doubled(
        slurm_conf, project, tmp_path):
    from seglab.segment import predict
    from seglab.data import simulate
    cohort = simulate.simulate_cohort(tmp_path / "cohort", n_donors=3, tiles_per_marker=1, size_px=64, seed=0)
    tiles = predict.list_tiles(cohort)
    shard1 = predict.shard_slice(tiles, "1/2")
    out = tmp_path / "pred"
    args = ("submit-predict", "--model", "tiny", "--tiles", str(cohort), "--out", str(out), "--shards", "2",
            "--", "--threads", "1", "--quiet", "--batch-tiles", "1")
    proc = cli(project, *args)
    assert proc.returncode == 0, proc.stderr
    predict_job, merge_job = last_record(project)["jobs"]
    assert predict_job["array"]["spec"] == "0-1" and merge_job["dependency"] == [predict_job["job_id"]]
    # Kill shard 1 (SIGKILL, no warning: as a node failure would) once it has written its first mask.
    deadline = time.monotonic() + 90
    while not any((out / f"{t}.tif").is_file() for t in shard1):
        assert time.monotonic() < deadline, "shard 1 wrote no mask in 90 s"
        time.sleep(0.05)
    subprocess.run(["scancel", "--full", "--signal=KILL", f"{predict_job['job_id']}_1"], check=True)
    wait_for([predict_job["job_id"], merge_job["job_id"]], timeout=120)
    written = [t for t in shard1 if (out / f"{t}.tif").is_file()]
    assert 0 < len(written) < len(shard1), f"not killed midway: {len(written)} of {len(shard1)} masks"
    assert not shards.shard_complete(cohort, out, 1, 2) and shards.shard_complete(cohort, out, 0, 2)
    assert shards.read_shards_check(out) is None         # the merge never ran: its parent failed
    status = cli(project, "status").stdout
    assert "predict[1]" in status and "shard incomplete" in status and "CANCELLED" in status
    proc = cli(project, *args)
    assert proc.returncode == 0, proc.stderr
    predict_job, merge_job = last_record(project)["jobs"]
    assert predict_job["array"]["spec"] == "1"          # shard 0 is complete: not submitted again
    wait_for([predict_job["job_id"], merge_job["job_id"]], timeout=120)
    check = shards.read_shards_check(out)
    assert check["ok"] and not check["missing"] and not check["duplicated"]
    assert check["n_tiles"] == len(tiles) == 15 and check["per_shard"] == {"0": 8, "1": 7}
    assert sorted(shards.read_shard_tables(out, 2)[1]) == sorted(shard1)       # each tile once
    merged = (out / "tiles.tsv").read_text().splitlines()[1:]
    assert sorted(line.split("\t")[0] for line in merged) == tiles
    status = cli(project, "status").stdout
    assert "shard complete" in status and "every tile exactly once" in status
    again = cli(project, *args)
    assert "nothing to submit" in again.stdout and "all 2 shards complete" in again.stdout
    # The merge check itself fails loudly on a lost mask.
    (out / f"{shard1[0]}.tif").unlink()
    with pytest.raises(SeglabError, match="1 missing|masks unreadable"):
        shards.merge_shards(cohort, out, 2, log=lambda *_: None)


# --------------------------------------------------------------------------- prepare arrays

PREP_CLUSTER_YAML = f"""\
gpus: 0
cpus: 1
mem: 500M
time: "00:05:00"
signal_before_s: 10
activate: "export PATH={VENV_BIN}:$PATH"
setup: ["export OMP_NUM_THREADS=1"]
jobs:
  prepare: {{max_parallel: 2}}
"""


@pytest.fixture(scope="module")
def prep_project(tmp_path_factory):
    """tests/prepare_project.py: E2 with one budget and the generic reference (two tiny fine-tunes)."""
    from prepare_project import make_prepare_project
    from seglab.data import simulate
    base = tmp_path_factory.mktemp("prep")
    cohort = simulate.simulate_cohort(base / "cohort", n_donors=3, tiles_per_marker=1, size_px=64, seed=0)
    root = make_prepare_project(base / "project", cohort)
    e2 = root / "params" / "tiny" / "02_label_efficiency.yaml"
    e2.write_text(e2.read_text().replace("budgets:\n- 2\n- 1\n", "budgets:\n- 1\n"))
    (root / "slurm").mkdir()
    (root / "slurm" / "cluster.yaml").write_text(PREP_CLUSTER_YAML)
    return root


@pytest.mark.slurm
def test_prepare_array_trains_before_the_notebook_which_then_trains_nothing_and_resubmission_prepares_nothing(
        slurm_conf, prep_project):
    root = prep_project
    proc = cli(root, "submit-all", "--profile", "tiny", "--only", "02")
    assert proc.returncode == 0, proc.stderr
    prep, nb = last_record(root)["jobs"]
    assert (prep["name"], prep["kind"], nb["name"]) == ("02_label_efficiency:prepare", "prepare", "02_label_efficiency")
    assert nb["dependency"] == [prep["job_id"]] and prep["dependency"] == []
    assert prep["array"]["spec"] == "0-1" and prep["array"]["submitted_tasks"] == [0, 1]
    assert [(t["id"], t["label"]) for t in prep["array"]["tasks"]] == [(0, "budget=1 repeat=0"),
                                                                       (1, "reference=finetuned_generic")]
    script = (root / prep["script"]).read_text()
    assert "#SBATCH --array=0-1%2" in script and "1) TASK_ARGS=(--task 1 --expect-label reference=finetuned_generic)" in script
    # while those tasks are queued, another submission never trains the same models: it waits on them
    twice = cli(root, "submit", "02", "--profile", "tiny", "--force", "--dry-run")
    assert twice.returncode == 0 and "#SBATCH --array" not in twice.stdout, twice.stdout[-1500:]
    assert f"afterok job {prep['job_id']} (queued earlier)" in twice.stdout
    wait_for([prep["job_id"], nb["job_id"]], timeout=150)
    for task, label in ((0, "budget=1 repeat=0"), (1, "reference=finetuned_generic")):
        log = (root / prep["log"].replace("%a", str(task))).read_text()
        assert f"item {task} ({label}): running" in log and f"item {task} ({label}): done in" in log, log[-2000:]
    (m,) = manifests(root, "02_label_efficiency", "tiny")
    assert m["status"] == "done" and m["slurm"]["job_id"] == nb["job_id"]
    assert m["summary"]["n_models"] == 2 and m["summary"]["n_trained_here"] == 0   # all cached by the array
    models = sorted(p.name.split("-")[0] for p in (root / "data" / "models").iterdir())
    assert models == ["generic", "label_budget"]
    status = cli(root, "status").stdout
    assert "02_label_efficiency:prepare[1]" in status and "item 1: reference=finetuned_generic" in status
    listed = cli(root, "prepare", "02", "--profile", "tiny", "--list").stdout
    assert "2 prepare items, 2 done, 0 to do" in listed
    n_before = len(submissions(root))
    again = cli(root, "submit-all", "--profile", "tiny", "--only", "02")
    assert again.returncode == 0 and "nothing to submit" in again.stdout and len(submissions(root)) == n_before
    forced = cli(root, "submit", "02", "--profile", "tiny", "--force", "--dry-run")
    assert forced.returncode == 0 and "#SBATCH --array" not in forced.stdout
    assert "02_label_efficiency      2 prepare items cached" in forced.stdout


@pytest.fixture(scope="module")
def e5_project(tmp_path_factory):
    """tests/prepare_project.py for E5 alone (its own data/models, so the E2 test above is not affected):
    01's generic model made by `seglab prepare 01 --task 0` and a finished run of the (stub) notebook 01."""
    from prepare_project import make_prepare_project
    from seglab.data import simulate
    base = tmp_path_factory.mktemp("prep5")
    cohort = simulate.simulate_cohort(base / "cohort", n_donors=3, tiles_per_marker=1, size_px=64, seed=0)
    root = make_prepare_project(base / "project", cohort)
    (root / "slurm").mkdir()
    (root / "slurm" / "cluster.yaml").write_text(PREP_CLUSTER_YAML)
    generic = cli(root, "prepare", "01", "--profile", "tiny", "--task", "0")   # model=finetuned_generic
    assert generic.returncode == 0 and "model=finetuned_generic): done in" in generic.stdout, generic.stderr[-2000:]
    ran = cli(root, "run", "01", "--profile", "tiny")    # `seglab submit 05` needs a finished run of 01
    assert ran.returncode == 0, ran.stderr[-2000:]
    return root


def _log_times(log: str) -> tuple:
    """(started, ended) of a job from the lines the sbatch template writes into its log."""
    import datetime as dt
    started = next(line for line in log.splitlines() if line.startswith("seglab: job ") and " started " in line)
    ended = next(line for line in log.splitlines() if line.startswith("seglab: job ") and " ended " in line)
    return (dt.datetime.fromisoformat(started.split(" started ")[1].split(";")[0]),
            dt.datetime.fromisoformat(ended.split(" ended ")[1].split(" ")[0]))


@pytest.mark.slurm
def test_e5_shard_array_then_merge_check_then_the_notebook_which_segments_nothing_and_resubmission_prepares_nothing(
        slurm_conf, e5_project):
    import datetime as dt
    root = e5_project
    proc = cli(root, "submit", "05", "--profile", "tiny")
    assert proc.returncode == 0, proc.stderr
    prep, merge, nb = last_record(root)["jobs"]
    assert [(j["name"], j["kind"]) for j in (prep, merge, nb)] == [
        ("05_downstream:prepare", "prepare"), ("05_downstream:merge", "check"), ("05_downstream", "notebook")]
    assert prep["dependency"] == [] and merge["dependency"] == [prep["job_id"]]
    assert nb["dependency"] == [prep["job_id"], merge["job_id"]]
    labels = [f"model={m} shard={s}/2" for m in ("baseline", "finetuned") for s in (0, 1)]   # one task per (model, shard)
    assert prep["array"]["spec"] == "0-3" and prep["array"]["submitted_tasks"] == [0, 1, 2, 3]
    assert [(t["id"], t["label"]) for t in prep["array"]["tasks"]] == list(enumerate(labels))
    assert "#SBATCH --array=0-3%2" in (root / prep["script"]).read_text()
    assert "seglab prepare 05_downstream --profile tiny --check" in (root / merge["script"]).read_text()
    wait_for([prep["job_id"], merge["job_id"], nb["job_id"]], timeout=150)
    task_ends = []
    for task, label in enumerate(labels):
        log = (root / prep["log"].replace("%a", str(task))).read_text()
        assert f"item {task} ({label}): running" in log and f"item {task} ({label}): done in" in log, log[-2000:]
        task_ends.append(_log_times(log)[1])
    merge_log = (root / merge["log"]).read_text()
    merge_start, merge_end = _log_times(merge_log)
    assert merge_start >= max(task_ends) and "with exit code 0" in merge_log    # afterok: after every shard
    # the merge wrote the check in both models' prediction folders: every tile exactly once
    folders = sorted(p for p in (root / "data" / "predictions").iterdir() if p.is_dir())
    assert len(folders) == 2
    for folder in folders:
        check = shards.read_shards_check(folder)
        assert check["ok"] and not check["missing"] and not check["duplicated"] and not check["unreadable_masks"]
        assert check["n_tiles"] == 15 and check["per_shard"] == {"0": 8, "1": 7}
        assert len((folder / "tiles.tsv").read_text().splitlines()) == 1 + 15
        assert f"table {folder}/tiles.tsv" in merge_log
    (m,) = manifests(root, "05_downstream", "tiny")
    assert m["status"] == "done" and m["slurm"]["job_id"] == nb["job_id"]
    assert dt.datetime.fromisoformat(m["started"]) >= merge_end                 # the notebook ran last
    s = m["summary"]
    assert s["finetuned_cached"] and s["n_tiles_baseline"] == s["n_tiles_finetuned"] == 15
    assert s["n_predicted_here_baseline"] == s["n_predicted_here_finetuned"] == 0   # all segmented by the array
    status = cli(root, "status")
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 6, status.stdout
    assert "05_downstream:prepare[3]" in status.stdout and "item 3: model=finetuned shard=1/2" in status.stdout
    assert "merge check (every tile exactly once)" in status.stdout and "run done" in status.stdout
    listed = cli(root, "prepare", "05", "--profile", "tiny", "--list").stdout
    assert "4 prepare items, 4 done, 0 to do" in listed
    n_before = len(submissions(root))
    again = cli(root, "submit", "05", "--profile", "tiny")
    assert again.returncode == 0 and "nothing to submit" in again.stdout and len(submissions(root)) == n_before
    forced = cli(root, "submit", "05", "--profile", "tiny", "--force", "--dry-run")
    assert forced.returncode == 0 and "#SBATCH --array" not in forced.stdout and "05_downstream:merge" not in forced.stdout
    assert "05_downstream            4 prepare items cached" in forced.stdout
