"""Settings objects (one home for the mask and training defaults) and model identity (one key for every cache)."""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest

from seglab import SeglabError
from seglab.config.params import load_params, shared_params
from seglab.config.settings import DIAMETER_AUTO, DIAMETER_NATIVE, MaskSettings, TrainSettings
from seglab.core import paths
from seglab.workflow.chain import load_experiments


def test_mask_settings_take_their_keys_from_params_and_check_values():
    p = {"diameter_px": 13, "flow_threshold": 1, "cellprob_threshold": 0, "min_size": 9, "epochs": 3}
    m = MaskSettings.from_params(p)
    assert m == MaskSettings(diameter_px=13.0, flow_threshold=1.0, cellprob_threshold=0.0, min_size=9)
    assert isinstance(m.flow_threshold, float) and m.niter is None
    assert MaskSettings.from_params({}) == MaskSettings()
    assert m.replace(flow_threshold=0.5).flow_threshold == 0.5 and m.flow_threshold == 1.0
    with pytest.raises(SeglabError, match="unknown settings"):
        m.replace(flow=0.5)
    for bad in (0, -3, "big", True):
        with pytest.raises(SeglabError, match="diameter_px"):
            MaskSettings(diameter_px=bad)
    assert MaskSettings(diameter_px=DIAMETER_AUTO).diameter_px == "auto"
    with pytest.raises(SeglabError, match="niter"):
        MaskSettings(niter=0)


def test_train_settings_validate_and_key_the_cache_without_a_null_crop_count():
    t = TrainSettings.from_params({"epochs": 3, "learning_rate": 0.01, "cohort_dir": "x"})
    assert t.epochs == 3 and t.bsize == 256
    assert "nimg_per_epoch" not in t.cache_fields() and t.replace(nimg_per_epoch=4).cache_fields()["nimg_per_epoch"] == 4
    with pytest.raises(SeglabError, match="epochs=0"):
        TrainSettings(epochs=0)
    with pytest.raises(SeglabError, match="bsize"):
        TrainSettings(bsize=100)


def test_the_model_default_diameter_means_auto_for_tiny_nets_and_native_for_cpsam_and_classical():
    from seglab.segment import models

    img = np.zeros((3, 32, 32), np.float32)
    tiny = models.load("tiny-xs")
    assert tiny.default_diameter == DIAMETER_AUTO
    assert tiny.resolve_diameter(img, 12) == 12.0 and tiny.resolve_diameter(img, DIAMETER_NATIVE) is None
    assert models.load("classical").resolve_diameter(img, None) is None


@pytest.fixture()
def params_project(tmp_path, repo_root, monkeypatch):
    """A copy of the project's params and chain, set as the project root."""
    root = tmp_path / "project"
    shutil.copytree(repo_root / "params", root / "params")
    monkeypatch.setenv("SEGLAB_ROOT", str(root))
    paths.set_root(None)
    yield root
    paths.set_root(None)


def test_one_params_key_moves_every_experiment_and_seglab_predict(params_project):
    """flow_threshold is set once, in params/<profile>/defaults.yaml: every notebook that takes mask
    settings and ``seglab predict`` follow a change of that one key."""
    from seglab.cli.models import mask_settings

    defaults = params_project / "params" / "demo" / "defaults.yaml"
    defaults.write_text(defaults.read_text().replace("flow_threshold: 0.4", "flow_threshold: 0.55"))
    taking = []
    for e in load_experiments(params_project):
        p, _ = load_params(e.name, "demo", root=params_project)
        if "flow_threshold" in p:
            taking.append(e.name)
            assert MaskSettings.from_params(p).flow_threshold == 0.55, e.name
    assert len(taking) >= 6
    assert shared_params("demo")["flow_threshold"] == 0.55
    args = argparse.Namespace(profile="demo", flow_threshold=None, cellprob_threshold=None, min_size=None, diameter=None)
    assert mask_settings(args) == MaskSettings.from_params(shared_params("demo"))
    assert mask_settings(args).flow_threshold == 0.55
    assert mask_settings(argparse.Namespace(**{**vars(args), "flow_threshold": 0.7, "diameter": "native"})) == \
        MaskSettings.from_params(shared_params("demo"), flow_threshold=0.7, diameter_px="native")


def test_every_cache_misses_when_the_bytes_of_a_cpsam_named_weights_file_change(tmp_path, monkeypatch, cohort):
    """The fine-tune cache, the network-output cache and the prediction folders key a cpsam model by
    the sha256 of its weights, never by its name: another file stored as ``cpsam`` is another entry."""
    from seglab.data import manifest as data
    from seglab.data import splitset
    from seglab.segment import cohort_prediction, finetuning, models, output_cache

    models_dir = tmp_path / "cellpose_models"
    models_dir.mkdir()
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(models_dir))
    weights = models_dir / "cpsam"
    weights.write_bytes(b"first cpsam weights" * 1000)
    split = splitset.annotated_split(data.cohort_manifest(cohort), "val")
    mask, training = MaskSettings(), TrainSettings(epochs=1)

    def keys():
        return {"model_id": models.model_id("cpsam"),
                "finetune": finetuning.model_dir("cpsam", str(cohort), "generic", training=training,
                                                 cache_dir=str(tmp_path / "models")),
                "outputs": output_cache.cached_output_files("cpsam", split, mask, str(tmp_path / "out"))[0].parent,
                "predictions": cohort_prediction.prediction_dir("cpsam", cohort, mask, root=tmp_path / "pred")}

    before = keys()
    assert keys() == before   # the same bytes: the same entries
    weights.write_bytes(b"other cpsam weights" * 1000)   # same name, same size, other bytes
    after = keys()
    assert {k: before[k] != after[k] for k in before} == {k: True for k in before}
    assert after["model_id"] == models.weights_sha256(weights)
    weights.unlink()
    with pytest.raises(SeglabError, match="no weights file"):
        models.model_id("cpsam")


def test_a_notebook_gets_its_validated_params_and_settings_from_attach(params_project):
    """The runner's params reach the notebook as run.params / run.mask / run.training: no cell rebuilds a dict."""
    from seglab.workflow.runs import attach

    (params_project / "runs").mkdir()
    namespace = dict(load_params("01_baseline_vs_finetune", "demo")[0], unrelated_global=object())
    run = attach("01_baseline_vs_finetune", params_project / "runs", "demo", namespace)
    assert run.params == load_params("01_baseline_vs_finetune", "demo")[0]
    assert run.mask == MaskSettings.from_params(namespace) and run.training == TrainSettings.from_params(namespace)
    bad = attach("01_baseline_vs_finetune", params_project / "runs", "demo", {**namespace, "epochs": "ten"})
    with pytest.raises(SeglabError, match="epochs"):
        bad.params
    partial = attach("01_baseline_vs_finetune", params_project / "runs", "demo", {"epochs": 3})
    with pytest.raises(SeglabError, match="sync-parameters"):
        partial.params


def test_seglab_predict_outside_a_compendium_takes_the_library_defaults(tmp_path, monkeypatch, capsys):
    from seglab.cli.models import mask_settings

    monkeypatch.setenv("SEGLAB_ROOT", str(tmp_path))
    paths.set_root(None)
    args = argparse.Namespace(profile="demo", flow_threshold=0.6, cellprob_threshold=None, min_size=None,
                              diameter="14")
    assert mask_settings(args) == MaskSettings(flow_threshold=0.6, diameter_px=14.0)
    assert "library's defaults" in capsys.readouterr().err
    paths.set_root(None)
