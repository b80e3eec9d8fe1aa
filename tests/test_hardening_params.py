"""Issue #13, params / run / audit: every bad input is refused before a notebook starts, with one line
that names the file holding the bad value (defaults.yaml, the notebook's own file or the command line),
the key and the fix.

1. params errors name the file that holds the key; a missing params file is named as missing;
2. checks that need the cohort (E2 budgets vs training tiles, E6 markers) or several keys at once run
   before the notebook (``seglab run``, ``run-all`` per notebook, ``check-params``);
3. ``seglab run NN`` names the upstream notebook without a finished run;
4. ``audit --masks`` refuses a mask that is not one plane of its image's shape.
"""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import tifffile

from seglab import SeglabError
from seglab.cli import main
from seglab.config.params import ParamsError, load_params
from seglab.core import paths
from seglab.workflow import pipeline, runs

REPO = Path(__file__).resolve().parents[1]
E2 = "02_label_efficiency"


def _set(path: Path, key: str, value: str) -> None:
    """Replace the line ``key: ...`` of a params file (or append it)."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith(f"{key}:")]
    path.write_text("\n".join(lines + [f"{key}: {value}"]) + "\n")


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    """3 donors x 5 markers x 1 tile of 64 px: 5 annotated training tiles (one donor)."""
    from seglab.data import simulate

    return simulate.simulate_cohort(tmp_path_factory.mktemp("cohort") / "c", n_donors=3, tiles_per_marker=1,
                                    size_px=64, seed=0, progress=False)


@pytest.fixture()
def project(tmp_path, monkeypatch) -> Path:
    """The repository's params (schemas, chain, profiles) with profile ``p`` (a copy of demo whose
    cohort does not exist yet) and placeholder notebooks, set as the project root."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "params", root / "params")
    shutil.copytree(root / "params" / "demo", root / "params" / "p")
    _set(root / "params" / "p" / "defaults.yaml", "cohort_dir", str(tmp_path / "no_cohort_yet"))
    (root / "notebooks").mkdir()
    for nb in (REPO / "notebooks").glob("*.ipynb"):
        (root / "notebooks" / nb.name).write_text("{}")   # never run: every test here stops before papermill
    monkeypatch.setenv("SEGLAB_ROOT", str(root))
    monkeypatch.delenv("SEGLAB_RUNS_DIR", raising=False)
    monkeypatch.delenv("SEGLAB_REPORTS_DIR", raising=False)
    paths.set_root(None)
    yield root
    paths.set_root(None)


@pytest.fixture()
def built(project, tiny_cohort) -> Path:
    """``project`` whose profile ``p`` reads the tiny cohort, with a finished run of 00_data."""
    _set(project / "params" / "p" / "defaults.yaml", "cohort_dir", str(tiny_cohort))
    _set(project / "params" / "p" / f"{E2}.yaml", "budgets", "[1, 2]")       # demo's [4, 12, 36] exceed 5 tiles
    _fake_done_run(project, "00_data", "p")
    return project


def _fake_done_run(root: Path, notebook: str, profile: str) -> Path:
    run_dir = root / "runs" / notebook / profile / runs.new_run_id()
    run_dir.mkdir(parents=True)
    runs.io.write_json(run_dir / runs.MANIFEST, {"experiment": notebook, "profile": profile, "status": "done"})
    return run_dir


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------- 1. the file that holds the key


def test_a_bad_value_in_defaults_yaml_is_blamed_on_defaults_yaml(project, capsys):
    defaults = project / "params" / "p" / "defaults.yaml"
    _set(defaults, "epochs", "-5")
    for notebook in ("01_baseline_vs_finetune", E2):
        with pytest.raises(ParamsError) as err:
            load_params(notebook, "p")
        assert str(err.value).startswith(f"{defaults}: key 'epochs': -5 is out of range"), str(err.value)
    err = _one_line_error(capsys, ["check-params", "--profile", "p"])
    assert f"{defaults}: key 'epochs'" in err and "01_baseline_vs_finetune.yaml" not in err
    # the notebook's own file and the command line are named for their own keys
    _set(defaults, "epochs", "10")
    own = project / "params" / "p" / f"{E2}.yaml"
    _set(own, "repeats", "0")
    with pytest.raises(ParamsError, match=f"^{own}: key 'repeats': 0 is out of range"):
        load_params(E2, "p")
    _set(own, "repeats", "2")
    with pytest.raises(ParamsError, match="^command-line override: key 'epochs': 0 is out of range"):
        load_params(E2, "p", {"epochs": 0})
    # a wrong type in defaults.yaml, too
    _set(defaults, "learning_rate", "fast")
    with pytest.raises(ParamsError, match=f"^{defaults}: key 'learning_rate': 'fast' is not a number"):
        load_params(E2, "p")


def test_a_missing_params_file_is_named_missing_with_the_copy_command(project, capsys):
    (project / "params" / "p" / "03_gating.yaml").unlink()
    with pytest.raises(ParamsError) as err:
        load_params("03_gating", "p")
    msg = str(err.value)
    assert msg.startswith(f"{project / 'params' / 'p' / '03_gating.yaml'}: file missing"), msg
    assert "cp params/demo/03_gating.yaml params/p/" in msg and "is required" not in msg
    err = _one_line_error(capsys, ["check-params", "--profile", "p"])
    assert "03_gating.yaml: file missing" in err


def test_yaml_syntax_errors_and_unreadable_files_are_one_line_with_the_place(project):
    defaults = project / "params" / "p" / "defaults.yaml"
    defaults.write_text(defaults.read_text() + "sens: [3\n")
    with pytest.raises(ParamsError) as err:
        load_params(E2, "p")
    msg = str(err.value)
    assert msg.startswith(f"{defaults}: not valid YAML at line ") and "column" in msg and "\n" not in msg, msg
    defaults.write_bytes(b"epochs: 10\nlabel: caf\xe9\n")   # Latin-1, not UTF-8
    with pytest.raises(ParamsError, match=f"^{defaults}: not UTF-8 text"):
        load_params(E2, "p")


def test_a_missing_schema_and_a_bad_override_are_one_line_each(project):
    from seglab.config.params import parse_override

    (project / "params" / "schema" / "04_sensitivity.yaml").unlink()
    with pytest.raises(ParamsError, match=r"04_sensitivity.yaml: file missing: notebook 04_sensitivity has no schema"):
        load_params("04_sensitivity", "p")
    with pytest.raises(ParamsError) as err:
        parse_override("budgets=[1,")      # what the shell leaves of an unquoted `--set budgets=[1, 2]`
    assert "column" in str(err.value) and "quote it" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- 2. checks before the notebook


def test_e2_with_stored_validation_ap_and_other_mask_settings_fails_in_its_first_step(tmp_path):
    """rescore_per_image false reads the AP training stored at the library's mask settings: with other
    settings the notebook failed at step 4, after training every model; now step 1 refuses."""
    from seglab.experiments import e2_label_efficiency as e2

    params = {"rescore_per_image": False, "min_size": 5, "cohort_dir": str(tmp_path / "never_read"),
              "budgets": [1], "repeats": 1}
    with pytest.raises(SeglabError, match="rescore_per_image"):
        e2.design(params)


def test_check_params_refuses_a_budget_larger_than_the_training_set(built, capsys):
    own = built / "params" / "p" / f"{E2}.yaml"
    _set(own, "budgets", "[1, 6]")
    err = _one_line_error(capsys, ["check-params", "--profile", "p"])
    assert f"{own}: key 'budgets'" in err and "6" in err and "5 annotated training tiles" in err, err
    assert "at most 5" in err
    _set(own, "budgets", "[1, 5]")
    assert main(["check-params", "--profile", "p"]) == 0
    assert f"ok  p/{E2}" in capsys.readouterr().out


def test_check_params_says_when_the_data_checks_are_skipped(project, capsys):
    assert main(["check-params", "--profile", "p"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if E2 in x)
    assert line.startswith(f"ok  p/{E2}") and "skipped: cohort not built yet" in line, out


def test_run_refuses_a_too_large_budget_before_any_run_folder(built, capsys):
    _set(built / "params" / "p" / f"{E2}.yaml", "budgets", "[2, 40]")
    err = _one_line_error(capsys, ["run", "02", "--profile", "p", "--no-report"])
    assert "key 'budgets'" in err and "40" in err and "5 annotated training tiles" in err
    assert not (built / "runs" / E2).exists()
    # an override on the command line is blamed on the command line
    err = _one_line_error(capsys, ["run", "02", "--profile", "p", "--set", "budgets=[9]"])
    assert err.startswith("seglab run: error: command-line override: key 'budgets'"), err


@pytest.mark.parametrize("where, key, value, fragment", [
    ("defaults", "learning_rate", "0", "must be > 0"),                       # schema min 0, training refuses 0
    ("defaults", "bsize", "100", "multiple of 8"),
    ("03_gating", "gate_q_lows", "[0.0, 5]", "fractions"),
    ("03_gating", "gate_q_highs", "[0.9]", "no gate"),                       # with q_lows [0.95]
    ("04_sensitivity", "sens_niters", "[0, 100]", ">= 1"),
    ("04_sensitivity", "sens_diameter_factors", "[0.0, 1.0]", "> 0"),
])
def test_values_the_experiment_cannot_use_fail_in_check_params(project, capsys, where, key, value, fragment):
    f = project / "params" / "p" / f"{where}.yaml"
    _set(f, key, value)
    if key == "gate_q_highs":
        _set(f, "gate_q_lows", "[0.95]")
    err = _one_line_error(capsys, ["check-params", "--profile", "p"])
    assert f"{f}: key '{key}'" in err and fragment in err, err


def test_lomo_markers_not_in_the_cohort_fail_in_check_params(built, capsys):
    f = built / "params" / "p" / "06_leave_one_marker_out.yaml"
    _set(f, "lomo_markers", "[gfap, gfpa]")
    err = _one_line_error(capsys, ["check-params", "--profile", "p"])
    assert f"{f}: key 'lomo_markers'" in err and "gfpa" in err and "usable: gfap, iba1" in err, err


def test_e1_markers_without_annotated_tiles_fail_in_check_params(built, capsys):
    # before, the notebook found out after fine-tuning the generic and marker-only models
    f = built / "params" / "p" / "01_baseline_vs_finetune.yaml"
    _set(f, "markers", "[gfap, gfpa]")
    err = _one_line_error(capsys, ["check-params", "--profile", "p"])
    assert f"{f}: key 'markers'" in err and "gfpa has none in train/val/test" in err and "gfap," in err, err


def test_e5_shards_outside_n_shards_fail_in_check_params(project, capsys):
    f = project / "params" / "p" / "05_downstream.yaml"
    _set(f, "shards", "[0, 7]")
    err = _one_line_error(capsys, ["check-params", "--profile", "p"])
    assert f"{f}: key 'shards'" in err and "[7] outside 0.." in err and "'n_shards' from" in err, err


def test_run_all_checks_params_up_front_and_the_data_right_before_each_notebook(probe_root, monkeypatch):
    import seglab.experiments as experiments

    seen = []

    def preflight(params, cohort):
        seen.append(runs.latest_run("10_probe", "test"))
        if params["factor"] == 13:
            raise experiments.ParamConflict("factor", "13 is unlucky", "use another factor")

    fake = types.ModuleType("fake", "11_after's preflight")
    fake.preflight = preflight
    real = experiments.experiment_module
    monkeypatch.setattr(experiments, "experiment_module", lambda nb: fake if nb == "11_after" else real(nb))
    pipeline.run_all("test", log=lambda *_: None)
    assert seen[0] is None and seen[-1] is not None     # up front, then after 10_probe ran
    (probe_root / "params" / "test" / "11_after.yaml").write_text("factor: 13\n")
    before = runs.list_runs("10_probe", "test")
    with pytest.raises(ParamsError, match=r"11_after.yaml: key 'factor': 13 is unlucky; use another factor"):
        pipeline.run_all("test", force=True, log=lambda *_: None)
    assert runs.list_runs("10_probe", "test") == before   # refused before anything ran


# --------------------------------------------------------------------------- 3. upstream runs


def test_run_before_its_upstream_names_the_missing_run(probe_root, capsys):
    err = _one_line_error(capsys, ["run", "11", "--profile", "test", "--no-report"])
    assert "11_after needs 10_probe, which has no finished run in profile 'test'" in err, err
    assert "`seglab run 10 --profile test`" in err and "seglab run-all --profile test" in err
    assert not (probe_root / "runs" / "11_after").exists()
    assert main(["run", "10", "--profile", "test", "--no-report", "--set", "fail=true"]) == 1
    capsys.readouterr()
    err = _one_line_error(capsys, ["run", "11", "--profile", "test", "--no-report"])
    assert "is failed" in err or "failed" in err.split("10_probe", 1)[1], err
    # the escape hatch runs it anyway, and a finished upstream run lets it through
    assert main(["run", "11", "--profile", "test", "--no-report", "--no-upstream-check"]) == 0
    assert main(["run", "10", "--profile", "test", "--no-report"]) == 0
    assert main(["run", "11", "--profile", "test", "--no-report"]) == 0


# --------------------------------------------------------------------------- 4. audit: mask shapes


def _tile_with_mask(folder: Path, mask) -> tuple[Path, Path]:
    (folder / "tiles").mkdir(parents=True)
    (folder / "masks").mkdir()
    for ch in ("c0", "c1"):
        tifffile.imwrite(folder / "tiles" / f"ROSMAP_1_gfap_00_{ch}.tif", np.ones((16, 16), np.uint16))
    tifffile.imwrite(folder / "masks" / "ROSMAP_1_gfap_00.tif", np.asarray(mask))
    return folder / "tiles", folder / "masks"


def test_audit_refuses_a_3d_mask_for_a_2d_image(tmp_path, capsys):
    from seglab.data.manifest import discover

    tiles, masks = _tile_with_mask(tmp_path / "a", np.ones((3, 16, 16), np.uint16))
    with pytest.raises(SeglabError, match=r"ROSMAP_1_gfap_00.tif: mask shape \(3, 16, 16\) is not one 2-D plane"):
        discover(tiles, masks)
    err = _one_line_error(capsys, ["audit", str(tiles), "--masks", str(masks)])
    assert "masks/ROSMAP_1_gfap_00.tif" in err and "(Y, X)" in err
    _, audit = discover(tiles, masks, strict=False)
    assert audit["excluded"][0]["tile_id"] == "ROSMAP_1_gfap_00"
    # one plane with a singleton axis is what load_mask reads: accepted
    tiles, masks = _tile_with_mask(tmp_path / "b", np.ones((1, 16, 16), np.uint16))
    manifest, _ = discover(tiles, masks)
    assert manifest["annotated"].all()
