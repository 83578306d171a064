"""The frame transform's first half on the model's device: JPEG decode (nvJPEG on a GPU,
libjpeg on the CPU, both through ``torchvision.io.decode_jpeg``), crop and bilinear resize
as tensors. The labeling actor calls these so that on a GPU node the CPU only reads bytes:
decoding a 3384x1710 JPEG and resizing it costs a CPU thread ~39 ms a frame, nvJPEG decodes
~1,300 a second in batches (benchmarks/RESULTS.md).

The result matches :meth:`~pipelines.core.frames.FrameTransform.load_image` (PIL) within
JPEG tolerance, not bit for bit: the two decoders' IDCTs differ, and PIL decodes at half size
where the input allows (tests/unit/test_device_frames.py bounds the difference).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from pipelines.core.codecs import FrameError
from pipelines.core.frames import FrameTransform
from pipelines.inference.device import raise_if_device_failed
from pipelines.runtime import faults

JPEG_MAGIC = b"\xff\xd8\xff"


def decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | str]:
    """JPEG bytes -> (3, H, W) uint8 RGB on ``device`` per frame, or why it failed.

    One batched call (nvJPEG decodes a batch at once); if the batch fails, frame by frame,
    and a frame the device's decoder refuses is tried once more on the CPU (libjpeg takes
    some files nvJPEG does not), so one odd file never fails the batch or a readable frame.
    A failure that is the device's, not the file's, raises
    :class:`~pipelines.core.errors.BrokenGpuError` instead (:func:`raise_if_device_failed`).
    """
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if not tensors:
        return []
    try:
        return list(_decode(tensors, device))
    except Exception:  # one bad frame fails the whole batched call: find it
        pass
    out: list[torch.Tensor | str] = []
    for t in tensors:
        try:
            out.append(_decode([t], device)[0])
        except Exception as e:
            raise_if_device_failed(e, device, "decoding a JPEG")
            try:
                out.append(_decode([t], torch.device("cpu"))[0].to(device))
            except Exception:
                out.append(f"frame is not a decodable JPEG ({type(e).__name__}: {str(e)[:80]})")
    return out


def _decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    faults.point("label.device_decode", device=str(device))
    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def prepare_frames(
    images: Sequence[torch.Tensor], transform: FrameTransform
) -> tuple[torch.Tensor, list[str]]:
    """Decoded (3, H, W) uint8 frames -> (N, height, width, 3) uint8 model inputs on their
    device (the kept rows, resized bilinear with antialiasing like PIL's), and an error
    message per frame ("" for none: a frame too small gets a zero input and its reason).

    Frames of one size (the usual case: one camera) are resized in one call."""
    if not images:
        raise ValueError("prepare_frames needs at least one frame")
    device = images[0].device
    out = torch.zeros((len(images), transform.height, transform.width, 3), dtype=torch.uint8,
                      device=device)  # fmt: skip
    errors = [""] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[1:]), []).append(i)
    for (h, w), idx in groups.items():
        try:
            top, bottom = transform.crop_rows(h, w)
        except FrameError as e:
            for i in idx:
                errors[i] = str(e)
            continue
        x = torch.stack([images[i][:, top:bottom] for i in idx]).float()
        y = F.interpolate(x, size=(transform.height, transform.width), mode="bilinear",
                          align_corners=False, antialias=True)  # fmt: skip
        out[idx] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out, errors
