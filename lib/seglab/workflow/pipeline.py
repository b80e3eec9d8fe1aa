"""Run notebooks and publish what they made: ``seglab run`` and ``seglab run-all``.

The runner (:mod:`seglab.workflow.runs`: run folder, papermill, manifest) with the report
steps of :mod:`seglab.workflow.report` (the offline HTML report of the notebook, the published
figures, the status page ``reports/index.html``). The dependency goes one way: this module
imports both, the reports read run folders, and the runner imports neither.
"""

from __future__ import annotations

from seglab.workflow import report, runs


def execute(ref: str, profile: str, overrides: dict | None = None, render: bool = True,
            log=print, upstream_check: bool = True) -> runs.RunResult:
    """Run one notebook into a new run folder, then render its report, publish its figures and
    rebuild the status page (``render=False``: the run only). Refuses to start while a notebook it
    needs has no finished run (``upstream_check=False``: starts anyway). Raises
    :class:`runs.RunFailed` as :func:`runs.execute`."""
    return runs.execute(ref, profile, overrides, report=report.steps() if render else None, log=log,
                        upstream_check=upstream_check)


def run_all(profile: str, force: bool = False, only: list[str] | None = None, log=print) -> list[runs.RunResult]:
    """The chain in declared order, each run with its report; up-to-date notebooks skipped
    unless ``force`` (:func:`runs.run_all`)."""
    return runs.run_all(profile, force=force, only=only, report=report.steps(), log=log)
