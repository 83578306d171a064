"""A real S3 endpoint that goes away: moto's S3 on 127.0.0.1 whose listener is closed for a
while (connection refused), with its objects kept across the outage.

Run as its own process (tests/support/faults.py starts and stops it)::

    python tests/s3_outage_server.py --port P [--outage-after-gets K --outage-seconds S]
                                     [--no-conditional-writes] [--deny SUFFIX ...]

- ``--port 0`` lets the system pick a free port (reported on the ``ready`` line).
- An outage starts after the K-th GET of an object (``/bucket/key``; listings and HEADs do not
  count; K=0, the default, disables this) has been answered, or on SIGUSR1. It lasts S
  seconds; a trigger during an outage is ignored.
- ``--no-conditional-writes`` emulates an older store (MinIO, Ceph): PUT/DELETE carrying
  ``If-Match``/``If-None-Match`` are answered 501 NotImplemented.
- ``--deny SUFFIX`` (repeatable): object GETs and HEADs of keys ending in SUFFIX are answered
  403 AccessDenied, as S3 answers a job whose role may not read them (a HEAD without a body).
- SIGUSR2: the next PUT/DELETE of an object is applied, then answered 500 InternalError (an
  answer lost after the write was made).
- ``GET /__outage_server__/sync/TOKEN`` prints ``sync TOKEN``: every line about an earlier
  request comes before it.
- SIGTERM/SIGINT: clean exit (status 0).

Responses are HTTP/1.0 (one request per connection): with keep-alive, clients would keep
talking over pooled connections accepted before the outage, and the outage would not refuse
every request.

Lines on stdout (flushed), for the parent to follow::

    ready port=P
    get n=N /bucket/key        (each object GET, counted from 1)
    write METHOD /bucket/key   (each object PUT/POST, before it is applied)
    armed                      (SIGUSR2 received)
    lost answer METHOD /bucket/key
    denied METHOD /bucket/key
    sync TOKEN
    outage start
    outage end
    stopped
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

_STOP = "stop"
_OUTAGE = "outage"
_ARM = "arm"
_SYNC = "/__outage_server__/sync/"


def _s3_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>outage-server</RequestId></Error>"
    ).encode()


_NOT_IMPLEMENTED = _s3_error(
    "NotImplemented", "A header you provided implies functionality that is not implemented"
)
_INTERNAL_ERROR = _s3_error("InternalError", "We encountered an internal error. Please try again.")
_ACCESS_DENIED = _s3_error("AccessDenied", "Access Denied")


def say(line: str) -> None:
    print(line, flush=True)


class Handler(MotoRequestHandler):
    # Set on the class itself: werkzeug switches threaded servers to HTTP/1.1 otherwise.
    # (werkzeug 3.1 answers "Connection: close" even then; HTTP/1.0 makes it a promise.)
    protocol_version = "HTTP/1.0"

    def log_request(self, *args, **kwargs) -> None:  # one line per request is noise here
        pass


class _ThenCall:
    """A WSGI response that calls ``callback`` once the server has sent it and closed it."""

    def __init__(self, response: Iterable[bytes], callback: Callable[[], None]):
        self._response = response
        self._callback = callback

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._response)

    def close(self) -> None:
        try:
            if hasattr(self._response, "close"):
                self._response.close()
        finally:
            self._callback()


def _reply(start_response, status: str, body: bytes, content_type: str = "application/xml"):
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def _complete(app, environ, start_response) -> list[bytes]:
    """Run ``app`` to the end, body included."""
    response = app(environ, start_response)
    try:
        return list(response)
    finally:
        if hasattr(response, "close"):
            response.close()


def faulty(
    app,
    events: queue.SimpleQueue,
    outage_after_gets: int,
    conditional_writes: bool,
    lose_next_answer: threading.Event,
    deny: tuple[str, ...] = (),
):
    """WSGI middleware: counts object GETs (starting the outage after the K-th has been sent),
    refuses conditional writes like a store without them (optional), loses the answer to the
    next object PUT/DELETE when armed, denies reads of the keys ending in ``deny``."""
    lock = threading.Lock()
    # moto 5.2.5 checks If-Match/If-None-Match, then writes, without a lock: two racing
    # conditional writes could both pass. S3 makes them atomic; so does this lock.
    conditional_lock = threading.Lock()
    gets = 0

    def wrapped(environ, start_response):
        nonlocal gets
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        if path.startswith(_SYNC):
            say(f"sync {path[len(_SYNC) :]}")
            return _reply(start_response, "200 OK", b"ok", "text/plain")
        is_object = len([p for p in path.split("/") if p]) >= 2
        conditional = method in ("PUT", "DELETE") and (
            "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ
        )
        if deny and method in ("GET", "HEAD") and is_object and path.endswith(deny):
            say(f"denied {method} {path}")
            if method == "HEAD":
                start_response("403 Forbidden", [("Content-Length", "0")])
                return [b""]
            return _reply(start_response, "403 Forbidden", _ACCESS_DENIED)
        if conditional and not conditional_writes:
            return _reply(start_response, "501 Not Implemented", _NOT_IMPLEMENTED)
        if method in ("PUT", "DELETE") and is_object and lose_next_answer.is_set():
            lose_next_answer.clear()
            with conditional_lock:
                _complete(app, environ, lambda *args, **kwargs: None)  # applied, answer dropped
            say(f"lost answer {method} {path}")
            return _reply(start_response, "500 Internal Server Error", _INTERNAL_ERROR)
        if conditional:
            with conditional_lock:
                return _complete(app, environ, start_response)
        if method in ("PUT", "POST") and is_object:
            say(f"write {method} {path}")  # a multipart upload: one line per part
        if method != "GET" or not is_object:
            return app(environ, start_response)
        with lock:
            gets += 1
            n = gets
        say(f"get n={n} {path}")
        response = app(environ, start_response)
        if n == outage_after_gets:
            return _ThenCall(response, lambda: events.put(_OUTAGE))
        return response

    return wrapped


def serve(port: int, app) -> BaseWSGIServer:
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=Handler)
    # A short poll: the outage starts (listener closed) within ~20 ms of being asked for.
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    ).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="0: any free port")
    parser.add_argument("--outage-after-gets", type=int, default=0, metavar="K")
    parser.add_argument("--outage-seconds", type=float, default=3.0, metavar="S")
    parser.add_argument("--no-conditional-writes", action="store_true")
    parser.add_argument("--deny", action="append", default=[], metavar="SUFFIX")
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    # SimpleQueue: its put() is reentrant, so a signal handler may call it while the main
    # thread is inside get(). A queue.Queue's put() takes the lock that get() may be holding
    # at that moment: the main thread then deadlocks on itself and never arms or starts an
    # outage again (seen once: test_answer_lost_after_a_conditional_write waited 30 s).
    events: queue.SimpleQueue[str] = queue.SimpleQueue()
    lose_next_answer = threading.Event()
    # Handlers only queue events: printing from a handler could re-enter a print in progress.
    signal.signal(signal.SIGUSR1, lambda *_: events.put(_OUTAGE))
    signal.signal(signal.SIGUSR2, lambda *_: events.put(_ARM))
    signal.signal(signal.SIGTERM, lambda *_: events.put(_STOP))
    signal.signal(signal.SIGINT, lambda *_: events.put(_STOP))

    # One application for the whole life of the process: moto's backends (the buckets and
    # objects) live in it and survive the outages.
    app = faulty(
        DomainDispatcherApplication(create_backend_app),
        events,
        args.outage_after_gets,
        not args.no_conditional_writes,
        lose_next_answer,
        tuple(args.deny),
    )
    server = serve(args.port, app)
    port = server.server_port
    os.environ["MOTO_PORT"] = str(port)
    say(f"ready port={port}")

    def next_event(timeout: float | None) -> str | None:
        """The next outage/stop request (None: timed out); arming is handled on the way."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            try:
                # Short waits: signal handlers only run between them in the main thread.
                event = events.get(timeout=0.05)
            except queue.Empty:
                continue
            if event != _ARM:
                return event
            lose_next_answer.set()
            say("armed")
        return None

    while next_event(None) != _STOP:
        server.shutdown()
        server.server_close()  # the listening socket is gone: connections are refused
        say("outage start")
        deadline = time.monotonic() + args.outage_seconds
        while (left := deadline - time.monotonic()) > 0:
            if next_event(left) == _STOP:  # an outage requested now is dropped
                say("stopped")
                return 0
        try:
            server = serve(port, app)
        except SystemExit:  # werkzeug exits when the port was taken in the meantime
            say(f"error: port {port} was taken during the outage")
            return 1
        say("outage end")
    server.shutdown()
    server.server_close()
    say("stopped")
    return 0


def _exit(status: int) -> None:
    # No interpreter teardown (seconds with moto loaded, on a busy machine): the state is in
    # memory and meant to vanish, and stdout is flushed line by line.
    sys.stdout.flush()
    os._exit(status)


if __name__ == "__main__":
    _exit(main())
