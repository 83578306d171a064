"""Convolution arithmetic and bilinear in-network upsampling (FCN paper, section 3.3).

The size formulas are PyTorch's (and Dumoulin & Visin, "A guide to convolution arithmetic for
deep learning"); for dilation 1 the convolution one is the course notes'
``o = floor((i + 2p - k) / s) + 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "bilinear_kernel",
    "bilinear_upsampling",
    "conv_output_size",
    "conv_transpose_output_size",
    "pool_output_size",
]


def conv_output_size(i: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    """Output length of a convolution (or floor-mode pooling) along one axis.

    ``o = floor((i + 2p - d(k - 1) - 1) / s) + 1``; a dilated kernel spans ``d(k - 1) + 1``
    pixels, so with ``d = 1`` this is ``floor((i + 2p - k) / s) + 1``. Can be <= 0: the
    caller decides whether that is an error (PyTorch raises).
    """
    return (i + 2 * p - d * (k - 1) - 1) // s + 1


def pool_output_size(
    i: int, k: int, s: int | None = None, p: int = 0, d: int = 1, ceil_mode: bool = False
) -> int:
    """Output length of ``nn.MaxPool2d`` / ``nn.AvgPool2d`` along one axis.

    Floor mode is :func:`conv_output_size` (``s`` defaults to ``k`` as in PyTorch). Ceil mode
    (Caffe's pooling, used by the FCN reference) rounds up so a partial window at the end still
    counts, except that PyTorch drops a last window that would start in the right padding.
    """
    s = k if s is None else s
    if not ceil_mode:
        return conv_output_size(i, k, s, p, d)
    o = -(-(i + 2 * p - d * (k - 1) - 1) // s) + 1  # ceil division
    if (o - 1) * s >= i + p:
        o -= 1
    return o


def conv_transpose_output_size(
    i: int, k: int, s: int = 1, p: int = 0, output_padding: int = 0, d: int = 1
) -> int:
    """Output length of a transposed convolution along one axis.

    ``o = (i - 1)s - 2p + d(k - 1) + output_padding + 1``: the inverse of
    :func:`conv_output_size`. A strided convolution maps ``s`` different input lengths to the
    same output length; ``output_padding`` (``< max(s, d)``) picks which one to recover.
    """
    return (i - 1) * s - 2 * p + d * (k - 1) + output_padding + 1


def bilinear_kernel(
    channels: int,
    kernel_size: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bilinear interpolation weights for a ``channels -> channels`` transposed convolution.

    The FCN reference's ``upsample_filt`` (surgery.py): ``factor = (k + 1) // 2``, a tent
    ``1 - |x - center| / factor`` per axis, with ``center = factor - 1`` for odd ``k`` and
    ``factor - 0.5`` for even ``k`` (the tent is centred on the kernel). Returned shape is
    ``(C, C, k, k)`` and diagonal: channel ``c`` feeds only output channel ``c``, so classes
    are upsampled independently.
    """
    if channels < 1 or kernel_size < 1:
        raise ValueError(
            f"bilinear_kernel: expected channels >= 1 and kernel_size >= 1, "
            f"got channels={channels}, kernel_size={kernel_size}"
        )
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64, device=device)
    tent = 1 - (og - center).abs() / factor  # (k,)
    filt = tent[:, None] * tent[None, :]  # (k, k), separable
    weight = torch.zeros(
        channels, channels, kernel_size, kernel_size, dtype=torch.float64, device=device
    )
    idx = torch.arange(channels, device=device)
    weight[idx, idx] = filt
    return weight.to(dtype or torch.get_default_dtype())


def bilinear_upsampling(channels: int, factor: int, padding: int = 0) -> nn.ConvTranspose2d:
    """A bias-free ``ConvTranspose2d(k=2*factor, s=factor)`` initialised to bilinear upsampling.

    Output length is ``(i - 1)factor - 2p + 2factor = (i + 1)factor - 2p``: ``padding=0`` keeps
    the full support (the FCN reference crops afterwards); ``padding=factor // 2`` (even
    ``factor``) gives exactly ``i * factor`` pixels aligned with
    ``F.interpolate(mode="bilinear", align_corners=False)`` away from the borders.
    The layer stays learnable, as in FCN-16s/8s.
    """
    if factor < 1:
        raise ValueError(f"bilinear_upsampling: expected factor >= 1, got {factor}")
    k = 2 * factor
    up = nn.ConvTranspose2d(channels, channels, k, stride=factor, padding=padding, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, k, dtype=up.weight.dtype))
    return up
