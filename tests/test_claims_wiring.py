"""How the notebooks' claims carry their intervals (issue #20): the naming convention of the summary
keys (seglab.evaluate.claims.claim_summary / find_claims), degenerate donors and models without
tiles, the figures whose bars are the intervals, and the status page's claims. Constructed per-tile
tables only: no training, no network."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from seglab import SeglabError
from seglab.evaluate import claims
from seglab.plots import claims as plots_claims
from seglab.workflow import report


def tiles(model: str, tp: list[float], *, n_true: int = 10, fp: int = 2, donors=None, marker: str = "gfap",
          threshold: float = 0.5) -> pd.DataFrame:
    """One model's per-tile rows: tile i has ``tp[i]`` true positives of ``n_true`` objects, of donor
    ``donors[i]`` (default: one tile per donor)."""
    donors = donors or [f"d{i}" for i in range(len(tp))]
    return pd.DataFrame({"model": model, "image": [f"t{i}" for i in range(len(tp))], "donor": donors,
                         "marker": marker, "threshold": threshold, "tp": tp, "fp": fp,
                         "fn": [n_true - t for t in tp]})


def long_table() -> pd.DataFrame:
    """A better on 5 donors: B finds 1-2 more objects on every tile; C is A with one donor's tile worse."""
    return pd.concat([tiles("a", [5, 6, 5, 6, 5]), tiles("b", [6, 8, 6, 7, 7]), tiles("c", [5, 6, 5, 6, 1])],
                     ignore_index=True)


def test_claim_summary_names_keys_by_the_convention_and_the_flag_follows_the_interval():
    table = claims.compare_pairs(long_table(), [("a", "b"), ("a", "c")])
    keys = claims.claim_summary(table, "a", "b", prefix="test_ap50")
    assert set(keys) == {"test_ap50_diff_b_vs_a", "test_ap50_diff_b_vs_a_ci_low", "test_ap50_diff_b_vs_a_ci_high",
                         "test_ap50_diff_b_vs_a_p_value", "test_ap50_diff_b_vs_a_n_donors", "b_beats_a"}
    assert keys["test_ap50_diff_b_vs_a_ci_low"] > 0 and keys["b_beats_a"] is True
    assert keys["test_ap50_diff_b_vs_a_n_donors"] == 5
    worse = claims.claim_summary(table, "a", "c", prefix="val_ap50", suffix="_gfap")
    assert worse["c_beats_a_gfap"] is False and worse["val_ap50_diff_c_vs_a_gfap"] < 0
    # names with brackets or '+' become key parts
    assert claims.slug("finetuned_generic[gfap+iba1]") == "finetuned_generic_gfap_iba1"


@pytest.mark.parametrize("n_donors, finite, note", [(1, False, "1 donor"), (2, True, "2 donors"), (3, True, "")])
def test_few_donors_give_no_or_a_wide_interval_and_say_why(n_donors, finite, note):
    donors = [f"d{i % n_donors}" for i in range(6)]
    long = pd.concat([tiles("a", [5, 6, 5, 6, 5, 6], donors=donors), tiles("b", [7, 6, 6, 8, 6, 7], donors=donors)])
    table = claims.compare_pairs(long, [("a", "b")])
    keys = claims.claim_summary(table, "a", "b", prefix="test_ap50")
    low, high = keys["test_ap50_diff_b_vs_a_ci_low"], keys["test_ap50_diff_b_vs_a_ci_high"]
    assert math.isfinite(low) is finite and math.isfinite(high) is finite
    assert keys.get("test_ap50_diff_b_vs_a_note", "").startswith(note) and keys["test_ap50_diff_b_vs_a_n_donors"] == n_donors
    if not finite:
        assert keys["b_beats_a"] is False          # no interval, no claim
    if n_donors == 2:
        assert high - low > 0.3                     # 1 degree of freedom: very wide


def test_a_model_without_tiles_gives_nan_rows_not_an_error():
    long = long_table()
    with pytest.raises(claims.ClaimsInputError):
        claims.compare_pairs(long, [("a", "nothing")])
    table = claims.compare_pairs(long, [("a", "b"), ("a", "nothing")], missing="nan")
    empty = table[table["b"] == "nothing"]
    assert len(empty) == len(claims.METRICS) and list(table.columns) == claims.TABLE_COLUMNS
    assert empty["difference"].isna().all() and (empty["n_donors"] == 0).all()
    assert empty["method"].iloc[0].startswith("no tiles for nothing")
    keys = claims.claim_summary(table, "a", "nothing", prefix="test_ap50")
    assert keys["nothing_beats_a"] is False and keys["test_ap50_diff_nothing_vs_a_note"].startswith("no tiles")
    # the rows that could be compared are the ones compare gives
    pd.testing.assert_frame_equal(table[table["b"] == "b"].reset_index(drop=True),
                                  claims.compare_pairs(long, [("a", "b")]))
    assert claims.interval_label(table) == "95% t interval over donors"


def test_interval_label_names_each_interval():
    long = long_table()
    pairs = [("a", "b")]
    assert claims.interval_label(claims.compare_pairs(long, pairs, interval_method="bca", n_resamples=200)) == \
        "95% BCa interval, bootstrap of donors, then tiles within donors"
    assert claims.interval_label(claims.compare_pairs(long, pairs, ci_level=0.9)) == "90% t interval over donors"
    assert claims.interval_label(claims.compare_pairs(long, pairs, cluster=False)) == "95% t interval over tiles"
    spread = pd.concat([tiles("m", [5, 6, 5, 6, 5]).assign(value=v) for v in (1, 2)])
    assert claims.interval_label(claims.grid_range(spread, n_resamples=50, n_permutations=19)) == \
        "95% percentile interval, bootstrap of donors, then tiles within donors"


def test_find_claims_reads_the_summary_back_either_way_round():
    table = claims.compare_pairs(long_table(), [("a", "b"), ("c", "a")])
    summary = {**claims.claim_summary(table, "a", "b", prefix="test_ap50"),
               **claims.claim_summary(table, "c", "a", prefix="test_ap50", suffix="_selected"),
               "old_beats_new": True, "mean_abs_rho_diff_vs_truth_x": 0.1}
    found = {c["flag"]: c for c in claims.find_claims(summary)}
    assert set(found) == {"b_beats_a", "a_beats_c_selected"}       # a flag without a difference is no claim
    b = found["b_beats_a"]
    assert (b["winner"], b["loser"], b["prefix"], b["n_donors"]) == ("b", "a", "test_ap50", 5)
    assert b["difference"] == summary["test_ap50_diff_b_vs_a"] and b["holds"] is True
    # a flag written as a_beats_c against the difference c - a would be turned round; here a - c directly
    c = found["a_beats_c_selected"]
    assert c["difference"] == pytest.approx(summary["test_ap50_diff_a_vs_c_selected"])
    turned = claims.find_claims({"a_beats_c": False, "test_ap50_diff_c_vs_a": -0.1, "test_ap50_diff_c_vs_a_ci_low": -0.3,
                                 "test_ap50_diff_c_vs_a_ci_high": 0.05})
    assert (turned[0]["difference"], turned[0]["ci_low"], turned[0]["ci_high"]) == pytest.approx((0.1, -0.05, 0.3))


# --------------------------------------------------------------------------- figures


def test_forest_plot_draws_intervals_nan_rows_and_says_which_interval():
    table = claims.compare_pairs(long_table(), [("a", "b"), ("a", "c"), ("a", "nothing")], missing="nan")
    fig = plots_claims.plot_differences(table, labels={"b": "model B"}, title="t")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert "95% t interval over donors" in ax.get_xlabel()
    assert {t.get_text() for t in ax.get_yticklabels()} == {"model B − a", "c − a", "nothing − a"}
    beside = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert any(t.startswith("no tiles") for t in beside) and any("5 donors" in t for t in beside)
    # the bar of B - A is its interval, not an SD
    row = table[(table["b"] == "b") & (table["metric"] == "ap")].iloc[0]
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    assert any(np.allclose([seg[0][0], seg[1][0]], [row["ci_low"], row["ci_high"]]) for seg in segments)
    panels = plots_claims.plot_differences(pd.concat([table.assign(thresholds="default"),
                                                       table.assign(thresholds="selected")]), panel="thresholds")
    assert len([a for a in panels.axes if a.get_title()]) == 2
    with pytest.raises(SeglabError, match="no rows"):
        plots_claims.plot_differences(table, threshold=0.75)


def test_difference_curve_against_a_budget():
    long = pd.concat([tiles("all", [8, 8, 8, 8]), tiles("budget_4", [6, 7, 6, 7]), tiles("budget_12", [8, 7, 8, 8])])
    table = claims.compare_pairs(long, [("all", "budget_4"), ("all", "budget_12")])
    table["budget"] = [int(b.split("_")[1]) for b in table["b"]]
    fig = plots_claims.plot_difference_curve(table, "budget", tolerance=0.02, mark=(12, "plateau"))
    ax = fig.axes[0]
    assert "95% t interval over donors" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "12"]


# --------------------------------------------------------------------------- the status page


def e1_like_summary() -> dict:
    long = pd.concat([tiles("baseline", [5, 6, 5, 6, 5, 6]), tiles("finetuned_generic", [6, 7, 6, 7, 7, 7]),
                      tiles("finetuned_marker_only", [0, 0, 1, 0, 0, 0])])
    table = claims.compare_pairs(long, [("baseline", "finetuned_generic"), ("baseline", "finetuned_marker_only")])
    return {"test_ap50_baseline": 0.77, "test_ap50_finetuned_generic": 0.82,
            **claims.claim_summary(table, "baseline", "finetuned_marker_only", prefix="test_ap50"),
            **claims.claim_summary(table, "baseline", "finetuned_generic", prefix="test_ap50"),
            "claims_interval": claims.interval_label(table), "headline_claim": "finetuned_generic_beats_baseline",
            "mean_abs_rho_diff_vs_truth_baseline": 0.1, "val_ap50_range_x_m": 0.2, "val_ap50_range_x_m_ci_low": 0.1,
            "val_ap50_range_x_m_ci_high": 0.3}


def test_status_page_shows_the_headline_claim_first_with_its_interval():
    summary = e1_like_summary()
    page = report.claims_html(summary)
    assert "claims (95% t interval over donors; yes only when the interval excludes 0)" in page
    first = page.split("<li")[1]
    d = summary["test_ap50_diff_finetuned_generic_vs_baseline"]
    lo, hi = (summary[f"test_ap50_diff_finetuned_generic_vs_baseline_ci_{s}"] for s in ("low", "high"))
    assert f"fine-tuned generic beats baseline: yes, {d:+.3f} test AP@0.5 [{lo:.3f}, {hi:.3f}], 6 donors" in first
    assert "fine-tuned marker only beats baseline: no, the reverse holds" in page
    shown = [k for k, _ in report.headline_items(summary)]
    # claim keys are shown as claims; other keys with _diff_ (E5's) and E4's ranges stay numbers
    assert shown == ["test_ap50_baseline", "test_ap50_finetuned_generic", "val_ap50_range_x_m",
                     "mean_abs_rho_diff_vs_truth_baseline"]
    assert report.claims_html({"test_ap50_x": 0.5}) == ""


def test_status_page_claim_without_interval_says_why():
    long = pd.concat([tiles("a", [5, 6], donors=["d0", "d0"]), tiles("b", [7, 8], donors=["d0", "d0"])])
    summary = claims.claim_summary(claims.compare_pairs(long, [("a", "b")]), "a", "b", prefix="test_ap50")
    found = claims.find_claims(io_round_trip(summary))
    text = report.claim_text(found[0])
    assert text.startswith("b beats a: not shown, +") and "(no interval), 1 donor; 1 donor: no interval" in text
    empty = claims.compare_pairs(long, [("a", "none")], missing="nan")
    gone = claims.find_claims(io_round_trip(claims.claim_summary(empty, "a", "none", prefix="test_ap50")))
    assert report.claim_text(gone[0]) == "none beats a: not shown (no tiles: nothing to compare, no claim)"


def io_round_trip(summary: dict) -> dict:
    """The summary as summary.json gives it back (NaN written as null)."""
    import json

    from seglab.core import io

    return json.loads(io.json_text(summary))
