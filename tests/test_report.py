"""``driveengine report``: one self-contained HTML page, parsed with html.parser: its sections and their numbers
(against the split itself), every image embedded and decodable, nothing outside the file referenced."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from collected_fixture import Collected, collected_split
from PIL import Image

from driveengine import cli
from driveengine.store.manifest import load_manifest, save_manifest
from driveengine.store.occ import open_occ

pytest.importorskip("matplotlib")

SECTIONS = ["summary", "classes", "boxes", "frames", "dropped", "labels", "thumbnails"]


@pytest.fixture
def collected(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    return collected_split(tmp_path_factory)


class Page(HTMLParser):
    """The parts of the page a test checks: sections, tables (by section), images, every URL-like attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.images: list[dict[str, str]] = []
        self.urls: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self.pre: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_pre = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        for k, v in a.items():
            if k in ("src", "href", "action", "data", "srcset", "poster") or "url(" in v:
                self.urls.append((tag, k, v))
        if tag == "section":
            self.sections.append(a.get("id", ""))
        elif tag == "table":
            self.tables.setdefault(self.sections[-1], []).append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a | {"section": self.sections[-1]})
        elif tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self.sections[-1]][-1].append(self._row)
            self._row = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_pre:
            self.pre[-1] += data


def number(text: str) -> int:
    return int(text.replace(",", ""))


def two_log_split(collected: Collected, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the collected split with a second log (a copy of the first under another name) and some
    dropped frames recorded in the manifest."""
    split_dir = tmp_path / "mini"
    shutil.copytree(collected.split_dir, split_dir)
    other = "2021.10.18.03.47.35_veh-54_99999_99999"
    manifest = load_manifest(split_dir)
    entry = manifest.logs[collected.log]
    shutil.copy(split_dir / entry.meta, split_dir / "meta" / f"{other}.parquet")
    shutil.copytree(split_dir / entry.occ, split_dir / "occ" / f"{other}.zarr")
    from dataclasses import replace

    manifest.logs[other] = replace(
        entry,
        meta=f"meta/{other}.parquet",
        occ=f"occ/{other}.zarr",
        checksums={},
        dropped={"missing_lidar": 3},
    )
    manifest.logs[collected.log] = replace(entry, dropped={"missing_lidar": 1, "broken_image": 2})
    save_manifest(split_dir, manifest)
    return split_dir, other


def test_report_is_one_self_contained_page_with_the_split_s_numbers(
    collected: Collected, tmp_path, monkeypatch
):
    split_dir, other = two_log_split(collected, tmp_path)
    out = tmp_path / "report.html"
    monkeypatch.setattr(
        "sys.argv", ["driveengine", "report", str(split_dir), "--out", str(out), "--frames-per-log", "50"]
    )
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert not exc.value.code
    text = out.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    assert page.sections == SECTIONS

    # self-contained: every image a PNG data URI that decodes; no URL to anything outside; no script
    assert page.images and all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    for tag, attr, value in page.urls:
        assert value.startswith("data:image/png;base64,"), (tag, attr, value[:60])
    assert not {"script", "link", "iframe", "object", "embed"} & page.tags
    assert "http://" not in text and "https://" not in text
    for image in page.images:
        png = Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1], validate=True)))
        png.load()
        assert png.format == "PNG" and min(png.size) >= 100 and image["alt"]

    shard = pq.read_table(split_dir / "meta" / f"{collected.log}.parquet", columns=["anns"])
    frames = shard.num_rows
    # frames per log and dropped frames by reason, as the manifest says
    (frames_table,) = page.tables["frames"]
    rows = {r[0]: r for r in frames_table[1:]}
    assert set(rows) == {collected.log, other}
    assert number(rows[collected.log][1]) == number(rows[other][1]) == frames
    assert number(rows[collected.log][2]) == 3 and number(rows[other][2]) == 3
    assert rows[other][4].endswith("(America/Los_Angeles)")
    (dropped,) = page.tables["dropped"]
    assert {r[0]: number(r[1]) for r in dropped[1:]} == {"broken_image": 2, "missing_lidar": 4}
    # boxes per category: twice the log's boxes (two copies)
    names = [n for row in shard.column("anns").to_pylist() for n in row["gt_names"]]
    (boxes,) = page.tables["boxes"]
    assert {r[0]: number(r[1]) for r in boxes[1:]} == {n: 2 * names.count(n) for n in set(names)}
    # voxels per class: every frame of both logs (frames per log 50 >= the log's frames)
    occ = open_occ(split_dir / "occ" / f"{collected.log}.zarr")
    sem = np.stack([occ.frame(i).semantics for i in range(occ.num_frames)])
    counts = 2 * np.bincount(sem.reshape(-1), minlength=17)
    (classes,) = page.tables["classes"]
    assert {int(r[0]): number(r[2]) for r in classes[1:]} == {i: int(c) for i, c in enumerate(counts)}
    # label statistics: occupied and observed voxels per frame; the generator recipe
    (labels,) = page.tables["labels"]
    stats = {r[0]: r[1] for r in labels[1:]}
    assert number(stats["frames counted"]) == 2 * frames
    occupied = (sem != 16).sum() / frames
    assert stats["occupied voxels per frame"].startswith(f"{occupied:,.1f} (")
    (recipe,) = page.pre
    assert json.loads(recipe) == occ.attrs["generator"]
    assert "Generator settings of 2 log(s)" in text
    # one thumbnail per log, captioned
    thumbs = [i for i in page.images if i["section"] == "thumbnails"]
    assert sorted(i["alt"] for i in thumbs) == sorted(f"BEV of {n}" for n in (collected.log, other))


def test_report_escapes_the_dataset_s_text_and_refuses_other_suffixes(collected: Collected, tmp_path):
    from driveengine.viz.report import VizError, collect_report, render_html, write_report

    split_dir = tmp_path / "mini"
    shutil.copytree(collected.split_dir, split_dir)
    manifest = load_manifest(split_dir)
    from dataclasses import replace

    entry = manifest.logs[collected.log]
    manifest.logs[collected.log] = replace(entry, dropped={"<script>alert(1)</script>": 1})
    save_manifest(split_dir, manifest)
    report = collect_report(split_dir, frames_per_log=1, thumbnails=False, quiet=True)
    assert report.voxels.frames == 1  # one frame per log read
    text = render_html(report)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    page = Page()
    page.feed(text)
    assert page.sections == SECTIONS and not [i for i in page.images if i["section"] == "thumbnails"]
    with pytest.raises(VizError, match=r"name it \*\.html"):
        write_report(split_dir, tmp_path / "report.pdf")
