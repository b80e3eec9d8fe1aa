"""seglab predict's pipeline (issue 14): the network of batch k+1 runs while a background thread makes
and writes the masks of batch k. The masks are eval's, bit for bit; an error or Ctrl-C in either
stage stops the run with no half-written mask and no thread left behind; a rerun does every tile once."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from seglab import SeglabError, cli
from seglab.config.settings import MaskSettings
from seglab.segment import dynamics, models, predict

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = MaskSettings(diameter_px=13)   # the cohort's nuclei: the generalist finds them at this diameter
BATCH = 4                                 # 15 tiles -> 4 batches: the pipeline has batches to overlap
THREAD = "seglab-predict-masks"


@pytest.fixture(scope="module")
def generalist():
    if not models.GENERALIST_PATH.is_file():
        pytest.fail(f"{models.GENERALIST_PATH} is missing: run `seglab pretrain-generalist`")
    return models.load("generalist", gpu=False)


@pytest.fixture(scope="module")
def sequential(cohort, generalist, tmp_path_factory) -> Path:
    """Today's loop (eval makes the masks, one batch after the other): the reference."""
    out = tmp_path_factory.mktemp("sequential")
    df = predict.predict(generalist, cohort, out, SETTINGS, batch_tiles=BATCH, save_network_outputs=True,
                         progress=False, pipeline=False)
    assert len(df) == 15 and (df["status"] == "done").all() and df["n_cells"].sum() > 30  # not vacuous
    return out


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: tifffile.imread(p) for p in sorted(folder.glob("*.tif"))}


def _no_mask_thread() -> bool:
    return not [t for t in threading.enumerate() if t.name == THREAD]


def _spy_writes(monkeypatch) -> list[str]:
    """The tiles whose masks predict writes, in order."""
    written, real = [], predict.write_mask
    monkeypatch.setattr(predict, "write_mask", lambda path, m: (written.append(Path(path).stem), real(path, m))[1])
    return written


def test_pipelined_masks_and_outputs_equal_the_sequential_loops(cohort, generalist, sequential, tmp_path):
    out = tmp_path / "pipelined"
    df = predict.predict(generalist, cohort, out, SETTINGS, batch_tiles=BATCH, save_network_outputs=True,
                         progress=False)
    want, got = _masks(sequential), _masks(out)
    assert sorted(got) == sorted(want) and len(got) == 15
    for tid in want:
        assert got[tid].dtype == want[tid].dtype and np.array_equal(got[tid], want[tid]), tid
        a = dynamics.load_outputs(sequential / "outputs" / f"{tid}.npz")
        b = dynamics.load_outputs(out / "outputs" / f"{tid}.npz")
        assert a["niter"] == b["niter"] and np.array_equal(a["dP"], b["dP"]) and np.array_equal(a["cellprob"],
                                                                                              b["cellprob"])
    ref = pd.read_csv(sequential / "tiles_shard-0-of-1.tsv", sep="\t")
    assert list(df["n_cells"]) == list(ref["n_cells"]) and list(df["tile"]) == list(ref["tile"])
    assert _no_mask_thread()


def test_pipeline_equals_eval_at_other_thresholds_and_niter(cohort, generalist, tmp_path):
    tune = SETTINGS.replace(flow_threshold=0.8, cellprob_threshold=-1.0, min_size=5, niter=60)
    a = predict.predict(generalist, cohort, tmp_path / "a", tune, shard="0/3", batch_tiles=2, progress=False)
    predict.predict(generalist, cohort, tmp_path / "b", tune, shard="0/3", batch_tiles=2, progress=False,
                    pipeline=False)
    assert a["n_cells"].sum() > 10
    want, got = _masks(tmp_path / "b"), _masks(tmp_path / "a")
    assert sorted(got) == sorted(want) and all(np.array_equal(got[t], want[t]) for t in want)


def test_an_error_in_the_masks_of_the_third_batch_stops_predict_and_the_rerun_resumes(
        cohort, sequential, tmp_path, monkeypatch, capsys):
    out = tmp_path / "P"
    argv = ["predict", "--model", "generalist", "--cpu", "--tiles", str(cohort), "--out", str(out), "--quiet",
            "--diameter", "13", "--flow-threshold", "0.4", "--cellprob-threshold", "0", "--min-size", "15",
            "--batch-tiles", str(BATCH)]
    calls, real = [], dynamics.masks_from_outputs

    def fail_in_third_batch(outputs, mask=None, **kw):
        calls.append(1)
        if len(calls) == 2 * BATCH + 2:   # the second tile of the third batch
            raise SeglabError("mask reconstruction failed (injected)")
        return real(outputs, mask, **kw)

    monkeypatch.setattr(dynamics, "masks_from_outputs", fail_in_third_batch)
    rc = cli.main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("seglab ")]
    assert rc == 1 and err == ["seglab predict: error: mask reconstruction failed (injected)"]
    assert _no_mask_thread()
    ids = predict.list_tiles(cohort)
    done = ids[:2 * BATCH + 1]                       # two batches and the tile before the failure
    assert sorted(p.stem for p in out.glob("*.tif")) == done
    assert all(predict.mask_complete(out / f"{t}.tif") for t in done)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    table = pd.read_csv(out / "tiles_shard-0-of-1.tsv", sep="\t", dtype={"tile": str})
    assert list(table["tile"]) == done and (table["status"] == "done").all()

    monkeypatch.setattr(dynamics, "masks_from_outputs", real)
    written = _spy_writes(monkeypatch)
    assert cli.main(argv) == 0
    assert written == ids[2 * BATCH + 1:]            # every other tile once, in order; none twice
    assert predict.read_record(out)["settings"] == predict.read_record(sequential)["settings"]
    want, got = _masks(sequential), _masks(out)
    assert sorted(got) == ids and all(np.array_equal(got[t], want[t]) for t in ids)


def test_ctrl_c_during_the_network_stops_the_mask_thread_and_every_tile_is_done_once(
        cohort, generalist, sequential, tmp_path, monkeypatch):
    out = tmp_path / "P"
    written = _spy_writes(monkeypatch)
    passes, real = [], predict._segment_batch

    def interrupted(*a, **k):
        passes.append(1)
        if len(passes) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(predict, "_segment_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict.predict(generalist, cohort, out, SETTINGS, batch_tiles=BATCH, progress=False)
    assert _no_mask_thread()
    first = list(written)
    assert len(first) <= 2 * BATCH and all(predict.mask_complete(out / f"{t}.tif") for t in first)
    assert sorted(p.stem for p in out.glob("*.tif")) == sorted(first)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(predict, "_segment_batch", real)
    df = predict.predict(generalist, cohort, out, SETTINGS, batch_tiles=BATCH, progress=False)
    ids = predict.list_tiles(cohort)
    assert sorted(written) == ids and len(set(written)) == len(written)   # every tile exactly once
    assert df.attrs["n_reused"] == len(first) and df.attrs["n_segmented"] == 15 - len(first)
    want, got = _masks(sequential), _masks(out)
    assert all(np.array_equal(got[t], want[t]) for t in ids)


def _disc_tiles(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:48, :48]
    for k in range(n):
        img = ((yy - 16) ** 2 + (xx - 12 - k % 20) ** 2 < 49) | ((yy - 34) ** 2 + (xx - 34) ** 2 < 49)
        tifffile.imwrite(folder / f"t{k:02d}.tif", img.astype(np.uint8) * 200)
    return folder


@pytest.mark.parametrize("pipeline", [True, False])
def test_the_network_runs_ahead_of_the_masks_by_at_most_two_batches(tmp_path, monkeypatch, pipeline):
    tiles = _disc_tiles(tmp_path / "T", 8)
    passes, ahead, real_batch, real_write = [], [], predict._segment_batch, predict.write_mask

    def counted(*a, **k):
        passes.append(1)
        return real_batch(*a, **k)

    def slow_write(path, m):
        import time

        time.sleep(0.05)   # a slow mask stage: the network may run ahead while this waits
        ahead.append(len(passes) - (int(Path(path).stem[1:]) + 1))
        return real_write(path, m)

    monkeypatch.setattr(predict, "_segment_batch", counted)
    monkeypatch.setattr(predict, "write_mask", slow_write)
    df = predict.predict("classical", tiles, tmp_path / "P", batch_tiles=1, progress=False, pipeline=pipeline)
    assert (df["status"] == "done").all() and len(df) == 8 and _no_mask_thread()
    # batch j is written while the network has done at most j+3 batches: j+1 queued, j+2 waiting to queue
    assert max(ahead) <= 1 + predict.PIPELINE_DEPTH
    assert (max(ahead) >= 1) if pipeline else (max(ahead) == 0)


def test_mask_device_and_network_only_segment_are_checked(generalist, tmp_path, cohort):
    with pytest.raises(SeglabError, match="mask_device 'gpu0'"):
        predict.predict(generalist, cohort, tmp_path / "x", SETTINGS, mask_device="gpu0", progress=False)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SeglabError, match="no CUDA"):
            predict.predict(generalist, cohort, tmp_path / "y", SETTINGS, mask_device="cuda", progress=False)
    assert not list((tmp_path / "x").glob("*.tif")) and not list((tmp_path / "y").glob("*.tif"))
    x = predict.discover_tiles(cohort)[0].load()
    with pytest.raises(SeglabError, match="return_outputs"):
        generalist.segment(x, SETTINGS, compute_masks=False)
    m, o = generalist.segment(x, SETTINGS, return_outputs=True, compute_masks=False)
    assert m is None and o["dP"].shape == (2, *x.shape[1:])
    want = generalist.segment(x, SETTINGS)
    assert np.array_equal(dynamics.masks_from_outputs(o, SETTINGS, device=generalist.device), want)
