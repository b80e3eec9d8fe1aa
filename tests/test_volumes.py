"""3D volumes (issue #15): nnU-Net layout, consensus, prediction folders, 3D evaluation, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from seglab import SeglabError
from seglab.data import simulate3d
from seglab.data import volumes as vdata
from seglab.evaluate import metrics
from seglab.evaluate import volumes as evol
from seglab.segment import volumes as svol


def _planted(shape=(20, 40, 40)):
    """Four separated boxes (ids 1-4) in a (Z, Y, X) volume."""
    t = np.zeros(shape, np.int32)
    t[2:8, 2:12, 2:12] = 1
    t[2:8, 20:30, 20:30] = 2
    t[10:18, 2:14, 24:36] = 3
    t[10:18, 24:36, 4:14] = 4
    return t


# --------------------------------------------------------------------------- consensus


def test_consensus_recovers_planted_objects_from_imperfect_stacks():
    truth = _planted()
    xy = truth.copy()
    xy[truth == 1] = 0                      # xy misses object 1
    xz = truth.copy()
    xz[30:, 30:, 30:] = 0
    xz[14:18, 30:38, 30:38] = 9             # xz has a false object seen nowhere else
    yz = truth.copy() * 10                  # other ids, same objects
    half = (truth == 3) & (np.arange(40)[None, None, :] >= 30)
    yz[half] = 77                           # yz splits object 3 (30 of its 36 x-columns... one third off)
    merged = svol.consensus([xy, xz, yz], iou=0.5)
    # 1: in xz and yz (2 of 3) -> kept; 9: only xz -> dropped; 3: xy and xz agree on every voxel -> whole
    assert merged.max() == 4
    m = metrics.match(truth, merged.astype(np.int32), thresholds=(0.5, 0.99, 1.0))
    assert m["tp"].tolist() == [4, 4, 4] and m["fp"].tolist() == [0, 0, 0] and m["ap"].tolist() == [1.0, 1.0, 1.0]


def test_consensus_needs_two_votes_and_majority_voxels():
    truth = _planted()
    only_one = np.zeros_like(truth)
    only_one[truth == 2] = 5
    merged = svol.consensus([only_one, np.zeros_like(truth), np.zeros_like(truth)])
    assert merged.max() == 0                # one stack of three is not a majority
    grown = truth.copy()
    grown[2:8, 2:14, 2:14][grown[2:8, 2:14, 2:14] == 0] = 1   # object 1 two voxels wider in one stack only
    merged = svol.consensus([truth, truth, grown])
    assert metrics.match(truth, merged.astype(np.int32), thresholds=1.0)["tp"].iloc[0] == 4   # voxel majority
    # two stacks: both must agree (2 of 2); min_votes=1 keeps every object of either
    assert svol.consensus([truth, only_one]).max() == 1
    assert svol.consensus([truth, only_one], min_votes=1).max() == 4


def test_consensus_one_stack_and_bad_input():
    truth = _planted()
    assert np.array_equal(svol.consensus([truth * 3]) > 0, truth > 0)
    with pytest.raises(SeglabError, match="shape"):
        svol.consensus([truth, truth[:, :, :-1]])
    with pytest.raises(SeglabError, match="min_votes"):
        svol.consensus([truth, truth], min_votes=3)


def test_settings_names_and_checks():
    assert svol.settings_for("xy").label == "xy" and svol.settings_for("xy").axes == ("xy",)
    assert svol.settings_for("orthoplane").label == "orthoplane"
    assert svol.settings_for("orthoplane_xy_xz").label == "orthoplane_xy_xz"
    assert svol.VolumeSettings().votes() == 2 and svol.settings_for("orthoplane_xy_xz").votes() == 2
    with pytest.raises(SeglabError, match="axes"):
        svol.VolumeSettings(axes=("xy", "zz"))
    with pytest.raises(SeglabError, match="downsample"):
        svol.VolumeSettings(downsample=0.5)
    with pytest.raises(SeglabError, match="method"):
        svol.settings_for("do3d")


def test_resample_nearest_round_trip():
    t = _planted()
    up = svol.resample_nearest(t, (40, 40, 40))      # anisotropy 2 -> isotropic
    assert np.array_equal(svol.resample_nearest(up, t.shape), t)


# --------------------------------------------------------------------------- files and layout


def test_case_names_and_voxel_size_round_trip(tmp_path):
    assert vdata.case_name("a/cell_07_0000.tif") == "cell_07"
    assert vdata.case_name("cell_07.TIFF") == "cell_07"
    img = np.random.default_rng(0).random((6, 16, 16)).astype(np.float32)
    vdata.write_volume(tmp_path / "v_0000.tiff", img, vdata.VoxelSize(2.0, 0.5, 0.5))
    back, voxel = vdata.read_volume(tmp_path / "v_0000.tiff")
    assert np.array_equal(back, img) and voxel.anisotropy == pytest.approx(4.0)
    assert voxel.z_um == pytest.approx(2.0) and voxel.x_um == pytest.approx(0.5)
    _, given = vdata.read_volume(tmp_path / "v_0000.tiff", anisotropy=2)
    assert given.anisotropy == pytest.approx(2.0)
    tifffile.imwrite(tmp_path / "w_0000.tif", img)   # no metadata: isotropic
    assert vdata.read_volume(tmp_path / "w_0000.tif")[1].anisotropy == 1.0
    assert sorted(vdata.index_folder(tmp_path)) == ["v", "w"]


def test_bad_input_each_a_clear_error(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((16, 16), np.float32))
    with pytest.raises(SeglabError, match=r"flat.tif: a 2D image .* not a volume"):
        vdata.read_volume(tmp_path / "flat.tif")
    tifffile.imwrite(tmp_path / "four.tif", np.zeros((4, 2, 16, 16), np.float32), photometric="minisblack")
    with pytest.raises(SeglabError, match=r"four.tif: a 4D array .* --channel"):
        vdata.read_volume(tmp_path / "four.tif")
    assert vdata.read_volume(tmp_path / "four.tif", channel=1)[0].shape == (4, 16, 16)
    for bad in (0, -1, "x", float("nan")):
        with pytest.raises(SeglabError, match="anisotropy"):
            vdata.read_volume(tmp_path / "four.tif", channel=0, anisotropy=bad)
    tifffile.imwrite(tmp_path / "float_labels.tif", np.ones((4, 16, 16), np.float32), photometric="minisblack")
    with pytest.raises(SeglabError, match=r"float_labels.tif: labels have dtype float32, not integers.*astype"):
        vdata.read_labels(tmp_path / "float_labels.tif")
    # a case with no label file
    ds = tmp_path / "Dataset001_X"
    vdata.write_case(ds, "test", "a", np.zeros((4, 16, 16), np.float32), np.zeros((4, 16, 16), np.uint16))
    vdata.write_volume(ds / "imagesTs" / "b_0000.tif", np.zeros((4, 16, 16), np.float32))
    with pytest.raises(SeglabError, match=r"\['b'\] have no label file in .*instancesTs"):
        vdata.dataset_cases(ds, "test")
    with pytest.raises(SeglabError, match="imagesTr: missing"):
        vdata.dataset_cases(ds, "train")
    # a volume and its label of different shapes: a failed row naming the shapes, nothing scored for it
    (ds / "imagesTs" / "b_0000.tif").unlink()
    pred = ds / "imagesTs_x"
    vdata.write_volume(pred / "a.tiff", np.zeros((4, 16, 8), np.uint16))
    table = evol.score_folder(pred, ds / "instancesTs", (0.5,))
    row = table[table["volume"] == "a"].iloc[0]
    assert row["status"] == "failed" and "shape" in row["error"]


def test_train_refuses_labels_of_another_shape(tmp_path):
    from seglab.config.settings import TrainSettings

    ds = tmp_path / "Dataset002_Y"
    vdata.write_case(ds, "train", "a", np.zeros((4, 16, 16), np.float32), np.zeros((4, 16, 12), np.uint16))
    with pytest.raises(SeglabError, match=r"a.tiff: labels of shape \(4, 16, 12\) but the volume"):
        svol.train_on_dataset("generalist", ds, TrainSettings(epochs=1, bsize=32), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_training_slices_all_orientations_only_when_isotropic():
    t = _planted()
    img = t.astype(np.float32)
    _, _, ids_iso = vdata.training_slices([img], [t], [1.0], min_objects=1)
    _, _, ids_aniso = vdata.training_slices([img], [t], [2.0], min_objects=1)
    assert {i.split("_")[1][:2] for i in ids_iso} == {"xy", "xz", "yz"}
    assert {i.split("_")[1][:2] for i in ids_aniso} == {"xy"}
    assert len(ids_aniso) == 14          # planes 2-7 and 10-17 hold objects


def test_simulator_is_deterministic_with_anisotropy():
    a1 = simulate3d.simulate_volume((16, 32, 32), 2.0, seed=3)
    a2 = simulate3d.simulate_volume((16, 32, 32), 2.0, seed=3)
    assert a1[0].shape == (8, 32, 32) and np.array_equal(a1[0], a2[0]) and np.array_equal(a1[1], a2[1])
    assert a1[1].max() >= 3 and a1[1].dtype == np.uint16
    assert np.array_equal(np.unique(a1[1]), np.arange(a1[1].max() + 1))   # ids 1..n


# --------------------------------------------------------------------------- evaluation


def test_3d_metrics_equal_cellpose_average_precision():
    from cellpose import metrics as cp_metrics

    rng = np.random.default_rng(1)
    t = _planted()
    p = np.roll(t, 2, axis=0)
    p[rng.random(t.shape) > 0.995] = 0
    p[0:6, 30:38, 30:38] = 8
    ths = [0.3, 0.5, 0.75]
    ap, tp, fp, fn = cp_metrics.average_precision([t], [p.astype(np.int32)], threshold=ths)
    ours = metrics.match(t, p.astype(np.int32), thresholds=ths)
    assert ours["tp"].tolist() == tp[0].tolist() and ours["fp"].tolist() == fp[0].tolist()
    assert ours["fn"].tolist() == fn[0].tolist() and np.allclose(ours["ap"], ap[0])


def test_boundary_split_merge_exact():
    t = np.zeros((6, 20, 20), np.int32)
    t[1:5, 2:10, 2:10] = 1
    t[1:5, 12:18, 2:10] = 2
    row = evol.evaluate_volume(t, t, (0.5,)).iloc[0]
    assert row["boundary_f1"] == 1.0 and row["foreground_dice"] == 1.0 and row["n_split"] == 0
    split = t.copy()
    split[1:5, 2:6, 2:10][t[1:5, 2:6, 2:10] == 1] = 5      # true 1 cut in two
    merged = t.copy()
    merged[t == 2] = 1                                      # 1 and 2 predicted as one
    assert evol.evaluate_volume(t, split, (0.5,)).iloc[0]["n_split"] == 1
    r = evol.evaluate_volume(t, merged, (0.5,)).iloc[0]
    assert r["n_merged"] == 1 and r["n_split"] == 0
    shifted = np.roll(t, 3, axis=2)
    b0 = evol.boundary_scores(t, shifted, tol=0)
    b3 = evol.boundary_scores(t, shifted, tol=3)
    assert b3["boundary_f1"] == 1.0 and b0["boundary_f1"] < 1.0


def _dataset_with_predictions(tmp_path):
    ds = tmp_path / "Dataset003_Z"
    t = _planted()
    for k in range(3):
        vdata.write_case(ds, "test", f"c{k}", t.astype(np.float32), t.astype(np.uint16))
    for k in range(3):
        vdata.write_volume(ds / "imagesTs_perfect" / f"c{k}.tiff", t.astype(np.uint16))
    one = t.copy()
    one[t == 4] = 0
    (ds / "imagesTs_nnunet").mkdir()
    for k in range(3):    # another tool's folder, .tif: misses object 4 everywhere
        tifffile.imwrite(ds / "imagesTs_nnunet" / f"c{k}.tif", one.astype(np.uint16))
    return ds


def test_every_imagesTs_folder_evaluated_and_failures_reported(tmp_path):
    ds = _dataset_with_predictions(tmp_path)
    (ds / "imagesTs_broken").mkdir()
    vdata.write_volume(ds / "imagesTs_broken" / "c0.tiff", _planted().astype(np.uint16))
    (ds / "imagesTs_broken" / "c1.tiff").write_bytes(b"not a tiff")          # unreadable; c2 missing
    table = evol.compare_methods(ds, (0.5,))
    by = table.set_index("method")
    assert sorted(by.index) == ["broken", "nnunet", "perfect"]
    assert by.loc["perfect", "ap"] == 1.0 and by.loc["perfect", "n_true"] == 12
    assert by.loc["nnunet", "tp"] == 9 and by.loc["nnunet", "ap"] == pytest.approx(0.75)
    assert by.loc["broken", "n_failed"] == 2 and by.loc["broken", "n_volumes"] == 3 and by.loc["broken", "ap"] == 1.0
    for m in ("perfect", "nnunet", "broken"):
        assert (ds / f"imagesTs_{m}" / "evaluation" / evol.RESULTS_FILE).is_file()
    text = (ds / "imagesTs_broken" / "evaluation" / evol.SUMMARY_FILE).read_text()
    assert "1 volumes evaluated, 2 failed" in text and "failed c2: no prediction" in text
    assert (ds / evol.COMPARISON_FILE).is_file()


def test_missing_test_folders_are_clear(tmp_path):
    with pytest.raises(SeglabError, match="imagesTs: missing"):
        evol.compare_methods(tmp_path)
    (tmp_path / "imagesTs").mkdir()
    vdata.write_volume(tmp_path / "imagesTs" / "a_0000.tiff", np.zeros((4, 16, 16), np.float32))
    with pytest.raises(SeglabError, match="instancesTs: missing"):
        evol.compare_methods(tmp_path)


def test_cli_test_3d_evaluates_only(tmp_path):
    ds = _dataset_with_predictions(tmp_path)
    r = subprocess.run([sys.executable, "-m", "seglab", "test-3d", "--dataset", str(ds), "--quiet",
                        "--thresholds", "0.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (ds / "evaluation_comparison.png").is_file() and "nnunet" in r.stdout


# --------------------------------------------------------------------------- prediction with the tiny model


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    ds = tmp_path_factory.mktemp("vol") / "Dataset004_Small"
    simulate3d.simulate_dataset(ds, n_train=0, n_test=2, shape_um=(12, 32, 32), anisotropy=2.0, seed=1)
    return ds


def test_predict_folder_names_resume_and_failures(small_dataset, one_thread):
    from seglab.config.settings import MaskSettings

    ds = small_dataset
    # one broken volume (2D) beside the good ones: reported, nothing written for it, the others done
    tifffile.imwrite(ds / "imagesTs" / "flat_0000.tif", np.zeros((32, 32), np.float32))
    mask = MaskSettings(diameter_px=14.0)
    res = svol.predict_folder("generalist", ds / "imagesTs", settings=svol.VolumeSettings(bsize=32), mask=mask,
                              progress=False, log=None)
    cases = ["Nuclei3D_test_000", "Nuclei3D_test_001"]
    assert res.out == ds / "imagesTs_orthoplane" and sorted(res.predicted) == cases
    assert list(res.failed) == ["flat"] and "2D image" in res.failed["flat"]
    names = sorted(p.name for p in res.out.glob("*.tiff"))
    assert names == sorted(f"{c}{s}.tiff" for c in cases for s in ("", "_xy", "_xz", "_yz"))
    assert not list(res.out.glob("flat*"))
    assert "flat" in json.loads((res.out / svol.FAILURES_FILE).read_text())
    lab = vdata.read_labels(res.out / f"{cases[0]}.tiff")
    assert lab.shape == (6, 32, 32)
    again = svol.predict_folder("generalist", ds / "imagesTs", settings=svol.VolumeSettings(bsize=32), mask=mask,
                                progress=False, log=None)
    assert sorted(again.skipped) == cases and not again.predicted
    with pytest.raises(SeglabError, match="other settings"):
        svol.predict_folder("generalist", ds / "imagesTs", settings=svol.VolumeSettings(bsize=32),
                            mask=MaskSettings(diameter_px=10.0), progress=False, log=None)
    (ds / "imagesTs" / "flat_0000.tif").unlink()
    for name in ("cellpose3d", "stitch"):   # xy runs orthoplane's code on one axis
        r = svol.predict_folder("generalist", ds / "imagesTs", settings=svol.settings_for(name, bsize=32), mask=mask,
                                progress=False, log=None)
        assert sorted(p.name for p in r.out.glob("*.tiff")) == [f"{c}.tiff" for c in cases]
        assert r.out.name == f"imagesTs_{name}"


def test_slurm_plan_one_task_per_volume_and_done_volumes_skipped(tmp_path, repo_root):
    from seglab.slurm.cluster import load_cluster
    from seglab.slurm.plan import plan_predict_3d

    images = tmp_path / "imagesTs"
    for c in ("a", "b", "c"):
        vdata.write_volume(images / f"{c}_0000.tif", np.zeros((4, 16, 16), np.float32))
    out = tmp_path / "imagesTs_xy"
    cluster = load_cluster(repo_root / "slurm" / "cluster.yaml")
    plan = plan_predict_3d("generalist", str(images), str(out), cluster, extra_args=["--method", "xy"])
    (job,) = plan.jobs
    assert [t["args"] for t in job.tasks] == [["--case", "a"], ["--case", "b"], ["--case", "c"]]
    assert job.task_ids == [0, 1, 2] and job.command[:2] == ["seglab", "predict-3d"] and "xy" in job.command
    vdata.write_volume(out / "b.tiff", np.zeros((4, 16, 16), np.uint16))
    assert plan_predict_3d("generalist", str(images), str(out), cluster).jobs[0].task_ids == [0, 2]
    for c in ("a", "c"):
        vdata.write_volume(out / f"{c}.tiff", np.zeros((4, 16, 16), np.uint16))
    assert not plan_predict_3d("generalist", str(images), str(out), cluster).jobs


def test_cli_train_3d_then_test_after_training(tmp_path):
    ds = tmp_path / "Dataset005_T"
    simulate3d.simulate_dataset(ds, n_train=1, n_test=1, shape_um=(12, 32, 32), anisotropy=2.0, seed=2)
    r = subprocess.run([sys.executable, "-m", "seglab", "train-3d", "--dataset", str(ds), "--out", str(tmp_path / "run"),
                        "--epochs", "1", "--train-bsize", "32", "--nimg-per-epoch", "2", "--batch-size", "2",
                        "--min-train-masks", "1", "--threads", "1", "--quiet", "--test-after-training",
                        "--methods", "xy", "stitch", "--bsize", "32", "--diameter", "14", "--thresholds", "0.5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "model.pt").is_file()
    meta = json.loads((tmp_path / "run" / "model.pt.json").read_text())
    assert meta["variant"] == "3d_slices" and meta["anisotropies"] == [2.0]
    table = __import__("pandas").read_csv(ds / evol.COMPARISON_FILE)
    assert sorted(table["method"]) == ["stitch", "xy"] and (table["n_failed"] == 0).all()
    with pytest.raises(SeglabError, match="--anisotropy: 0 must be > 0"):
        svol.predict_folder("generalist", ds / "imagesTs", anisotropy=0)
    assert not (ds / "imagesTs_orthoplane").exists()


def test_stack_agreement_counts_what_two_stacks_agree_on(tmp_path):
    from seglab.experiments import e7_3d as e7

    ds = tmp_path / "Dataset006_A"
    t = _planted()
    vdata.write_case(ds, "test", "c", t.astype(np.float32), t.astype(np.uint16))
    miss1, miss12 = t.copy(), t.copy()
    miss1[t == 1] = 0
    miss12[(t == 1) | (t == 2)] = 0
    out = ds / "imagesTs_orthoplane"
    for ax, lab in (("xy", t), ("xz", miss1), ("yz", miss12)):
        vdata.write_volume(out / f"c_{ax}.tiff", lab.astype(np.uint16))
    vdata.write_volume(out / "c.tiff", svol.consensus([t, miss1, miss12]))
    row = e7.stack_agreement({1.0: ds}).iloc[0].to_dict()
    assert row == {"anisotropy": 1.0, "n_true": 4, "tp_xy": 4, "tp_xz": 3, "tp_yz": 2, "found_by_at_least_1": 4,
                   "found_by_at_least_2": 3, "tp_consensus": 3}


def test_downsampled_prediction_comes_back_on_the_full_grid(one_thread):
    from seglab.config.settings import MaskSettings
    from seglab.segment import models

    image, _ = simulate3d.simulate_volume((8, 32, 32), 1.0, seed=4)
    model = models.load("generalist")
    for name in ("xy", "stitch"):
        res = svol.segment_volume(model, image, 1.0, svol.settings_for(name, downsample=2, bsize=32),
                                  MaskSettings(diameter_px=14.0))
        assert res.labels.shape == image.shape and res.labels.dtype == np.uint16
    with pytest.raises(SeglabError, match="3D methods need a network model"):
        svol.segment_volume(models.load("classical"), image, 1.0)
