"""`seglab status` with Slurm accounting (sacct), on a real local cluster with slurmdbd and MariaDB.

The module fixture starts `scripts/slurm-local.sh start --accounting` in a private folder on free
ports with MinJobAge=2, so slurmctld forgets a finished job two seconds after it ends; from then
on only sacct knows its final state and exit code. It skips when slurmdbd or MariaDB cannot be
installed or MariaDB cannot start here. The parser tests run on sacct output captured from that
cluster (tests/samples/sacct_sample.txt) and need no cluster.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from seglab.slurm.commands import ACTIVE_STATES, FAILED_STATES, parse_sacct, sacct_states
from seglab.slurm.status import exit_text, status as submission_status
from test_slurm import SCRIPT, cli, last_record, manifests, project, submissions, wait_for  # noqa: F401 (fixture)

SAMPLES = Path(__file__).parent / "samples"   # not tests/data: .gitignore ignores every data/
MIN_JOB_AGE_S = 2


def _free_ports(n: int = 4) -> int:
    """A port P with P..P+n-1 free: slurmctld, slurmd, slurmdbd, mariadbd."""
    import socket
    for _ in range(50):
        socks = []
        try:
            with socket.socket() as first:
                first.bind(("127.0.0.1", 0))
                port = first.getsockname()[1]
                ok = True
                for k in range(1, n):
                    s = socket.socket()
                    socks.append(s)
                    try:
                        s.bind(("127.0.0.1", port + k))
                    except OSError:
                        ok = False
                        break
                if ok:
                    return port
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


# --------------------------------------------------------------------------- the parser, on captured output

def test_parse_sacct_on_real_output_steps_arrays_states_and_exit_codes():
    out = parse_sacct((SAMPLES / "sacct_sample.txt").read_text())
    assert not any("." in key for key in out)                     # 1.batch, 4_0.batch: steps, not jobs
    assert out["1"]["state"] == "COMPLETED" and (out["1"]["exit_code"], out["1"]["signal"]) == (0, 0)
    assert out["2"]["state"] == "FAILED" and out["2"]["exit_code"] == 3 and out["2"]["node"] == "vm"
    assert out["3"]["state"] == "CANCELLED" and out["3"]["reason"] == "Dependency" and out["3"]["node"] is None
    assert out["5"]["state"] == "CANCELLED" and out["5"]["cancelled_by"] == "0"   # "CANCELLED by 0"
    assert out["7"]["state"] == "FAILED" and (out["7"]["exit_code"], out["7"]["signal"]) == (0, 9)
    # An array: each task under its own key and under the array id, one combined state.
    assert [out[f"4_{t}"]["state"] for t in range(3)] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert out["4_1"]["exit_code"] == 2 and list(out["4"]["tasks"]) == ["0", "1", "2"]
    assert out["4"]["state"] == "FAILED"
    # A pending array's summary row, and one cancelled before it started: one row for all tasks.
    assert {k for k in out if k.startswith("11_")} == {"11_0", "11_1", "11_2", "11_3"}    # 11_[0-3%2]
    assert all(out[f"11_{t}"]["state"] == "CANCELLED" for t in range(4)) and out["11"]["state"] == "CANCELLED"
    assert sorted(out["12"]["tasks"], key=int) == ["1", "3", "5", "6"]                    # 12_[1,3,5-6]
    # An array under way: the started task has its own row, the rest one pending summary row.
    assert out["15_0"]["state"] == "RUNNING" and out["15_0"]["node"] == "vm"
    assert out["15_1"]["state"] == out["15_2"]["state"] == "PENDING" and out["15"]["state"] == "RUNNING"
    for jid, state in (("6", "TIMEOUT"), ("20", "OUT_OF_MEMORY"), ("21", "NODE_FAIL"), ("22", "PREEMPTED")):
        assert out[jid]["state"] == state and state in FAILED_STATES
    assert out["20"]["exit_code"] == 0 and out["20"]["signal"] == 125


def test_parse_sacct_ignores_noise_and_keeps_the_last_row_of_a_requeued_job():
    text = "\n".join(["", "garbage", "30|REQUEUED|0:0|vm|None", "30|COMPLETED|0:0|vm|None",
                      "30.batch|COMPLETED|0:0|vm|", "31+0|COMPLETED|0:0|vm|None", "32|RUNNING|0:0|vm"])
    out = parse_sacct(text)
    assert set(out) == {"30", "32"} and out["30"]["state"] == "COMPLETED"
    assert out["32"]["reason"] is None                                        # a short row is padded
    # A task's own row wins over the array's summary row, whatever the order.
    out = parse_sacct("40_[0-2]|PENDING|0:0|None assigned|None\n40_0|RUNNING|0:0|vm|None\n")
    assert out["40_0"]["state"] == "RUNNING" and out["40_1"]["state"] == "PENDING" and len(out["40"]["tasks"]) == 3


def test_sacct_without_a_database_is_none_with_the_reason(tmp_path, monkeypatch):
    fake = tmp_path / "sacct"
    fake.write_text("#!/bin/sh\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    why: list[str] = []
    assert sacct_states(["5"], why=why) is None
    assert why == ["Slurm accounting storage is disabled"]


def test_status_row_exit_text():
    assert exit_text({"state": "FAILED", "exit_code": 3, "signal": 0}) == " exit 3"
    assert exit_text({"state": "FAILED", "exit_code": 0, "signal": 9}) == " signal 9"
    assert exit_text({"state": "RUNNING", "exit_code": 0, "signal": 0}) == ""
    assert exit_text({"state": "COMPLETED", "exit_code": None, "signal": None}) == ""
    assert exit_text({"state": "CANCELLED", "exit_code": 0, "signal": 0}) == ""
    assert exit_text({"state": "COMPLETED", "exit_code": 0, "signal": 0}) == " exit 0"


# --------------------------------------------------------------------------- on the local cluster with accounting

@pytest.fixture(scope="module")
def acct_conf(tmp_path_factory):
    """A private local cluster with accounting (slurmdbd + MariaDB), MinJobAge=2; SLURM_CONF set."""
    env = {**os.environ, "SEGLAB_SLURM_DIR": str(tmp_path_factory.mktemp("acct-cluster")),
           "SEGLAB_SLURM_PORT": str(_free_ports(4)), "SEGLAB_SLURM_MIN_JOB_AGE": str(MIN_JOB_AGE_S)}
    t0 = time.monotonic()
    proc = subprocess.run([str(SCRIPT), "start", "--accounting"], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        stop = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
        tail = proc.stderr.strip()[-400:]
        if any(subprocess.run(["sh", "-c", f"command -v {c}"], capture_output=True).returncode
               for c in ("slurmdbd", "mariadbd", "sbatch")):
            pytest.skip(f"slurmdbd/MariaDB (or Slurm) are not installed and could not be: {tail}")
        if "mariadbd did not answer" in proc.stderr or "mariadb-install-db failed" in proc.stderr:
            pytest.skip(f"MariaDB cannot start here: {tail}")
        pytest.fail(f"scripts/slurm-local.sh start --accounting failed:\n{proc.stderr}\n{stop.stderr}")
    conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    print(f"accounting cluster up in {time.monotonic() - t0:.1f} s")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield {"conf": conf, "env": env}
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)


def _forgotten(job_ids: list[str], timeout: float = 60) -> None:
    """Until slurmctld has purged the jobs (MinJobAge): `squeue -t all` no longer lists them.

    Only an answer counts: a squeue that fails for another reason than the ids being unknown
    (slurmctld busy: "Socket timed out") prints nothing too, and is asked again.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i"],
                              capture_output=True, text=True)
        if (proc.returncode == 0 or "Invalid job id" in proc.stderr) and not proc.stdout.split():
            return
        time.sleep(0.5)
    raise AssertionError(f"slurmctld still lists {job_ids} {timeout} s after they ended (MinJobAge={MIN_JOB_AGE_S})")


def _accounted(job_ids: list[str], timeout: float = 60) -> None:
    """Until sacct has every job's final row: slurmctld sends a job's end to slurmdbd through a
    queue of its own, so accounting can lag behind the controller (more so on a loaded machine)."""
    deadline = time.monotonic() + timeout
    acct = None
    while time.monotonic() < deadline:
        acct = sacct_states(job_ids)
        if acct is not None and all(j in acct and acct[j]["state"] not in ACTIVE_STATES for j in job_ids):
            return
        time.sleep(0.5)
    raise AssertionError(f"sacct has no final state of {job_ids} {timeout} s after they ended: {acct}")


@pytest.fixture(scope="module")
def finished(acct_conf, project):
    """Three submissions run to their end and forgotten by slurmctld: a chain, a failing chain, an array."""
    out = {}
    for name, args in (("chain", ("submit-all", "--profile", "test")),
                       ("failing", ("submit-all", "--profile", "failing")),
                       ("array", ("submit", "10", "--profile", "test", "--array", "fail=[false,true,false]"))):
        proc = cli(project, *args)
        assert proc.returncode == 0, proc.stderr
        out[name] = (submissions(project)[-1].name, last_record(project))
    ids = [j["job_id"] for _, record in out.values() for j in record["jobs"]]
    wait_for(ids, timeout=150)
    _forgotten(ids)
    _accounted(ids)
    return out


@pytest.mark.slurm
def test_accounting_cluster_start_is_idempotent_and_sacct_answers(acct_conf):
    again = subprocess.run([str(SCRIPT), "start", "--accounting"], env=acct_conf["env"], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "already running" in again.stderr and "with accounting" in again.stderr
    assert "slurmdbd" in again.stderr and "mariadbd" in again.stderr
    conf_dir = Path(acct_conf["conf"]).parent
    assert (conf_dir / "slurmdbd.conf").stat().st_mode & 0o777 == 0o600
    clusters = subprocess.run(["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"],
                              capture_output=True, text=True, timeout=30)
    assert clusters.returncode == 0 and "seglab-local" in clusters.stdout.split()
    status = subprocess.run([str(SCRIPT), "status"], env=acct_conf["env"], capture_output=True, text=True)
    assert status.returncode == 0 and "slurmdbd running" in status.stdout and "mariadbd running" in status.stdout


@pytest.mark.slurm
def test_finished_jobs_forgotten_by_the_controller_show_their_state_and_exit_code_from_sacct(finished, project):
    sub_id, record = finished["chain"]
    first, second = record["jobs"]
    rows = {r["name"]: r for r in _status_of(project, sub_id)["rows"]}
    for name, job in (("10_probe", first), ("11_after", second)):
        row = rows[name]
        assert row["job_id"] == job["job_id"] and row["source"] == "sacct"
        assert row["state"] == "COMPLETED" and row["exit_code"] == 0 and row["run_status"] == "done"
    out = cli(project, "status", sub_id[:20]).stdout
    assert "states from squeue and sacct" in out and out.count("COMPLETED exit 0") == 2


@pytest.mark.slurm
def test_failed_job_and_its_cancelled_dependant_from_sacct(finished, project):
    sub_id, record = finished["failing"]
    first, second = record["jobs"]
    result = _status_of(project, sub_id)
    rows = {r["name"]: r for r in result["rows"]}
    failed, cancelled = rows["10_probe"], rows["11_after"]
    assert failed["source"] == cancelled["source"] == "sacct"
    assert failed["state"] == "FAILED" and failed["exit_code"] not in (None, 0) and failed["run_status"] == "failed"
    assert cancelled["state"] == "CANCELLED" and cancelled["cancelled_because"] == [first["job_id"]]
    proc = cli(project, "status", sub_id[:20], "--fail-on-error")
    assert proc.returncode == 1
    assert f"FAILED exit {failed['exit_code']}" in proc.stdout and "ValueError: boom on purpose" in proc.stdout
    assert f"waited (afterok) on failed job {first['job_id']}" in proc.stdout


@pytest.mark.slurm
def test_array_tasks_are_reported_per_task_from_sacct(finished, project):
    sub_id, record = finished["array"]
    (job,) = record["jobs"]
    rows = _status_of(project, sub_id)["rows"]
    assert [r["name"] for r in rows] == ["10_probe[0]", "10_probe[1]", "10_probe[2]"]
    assert [r["job_id"] for r in rows] == [f"{job['job_id']}_{t}" for t in range(3)]
    assert all(r["source"] == "sacct" for r in rows)
    assert [r["state"] for r in rows] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert rows[0]["exit_code"] == 0 and rows[1]["exit_code"] not in (None, 0)
    assert [r["run_status"] for r in rows] == ["done", "failed", "done"]


@pytest.mark.slurm
def test_status_falls_back_to_the_manifests_when_slurmdbd_is_down(finished, project, acct_conf):
    # Last in this module: it stops slurmdbd (by its pid file, as the script does).
    run_dir = Path(acct_conf["conf"]).parent / "run"
    pid = int((run_dir / "slurmdbd.pid").read_text().strip())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "slurmdbd"
    os.kill(pid, 15)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    sub_id, record = finished["chain"]
    result = _status_of(project, sub_id)
    assert not result["accounting"] and result["accounting_error"]
    assert [r["source"] for r in result["rows"]] == ["manifest", "manifest"]
    assert [r["state"] for r in result["rows"]] == ["COMPLETED", "COMPLETED"]
    out = cli(project, "status", sub_id[:20]).stdout
    assert "no accounting (sacct" in out and "from the run manifests" in out


def _status_of(root: Path, sub_id: str) -> dict:
    from seglab.core import paths
    paths.set_root(root)
    try:
        return submission_status(sub_id)
    finally:
        paths.set_root(None)
