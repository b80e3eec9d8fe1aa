"""README's headline-numbers table, generated from the runs' ``summary.json``.

README.md holds a table of each notebook's headline numbers between two marker
comments::

    <!-- headline-numbers:start -->
    ...
    <!-- headline-numbers:end -->

:func:`render_block` builds that block from ``{notebook: summary dict}`` (the
latest done run of each notebook, :func:`collect`), :func:`replace_block` puts
it into the README's text, and :func:`differing_rows` names the rows in which
the README and the runs disagree (``seglab readme-numbers --check``). Which
numbers are headline numbers is :data:`HEADLINES`: for each notebook, the
``summary.json`` keys in table order with a few words on each.

Values: floats with 4 decimals, integers as integers, booleans as true/false,
null as null; a key the summary lacks shows ``missing``, a notebook without a
done run ``no run``.

>>> block = render_block({"01_x": {"test_ap50_baseline": 0.77312, "n_test_tiles": 24}}, "demo",
...                      headlines={"01_x": [("test_ap50_baseline", "test AP@0.5"), ("n_test_tiles", "tiles")]})
>>> print(block.splitlines()[4])
| 01_x | `test_ap50_baseline` | 0.7731 | test AP@0.5 |
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from seglab import SeglabError

START = "<!-- headline-numbers:start -->"
END = "<!-- headline-numbers:end -->"
MISSING = "missing"
NO_RUN = "no run"

# notebook -> [(summary.json key, what it is)], in table order. A key a notebook stops
# writing shows as `missing` (and fails `--check`): rename it here too.
HEADLINES: dict[str, list[tuple[str, str]]] = {
    "00_data": [
        ("n_tiles", "paired tiles in the cohort"),
        ("n_donors", "donors with tiles"),
        ("n_annotated", "annotated tiles"),
        ("n_train", "annotated tiles, train split"),
        ("n_val", "annotated tiles, validation split"),
        ("n_test", "annotated tiles, test split"),
    ],
    "01_baseline_vs_finetune": [
        ("test_ap50_baseline", "test AP@0.5, generalist baseline"),
        ("test_ap50_finetuned_generic", "test AP@0.5, fine-tuned on every marker"),
        ("test_ap50_finetuned_generic_gfap", "test AP@0.5 on the gfap tiles, fine-tuned on every marker"),
        ("test_ap50_finetuned_marker_specific", "test AP@0.5 on the gfap tiles, fine-tuned on gfap only"),
        ("test_ap50_finetuned_marker_only", "test AP@0.5, fine-tuned with DAPI zeroed"),
        ("test_ap50_diff_finetuned_generic_vs_baseline", "paired gain in test AP@0.5, fine-tuned on every marker - baseline"),
        ("test_ap50_diff_finetuned_generic_vs_baseline_ci_low", "its 95% t interval over test donors: low end"),
        ("test_ap50_diff_finetuned_generic_vs_baseline_ci_high", "high end"),
        ("finetuned_generic_beats_baseline", "true only when that interval lies above 0"),
    ],
    "02_label_efficiency": [
        ("val_ap50_baseline", "val AP@0.5, no fine-tuning"),
        ("val_ap50_budget_4_mean", "val AP@0.5, 4 training tiles (mean of repeats)"),
        ("val_ap50_budget_4_sd", "its standard deviation over repeats"),
        ("val_ap50_budget_12_mean", "val AP@0.5, 12 training tiles"),
        ("val_ap50_budget_36_mean", "val AP@0.5, 36 training tiles"),
        ("val_ap50_finetuned_generic", "val AP@0.5, every training tile"),
        ("plateau_budget", "smallest budget within the tolerance of the best"),
        ("plateau_budget_ci", "smallest budget whose interval of (budget - all tiles) stays above -tolerance"),
    ],
    "03_gating": [
        ("gate_min_area_px_baseline", "minimum area (px) validation picks for the baseline"),
        ("gate_q_low_baseline", "lower intensity quantile picked (0 = no gate)"),
        ("gate_q_high_baseline", "upper intensity quantile picked (1 = no gate)"),
        ("test_fp_baseline", "test false positives, baseline"),
        ("test_fp_baseline_gated", "the same after its gate"),
        ("test_removed_tp_baseline", "true positives its gate removes"),
        ("test_fp_finetuned_generic", "test false positives, fine-tuned"),
        ("test_fp_finetuned_generic_gated", "the same after its gate"),
    ],
    "04_sensitivity": [
        ("val_ap50_range_cellprob_threshold_baseline", "val AP@0.5 range over cellprob thresholds, baseline"),
        ("val_ap50_range_cellprob_threshold_finetuned_generic", "the same, fine-tuned"),
        ("val_ap50_range_flow_threshold_baseline", "val AP@0.5 range over flow thresholds, baseline"),
        ("val_ap50_range_flow_threshold_finetuned_generic", "the same, fine-tuned"),
        ("val_ap50_range_diameter_factor_finetuned_generic", "val AP@0.5 range over diameters, fine-tuned"),
    ],
    "05_downstream": [
        ("n_tiles", "tiles analysed"),
        ("sig_tests_truth", "significant tests with the true masks"),
        ("truth_calls_recovered_finetuned", "fraction of those the fine-tuned masks find"),
        ("truth_calls_recovered_baseline", "fraction the baseline masks find"),
        ("sig_tests_finetuned", "significant tests with the fine-tuned masks"),
        ("sig_tests_baseline", "significant tests with the baseline masks"),
        ("false_calls_vs_truth_finetuned", "fraction of the fine-tuned masks' calls the true masks do not make"),
        ("false_calls_vs_truth_baseline", "the same, baseline"),
        ("planted_sign_correct_finetuned", "planted effects with the right sign, fine-tuned"),
        ("planted_sign_correct_baseline", "the same, baseline"),
        ("mean_abs_rho_diff_vs_truth_finetuned", "mean abs rho difference to the true masks, fine-tuned"),
        ("mean_abs_rho_diff_vs_truth_baseline", "the same, baseline"),
        ("null_false_positives_finetuned", "null markers called significant, fine-tuned"),
        ("null_false_positives_baseline", "the same, baseline"),
    ],
    "06_leave_one_marker_out": [
        ("test_ap50_generic_mean", "mean test AP@0.5 over markers, fine-tuned on every marker"),
        ("test_ap50_lomo_mean", "the same, the marker held out of fine-tuning"),
        ("test_ap50_baseline_mean", "the same, generalist baseline"),
        ("test_ap50_gap_max", "largest cost of holding a marker out"),
        ("test_ap50_generic_neun", "test AP@0.5 on neun, fine-tuned on every marker"),
        ("test_ap50_lomo_neun", "the same, neun held out"),
        ("test_ap50_diff_generic_vs_lomo_all", "paired cost of holding a marker out, over every held-out tile"),
        ("test_ap50_diff_generic_vs_lomo_all_ci_low", "its 95% t interval over test donors: low end"),
        ("test_ap50_diff_generic_vs_lomo_all_ci_high", "high end"),
    ],
}

_ROW = re.compile(r"^\| (?P<notebook>[^|\s]+) \| `(?P<key>[^`]+)` \| (?P<value>[^|]*?) \|")


def format_value(value) -> str:
    """Floats with 4 decimals, integers as integers, booleans true/false, None null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def table_rows(summaries: dict[str, dict | None],
               headlines: dict[str, list[tuple[str, str]]] | None = None) -> list[tuple[str, str, str, str]]:
    """(notebook, key, value, meaning) for every headline number; ``summaries[nb]`` None = no done run."""
    headlines = HEADLINES if headlines is None else headlines
    rows = []
    for notebook, keys in headlines.items():
        summary = summaries.get(notebook)
        for key, meaning in keys:
            if summary is None:
                value = NO_RUN
            elif key not in summary:
                value = MISSING
            else:
                value = format_value(summary[key])
            rows.append((notebook, key, value, meaning))
    return rows


def render_block(summaries: dict[str, dict | None], profile: str, run_ids: dict[str, str | None] | None = None,
                 headlines: dict[str, list[tuple[str, str]]] | None = None) -> str:
    """The README block, markers included, from ``{notebook: summary}`` of ``profile``'s runs."""
    lines = [START,
             f"<!-- generated by `seglab readme-numbers --profile {profile}` from each notebook's latest done run; "
             "do not edit by hand -->",
             "| notebook | number (`summary.json`) | value | what it is |",
             "|---|---|---|---|"]
    lines += [f"| {nb} | `{key}` | {value} | {meaning} |" for nb, key, value, meaning in table_rows(summaries, headlines)]
    if run_ids is not None:
        lines += ["", f"Profile `{profile}`; runs: "
                  + ", ".join(f"{nb} `{rid}`" if rid else f"{nb} (none)" for nb, rid in run_ids.items()) + "."]
    lines.append(END)
    return "\n".join(lines)


def _span(text: str, source: str = "README.md") -> tuple[int, int]:
    starts, ends = text.count(START), text.count(END)
    if starts != 1 or ends != 1:
        raise SeglabError(f"{source}: needs exactly one '{START}' and one '{END}' (found {starts} and {ends}); "
                          "put the two lines where the headline-numbers table goes")
    i, j = text.index(START), text.index(END)
    if j < i:
        raise SeglabError(f"{source}: '{END}' comes before '{START}'")
    return i, j + len(END)


def extract_block(text: str, source: str = "README.md") -> str:
    """The block between (and including) the two markers."""
    i, j = _span(text, source)
    return text[i:j]


def replace_block(text: str, block: str, source: str = "README.md") -> str:
    """``text`` with its marked block replaced by ``block`` (which carries the markers)."""
    i, j = _span(text, source)
    return text[:i] + block + text[j:]


def parse_rows(block: str) -> dict[tuple[str, str], str]:
    """{(notebook, key): value} of the table rows of a block."""
    out = {}
    for line in block.splitlines():
        m = _ROW.match(line)
        if m:
            out[(m["notebook"], m["key"])] = m["value"].strip()
    return out


def differing_rows(readme_block: str, expected_block: str) -> list[str]:
    """One line per row in which the README's table and the runs disagree (empty: they agree).

    Only the table's rows count: the line naming the runs may change while the numbers do not."""
    have, want = parse_rows(readme_block), parse_rows(expected_block)
    out = []
    for (nb, key), value in want.items():
        if (nb, key) not in have:
            out.append(f"{nb} {key}: not in README (runs: {value})")
        elif have[(nb, key)] != value:
            out.append(f"{nb} {key}: README {have[(nb, key)]}, runs {value}")
    out += [f"{nb} {key}: in README ({value}) but not a headline number"
            for (nb, key), value in have.items() if (nb, key) not in want]
    if not out and list(have) != list(want):
        out.append("the rows are in another order than the runs' table")
    return out


def collect(profile: str, notebooks: list[str] | None = None) -> tuple[dict[str, dict | None], dict[str, str | None]]:
    """({notebook: summary.json of its latest done run or None}, {notebook: run id or None})."""
    from seglab.workflow.runs import SUMMARY, latest_run

    summaries, run_ids = {}, {}
    for nb in notebooks or list(HEADLINES):
        run_dir = latest_run(nb, profile)
        if run_dir is None:
            summaries[nb], run_ids[nb] = None, None
            continue
        f = Path(run_dir) / SUMMARY
        summaries[nb] = json.loads(f.read_text()) if f.is_file() else {}   # no summary: every key `missing`
        run_ids[nb] = run_dir.name
    return summaries, run_ids


# --------------------------------------------------------------------------------------
# which library modules each notebook calls
# --------------------------------------------------------------------------------------

MODULES_START = "<!-- notebook-modules:start -->"
MODULES_END = "<!-- notebook-modules:end -->"


def notebook_modules(notebook: str | Path) -> list[str]:
    """The ``seglab`` modules a notebook's code cells import (``from seglab.x import y`` gives
    ``x.y`` when ``y`` is a module, else ``x``), sorted, without the ``seglab.`` prefix."""
    import ast
    import importlib.util

    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    found = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seglab"):
                package = importlib.util.find_spec(node.module).submodule_search_locations is not None
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if package and importlib.util.find_spec(full) is not None else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("seglab."))
    return sorted(m.removeprefix("seglab.") for m in found if m != "seglab")


def render_modules_block(notebooks: list[Path]) -> str:
    """README's table "notebook -> library modules it calls", between its two markers."""
    lines = [MODULES_START, "", "| notebook | modules (`seglab.` ...) |", "|---|---|"]
    lines += [f"| `{p.stem}` | " + ", ".join(f"`{m}`" for m in notebook_modules(p)) + " |" for p in notebooks]
    lines += ["", MODULES_END]
    return "\n".join(lines)


def replace_modules_block(text: str, block: str, source: str = "README.md") -> str:
    """``text`` with its notebook-modules block replaced by ``block``."""
    if text.count(MODULES_START) != 1 or text.count(MODULES_END) != 1:
        raise SeglabError(f"{source}: needs exactly one '{MODULES_START}' and one '{MODULES_END}'; put the two "
                          "lines where the table of the modules each notebook calls goes")
    i, j = text.index(MODULES_START), text.index(MODULES_END) + len(MODULES_END)
    return text[:i] + block + text[j:]
