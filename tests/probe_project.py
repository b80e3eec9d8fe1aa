"""A throw-away compendium with two tiny notebooks, for testing the runner, reports and Slurm.

``make_probe_project(root)`` writes params/experiments.yaml, schemas, a
``test`` profile and notebooks 10_probe (writes a table, a figure and a
summary; can fail or sleep on request) and 11_after (needs 10_probe).
"""

from __future__ import annotations

from pathlib import Path

import nbformat

PROBE_CELLS = [
    ("markdown", "# Probe\nA notebook that writes a table, a figure and a summary."),
    ("parameters", 'n = 3\nfail = False\nsleep_s = 0.0\nlabel = "probe"\nrun_dir = None\nprofile = "interactive"'),
    ("code", "import time\nimport pandas as pd\nimport matplotlib\nmatplotlib.use('Agg')\n"
             "import matplotlib.pyplot as plt\nfrom seglab.workflow.runs import attach\n"
             "run = attach('10_probe', run_dir, profile)"),
    ("code", "table = pd.DataFrame({'i': range(n), 'square': [i * i for i in range(n)]})\n"
             "run.save_table(table, 'squares.csv')\n"
             "fig, ax = plt.subplots(figsize=(3, 2))\nax.plot(table['i'], table['square'])\n"
             "run.save_figure(fig, 'squares.png')\nplt.show()\n"
             "run.summary(n=n, sum_of_squares=int(table['square'].sum()), label=label)"),
    ("code", "if fail:\n    raise ValueError('boom on purpose')"),
    ("code", "time.sleep(sleep_s)\nprint('slept', sleep_s)"),
]

AFTER_CELLS = [
    ("parameters", 'factor = 2\nrun_dir = None\nprofile = "interactive"'),
    ("code", "from seglab.workflow.runs import attach, latest_run\nrun = attach('11_after', run_dir, profile)\n"
             "import json\nup = latest_run('10_probe', profile)\n"
             "total = json.loads((up / 'summary.json').read_text())['sum_of_squares'] if up else 0\n"
             "run.summary(scaled=total * factor)"),
]


def notebook(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in cells:
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    return nb


def project_skeleton(root: Path, profile: str, experiments: dict[str, tuple[str, list[str]]]) -> Path:
    """params/schema/, params/<profile>/, notebooks/ and params/experiments.yaml declaring
    ``experiments`` ({name: (title, needs)}, in chain order)."""
    root = Path(root)
    (root / "params" / "schema").mkdir(parents=True)
    (root / "params" / profile).mkdir()
    (root / "notebooks").mkdir()
    (root / "params" / "experiments.yaml").write_text(
        "experiments:\n" + "".join(f"  {name}:\n    title: {title}\n    needs: [{', '.join(needs)}]\n"
                                   for name, (title, needs) in experiments.items()))
    return root


def make_probe_project(root: Path) -> Path:
    root = project_skeleton(root, "test", {"10_probe": ("Probe notebook", []),
                                           "11_after": ("Reads the probe", ["10_probe"])})
    (root / "params" / "schema" / "10_probe.yaml").write_text(
        "n: {type: int, min: 1, max: 1000, help: rows of the table}\n"
        "fail: {type: bool, default: false}\n"
        "sleep_s: {type: float, min: 0, max: 600, default: 0.0}\n"
        "label: {type: str, default: probe}\n")
    (root / "params" / "schema" / "11_after.yaml").write_text("factor: {type: int, min: 1}\n")
    (root / "params" / "test" / "defaults.yaml").write_text("label: shared-label\n")
    (root / "params" / "test" / "10_probe.yaml").write_text("n: 4\n")
    (root / "params" / "test" / "11_after.yaml").write_text("factor: 3\n")
    nbformat.write(notebook(PROBE_CELLS), str(root / "notebooks" / "10_probe.ipynb"))
    nbformat.write(notebook(AFTER_CELLS), str(root / "notebooks" / "11_after.ipynb"))
    return root
