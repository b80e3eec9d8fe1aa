"""What to submit: jobs, their arrays and which waits on which (``afterok``), before anything is submitted.

- :func:`plan_chain`, for a profile: a notebook whose last run is complete and up to date is
  skipped, one already queued is reused; a notebook with a grid (``jobs.<name>.array`` in
  cluster.yaml, or ``--array``) becomes an array of one task per grid point (finished tasks
  skipped); jobs wait ``afterok`` on the jobs of their ``needs`` (``params/experiments.yaml``).
- Prepare arrays (:func:`_plan_prepare`): before a notebook with heavy work
  (:mod:`seglab.workflow.prepare`: fine-tunes, inference shards), an array ``NN_name:prepare``
  runs the items not yet cached, one per task; the notebook waits on it.
- :func:`plan_predict`: sharded inference, an array of ``seglab predict --shard I/N`` and a
  merge job (:func:`seglab.segment.shards.merge_shards`) after it.
- :func:`describe`: the plan as text (the dry run's graph).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from seglab import SeglabError
from seglab.core import paths
from seglab.config.params import load_params, params_hash
from seglab.segment.shards import merge_ok, shard_complete
from seglab.slurm.cluster import Cluster, grid_tasks
from seglab.slurm.commands import ACTIVE_STATES, queue_states
from seglab.slurm.submissions import iter_submissions
from seglab.workflow import runs
from seglab.workflow.chain import find_experiment, load_experiments, with_upstream


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


def _unmet_needs(e, profile: str, cluster: Cluster, planned: set, pending: dict, upstream_busy: list,
                 check_queue: bool) -> list[str]:
    """The notebooks ``e`` needs that are neither planned, queued nor done (a queued one is added
    to ``pending`` and ``upstream_busy``), when one notebook is submitted without its upstream."""
    missing = []
    for n in e.needs:
        if n in planned or n in pending:
            continue
        queued = queued_jobs(n, profile, cluster.array_grid(n, profile)) if check_queue else []
        if queued:
            pending[n] = [q["job_id"] for q in queued]
            upstream_busy.append(n)
        elif runs.latest_run(n, profile) is None:
            missing.append(n)
    return missing


def _array_tasks_to_run(job: Job, grid: dict, tasks: list[dict], e, profile: str, redo: bool, root: Path) -> bool:
    """Fill ``job``'s array tasks; the tasks with a done, up-to-date run are skipped unless ``redo``.
    False when every task is done (nothing to submit)."""
    job.grid = grid
    job.tasks = [{"id": i, "overrides": o, "args": _task_args(o),
                  "label": ", ".join(f"{k}={v}" for k, v in o.items())} for i, o in enumerate(tasks)]
    todo = []
    for t in job.tasks:
        done = None if redo else done_run_for(e, profile, t["overrides"])
        if done is None:
            todo.append(t["id"])
        else:
            t["done_run"] = os.path.relpath(done, root)
    if not todo:
        return False
    job.task_ids = todo
    job.note = f"array of {len(tasks)} tasks" + (f", {len(tasks) - len(todo)} done and skipped"
                                                 if len(todo) < len(tasks) else "")
    return True


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
            missing = _unmet_needs(e, profile, cluster, planned, pending, upstream_busy, check_queue)
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
            if not _array_tasks_to_run(job, grid, tasks, e, profile, force or bool(upstream_busy), root):
                plan.skipped.append({"experiment": e.name, "reason": f"all {len(tasks)} array tasks done",
                                     "run_dir": None})
                continue
        else:
            if not force and not upstream_busy:
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
    if prepare.checked(e):
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
    from seglab.segment import predict
    predict.list_tiles(tiles)   # a missing or empty tiles folder fails here, not on the node
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
    if not todo and not force and merge_ok(out, shards):
        skipped.append({"experiment": "merge", "reason": "shards_check.json says every tile exactly once",
                        "run_dir": None})
    else:
        jobs.append(merge)
    return Plan(profile=None, jobs=jobs, skipped=skipped, reused=[])


def plan_predict_3d(model: str, images: str, out: str, cluster: Cluster, extra_args: list[str] | None = None,
                    force: bool = False) -> Plan:
    """One array task per volume of ``images``: ``seglab predict-3d ... --case <case>`` (3D volumes).

    A volume whose ``<case>.tiff`` is in ``out`` is skipped on resubmission (``predict-3d`` writes it
    last, so a task killed midway runs again). No merge step: each task writes its own volume's files.
    """
    from seglab.data import volumes as vdata

    images, out = str(Path(images).resolve()), str(Path(out).resolve())
    if Path(model).suffix in (".pt", ".pth") and Path(model).exists():
        model = str(Path(model).resolve())
    cases = sorted(vdata.index_folder(images, "volumes"))   # a missing folder fails here, not on the node
    if not cases:
        raise SeglabError(f"{images}: no .tif/.tiff volumes to segment")
    tasks = [{"id": i, "args": ["--case", c], "label": f"volume {c}"} for i, c in enumerate(cases)]
    todo = [i for i, c in enumerate(cases) if force or not (Path(out) / f"{c}{vdata.OUT_SUFFIX}").is_file()]
    if not todo:
        return Plan(profile=None, jobs=[], reused=[], skipped=[
            {"experiment": "predict-3d", "reason": f"all {len(cases)} volumes predicted", "run_dir": None}])
    job = Job(name="predict-3d", kind="predict-3d", title=f"predict-3d {model} on {images} ({len(cases)} volumes)",
              command=["seglab", "predict-3d", "--model", model, "--images", images, "--out", out, *(extra_args or [])],
              resources=cluster.resources("predict"), tasks=tasks, task_ids=todo, meta={"images": images, "out": out},
              note=f"array of {len(cases)} volumes" + (f", {len(cases) - len(todo)} done and skipped"
                                                       if len(todo) < len(cases) else ""))
    return Plan(profile=None, jobs=[job], skipped=[], reused=[])


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
