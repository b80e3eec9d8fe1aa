"""The validation gate: a curation classifier is deployed only if its cross-validated metrics pass.

The positive class is "yes" (a real cell of the wanted type). Metrics are computed on
out-of-fold predictions of a grouped cross-validation (:func:`seglab.curate.classifier.cross_validate`):
every object is predicted by a forest that saw no object of its slide or donor.

Defaults (params ``min_accuracy``, ``min_recall``, ``min_precision``): accuracy >= 0.75,
recall >= 0.70, precision >= 0.70, each a fraction in [0, 1]. A metric passes when its value
is >= its threshold; recall or precision with no positive prediction / no positive answer is 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError

METRICS = ("accuracy", "recall", "precision")


@dataclass(frozen=True)
class GateThresholds:
    """Smallest accepted cross-validated accuracy, recall and precision of "yes" (fractions)."""

    min_accuracy: float = 0.75
    min_recall: float = 0.70
    min_precision: float = 0.70

    def __post_init__(self):
        for k, v in asdict(self).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= float(v) <= 1:
                raise SeglabError(f"gate threshold {k}={v!r} must be a fraction in [0, 1] (e.g. 0.75)")

    @classmethod
    def from_params(cls, params: dict) -> "GateThresholds":
        return cls(**{k: float(params[k]) for k in ("min_accuracy", "min_recall", "min_precision")
                      if params.get(k) is not None})

    def as_dict(self) -> dict:
        return {k: float(v) for k, v in asdict(self).items()}


def metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict:
    """accuracy, recall, precision of the positive class 1 ("yes"), the confusion matrix
    [[tn, fp], [fn, tp]] and n (counts of objects)."""
    t = np.asarray(y_true, int)
    p = np.asarray(y_pred, int)
    tp = int(((t == 1) & (p == 1)).sum())
    tn = int(((t == 0) & (p == 0)).sum())
    fp = int(((t == 0) & (p == 1)).sum())
    fn = int(((t == 1) & (p == 0)).sum())
    n = len(t)
    return {"n": n, "accuracy": (tp + tn) / n if n else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "precision": tp / (tp + fp) if tp + fp else 0.0, "confusion": [[tn, fp], [fn, tp]]}


@dataclass
class GateReport:
    """The gate's verdict: pooled out-of-fold metrics, per-group metrics, thresholds, pass/fail.

    failed : [(metric, value, threshold)] of the metrics below their threshold."""

    metrics: dict
    per_group: pd.DataFrame
    thresholds: GateThresholds
    failed: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        return {"passed": self.passed, "metrics": {k: (round(v, 4) if isinstance(v, float) else v)
                                                   for k, v in self.metrics.items()},
                "thresholds": self.thresholds.as_dict(),
                "failed": [{"metric": m, "value": round(v, 4), "threshold": t} for m, v, t in self.failed],
                "per_group": self.per_group.round(4).to_dict("records")}

    def describe(self) -> str:
        m = self.metrics
        text = (f"accuracy {m['accuracy']:.3f}, recall {m['recall']:.3f}, precision {m['precision']:.3f} "
                f"(cross-validated, {m['n']} answers)")
        return f"{'PASS' if self.passed else 'FAIL'}: {text}" + ("" if self.passed else "; " + failures(self.failed))


def failures(failed: Sequence) -> str:
    """``recall 0.52 < 0.70, precision 0.61 < 0.70``."""
    return ", ".join(f"{m} {v:.3f} < {t:.2f}" for m, v, t in failed)


def evaluate(y_true: Sequence[int], y_pred: Sequence[int], groups: Sequence, thresholds: GateThresholds | None = None
             ) -> GateReport:
    """The gate on out-of-fold predictions ``y_pred`` (1 = yes) of answers ``y_true``, with the
    per-group (slide or donor) metrics."""
    thresholds = thresholds or GateThresholds()
    pooled = metrics(y_true, y_pred)
    df = pd.DataFrame({"y": np.asarray(y_true, int), "p": np.asarray(y_pred, int), "g": np.asarray(groups)})
    rows = []
    for g, sub in df.groupby("g", sort=True):
        m = metrics(sub["y"], sub["p"])
        rows.append({"group": g, "n": m["n"], "n_yes": int(sub["y"].sum()), "accuracy": m["accuracy"],
                     "recall": m["recall"], "precision": m["precision"]})
    failed = [(k, float(pooled[k]), float(getattr(thresholds, f"min_{k}"))) for k in METRICS
              if pooled[k] < getattr(thresholds, f"min_{k}")]
    return GateReport(pooled, pd.DataFrame(rows), thresholds, failed)


def require_pass(gate: dict | GateReport, source: str) -> None:
    """Refuse to deploy a classifier whose gate failed: SeglabError naming ``source`` (its file)
    and each failed metric with its value and threshold."""
    rec = gate.as_dict() if isinstance(gate, GateReport) else gate
    if rec.get("passed"):
        return
    failed = [(f["metric"], f["value"], f["threshold"]) for f in rec.get("failed", [])]
    raise SeglabError(f"{source}: this classifier did not pass the validation gate ({failures(failed) or 'no gate record'}); "
                      "it is not deployed. Annotate more objects (the learning curve says how many) and train again, "
                      "or pass the override (--allow-failed-gate / allow_failed_gate=True) to filter with it anyway")
