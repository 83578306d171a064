"""Where data lives: the one resolver for local paths, ``file://`` and ``s3://`` URIs
(:mod:`~pipelines.storage.location`), the S3 filesystems (:mod:`~pipelines.storage.s3`),
transient, access-refused or permanent failures and bounded retries (:mod:`~pipelines.storage.errors`,
:mod:`~pipelines.storage.retry`), conditional writes (:mod:`~pipelines.storage.conditional`)
and the lease overlapping jobs share an output with (:mod:`~pipelines.storage.lease`).

May import pyarrow, fsspec/s3fs and :mod:`pipelines.core`; never PyTorch, Ray or MLflow.
"""

from pipelines.storage.errors import (
    ObjectTooLarge,
    StorageAccessError,
    StorageError,
    TransientStorageError,
    is_transient,
)
from pipelines.storage.location import Location, resolve
from pipelines.storage.retry import DEFAULT_RETRY, Retry

__all__ = [
    "DEFAULT_RETRY",
    "Location",
    "ObjectTooLarge",
    "Retry",
    "StorageAccessError",
    "StorageError",
    "TransientStorageError",
    "is_transient",
    "resolve",
]
