"""Issue 13, predict / evaluate / output writing: no stale predictions kept, any OSError is one line,
output sets complete or clearly incomplete, --keep-going, any folder of images, honest counts."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from seglab import SeglabError, cli
from seglab.config.settings import MaskSettings
from seglab.core import io
from seglab.segment import models, predict

REPO = Path(__file__).resolve().parents[1]


def _disc_image(size=64, centres=((20, 20), (44, 44))) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size), np.uint8)
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 200
    return img


def _tiles(folder: Path, names=("t0.tif", "t1.tif", "t2.tif")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        tifffile.imwrite(folder / name, _disc_image(centres=((20, 20 + k), (44, 44))))
    return folder


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _error_lines(err: str) -> list[str]:
    """The lines a user reads as the error (library warnings of other packages left out)."""
    return [ln for ln in err.splitlines() if ln.startswith("seglab ") and "error" in ln]


def _predict(tiles, out, *extra):
    return ["predict", "--model", "classical", "--tiles", str(tiles), "--out", str(out), "--quiet", *extra]


def _masks(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("t*.tif"))}


# ------------------------------------------------------------------ 1. stale predictions


def test_predict_refuses_a_folder_made_by_another_model_or_other_settings(tmp_path, capsys):
    tiles, out = _tiles(tmp_path / "T"), tmp_path / "P"
    rc, _, _ = _run(capsys, *_predict(tiles, out))
    assert rc == 0
    record = json.loads((out / predict.RECORD_FILE).read_text())
    assert record["model_id"] == "classical" and record["settings"]["min_size"] == 15
    assert record["tiles_dir"] == str(tiles.resolve()) and record["format"] == predict.RECORD_FORMAT
    table = pd.read_csv(out / "tiles_shard-0-of-1.tsv", sep="\t")
    assert list(table["model_id"]) == ["classical"] * 3
    before = _masks(out)

    rc, _, err = _run(capsys, "predict", "--model", "tiny-xs", "--tiles", str(tiles), "--out", str(out), "--quiet")
    lines = _error_lines(err)
    assert rc == 1 and len(lines) == 1, err
    tiny_id = models.model_id("tiny-xs")
    assert "classical" in lines[0] and "tiny-xs" in lines[0] and tiny_id[:12] in lines[0]
    assert "--overwrite" in lines[0] and "--out" in lines[0] and str(out) in lines[0]
    assert _masks(out) == before                                   # nothing touched

    rc, _, err = _run(capsys, *_predict(tiles, out, "--min-size", "50"))
    assert rc == 1 and "min_size=15" in err and "min_size=50" in err

    rc, _, err = _run(capsys, *_predict(tiles, out, "--min-size", "50", "--overwrite"))
    assert rc == 0, err
    table = pd.read_csv(out / "tiles_shard-0-of-1.tsv", sep="\t")
    assert len(table) == 3 and (table["status"] == "done").all()
    assert json.loads((out / predict.RECORD_FILE).read_text())["settings"]["min_size"] == 50


def test_overwrite_clears_the_other_makers_masks_of_every_shard(tmp_path, capsys):
    tiles, out = _tiles(tmp_path / "T", [f"t{k}.tif" for k in range(4)]), tmp_path / "P"
    for i in range(2):
        assert _run(capsys, *_predict(tiles, out, "--shard", f"{i}/2"))[0] == 0
    rc, _, err = _run(capsys, *_predict(tiles, out, "--shard", "0/2", "--min-size", "40", "--overwrite"))
    assert rc == 0, err
    # shard 1's masks were made with min_size 15: gone, so shard 1 cannot resume from them
    assert not (out / "tiles_shard-1-of-2.tsv").exists()
    assert sorted(p.name for p in out.glob("t*.tif")) == ["t0.tif", "t2.tif"]
    rc, out_text, _ = _run(capsys, *_predict(tiles, out, "--shard", "1/2", "--min-size", "40"))
    assert rc == 0 and "2 segmented, 0 already complete" in out_text


def _claim(out, record, barrier, results, k):
    barrier.wait()
    try:
        predict.claim_folder(Path(out), record, tile_ids=["t0"])
        results[k] = "ok"
    except SeglabError:
        results[k] = "refused"


def test_shards_claiming_one_folder_at_once_never_race(tmp_path):
    """Eight processes (as a Slurm array's shards) claim one folder at the same instant: equal
    records all pass; with two different records exactly one maker wins and the other is refused."""
    ctx = multiprocessing.get_context("fork")
    a = predict.folder_record("classical", MaskSettings(min_size=15), tmp_path)
    b = predict.folder_record("classical", MaskSettings(min_size=50), tmp_path)
    for name, records in (("same", [a] * 8), ("mixed", [a, b] * 4)):
        out = tmp_path / name
        barrier, results = ctx.Barrier(8), ctx.Manager().dict()
        procs = [ctx.Process(target=_claim, args=(out, r, barrier, results, k)) for k, r in enumerate(records)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        kept = json.loads((out / predict.RECORD_FILE).read_text())
        winners = {k for k in range(8) if records[k] == kept}
        assert {k for k, v in results.items() if v == "ok"} == winners, (name, dict(results))
        assert len(results) == 8 and (name == "mixed" or len(winners) == 8)
        assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


def test_a_killed_predict_resumes_every_tile_once_and_leaves_no_tmp(tmp_path):
    tiles, out = _tiles(tmp_path / "T", [f"t{k:02d}.tif" for k in range(40)]), tmp_path / "P"
    cmd = [sys.executable, "-m", "seglab", *_predict(tiles, out, "--batch-tiles", "1")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob("t*.tif")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # what a kill during a mask write leaves: its temporary file
    (out / ".t05.tif.k1ll3d_x.tmp").write_bytes(b"half a mask")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out / "tiles_shard-0-of-1.tsv", sep="\t", dtype={"tile": str})
    assert sorted(table["tile"]) == [f"t{k:02d}" for k in range(40)] and table["tile"].is_unique
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


# ------------------------------------------------------------------ 2. OSError on write


def _raise_enospc_in_tiff_writes(monkeypatch):
    real = tifffile.imwrite

    def full(path, *a, **k):
        Path(path).write_bytes(b"II*\0")      # a few bytes land, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tifffile, "imwrite", full)
    return real


def test_disk_full_during_predict_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    tiles, out = _tiles(tmp_path / "T"), tmp_path / "P"
    _raise_enospc_in_tiff_writes(monkeypatch)
    rc, _, err = _run(capsys, *_predict(tiles, out))
    lines = [ln for ln in err.splitlines() if ln.startswith("seglab")]
    assert rc == cli.EXIT_OSERROR == 74 and len(lines) == 1, err
    assert lines[0] == (f"seglab predict: error: {out / 't0.tif'}: No space left on device — "
                        "free space or write to another folder with --out")
    assert "Traceback" not in err and not [f for f in out.iterdir() if f.name.endswith(".tmp")]
    monkeypatch.setenv("SEGLAB_DEBUG", "1")
    with pytest.raises(OSError):
        cli.main(_predict(tiles, out))


@pytest.mark.parametrize("code, fix", [(errno.EACCES, "check permissions"), (errno.EPERM, "check permissions"),
                                       (errno.EROFS, "read-only file system: write elsewhere")])
def test_oserrors_name_the_path_and_the_fix_by_errno(tmp_path, capsys, monkeypatch, code, fix):
    true, pred = _label_folders(tmp_path)

    def refuse(self, *a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pd.DataFrame, "to_csv", refuse)
    rc, _, err = _run(capsys, "evaluate", "--true", str(true), "--pred", str(pred), "--out", str(tmp_path / "E"),
                      "--quiet")
    assert rc == 74 and _error_lines(err) == [
        f"seglab evaluate: error: {tmp_path / 'E' / 'evaluation_results.csv'}: {os.strerror(code)} — {fix}"]


def _label_folders(tmp_path: Path) -> tuple[Path, Path]:
    true, pred = tmp_path / "true", tmp_path / "pred"
    true.mkdir()
    pred.mkdir()
    for name in ("a", "b"):
        m = np.zeros((32, 32), np.uint16)
        m[4:12, 4:12], m[20:28, 20:28] = 1, 2
        tifffile.imwrite(true / f"{name}.tif", m)
        tifffile.imwrite(pred / f"{name}.tif", m)
    return true, pred


def test_evaluate_outputs_are_a_set_complete_or_clearly_incomplete(tmp_path, capsys, monkeypatch):
    true, pred = _label_folders(tmp_path)
    out = tmp_path / "E"
    args = ["evaluate", "--true", str(true), "--pred", str(pred), "--out", str(out), "--quiet"]
    assert _run(capsys, *args)[0] == 0
    names = {"evaluation_results.csv", "evaluation_summary.json", "evaluation_summary.txt"}
    assert io.set_complete(out, "evaluation") and names <= {p.name for p in out.iterdir()}
    first = {n: (out / n).read_bytes() for n in names}
    # leftovers of an interrupted run: a staging folder and an atomic write's temporary file
    (out / ".evaluation.abcd_123.tmp").mkdir()
    (out / ".evaluation.abcd_123.tmp" / "evaluation_results.csv").write_text("half")
    (out / ".evaluation_summary.txt.zz9_zz9z.tmp").write_text("half")

    real_write_text = Path.write_text

    def full_on_txt(self, *a, **k):
        if self.name == "evaluation_summary.txt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_on_txt)
    tifffile.imwrite(pred / "a.tif", np.zeros((32, 32), np.uint16))    # another result, never half-written
    rc, _, err = _run(capsys, *args)
    assert rc == 74 and "evaluation_summary.txt: No space left on device" in err
    assert {n: (out / n).read_bytes() for n in names} == first       # the earlier set, whole
    assert io.set_complete(out, "evaluation")
    assert not [f for f in out.iterdir() if f.name.startswith(".")]   # every temporary thing cleaned


def test_evaluate_refuses_to_replace_an_evaluation_of_other_inputs(tmp_path, capsys):
    true, pred = _label_folders(tmp_path)
    other = tmp_path / "pred2"
    shutil.copytree(pred, other)
    out = tmp_path / "E"
    base = ["evaluate", "--true", str(true), "--out", str(out), "--quiet"]
    assert _run(capsys, *base, "--pred", str(pred))[0] == 0
    first = (out / "evaluation_summary.json").read_bytes()
    rc, _, err = _run(capsys, *base, "--pred", str(other))
    assert rc == 1 and f"--pred {pred.resolve()}" in err and f"--pred {other.resolve()}" in err and "--overwrite" in err, err
    assert (out / "evaluation_summary.json").read_bytes() == first
    rc, _, err = _run(capsys, *base, "--pred", str(pred), "--thresholds", "0.5")   # other thresholds: another maker
    assert rc == 1 and "thresholds [0.5]" in err, err
    assert _run(capsys, *base, "--pred", str(pred))[0] == 0                       # the same inputs again: replaced
    assert _run(capsys, *base, "--pred", str(other), "--overwrite")[0] == 0
    assert str(other.resolve()) in (out / "evaluation_summary.json").read_text()


def test_write_set_marks_a_set_incomplete_when_a_member_changes(tmp_path):
    io.write_set(tmp_path, {"a.txt": lambda p: p.write_text("1"), "b.txt": lambda p: p.write_text("2")},
                 name="demo")
    assert io.set_complete(tmp_path, "demo")
    (tmp_path / "b.txt").write_text("other")
    assert not io.set_complete(tmp_path, "demo") and not io.set_complete(tmp_path, "nothing")
    with pytest.raises(ZeroDivisionError):
        io.write_set(tmp_path, {"a.txt": lambda p: p.write_text("3"), "b.txt": lambda p: 1 / 0}, name="demo")
    assert (tmp_path / "a.txt").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.txt", "b.txt", "demo.complete.json"]


# ------------------------------------------------------------------ 3. --keep-going


def _truncate(path: Path, keep: int = 200) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_keep_going_skips_unreadable_tiles_and_lists_them(tmp_path, capsys):
    tiles, out = _tiles(tmp_path / "T", [f"t{k}.tif" for k in range(5)]), tmp_path / "P"
    _truncate(tiles / "t2.tif")
    rc, _, err = _run(capsys, *_predict(tiles, out, "--batch-tiles", "4"))
    lines = _error_lines(err)
    assert rc == 1 and len(lines) == 1 and str(tiles / "t2.tif") in lines[0], err
    assert "keep-going" in lines[0]
    rc, text, err = _run(capsys, *_predict(tiles, out, "--batch-tiles", "4", "--keep-going"))
    assert rc == predict.EXIT_TILES_FAILED == 3
    table = pd.read_csv(out / "tiles_shard-0-of-1.tsv", sep="\t").set_index("tile")
    assert table.loc["t2", "status"] == "failed" and "t2.tif" in table.loc["t2", "reason"]
    assert (table.drop("t2")["status"] == "done").all() and len(table) == 5
    assert sorted(p.name for p in out.glob("t*.tif")) == ["t0.tif", "t1.tif", "t3.tif", "t4.tif"]
    assert "1 of 5 tiles failed" in err and "t2" in err
    _tiles(tiles, [f"t{k}.tif" for k in range(5)])                      # the tile copied again
    rc, text, _ = _run(capsys, *_predict(tiles, out, "--keep-going"))
    assert rc == 0 and "1 segmented, 4 already complete" in text


# ------------------------------------------------------------------ 4. any folder of images


def test_predict_takes_any_folder_of_images_and_keeps_dotted_ids(tmp_path, capsys):
    plain = _tiles(tmp_path / "plain", ["img.001.tif", "img.002.tif", "scan_1.5x.tif", "UP.TIFF"])
    out = tmp_path / "P"
    rc, _, err = _run(capsys, *_predict(plain, out))
    assert rc == 0, err
    assert predict.list_tiles(plain) == ["UP", "img.001", "img.002", "scan_1.5x"]
    assert sorted(p.name for p in out.glob("*.tif")) == ["UP.tif", "img.001.tif", "img.002.tif", "scan_1.5x.tif"]
    # evaluation pairs them with their true masks, whatever Cellpose/nnU-Net suffix those carry
    truth = tmp_path / "truth"
    truth.mkdir()
    for tid, suffix in (("img.001", "_masks.tif"), ("img.002", "_cp_masks.tif"), ("scan_1.5x", ".tiff"),
                        ("UP", "_0000.tif")):
        tifffile.imwrite(truth / f"{tid}{suffix}", tifffile.imread(out / f"{tid}.tif"))
    rc, text, err = _run(capsys, "evaluate", "--true", str(truth), "--pred", str(out), "--out",
                         str(tmp_path / "E"), "--strict", "--quiet")
    assert rc == 0 and "4 images evaluated" in text, err

    chans = tmp_path / "chans"          # channel files whose names carry no numeric donor id
    _tiles(chans, ["img_a_c0.tif", "img_a_c1.tif", "img_b_c0.tif", "img_b_c1.tif"])
    assert predict.list_tiles(chans) == ["img_a", "img_b"]
    assert _run(capsys, *_predict(chans, tmp_path / "P2"))[0] == 0


def test_cohort_tile_ids_are_unchanged(cohort):
    from seglab.data import manifest

    m, _ = manifest.discover(cohort / "tiles", check_files=False)
    tiles = predict.discover_tiles(cohort)
    assert [t.tile_id for t in tiles] == list(m["tile_id"])
    assert [t.files for t in tiles] == list(zip(m["dapi_path"], m["marker_path"]))


# ------------------------------------------------------------------ 5. smaller ones


def test_c2_beside_c1_is_recorded(tmp_path, capsys):
    tiles = _tiles(tmp_path / "T", ["s_1_m_0_c0.tif", "s_1_m_0_c1.tif", "s_1_m_0_c2.tif",
                                    "s_1_m_1_c0.tif", "s_1_m_1_c1.tif"])
    rc, _, err = _run(capsys, *_predict(tiles, tmp_path / "P"))
    assert rc == 0
    table = pd.read_csv(tmp_path / "P" / "tiles_shard-0-of-1.tsv", sep="\t", keep_default_na=False).set_index("tile")
    assert table.loc["s_1_m_0", "unused_channels"] == "c2" and table.loc["s_1_m_1", "unused_channels"] == ""
    assert "1 tile has _c1 and _c2" in err and "_c1 is used" in err


def test_counts_printed_are_this_invocations_work(tmp_path, capsys):
    tiles, out = _tiles(tmp_path / "T"), tmp_path / "P"
    assert "3 segmented, 0 already complete" in _run(capsys, *_predict(tiles, out))[1]
    assert "0 segmented, 3 already complete" in _run(capsys, *_predict(tiles, out))[1]


def test_evaluate_on_a_truncated_tif_is_one_line(tmp_path):
    true, pred = _label_folders(tmp_path)
    m = np.zeros((64, 64), np.uint16)
    m[10:20, 10:20] = 1
    tifffile.imwrite(pred / "b.tif", m, compression="zlib", metadata={"axes": "YX"})
    _truncate(pred / "b.tif")          # cut inside the tags: tifffile logs TiffFileError lines
    done = subprocess.run([sys.executable, "-m", "seglab", "evaluate", "--true", str(true), "--pred", str(pred),
                           "--out", str(tmp_path / "E"), "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert str(pred / "b.tif") in done.stderr and "truncated" in done.stderr
    assert "TiffFileError" not in done.stderr and "give label masks" not in done.stderr


def test_bad_out_folders_are_one_line(tmp_path, capsys):
    tiles = _tiles(tmp_path / "T")
    (tmp_path / "afile").write_text("x")
    rc, _, err = _run(capsys, *_predict(tiles, tmp_path / "afile"))
    assert rc == 1 and _error_lines(err) and "is a file" in err
    rc, _, err = _run(capsys, *_predict(tiles, tiles))
    assert rc == 1 and "tiles folder" in err and len(list(tiles.iterdir())) == 3
    true, pred = _label_folders(tmp_path)
    rc, _, err = _run(capsys, "evaluate", "--true", str(true), "--pred", str(pred), "--out", str(tmp_path / "afile"))
    assert rc == 1 and "is a file" in err
