"""The VGG FCNs' crop offsets put output pixel y exactly on input pixel y.

Measured, not restated: the FCN is split into its encoder (conv/pool stack up to each tap)
and its ``fuse`` (upsampling, crops, sums; linear). For a linear operator L whose weights
around output j are symmetric and sum to 1, ``L(ramp)[j] / L(ones)[j]`` is the input
coordinate j is centred on. Encoder: a 1-channel replica with the model's own kernel sizes,
strides and paddings, all-average kernels and average pools (symmetric, linear) instead of
max pools. Fuse: the model's real ``fuse`` with its bilinear transposed convs. Where
``L(ones) == 1`` the operator's full support is inside the map (no zero border), so the
centre is exact there.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fcn_models import FCN8s, FCN16s, FCN32s, bilinear_upsampling

FCN_CLASSES = [FCN32s, FCN16s, FCN8s]
F64 = torch.float64
N_CLASS = 2
ENCODER_INPUT = 640  # > fc6's 404-px receptive field plus a few strides
FUSE_INPUT = (200, 232)


def _fcn(cls: type[nn.Module]) -> nn.Module:
    """A meta-device FCN whose transposed convs are real (bilinear): enough to run ``fuse``."""
    with torch.device("meta"):
        model = cls(n_class=N_CLASS)
    for name, m in list(model.named_children()):
        if isinstance(m, nn.ConvTranspose2d):
            setattr(model, name, bilinear_upsampling(N_CLASS, m.stride[0], m.padding[0]).double())
    return model.eval()


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


def _centres(op, ones: Tensor, ramp: Tensor) -> tuple[Tensor, Tensor]:
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


@pytest.fixture(scope="module")
def encoder_centres() -> dict[str, tuple[float, float]]:
    """Per tap: (stride, offset) with input coordinate = stride * j + offset, measured."""
    taps = _encoder_replica(_fcn(FCN8s))
    ones, ramp = _ramps((1, 1, ENCODER_INPUT, ENCODER_INPUT), axis=2)
    out = {}
    for tap, op in taps.items():
        centre, full = _centres(op, ones, ramp)
        mid = centre.shape[3] // 2  # a column whose support is inside the image
        sel = full[0, 0, :, mid]
        assert sel.sum() >= 3, tap  # enough fully-inside positions to pin down a line
        j = torch.arange(centre.shape[2], dtype=F64)[sel]
        c = centre[0, 0, sel, mid]
        stride = float((c[-1] - c[0]) / (j[-1] - j[0]))
        offset = float(c[0] - stride * j[0])
        torch.testing.assert_close(c, stride * j + offset, rtol=0, atol=1e-6)  # affine in j
        out[tap] = (stride, offset)
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
def test_every_path_puts_output_pixel_y_on_input_pixel_y(encoder_centres, cls, axis) -> None:
    """Compose the measured encoder and fuse centres: each skip path lands on the identity."""
    model = _fcn(cls)
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


def test_two_stage_upsampling_reproduces_one_stage_on_affine_maps() -> None:
    """x2 then x16 (FCN-16s) equals x32 (FCN-32s) exactly wherever the scores are affine in
    position (and likewise x2, x2, x8 for FCN-8s): linear interpolation of samples of a line is
    that line, whatever the sample positions. Where both are interior, at zero skips."""
    fcns = {cls: _fcn(cls) for cls in FCN_CLASSES}
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
