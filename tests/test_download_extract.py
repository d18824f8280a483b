"""Safe, all-or-nothing extraction of release archives, and the records that trace blobs to archives."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from driveengine.download.errors import ArchiveError
from driveengine.download.extract import extract_archive, test_archive
from driveengine.download.state import archive_index, extracted_files, extraction_complete, extraction_marker


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _file(name: str, data: bytes = b"payload") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _all_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def test_extracts_records_and_marks(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "a_0.tgz",
        [
            _file("openscene-v1.1/sensor_blobs/mini/log/CAM_F0/x.jpg", b"j" * 10),
            _file("openscene-v1.1/m.pkl", b"p"),
        ],
    )
    root = tmp_path / "root"
    res = extract_archive(archive, root, name="rel/a_0.tgz", md5="abc")
    expected = {"openscene-v1.1/sensor_blobs/mini/log/CAM_F0/x.jpg", "openscene-v1.1/m.pkl"}
    assert set(res.files) == expected and res.nbytes == 11
    assert (root / "openscene-v1.1/m.pkl").read_bytes() == b"p"
    assert set(extracted_files(root, "a_0.tgz")) == expected
    assert extraction_marker(root, "a_0.tgz")["md5"] == "abc"
    assert archive_index(root)["openscene-v1.1/m.pkl"] == "rel/a_0.tgz"
    assert extraction_complete(root, "a_0.tgz")
    (root / "openscene-v1.1/m.pkl").unlink()
    assert not extraction_complete(root, "a_0.tgz")  # a deleted file makes the archive incomplete again
    # nothing but the tree and the records
    assert not (root / ".driveengine" / "staging" / "a_0.tgz").exists()


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_file("../evil", b"x"), "outside"),
        (_file("ok/../../evil", b"x"), "outside"),
        (_file("/tmp/evil_abs", b"x"), "absolute"),
        (_link("ok/link", "../../outside"), "outside"),
        (_link("ok/abslink", "/etc/passwd"), "absolute"),
        (_link("ok/hard", "/etc/passwd", tarfile.LNKTYPE), ""),
    ],
)
def test_unsafe_members_are_rejected_and_nothing_lands_anywhere(tmp_path: Path, member, why: str) -> None:
    archive = _tar(tmp_path / "evil.tgz", [_file("ok/first.txt"), member, _file("ok/last.txt")])
    root = tmp_path / "a" / "b" / "root"
    before = _all_files(tmp_path)
    with pytest.raises(ArchiveError) as err:
        extract_archive(archive, root)
    assert err.value.member == member[0].name
    assert str(archive) in str(err.value) and why in str(err.value).lower()
    # nothing new anywhere under tmp_path (in particular not outside root), not even the safe members
    assert _all_files(tmp_path) == before
    assert extraction_marker(root, "evil.tgz") is None


def test_device_file_is_rejected(tmp_path: Path) -> None:
    info = tarfile.TarInfo("dev/sda")
    info.type = tarfile.BLKTYPE
    archive = _tar(tmp_path / "dev.tgz", [(info, None)])
    with pytest.raises(ArchiveError, match="dev/sda"):
        extract_archive(archive, tmp_path / "root")


@pytest.mark.parametrize("keep", [1 / 3, 2 / 3, -8, -1])
def test_truncated_archive_is_rejected_without_partial_files(tmp_path: Path, keep: float) -> None:
    import os

    good = _tar(tmp_path / "t.tgz", [_file(f"d/f{i}.bin", os.urandom(50_000)) for i in range(6)])
    data = good.read_bytes()
    bad = tmp_path / "bad.tgz"
    # a fraction of the file, or all but the last bytes (only the gzip trailer is missing: every tar
    # member is complete, but the CRC-32 and length cannot be checked)
    bad.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[: int(keep)])
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        test_archive(bad)
    root = tmp_path / "root"
    with pytest.raises(ArchiveError, match="corrupt or truncated") as err:
        extract_archive(bad, root)
    assert "bad.tgz" in str(err.value)
    assert not (root / "d").exists()
    assert test_archive(good) == 6


def test_flipped_byte_fails_the_crc(tmp_path: Path) -> None:
    good = _tar(tmp_path / "t.tgz", [_file("d/a.txt", b"hello " * 1000)])
    data = bytearray(good.read_bytes())
    data[-6] ^= 0x01  # inside the stored CRC-32
    good.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="corrupt"):
        extract_archive(good, tmp_path / "root")
    assert not (tmp_path / "root" / "d").exists()
