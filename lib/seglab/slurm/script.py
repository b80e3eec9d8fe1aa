"""One job's sbatch script, rendered from the Jinja2 template ``slurm/job.sbatch``.

:func:`sbatch_options` turns the job's resources (cluster.yaml) into ``#SBATCH`` lines,
:func:`array_ranges` its array task ids into ``--array`` syntax, :func:`render` fills the
template: environment, the task id -> arguments table of an array, the run and its SIGTERM
forwarding.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from seglab import SeglabError
from seglab.core import paths
from seglab.slurm.cluster import Cluster
from seglab.slurm.plan import Job
from seglab.workflow.runs import utc_now

TEMPLATE = "job.sbatch"


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
        spec = array_ranges(job.task_ids)
        opts.append(f"--array={spec}" + (f"%{r['max_parallel']}" if r.get("max_parallel") else ""))
        opts.append(f"--output={log_dir}/{job.stem}-%A_%a.out")
    else:
        opts.append(f"--output={log_dir}/{job.stem}-%j.out")
    opts.append(f"--chdir={paths.project_root()}")
    opts += list(r.get("extra_sbatch") or [])
    return opts


def array_ranges(ids: list[int]) -> str:
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
        title=job.title, seglab_command=seglab_command, created=utc_now(), submission_id=submission_id,
        submission_dir=str(submission_dir), sbatch_options=sbatch_options(job, log_dir),
        root=str(paths.project_root()), script_path=str(submission_dir / f"{job.stem}.sbatch"),
        log_dir=str(log_dir), name=job.stem, array=array, gpus=int(job.resources.get("gpus") or 0),
        activate=settings.get("activate"), setup=settings.get("setup") or [],
        command=shlex.join(job.command), command_text=shlex.join(job.command).replace('"', "'"))
