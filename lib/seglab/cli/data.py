"""Subcommands for E0 data: simulate, audit, export-training."""

from __future__ import annotations

import json
import time
from pathlib import Path

from seglab import SeglabError


def _nuisance(items) -> dict:
    from seglab.config.params import parse_override
    from seglab.data.simulate import SimParams

    out = dict(parse_override(item) for item in items or [])
    SimParams.from_kwargs(**out)  # unknown names fail here, before anything is written
    return out


def cmd_simulate(args) -> int:
    from seglab.data.simulate import simulate_cohort

    out = Path(args.out)
    existed = out.exists()
    t0 = time.monotonic()
    simulate_cohort(out, n_donors=args.donors, tiles_per_marker=args.tiles_per_marker, size_px=args.size,
                    seed=args.seed, progress=not args.quiet, **_nuisance(args.set))
    if existed:
        print(f"[seglab] {out} already holds this cohort (same arguments); nothing written")
    else:
        print(f"[seglab] cohort written to {out} in {time.monotonic() - t0:.1f} s")
    return 0


def cmd_audit(args) -> int:
    from seglab.core import io
    from seglab.data.manifest import cohort_manifest, discover, save_manifest

    if args.cohort:
        manifest, audit = cohort_manifest(args.cohort, with_audit=True, strict=not args.keep_going)
    elif args.tiles:
        kwargs = {"masks_dir": args.masks, "annotated": args.annotated, "splits": args.splits,
                  "clinical": args.clinical, "strict": not args.keep_going, "id_column": args.id_column}
        if args.pattern:
            kwargs["pattern"] = args.pattern
        manifest, audit = discover(args.tiles, **kwargs)
    else:
        raise SeglabError("give a tiles folder (TILES) or --cohort DIR")
    if args.manifest:
        save_manifest(manifest, args.manifest)
    text = json.dumps(audit, indent=2, sort_keys=True)
    if args.out:
        io.write_text(args.out, text + "\n")
    brief = {k: audit.get(k) for k in ("n_tiles_paired", "n_donors_in_tiles", "tiles_per_marker", "n_fallbacks",
                                       "n_annotated", "annotated_per_split", "n_unpaired", "n_excluded",
                                       "n_unmatched_files", "donors_missing_from_clinical",
                                       "donors_missing_from_tiles") if k in audit}
    print(json.dumps(brief, indent=2) if (args.out or args.manifest) else text)
    return 0


def cmd_export(args) -> int:
    from seglab.data.manifest import cohort_manifest, export_cellpose, export_nnunet, load_manifest

    if args.cohort:
        manifest = cohort_manifest(args.cohort)
    elif args.manifest:
        manifest = load_manifest(args.manifest)
    else:
        raise SeglabError("give --cohort DIR or --manifest CSV")
    if args.format == "cellpose":
        out = export_cellpose(manifest, args.out, splits=tuple(args.splits))
    else:
        out = export_nnunet(manifest, args.out)
    print(f"[seglab] {args.format} layout written to {out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("simulate", help="simulate a tissue cohort with planted truth (tiles, masks, clinical table)")
    p.add_argument("--out", required=True, help="output folder (never overwritten with a different cohort)")
    p.add_argument("--donors", type=int, default=24, help="donors with tiles (default 24)")
    p.add_argument("--tiles-per-marker", type=int, default=4, help="tiles per marker per donor (default 4)")
    p.add_argument("--size", type=int, default=256, help="tile side in px (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a nuisance parameter of seglab.data.simulate.SimParams, e.g. blur_fraction=0.3")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("audit", help="discover tiles, pair channels and print the coverage audit (JSON)")
    p.add_argument("tiles", nargs="?", help="tiles folder (searched recursively)")
    p.add_argument("--cohort", help="a simulated cohort folder instead (tiles/, masks/, clinical.csv, ...)")
    p.add_argument("--masks", help="instance masks folder (<tile_id>.tif)")
    p.add_argument("--annotated", help="CSV with a tile_id column: the annotated tiles")
    p.add_argument("--splits", help="donor_splits.yaml (train/val/test donor lists)")
    p.add_argument("--clinical", help="clinical table (CSV/TSV) to check donor coverage against")
    p.add_argument("--id-column", default="projid", help="donor id column of the clinical table")
    p.add_argument("--pattern", help="filename regex with groups tile_id, donor, marker, channel")
    p.add_argument("--keep-going", action="store_true",
                   help="leave broken tiles out (listed under 'excluded') instead of stopping")
    p.add_argument("--out", help="write the audit JSON here")
    p.add_argument("--manifest", help="write the manifest CSV here")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("export-training", help="write annotated tiles in Cellpose's or an nnU-Net-style layout")
    p.add_argument("--cohort", help="simulated cohort folder")
    p.add_argument("--manifest", help="manifest CSV (from `seglab audit --manifest`)")
    p.add_argument("--format", choices=["cellpose", "nnunet"], default="cellpose")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="splits to export (cellpose)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.set_defaults(func=cmd_export)
