"""All five segmentation models: output sizes, argument errors, gradients, channels_last, bf16.

The VGG FCNs have ~134M parameters and pad every input by 100 px (a 1x1 image is ~200x200
inside), so on the 2-core CI CPU: shapes are checked in bulk on the meta device (no compute),
real models are built once per module, and real passes use tiny inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import resnet101

from fcn_models import (
    MODEL_NAMES,
    VGG16,
    FCN8s,
    FCN8sResNet,
    FCN8sResNet101,
    FCN16s,
    FCN32s,
    VGG16Conv,
    bilinear_upsampling,
    build_model,
    conv_transpose_output_size,
    vgg16_feature_sizes,
)

N_CLASS = 5
VGG_FCNS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")

# Odd, tiny, thin and large sizes; (384, 1024) is the deployment size.
SIZES = [
    (1, 1),
    (1, 2),
    (2, 1),
    (3, 5),
    (7, 7),
    (31, 33),
    (32, 32),
    (33, 31),
    (63, 65),
    (97, 203),
    (100, 1),
    (1, 100),
    (225, 223),
    (384, 1024),
    (511, 513),
]


@pytest.fixture(scope="module")
def meta_models() -> dict[str, nn.Module]:
    """Every model on the meta device: shapes propagate, nothing is allocated or computed."""
    with torch.device("meta"):
        return {name: build_model(name, N_CLASS).eval() for name in MODEL_NAMES}


def _randomize_scores(model: nn.Module) -> nn.Module:
    """Give the zero-initialised ``score_*`` layers random weights.

    They start at zero (as in the reference), which makes d(output)/d(everything below them)
    exactly zero: a gradient test on a fresh model would find no gradient in the backbone.
    """
    for name, m in model.named_modules():
        if name.startswith("score") and isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.normal_(m.bias, 0, 0.01)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: _randomize_scores(build_model(name, N_CLASS)) for name in MODEL_NAMES}


def _images(n: int, h: int, w: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(n, 3, h, w, device=device)


# --------------------------------------------------------------------------- output sizes


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_is_input_size_on_meta(meta_models: dict[str, nn.Module], name: str) -> None:
    model = meta_models[name]
    for h, w in SIZES:
        out = model(_images(2, h, w, device="meta"))
        assert out.shape == (2, N_CLASS, h, w), (name, h, w)


def _vgg_fcn_lengths(i: int) -> dict[str, int]:
    """Lengths along one axis inside the VGG FCNs, from the size formulas alone."""
    pool3, pool4, _, fc = vgg16_feature_sizes(i, conv1_padding=100)
    up2 = conv_transpose_output_size(fc, 4, 2)  # upscore2 (16s, 8s)
    return {
        "pool3": pool3,
        "pool4": pool4,
        "fc": fc,
        "up32": conv_transpose_output_size(fc, 64, 32),  # FCN32s upscore
        "up2": up2,
        "up16": conv_transpose_output_size(up2, 32, 16),  # FCN16s upscore16
        "up4": conv_transpose_output_size(up2, 4, 2),  # FCN8s upscore_pool4
        "up8": conv_transpose_output_size(conv_transpose_output_size(up2, 4, 2), 16, 8),
    }


def test_crops_fit_for_every_input_length() -> None:
    """Every crop window lies inside its map for H = 1..1024 (pure arithmetic)."""
    for i in range(1, 1025):
        n = _vgg_fcn_lengths(i)
        assert n["fc"] >= 1, i  # what conv1_1's padding of 100 guarantees
        assert n["up32"] >= FCN32s.OUTPUT_OFFSET + i, i
        assert n["pool4"] >= FCN16s.POOL4_OFFSET + n["up2"], i
        assert n["up16"] >= FCN16s.OUTPUT_OFFSET + i, i
        assert n["pool3"] >= FCN8s.POOL3_OFFSET + n["up4"], i
        assert n["up8"] >= FCN8s.OUTPUT_OFFSET + i, i
    # Without the padding a small image cannot reach fc6 at all (the notes' "fixed size").
    assert vgg16_feature_sizes(192, conv1_padding=1)[3] < 1
    assert vgg16_feature_sizes(193, conv1_padding=1)[3] == 1


def test_size_arithmetic_matches_the_network(meta_models: dict[str, nn.Module]) -> None:
    model = meta_models["fcn8s"]
    assert isinstance(model, FCN8s)
    for h, w in SIZES:
        pool3, pool4, fc7 = model.encode(_images(1, h, w, device="meta"))
        nh, nw = _vgg_fcn_lengths(h), _vgg_fcn_lengths(w)
        assert pool3.shape[-2:] == (nh["pool3"], nw["pool3"])
        assert pool4.shape[-2:] == (nh["pool4"], nw["pool4"])
        assert fc7.shape[-2:] == (nh["fc"], nw["fc"])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_is_input_size_with_real_compute(models: dict[str, nn.Module], name: str) -> None:
    model = models[name].eval()
    with torch.no_grad():
        for h, w in [(1, 1), (13, 6)]:
            out = model(_images(1, h, w))
            assert out.shape == (1, N_CLASS, h, w)
            assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_resnet_pads_to_a_multiple_of_32_and_crops_back(
    models: dict[str, nn.Module],
) -> None:
    """Padding is bottom/right only, so the top-left of a padded run is the plain run."""
    model = models["fcn8s_resnet101"].eval()
    x = _images(1, 64, 96)
    with torch.no_grad():
        full = model(x)
        part = model(x[:, :, :50, :70])  # padded back to 64x96 with zeros
        zero_padded = model(F.pad(x[:, :, :50, :70], (0, 26, 0, 14)))
    assert part.shape == (1, N_CLASS, 50, 70)
    torch.testing.assert_close(part, zero_padded[:, :, :50, :70])
    assert not torch.allclose(part, full[:, :, :50, :70])  # the padding really is zeros


# ---------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("cls", [VGG16, VGG16Conv, FCN32s, FCN16s, FCN8s, FCN8sResNet101])
@pytest.mark.parametrize("n_class", [1, 0, -3, 2.0, True])
def test_every_model_rejects_bad_n_class(cls: type[nn.Module], n_class: object) -> None:
    with torch.device("meta"), pytest.raises(ValueError, match="n_class must be an int >= 2"):
        cls(n_class=n_class)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 32, 32), "4-D"),
        ((1, 1, 3, 32, 32), "4-D"),
        ((1, 1, 32, 32), "3 \\(RGB\\) channels"),
        ((1, 4, 32, 32), "3 \\(RGB\\) channels"),
        ((1, 3, 0, 32), "H, W >= 1"),
        ((1, 3, 32, 0), "H, W >= 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(
    meta_models: dict[str, nn.Module], name: str, shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        meta_models[name](torch.empty(shape, device="meta"))


def test_vgg16_classifier_takes_only_224() -> None:
    with torch.device("meta"):
        vgg = VGG16(n_class=10)
    assert vgg(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 10)
    for h, w in [(225, 224), (224, 223), (320, 480)]:
        with pytest.raises(ValueError, match="fixed-size 224x224"):
            vgg(torch.empty(1, 3, h, w, device="meta"))


def test_vgg16conv_too_small_input_names_the_minimum() -> None:
    with torch.device("meta"):
        model = VGG16Conv(conv1_padding=1)
    assert model.min_input_size() == 193
    with pytest.raises(ValueError, match=">= 193"):
        model(torch.empty(1, 3, 192, 300, device="meta"))
    assert model(torch.empty(1, 3, 193, 300, device="meta")).shape[-2:] == (1, 4)


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="valid: fcn32s, fcn16s, fcn8s, fcn8s_atonce"):
        build_model("fcn4s", N_CLASS)
    with pytest.raises(ValueError, match="n_class must be an int >= 2"):
        build_model("fcn8s", 1)
    with pytest.raises(TypeError, match="unknown option\\(s\\) pretrained, width"):
        build_model("fcn8s", N_CLASS, pretrained=True, width=2)


def test_build_model_returns_the_named_architecture(meta_models: dict[str, nn.Module]) -> None:
    expected = {
        "fcn32s": FCN32s,
        "fcn16s": FCN16s,
        "fcn8s": FCN8s,
        "fcn8s_atonce": FCN8s,
        "fcn8s_resnet101": FCN8sResNet101,
        "fcn8s_resnet18": FCN8sResNet,
    }
    assert set(expected) == set(MODEL_NAMES)
    for name, cls in expected.items():
        assert type(meta_models[name]) is cls
    assert meta_models["fcn8s_atonce"].at_once and not meta_models["fcn8s"].at_once
    assert meta_models["fcn8s_resnet18"].backbone.depth == 18


def test_build_model_rejects_a_wrong_backbone_state_dict() -> None:
    with torch.device("meta"):
        resnet_state = resnet101(weights=None).state_dict()
        vgg_state = VGG16(n_class=1000).state_dict()
        with pytest.raises(ValueError, match="not a VGG16 / torchvision vgg16 state_dict"):
            build_model("fcn8s", N_CLASS, backbone_weights=resnet_state)
        with pytest.raises(ValueError, match="not a torchvision resnet101 state_dict"):
            build_model("fcn8s_resnet101", N_CLASS, backbone_weights=vgg_state)
        with pytest.raises(ValueError, match="not a torchvision resnet18 state_dict"):
            build_model("fcn8s_resnet18", N_CLASS, backbone_weights=resnet_state)
        truncated = {k: v for k, v in resnet_state.items() if not k.startswith("layer3.22.")}
        with pytest.raises(ValueError, match="missing keys: layer3.22"):
            build_model("fcn8s_resnet101", N_CLASS, backbone_weights=truncated)
        wrong = dict(resnet_state, **{"conv1.weight": torch.empty(64, 3, 3, 3)})
        with pytest.raises(ValueError, match="conv1.weight: \\(64, 3, 3, 3\\)"):
            build_model("fcn8s_resnet101", N_CLASS, backbone_weights=wrong)


# ------------------------------------------------------------- ResNet-101 backbone weights


@pytest.mark.parametrize("depth", [101, 18])
def test_resnet_backbone_weights_are_loaded(depth: int) -> None:
    torch.manual_seed(1)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():  # make the BatchNorm buffers non-default too
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    state = reference.state_dict()
    model = build_model(f"fcn8s_resnet{depth}", N_CLASS, backbone_weights=state)
    own = model.backbone.state_dict()
    assert set(own) == {k for k in state if not k.startswith("fc.")}
    for k, v in own.items():
        assert torch.equal(v, state[k]), k
    # A state_dict without num_batches_tracked (older checkpoints) loads too.
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model.backbone.load_torchvision_state_dict(old)


# ------------------------------------------------------------------ gradients and modes


def _forward_backward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(x)
    target = torch.randint(0, N_CLASS, (x.shape[0], *x.shape[-2:]))
    F.cross_entropy(out.float(), target).backward()
    return out


def _train_input(name: str) -> torch.Tensor:
    # ResNet's BatchNorm needs > 1 value per channel in training: batch 2 (layer4 is 1x1).
    return _images(2, 32, 40) if name.startswith("fcn8s_resnet") else _images(1, 9, 11)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_reach_every_parameter(models: dict[str, nn.Module], name: str) -> None:
    model = models[name].train()
    torch.manual_seed(2)
    _forward_backward(model, _train_input(name))
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_zero_score_layers_block_gradients_below_them() -> None:
    """Why the test above randomises the score layers first: with the reference's zero init,
    only score/upsampling layers get gradients on the first step."""
    torch.manual_seed(3)
    model = build_model("fcn8s_resnet101", N_CLASS).train()
    _forward_backward(model, _images(2, 32, 32))
    assert model.score_layer4.weight.grad.abs().sum() > 0
    assert all(not p.grad.any() for p in model.backbone.parameters())


def test_resnet_fcn_first_sgd_step_keeps_logits_small() -> None:
    """The training recipe's first step (SGD, lr 0.01, momentum 0.9) from the zero-initialised
    heads must not blow the logits up: without the heads' input normalization the common
    positive mean of ResNet features moved them by hundreds in one step, and training
    diverged (see FCN8sResNet101's docstring).

    The bar is for this tiny input: layer4 is 2x3 cells here, and with centre-aligned fusion
    its first/last cells cover about 1/2 and 3/2 cells of the output per axis (features sit on
    pixels 0 and 32 of 64), so the head's gradient is uneven over the few cells and the
    normalisation, which cancels only the common part, leaves a max of ~2.5 (~0.3 at 192x320,
    ~0.14 at 384x1024); this step lowers the loss, 1.61 -> 1.11."""
    torch.manual_seed(4)
    model = build_model("fcn8s_resnet101", N_CLASS).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = _images(2, 64, 96)
    # Mostly background, as lane labels are: the imbalance is what gives every channel the
    # same gradient sign (uniform random targets would hide the problem).
    target = torch.zeros(2, 64, 96, dtype=torch.long)
    target[:, :, 40:44] = 1
    F.cross_entropy(model(x), target).backward()
    opt.step()
    with torch.no_grad():
        logits = model(x)
    assert torch.isfinite(logits).all()
    assert 0 < logits.abs().max() < 5.0, float(logits.abs().max())  # 137 without the norm


def _thin_vgg_fcn(name: str, div: int = 16) -> nn.Module:
    """The same VGG FCN class and forward with every conv width divided by ``div``.

    Built on meta, then every conv is recreated on the CPU with the same kernel, stride and
    padding (so crops, skips and at-once scales are exercised unchanged) and ``N_CLASS``
    kept; the transposed convs are rebuilt bilinear.
    """
    with torch.device("meta"):
        model = build_model(name, N_CLASS)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                c_in = 3 if child.in_channels == 3 else child.in_channels // div
                c_out = N_CLASS if child.out_channels == N_CLASS else child.out_channels // div
                new: nn.Module = nn.Conv2d(c_in, c_out, child.kernel_size, padding=child.padding)
            elif isinstance(child, nn.ConvTranspose2d):
                factor = child.stride[0]
                new = bilinear_upsampling(N_CLASS, factor, padding=child.padding[0])
            else:
                continue
            setattr(parent, child_name, new)
    assert all(p.device.type == "cpu" for p in model.parameters())
    return _randomize_scores(model)


@contextlib.contextmanager
def _channels_last(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Temporarily convert a (shared, module-scoped) model to channels_last."""
    if not enabled:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


@pytest.mark.parametrize(
    ("channels_last", "bf16"),
    [(True, False), (False, True), (True, True)],
    ids=["channels_last", "bf16", "bf16+channels_last"],
)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channels_last_and_bf16_autocast_forward_backward(
    models: dict[str, nn.Module], name: str, channels_last: bool, bf16: bool
) -> None:
    """Forward + backward of every model with channels_last and/or CPU bf16 autocast.

    CI budget: CPU bf16 on the CI machines (AVX2, no AVX512-BF16) runs ~20x slower than fp32
    (one full-width VGG FCN pass on its ~200x200 padded input takes about a minute), and a
    full-width channels_last pass costs ~5 s. So the VGG FCNs run as width-reduced replicas
    (``_thin_vgg_fcn``: same class, forward, geometry, crops and dtype handling), except
    FCN-8s at-once (a superset of the others' code paths) in fp32 channels_last at full
    width; ResNet-101 always runs at full width.
    """
    full_width = name not in VGG_FCNS or (name == "fcn8s_atonce" and not bf16)
    model = (models[name] if full_width else _thin_vgg_fcn(name)).train()
    x = _train_input(name)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(4)
    target = torch.randint(0, N_CLASS, (x.shape[0], *x.shape[-2:]))
    model.zero_grad(set_to_none=True)
    with _channels_last(model, channels_last):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        assert out.shape == (x.shape[0], N_CLASS, *x.shape[-2:])
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        F.cross_entropy(out.float(), target).backward()  # outside autocast, as in training
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
