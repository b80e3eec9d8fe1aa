"""Submitting a plan: render each job's script into ``runs/_slurm/<submission-id>/`` and ``sbatch`` it in order.

``submission.json`` lists only the jobs sbatch accepted (written after each one). When sbatch
refuses a job, the jobs of that submission already queued are cancelled and the error carries
sbatch's own text.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import shutil
import subprocess
from typing import Any

from seglab.core import io
from seglab.core import paths
from seglab.slurm.cluster import Cluster
from seglab.slurm.commands import SlurmError, run_command, sbatch
from seglab.slurm.plan import Plan, describe
from seglab.slurm.script import array_ranges, render
from seglab.slurm.submissions import RECORD, submissions_dir
from seglab.workflow.runs import utc_now


def submit(plan: Plan, cluster: Cluster, seglab_command: str, dry_run: bool = False, log=print) -> dict | None:
    """Render and submit the plan's jobs in order; return the submission record.

    With ``dry_run``: print every script and the graph, write and submit nothing.
    When sbatch refuses a job, the jobs of this submission already accepted are
    cancelled, the record says so, and SlurmError carries sbatch's message.
    """
    root = paths.project_root()
    # Milliseconds in the id: submissions sort in the order they were made, even within one second.
    now = _dt.datetime.now(_dt.timezone.utc)
    submission_id = now.strftime("%Y%m%dT%H%M%S") + f".{now.microsecond // 1000:03d}Z-" + secrets.token_hex(2)
    submission_dir = submissions_dir() / submission_id
    if dry_run:
        for job in plan.jobs:
            job.script = submission_dir / f"{job.stem}.sbatch"
            dep = [f"<{n}>" for n in job.needs] + job.after
            log(f"# ---- {job.script.name}" + (f"  (sbatch --dependency=afterok:{':'.join(dep)})" if dep else ""))
            log(render(job, submission_dir, submission_id, cluster, seglab_command))
        log(f"[seglab] dry run: nothing submitted. Graph{' (profile ' + plan.profile + ')' if plan.profile else ''}:")
        log(describe(plan))
        return None
    if not plan.jobs:
        log("[seglab] nothing to submit:\n" + describe(plan))
        return None
    if shutil.which("sbatch") is None:
        run_command(["sbatch"])  # raises the not-on-PATH error before anything is written
    (submission_dir / "logs").mkdir(parents=True)
    record: dict[str, Any] = {
        "id": submission_id, "created": utc_now(), "command": seglab_command, "profile": plan.profile,
        "root": str(root), "cluster_file": str(cluster.source), "host": os.uname().nodename,
        "status": "submitting", "jobs": [], "skipped": plan.skipped, "reused": plan.reused, "error": None,
    }
    ids: dict[str, str] = {}
    for job in plan.jobs:
        job.script = submission_dir / f"{job.stem}.sbatch"
        io.write_text(job.script, render(job, submission_dir, submission_id, cluster, seglab_command))
        job.script.chmod(0o755)
        dependency = [ids[n] for n in job.needs] + list(job.after)
        try:
            job.job_id = sbatch(job.script, dependency)
        except SlurmError as exc:
            cancelled = [j["job_id"] for j in record["jobs"]]
            if cancelled:
                subprocess.run(["scancel", *cancelled], capture_output=True, text=True, timeout=60)
                for j in record["jobs"]:
                    j["cancelled"] = "submission aborted"
                record.update(status="aborted", error=str(exc), ended=utc_now())
                io.write_json(submission_dir / RECORD, record)
                raise SlurmError(f"{exc}. Cancelled the job(s) of this submission already queued "
                                 f"({', '.join(cancelled)}); record: {os.path.relpath(submission_dir, root)}") from None
            shutil.rmtree(submission_dir, ignore_errors=True)   # nothing was submitted: keep no trace
            raise
        ids[job.name] = job.job_id
        record["jobs"].append({
            "name": job.name, "kind": job.kind, "experiment": job.experiment, "profile": job.profile,
            "job_id": job.job_id, "dependency": dependency, "script": os.path.relpath(job.script, root),
            "log": os.path.relpath(submission_dir / "logs" / (f"{job.stem}-{job.job_id}_%a.out" if job.tasks
                                                               else f"{job.stem}-{job.job_id}.out"), root),
            "command": job.command, "resources": job.resources,
            "grid": job.grid,
            "array": None if not job.tasks else {
                "spec": array_ranges(job.task_ids), "n_tasks": len(job.tasks), "submitted_tasks": job.task_ids,
                "tasks": [{k: t[k] for k in ("id", "label", "args", "overrides", "done_run", "note", "key") if k in t}
                          for t in job.tasks]},
            "meta": job.meta or None, "submitted": utc_now(),
        })
        io.write_json(submission_dir / RECORD, record)   # after each accepted job: the record never lies
        log(f"[seglab] submitted {job.name}: job {job.job_id}"
            + (f" (afterok {':'.join(dependency)})" if dependency else "") + (f"; {job.note}" if job.note else ""))
    record["status"] = "submitted"
    io.write_json(submission_dir / RECORD, record)
    log(f"[seglab] submission {submission_id}: {len(plan.jobs)} job(s); scripts and logs in "
        f"{os.path.relpath(submission_dir, root)}; watch with `seglab status`")
    return record
