"""Every FCN puts output pixel y exactly on input pixel y.

Measured, not restated: each FCN is split into its encoder (conv/pool stack up to each tap)
and its ``fuse`` (upsampling, crops, sums; linear). For a linear operator L whose weights
around output j are symmetric, ``L(ramp)[j] / L(ones)[j]`` is the input coordinate j is
centred on. Encoder: a linear, symmetric stand-in with the model's own kernel sizes, strides
and paddings, all-average kernels and average pools instead of max pools (a 1-channel replica
for VGG, a 1-channel deep copy of the real backbone for ResNet). Where ``L(ones)`` is full (the
operator's whole support is inside the map, no zero border) the centre is exact. Fuse: the
model's real ``fuse`` with its own transposed convs (real CPU models, float64 upsamplers; the
rest of the model on the meta device, where ``encode`` gives the score-map shapes).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from fcn_models import FCN8s, FCN8sResNet, FCN16s, FCN32s

FCN_CLASSES = [FCN32s, FCN16s, FCN8s]
F64 = torch.float64
N_CLASS = 2
ENCODER_INPUT = 640  # > fc6's 404-px receptive field plus a few strides
FUSE_INPUT = (200, 232)
# ResNet-101's layer4 sees 971 px: 1280 leaves 9 layer4 cells whose support is inside.
RESNET_ENCODER_INPUT = (1280, 32)
RESNET_FUSE_INPUT = (200, 264)  # not multiples of 32: padded to 224 x 288, cropped back
RESNET_TAPS = ("layer2", "layer3", "layer4")


def _own_upsamplers(model: nn.Module) -> nn.Module:
    """``model`` (built for real on the CPU) with its transposed convs in float64 and every
    other child on the meta device: ``fuse`` runs on the model's own upsamplers, ``encode``
    propagates shapes only, and the big encoder weights are freed."""
    for child in model.children():
        if isinstance(child, nn.ConvTranspose2d):
            child.double()
        else:
            child.to("meta")
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.children())
    return model.eval()


@pytest.fixture(scope="module")
def vgg_fcn() -> Callable[[type[nn.Module]], nn.Module]:
    """``vgg_fcn(cls)``: built on first use (~2 s each), then shared by the module's tests."""
    return functools.cache(lambda cls: _own_upsamplers(cls(n_class=N_CLASS)))


def _encoder_replica(model: nn.Module) -> dict[str, nn.Sequential]:
    """1-channel, linear, symmetric stand-ins for the encoder up to pool3, pool4 and fc7."""
    layers: list[nn.Module] = []
    taps: dict[str, nn.Sequential] = {}
    pools = 0
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            c = nn.Conv2d(1, 1, m.kernel_size, m.stride, m.padding, bias=False, dtype=F64)
            nn.init.constant_(c.weight, 1 / c.weight.numel())
            layers.append(c)
        elif isinstance(m, nn.MaxPool2d):
            layers.append(nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode))
            pools += 1
            if pools in (3, 4):
                taps[f"pool{pools}"] = nn.Sequential(*layers)
        # ReLU: the identity on these nonnegative signals
    fc6 = model.fc6
    c = nn.Conv2d(1, 1, fc6.kernel_size, fc6.stride, fc6.padding, bias=False, dtype=F64)
    nn.init.constant_(c.weight, 1 / c.weight.numel())
    taps["fc7"] = nn.Sequential(*layers, c)  # fc7 and score_fr are 1x1: no shift
    return taps


def _centres(op: Callable[[Tensor], Tensor], ones: Tensor, ramp: Tensor) -> tuple[Tensor, Tensor]:
    """Centre coordinate of every output of the linear ``op`` and a mask of exact ones."""
    with torch.no_grad():
        mass, first_moment = op(ones), op(ramp)
    full = (mass - 1).abs() < 1e-9
    return first_moment / mass, full


def _ramps(shape: tuple[int, ...], axis: int) -> tuple[Tensor, Tensor]:
    ones = torch.ones(shape, dtype=F64)
    idx = torch.arange(shape[axis], dtype=F64)
    view = [1] * len(shape)
    view[axis] = -1
    return ones, ones * idx.view(view)


def _fit_line(j: Tensor, c: Tensor, what: str) -> tuple[float, float]:
    """(stride, offset) with ``c = stride * j + offset``, checked to be a line."""
    assert len(j) >= 3, what  # enough fully-inside positions to pin down a line
    stride = float((c[-1] - c[0]) / (j[-1] - j[0]))
    offset = float(c[0] - stride * j[0])
    torch.testing.assert_close(c, stride * j + offset, rtol=0, atol=1e-6, msg=what)
    return stride, offset


@pytest.fixture(scope="module")
def encoder_centres(vgg_fcn) -> dict[str, tuple[float, float]]:
    """Per tap: (stride, offset) with input coordinate = stride * j + offset, measured."""
    taps = _encoder_replica(vgg_fcn(FCN8s))
    ones, ramp = _ramps((1, 1, ENCODER_INPUT, ENCODER_INPUT), axis=2)
    out = {}
    for tap, op in taps.items():
        centre, full = _centres(op, ones, ramp)
        mid = centre.shape[3] // 2  # a column whose support is inside the image
        sel = full[0, 0, :, mid]
        j = torch.arange(centre.shape[2], dtype=F64)[sel]
        out[tap] = _fit_line(j, centre[0, 0, sel, mid], tap)
    return out


def test_encoder_centres_are_the_derived_ones(encoder_centres) -> None:
    """The derivation in fcn_models/fcn_vgg.py: u = s*j + (k - 1)/2 - p, composed.

    conv1_1 shifts by (3 - 1)/2 - 100 = -99, each 2x2 pool adds half its input stride.
    """
    derived = {
        "pool3": (8, (1 + 2 + 4) / 2 - 99),  # 8j - 95.5
        "pool4": (16, (1 + 2 + 4 + 8) / 2 - 99),  # 16j - 91.5
        "fc7": (32, 32 * (7 - 1) / 2 + (1 + 2 + 4 + 8 + 16) / 2 - 99),  # fc6 k7: 32j + 12.5
    }
    assert set(encoder_centres) == set(derived)
    for tap, (stride, offset) in derived.items():
        assert encoder_centres[tap] == (pytest.approx(stride), pytest.approx(offset)), tap


@pytest.mark.parametrize("cls", FCN_CLASSES)
@pytest.mark.parametrize("axis", [2, 3])
def test_every_path_puts_output_pixel_y_on_input_pixel_y(
    vgg_fcn, encoder_centres, cls, axis
) -> None:
    """Compose the measured encoder and fuse centres: each skip path lands on the identity."""
    model = vgg_fcn(cls)
    with torch.device("meta"):
        pool3, pool4, fc7 = model.encode(torch.empty(1, 3, *FUSE_INPUT))
    maps = {"fc7": fc7, "pool4": pool4, "pool3": pool3}
    paths = ["fc7", "pool4", "pool3"][: {FCN32s: 1, FCN16s: 2, FCN8s: 3}[cls]]
    for k, tap in enumerate(paths):
        shapes = [(1, N_CLASS, *maps[p].shape[-2:]) for p in paths]
        ones, ramp = _ramps(shapes[k], axis)

        def path(scores: Tensor, k: int = k, shapes: list = shapes) -> Tensor:
            inputs = [torch.zeros(s, dtype=F64) for s in shapes]
            inputs[k] = scores
            return model.fuse(inputs, FUSE_INPUT)

        centre, full = _centres(path, ones, ramp)
        assert centre.shape[-2:] == FUSE_INPUT
        assert full.float().mean() > 0.5, (cls.__name__, tap)  # most of the image is interior
        stride, offset = encoder_centres[tap]
        y = torch.arange(FUSE_INPUT[axis - 2], dtype=F64)
        y = y.view([-1, 1] if axis == 2 else [1, -1]).expand(FUSE_INPUT)
        u = stride * centre + offset  # input coordinate that output pixel y is centred on
        torch.testing.assert_close(
            u[0, 0][full[0, 0]], y[full[0, 0]], rtol=0, atol=1e-6, msg=f"{cls.__name__} {tap}"
        )


def test_two_stage_upsampling_reproduces_one_stage_on_affine_maps(vgg_fcn) -> None:
    """x2 then x16 (FCN-16s) equals x32 (FCN-32s) exactly wherever the scores are affine in
    position (and likewise x2, x2, x8 for FCN-8s): linear interpolation of samples of a line is
    that line, whatever the sample positions. Where both are interior, at zero skips."""
    fcns = {cls: vgg_fcn(cls) for cls in FCN_CLASSES}
    with torch.device("meta"):
        pool3, pool4, fc7 = fcns[FCN8s].encode(torch.empty(1, 3, *FUSE_INPUT))
    torch.manual_seed(0)
    h, w = fc7.shape[-2:]
    a, b, c = torch.randn(3, 1, N_CLASS, 1, 1, dtype=F64)
    jh = torch.arange(h, dtype=F64).view(-1, 1)
    jw = torch.arange(w, dtype=F64).view(1, -1)
    affine = a + b * jh + c * jw  # (1, N_CLASS, h, w)
    zeros = [torch.zeros(1, N_CLASS, *t.shape[-2:], dtype=F64) for t in (pool4, pool3)]
    ones = torch.ones_like(affine)
    outs, interior = {}, torch.ones(FUSE_INPUT, dtype=torch.bool)
    for cls, model in fcns.items():
        skips = zeros[: {FCN32s: 0, FCN16s: 1, FCN8s: 2}[cls]]
        with torch.no_grad():
            outs[cls] = model.fuse([affine, *skips], FUSE_INPUT)[0]
            mass = model.fuse([ones, *skips], FUSE_INPUT)[0, 0]
        interior &= (mass - 1).abs() < 1e-9
    assert interior.float().mean() > 0.5
    for cls in (FCN16s, FCN8s):
        torch.testing.assert_close(outs[cls][:, interior], outs[FCN32s][:, interior])
    # ... and not on a curved map: there the stages differ (see test_models_transfer.py).
    curved = affine + jh**2
    with torch.no_grad():
        o32 = fcns[FCN32s].fuse([curved], FUSE_INPUT)[0]
        o16 = fcns[FCN16s].fuse([curved, zeros[0]], FUSE_INPUT)[0]
    assert (o32 - o16)[:, interior].abs().max() > 0.1


# ---------------------------------------------------------------------- FCN-8s ResNet-101


def _linear_backbone(backbone: nn.Module) -> nn.Module:
    """A linear, symmetric float64 stand-in of the model's (torchvision) backbone: a deep copy,
    same module tree and forward (residual sums, downsample branches), every conv replaced by
    an all-average one with its kernel size, stride, padding and dilation, BatchNorms by the
    identity, max pools by average pools; ReLU is the identity on nonnegative inputs.

    One channel: a conv whose weights are all ``1/(in_ch*kh*kw)`` maps identical channels to
    identical channels, so the 64..2048-channel version computes exactly this in every channel.
    """
    net = copy.deepcopy(backbone)  # on meta: only the structure is copied
    for parent in list(net.modules()):
        for name, m in list(parent.named_children()):
            new: nn.Module
            if isinstance(m, nn.Conv2d):
                assert m.groups == 1
                new = nn.Conv2d(1, 1, m.kernel_size, m.stride, m.padding, m.dilation, bias=False)
                nn.init.constant_(new.weight, 1 / new.weight.numel())
            elif isinstance(m, nn.BatchNorm2d):
                new = nn.Identity()
            elif isinstance(m, nn.MaxPool2d):
                assert m.dilation == 1
                new = nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
            else:
                continue
            setattr(parent, name, new)
    assert all(p.device.type == "cpu" for p in net.parameters())
    return net.double().eval()


@pytest.fixture(scope="module", params=[101, 18], ids=["resnet101", "resnet18"])
def resnet_fcn(request) -> nn.Module:
    return _own_upsamplers(FCN8sResNet(n_class=N_CLASS, depth=request.param))


@pytest.fixture(scope="module")
def resnet_centres(resnet_fcn) -> dict[str, tuple[float, float]]:
    """Per tap: (stride, offset) of the model's backbone, measured along each axis on a long,
    thin image (float64 convs are slow on the CPU; 1280 x 32 keeps it well under a second).

    Residual sums grow the mass (2x per block), so "full" is "as large as anywhere along the
    line" (to 1e-12: weights from the far edge of a 971-px support are that small, and so are
    the centre shifts they cause): zero padding only removes (positive) weight.
    """
    standin = _linear_backbone(resnet_fcn.backbone)
    long, thin = RESNET_ENCODER_INPUT
    out: dict[str, tuple[float, float]] = {}
    for axis in (2, 3):
        ones, ramp = _ramps((1, 1, long, thin) if axis == 2 else (1, 1, thin, long), axis)
        with torch.no_grad():
            taps = standin(torch.cat([ones, ramp]))
        for tap, t in zip(RESNET_TAPS, taps, strict=True):
            centre = t[1, 0] / t[0, 0]
            mass = t[0, 0]
            if axis == 3:
                mass, centre = mass.T, centre.T
            mid = mass.shape[1] // 2  # a line along the long axis
            sel = mass[:, mid] > mass[:, mid].max() * (1 - 1e-12)
            j = torch.arange(mass.shape[0], dtype=F64)[sel]
            fit = _fit_line(j, centre[sel, mid], f"{tap} axis {axis}")
            assert out.setdefault(tap, fit) == pytest.approx(fit, abs=1e-9), tap  # both axes
    return out


def test_resnet_backbone_centres_feature_j_on_pixel_s_times_j(resnet_centres) -> None:
    """The derivation in fcn_models/fcn_resnet.py: every layer has k = 2p + 1, so u = s*j."""
    assert resnet_centres == {
        "layer2": (pytest.approx(8), pytest.approx(0, abs=1e-6)),
        "layer3": (pytest.approx(16), pytest.approx(0, abs=1e-6)),
        "layer4": (pytest.approx(32), pytest.approx(0, abs=1e-6)),
    }


@pytest.mark.parametrize("tap", RESNET_TAPS)
def test_resnet_fuse_puts_a_single_feature_on_its_centre(resnet_fcn, resnet_centres, tap) -> None:
    """A single active cell of one tap's score map (the others zero) lands within half an output
    pixel of its receptive-field centre (as measured above), per axis: exactly, in fact, with
    its peak on that pixel. Misaligned by (f - 1)/2 per stage, k = 2f bilinear kernels miss by
    3.5, 7.5 and 15.5 px."""
    model = resnet_fcn
    with torch.device("meta"):
        encoded = model.encode(torch.empty(1, 3, *RESNET_FUSE_INPUT))
    taps = dict(zip(RESNET_TAPS, encoded, strict=True))
    order = RESNET_TAPS[::-1]  # fuse takes the score maps coarse to fine
    shapes = [(1, N_CLASS, *taps[t].shape[-2:]) for t in order]
    k = order.index(tap)
    stride, offset = resnet_centres[tap]
    n_h, n_w = shapes[k][-2:]
    ys = torch.arange(RESNET_FUSE_INPUT[0], dtype=F64)
    xs = torch.arange(RESNET_FUSE_INPUT[1], dtype=F64)
    for jh, jw in [(1, n_w // 2), (n_h // 2, 1), (n_h // 2, n_w // 2 + 1)]:
        scores = [torch.zeros(s, dtype=F64) for s in shapes]
        scores[k][0, 0, jh, jw] = 1
        with torch.no_grad():
            out = model.fuse(scores, RESNET_FUSE_INPUT)
        assert out.shape == (1, N_CLASS, *RESNET_FUSE_INPUT)
        assert not out[0, 1].any()  # classes are upsampled independently
        o = out[0, 0]
        # x2 and x8 bilinear spread a unit over 2 and 8 px per axis: all of it is inside.
        assert float(o.sum()) == pytest.approx(stride**2), (tap, jh, jw)
        centroid = (float(o.sum(1) @ ys / o.sum()), float(o.sum(0) @ xs / o.sum()))
        want = (stride * jh + offset, stride * jw + offset)
        for axis, (got, exp) in enumerate(zip(centroid, want, strict=True)):
            assert abs(got - exp) < 0.5, (tap, (jh, jw), axis, got, exp)
            assert got == pytest.approx(exp, abs=1e-6), (tap, (jh, jw), axis)
        peak = divmod(int(o.argmax()), o.shape[1])
        assert peak == (round(want[0]), round(want[1])), (tap, jh, jw)
        assert int((o == o.max()).sum()) == 1  # a single peak
