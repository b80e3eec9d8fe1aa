"""seglab.segment.models: the registry, the tiny net under cellpose's eval, checkpoints and their failure modes."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from seglab.config.settings import MaskSettings
from seglab import SeglabError
from seglab.segment import models


pytestmark = pytest.mark.usefixtures("one_thread")


def disks(shape=(96, 96), centres=((24, 24), (24, 70), (70, 40)), r=9):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.uint16)
    for k, (cy, cx) in enumerate(centres, start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    img = (lab > 0).astype(np.float32) * 200 + 10
    return img, lab


def test_unknown_spec_names_the_choices():
    with pytest.raises(SeglabError, match="names no known model.*tiny.*classical"):
        models.load("resnet50")
    with pytest.raises(SeglabError, match="unknown tiny preset"):
        models.load("tiny-xxl")


def test_cpsam_missing_fails_fast_with_path_and_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "models"))
    t0 = time.time()
    with pytest.raises(SeglabError) as exc:
        models.load("cpsam")
    msg = str(exc.value)
    assert str(tmp_path / "models" / "cpsam") in msg and "login node" in msg and "curl" in msg
    assert time.time() - t0 < 10  # no download attempt, no fallback model
    assert not (tmp_path / "models" / "cpsam").exists()


def test_cpsam_truncated_file_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "cpsam_v2").write_bytes(b"PK\x03\x04 not really")
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    with pytest.raises(SeglabError, match="truncated"):
        models.load("cpsam_v2", gpu=False)


def test_cpsam_name_on_another_architecture_is_refused_before_loading(tmp_path, monkeypatch):
    # a cellpose-4 style tiny net (it has a W2 entry) saved under the name cpsam: cellpose's own
    # loader (strict=False) would leave Cellpose-SAM's 305 M parameters at random values
    net = models.build_tiny_net(models.TINY_PRESETS["xs"])
    torch.save(net.state_dict(), tmp_path / "cpsam")
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    with pytest.raises(SeglabError, match=r"another architecture, not Cellpose-SAM's .*tensors missing") as exc:
        models.load("cpsam", gpu=False)
    assert str(tmp_path / "cpsam") in str(exc.value)


def test_a_gpu_requested_where_torch_sees_none_fails_at_the_first_load(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SEGLAB_DEVICE", "cuda")
    for spec in ("tiny-xs", "generalist", "cpsam-random"):
        with pytest.raises(SeglabError, match="SEGLAB_DEVICE=cuda but torch sees no CUDA GPU.*nvidia-smi"):
            models.load(spec)
    with pytest.raises(SeglabError, match="gpu=True but torch sees no CUDA GPU"):
        models.load("tiny-xs", gpu=True)
    monkeypatch.setenv("SEGLAB_DEVICE", "cpu")
    assert models.load("tiny-xs").device.type == "cpu"
    monkeypatch.setenv("SEGLAB_DEVICE", "gpu0")
    with pytest.raises(SeglabError, match="SEGLAB_DEVICE='gpu0': use one of auto, cpu, cuda"):
        models.load("tiny-xs")


def test_tiny_under_cellpose_eval_shapes_and_dtypes():
    m = models.load("tiny-xs", gpu=False)
    assert m.net.backbone == "tiny_unet" and models.n_parameters(m.net) < 200_000
    img, _ = disks()
    for x in (img, img[None], np.stack([img, img * 0.5])):  # (Y,X), (1,Y,X), (2,Y,X) all padded to 3 channels
        mask = m.segment(x, MaskSettings(diameter_px="native"))
        assert mask.shape == img.shape and mask.dtype == np.uint16
    with pytest.raises(SeglabError, match=r"channel-first.*\(5, 96, 96\)"):
        m.segment(np.zeros((5, 96, 96), np.float32))
    with pytest.raises(SeglabError, match="no images"):
        m.segment([])


def test_tiny_seed_gives_same_network():
    a, b, c = (models.load("tiny-xs", seed=s, gpu=False).net.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_batched_segment_equals_one_by_one():
    m = models.load("generalist", gpu=False) if models.GENERALIST_PATH.is_file() else models.load("tiny-xs", gpu=False)
    rng = np.random.default_rng(0)
    imgs = []
    for k in range(3):
        img, _ = disks(centres=[tuple(rng.integers(15, 80, 2)) for _ in range(3)])
        imgs.append(np.stack([img * (k + 1), img[::-1] * 0.3]))
    batched = m.segment(imgs, MaskSettings(diameter_px=18))
    single = [m.segment(x, MaskSettings(diameter_px=18)) for x in imgs]
    assert all(np.array_equal(a, b) for a, b in zip(batched, single))


def test_classical_counts_separated_and_touching_disks():
    img, lab = disks()
    out = models.load("classical").segment(img[None])
    assert out.max() == 3
    # two touching disks are split by the distance-transform watershed
    img2, _ = disks(centres=((48, 36), (48, 60)), r=12)
    assert models.classical_segment(img2, diameter_px=24).max() == 2
    assert models.classical_segment(np.zeros((64, 64))).max() == 0


def test_estimate_diameter_of_disks():
    img, lab = disks(r=10)
    assert abs(models.estimate_diameter(img) - 20) < 3


def test_checkpoint_roundtrip_and_sidecar(tmp_path):
    m = models.load("tiny-xs", gpu=False, seed=5)
    p = models.save_checkpoint(m.net, tmp_path / "ck.pt", {"base_spec": "tiny-xs", "params": {"n_epochs": 0}})
    meta = json.loads((tmp_path / "ck.pt.json").read_text())
    assert meta["arch"] == "tiny_unet" and meta["base_spec"] == "tiny-xs" and len(meta["weights_sha256"]) == 64
    back = models.load(str(p), gpu=False)
    a, b = m.net.state_dict(), back.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    img, _ = disks()
    assert np.array_equal(m.segment(img, MaskSettings(diameter_px="native")), back.segment(img, MaskSettings(diameter_px="native")))


def test_foreign_truncated_and_pickled_checkpoints_are_refused(tmp_path):
    m = models.load("tiny-xs", gpu=False)
    # no sidecar: not ours
    torch.save(m.net.state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(SeglabError, match="not a seglab checkpoint"):
        models.load(str(tmp_path / "foreign.pt"))
    # truncated after the sidecar was written
    p = models.save_checkpoint(m.net, tmp_path / "t.pt", {})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SeglabError, match="truncated"):
        models.load(str(p))
    # truncated and no hash to compare with: torch.load's failure becomes a SeglabError
    side = json.loads((tmp_path / "t.pt.json").read_text())
    side.pop("weights_sha256")
    (tmp_path / "t.pt.json").write_text(json.dumps(side))
    with pytest.raises(SeglabError, match="cannot be read"):
        models.load(str(p))
    # a pickle that needs code to load is refused (weights_only), never executed
    q = tmp_path / "evil.pt"
    torch.save({"W2": torch.zeros(1), "obj": _Thing()}, q)
    (tmp_path / "evil.pt.json").write_text(json.dumps({"format": models.CHECKPOINT_FORMAT, "arch": "tiny_unet",
                                                       "nbase": [8, 16, 32, 64]}))
    with pytest.raises(SeglabError, match="cannot be read"):
        models.load(str(q))
    with pytest.raises(SeglabError, match="no such checkpoint"):
        models.load(str(tmp_path / "missing.pt"))


class _Thing:
    pass


def test_label_dtype_switches_to_uint32():
    big = np.arange(70_000, dtype=np.int64).reshape(350, 200)
    assert models.as_label_dtype(big).dtype == np.uint32
    assert models.as_label_dtype(big % 1000).dtype == np.uint16


def test_generalist_asset_on_held_out_dsb(dsb_dir):
    if not models.GENERALIST_PATH.is_file():
        pytest.fail(f"{models.GENERALIST_PATH} is missing: run `seglab pretrain-generalist`")
    from cellpose.metrics import average_precision

    from seglab.data import dsb

    meta = models.read_sidecar(models.GENERALIST_PATH)
    assert "360x360" in meta["recipe"]["test_groups"] and meta["metrics"]["test_ap50_generalist"] > 0
    m = models.load("generalist", gpu=False)
    table = dsb.dsb2018_table(dsb_dir)
    rows = table[table.group == "360x360"].head(3)
    gts, preds = [], []
    for _, r in rows.iterrows():
        img, gt = dsb.load_dsb2018(r)
        gts.append(gt)
        preds.append(m.segment(img[None].astype(np.float32)))
    ap = average_precision(gts, preds, threshold=[0.5])[0][:, 0]
    assert ap.mean() > 0.5


def test_generalist_sees_dapi_only():
    # the DSB generalist was trained on [nucleus, 0, 0]; a marker channel must not change its masks
    if not models.GENERALIST_PATH.is_file():
        pytest.fail(f"{models.GENERALIST_PATH} is missing: run `seglab pretrain-generalist`")
    g = models.load("generalist", gpu=False)
    assert g.channels == (0,)
    img, lab = disks(r=8)
    noise = np.random.default_rng(0).uniform(0, 255, img.shape).astype(np.float32)
    a = g.segment(img[None], MaskSettings(diameter_px=16))
    assert a.max() == 3
    assert np.array_equal(a, g.segment(np.stack([img, noise]), MaskSettings(diameter_px=16)))


def test_equal_weights_give_equal_checkpoint_bytes_and_so_one_model_id(tmp_path):
    """torch.save to a path records the file's (temporary) name: saved through a buffer, a retrained model
    with the same weights is the same file, the same model_id, the same cache entries."""
    m = models.load("tiny-xs", gpu=False)
    a = models.save_checkpoint(m.net, tmp_path / "a" / "model.pt", {"base_spec": "tiny-xs"})
    b = models.save_checkpoint(m.net, tmp_path / "b" / "model.pt", {"base_spec": "tiny-xs"})
    assert a.read_bytes() == b.read_bytes() and models.model_id(str(a)) == models.model_id(str(b))
    assert models.load_checkpoint(b).arch == "tiny_unet"
