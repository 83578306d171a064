"""Ray Data datasets over the ingested shards, for training, evaluation and promotion.

Decoding (JPEG/PNG) and augmentation run in Ray Data tasks, spread over the cluster's CPUs, never
in the training loop. Batches cross the object store as uint8; normalization to float happens on
the training device in :func:`torch_batches` (4x less data to move than float32).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipelines.augment import Augment, decode_batch
from pipelines.errors import UserError
from pipelines.frames import FrameTransform
from pipelines.versions import resolve_dataset


class DataError(UserError):
    """A dataset location that holds no usable shards."""


def shard_files(data_uri: str, split: str) -> list[str]:
    """The shard files of one split of a dataset version. Jobs pass the version folder they
    resolved once at start; a dataset root resolves to its current version here."""
    loc = resolve_dataset(data_uri).location.join(split)
    return [i.path for i in loc.list_files((".parquet",))]


def read_shards(
    data_uri: str, split: str, columns: list[str] | None = None, *, shuffle_seed: int | None = None
):
    """The raw rows of one split (``train``/``val``) as a Ray dataset, or a clear error.

    ``shuffle_seed``: read the shard files in a random order, a new one on every pass over
    the data (Ray Data reseeds with the execution index), from this seed."""
    from ray.data import FileShuffleConfig

    loc = resolve_dataset(data_uri).location.join(split)
    files = [i.path for i in loc.list_files((".parquet",))]
    if not files:
        raise DataError(
            f"{loc.uri}: no Parquet shards (expected *.parquet written by `python -m jobs.ingest`)"
        )
    shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed)
    # One read task (one block) per shard file: ingest sizes the files (~256 MB), and Ray's own
    # estimate merges small files into one block, which streaming_split then hands whole to a
    # single worker.
    return read_parquet_files(
        files, filesystem=loc.fs, columns=columns, shuffle=shuffle, override_num_blocks=len(files)
    )


def read_parquet_files(files: list[str], **kwargs):
    """``ray.data.read_parquet`` of an explicit list of files, with Ray Data's V1 Parquet
    datasource. The V2 one (Ray 2.60's default) adds a listing stage of its own tasks that
    costs ~5 s on every execution (every epoch's pass, every evaluation) even for one small
    local file, against ~0.1 s (benchmarks/bench_read_parquet.py); the list is already
    known here, so there is nothing to list. The choice is made when the dataset is created."""
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(files, **kwargs)
    finally:
        ctx.use_datasource_v2 = before


def build_dataset(
    data_uri: str, split: str, augment: Augment | None = None, *, shuffle_seed: int | None = None
):
    """Decoded (and, for training, augmented) frames of one split, streamed by Ray Data;
    with ``shuffle_seed``, the shard files in a new random order on every pass."""
    columns = ["image_id", "image", "label"]
    return read_shards(data_uri, split, columns, shuffle_seed=shuffle_seed).map_batches(
        decode_batch, batch_size=16, batch_format="numpy", fn_kwargs={"augment": augment}
    )


class NormalizeCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate: uint8 numpy batch -> normalized float NCHW image and
    int64 NHW label on ``device``."""

    def __init__(self, transform: FrameTransform, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.transform = transform
        self.device = torch.device(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        cuda = self.device.type == "cuda"
        # Ray hands out read-only arrays; np.require copies only those (torch warns on them).
        image = torch.from_numpy(np.require(batch["image"], requirements="CW"))
        label = torch.from_numpy(np.require(batch["label"], requirements="CW"))
        if cuda:
            # Ray calls this in its prefetch threads: pinning here, then an asynchronous copy,
            # keeps the host-to-device transfer off the training step (a copy from pageable
            # memory would block the step that waits for it).
            image, label = image.pin_memory(), label.pin_memory()
        image = image.to(self.device, non_blocking=cuda)
        label = label.to(self.device, non_blocking=cuda)
        out = {"image": self.transform.normalize(image), "label": label.long()}
        if "image_id" in batch:
            out["image_id"] = [str(i) for i in batch["image_id"]]
        return out


def torch_batches(
    ds,
    batch_size: int,
    transform: FrameTransform,
    device: torch.device | str = "cpu",
    *,
    drop_last: bool = False,
    prefetch_batches: int = 2,
    shuffle_buffer: int = 0,
    shuffle_seed: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a Ray dataset or a Ray Train dataset shard as torch tensors.

    ``shuffle_buffer`` > 0: each batch is drawn at random from a buffer of that many frames
    (Ray Data's local shuffle, seeded by ``shuffle_seed``), so a batch mixes the blocks that
    stream in instead of taking consecutive frames of one drive."""
    return ds.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=NormalizeCollate(transform, device),
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=shuffle_seed if shuffle_buffer else None,
    )


def split_config(train: str = "train", evaluate: tuple[str, ...] = ("val",)):
    """A Ray Train ``DataConfig``: the training set is split *equally* (every rank must take the
    same number of DDP steps, or the all-reduce hangs), evaluation sets are split *exactly*
    (``equal=False``) so every validation row is scored once, none dropped, none twice."""
    from ray.train import DataConfig

    class _Config(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k not in evaluate}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            for name in evaluate:
                if name not in datasets:
                    continue
                ds = datasets[name]
                if ds.name is None:
                    ds.set_name(name)
                for i, it in enumerate(ds.streaming_split(world_size, equal=False)):
                    out[i][name] = it
            return out

    return _Config(datasets_to_split=[train])
