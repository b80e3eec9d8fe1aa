"""Whole slides: readers, the um^2 filter, tiling, seams against the truth, memory plans, bad input.

The slow part is one module fixture: a simulated 2560 x 1024 px slide written as a CZI (pylibCZIrw)
and as an OME-TIFF (tifffile) with the same pixels, segmented with the tiny generalist on the CPU
(512 px tiles, 48 px overlap): every tissue tile of the CZI (10), half of the OME-TIFF's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from seglab import SeglabError
from seglab.config.settings import MaskSettings
from seglab.core.units import AreaFilter, px_to_um2, um2_to_px
from seglab.data import simulate_slides as sim
from seglab.data import slides as sio
from seglab.segment import slides as seg
from seglab.slurm import memory

SIZE = (1024, 2560)
TILE, OVERLAP = 512, 48
MASK = MaskSettings(diameter_px=20.0)
AREA = AreaFilter(10.0, 300.0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("slides")
    # the same slide "T" (same seed: same pixels) in both formats, in two folders
    czi = sim.simulate_slide(out / "czi", "T", size_px=SIZE, fmt="czi", seed=3)
    ome = sim.simulate_slide(out / "ome", "T", size_px=SIZE, fmt="ome-tiff", seed=3)
    return {"dir": out, "czi": czi, "ome": ome}


@pytest.fixture(scope="module")
def predicted(written, tmp_path_factory):
    import torch

    from seglab.core import workers

    workers.set_threads(1)
    out = tmp_path_factory.mktemp("pred")
    model = seg.load_model("generalist", torch.device("cpu"))
    st = seg.SlideSettings(tile_px=TILE, overlap_px=OVERLAP, area=AREA)
    czi = seg.predict_slide(written["czi"]["path"], out / "czi", model, st, MASK, log=None)
    # half the tiles (seeded by the slide's id "T": the same draw for both formats) keeps the test short
    unfiltered = seg.SlideSettings(tile_px=TILE, overlap_px=OVERLAP, sample_fraction=0.5)
    ome = seg.predict_slide(written["ome"]["path"], out / "ome", model, unfiltered, MASK, log=None)
    return {"out": out, "model": model, "czi": czi, "ome": ome, "settings": st}


# --------------------------------------------------------------------------- units


def test_one_conversion_gives_the_issue_bounds_inclusively():
    f = AreaFilter(100, 2100)
    # 100 um^2 / 0.1725^2 = 3360.6 px, 2100 um^2 = 70573.4 px: whole px inside [100, 2100] um^2
    assert f.px_bounds(0.1725) == (3361, 70573)
    assert f.keep([3360, 3361, 70573, 70574], 0.1725).tolist() == [False, True, True, False]
    assert um2_to_px(1.0, 0.5) == 4.0 and px_to_um2(4, 0.5) == 1.0
    assert AreaFilter(None, None).keep([0, 10 ** 9], 0.3).tolist() == [True, True]
    # where the bounds were read is for messages: two slides' run.json with the same bounds are one filter
    assert AreaFilter(100, 2100, source="a/run.json") == AreaFilter(100, 2100, source="b/run.json")
    assert AreaFilter(100, 2100) != AreaFilter(100, 2000)


def test_filter_min_above_max_is_refused_naming_the_keys():
    with pytest.raises(SeglabError, match=r"min_area_um2=500.0 is larger than max_area_um2=100.0"):
        AreaFilter.from_params({"min_area_um2": 500, "max_area_um2": 100}, source="params/demo/08_slides.yaml")
    with pytest.raises(SeglabError, match="must be a number"):
        AreaFilter(-1, 5)


# --------------------------------------------------------------------------- readers


def test_czi_and_ome_tiff_read_the_same_regions_lazily_with_metadata(written):
    with sio.open_slide(written["czi"]["path"]) as a, sio.open_slide(written["ome"]["path"]) as b:
        assert (a.fmt, b.fmt) == ("czi", "ome-tiff")
        assert a.shape == b.shape == SIZE
        assert a.pixel_size_um == pytest.approx(0.35) and b.pixel_size_um == pytest.approx(0.35)
        assert a.channel_names == b.channel_names == ["DAPI", "CD45"]
        ra, rb = a.read(500, 1900, 300, 700), b.read(500, 1900, 300, 700)
        assert ra.shape == (2, 300, 660)   # clipped at the slide's right edge
        np.testing.assert_array_equal(ra, rb)
    with sio.open_slide(written["ome"]["path"], channels=["cd45", "DAPI"], pixel_size_um=0.5) as s:
        assert s.names == ["CD45", "DAPI"] and s.pixel_size_um == 0.5 and s.pixel_size_source == "param"
        with sio.open_slide(written["ome"]["path"]) as full:
            np.testing.assert_array_equal(s.read(0, 0, 64, 64), full.read(0, 0, 64, 64)[::-1])


def test_unknown_channel_names_the_file_and_its_channels(written):
    with pytest.raises(SeglabError, match=r"T.czi: no channel named 'GFAP'; the file has \['DAPI', 'CD45'\]"):
        sio.open_slide(written["czi"]["path"], channels=["GFAP"])


def test_no_pixel_size_and_none_given_is_refused(tmp_path):
    r = sim.simulate_slide(tmp_path, "N", size_px=256, fmt="ome-tiff", write_truth=False, write_pixel_size=False)
    with pytest.raises(SeglabError, match="no pixel size in the file's metadata; give it with pixel_size_um"):
        sio.open_slide(r["path"])
    assert sio.open_slide(r["path"], pixel_size_um=0.2).pixel_size_um == 0.2
    c = sim.simulate_slide(tmp_path, "M", size_px=256, fmt="czi", write_truth=False, write_pixel_size=False)
    with pytest.raises(SeglabError, match="no pixel size"):
        sio.open_slide(c["path"])


def test_truncated_or_foreign_czi_is_refused_at_open(written, tmp_path):
    data = written["czi"]["path"].read_bytes()
    (tmp_path / "cut.czi").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.czi").write_bytes(b"not a czi" * 100)
    for name in ("cut.czi", "junk.czi"):
        with pytest.raises(SeglabError, match=rf"{name}: unreadable CZI .* copy it again"):
            sio.open_slide(tmp_path / name)


def test_plain_tiled_tiff_takes_its_resolution_tags(tmp_path):
    import tifffile

    img = np.arange(300 * 400, dtype=np.uint16).reshape(300, 400)
    tifffile.imwrite(tmp_path / "p.tif", img, tile=(128, 128), resolution=(1e4 / 0.25, 1e4 / 0.25),
                     resolutionunit="CENTIMETER")
    with sio.open_slide(tmp_path / "p.tif") as s:
        assert (s.fmt, s.pixel_size_um, s.channel_names) == ("tiff", pytest.approx(0.25), ["c0"])
        np.testing.assert_array_equal(s.read(10, 20, 5, 6)[0], img[10:15, 20:26])


# --------------------------------------------------------------------------- grid, tissue, sample


def test_cores_partition_the_slide_and_windows_add_the_overlap():
    tiles = seg.tile_grid(1000, 1300, 512, 48)
    cover = np.zeros((1000, 1300), int)
    for t in tiles:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        assert (t.wy0, t.wx0) == (max(t.y0 - 48, 0), max(t.x0 - 48, 0))
        assert (t.wy1, t.wx1) == (min(t.y1 + 48, 1000), min(t.x1 + 48, 1300))
    assert cover.min() == cover.max() == 1 and len(tiles) == 2 * 3


def test_tile_smaller_than_overlap_is_refused():
    with pytest.raises(SeglabError, match="tile_px=100 is smaller than overlap_px=128"):
        seg.SlideSettings(tile_px=100, overlap_px=128)


def test_sample_is_seeded_and_nested():
    ids = [f"t{i}" for i in range(50)]
    s10 = seg.sample_tiles(ids, 0.1, 7, "S01")
    assert len(s10) == 5 and s10 == seg.sample_tiles(ids, 0.1, 7, "S01")
    assert set(s10) <= set(seg.sample_tiles(ids, 0.5, 7, "S01"))
    assert s10 != seg.sample_tiles(ids, 0.1, 8, "S01")
    assert seg.sample_tiles(ids, 1.0, 7, "S01") == ids


def test_tiles_without_tissue_are_skipped(tmp_path):
    r = sim.simulate_slide(tmp_path, "E", size_px=(512, 2048), fmt="ome-tiff", write_truth=False,
                           sim=sim.SlideSim(tissue_fraction=0.5))
    with sio.open_slide(r["path"]) as s:
        tiles, table, thumb, factor = seg.plan_slide(s, seg.SlideSettings(tile_px=256, overlap_px=32), tmp_path)
    tissue = table.set_index("id")["tissue"]
    # the ellipse spans x 512-1536 px: the two tiles at each end hold none, the middle ones do
    assert not tissue[["r000_c000", "r001_c000", "r000_c007", "r001_c007"]].any()
    assert tissue[["r000_c003", "r001_c004"]].all()
    assert table["selected"].equals(table["tissue"])


# --------------------------------------------------------------------------- seams against the truth


def test_every_true_cell_found_once_across_seams(written, predicted):
    """The stitched CZI against its truth (both filtered in um^2): no object cut or doubled, recall
    near seams as high as away from them, AP within 0.03 of one window segmented away from borders."""
    from seglab.experiments import e8_slides as e8

    res = predicted["czi"]
    row, per = e8.evaluate_slide(written["czi"], res, AREA)
    assert row["n_split_or_double"] == 0
    assert abs(row["n_pred"] - row["n_true"]) <= 0.02 * row["n_true"]
    near = per[per["seam_distance_px"] < 16]
    assert len(near) >= 40   # many cells straddle the seams
    assert near["matched"].mean() >= per[per["seam_distance_px"] >= 64]["matched"].mean() - 0.02
    params = {"tile_px": TILE, "overlap_px": OVERLAP, "cell_diameter_px": 20.0, "channels": None}
    ref = e8.single_window_reference(params, {**written["czi"], "slide": "T"}, predicted["model"], AREA)
    assert ref["n_true"] > 60
    print("seam check:", row, "near-seam recall", round(near["matched"].mean(), 4), "n_near", len(near), "ref", ref)
    assert row["ap50"] >= ref["ap50"] - 0.03, (row, ref)
    ids = res.instances["object_id"]
    assert ids.is_unique and ids.str.startswith("T-").all()
    for col in ("centroid_y_px", "centroid_x_um", "area_px", "area_um2", "mean_DAPI", "mean_CD45", "tile"):
        assert col in res.instances
    labels = seg.read_labels(res.out)
    assert set(np.unique(labels)) - {0} <= set(res.instances["label"])


def test_um2_filter_gives_the_same_cells_in_segmentation_and_export(predicted):
    """Same pixels in both formats: the OME-TIFF run without a filter (on half the tiles), exported
    with the filter, holds exactly the CZI run's filtered objects of those tiles (the same
    geometry-derived ids)."""
    czi, ome = predicted["czi"], predicted["ome"]
    exported = seg.export_instances(ome.out, AREA)
    assert len(exported) < len(ome.detections)   # the filter dropped debris
    same_tiles = czi.instances[czi.instances["tile"].isin(ome.record["selected_tiles"])]
    assert 0 < len(same_tiles) < len(czi.instances)
    assert set(exported["object_id"]) == set(same_tiles["object_id"])
    lo, hi = AREA.px_bounds(0.35)
    assert czi.instances["area_px"].between(lo, hi).all()
    assert czi.record["area_filter_px"] == [lo, hi]
    again = seg.export_instances(czi.out, AREA)
    assert set(again["object_id"]) == set(czi.instances["object_id"])


def test_rerun_resumes_and_merge_refuses_tiles_of_another_model(written, predicted):
    res = predicted["czi"]
    logs = []
    again = seg.predict_slide(written["czi"]["path"], predicted["out"] / "czi", "generalist", predicted["settings"], MASK,
                              log=logs.append)
    assert logs and logs[0].endswith("0 to segment")
    pd.testing.assert_frame_equal(again.instances, res.instances)
    check = json.loads((res.out / seg.MERGE_CHECK).read_text())
    assert check["each_tile_once"] and check["n_done"] == res.record["n_selected_tiles"]
    assert check["n_cut_by_window"] == 0   # the 48 px overlap holds every simulated cell
    tile = res.record["selected_tiles"][0]
    folder = res.out / seg.TILES
    rec = json.loads((folder / f"{tile}.json").read_text())
    with pytest.raises(SeglabError, match="made by another model"):
        seg.merge_check(folder, res.tiles, {"model": "cpsam", "mask": rec["mask"]})
    (folder / f"{tile}.complete.json").unlink()
    with pytest.raises(SeglabError, match=rf"1 selected tile\(s\) have no complete output \({tile}\)"):
        seg.merge_check(folder, res.tiles, {"model": rec["model"], "mask": rec["mask"]})


# --------------------------------------------------------------------------- memory plans and devices


def test_plan_of_the_issue_is_refused_with_the_numbers():
    w = memory.WorkerMemory(model="cpsam", device="cuda", tile_px=4096, host_gb=7.5, gpu_gb=4.0)
    plan = memory.plan_workers(w, workers=16, job_mem_gb=128, gpus=1, gpu_mem_gb=80)
    assert (plan.fits, plan.max_workers, plan.host_needed_gb, plan.host_usable_gb) == (False, 14, 120.0, 108.8)
    with pytest.raises(memory.PlanDoesNotFit, match=r"16 worker\(s\) x 7.5 GB host = 120.0 GB of 128 GB .* "
                                                    r"at most 14 worker\(s\) fit; use at most 14"):
        memory.check_plan(plan)
    assert memory.check_plan(memory.plan_workers(w, workers=14, job_mem_gb=128, gpus=1, gpu_mem_gb=80)).fits
    # GPU-bound: 4 GB each on one 16 GB GPU (13.6 usable) -> 3
    assert memory.plan_workers(w, workers=4, job_mem_gb=512, gpus=1, gpu_mem_gb=16).max_workers == 3
    assert memory.plan_workers(w, workers=4, job_mem_gb=512, gpus=2, gpu_mem_gb=16).max_workers == 6


def test_cli_refuses_a_plan_before_any_work(written, tmp_path, probe_root):
    memory.store(memory.WorkerMemory(model="generalist", device="cpu", tile_px=TILE + 2 * OVERLAP, host_gb=7.5))
    out = tmp_path / "never"
    cmd = [sys.executable, "-m", "seglab", "predict-slide", str(written["czi"]["path"]), "--out", str(out),
           "--device", "cpu", "--tile-px", str(TILE), "--overlap-px", str(OVERLAP), "--workers", "16",
           "--job-mem-gb", "128"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=probe_root)
    assert p.returncode == 1, p.stderr
    assert "memory plan does not fit" in p.stderr and "at most 14 worker(s) fit" in p.stderr
    assert not out.exists()
    p = subprocess.run([sys.executable, "-m", "seglab", "plan", "--model", "generalist", "--tile-px", str(TILE),
                        "--overlap-px", str(OVERLAP), "--workers", "15", "--job-mem-gb", "128"],
                       capture_output=True, text=True, cwd=probe_root)
    assert p.returncode == 1 and "at most 14 worker(s) fit" in p.stderr
    p = subprocess.run(cmd[:-4] + ["--min-area-um2", "500", "--max-area-um2", "100"], capture_output=True,
                       text=True, cwd=probe_root)
    assert p.returncode == 1 and "min_area_um2=500.0 is larger than max_area_um2=100.0" in p.stderr
    assert not out.exists()


def test_devices_are_torch_devices():
    import torch

    assert seg.as_device("cpu") == torch.device("cpu") and isinstance(seg.as_device(None), torch.device)
    with pytest.raises(SeglabError, match="must be a torch.device, got str"):
        seg.load_model("generalist", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SeglabError, match="torch sees 0 CUDA GPU"):
            seg.as_device("cuda")


def test_submit_slides_checks_the_plan_then_writes_one_array_task_per_slide(written, tmp_path, probe_root):
    (tmp_path / "cluster.yaml").write_text("gpus: 1\nmem: 32G\njobs:\n  predict: {time: \"01:00:00\"}\n")
    memory.store(memory.WorkerMemory(model="cpsam", device="cuda", tile_px=4096 + 2 * 128, host_gb=7.5, gpu_gb=4.0))
    base = [sys.executable, "-m", "seglab", "submit-slides", str(written["czi"]["path"]), str(written["ome"]["path"]),
            "--out", str(tmp_path / "o"), "--model", "cpsam", "--tile-px", "4096", "--overlap-px", "128",
            "--gpu-mem-gb", "80", "--cluster", str(tmp_path / "cluster.yaml"), "--dry-run"]
    p = subprocess.run(base + ["--workers", "4"], capture_output=True, text=True, cwd=probe_root)
    assert p.returncode == 1 and "4 worker(s) x 7.5 GB host = 30.0 GB of 32 GB" in p.stderr
    assert "at most 3 worker(s) fit" in p.stderr
    p = subprocess.run(base + ["--workers", "3"], capture_output=True, text=True, cwd=probe_root)
    assert p.returncode == 0, p.stderr
    assert "--array=0-1" in p.stdout and "predict-slide" in p.stdout and "T.ome.tif" in p.stdout


def test_each_object_is_kept_once_by_the_tile_whose_core_holds_its_centroid():
    """A constructed slide segmented perfectly: two tiles (cores x 0-100 and 100-200, 20 px overlap)
    see the objects near their seam; each object is kept by exactly one tile, with the same
    geometry-derived id; one wider than the overlap is cut by both windows and both pieces are flagged
    (``touches_window_edge``): why the overlap must hold the largest object."""
    yy, xx = np.mgrid[:100, :200]
    truth = np.zeros((100, 200), np.uint16)
    for lab, (cy, cx, ry, rx) in enumerate([(30, 96, 7, 7), (60, 104, 7, 7), (80, 150, 5, 5), (15, 40, 5, 5),
                                            (50, 92, 4, 34)], start=1):
        truth[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = lab
    image = np.stack([truth.astype(np.float32), np.ones_like(truth, np.float32)])
    tiles = seg.tile_grid(100, 200, 100, 20)
    kept = []
    for t in tiles:
        window = truth[t.wy0:t.wy1, t.wx0:t.wx1]
        table, crop, offset = seg.tile_objects(window, image[:, t.wy0:t.wy1, t.wx0:t.wx1], t, "S", 0.5, ["DAPI", "X"])
        kept.append(table)
    both = pd.concat(kept, ignore_index=True)
    # object 5 (68 px wide) is wider than the 20 px overlap: each window cuts it and each tile keeps
    # its piece (centroids 92 and ~103); both pieces are flagged, the other four objects never are
    cut = both[both["touches_window_edge"].astype(bool)]
    assert len(cut) == 2 and set(cut["tile"]) == {"r000_c000", "r000_c001"}
    whole_ones = both[~both["touches_window_edge"].astype(bool)]
    assert len(whole_ones) == 4 and whole_ones["object_id"].is_unique
    assert sorted(whole_ones.loc[whole_ones["tile"] == "r000_c000", "centroid_x_px"].round()) == [40, 96]
    assert sorted(whole_ones.loc[whole_ones["tile"] == "r000_c001", "centroid_x_px"].round()) == [104, 150]
    whole = both[both["centroid_x_px"].round() == 96].iloc[0]
    assert whole["area_px"] == int((truth == 1).sum()) and whole["area_um2"] == whole["area_px"] * 0.25
    assert whole["object_id"] == seg.object_id("S", (23, 89, 38, 104), whole["area_px"])
    assert whole["mean_DAPI"] == 1.0 and whole["seam_distance_px"] == pytest.approx(4.0, abs=0.01)
