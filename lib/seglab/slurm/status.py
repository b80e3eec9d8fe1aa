"""What became of a submission: each job (array tasks one by one) with its queue state and its run.

:func:`status` joins the queue (squeue; sacct where accounting exists) with the run manifests
(which record ``SLURM_JOB_ID``, node, log and script paths); :func:`format_status` prints it.
:func:`cancel_dependants` is what a failed job's script calls: the jobs waiting on it can never start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from seglab.core import paths
from seglab.segment.shards import CHECK_FILE, read_shards_check, shard_complete
from seglab.slurm.commands import (ACTIVE_STATES, FAILED_STATES, SlurmError, queue_states, run_command,
                                   sacct_states)
from seglab.slurm.submissions import load_submission
from seglab.workflow import runs


def _manifests_by_job(record: dict) -> dict[str, tuple[Path, dict]]:
    """Run manifests of this submission's notebooks, keyed by Slurm job id (``123`` or ``123_4``)."""
    out = {}
    for job in record.get("jobs", []):
        if job.get("kind") != "notebook":
            continue
        for run_dir in runs.list_runs(job["experiment"], job["profile"]):
            m = runs.read_manifest(run_dir)
            slurm = (m or {}).get("slurm") or {}
            if slurm.get("array_job_id") and slurm.get("array_task_id") is not None:
                key = f"{slurm['array_job_id']}_{slurm['array_task_id']}"
            else:
                key = slurm.get("job_id")
            if key:
                out[str(key)] = (run_dir, m)   # the newest wins (a requeued job's last attempt)
    return out


def status(ref: str | None = None) -> dict:
    """Each job of a submission (array tasks one by one) with its queue state and its run.

    Returns ``{"submission": record, "rows": [...], "accounting": bool, "queue_error": str | None,
    "accounting_error": str | None}``; a row has ``name, job_id, state, reason, node, exit_code,
    signal, source, run_status, run_dir, missing, log, cancelled_because``. ``source`` says where
    the state came from: ``squeue`` (the controller still knows the job), ``sacct`` (accounting;
    the only source once the controller forgot a finished job, after ``MinJobAge``) or
    ``manifest``; ``exit_code``/``signal`` come from sacct (None without accounting).
    """
    record = load_submission(ref)
    root = paths.project_root()
    ids = [j["job_id"] for j in record.get("jobs", []) if j.get("job_id")]
    queue_error, acct_why = None, []
    try:
        queue = queue_states(ids)
    except SlurmError as exc:   # away from the cluster: the manifests still tell what ran
        queue, queue_error = {}, str(exc)
    # sacct, where the cluster has accounting, knows jobs the controller has forgotten (after
    # MinJobAge) with their exit codes; None (a failing sacct) falls back to the queue and manifests.
    acct = sacct_states(ids, why=acct_why)
    manifests = _manifests_by_job(record)
    failed_ids: dict[str, str] = {}
    rows = []
    for job in record.get("jobs", []):
        jid = job["job_id"]
        units = [(jid, None)]
        if job.get("array"):
            units = [(f"{jid}_{t}", t) for t in job["array"]["submitted_tasks"]]
        for key, task in units:
            q = queue.get(key) or (queue.get(jid, {}).get("tasks", {}).get(str(task)) if task is not None else None)
            a = (acct or {}).get(key)
            run_dir, m = manifests.get(key, (None, None))
            # The controller's view first (current while it remembers the job; sacct may lag a
            # moment behind it), then accounting's.
            state = (q or a or {}).get("state")
            source = "squeue" if q else "sacct" if a else None
            if state is None and job.get("cancelled"):
                state = "CANCELLED"
            if state is None:   # the controller forgot it and there is no accounting: the manifest tells
                state = {"done": "COMPLETED", "failed": "FAILED", "interrupted": "TIMEOUT?"}.get(
                    (m or {}).get("status"), "UNKNOWN (not in the queue)")
            log_path = job["log"].replace("%a", str(task)) if task is not None else job["log"]
            row = {"name": job["name"] + (f"[{task}]" if task is not None else ""), "job_id": key, "state": state,
                   "reason": (q or a or {}).get("reason"), "node": (q or a or {}).get("node") or ((m or {}).get("slurm") or {}).get("node"),
                   "exit_code": (a or {}).get("exit_code"), "signal": (a or {}).get("signal"), "source": source or "manifest",
                   "run_status": (m or {}).get("status"), "run_dir": os.path.relpath(run_dir, root) if run_dir else None,
                   "missing": [], "log": log_path, "error": (m or {}).get("error"), "cancelled_because": None,
                   "dependency": job.get("dependency") or []}
            if m is None and job.get("kind") == "notebook" and state in ("RUNNING", "COMPLETING"):
                row["run_status"] = runs.STARTING   # its folder may exist; its manifest (with this job id) not yet
            if m and m.get("status") == "done":
                problems = runs.check_outputs(run_dir, m)
                row["missing"] = problems["missing"] + [f"CHANGED {p}" for p in problems["changed"]]
            meta = job.get("meta") or {}
            if job.get("kind") == "predict" and task is not None:
                row["outputs"] = ("shard complete" if shard_complete(meta["tiles"], meta["out"], int(task), meta["n_shards"])
                                  else "shard incomplete") + f" in {meta['out']}"
            elif job.get("kind") == "prepare" and task is not None:
                label = next((t.get("label") for t in (job.get("array") or {}).get("tasks", [])
                              if str(t.get("id")) == str(task)), None)
                row["outputs"] = f"item {task}: {label}"
            elif job.get("kind") == "check":
                row["outputs"] = f"merge check (every tile exactly once); log {log_path}"
            elif job.get("kind") == "merge":
                check = read_shards_check(meta["out"])
                row["outputs"] = "not checked yet" if check is None else \
                    f"{'every tile exactly once' if check.get('ok') else 'CHECK FAILED'}: {Path(meta['out']) / CHECK_FILE}"
            if state in FAILED_STATES and state != "CANCELLED" or row["run_status"] in ("failed", "interrupted"):
                failed_ids[jid] = key
            rows.append(row)
    for row in rows:   # a cancelled job: name the failed job it waited on
        if row["state"] == "CANCELLED" or (row["reason"] or "").startswith("DependencyNeverSatisfied"):
            parents = [failed_ids[d] for d in row["dependency"] if d in failed_ids]
            if parents:
                row["cancelled_because"] = parents
    return {"submission": record, "rows": rows, "accounting": acct is not None, "queue_error": queue_error,
            "accounting_error": acct_why[0] if acct_why else None}


def exit_text(row: dict) -> str:
    """`` exit 3`` / `` signal 9`` for a job that ended (from sacct); empty otherwise."""
    if row.get("exit_code") is None or row["state"] in ACTIVE_STATES:
        return ""
    if row["state"] == "CANCELLED" and not row["exit_code"] and not row.get("signal"):
        return ""   # sacct records 0:0 for a cancelled job, started or not: says nothing
    if row.get("signal"):
        return f" signal {row['signal']}"
    return f" exit {row['exit_code']}"


def format_status(result: dict) -> str:
    record = result["submission"]
    why = f" ({result['accounting_error']})" if result.get("accounting_error") else ""
    lines = [f"submission {record['id']} ({record.get('command')}), {record.get('status')}"
             + ("; states from squeue and sacct" if result["accounting"] else "" if result.get("queue_error") else
                f"; no accounting (sacct{why}): finished jobs are read from `squeue -t all` while the "
                "controller remembers them, then from the run manifests")]
    if result.get("queue_error"):
        lines.append(f"  warning: no queue state, from {'sacct and ' if result['accounting'] else ''}the run "
                     f"manifests only: {result['queue_error']}")
    for row in result["rows"]:
        state = row["state"] + exit_text(row) + (f" ({row['reason']})" if row["reason"] and row["reason"] not in ("None", "") else "")
        run = (f"run {row['run_status']}: {row['run_dir']}" if row["run_dir"]
               else "run starting (no manifest yet)" if row["run_status"] == "starting"
               else row.get("outputs") or "no run yet")
        lines.append(f"  {row['name']:22s} job {row['job_id']:10s} {state:32s} {run}")
        if row["missing"]:
            lines.append(f"      outputs missing or changed: {', '.join(row['missing'])}")
        if row["run_status"] == "interrupted":
            lines.append(f"      INTERRUPTED (SIGTERM: time limit, preemption or scancel); submit again to rerun it; "
                         f"log: {row['log']}")
        elif row["state"] in FAILED_STATES and row["state"] != "CANCELLED" or row["run_status"] == "failed":
            err = row.get("error") or {}
            what = f": {err.get('ename')}: {err.get('evalue')}" if err else ""
            lines.append(f"      FAILED{what}; log: {row['log']}")
        if row["cancelled_because"]:
            lines.append(f"      cancelled: it waited (afterok) on failed job {', '.join(row['cancelled_because'])}")
    for s in record.get("skipped") or []:
        lines.append(f"  {s['experiment']:22s} skipped at submission: {s['reason']}"
                     + (f" ({s['run_dir']})" if s.get("run_dir") else ""))
    for r in record.get("reused") or []:
        lines.append(f"  {r['experiment']:22s} waited on job {r['job_id']} of submission {r['submission']}")
    counts: dict[str, int] = {}
    for row in result["rows"]:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    lines.append("  " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def cancel_dependants(job_id: str, log=print) -> list[str]:
    """Cancel the pending jobs that wait (afterok) on ``job_id``, and theirs, transitively.

    Called by a failed job's script: their dependency can never be satisfied.
    """
    proc = run_command(["squeue", "-h", "-t", "PENDING", "-o", "%i|%F|%E"])
    if proc.returncode != 0:
        raise SlurmError(f"squeue failed: {proc.stderr.strip()}")
    pending = []
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            pending.append((parts[0], parts[1], set(re.findall(r":(\d+)", parts[2]))))
    failed, cancelled = {str(job_id)}, []
    changed = True
    while changed:
        changed = False
        for jid, array_id, parents in pending:
            if array_id not in failed and parents & failed:
                failed.add(array_id)
                cancelled.append(array_id)
                changed = True
    if cancelled:
        run_command(["scancel", *cancelled])
        log(f"[seglab] cancelled job(s) {', '.join(cancelled)}: they waited on failed job {job_id}")
    return cancelled
