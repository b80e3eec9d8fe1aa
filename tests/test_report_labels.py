"""The status page's headline numbers: readable labels and units from summary.json keys (pure, no runs)."""

from __future__ import annotations

import pytest

from seglab.workflow.report import headline_html, headline_label


@pytest.mark.parametrize("key, label, unit", [
    ("test_ap50_finetuned_generic", "test AP@0.5, fine-tuned generic", "fraction"),
    ("test_ap75_baseline", "test AP@0.75, baseline", "fraction"),
    ("val_ap90_finetuned", "val AP@0.9, fine-tuned", "fraction"),
    ("test_ap50", "test AP@0.5", "fraction"),
    ("val_f1_selected", "val F1, selected", "fraction"),
    ("test_precision_baseline", "test precision, baseline", "fraction"),
    ("test_recall_finetuned_generic", "test recall, fine-tuned generic", "fraction"),
    ("val_ap50_budget_4_sd", "val AP@0.5, budget 4 SD", "fraction"),
    ("test_ap50_lomo_neun", "test AP@0.5, marker held out neun", "fraction"),
    ("test_fp_baseline_gated", "test false positives, baseline gated", "count"),
    ("test_removed_tp_baseline", "test true positives removed, baseline", "count"),
    ("sig_tests_truth", "significant tests, truth masks", "count"),
    ("sig_tests", "significant tests", "count"),
    ("n_tiles", "tiles", "count"),
    ("prepare_s", "prepare", "seconds"),
    ("fine_tune_s", "fine tune", "seconds"),
    ("median_diameter_px", "median diameter", "px"),
])
def test_summary_keys_become_labels_with_units(key, label, unit):
    assert headline_label(key) == (label, unit)


@pytest.mark.parametrize("key", ["sum_of_squares", "plateau_budget", "test", "val_something_else", "label", "x"])
def test_unknown_keys_fall_back_to_the_key_with_spaces_and_no_unit(key):
    assert headline_label(key) == (key.replace("_", " "), "")


def test_the_status_page_item_shows_label_value_unit_and_keeps_the_raw_key():
    item = headline_html("test_ap50_finetuned_generic", 0.8312)
    assert "test AP@0.5, fine-tuned generic: <b>0.831 <span class='unit'>fraction</span></b>" in item
    assert "title='test_ap50_finetuned_generic'" in item and "<code class='key'>test_ap50_finetuned_generic</code>" in item
    assert "<b>12.5 <span class='unit'>s</span></b>" in headline_html("prepare_s", 12.5)
    assert "<b>480 <span class='unit'>count</span></b>" in headline_html("n_tiles", 480)
    assert "sum of squares: <b>14</b> <code class='key'>sum_of_squares</code>" in headline_html("sum_of_squares", 14)
    assert "&lt;b&gt;" in headline_html("<b>", 1)    # keys are escaped
