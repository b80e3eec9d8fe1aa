"""README's headline-numbers table: built from summary.json, replaced between its markers, checked."""

from __future__ import annotations

import json

import pytest

from seglab import SeglabError
from seglab.workflow import readme

HEAD = {"00_x": [("n_tiles", "tiles")], "01_y": [("test_ap50_baseline", "AP"), ("ok", "a flag")]}
TEXT = "# T\n\nbefore\n\n{block}\n\nafter\n"


def test_values_are_formatted_by_type():
    assert readme.format_value(0.77312) == "0.7731"
    assert readme.format_value(0.5) == "0.5000"
    assert readme.format_value(30.0) == "30.0000"
    assert readme.format_value(480) == "480"
    assert readme.format_value(True) == "true" and readme.format_value(False) == "false"
    assert readme.format_value(None) == "null"
    assert readme.format_value(float("nan")) == "nan"
    assert readme.format_value("um2") == "um2"


def test_rows_say_missing_key_and_missing_run():
    rows = readme.table_rows({"00_x": {"n_tiles": 480, "other": 1}, "01_y": None}, HEAD)
    assert rows == [("00_x", "n_tiles", "480", "tiles"), ("01_y", "test_ap50_baseline", "no run", "AP"),
                    ("01_y", "ok", "no run", "a flag")]
    rows = readme.table_rows({"00_x": {}, "01_y": {"test_ap50_baseline": 0.8, "ok": True}}, HEAD)
    assert [r[2] for r in rows] == ["missing", "0.8000", "true"]


def test_block_replaces_only_the_marked_text_and_is_idempotent():
    old = readme.render_block({"00_x": {"n_tiles": 1}, "01_y": None}, "demo", headlines=HEAD)
    text = TEXT.format(block=old)
    new = readme.render_block({"00_x": {"n_tiles": 480}, "01_y": {"test_ap50_baseline": 0.77312, "ok": True}},
                              "demo", {"00_x": "20250101-000000-a", "01_y": "20250101-000001-b"}, headlines=HEAD)
    out = readme.replace_block(text, new)
    assert out.startswith("# T\n\nbefore\n\n" + readme.START) and out.endswith(readme.END + "\n\nafter\n")
    assert "| 01_y | `test_ap50_baseline` | 0.7731 | AP |" in out
    assert "runs: 00_x `20250101-000000-a`, 01_y `20250101-000001-b`." in out
    assert readme.replace_block(out, new) == out
    assert readme.extract_block(out) == new


@pytest.mark.parametrize("text, fragment", [
    ("no markers\n", "found 0 and 0"),
    (f"{readme.START}\n{readme.START}\n{readme.END}\n", "found 2 and 1"),
    (f"{readme.END}\n{readme.START}\n", "comes before"),
])
def test_markers_must_be_there_once_and_in_order(text, fragment):
    with pytest.raises(SeglabError, match=fragment):
        readme.replace_block(text, "x", "R.md")


def test_differing_rows_name_notebook_key_and_both_values():
    runs = readme.render_block({"00_x": {"n_tiles": 480}, "01_y": {"test_ap50_baseline": 0.8, "ok": True}},
                               "demo", {"00_x": "run-a", "01_y": "run-b"}, headlines=HEAD)
    same_numbers_other_runs = runs.replace("run-a", "run-z")
    assert readme.differing_rows(same_numbers_other_runs, runs) == []
    stale = runs.replace("| 0.8000 |", "| 0.773 |")
    assert readme.differing_rows(stale, runs) == ["01_y test_ap50_baseline: README 0.773, runs 0.8000"]
    short = "\n".join(line for line in runs.splitlines() if "`ok`" not in line)
    assert readme.differing_rows(short, runs) == ["01_y ok: not in README (runs: true)"]
    extra = runs.replace(readme.END, "| 01_y | `old_key` | 1 | gone |\n" + readme.END)
    assert readme.differing_rows(extra, runs) == ["01_y old_key: in README (1) but not a headline number"]


def _run(root, notebook, run_id, status, summary=None):
    d = root / "runs" / notebook / "demo" / run_id
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"status": status}))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_collect_reads_the_latest_done_run(probe_root):
    _run(probe_root, "00_x", "20250101-000000-aaaa", "done", {"n_tiles": 10})
    _run(probe_root, "00_x", "20250102-000000-bbbb", "done", {"n_tiles": 480})
    _run(probe_root, "00_x", "20250103-000000-cccc", "failed", {"n_tiles": 1})
    _run(probe_root, "01_y", "20250101-000000-dddd", "done")
    summaries, run_ids = readme.collect("demo", ["00_x", "01_y", "02_z"])
    assert summaries == {"00_x": {"n_tiles": 480}, "01_y": {}, "02_z": None}
    assert run_ids == {"00_x": "20250102-000000-bbbb", "01_y": "20250101-000000-dddd", "02_z": None}


def test_cli_writes_then_checks(probe_root, monkeypatch, capsys):
    from seglab.cli import main

    monkeypatch.setattr(readme, "HEADLINES", HEAD)
    modules = readme.render_modules_block(sorted((probe_root / "notebooks").glob("*.ipynb")))
    (probe_root / "README.md").write_text(TEXT.format(block=f"{readme.START}\n{readme.END}") + "\n" + modules + "\n")
    _run(probe_root, "00_x", "20250101-000000-aaaa", "done", {"n_tiles": 480})
    assert main(["readme-numbers", "--profile", "demo"]) == 1
    assert "no done demo run of 01_y" in capsys.readouterr().err
    _run(probe_root, "01_y", "20250101-000000-bbbb", "done", {"test_ap50_baseline": 0.81234, "ok": False})
    assert main(["readme-numbers", "--profile", "demo", "--check"]) == 1
    err = capsys.readouterr().err
    assert "differs from the latest done demo runs in 3 row(s)" in err
    assert "00_x n_tiles: not in README (runs: 480)" in err
    assert "seglab readme-numbers --profile demo" in err
    assert main(["readme-numbers", "--profile", "demo"]) == 0
    text = (probe_root / "README.md").read_text()
    assert "| 01_y | `test_ap50_baseline` | 0.8123 | AP |" in text and "\n\nafter\n" in text
    assert main(["readme-numbers", "--profile", "demo", "--check"]) == 0
    _run(probe_root, "01_y", "20250102-000000-cccc", "done", {"test_ap50_baseline": 0.9, "ok": False})
    assert main(["readme-numbers", "--profile", "demo", "--check"]) == 1
    assert "01_y test_ap50_baseline: README 0.8123, runs 0.9000" in capsys.readouterr().err


def test_the_readme_table_has_one_row_per_headline_number(repo_root):
    """README's table lists exactly HEADLINES' rows, in order (the values come from a demo run)."""
    rows = readme.parse_rows(readme.extract_block((repo_root / "README.md").read_text()))
    assert list(rows) == [(nb, key) for nb, keys in readme.HEADLINES.items() for key, _ in keys]


def test_the_modules_table_lists_what_each_notebook_imports(probe_root, capsys):
    import nbformat

    from seglab.cli import main

    nb_path = probe_root / "notebooks" / "10_probe.ipynb"
    nb = nbformat.read(str(nb_path), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("from seglab.segment import models, dynamics\n"
                                              "from seglab.evaluate.scoring import evaluate_masks\nimport seglab.core.io"))
    nbformat.write(nb, str(nb_path))
    assert readme.notebook_modules(nb_path) == ["core.io", "evaluate.scoring", "segment.dynamics", "segment.models",
                                                "workflow.runs"]
    block = readme.render_modules_block([nb_path])
    assert "| `10_probe` | `core.io`, `evaluate.scoring`, `segment.dynamics`, `segment.models`, `workflow.runs` |" \
        in block
    stale = TEXT.format(block=f"{readme.START}\n{readme.END}") + readme.render_modules_block([]) + "\n"
    (probe_root / "README.md").write_text(stale)
    assert main(["readme-numbers", "--profile", "demo", "--check"]) == 1
    assert "modules each notebook calls is out of date" in capsys.readouterr().err
    with pytest.raises(SeglabError, match="notebook-modules:start"):
        readme.replace_modules_block("no markers", block)
