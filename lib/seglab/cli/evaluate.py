"""``seglab evaluate``: score a folder of predicted masks against a folder of true masks.

Files are paired by name: the extension (.tif or .tiff, any case) and a
trailing ``_0000`` (nnU-Net's channel suffix), ``_masks`` or ``_cp_masks``
(Cellpose's) are ignored, so ``img1_0000.tif`` pairs with ``img1_cp_masks.tiff``.
Only the extension is cut from the rest of the name: ``scan_1.5x.tif`` pairs as
``scan_1.5x`` and ``img.001_masks.tif`` as ``img.001``, the ids ``seglab predict`` gives.
Files without a partner are listed on stderr and in the summary, never
ignored silently. Every paired file's TIFF header is checked before scoring: an
empty, truncated or unreadable file is one line naming it.

Writes into ``--out``, as one set (:func:`seglab.core.io.write_set`: all files or none):

- ``evaluation_results.csv``: one row per image x threshold (see :func:`seglab.evaluate.metrics.evaluate`);
- ``evaluation_summary.json``: pooled and mean-over-images metrics per threshold,
  per group, the pairing and the unpaired files;
- ``evaluation_summary.txt``: the same in a few lines (also printed);
- ``evaluation.complete.json``: written last, the three files with their sha256. Read the
  results only where ``seglab.core.io.set_complete(out, "evaluation")`` is true: a run that
  failed half-way (a full disk) leaves the earlier complete set in place, or no marker.
"""

from __future__ import annotations

import json

import re
from pathlib import Path

from seglab import SeglabError
from seglab.core import paths

MASK_SUFFIXES = (".tif", ".tiff")
OUTPUT_SET = "evaluation"   # the set's marker: evaluation.complete.json
# Stripped from the stem before pairing, longest first (so _cp_masks wins over _masks).
NAME_SUFFIXES = ("_cp_masks", "_masks", "_0000")


def pairing_key(path: str | Path) -> str | None:
    """The name a mask file is paired by, or None for a file that is not a TIFF.

    >>> pairing_key("a/img1_0000.tif"), pairing_key("img1_cp_masks.TIFF"), pairing_key("notes.txt")
    ('img1', 'img1', None)
    """
    stem = paths.strip_suffix(path, MASK_SUFFIXES)
    if stem is None:
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


def check_mask_file(path: Path) -> None:
    """SeglabError, one line naming ``path``, when it is empty, truncated or not a readable TIFF.

    Reads the header only (the pixels are read when the image is scored); tifffile's own log
    lines about broken tags are silenced, the error says it all.
    """
    import tifffile

    from seglab.core import io

    size = path.stat().st_size
    if size == 0:
        raise SeglabError(f"{path}: empty file (0 bytes); copy or export the mask again")
    try:
        with io.quiet_tiff_log(), tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
    except Exception as exc:  # noqa: BLE001 - tifffile raises several types for broken files
        why = " ".join(str(exc).split())
        raise SeglabError(f"{path}: truncated or unreadable TIFF ({type(exc).__name__}: {why}); copy or export "
                          f"the mask again") from None
    if end > size:
        raise SeglabError(f"{path}: truncated TIFF (image data end at byte {end}, the file has {size}); copy or "
                          f"export the mask again")


def _out_folder(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise SeglabError(f"--out {out}: is a file, not a folder; give a folder for the evaluation files")
    return out


def _check_same_maker(out: Path, made_of: dict, overwrite: bool) -> None:
    """Refuse to replace the evaluation in ``out`` of other inputs (other --true/--pred folders or
    thresholds) unless ``overwrite``: a second evaluation sent to the same folder by mistake would
    silently replace the first one's numbers. The same inputs again replace it (they may have
    changed on disk: nothing stale is kept)."""
    from seglab.core import io

    summary = out / "evaluation_summary.json"
    if overwrite or not summary.is_file():
        return
    try:
        before = json.loads(summary.read_text(encoding="utf-8"))
        inputs = before.get("inputs") or {}
        had = {"true_dir": inputs.get("true_dir"), "pred_dir": inputs.get("pred_dir"),
               "thresholds": [float(t) for t in before.get("thresholds") or []]}
    except (OSError, ValueError, TypeError, AttributeError):
        had = None
    if had == made_of and io.set_complete(out, OUTPUT_SET):
        return
    what = "an unreadable or incomplete evaluation" if had is None else (
        f"the evaluation of --true {had['true_dir']} --pred {had['pred_dir']} at thresholds {had['thresholds']}")
    raise SeglabError(f"--out {out}: holds {what}; asked for --true {made_of['true_dir']} --pred {made_of['pred_dir']} "
                      f"at thresholds {made_of['thresholds']}. Rerun with --overwrite to replace it, or give another --out")


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
    out = _out_folder(Path(args.out))
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
    for _, t, p in pairs:
        check_mask_file(t)
        check_mask_file(p)
    _check_same_maker(out, {"true_dir": str(Path(args.true).resolve()), "pred_dir": str(Path(args.pred).resolve()),
                            "thresholds": [float(t) for t in thresholds]}, args.overwrite)
    groups = _read_groups(args.groups)
    if groups is not None:
        groups = groups[groups["image"].isin({name for name, _, _ in pairs})]
    with io.quiet_tiff_log():
        result = evaluate([(name, t, p) for name, t, p in pairs], groups=groups, thresholds=thresholds,
                          progress=not args.quiet)
    result.unpaired = unpaired
    summary = result.summary()
    summary["inputs"] = {"true_dir": str(Path(args.true).resolve()), "pred_dir": str(Path(args.pred).resolve()),
                         "pairs": [{"image": n, "true": t.name, "pred": p.name} for n, t, p in pairs]}
    text = result.text()
    io.write_set(out, {"evaluation_results.csv": lambda f: result.per_image.to_csv(f, index=False),
                       "evaluation_summary.json": lambda f: f.write_text(io.json_text(summary), encoding="utf-8"),
                       "evaluation_summary.txt": lambda f: f.write_text(text, encoding="utf-8")}, name=OUTPUT_SET)
    print(text, end="")
    print(f"[seglab] wrote {out / 'evaluation_results.csv'}, evaluation_summary.json, evaluation_summary.txt "
          f"(complete: {io.set_marker(out, OUTPUT_SET).name})")
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an evaluation of other inputs in --out (refused without it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)
