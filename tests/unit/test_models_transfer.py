"""Weight transfer: torchvision vgg16 -> VGG16 -> VGG16Conv / FCN-32s -> FCN-16s -> FCN-8s.

What holds exactly and what only approximately (all in eval mode, Dropout off):

* ``VGG16Conv(conv1_padding=1)`` with convolutionalized weights equals ``VGG16`` on 224x224
  (same arithmetic, different summation order). With the FCN padding of 100 it does not
  (border pixels see zeros), but it then accepts any size and outputs a spatial map.
* FCN-32s after ``copy_params_from_vgg16`` has exactly VGG16Conv's (padding 100) fc7 map.
* FCN-16s after ``copy_params_from_fcn32s`` has exactly FCN-32s's score_fr map, and its
  zero ``score_pool4`` adds exactly nothing. Its output is NOT FCN-32s's: x2 then x16
  bilinear is not x32 bilinear. Linear interpolation through samples taken 8 px either side
  of each coarse sample cuts the corner at the coarse sample: by (8/2) * (change of slope) =
  4 * |second difference| / 32 = |second difference| / 8 per axis (slopes are per 32 px).
  Both are averages (weights >= 0 summing to 1) in the interior, so in 2-D the gap is at
  most the sum of the two axes' bounds. ``test_models_geometry`` shows it is exact on affine
  maps; here the bound is checked on real networks.
* FCN-8s after ``copy_params_from_fcn16s`` likewise: same 1/16 fused map, and its output
  within ``|second difference of that map| / 8`` per axis of FCN-16s's (samples 4 px either
  side, slopes per 16 px: 2 * 4 / 16 = 1/8 again).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import Tensor, nn

from fcn_models import (
    VGG16,
    FCN8s,
    FCN16s,
    FCN32s,
    VGG16Conv,
    build_model,
    convolutionalize,
    vgg16_feature_sizes,
)

N_CLASS = 5
SIZE = (160, 192)  # fc7 map 6x7, plenty of interior after the 100-px padding


@pytest.fixture(scope="module")
def torchvision_vgg16() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


@pytest.fixture(scope="module")
def vgg16(torchvision_vgg16: nn.Module) -> VGG16:
    """Our VGG16 sharing torchvision's (strictly loaded) weights: one copy in memory."""
    with torch.device("meta"):
        model = VGG16(n_class=1000)
    model.load_state_dict(torchvision_vgg16.state_dict(), assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def conv_pad1(vgg16: VGG16) -> VGG16Conv:
    return VGG16Conv.from_vgg16(vgg16, conv1_padding=1).eval()


@pytest.fixture(scope="module")
def conv_pad100(vgg16: VGG16) -> VGG16Conv:
    return VGG16Conv.from_vgg16(vgg16).eval()  # conv1_padding=100, as in the FCNs


@pytest.fixture(scope="module")
def image() -> Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 3, *SIZE)


def _scaled_close(actual: Tensor, expected: Tensor, rel: float = 1e-4) -> None:
    """Equal up to float32 summation order: atol relative to the magnitude."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * expected.abs().max().item())


def test_torchvision_vgg16_state_dict_loads_into_vgg16(torchvision_vgg16, vgg16) -> None:
    theirs, ours = torchvision_vgg16.state_dict(), vgg16.state_dict()
    assert list(theirs) == list(ours)
    assert all(theirs[k].shape == v.shape for k, v in ours.items())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(vgg16(x), torchvision_vgg16(x))


def test_convolutionalized_vgg16_equals_the_classifier_with_its_own_padding(
    vgg16, conv_pad1
) -> None:
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        scores = vgg16(x)  # (1, 1000)
        score_map = conv_pad1(x)  # 224 -> pool5 7x7 -> fc6 slides once
    assert score_map.shape == (1, 1000, 1, 1)
    _scaled_close(score_map.flatten(1), scores)
    # The reshape is the whole conversion: same numbers, conv layout, copied not shared.
    state = convolutionalize(vgg16.state_dict())
    assert torch.equal(state["fc6.weight"].flatten(1), vgg16.classifier[0].weight)
    assert torch.equal(conv_pad1.fc6.weight, state["fc6.weight"])
    assert conv_pad1.fc6.weight.data_ptr() != vgg16.classifier[0].weight.data_ptr()
    assert all(p.requires_grad for p in conv_pad1.parameters())


def test_padding_100_gives_a_spatial_map_for_any_size() -> None:
    with torch.device("meta"):
        conv = VGG16Conv(n_class=1000)  # conv1_padding=100
        spatial = conv(torch.empty(1, 3, 320, 480))
        tiny = conv(torch.empty(1, 3, 1, 1))
    assert conv.min_input_size() == 1
    # ceil((320 + 198)/32) - 6 = 11, ceil((480 + 198)/32) - 6 = 16
    assert spatial.shape == (1, 1000, 11, 16)
    assert tiny.shape == (1, 1000, 1, 1)


def test_padding_100_changes_the_classifier_scores(conv_pad1, conv_pad100) -> None:
    """Why the equivalence test uses conv1_padding=1: with 100 the borders see zeros."""
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = conv_pad1(x), conv_pad100(x)
    assert a.shape[-2:] == (1, 1) and b.shape[-2:] == (8, 8)  # ceil(422/32) - 6 = 8
    assert not torch.allclose(b, a.expand_as(b), atol=1e-3)


@pytest.fixture(scope="module")
def fcn32s(vgg16) -> FCN32s:
    model = FCN32s(N_CLASS)
    model.copy_params_from_vgg16(vgg16)
    torch.manual_seed(2)  # stand-in for training: a zero score_fr would make everything 0
    nn.init.normal_(model.score_fr.weight, 0, 0.01)
    nn.init.normal_(model.score_fr.bias, 0, 0.1)
    return model.eval()


def test_fcn32s_from_vgg16_has_vgg16convs_fc7(conv_pad100, fcn32s) -> None:
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = conv_pad100.forward_features(x)
        got = fcn32s.encode(x)[2]
    assert got.shape == want.shape == (1, 4096, 3, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_build_model_copies_a_torchvision_state_dict(torchvision_vgg16, fcn32s) -> None:
    model = build_model("fcn16s", N_CLASS, backbone_weights=torchvision_vgg16.state_dict())
    ours = dict(model.named_parameters())
    for k, p in fcn32s.named_parameters():
        if k.startswith(("features.", "fc6.", "fc7.")):
            assert torch.equal(ours[k], p), k
    assert not model.score_fr.weight.any()  # fc8 (ImageNet classes) is not copied


def _run(model: nn.Module, x: Tensor, tap: nn.Module) -> tuple[Tensor, Tensor]:
    """``model(x)`` and the tensor that its submodule ``tap`` received on the way."""
    seen: list[Tensor] = []
    handle = tap.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    (tapped,) = seen
    return out, tapped


def _second_difference_bound(m: Tensor) -> float:
    """max |second difference| along H plus along W, over 8 (see the module docstring)."""
    d2h = (m[..., 2:, :] - 2 * m[..., 1:-1, :] + m[..., :-2, :]).abs().max()
    d2w = (m[..., 2:] - 2 * m[..., 1:-1] + m[..., :-2]).abs().max()
    return float(d2h + d2w) / 8


def _interior(*models: nn.Module) -> Tensor:
    """Pixels where every model's fuse is a full average (weights sum to 1: no zero border)."""
    # Map sizes from the size arithmetic: (pool3, pool4, pool5, fc7) lengths per axis.
    (p3h, p4h, _, fch), (p3w, p4w, _, fcw) = (vgg16_feature_sizes(n) for n in SIZE)
    ones = torch.ones(1, N_CLASS, fch, fcw)
    zero_skips = [torch.zeros(1, N_CLASS, p4h, p4w), torch.zeros(1, N_CLASS, p3h, p3w)]
    mask = torch.ones(SIZE, dtype=torch.bool)
    for model in models:
        n_skips = {FCN32s: 0, FCN16s: 1, FCN8s: 2}[type(model)]
        with torch.no_grad():
            mass = model.fuse([ones, *zero_skips[:n_skips]], SIZE)[0, 0]
        mask &= (mass - 1).abs() < 1e-5
    assert mask.float().mean() > 0.5
    return mask


@pytest.fixture(scope="module")
def fcn16s(fcn32s) -> FCN16s:
    model = FCN16s(N_CLASS)
    model.copy_params_from_fcn32s(fcn32s)
    return model.eval()


def test_fcn16s_from_fcn32s(fcn32s, fcn16s, image) -> None:
    out32, score32 = _run(fcn32s, image, fcn32s.upscore)  # score_fr map
    out16, score16 = _run(fcn16s, image, fcn16s.upscore2)
    torch.testing.assert_close(score16, score32, rtol=0, atol=0)  # same backbone + score_fr
    # The zero score_pool4 adds exactly nothing: out16 is the score map through x2, x16.
    no_skip = [score16, torch.zeros(1, N_CLASS, *[vgg16_feature_sizes(n)[1] for n in SIZE])]
    with torch.no_grad():
        torch.testing.assert_close(out16, fcn16s.fuse(no_skip, SIZE), rtol=0, atol=0)

    interior = _interior(fcn32s, fcn16s)
    gap = (out16 - out32)[:, :, interior].abs().max().item()
    bound = _second_difference_bound(score32)
    assert gap <= bound + 1e-5, (gap, bound)
    assert gap > 1e-3 * bound  # not equal: the two upsamplings really differ


@pytest.fixture(scope="module")
def trained_fcn16s(fcn16s) -> FCN16s:
    """A copy of fcn16s with a nonzero score_pool4, standing in for a trained FCN-16s."""
    model = copy.deepcopy(fcn16s)
    torch.manual_seed(3)
    nn.init.normal_(model.score_pool4.weight, 0, 0.01)
    nn.init.normal_(model.score_pool4.bias, 0, 0.1)
    return model


@pytest.fixture(scope="module")
def fcn8s(trained_fcn16s) -> FCN8s:
    model = FCN8s(N_CLASS)
    model.copy_params_from_fcn16s(trained_fcn16s)
    return model.eval()


def test_fcn8s_from_fcn16s(trained_fcn16s, fcn8s, image) -> None:
    out16, fused16 = _run(trained_fcn16s, image, trained_fcn16s.upscore16)  # 1/16 fusion
    out8, fused8 = _run(fcn8s, image, fcn8s.upscore_pool4)
    torch.testing.assert_close(fused8, fused16, rtol=0, atol=0)  # same 1/16 map
    interior = _interior(trained_fcn16s, fcn8s)
    gap = (out8 - out16)[:, :, interior].abs().max().item()
    bound = _second_difference_bound(fused16)
    assert gap <= bound + 1e-5, (gap, bound)
    assert gap > 1e-3 * bound


def test_at_once_fcn8s_from_fcn16s_computes_the_same_function(trained_fcn16s, fcn8s, image) -> None:
    """at_once reads pool4 * 0.01; the copy scales score_pool4 by 100 to compensate."""
    at_once = FCN8s(N_CLASS, at_once=True)
    at_once.copy_params_from_fcn16s(trained_fcn16s)
    torch.testing.assert_close(at_once.score_pool4.weight, fcn8s.score_pool4.weight * 100)
    torch.manual_seed(4)
    try:  # a nonzero pool3 skip too (scaled by 1e-4 in at_once)
        nn.init.normal_(fcn8s.score_pool3.weight, 0, 0.01)
        with torch.no_grad():
            at_once.score_pool3.weight.copy_(fcn8s.score_pool3.weight / 1e-4)
            x = image[:, :, :64, :80]
            staged_out = fcn8s(x)
            assert (staged_out - fcn8s.fuse(*_no_pool3(fcn8s, x))).abs().max() > 1e-4
            _scaled_close(at_once.eval()(x), staged_out)
    finally:
        nn.init.zeros_(fcn8s.score_pool3.weight)


def _no_pool3(model: FCN8s, x: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
    """FCN-8s's fuse inputs for ``x`` with the pool3 skip left out."""
    pool3, pool4, fc7 = model.encode(x)
    scores = [
        model.score_fr(fc7),
        model.score_pool4(pool4),
        torch.zeros_like(model.score_pool3(pool3)),
    ]
    return scores, (x.shape[2], x.shape[3])


def test_transfer_rejects_the_wrong_source(vgg16, fcn32s) -> None:
    state = fcn32s.state_dict()
    with torch.device("meta"):
        fcn16s = FCN16s(N_CLASS)
        with pytest.raises(ValueError, match="from FCN32s; missing: score_fr.bias, score_fr"):
            fcn16s.copy_params_from_fcn32s({k: v for k, v in state.items() if "score" not in k})
        with pytest.raises(ValueError, match="wrong shapes: score_fr.bias"):
            FCN16s(N_CLASS + 1).copy_params_from_fcn32s(fcn32s)
        vgg = {k: v for k, v in vgg16.state_dict().items() if not k.startswith("features.28")}
        with pytest.raises(ValueError, match="missing keys: features.28.bias"):
            FCN32s(N_CLASS).copy_params_from_vgg16(vgg)
