"""Watchdog: stop the ephemeral Prefect server when the CLI process that started it is gone.

The CLI stops its server at exit, but a CLI killed with SIGKILL (out of memory, preemption,
``kill -9``) runs no exit handler, and the server (uvicorn, ~200 MB and a port) lived on as an
orphan. Linux's parent-death signal does not fit: it fires when the *thread* that started the
child exits, and the CLI starts the server from a short-lived thread. So this tiny stdlib-only
process, a child of the CLI, polls: once it has been re-parented (its parent died), it sends the
server SIGTERM, then SIGKILL after a grace period. It exits on its own when the server is gone.

Usage: ``python server_guard.py <cli pid> <server pid>``
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.25
GRACE_S = 5.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def guard(parent: int, server: int, poll_s: float = POLL_S) -> str:
    """Wait for the parent's death or the server's end; returns what happened."""
    while True:
        if not alive(server):
            return "server ended"
        if os.getppid() != parent:
            break
        time.sleep(poll_s)
    try:
        os.kill(server, signal.SIGTERM)
    except ProcessLookupError:
        return "server ended"
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        if not alive(server):
            return "server stopped"
        time.sleep(0.1)
    try:
        os.kill(server, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return "server killed"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    # Ctrl-C reaches the whole foreground group: the guard outlives it to clean up
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    guard(int(argv[1]), int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
