"""Subcommands for curation by people: ``seglab gallery`` (the offline annotation gallery) and
``seglab answers merge|check`` (answers files of a gallery export)."""

from __future__ import annotations

import sys

from seglab import SeglabError


def cmd_gallery(args) -> int:
    from seglab.core.units import AreaFilter
    from seglab.curate import gallery

    if bool(args.slide_run) == bool(args.predict):
        raise SeglabError("seglab gallery: give either --slide-run FOLDER or --predict FOLDER --tiles FOLDER")
    area = None
    if args.area_min_um2 is not None or args.area_max_um2 is not None:
        area = AreaFilter(args.area_min_um2, args.area_max_um2, source="--area-min-um2 / --area-max-um2")
    kw = dict(area=area, cell_type=args.cell_type, per_page=args.per_page, sample=args.sample, seed=args.seed,
              crop_px=args.crop_px, overwrite=args.overwrite)
    if args.slide_run:
        rec = gallery.gallery_from_slide_run(args.slide_run, args.out, features=not args.no_features, **kw)
    else:
        if not args.tiles or args.pixel_size_um is None:
            raise SeglabError("seglab gallery --predict: give --tiles FOLDER (the tiles the masks were predicted "
                              "from) and --pixel-size-um (um per px of the tiles, e.g. 0.1725)")
        channels = args.channels.split(",") if args.channels else None
        rec = gallery.gallery_from_predict(args.predict, args.tiles, args.out, pixel_size_um=args.pixel_size_um,
                                           channel_names=channels, **kw)
    print(f"{args.out}/index.html  export {rec['export_id']}")
    return 0


def cmd_answers_check(args) -> int:
    from seglab.curate import answers as ans

    g = ans.load_gallery(args.gallery)
    t = ans.load_answers(args.answers, args.gallery)
    n = t["answer"].value_counts()
    print(f"{args.answers}: {len(t)} of {len(g['objects'])} objects answered by {t['annotator'].iloc[0] if len(t) else '-'}"
          f" (yes {int(n.get('yes', 0))}, no {int(n.get('no', 0))}, unsure {int(n.get('unsure', 0))}); "
          f"cell type {g['cell_type']}, export {g['export_id'][:12]}: ok")
    return 0


def cmd_answers_merge(args) -> int:
    from seglab.curate import answers as ans

    merged, dis = ans.merge_answers(args.answers, args.gallery)
    ans.write_merged(args.out, args.gallery, merged)
    conflicts = int(dis["conflict"].sum()) if len(dis) else 0
    print(f"{args.out}: {len(merged)} objects answered; {len(dis)} disagreement(s), {conflicts} of them yes against no "
          "(merged as unsure)")
    if len(dis):
        print(dis.to_csv(sep="\t", index=False), end="")
    if args.disagreements:
        from seglab.core import io

        io.write_table(args.disagreements, dis)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("gallery", help="export the offline annotation gallery (static folder: cards of cell crops "
                                       "answered yes / no / unsure in the browser)")
    src = p.add_argument_group("objects (one of)")
    src.add_argument("--slide-run", help="a slide output folder of seglab predict-slide (one slide's or the study's)")
    src.add_argument("--predict", help="a tile prediction folder (seglab predict --out), with --tiles")
    p.add_argument("--tiles", help="the tiles folder the masks of --predict were predicted from")
    p.add_argument("--pixel-size-um", type=float, default=None, help="um per px of the tiles (--predict)")
    p.add_argument("--channels", default=None, help="channel names of the tiles, comma-separated (default DAPI,CD45)")
    p.add_argument("--out", required=True, help="the gallery folder (written whole, then renamed into place)")
    p.add_argument("--per-page", type=int, default=300, help="cards per page (default 300)")
    p.add_argument("--cell-type", default="cell", help="the cell type people answer for (default: cell)")
    p.add_argument("--area-min-um2", type=float, default=None, help="smallest object shown, um^2 (default: the run's)")
    p.add_argument("--area-max-um2", type=float, default=None, help="largest object shown, um^2 (default: the run's)")
    p.add_argument("--sample", type=int, default=None, help="show a seeded random sample of N objects")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--crop-px", type=int, default=None, help="crop side, px (default: 1.5 x the 95th percentile "
                                                              "object size)")
    p.add_argument("--no-features", action="store_true", help="slides: leave out the classifier's feature values")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier gallery export in --out")
    p.set_defaults(func=cmd_gallery)

    p = sub.add_parser("answers", help="answers files of a gallery export: check one, merge annotators")
    asub = p.add_subparsers(dest="answers_command", metavar="ACTION")
    c = asub.add_parser("check", help="check an answers file against its gallery (format, export, ids, cell type)")
    c.add_argument("answers", help="an answers file (seglab-answers/1)")
    c.add_argument("--gallery", required=True, help="the gallery export folder or its gallery.json")
    c.set_defaults(func=cmd_answers_check)
    m = asub.add_parser("merge", help="merge annotators' answers files of one gallery; prints the disagreements")
    m.add_argument("answers", nargs="+", help="answers files (seglab-answers/1) of one gallery export")
    m.add_argument("--gallery", required=True, help="the gallery export folder or its gallery.json")
    m.add_argument("--out", required=True, help="the merged answers file (yes against no: unsure)")
    m.add_argument("--disagreements", default=None, help="also write the disagreements table (.csv or .tsv)")
    m.set_defaults(func=cmd_answers_merge)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])
