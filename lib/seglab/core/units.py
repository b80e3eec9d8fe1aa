"""Micrometres and pixels: the ONE conversion between um^2 and px, and the one area filter.

A whole-slide study gives sizes in um^2 (a cell of 100-2,100 um^2) while masks are counted in
px. The earlier pipeline converted in three scripts and the bounds drifted (4,000-75,000 px in
one, 3,360-70,573 px in another), so the cells shown for annotation were not the cells
segmented. Here :func:`um2_to_px` / :func:`px_to_um2` are the only conversion, and
:class:`AreaFilter` (bounds in um^2) is what segmentation (:mod:`seglab.segment.slides`), export
and every later step apply; each output table carries both ``area_um2`` and ``area_px``.

Bounds are inclusive in px after conversion: an object of ``area_px`` px is kept when
``min_px <= area_px <= max_px`` with ``min_px = ceil(min_um2 / pixel_size_um**2)`` and
``max_px = floor(max_um2 / pixel_size_um**2)`` (areas in px are whole numbers, so the integer
bounds give exactly the objects whose area in um^2 lies in [min_um2, max_um2]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from seglab import SeglabError


def check_pixel_size(pixel_size_um, source: str = "pixel_size_um") -> float:
    """``pixel_size_um`` as a float > 0 (um per px); SeglabError naming ``source`` otherwise."""
    if isinstance(pixel_size_um, bool) or not isinstance(pixel_size_um, (int, float, np.floating)) \
            or not math.isfinite(float(pixel_size_um)) or float(pixel_size_um) <= 0:
        raise SeglabError(f"{source}: {pixel_size_um!r} is not a pixel size; give the side of one pixel in um (> 0), "
                          "e.g. 0.1725")
    return float(pixel_size_um)


def um2_to_px(area_um2, pixel_size_um: float):
    """Area in um^2 -> area in px (float, or an array of floats) at ``pixel_size_um`` um per px."""
    p = check_pixel_size(pixel_size_um)
    return np.asarray(area_um2, float) / (p * p) if np.ndim(area_um2) else float(area_um2) / (p * p)


def px_to_um2(area_px, pixel_size_um: float):
    """Area in px -> area in um^2 (float, or an array of floats) at ``pixel_size_um`` um per px."""
    p = check_pixel_size(pixel_size_um)
    return np.asarray(area_px, float) * (p * p) if np.ndim(area_px) else float(area_px) * (p * p)


def px_to_um(length_px, pixel_size_um: float):
    """A length or coordinate in px -> um."""
    p = check_pixel_size(pixel_size_um)
    return np.asarray(length_px, float) * p if np.ndim(length_px) else float(length_px) * p


@dataclass(frozen=True)
class AreaFilter:
    """Keep objects whose area lies in [min_um2, max_um2] (um^2; None = no bound on that side).

    Raises SeglabError (naming ``source``, e.g. the params file, and the params keys
    ``min_area_um2`` / ``max_area_um2``) when min > max or a bound is negative.
    """

    min_um2: float | None = None
    max_um2: float | None = None
    # where the bounds came from, for messages only: two filters of the same bounds are the same filter
    source: str = field(default="area filter", compare=False)

    def __post_init__(self):
        # named by their params keys (min_area_um2 / max_area_um2), which is where users set them
        for key, v in (("min_area_um2", self.min_um2), ("max_area_um2", self.max_um2)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise SeglabError(f"{self.source}: {key}={v!r} must be a number of um^2 >= 0 or null")
        if self.min_um2 is not None and self.max_um2 is not None and self.min_um2 > self.max_um2:
            raise SeglabError(f"{self.source}: area filter min_area_um2={self.min_um2} is larger than max_area_um2="
                              f"{self.max_um2}; give min_area_um2 <= max_area_um2 (both in um^2)")

    @classmethod
    def from_params(cls, params: dict, source: str = "params") -> "AreaFilter":
        """From ``params['min_area_um2']`` and ``params['max_area_um2']`` (either may be missing or null)."""
        def get(key):
            v = params.get(key)
            return None if v is None else float(v) if not isinstance(v, bool) and isinstance(v, (int, float)) else v

        return cls(get("min_area_um2"), get("max_area_um2"), source=source)

    def px_bounds(self, pixel_size_um: float) -> tuple[int, int | None]:
        """(min_px, max_px) at ``pixel_size_um``: whole px, inclusive (max None: no upper bound)."""
        lo = 0 if self.min_um2 is None else int(math.ceil(um2_to_px(self.min_um2, pixel_size_um) - 1e-9))
        hi = None if self.max_um2 is None else int(math.floor(um2_to_px(self.max_um2, pixel_size_um) + 1e-9))
        return lo, hi

    def keep(self, area_px, pixel_size_um: float) -> np.ndarray:
        """Boolean array: which of the areas (px) the filter keeps at ``pixel_size_um``."""
        a = np.asarray(area_px)
        lo, hi = self.px_bounds(pixel_size_um)
        ok = a >= lo
        if hi is not None:
            ok &= a <= hi
        return ok

    def apply(self, table, pixel_size_um: float):
        """The rows of ``table`` (a DataFrame with ``area_px``) the filter keeps."""
        return table[self.keep(table["area_px"].to_numpy(), pixel_size_um)]

    def describe(self, pixel_size_um: float) -> str:
        """``"100-2100 um^2 = 3361-70573 px at 0.1725 um/px"``."""
        lo, hi = self.px_bounds(pixel_size_um)
        a = "0" if self.min_um2 is None else f"{self.min_um2:g}"
        b = "inf" if self.max_um2 is None else f"{self.max_um2:g}"
        return f"{a}-{b} um^2 = {lo}-{'inf' if hi is None else hi} px at {pixel_size_um:g} um/px"

    def as_dict(self) -> dict:
        return {"min_area_um2": self.min_um2, "max_area_um2": self.max_um2}
