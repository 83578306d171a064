"""Training augmentation on the training device, inside the step: flip, random scale and
crop/pad, colour jitter, for a whole batch at once.

It runs here rather than in the Ray Data tasks because on one thread of a CPU it costs more
than decoding the frame (a NumPy jitter alone was ~15 ms of ~23 ms per 1024x384 image:
benchmarks/RESULTS.md), while on a GPU it is a few batched kernels. The data path's CPUs then
only decode. On a CPU training worker the same code runs on the CPU, next to a step that costs
seconds per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.core.frames import FrameTransform
from pipelines.core.labels import IGNORE_INDEX


@dataclass(frozen=True)
class Augment:
    """Training augmentation. Horizontal flips keep lane semantics: a flipped dividing line is
    still a dividing line, and left/right turn arrows share the thru/turn class."""

    hflip: float = 0.5
    scale: tuple[float, float] = (0.75, 1.25)
    colour: float = 0.2  # brightness/contrast/saturation jitter amplitude

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H, W, 3) uint8 images, (N, H, W) integer labels, on one device -> (N, 3, H, W)
        float32 images in 0..255 and (N, H, W) int64 labels, augmented frame by frame with
        draws from ``generator`` (a generator on that device)."""
        n, h, w, _ = images.shape
        dev = images.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator, device=dev)

        x = images.permute(0, 3, 1, 2).float()
        y = labels
        flip = torch.rand(n, generator=generator, device=dev) < self.hflip
        lo, hi = self.scale
        s = uniform(lo, hi)
        if self.hflip > 0 or hi > lo or lo != 1.0:  # decided without a device sync
            x, y = _flip_scale_crop(x, y, flip, s, uniform(0.0, 1.0), uniform(0.0, 1.0))
        else:
            y = y.long()
        if self.colour > 0:
            a = self.colour
            x = _colour_jitter(
                x, uniform(1 - a, 1 + a), uniform(1 - a, 1 + a), uniform(1 - a, 1 + a)
            )
        return x, y


def _flip_scale_crop(
    x: torch.Tensor,
    y: torch.Tensor,
    flip: torch.Tensor,
    s: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each frame scaled by ``s``, then a (H, W) window of it at the relative offsets (u, v)
    in 0..1: a crop where it grew, a padding (image 0, label ignore) where it shrank; mirrored
    where ``flip``. One sampling grid per frame, bilinear for the image, nearest for the label,
    so the two stay aligned pixel for pixel.

    The grid (``align_corners=False``): output pixel p of the scaled frame's window at offset
    t (t in [min(0, sW - W), max(0, sW - W)]) reads input position (p + t + 0.5) / s - 0.5;
    in normalized coordinates u_in = u_out / s + (1/s - 1) + 2 t / (s W).
    """
    n, _, h, w = x.shape
    # The grid is separable (no rotation): each axis is an affine map of its own, so the grid
    # is built from its columns and rows rather than by affine_grid's (N, H*W, 3) x (3, 2)
    # product, and "outside the frame" is a column or a row test.
    coords, inside = [], []
    for size, rel, mirror in ((w, u, flip), (h, v, None)):
        room = s * size - size  # > 0: crop, < 0: pad
        t = torch.minimum(room, torch.zeros_like(room)) + rel * room.abs()
        out = torch.linspace(-1 + 1 / size, 1 - 1 / size, size, device=x.device)
        g = out / s[:, None] + (1 / s - 1 + 2 * t / (s * size))[:, None]  # (N, size)
        if mirror is not None:  # mirroring the input: u_in -> -u_in
            g = g * (1 - 2 * mirror.float())[:, None]
        coords.append(g)
        # Where grid_sample's nearest mode reads outside the input (it rounds half to even,
        # as torch.round does): the label's padding, and the image's black.
        index = torch.round(((g + 1) * size - 1) / 2)
        inside.append((index >= 0) & (index <= size - 1))
    gx, gy = coords
    grid = torch.stack((gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)), dim=-1)
    valid = inside[1][:, None, :, None] & inside[0][:, None, None, :]  # (N, 1, H, W)
    # Labels sampled less IGNORE_INDEX: the zero padding comes back as IGNORE_INDEX.
    z = y.float().sub_(IGNORE_INDEX)[:, None]
    z = F.grid_sample(z, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    y = z[:, 0].add_(IGNORE_INDEX).long()
    # Border padding, then black outside: the frame's edge pixels do not blend into the black.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x.mul_(valid), y


def _colour_jitter(
    x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor
) -> torch.Tensor:
    """Per frame: brightness scales, contrast about the frame's mean, saturation about each
    pixel's grey; clipped to 0..255. (N, 3, H, W) float in 0..255.

    All three are linear, so they fold into one colour matrix and offset per frame: with
    y = b x, z = c (y - mean(y)) + mean(y) and out = s z + (1 - s) grey(z),
    out = b c (s I + (1 - s) J / 3) x + b (1 - c) mean(x), J the all-ones 3x3: one pass over
    the pixels instead of six.
    """
    n = x.shape[0]
    b, c, s = brightness.view(n, 1, 1), contrast.view(n, 1, 1), saturation.view(n, 1, 1)
    eye = torch.eye(3, device=x.device).expand(n, 3, 3)
    matrix = b * c * (s * eye + (1 - s) / 3)
    offset = b * (1 - c) * x.mean(dim=(1, 2, 3)).view(n, 1, 1)
    out = torch.baddbmm(offset.expand(n, 3, 1), matrix, x.reshape(n, 3, -1))
    return out.view_as(x).clamp_(0, 255)


def augment_batch(
    batch: dict, augment: Augment, transform: FrameTransform, generator: torch.Generator
) -> dict:
    """A training batch as delivered raw (uint8 ``image`` (N, H, W, 3), ``label`` on the
    device: ``torch_batches(..., normalize=False)``) -> augmented, normalized model input."""
    x, y = augment(batch["image"], batch["label"], generator)
    return {**batch, "image": transform.normalize(x.permute(0, 2, 3, 1)), "label": y}


def step_generator(device: torch.device, seed: int) -> torch.Generator:
    """The augmentation's random numbers for one epoch of one rank, on its device: a stream
    of its own, not the one ``torch.manual_seed(seed)`` gives dropout."""
    own = int(np.random.SeedSequence([seed, 0xA06]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(own)
