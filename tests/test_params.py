"""Params files are validated before anything runs, with the file, key and allowed values named."""

from __future__ import annotations

import pytest

from seglab.config.params import ParamsError, load_params, params_hash, parse_override, read_yaml


def test_profile_values_and_defaults_merge(probe_root):
    params, sources = load_params("10_probe", "test")
    assert params == {"n": 4, "fail": False, "sleep_s": 0.0, "label": "shared-label"}
    assert [s.name for s in sources] == ["defaults.yaml", "10_probe.yaml"]


def test_misspelt_key_names_key_file_and_allowed_keys(probe_root):
    f = probe_root / "params" / "test" / "10_probe.yaml"
    f.write_text("n: 4\nsleep_sec: 2\n")
    with pytest.raises(ParamsError) as err:
        load_params("10_probe", "test")
    msg = str(err.value)
    assert str(f) in msg and "'sleep_sec'" in msg and "did you mean 'sleep_s'" in msg
    assert "allowed keys for 10_probe: fail, label, n, sleep_s" in msg


@pytest.mark.parametrize("text, fragment", [
    ("n: four\n", "'four' is not an integer"),
    ("n: true\n", "True is not an integer"),
    ("n: 0\n", "0 is out of range (expected int, range [1, 1000])"),
    ("n: 4.5\n", "4.5 is not an integer"),
    ("n: 4\nsleep_s: .nan\n", "is not finite"),
    ("n: 4\nfail: 'yes'\n", "'yes' is not true/false"),
    ("n: 4\nlabel: null\n", "null is not allowed"),
    ("{}\n", "key 'n' is required"),
    ("n: 4\nn: 5\n", "key 'n' is given twice"),
    ("n: [4\n", "not valid YAML"),
    ("- 4\n", "expected a mapping"),
])
def test_bad_values_fail_with_the_reason(probe_root, text, fragment):
    (probe_root / "params" / "test" / "10_probe.yaml").write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params("10_probe", "test")
    assert fragment in str(err.value)
    assert "10_probe.yaml" in str(err.value)


def test_defaults_file_with_a_key_no_schema_declares(probe_root):
    (probe_root / "params" / "test" / "defaults.yaml").write_text("lable: x\n")
    with pytest.raises(ParamsError, match=r"defaults.yaml: unknown key 'lable' \(did you mean 'label'\?\)"):
        load_params("10_probe", "test")


def test_unknown_profile_lists_profiles(probe_root):
    with pytest.raises(ParamsError, match="profile 'dmeo' not found.*profiles: test"):
        load_params("10_probe", "dmeo")


def test_overrides_are_validated_too(probe_root):
    params, _ = load_params("10_probe", "test", {"n": 7})
    assert params["n"] == 7
    with pytest.raises(ParamsError, match="command-line override: key 'n': 9999 is out of range"):
        load_params("10_probe", "test", {"n": 9999})
    assert parse_override("markers=[gfap, iba1]") == ("markers", ["gfap", "iba1"])
    with pytest.raises(ParamsError, match="expected key=value"):
        parse_override("n")


def test_schema_with_a_bad_spec_is_refused(probe_root):
    (probe_root / "params" / "schema" / "10_probe.yaml").write_text("n: {type: integer}\n")
    with pytest.raises(ParamsError, match="type 'integer'; allowed"):
        load_params("10_probe", "test")
    (probe_root / "params" / "schema" / "10_probe.yaml").write_text("n: {type: int, maximum: 3}\n")
    with pytest.raises(ParamsError, match="unknown spec field"):
        load_params("10_probe", "test")


def test_list_params_check_items_and_choices(tmp_path, probe_root):
    (probe_root / "params" / "schema" / "10_probe.yaml").write_text(
        "n: {type: int}\nmarkers: {type: list, items: str, choices: [gfap, iba1], min_len: 1, default: [gfap]}\n"
        "percentiles: {type: list, items: float, min: 0, max: 100, default: [75]}\n")
    (probe_root / "params" / "test" / "defaults.yaml").write_text("")
    assert load_params("10_probe", "test")[0]["percentiles"] == [75.0]
    for text, fragment in [("markers: [gfap, gfpa]\n", "['gfpa'] not allowed"),
                           ("markers: []\n", "fewer than 1"),
                           ("percentiles: [60, 101]\n", "percentiles[1]': 101 is out of range")]:
        (probe_root / "params" / "test" / "10_probe.yaml").write_text("n: 1\n" + text)
        with pytest.raises(ParamsError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            load_params("10_probe", "test")


def test_params_hash_is_order_independent():
    assert params_hash({"a": 1, "b": [1, 2]}) == params_hash({"b": [1, 2], "a": 1})
    assert params_hash({"a": 1}) != params_hash({"a": 2})


def test_read_yaml_empty_file_is_empty_mapping(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("# nothing\n")
    assert read_yaml(f) == {}
