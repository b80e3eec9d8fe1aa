"""The committed notebooks and params: clean, parameterised, complete for every profile."""

from __future__ import annotations

import json

import pytest

from seglab.workflow.chain import load_experiments
from seglab.config.params import load_params

PROFILES = ("demo", "full")


def _notebooks(repo_root):
    return sorted((repo_root / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs(repo_root):
    for path in _notebooks(repo_root):
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                assert not cell.get("outputs"), f"{path.name} cell {i} has outputs: clear them before committing"
                assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


def test_every_notebook_has_one_parameters_cell_with_run_dir_and_profile(repo_root):
    for path in _notebooks(repo_root):
        nb = json.loads(path.read_text())
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        source = "".join(tagged[0]["source"])
        assert "run_dir = None" in source and "profile =" in source, path.name
        assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", path.name


@pytest.mark.parametrize("profile", PROFILES)
def test_every_experiment_has_notebook_schema_and_valid_params(repo_root, profile, monkeypatch):
    monkeypatch.setenv("SEGLAB_ROOT", str(repo_root))
    experiments = load_experiments(repo_root)
    assert experiments and experiments[0].name == "00_data"
    for e in experiments:
        assert e.notebook.is_file(), f"{e.name}: notebook missing"
        assert (repo_root / "params" / "schema" / f"{e.name}.yaml").is_file()
        assert (repo_root / "params" / profile / f"{e.name}.yaml").is_file(), f"{profile}/{e.name}.yaml missing"
        load_params(e.name, profile, root=repo_root)


def test_parameters_cell_defaults_match_the_demo_profile(repo_root, monkeypatch):
    """JupyterLab runs a notebook with its own defaults: they must be the demo values."""
    import ast

    monkeypatch.setenv("SEGLAB_ROOT", str(repo_root))
    for e in load_experiments(repo_root):
        nb = json.loads(e.notebook.read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        values = {}
        for node in ast.parse("".join(cell["source"])).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                values[node.targets[0].id] = ast.literal_eval(node.value)
        demo, _ = load_params(e.name, "demo", root=repo_root)
        missing = sorted(set(demo) - set(values))
        assert not missing, f"{e.name}: parameters cell lacks {missing}"
        differ = {k: (values[k], v) for k, v in demo.items() if values[k] != v}
        assert not differ, (f"{e.name}: parameters cell (notebook, demo profile) differ: {differ}; "
                            "run `seglab sync-parameters`")


def test_sync_parameters_rewrites_stale_values_and_adds_missing_keys(probe_root):
    from seglab.workflow.nbparams import cell_values, parameters_cell, sync_notebook

    nb_path = probe_root / "notebooks" / "10_probe.ipynb"
    assert sync_notebook("10_probe", "test", check=True) == ["n", "label"]
    (probe_root / "params" / "schema" / "10_probe.yaml").write_text(
        (probe_root / "params" / "schema" / "10_probe.yaml").read_text() + "extra: {type: list, items: int, default: [1, 2]}\n")
    assert sync_notebook("10_probe", "test") == ["n", "label", "extra"]
    cell = parameters_cell(json.loads(nb_path.read_text()), nb_path)
    assert cell_values(cell) == {"n": 4, "fail": False, "sleep_s": 0.0, "label": "shared-label", "extra": [1, 2],
                                 "run_dir": None, "profile": "interactive"}
    assert sync_notebook("10_probe", "test") == []
