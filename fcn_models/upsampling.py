"""Convolution arithmetic and bilinear in-network upsampling (FCN paper, section 3.3).

The size formulas are PyTorch's (and Dumoulin & Visin, "A guide to convolution arithmetic for
deep learning"); for dilation 1 the convolution one is the course notes'
``o = floor((i + 2p - k) / s) + 1``.

Two bilinear upsamplers, for two conventions of where a stride-``f`` feature ``j`` sits:
:func:`bilinear_upsampling` (even kernel ``2f``; the FCN reference's, aligned by its crops)
centres it on output ``f*j + (2f - 1)/2 - p``, with ``p = f/2`` the middle of its ``f x f``
cell as in ``F.interpolate(align_corners=False)``; :func:`aligned_bilinear_upsampling` (odd
kernel ``2f - 1``, applied with :func:`upsample_aligned`) puts it on output ``f*j``, where
ResNet's ``k = 2p + 1`` convolutions centre it (derived in ``fcn_resnet.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "aligned_bilinear_upsampling",
    "bilinear_kernel",
    "bilinear_upsampling",
    "conv_output_size",
    "conv_transpose_output_size",
    "pool_output_size",
    "upsample_aligned",
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
    ``F.interpolate(mode="bilinear", align_corners=False)`` away from the borders: input
    ``j`` is centred on output ``factor*j + (factor - 1)/2``, the middle of its cell. For
    features centred on their cell's first pixel use :func:`aligned_bilinear_upsampling`.
    The layer stays learnable, as in FCN-16s/8s.
    """
    if factor < 1:
        raise ValueError(f"bilinear_upsampling: expected factor >= 1, got {factor}")
    k = 2 * factor
    up = nn.ConvTranspose2d(channels, channels, k, stride=factor, padding=padding, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, k, dtype=up.weight.dtype))
    return up


def aligned_bilinear_upsampling(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A bias-free ``ConvTranspose2d(k=2*factor - 1, s=factor, p=factor - 1)``, bilinear.

    Input ``j`` is centred on output ``factor*j + (k - 1)/2 - p = factor*j`` exactly, and the
    tent ``1 - |t - (factor - 1)|/factor`` gives output ``factor*j + d`` (``0 <= d < factor``)
    the weights ``1 - d/factor`` and ``d/factor`` on inputs ``j`` and ``j + 1``: linear
    interpolation between the samples, weights summing to 1. Output length is
    ``(i - 1)factor + 1``; run it through :func:`upsample_aligned` to get ``i * factor``.
    The layer stays learnable (a plain ``nn.ConvTranspose2d``).
    """
    if factor < 1:
        raise ValueError(f"aligned_bilinear_upsampling: expected factor >= 1, got {factor}")
    k = 2 * factor - 1
    up = nn.ConvTranspose2d(channels, channels, k, stride=factor, padding=factor - 1, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, k, dtype=up.weight.dtype))
    return up


def upsample_aligned(up: nn.ConvTranspose2d, x: Tensor) -> Tensor:
    """``x`` (N, C, h, w) upsampled by ``up`` to exactly ``(factor*h, factor*w)``.

    ``up`` has the geometry of :func:`aligned_bilinear_upsampling` (ValueError otherwise), so
    input ``j`` lands on output ``factor*j``. The last ``factor - 1`` outputs per axis lie past
    the last sample, where the bare transposed conv would fade towards zero: one replicated
    row/column at the bottom/right extends the last sample as a constant there instead.
    """
    f = up.stride
    geometry = (up.kernel_size, up.padding, up.output_padding, up.dilation)
    want = (tuple(2 * s - 1 for s in f), tuple(s - 1 for s in f), (0, 0), (1, 1))
    if geometry != want:
        raise ValueError(
            "upsample_aligned: expected (kernel_size, padding, output_padding, dilation) "
            f"{want} for stride {f}, got {geometry}"
        )
    h, w = x.shape[-2:]
    out = up(F.pad(x, (0, 1, 0, 1), mode="replicate"))  # (h*f + 1, w*f + 1)
    return out[..., : h * f[0], : w * f[1]]
