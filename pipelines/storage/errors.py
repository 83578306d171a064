"""Storage failures, in three kinds: transient ones (S3 unreachable, throttling, timeouts) may
pass if the operation is tried again later; access refused (denied, credentials missing, expired
or wrong) is the job's configuration, not the object's fault, and passes once that is fixed;
everything else (a missing object, a bad local file) is permanent. Callers retry the first kind
(:mod:`pipelines.storage.retry`), defer the first two to a later run, and record only the last
as bad data: an object wrongly retried on the next run costs little, one wrongly recorded as
bad is lost.
"""

from __future__ import annotations

import errno
import os
import re

from pipelines.core.errors import TransientError, UserError


class StorageError(UserError):
    """A URI that cannot be used, or an object that is not where it was expected."""


class TransientStorageError(StorageError, TransientError):
    """Storage kept failing for a reason that may pass (outage, throttling, timeouts) until the
    retries ran out: the object itself may be fine, so try again later rather than record it as
    bad."""


class StorageAccessError(TransientStorageError):
    """Storage refused this job access to an object (access denied, credentials missing,
    expired or wrong). No wait within the run fixes it, so it is not retried; but the object
    may be fine and the same read succeeds once the job's credentials or the bucket's policy
    are fixed: callers defer it like an outage (exit 3), never record it as bad data."""


class ObjectTooLarge(StorageError):
    """An object over the size limit the caller set (permanent: retrying will not shrink it)."""


def _codes(*codes: str) -> frozenset[str]:
    return frozenset(code.replace("_", "").upper() for code in codes)


# S3 error codes that retrying cannot fix. Codes are compared without case or underscores, so
# one entry covers S3's own code (botocore, via s3fs: "NoSuchKey") and the AWS C++ SDK's name
# in pyarrow's messages ("AWS Error NO_SUCH_KEY during ..."); pyarrow says "UNKNOWN (HTTP status
# 403)" when the response had no body (HEAD), hence the bare statuses. Anything else from S3
# (NETWORK_CONNECTION, SLOW_DOWN, SERVICE_UNAVAILABLE, INTERNAL_FAILURE, REQUEST_TIMEOUT, 429,
# 500, 503, a 400 without a body, codes never seen before) is transient: an object wrongly
# retried on the next run costs little, one wrongly recorded as bad data is lost.
# Identity and permissions ("this job may not", not "this object is bad"): a configuration
# problem that no wait within the run fixes (StorageAccessError); a bare 403 is one too.
_ACCESS_S3 = _codes(
    "AccessDenied",
    "AccountProblem",
    "AllAccessDisabled",
    "ExpiredToken",
    "RequestTimeTooSkewed",
    "IncompleteSignature",
    "InvalidAccessKeyId",
    "InvalidClientTokenId",
    "InvalidSignature",
    "InvalidToken",
    "MissingAuthenticationToken",
    "SignatureDoesNotMatch",
    "UnrecognizedClient",
    "403",
)
_PERMANENT_S3 = _ACCESS_S3 | _codes(
    # nothing there
    "NoSuchBucket",
    "NoSuchKey",
    "NoSuchUpload",
    "NoSuchVersion",
    "ResourceNotFound",
    # archived (Glacier) objects, bad requests, unsupported features
    "InvalidObjectState",
    "ObjectNotInActiveTier",
    "InvalidArgument",
    "InvalidBucketName",
    "InvalidRange",
    "InvalidRequest",
    "KeyTooLongError",
    "MalformedQueryString",
    "MethodNotAllowed",
    "MissingParameter",
    "InvalidParameterValue",
    "InvalidParameterCombination",
    "Validation",
    "NotImplemented",
    "PreconditionFailed",
    "301",
    "404",
    "405",
    "412",
    "416",
    "501",
)
_PERMANENT_TYPES = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)
# Client-side botocore failures that are configuration, not the network; the first two are
# credentials (access).
_ACCESS_BOTOCORE = frozenset({"NoCredentialsError", "PartialCredentialsError"})
_PERMANENT_BOTOCORE = _ACCESS_BOTOCORE | {"ParamValidationError", "NoRegionError"}
_REMOTE_MODULES = ("botocore.", "aiobotocore.", "aiohttp.", "urllib3.", "s3fs.")
# Local errnos that say "not now" rather than "never" (a network filesystem, a signal).
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EINTR,
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
    }
)
_AWS_ERROR = re.compile(r"AWS Error (\w+)")
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")


def s3_codes(exc: BaseException) -> frozenset[str]:
    """The S3 error code and HTTP status that ``exc`` carries, normalized; empty when it is not
    an error answered by S3. s3fs raises builtin exceptions whose ``__cause__`` is botocore's
    ClientError (with the response); pyarrow raises OSError with the SDK's error name in the
    message."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code") or "UNKNOWN")
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return frozenset({code.replace("_", "").upper(), status} - {""})
    text = str(exc)
    match = _AWS_ERROR.search(text)
    if not match:
        return frozenset()
    codes = {match.group(1).replace("_", "").upper()}
    if status := _HTTP_STATUS.search(text):
        codes.add(status.group(1))
    return frozenset(codes)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass if the operation is tried again later.

    Transient: connection refused/reset, timeouts, throttling (SlowDown, 429, 503), S3 internal
    errors (500), curl failures in pyarrow, and any other error answered by S3 or raised by its
    client libraries. Permanent: missing objects, access denied, directories, our own
    :class:`StorageError` (except :class:`TransientStorageError`), credentials missing, and
    local-disk errors other than a few network-filesystem errnos.
    """
    if isinstance(exc, StorageError):
        return isinstance(exc, TransientStorageError) and not isinstance(exc, StorageAccessError)
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, InterruptedError, BlockingIOError)):
        return True
    if codes := s3_codes(exc):
        return not codes & _PERMANENT_S3
    if "curlCode" in str(exc):
        return True
    if type(exc).__module__.startswith(_REMOTE_MODULES):
        return type(exc).__name__ not in _PERMANENT_BOTOCORE
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def is_access_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is storage refusing this job access (S3's access and credential errors,
    a bare 403, credentials missing, a local permission error) rather than anything about the
    object."""
    if isinstance(exc, StorageAccessError | PermissionError):
        return True
    if codes := s3_codes(exc):
        return bool(codes & _ACCESS_S3)
    return type(exc).__name__ in _ACCESS_BOTOCORE


def redact_credentials(text: str) -> str:
    """``text`` without credentials: URL user-info and the values of the AWS key variables
    (error messages are printed and logged). Real keys are 16+ characters; shorter values
    (placeholders) are left alone rather than blanking every occurrence of a short string."""
    text = re.sub(r"//[^/@\s]+@", "//", text)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name, "")
        if len(value) >= 16:
            text = text.replace(value, "***")
    return text
