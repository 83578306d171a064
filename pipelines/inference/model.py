"""For notebooks and services, :class:`LaneModel`: whole frames in, masks at the frames' size
and labeling's per-frame scores out, around the one predictor. :meth:`LaneModel.from_dir` opens a
local model directory; the one loader users call, for ``models:/`` URIs and paths, is
:func:`pipelines.registry.load_model` (the registry comes after this package; digests checked).

This module imports no PyTorch (labeling's driver imports :mod:`~pipelines.inference.model_dir`,
hence this package, and must stay without it): the predictor is imported when a model loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.core.codecs import FrameError
from pipelines.core.errors import UserError

if TYPE_CHECKING:
    import torch

    from pipelines.inference.model_dir import ModelSpec
    from pipelines.inference.predictor import Predictor


#: A URI's scheme (models:/, runs:/, s3://, file://): what a local model path never starts with.
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


class FramesError(UserError):
    """A frame batch a model cannot take (shape, dtype, size): the message names the model."""


class ModelDirError(UserError):
    """A path that is not a model directory."""


@dataclass(frozen=True)
class ScoredMasks:
    """:meth:`LaneModel.predict_scored`'s result: the masks and, per frame, the scores the
    labeling job writes (same names, same values: :meth:`Predictor.predict_scored`)."""

    masks: np.ndarray  # (N, H, W) uint8 training ids, at the frames' size
    confidence: np.ndarray  # (N,) float32: mean top probability over lane pixels (NaN: none)
    pixel_confidence: np.ndarray  # (N,) float32: mean top probability over all pixels
    uncertain_fraction: np.ndarray  # (N,) float32: share of pixels under ``uncertain_below``
    novelty: np.ndarray  # (N,) float32: how unlike the training data (NaN: no BatchNorm)


class LaneModel:
    """A loaded model for notebooks and services: ``(N, H, W, 3)`` uint8 RGB frames of any
    size the model accepts -> ``(N, H, W)`` uint8 training-id masks at that size, as the
    registered pyfunc answers (which wraps this class). ``source`` names the model in errors.
    """

    def __init__(self, predictor: Predictor, source: str) -> None:
        self.predictor = predictor
        self.source = source

    @classmethod
    def from_dir(cls, path: str | Path, *, device: torch.device | str | None = None) -> LaneModel:
        """A local model directory (``model.pt`` + ``model.json``, as training writes and the
        registry stores): weights loaded as data (``weights_only``). ``device``: None picks the
        GPU if there is one. A local directory has no recorded digests: for registered versions
        use :func:`pipelines.registry.load_model`, which checks them."""
        text = str(path)
        if URI_SCHEME.match(text):
            raise ModelDirError(
                f"{text}: LaneModel.from_dir takes a local model directory; load models:/ URIs "
                "with pipelines.registry.load_model (resolved, digests checked)"
            )
        from pipelines.inference.predictor import Predictor

        try:
            predictor = Predictor.load(Path(path).expanduser(), device)
        except FileNotFoundError as e:
            raise ModelDirError(str(e)) from None
        return cls(predictor, source=text)

    @property
    def spec(self) -> ModelSpec:
        return self.predictor.spec

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.predictor.spec.class_names

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    def __repr__(self) -> str:
        return f"LaneModel({self.source!r}, {self.spec.model}, device={self.device})"

    def _frames(self, frames: np.ndarray) -> np.ndarray:
        """The batch as an array, or one :class:`FramesError` line saying what was expected."""
        if not isinstance(frames, np.ndarray):
            frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise FramesError(
                f"{self.source}: frames must be a uint8 batch of RGB frames shaped "
                f"(N, H, W, 3), got shape {frames.shape} dtype {frames.dtype}"
            )
        return frames

    @contextmanager
    def _named(self, frames: np.ndarray) -> Iterator[None]:
        """A frame the transform refuses (too small, no rows left after the crop) as one line
        naming the model: all frames of an array have one size, so one message says it."""
        try:
            yield
        except FrameError as e:
            raise FramesError(f"{self.source}: frames {frames.shape}: {e}") from None

    def predict(self, frames: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 RGB -> ``(N, H, W)`` uint8 training-id masks (cropped rows
        are background), through :meth:`Predictor.predict`."""
        frames = self._frames(frames)
        if len(frames) == 0:
            return np.zeros(frames.shape[:3], dtype=np.uint8)
        with self._named(frames):
            return np.stack(self.predictor.predict(frames))

    def predict_scored(self, frames: np.ndarray, uncertain_below: float = 0.5) -> ScoredMasks:
        """:meth:`predict` plus the per-frame scores labeling writes for the same frames
        (:meth:`Predictor.predict_scored`, the labeling actor's call; ``uncertain_below`` as
        ``jobs.label --uncertain-below``)."""
        from pipelines.core.metrics import SCORE_NAMES

        frames = self._frames(frames)
        if len(frames) == 0:
            empty = {k: np.zeros(0, np.float32) for k in SCORE_NAMES}
            return ScoredMasks(masks=np.zeros(frames.shape[:3], np.uint8), **empty)
        with self._named(frames):
            prepared = self.predictor.prepare(frames)
        small, scores = self.predictor.predict_scored(prepared, uncertain_below)
        size = frames.shape[1:3]
        masks = np.stack([self.predictor.transform.restore_mask(m, size) for m in small])
        return ScoredMasks(masks=masks, **{k: scores[k] for k in SCORE_NAMES})
