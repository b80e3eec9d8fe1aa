"""Every notebook is paired with a percent-format script (notebooks/jupytext.toml), and the two agree.

Code review reads the plain diff of ``notebooks/NN_name.py``; papermill runs the
``.ipynb``. They must hold the same cells: same types, same sources, same tags (the
``parameters`` tag). Both files are read with jupytext, so timestamps and outputs do
not matter. ``make sync-notebooks`` (``jupytext --sync notebooks/*.ipynb``) updates
the older file of each pair from the newer one.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

FIX = "run `make sync-notebooks` (jupytext --sync notebooks/*.ipynb; the newer file of each pair wins)"


def cells(path: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(type, source, tags) of every cell of a notebook or of its paired script, read with jupytext."""
    import jupytext

    nb = jupytext.read(path)
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def _line(lines: list[str], k: int) -> str:
    return repr(lines[k][:80]) if k < len(lines) else "(no line)"


def pair_difference(ipynb: Path, script: Path) -> str | None:
    """None when the two files hold the same cells, else a line naming the first difference."""
    a, b = cells(ipynb), cells(script)
    for i, (x, y) in enumerate(zip(a, b)):
        if x[0] != y[0]:
            return f"cell {i} is {x[0]} in the notebook, {y[0]} in the script"
        if x[1] != y[1]:
            xs, ys = x[1].splitlines(), y[1].splitlines()
            k = next((k for k, (u, v) in enumerate(zip(xs, ys)) if u != v), min(len(xs), len(ys)))
            return f"cell {i} line {k + 1}: notebook {_line(xs, k)}, script {_line(ys, k)}"
        if x[2] != y[2]:
            return f"cell {i} tags: notebook {list(x[2])}, script {list(y[2])}"
    if len(a) != len(b):
        return f"the notebook has {len(a)} cells, the script {len(b)}"
    return None


def test_notebooks_are_paired_with_percent_scripts(repo_root):
    config = tomllib.loads((repo_root / "notebooks" / "jupytext.toml").read_text())
    assert config["formats"] == "ipynb,py:percent"


def test_every_notebook_and_its_script_hold_the_same_cells(repo_root):
    folder = repo_root / "notebooks"
    notebooks = sorted(folder.glob("*.ipynb"))
    assert notebooks
    problems = []
    for nb in notebooks:
        script = nb.with_suffix(".py")
        if not script.is_file():
            problems.append(f"notebooks/{script.name} is missing (the pair of {nb.name})")
        elif diff := pair_difference(nb, script):
            problems.append(f"notebooks/{nb.name} and notebooks/{script.name} differ: {diff}")
    for script in sorted(folder.glob("*.py")):
        if not script.with_suffix(".ipynb").is_file():
            problems.append(f"notebooks/{script.name} has no notebook notebooks/{script.stem}.ipynb "
                            "(delete the script, or make the notebook: jupytext --to ipynb)")
    assert not problems, "\n".join(problems) + f"\n{FIX}"


def test_pair_difference_sees_a_changed_cell_and_a_missing_one(tmp_path):
    """The comparison itself: a synced pair agrees; an edit on either side is named."""
    import jupytext
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("run_dir = None\nprofile = 'demo'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Title\n\nText."), params, nbformat.v4.new_code_cell("x = 1\nx")]
    ipynb, script = tmp_path / "10_probe.ipynb", tmp_path / "10_probe.py"
    nbformat.write(nb, str(ipynb))
    jupytext.write(nb, script, fmt="py:percent")
    assert pair_difference(ipynb, script) is None
    assert "tags=[\"parameters\"]" in script.read_text()

    script.write_text(script.read_text().replace("x = 1", "x = 2"))
    assert pair_difference(ipynb, script) == "cell 2 line 1: notebook 'x = 1', script 'x = 2'"
    script.write_text(script.read_text().replace('# %% tags=["parameters"]', "# %%"))
    assert pair_difference(ipynb, script) == "cell 1 tags: notebook ['parameters'], script []"

    nb.cells.append(nbformat.v4.new_code_cell("y = 2"))
    jupytext.write(nb, script, fmt="py:percent")
    nb.cells.pop()
    nbformat.write(nb, str(ipynb))
    assert pair_difference(ipynb, script) == "the notebook has 3 cells, the script 4"


def test_percent_scripts_round_trip_the_committed_notebooks(repo_root, tmp_path):
    """jupytext writes each committed notebook as a script that reads back as the same cells."""
    import jupytext

    for nb in sorted((repo_root / "notebooks").glob("*.ipynb")):
        script = tmp_path / f"{nb.stem}.py"
        jupytext.write(jupytext.read(nb), script, fmt="py:percent")
        assert pair_difference(nb, script) is None, nb.name
