"""The challenge's camera backbones: VoVNet-99 (V-99-eSE) beside the ResNets.

* VoVNet-99's structure: strides and shapes (ceil-mode pooling), effective squeeze-excitation (hard
  sigmoid gate, bias included), identity mapping only after the first block of a stage, the minimum
  image size, and the BGR normalisation of the weights downstream code uses.
* Exports against the downstream key/shape lists, held as data (``tests/data``): the full-width
  VoVNet-99 export against the mmdet3d plugins' ``VoVNet(spec_name='V-99-eSE')`` state_dict, the full-width
  ResNet-101 export against torchvision's ``resnet101()`` (mmdet's ResNet uses the same names, no fc),
  key for key and shape for shape; ``backbone.json`` carries the config lines that load the file.
* An exported tiny VoVNet loads into a fresh model (strict) and computes the same features, directly,
  through ``--backbone-weights`` and with the ``img_backbone.`` prefix of an mmdet3d ``load_from``.
* ``--backbone-weights``: detector / detectron2 / wrapped checkpoints accepted; wrong backbone, wrong
  width, not a state_dict, non-tensor entries, NaN, truncated files and code-running pickles refused
  with one line naming the file (the pickle's payload never runs).
* ``driveengine pretrain --modality camera --backbone resnet101|vovnet99`` end to end through the CLI on
  a synthesised, collected split (tiny widths); option errors.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from driveengine.schemas import VoxelGrid
from typer.testing import CliRunner

from driveengine.cli import app
from driveengine.models.backbones import (
    backbone_names,
    get_backbone,
    identify_backbone,
    resolve_backbone_name,
)
from driveengine.models.camera import CameraOccupancyNet
from driveengine.models.export import (
    BackboneError,
    downstream_config,
    export_backbone,
    load_backbone_weights,
    save_backbone,
)
from driveengine.models.resnet import ResNet
from driveengine.models.vovnet import InputTooSmallError, OSABlock, VoVNet

DATA = Path(__file__).parent / "data"
GRID = VoxelGrid((-8.0, -8.0, -2.0), (8.0, 8.0, 2.0), 1.0)

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _expected(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) rows of a downstream state_dict listed in ``tests/data/<name>``."""
    rows = json.loads((DATA / name).read_text())["tensors"]
    return [(key, tuple(shape)) for key, shape in rows]


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights *and* BN statistics and eSE biases, so that a comparison cannot pass by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if not value.is_floating_point():
                continue
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
            elif key.endswith(("norm.weight", "bn1.weight", "bn2.weight", "bn3.weight")):
                value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
            else:
                value.copy_(0.1 * torch.randn(value.shape, generator=gen))


# -- VoVNet-99's structure --------------------------------------------------------------------------------


def test_vovnet99_stages_strides_and_channels_at_full_width():
    """stage2..stage5 at strides 4, 8, 16, 32 with 256/512/768/1024 channels; 3x3 stride-2 ceil-mode
    pooling before stages 3-5 (odd sizes round up); five layers per block, 1-3-9-3 blocks."""
    with torch.device("meta"):  # full width, shapes only
        net = VoVNet()
        for (h, w), expect in {
            (96, 160): [(24, 40), (12, 20), (6, 10), (3, 5)],
            (100, 172): [(25, 43), (12, 21), (6, 10), (3, 5)],
            (256, 704): [(64, 176), (32, 88), (16, 44), (8, 22)],
        }.items():
            feats = net(torch.empty(1, 3, h, w))
            assert [tuple(f.shape[-2:]) for f in feats] == expect
            assert [f.shape[1] for f in feats] == [256, 512, 768, 1024] == list(net.out_channels)
    blocks = [[name for name, _ in getattr(net, stage).named_children()] for stage in net.stage_names]
    assert blocks == [
        ["OSA2_1"],
        ["Pooling", "OSA3_1", "OSA3_2", "OSA3_3"],
        ["Pooling", *(f"OSA4_{j}" for j in range(1, 10))],
        ["Pooling", "OSA5_1", "OSA5_2", "OSA5_3"],
    ]
    assert {len(m.layers) for m in net.modules() if isinstance(m, OSABlock)} == {5}
    pool = net.stage3.Pooling
    assert (pool.kernel_size, pool.stride, pool.ceil_mode) == (3, 2, True)
    assert [m.stride for m in net.stem if isinstance(m, torch.nn.Conv2d)] == [(2, 2), (1, 1), (2, 2)]
    assert all(m.eps == 1e-5 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_ese_gate_and_identity_mapping():
    """The block output is ``ese(concat(...)) (+ input from the second block of a stage on)`` with the
    gate ``relu6(fc(mean) + 3) / 6``: a gate forced to 0 leaves exactly the input (residual block) or
    zeros (first block); a bias of 1.5 gives exactly 0.75 of the ungated output."""
    torch.manual_seed(0)
    net = VoVNet(width=8).eval()
    x = torch.randn(2, 32, 9, 11)  # stage2's output width at width 8
    first, second = net.stage3.OSA3_1, net.stage3.OSA3_2
    assert isinstance(first, OSABlock) and not first.residual and second.residual
    x2 = torch.randn(2, 64, 5, 6)
    with torch.no_grad():
        for block, inp in ((first, x), (second, x2)):
            block.ese.fc.weight.zero_()
            block.ese.fc.bias.fill_(-3.0)  # hsigmoid(-3) = 0
            base = inp if block.residual else torch.zeros_like(block(inp))
            torch.testing.assert_close(block(inp), base, rtol=0, atol=0)
            aggregated = block.concat(torch.cat([inp, *_layer_outputs(block, inp)], dim=1))
            block.ese.fc.bias.fill_(1.5)  # relu6(1.5 + 3) / 6 = 0.75
            torch.testing.assert_close(block(inp), 0.75 * aggregated + base)
            block.ese.fc.bias.fill_(10.0)  # saturates at 1
            torch.testing.assert_close(block(inp), aggregated + base)
            # a full-rank 1x1 conv with bias on the spatial mean of every channel, then the hard sigmoid
            c = aggregated.shape[1]
            w, b = torch.randn(c, c), torch.randn(c)
            block.ese.fc.weight.copy_(w[:, :, None, None])
            block.ese.fc.bias.copy_(b)
            z = aggregated.mean(dim=(2, 3)) @ w.T + b  # (B, C)
            gate = ((z + 3).clamp(0, 6) / 6)[:, :, None, None]
            torch.testing.assert_close(block(inp), aggregated * gate + base)


def _layer_outputs(block: OSABlock, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for layer in block.layers:
        x = layer(x)
        outs.append(x)
    return outs


def test_vovnet_refuses_images_below_its_minimum_size():
    net = VoVNet(width=4).eval()
    assert net.min_input_px == 29
    net(torch.rand(1, 3, 29, 40))  # the smallest size that reaches stage5
    with pytest.raises(InputTooSmallError, match="at least 29 x 29 pixels, got 40 x 28"):
        net(torch.rand(1, 3, 28, 40))


def test_each_backbone_gets_the_normalisation_of_its_published_weights():
    """ResNet: RGB with torchvision's ImageNet statistics; VoVNet-99: the same statistics in BGR order
    (the DD3D weights; mmdet3d configs use to_rgb=False)."""
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    resnet = CameraOccupancyNet(GRID, backbone="resnet18", width=4, neck_channels=4, decoder_channels=4)
    vovnet = CameraOccupancyNet(GRID, backbone="vovnet99", width=4, neck_channels=4, decoder_channels=4)
    r, v = resnet.normalise(red)[0, :, 0, 0], vovnet.normalise(red)[0, :, 0, 0]
    expect_rgb = [(255 - 123.675) / 58.395, -116.28 / 57.12, -103.53 / 57.375]
    torch.testing.assert_close(r, torch.tensor(expect_rgb))
    torch.testing.assert_close(v, torch.tensor(expect_rgb[::-1]))  # B, G, R


def test_backbone_names_resolve_through_the_registry():
    assert backbone_names() == ("resnet18", "resnet34", "resnet50", "resnet101", "vovnet99")
    assert resolve_backbone_name(None, None) == "resnet18"
    assert resolve_backbone_name(None, 50) == "resnet50"  # the older --depth spelling
    assert resolve_backbone_name("resnet101", 101) == "resnet101"
    with pytest.raises(BackboneError, match="--depth 50 contradicts --backbone vovnet99"):
        resolve_backbone_name("vovnet99", 50)
    with pytest.raises(BackboneError, match=r"unknown backbone 'vgg16': use one of resnet18, .*vovnet99"):
        get_backbone("vgg16")
    for name in backbone_names():  # every registered backbone is recognised from its own weights
        spec = get_backbone(name)
        assert identify_backbone(spec.build(4, 3).state_dict()) == (spec, 4)


# -- exports against the downstream key lists ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "data", "ignored"), [("vovnet99", "vovnet99_ese_keys.json", ()), ("resnet101", "resnet101_keys.json", ("fc.",))]
)  # fmt: skip
def test_full_width_export_has_exactly_the_downstream_keys_and_shapes(backbone, data, ignored, tmp_path):
    """The exported file of the full-width network is, key for key and shape for shape (and in the same
    order), the state_dict of the network downstream code instantiates (the classifier aside), and
    backbone.json holds the config lines that load it."""
    spec = get_backbone(backbone)
    torch.manual_seed(0)
    model_state = {f"backbone.{k}": v for k, v in spec.build(64, 3).state_dict().items()}
    exported = save_backbone(model_state, tmp_path / "backbone.pth", {"step": 7})
    state = torch.load(exported.path, weights_only=True)
    expected = [(k, shape) for k, shape in _expected(data) if not k.startswith(ignored)]
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected
    meta = json.loads(exported.meta_path.read_text())
    assert meta["backbone"] == backbone and meta["width"] == 64 and meta["downstream_compatible"] is True
    assert meta["tensors"] == len(expected) and meta["step"] == 7
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    params = sum(int(torch.Size(s).numel()) for k, s in expected if not k.endswith(buffers))
    assert meta["parameters"] == params
    lines = meta["downstream"]["lines"]
    checkpoint = repr(str(exported.path.resolve()))
    assert lines[0].startswith(f"img_backbone=dict(type={spec.downstream_type!r}, ")
    assert lines[0].endswith(f"init_cfg=dict(type='Pretrained', checkpoint={checkpoint})),")
    if backbone == "vovnet99":
        assert "spec_name='V-99-eSE'" in lines[0] and "out_features=['stage4', 'stage5']" in lines[0]
        assert (
            lines[1]
            == "# img_neck in_channels for these outputs: [768, 1024] (all four stages: [256, 512, 768, 1024])"
        )
        assert (
            lines[2]
            == "img_norm_cfg = dict(mean=[103.53, 116.28, 123.675], std=[57.375, 57.12, 58.395], to_rgb=False)"
        )
        assert meta["input"]["channel_order"] == "BGR" and meta["spec_name"] == "V-99-eSE"
        assert meta["stages"]["stage5"] == {"channels": 1024, "stride": 32}
    else:
        assert "depth=101" in lines[0] and "style='pytorch'" in lines[0] and meta["depth"] == 101
        assert (
            lines[2]
            == "img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)"
        )
        assert meta["stages"]["layer4"] == {"channels": 2048, "stride": 32}


def test_published_parameter_counts():
    """ResNet-101: 44.5M with torchvision's classifier (42.5M without); V-99-eSE: the plugin module's
    69,523,520 (the sum over the listed shapes: no separate published figure exists)."""
    counts = {}
    for name in ("resnet101", "vovnet99"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in get_backbone(name).build(64, 3).parameters())
    assert counts["resnet101"] + 2048 * 1000 + 1000 == 44_549_160
    assert counts["vovnet99"] == 69_523_520


# -- an exported VoVNet loads back ------------------------------------------------------------------------


def _tiny_vovnet_model() -> CameraOccupancyNet:
    torch.manual_seed(3)
    model = CameraOccupancyNet(GRID, backbone="vovnet99", width=8, neck_channels=8, decoder_channels=8)
    _randomise(model.backbone)
    return model


def test_an_exported_tiny_vovnet_loads_into_a_fresh_model_and_computes_the_same_features(tmp_path):
    model = _tiny_vovnet_model()
    ckpt = tmp_path / "run" / "last.pt"
    ckpt.parent.mkdir()
    torch.save({"model": model.state_dict(), "step": 5, "config": {"modality": "camera"}}, ckpt)
    result = CliRunner().invoke(app, ["export-backbone", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert "mmdet3d-plugin VoVNet(spec_name='V-99-eSE') state_dict" in result.output
    state = torch.load(tmp_path / "run" / "backbone.pth", weights_only=True)
    assert "stem.stem_1/conv.weight" in state and "stage5.OSA5_3.ese.fc.bias" in state
    meta = json.loads((tmp_path / "run" / "backbone.json").read_text())
    assert meta["backbone"] == "vovnet99" and meta["width"] == 8 and meta["downstream"] is None
    assert "width 8 is not the published width 64" in meta["note"]

    fresh = VoVNet(width=8)
    fresh.load_state_dict(state, strict=True)
    via_option = CameraOccupancyNet(
        GRID, backbone="vovnet99", width=8, neck_channels=8, decoder_channels=8,
        pretrained=tmp_path / "run" / "backbone.pth",
    )  # fmt: skip
    images = torch.rand(2, 3, 40, 72)
    for net in (fresh, via_option.backbone, model.backbone):
        net.eval()
    with torch.no_grad():
        want = model.backbone(images)
        assert [tuple(f.shape[1:]) for f in want] == [(32, 10, 18), (64, 5, 9), (96, 2, 4), (128, 1, 2)]
        for got_a, got_b, w in zip(fresh(images), via_option.backbone(images), want, strict=True):
            torch.testing.assert_close(got_a, w, rtol=0, atol=0)
            torch.testing.assert_close(got_b, w, rtol=0, atol=0)

    # the same weights for an mmdet3d load_from: every key under img_backbone.
    prefixed = export_backbone(ckpt, tmp_path / "detector.pth", key_prefix="img_backbone.")
    detector_keys = torch.load(prefixed.path, weights_only=True)
    assert set(detector_keys) == {f"img_backbone.{k}" for k in state}
    assert (
        prefixed.info.key_prefix == "img_backbone."
        and "prefixed with 'img_backbone.'" in prefixed.info.format
    )
    again = VoVNet(width=8)
    load_backbone_weights(again, prefixed.path)
    loaded = again.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(BackboneError, match="--key-prefix"):
        export_backbone(ckpt, tmp_path / "bad.pth", key_prefix="../evil")


def test_a_detector_prefix_gives_the_prefixed_init_cfg_and_load_from_lines(tmp_path):
    """With keys under ``img_backbone.`` the file is loaded by ``init_cfg`` with that prefix, or by a
    whole-detector ``load_from``."""
    path = tmp_path / "b.pth"
    lines = downstream_config(get_backbone("vovnet99"), 64, path, key_prefix="img_backbone.").lines
    quoted = repr(str(path.resolve()))
    assert lines[0].endswith(
        f"init_cfg=dict(type='Pretrained', checkpoint={quoted}, prefix='img_backbone.')),"
    )
    assert lines[-1] == f"# or, without init_cfg in img_backbone: load_from = {quoted}"
    assert downstream_config(get_backbone("vovnet99"), 32, path) is None  # no downstream network of width 32


# -- --backbone-weights: what is accepted, what is refused -------------------------------------------------


def test_vovnet_weights_in_the_formats_people_have_are_accepted(tmp_path):
    """A bare state_dict; an mmdet3d detector checkpoint (``state_dict`` of ``img_backbone.*`` beside a
    neck and a head, without num_batches_tracked, as frozen-BN conversions); a detectron2 FPN model
    (``backbone.bottom_up.*``); a DDP-wrapped ``module.`` state."""
    source = VoVNet(width=8)
    _randomise(source)
    state = source.state_dict()
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    files = {
        "bare.pth": state,
        "detector.pth": {
            "meta": {"epoch": 24},
            "state_dict": {
                **{f"img_backbone.{k}": v for k, v in no_counters.items()},
                "img_neck.lateral_convs.0.conv.weight": torch.zeros(4, 4, 1, 1),
                "pts_bbox_head.cls.weight": torch.zeros(10, 4),
            },
        },
        "detectron2.pth": {"model": {**{f"backbone.bottom_up.{k}": v for k, v in state.items()},
                                     "backbone.fpn_lateral3.weight": torch.zeros(4, 4, 1, 1)}},
        "ddp.pth": {f"module.{k}": v for k, v in state.items()},
    }  # fmt: skip
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        target = VoVNet(width=8)
        load_backbone_weights(target, tmp_path / name)
        loaded = target.state_dict()
        for key, value in no_counters.items():
            assert torch.equal(loaded[key], value), (name, key)


def test_torchvision_resnet_weights_without_counters_load(tmp_path):
    """torchvision's ImageNet files carry ``fc`` and (the older ones) no num_batches_tracked."""
    source = ResNet(50, width=8)
    _randomise(source)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    state.update({"fc.weight": torch.zeros(1000, 256), "fc.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "resnet50.pth")
    model = CameraOccupancyNet(GRID, backbone="resnet50", width=8, neck_channels=4, decoder_channels=4,
                               pretrained=tmp_path / "resnet50.pth")  # fmt: skip
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))


class _RunsCode:
    """Unpickling this calls ``os.system`` (a payload a malicious weights file could carry)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_weights_files_are_refused_with_one_line_naming_the_file(tmp_path):
    vov = VoVNet(width=8)
    marker = tmp_path / "payload_ran"
    torch.save({"stem.stem_1/conv.weight": _RunsCode(marker)}, tmp_path / "evil_zip.pth")
    (tmp_path / "evil_pickle.pth").write_bytes(pickle.dumps({"x": _RunsCode(marker)}, protocol=2))
    torch.save(ResNet(18, width=8).state_dict(), tmp_path / "resnet.pth")
    torch.save(VoVNet(width=16).state_dict(), tmp_path / "wide.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    torch.save({**vov.state_dict(), "stem.stem_1/conv.weight": "not a tensor"}, tmp_path / "str.pth")
    nan = dict(vov.state_dict())
    nan["stage3.OSA3_2.ese.fc.bias"] = torch.full_like(nan["stage3.OSA3_2.ese.fc.bias"], float("nan"))
    torch.save(nan, tmp_path / "nan.pth")
    torch.save(vov.state_dict(), tmp_path / "whole.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:5000])
    cases = {
        "evil_zip.pth": "unreadable or unsafe weights file, refused",
        "evil_pickle.pth": "unreadable or unsafe weights file, refused",
        "resnet.pth": r"does not match VoVNet-99 \(V-99-eSE\) at width 8 .*the file holds ResNet-18 weights at "
        "width 8: use --backbone resnet18 --width 8",
        "wide.pth": r"\d+ shape mismatches .*the file holds VoVNet-99 \(V-99-eSE\) weights at width 16",
        "list.pth": "expected a state_dict .* got list",
        "str.pth": r"1 entries are not tensors \(e.g. \['stem.stem_1/conv.weight'\]\)",
        "nan.pth": r"non-finite values \(NaN or inf\) in 1 tensors \(e.g. \['stage3.OSA3_2.ese.fc.bias'\]\)",
        "truncated.pth": "unreadable or unsafe weights file",
        "missing.pth": "no such backbone weights file",
    }
    before = {k: v.clone() for k, v in vov.state_dict().items()}
    for name, message in cases.items():
        with pytest.raises(BackboneError, match=message) as err:
            load_backbone_weights(vov, tmp_path / name)
        text = str(err.value)
        assert text.startswith(str(tmp_path / name)) and "\n" not in text, text
    assert not marker.exists()  # the payload never ran
    after = vov.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing half-loaded


# -- end to end through the CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A synthesised (128 x 72 images) and collected one-log split: 6 key frames, 8 cameras."""
    import numba

    from driveengine.collect.runner import CollectConfig, collect
    from driveengine.synth import synthesize

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    root = tmp_path_factory.mktemp("backbone_split")
    synthesize(
        root / "nuplan", logs=1, seconds=3.0, seed=5, points=2000, image_size=(128, 72), key_frames_only=True
    )
    summary = collect(
        CollectConfig.from_options(source="nuplan", root=root / "nuplan", out=root / "out", progress=False)
    )
    numba.set_num_threads(before)
    assert summary.ok
    return root / "out"


def _pretrain_args(collected: Path, runs: Path, backbone: str, *extra: str) -> list[str]:
    return [
        "pretrain", "--data", str(collected), "--split", "mini", "--modality", "camera", "--backbone", backbone,
        "--image-size", "64x36", "--lift-voxel", "2", "--width", "8", "--batch-size", "2", "--max-steps", "2",
        "--ckpt-every", "1", "--eval-every", "2", "--eval-frames", "2", "--run-dir", str(runs), "--name", backbone,
        "--device", "cpu", "--cpu-threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("backbone", ["resnet101", "vovnet99"])
def test_pretrain_trains_and_exports_each_challenge_backbone(backbone, collected, tmp_path):
    """`pretrain --backbone resnet101|vovnet99` trains (the backbone's weights move), writes backbone.pth
    at each checkpoint in its downstream naming, equal to the trained weights, and backbone.json."""
    result = CliRunner().invoke(app, _pretrain_args(collected, tmp_path / "runs", backbone))
    assert result.exit_code == 0, result.output
    assert "pretrain: 2 steps" in result.output and "eval: mIoU" in result.output
    run = tmp_path / "runs" / backbone
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == backbone and config["width"] == 8
    meta = json.loads((run / "backbone.json").read_text())
    assert meta["backbone"] == backbone and meta["width"] == 8 and meta["step"] == 2
    spec = get_backbone(backbone)
    state = torch.load(run / "backbone.pth", weights_only=True)
    fresh = spec.build(8, 3)
    fresh.load_state_dict(state, strict=True)
    trained = torch.load(run / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(trained[f"backbone.{k}"], v) for k, v in state.items())
    earlier = torch.load(run / "ckpt_0000001.pt", weights_only=True)["model"]
    step = (earlier[f"backbone.{spec.first_conv_key}"] - state[spec.first_conv_key]).abs().max()
    assert step > 1e-4  # an AdamW step of lr ~1e-3 (weight decay alone moves it ~1e-7): the stem learns

    # start a second run from the exported weights
    again = CliRunner().invoke(
        app,
        _pretrain_args(collected, tmp_path / "runs2", backbone, "--backbone-weights", str(run / "backbone.pth"),
                       "--max-steps", "1", "--eval-every", "0"),
    )  # fmt: skip
    assert again.exit_code == 0, again.output


def test_pretrain_option_errors_are_one_line(collected, tmp_path):
    runs = tmp_path / "runs"
    torch.save(ResNet(18, width=8).state_dict(), tmp_path / "r18.pth")
    cases = [
        (_pretrain_args(collected, runs, "vovnet99", "--backbone-weights", str(tmp_path / "r18.pth")),
         f"{tmp_path / 'r18.pth'}: does not match VoVNet-99"),
        (_pretrain_args(collected, runs, "vovnet99", "--depth", "50"), "--depth 50 contradicts --backbone vovnet99"),
        (_pretrain_args(collected, runs, "vgg16"), "unknown backbone 'vgg16'"),
        (["pretrain", "--data", str(collected), "--modality", "lidar", "--backbone", "vovnet99", "--run-dir", str(runs)],
         "--backbone vovnet99 chooses the camera backbone; --modality lidar runs use a ResNet encoder"),
        (_pretrain_args(collected, runs, "vovnet99", "--image-size", "48x27"), "at least 29 x 29 pixels, got 48 x 27"),
    ]  # fmt: skip
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0
        assert message in str(result.exception), (args, result.exception)
        assert "\n" not in str(result.exception)
