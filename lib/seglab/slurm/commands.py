"""Slurm's own commands: ``sbatch``, ``squeue``, ``sacct``, ``scancel``, and what their output says.

Every call goes through :func:`run_command`, which turns a missing command or a controller that
does not answer into :class:`SlurmError` with a hint. :func:`queue_states` (squeue) and
:func:`sacct_states` (accounting; :func:`parse_sacct`) give job and array task states keyed
the same way (``123``, ``123_4``).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from seglab import SeglabError

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}


class SlurmError(SeglabError):
    """Slurm refused or is unreachable; the message carries the command's own error text."""


def run_command(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"'{cmd[0]}' is not on PATH: seglab needs Slurm's client commands here (run this on "
                         "the cluster's login node, or `module load slurm`; for a local test cluster: "
                         "scripts/slurm-local.sh start, then eval its `export SLURM_CONF=...` line)")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{shlex.join(cmd)}` did not answer within {timeout:.0f} s; is slurmctld reachable?") from None


def sbatch(script: Path, dependency: list[str] | None = None, extra: list[str] | None = None) -> str:
    """Submit ``script``; return the job id. Raises SlurmError with sbatch's own message when refused."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        # --kill-on-invalid-dep: a job whose parent failed is cancelled, not left pending forever,
        # whatever the cluster's DependencyParameters say.
        cmd += [f"--dependency=afterok:{':'.join(dependency)}", "--kill-on-invalid-dep=yes"]
    cmd += [*(extra or []), str(script)]
    proc = run_command(cmd)
    out = proc.stdout.strip()
    if proc.returncode != 0 or not re.match(r"^\d+", out):
        text = (proc.stderr.strip() or out or f"exit code {proc.returncode}").replace("\n", " | ")
        hint = ""
        if "partition" in text.lower():
            hint = "; check `partition` in slurm/cluster.yaml against `sinfo -s`"
        elif "dependency" in text.lower():
            hint = "; a job it waits on may have left the queue: run `seglab status`, then submit again"
        elif "gres" in text.lower() or "generic resource" in text.lower():
            hint = "; check `gpus`/`gpu_type` in slurm/cluster.yaml against `sinfo -o '%P %G'`"
        raise SlurmError(f"sbatch refused {script.name}: {text}{hint}")
    return out.split(";")[0]


def queue_states(job_ids: list[str]) -> dict[str, dict]:
    """State of jobs (and array tasks) the controller still knows: ``{id: {state, reason, node, ...}}``.

    Keys are plain job ids (``123``) and array tasks (``123_4``); array tasks are also
    filed under their array id with ``tasks``. Finished jobs stay visible for
    ``MinJobAge`` seconds; older ones come from :func:`sacct_states` where accounting exists.
    """
    if not job_ids:
        return {}
    proc = run_command(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(sorted(set(job_ids))),
                 "-o", "%i|%F|%K|%T|%r|%N|%E"])
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return {}
        raise SlurmError(f"squeue failed: {' | '.join(proc.stderr.strip().splitlines()[-2:])} (is this a "
                         "machine of the cluster, and SLURM_CONF right if the cluster needs it?)")
    out: dict[str, dict] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 7:
            continue
        jid, array_id, task_id, state, reason, node, dep = parts[:7]
        rec = {"id": jid, "state": state, "reason": reason, "node": node or None, "dependency": dep,
               "source": "squeue"}
        out[jid] = rec
        if task_id not in ("N/A", "", "4294967294") and "_" in jid:
            parent = out.setdefault(array_id, {"id": array_id, "tasks": {}, "source": "squeue"})
            parent.setdefault("tasks", {})[jid.split("_", 1)[1]] = rec
    for rec in out.values():
        if "tasks" in rec and "state" not in rec:
            rec["state"] = _combine([t["state"] for t in rec["tasks"].values()])
    return out


SACCT_FIELDS = "JobID,State,ExitCode,NodeList,Reason"
_SACCT_ID_RE = re.compile(r"^(?P<job>\d+)(?:_(?P<task>\d+|\[[^\]]*\]))?(?P<rest>.*)$")


def _task_ids(spec: str) -> list[str]:
    """Task ids of a pending array's summary row: ``[0-3%2]`` -> 0..3, ``[1,3,5-6]`` -> 1,3,5,6."""
    out = []
    for part in spec.strip("[]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _exit_code(text: str) -> tuple[int | None, int | None]:
    """sacct's ``ExitCode`` ``"3:0"`` -> (exit code 3, signal 0); ``"0:9"`` -> (0, signal 9)."""
    code, _, sig = text.partition(":")
    return (int(code) if code.isdigit() else None, int(sig) if sig.isdigit() else None)


def parse_sacct(text: str) -> dict[str, dict]:
    """Parse ``sacct -n -P -o JobID,State,ExitCode,NodeList,Reason`` (``-X`` or not).

    Returns records keyed as :func:`queue_states` keys them: plain jobs (``123``), array tasks
    (``123_4``) and, for each array, its id (``123``) with ``tasks`` ({task id: record}) and one
    combined state. Steps (``123.batch``, ``123_4.extern``, ``123.0``) are not jobs and are
    skipped. A pending array's summary row (``123_[0-3%2]``; also how a whole array cancelled
    before it started is recorded) stands for each of its tasks; a task's own row wins over it.
    ``State`` ``"CANCELLED by 1000"`` becomes ``CANCELLED`` with ``cancelled_by`` (the uid);
    ``ExitCode`` ``"2:0"`` becomes ``exit_code`` 2 and ``signal`` 0; ``NodeList``
    ``"None assigned"`` becomes None. A job listed twice (a requeued job, ``-D``) keeps its last row.
    """
    out: dict[str, dict] = {}
    summary: dict[str, dict] = {}     # task key -> record from a [..] summary row
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0]:
            continue
        parts += [""] * (5 - len(parts))
        m = _SACCT_ID_RE.match(parts[0])
        if not m or m["rest"]:        # a step (123.batch, 123.0, 123+0.batch) or not a job id at all
            continue
        words = parts[1].split()
        state = words[0].rstrip("+") if words else "UNKNOWN"
        exit_code, signal = _exit_code(parts[2])
        node = parts[3].strip()
        rec = {"id": parts[0], "state": state, "exit_code": exit_code, "signal": signal,
               "node": None if node in ("", "None assigned", "(null)") else node,
               "reason": parts[4] if parts[4] not in ("", "None") else None, "source": "sacct"}
        if len(words) >= 3 and words[1] == "by":
            rec["cancelled_by"] = words[2]
        job, task = m["job"], m["task"]
        if task is None:
            out[job] = rec
        elif task.startswith("["):
            for t in _task_ids(task):
                summary[f"{job}_{t}"] = {**rec, "id": f"{job}_{t}"}
        else:
            out[f"{job}_{task}"] = rec
    for key, rec in summary.items():
        out.setdefault(key, rec)
    arrays: dict[str, dict] = {}
    for key, rec in out.items():
        if "_" in key:
            job, task = key.split("_", 1)
            arrays.setdefault(job, {})[task] = rec
    for job, tasks in arrays.items():
        if job not in out:
            out[job] = {"id": job, "tasks": dict(sorted(tasks.items(), key=lambda kv: int(kv[0]))),
                        "state": _combine([t["state"] for t in tasks.values()]), "source": "sacct"}
    return out


def sacct_states(job_ids: list[str], why: list[str] | None = None) -> dict[str, dict] | None:
    """States of jobs and array tasks from accounting (:func:`parse_sacct`), finished ones included.

    None when the cluster has no accounting: no ``sacct`` here, or sacct fails (without a
    database it says "Slurm accounting storage is disabled"), or slurmdbd does not answer in
    time. ``why``, when given, receives the reason. Jobs sacct does not know are absent.
    """
    if not job_ids:
        return {}
    if shutil.which("sacct") is None:
        if why is not None:
            why.append("no sacct command here")
        return None
    # -j: sacct's time window is then all time; ids reused after a cold start of a cluster
    # give the newest job with that id (sacct's rule without -D).
    cmd = ["sacct", "-n", "-P", "-X", "-j", ",".join(sorted(set(job_ids))), "-o", SACCT_FIELDS]
    try:
        proc = run_command(cmd, timeout=30)
    except SlurmError as exc:          # slurmdbd down or slow: fall back to the queue
        if why is not None:
            why.append(str(exc))
        return None
    if proc.returncode != 0:
        if why is not None:
            why.append(" | ".join(proc.stderr.strip().splitlines()[-2:]) or f"sacct exit code {proc.returncode}")
        return None
    return parse_sacct(proc.stdout)


def _combine(states: list[str]) -> str:
    """One state for an array from its tasks' states (the worst first)."""
    for s in ("RUNNING", "PENDING"):
        if s in states:
            return s
    for s in states:
        if s in FAILED_STATES:
            return s
    return states[0] if states else "UNKNOWN"


def scancel(job_ids: list[str]) -> None:
    proc = run_command(["scancel", *job_ids])
    if proc.returncode != 0:
        raise SlurmError(f"scancel {' '.join(job_ids)} failed: {proc.stderr.strip()}")
