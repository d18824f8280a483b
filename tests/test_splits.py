"""Split definitions: shipped YAML files, user files, compact form."""

from __future__ import annotations

from pathlib import Path

import pytest
from driveengine.splits import SplitDef, SplitError, dump_split, list_splits, load_split


def test_shipped_splits_load_with_their_sizes() -> None:
    by_name = {s.name: s for s in list_splits()}
    assert {
        "mini",
        "trainval",
        "test",
        "nuplan_train",
        "nuplan_val",
        "nuplan_test",
        "navtrain",
        "navtest",
        "navmini",
    } <= set(by_name)
    assert by_name["mini"].log_names is None and by_name["mini"].folder == "mini"
    assert len(by_name["nuplan_train"].log_names) == 13180 and by_name["nuplan_train"].folder == "trainval"
    assert len(by_name["nuplan_val"].log_names) == 1381 and len(by_name["nuplan_test"].log_names) == 1349
    nav = by_name["navtrain"]
    assert nav.folder == "trainval" and len(nav.log_names) == 1192 and len(nav.tokens) == 103288
    assert len(by_name["navmini"].tokens) == 396 and by_name["navtest"].folder == "test"
    assert "2021.05.12.22.00.38_veh-35_01008_01518" in by_name["navmini"].log_names
    assert load_split("navmini") is by_name["navmini"]


def test_user_split_file_plain_lists(tmp_path: Path) -> None:
    path = tmp_path / "my_split.yaml"
    path.write_text("folder: mini\nlog_names: [log_b, log_a]\ntokens: [0123456789abcdef]\n")
    split = load_split(str(path))
    assert split.name == "my_split" and split.folder == "mini"
    assert split.select_logs(["log_a", "log_c", "log_b"]) == ["log_a", "log_b"]
    assert split.tokens == frozenset({"0123456789abcdef"}) and split.tokens_digest()


def test_compact_form_round_trips(tmp_path: Path) -> None:
    split = SplitDef(
        name="x",
        folder="trainval",
        log_names=frozenset(
            {"2021.05.25.12.30.39_veh-25_00005_00215", "2021.05.25.12.30.39_veh-25_00226_00299", "odd"}
        ),
        tokens=frozenset(f"{i:016x}" for i in range(20)),
        description="a: b",
    )
    dump_split(split, tmp_path / "x.yaml")
    back = load_split(tmp_path / "x.yaml")
    assert (back.log_names, back.tokens, back.folder, back.description) == (
        split.log_names,
        split.tokens,
        "trainval",
        "a: b",
    )
    split2 = SplitDef(
        name="y", folder="mini", log_names=frozenset({"2021.05.25.12.30.39_veh-25_00005_00215"})
    )
    dump_split(split2, tmp_path / "y.yaml")
    assert '"2021.05.25.12.30.39_veh-25": "00005_00215"' in (tmp_path / "y.yaml").read_text()
    assert load_split(tmp_path / "y.yaml").log_names == split2.log_names


def test_bad_splits_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match=r"known splits: .*mini"):
        load_split("no_such_split")
    path = tmp_path / "bad.yaml"
    path.write_text("log_names: [a]\n")
    with pytest.raises(SplitError, match="folder"):
        load_split(path)
    path.write_text("folder: mini\ntokens: [XYZ]\n")
    with pytest.raises(SplitError, match="16 lowercase hex"):
        load_split(path)
