"""The curation classifier: a balanced random forest per cell type, cross-validated by group.

People's answers (:func:`seglab.curate.features.training_table`) train a scikit-learn
``RandomForestClassifier(class_weight="balanced")`` on the features of
:mod:`seglab.curate.features` (all of them, or :data:`~seglab.curate.features.MORPHOLOGY_COLUMNS`
with ``morphology_only``). One classifier per cell type: a table holding two cell types is refused.

Cross-validation is grouped by slide or donor (``group_col``, default ``source``):
``StratifiedGroupKFold`` puts every object of a group in one fold, so no group is on both sides
(:func:`grouped_folds` checks it), and the metrics are those of a new slide. With fewer groups than
``n_splits`` every group is its own fold (leave one group out).

:func:`learning_curve` repeats the grouped cross-validation on random subsets of the answers
(25, 50, 100, ... objects) and says whether more answers are needed: the smallest number at which
the mean cross-validated metrics pass the gate, and whether the curve still rises at the largest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.curate import gate as gates
from seglab.curate.features import MORPHOLOGY_COLUMNS, feature_columns

MIN_PER_CLASS = 10    # answers of each class (yes, no) a classifier needs
MIN_GROUPS = 2        # slides or donors: grouped CV needs one to hold out
RISING_TOL = 0.01     # the curve "still rises" when its last step gains more than this (fraction)


@dataclass(frozen=True)
class ClassifierSpec:
    """What is trained: the feature columns, the cell type, the forest's size and seed.

    features : input columns (default: :func:`feature_columns` of ``channels``).
    cell_type : the cell type the answers are about (one classifier per cell type).
    morphology_only : train on :data:`MORPHOLOGY_COLUMNS` only.
    n_estimators, min_samples_leaf, seed : the forest (``n_jobs=1``: a shared CPU).
    n_splits : cross-validation folds (at most the number of groups).
    """

    cell_type: str = "cell"
    channels: tuple = ("DAPI", "CD45")
    morphology_only: bool = False
    features: tuple | None = None
    n_estimators: int = 200
    min_samples_leaf: int = 2
    seed: int = 0
    n_splits: int = 5

    @property
    def columns(self) -> list[str]:
        if self.features:
            return list(self.features)
        return list(MORPHOLOGY_COLUMNS) if self.morphology_only else feature_columns(self.channels)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["features"] = self.columns
        return d


def build(spec: ClassifierSpec):
    """The unfitted forest of ``spec``: balanced class weights, seeded, one job."""
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=int(spec.n_estimators), class_weight="balanced",
                                  min_samples_leaf=int(spec.min_samples_leaf), random_state=int(spec.seed), n_jobs=1)


def check_table(table: pd.DataFrame, spec: ClassifierSpec, group_col: str = "source", source: str = "training table"
                ) -> None:
    """Refuse a table that cannot train or be cross-validated, saying how many more answers are needed:
    a feature column missing, more than one cell type, fewer than :data:`MIN_PER_CLASS` answers of
    either class (one class only included), fewer than :data:`MIN_GROUPS` groups."""
    missing = [c for c in [*spec.columns, "label_yes", group_col] if c not in table.columns]
    if missing:
        raise SeglabError(f"{source}: columns {missing} missing; build it with seglab.curate.features.training_table "
                          "from object_features rows (and give the group column: slide or donor)")
    if "cell_type" in table and table["cell_type"].nunique() > 1:
        raise SeglabError(f"{source}: answers for {sorted(table['cell_type'].unique())}; train one classifier per "
                          "cell type (give each cell type's answers files separately)")
    n_yes, n_no = int(table["label_yes"].sum()), int((table["label_yes"] == 0).sum())
    short = [f"{MIN_PER_CLASS - n} more '{name}'" for name, n in (("yes", n_yes), ("no", n_no)) if n < MIN_PER_CLASS]
    if short:
        one = " (one class only: a classifier needs both)" if min(n_yes, n_no) == 0 else ""
        raise SeglabError(f"{source}: {n_yes} 'yes' and {n_no} 'no' answers{one}; at least {MIN_PER_CLASS} of each "
                          f"are needed: answer {' and '.join(short)} (sort the gallery by area or confidence to "
                          "find them), then train again")
    n_groups = int(table[group_col].nunique())
    if n_groups < MIN_GROUPS:
        raise SeglabError(f"{source}: all answers come from {n_groups} {group_col} ({table[group_col].iloc[0]}); "
                          f"cross-validation holds out whole groups and needs at least {MIN_GROUPS}: answer objects "
                          "of another slide or donor too")
    bad = table[spec.columns].isna().any(axis=1)
    if bad.any():
        raise SeglabError(f"{source}: {int(bad.sum())} row(s) with missing feature values "
                          f"({', '.join(table.loc[bad, 'object_id'].astype(str).head(3))}); recompute the features")


def grouped_folds(y: Sequence[int], groups: Sequence, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train index, test index) pairs of a StratifiedGroupKFold with ``min(n_splits, n_groups)``
    folds, shuffled by ``seed``. Raises SeglabError if a group were on both sides (never, by
    construction; checked because the metrics would be optimistic)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y, int)
    groups = np.asarray(groups)
    k = min(int(n_splits), len(np.unique(groups)))
    if k < 2:
        raise SeglabError(f"grouped cross-validation needs at least 2 groups, got {len(np.unique(groups))}")
    folds = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(seed)).split(np.zeros(len(y)), y, groups))
    for tr, te in folds:
        leak = set(groups[tr]) & set(groups[te])
        if leak:
            raise SeglabError(f"grouped cross-validation: group(s) {sorted(leak)[:3]} on both sides of a fold")
    return folds


@dataclass
class CVResult:
    """Out-of-fold predictions of a grouped cross-validation: per object ``confidence`` (probability
    of yes), ``predicted`` (1 = yes, at 0.5), its ``fold``; and the gate report on them."""

    table: pd.DataFrame
    report: gates.GateReport
    folds: list


def _fit_predict(spec: ClassifierSpec, x_tr, y_tr, x_te) -> np.ndarray:
    if len(np.unique(y_tr)) < 2:   # a fold that saw one class only predicts it
        return np.full(len(x_te), float(y_tr[0]))
    model = build(spec).fit(x_tr, y_tr)
    return model.predict_proba(x_te)[:, list(model.classes_).index(1)]


def cross_validate(table: pd.DataFrame, spec: ClassifierSpec, group_col: str = "source",
                   thresholds: gates.GateThresholds | None = None, source: str = "training table") -> CVResult:
    """Grouped cross-validation of ``spec`` on ``table`` and the gate on its out-of-fold predictions."""
    check_table(table, spec, group_col, source)
    x = table[spec.columns].to_numpy(float)
    y = table["label_yes"].to_numpy(int)
    g = table[group_col].astype(str).to_numpy()
    folds = grouped_folds(y, g, spec.n_splits, spec.seed)
    conf = np.zeros(len(y))
    fold = np.zeros(len(y), int)
    for k, (tr, te) in enumerate(folds):
        conf[te] = _fit_predict(spec, x[tr], y[tr], x[te])
        fold[te] = k
    pred = (conf >= 0.5).astype(int)
    out = pd.DataFrame({"object_id": table["object_id"].to_numpy(), "group": g, "label_yes": y, "fold": fold,
                        "confidence": conf, "predicted": pred})
    return CVResult(out, gates.evaluate(y, pred, g, thresholds), folds)


def train(table: pd.DataFrame, spec: ClassifierSpec, group_col: str = "source", source: str = "training table"):
    """The forest of ``spec`` fitted on every answer of ``table`` (checked first)."""
    check_table(table, spec, group_col, source)
    return build(spec).fit(table[spec.columns].to_numpy(float), table["label_yes"].to_numpy(int))


def learning_curve(table: pd.DataFrame, spec: ClassifierSpec, sizes: Sequence[int], repeats: int = 3,
                   group_col: str = "source", thresholds: gates.GateThresholds | None = None,
                   seed: int = 0) -> pd.DataFrame:
    """Grouped cross-validated metrics on random subsets of ``n`` answers, ``repeats`` draws per size.

    Sizes larger than the table are left out; a draw that cannot be cross-validated (too few of
    a class or groups, :func:`check_table`) is a row with ``ok`` False and NaN metrics. Returns one
    row per (n_answers, repeat): accuracy, recall, precision, passed (the gate)."""
    thresholds = thresholds or gates.GateThresholds()
    rng = np.random.default_rng(int(seed))
    rows = []
    for n in sorted({int(s) for s in sizes if int(s) <= len(table)}):
        for r in range(int(repeats)):
            sub = table.iloc[np.sort(rng.choice(len(table), size=n, replace=False))]
            try:
                cv = cross_validate(sub, ClassifierSpec(**{**asdict(spec), "seed": int(spec.seed) + r}), group_col,
                                    thresholds)
            except SeglabError:
                rows.append({"n_answers": n, "repeat": r, "ok": False, "accuracy": np.nan, "recall": np.nan,
                             "precision": np.nan, "passed": False})
                continue
            m = cv.report.metrics
            rows.append({"n_answers": n, "repeat": r, "ok": True, "accuracy": m["accuracy"], "recall": m["recall"],
                         "precision": m["precision"], "passed": cv.report.passed})
    return pd.DataFrame(rows, columns=["n_answers", "repeat", "ok", "accuracy", "recall", "precision", "passed"])


def curve_verdict(curve: pd.DataFrame, thresholds: gates.GateThresholds | None = None) -> dict:
    """What the learning curve says: per size the mean metrics (over repeats; a draw that could not
    be cross-validated counts as failing), ``n_needed`` (the smallest size whose mean metrics pass
    the gate and whose every larger size does too; None: not reached), ``rising`` (the last step
    gains more than :data:`RISING_TOL` in any metric) and ``more_answers_needed`` (not reached, or
    reached only at the largest size while still rising)."""
    thresholds = thresholds or gates.GateThresholds()
    if not len(curve):
        return {"sizes": [], "n_needed": None, "rising": None, "more_answers_needed": True}
    mean = curve.groupby("n_answers")[list(gates.METRICS)].mean()
    okfrac = curve.groupby("n_answers")["ok"].mean()
    passes = [bool(okfrac[n] == 1 and all(mean.loc[n, k] >= getattr(thresholds, f"min_{k}") for k in gates.METRICS))
              for n in mean.index]
    n_needed = None
    for i in range(len(passes)):
        if all(passes[i:]):
            n_needed = int(mean.index[i])
            break
    rising = None
    if len(mean) >= 2 and okfrac.iloc[-2:].min() == 1:
        rising = bool((mean.iloc[-1] - mean.iloc[-2]).max() > RISING_TOL)
    more = n_needed is None or (n_needed == int(mean.index[-1]) and bool(rising))
    return {"sizes": [int(n) for n in mean.index], "mean": mean.round(4).reset_index().to_dict("records"),
            "n_needed": n_needed, "rising": rising, "more_answers_needed": bool(more)}


def train_gate_save(table: pd.DataFrame, spec: ClassifierSpec, path, *, group_col: str = "source",
                    thresholds: gates.GateThresholds | None = None, source: str = "training table",
                    pixel_size_um: float | None = None, curve: dict | None = None, extra: dict | None = None):
    """Cross-validate (the gate), fit on every answer and save with the sidecar
    (:func:`seglab.curate.store.save`); returns (:class:`CVResult`, path of the .skops file).

    A classifier that fails the gate is saved too, marked ``gate_passed: false``: loading it to
    filter is refused (unless overridden), and the report says what failed."""
    from seglab.curate import store
    from seglab.curate.features import table_sha256

    thresholds = thresholds or gates.GateThresholds()
    cv = cross_validate(table, spec, group_col, thresholds, source)
    model = train(table, spec, group_col, source)
    side = {"cell_type": spec.cell_type, "features": spec.columns, "spec": spec.as_dict(), "group_col": group_col,
            "training_source": str(source), "training_table_sha256": table_sha256(table, spec.columns),
            "n_train": int(len(table)), "n_yes": int(table["label_yes"].sum()),
            "n_no": int((table["label_yes"] == 0).sum()), "n_groups": int(table[group_col].nunique()),
            "cv": cv.report.as_dict(), "thresholds": thresholds.as_dict(), "gate_passed": cv.report.passed,
            "pixel_size_um": pixel_size_um, "channels": list(spec.channels), "learning_curve": curve,
            **(extra or {})}
    return cv, store.save(path, model, side)
