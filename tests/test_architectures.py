"""The four networks against their papers and against the published checkpoints' layouts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from contract import zoo
from models.layers import ConvBNActivation, channel_shuffle, make_divisible
from models.mobilenet_v1 import MobileNetV1
from models.mobilenet_v2 import INVERTED_RESIDUAL_SETTING, MobileNetV2
from models.shufflenet_v1 import ShuffleNetV1, ShuffleUnit
from models.shufflenet_v2 import InvertedResidual, ShuffleNetV2

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("REFERENCE_DIR", REPO.parent / "shared" / "reference"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small inputs: one intra-op thread is as fast, and much faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Each published checkpoint's layout, pinned so that the check runs without the reference files
# (../shared/reference/, see its README): tensor count, num_params and the first 16 hex digits of
# the SHA-256 of its "key [shape]" lines (timm: "[shape]" lines only; our keys differ from timm's).
PINNED = {
    # model name: (reference file, tensors, num_params, digest, digest covers keys)
    "mobilenet_v2": ("tv_mobilenet_v2.json", 314, 3_504_872, "a18c560d82f6d01d", True),
    "shufflenet_v2_0.5x": ("tv_shufflenet_v2_x0_5.json", 338, 1_366_792, "54a515f5b9e5104f", True),
    "shufflenet_v2_1.0x": ("tv_shufflenet_v2_x1_0.json", 338, 2_278_604, "cb82a4e6fc1db15e", True),
    "shufflenet_v2_1.5x": ("tv_shufflenet_v2_x1_5.json", 338, 3_503_624, "231697331a27fbff", True),
    "shufflenet_v2_2.0x": ("tv_shufflenet_v2_x2_0.json", 338, 7_393_996, "0c76297abaa12b0d", True),
    "mobilenet_v1": ("timm_mobilenetv1_100.json", 164, 4_231_976, "451a114b3ffbb9ca", False),
}


def _layout(module: nn.Module) -> list[tuple[str, list[int]]]:
    return [(key, list(t.shape)) for key, t in module.state_dict().items()]


def _digest(layout: list[tuple[str, list[int]]], with_keys: bool) -> str:
    lines = [f"{k} {s}" if with_keys else f"{s}" for k, s in layout]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# layers


@pytest.mark.parametrize(
    ("value", "divisor", "min_value", "expected"),
    [
        (32.0, 8, None, 32),  # already a multiple
        (12.0, 8, None, 16),  # 24 * 0.5: the tie rounds up
        (11.2, 8, None, 16),  # 32 * 0.35: 8 would lose more than 10%, so step up
        (33.6, 8, None, 32),  # 96 * 0.35: rounds down, loses under 10%
        (1792.0, 8, None, 1792),  # 1280 * 1.4
        (3.0, 8, None, 8),  # never below the divisor
        (2.0, 8, 4, 4),  # ... or below min_value when given
        (136.0, 16, None, 144),  # ShuffleNet v1 g=4 0.5x stage 2: nearest multiple of 4g
        (100.0, 8, None, 104),
    ],
)
def test_make_divisible(value: float, divisor: int, min_value: int | None, expected: int) -> None:
    result = make_divisible(value, divisor, min_value)
    assert result == expected
    assert isinstance(result, int)


def test_channel_shuffle_is_the_papers_permutation() -> None:
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    # groups [0 1 | 2 3 | 4 5] -> one channel from each group in turn
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    # groups [0 1 2 | 3 4 5]
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 1).flatten().tolist() == [0, 1, 2, 3, 4, 5]


def test_channel_shuffle_keeps_batch_and_pixels_apart() -> None:
    x = torch.randn(3, 12, 5, 4)
    out = channel_shuffle(x, 4)
    assert out.shape == x.shape
    perm = [g * 3 + i for i in range(3) for g in range(4)]  # out channel j*4+g <- in channel g*3+j
    assert torch.equal(out, x[:, perm])
    # shuffling with g then with c/g groups restores the order
    assert torch.equal(channel_shuffle(out, 3), x)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside torch.export
def test_channel_shuffle_exports_with_a_dynamic_batch(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 1, groups=3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return channel_shuffle(self.conv(x), 3)

    module = Shuffle().eval()
    path = tmp_path / "shuffle.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        module,
        (torch.randn(2, 6, 4, 4),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
        dynamo=True,
        verbose=False,
    )
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = torch.randn(n, 6, 4, 4)
        (out,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), module(x))


def test_conv_bn_activation_layout() -> None:
    block = ConvBNActivation(8, 16, 3, 2, groups=8, activation=nn.ReLU6)
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6]
    conv = block[0]
    assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == ((3, 3), (2, 2), (1, 1), 8)
    assert conv.bias is None
    assert len(ConvBNActivation(8, 16, 1, activation=None)) == 2
    with pytest.raises(ValueError):
        ConvBNActivation(8, 12, 1, groups=8)


# --------------------------------------------------------------------------------------------
# layouts of the published checkpoints


def _reference(file: str) -> dict | None:
    path = REFERENCE_DIR / file
    if not path.is_file():
        return None
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", [n for n, pin in PINNED.items() if pin[4]])
def test_torchvision_layout(name: str) -> None:
    file, tensors, num_params, digest, _ = PINNED[name]
    module = models.create(name)
    layout = _layout(module)
    reference = _reference(file)
    if reference is not None:
        expected = [(key, shape) for key, shape, _dtype in reference["state_dict"]]
        assert layout == expected
        assert _num_params(module) == reference["num_params"]
    assert len(layout) == tensors
    assert _num_params(module) == num_params
    assert _digest(layout, with_keys=True) == digest


def test_mobilenet_v1_layout_maps_one_to_one_onto_timm() -> None:
    file, tensors, num_params, digest, _ = PINNED["mobilenet_v1"]
    module = models.create("mobilenet_v1")
    layout = _layout(module)
    reference = _reference(file)
    if reference is not None:
        assert [shape for _, shape in layout] == [shape for _, shape, _ in reference["state_dict"]]
        # the same kind of tensor at every position: conv/FC weight, BN parameter or buffer, bias
        suffixes = [key.rsplit(".", 1)[1] for key, _ in layout]
        assert suffixes == [key.rsplit(".", 1)[1] for key, _, _ in reference["state_dict"]]
        assert _num_params(module) == reference["num_params"]
    assert len(layout) == tensors
    assert _num_params(module) == num_params
    assert _digest(layout, with_keys=False) == digest
    assert layout[-2:] == [("classifier.weight", [1000, 1024]), ("classifier.bias", [1000])]


# --------------------------------------------------------------------------------------------
# every knob builds a classifier

FORWARD_NAMES = [
    *zoo.DEFAULT_MODELS,
    "mobilenet_v1_0.5_160",
    "mobilenet_v1_0.25_128",
    "mobilenet_v2_0.75_192",
    "mobilenet_v2_1.4_96",
    "shufflenet_v1_g8_0.5x",
    "shufflenet_v1_g1_1.0x",
    "shufflenet_v1_g2_0.5x",
    "shufflenet_v1_g4_1.5x",
    "shufflenet_v2_0.5x",
    "shufflenet_v2_2.0x",
]


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_forward_shape(name: str) -> None:
    spec = models.parse(name)
    module = models.create(name)
    assert not module.training
    with torch.no_grad():
        for n in (1, 3):
            out = module(torch.randn(n, *spec.input_shape))
            assert out.shape == (n, 1000)
            assert torch.isfinite(out).all()


def test_num_classes() -> None:
    module = models.create("shufflenet_v1_g8_0.5x", num_classes=10)
    with torch.no_grad():
        assert module(torch.randn(2, 3, 96, 96)).shape == (2, 10)


def test_resolution_does_not_change_the_network() -> None:
    a, b = models.create("mobilenet_v1_0.75_128"), models.create("mobilenet_v1_0.75_224")
    assert _layout(a) == _layout(b)
    a, b = models.create("mobilenet_v2_0.5_96"), models.create("mobilenet_v2_0.5_224")
    assert _layout(a) == _layout(b)


def test_batch_elements_are_independent() -> None:
    module = models.create("shufflenet_v1_g3_0.5x")
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(module(x)[1:2], module(x[1:2]), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# MobileNet v1


def test_mobilenet_v1_follows_table_1() -> None:
    module = MobileNetV1(width_multiplier=1.0)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 13  # "Counting depthwise and pointwise convolutions as separate layers"
    depthwise = [c for c in convs if c.groups > 1]
    assert all(c.groups == c.in_channels == c.out_channels and c.kernel_size == (3, 3) for c in depthwise)
    strides = [c.stride[0] for c in depthwise]
    assert strides == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    pointwise_out = [c.out_channels for c in convs if c.kernel_size == (1, 1)]
    assert pointwise_out == [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    # BN and ReLU6 after every convolution
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len(convs)
    assert sum(isinstance(m, nn.ReLU6) for m in module.modules()) == len(convs)
    assert not any(type(m) is nn.ReLU for m in module.modules())
    with torch.no_grad():
        assert module.features(torch.randn(1, 3, 224, 224)).shape == (1, 1024, 7, 7)


@pytest.mark.parametrize(
    ("alpha", "widths"), [(0.25, (8, 16, 256)), (0.5, (16, 32, 512)), (0.75, (24, 48, 768))]
)
def test_mobilenet_v1_width_multiplier(alpha: float, widths: tuple[int, int, int]) -> None:
    module = MobileNetV1(width_multiplier=alpha)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert (convs[0].out_channels, convs[2].out_channels, convs[-1].out_channels) == widths
    assert module.classifier.in_features == widths[-1]


# --------------------------------------------------------------------------------------------
# MobileNet v2


def test_mobilenet_v2_follows_table_2() -> None:
    module = MobileNetV2()
    blocks = list(module.features)[1:-1]
    assert len(blocks) == 17
    # identity shortcut exactly where stride is 1 and the width is kept: n - 1 per row of Table 2
    assert sum(b.use_residual for b in blocks) == 0 + 1 + 2 + 3 + 2 + 2 + 0
    expected = [c for _, c, n, _ in INVERTED_RESIDUAL_SETTING for _ in range(n)]
    assert expected == [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
    assert [b.out_channels for b in blocks] == expected
    # linear bottleneck: nothing after the projection's BN
    for block in blocks:
        assert isinstance(block.conv[-1], nn.BatchNorm2d)
        assert isinstance(block.conv[-2], nn.Conv2d) and block.conv[-2].kernel_size == (1, 1)
    assert isinstance(module.classifier[0], nn.Dropout) and module.classifier[0].p == 0.2


@pytest.mark.parametrize(
    ("width", "last"), [(0.35, 1280), (0.5, 1280), (0.75, 1280), (1.0, 1280), (1.4, 1792)]
)
def test_mobilenet_v2_width_multiplier(width: float, last: int) -> None:
    module = MobileNetV2(width_multiplier=width)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert convs[-1].out_channels == last == module.classifier[1].in_features


def test_mobilenet_v2_residual_adds_the_input() -> None:
    module = MobileNetV2().eval()
    block = module.features[3]  # 24 -> 24, stride 1
    assert block.use_residual
    x = torch.randn(2, 24, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + block.conv(x))


# --------------------------------------------------------------------------------------------
# ShuffleNet v1


@pytest.mark.parametrize("groups", zoo.SHUFFLENET_V1_GROUPS)
@pytest.mark.parametrize("scale", zoo.SHUFFLENET_V1_SCALES)
def test_shufflenet_v1_every_variant_builds(groups: int, scale: float) -> None:
    module = ShuffleNetV1(groups=groups, scale=scale)
    stages = [module.stage2, module.stage3, module.stage4]
    assert [len(s) for s in stages] == [4, 8, 4]
    table = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}[groups]
    width = module.conv1[0].out_channels
    assert width % groups == 0
    for i, stage in enumerate(stages):
        for j, unit in enumerate(stage):
            assert unit.stride == (2 if j == 0 else 1)
            bottleneck = unit.gconv1[0].out_channels
            out = bottleneck * 4
            assert bottleneck % groups == 0
            assert out % (4 * groups) == 0
            # s * Table 1 rounded to the nearest multiple of 4g
            assert abs(out - scale * table * 2**i) <= 2 * groups
            expected_groups = 1 if (i == 0 and j == 0) else groups
            assert unit.gconv1[0].groups == expected_groups
            assert unit.gconv2[0].groups == groups
            assert unit.gconv2[0].out_channels == (out - width if j == 0 else out)
            width = out
    assert module.fc.in_features == width


def test_shufflenet_v1_g3_matches_table_1_and_the_authors_release() -> None:
    module = ShuffleNetV1(groups=3, scale=1.0)
    assert module.conv1[0].out_channels == 24
    stages = (module.stage2, module.stage3, module.stage4)
    assert [s[0].gconv1[0].out_channels * 4 for s in stages] == [240, 480, 960]
    # megvii-model/ShuffleNet-Series: Conv1 is 12/24/24/48 wide at 0.5x/1x/1.5x/2x (16 for g = 8 at 0.5x)
    stems = {(g, s): ShuffleNetV1(groups=g, scale=s).conv1[0].out_channels for g in (3, 8) for s in (0.5, 2)}
    assert stems == {(3, 0.5): 12, (3, 2.0): 48, (8, 0.5): 16, (8, 2.0): 48}
    with torch.no_grad():
        x = module.maxpool(module.conv1(torch.randn(1, 3, 224, 224)))
        assert x.shape == (1, 24, 56, 56)
        for stage, size in zip(stages, (28, 14, 7), strict=True):
            x = stage(x)
            assert x.shape[2:] == (size, size)


def test_shufflenet_v1_units_follow_figure_2() -> None:
    torch.manual_seed(0)
    unit = ShuffleUnit(24, 240, stride=2, groups=3, group_first_conv=False).eval()
    # BN with non-trivial statistics, so that the branches are not near zero
    for m in unit.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.relu(torch.randn(2, 24, 16, 16))
    with torch.no_grad():
        out = unit(x)
        assert out.shape == (2, 240, 8, 8)
        # stride 2: 3x3 avg-pooled input concatenated in front of the residual branch, ReLU last
        torch.testing.assert_close(out[:, :24], nn.functional.avg_pool2d(x, 3, 2, 1))
        branch = unit.gconv2(unit.dwconv(channel_shuffle(unit.gconv1(x), 3)))
        torch.testing.assert_close(out[:, 24:], torch.relu(branch))
        # no ReLU between the depthwise conv and the second group conv
        assert len(unit.dwconv) == 2 and len(unit.gconv2) == 2

    unit = ShuffleUnit(240, 240, stride=1, groups=3).eval()
    x = torch.relu(torch.randn(2, 240, 8, 8))
    with torch.no_grad():
        branch = unit.gconv2(unit.dwconv(channel_shuffle(unit.gconv1(x), 3)))
        torch.testing.assert_close(unit(x), torch.relu(x + branch))


# --------------------------------------------------------------------------------------------
# ShuffleNet v2


@pytest.mark.parametrize(
    ("scale", "channels"),
    [
        (0.5, (48, 96, 192, 1024)),
        (1.0, (116, 232, 464, 1024)),
        (1.5, (176, 352, 704, 1024)),
        (2.0, (244, 488, 976, 2048)),
    ],
)
def test_shufflenet_v2_follows_table_5(scale: float, channels: tuple[int, int, int, int]) -> None:
    module = ShuffleNetV2(scale=scale)
    stages = (module.stage2, module.stage3, module.stage4)
    assert [len(s) for s in stages] == [4, 8, 4]
    assert module.conv1[0].out_channels == 24
    with torch.no_grad():
        x = module.maxpool(module.conv1(torch.randn(1, 3, 224, 224)))
        for stage, c, size in zip(stages, channels[:3], (28, 14, 7), strict=True):
            x = stage(x)
            assert x.shape == (1, c, size, size)
        assert module.conv5(x).shape == (1, channels[3], 7, 7)


def test_shufflenet_v2_basic_unit_passes_half_the_channels_through() -> None:
    unit = InvertedResidual(116, 116, stride=1).eval()
    x = torch.randn(2, 116, 14, 14)
    with torch.no_grad():
        out = unit(x)
        # split -> [x1, branch2(x2)] -> shuffle(2): x1 lands on the even channels
        assert torch.equal(out[:, 0::2], x[:, :58])
        torch.testing.assert_close(out[:, 1::2], unit.branch2(x[:, 58:]))
    assert not hasattr(unit, "branch1")


def test_shufflenet_v2_downsampling_unit_doubles_the_channels() -> None:
    unit = InvertedResidual(116, 232, stride=2).eval()
    x = torch.randn(2, 116, 14, 14)
    with torch.no_grad():
        out = unit(x)
        assert out.shape == (2, 232, 7, 7)
        torch.testing.assert_close(out[:, 0::2], unit.branch1(x))
        torch.testing.assert_close(out[:, 1::2], unit.branch2(x))
