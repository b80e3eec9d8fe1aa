"""seglab.segment.predict: batched, deterministic, resumable, sharded inference; threshold sweeps from saved outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from seglab.config.settings import MaskSettings
from seglab import SeglabError
from seglab.segment import models
from seglab.segment import predict
from seglab.segment import dynamics


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def generalist():
    if not models.GENERALIST_PATH.is_file():
        pytest.fail(f"{models.GENERALIST_PATH} is missing: run `seglab pretrain-generalist`")
    return models.load("generalist", gpu=False)


def test_list_tiles_pairs_channels_and_shards_partition(cohort):
    ids = predict.list_tiles(cohort)  # the cohort folder or its tiles/ folder
    assert ids == predict.list_tiles(cohort / "tiles") == sorted(ids) and len(ids) == 15
    assert all(not i.endswith(("_c0", "_c1")) for i in ids)
    shards = [predict.shard_slice(ids, f"{i}/4") for i in range(4)]
    assert sorted(sum(shards, [])) == ids and sum(len(s) for s in shards) == len(ids)
    assert shards[1] == ids[1::4]
    for bad in ("4/4", "1-4", "0/0"):
        with pytest.raises(SeglabError, match="--shard"):
            predict.parse_shard(bad)


def test_predict_twice_identical_and_resumes(cohort, tmp_path, generalist):
    # shard 0/3 (5 tiles) keeps the test short; the shard is part of what is compared
    a = predict.predict(generalist, cohort, tmp_path / "a", shard="0/3", batch_tiles=4, progress=False, mask=MaskSettings(diameter_px=13))
    predict.predict(generalist, cohort, tmp_path / "b", shard="0/3", batch_tiles=3, progress=False, mask=MaskSettings(diameter_px=13))
    assert len(a) == 5 and (a["status"] == "done").all()
    assert a["n_cells"].sum() > 10  # the generalist finds nuclei: the comparisons below are not vacuous
    for t in a["tile"]:
        ma, mb = tifffile.imread(tmp_path / "a" / f"{t}.tif"), tifffile.imread(tmp_path / "b" / f"{t}.tif")
        assert ma.dtype == np.uint16 and np.array_equal(ma, mb)
    # resume: one mask lost, one half-written; the others are skipped
    tiles = list(a["tile"])
    (tmp_path / "a" / f"{tiles[0]}.tif").unlink()
    p = tmp_path / "a" / f"{tiles[1]}.tif"
    p.write_bytes(p.read_bytes()[:100])
    seen = []
    real_write = predict.write_mask
    predict.write_mask = lambda path, mask: (seen.append(path.stem), real_write(path, mask))[1]
    try:
        c = predict.predict(generalist, cohort, tmp_path / "a", shard="0/3", progress=False, mask=MaskSettings(diameter_px=13))
    finally:
        predict.write_mask = real_write
    assert sorted(seen) == sorted(tiles[:2])  # only the lost and the half-written masks are redone
    assert len(c) == 5 and (c["status"] == "done").all()
    for t in tiles[:2]:
        assert np.array_equal(tifffile.imread(tmp_path / "a" / f"{t}.tif"), tifffile.imread(tmp_path / "b" / f"{t}.tif"))
    table = pd.read_csv(tmp_path / "a" / "tiles_shard-0-of-3.tsv", sep="\t")
    assert list(table.columns[:4]) == ["tile", "shard", "n_cells", "seconds"] and len(table) == 5


def test_shards_write_disjoint_tables(cohort, tmp_path):
    m = models.load("tiny-xs", gpu=False)
    for i in range(3):
        predict.predict(m, cohort, tmp_path, shard=f"{i}/3", progress=False, mask=MaskSettings(diameter_px="native"))
    tabs = [pd.read_csv(tmp_path / f"tiles_shard-{i}-of-3.tsv", sep="\t") for i in range(3)]
    got = sum((list(t.tile) for t in tabs), [])
    assert sorted(got) == predict.list_tiles(cohort) and len(set(got)) == len(got)
    from seglab.segment import shards

    assert shards.check_shards(predict.list_tiles(cohort), shards.read_shard_tables(tmp_path, 3)).ok


def test_threshold_sweep_from_saved_outputs_equals_eval(cohort, tmp_path, generalist):
    predict.predict(generalist, cohort, tmp_path, shard="0/5", save_network_outputs=True, progress=False,
                    mask=MaskSettings(diameter_px=13))
    tile = predict.discover_tiles(cohort)[0]
    x = tile.load()
    outs = dynamics.load_outputs(tmp_path / "outputs" / f"{tile.tile_id}.npz")
    n_found = 0
    for ft, ct, ms in [(0.4, 0.0, 15), (0.0, -1.0, 5), (0.8, 1.0, 30), (0.2, 0.5, 15)]:
        want = generalist.segment(x, MaskSettings(diameter_px=13, flow_threshold=ft, cellprob_threshold=ct, min_size=ms))
        got = dynamics.masks_from_outputs(outs, MaskSettings(flow_threshold=ft, cellprob_threshold=ct, min_size=ms))
        assert np.array_equal(want, got)
        n_found += int(want.max())
    assert n_found > 0
    with pytest.raises(SeglabError, match="lack"):
        dynamics.masks_from_outputs({"dP": outs["dP"]})


def test_bad_tiles_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeglabError, match="no .tif"):
        predict.predict("classical", tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "five").mkdir()
    tifffile.imwrite(tmp_path / "five" / "t1.tif", np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(SeglabError, match="t1.tif.*C <= 3"):
        predict.predict("classical", tmp_path / "five", tmp_path / "out5", progress=False)
    assert not list((tmp_path / "out5").glob("*.tif"))


def test_single_file_tiles_and_cli(tmp_path, capsys):
    from seglab import cli

    (tmp_path / "tiles").mkdir()
    yy, xx = np.mgrid[:64, :64]
    img = (((yy - 20) ** 2 + (xx - 20) ** 2 < 64) | ((yy - 44) ** 2 + (xx - 44) ** 2 < 64)).astype(np.uint8) * 200
    tifffile.imwrite(tmp_path / "tiles" / "a.tif", img)
    tifffile.imwrite(tmp_path / "tiles" / "b.tif", np.stack([img, img]))
    rc = cli.main(["predict", "--model", "classical", "--tiles", str(tmp_path / "tiles"), "--out",
                   str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    assert tifffile.imread(tmp_path / "out" / "a.tif").max() == 2
    rc = cli.main(["predict", "--model", "nonsense", "--tiles", str(tmp_path / "tiles"), "--out", str(tmp_path / "o2")])
    assert rc != 0 and "names no known model" in capsys.readouterr().err
    rc = cli.main(["predict", "--model", "classical", "--tiles", str(tmp_path / "tiles"), "--out", str(tmp_path / "o3"),
                   "--shard", "3/2"])
    assert rc != 0
