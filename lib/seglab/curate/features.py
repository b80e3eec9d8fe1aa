"""Per-object features the curation classifier sees: morphology and intensities, from regionprops.

:func:`object_features` measures every object of a label image with
:func:`skimage.measure.regionprops` (the values equal regionprops' own, converted to um and
um^2 by :mod:`seglab.core.units`, the one conversion). Object ids are those of the slide
instance tables (:func:`seglab.core.objects.object_id`: source + bbox + area, here with the
bbox shifted by ``offset`` into the source's coordinates), so features, gallery cards, answers
and instance tables name the same cells.

Columns (one row per object)
----------------------------
object_id, source, label, centroid_y_px, centroid_x_px, bbox_y0..bbox_x1 (px, in the source's
coordinates), area_px, area_um2, perimeter_um (regionprops' 4-connected perimeter x pixel size),
eccentricity, solidity, extent (fractions), major_axis_um, minor_axis_um (the axes of the
ellipse with the same second moments), and per channel ``mean_<ch>``, ``max_<ch>``, ``std_<ch>``
(intensity in the image's units, over the object's px).

:data:`MORPHOLOGY_COLUMNS` are what a morphology-only classifier sees; :func:`feature_columns`
adds the intensity columns of given channels; :data:`FEATURE_COLUMNS` are those of the default
channels (DAPI + CD45, the simulated slides' and the tiles' nucleus and marker).

:func:`training_table` joins features with answers (:func:`seglab.curate.answers.load_answers`)
into the table a classifier is trained on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.curate.answers import ANSWER_VALUES
from seglab.core.units import check_pixel_size, px_to_um, px_to_um2

MORPHOLOGY_COLUMNS = ("area_um2", "perimeter_um", "eccentricity", "solidity", "extent", "major_axis_um",
                      "minor_axis_um")
INTENSITY_STATS = ("mean", "max", "std")
DEFAULT_CHANNELS = ("DAPI", "CD45")
ID_COLUMNS = ("object_id", "source", "label", "centroid_y_px", "centroid_x_px", "bbox_y0", "bbox_x0", "bbox_y1",
              "bbox_x1", "area_px")
ANSWER_LABEL = "yes"   # the positive class: a real cell of the wanted type


def channel_column(stat: str, channel: str) -> str:
    """``mean_DAPI``: the column of ``stat`` (mean, max, std) of ``channel`` (its file-safe name)."""
    from seglab.data.slides import safe_name

    return f"{stat}_{safe_name(channel)}"


def feature_columns(channel_names: Sequence[str] | None = DEFAULT_CHANNELS, morphology_only: bool = False) -> list[str]:
    """The classifier's inputs: :data:`MORPHOLOGY_COLUMNS`, then mean / max / std per channel
    (none with ``morphology_only``)."""
    cols = list(MORPHOLOGY_COLUMNS)
    if not morphology_only:
        cols += [channel_column(s, c) for c in (channel_names or ()) for s in INTENSITY_STATS]
    return cols


FEATURE_COLUMNS = tuple(feature_columns(DEFAULT_CHANNELS))


def channel_names_for(names: Sequence[str] | None, n_channels: int) -> list[str]:
    """``n_channels`` names for an image's channels: the first of ``names``, then ``c<k>`` for the
    channels beyond them."""
    given = list(names or ())[:n_channels]
    return given + [f"c{k}" for k in range(len(given), n_channels)]


def object_features(labels: np.ndarray, image: np.ndarray | None, pixel_size_um: float,
                    channel_names: Sequence[str] | None = None, source: str = "tile", *,
                    offset: tuple[int, int] = (0, 0), ids: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per object of ``labels`` (module docstring for the columns).

    Parameters
    ----------
    labels : (Y, X) int, 0 background, any positive ids.
    image : (C, Y, X) intensities on the same grid (None: no intensity columns).
    pixel_size_um : um per px. channel_names : C names (default ``c0, c1, ...``).
    source : the slide or tile id the object ids are made from.
    offset : (y, x) px of ``labels``' origin in the source (a window of a slide), so that ids and
        bboxes are the source's.
    ids : measure only these label values (default: all).

    Example
    -------
    >>> lab = np.zeros((8, 8), int); lab[2:4, 1:6] = 3
    >>> object_features(lab, None, 0.5, source="t1")[["label", "area_px", "area_um2", "extent"]].values.tolist()
    [[3.0, 10.0, 2.5, 1.0]]
    """
    from skimage.measure import regionprops

    from seglab.core.objects import object_id

    p = check_pixel_size(pixel_size_um)
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise SeglabError(f"object_features: labels must be a 2D integer image, got {labels.dtype} {labels.shape}")
    inten = None
    names: list[str] = []
    if image is not None:
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3 or image.shape[1:] != labels.shape:
            raise SeglabError(f"object_features: image {image.shape} must be (C, Y, X) on the labels' grid "
                              f"{labels.shape}")
        names = list(channel_names) if channel_names is not None else [f"c{k}" for k in range(image.shape[0])]
        if len(names) != image.shape[0]:
            raise SeglabError(f"object_features: {len(names)} channel names for {image.shape[0]} channels")
        inten = np.moveaxis(image, 0, -1).astype(np.float64)
    oy, ox = int(offset[0]), int(offset[1])
    wanted = None if ids is None else set(int(i) for i in ids)
    rows = []
    for rp in regionprops(labels, intensity_image=inten):
        if wanted is not None and rp.label not in wanted:
            continue
        by0, bx0, by1, bx1 = rp.bbox
        bbox = (by0 + oy, bx0 + ox, by1 + oy, bx1 + ox)
        area = int(rp.area)
        cy, cx = rp.centroid
        row = {"object_id": object_id(source, bbox, area), "source": source, "label": int(rp.label),
               "centroid_y_px": float(cy + oy), "centroid_x_px": float(cx + ox),
               "bbox_y0": bbox[0], "bbox_x0": bbox[1], "bbox_y1": bbox[2], "bbox_x1": bbox[3],
               "area_px": area, "area_um2": float(px_to_um2(area, p)),
               "perimeter_um": float(px_to_um(rp.perimeter, p)), "eccentricity": float(rp.eccentricity),
               "solidity": float(rp.solidity), "extent": float(rp.extent),
               "major_axis_um": float(px_to_um(rp.axis_major_length, p)),
               "minor_axis_um": float(px_to_um(rp.axis_minor_length, p))}
        if inten is not None:
            mean, mx, sd = (np.atleast_1d(rp.intensity_mean), np.atleast_1d(rp.intensity_max),
                            np.atleast_1d(rp.intensity_std))
            for k, name in enumerate(names):
                row[channel_column("mean", name)] = float(mean[k])
                row[channel_column("max", name)] = float(mx[k])
                row[channel_column("std", name)] = float(sd[k])
        rows.append(row)
    cols = list(ID_COLUMNS) + list(MORPHOLOGY_COLUMNS) + [channel_column(s, c) for c in names for s in INTENSITY_STATS]
    return pd.DataFrame(rows, columns=cols)


def training_table(features: pd.DataFrame, answers: pd.DataFrame, *, source: str = "answers") -> pd.DataFrame:
    """Features labelled by answers: one row per answered object (yes / no), ``label_yes`` 1 for
    "yes" (a real cell), 0 for "no"; "unsure" answers are kept out and counted.

    Parameters
    ----------
    features : :func:`object_features` rows (object_id, source, feature columns).
    answers : :func:`seglab.curate.answers.load_answers` (object_id, answer, annotator, cell_type).
    source : what the answers came from (a file name), named in errors.

    Returns the joined table (features + answer, annotator, cell_type, label_yes) with ``attrs``:
    n_answers, n_yes, n_no, n_unsure, n_not_found, not_found (the first 10 ids of answers with no
    feature row). Raises SeglabError when an object is answered twice with different answers
    (merge two annotators' files first: ``seglab answers merge``) or an answer is not yes/no/unsure.
    """
    need = {"object_id", "answer"}
    if not need <= set(answers.columns):
        raise SeglabError(f"{source}: the answers table lacks {sorted(need - set(answers.columns))}; load it with "
                          "seglab.curate.answers.load_answers")
    bad = sorted(set(answers["answer"]) - set(ANSWER_VALUES))
    if bad:
        raise SeglabError(f"{source}: answers {bad} are not yes / no / unsure; fix or re-export the answers file")
    dup = answers[answers["object_id"].duplicated(keep=False)]
    conflict = dup.groupby("object_id")["answer"].nunique()
    conflict = conflict[conflict > 1]
    if len(conflict):
        raise SeglabError(f"{source}: {len(conflict)} object(s) answered both ways ({', '.join(conflict.index[:3])}); "
                          "merge the annotators' files first (seglab answers merge) and settle the disagreements")
    answers = answers.drop_duplicates("object_id")
    n_unsure = int((answers["answer"] == "unsure").sum())
    sure = answers[answers["answer"] != "unsure"]
    found = sure["object_id"].isin(features["object_id"])
    missing = sure.loc[~found, "object_id"].tolist()
    keep_cols = [c for c in ("object_id", "answer", "annotator", "cell_type") if c in sure.columns]
    table = features.merge(sure.loc[found, keep_cols], on="object_id", how="inner", validate="many_to_one")
    table["label_yes"] = (table["answer"] == ANSWER_LABEL).astype(np.int64)
    table.attrs.update(source=str(source), n_answers=int(len(answers)), n_yes=int(table["label_yes"].sum()),
                       n_no=int((table["label_yes"] == 0).sum()), n_unsure=n_unsure, n_not_found=len(missing),
                       not_found=missing[:10])
    return table


def table_sha256(table: pd.DataFrame, columns: Sequence[str]) -> str:
    """sha256 of a training table's object ids, labels and feature values (CSV text, fixed column
    order and row order by object id): what the classifier's sidecar records."""
    import hashlib

    cols = ["object_id", *columns, "label_yes"]
    text = table[cols].sort_values("object_id", kind="stable").to_csv(index=False, float_format="%.9g")
    return hashlib.sha256(text.encode()).hexdigest()
