"""The loader's field registry (driveengine.data.fields): adding a field is one registration, a new label
array becomes a field (with its history) by itself, unknown or unavailable names are refused when the
stream is built."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from driveengine.schemas.occ import LABEL_ARRAYS, LabelArray, register_label_array
from stream_fixtures import build_split

from driveengine.data import FrameStream, StreamError
from driveengine.data.fields import (
    ArrayField,
    LabelArrayField,
    LogReader,
    ReadOptions,
    SampleField,
    register_field,
    registered_fields,
    unregister_field,
)

OCC = ("semantics", "flow", "mask_lidar")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return build_split(tmp_path_factory.mktemp("out"), scenes_per_log=((5, 4), (6,)))


class EgoSpeedXY(SampleField):
    """A made-up field: the ego position's distance from the global origin, a Python float."""

    name = "ego_range"

    def columns(self, options: ReadOptions) -> tuple[str, ...]:
        return ("ego2global",)

    def read_frame(self, log: LogReader, row: int) -> dict[str, float]:
        return {"ego_range": float(np.hypot(*log.column("ego2global")[row][:2, 3]))}


class EgoXY(ArrayField):
    """A made-up fixed-size array field read a run of rows at a time: the ego's (x, y), float64 (2,)."""

    name = "ego_xy"

    def columns(self, options: ReadOptions) -> tuple[str, ...]:
        return ("ego2global",)

    def frame_layout(self, log: LogReader) -> tuple[tuple[int, ...], np.dtype]:
        return (2,), np.dtype(np.float64)

    def read_run(self, log: LogReader, start: int, stop: int, out: np.ndarray) -> None:
        out[:] = log.column("ego2global")[start:stop, :2, 3]


@pytest.fixture
def registered():
    fields = [register_field(EgoSpeedXY()), register_field(EgoXY())]
    yield fields
    for f in fields:
        unregister_field(f.name)


def test_a_registered_field_is_served_with_its_history(split, registered):
    stream = FrameStream(
        split.root, split.split, fields=("ego_range", "ego_xy", "semantics"), history=2, seed=1
    )
    batches = list(stream.loader(batch_size=3))
    assert sum(len(b["token"]) for b in batches) == len(split.frames)
    for batch in batches:
        assert batch["ego_xy"].dtype.is_floating_point and tuple(batch["ego_xy"].shape[1:]) == (2,)
        assert tuple(batch["history_ego_xy"].shape[1:]) == (2, 2)
        for i, token in enumerate(batch["token"]):
            truth = split.frames[token]
            assert batch["ego_range"][i].item() == pytest.approx(np.hypot(*truth.ego2global[:2, 3]))
            assert np.array_equal(batch["ego_xy"][i].numpy(), truth.ego2global[:2, 3])
            for j, (tok, valid) in enumerate(
                zip(batch["history_tokens"][i], batch["history_valid"][i], strict=True)
            ):
                assert np.array_equal(
                    batch["history_ego_xy"][i][j].numpy(), split.frames[tok].ego2global[:2, 3]
                )
                if valid:
                    assert split.frames[tok].row == truth.row - j - 1
    assert "history_ego_range" not in batches[0]  # a SampleField has no history unless it says so


def test_registration_rules(registered):
    assert {"points", "images", "ego_range", "ego_xy"} <= set(registered_fields())
    with pytest.raises(ValueError, match="registered already"):
        register_field(EgoXY())
    register_field(EgoXY(), replace=True)
    with pytest.raises(ValueError, match="label array"):
        register_field(LabelArrayField("semantics"))

    class Nameless(EgoSpeedXY):
        name = ""

    with pytest.raises(ValueError, match="needs a name"):
        register_field(Nameless())


def test_unregistered_and_misspelt_names_are_refused_when_built(split):
    with pytest.raises(StreamError, match=r"unknown field 'ego_range'") as exc:
        FrameStream(split.root, split.split, fields=("ego_range",))
    message = str(exc.value)
    assert "valid fields: points, images, semantics, flow, mask_lidar, token" in message
    assert "\n" not in message
    with pytest.raises(StreamError, match=r"unknown field 'imges'.*did you mean 'images'\?"):
        FrameStream(split.root, split.split, fields=("imges",))
    with pytest.raises(StreamError, match=r"unknown field 'mask_lidr'.*did you mean 'mask_lidar'\?"):
        FrameStream(split.root, split.split, fields=("semantics", "mask_lidr"))


def test_labels_asked_of_a_split_without_labels_are_refused(tmp_path):
    info = build_split(tmp_path, scenes_per_log=((3,), (4,)))
    path = tmp_path / "mini" / "manifest.json"
    data = json.loads(path.read_text())
    for entry in data["logs"].values():
        entry["occ"] = None
    path.write_text(json.dumps(data))
    with pytest.raises(StreamError, match="field 'flow' is a label array and no log of the split has labels"):
        FrameStream(tmp_path, "mini", fields=("token", "flow"))
    assert {s["log_name"] for s in FrameStream(tmp_path, "mini", fields=("token",))} == set(info.log_names)


@pytest.fixture
def mask_testonly():
    """A made-up label array registered the way the architecture page says (one call in
    schemas/occ.py), e.g. like ``mask_camera``; removed again afterwards."""
    array = register_label_array(
        LabelArray("mask_testonly", np.dtype(np.bool_), (), False, False, "observed by a camera (test)")
    )
    yield array
    del LABEL_ARRAYS["mask_testonly"]


def test_a_new_label_array_is_a_field_by_itself(tmp_path, mask_testonly):
    with_it = build_split(tmp_path / "a", scenes_per_log=((3, 2), (4,)), extra_arrays=("mask_testonly",))
    stream = FrameStream(with_it.root, "mini", fields=("mask_testonly", "semantics"), history=1, seed=2)
    samples = list(stream)
    assert len(samples) == 9
    for s in samples:
        truth = with_it.frames[s["token"]]
        assert s["mask_testonly"].dtype == np.bool_
        assert np.array_equal(s["mask_testonly"], truth.extra["mask_testonly"])
        assert np.array_equal(
            s["history_mask_testonly"][0], with_it.frames[s["history_tokens"][0]].extra["mask_testonly"]
        )
    batch = next(iter(stream.loader(batch_size=4)))
    assert tuple(batch["mask_testonly"].shape) == (4, *stream.grid.shape)

    without = build_split(tmp_path / "b", scenes_per_log=((3,),))
    with pytest.raises(
        StreamError, match=r"label groups hold no array 'mask_testonly' \(they hold semantics, flow"
    ):
        FrameStream(without.root, "mini", fields=("mask_testonly",))


def test_a_log_whose_labels_lack_an_array_names_the_log(tmp_path, mask_testonly):
    """Groups of one split that differ (one log collected without the optional array): the stream is
    built (the first group has it) and reading the other log says which log and group."""
    build_split(tmp_path / "a", scenes_per_log=((3,),), extra_arrays=("mask_testonly",))
    other = build_split(tmp_path / "b", scenes_per_log=((3,), (2,)))
    victim = other.log_names[1]
    a, b = tmp_path / "a" / "mini", tmp_path / "b" / "mini"
    (a / "meta" / f"{victim}.parquet").write_bytes((b / "meta" / f"{victim}.parquet").read_bytes())
    shutil.copytree(b / "occ" / f"{victim}.zarr", a / "occ" / f"{victim}.zarr")
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["logs"][victim] = json.loads((b / "manifest.json").read_text())["logs"][victim]
    (a / "manifest.json").write_text(json.dumps(manifest))
    stream = FrameStream(tmp_path / "a", "mini", fields=("mask_testonly",), shuffle=False)
    with pytest.raises(
        StreamError, match=rf"log {victim}: its labels .*{victim}.zarr hold no array 'mask_testonly'"
    ):
        list(stream)
