"""Run directories, manifests and the papermill runner.

A run of notebook ``NN_name`` in profile ``P`` lives in
``runs/NN_name/P/<run-id>/`` and holds:

- ``NN_name.ipynb``: the executed notebook (partial when a cell failed);
- ``params.yaml``: the resolved, validated params;
- ``kernel.log``: what the cells printed;
- every table and figure the notebook wrote (through :class:`RunContext`);
- ``summary.json``: headline numbers for the index page;
- ``manifest.json``: git commit and dirty flag, package versions, hashes of
  the notebook, params and inputs, host, Slurm ids, start, end, status and
  every output with its sha256.

A run directory is created with an exclusive ``mkdir``, so two runs never
share or overwrite one; every file is written atomically (``seglab.core.io``).
Status is one of ``running``, ``done``, ``failed``, ``interrupted``. A run
whose process was killed outright (SIGKILL, node loss) keeps ``running`` in
its manifest; ``run-all`` treats it as not done and runs the notebook again.
A folder whose ``manifest.json`` cannot be read yet (made, manifest not yet
written) is a run ``starting``: :func:`read_manifest` gives None for it,
:func:`run_status` says ``starting``; readers skip it or show it so.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from seglab import SeglabError
from seglab.core import io
from seglab.core import paths
from seglab.workflow.chain import Experiment, find_experiment, load_experiments, with_upstream
from seglab.config.params import Resolved, load_params, load_schema, params_hash, resolve_params, validate
from seglab.config.settings import MaskSettings, TrainSettings

MANIFEST = "manifest.json"
STARTING = "starting"   # a run folder whose manifest.json is not written (or not readable) yet
SUMMARY = "summary.json"
TEST_EVALUATIONS = "test_evaluations.json"
KERNEL_NAME = "python3"
# Versions recorded in every manifest: the libraries whose behaviour the numbers depend on.
TRACKED_PACKAGES = ("seglab", "cellpose", "torch", "torchvision", "numpy", "scipy", "pandas",
                    "scikit-image", "statsmodels", "tifffile", "papermill", "nbconvert", "stardist")
SLURM_ENV = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID",
             "array_task_id": "SLURM_ARRAY_TASK_ID", "node": "SLURMD_NODENAME",
             "partition": "SLURM_JOB_PARTITION", "log": "SEGLAB_SLURM_LOG",
             # set by the scripts `seglab submit` renders (seglab.slurm.script): the rendered sbatch
             # script, its submission folder, and how often Slurm requeued the job
             "script": "SEGLAB_SLURM_SCRIPT", "submission": "SEGLAB_SUBMISSION",
             "restart_count": "SLURM_RESTART_COUNT"}


class RunFailed(SeglabError):
    """A notebook run ended with status failed or interrupted; the message says where and why."""

    def __init__(self, message: str, run_dir: Path, status: str):
        super().__init__(message)
        self.run_dir = run_dir
        self.status = status
        self.exit_code = 130 if status == "interrupted" else 1


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """``20261126T120501Z-3fa2``: sorts by start time; the suffix separates runs started in one second."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def git_state(root: Path) -> dict:
    """Commit, branch and dirty flag of the checkout (None where it is not a git checkout)."""
    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": None if status is None else bool(status)}


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def slurm_state() -> dict | None:
    found = {k: os.environ[v] for k, v in SLURM_ENV.items() if os.environ.get(v)}
    return found or None


def read_manifest(run_dir: Path) -> dict | None:
    """The run's manifest, or None while there is none to read.

    None for a folder whose ``manifest.json`` is not written yet (the runner makes the folder
    with an exclusive mkdir, then writes the manifest), for a manifest cut short (truncated
    JSON, bytes that are not UTF-8: a copy or a disk that failed midway) and for JSON that is
    not a record. Every reader of run folders goes through here, so a run starting never
    crashes a status page, ``seglab status`` or ``run-all``.
    """
    try:
        manifest = json.loads((Path(run_dir) / MANIFEST).read_bytes().decode("utf-8"))
    except (OSError, ValueError):   # missing (FileNotFoundError, NotADirectoryError); JSON or UTF-8 cut short
        return None
    return manifest if isinstance(manifest, dict) else None


def run_status(run_dir: Path, manifest: dict | None = None) -> str:
    """``running``/``done``/``failed``/``interrupted`` from the manifest; ``starting`` without one."""
    manifest = read_manifest(run_dir) if manifest is None else manifest
    return str(manifest.get("status")) if manifest else STARTING


def list_runs(experiment: str, profile: str) -> list[Path]:
    """Run folders of one experiment and profile, oldest first (run ids sort by time)."""
    base = paths.runs_dir() / experiment / profile
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) if base.is_dir() else []


def latest_run(experiment: str, profile: str, status: str | None = "done") -> Path | None:
    """The newest run folder with that status (any status with ``status=None``)."""
    for run_dir in reversed(list_runs(experiment, profile)):
        manifest = read_manifest(run_dir)
        if manifest and (status is None or manifest.get("status") == status):
            return run_dir
    return None


def output_records(run_dir: Path) -> list[dict]:
    """Every file of the run except the manifest itself: relative path, bytes, sha256."""
    records = []
    for f in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = f.relative_to(run_dir)
        if rel.name == MANIFEST or any(part.startswith(".") for part in rel.parts):
            continue
        records.append({"path": rel.as_posix(), "bytes": f.stat().st_size, "sha256": io.sha256_file(f)})
    return records


def check_outputs(run_dir: Path, manifest: dict) -> dict[str, list[str]]:
    """Outputs listed in the manifest that are gone (MISSING) or differ from their sha256 (CHANGED)."""
    missing, changed = [], []
    for rec in manifest.get("outputs") or []:
        f = Path(run_dir) / rec["path"]
        if not f.is_file():
            missing.append(rec["path"])
        elif f.stat().st_size != rec.get("bytes") or io.sha256_file(f) != rec["sha256"]:
            changed.append(rec["path"])
    return {"missing": missing, "changed": changed}


def input_hashes(experiment: Experiment, params: dict, root: Path) -> dict:
    """sha256 of the notebook and of every file or folder a params key marked ``input: true`` names."""
    schema = load_schema(experiment.name, root)
    out = {"notebook": {"path": os.path.relpath(experiment.notebook, root), "sha256": io.sha256_file(experiment.notebook)}}
    for key in schema.input_keys():
        value = params.get(key)
        if value is None:
            continue
        p = paths.resolve(value)
        out[key] = {"path": str(value), "sha256": io.sha256_tree(p) if p.exists() else None}
    return out


def missing_upstream(experiment: Experiment, profile: str) -> dict[str, str]:
    """{notebook: why} for each notebook ``experiment`` needs that has no finished (done) run in
    ``profile``: no run yet, or its latest run's status (failed, interrupted, still running)."""
    out = {}
    for need in experiment.needs:
        if latest_run(need, profile) is not None:
            continue
        last = latest_run(need, profile, status=None)
        out[need] = ("no run yet" if last is None else
                     f"its latest run {os.path.relpath(last, paths.project_root())} has status {run_status(last)}")
    return out


def check_upstream(experiment: Experiment, profile: str) -> None:
    """Refuse to start ``experiment`` while a notebook it needs has no finished run in ``profile``
    (its notebook reads that run's outputs and would fail inside, or read another profile's).
    Raises SeglabError naming the missing run and the commands that make it."""
    missing = missing_upstream(experiment, profile)
    if not missing:
        return
    first, why = next(iter(missing.items()))
    names = ", ".join(missing)
    raise SeglabError(f"{experiment.name} needs {names}, which has no finished run in profile '{profile}' ({why}); "
                      f"run it first: `seglab run {first[:2]} --profile {profile}`, or `seglab run-all --profile "
                      f"{profile} --only {experiment.number}` for everything {experiment.name} needs "
                      f"(`--no-upstream-check` starts it anyway)")


def preflight(experiment: Experiment, resolved: Resolved, read_cohort: bool = True, log=print) -> None:
    """The checks of :func:`seglab.experiments.preflight` (values the experiment cannot use, alone, together
    or with the cohort), naming the file of each key; logs a note when checks needing the cohort were skipped."""
    from seglab.experiments import preflight as check

    note = check(experiment.name, resolved.params, resolved.where, read_cohort=read_cohort)
    if note and read_cohort:
        log(f"[seglab] {experiment.name}: {note}")


def upstream_runs(experiment: Experiment, profile: str) -> dict:
    """The latest successful run id of each notebook this one needs (recorded; a change reruns it)."""
    out = {}
    for need in experiment.needs:
        latest = latest_run(need, profile)
        out[need] = latest.name if latest else None
    return out


class _Terminated(KeyboardInterrupt):
    """Raised in the runner by SIGTERM so the manifest can say `interrupted`.

    A KeyboardInterrupt, like Ctrl-C's, because the signal can land inside an asyncio
    callback of papermill's kernel client (zmq's socket events): asyncio logs and
    swallows any other exception raised there, and the run then hung forever waiting
    on a future nobody resolves (seen once in CI: a SIGTERM one second into a run).
    asyncio re-raises KeyboardInterrupt and SystemExit out of the event loop."""


def _raise_terminated(signum, frame):
    raise _Terminated(f"signal {signum}")


@dataclass
class RunResult:
    run_dir: Path
    status: str
    manifest: dict
    skipped: bool = False


@dataclass
class ReportSteps:
    """What happens after the notebook ran, given by the caller (:mod:`seglab.workflow.report` makes
    them; :mod:`seglab.workflow.pipeline` passes them), so this module never imports the reports.

    ``render_run(run_dir, manifest)`` renders the notebook (its path goes into the manifest);
    ``publish_figures(run_dir, manifest)`` copies a successful run's figures; ``build_index()``
    rebuilds the status page once the manifest is final. A step that fails is recorded or
    logged and never hides the run's status.
    """
    render_run: Callable[[Path, dict], Path]
    publish_figures: Callable[[Path, dict], Any]
    build_index: Callable[[], Any]


def execute(ref: str, profile: str, overrides: dict | None = None, report: ReportSteps | None = None,
            log=print, upstream_check: bool = True) -> RunResult:
    """Run one notebook with papermill into a new run folder; then the ``report`` steps, if given.

    Before a folder is made: the params are validated, each notebook this one needs must have a
    finished run in ``profile`` (:func:`check_upstream`; ``upstream_check=False`` skips that), and
    the :func:`preflight` checks run against the cohort; each refuses with one line.
    Raises :class:`RunFailed` (after writing the manifest and the partial
    notebook) when a cell fails or the run is interrupted by Ctrl-C or SIGTERM.
    ``seglab run`` is :func:`seglab.workflow.pipeline.execute`: this with the report steps.
    """
    root = paths.project_root()
    experiment = find_experiment(ref, root)
    if not experiment.notebook.is_file():
        raise SeglabError(f"{experiment.name}: notebook {experiment.notebook} is missing")
    resolved = resolve_params(experiment.name, profile, overrides, root)
    if upstream_check:
        check_upstream(experiment, profile)
    preflight(experiment, resolved, log=log)
    params, sources = resolved.params, resolved.sources
    run_dir, manifest = _new_run(experiment, profile, params, sources, overrides, root)
    notebook_out = run_dir / experiment.notebook.name
    log(f"[seglab] {experiment.name} ({profile}) -> {manifest['run_dir']}")

    t0 = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _in_main_thread() else None
    kernel_log = open(run_dir / "kernel.log", "w")
    # The kernel is a child process and writes its own warnings and shutdown
    # tracebacks to the stderr it inherits; point fd 2 at kernel.log while it
    # runs so the user sees one readable paragraph, not a wall of ZMQ noise.
    saved_stderr = os.dup(2)
    sys.stderr.flush()
    os.dup2(kernel_log.fileno(), 2)
    try:
        with kernel_log:
            manifest["status"], manifest["error"] = _run_notebook(experiment, notebook_out, params, run_dir,
                                                                  profile, root, kernel_log)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _finish(manifest, run_dir, notebook_out, round(time.monotonic() - t0, 3), report, root, log)
        # An interrupted kernel leaves asyncio tasks whose errors are logged when
        # they are collected: collect them while stderr still goes to kernel.log.
        import gc
        gc.collect()
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)

    if manifest["status"] != "done":
        raise RunFailed(_failure_message(manifest, run_dir, notebook_out), run_dir, manifest["status"])
    log(f"[seglab] {experiment.name} ({profile}) done in {manifest['duration_s']:.1f} s"
        + (f"; report: {manifest['report']}" if manifest.get("report") else ""))
    return RunResult(run_dir=run_dir, status="done", manifest=manifest)


def _new_run(experiment: Experiment, profile: str, params: dict, sources: list[Path], overrides: dict | None,
             root: Path) -> tuple[Path, dict]:
    """A new run folder (exclusive mkdir) with its first manifest (status running) and params.yaml."""
    # The slow fields first (git, package versions, upstream runs), so the folder is without its
    # manifest for as short a time as possible (readers see it as `starting` meanwhile).
    recorded = {
        "git": git_state(root), "packages": package_versions(), "host": socket.gethostname(),
        "pid": os.getpid(), "slurm": slurm_state(), "command": sys.argv,
        "params_hash": params_hash(params),
        "params_files": [{"path": os.path.relpath(s, root), "sha256": io.sha256_file(s)} for s in sources],
        "overrides": overrides or {}, "inputs": input_hashes(experiment, params, root),
        "upstream": upstream_runs(experiment, profile),
    }
    parent = paths.runs_dir() / experiment.name / profile
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        run_dir = parent / new_run_id()
        try:
            run_dir.mkdir()  # exclusive: a run folder is never shared or reused
            break
        except FileExistsError:
            time.sleep(0.01)
    manifest: dict[str, Any] = {
        "experiment": experiment.name, "title": experiment.title, "profile": profile,
        "run_id": run_dir.name, "run_dir": os.path.relpath(run_dir, root), "status": "running",
        "started": utc_now(), "ended": None, "duration_s": None,
        **recorded,
        "outputs": [], "error": None, "report": None,
    }
    io.write_json(run_dir / MANIFEST, manifest)
    io.write_text(run_dir / "params.yaml", yaml.safe_dump(params, sort_keys=True))
    return run_dir, manifest


def _run_notebook(experiment: Experiment, notebook_out: Path, params: dict, run_dir: Path, profile: str,
                  root: Path, kernel_log) -> tuple[str, dict | None]:
    """Execute the notebook with papermill; (status, error record): done, failed or interrupted."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(experiment.notebook), str(notebook_out),
            parameters={**params, "run_dir": str(run_dir), "profile": profile},
            kernel_name=KERNEL_NAME, cwd=str(root), progress_bar=False,
            log_output=False, stdout_file=kernel_log, stderr_file=kernel_log,
            request_save_on_cell_execute=True)
        return "done", None
    except PapermillExecutionError as exc:
        return "failed", {"cell_index": exc.cell_index, "execution_count": exc.exec_count,
                          "ename": exc.ename, "evalue": exc.evalue}
    except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM's _Terminated
        return "interrupted", {"ename": type(exc).__name__, "evalue": str(exc) or "Ctrl-C"}
    except Exception as exc:  # the kernel died, the notebook is unreadable, ...
        return "failed", {"ename": type(exc).__name__, "evalue": str(exc)}


def _finish(manifest: dict, run_dir: Path, notebook_out: Path, duration_s: float, report: ReportSteps | None,
            root: Path, log) -> None:
    """The final manifest (end, duration, test evaluations, summary, outputs), written once the
    report steps that go into it ran; then the status page. A failing report step never hides the
    run's status."""
    manifest["ended"] = utc_now()
    manifest["duration_s"] = duration_s
    evaluations_file = run_dir / TEST_EVALUATIONS
    if evaluations_file.is_file():
        manifest["test_evaluations"] = json.loads(evaluations_file.read_text())
    summary_file = run_dir / SUMMARY
    if summary_file.is_file():
        try:
            manifest["summary"] = json.loads(summary_file.read_text())
        except json.JSONDecodeError:
            manifest["summary"] = None
    if report is not None and notebook_out.is_file():
        try:
            manifest["report"] = os.path.relpath(report.render_run(run_dir, manifest), root)
        except Exception as exc:  # a report that cannot render must not hide the run's status
            manifest["report_error"] = f"{type(exc).__name__}: {exc}"
    if report is not None and manifest["status"] == "done":
        try:
            report.publish_figures(run_dir, manifest)
        except Exception as exc:
            log(f"[seglab] warning: could not publish figures: {exc}")
    manifest["outputs"] = output_records(run_dir)
    io.write_json(run_dir / MANIFEST, manifest)
    if report is not None:
        try:
            report.build_index()
        except Exception as exc:
            log(f"[seglab] warning: could not update reports/index.html: {exc}")


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _failure_message(manifest: dict, run_dir: Path, notebook_out: Path) -> str:
    err = manifest.get("error") or {}
    root = paths.project_root()
    where = os.path.relpath(run_dir, root)
    if manifest["status"] == "interrupted":
        head = f"{manifest['experiment']} ({manifest['profile']}) was interrupted ({err.get('evalue')})."
    elif err.get("cell_index") is not None:
        head = (f"{manifest['experiment']} ({manifest['profile']}) failed in cell {err['cell_index']}"
                f" (In [{err.get('execution_count')}]): {err.get('ename')}: {err.get('evalue')}")
    else:
        head = f"{manifest['experiment']} ({manifest['profile']}) failed: {err.get('ename')}: {err.get('evalue')}"
    tail = f" The partial notebook is kept in {where}/{notebook_out.name}"
    if manifest.get("report"):
        tail += f", rendered to {manifest['report']}"
    return head + "." * (not head.endswith(".")) + tail + f"; cell output in {where}/kernel.log."


def is_up_to_date(experiment: Experiment, profile: str, overrides: dict | None = None) -> Path | None:
    """The latest successful run if params, inputs and upstream runs are unchanged since it, else None."""
    root = paths.project_root()
    latest = latest_run(experiment.name, profile)
    if latest is None:
        return None
    manifest = read_manifest(latest)
    if manifest is None:   # replaced or removed since latest_run read it
        return None
    params, _ = load_params(experiment.name, profile, overrides, root)
    if manifest.get("params_hash") != params_hash(params):
        return None
    if manifest.get("inputs") != input_hashes(experiment, params, root):
        return None
    if manifest.get("upstream", {}) != upstream_runs(experiment, profile):
        return None
    if any(check_outputs(latest, manifest).values()):
        return None
    return latest


def run_all(profile: str, force: bool = False, only: list[str] | None = None, report: ReportSteps | None = None,
            log=print) -> list[RunResult]:
    """Run the chain in declared order; skip notebooks that are up to date unless ``force``.

    Stops at the first failure (RunFailed names it). With ``only``, runs those
    notebooks and whatever they need. ``report``: as for :func:`execute`.
    Every params file, and the :func:`preflight` checks that need no cohort, are checked before
    anything runs; the checks against the cohort run right before each notebook (00 may build or
    rebuild the cohort first).
    """
    root = paths.project_root()
    chain = load_experiments(root)
    if only:
        chain = with_upstream([find_experiment(r, root) for r in only], root)
    for e in chain:  # validate every params file before running anything
        preflight(e, resolve_params(e.name, profile, None, root), read_cohort=False, log=log)
    results = []
    for e in chain:
        fresh = None if force else is_up_to_date(e, profile)
        if fresh is not None:
            log(f"[seglab] {e.name} ({profile}) up to date: {os.path.relpath(fresh, root)}")
            results.append(RunResult(run_dir=fresh, status="done", manifest=read_manifest(fresh), skipped=True))
            continue
        # in order, stopping at the first failure: what e needs has just run or is up to date
        results.append(execute(e.name, profile, report=report, log=log, upstream_check=False))
    return results


# --------------------------------------------------------------------------- notebooks' side


class RunContext:
    """What a notebook reads (its validated params) and writes into its run folder: tables,
    figures, JSON and ``summary.json``.

    Every write is atomic. In JupyterLab (``run_dir`` None) a fresh folder
    ``runs/<experiment>/interactive/<run-id>/`` is made, so exploring never
    touches the runs of the profiles.

    Attributes
    ----------
    params : the notebook's params, validated against its schema (dict).
    mask : :class:`~seglab.config.settings.MaskSettings` made from ``params``.
    training : :class:`~seglab.config.settings.TrainSettings` made from ``params``.
    """

    def __init__(self, experiment: str, run_dir: str | os.PathLike | None = None, profile: str = "interactive",
                 namespace: dict | None = None):
        self.experiment = experiment
        self.profile = profile
        self._namespace = namespace
        self._params: dict | None = None
        if run_dir is None:
            parent = paths.runs_dir() / experiment / "interactive"
            parent.mkdir(parents=True, exist_ok=True)
            run_dir = parent / new_run_id()
            run_dir.mkdir()
            io.write_json(run_dir / MANIFEST, {"experiment": experiment, "profile": "interactive",
                                               "run_id": run_dir.name, "status": "interactive",
                                               "started": utc_now(), "git": git_state(paths.project_root())})
        self.run_dir = Path(run_dir)

    @property
    def params(self) -> dict:
        if self._params is None:
            self._params = notebook_params(self.experiment, self._namespace)
        return self._params

    @property
    def mask(self) -> MaskSettings:
        return MaskSettings.from_params(self.params)

    @property
    def training(self) -> TrainSettings:
        return TrainSettings.from_params(self.params)

    def path(self, name: str) -> Path:
        p = self.run_dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def save_table(self, df, name: str) -> Path:
        """``name`` ends in .csv or .tsv; columns should carry units (``area_px``)."""
        return io.write_table(self.path(name), df)

    def save_json(self, obj, name: str) -> Path:
        return io.write_json(self.path(name), obj)

    def save_figure(self, fig, name: str, dpi: int = 150) -> Path:
        """A matplotlib figure as PNG in ``figures/`` of the run folder (copied to the project's
        ``figures/`` with provenance when the run succeeds)."""
        target = self.path(f"figures/{name}" if "/" not in name else name)
        if target.suffix == "":
            target = target.with_suffix(".png")
        with io.atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=target.suffix.lstrip("."))
        return target

    def save_outputs(self, outputs: dict) -> list[Path]:
        """Each of a step's outputs under its file name: a DataFrame as a table (.csv / .tsv), a
        matplotlib Figure as a PNG under ``figures/``, anything else as JSON. Returns the paths."""
        import pandas as pd

        written = []
        for name, obj in outputs.items():
            if isinstance(obj, pd.DataFrame):
                written.append(self.save_table(obj, name))
            elif hasattr(obj, "savefig"):
                written.append(self.save_figure(obj, name))
            else:
                written.append(self.save_json(obj, name))
        return written

    def record_test_evaluation(self, selected: str, config: dict, split: str = "test") -> dict:
        """Declare that ``split`` is evaluated now for the configuration ``selected``, once.

        Selection (thresholds, gates, epochs) uses validation only; the test
        split is evaluated once per selected configuration. A second call for
        the same ``selected`` name in this run raises, so a notebook cannot peek
        at test and reselect. The list goes to ``test_evaluations.json`` and the
        runner copies it into the manifest.
        """
        f = self.run_dir / TEST_EVALUATIONS
        records = json.loads(f.read_text()) if f.is_file() else []
        if any(r["selected"] == selected and r["split"] == split for r in records):
            raise SeglabError(f"{self.experiment}: the {split} split was already evaluated for '{selected}' in this "
                              f"run; selection must use validation only (start a new run to change the selection)")
        record = {"selected": selected, "split": split, "config": config, "at": utc_now()}
        io.write_json(f, records + [record])
        return record

    def summary(self, **numbers) -> dict:
        """Add headline numbers (``<split>_<metric>_<model>``) to ``summary.json`` and return it."""
        current = {}
        f = self.run_dir / SUMMARY
        if f.is_file():
            current = json.loads(f.read_text())
        current.update(numbers)
        io.write_json(f, current)
        return current


def notebook_params(experiment: str, namespace: dict | None) -> dict:
    """The notebook's params: the values of its schema's keys in ``namespace`` (the notebook's
    globals: the parameters cell, which papermill replaces with the run's resolved params),
    validated against the schema. Without a namespace: the demo profile's params."""
    if namespace is None:
        return load_params(experiment, "demo")[0]
    schema = load_schema(experiment)
    missing = [k for k in schema.specs if k not in namespace]
    if missing:
        raise SeglabError(f"{experiment}: the parameters cell lacks {missing}; run `seglab sync-parameters`")
    return validate({k: namespace[k] for k in schema.specs}, schema, f"{experiment} parameters cell")


def attach(experiment: str, run_dir: str | None = None, profile: str = "interactive",
           namespace: dict | None = None) -> RunContext:
    """The notebook's handle on its params and its run folder (the cell after ``parameters`` calls
    ``attach(NAME, run_dir, profile, globals())``): ``run.params``, ``run.mask``, ``run.training``."""
    return RunContext(experiment, run_dir, profile, namespace)
