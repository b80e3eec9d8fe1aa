"""The annotation gallery and its answers files: identities, every refusal, merging, the export.

Answers tests use a gallery record built by hand (exact ids); the export tests build slide and
tile outputs from label images drawn by hand, so every crop, area and id is known.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from seglab import SeglabError
from seglab.curate import answers as ans

SEG = "generalist|mask:0123456789ab"
AREA = {"min_um2": 10.0, "max_um2": 300.0}


def gallery_record(ids=("S-aaaaaaaaaa", "S-bbbbbbbbbb", "S-cccccccccc"), seg=SEG, area=AREA, cell_type="cell"):
    return {"format": ans.GALLERY_FORMAT, "export_id": ans.export_id(ids, seg, area), "segmentation_id": seg,
            "area_filter": dict(area), "pixel_size_um": 0.5, "cell_type": cell_type, "feature_columns": [],
            "objects": [{"object_id": i, "source": "S", "page": 1, "area_um2": 25.0, "area_px": 100} for i in ids]}


def answers_file(path, gallery, answers, annotator="ana", **over):
    data = {"format": ans.ANSWERS_FORMAT, "export_id": gallery["export_id"],
            "segmentation_id": gallery["segmentation_id"], "area_filter": gallery["area_filter"],
            "cell_type": gallery["cell_type"], "annotator": annotator, "saved_at": "2026-12-08T02:00:00+00:00",
            "answers": answers, **over}
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- identities


def test_export_id_depends_on_objects_segmentation_and_area_not_on_order():
    a = ans.export_id(["x", "y"], SEG, AREA)
    assert a == ans.export_id(["y", "x"], SEG, AREA)
    assert a == ans.export_id(["x", "y"], SEG, {"min_um2": 10, "max_um2": 300})   # ints and floats alike
    assert len({a, ans.export_id(["x"], SEG, AREA), ans.export_id(["x", "y"], "other|mask:1", AREA),
                ans.export_id(["x", "y"], SEG, {"min_um2": 10.0, "max_um2": None})}) == 4


def test_segmentation_id_names_the_model_and_hashes_the_mask_settings():
    s = ans.segmentation_id("generalist", {"diameter_px": 20.0, "min_size": 15})
    assert s.startswith("generalist|mask:") and len(s.split(":")[-1]) == 12
    assert s == ans.segmentation_id("generalist", {"min_size": 15, "diameter_px": 20.0})
    assert s != ans.segmentation_id("generalist", {"diameter_px": 21.0, "min_size": 15})


# --------------------------------------------------------------------------- load, write


def test_load_returns_one_row_per_answer_in_gallery_order(tmp_path):
    g = gallery_record()
    f = answers_file(tmp_path / "a.json", g, {"S-cccccccccc": "no", "S-aaaaaaaaaa": "yes"})
    t = ans.load_answers(f, g)
    assert list(t.columns) == ["object_id", "answer", "annotator", "cell_type"]
    assert t.values.tolist() == [["S-aaaaaaaaaa", "yes", "ana", "cell"], ["S-cccccccccc", "no", "ana", "cell"]]


def test_write_then_load_round_trips_through_a_gallery_folder(tmp_path):
    g = gallery_record()
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "gallery.json").write_text(json.dumps(g))
    p = ans.write_answers(tmp_path / "w.json", tmp_path / "g", {"S-bbbbbbbbbb": "unsure"}, "sim")
    data = json.loads(p.read_text())
    assert data["format"] == "seglab-answers/1" and data["export_id"] == g["export_id"]
    assert data["saved_at"].endswith("+00:00")
    assert ans.load_answers(p, tmp_path / "g").values.tolist() == [["S-bbbbbbbbbb", "unsure", "sim", "cell"]]


def test_write_refuses_unknown_ids_and_values_before_writing(tmp_path):
    g = gallery_record()
    with pytest.raises(SeglabError, match=r"1 object id\(s\) are not in"):
        ans.write_answers(tmp_path / "w.json", g, {"S-zzzzzzzzzz": "yes"}, "sim")
    with pytest.raises(SeglabError, match="not one of yes, no, unsure"):
        ans.write_answers(tmp_path / "w.json", g, {"S-aaaaaaaaaa": "maybe"}, "sim")
    assert not (tmp_path / "w.json").exists()


# --------------------------------------------------------------------------- refusals


def test_malformed_json_is_refused_naming_the_file(tmp_path):
    f = tmp_path / "cut.json"
    f.write_text('{"format": "seglab-answers/1", "answers": {"S-aaaa')
    with pytest.raises(SeglabError, match=r"cut\.json: malformed JSON .*Export answers"):
        ans.load_answers(f, gallery_record())
    f.write_text("[1, 2]")
    with pytest.raises(SeglabError, match="is a list"):
        ans.load_answers(f, gallery_record())


def test_another_format_is_refused(tmp_path):
    g = gallery_record()
    f = answers_file(tmp_path / "a.json", g, {}, format="seglab-gallery/1")
    with pytest.raises(SeglabError, match=r"a\.json: format 'seglab-gallery/1' is not 'seglab-answers/1'"):
        ans.load_answers(f, g)


def test_another_segmentation_is_refused_naming_both(tmp_path):
    g = gallery_record()
    other = gallery_record(seg="cpsam|mask:ffffffffffff")
    f = answers_file(tmp_path / "a.json", other, {"S-aaaaaaaaaa": "yes"})
    with pytest.raises(SeglabError) as e:
        ans.load_answers(f, g)
    assert "segmentation 'cpsam|mask:ffffffffffff'" in str(e.value) and f"segmentation {SEG!r}" in str(e.value)


def test_another_area_filter_is_refused_naming_both(tmp_path):
    g = gallery_record()
    other = gallery_record(area={"min_um2": 20.0, "max_um2": None})
    f = answers_file(tmp_path / "a.json", other, {"S-aaaaaaaaaa": "yes"})
    with pytest.raises(SeglabError, match=r"area filter 20-inf um\^2, but the gallery uses 10-300 um\^2"):
        ans.load_answers(f, g)


def test_another_export_of_the_same_segmentation_is_refused(tmp_path, ):
    g = gallery_record()
    other = gallery_record(ids=("S-aaaaaaaaaa", "S-dddddddddd"))
    f = answers_file(tmp_path / "a.json", other, {"S-aaaaaaaaaa": "yes"})
    with pytest.raises(SeglabError, match=f"export {other['export_id'][:12]}, but the gallery is export "
                                          f"{g['export_id'][:12]}"):
        ans.load_answers(f, g)


def test_unknown_ids_are_refused_with_count_and_first_few(tmp_path):
    g = gallery_record()
    unknown = {f"S-{i:010d}": "yes" for i in range(7)}
    f = answers_file(tmp_path / "a.json", g, {"S-aaaaaaaaaa": "no", **unknown})
    with pytest.raises(SeglabError, match=r"7 object id\(s\) are not in the gallery \(S-0000000000, S-0000000001, "
                                          r"S-0000000002, S-0000000003, S-0000000004, \.\.\.\)"):
        ans.load_answers(f, g)


def test_unknown_cell_type_is_refused(tmp_path):
    g = gallery_record()
    f = answers_file(tmp_path / "a.json", g, {"S-aaaaaaaaaa": "yes"}, cell_type="macrophage")
    with pytest.raises(SeglabError, match="cell type 'macrophage', but the gallery is for 'cell'"):
        ans.load_answers(f, g)


def test_gallery_path_is_named_in_refusals(tmp_path):
    g = gallery_record()
    (tmp_path / "gallery.json").write_text(json.dumps(g))
    f = answers_file(tmp_path / "a.json", g, {"S-aaaaaaaaaa": "yes"}, cell_type="macrophage")
    with pytest.raises(SeglabError, match=f"but gallery {tmp_path}/gallery.json is for 'cell'"):
        ans.load_answers(f, tmp_path / "gallery.json")
    with pytest.raises(SeglabError, match="no gallery record"):
        ans.load_answers(f, tmp_path / "nowhere")


# --------------------------------------------------------------------------- merge


def test_merge_keeps_agreement_and_lists_disagreements(tmp_path):
    g = gallery_record(ids=[f"S-{c * 10}" for c in "abcde"])
    a, b, c, d, e = (o["object_id"] for o in g["objects"])
    fa = answers_file(tmp_path / "a.json", g, {a: "yes", b: "yes", c: "unsure", d: "no"}, "ana")
    fb = answers_file(tmp_path / "b.json", g, {a: "yes", b: "no", c: "yes", e: "unsure"}, "ben")
    merged, dis = ans.merge_answers([fa, fb], g)
    assert merged[["object_id", "answer", "annotator", "n_answers"]].values.tolist() == [
        [a, "yes", "ana+ben", 2], [b, "unsure", "ana+ben", 2], [c, "yes", "ana+ben", 2],
        [d, "no", "ana", 1], [e, "unsure", "ben", 1]]
    assert list(dis.columns) == ["object_id", "ana", "ben", "merged", "conflict"]
    assert dis.values.tolist() == [[b, "yes", "no", "unsure", True], [c, "unsure", "yes", "yes", False]]
    out = ans.write_merged(tmp_path / "m.json", g, merged)
    back = ans.load_answers(out, g)
    assert back["annotator"].iloc[0] == "ana+ben" and dict(zip(back.object_id, back.answer))[c] == "yes"


def test_merge_tells_apart_two_files_of_one_annotator_and_refuses_a_foreign_file(tmp_path):
    g = gallery_record()
    ids = [o["object_id"] for o in g["objects"]]
    f1 = answers_file(tmp_path / "one.json", g, {ids[0]: "yes"}, "ana")
    f2 = answers_file(tmp_path / "two.json", g, {ids[0]: "no"}, "ana")
    _, dis = ans.merge_answers([f1, f2], g)
    assert list(dis.columns) == ["object_id", "ana", "ana (two.json)", "merged", "conflict"]
    foreign = answers_file(tmp_path / "x.json", gallery_record(ids=ids[:2]), {ids[0]: "no"})
    with pytest.raises(SeglabError, match=r"x\.json: answers belong to gallery export"):
        ans.merge_answers([f1, foreign], g)


# --------------------------------------------------------------------------- the export (tiles drawn by hand)

PIXEL = 0.5   # um per px: area_um2 = area_px / 4
# (y0, x0, h, w) rectangles per tile: areas 48, 100, 96, 168, 25, 160 px (tile A) and 60, 36, 144, 120, 30, 200 px (B)
RECTS = {"A": [(4, 4, 6, 8), (4, 30, 10, 10), (4, 60, 8, 12), (30, 4, 12, 14), (30, 40, 5, 5), (30, 70, 16, 10)],
         "B": [(4, 4, 6, 10), (4, 30, 6, 6), (4, 60, 12, 12), (30, 4, 10, 12), (30, 40, 5, 6), (30, 70, 20, 10)]}
TILE_SHAPE = (60, 96)


def make_tile_run(root, confidence=False):
    """Tiles ``A`` and ``B`` (DAPI ``_c0`` + marker ``_c1``, 60 x 96 px) with rectangles as objects, their
    masks in a prediction folder (``predict.json`` of model ``hand``); returns (tiles, predict, expected)
    where expected is {object_id: area_px} in the gallery's order."""
    import numpy as np
    import tifffile

    from seglab.config.settings import MaskSettings
    from seglab.segment import predict as pr
    from seglab.segment.slides import object_id

    tiles, pred = root / "tiles", root / "pred"
    tiles.mkdir(parents=True)
    pred.mkdir()
    expected = {}
    for tid, rects in RECTS.items():
        lab = np.zeros(TILE_SHAPE, np.uint16)
        for k, (y, x, h, w) in enumerate(rects, start=1):
            lab[y:y + h, x:x + w] = k
            expected[object_id(tid, (y, x, y + h, x + w), h * w)] = h * w
        dapi = np.where(lab > 0, 1000, 100).astype(np.uint16)
        marker = np.where(lab % 2 == 1, 800, 50).astype(np.uint16)
        tifffile.imwrite(tiles / f"{tid}_c0.tif", dapi)
        tifffile.imwrite(tiles / f"{tid}_c1.tif", marker)
        tifffile.imwrite(pred / f"{tid}.tif", lab)
        if confidence:
            (pred / "objects").mkdir(exist_ok=True)
            ids = [object_id(tid, (y, x, y + h, x + w), h * w) for y, x, h, w in rects]
            conf = [round(0.1 + 0.15 * k, 2) for k in range(len(ids))]
            pd.DataFrame({"object_id": ids, "classifier_confidence": conf}).to_csv(pred / "objects" / f"{tid}.csv",
                                                                                 index=False)
    rec = pr.folder_record("hand", MaskSettings(), tiles, model_spec="hand")
    (pred / "predict.json").write_text(json.dumps(rec))
    return tiles, pred, expected


@pytest.fixture
def tile_run(tmp_path):
    return make_tile_run(tmp_path / "run")


def export_tiles(tile_run, out, **kw):
    from seglab.curate import gallery

    tiles, pred, _ = tile_run
    kw.setdefault("log", None)
    return gallery.gallery_from_predict(pred, tiles, out, pixel_size_um=PIXEL, **kw)


def test_tile_export_holds_every_object_with_stable_ids_areas_and_pages(tile_run, tmp_path):
    from seglab.config.settings import MaskSettings

    rec = export_tiles(tile_run, tmp_path / "g", per_page=5, crop_px=32)
    expected = tile_run[2]
    objs = rec["objects"]
    assert [o["object_id"] for o in objs] == list(expected)
    assert [o["area_px"] for o in objs] == list(expected.values())
    assert [o["page"] for o in objs] == [1] * 5 + [2] * 5 + [3] * 2 and rec["n_pages"] == 3
    assert objs[1]["area_text"] == "25.0 um^2 | 100 px" and objs[0]["area_text"] == "12.0 um^2 | 48 px"
    assert rec["segmentation_id"] == ans.segmentation_id("hand", MaskSettings().as_dict())
    assert rec["area_filter"] == {"min_um2": None, "max_um2": None}
    assert rec["export_id"] == ans.export_id(list(expected), rec["segmentation_id"], rec["area_filter"])
    assert rec["counts"] == {"n_found": 12, "n_outside_area_filter": 0, "n_left_out_by_sample": 0, "n_objects": 12,
                             "tiles_without_mask": []}
    # the classifier's features (seglab.curate.features) on the card: a 10 x 10 square is 5 um a side
    assert "extent" in rec["feature_columns"] and objs[1]["extent"] == 1.0 and objs[1]["perimeter_um"] == 18.0
    assert objs[1]["mean_DAPI"] == 1000.0 and objs[1]["mean_CD45"] == 50.0
    on_disk = json.loads((tmp_path / "g" / "gallery.json").read_text())
    assert on_disk == rec
    js = (tmp_path / "g" / "gallery-data.js").read_text()
    assert js.startswith("window.SEGLAB_GALLERY = ") and json.loads(js[len("window.SEGLAB_GALLERY = "):-2]) == rec


def test_crop_is_centred_on_the_object_with_its_outline(tile_run, tmp_path):
    import numpy as np
    from PIL import Image

    from seglab.curate import gallery

    rec = export_tiles(tile_run, tmp_path / "g", crop_px=48)
    o = rec["objects"][1]     # tile A, rows 4-13, cols 30-39: centroid (8.5, 34.5) -> crop from (-16, 10)
    rgb = np.asarray(Image.open(tmp_path / "g" / o["crop"]))
    assert rgb.shape == (48, 48, 3)
    assert gallery.crop_window(8.5, 34.5, 48) == (-16, 10)
    yellow = np.all(rgb == gallery.OUTLINE_RGB, axis=-1)
    ys, xs = np.nonzero(yellow)
    # the outline is the square's border: rows 4..13 -> 20..29 in the crop, cols 30..39 -> 20..29
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 29, 20, 29)
    assert yellow.sum() == 36 and not yellow[21:29, 21:29].any()
    assert (rgb[:16] == 0).all()            # above the tile's edge: black
    # neighbours' outlines in grey, only where neighbours are: rectangle 1 (rows 4-9, cols 4-11 -> crop
    # rows 20-25, cols 0-1), rectangles 4 and 5 (tile rows 30-31 -> crop rows 46-47)
    grey = np.all(rgb == gallery.NEIGHBOUR_RGB, axis=-1)
    allowed = np.zeros_like(grey)
    allowed[20:26, 0:2] = allowed[46:48, 0:8] = allowed[46:48, 30:35] = True
    assert grey[20:26, 1].all() and not (grey & ~allowed).any()
    inside = rgb[22:28, 22:28].astype(int)
    assert (inside[..., 2] > inside[..., 1]).all()   # DAPI (blue) bright, marker off for an even label


def test_area_filter_and_sample_are_counted_and_change_the_export(tile_run, tmp_path):
    from seglab.core.units import AreaFilter

    full = export_tiles(tile_run, tmp_path / "full")
    rec = export_tiles(tile_run, tmp_path / "f", area=AreaFilter(10.0, 40.0))   # 40-160 px
    areas = [o["area_px"] for o in rec["objects"]]
    assert areas == [48, 100, 96, 160, 60, 144, 120]
    assert rec["counts"]["n_outside_area_filter"] == 5 and rec["area_filter"] == {"min_um2": 10.0, "max_um2": 40.0}
    assert rec["area_filter_px"] == [40, 160]
    assert rec["export_id"] != full["export_id"]
    s1 = export_tiles(tile_run, tmp_path / "s1", sample=4, seed=7)
    s2 = export_tiles(tile_run, tmp_path / "s2", sample=4, seed=7)
    ids1 = [o["object_id"] for o in s1["objects"]]
    assert ids1 == [o["object_id"] for o in s2["objects"]] and len(ids1) == 4
    assert ids1 == [i for i in (o["object_id"] for o in full["objects"]) if i in ids1]   # export order kept
    assert s1["counts"]["n_left_out_by_sample"] == 8 and s1["sample"] == {"n": 4, "seed": 7}


def test_answers_follow_a_reexport_and_are_refused_under_another_filter(tile_run, tmp_path):
    from seglab.core.units import AreaFilter

    rec = export_tiles(tile_run, tmp_path / "g")
    ids = [o["object_id"] for o in rec["objects"]]
    f = ans.write_answers(tmp_path / "a.json", tmp_path / "g", {ids[0]: "yes", ids[4]: "no"}, "ana")
    again = export_tiles(tile_run, tmp_path / "g", overwrite=True)
    assert again["export_id"] == rec["export_id"]
    assert ans.load_answers(f, tmp_path / "g")["answer"].tolist() == ["yes", "no"]
    export_tiles(tile_run, tmp_path / "g2", area=AreaFilter(10.0, None))
    with pytest.raises(SeglabError, match=r"area filter 0-inf um\^2, but gallery .*g2 uses 10-inf um\^2"):
        ans.load_answers(f, tmp_path / "g2")


def test_output_is_refused_unless_overwrite_and_written_whole(tile_run, tmp_path, monkeypatch):
    from seglab.core.units import AreaFilter
    from seglab.curate import gallery

    first = export_tiles(tile_run, tmp_path / "g")
    with pytest.raises(SeglabError, match=f"holds gallery export {first['export_id'][:12]}.*--overwrite"):
        export_tiles(tile_run, tmp_path / "g", area=AreaFilter(10.0, None))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SeglabError, match="not empty and holds no gallery export"):
        export_tiles(tile_run, tmp_path / "other", overwrite=True)
    calls = []

    def failing(path, rgb):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        return real(path, rgb)

    real = gallery.write_png
    monkeypatch.setattr(gallery, "write_png", failing)
    with pytest.raises(OSError):
        export_tiles(tile_run, tmp_path / "g", area=AreaFilter(10.0, None), overwrite=True)
    assert json.loads((tmp_path / "g" / "gallery.json").read_text())["export_id"] == first["export_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "other", "run"]   # no staging folder left


def test_confidence_column_and_page_are_self_contained(tmp_path):
    from seglab.curate import gallery

    tiles, pred, _ = make_tile_run(tmp_path / "run", confidence=True)
    rec = gallery.gallery_from_predict(pred, tiles, tmp_path / "g", pixel_size_um=PIXEL, log=None)
    assert rec["has_confidence"] and [o["classifier_confidence"] for o in rec["objects"][:3]] == [0.1, 0.25, 0.4]
    for f in ["index.html", "assets/gallery.js", "assets/gallery.css"]:
        text = (tmp_path / "g" / f).read_text()
        assert "http:" not in text and "https:" not in text and "//" + "cdn" not in text, f
        assert "@import" not in text and "url(" not in text, f
    html = (tmp_path / "g" / "index.html").read_text()
    assert 'src="gallery-data.js"' in html and 'src="assets/gallery.js"' in html and "{{" not in html


def test_tiles_without_mask_are_counted_not_dropped_silently(tile_run, tmp_path):
    (tile_run[1] / "B.tif").unlink()
    rec = export_tiles(tile_run, tmp_path / "g")
    assert rec["counts"]["tiles_without_mask"] == ["B"] and rec["counts"]["n_objects"] == 6


# --------------------------------------------------------------------------- a slide run


class Threshold:
    """A stand-in segmenter: connected components of DAPI above 600 counts (the simulated nuclei)."""

    spec = "threshold-600"

    def segment(self, image, mask, batch_size=None):
        from skimage.measure import label

        return label(image[0] > 600)


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    from seglab.config.settings import MaskSettings
    from seglab.core.units import AreaFilter
    from seglab.data import simulate_slides as sim
    from seglab.segment import slides as seg

    root = tmp_path_factory.mktemp("slide")
    w = sim.simulate_slide(root / "in", "T", size_px=(512, 768), fmt="ome-tiff", seed=3)
    st = seg.SlideSettings(tile_px=256, overlap_px=48, area=AreaFilter(5.0, 400.0))
    res = seg.predict_slide(w["path"], root / "run", Threshold(), st, MaskSettings(diameter_px=20.0), log=None)
    return root, res


def test_slide_export_shows_the_instance_table_with_the_runs_identity(slide_run, tmp_path):
    from seglab.core.units import AreaFilter
    from seglab.curate import gallery

    root, res = slide_run
    rec = gallery.gallery_from_slide_run(root / "run", tmp_path / "g", per_page=300, log=None)
    inst = res.instances
    assert [o["object_id"] for o in rec["objects"]] == inst["object_id"].tolist()
    assert [o["area_px"] for o in rec["objects"]] == inst["area_px"].tolist()
    assert rec["segmentation_id"] == ans.segmentation_id("threshold-600", res.record["mask"])
    assert rec["area_filter"] == {"min_um2": 5.0, "max_um2": 400.0} and rec["pixel_size_um"] == 0.35
    o = rec["objects"][0]
    assert o["area_text"] == f"{o['area_px'] * 0.35 ** 2:.1f} um^2 | {o['area_px']} px"
    assert {"solidity", "mean_DAPI", "max_CD45"} <= set(rec["feature_columns"])
    assert all((tmp_path / "g" / o["crop"]).is_file() for o in rec["objects"])
    # a narrower filter keeps the run's other bound and counts what it leaves out
    narrow = gallery.gallery_from_slide_run(root / "run", tmp_path / "n", area=AreaFilter(40.0, None),
                                            features=False, log=None)
    kept = inst[inst["area_px"] >= 40.0 / 0.35 ** 2]
    assert narrow["area_filter"] == {"min_um2": 40.0, "max_um2": 400.0}
    assert narrow["counts"]["n_objects"] == len(kept) and narrow["counts"]["n_outside_area_filter"] == len(inst) - len(kept)
    assert narrow["feature_columns"] == ["area_um2", "mean_DAPI", "mean_CD45"]   # without features: those the table has
    with pytest.raises(SeglabError, match=r"reaches beyond the slide run's 5-400 um\^2"):
        gallery.gallery_from_slide_run(root / "run", tmp_path / "w", area=AreaFilter(1.0, None), log=None)
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- the command line


def test_cli_gallery_then_answers_check_and_merge(tile_run, tmp_path, capsys):
    from seglab.cli import main

    tiles, pred, expected = tile_run
    g = tmp_path / "g"
    assert main(["gallery", "--predict", str(pred), "--tiles", str(tiles), "--pixel-size-um", "0.5", "--out", str(g),
                 "--per-page", "5", "--cell-type", "lymphocyte", "--area-min-um2", "10"]) == 0
    rec = json.loads((g / "gallery.json").read_text())
    assert rec["cell_type"] == "lymphocyte" and rec["per_page"] == 5 and rec["counts"]["n_outside_area_filter"] == 3
    ids = [o["object_id"] for o in rec["objects"]]
    a = ans.write_answers(tmp_path / "a.json", g, {ids[0]: "yes", ids[1]: "no", ids[2]: "unsure"}, "ana")
    b = ans.write_answers(tmp_path / "b.json", g, {ids[0]: "yes", ids[1]: "yes"}, "ben")
    capsys.readouterr()
    assert main(["answers", "check", str(a), "--gallery", str(g)]) == 0
    assert "3 of 9 objects answered by ana (yes 1, no 1, unsure 1)" in capsys.readouterr().out
    assert main(["answers", "merge", str(a), str(b), "--gallery", str(g), "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "3 objects answered; 1 disagreement(s), 1 of them yes against no" in out
    assert f"{ids[1]}\tno\tyes\tunsure\tTrue" in out
    assert main(["gallery", "--predict", str(pred), "--tiles", str(tiles), "--pixel-size-um", "0.5",
                 "--out", str(g)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main(["answers", "check", str(tmp_path / "bad.json"), "--gallery", str(g)]) == 1
    assert "bad.json: malformed JSON" in capsys.readouterr().err


def test_chunk_cache_reads_the_same_regions_as_read_labels(slide_run):
    import numpy as np

    from seglab.curate.gallery import ChunkCache
    from seglab.segment import slides as seg

    root, res = slide_run
    out = root / "run" / "T"
    cache = ChunkCache(out / seg.LABELS, keep=2)
    cache.chunks = (100, 150)    # small chunks so that regions straddle several (reads slice the 1024 px ones)
    for y, x, h, w in [(0, 0, 512, 768), (90, 140, 30, 40), (250, 700, 262, 68), (10, 10, 1, 1)]:
        assert np.array_equal(cache.read(y, x, h, w), seg.read_labels(out, (slice(y, y + h), slice(x, x + w))))
    assert len(cache.cache) == 2


def test_cli_gallery_of_a_study_folder_of_slide_runs(slide_run, tmp_path, capsys):
    from seglab.cli import main

    root, res = slide_run
    # the study's folder (holding the slide's folder T/), the run's upper bound kept
    assert main(["gallery", "--slide-run", str(root / "run"), "--out", str(tmp_path / "g"), "--no-features",
                 "--area-min-um2", "40", "--sample", "5", "--seed", "2", "--per-page", "2"]) == 0
    rec = json.loads((tmp_path / "g" / "gallery.json").read_text())
    assert rec["area_filter"] == {"min_um2": 40.0, "max_um2": 400.0} and rec["sources"] == ["T"]
    assert rec["counts"]["n_objects"] == 5 and rec["n_pages"] == 3 and rec["sample"] == {"n": 5, "seed": 2}
    assert set(o["object_id"] for o in rec["objects"]) <= set(res.instances["object_id"])
    assert "left out by the sample" in capsys.readouterr().out
    assert main(["gallery", "--slide-run", str(root / "run"), "--predict", str(root), "--out", str(tmp_path / "x")]) == 1
    assert "give either --slide-run" in capsys.readouterr().err
    assert main(["gallery", "--slide-run", str(tmp_path), "--out", str(tmp_path / "y")]) == 1
    assert "no slide output here" in capsys.readouterr().err


def test_slides_of_two_segmentations_are_refused_naming_both(slide_run, tmp_path):
    import shutil

    from seglab.config.settings import MaskSettings
    from seglab.core.units import AreaFilter
    from seglab.curate import gallery
    from seglab.data import simulate_slides as sim
    from seglab.segment import slides as seg

    root, res = slide_run
    study = tmp_path / "study"
    shutil.copytree(root / "run" / "T", study / "T")
    w = sim.simulate_slide(tmp_path / "in", "U", size_px=(256, 256), fmt="ome-tiff", seed=4)

    class Other(Threshold):
        spec = "threshold-other"

    st = seg.SlideSettings(tile_px=256, overlap_px=48, area=AreaFilter(5.0, 400.0))
    seg.predict_slide(w["path"], study, Other(), st, MaskSettings(diameter_px=20.0), log=None)
    with pytest.raises(SeglabError, match=r"U has segmentation 'threshold-other\|mask:[0-9a-f]{12}' but "
                                          r".*T has 'threshold-600\|mask:[0-9a-f]{12}'"):
        gallery.gallery_from_slide_run(study, tmp_path / "g", features=False, log=None)
    assert not (tmp_path / "g").exists()
