"""Tests of the PCD reader/writer (driveengine.sources.pcd) on real files in temporary directories."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driveengine.errors import PCDError
from driveengine.sources.pcd import (
    ENCODINGS,
    NUPLAN_PCD_FIELDS,
    lzf_compress,
    lzf_decompress,
    parse_pcd,
    pcd_summary,
    read_pcd,
    read_pcd_header,
    write_nuplan_pcd,
    write_pcd,
)

RNG = np.random.default_rng(20261121)


def _mixed_fields(n: int) -> dict[str, np.ndarray]:
    """One field of every supported dtype, plus multi-value (COUNT > 1) fields, ``n`` points."""
    rng = np.random.default_rng(n)
    fields: dict[str, np.ndarray] = {
        "x": rng.normal(0, 30, n).astype(np.float32),
        "y": rng.normal(0, 30, n).astype(np.float32),
        "z": rng.normal(0, 2, n).astype(np.float32),
        "f8": rng.normal(0, 1e6, n),
    }
    for dt in ("i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"):
        info = np.iinfo(dt)
        fields[dt] = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
    fields["normal"] = rng.normal(size=(n, 3)).astype(np.float32)
    fields["rgb"] = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    return fields


def _assert_same(cloud_fields: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(cloud_fields) == list(expected)
    for name, want in expected.items():
        got = cloud_fields[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("n", [0, 1, 257])
def test_round_trip_all_dtypes(tmp_path: Path, encoding: str, n: int) -> None:
    fields = _mixed_fields(n)
    path = tmp_path / f"cloud_{encoding}.pcd"
    viewpoint = (1.5, -2.0, 0.25, 0.0, 0.0, 0.0, 1.0)
    write_pcd(path, fields, encoding=encoding, viewpoint=viewpoint)

    cloud = read_pcd(path)
    _assert_same(cloud.fields, fields)
    h = cloud.header
    assert h.encoding == encoding
    assert cloud.num_points == h.points == h.width == n and h.height == 1
    assert h.viewpoint == viewpoint
    assert h.counts == tuple(1 if a.ndim == 1 else a.shape[1] for a in fields.values())
    assert h.dtype.itemsize == sum(
        a.dtype.itemsize * (1 if a.ndim == 1 else a.shape[1]) for a in fields.values()
    )
    np.testing.assert_array_equal(cloud.xyz, np.stack([fields["x"], fields["y"], fields["z"]], axis=1))
    assert cloud.xyz.dtype == np.float32 and cloud.xyz.shape == (n, 3)
    assert read_pcd_header(path) == h


def test_ascii_floats_round_trip_exactly(tmp_path: Path) -> None:
    """Awkward float values (extremes, subnormals, inf, nan) survive the text encoding bit for bit."""
    f4 = np.array([np.pi, -0.0, 1e-45, 3.4028235e38, np.inf, -np.inf, np.nan, 0.1], dtype=np.float32)
    f8 = np.array([np.pi, -0.0, 5e-324, 1.7976931348623157e308, np.inf, -np.inf, np.nan, 0.1])
    path = tmp_path / "floats.pcd"
    write_pcd(path, {"a": f4, "b": f8}, encoding="ascii")
    cloud = read_pcd(path)
    assert cloud.fields["a"].tobytes() == f4.tobytes()
    np.testing.assert_array_equal(cloud.fields["b"], f8)
    assert np.signbit(cloud.fields["b"][1])


def test_compressed_file_is_smaller_for_redundant_data(tmp_path: Path) -> None:
    n = 20_000
    fields = {
        "x": np.repeat(np.arange(n // 100, dtype=np.float32), 100),
        "ring": np.zeros(n, dtype=np.uint16),
    }
    write_pcd(tmp_path / "b.pcd", fields, encoding="binary")
    write_pcd(tmp_path / "c.pcd", fields, encoding="binary_compressed")
    assert (tmp_path / "c.pcd").stat().st_size < (tmp_path / "b.pcd").stat().st_size / 4
    _assert_same(read_pcd(tmp_path / "c.pcd").fields, fields)


def test_nuplan_layout(tmp_path: Path) -> None:
    n = 1000
    xyz = RNG.uniform(-80, 80, (n, 3))
    intensity = RNG.uniform(0, 255, n)
    ring = RNG.integers(0, 64, n)
    lidar_info = RNG.integers(0, 5, n)
    path = tmp_path / "sweep.pcd"
    write_nuplan_pcd(path, xyz, intensity=intensity, ring=ring, lidar_info=lidar_info)

    raw = path.read_bytes()
    head, _, body = raw.partition(b"DATA binary\n")
    assert b"\nFIELDS x y z intensity ring lidar_info\n" in head
    assert b"\nSIZE 4 4 4 4 4 4\n" in head and b"\nTYPE F F F F F F\n" in head
    assert len(body) == n * 24  # packed records, nothing else
    # an independent decode of the body: 6 little-endian float32 per point
    table = np.frombuffer(body, dtype="<f4").reshape(n, 6)
    np.testing.assert_array_equal(table[:, :3], xyz.astype(np.float32))
    np.testing.assert_array_equal(table[:, 4], ring.astype(np.float32))

    cloud = read_pcd(path)
    assert list(cloud.fields) == list(NUPLAN_PCD_FIELDS)
    assert {k: v.dtype for k, v in cloud.fields.items()} == NUPLAN_PCD_FIELDS
    np.testing.assert_array_equal(cloud.xyz, xyz.astype(np.float32))
    np.testing.assert_array_equal(cloud.fields["intensity"], intensity.astype(np.float32))
    np.testing.assert_array_equal(cloud.fields["lidar_info"], lidar_info.astype(np.float32))


def test_nuplan_defaults_and_bad_shapes(tmp_path: Path) -> None:
    path = tmp_path / "a.pcd"
    write_nuplan_pcd(path, np.ones((3, 3)))
    cloud = read_pcd(path)
    for name in ("intensity", "ring", "lidar_info"):
        np.testing.assert_array_equal(cloud.fields[name], np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        write_nuplan_pcd(path, np.ones((3, 2)))
    with pytest.raises(ValueError, match="ring"):
        write_nuplan_pcd(path, np.ones((3, 3)), ring=np.ones(4))


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "a.pcd"
    with pytest.raises(ValueError, match="encoding"):
        write_pcd(path, {"x": np.ones(2)}, encoding="binary_lz4")
    with pytest.raises(ValueError, match="different lengths"):
        write_pcd(path, {"x": np.ones(2), "y": np.ones(3)})
    with pytest.raises(ValueError, match="dtype"):
        write_pcd(path, {"x": np.ones(2, dtype=bool)})
    with pytest.raises(ValueError, match="no PCD equivalent"):
        write_pcd(path, {"x": np.ones(2, dtype=np.float16)})
    for name in ("a b", "a\tb", "", "x\x00"):
        with pytest.raises(ValueError, match="without spaces"):
            write_pcd(path, {name: np.ones(2)})


# -- hand-written and real-world quirks ------------------------------------------------------------

HAND_ASCII = b"""# .PCD v0.7 - Point Cloud Data file format
# a second comment line
VERSION .7
FIELDS x y z label rgb
SIZE 4 4 8 2 1
TYPE F F F U I
WIDTH 2
HEIGHT 2
VIEWPOINT 0 0 0 1 0 0 0
POINTS 4
DATA ascii
1.5 -2.25 3 7 -1

0 0 1e3 65535 127
nan 1 -0.5 0 -128
4 5 6 1 0
this line is trailing garbage and must be ignored
"""


def test_hand_written_ascii(tmp_path: Path) -> None:
    path = tmp_path / "hand.pcd"
    path.write_bytes(HAND_ASCII)
    cloud = read_pcd(path)
    h = cloud.header
    assert (h.width, h.height, h.points, h.version) == (2, 2, 4, ".7")
    assert h.counts == (1, 1, 1, 1, 1)  # no COUNT line: defaults to 1
    np.testing.assert_array_equal(cloud.fields["x"], np.array([1.5, 0, np.nan, 4], np.float32))
    assert cloud.fields["z"].dtype == np.float64
    np.testing.assert_array_equal(cloud.fields["z"], [3, 1000, -0.5, 6])
    assert cloud.fields["label"].dtype == np.uint16
    np.testing.assert_array_equal(cloud.fields["label"], [7, 65535, 0, 1])
    assert cloud.fields["rgb"].dtype == np.int8
    np.testing.assert_array_equal(cloud.fields["rgb"], [-1, 127, -128, 0])
    assert cloud.xyz.dtype == np.float64  # common type of float32 x, y and float64 z


def test_hand_written_binary_with_crlf_and_padding_fields(tmp_path: Path) -> None:
    records = np.zeros(3, dtype=[("x", "<f4"), ("_", "u1", (2,)), ("i", "<i2"), ("_1", "u1")])
    records["x"] = [1, 2, 3]
    records["i"] = [-5, 6, 7]
    header = (
        b"VERSION 0.7\r\nFIELDS x _ i _\r\nSIZE 4 1 2 1\r\nTYPE F U I U\r\nCOUNT 1 2 1 1\r\n"
        b"WIDTH 3\r\nHEIGHT 1\r\nPOINTS 3\r\nDATA binary\r\n"
    )
    path = tmp_path / "padded.pcd"
    path.write_bytes(header + records.tobytes())
    cloud = read_pcd(path)
    assert cloud.header.fields == ("x", "_", "i", "_1")
    np.testing.assert_array_equal(cloud.fields["x"], [1, 2, 3])
    np.testing.assert_array_equal(cloud.fields["i"], [-5, 6, 7])
    assert cloud.fields["_"].shape == (3, 2)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_trailing_bytes_are_tolerated(tmp_path: Path, encoding: str) -> None:
    fields = {"x": np.arange(5, dtype=np.float32), "y": np.ones(5), "z": -np.arange(5, dtype=np.float32)}
    path = tmp_path / "t.pcd"
    write_pcd(path, fields, encoding=encoding)
    tail = b"\n" + b"\x00" * 37 if encoding == "ascii" else b"\x00" * 37 + b"\xff\x13garbage"
    path.write_bytes(path.read_bytes() + tail)
    _assert_same(read_pcd(path).fields, fields)


def test_summary(tmp_path: Path) -> None:
    xyz = np.array([[1.0, -2.0, 0.5], [-3.0, 4.0, 2.0], [np.nan, 100.0, 100.0]])
    path = tmp_path / "s.pcd"
    write_nuplan_pcd(path, xyz)
    summary = pcd_summary(path)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["encoding"] == "binary" and summary["points"] == 3
    assert [f["name"] for f in summary["fields"]] == list(NUPLAN_PCD_FIELDS)
    assert summary["fields"][0] == {"name": "x", "type": "F", "size": 4, "count": 1, "dtype": "float32"}
    assert summary["xyz_min"] == [-3.0, -2.0, 0.5]  # the nan point is left out
    assert summary["xyz_max"] == [1.0, 4.0, 2.0]

    write_pcd(path, {"intensity": np.ones(2, np.float32)})
    assert pcd_summary(path)["xyz_min"] is None


def test_data_line_at_end_of_file_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcd"
    path.write_bytes(b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nWIDTH 0\nPOINTS 0\nDATA binary")
    cloud = read_pcd(path)
    assert cloud.num_points == 0 and cloud.xyz.shape == (0, 3)
    assert cloud.header.viewpoint == (0, 0, 0, 1, 0, 0, 0)  # VIEWPOINT defaults to the identity pose


def test_header_only_read_does_not_need_the_body(tmp_path: Path) -> None:
    path = tmp_path / "a.pcd"
    write_nuplan_pcd(path, np.ones((100, 3)))
    path.write_bytes(path.read_bytes()[:-10])
    header = read_pcd_header(path)
    assert header.points == 100 and header.fields == tuple(NUPLAN_PCD_FIELDS)
    with pytest.raises(PCDError, match="truncated"):
        read_pcd(path)


# -- errors ----------------------------------------------------------------------------------------

GOOD_HEADER = {
    "VERSION": "0.7",
    "FIELDS": "x y z",
    "SIZE": "4 4 4",
    "TYPE": "F F F",
    "COUNT": "1 1 1",
    "WIDTH": "2",
    "HEIGHT": "1",
    "VIEWPOINT": "0 0 0 1 0 0 0",
    "POINTS": "2",
    "DATA": "binary",
}


def _header(**changes: str | None) -> bytes:
    entries = {**GOOD_HEADER, **changes}
    return "".join(f"{k} {v}\n" for k, v in entries.items() if v is not None).encode()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"DATA": "binary_lz4"}, "unknown DATA kind"),
        ({"SIZE": "4 4"}, "SIZE has 2 values for 3 FIELDS"),
        ({"SIZE": "4 4 3"}, "SIZE 3"),
        ({"SIZE": "4 4 x"}, "non-integer"),
        ({"TYPE": "F F Q"}, "TYPE 'Q'"),
        ({"COUNT": "1 0 1"}, "below 1"),
        ({"FIELDS": "x y x"}, "appears twice"),
        ({"FIELDS": None}, "lacks FIELDS"),
        ({"POINTS": "3"}, "!= POINTS 3"),
        ({"WIDTH": "-2", "POINTS": "-2"}, "below 0"),
        ({"VIEWPOINT": "0 0 0 1"}, "VIEWPOINT needs 7"),
        ({"DATA": None}, "binary bytes before any DATA line"),
        ({"HEIGHT": "1\nCOLOR 3"}, "unknown header line"),
    ],
)
def test_bad_header_raises_pcd_error_naming_the_file(tmp_path: Path, changes: dict, reason: str) -> None:
    path = tmp_path / "bad.pcd"
    path.write_bytes(_header(**changes) + np.zeros(6, np.float32).tobytes())
    with pytest.raises(PCDError, match=reason) as info:
        read_pcd(path)
    assert str(path) in str(info.value) and info.value.path == str(path)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_truncated_body_raises(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "cut.pcd"
    write_pcd(path, _mixed_fields(40), encoding=encoding)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 30])
    with pytest.raises(PCDError) as info:
        read_pcd(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff\xd8\xff\xe0 a jpeg, not a point cloud", b"VERSION 0.7\nFIELDS x\n", b"\x00" * 5000],
)
def test_not_a_pcd_file(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "junk.pcd"
    path.write_bytes(payload)
    with pytest.raises(PCDError) as info:
        read_pcd(path)
    assert str(path) in str(info.value)


def test_missing_file_raises_pcd_error(tmp_path: Path) -> None:
    with pytest.raises(PCDError, match="cannot read"):
        read_pcd(tmp_path / "nope.pcd")
    with pytest.raises(PCDError, match="cannot read"):
        read_pcd_header(tmp_path / "nope.pcd")


def test_corrupt_compressed_sizes(tmp_path: Path) -> None:
    path = tmp_path / "c.pcd"
    write_pcd(path, {"x": np.arange(100, dtype=np.float32)}, encoding="binary_compressed")
    data = bytearray(path.read_bytes())
    off = data.index(b"DATA binary_compressed\n") + len(b"DATA binary_compressed\n")
    bad_uncompressed = data.copy()
    bad_uncompressed[off + 4 : off + 8] = (401).to_bytes(4, "little")
    path.write_bytes(bad_uncompressed)
    with pytest.raises(PCDError, match="uncompressed size 401"):
        read_pcd(path)
    bad_compressed = data.copy()
    bad_compressed[off : off + 4] = (10**6).to_bytes(4, "little")
    path.write_bytes(bad_compressed)
    with pytest.raises(PCDError, match="truncated"):
        read_pcd(path)


def test_a_sweep_announcing_more_points_than_a_sweep_holds_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compressed body may expand ~88x, so a sweep's point count and decoded size are bounded from its
    header (:data:`MAX_SWEEP_POINTS`, :data:`MAX_SWEEP_BYTES`): here a file announcing one point more with
    a 1000-byte body gets the points error, not the body's, and 1.1M points of 500-byte records (550 MB)
    the bytes error; nuPlan's reader and collect's cheap file check apply both."""
    import driveengine.sources.nuplan as nuplan
    from driveengine.errors import SourceError
    from driveengine.sources.base import MAX_SWEEP_BYTES, MAX_SWEEP_POINTS

    n = MAX_SWEEP_POINTS + 1
    header = (
        f"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH {n}\nHEIGHT 1\n"
        f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA binary_compressed\n"
    )
    data = header.encode() + (1000).to_bytes(4, "little") + (12 * n).to_bytes(4, "little") + bytes(1000)
    with pytest.raises(PCDError, match="cannot expand"):  # unbounded, the body is what is wrong
        parse_pcd(data)
    with pytest.raises(PCDError, match=f"{n} points, more than the {MAX_SWEEP_POINTS} a sweep may hold"):
        parse_pcd(data, max_points=MAX_SWEEP_POINTS)
    with pytest.raises(SourceError, match=f"{n} points"):
        nuplan.nuplan_points_ego(data, "LIDAR_TOP/hostile.pcd")
    # fewer points with wide records announce as many bytes: bounded too (MAX_SWEEP_BYTES)
    wide = (
        b"VERSION 0.7\nFIELDS x y z pad\nSIZE 4 4 4 4\nTYPE F F F U\nCOUNT 1 1 1 122\nWIDTH 1100000\nHEIGHT 1\n"
        b"POINTS 1100000\nDATA binary_compressed\n"
        + (10**6).to_bytes(4, "little")
        + (500 * 1_100_000).to_bytes(4, "little")
        + bytes(10**6)
    )
    with pytest.raises(
        SourceError, match=f"1100000 points of 500 bytes, more than the {MAX_SWEEP_BYTES} bytes"
    ):
        nuplan.nuplan_points_ego(wide, "LIDAR_TOP/wide.pcd")
    (tmp_path / "wide.pcd").write_bytes(wide)
    assert nuplan.pcd_file_defect(tmp_path / "wide.pcd").startswith("1100000 points of 500 bytes, more than")
    # a whole file over a (lowered) bound: refused by the reader, and its frame dropped by collect's check
    path = tmp_path / "sweep.pcd"
    write_nuplan_pcd(path, RNG.normal(size=(100, 3)).astype(np.float32))
    assert nuplan.pcd_file_defect(path) is None and nuplan.nuplan_points_ego(
        path.read_bytes(), "s"
    ).shape == (100, 4)
    monkeypatch.setattr(nuplan, "MAX_SWEEP_POINTS", 99)
    assert nuplan.pcd_file_defect(path) == "100 points, more than the 99 a sweep may hold"
    with pytest.raises(PCDError, match=f"{path}: 100 points, more than the 99"):
        nuplan.nuplan_points_ego(path.read_bytes(), str(path))


def test_xyz_missing_raises(tmp_path: Path) -> None:
    path = tmp_path / "i.pcd"
    write_pcd(path, {"intensity": np.ones(2, np.float32)})
    with pytest.raises(PCDError, match="x/y/z"):
        _ = read_pcd(path).xyz


# -- LZF codec -------------------------------------------------------------------------------------


def test_lzf_decodes_hand_made_streams() -> None:
    # literal run "abc" (control 2), then a back-reference of 6 bytes at distance 3 (overlapping copy)
    assert lzf_decompress(b"\x02abc\x80\x02", 9).tobytes() == b"abcabcabc"
    # a long back-reference: length byte follows (7 + 253 + 2 = 262 bytes) at distance 1
    assert lzf_decompress(b"\x00a\xe0\xfd\x00", 263).tobytes() == b"a" * 263
    with pytest.raises(ValueError, match="before the start"):
        lzf_decompress(b"\x00a\x20\x05", 4)
    with pytest.raises(ValueError, match="ends inside"):
        lzf_decompress(b"\x05abc", 6)
    with pytest.raises(ValueError, match="more bytes"):
        lzf_decompress(b"\x02abc", 2)
    with pytest.raises(ValueError, match="3 bytes, 4 announced"):
        lzf_decompress(b"\x02abc", 4)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 40))
def test_lzf_round_trip(data: bytes, repeat: int) -> None:
    for src in (data, data * repeat):
        packed = lzf_compress(src)
        assert lzf_decompress(packed, len(src)).tobytes() == src
        assert len(packed) <= len(src) + len(src) // 32 + 1


# -- an independent writer and reader: open3d (PCL's format code) ----------------------------------


def _open3d():
    try:
        import open3d
    except Exception as exc:  # broken native dependencies (libusb) raise OSError/ImportError
        pytest.skip(
            f"open3d cannot be imported here ({type(exc).__name__}: {exc}); `make install-full` adds it, CI runs it"
        )
    return open3d


@pytest.mark.parametrize(("compressed", "ascii"), [(False, False), (True, False), (False, True)])
def test_reads_files_written_by_open3d(tmp_path: Path, compressed: bool, ascii: bool) -> None:
    o3d = _open3d()
    n = 3000
    xyz = RNG.normal(0, 20, (n, 3)).astype(np.float32)
    intensity = RNG.random((n, 1)).astype(np.float32)
    ring = RNG.integers(0, 64, (n, 1)).astype(np.int32)
    cloud = o3d.t.geometry.PointCloud()
    cloud.point.positions = o3d.core.Tensor(xyz)
    cloud.point.intensity = o3d.core.Tensor(intensity)
    cloud.point.ring = o3d.core.Tensor(ring)
    path = tmp_path / "o3d.pcd"
    assert o3d.t.io.write_point_cloud(str(path), cloud, write_ascii=ascii, compressed=compressed)

    ours = read_pcd(path)
    assert ours.header.encoding == ("ascii" if ascii else "binary_compressed" if compressed else "binary")
    np.testing.assert_array_equal(ours.xyz, xyz)
    np.testing.assert_array_equal(ours.fields["intensity"], intensity[:, 0])
    assert ours.fields["ring"].dtype == np.int32
    np.testing.assert_array_equal(ours.fields["ring"], ring[:, 0])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_open3d_reads_files_we_write(tmp_path: Path, encoding: str) -> None:
    o3d = _open3d()
    n = 3000
    xyz = RNG.normal(0, 20, (n, 3)).astype(np.float32)
    intensity = RNG.random(n).astype(np.float32)
    path = tmp_path / "ours.pcd"
    write_pcd(
        path, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "intensity": intensity}, encoding=encoding
    )
    theirs = o3d.t.io.read_point_cloud(str(path))
    np.testing.assert_array_equal(theirs.point.positions.numpy(), xyz)
    np.testing.assert_array_equal(theirs.point.intensity.numpy()[:, 0], intensity)


# -- fuzzing: nothing but PCDError escapes -----------------------------------------------------------


def _valid_files() -> list[bytes]:
    """One small valid file of each encoding, as bytes (the fuzzers mutate them in memory)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, encoding in enumerate(ENCODINGS):
            path = Path(tmp) / f"{encoding}.pcd"
            write_pcd(path, _mixed_fields(7 + i), encoding=encoding)
            out.append(path.read_bytes())
    return out


VALID_FILES = _valid_files()


def _parse_or_pcd_error(data: bytes) -> None:
    """Parse ``data`` from memory and from a file: both must agree, and fail only with PCDError."""
    try:
        cloud = parse_pcd(data, "fuzz.pcd")
    except PCDError as exc:
        assert "fuzz.pcd" in str(exc)
        cloud = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.pcd"
        path.write_bytes(data)
        try:
            from_file = read_pcd(path)
        except PCDError as exc:
            assert str(path) in str(exc)
            assert cloud is None, "read_pcd rejected what parse_pcd accepted"
            return
    assert cloud is not None, "parse_pcd rejected what read_pcd accepted"
    assert from_file.header == cloud.header
    for name, array in cloud.fields.items():
        assert len(array) == cloud.num_points
        assert from_file.fields[name].tobytes() == array.tobytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(VALID_FILES))),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    st.integers(0, 10**6),
    st.binary(max_size=8),
)
def test_fuzz_mutated_files(which: int, flips: list, cut: int, inserted: bytes) -> None:
    data = bytearray(VALID_FILES[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    cut_at = cut % (len(data) + 1)
    _parse_or_pcd_error(bytes(data[:cut_at]))
    _parse_or_pcd_error(bytes(data))
    mid = cut % len(data)
    _parse_or_pcd_error(bytes(data[:mid] + inserted + data[mid:]))


_HEADER_KEYS = [
    "VERSION",
    "FIELDS",
    "SIZE",
    "TYPE",
    "COUNT",
    "WIDTH",
    "HEIGHT",
    "VIEWPOINT",
    "POINTS",
    "DATA",
]
_TOKENS = st.sampled_from(
    ["0", "1", "2", "3", "4", "8", "-1", "F", "I", "U", "x", "y", "z", "_", "ascii", "binary",
     "binary_compressed", "0.7", "nan", "1e9", "99999999999", "#", ""]
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(_HEADER_KEYS), st.lists(_TOKENS, max_size=5)), max_size=12),
    st.binary(max_size=200),
)
def test_fuzz_random_headers(lines: list, body: bytes) -> None:
    header = "".join(f"{key} {' '.join(values)}\n" for key, values in lines).encode()
    _parse_or_pcd_error(header + body)
    _parse_or_pcd_error(_header(**{k: " ".join(v) for k, v in lines[:3]}) + body)
