"""Reader for the DSB2018 fluorescence nuclei beside the checkout (``../shared/data/dsb2018_fluo``).

451 real, CC0, hand-labelled 2D images (BBBC038v1 stage1_train, grayscale
fluorescence only) with 13,919 nuclei. Layout: ``images/<name>.tif`` (uint8,
Y x X), ``masks/<name>.tif`` (uint16 instance labels, 0 = background) and
``metadata.csv`` (name, dsb_image_id, height, width, group, n_objects,
median_area in px, overlap_px). ``group`` is the image shape, a proxy for the
acquisition source: split by it (never by image), since nucleus size differs
about threefold between groups (median diameter 14 px in some, 47 px in others).

The folder is read in place and never copied. It is not part of the
repository: :func:`find_dsb2018` returns None when it is absent, and tests that
need it skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from seglab import SeglabError
from seglab.core import paths

ENV_VAR = "SEGLAB_DSB2018_DIR"


def find_dsb2018() -> Path | None:
    """The DSB2018 folder: ``$SEGLAB_DSB2018_DIR`` or ``<root>/../shared/data/dsb2018_fluo``; None if absent."""
    candidates = [os.environ.get(ENV_VAR), paths.project_root().parent / "shared" / "data" / "dsb2018_fluo"]
    for c in candidates:
        if c and (Path(c) / "metadata.csv").is_file():
            return Path(c)
    return None


def dsb2018_table(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per image: metadata.csv plus absolute ``image_path`` and ``mask_path``."""
    root = Path(root) if root else find_dsb2018()
    if root is None or not (root / "metadata.csv").is_file():
        raise SeglabError(f"DSB2018 data not found (looked for metadata.csv in {root or '../shared/data/dsb2018_fluo'}); "
                          f"set {ENV_VAR} to the folder holding images/, masks/ and metadata.csv")
    table = pd.read_csv(root / "metadata.csv")
    table["image_path"] = [str(root / "images" / f"{n}.tif") for n in table["name"]]
    table["mask_path"] = [str(root / "masks" / f"{n}.tif") for n in table["name"]]
    return table


def load_dsb2018(row) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (Y, X), instance mask uint16 (Y, X)) of one row of :func:`dsb2018_table`."""
    import tifffile

    image = tifffile.imread(row["image_path"])
    mask = tifffile.imread(row["mask_path"])
    if image.shape != mask.shape:
        raise SeglabError(f"{row['image_path']}: image shape {image.shape} differs from mask shape {mask.shape}")
    return image, mask
