"""Convolution arithmetic helpers and both bilinear upsamplers vs PyTorch's own behaviour."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcn_models.upsampling import (
    aligned_bilinear_upsampling,
    bilinear_kernel,
    bilinear_upsampling,
    conv_output_size,
    conv_transpose_output_size,
    pool_output_size,
    upsample_aligned,
)


def _pytorch_len(fn, *args, **kwargs) -> int:
    """Length PyTorch produces along H (or <= 0 when PyTorch refuses the shape)."""
    try:
        return fn(*args, **kwargs).shape[2]
    except RuntimeError:
        return 0


def test_conv_output_size_matches_pytorch() -> None:
    checked = 0
    for i, k, s, p, d in itertools.product(range(1, 13), range(1, 6), (1, 2, 3), (0, 1, 2), (1, 2)):
        x = torch.zeros(1, 1, i, 1)
        w = torch.zeros(1, 1, k, 1)
        got = _pytorch_len(F.conv2d, x, w, stride=(s, 1), padding=(p, 0), dilation=(d, 1))
        want = conv_output_size(i, k, s, p, d)
        assert max(want, 0) == got, (i, k, s, p, d)
        checked += want > 0
    assert checked > 500  # the grid is mostly valid shapes, not mostly errors


def test_conv_output_size_is_the_notes_formula_for_d1() -> None:
    for i, k, s, p in itertools.product(range(1, 20), range(1, 8), range(1, 5), range(0, 4)):
        assert conv_output_size(i, k, s, p) == (i + 2 * p - k) // s + 1


def test_conv_transpose_output_size_matches_pytorch() -> None:
    checked = 0
    for i, k, s, p, d in itertools.product(range(1, 9), range(1, 6), (1, 2, 3), (0, 1, 2), (1, 2)):
        for op in range(max(s, d)):  # PyTorch: output_padding < stride or < dilation
            x = torch.zeros(1, 1, i, 1)
            w = torch.zeros(1, 1, k, 1)
            got = _pytorch_len(
                F.conv_transpose2d,
                x,
                w,
                stride=(s, 1),
                padding=(p, 0),
                output_padding=(op, 0),
                dilation=(d, 1),
            )
            want = conv_transpose_output_size(i, k, s, p, op, d)
            assert max(want, 0) == got, (i, k, s, p, op, d)
            checked += 1
    assert checked > 1000


def test_pool_output_size_matches_pytorch() -> None:
    for i, k, s, d, ceil_mode in itertools.product(
        range(1, 21), range(1, 5), (1, 2, 3), (1, 2), (False, True)
    ):
        for p in range(k // 2 + 1):  # PyTorch: pad <= kernel_size / 2
            x = torch.zeros(1, 1, i, 1)
            got = _pytorch_len(
                F.max_pool2d,
                x,
                (k, 1),
                stride=(s, 1),
                padding=(p, 0),
                dilation=(d, 1),
                ceil_mode=ceil_mode,
            )
            want = pool_output_size(i, k, s, p, d, ceil_mode=ceil_mode)
            assert max(want, 0) == got, (i, k, s, p, d, ceil_mode)


def _reference_upsample_filt(size: int) -> torch.Tensor:
    """fcn.berkeleyvision.org surgery.upsample_filt, transcribed."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    return (1 - (og[:, None] - center).abs() / factor) * (1 - (og[None, :] - center).abs() / factor)


@pytest.mark.parametrize("k", range(1, 18))
def test_bilinear_kernel_is_reference_filter_on_the_diagonal(k: int) -> None:
    w = bilinear_kernel(3, k, dtype=torch.float64)
    assert w.shape == (3, 3, k, k)
    for c_in, c_out in itertools.product(range(3), range(3)):
        if c_in == c_out:
            torch.testing.assert_close(w[c_in, c_out], _reference_upsample_filt(k))
        else:
            assert not w[c_in, c_out].any()


def test_bilinear_kernel_values() -> None:
    # k=4: factor 2, centre 1.5 -> tent 1 - |x - 1.5|/2 = (1/4, 3/4, 3/4, 1/4).
    tent4 = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(bilinear_kernel(1, 4)[0, 0], tent4[:, None] * tent4[None, :])
    # k=3: factor 2, centre 1 -> (1/2, 1, 1/2).
    tent3 = torch.tensor([0.5, 1.0, 0.5])
    torch.testing.assert_close(bilinear_kernel(1, 3)[0, 0], tent3[:, None] * tent3[None, :])


def test_bilinear_upsampling_layer() -> None:
    up = bilinear_upsampling(5, 4, padding=1)
    assert (up.kernel_size, up.stride, up.padding) == ((8, 8), (4, 4), (1, 1))
    assert up.bias is None and up.weight.requires_grad
    torch.testing.assert_close(up.weight.detach(), bilinear_kernel(5, 8))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bilinear_upsampling_matches_interpolate_in_the_interior(factor: int) -> None:
    """padding = factor/2 gives exactly i*factor pixels on F.interpolate's pixel grid.

    Output pixel y of ConvTranspose2d(k=2f, s=f, p) is a tent over inputs centred at
    y = f*j + (2f - 1)/2 - p; F.interpolate(align_corners=False) samples input coordinate
    j = (y + 0.5)/f - 0.5, i.e. centres input j at y = f*j + (f - 1)/2. Equal iff p = f/2.
    Interior: F.interpolate clamps j to [0, i - 1] (rows y < f/2 and y >= i*f - f/2) where the
    transposed conv instead has only one tap (a border attenuated towards zero).
    """
    torch.manual_seed(0)
    c, h, w = 3, 7, 9
    x = torch.randn(1, c, h, w, dtype=torch.float64)
    up = bilinear_upsampling(c, factor, padding=factor // 2).double()
    with torch.no_grad():
        got = up(x)
    want = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert got.shape == want.shape == (1, c, h * factor, w * factor)
    m = factor // 2
    torch.testing.assert_close(got[..., m:-m, m:-m], want[..., m:-m, m:-m])
    # The first row is outside that interior: there the two really differ.
    assert not torch.allclose(got[..., 0, m:-m], want[..., 0, m:-m])

    # Any other padding puts the samples in the wrong place (the alignment is not a fluke):
    # other[y] = got[y - d] with d = f/2 - p, i.e. shifted by d pixels.
    hh, ww = h * factor, w * factor
    for p in (m - 1, m + 1):
        d = m - p
        with torch.no_grad():
            other = bilinear_upsampling(c, factor, padding=p).double()(x)
        assert other.shape[-2:] == (hh + 2 * d, ww + 2 * d)
        ys, xs = slice(m + 1, hh - m - 1), slice(m + 1, ww - m - 1)
        assert not torch.allclose(other[..., ys, xs], want[..., ys, xs])
        torch.testing.assert_close(
            other[..., 2 : hh + 2 * d - 2, 2 : ww + 2 * d - 2],
            got[..., 2 - d : hh + d - 2, 2 - d : ww + d - 2],
        )
    # ... and padding p is nothing but cropping p pixels off each side of the p = 0 output,
    # which is what the FCN reference does with its Crop layers.
    with torch.no_grad():
        full = bilinear_upsampling(c, factor, padding=0).double()(x)
    assert full.shape[-2:] == ((h + 1) * factor, (w + 1) * factor)
    torch.testing.assert_close(full[..., m : m + h * factor, m : m + w * factor], got)


FACTORS = [1, 2, 3, 8]


def _aligned(channels: int, factor: int) -> nn.ConvTranspose2d:
    # The layer's own float32 weights (1/3 is inexact there), applied in float64.
    return aligned_bilinear_upsampling(channels, factor).double()


def test_aligned_bilinear_upsampling_layer() -> None:
    up = aligned_bilinear_upsampling(5, 8)
    assert type(up) is nn.ConvTranspose2d  # found (and frozen) like any other upsampler
    assert (up.kernel_size, up.stride, up.padding) == ((15, 15), (8, 8), (7, 7))
    assert up.bias is None and up.weight.requires_grad
    torch.testing.assert_close(up.weight.detach(), bilinear_kernel(5, 15))
    with pytest.raises(ValueError, match="factor >= 1"):
        aligned_bilinear_upsampling(5, 0)


@pytest.mark.parametrize("factor", FACTORS)
def test_aligned_kernel_weights_sum_to_one_per_output_phase(factor: int) -> None:
    """Output ``f*j + d`` reads the taps ``t = d + f - 1 (mod f)``: one sample at ``d = 0``
    (weight 1), two at ``d > 0`` (``1 - d/f`` and ``d/f``). So a constant map stays constant."""
    w = aligned_bilinear_upsampling(1, factor).weight.detach().double()[0, 0]
    for r, c in itertools.product(range(factor), repeat=2):
        assert float(w[r::factor, c::factor].sum()) == pytest.approx(1, abs=1e-6), (r, c)
    x = torch.ones(1, 1, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            upsample_aligned(_aligned(1, factor), x), x.new_ones(1, 1, 4 * factor, 5 * factor)
        )


@pytest.mark.parametrize("factor", FACTORS)
def test_upsample_aligned_output_is_exactly_i_times_factor(factor: int) -> None:
    up = _aligned(2, factor)
    for h, w in [(1, 1), (1, 4), (3, 1), (5, 7), (16, 9)]:
        with torch.no_grad():
            out = upsample_aligned(up, torch.zeros(1, 2, h, w, dtype=torch.float64))
        assert out.shape == (1, 2, h * factor, w * factor), (h, w)
        # The bare transposed conv stops at the last sample: (i - 1)f + 1.
        bare = up(torch.zeros(1, 2, h, w, dtype=torch.float64))
        assert bare.shape[-2:] == (
            conv_transpose_output_size(h, 2 * factor - 1, factor, factor - 1),
            (w - 1) * factor + 1,
        )
        assert bare.shape[-2] == (h - 1) * factor + 1


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("axis", [2, 3])
def test_upsample_aligned_interpolates_a_ramp_exactly(factor: int, axis: int) -> None:
    """Sample ``j`` lands on output ``f*j``; in between the line through the samples; past
    the last sample (the last ``f - 1`` outputs) the last sample, held constant."""
    n = 6
    view = [1, -1, 1, 1]  # channels: two different lines
    view_ax = [1, 1, 1, 1]
    view_ax[axis] = -1
    offset = torch.tensor([0.5, -2.0], dtype=torch.float64).view(view)
    slope = torch.tensor([-2.0, 0.75], dtype=torch.float64).view(view)
    j = torch.arange(n, dtype=torch.float64).view(view_ax)
    shape = [1, 2, 3, 3]
    shape[axis] = n
    x = (offset + slope * j).expand(shape)
    y = torch.arange(n * factor, dtype=torch.float64).view(view_ax)
    with torch.no_grad():
        got = upsample_aligned(_aligned(2, factor), x)
    u = torch.clamp(y / factor, max=n - 1)  # the sample coordinate output y should read
    torch.testing.assert_close(got, (offset + slope * u).expand_as(got), rtol=0, atol=1e-6)
    # Sample n - 1 and the extrapolation after it: all equal to that sample.
    last = got.narrow(axis, (n - 1) * factor, factor)
    sample = offset + slope * (n - 1)
    torch.testing.assert_close(last, sample.expand_as(last), rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", FACTORS)
def test_upsample_aligned_is_corner_aligned_bilinear_interpolation(factor: int) -> None:
    """On any map: ``F.interpolate(align_corners=True)`` of the replicate-padded map, which
    samples input coordinate ``y/f`` at output ``y``, everywhere including the borders."""
    torch.manual_seed(1)
    h, w = 5, 7
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    with torch.no_grad():
        got = upsample_aligned(_aligned(3, factor), x)
    padded = F.pad(x, (0, 1, 0, 1), mode="replicate")
    want = F.interpolate(
        padded, size=(h * factor + 1, w * factor + 1), mode="bilinear", align_corners=True
    )
    torch.testing.assert_close(got, want[..., : h * factor, : w * factor])
    torch.testing.assert_close(got[..., ::factor, ::factor], x)  # the samples themselves


def test_upsample_aligned_rejects_other_geometries() -> None:
    x = torch.zeros(1, 2, 3, 3)
    for up in (bilinear_upsampling(2, 2, padding=1), nn.ConvTranspose2d(2, 2, 3, stride=2)):
        with pytest.raises(ValueError, match="upsample_aligned: expected"):
            upsample_aligned(up, x)
