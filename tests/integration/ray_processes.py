"""Helpers for tests that start Ray nodes as separate processes (`ray start --block`, the
SLURM script): a free port, and stopping a whole process group."""
from __future__ import annotations

import os
import signal
import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def stop_group(pgid: int) -> None:
    """SIGTERM to the group (`ray start --block` shuts its node down on it), then SIGKILL for
    what remains: the node's agents rename themselves (`ray::DashboardAgent`), so no name or
    path finds them, and an orphaned agent keeps its port (the next head's cannot bind it)."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        for _ in range(int(wait_s * 2)):
            time.sleep(0.5)
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
