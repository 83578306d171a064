"""Rank 0's MLflow record of a training run: per-epoch metrics and pictures sent from a
background thread that rides out tracking-server outages (:class:`EpochLogger`), and the node's
system metrics (:class:`SystemMetrics`). Neither may ever fail or stall training.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import torch

from pipelines import compat
from pipelines.core.frames import FrameTransform
from pipelines.runtime import tracking

log = logging.getLogger(__name__)


def epoch_pictures(epoch: int, conf: torch.Tensor, samples) -> dict[str, bytes]:
    """The epoch's pictures for MLflow, by image key (logged at step ``epoch``): the confusion
    matrix and, with ``samples`` ((frame, prediction) pairs), their overlays."""
    from pipelines.core.pictures import confusion_png, grid, overlay, png

    pictures = {"confusion": confusion_png(conf.cpu().numpy())}
    if samples:
        tiles = grid([overlay(img, m) for img, m in samples], columns=2, width=512)
        pictures["overlays"] = png(tiles)
    return pictures


def overlay_samples(images, pred, transform: FrameTransform, n: int) -> list:
    """Up to ``n`` (frame, prediction) pairs of a normalized batch, as uint8 numpy for
    pictures."""
    mean = torch.tensor(transform.mean, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(transform.std, device=images.device).view(1, 3, 1, 1) * 255
    raw = (images[:n].float() * std + mean).clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    return [(img, m) for img, m in zip(raw, pred[:n].byte().cpu().numpy(), strict=True)]


class SystemMetrics:
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network,
    and ``system/gpu_*`` where NVML is there) of this node, sampled into the run every
    ``interval_s``. MLflow's monitor thread stops for good when a call to the tracking server
    fails; :meth:`keep_alive` (called every epoch) starts a new one that continues the steps,
    so a server restart costs a gap, not the rest of the run. Never raises: monitoring must
    not end training."""

    def __init__(self, tracking_uri: str, run_id: str, interval_s: float) -> None:
        self.tracking_uri, self.run_id, self.interval_s = tracking_uri, run_id, interval_s
        self.monitor = None
        self.starts = 0
        self.keep_alive()

    def keep_alive(self) -> None:
        if self.monitor is not None and compat.system_metrics_alive(self.monitor):
            return
        try:
            self.monitor = compat.start_system_metrics(
                self.run_id, self.interval_s, self.tracking_uri
            )
            self.starts += 1
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow system metrics not recorded (%s: %s)", type(e).__name__, e)
            self.monitor = None

    def close(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow system metrics: %s", e)


def _brief(e: Exception) -> str:
    """``Type: first line of the message`` (at most 200 characters) for a log line."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


class EpochLogger:
    """Rank 0's per-epoch MLflow record (metrics by step, the confusion matrix, overlays),
    sent by a background thread so that the tracking server's state never fails or stalls
    training: a call that fails is retried with backoff until it goes through, in order, and
    what waits meanwhile is kept in memory (a few pictures and numbers an epoch). ``close``
    waits for the backlog, up to ``flush_s``, and reports what could not be sent."""

    def __init__(self, tracking_uri: str, run_id: str, flush_s: float = 600.0) -> None:
        from mlflow import MlflowClient

        # One short try per call here; this thread's own backoff does the waiting (MLflow's
        # default retries would hold each call for minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.run_id = run_id
        self.flush_s = flush_s
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._send_all, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log_epoch(self, epoch: int, metrics: dict, pictures: dict[str, bytes]) -> None:
        """The epoch's metrics and pictures (by image key), both at step ``epoch``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]
        self._put(f"epoch {epoch} metrics", self.client.log_batch, self.run_id, metrics=values)
        for key, data in pictures.items():
            self._put(f"epoch {epoch} {key} image", self._log_image, key, epoch, data)

    def catch_up(self, epoch: int, metrics: dict, pictures: dict[str, bytes]) -> None:
        """Send what of an epoch's record the run lacks (a resumed run's last checkpoint:
        the worker sending it may have died before it was through). What is there already
        is left alone: nothing is recorded twice."""

        def send_missing() -> None:
            from mlflow.entities import Metric

            history = self.client.get_metric_history(self.run_id, "val_miou")
            if metrics and epoch not in {m.step for m in history}:
                now = int(time.time() * 1000)
                values = [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
                self.client.log_batch(self.run_id, metrics=values)
                log.info("MLflow: epoch %d metrics re-sent from its checkpoint", epoch)
            for key, data in pictures.items():
                if self._log_image(key, epoch, data):
                    log.info("MLflow: epoch %d %s image re-sent from its checkpoint", epoch, key)

        self._put(f"epoch {epoch} record (catching up)", send_missing)

    def _log_image(self, key: str, step: int, data: bytes) -> bool:
        """Log a PNG as MLflow image ``key`` at ``step`` (the run page's image slider), unless
        the run has it already: a retry after a call that failed halfway, or a resumed run's
        catch-up, never logs it twice. True when it was sent."""
        import io

        from PIL import Image

        if step in tracking.image_steps(self.client, self.run_id, key):
            return False
        try:
            for path in tracking.remove_partial_images(self.client, self.run_id, key, step):
                log.info("MLflow: removed %s, the half of an image a cut-short send left", path)
        except Exception as e:  # noqa: BLE001 - a store that refuses deletes must not stop the image
            log.warning("MLflow: could not remove the half of image %s step %d a cut-short send "
                        "left (%s); sending the image anyway", key, step, _brief(e))  # fmt: skip
        self.client.log_image(
            self.run_id, Image.open(io.BytesIO(data)), key=key, step=step, synchronous=True
        )
        return True

    def _put(self, what: str, call, *args, **kwargs) -> None:
        self._queue.put((what, call, args, kwargs))

    def _send_all(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            what, call, args, kwargs = item
            delay = 1.0
            while True:
                try:
                    call(*args, **kwargs)
                    break
                except Exception as e:  # noqa: BLE001 - the server's state must not end training
                    log.warning("MLflow: %s not recorded yet (%s); retrying in %.0f s",
                                what, _brief(e), delay)  # fmt: skip
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)  # a server back is used within 10 s
            self._queue.task_done()

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def close(self) -> None:
        """Wait for the backlog (up to ``flush_s``); what is still unsent is named in the log
        (the epoch's metrics are in its checkpoint's metrics.json too)."""
        deadline = time.monotonic() + self.flush_s
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.pending():
            log.error("MLflow: %d records of this run could not be sent in %.0f s; they are "
                      "lost from the run (each epoch's metrics stay in its checkpoint)",
                      self.pending(), self.flush_s)  # fmt: skip
        self._queue.put(None)
