"""The one predictor: a model plus its frame transform, from uint8 frames to masks and
per-frame scores. Labeling's and evaluation's model actors (:mod:`pipelines.inference.actors`)
and the registered pyfunc model (:mod:`pipelines.registry.pyfunc`) are thin wrappers around it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.core.metrics import SCORE_NAMES
from pipelines.inference.model_dir import ModelSpec, load_model_dir, model_from_files


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FeatureNovelty:
    """How unlike the training data a frame is, read off the model's BatchNorm layers: their
    running statistics are the training data's per-channel feature mean and variance, so a
    frame whose own per-channel means sit many training standard deviations away is one the
    model never saw the like of (noise, a covered lens, a blown exposure). The softmax cannot
    tell: a trained model is surer of pure noise than of its training frames
    (tests/unit/test_confidence).

    Per frame: at each BatchNorm layer, the mean over channels of
    ``(frame mean - running_mean)^2 / (running_var + eps)``; then the median over layers (one
    odd layer does not decide; deep layers of a small input have a few pixels and swing
    more). Frames like the training data score under 0.1 in tests/unit/test_confidence, noise
    thousands. Models without BatchNorm (the VGG FCNs) have no score (NaN)."""

    STRIDE = 3

    def __init__(self, model: nn.Module) -> None:
        layers = [
            m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
        ]  # fmt: skip
        # One in STRIDE, spread over the depth (the first and then every STRIDE-th): the
        # median needs no more, and each one read costs a pass over that layer's input
        # (ResNet-101: 36 of 104; all the scores together cost 5% on CPU, bench_label_stages).
        self.layers = layers[:: self.STRIDE]
        self._scores: list[torch.Tensor] | None = None
        for layer in self.layers:
            layer.register_forward_pre_hook(self._hook)

    def _hook(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self._scores is not None:
            x = inputs[0]
            mean = x.mean(dim=tuple(range(2, x.ndim)), dtype=torch.float32)  # (N, C)
            z = (mean - layer.running_mean) ** 2 / (layer.running_var + layer.eps)
            self._scores.append(z.mean(1))

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Within it, each forward pass appends (N,) per BatchNorm layer to the list."""
        self._scores = scores = []
        try:
            yield scores
        finally:
            self._scores = None

    @staticmethod
    def combine(scores: list[torch.Tensor], n: int) -> torch.Tensor:
        """(N,) novelty from one forward pass's per-layer scores (NaN without layers)."""
        if not scores:
            return torch.full((n,), torch.nan)
        return torch.stack(scores).quantile(0.5, dim=0)  # .median() takes the lower of two


class Predictor:
    """Frames in, masks out. On GPU it runs bf16 autocast and channels_last."""

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        device: torch.device | str | None = None,
        *,
        amp: bool | None = None,
        max_batch: int = 8,
    ) -> None:
        self.spec = spec
        self.transform = spec.transform
        self.device = torch.device(device) if device is not None else default_device()
        self.amp = self.device.type == "cuda" if amp is None else amp
        self.max_batch = max_batch
        self.model = model.eval().to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.novelty = FeatureNovelty(self.model)

    @classmethod
    def load(
        cls, directory: str | Path, device: torch.device | str | None = None, **kw
    ) -> Predictor:
        model, spec = load_model_dir(directory)
        return cls(model, spec, device, **kw)

    @classmethod
    def from_files(
        cls, files: dict[str, bytes], device: torch.device | str | None = None, **kw
    ) -> Predictor:
        """From a model directory's files as bytes (e.g. verified by the job's driver and
        shared through Ray's object store)."""
        model, spec = model_from_files(files)
        return cls(model, spec, device, **kw)

    def autocast(self) -> torch.autocast:
        """bf16 autocast on a GPU (``amp``), off on the CPU."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """(N, h, w, 3) uint8 tensor at the model's input size -> the normalized (N, 3, h, w)
        model input on this predictor's device (channels_last on a GPU)."""
        x = self.transform.normalize(images.to(self.device, non_blocking=True))
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, h, w, 3) uint8 tensor at the model's input size -> (N, C, h, w) float logits."""
        with self.autocast():
            return self.model(self.inputs(images)).float()

    def batches(self, images: np.ndarray | torch.Tensor, labels: np.ndarray) -> Iterator[dict]:
        """Prepared frames and their (N, h, w) training-id labels as evaluation batches
        (:func:`pipelines.inference.evaluate.evaluate`) of at most ``max_batch`` frames."""
        start = 0
        for chunk in self._chunks(images):
            label = np.asarray(labels[start : start + len(chunk)])
            start += len(chunk)
            yield {"image": self.inputs(chunk), "label": torch.from_numpy(label.astype(np.int64))}

    def _chunks(self, images: np.ndarray | torch.Tensor):
        want = (self.transform.height, self.transform.width)
        if not isinstance(images, torch.Tensor):
            images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:3]) != want or images.shape[3] != 3:
            raise ValueError(
                f"expected prepared frames of shape (N, {want[0]}, {want[1]}, 3), "
                f"got {tuple(images.shape)}"
            )
        for i in range(0, len(images), self.max_batch):
            chunk = images[i : i + self.max_batch]
            if isinstance(chunk, torch.Tensor):  # already on the device (decoded there)
                yield chunk
            else:  # writable and contiguous (Ray hands out read-only views; torch warns)
                yield torch.from_numpy(np.require(chunk, requirements="CW"))

    def prepare_encoded(
        self, datas: Sequence[bytes], *, prepared: bool = False
    ) -> tuple[torch.Tensor, list[str]]:
        """JPEG bytes -> (N, h, w, 3) uint8 model inputs on this predictor's device, decoded
        and resized there (:mod:`pipelines.inference.device_frames`), and a reason per frame
        that could not be ("" for none; its input is zeros). ``prepared``: the JPEGs are
        model inputs already (ingested shards): decoded only."""
        from pipelines.inference.device_frames import decode_jpegs, prepare_frames

        want = (self.transform.height, self.transform.width)
        decoded = decode_jpegs(datas, self.device)
        errors = [d if isinstance(d, str) else "" for d in decoded]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        out = torch.zeros((len(datas), *want, 3), dtype=torch.uint8, device=self.device)
        if not good:
            return out, errors
        if prepared:
            for i in good:
                if tuple(decoded[i].shape[1:]) != want:
                    errors[i] = f"shard image is {tuple(decoded[i].shape[1:])}, expected {want}"
                else:
                    out[i] = decoded[i].permute(1, 2, 0)
            return out, errors
        x, why = prepare_frames([decoded[i] for i in good], self.transform)
        out[good] = x
        for i, e in zip(good, why, strict=True):
            errors[i] = e
        return out, errors

    def predict_prepared(self, images: np.ndarray) -> np.ndarray:
        """(N, h, w, 3) uint8 frames already at the model's input size (e.g. ingested shards)
        -> (N, h, w) uint8 training-id masks."""
        out = [self.logits(c).argmax(1).to(torch.uint8).cpu().numpy() for c in self._chunks(images)]
        want = (self.transform.height, self.transform.width)
        return np.concatenate(out) if out else np.zeros((0, *want), dtype=np.uint8)

    def predict_scored(
        self, images: np.ndarray, uncertain_below: float = 0.5
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """:meth:`predict_prepared` plus, per frame, how sure the model is (at the model's
        input size, from the softmax's largest probability ``p`` at each pixel):

        - ``confidence``: mean ``p`` over the pixels predicted as a lane class (not class 0);
          NaN where no pixel is;
        - ``pixel_confidence``: mean ``p`` over all pixels;
        - ``uncertain_fraction``: share of pixels with ``p < uncertain_below``;
        - ``novelty``: how unlike the training data the frame is (:class:`FeatureNovelty`).
        """
        masks, stats = [], []
        for chunk in self._chunks(images):
            with self.novelty.recording() as layers:
                logits = self.logits(chunk)
            p, pred = logits.softmax(1).max(1)  # (N, h, w) each
            lane = (pred > 0).float()
            lanes = lane.sum((1, 2))
            lane_p = (p * lane).sum((1, 2)) / lanes.clamp(min=1)
            per_frame = {
                "confidence": torch.where(lanes > 0, lane_p, torch.nan),
                "pixel_confidence": p.mean((1, 2)),
                "uncertain_fraction": (p < uncertain_below).float().mean((1, 2)),
                "novelty": FeatureNovelty.combine(layers, len(chunk)).to(p.device),
            }
            # One (scores, N) block and the masks per chunk: two copies to the host, not five.
            stats.append(torch.stack([per_frame[k] for k in SCORE_NAMES]).float().cpu())
            masks.append(pred.to(torch.uint8).cpu().numpy())
        want = (self.transform.height, self.transform.width)
        if not masks:
            return np.zeros((0, *want), np.uint8), {k: np.zeros(0, np.float32) for k in SCORE_NAMES}
        table = torch.cat(stats, dim=1).numpy()
        return np.concatenate(masks), {k: table[j] for j, k in enumerate(SCORE_NAMES)}

    def prepare(self, frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Raw (H, W, 3) uint8 frames -> (N, h, w, 3) at the model's input size."""
        return np.stack([self.transform.prepare_image(np.asarray(f)) for f in frames])

    def predict(self, frames: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Raw frames of any size -> one (H, W) uint8 training-id mask per frame, at that
        frame's size (cropped rows are background)."""
        if len(frames) == 0:
            return []
        masks = self.predict_prepared(self.prepare(frames))
        return [
            self.transform.restore_mask(m, np.asarray(f).shape[:2])
            for m, f in zip(masks, frames, strict=True)
        ]
