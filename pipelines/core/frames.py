"""The one frame transform: crop the sky rows, resize, normalize - and the inverse for masks.

Ingest, training, evaluation, promotion, labeling and the registered MLflow model all call this
module, so what the model sees when serving is exactly what it saw in training. The transform's
parameters are written to the ingest manifest, copied into every checkpoint and registered
model, and read back from there - never re-typed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipelines.core.codecs import FrameError, encode_png_rows, load_pixels, open_rgb

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_FRAME = 64  # pixels a side: smaller frames are rejected (nothing to label in them)


@dataclass(frozen=True)
class FrameTransform:
    """Geometry and normalization between a raw drive frame and the model's input.

    ``crop_top`` rows (sky, no lane markings) and ``crop_bottom`` rows (e.g. the ego hood) are
    dropped, the rest is resized to ``width`` x ``height`` (images bilinear, labels nearest so
    ids are never blended). The defaults are the ApolloScape lane-competition recipe: 3384x1710
    frames, 690 sky rows cropped, 1024x384 model input.

    ``source_height``: the frame height the crops are counted in (ingest records its source
    frames' height). A frame of another height from the same camera (a half- or
    quarter-resolution copy) loses the same *fraction* of its rows: 690 of 1710 rows at full
    size, 345 of 855 at half size. Without it (transforms recorded before it existed) the crops
    are absolute rows whatever the frame's height.
    """

    width: int = 1024
    height: int = 384
    crop_top: int = 690
    crop_bottom: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source_height: int | None = None

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"model input size must be positive, got {self.width}x{self.height}")
        if self.crop_top < 0 or self.crop_bottom < 0:
            raise ValueError("crop_top and crop_bottom must be >= 0")
        if (
            self.source_height is not None
            and self.source_height <= self.crop_top + self.crop_bottom
        ):
            raise ValueError(
                f"source_height {self.source_height} leaves no rows after cropping "
                f"{self.crop_top} top and {self.crop_bottom} bottom rows"
            )
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
    def crop_rows(self, frame_height: int, frame_width: int | None = None) -> tuple[int, int]:
        """The kept rows [top, bottom) of a frame of that height: the crops scaled by
        ``frame_height / source_height`` (when recorded), or :class:`FrameError` for a frame
        under ``MIN_FRAME`` pixels a side or with no rows left."""
        if frame_height < MIN_FRAME or (frame_width is not None and frame_width < MIN_FRAME):
            size = (
                f"{frame_width}x{frame_height}"
                if frame_width is not None
                else f"height {frame_height}"
            )
            raise FrameError(f"frame {size} is smaller than {MIN_FRAME}x{MIN_FRAME} pixels")
        top, cut = self.crop_top, self.crop_bottom
        if self.source_height is not None and frame_height != self.source_height:
            scale = frame_height / self.source_height
            top, cut = round(top * scale), round(cut * scale)
        bottom = frame_height - cut
        if bottom - top < 1:
            raise FrameError(
                f"frame height {frame_height} leaves no rows after cropping "
                f"{top} top and {cut} bottom rows"
            )
        return top, bottom

    def prepare_image(self, frame: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB frame -> (height, width, 3) uint8, cropped and resized."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise FrameError(
                f"expected an 8-bit RGB frame (H, W, 3) uint8, got shape {frame.shape} "
                f"dtype {frame.dtype}"
            )
        top, bottom = self.crop_rows(*frame.shape[:2])
        return self._resize_kept(Image.fromarray(frame), frame.shape[1], top, bottom, 1.0)

    def _resize_kept(
        self, img: Image.Image, frame_w: int, top: int, bottom: int, f: float
    ) -> np.ndarray:
        """The kept rows [top, bottom) of the frame, given as ``img`` at ``f`` times the frame's
        size, resized bilinear to the model input. Cropped first, so the filter never reads a
        cropped row (at f=1/2 an odd ``top`` leaves the half row that shares its decoded row);
        then a fractional box for the rest of the kept region's edges."""
        y0 = math.floor(top * f)
        kept = img.crop((0, y0, img.width, min(img.height, math.ceil(bottom * f))))
        box = (0.0, top * f - y0, frame_w * f, bottom * f - y0)
        return np.asarray(kept.resize(self.size, Image.Resampling.BILINEAR, box=box))

    def draft_scale(self, frame_w: int, frame_h: int) -> int:
        """2 where a JPEG decoded at half size still leaves at least the model input's pixels
        in the kept rows, else 1. libjpeg decodes at 1/2 directly, and crop + resize then work
        on a quarter of the pixels: 3384x1710 -> 512x192 costs 32 ms instead of 113 ms
        (benchmarks/RESULTS.md). Not 1/4 or 1/8: their reduced IDCT moved the model input
        away from the full decode's (p99 of the pixel error 22 against 2)."""
        top, bottom = self.crop_rows(frame_h, frame_w)
        if frame_w // 2 >= self.width and (bottom - top) // 2 >= self.height:
            return 2
        return 1

    def load_image(
        self, data: bytes, *, max_pixels: int | None = None, what: str = "image"
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """Encoded frame bytes -> (model input (height, width, 3) uint8, (H, W) of the frame).

        The same crop and resize as :meth:`prepare_image` on the full decode, but a JPEG is
        decoded at the reduced scale :meth:`draft_scale` allows; the result differs from the
        full decode's only within JPEG tolerance (tests/unit/test_frames.py). The crop is a
        fractional box in the reduced image (690 rows at 1/4 are 172.5), so the kept region
        is exactly the one of the full decode."""
        img = open_rgb(data, max_pixels=max_pixels, what=what)
        frame_w, frame_h = img.size
        top, bottom = self.crop_rows(frame_h, frame_w)
        s = self.draft_scale(frame_w, frame_h)
        if s > 1 and img.format == "JPEG":
            # PIL picks the largest scale whose result still covers the size asked for.
            img.draft("RGB", (frame_w // s, frame_h // s))
        load_pixels(img, what)
        # Pixel i of the 1/s decode covers rows s*i .. s*i+s-1 of the frame (the last one
        # partly, where the height is odd): the box scales by exactly 1/s.
        f = 1.0 if img.size == (frame_w, frame_h) else 1 / s
        return self._resize_kept(img, frame_w, top, bottom, f), (frame_h, frame_w)

    def prepare_label(self, label: np.ndarray) -> np.ndarray:
        """(H, W) uint8 id mask -> (height, width), cropped and resized nearest-neighbour."""
        if label.ndim != 2 or label.dtype != np.uint8:
            raise FrameError(
                f"expected a single-channel 8-bit label (H, W) uint8, got shape {label.shape} "
                f"dtype {label.dtype}"
            )
        top, bottom = self.crop_rows(*label.shape)
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
        top, bottom = self.crop_rows(frame_h, frame_w)
        out = np.zeros((frame_h, frame_w), dtype=np.uint8)
        img = Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8)))
        out[top:bottom] = np.asarray(img.resize((frame_w, bottom - top), Image.Resampling.NEAREST))
        return out

    def restored_png(self, mask: np.ndarray, frame_hw: tuple[int, int]) -> bytes:
        """``encode_png(self.restore_mask(mask, frame_hw))``, the same pixels, without building
        the full-size mask: each small row is widened once and repeated as the nearest resize
        repeats it (:func:`~pipelines.core.codecs.encode_png_rows`), so the cost follows the
        model's rows, not the frame's (bench_label_stages: ~3 ms against ~20 at 3384x1710)."""
        frame_h, frame_w = frame_hw
        top, bottom = self.crop_rows(frame_h, frame_w)
        h, w = mask.shape
        wide = np.asarray(mask, dtype=np.uint8)[:, _nearest_index(w, frame_w)]
        zero = np.zeros((1, frame_w), np.uint8)
        rows = np.concatenate([zero, wide, zero])
        repeats = np.concatenate([[top], _nearest_repeats(h, bottom - top), [frame_h - bottom]])
        return encode_png_rows(rows, repeats)

    def restored_pixel_counts(self, mask: np.ndarray, frame_hw: tuple[int, int]) -> list[int]:
        """``labels.class_pixel_counts(self.restore_mask(mask, frame_hw))`` without counting
        the full-size mask (5.8 M pixels at 3384x1710: ~20 ms a frame). A nearest resize
        repeats each small row and column a whole number of times; the counts come from those
        repeats, taken from the same PIL resize of an index ramp, so they are exact."""
        from pipelines.core.labels import N_CLASSES

        frame_h, frame_w = frame_hw
        top, bottom = self.crop_rows(frame_h, frame_w)
        h, w = mask.shape
        rows = _nearest_repeats(h, bottom - top)
        cols = _nearest_repeats(w, frame_w)
        weights = np.outer(rows, cols).ravel()
        counts = np.bincount(mask.ravel(), weights=weights, minlength=256)[:N_CLASSES]
        counts = np.rint(counts).astype(np.int64)
        counts[0] += frame_w * (frame_h - (bottom - top))  # cropped rows are background
        return counts.tolist()


def _nearest_index(n: int, size: int) -> np.ndarray:
    """Which of ``n`` source pixels each of ``size`` pixels of a nearest resize takes (PIL's
    own mapping: a ramp 0..n-1 resized as the mask is; non-decreasing)."""
    ramp = Image.fromarray(np.arange(n, dtype=np.int32)[None, :])  # mode "I"
    return np.asarray(ramp.resize((size, 1), Image.Resampling.NEAREST))[0].astype(np.int64)


def _nearest_repeats(n: int, size: int) -> np.ndarray:
    """How often each of ``n`` source pixels appears in a nearest resize to ``size``."""
    return np.bincount(_nearest_index(n, size), minlength=n)


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height); ValueError saying what was expected."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 1024x384, got {text!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return w, h
