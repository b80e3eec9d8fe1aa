"""seglab.segment.train: a tiny net fine-tunes on simulated tiles; kill-and-resume gives the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seglab.config.settings import MaskSettings, TrainSettings
from seglab import SeglabError
from seglab.segment import models
from seglab.segment import train

SMALL = dict(bsize=64, batch_size=4, nimg_per_epoch=8, learning_rate=0.02, weight_decay=1e-4,
             min_train_masks=1, scale_range=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def tiles(cohort):
    from seglab.data import manifest as data

    m = data.cohort_manifest(cohort)
    rows = m[m.annotated & (m.split == "train")]
    return [data.load_tile(r) for _, r in rows.iterrows()], [data.load_mask(r) for _, r in rows.iterrows()], \
        list(rows.tile_id)


def _final_weights(run_dir):
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule_matches_cellpose():
    lr = train.lr_schedule(0.1, 12)
    assert lr[0] == 0 and np.isclose(lr[9], 0.1) and np.allclose(lr[10:], 0.1)
    long = train.lr_schedule(0.1, 120)
    assert len(long) == 120 and np.isclose(long[-1], 0.1 / 2 ** 10)


def test_fit_tiny_loss_falls_and_checkpoint_loads(tiles, tmp_path):
    xs, ys, ids = tiles
    model = models.load("tiny-xs", gpu=False, seed=1)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    p = train.fit(model, xs, ys, ids=ids, params=TrainSettings(epochs=6, checkpoint_every=3, **SMALL),
                  run_dir=tmp_path / "run", progress=False)
    losses = np.loadtxt(tmp_path / "run" / "losses.tsv", skiprows=1, usecols=(0, 1, 2))
    assert losses.shape == (6, 3)
    assert losses[-1, 2] < losses[0, 2]  # epoch 0 runs at lr 0 (warm-up): the reference
    assert not _same(before, model.net.state_dict())
    meta = models.read_sidecar(p)
    assert meta["train_tiles"] == ids and meta["base_spec"] == "tiny-xs" and len(meta["losses"]["train"]) == 6
    again = models.load(p, gpu=False)
    assert _same({k: v for k, v in again.net.state_dict().items()}, model.net.state_dict())
    mask = again.segment(xs[0], MaskSettings(diameter_px="native"))
    assert mask.shape == xs[0].shape[1:] and mask.dtype == np.uint16


def test_kill_and_resume_gives_identical_weights(tiles, tmp_path, monkeypatch):
    xs, ys, ids = tiles
    params = TrainSettings(epochs=4, checkpoint_every=2, seed=3, **SMALL)
    full = models.load("tiny-xs", gpu=False, seed=0)
    train.fit(full, xs, ys, ids=ids, params=params, run_dir=tmp_path / "a", progress=False)
    want = _final_weights(tmp_path / "a")
    assert not (tmp_path / "a" / "checkpoint" / "state.pt").exists()  # model.pt supersedes the resume state

    # the same run, killed in the middle of its second chunk (after the epoch-2 checkpoint)
    from cellpose import train as cp_train

    calls = {"n": 0}
    real = cp_train._loss_fn_seg

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 3:  # 2 steps per epoch; die in epoch 3
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(cp_train, "_loss_fn_seg", dying)
    with pytest.raises(KeyboardInterrupt):
        train.fit(models.load("tiny-xs", gpu=False, seed=0), xs, ys, ids=ids, params=params,
                  run_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(cp_train, "_loss_fn_seg", real)
    state = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and not (tmp_path / "b" / "model.pt").exists()
    # resume in a fresh model object (as a new process would)
    train.fit(models.load("tiny-xs", gpu=False, seed=0), xs, ys, ids=ids, params=params,
              run_dir=tmp_path / "b", progress=False)
    got = _final_weights(tmp_path / "b")
    assert _same(want, got)
    a = np.loadtxt(tmp_path / "a" / "losses.tsv", skiprows=1, usecols=2)
    b = np.loadtxt(tmp_path / "b" / "losses.tsv", skiprows=1, usecols=2)
    assert np.array_equal(a, b)
    # a different seed gives different weights: the equality above is not vacuous
    train.fit(models.load("tiny-xs", gpu=False, seed=0), xs, ys, ids=ids,
              params=TrainSettings(epochs=4, checkpoint_every=2, seed=4, **SMALL),
              run_dir=tmp_path / "c", progress=False)
    assert not _same(want, _final_weights(tmp_path / "c"))


def test_min_train_masks_warns_with_names(tiles, tmp_path, capsys):
    xs, ys, ids = tiles
    empty = np.zeros_like(ys[0])
    with pytest.warns(UserWarning, match="EMPTY_TILE"):
        train.fit(models.load("tiny-xs", gpu=False), [xs[0], xs[1]], [empty, ys[1]], ids=["EMPTY_TILE", ids[1]],
                  params=TrainSettings(epochs=1, **SMALL), run_dir=tmp_path / "r", progress=False)
    assert "DROPPED" in capsys.readouterr().err
    assert models.read_sidecar(tmp_path / "r" / "model.pt")["dropped_tiles"] == ["EMPTY_TILE"]
    with pytest.raises(SeglabError, match="min_train_masks"):
        train.fit(models.load("tiny-xs", gpu=False), [xs[0]], [empty], params=TrainSettings(epochs=1, **SMALL),
                  run_dir=tmp_path / "r2", progress=False)


def test_bad_params_fail_before_anything_is_written(cohort, tmp_path):
    base = {"model": "tiny-xs", "cohort_dir": str(cohort), "out_dir": str(tmp_path / "out")}
    for extra, match in [({"epochs": -1}, "epochs=-1"), ({"variant": "label_budget", "budget": 999}, "budget=999"),
                         ({"epochz": 3}, "did you mean 'epochs'"), ({"variant": "nope"}, "variant"),
                         ({"variant": "marker_specific"}, "markers"),
                         ({"variant": "marker_specific", "markers": ["xyz"]}, "xyz")]:
        with pytest.raises(SeglabError, match=match):
            train.train_from_params({**base, **extra}, source="p.yaml", progress=False)
        assert not (tmp_path / "out").exists()
    with pytest.raises(SeglabError, match="spec 'nonsense'"):
        train.train_from_params({**base, "model": "nonsense", "epochs": 1}, progress=False)


def test_variants_select_tiles(cohort):
    from seglab.data import manifest as data

    m = data.cohort_manifest(cohort)
    n_train = int((m.annotated & (m.split == "train")).sum())
    assert len(train.select_training_tiles(m, {"variant": "generic"})) == n_train
    spec = train.select_training_tiles(m, {"variant": "marker_specific", "markers": ["gfap"]})
    assert set(spec.marker) == {"gfap"}
    lomo = train.select_training_tiles(m, {"variant": "leave_one_marker_out", "markers": ["gfap"]})
    assert "gfap" not in set(lomo.marker) and len(lomo) == n_train - len(spec)
    b1 = train.select_training_tiles(m, {"variant": "label_budget", "budget": 2, "budget_seed": 0})
    b2 = train.select_training_tiles(m, {"variant": "label_budget", "budget": 2, "budget_seed": 0})
    assert len(b1) == 2 and list(b1.tile_id) == list(b2.tile_id)
    others = {tuple(train.select_training_tiles(m, {"variant": "label_budget", "budget": 2, "budget_seed": s}).tile_id)
              for s in range(6)}
    assert len(others) > 1


def test_train_from_params_marker_only(cohort, tmp_path, monkeypatch):
    seen = {}
    real_fit = train.fit

    def spy(model, images, labels, **kw):
        seen["images"] = images
        return real_fit(model, images, labels, **kw)

    monkeypatch.setattr(train, "fit", spy)
    p = train.train_from_params({"model": "tiny-xs", "cohort_dir": str(cohort), "out_dir": str(tmp_path / "mo"),
                                 "variant": "marker_only", "epochs": 1, "bsize": 64, "batch_size": 4,
                                 "nimg_per_epoch": 4, "min_train_masks": 1}, progress=False)
    assert all(float(np.abs(x[0]).max()) == 0 and float(np.abs(x[1]).max()) > 0 for x in seen["images"])
    assert models.read_sidecar(p)["variant"] == "marker_only"


def test_cli_train_params_file(cohort, tmp_path, capsys):
    from seglab import cli

    f = tmp_path / "ft.yaml"
    f.write_text(f"model: tiny-xs\ncohort_dir: {cohort}\nout_dir: {tmp_path / 'run'}\nvariant: leave_one_marker_out\n"
                 "markers: [pecam]\nepochs: 2\nbsize: 64\nbatch_size: 4\nnimg_per_epoch: 4\nmin_train_masks: 1\n")
    assert cli.main(["train", "--params", str(f), "--quiet"]) == 0
    meta = models.read_sidecar(tmp_path / "run" / "model.pt")
    assert meta["variant"] == "leave_one_marker_out" and not any("pecam" in t for t in meta["train_tiles"])
    assert 0 <= meta["metrics"]["val_ap50_mean"] <= 1 and meta["metrics"]["val_n_images"] > 0
    # rerunning the finished run resumes from its last checkpoint: nothing is retrained
    assert cli.main(["train", "--params", str(f), "--quiet"]) == 0
    f.write_text(f.read_text().replace("epochs: 2", "epochs: -3"))
    assert cli.main(["train", "--params", str(f), "--out", str(tmp_path / "run2")]) == 1
    err = capsys.readouterr().err
    assert str(f) in err and "epochs=-3" in err and not (tmp_path / "run2").exists()


def test_resume_refuses_a_run_with_other_params(tiles, tmp_path):
    xs, ys, ids = tiles
    p = TrainSettings(epochs=2, checkpoint_every=1, **SMALL)
    train.fit(models.load("tiny-xs", gpu=False), xs, ys, params=p, run_dir=tmp_path, progress=False, stop_after_epochs=1)
    other = TrainSettings(epochs=2, checkpoint_every=1, **{**SMALL, "learning_rate": 0.5})
    with pytest.raises(SeglabError, match="different training run"):
        train.fit(models.load("tiny-xs", gpu=False), xs, ys, params=other, run_dir=tmp_path, progress=False)


def test_pretrain_generalist_writes_weights_sidecar_and_held_out_metrics(dsb_dir, tmp_path):
    """The recipe of the committed generalist, shrunk (4 training images, 2 test images per group, 1 epoch)."""
    recipe = train.GeneralistRecipe(epochs=1, nimg_per_epoch=4, batch_size=2, bsize=64, checkpoint_every=1,
                                    max_train_images=4, max_test_images=2)
    out = tmp_path / "generalist.pt"
    metrics = train.pretrain_generalist(recipe, run_dir=tmp_path / "run", out_path=out, dsb_root=dsb_dir,
                                        progress=False)
    assert set(metrics) == {"split", "train_seconds", "torch_threads", "groups", "test", "headline"}
    assert metrics["split"]["n_train"] == 4 and metrics["split"]["n_test"] == 2 * len(recipe.test_groups)
    assert set(metrics["groups"]) == set(recipe.test_groups)
    assert all(0 <= v <= 1 for v in metrics["headline"].values())
    side = models.read_sidecar(out)
    assert side["metrics"] == metrics["headline"] and side["input_channels"] == [0]
    assert models.load_checkpoint(out).arch == "tiny_unet"
