"""The annotation gallery and its answers files: identities, every refusal, merging, the export.

Answers tests use a gallery record built by hand (exact ids); the export tests build slide and
tile outputs from label images drawn by hand, so every crop, area and id is known.
"""

from __future__ import annotations

import json

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
