"""Whole slides read lazily: CZI (pylibCZIrw), OME-TIFF and tiled / pyramidal TIFF (tifffile).

:func:`open_slide` gives a :class:`Slide`: its size in px, channel names, pixel size in um and
``read(y, x, h, w, channels)`` -> ``(C, h, w)`` of one region. Only the region asked for is
read (CZI: ``CziReader.read(roi=...)``; TIFF: tifffile's zarr store over the file's tiles),
so a slide never sits whole in memory.

- Pixel size (um per px): from the metadata (CZI ``Scaling/Items/Distance`` in metres; OME
  ``PhysicalSizeX`` with its unit; plain TIFF ``XResolution`` with a cm or inch unit), or given
  (``pixel_size_um``), which overrides the metadata. Neither: a SeglabError naming the file and
  the param to give.
- Channels by name (``channels=["DAPI", "CD45"]``): CZI and OME channel names; a plain TIFF's
  channels are named ``c0``, ``c1``, ... An unknown name fails with the names the file has.
- An unreadable or truncated file fails at :func:`open_slide`, naming the file.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from seglab import SeglabError
from seglab.core import io, paths
from seglab.core.units import check_pixel_size

CZI_SUFFIXES = (".czi",)
TIFF_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff")
SLIDE_SUFFIXES = CZI_SUFFIXES + TIFF_SUFFIXES
# OME length units -> um
_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def slide_id(path: str | os.PathLike) -> str:
    """The slide's id: its file name without the slide suffix (``S01.ome.tif`` -> ``S01``)."""
    stem = paths.strip_suffix(path, SLIDE_SUFFIXES)
    return Path(path).stem if stem is None else stem


def list_slides(folder: str | os.PathLike) -> list[Path]:
    """The slide files (CZI, OME-TIFF, TIFF) of ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SeglabError(f"{folder}: slides folder not found; give a folder of .czi / .ome.tif / .tif slides")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SLIDE_SUFFIXES)
                   and not p.name.startswith("."))
    if not found:
        raise SeglabError(f"{folder}: no slides (.czi, .ome.tif, .tif) in this folder")
    return found


@dataclass
class Slide:
    """One open slide. Close it (or use it as a context manager) to release the file.

    path : the file. id : :func:`slide_id`. fmt : ``czi``, ``ome-tiff`` or ``tiff``.
    height_px, width_px : size of the slide (its bounding rectangle), px.
    channel_names : all channels of the file, in file order.
    channels : the indices (into ``channel_names``) that :meth:`read` returns, in that order.
    pixel_size_um : um per px; ``pixel_size_source``: ``metadata`` or ``param``.
    dtype : numpy dtype of the pixels.
    """

    path: Path
    fmt: str
    height_px: int
    width_px: int
    channel_names: list[str]
    channels: list[int]
    pixel_size_um: float
    pixel_size_source: str
    dtype: np.dtype
    _handle: object = field(default=None, repr=False)
    _ctx: object = field(default=None, repr=False)
    _origin: tuple = (0, 0)   # CZI: (x, y) of the bounding rectangle's corner

    @property
    def id(self) -> str:
        return slide_id(self.path)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height_px, self.width_px

    @property
    def names(self) -> list[str]:
        """The names of the channels :meth:`read` returns."""
        return [self.channel_names[i] for i in self.channels]

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The region [y, y+h) x [x, x+w) (px, clipped to the slide) of :attr:`channels`: (C, h', w')."""
        y0, x0 = max(int(y), 0), max(int(x), 0)
        y1, x1 = min(int(y) + int(h), self.height_px), min(int(x) + int(w), self.width_px)
        if y1 <= y0 or x1 <= x0:
            raise SeglabError(f"{self.path}: region y={y} x={x} h={h} w={w} lies outside the slide "
                              f"({self.height_px} x {self.width_px} px)")
        try:
            if self.fmt == "czi":
                ox, oy = self._origin
                planes = [self._handle.read(roi=(ox + x0, oy + y0, x1 - x0, y1 - y0), plane={"C": c})[..., 0]
                          for c in self.channels]
                return np.stack(planes)
            arr = self._handle   # zarr array over the TIFF's tiles, (C, Y, X)
            return np.asarray(arr[self.channels, y0:y1, x0:x1])
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            raise SeglabError(f"{self.path}: cannot read region y={y0} x={x0} h={y1 - y0} w={x1 - x0} "
                              f"({type(exc).__name__}: {exc}); the file may be truncated or damaged: copy it again") from None

    def close(self) -> None:
        if self._ctx is not None:
            try:
                self._ctx.__exit__(None, None, None)
            finally:
                self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> str:
        return (f"{self.id} ({self.fmt}): {self.height_px} x {self.width_px} px, {self.pixel_size_um:g} um/px "
                f"({self.pixel_size_source}), channels {self.names}")


def open_slide(path: str | os.PathLike, *, pixel_size_um: float | None = None,
               channels: Sequence[str] | None = None) -> Slide:
    """Open a slide lazily.

    Parameters
    ----------
    path : a ``.czi``, ``.ome.tif(f)`` or tiled ``.tif(f)`` file.
    pixel_size_um : um per px; overrides the metadata. None: from the metadata (required there).
    channels : channel names to read, in this order; None: every channel of the file.

    Raises SeglabError: missing / unreadable / truncated file, no pixel size in the metadata and
    none given, an unknown channel name.
    """
    path = Path(path)
    if not path.is_file():
        raise SeglabError(f"{path}: slide not found")
    if pixel_size_um is not None:
        pixel_size_um = check_pixel_size(pixel_size_um, f"{path}: pixel_size_um")
    name = path.name.lower()
    if name.endswith(CZI_SUFFIXES):
        slide = _open_czi(path)
    elif name.endswith(TIFF_SUFFIXES):
        slide = _open_tiff(path)
    else:
        raise SeglabError(f"{path}: not a slide format seglab reads; use .czi, .ome.tif or a tiled .tif")
    try:
        if pixel_size_um is not None:
            slide.pixel_size_um, slide.pixel_size_source = pixel_size_um, "param"
        elif slide.pixel_size_um is None:
            raise SeglabError(f"{path}: no pixel size in the file's metadata; give it with pixel_size_um "
                              "(params) or --pixel-size-um (um per px, e.g. 0.1725)")
        slide.channels = select_channels(slide.channel_names, channels, path)
    except BaseException:
        slide.close()
        raise
    return slide


def select_channels(names: Sequence[str], wanted: Sequence[str] | None, path) -> list[int]:
    """Indices of ``wanted`` in ``names`` (None: all). Unknown names: SeglabError listing the file's."""
    if wanted is None or len(wanted) == 0:
        return list(range(len(names)))
    if isinstance(wanted, str):
        wanted = [wanted]
    lower = [n.lower() for n in names]
    out = []
    for w in wanted:
        if str(w).lower() not in lower:
            raise SeglabError(f"{path}: no channel named {w!r}; the file has {list(names)}: fix 'channels' "
                              "(names, case-insensitive)")
        out.append(lower.index(str(w).lower()))
    return out


def _open_czi(path: Path) -> Slide:
    from pylibCZIrw import czi

    ctx = czi.open_czi(str(path))
    try:
        reader = ctx.__enter__()
    except Exception as exc:   # pylibCZIrw raises RuntimeError for a truncated or foreign file
        raise SeglabError(f"{path}: unreadable CZI ({type(exc).__name__}: {str(exc)[:200]}); the file is truncated "
                          "or not a CZI: copy it again from the microscope's export") from None
    try:
        rect = reader.total_bounding_rectangle
        md = reader.metadata.get("ImageDocument", {}).get("Metadata", {})
        info = md.get("Information", {}).get("Image", {})
        chans = (((info.get("Dimensions") or {}).get("Channels") or {}).get("Channel")) or []
        if isinstance(chans, dict):
            chans = [chans]
        n_c = int(info.get("SizeC") or len(chans) or 1)
        names = [str(c.get("@Name") or c.get("@Id") or f"c{i}") for i, c in enumerate(chans)] or \
            [f"c{i}" for i in range(n_c)]
        scale = None
        dist = (((md.get("Scaling") or {}).get("Items") or {}).get("Distance")) or []
        if isinstance(dist, dict):
            dist = [dist]
        for d in dist:
            if d.get("@Id") == "X":
                try:
                    v = float(d.get("Value"))
                except (TypeError, ValueError):
                    v = 0.0
                scale = v * 1e6 if v > 0 else None
        dtype = np.dtype(np.uint8 if "8" in str(info.get("PixelType", "Gray16")) else np.uint16)
        if str(info.get("PixelType", "")).startswith("Gray32Float"):
            dtype = np.dtype(np.float32)
        # one read of a corner: a file whose data blocks are cut off fails here, not mid-run
        reader.read(roi=(rect.x, rect.y, min(rect.w, 16), min(rect.h, 16)), plane={"C": 0})
    except SeglabError:
        ctx.__exit__(None, None, None)
        raise
    except Exception as exc:
        ctx.__exit__(None, None, None)
        raise SeglabError(f"{path}: unreadable CZI ({type(exc).__name__}: {str(exc)[:200]}); copy it again") from None
    return Slide(path=path, fmt="czi", height_px=int(rect.h), width_px=int(rect.w), channel_names=names,
                 channels=list(range(len(names))), pixel_size_um=scale,
                 pixel_size_source="metadata", dtype=dtype, _handle=reader, _ctx=ctx, _origin=(rect.x, rect.y))


class _TiffCtx:
    def __init__(self, tif):
        self.tif = tif

    def __exit__(self, *exc):
        self.tif.close()


def _open_tiff(path: Path) -> Slide:
    import tifffile
    import zarr

    try:
        with io.quiet_tiff_log():
            tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise SeglabError(f"{path}: unreadable TIFF ({type(exc).__name__}: {str(exc)[:200]}); copy it again") from None
    try:
        series = tif.series[0]
        axes = series.axes
        if axes not in ("YX", "CYX", "YXS", "IYX", "QYX"):
            raise SeglabError(f"{path}: TIFF axes {axes!r}; expected a 2D slide with channels first (CYX) or one (YX)")
        z = zarr.open(series.aszarr(level=0), mode="r")
        if isinstance(z, zarr.Group):
            z = z["0"]
        if z.ndim == 2:
            z = _Expand(z)
        elif axes == "YXS":
            raise SeglabError(f"{path}: RGB (YXS) slides are not read; save the channels first (CYX)")
        n_c = z.shape[0]
        names, scale = [f"c{i}" for i in range(n_c)], None
        fmt = "tiff"
        if tif.is_ome and tif.ome_metadata:
            fmt = "ome-tiff"
            names, scale = _ome_names_scale(tif.ome_metadata, n_c)
        if scale is None:
            scale = _tiff_resolution_um(tif.pages[0])
        # a truncated file fails on its last tile: read one px from the far corner now
        np.asarray(z[n_c - 1: n_c, z.shape[1] - 1:, z.shape[2] - 1:])
        dtype = np.dtype(series.dtype)
    except SeglabError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise SeglabError(f"{path}: unreadable TIFF ({type(exc).__name__}: {str(exc)[:200]}); the file may be "
                          "truncated: copy it again") from None
    return Slide(path=path, fmt=fmt, height_px=int(z.shape[1]), width_px=int(z.shape[2]), channel_names=names,
                 channels=list(range(n_c)), pixel_size_um=scale, pixel_size_source="metadata", dtype=dtype,
                 _handle=z, _ctx=_TiffCtx(tif))


class _Expand:
    """A (Y, X) zarr array seen as (1, Y, X)."""

    def __init__(self, z):
        self.z, self.shape, self.ndim = z, (1, *z.shape), 3

    def __getitem__(self, key):
        c, ys, xs = key
        plane = np.asarray(self.z[ys, xs])[None]
        return plane[c] if not isinstance(c, slice) else plane[c]


def _ome_names_scale(xml: str, n_c: int) -> tuple[list[str], float | None]:
    root = ET.fromstring(xml)
    ns = {"ome": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
    pixels = root.find(".//ome:Pixels", ns) if ns else root.find(".//Pixels")
    names = [f"c{i}" for i in range(n_c)]
    scale = None
    if pixels is not None:
        chans = pixels.findall("ome:Channel", ns) if ns else pixels.findall("Channel")
        for i, ch in enumerate(chans[:n_c]):
            if ch.get("Name"):
                names[i] = ch.get("Name")
        px = pixels.get("PhysicalSizeX")
        if px is not None and float(px) > 0:
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            scale = float(px) * _UNIT_UM.get(unit, 1.0)
    return names, scale


def _tiff_resolution_um(page) -> float | None:
    """um per px from XResolution (px per unit) and ResolutionUnit (2 inch, 3 cm); None when absent."""
    res, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if res is None or unit is None:
        return None
    num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
    if not num or not den:
        return None
    per_unit = num / den
    u = int(unit.value)
    if u == 3:
        return 1e4 / per_unit
    if u == 2:
        return 25400.0 / per_unit
    return None


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """A file-name-safe version of a slide or channel name."""
    return _SAFE.sub("_", str(text)).strip("_") or "x"
