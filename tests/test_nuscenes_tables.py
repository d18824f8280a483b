"""The block-wise JSON table reader of the nuScenes source (driveengine/sources/nuscenes/tables.py).

It must give exactly what ``json.load`` gives, whatever the block size and the file's formatting, keep
only a block of records in memory, and refuse hostile or malformed files with the file and byte offset.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from driveengine.errors import SourceError
from driveengine.sources.nuscenes.tables import Column, read_table
from driveengine.synth.nuscenes import write_nuscenes

SD_COLUMNS = [
    Column("token", "token"), Column("sample_token", "token"), Column("timestamp", "int"),
    Column("is_key_frame", "bool"), Column("filename", "text"), Column("prev", "token"),
]  # fmt: skip


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ns_tables")
    write_nuscenes(root, scenes=1, seconds=2.0, seed=1, blobs=False, radar=True)
    return root / "v1.0-mini"


def _expected(rows: list[dict], columns: list[Column]) -> dict[str, np.ndarray]:
    out = {}
    for c in columns:
        values = [r[c.name] for r in rows]
        if c.kind in ("token", "text"):
            out[c.name] = np.array([v.encode() for v in values], dtype="S")
        elif c.kind in ("vec3", "vec4"):
            out[c.name] = np.array(values, dtype=np.float64)
        else:
            out[c.name] = np.array(values)
    return out


@pytest.mark.parametrize("block_bytes", [97, 4096, 1 << 20])
def test_equals_json_load_whatever_the_block_size(tables: Path, block_bytes: int) -> None:
    rows = json.loads((tables / "sample_data.json").read_text())
    got = read_table(tables / "sample_data.json", SD_COLUMNS, block_bytes=block_bytes)
    want = _expected(rows, SD_COLUMNS)
    assert len(rows) > 200
    for name, values in want.items():
        assert np.array_equal(got[name], values), name
    poses = json.loads((tables / "ego_pose.json").read_text())
    cols = [Column("token", "token"), Column("rotation", "vec4"), Column("translation", "vec3")]
    got = read_table(tables / "ego_pose.json", cols, block_bytes=block_bytes)
    assert np.array_equal(got["translation"], np.array([p["translation"] for p in poses]))
    assert np.array_equal(got["rotation"], np.array([p["rotation"] for p in poses]))


def test_any_formatting_and_cut_like_text_inside_strings(tmp_path: Path) -> None:
    """Compact, indented, CRLF JSON; strings and nested values holding ',{' and '},{' (cuts there fail
    and are retried); a record per block or all in one."""
    rows = [
        {"token": f"t{i:03d}", "name": f"a,{{b}},{{\"c\": {i}}}", "extra": [{"x": i}, {"y": [1, {"z": 2}]}],
         "index": i}
        for i in range(200)
    ]  # fmt: skip
    cols = [Column("token", "token"), Column("name", "text"), Column("index", "int")]
    want = _expected(rows, cols)
    texts = {
        "compact": json.dumps(rows, separators=(",", ":")),
        "indent2": json.dumps(rows, indent=2),
        "indent0": json.dumps(rows, indent=0),
        "crlf": json.dumps(rows, indent=1).replace("\n", "\r\n"),
        "unicode": json.dumps(rows, indent=0, ensure_ascii=False),
    }
    for label, text in texts.items():
        path = tmp_path / f"{label}.json"
        path.write_text(text, encoding="utf-8")
        for block in (13, 256, 1 << 20):
            got = read_table(path, cols, block_bytes=block)
            for name in want:
                assert np.array_equal(got[name], want[name]), (label, block, name)


def test_unicode_text_and_filter(tmp_path: Path) -> None:
    rows = [
        {"token": f"{i:02x}", "name": "scène-ü" if i % 2 else "plain", "keep": i % 3 == 0} for i in range(50)
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(rows, indent=0, ensure_ascii=False), encoding="utf-8")
    got = read_table(path, [Column("name", "text")], filter_columns=[Column("token", "token"), Column("keep", "bool")],
                     keep=lambda c: c["keep"], block_bytes=64)  # fmt: skip
    kept = [r for r in rows if r["keep"]]
    assert [v.decode() for v in got["name"]] == [r["name"] for r in kept]
    assert [v.decode() for v in got["token"]] == [r["token"] for r in kept]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert read_table(empty, [Column("token", "token"), Column("translation", "vec3")])[
        "translation"
    ].shape == (0, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[{"token": "a", "translation": [1, 2, 3]}, {"token": "b", "translation": [1, null, 3]}]',
            "3 numbers",
        ),
        ('[{"token": "a", "translation": [1, 2, NaN]}]', "NaN"),
        ('[{"token": "a", "translation": [1, 2, Infinity]}]', "Infinity"),
        ('[{"token": "a", "translation": [1, 2]}]', "3 numbers"),
        ('[{"token": "a", "translation": ["1", 2, 3]}]', "3 numbers"),
        ('[{"token": 5, "translation": [1, 2, 3]}]', "expected a string"),
        ('[{"token": "é", "translation": [1, 2, 3]}]', "ASCII token"),
        ('[{"translation": [1, 2, 3]}]', "row 0 of table t has no field 'token'"),
        ('[{"token": "a", "translation": [1, 2, 3]}, 7]', "row 1 of table t is not a JSON object"),
        ('{"token": "a"}', "expected a JSON list"),
        ("", "empty file"),
        ('[{"token": "a", "translation": [1, 2, 3]}, {"token": "b", "translation": [1, 2', "near byte"),
        ('[{"token": "a", "translation": [1, 2, 3]}] trailing', "near byte 44 (trailing characters)"),
        ("[" + "[" * 100_000 + "]" * 100_000 + "]", "nested too deeply"),
        (
            '[{"token": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + ', "translation": [1, 2, 3]}]',
            "nested too deeply",
        ),
        # refused while decoding though the field-by-field check would pass them: named by row
        (
            '[{"token": "a", "translation": [1, 2, 3]}, {"token": "b", "translation": [1, 2, 1e400]}]',
            "row 1 of table t: Number out of range",
        ),
        ('[{"token": "a", "translation": [true, 2, 3]}]', "row 0 of table t: Expected `float`, got `bool`"),
    ],
)
def test_malformed_tables_name_the_file_and_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SourceError, match=r"t\.json") as info:
        read_table(path, [Column("token", "token"), Column("translation", "vec3")], block_bytes=16)
    assert message in str(info.value)


def test_a_lone_surrogate_escape_is_refused_in_one_line(tmp_path: Path) -> None:
    """``\\ud800`` alone is no Unicode text (json.load would take it): refused with the file and byte,
    whatever the block size, never a silently mangled name."""
    rows = [{"token": f"{i:02x}", "name": "x\ud800y" if i == 7 else f"n{i}"} for i in range(40)]
    path = tmp_path / "t.json"
    text = json.dumps(rows, indent=0)  # the escape \ud800 in the file
    path.write_text(text, encoding="utf-8")
    byte = text.index("\\ud800")
    for block in (16, 1 << 20):
        with pytest.raises(SourceError, match=r"t\.json: not a valid JSON list of records near byte") as info:
            read_table(path, [Column("token", "token"), Column("name", "text")], block_bytes=block)
        message = str(info.value)
        assert "surrogate" in message and "\n" not in message
        assert abs(int(message.split("near byte ")[1].split()[0]) - byte) <= 8


def test_types_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    for value, kind, message in [("true", "int", "expected an integer"), ("1.5", "int", "expected an integer"),
                                 ("1", "bool", "true or false"), ("123456789012345678901234567890", "int", "int64")]:  # fmt: skip
        path.write_text(f'[{{"v": {value}}}]')
        with pytest.raises(SourceError, match=message):
            read_table(path, [Column("v", kind)])


def test_a_syntax_error_deep_in_a_big_file_is_found_with_bounded_work(tmp_path: Path) -> None:
    rows = [{"token": f"{i:032x}", "timestamp": i} for i in range(20_000)]
    text = json.dumps(rows, indent=0)
    cut = text.index(f'"{5_000:032x}"')
    bad = text[:cut] + '"' + text[cut + 1 :].replace('"', "", 1)  # breaks one token's quotes
    path = tmp_path / "t.json"
    path.write_text(bad)
    with pytest.raises(SourceError, match=r"near byte \d+"):
        read_table(path, [Column("token", "token"), Column("timestamp", "int")], block_bytes=4096)


def test_memory_is_bounded_by_the_block_not_the_file(tmp_path: Path) -> None:
    """A 50 MB table read with 1 MB blocks: the reader's peak is far below json.load's (child processes)."""
    path = tmp_path / "big.json"
    rows = [{"token": f"{i:032x}", "sample_token": f"{i + 7:032x}", "timestamp": 1_500_000_000_000_000 + i,
             "translation": [i * 0.5, -i * 0.25, 0.0], "is_key_frame": i % 10 == 0} for i in range(250_000)]  # fmt: skip
    path.write_text(json.dumps(rows, indent=0))
    del rows
    size = path.stat().st_size
    assert size > 45e6
    code = {
        "ours": (
            "from driveengine.sources.nuscenes.tables import read_table, Column;"
            f"c = read_table({str(path)!r}, [Column('token','token'), Column('sample_token','token'),"
            "Column('timestamp','int'), Column('translation','vec3')], block_bytes=1 << 20);"
            "assert len(c['token']) == 250_000"
        ),
        "json": f"import json; d = json.load(open({str(path)!r})); assert len(d) == 250_000",
    }
    peak = {}
    for name, src in code.items():
        # VmHWM (peak RSS of this program image; ru_maxrss would include the forked pytest's pages)
        script = (
            src + ";print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
        )
        peak[name] = int(out.stdout.strip()) * 1024
    # columns: 250k x (32 + 32 + 8 + 24) bytes = 24 MB; json.load holds 250k dicts (~300 MB)
    assert peak["ours"] < 0.5 * peak["json"], peak
    assert peak["ours"] < size + 60e6, peak  # interpreter + numpy + columns + one block
