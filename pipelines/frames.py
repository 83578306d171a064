"""The one frame transform: crop the sky rows, resize, normalize - and the inverse for masks.

Ingest, training, evaluation, promotion, labeling and the registered MLflow model all call this
module, so what the model sees when serving is exactly what it saw in training. The transform's
parameters are written to the ingest manifest, copied into every checkpoint and registered
model, and read back from there - never re-typed.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipelines.errors import UserError
from pipelines.labels import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Input limits shared by ingest and labeling. A 3384x2710 Apollo frame is 9.2 MP and its JPEG
# 1-3 MB: anything far larger is a mistake, and decoding it would run a worker out of memory.
DEFAULT_MAX_PIXELS = 60_000_000
DEFAULT_MAX_BYTES = 64 * 2**20


class FrameError(UserError):
    """A frame or label that cannot be used (the message says why, for reports)."""


@dataclass(frozen=True)
class FrameTransform:
    """Geometry and normalization between a raw drive frame and the model's input.

    ``crop_top`` rows (sky, no lane markings) and ``crop_bottom`` rows (e.g. the ego hood) are
    dropped, the rest is resized to ``width`` x ``height`` (images bilinear, labels nearest so
    ids are never blended). The defaults are the ApolloScape lane-competition recipe: 3384x1710
    frames, 690 sky rows cropped, 1024x384 model input.
    """

    width: int = 1024
    height: int = 384
    crop_top: int = 690
    crop_bottom: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"model input size must be positive, got {self.width}x{self.height}")
        if self.crop_top < 0 or self.crop_bottom < 0:
            raise ValueError("crop_top and crop_bottom must be >= 0")
        # JSON round trips give lists; keep tuples so instances compare and hash.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    # -- (de)serialization: saved with manifests, checkpoints and registered models ------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FrameTransform:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def geometry(self) -> dict[str, int]:
        """Which pixels of a frame the model sees, and at what size (normalization aside):
        shards and models must agree on it to be used together."""
        return {
            "width": self.width,
            "height": self.height,
            "crop_top": self.crop_top,
            "crop_bottom": self.crop_bottom,
        }

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the model input."""
        return self.width, self.height

    # -- forward: raw frame -> model input -------------------------------------------------
    def _crop_rows(self, frame_height: int) -> tuple[int, int]:
        bottom = frame_height - self.crop_bottom
        if bottom - self.crop_top < 1:
            raise FrameError(
                f"frame height {frame_height} leaves no rows after cropping "
                f"{self.crop_top} top and {self.crop_bottom} bottom rows"
            )
        return self.crop_top, bottom

    def prepare_image(self, frame: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB frame -> (height, width, 3) uint8, cropped and resized."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise FrameError(
                f"expected an 8-bit RGB frame (H, W, 3) uint8, got shape {frame.shape} "
                f"dtype {frame.dtype}"
            )
        top, bottom = self._crop_rows(frame.shape[0])
        img = Image.fromarray(np.ascontiguousarray(frame[top:bottom]))
        return np.asarray(img.resize(self.size, Image.Resampling.BILINEAR))

    def prepare_label(self, label: np.ndarray) -> np.ndarray:
        """(H, W) uint8 id mask -> (height, width), cropped and resized nearest-neighbour."""
        if label.ndim != 2 or label.dtype != np.uint8:
            raise FrameError(
                f"expected a single-channel 8-bit label (H, W) uint8, got shape {label.shape} "
                f"dtype {label.dtype}"
            )
        top, bottom = self._crop_rows(label.shape[0])
        img = Image.fromarray(np.ascontiguousarray(label[top:bottom]))
        return np.asarray(img.resize(self.size, Image.Resampling.NEAREST))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:  # noqa: F821
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalized, on the input's device.

        Done on the training/inference device rather than in Ray Data so that uint8 (4x less
        than float32) is what crosses the object store.
        """
        import torch  # not at module level: ingest workers never need it

        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) images, got {tuple(images.shape)}")
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1) * 255.0
        x = images.permute(0, 3, 1, 2).float()
        return (x - mean) / std

    # -- inverse: model output -> raw frame ------------------------------------------------
    def restore_mask(self, mask: np.ndarray, frame_hw: tuple[int, int]) -> np.ndarray:
        """(height, width) training-id mask -> (H, W) at the original frame size: resized back
        nearest-neighbour over the kept rows, cropped rows filled with background (0)."""
        frame_h, frame_w = frame_hw
        top, bottom = self._crop_rows(frame_h)
        out = np.zeros((frame_h, frame_w), dtype=np.uint8)
        img = Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8)))
        out[top:bottom] = np.asarray(img.resize((frame_w, bottom - top), Image.Resampling.NEAREST))
        return out


# -- codecs: the one way frames and masks are decoded / encoded -------------------------------
def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png_mask(data: bytes) -> np.ndarray:
    """A single-channel mask PNG (as written by :func:`encode_png`) -> (H, W) uint8."""
    return np.asarray(Image.open(io.BytesIO(data)))


def decode_rgb(data: bytes, *, max_pixels: int | None = None, what: str = "image") -> np.ndarray:
    """JPEG/PNG bytes of an 8-bit RGB frame -> (H, W, 3) uint8, or :class:`FrameError` saying
    why not (empty, not an image, truncated, wrong mode, too large)."""
    if not data:
        raise FrameError(f"{what} is an empty (zero-byte) file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise FrameError(f"{what} is too large to decode safely ({e})") from None
    except Exception as e:  # PIL raises several types for unrecognized data
        raise FrameError(f"{what} is not a readable image ({type(e).__name__})") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise FrameError(f"{what} is {w}x{h} = {w * h} pixels, more than the limit {max_pixels}")
    if img.mode != "RGB":
        raise FrameError(f"{what} must be 8-bit RGB, got PIL mode {img.mode!r}")
    try:
        img.load()
    except Exception as e:
        raise FrameError(f"{what} is truncated or corrupt ({type(e).__name__}: {e})") from None
    return np.asarray(img)


def decode_label(data: bytes, *, max_pixels: int | None = None, what: str = "label") -> np.ndarray:
    """Apollo label PNG bytes -> (H, W) uint8 ids.

    The ids are the palette *indices* of a ``P`` image (or the values of an ``L`` image); they
    are read as they are, never converted (``convert('L')`` would replace id 200 by its
    palette luminance 160).
    """
    if not data:
        raise FrameError(f"{what} is an empty (zero-byte) file")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:
        raise FrameError(f"{what} is not a readable PNG ({type(e).__name__})") from None
    w, h = img.size  # from the header: checked before the pixels are decoded
    if max_pixels is not None and w * h > max_pixels:
        raise FrameError(f"{what} is {w}x{h} = {w * h} pixels, more than the limit {max_pixels}")
    try:
        img.load()
    except Exception as e:
        raise FrameError(f"{what} is not a readable PNG ({type(e).__name__})") from None
    if img.mode not in ("P", "L"):
        raise FrameError(
            f"{what} must be single-channel 8-bit (palette 'P' or 'L' ids), got PIL mode "
            f"{img.mode!r}"
        )
    return np.asarray(img)


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FrameError",
    "FrameTransform",
    "decode_label",
    "decode_png_mask",
    "decode_rgb",
    "encode_jpeg",
    "encode_png",
]
