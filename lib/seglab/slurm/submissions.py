"""The submissions store: ``runs/_slurm/<submission-id>/submission.json``, one folder per submission.

A submission folder is made before its first ``sbatch`` answers and its record written after
each accepted job, so :func:`read_submission` gives None for a folder without a readable record
yet, and :func:`iter_submissions` leaves such folders out.
"""

from __future__ import annotations

import json
from pathlib import Path

from seglab import SeglabError
from seglab.core import paths

SUBMISSIONS = "_slurm"            # runs/_slurm/<submission-id>/
RECORD = "submission.json"


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
