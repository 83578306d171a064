"""The processes of the local stack, by recorded pid, never by name pattern
(used by infra/local/start.sh and stop.sh; the venv's python, psutil comes with Ray).

    proc.py record STATE NAME PID   remember PID (with its start time and command line) as
                                    the stack's NAME in STATE/NAME.pid
    proc.py alive STATE NAME        exit 0 if the recorded NAME is still running
    proc.py owns STATE NAME PORT    exit 0 if 127.0.0.1:PORT is listened on by NAME or one of
                                    its descendants; 1 (and say who) if by another process
    proc.py stop STATE NAME         stop NAME and its descendants: SIGTERM, up to 5 s, then
                                    SIGKILL for what is left; a pid now used by another
                                    process (it does not match what was recorded) is left
                                    alone and reported

A pid alone is not an identity: after the stack's process died its pid may be reused by
anything. The start time recorded with it (which an exec does not change) tells them apart.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import psutil

# Seconds between SIGTERM and SIGKILL. MLflow and moto exit at once; Ray's gcs_server and
# `ray start --block` take their time (Ray's own `ray stop` waits 16 s), and a local stack
# holds nothing that a SIGKILL after this could lose.
GRACE_S = 5.0


def _pidfile(state: str, name: str) -> Path:
    return Path(state) / f"{name}.pid"


def record(state: str, name: str, pid: str) -> int:
    p = psutil.Process(int(pid))
    info = {"pid": p.pid, "started": p.create_time(), "cmdline": p.cmdline()}
    _pidfile(state, name).write_text(json.dumps(info) + "\n")
    return 0


def _recorded(state: str, name: str) -> psutil.Process | None:
    """The recorded process if it is still the one that was recorded, else None (and why)."""
    path = _pidfile(state, name)
    try:
        info = json.loads(path.read_text())
        p = psutil.Process(info["pid"])
        # (Not the command line: recorded right after the fork, it may still be the shell's.)
        if abs(p.create_time() - info["started"]) > 0.01:
            print(f"{name}: pid {info['pid']} is now another process "
                  f"({' '.join(p.cmdline())[:80]!r}); left alone")  # fmt: skip
            return None
        return p
    except FileNotFoundError:
        return None
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except (ValueError, KeyError) as e:
        print(f"{name}: unreadable {path} ({e}); nothing stopped")
        return None


def alive(state: str, name: str) -> int:
    return 0 if _recorded(state, name) is not None else 1


def owns(state: str, name: str, port: str) -> int:
    p = _recorded(state, name)
    ours = {p.pid, *(c.pid for c in p.children(recursive=True))} if p else set()
    listeners = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)
    }
    if listeners & ours:
        return 0
    others = ", ".join(str(pid) for pid in sorted(listeners - {None})) or "unknown"
    print(f"port {port} is answered by another process (pid {others}), not the {name} "
          f"server this script started")  # fmt: skip
    return 1


def _running(p: psutil.Process) -> bool:
    """Still running: a zombie (dead, waiting for a parent that may never reap it) is not."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for ``procs`` to end; returns those still running."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _running(p)]
    return alive


def stop(state: str, name: str) -> int:
    p = _recorded(state, name)
    _pidfile(state, name).unlink(missing_ok=True)
    if p is None:
        return 0
    try:
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for q in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            q.terminate()
    alive = _wait_gone(procs, GRACE_S)
    for q in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            q.kill()
    _wait_gone(alive, 5)
    killed = f" ({len(alive)} did not stop on SIGTERM: killed)" if alive else ""
    print(f"stopped {name} (pid {p.pid}){killed}")
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    sys.exit({"record": record, "alive": alive, "owns": owns, "stop": stop}[command](*args))
