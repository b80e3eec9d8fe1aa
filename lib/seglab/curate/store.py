"""Curation classifiers on disk: skops (no pickle) beside a JSON sidecar.

``<name>.skops`` holds the fitted forest (:func:`skops.io.dump`: no arbitrary code runs when it is
read); ``<name>.skops.json`` (the sidecar) holds what it is and how it was validated:
``format`` (:data:`FORMAT`), ``model_sha256`` (of the .skops file), ``features``, ``classes``,
``cell_type``, ``spec``, ``training_table_sha256``, ``n_train`` / ``n_yes`` / ``n_no``,
``cv`` (the gate report: metrics, per group), ``thresholds``, ``gate_passed``, ``learning_curve``
(its verdict, when given), ``pixel_size_um`` and ``channels`` of the training features,
``git`` (commit, dirty), ``seglab_version``, ``sklearn_version``, ``skops_version``, ``saved_at``.

:func:`load` refuses, each with a message naming the file and the fix: a missing or foreign
sidecar, a .skops file whose hash is not the sidecar's (replaced or truncated), a file skops
cannot read, any type in the file outside :data:`TRUSTED_TYPES` (skops'
``get_untrusted_types``: what a file from an untrusted source could smuggle in), and a
classifier that did not pass the gate unless ``allow_failed_gate=True`` (the explicit override,
``--allow-failed-gate``).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from seglab import SeglabError
from seglab.core import io

FORMAT = "seglab-classifier/1"
SUFFIX = ".skops"
# the types beyond skops' defaults that a scikit-learn random forest's file holds; anything else is refused
TRUSTED_TYPES = ("sklearn.tree._tree.Tree",)


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.json")


@dataclass
class Classifier:
    """A loaded classifier: the forest, its sidecar, its file and sha256 (the identity recorded by
    the runs it filters)."""

    model: object
    sidecar: dict
    path: Path
    sha256: str

    @property
    def features(self) -> list[str]:
        return list(self.sidecar["features"])

    @property
    def gate_passed(self) -> bool:
        return bool(self.sidecar.get("gate_passed"))

    def require_gate(self) -> None:
        """SeglabError naming this file and each failed metric unless it passed its validation gate."""
        from seglab.curate.gate import require_pass

        require_pass({"passed": self.gate_passed, "failed": self.sidecar.get("cv", {}).get("failed", [])}, str(self.path))

    def confidence(self, x):
        """Probability of "yes" (class 1) for rows of ``x`` (n, len(features))."""
        proba = self.model.predict_proba(x)
        return proba[:, list(self.model.classes_).index(1)]


def save(path: str | os.PathLike, model, sidecar: dict) -> Path:
    """Write ``model`` (skops) and its sidecar (``sidecar`` + format, hash, versions, commit), atomically
    each (the sidecar last: a .skops without a sidecar is refused by :func:`load`). Returns the .skops path."""
    import sklearn
    import skops
    import skops.io as sio

    import seglab
    from seglab.segment.models import git_commit

    path = Path(path)
    if path.suffix != SUFFIX:
        raise SeglabError(f"{path}: a classifier file must end in {SUFFIX}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(path) as tmp:
        sio.dump(model, tmp)
    rec = {"format": FORMAT, **sidecar, "model_sha256": io.sha256_file(path), "classes": [int(c) for c in model.classes_],
           "git": git_commit(), "seglab_version": seglab.__version__, "sklearn_version": sklearn.__version__,
           "skops_version": skops.__version__,
           "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    io.write_json(sidecar_path(path), rec)
    return path


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar of a classifier file; SeglabError when missing, unreadable or of another format."""
    side = sidecar_path(path)
    if not Path(path).is_file():
        raise SeglabError(f"{path}: no such classifier file; train one with seglab classifier train")
    if not side.is_file():
        raise SeglabError(f"{path}: its sidecar {side.name} is missing (a classifier file copied without it, or not "
                          "seglab's); copy both files, or train again with seglab classifier train")
    try:
        rec = json.loads(side.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SeglabError(f"{side}: not readable JSON ({exc}); copy the sidecar again or retrain") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise SeglabError(f"{side}: format {rec.get('format') if isinstance(rec, dict) else None!r}, expected {FORMAT}; "
                          "not a seglab classifier sidecar")
    return rec


def load(path: str | os.PathLike, *, allow_failed_gate: bool = False) -> Classifier:
    """Load a classifier for filtering, with every check of the module docstring."""
    import skops.io as sio

    path = Path(path)
    rec = read_sidecar(path)
    sha = io.sha256_file(path)
    if sha != rec.get("model_sha256"):
        raise SeglabError(f"{path}: its sha256 ({sha[:12]}) is not the one its sidecar records "
                          f"({str(rec.get('model_sha256'))[:12]}): the file was replaced, truncated or damaged; copy it "
                          "again from where it was trained, or retrain")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError) as exc:
        raise SeglabError(f"{path}: not a readable skops file ({type(exc).__name__}: {exc}); copy it again or "
                          "retrain") from None
    bad = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if bad:
        raise SeglabError(f"{path}: holds types seglab does not trust ({', '.join(bad)}); a classifier from an "
                          "untrusted source is not loaded. Retrain it here with seglab classifier train")
    try:
        model = sio.load(path, trusted=list(untrusted))
    except Exception as exc:  # noqa: BLE001 - whatever skops raises on a damaged file
        raise SeglabError(f"{path}: skops could not load it ({type(exc).__name__}: {exc}); retrain") from None
    classifier = Classifier(model=model, sidecar=rec, path=path, sha256=sha)
    if not allow_failed_gate:
        classifier.require_gate()
    return classifier


def as_classifier(obj, *, allow_failed_gate: bool = False) -> Classifier | None:
    """None, a loaded :class:`Classifier` (checked against the gate) or a path (:func:`load`)."""
    if obj is None or isinstance(obj, Classifier):
        if obj is not None and not allow_failed_gate:
            obj.require_gate()
        return obj
    return load(obj, allow_failed_gate=allow_failed_gate)
