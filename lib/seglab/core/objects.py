"""Stable object ids: one definition for slide instance tables, tile object tables, galleries and answers."""

from __future__ import annotations

import hashlib
from typing import Sequence


def object_id(source: str, bbox: Sequence[int], area_px: int) -> str:
    """``<source>-<10 hex>``: a stable id from the slide or tile id ``source`` and the object's geometry
    (bbox y0, x0, y1, x1 in the source's px and its area in px): the same mask gets the same id in
    every run and export, so answers find their cell after a re-export."""
    key = f"{source}|{','.join(str(int(v)) for v in bbox)}|{int(area_px)}"
    return f"{source}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
