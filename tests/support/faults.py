"""Fault injection for storage tests: a real S3 endpoint (tests/support/s3_outage_server.py, moto in
its own process on 127.0.0.1) that can go away for a while, refusing every connection.

Usage (in a test module: ``from tests.support.faults import outage_server``)::

    with outage_server(outage_after_gets=1, outage_seconds=3) as srv:
        key = srv.location("s3://lanes/run/frame.png")  # a Location bound to this server
        key.write_bytes(b"...")
        key.read_bytes()          # the 1st object GET: the outage starts once it is answered
        srv.wait_outage_start()   # from now on for 3 s every request is refused
        ...
        srv.trigger()             # another outage now (SIGUSR1)
        srv.wait_outage_start(2)  # the 2nd outage has started
        srv.wait_outage_end(2)

As a fixture, in the test module that uses it (no conftest change needed)::

    @pytest.fixture
    def s3_outage():
        with outage_server(outage_seconds=5) as srv:
            yield srv

API:

- ``outage_server(*, outage_after_gets=0, outage_seconds=3.0, buckets=("lanes",),
  conditional_writes=True, timeout=60.0)``: a context manager that starts the server on a free
  port, creates ``buckets``, waits until it answers and yields an :class:`OutageServer`; it
  always stops the server (SIGTERM, then SIGKILL), even when the test fails.
  ``outage_after_gets=K``: an outage starts after the K-th object GET has been answered (0:
  never); ``outage_seconds``: how long every outage lasts; ``conditional_writes=False``:
  PUT/DELETE with If-Match/If-None-Match are answered 501 NotImplemented, like older
  MinIO/Ceph. Conditional writes are atomic, as on S3 (moto alone checks, then writes).
  ``deny``: key suffixes whose reads (GET, HEAD) are answered 403 AccessDenied.
- :func:`start_outage_server` (same arguments) returns the server without the ``with``; call
  ``stop()`` yourself.
- :class:`OutageServer`: ``endpoint`` (``http://127.0.0.1:PORT``), ``port``,
  ``outage_seconds``; ``location(uri)``: ``pipelines.storage.resolve(uri)`` pointed at this
  server (the environment's ``AWS_ENDPOINT_URL_S3`` is left alone); ``trigger()``: start an
  outage now (ignored while one is on); ``wait_outage_start(n=1, timeout=30)`` /
  ``wait_outage_end(n=1, timeout=30)``: wait until the n-th outage has started / ended and
  return ``time.monotonic()`` when this process saw it (the listener closes just before the
  start line is printed, so a request sent after ``wait_outage_start`` returns is refused);
  ``sync()``: wait until the server's lines about every request made so far have been read
  (call it before looking at ``gets``); ``gets``: object GETs seen so far;
  ``wait_write(fragment, timeout=60, after=0)``: wait for a PUT/POST of an object whose path
  contains ``fragment``, in ``lines[after:]`` (to start an outage in the middle of an upload);
  ``lose_next_answer()``: the next PUT/DELETE of an object is applied but answered 500 (an
  answer lost after the write); ``outages_started``/``outages_ended``: counts; ``lines``:
  everything the server printed; ``stop()``: idempotent.

Clients need credentials in the environment (any value: moto does not check them);
tests/conftest.py sets fake ones.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from pipelines.storage import Location, resolve

SERVER_SCRIPT = Path(__file__).resolve().with_name("s3_outage_server.py")


class OutageServer:
    """A running tests/support/s3_outage_server.py process; see the module docstring."""

    def __init__(self, proc: subprocess.Popen, stderr_path: Path, outage_seconds: float):
        self.proc = proc
        self.outage_seconds = outage_seconds
        self.port = 0
        self.lines: list[str] = []
        self.gets = 0
        self._times: dict[str, list[float]] = {"ready": [], "outage start": [], "outage end": []}
        self._stderr_path = stderr_path
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._follow, daemon=True)
        self._reader.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def location(self, uri: str) -> Location:
        loc = resolve(uri)
        if loc.scheme != "s3":
            raise ValueError(f"{uri!r} is not an s3:// URI")
        return replace(loc, endpoint=self.endpoint)

    @property
    def outages_started(self) -> int:
        return len(self._times["outage start"])

    @property
    def outages_ended(self) -> int:
        return len(self._times["outage end"])

    def trigger(self) -> None:
        """Start an outage now (SIGUSR1)."""
        self.proc.send_signal(signal.SIGUSR1)

    def lose_next_answer(self, timeout: float = 30.0) -> None:
        """Arm the server (SIGUSR2): the next PUT/DELETE of an object is applied, then
        answered 500 InternalError. Returns once the server has confirmed."""
        armed = self._count("armed")
        self.proc.send_signal(signal.SIGUSR2)
        self._wait_line(lambda: self._count("armed") > armed, "armed", timeout)

    def sync(self, timeout: float = 30.0) -> None:
        """Wait until the lines the server printed for every request made before this call
        have been read here (the server prints them before answering)."""
        token = uuid.uuid4().hex
        self._request("GET", f"/__outage_server__/sync/{token}", timeout)
        self._wait_line(lambda: f"sync {token}" in self.lines, f"sync {token}", timeout)

    def wait_write(self, fragment: str, timeout: float = 60.0, after: int = 0) -> str:
        """Wait for a PUT/POST of an object whose path contains ``fragment``, among the lines
        from index ``after`` on (``len(srv.lines)`` before the action: only new writes);
        returns its line."""

        def found() -> str | None:
            return next(
                (ln for ln in self.lines[after:] if ln.startswith("write ") and fragment in ln),
                None,
            )

        self._wait_line(lambda: found() is not None, f"write of {fragment}", timeout)
        return found()

    def wait_outage_start(self, n: int = 1, timeout: float = 30.0) -> float:
        return self._wait("outage start", n, timeout)

    def wait_outage_end(self, n: int = 1, timeout: float = 30.0) -> float:
        return self._wait("outage end", n, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self._stderr_path.unlink(missing_ok=True)

    # -- internals ------------------------------------------------------------------------------
    def _follow(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.strip()
            seen = time.monotonic()
            with self._changed:
                self.lines.append(line)
                if line.startswith("ready port="):
                    self.port = int(line.split("=", 1)[1])
                    self._times["ready"].append(seen)
                elif line.startswith("get n="):
                    self.gets += 1
                elif line in self._times:
                    self._times[line].append(seen)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _wait(self, event: str, n: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._times[event]) < n:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise TimeoutError(
                        f"outage server: no {event!r} #{n} after {timeout}s; {self._diagnostics()}"
                    )
                self._changed.wait(min(left, 0.2))
            return self._times[event][n - 1]

    def _count(self, line: str) -> int:
        with self._changed:
            return self.lines.count(line)

    def _wait_line(self, done, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"outage server: no {what!r}; {self._diagnostics()}")
                self._changed.wait(min(left, 0.2))

    def _request(self, method: str, path: str, timeout: float) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def _diagnostics(self) -> str:
        status = self.proc.poll()
        stderr = (
            self._stderr_path.read_text(errors="replace")[-2000:]
            if self._stderr_path.exists()
            else ""
        )
        return f"exit status {status}, stdout {self.lines[-10:]}, stderr tail {stderr!r}"

    def _create_bucket(self, bucket: str, timeout: float) -> None:
        # Unsigned path-style PUT: moto does not check signatures, and no client library or
        # credentials are needed. Retried: the first request also loads moto's S3 backend.
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self._request("PUT", f"/{bucket}", 10)
                if status == 200:
                    return
                problem = f"HTTP {status}"
            except OSError as e:
                problem = repr(e)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"outage server: bucket {bucket!r} not created ({problem}); "
                    f"{self._diagnostics()}"
                )
            time.sleep(0.1)


def start_outage_server(
    *,
    outage_after_gets: int = 0,
    outage_seconds: float = 3.0,
    buckets: Sequence[str] = ("lanes",),
    conditional_writes: bool = True,
    timeout: float = 60.0,
    deny: Sequence[str] = (),
) -> OutageServer:
    """Start tests/support/s3_outage_server.py on a free port, create ``buckets``, wait until it
    answers; reads of keys ending in one of ``deny`` are answered 403 AccessDenied. The caller
    must ``stop()`` it; prefer :func:`outage_server`."""
    cmd = [
        sys.executable,
        str(SERVER_SCRIPT),
        "--port",
        "0",  # the server binds a free port itself and reports it: no race for the port
        "--outage-after-gets",
        str(outage_after_gets),
        "--outage-seconds",
        str(outage_seconds),
    ]
    if not conditional_writes:
        cmd.append("--no-conditional-writes")
    for suffix in deny:
        cmd += ["--deny", suffix]
    fd, stderr_name = tempfile.mkstemp(prefix="s3-outage-server-", suffix=".log")
    with os.fdopen(fd, "wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1)
    server = OutageServer(proc, Path(stderr_name), outage_seconds)
    try:
        server._wait("ready", 1, timeout)
        for bucket in buckets:
            server._create_bucket(bucket, timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def outage_server(
    *,
    outage_after_gets: int = 0,
    outage_seconds: float = 3.0,
    buckets: Sequence[str] = ("lanes",),
    conditional_writes: bool = True,
    timeout: float = 60.0,
    deny: Sequence[str] = (),
) -> Iterator[OutageServer]:
    """:func:`start_outage_server` for the duration of a ``with``; always stopped."""
    server = start_outage_server(
        outage_after_gets=outage_after_gets,
        outage_seconds=outage_seconds,
        buckets=buckets,
        conditional_writes=conditional_writes,
        timeout=timeout,
        deny=deny,
    )
    try:
        yield server
    finally:
        server.stop()
