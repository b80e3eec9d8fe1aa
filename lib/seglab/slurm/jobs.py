"""Submitting the compendium to Slurm: sbatch scripts, dependencies, arrays, status.

Slurm is the engine; this module only writes job scripts and calls ``sbatch``,
``squeue``, ``scontrol``, ``sacct`` and ``scancel``.

- :func:`load_cluster` reads ``slurm/cluster.yaml`` (validated like params files).
- :func:`plan_chain` decides, for a profile, which notebooks need a job (a notebook
  whose last run is complete and up to date is skipped, one already queued is
  reused), which run as arrays (``jobs.<name>.array`` in cluster.yaml: one task per
  grid point; finished tasks skipped) and which jobs wait on which (``afterok``,
  following ``needs`` in ``params/experiments.yaml``).
- :func:`submit` renders ``slurm/job.sbatch`` per job into a submission folder
  ``runs/_slurm/<submission-id>/`` and submits in order; ``submission.json`` lists
  only jobs that sbatch accepted. When sbatch refuses one, the jobs of that
  submission already queued are cancelled and the error carries sbatch's text.
- :func:`status` joins the queue (squeue; sacct where accounting exists) with the
  run manifests (which record ``SLURM_JOB_ID``, node, log and script paths).
- :func:`check_shards` is the merge step of sharded inference: every tile present
  exactly once across the shards' outputs.
- Prepare arrays (:func:`_plan_prepare`): before a notebook with heavy work
  (:mod:`seglab.workflow.prepare`: fine-tunes, inference shards), an array ``NN_name:prepare`` runs
  the items not yet cached, one per task; the notebook waits on it.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seglab import SeglabError
from seglab.core import io
from seglab.core import paths
from seglab.config.params import ParamsError, Schema, Spec, load_params, params_hash, read_yaml, validate

SUBMISSIONS = "_slurm"            # runs/_slurm/<submission-id>/
RECORD = "submission.json"
TEMPLATE = "job.sbatch"
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
SPECIAL_JOBS = ("predict", "merge", "prepare")
STAGES = ("prepare", "merge")   # per-notebook jobs: "<notebook>:prepare", "05_downstream:merge"
CHECK_FILE = "shards_check.json"   # what the merge step of sharded inference found

_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


class SlurmError(SeglabError):
    """Slurm refused or is unreachable; the message carries the command's own error text."""


# --------------------------------------------------------------------------- cluster.yaml

def _spec(key, type_, default, help_="", **kw) -> Spec:
    return Spec(key=key, type=type_, default=default, help=help_, **kw)


_RESOURCE_SPECS = [
    _spec("partition", "str", None, "sbatch --partition", nullable=True),
    _spec("account", "str", None, "sbatch --account", nullable=True),
    _spec("gpus", "int", 1, "GPUs per job (--gres=gpu:N)", min=0, max=64),
    _spec("gpu_type", "str", None, "GPU type in --gres=gpu:TYPE:N", nullable=True),
    _spec("cpus", "int", 4, "--cpus-per-task", min=1, max=1024),
    _spec("mem", "str", "16G", "--mem, e.g. 32G"),
    _spec("time", "str", "04:00:00", "--time, [days-]hours:minutes:seconds"),
    _spec("signal_before_s", "int", 300, "seconds of warning (SIGTERM) before the time limit", min=0),
    _spec("requeue", "bool", True, "--requeue after preemption"),
    _spec("max_parallel", "int", None, "at most N array tasks at once", nullable=True, min=1),
    _spec("extra_sbatch", "list", [], "further sbatch options", items="str"),
]
CLUSTER_SCHEMA = Schema(name="cluster.yaml", source=Path("slurm/cluster.yaml"), specs={
    **{s.key: s for s in _RESOURCE_SPECS},
    "activate": _spec("activate", "str", None, "shell line that activates the environment", nullable=True),
    "setup": _spec("setup", "list", [], "further shell lines run before seglab", items="str"),
    "jobs": _spec("jobs", "mapping", {}, "per-notebook (or predict/merge) resources and arrays"),
})
JOB_SCHEMA = Schema(name="cluster.yaml jobs entry", source=Path("slurm/cluster.yaml"), specs={
    **{s.key: Spec(**{**s.__dict__, "default": None, "nullable": True}) for s in _RESOURCE_SPECS},
    "array": _spec("array", "mapping", None, "{grid: {key: [values]}, profiles: [..]}", nullable=True),
})


@dataclass
class Cluster:
    source: Path
    settings: dict
    jobs: dict = field(default_factory=dict)   # name -> validated entry (None = not set)

    def resources(self, name: str) -> dict:
        """The settings for job ``name``: defaults, then its ``jobs`` entry.

        A notebook's stage (``02_label_efficiency:prepare``) takes the defaults, then the
        entry of the stage (``prepare``), then its own entry.
        """
        out = dict(self.settings)
        layers = [name]
        if ":" in name:
            layers = [name.split(":", 1)[1], name]
        for layer in layers:
            for key, value in (self.jobs.get(layer) or {}).items():
                if value is not None and key != "array":
                    out[key] = value
        return out

    def array_grid(self, name: str, profile: str) -> dict | None:
        entry = (self.jobs.get(name) or {}).get("array")
        if not entry:
            return None
        profiles = entry.get("profiles")
        if profiles is not None and profile not in profiles:
            return None
        return entry["grid"]


def cluster_file(path: str | os.PathLike | None = None) -> Path:
    if path:
        return Path(path)
    env = os.environ.get("SEGLAB_CLUSTER")
    return Path(env) if env else paths.project_root() / "slurm" / "cluster.yaml"


def load_cluster(path: str | os.PathLike | None = None, experiments: list[str] | None = None) -> Cluster:
    """Read and check ``slurm/cluster.yaml`` (or ``$SEGLAB_CLUSTER``, or ``path``).

    A typo fails with the file, the key and the allowed keys; ``jobs`` entries must
    name a notebook of ``params/experiments.yaml`` (or ``predict``/``merge``).
    """
    source = cluster_file(path)
    if not source.is_file():
        raise SeglabError(f"{source}: cluster settings not found; copy slurm/cluster.yaml from the "
                          "compendium or pass --cluster FILE")
    raw = read_yaml(source)
    settings = validate(raw, Schema(CLUSTER_SCHEMA.name, source, CLUSTER_SCHEMA.specs), source)
    _check_formats(settings, source, "")
    if experiments is None:
        from seglab.workflow.chain import load_experiments
        experiments = [e.name for e in load_experiments()]
    jobs = {}
    for name, entry in (settings.pop("jobs") or {}).items():
        allowed = [*experiments, *SPECIAL_JOBS]
        if str(name) not in allowed and not (":" in str(name) and str(name).split(":", 1)[0] in experiments
                                             and str(name).split(":", 1)[1] in STAGES):
            import difflib
            close = difflib.get_close_matches(str(name), allowed, n=1)
            raise ParamsError(f"{source}: jobs: unknown job '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                              + f"; allowed: {', '.join(allowed)} (notebooks of params/experiments.yaml, predict, merge, "
                              "prepare, or NN_name:prepare)")
        entry = validate(entry or {}, Schema(f"jobs.{name}", source, JOB_SCHEMA.specs), f"{source}: jobs.{name}")
        _check_formats(entry, source, f"jobs.{name}.")
        if entry.get("array") is not None:
            if ":" in str(name) or name in SPECIAL_JOBS:
                raise ParamsError(f"{source}: jobs.{name}.array: only a notebook's entry takes an array grid "
                                  "(prepare arrays are made from the notebook's work items)")
            entry["array"] = _check_array(entry["array"], source, name)
        jobs[name] = entry
    return Cluster(source=source, settings=settings, jobs=jobs)


def _check_formats(settings: dict, source: Path, prefix: str) -> None:
    if settings.get("mem") is not None and not _MEM_RE.match(str(settings["mem"])):
        raise ParamsError(f"{source}: key '{prefix}mem': {settings['mem']!r} is not a memory size like 16G or 8000M")
    if settings.get("time") is not None and not _TIME_RE.match(str(settings["time"])):
        raise ParamsError(f"{source}: key '{prefix}time': {settings['time']!r} is not a Slurm time like 04:00:00 or 1-00:00:00")


def _check_array(array: dict, source: Path, name: str) -> dict:
    where = f"{source}: jobs.{name}.array"
    unknown = set(array) - {"grid", "profiles"}
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: grid, profiles")
    grid = array.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ParamsError(f"{where}.grid: needs a mapping of param -> list of values, e.g. {{seed: [0, 1, 2]}}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ParamsError(f"{where}.grid.{key}: needs a non-empty list of values")
    profiles = array.get("profiles")
    if profiles is not None and not (isinstance(profiles, list) and all(isinstance(p, str) for p in profiles)):
        raise ParamsError(f"{where}.profiles: needs a list of profile names, e.g. [full]")
    return {"grid": grid, "profiles": profiles}


def grid_tasks(grid: dict[str, list]) -> list[dict]:
    """Array task id -> overrides: the product of the grid in key order (task 0 = first values).

    >>> grid_tasks({"budget": [10, 20], "repeat": [0, 1]})[1]
    {'budget': 10, 'repeat': 1}
    """
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def parse_grid(items: list[str] | None) -> dict | None:
    """``--array KEY=[v1,v2]`` from the command line (values read as YAML lists)."""
    import yaml
    if not items:
        return None
    grid = {}
    for text in items:
        key, sep, value = text.partition("=")
        try:
            values = yaml.safe_load(value) if sep else None
        except yaml.YAMLError:
            values = None
        if not sep or not isinstance(values, list) or not values:
            raise SeglabError(f"--array {text!r}: expected KEY=[v1, v2, ...], e.g. --array seed=[0,1,2]")
        grid[key.strip()] = values
    return grid


# --------------------------------------------------------------------------- running Slurm's commands

def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
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
    proc = _run(cmd)
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
    proc = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(sorted(set(job_ids))),
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
        proc = _run(cmd, timeout=30)
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
    proc = _run(["scancel", *job_ids])
    if proc.returncode != 0:
        raise SlurmError(f"scancel {' '.join(job_ids)} failed: {proc.stderr.strip()}")


def cancel_dependants(job_id: str, log=print) -> list[str]:
    """Cancel the pending jobs that wait (afterok) on ``job_id``, and theirs, transitively.

    Called by a failed job's script: their dependency can never be satisfied.
    """
    proc = _run(["squeue", "-h", "-t", "PENDING", "-o", "%i|%F|%E"])
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
        _run(["scancel", *cancelled])
        log(f"[seglab] cancelled job(s) {', '.join(cancelled)}: they waited on failed job {job_id}")
    return cancelled


# --------------------------------------------------------------------------- planning

@dataclass
class Job:
    """One sbatch submission: a notebook run, an array of them, a predict array or a merge."""

    name: str                      # file stem: "10_probe", "predict", "merge"
    kind: str                      # notebook | predict | merge
    title: str
    command: list[str]             # seglab arguments before the per-task ones
    resources: dict
    experiment: str | None = None
    profile: str | None = None
    tasks: list[dict] | None = None          # array: [{id, overrides|args, label}]
    task_ids: list[int] | None = None        # the ids still to run (finished ones skipped)
    needs: list[str] = field(default_factory=list)       # names of jobs in this plan it waits on
    after: list[str] = field(default_factory=list)       # ids of already-queued jobs it waits on
    job_id: str | None = None
    script: Path | None = None
    note: str = ""
    meta: dict = field(default_factory=dict)  # predict/merge: tiles, out, n_shards (for status)
    grid: dict | None = None                  # the array's grid (param -> values), recorded

    @property
    def stem(self) -> str:
        """File name of its script and logs ("02_label_efficiency:prepare" -> "02_label_efficiency.prepare")."""
        return self.name.replace(":", ".")


@dataclass
class Plan:
    profile: str | None
    jobs: list[Job]
    skipped: list[dict]          # [{experiment, reason, run_dir}]
    reused: list[dict]           # [{experiment, job_id, submission}] already in the queue


def _task_args(overrides: dict) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def done_run_for(experiment, profile: str, overrides: dict | None) -> Path | None:
    """A finished run with these params whose inputs, upstream runs and outputs are unchanged."""
    from seglab.workflow import runs
    root = paths.project_root()
    params, _ = load_params(experiment.name, profile, overrides, root)
    wanted = params_hash(params)
    inputs = upstream = None
    for run_dir in reversed(runs.list_runs(experiment.name, profile)):
        m = runs.read_manifest(run_dir)
        if not m or m.get("status") != "done" or m.get("params_hash") != wanted:
            continue
        if inputs is None:
            inputs = runs.input_hashes(experiment, params, root)
            upstream = runs.upstream_runs(experiment, profile)
        if m.get("inputs") == inputs and m.get("upstream", {}) == upstream \
                and not any(runs.check_outputs(run_dir, m).values()):
            return run_dir
    return None


def queued_jobs(experiment: str, profile: str, array_spec: dict | None) -> list[dict]:
    """Jobs of earlier submissions for this notebook and profile that are still pending or running."""
    candidates = []
    for record in iter_submissions():
        for job in record.get("jobs", []):
            if job.get("experiment") == experiment and job.get("profile") == profile \
                    and job.get("kind", "notebook") == "notebook" \
                    and job.get("grid") == array_spec and job.get("job_id"):
                candidates.append({**job, "submission": record["id"]})
    if not candidates or shutil.which("squeue") is None:   # a dry run away from the cluster
        return []
    states = queue_states([c["job_id"] for c in candidates])
    return [c for c in candidates if states.get(c["job_id"], {}).get("state") in ACTIVE_STATES]


def plan_chain(profile: str, targets: list[str] | None, cluster: Cluster, force: bool = False,
               grid_override: dict | None = None, upstream: bool = True,
               check_queue: bool = True, prepare_arrays: bool = True) -> Plan:
    """What to submit for ``targets`` (default: the whole chain) in ``profile``.

    A notebook is skipped when a complete, up-to-date run exists (unless ``force`` or
    something it needs is submitted now); reused when an earlier submission's job
    for it is still queued; otherwise it becomes a job (an array when cluster.yaml
    or ``grid_override`` gives it a grid), waiting ``afterok`` on the jobs of its needs.
    All params (every array task's) are validated before anything is submitted.

    With ``prepare_arrays``, a notebook with heavy work (:mod:`seglab.workflow.prepare`: fine-tunes,
    inference shards) not yet cached gets an array job ``<notebook>:prepare`` before it
    (task id = item index; see :func:`_plan_prepare`), and the notebook waits on it.
    """
    from seglab.workflow.chain import find_experiment, load_experiments, with_upstream
    root = paths.project_root()
    chain = load_experiments(root)
    if targets:
        wanted = [find_experiment(t, root) for t in targets]
        chain = with_upstream(wanted, root) if upstream else wanted
    plan = Plan(profile=profile, jobs=[], skipped=[], reused=[])
    pending: dict[str, list[str]] = {}        # experiment -> job ids already queued (reused)
    planned: set[str] = set()
    claimed: dict[str, str] = {}              # prepare item key -> the prepare job of this plan that runs it
    busy_items = queued_prepare_items() if check_queue and prepare_arrays else {}
    for e in chain:
        grid = grid_override if (grid_override and targets and e.name in {find_experiment(t, root).name for t in targets}) \
            else cluster.array_grid(e.name, profile)
        tasks = grid_tasks(grid) if grid else None
        for overrides in tasks or [{}]:       # validate every task's params now, not on the node
            load_params(e.name, profile, overrides or None, root)
        upstream_busy = [n for n in e.needs if n in planned or n in pending]
        if check_queue and not force:
            queued = queued_jobs(e.name, profile, grid)
            if queued:
                pending[e.name] = [q["job_id"] for q in queued]
                plan.reused.extend({"experiment": e.name, "job_id": q["job_id"], "submission": q["submission"]}
                                   for q in queued)
                continue
        missing = []
        if targets and not upstream:   # one notebook: what it needs must be done or queued
            from seglab.workflow import runs
            for n in e.needs:
                if n in planned or n in pending:
                    continue
                queued = queued_jobs(n, profile, cluster.array_grid(n, profile)) if check_queue else []
                if queued:
                    pending[n] = [q["job_id"] for q in queued]
                    upstream_busy.append(n)
                elif runs.latest_run(n, profile) is None:
                    missing.append(n)
        if missing:
            raise SeglabError(f"{e.name} needs {', '.join(missing)}, which has no finished run in profile "
                              f"'{profile}' and no job in the queue; submit it first or use "
                              f"`seglab submit-all --profile {profile} --only {e.name}`")
        job = Job(name=e.name, kind="notebook", title=f"{e.name} ({profile}): {e.title}",
                  command=["seglab", "run", e.name, "--profile", profile], resources=cluster.resources(e.name),
                  experiment=e.name, profile=profile,
                  needs=[n for n in e.needs if n in planned],
                  after=[j for n in e.needs for j in pending.get(n, [])])
        if tasks:
            job.grid = grid
            job.tasks = [{"id": i, "overrides": o, "args": _task_args(o),
                          "label": ", ".join(f"{k}={v}" for k, v in o.items())} for i, o in enumerate(tasks)]
            todo = []
            for t in job.tasks:
                done = None if (force or upstream_busy) else done_run_for(e, profile, t["overrides"])
                if done is None:
                    todo.append(t["id"])
                else:
                    t["done_run"] = os.path.relpath(done, root)
            if not todo:
                plan.skipped.append({"experiment": e.name, "reason": f"all {len(tasks)} array tasks done",
                                     "run_dir": None})
                continue
            job.task_ids = todo
            job.note = f"array of {len(tasks)} tasks" + (f", {len(tasks) - len(todo)} done and skipped"
                                                         if len(todo) < len(tasks) else "")
        else:
            if not force and not upstream_busy:
                from seglab.workflow import runs
                fresh = runs.is_up_to_date(e, profile)
                if fresh is not None:
                    plan.skipped.append({"experiment": e.name, "reason": "up to date",
                                         "run_dir": os.path.relpath(fresh, root)})
                    continue
            if prepare_arrays:
                _plan_prepare(e, profile, cluster, job, plan, claimed, bool(upstream_busy), root, busy_items)
        plan.jobs.append(job)
        planned.add(e.name)
    return plan


def queued_prepare_items() -> dict[str, str]:
    """Prepare items of earlier submissions whose array task is still pending or running: {item key: array job id}."""
    tasks = []
    for record in iter_submissions():
        for job in record.get("jobs", []):
            if job.get("kind") == "prepare" and job.get("job_id") and job.get("array"):
                keys = {str(t["id"]): t.get("key") for t in job["array"].get("tasks", [])}
                tasks += [(job["job_id"], str(t), keys.get(str(t))) for t in job["array"].get("submitted_tasks", [])]
    if not tasks or shutil.which("squeue") is None:
        return {}
    states = queue_states(sorted({jid for jid, _, _ in tasks}))
    out = {}
    for jid, tid, key in tasks:
        q = states.get(f"{jid}_{tid}") or (states.get(jid, {}).get("tasks") or {}).get(tid)
        if key and q and q.get("state") in ACTIVE_STATES:
            out[key] = jid
    return out


def _plan_prepare(e, profile: str, cluster: Cluster, job: Job, plan: Plan, claimed: dict[str, str],
                  upstream_busy: bool, root: Path, busy_items: dict[str, str] | None = None) -> None:
    """Put ``<notebook>:prepare`` (and for 05 ``05_downstream:merge``) into ``plan`` before notebook ``job``.

    Task ``i`` of the array runs ``seglab prepare NN --task i --expect-label <label>``: item ``i``
    of :func:`seglab.workflow.prepare.work_items` (one list, shared with the notebook's library calls).
    Items already cached are left out (unless a notebook they need is submitted now: the
    cache may change, so every item is submitted and a task whose output is there skips it);
    an item another prepare array of this plan runs (the generic model of 01, 02 and 06) is
    left to that one, and the notebook waits on it too; so is an item whose task of an earlier
    submission is still queued (two jobs never train one model folder at once). When the items cannot be listed yet
    (E6 with every marker of a cohort 00 has not made), one job runs them all in turn.
    The notebook job then waits ``afterok`` on its prepare job(s).
    """
    from seglab.workflow import prepare

    if not prepare.has_items(e):
        return
    params, _ = load_params(e.name, profile, None, root)
    name = f"{e.name}:prepare"
    prep = Job(name=name, kind="prepare", title=f"{e.name} ({profile}): prepare (fine-tunes, inference shards)",
               command=["seglab", "prepare", e.name, "--profile", profile], resources=cluster.resources(name),
               experiment=e.name, profile=profile, needs=list(job.needs), after=list(job.after))
    items = None
    if not upstream_busy or prepare.listable_before_upstream(e, params):
        try:
            items = prepare.work_items(e, params)
        except prepare.ItemsUnknown:
            items = None
    if items is None:
        prep.command.append("--all")
        prep.note = "one job, items in turn (the item list needs what an upstream notebook makes)"
        plan.jobs.append(prep)
        job.needs.append(name)
        return
    tasks, todo = [], []
    for it in items:
        t = {"id": it.index, "label": it.label, "key": it.key,
             "args": ["--task", str(it.index), "--expect-label", it.label]}
        if it.key in claimed:
            t["note"] = f"run by {claimed[it.key]}"
            if claimed[it.key] not in job.needs:
                job.needs.append(claimed[it.key])
        elif it.key in (busy_items or {}):
            t["note"] = f"queued earlier: job {busy_items[it.key]}"
            if busy_items[it.key] not in job.after:
                job.after.append(busy_items[it.key])
        elif not upstream_busy and it.done():
            t["note"] = "cached"
        else:
            todo.append(it.index)
            claimed[it.key] = name
        tasks.append(t)
    if not todo:
        job.note = f"{len(items)} prepare items cached" if all(t.get("note") == "cached" for t in tasks) \
            else "prepare items cached or run by another prepare array"
        return
    prep.tasks, prep.task_ids = tasks, todo
    prep.note = f"prepare array: {len(todo)} of {len(items)} items" + (
        f" ({len(items) - len(todo)} cached or run elsewhere)" if len(todo) < len(items) else "")
    plan.jobs.append(prep)
    job.needs.append(name)
    if e.name in prepare.CHECKED:
        check = Job(name=f"{e.name}:merge", kind="check", title=f"{e.name} ({profile}): every tile exactly once",
                    command=["seglab", "prepare", e.name, "--profile", profile, "--check"],
                    resources=cluster.resources(f"{e.name}:merge"), experiment=e.name, profile=profile,
                    needs=[name], note="merge check: every tile of the shards exactly once")
        plan.jobs.append(check)
        job.needs.append(check.name)


def plan_predict(model: str, tiles: str, out: str, shards: int, cluster: Cluster,
                 extra_args: list[str] | None = None, force: bool = False) -> Plan:
    """An array of ``shards`` ``seglab predict --shard I/N`` tasks and a merge job after it.

    A shard whose outputs are complete (:func:`shard_complete`) is skipped on
    resubmission; ``seglab predict`` itself skips finished tiles, so a shard killed
    midway resumes where it stopped. While an earlier submission's shards for the same
    tiles, output and N are still queued, nothing is submitted (two jobs never write
    one shard at once).
    """
    if shards < 1:
        raise SeglabError(f"--shards {shards}: needs at least 1")
    # The job runs from the project root: pass absolute paths (given relative to the current folder).
    tiles, out = str(Path(tiles).resolve()), str(Path(out).resolve())
    if Path(model).suffix in (".pt", ".pth") and Path(model).exists():
        model = str(Path(model).resolve())
    list_tiles(tiles)   # a missing or empty tiles folder fails here, not on the node
    meta = {"tiles": tiles, "out": out, "n_shards": shards}
    if not force and shutil.which("squeue") is not None:
        earlier = [(j["job_id"], r["id"]) for r in iter_submissions() for j in r.get("jobs", [])
                   if j.get("kind") in ("predict", "merge") and j.get("meta") == meta]
        states = queue_states([jid for jid, _ in earlier]) if earlier else {}
        busy = [(jid, sid) for jid, sid in earlier if states.get(jid, {}).get("state") in ACTIVE_STATES]
        if busy:
            return Plan(profile=None, jobs=[], skipped=[], reused=[
                {"experiment": "predict/merge", "job_id": jid, "submission": sid} for jid, sid in busy])
    base = ["seglab", "predict", "--model", model, "--tiles", tiles, "--out", out, *(extra_args or [])]
    tasks = [{"id": i, "args": ["--shard", f"{i}/{shards}"], "label": f"shard {i} of {shards}"} for i in range(shards)]
    todo = list(range(shards))
    if not force:
        todo = [i for i in todo if not shard_complete(tiles, out, i, shards)]
    jobs = []
    if todo:
        jobs.append(Job(name="predict", kind="predict", title=f"predict {model} on {tiles} ({shards} shards)",
                        command=base, resources=cluster.resources("predict"), tasks=tasks, task_ids=todo,
                        meta=meta,
                        note=f"array of {shards} shards" + (f", {shards - len(todo)} complete and skipped"
                                                            if len(todo) < shards else "")))
    merge = Job(name="merge", kind="merge", title=f"merge and check the {shards} shards of {out}",
                command=["seglab", "merge-shards", "--tiles", tiles, "--out", out, "--shards", str(shards)],
                resources=cluster.resources("merge"), needs=["predict"] if todo else [],
                meta=meta)
    skipped = [] if todo else [{"experiment": "predict", "reason": f"all {shards} shards complete", "run_dir": None}]
    if not todo and not force and _merge_ok(out, shards):
        skipped.append({"experiment": "merge", "reason": "shards_check.json says every tile exactly once",
                        "run_dir": None})
    else:
        jobs.append(merge)
    return Plan(profile=None, jobs=jobs, skipped=skipped, reused=[])


# --------------------------------------------------------------------------- rendering and submitting

def template_path(name: str = TEMPLATE) -> Path:
    """``<root>/slurm/<name>``, else the copy beside this package's checkout."""
    for base in (paths.project_root() / "slurm", Path(__file__).resolve().parents[3] / "slurm"):
        if (base / name).is_file():
            return base / name
    raise SeglabError(f"sbatch template {name} not found in {paths.project_root() / 'slurm'}")


def sbatch_options(job: Job, log_dir: Path) -> list[str]:
    r = job.resources
    opts = [f"--job-name=seglab-{job.stem}" + (f"-{job.profile}" if job.profile else "")]
    if r.get("partition"):
        opts.append(f"--partition={r['partition']}")
    if r.get("account"):
        opts.append(f"--account={r['account']}")
    if r.get("gpus"):
        opts.append(f"--gres=gpu:{r['gpu_type'] + ':' if r.get('gpu_type') else ''}{r['gpus']}")
    opts += [f"--cpus-per-task={r['cpus']}", f"--mem={r['mem']}", f"--time={r['time']}"]
    if r.get("signal_before_s"):
        opts.append(f"--signal=B:TERM@{r['signal_before_s']}")
    opts.append("--requeue" if r.get("requeue") else "--no-requeue")
    if job.tasks:
        spec = _ranges(job.task_ids)
        opts.append(f"--array={spec}" + (f"%{r['max_parallel']}" if r.get("max_parallel") else ""))
        opts.append(f"--output={log_dir}/{job.stem}-%A_%a.out")
    else:
        opts.append(f"--output={log_dir}/{job.stem}-%j.out")
    opts.append(f"--chdir={paths.project_root()}")
    opts += list(r.get("extra_sbatch") or [])
    return opts


def _ranges(ids: list[int]) -> str:
    """``[0,1,2,5,7,8]`` -> ``0-2,5,7-8`` (sbatch --array syntax)."""
    out, ids = [], sorted(ids)
    start = prev = ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def render(job: Job, submission_dir: Path, submission_id: str, cluster: Cluster, seglab_command: str) -> str:
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_path().parent)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["q"] = lambda s: shlex.quote(str(s))
    log_dir = submission_dir / "logs"
    settings = cluster.resources(job.name)
    array = None
    if job.tasks:
        array = [{"id": t["id"], "args": shlex.join(t["args"]), "label": t["label"]}
                 for t in job.tasks if t["id"] in job.task_ids]
    return env.get_template(template_path().name).render(
        title=job.title, seglab_command=seglab_command, created=_now(), submission_id=submission_id,
        submission_dir=str(submission_dir), sbatch_options=sbatch_options(job, log_dir),
        root=str(paths.project_root()), script_path=str(submission_dir / f"{job.stem}.sbatch"),
        log_dir=str(log_dir), name=job.stem, array=array,
        activate=settings.get("activate"), setup=settings.get("setup") or [],
        command=shlex.join(job.command), command_text=shlex.join(job.command).replace('"', "'"))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def submissions_dir() -> Path:
    return paths.runs_dir() / SUBMISSIONS


def read_submission(submission_dir: Path) -> dict | None:
    """A submission's record, or None while there is none to read: the folder is made before
    the first sbatch answers and ``submission.json`` written after it (and after each job)."""
    try:
        record = json.loads((Path(submission_dir) / RECORD).read_bytes().decode("utf-8"))
    except (OSError, ValueError):   # missing; JSON or UTF-8 cut short
        return None
    return record if isinstance(record, dict) else None


def iter_submissions() -> list[dict]:
    """Every submission record, oldest first (folders without a readable record left out)."""
    base = submissions_dir()
    found = [read_submission(d) for d in sorted(base.iterdir()) if d.is_dir()] if base.is_dir() else []
    return [r for r in found if r is not None]


def describe(plan: Plan) -> str:
    """The dependency graph as text: one line per job, then what is skipped or reused."""
    lines = []
    for job in plan.jobs:
        waits = [f"afterok {n}" for n in job.needs] + [f"afterok job {j} (queued earlier)" for j in job.after]
        what = job.note or "one job"
        lines.append(f"  {job.name:24s} {what}" + (f"  <- {', '.join(waits)}" if waits else ""))
        for t in job.tasks or []:
            mark = "run " if t["id"] in (job.task_ids or []) else "done"
            why = t.get("done_run") or t.get("note")
            lines.append(f"      [{mark}] task {t['id']}: {t['label']}" + (f"  ({why})" if why else ""))
    for s in plan.skipped:
        lines.append(f"  {s['experiment']:24s} skipped: {s['reason']}" + (f" ({s['run_dir']})" if s.get("run_dir") else ""))
    for r in plan.reused:
        lines.append(f"  {r['experiment']:24s} already queued: job {r['job_id']} (submission {r['submission']})")
    return "\n".join(lines) if lines else "  (nothing)"


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
        _run(["sbatch"])  # raises the not-on-PATH error before anything is written
    (submission_dir / "logs").mkdir(parents=True)
    record: dict[str, Any] = {
        "id": submission_id, "created": _now(), "command": seglab_command, "profile": plan.profile,
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
                record.update(status="aborted", error=str(exc), ended=_now())
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
                "spec": _ranges(job.task_ids), "n_tasks": len(job.tasks), "submitted_tasks": job.task_ids,
                "tasks": [{k: t[k] for k in ("id", "label", "args", "overrides", "done_run", "note", "key") if k in t}
                          for t in job.tasks]},
            "meta": job.meta or None, "submitted": _now(),
        })
        io.write_json(submission_dir / RECORD, record)   # after each accepted job: the record never lies
        log(f"[seglab] submitted {job.name}: job {job.job_id}"
            + (f" (afterok {':'.join(dependency)})" if dependency else "") + (f"; {job.note}" if job.note else ""))
    record["status"] = "submitted"
    io.write_json(submission_dir / RECORD, record)
    log(f"[seglab] submission {submission_id}: {len(plan.jobs)} job(s); scripts and logs in "
        f"{os.path.relpath(submission_dir, root)}; watch with `seglab status`")
    return record


# --------------------------------------------------------------------------- status

def load_submission(ref: str | None = None) -> dict:
    """A submission record by id (or unique prefix); the newest when ``ref`` is None."""
    records = iter_submissions()
    if not records:
        raise SeglabError(f"no submissions yet under {submissions_dir()}; submit with `seglab submit-all`")
    if ref is None or ref == "latest":
        return records[-1]
    found = [r for r in records if r["id"].startswith(ref)]
    if len(found) != 1:
        raise SeglabError(f"submission {ref!r}: {'no match' if not found else 'ambiguous'}; known: "
                          + ", ".join(r["id"] for r in records[-10:]))
    return found[0]


def _manifests_by_job(record: dict) -> dict[str, tuple[Path, dict]]:
    """Run manifests of this submission's notebooks, keyed by Slurm job id (``123`` or ``123_4``)."""
    from seglab.workflow import runs
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
    from seglab.workflow import runs
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


def _exit_text(row: dict) -> str:
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
        state = row["state"] + _exit_text(row) + (f" ({row['reason']})" if row["reason"] and row["reason"] not in ("None", "") else "")
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


# --------------------------------------------------------------------------- sharded inference

def list_tiles(tiles_dir: str | os.PathLike) -> list[str]:
    """Tile ids under ``tiles_dir``, sorted, exactly as ``seglab predict`` deals them to shards."""
    from seglab.segment import predict
    return predict.list_tiles(tiles_dir)


def shard_of(index: int, n_shards: int) -> int:
    """The shard that takes the ``index``-th tile of the sorted list (round robin, as seglab.segment.predict)."""
    return index % n_shards


def _mask_ok(path: Path) -> bool:
    from seglab.segment import predict
    return predict._mask_complete(path)


def shard_complete(tiles_dir, out_dir, shard: int, n_shards: int) -> bool:
    """Whether shard ``shard`` of ``n_shards`` finished: its table lists all its tiles and every mask reads back."""
    from seglab.segment import predict
    try:
        names = list_tiles(tiles_dir)
    except (OSError, SeglabError):
        return False
    out = Path(out_dir)
    mine = [n for i, n in enumerate(names) if shard_of(i, n_shards) == shard]
    table = out / predict.table_name((shard, n_shards))
    if not mine or not table.is_file():
        return False
    import pandas as pd
    try:
        listed = set(pd.read_csv(table, sep="\t", dtype={"tile": str})["tile"])
    except Exception:  # noqa: BLE001  (a truncated table: the shard did not finish)
        return False
    return set(mine) <= listed and all(_mask_ok(out / f"{n}.tif") for n in mine)


@dataclass
class ShardCheck:
    n_tiles: int
    n_shards: int
    missing: list[str]                 # tiles no shard wrote
    duplicated: dict[str, list]        # tile -> the shards that each wrote it
    unexpected: list[str]              # rows for tiles not in the tiles folder
    per_shard: dict[int, int]          # shard -> tiles it reported

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)


def check_shards(tiles: list[str], shard_tables: dict[int, list[str]]) -> ShardCheck:
    """Every tile present exactly once across the shards' tables.

    Parameters
    ----------
    tiles : list of str
        Every tile name of the cohort.
    shard_tables : dict of int -> list of str
        For each shard index, the tile names its per-tile table lists (one row per
        tile it wrote; a tile listed twice by one shard counts twice).
    """
    seen: dict[str, list] = {}
    for shard, names in sorted(shard_tables.items()):
        for name in names:
            seen.setdefault(str(name), []).append(shard)
    wanted = set(map(str, tiles))
    return ShardCheck(n_tiles=len(wanted), n_shards=len(shard_tables),
                      missing=sorted(wanted - set(seen)),
                      duplicated={t: s for t, s in sorted(seen.items()) if len(s) > 1},
                      unexpected=sorted(set(seen) - wanted),
                      per_shard={s: len(n) for s, n in sorted(shard_tables.items())})


def read_shards_check(out_dir) -> dict | None:
    """``shards_check.json`` of a prediction folder (what the merge step found), or None while
    there is none to read (the merge has not run, or the file is cut short)."""
    try:
        check = json.loads((Path(out_dir) / CHECK_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return check if isinstance(check, dict) else None


def _merge_ok(out_dir, n_shards: int) -> bool:
    """A passing shards_check.json for this N, newer than every shard table."""
    from seglab.segment import predict
    out = Path(out_dir)
    check = read_shards_check(out)
    if check is None:
        return False
    tables = [out / predict.table_name((i, n_shards)) for i in range(n_shards)]
    newest = max((t.stat().st_mtime for t in tables if t.is_file()), default=float("inf"))
    return bool(check.get("ok")) and check.get("n_shards") == n_shards \
        and (out / CHECK_FILE).stat().st_mtime >= newest


def read_shard_tables(out_dir, n_shards: int) -> dict[int, list[str]]:
    """Tile ids per shard from ``seglab predict``'s tables ``tiles_shard-<I>-of-<N>.tsv`` in ``out_dir``.

    A shard without a table contributes nothing (its tiles then count as missing).
    Tables of another N (an earlier split) are ignored.
    """
    import pandas as pd
    from seglab.segment import predict
    out = Path(out_dir)
    result: dict[int, list[str]] = {}
    for i in range(n_shards):
        table = out / predict.table_name((i, n_shards))
        if not table.is_file():
            result[i] = []
            continue
        df = pd.read_csv(table, sep="\t", dtype={"tile": str})
        if "tile" not in df.columns:
            raise SeglabError(f"{table}: no 'tile' column; not a seglab predict table")
        result[i] = [str(t) for t in df["tile"]]
    return result


def merge_shards(tiles_dir, out_dir, n_shards: int, log=print) -> ShardCheck:
    """The merge job: every tile in exactly one shard table, with a mask that reads back.

    Writes ``shards_check.json`` (always) and ``tiles.tsv`` (the shard tables in one,
    sorted by tile; only when the check passes) in ``out_dir``. Raises SeglabError
    naming the missing, doubled, unknown and unreadable tiles.
    """
    import pandas as pd
    from seglab.segment import predict
    out = Path(out_dir)
    tiles = list_tiles(tiles_dir)
    tables = read_shard_tables(out, n_shards)
    check = check_shards(tiles, tables)
    listed = {t for names in tables.values() for t in names}
    broken = sorted(t for t in listed & set(tiles) if not _mask_ok(out / f"{t}.tif"))
    record = {**check.__dict__, "ok": check.ok and not broken, "unreadable_masks": broken,
              "tiles_dir": str(tiles_dir), "out_dir": str(out), "checked": _now()}
    io.write_json(out / CHECK_FILE, record)
    if not record["ok"]:
        raise SeglabError(
            f"{out}: the {n_shards} shards do not give every tile exactly once: {len(check.missing)} missing "
            f"{check.missing[:5]}, {len(check.duplicated)} in two shards {list(check.duplicated)[:5]}, "
            f"{len(check.unexpected)} not in {tiles_dir} {check.unexpected[:5]}, {len(broken)} masks unreadable "
            f"{broken[:5]}; submit the shards again (seglab submit-predict skips complete shards and "
            "seglab predict skips finished tiles)")
    merged = pd.concat([pd.read_csv(out / predict.table_name((i, n_shards)), sep="\t", dtype={"tile": str})
                        for i in range(n_shards)], ignore_index=True).sort_values("tile")
    io.write_table(out / "tiles.tsv", merged)
    log(f"[seglab] {check.n_tiles} tiles, each written by exactly one of {n_shards} shards; "
        f"table {out / 'tiles.tsv'}")
    return check
