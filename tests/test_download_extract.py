"""Safe, all-or-nothing extraction of release archives, and the records that trace blobs to archives."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from download_server import symlink_chain_escape_tar

from driveengine.download.errors import ArchiveError
from driveengine.download.extract import extract_archive, test_archive
from driveengine.download.state import (
    archive_index,
    extracted_files,
    extraction_complete,
    extraction_marker,
    staging_dir,
)


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


# -- hostile archives: no escape, nothing left behind, reserved names, bombs ----------------------------


def _tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (not following links): file bytes, or ``"dir"`` / ``"link"``."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            out[rel] = "link" if path.is_symlink() else "dir" if path.is_dir() else path.read_bytes()
    return out


def test_symlink_chain_past_path_max_cannot_escape(tmp_path: Path) -> None:
    """CVE-2025-4517: the archive that defeats tarfile's ``data`` filter on Python < 3.11.13 creates and
    overwrites files above the output folder; here it is refused at its first link and leaves nothing."""
    root = tmp_path / "a" / "out"
    root.mkdir(parents=True)
    flag = tmp_path / "a" / "flag"
    flag.write_text("original")
    archive = tmp_path / "evil.tgz"
    # built against the staging folder the archive is extracted into; 4 levels up from there is tmp/a
    symlink_chain_escape_tar(archive, staging_dir(root, archive.name), levels_up=4)
    before = _tree(tmp_path)
    error: BaseException | None = None
    try:
        extract_archive(archive, root)
    except Exception as exc:  # checked below, after the side effects
        error = exc
    assert flag.read_text() == "original"  # not overwritten through the hard link
    assert not (tmp_path / "a" / "newfile").exists()  # not created through the symlink
    # nothing of the archive anywhere: only the (empty) staging folder of DriveEngine's records is new
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"a/out/.driveengine", "a/out/.driveengine/staging"}
    assert isinstance(error, ArchiveError), error
    message = str(error)
    assert "\n" not in message and len(message) < 400, message  # one readable line
    assert "evil.tgz" in message and "symbolic link" in message and error.member == "a"


@pytest.mark.parametrize(
    "name",
    [
        ".driveengine/archives/other.tgz.extracted.json",
        "./.driveengine/archives/other.tgz.files.txt",
        ".DriveEngine/checksums.md5",  # the same folder on a case-insensitive file system
    ],
)
def test_driveengine_state_names_are_reserved(tmp_path: Path, name: str) -> None:
    archive = _tar(tmp_path / "forged.tgz", [_file("ok/first.txt"), _file(name, b"{}"), _file("ok/z.txt")])
    root = tmp_path / "root"
    with pytest.raises(ArchiveError, match="reserved") as err:
        extract_archive(archive, root)
    assert err.value.member == name
    assert not (root / "ok").exists()
    assert extraction_marker(root, "other.tgz") is None and extraction_marker(root, "forged.tgz") is None


def test_decompression_bomb_stops_at_the_ratio_limit_and_leaves_nothing(tmp_path: Path) -> None:
    zeros = bytes(8 << 20)  # 8 MiB of zeros: about 8 KiB compressed
    archive = _tar(tmp_path / "bomb.tgz", [_file("d/small.txt", b"x"), _file("d/zeros.bin", zeros)])
    assert archive.stat().st_size < 64 << 10
    root = tmp_path / "root"
    with pytest.raises(ArchiveError, match="decompression bomb") as err:
        extract_archive(archive, root, max_ratio=10.0)  # limit: max(1 MiB, 10 x the archive's bytes)
    assert err.value.member == "d/zeros.bin" and "--max-extract-ratio" in str(err.value)
    assert _tree(root) == {".driveengine": "dir", ".driveengine/staging": "dir"}
    # the limit is the cause: a large enough ratio extracts the same archive
    res = extract_archive(archive, root, max_ratio=5000.0)
    assert res.nbytes == len(zeros) + 1 and (root / "d/zeros.bin").stat().st_size == len(zeros)


def test_many_empty_members_count_against_the_limit(tmp_path: Path) -> None:
    # each member costs at least one 512-byte tar block: 2,100 empty files > the 1 MiB allowance
    archive = _tar(tmp_path / "inodes.tgz", [_file(f"d/{i}", b"") for i in range(2100)])
    root = tmp_path / "root"
    with pytest.raises(ArchiveError, match="decompression bomb"):
        extract_archive(archive, root, max_ratio=10.0)
    assert not (root / "d").exists()


def test_failure_while_moving_into_place_removes_what_was_moved(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a/b/conflict").mkdir(parents=True)  # a folder where the archive has a file
    (root / "a/b/conflict/keep.txt").write_text("mine")
    archive = _tar(tmp_path / "c.tgz", [_file("a/1.txt"), _file("a/new/2.txt"), _file("a/b/conflict")])
    with pytest.raises(ArchiveError, match="nothing was kept"):
        extract_archive(archive, root)
    assert _tree(root) == {
        "a": "dir",
        "a/b": "dir",
        "a/b/conflict": "dir",
        "a/b/conflict/keep.txt": b"mine",
        ".driveengine": "dir",
        ".driveengine/staging": "dir",
    }
