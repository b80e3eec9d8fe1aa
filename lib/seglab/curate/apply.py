"""The classifier as a filter: ``classifier_confidence`` per object and ``kept``.

:func:`apply` adds to a features table (:func:`seglab.curate.features.object_features`) the
probability that each object is a real cell (``classifier_confidence``, the classifier's
probability of "yes", a fraction) and ``kept`` (confidence >= ``threshold``). Without a
classifier every object is kept with confidence 1.0. Tile inference
(:func:`seglab.segment.predict.predict`) and slide inference
(:func:`seglab.segment.slides.predict_slide`) call it when given ``classifier=``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from seglab import SeglabError

CONFIDENCE = "classifier_confidence"
KEPT = "kept"
CONFIDENCE_DECIMALS = 4   # rounded as written to the tables, so reading them back decides the same way


def check_threshold(threshold) -> float:
    """``threshold`` as a fraction in [0, 1]; SeglabError otherwise."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) \
            or not 0 <= float(threshold) <= 1:
        raise SeglabError(f"classifier threshold {threshold!r} must be a fraction in [0, 1] (e.g. 0.5)")
    return float(threshold)


def confidences(classifier, features: pd.DataFrame) -> np.ndarray:
    """The classifier's probability of "yes" per row (rounded to :data:`CONFIDENCE_DECIMALS`);
    1.0 for every row without a classifier. SeglabError naming the classifier's file when a
    feature column it was trained on is missing."""
    if classifier is None:
        return np.ones(len(features))
    missing = [c for c in classifier.features if c not in features.columns]
    if missing:
        raise SeglabError(f"{classifier.path}: trained on features {missing} that this table lacks (its channels: "
                          f"{classifier.sidecar.get('channels')}); give images with those channels or a classifier "
                          "trained on these")
    if not len(features):
        return np.zeros(0)
    return np.round(classifier.confidence(features[classifier.features].to_numpy(float)), CONFIDENCE_DECIMALS)


def apply(classifier, features: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """A copy of ``features`` with ``classifier_confidence`` and ``kept`` (confidence >= threshold).

    ``classifier``: a loaded :class:`seglab.curate.store.Classifier` or None (everything kept,
    confidence 1.0). ``attrs``: n_before, n_after, threshold."""
    t = check_threshold(threshold)
    out = features.copy()
    out[CONFIDENCE] = confidences(classifier, features)
    out[KEPT] = out[CONFIDENCE].to_numpy() >= t
    out.attrs.update(n_before=int(len(out)), n_after=int(out[KEPT].sum()), threshold=t)
    return out


def record(classifier, threshold: float) -> dict | None:
    """What a run filtered with ``classifier`` records (and compares to resume): its sha256 and the
    threshold; None without a classifier (the record is then what it was before filters existed)."""
    if classifier is None:
        return None
    return {"sha256": classifier.sha256, "threshold": check_threshold(threshold)}
