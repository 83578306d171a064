"""The S3 filesystems, configured from the standard AWS settings: the credential chain
(environment, shared config/credentials files, instance or pod identity), the endpoint override
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, a local S3 server) and region
``AWS_REGION`` / ``AWS_DEFAULT_REGION``. Credentials are never put in URIs, printed or logged.

pyarrow's filesystem is what Ray Data and Ray Train are given, explicitly: pyarrow ignores the
``AWS_ENDPOINT_URL*`` variables and would otherwise go to AWS.
"""

from __future__ import annotations

import os
from functools import cache

import pyarrow.fs as pafs


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the standard AWS variables, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


# The AWS SDK's own attempts per request for long-running writers (Location.patient_fs):
# with its exponential backoff they span a short outage or a burst of throttling.
PATIENT_SDK_ATTEMPTS = 12


class _PatientS3FileSystem(pafs.S3FileSystem):
    """An S3FileSystem with a retry strategy that survives pickling: pyarrow's own pickle
    drops ``retry_strategy`` (measured: an unpickled copy on a Ray worker failed an upload
    in 2.6 s of a 10 s outage that the original rode out), so it is rebuilt from its
    arguments."""

    def __init__(self, rebuild: tuple, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rebuild = rebuild  # s3_pyarrow's arguments

    def __reduce__(self):
        return s3_pyarrow, self._rebuild


@cache
def s3_pyarrow(endpoint: str | None, region: str, sdk_attempts: int = 0) -> pafs.S3FileSystem:
    # Keys are left to the AWS SDK's default chain; only where to go is passed explicitly.
    kwargs: dict = {"region": region}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        # A local endpoint (MinIO, moto) has no virtual-host bucket DNS.
        kwargs["force_virtual_addressing"] = False
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    if sdk_attempts:
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=sdk_attempts)
        return _PatientS3FileSystem((endpoint, region, sdk_attempts), **kwargs)
    return pafs.S3FileSystem(**kwargs)


@cache
def s3_fsspec(endpoint: str | None, region: str):
    import s3fs

    client_kwargs = {"region_name": region}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False)


@cache
def s3_fsspec_single_try(endpoint: str | None, region: str):
    """s3fs for conditional requests, with botocore's and s3fs's own retries off. Their retries
    are invisible: a put that was applied but whose answer was lost is sent again and gets 412,
    and the caller would be told "not created" for its own object. Our retry loop sees every
    try, so it can tell (:mod:`pipelines.storage.conditional`)."""
    import s3fs

    client_kwargs = {"region_name": region}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    fs = s3fs.S3FileSystem(
        client_kwargs=client_kwargs,
        config_kwargs={"retries": {"total_max_attempts": 1}},
        use_listings_cache=False,
        skip_instance_cache=True,
    )
    fs.retries = 1  # s3fs's own loop around botocore (5 by default)
    return fs
