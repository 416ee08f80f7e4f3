"""The loop a reward worker process runs.

Protocol over one duplex pipe per worker (the parent needs to know which process runs which
call, so it can kill exactly the one that hangs):
  worker -> parent  ("ready",)                     once, after imports
  parent -> worker  [(call_id, spec, response, answer, meta), ...]   a chunk, run in order
  worker -> parent  (call_id, True, value) | (call_id, False, message)   one per call
  parent -> worker  None                           stop
Each call's result is sent as soon as it finishes, so the parent can time calls one by one
even though it ships them in chunks (one pipe round trip per chunk, not per call).
"""
from __future__ import annotations

import math
import signal
from typing import Sequence

MAX_MESSAGE = 300


def _preload(modules: Sequence[str]) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # a missing optional package surfaces later as a per-call error
            pass


def worker_main(conn, preload: Sequence[str]) -> None:
    # Ctrl-C goes to the whole process group; the parent decides what happens to workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from rewards.verifiers import resolve

    _preload(preload)
    conn.send(("ready",))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for call_id, spec, response, answer, meta in chunk:
            try:
                value = float(resolve(spec)(response, answer, meta))
                if not math.isfinite(value):
                    raise ValueError(f"returned a non-finite value {value}")
                reply = (call_id, True, value)
            except Exception as exc:
                reply = (call_id, False, f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE])
            conn.send(reply)
