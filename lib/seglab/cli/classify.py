"""Subcommands of the curation classifier: ``seglab classifier features|train|check``.

``features`` measures a slide run's objects (:func:`seglab.segment.slides.slide_features`);
``train`` joins features with answers files, draws the learning curve, cross-validates by group
(the gate), fits and saves (skops + sidecar; exit 1 when the gate fails: the file is written,
marked failed, and filtering refuses it); ``check`` loads a classifier with every check
(trusted types, hash, gate) and prints its sidecar's verdict.
"""

from __future__ import annotations

import json
from pathlib import Path

from seglab import SeglabError


def cmd_features(args) -> int:

    from seglab.core import io
    from seglab.segment.slides import study_features

    table = study_features(args.slide_outputs)
    io.write_table(args.out, table)
    print(f"{len(table)} objects of {len(args.slide_outputs)} slide(s) -> {args.out}")
    return 0


def _sizes(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SeglabError(f"--curve-sizes {text!r}: give answer counts separated by commas, e.g. 25,50,100") from None


def cmd_train(args) -> int:
    import pandas as pd

    from seglab.curate import classifier as clf
    from seglab.curate.answers import load_answer_files
    from seglab.curate.features import DEFAULT_CHANNELS, training_table
    from seglab.curate.gate import GateThresholds

    fpath = Path(args.features)
    if not fpath.is_file():
        raise SeglabError(f"{fpath}: no features table; make one with seglab classifier features SLIDE_OUT --out {fpath}")
    features = pd.read_csv(fpath, sep="\t" if fpath.suffix == ".tsv" else ",")
    galleries = list(args.gallery)
    if len(galleries) == 1:
        galleries = galleries * len(args.answers)
    if len(galleries) != len(args.answers):
        raise SeglabError(f"--gallery: {len(args.gallery)} galleries for {len(args.answers)} answers files; give one "
                          "gallery for all of them, or one per answers file in the same order")
    answers = load_answer_files(zip(args.answers, galleries))
    source = ", ".join(str(a) for a in args.answers)
    table = training_table(features, answers, source=source)
    a = table.attrs
    print(f"[seglab] {a['n_answers']} answers: {a['n_yes']} yes, {a['n_no']} no, {a['n_unsure']} unsure (left out), "
          f"{a['n_not_found']} not in {fpath.name}" + (f" (e.g. {', '.join(a['not_found'][:3])})" if a["not_found"] else ""))
    cell_type = str(table["cell_type"].iloc[0]) if "cell_type" in table and len(table) else args.cell_type
    channels = tuple(args.channels.split(",")) if args.channels else DEFAULT_CHANNELS
    spec = clf.ClassifierSpec(cell_type=cell_type, channels=channels, morphology_only=args.morphology_only,
                              n_estimators=args.n_estimators, seed=args.seed, n_splits=args.n_splits)
    thresholds = GateThresholds(args.min_accuracy, args.min_recall, args.min_precision)
    clf.check_table(table, spec, args.group_col, source)
    verdict = None
    if args.curve_sizes:
        curve = clf.learning_curve(table, spec, _sizes(args.curve_sizes), args.curve_repeats, args.group_col,
                                   thresholds, args.seed)
        verdict = clf.curve_verdict(curve, thresholds)
        print(curve.groupby("n_answers")[["accuracy", "recall", "precision"]].mean().round(3).to_string())
        print(f"[seglab] learning curve: gate reached at {verdict['n_needed']} answers; still rising: "
              f"{verdict['rising']}; more answers needed: {verdict['more_answers_needed']}")
    # the features' pixel size (um per px), from their own areas: what tile inference converts with
    pix = float(features["area_um2"].iloc[0] / features["area_px"].iloc[0]) ** 0.5 \
        if len(features) and {"area_um2", "area_px"} <= set(features.columns) else None
    cv, path = clf.train_gate_save(table, spec, args.out, group_col=args.group_col, thresholds=thresholds,
                                   source=source, pixel_size_um=args.pixel_size_um or pix, curve=verdict,
                                   extra={"features_file": str(fpath.resolve())})
    print(cv.report.per_group.round(3).to_string(index=False))
    print(f"[seglab] gate {cv.report.describe()} -> {path}")
    if not cv.report.passed:
        print(f"seglab classifier train: {path} did not pass the gate and will not be used for filtering "
              "(see the learning curve: annotate more objects)")
        return 1
    return 0


def cmd_check(args) -> int:
    from seglab.curate import store

    c = store.load(args.classifier, allow_failed_gate=True)
    side = c.sidecar
    print(json.dumps({k: side.get(k) for k in ("cell_type", "features", "n_train", "n_yes", "n_no", "gate_passed",
                                                "thresholds", "training_table_sha256", "git", "seglab_version")},
                     indent=1))
    print(f"cross-validated: {side['cv']['metrics']}")
    if not c.gate_passed:
        print(f"{args.classifier}: did NOT pass the gate; filtering refuses it without --allow-failed-gate")
        return 1
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("classifier", help="curation classifier: features of slide runs, train + gate + save, check")
    cs = p.add_subparsers(dest="classifier_command", metavar="ACTION")
    q = cs.add_parser("features", help="morphology + intensity features of slide runs' objects (regionprops)")
    q.add_argument("slide_outputs", nargs="+", help="slide output folders (<out>/<slide>) of seglab predict-slide")
    q.add_argument("--out", required=True, help="features table (.csv or .tsv)")
    q.set_defaults(func=cmd_features)

    q = cs.add_parser("train", help="train a balanced random forest on answers, grouped CV gate, save (.skops + sidecar)",
                      epilog="exit codes: 0 saved and passed the gate; 1 bad input, or saved but FAILED the gate")
    q.add_argument("--features", required=True, help="features table (seglab classifier features)")
    q.add_argument("--answers", required=True, nargs="+", help="answers files (seglab-answers/1) of one cell type")
    q.add_argument("--gallery", required=True, nargs="+",
                   help="the gallery export (folder or gallery.json) the answers were made on: one for all answers "
                        "files, or one per answers file in the same order (e.g. one export per slide)")
    q.add_argument("--out", required=True, help="classifier file, .skops (its sidecar .skops.json beside it)")
    q.add_argument("--cell-type", default="cell", help="cell type when the answers do not say")
    q.add_argument("--channels", default=None, help="channel names of the intensity features, comma-separated "
                                                    "(default DAPI,CD45)")
    q.add_argument("--morphology-only", action="store_true", help="train on morphology only (no intensities)")
    q.add_argument("--group-col", default="source", help="column of the groups CV holds out (slide or donor)")
    q.add_argument("--n-splits", type=int, default=5, help="CV folds (at most the number of groups)")
    q.add_argument("--n-estimators", type=int, default=200)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--min-accuracy", type=float, default=0.75, help="gate: cross-validated accuracy (fraction)")
    q.add_argument("--min-recall", type=float, default=0.70, help="gate: recall of 'yes' (fraction)")
    q.add_argument("--min-precision", type=float, default=0.70, help="gate: precision of 'yes' (fraction)")
    q.add_argument("--curve-sizes", default="25,50,100,200,400",
                   help="learning curve: answer counts, comma-separated ('' for none)")
    q.add_argument("--curve-repeats", type=int, default=3)
    q.add_argument("--pixel-size-um", type=float, default=None, help="um per px of the features (default: from them)")
    q.set_defaults(func=cmd_train)

    q = cs.add_parser("check", help="load a classifier with every check (trusted types, hash, gate) and show it")
    q.add_argument("classifier", help=".skops file")
    q.set_defaults(func=cmd_check)
