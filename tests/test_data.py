"""Discovery, manifest, splits, audit, loaders, exports and bad input (seglab.data.manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from seglab import SeglabError
from seglab.cli import main
from seglab.data.manifest import (MANIFEST_COLUMNS, check_splits, cohort_manifest, discover, export_cellpose,
                         export_nnunet, generate_splits, load_manifest, load_mask, load_splits, load_tile,
                         read_nnunet, save_manifest)
from seglab.data.simulate import simulate_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return simulate_cohort(tmp_path_factory.mktemp("cohort") / "c", n_donors=8, tiles_per_marker=2, size_px=96,
                           seed=5, c2_fraction=0.2)


@pytest.fixture(scope="module")
def manifest_audit(cohort):
    return cohort_manifest(cohort, with_audit=True)


def _tile(folder: Path, name: str, arr) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / name, np.asarray(arr))
    return folder / name


def _pair(folder: Path, tid: str, shape=(16, 16), marker_ch="c1", dtype=np.uint16):
    _tile(folder, f"{tid}_c0.tif", np.ones(shape, dtype))
    _tile(folder, f"{tid}_{marker_ch}.tif", np.ones(shape, dtype))


# --------------------------------------------------------------------------- the simulated cohort


def test_manifest_of_cohort(cohort, manifest_audit):
    manifest, audit = manifest_audit
    truth = json.loads((cohort / "truth.json").read_text())
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 8 * 5 * 2 and manifest["tile_id"].is_unique
    assert manifest["donor"].dtype == np.int64 and manifest["annotated"].dtype == bool
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in manifest["marker_path"])
    assert set(manifest["split"]) <= {"", "train", "val", "test"}
    assert (manifest.loc[~manifest["annotated"], "split"] == "").all()
    assert (manifest.loc[manifest["annotated"], "split"] != "").all()
    ann = pd.read_csv(cohort / "annotated.csv")
    assert set(manifest.loc[manifest["annotated"], "tile_id"]) == set(ann["tile_id"])
    # the c2 fallbacks and the donors missing from the clinical table, by id
    tiles = pd.read_csv(cohort / "tiles.csv")
    c2 = sorted(tiles.loc[tiles["marker_channel"] == "c2", "tile_id"])
    assert c2 and audit["fallbacks"] == c2 and audit["n_fallbacks"] == truth["n_c2_fallbacks"]
    assert (manifest.set_index("tile_id").loc[c2, "marker_channel"] == "c2").all()
    assert audit["donors_missing_from_clinical"] == truth["donors_missing_from_clinical"]
    assert len(audit["donors_missing_from_clinical"]) == 2
    assert audit["donors_missing_from_tiles"] == sorted(map(int, truth["clinical_only_donors"]))
    assert audit["tiles_per_marker"] == {m: 16 for m in ("gfap", "iba1", "neun", "olig2", "pecam")}
    assert audit["n_donors_in_tiles"] == 8


def test_splits_are_by_donor(manifest_audit, cohort):
    manifest, _ = manifest_audit
    ann = manifest[manifest["annotated"]]
    sides = ann.groupby("donor")["split"].nunique()
    assert (sides == 1).all()
    splits = load_splits(cohort / "donor_splits.yaml")
    for s, donors in splits.items():
        assert set(ann.loc[ann["split"] == s, "donor"]) <= set(donors)


def test_load_tile_and_mask(manifest_audit):
    manifest, _ = manifest_audit
    row = manifest.iloc[0]
    img = load_tile(row)
    assert img.dtype == np.float32 and img.shape == (2, 96, 96)
    np.testing.assert_array_equal(img[1], tifffile.imread(row["marker_path"]).astype(np.float32))
    mask = load_mask(row)
    assert mask.shape == (96, 96) and np.issubdtype(mask.dtype, np.integer)


def test_manifest_roundtrip(manifest_audit, tmp_path):
    manifest, _ = manifest_audit
    save_manifest(manifest, tmp_path / "m.csv")
    back = load_manifest(tmp_path / "m.csv")
    pd.testing.assert_frame_equal(back.reset_index(drop=True), manifest.reset_index(drop=True), check_dtype=False)
    assert back["donor"].dtype == np.int64 and back["annotated"].dtype == bool
    assert (back["split"] == manifest["split"]).all()


# --------------------------------------------------------------------------- splits


def test_donor_on_two_sides_is_refused_by_name(tmp_path):
    f = tmp_path / "donor_splits.yaml"
    f.write_text("train: [101, 102]\nval: [103]\ntest: [104, 102]\n")
    with pytest.raises(SeglabError, match=r"donor 102 is in both train and test") as err:
        load_splits(f)
    assert str(f) in str(err.value)
    with pytest.raises(SeglabError, match="unknown split"):
        check_splits({"train": [1], "holdout": [2]})
    with pytest.raises(SeglabError, match="not numeric"):
        check_splits({"train": ["abc"]})


def test_generate_splits_seeded_and_balanced(manifest_audit):
    manifest, _ = manifest_audit
    a = generate_splits(manifest, seed=1)
    assert a == generate_splits(manifest, seed=1)
    donors = [d for v in a.values() for d in v]
    ann_donors = set(manifest.loc[manifest["annotated"], "donor"])
    assert len(donors) == len(set(donors)) and set(donors) == ann_donors
    assert all(a[s] for s in ("train", "val", "test"))
    assert len(a["train"]) >= len(a["val"])


# --------------------------------------------------------------------------- bad input


def test_empty_folder(tmp_path):
    (tmp_path / "tiles").mkdir()
    with pytest.raises(SeglabError, match="no .tif"):
        discover(tmp_path / "tiles")


def test_unparseable_donor_names_file(tmp_path):
    _pair(tmp_path, "ROSMAP_12ab_gfap_00")
    with pytest.raises(SeglabError, match=r"ROSMAP_12ab_gfap_00_c\d.tif: donor id '12ab' is not numeric"):
        discover(tmp_path)


def test_duplicate_tile_id(tmp_path):
    _pair(tmp_path / "a", "ROSMAP_1_gfap_00")
    _pair(tmp_path / "b", "ROSMAP_1_gfap_00")
    with pytest.raises(SeglabError, match="duplicate tile id ROSMAP_1_gfap_00"):
        discover(tmp_path)


def test_missing_channel_goes_to_audit(tmp_path):
    _pair(tmp_path, "ROSMAP_1_gfap_00")
    _pair(tmp_path, "ROSMAP_1_gfap_01", marker_ch="c2")
    _tile(tmp_path, "ROSMAP_1_gfap_02_c0.tif", np.ones((16, 16), np.uint16))
    _tile(tmp_path, "notes_about_tiles.tif", np.ones((4, 4), np.uint16))
    manifest, audit = discover(tmp_path)
    assert list(manifest["tile_id"]) == ["ROSMAP_1_gfap_00", "ROSMAP_1_gfap_01"]
    assert audit["fallbacks"] == ["ROSMAP_1_gfap_01"]
    assert audit["unpaired"][0]["tile_id"] == "ROSMAP_1_gfap_02" and "no marker channel" in audit["unpaired"][0]["problem"]
    assert audit["unmatched_files"] == [str(tmp_path / "notes_about_tiles.tif")]
    assert not manifest["annotated"].any() and (manifest["mask_path"] == "").all()


def test_corrupt_and_truncated_tiff(tmp_path):
    _pair(tmp_path, "ROSMAP_1_gfap_00")
    (tmp_path / "ROSMAP_1_gfap_01_c0.tif").write_bytes(b"not a tiff at all")
    _tile(tmp_path, "ROSMAP_1_gfap_01_c1.tif", np.ones((16, 16), np.uint16))
    with pytest.raises(SeglabError, match=r"ROSMAP_1_gfap_01_c0.tif: not a readable TIFF"):
        discover(tmp_path)
    manifest, audit = discover(tmp_path, strict=False)
    assert list(manifest["tile_id"]) == ["ROSMAP_1_gfap_00"] and audit["excluded"][0]["tile_id"] == "ROSMAP_1_gfap_01"
    # truncated: header intact, pixel data cut off
    t = tmp_path / "trunc"
    _pair(t, "ROSMAP_2_gfap_00", shape=(64, 64))
    tifffile.imwrite(t / "ROSMAP_2_gfap_00_c1.tif", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    data = (t / "ROSMAP_2_gfap_00_c1.tif").read_bytes()
    (t / "ROSMAP_2_gfap_00_c1.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(SeglabError, match=r"ROSMAP_2_gfap_00_c1.tif: (truncated|not a readable)"):
        discover(t)
    row = {"tile_id": "x", "dapi_path": str(t / "ROSMAP_2_gfap_00_c0.tif"), "marker_path": str(t / "ROSMAP_2_gfap_00_c1.tif")}
    with pytest.raises(SeglabError, match="ROSMAP_2_gfap_00_c1.tif"):
        load_tile(row)


def test_channels_of_different_shapes(tmp_path):
    _tile(tmp_path, "ROSMAP_1_gfap_00_c0.tif", np.ones((16, 16), np.uint16))
    _tile(tmp_path, "ROSMAP_1_gfap_00_c1.tif", np.ones((16, 20), np.uint16))
    with pytest.raises(SeglabError, match=r"ROSMAP_1_gfap_00_c1.tif: marker channel shape \(16, 20\) differs"):
        discover(tmp_path)
    row = {"tile_id": "x", "dapi_path": str(tmp_path / "ROSMAP_1_gfap_00_c0.tif"),
           "marker_path": str(tmp_path / "ROSMAP_1_gfap_00_c1.tif")}
    with pytest.raises(SeglabError, match="differs from the DAPI"):
        load_tile(row)


@pytest.mark.parametrize("mask, message", [
    (np.ones((16, 16), np.float32), "pixel type is float32"),
    (np.full((16, 16), -1, np.int16), "negative labels"),
    (np.ones((8, 8), np.uint16), r"mask shape \(8, 8\) differs from its image"),
])
def test_bad_masks(tmp_path, mask, message):
    _pair(tmp_path / "tiles", "ROSMAP_1_gfap_00")
    _tile(tmp_path / "masks", "ROSMAP_1_gfap_00.tif", mask)
    row = {"tile_id": "ROSMAP_1_gfap_00", "mask_path": str(tmp_path / "masks" / "ROSMAP_1_gfap_00.tif"),
           "dapi_path": str(tmp_path / "tiles" / "ROSMAP_1_gfap_00_c0.tif")}
    with pytest.raises(SeglabError, match=message) as err:
        load_mask(row)
    assert "ROSMAP_1_gfap_00.tif" in str(err.value)
    if mask.dtype != np.int16:  # negative values are only seen in the pixels, not the header
        with pytest.raises(SeglabError, match=message):
            discover(tmp_path / "tiles", tmp_path / "masks")


# --------------------------------------------------------------------------- exports


def test_export_cellpose_and_nnunet_roundtrip(manifest_audit, tmp_path):
    manifest, _ = manifest_audit
    ann = manifest[manifest["annotated"]]
    cp = export_cellpose(manifest, tmp_path / "cp")
    row = ann.iloc[0]
    img = tifffile.imread(cp / row["split"] / f"{row['tile_id']}.tif")
    assert img.shape == (3, 96, 96) and img.dtype == np.uint16 and not img[2].any()
    np.testing.assert_array_equal(tifffile.imread(cp / row["split"] / f"{row['tile_id']}_masks.tif"), load_mask(row))
    assert len(list(cp.glob("*/*_masks.tif"))) == len(ann)

    nn = export_nnunet(manifest, tmp_path / "nn")
    cases = read_nnunet(nn)
    assert set(cases["tile_id"]) == set(ann["tile_id"])
    test_ids = set(ann.loc[ann["split"] == "test", "tile_id"])
    assert set(cases.loc[cases["subset"] == "Ts", "tile_id"]) == test_ids
    r = cases.set_index("tile_id").loc[row["tile_id"]]
    np.testing.assert_array_equal(tifffile.imread(r["instance_path"]), load_mask(row))
    np.testing.assert_array_equal(tifffile.imread(r["marker_path"]).astype(np.float32), load_tile(row)[1])
    assert json.loads((nn / "dataset.json").read_text())["channel_names"] == {"0": "DAPI", "1": "marker"}

    with pytest.raises(SeglabError, match="already exists"):
        export_cellpose(manifest, tmp_path / "cp")


def test_export_failure_writes_nothing(manifest_audit, tmp_path):
    manifest, _ = manifest_audit
    broken = manifest.copy()
    idx = broken.index[broken["annotated"]][3]
    bad = tmp_path / "bad_mask.tif"
    tifffile.imwrite(bad, np.ones((96, 96), np.float32))
    broken.loc[idx, "mask_path"] = str(bad)
    with pytest.raises(SeglabError, match="bad_mask.tif"):
        export_cellpose(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad_mask.tif"]


# --------------------------------------------------------------------------- command line


def test_cli_audit_and_simulate_refusal(cohort, tmp_path, capsys):
    assert main(["audit", "--cohort", str(cohort), "--out", str(tmp_path / "audit.json"),
                 "--manifest", str(tmp_path / "m.csv")]) == 0
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["n_tiles_paired"] == 80 and len(audit["donors_missing_from_clinical"]) == 2
    assert len(load_manifest(tmp_path / "m.csv")) == 80
    rc = main(["simulate", "--out", str(cohort), "--donors", "8", "--seed", "6", "--quiet"])
    assert rc == 1 and "never overwritten" in capsys.readouterr().err
