"""seglab.active.campaign and `seglab active`: rounds on disk, resume, export, ingest checks, bad input.

Real fine-tunes of the committed generalist on a few simulated 64 px tiles (2 epochs of 4 crops).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from seglab import SeglabError
from seglab.active import campaign as cmp
from seglab.core import io

PARAMS = {"batch_size": 2, "max_rounds": 3, "weights": {"entropy": 1.0, "coreset": 0.5}, "seed": 0,
          "mask": {"diameter_px": 13.6},
          "training": {"epochs": 2, "bsize": 64, "batch_size": 4, "nimg_per_epoch": 4, "min_train_masks": 1,
                       "learning_rate": 0.002, "checkpoint_every": 1}}


@pytest.fixture(scope="module")
def tiles():
    import torch

    from seglab.data import simulate

    torch.set_num_threads(1)
    P = simulate.SimParams(density_per_mpx=2000)
    out = {}
    for i in range(8):
        t = simulate.render_tile(np.random.default_rng(i), simulate.MARKERS[i % 5], 0.3, 64, P)
        out[f"t{i}"] = (np.stack([t["dapi"], t["marker"]]).astype(np.float32), t["labels"])
    return out


def _init(root, tiles, params=PARAMS):
    pool = {k: tiles[k][0] for k in ("t0", "t1", "t2", "t3", "t4", "t5")}
    return cmp.init(root, pool, {k: tiles[k][1] for k in ("t0", "t1")}, {k: tiles[k][0] for k in ("t6", "t7")},
                    {k: tiles[k][1] for k in ("t6", "t7")}, params)


@pytest.fixture(scope="module")
def selected(tiles, tmp_path_factory):
    """A campaign with round 0 trained and round 1 selected (not ingested)."""
    c = _init(tmp_path_factory.mktemp("camp") / "c", tiles)
    cmp.train(c)
    cmp.select(c)
    return c


def test_a_round_stopped_mid_way_and_resumed_gives_the_same_state(tiles, tmp_path, selected):
    c = _init(tmp_path / "c", tiles)
    assert cmp.train(c, stop_after_epochs=1) is None           # killed after its first chunk
    assert c.stage(0) == "labelled" and (c.round_dir(0) / "train" / "checkpoint" / "state.pt").is_file()
    assert cmp.status(c)["next"] == "train"
    rec = cmp.train(c)                                          # resumes at epoch 1
    ref = selected.record(0)                                    # the same round trained in one go
    assert rec["final_sha256"] == ref["final_sha256"]
    assert rec["val_ap50"] == ref["val_ap50"] and rec["n_labelled"] == 2
    # a selection killed before its set was complete is redone: the same batch, the same scores
    first = cmp.select(c)
    io.set_marker(c.round_dir(1) / "selection", cmp.SELECTION_SET).unlink()
    assert c.stage(1) == "started"
    again = cmp.select(c)
    assert again["selected"] == first["selected"] == selected.selection(1)["selected"]
    assert again["picks"] == first["picks"]


def test_the_batch_is_exported_for_correction_with_every_score(selected):
    import tifffile

    sel = selected.selection(1)
    folder = selected.round_dir(1) / "selection"
    assert len(sel["selected"]) == 2 and set(sel["selected"]) <= {"t2", "t3", "t4", "t5"}
    assert {r["tile_id"] for r in sel["scores"]} == {"t2", "t3", "t4", "t5"}
    assert {"entropy", "n_pred"} <= set(sel["scores"][0]) and {"w_entropy", "w_coreset", "combined"} <= set(sel["picks"][0])
    for t in sel["selected"]:
        pred = tifffile.imread(folder / f"{t}_pred.tif")
        assert pred.dtype == np.uint16 and pred.shape == (64, 64)
        assert tifffile.imread(folder / f"{t}_image.tif").shape == (2, 64, 64)
        assert (folder / f"{t}_overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert io.set_complete(folder, cmp.SELECTION_SET)


@pytest.mark.parametrize("bad, message", [
    ("shape", r"mask shape \(32, 64\) differs from the tile's \(64, 64\)"),
    ("float", r"dtype float32, not integer labels; save the label image as 16- or 32-bit"),
    ("negative", r"negative ids \(min -3\)"),
    ("not_selected", r"was not selected in round 1"),
    ("missing", r"no corrected mask for selected tiles"),
])
def test_ingest_refuses_each_bad_mask_and_writes_nothing(selected, tiles, tmp_path, bad, message):
    import tifffile

    sel = selected.selection(1)["selected"]
    masks = {t: tiles[t][1].astype(np.int32) for t in sel}
    first = sel[0]
    if bad == "shape":
        masks[first] = masks[first][:32]
    elif bad == "float":
        masks[first] = masks[first].astype(np.float32)
    elif bad == "negative":
        masks[first][0, 0] = -3
    elif bad == "not_selected":
        masks[next(t for t in ("t2", "t3", "t4", "t5") if t not in sel)] = tiles["t2"][1]
    else:
        del masks[first]
    folder = tmp_path / "corrected"
    folder.mkdir()
    for t, m in masks.items():
        tifffile.imwrite(folder / f"{t}.tif", m)
    with pytest.raises(SeglabError, match=message) as err:
        cmp.ingest(selected, cmp.corrected_files(folder))
    if bad not in ("missing",):
        assert str(folder) in str(err.value)        # names the file
    assert selected.stage(1) == "selected" and not (selected.round_dir(1) / "labels").exists()


def test_full_round_through_the_command_line(selected, tiles, tmp_path, capsys):
    import tifffile

    from seglab.cli import main

    c = cmp.open_campaign(shutil.copytree(selected.root, tmp_path / "c"))
    folder = tmp_path / "corrected"
    folder.mkdir()
    for t in c.selection(1)["selected"]:
        tifffile.imwrite(folder / f"{t}_pred.tif", tiles[t][1])     # the exported file, corrected in place
    assert main(["active", "ingest", str(c.root), "--from", str(folder)]) == 0
    assert main(["active", "ingest", str(c.root), "--from", str(folder)]) == 1     # already ingested
    assert "round 1 is labelled" in capsys.readouterr().err
    assert main(["active", "train", str(c.root), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["active", "status", str(c.root), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in shown["history"]] == [0, 1]
    st = cmp.status(c)
    hist = st["history"]
    assert list(hist["round"]) == [0, 1] and list(hist["n_labelled"]) == [2, 4]
    assert hist["selected"].iloc[1] == ";".join(c.selection(1)["selected"])
    assert (c.root / cmp.HISTORY).is_file()
    rec = c.record(1)
    assert rec["best_round"] in (0, 1) and rec["base"].endswith("round_000/train/model.pt")
    # stop rule: a drop in validation AP over patience 1 stops, otherwise the next step is select
    assert (st["stop"] is not None) == (rec["improvement"] < 0.01)


def test_stop_rule():
    assert cmp.stop_reason([0.5], 3, 0.01, 1) is None
    assert cmp.stop_reason([0.5, 0.6], 3, 0.01, 1) is None
    assert "min_improvement" in cmp.stop_reason([0.5, 0.6, 0.605], 3, 0.01, 1)
    assert cmp.stop_reason([0.5, 0.6, 0.605], 3, 0.01, 2) is None      # patience 2: one small gain is not enough
    assert "min_improvement" in cmp.stop_reason([0.5, 0.6, 0.605, 0.59], 5, 0.01, 2)
    assert "max_rounds" in cmp.stop_reason([0.5, 0.6, 0.7, 0.8], 3, 0.01, 1)


def test_bad_campaigns_are_refused_with_the_file_and_the_fix(selected, tiles, tmp_path):
    with pytest.raises(SeglabError, match="every weight is 0"):
        _init(tmp_path / "w", tiles, {**PARAMS, "weights": {"entropy": 0.0, "coreset": 0}})
    with pytest.raises(SeglabError, match="a campaign is already here"):
        _init(selected.root, tiles)
    # a batch larger than the unlabelled pool
    c = cmp.open_campaign(shutil.copytree(selected.root, tmp_path / "big"))
    shutil.rmtree(c.round_dir(1))
    c.config["batch_size"] = 9
    with pytest.raises(SeglabError, match=r"batch_size=9 is larger than the unlabelled pool \(4 tiles\)"):
        cmp.select(c)
    # a round folder edited by hand: round 0's checkpoint deleted
    c.config["batch_size"] = 2
    (c.round_dir(0) / "train" / "model.pt").unlink()
    with pytest.raises(SeglabError, match=r"round_000/train/model.pt: round 0's checkpoint is missing.*seglab active train"):
        cmp.select(c)
    with pytest.raises(SeglabError, match="no campaign here"):
        cmp.open_campaign(tmp_path / "nothing")
