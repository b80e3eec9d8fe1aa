"""Answers files: what a person said about the cards of one gallery export.

An answers file (``seglab-answers/1``) is what the gallery's *Export answers* button downloads
(and what :func:`write_answers` writes, e.g. for a simulated annotator)::

    {"format": "seglab-answers/1", "export_id": "<64 hex>", "segmentation_id": "...",
     "area_filter": {"min_um2": 100.0, "max_um2": 2100.0}, "cell_type": "lymphocyte",
     "annotator": "ana", "saved_at": "2026-12-08T02:00:00+00:00",
     "answers": {"<object_id>": "yes" | "no" | "unsure", ...}}

It belongs to one gallery export (``gallery.json``, written by :mod:`seglab.curate.gallery`),
identified by its **export id**: the sha256 of the sorted object ids, the segmentation id (what
made the masks: model and mask settings) and the area filter (um^2). Object ids are stable
(:func:`seglab.core.objects.object_id`: slide or tile id + bounding box + area in px), so the
same mask gets the same id after a re-export; but answers made under another segmentation or
another area filter are **refused** (naming both), never matched to whatever cells carry the
same ids now. :func:`load_answers` also refuses malformed JSON, another format, ids the gallery
does not hold and a cell type other than the gallery's, each with the file and the fix.

:func:`merge_answers` combines the files of several annotators of one export: an object keeps
the definite answer (yes / no) its annotators gave, ``unsure`` answers abstain; objects where
annotators said yes and no are ``unsure`` in the merged table (kept out of training) and every
object whose answers differ at all is listed in the disagreements table.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from seglab import SeglabError
from seglab.core import io

ANSWERS_FORMAT = "seglab-answers/1"
GALLERY_FORMAT = "seglab-gallery/1"
GALLERY_FILE = "gallery.json"
ANSWER_VALUES = ("yes", "no", "unsure")
COLUMNS = ["object_id", "answer", "annotator", "cell_type"]
# how many unknown ids a refusal names
SHOW_IDS = 5


# --------------------------------------------------------------------------- identity of an export


def area_filter_record(min_um2, max_um2) -> dict:
    """``{"min_um2": float | None, "max_um2": float | None}`` (um^2): the area filter as gallery and
    answers files record it (None: no bound on that side)."""
    def num(v):
        return None if v is None else float(v)

    return {"min_um2": num(min_um2), "max_um2": num(max_um2)}


def segmentation_id(model: str, mask_settings: Mapping) -> str:
    """What made a set of masks: ``"<model>|mask:<12 hex>"``, the model (id or spec, as the run
    recorded it) and the sha256 of its mask settings (``MaskSettings.as_dict()``, keys sorted)."""
    h = hashlib.sha256(json.dumps(dict(mask_settings), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{model}|mask:{h}"


def export_id(object_ids: Iterable[str], segmentation: str, area_filter: Mapping) -> str:
    """sha256 (64 hex) of the sorted object ids, the segmentation id and the area filter record
    (:func:`area_filter_record`): the identity of one gallery export."""
    af = area_filter_record(area_filter.get("min_um2"), area_filter.get("max_um2"))
    h = hashlib.sha256()
    for oid in sorted(str(o) for o in object_ids):
        h.update(oid.encode() + b"\n")
    h.update(b"segmentation:" + str(segmentation).encode() + b"\n")
    h.update(b"area:" + json.dumps(af, sort_keys=True).encode())
    return h.hexdigest()


def describe_area(area_filter: Mapping | None) -> str:
    """``"100-2100 um^2"`` (``inf`` / ``0`` for a missing bound)."""
    if not isinstance(area_filter, Mapping):
        return repr(area_filter)
    lo, hi = area_filter.get("min_um2"), area_filter.get("max_um2")
    return f"{0 if lo is None else format(lo, 'g')}-{'inf' if hi is None else format(hi, 'g')} um^2"


# --------------------------------------------------------------------------- the gallery side


def load_gallery(gallery) -> dict:
    """A gallery record: ``gallery`` is the dict itself, a ``gallery.json`` path or the export folder.

    Raises SeglabError naming the file when it is missing, not JSON or not ``seglab-gallery/1``."""
    if isinstance(gallery, Mapping):
        g = dict(gallery)
        where = "gallery record"
    else:
        p = Path(gallery)
        if p.is_dir():
            p = p / GALLERY_FILE
        where = str(p)
        try:
            g = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SeglabError(f"{p}: no gallery record; give the gallery export folder (made by seglab gallery) "
                              f"or its {GALLERY_FILE}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise SeglabError(f"{p}: not a readable gallery record ({exc}); export the gallery again "
                              "with seglab gallery") from None
    if not isinstance(g, dict) or g.get("format") != GALLERY_FORMAT:
        got = g.get("format") if isinstance(g, dict) else type(g).__name__
        raise SeglabError(f"{where}: format {got!r} is not {GALLERY_FORMAT!r}; give the gallery.json that "
                          "seglab gallery wrote")
    missing = [k for k in ("export_id", "segmentation_id", "area_filter", "cell_type", "objects") if k not in g]
    if missing:
        raise SeglabError(f"{where}: gallery record lacks {', '.join(missing)}; export the gallery again")
    return g


# --------------------------------------------------------------------------- reading answers


def _read_json(path: Path) -> dict:
    fix = "export the answers again from the gallery (Export answers) and give that file"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SeglabError(f"{path}: answers file not found; check the path") from None
    except UnicodeDecodeError:
        raise SeglabError(f"{path}: not a text (JSON) file; {fix}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SeglabError(f"{path}: malformed JSON ({exc}); the file was cut or edited by hand: {fix}") from None
    if not isinstance(data, dict):
        raise SeglabError(f"{path}: an answers file is a JSON object, this is a {type(data).__name__}; {fix}")
    return data


def _same_area(a, b) -> bool:
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return False
    for k in ("min_um2", "max_um2"):
        x, y = a.get(k), b.get(k)
        if (x is None) != (y is None):
            return False
        if x is not None and not (isinstance(x, (int, float)) and isinstance(y, (int, float))
                                  and math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12)):
            return False
    return True


def check_answers(data: Mapping, gallery: Mapping, where: str) -> None:
    """Refuse (SeglabError naming ``where`` and the fix) answers that do not belong to ``gallery``:
    another format, another segmentation or area filter (both named), another export, another
    cell type, answer values other than yes / no / unsure, or object ids the gallery lacks."""
    if data.get("format") != ANSWERS_FORMAT:
        raise SeglabError(f"{where}: format {data.get('format')!r} is not {ANSWERS_FORMAT!r}: this is not a gallery "
                          "answers file; give the file the gallery's Export answers button downloaded")
    gname = gallery.get("_source", "the gallery")
    if data.get("segmentation_id") != gallery["segmentation_id"]:
        raise SeglabError(f"{where}: answers made under segmentation {data.get('segmentation_id')!r}, but {gname} "
                          f"shows segmentation {gallery['segmentation_id']!r}; the same ids would name other cells. "
                          "Annotate the gallery exported from the segmentation you train on, or export a gallery "
                          "from the segmentation these answers were made on")
    if not _same_area(data.get("area_filter"), gallery["area_filter"]):
        raise SeglabError(f"{where}: answers made under area filter {describe_area(data.get('area_filter'))}, but "
                          f"{gname} uses {describe_area(gallery['area_filter'])}; export the gallery again with "
                          "the answers' area filter (--area-min-um2/--area-max-um2) or annotate this gallery")
    if data.get("export_id") != gallery["export_id"]:
        raise SeglabError(f"{where}: answers belong to gallery export {str(data.get('export_id'))[:12]}, but "
                          f"{gname} is export {str(gallery['export_id'])[:12]} (same segmentation and area filter, "
                          "another set of objects, e.g. another sample or slide); give the answers of this export "
                          "or the gallery they were made on")
    if data.get("cell_type") != gallery["cell_type"]:
        raise SeglabError(f"{where}: answers are for cell type {data.get('cell_type')!r}, but {gname} is for "
                          f"{gallery['cell_type']!r}; give the answers file of cell type {gallery['cell_type']!r} "
                          "(one gallery and one model per cell type)")
    answers = data.get("answers")
    if not isinstance(answers, Mapping):
        raise SeglabError(f"{where}: no 'answers' object; export the answers again from the gallery")
    bad = {k: v for k, v in answers.items() if v not in ANSWER_VALUES}
    if bad:
        k, v = next(iter(bad.items()))
        raise SeglabError(f"{where}: {len(bad)} answer(s) are not one of {', '.join(ANSWER_VALUES)} (e.g. {k}: {v!r}); "
                          "export the answers again from the gallery")
    known = {o["object_id"] for o in gallery["objects"]}
    unknown = [k for k in answers if k not in known]
    if unknown:
        raise SeglabError(f"{where}: {len(unknown)} object id(s) are not in {gname} ({', '.join(unknown[:SHOW_IDS])}"
                          f"{', ...' if len(unknown) > SHOW_IDS else ''}); these answers were not made on this "
                          "export: give the gallery they were made on")


def load_answers(answers_path: str | os.PathLike, gallery) -> pd.DataFrame:
    """The answers of one file, checked against the gallery export they must belong to.

    Parameters
    ----------
    answers_path : a ``seglab-answers/1`` file.
    gallery : the gallery record (dict), its ``gallery.json`` or the export folder.

    Returns a DataFrame with columns object_id, answer ("yes" / "no" / "unsure"), annotator,
    cell_type; one row per answered object, in the gallery's object order. Raises SeglabError
    (naming the file and the fix) on malformed JSON, another format, another export /
    segmentation / area filter (naming both), unknown object ids (count and the first few), or a
    cell type other than the gallery's.
    """
    path = Path(answers_path)
    g = load_gallery(gallery)
    if not isinstance(gallery, Mapping):
        g["_source"] = f"gallery {gallery}"
    data = _read_json(path)
    check_answers(data, g, str(path))
    annotator = str(data.get("annotator") or "anonymous")
    answers = data["answers"]
    order = [o["object_id"] for o in g["objects"] if o["object_id"] in answers]
    return pd.DataFrame({"object_id": order, "answer": [answers[k] for k in order],
                         "annotator": annotator, "cell_type": g["cell_type"]}, columns=COLUMNS)


# --------------------------------------------------------------------------- writing and merging


def now_iso() -> str:
    """The current UTC time as ISO 8601 with seconds (``2026-12-08T02:00:00+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_answers(path: str | os.PathLike, gallery, answers: Mapping[str, str], annotator: str, *,
                  saved_at: str | None = None) -> Path:
    """Write an answers file for ``gallery`` (dict, gallery.json or export folder), atomically.

    ``answers``: {object_id: "yes" | "no" | "unsure"}; checked as :func:`load_answers` checks a
    file (unknown ids or values refused before anything is written). Returns the path."""
    g = load_gallery(gallery)
    data = {"format": ANSWERS_FORMAT, "export_id": g["export_id"], "segmentation_id": g["segmentation_id"],
            "area_filter": g["area_filter"], "cell_type": g["cell_type"], "annotator": str(annotator),
            "saved_at": saved_at or now_iso(), "answers": {str(k): v for k, v in answers.items()}}
    check_answers(data, g, f"answers for {path}")
    return io.write_json(path, data)


def load_answer_files(pairs: Iterable[tuple]) -> pd.DataFrame:
    """:func:`load_answers` of each (answers file, its gallery) pair, one table (every check per file)."""
    return pd.concat([load_answers(a, g) for a, g in pairs], ignore_index=True)


def merge_answers(paths: Iterable[str | os.PathLike], gallery) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge the answers files of several annotators of one gallery export.

    Every file is loaded with :func:`load_answers` (so each is checked against ``gallery``).
    Returns ``(merged, disagreements)``:

    - merged: columns object_id, answer, annotator, cell_type, n_answers; one row per object
      any file answered, in the gallery's order. ``answer`` is the definite answer (yes / no)
      the annotators gave (``unsure`` abstains); ``unsure`` when all were unsure or when some
      said yes and others no. ``annotator`` joins the names that answered it with ``+``.
    - disagreements: columns object_id, one column per annotator (their answer, "" when they
      did not answer it), merged, conflict (True where yes and no were both given); one row per
      object whose answers differ.

    Two files of the same annotator name are told apart as ``name (file name)``.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise SeglabError("merge: no answers files given; give two or more files exported from one gallery")
    g = load_gallery(gallery)
    tables, names = [], []
    for p in paths:
        t = load_answers(p, gallery if not isinstance(gallery, Mapping) else g)
        name = t["annotator"].iloc[0] if len(t) else _read_json(p).get("annotator") or "anonymous"
        if name in names:
            name = f"{name} ({p.name})"
        names.append(name)
        tables.append(dict(zip(t["object_id"], t["answer"])))
    merged_rows, dis_rows = [], []
    for o in g["objects"]:
        oid = o["object_id"]
        given = {n: t[oid] for n, t in zip(names, tables) if oid in t}
        if not given:
            continue
        definite = {a for a in given.values() if a != "unsure"}
        answer = next(iter(definite)) if len(definite) == 1 else "unsure"
        merged_rows.append({"object_id": oid, "answer": answer, "annotator": "+".join(given),
                            "cell_type": g["cell_type"], "n_answers": len(given)})
        if len(set(given.values())) > 1:
            dis_rows.append({"object_id": oid, **{n: given.get(n, "") for n in names}, "merged": answer,
                             "conflict": len(definite) > 1})
    merged = pd.DataFrame(merged_rows, columns=["object_id", "answer", "annotator", "cell_type", "n_answers"])
    dis = pd.DataFrame(dis_rows, columns=["object_id", *names, "merged", "conflict"])
    return merged, dis


def write_merged(path: str | os.PathLike, gallery, merged: pd.DataFrame) -> Path:
    """The merged answers as an answers file (annotator: the names joined by ``+``)."""
    names = []
    for a in merged["annotator"]:
        for n in str(a).split("+"):
            if n not in names:
                names.append(n)
    return write_answers(path, gallery, dict(zip(merged["object_id"], merged["answer"])), "+".join(names) or "merged")
