"""Post-processing gates remove exactly the instances they should, and nothing else."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from seglab import SeglabError
from seglab.segment.postprocess import Gate, apply_gate, gate_grid, instance_stats, sweep_gates


def scene():
    labels = np.zeros((40, 40), np.uint16)
    image = np.zeros((40, 40), np.float32)
    labels[2:12, 2:12] = 5;   image[2:12, 2:12] = 100     # normal cell, area 100
    labels[20:30, 2:12] = 9;  image[20:30, 2:12] = 110    # normal cell
    labels[2:12, 20:30] = 11; image[2:12, 20:30] = 5      # dim (background texture)
    labels[30:32, 30:32] = 40; image[30:32, 30:32] = 900  # bright punctum, area 4
    labels[20:30, 20:30] = 7; image[20:30, 20:30] = 95
    return labels, image


def test_instance_stats_match_a_direct_computation():
    labels, image = scene()
    stats = instance_stats(labels, image, pixel_size_um=0.5).set_index("label")
    for lab in (5, 7, 9, 11, 40):
        assert stats.loc[lab, "area_px"] == (labels == lab).sum()
        assert stats.loc[lab, "mean_intensity"] == pytest.approx(image[labels == lab].mean())
        assert stats.loc[lab, "area_um2"] == pytest.approx((labels == lab).sum() * 0.25)
    assert np.isnan(instance_stats(labels, image)["area_um2"]).all()


def test_area_and_quantile_gates_remove_the_expected_instances():
    labels, image = scene()
    gated, d = apply_gate(labels, image, Gate(min_area_px=10))
    assert set(np.unique(gated)) == {0, 5, 7, 9, 11}
    assert d.set_index("label").loc[40, "reason"] == "area"
    # quantiles over the 5 instance means (5, 95, 100, 110, 900): q in [0.2, 0.8] keeps 95..110
    gated, d = apply_gate(labels, image, Gate(q_low=0.2, q_high=0.8))
    assert set(np.unique(gated)) == {0, 5, 7, 9}
    assert dict(zip(d["label"], d["reason"])) == {5: "", 7: "", 9: "", 11: "dim", 40: "bright"}
    kept = gated > 0
    assert np.array_equal(gated[kept], labels[kept])  # kept pixels untouched, ids not renumbered
    assert gated.dtype == labels.dtype


def test_micrometre_area_gate_needs_and_uses_pixel_size():
    labels, image = scene()
    with pytest.raises(SeglabError, match="needs pixel_size_um"):
        apply_gate(labels, image, Gate(min_area_um2=2.0))
    gated, _ = apply_gate(labels, image, Gate(min_area_um2=2.0), pixel_size_um=0.5)  # 4 px = 1 um^2 < 2
    assert 40 not in gated and 5 in gated


def test_gate_off_is_identity_and_empty_tile_is_fine():
    labels, image = scene()
    gated, d = apply_gate(labels, image, Gate())
    assert np.array_equal(gated, labels) and d["kept"].all()
    empty, d = apply_gate(np.zeros((8, 8), np.int32), np.ones((8, 8)), Gate(0.1, 0.9, 5))
    assert not empty.any() and len(d) == 0


def test_bad_gates_and_inputs_are_refused():
    with pytest.raises(SeglabError, match="q_low <= q_high"):
        Gate(q_low=0.9, q_high=0.1)
    with pytest.raises(SeglabError, match="shape"):
        instance_stats(np.zeros((4, 4), int), np.zeros((4, 5)))
    with pytest.raises(SeglabError, match="integer label image"):
        instance_stats(np.zeros((4, 4), float), np.zeros((4, 4)))
    assert len(gate_grid([0, 0.1], [0.9, 1.0], [0, 20])) == 8
    assert len(gate_grid([0.5], [0.2], [0])) == 0


def test_sweep_counts_false_positives_removed():
    labels, image = scene()
    truth = labels.copy()
    truth[truth == 11] = 0   # the dim one and the punctum are false positives
    truth[truth == 40] = 0
    table = sweep_gates([{"y_true": truth, "y_pred": labels, "image": image}],
                        [Gate(), Gate(0.2, 0.8), Gate(min_area_px=10)])
    assert isinstance(table, pd.DataFrame)
    assert table["fp"].tolist() == [2, 0, 1]
    assert table["tp"].tolist() == [3, 3, 3]
    assert table["precision"].tolist() == pytest.approx([0.6, 1.0, 0.75])


def test_gate_from_row_keeps_the_area_in_its_unit():
    from seglab.segment.postprocess import area_column, gate_from_row

    row = {"q_low": 0.05, "q_high": 0.98, "min_area_px": 30.0, "min_area_um2": 7.5, "f1": 0.9}
    assert gate_from_row(row, "px") == Gate(q_low=0.05, q_high=0.98, min_area_px=30.0)
    assert gate_from_row(row, "um2") == Gate(q_low=0.05, q_high=0.98, min_area_px=0.0, min_area_um2=7.5)
    assert area_column("um2") == "min_area_um2"
    with pytest.raises(SeglabError, match="area_unit"):
        gate_from_row(row, "mm2")
