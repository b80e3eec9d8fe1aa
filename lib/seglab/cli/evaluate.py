"""``seglab evaluate``: score a folder of predicted masks against a folder of true masks.

Files are paired by name: the extension (.tif or .tiff, any case) and a
trailing ``_0000`` (nnU-Net's channel suffix), ``_masks`` or ``_cp_masks``
(Cellpose's) are ignored, so ``img1_0000.tif`` pairs with ``img1_cp_masks.tiff``.
Files without a partner are listed on stderr and in the summary, never
ignored silently. Writes, atomically, into ``--out``:

- ``evaluation_results.csv``: one row per image x threshold (see :func:`seglab.evaluate.metrics.evaluate`);
- ``evaluation_summary.json``: pooled and mean-over-images metrics per threshold,
  per group, the pairing and the unpaired files;
- ``evaluation_summary.txt``: the same in a few lines (also printed).
"""

from __future__ import annotations

import re
from pathlib import Path

from seglab import SeglabError

MASK_SUFFIXES = (".tif", ".tiff")
# Stripped from the stem before pairing, longest first (so _cp_masks wins over _masks).
NAME_SUFFIXES = ("_cp_masks", "_masks", "_0000")


def pairing_key(path: str | Path) -> str | None:
    """The name a mask file is paired by, or None for a file that is not a TIFF.

    >>> pairing_key("a/img1_0000.tif"), pairing_key("img1_cp_masks.TIFF"), pairing_key("notes.txt")
    ('img1', 'img1', None)
    """
    name = Path(path).name
    lower = name.lower()
    for ext in MASK_SUFFIXES:
        if lower.endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        return None
    changed = True
    while changed:  # e.g. img_0000_masks
        changed = False
        for suffix in NAME_SUFFIXES:
            if stem.endswith(suffix) and len(stem) > len(suffix):
                stem = stem[: -len(suffix)]
                changed = True
    return stem


def _index(folder: Path, side: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise SeglabError(f"--{side} {folder}: not a folder; give the folder holding the {side} label masks (.tif)")
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        key = pairing_key(f)
        if key is None:
            continue
        if key in found:
            raise SeglabError(f"--{side} {folder}: {found[key].name} and {f.name} both pair as '{key}'; "
                              f"keep one of them (pairing ignores .tif/.tiff and _0000/_masks/_cp_masks)")
        found[key] = f
    if not found:
        raise SeglabError(f"--{side} {folder}: no .tif/.tiff files; give the folder holding the {side} label masks")
    return found


def pair_files(true_dir: str | Path, pred_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], dict[str, list[str]]]:
    """Pair the mask files of two folders by name.

    Returns
    -------
    pairs : list of (name, true_path, pred_path), sorted by name
    unpaired : {"true": [file names], "pred": [file names]} without a partner
    """
    t = _index(Path(true_dir), "true")
    p = _index(Path(pred_dir), "pred")
    pairs = [(k, t[k], p[k]) for k in sorted(set(t) & set(p))]
    unpaired = {"true": sorted(t[k].name for k in set(t) - set(p)),
                "pred": sorted(p[k].name for k in set(p) - set(t))}
    return pairs, unpaired


def _read_groups(path: str | None):
    if not path:
        return None
    import pandas as pd

    f = Path(path)
    if not f.is_file():
        raise SeglabError(f"--groups {f}: file not found; give a CSV/TSV with an 'image' column and one column per grouping")
    table = pd.read_csv(f, sep="\t" if f.suffix == ".tsv" else ",", dtype=str)
    if "image" not in table.columns:
        raise SeglabError(f"--groups {f}: no 'image' column (found {list(table.columns)}); add one naming each image as paired "
                          f"(file name without .tif and _0000/_masks suffixes)")
    table["image"] = [pairing_key(v + ".tif") if not re.search(r"\.tiff?$", v, re.I) else pairing_key(v) for v in table["image"]]
    return table


def cmd_evaluate(args) -> int:
    import sys

    from seglab.core import io
    from seglab.evaluate.metrics import check_thresholds, evaluate

    thresholds = check_thresholds(args.thresholds, "--thresholds")
    pairs, unpaired = pair_files(args.true, args.pred)
    for side in ("true", "pred"):
        if unpaired[side]:
            print(f"seglab evaluate: {len(unpaired[side])} {side} file(s) without a partner: "
                  f"{', '.join(unpaired[side][:20])}{' ...' if len(unpaired[side]) > 20 else ''}", file=sys.stderr)
    if not pairs:
        raise SeglabError(f"no file in --true {args.true} pairs with one in --pred {args.pred}; "
                          f"names must agree up to .tif/.tiff and _0000/_masks/_cp_masks suffixes")
    if args.strict and (unpaired["true"] or unpaired["pred"]):
        raise SeglabError("--strict: some files have no partner (listed above); remove them or drop --strict")
    groups = _read_groups(args.groups)
    if groups is not None:
        groups = groups[groups["image"].isin({name for name, _, _ in pairs})]
    result = evaluate([(name, t, p) for name, t, p in pairs], groups=groups, thresholds=thresholds,
                      progress=not args.quiet)
    result.unpaired = unpaired
    out = Path(args.out)
    summary = result.summary()
    summary["inputs"] = {"true_dir": str(Path(args.true).resolve()), "pred_dir": str(Path(args.pred).resolve()),
                         "pairs": [{"image": n, "true": t.name, "pred": p.name} for n, t, p in pairs]}
    io.write_table(out / "evaluation_results.csv", result.per_image)
    io.write_json(out / "evaluation_summary.json", summary)
    text = result.text()
    io.write_text(out / "evaluation_summary.txt", text)
    print(text, end="")
    print(f"[seglab] wrote {out / 'evaluation_results.csv'}, evaluation_summary.json, evaluation_summary.txt")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="score predicted label masks against true ones (AP, F1, PQ per IoU threshold)",
                       description="Score a folder of predicted label masks against a folder of true ones.")
    p.add_argument("--true", required=True, metavar="DIR", help="folder of true label masks (.tif/.tiff)")
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label masks (.tif/.tiff)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for evaluation_results.csv and the summaries")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.75, 0.9], metavar="IOU",
                   help="IoU thresholds in (0, 1] (default: 0.5 0.75 0.9)")
    p.add_argument("--groups", metavar="CSV", help="optional CSV/TSV: an 'image' column and grouping columns (marker, donor)")
    p.add_argument("--strict", action="store_true", help="fail when any file has no partner")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)
