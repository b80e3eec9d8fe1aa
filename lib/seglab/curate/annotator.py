"""A simulated annotator: answers a gallery from the truth, with a small error rate.

Used on simulated slides (:mod:`seglab.data.simulate_slides`, whose truth says which objects are
real cells and which are planted artefacts) to study how many answers the classifier's gate needs
(E9). The answers file is written like the browser's (:func:`seglab.curate.answers.write_answers`).
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from seglab import SeglabError


def simulate_answers(truth_yes: Mapping[str, bool], *, error_rate: float = 0.05, unsure_rate: float = 0.0,
                     seed: int = 0) -> dict[str, str]:
    """{object_id: "yes" | "no" | "unsure"}: "yes" for a real cell (``truth_yes[id]`` True), "no"
    otherwise; a seeded ``error_rate`` fraction of the sure answers is flipped and an
    ``unsure_rate`` fraction (drawn first) is "unsure". Ids are answered in sorted order, so the
    same truth and seed give the same answers."""
    for name, v in (("error_rate", error_rate), ("unsure_rate", unsure_rate)):
        if not 0 <= float(v) <= 1:
            raise SeglabError(f"simulated annotator: {name}={v} must be a fraction in [0, 1]")
    ids = sorted(truth_yes)
    rng = np.random.default_rng(int(seed))
    unsure = rng.uniform(0, 1, len(ids)) < float(unsure_rate)
    flip = rng.uniform(0, 1, len(ids)) < float(error_rate)
    out = {}
    for i, oid in enumerate(ids):
        yes = bool(truth_yes[oid]) != bool(flip[i])
        out[oid] = "unsure" if unsure[i] else ("yes" if yes else "no")
    return out


def answer_gallery(path: str | os.PathLike, gallery, truth_yes: Mapping[str, bool], *, annotator: str = "simulated",
                   error_rate: float = 0.05, unsure_rate: float = 0.0, seed: int = 0):
    """Answer every object of ``gallery`` (dict, gallery.json or export folder) from ``truth_yes``
    and write the answers file ``path``; returns (path, answers dict). An object of the gallery
    missing from ``truth_yes`` is refused (the truth must cover what is shown)."""
    from seglab.curate.answers import load_gallery, write_answers

    g = load_gallery(gallery)
    ids = [o["object_id"] for o in g["objects"]]
    missing = [i for i in ids if i not in truth_yes]
    if missing:
        raise SeglabError(f"simulated annotator: {len(missing)} gallery object(s) have no truth ({', '.join(missing[:3])})")
    answers = simulate_answers({i: truth_yes[i] for i in ids}, error_rate=error_rate, unsure_rate=unsure_rate,
                               seed=seed)
    return write_answers(path, g, answers, annotator), answers
