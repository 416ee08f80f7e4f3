"""A pool of reward worker processes with a per-call timeout.

Why processes: a verifier can hang (sympy on an adversarial expression) or crash, and only a
process can be killed safely; the trainer must get a reward for every response regardless.
Why 'spawn': the parent holds Ray/torch threads, and forking a threaded process can deadlock.
Why long-lived workers and chunks: starting a Python process costs ~0.1-1 s, far more than
a verifier call; workers start once and are replaced only when one hangs or dies.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from rewards._worker import worker_main
from rewards.types import RewardItem, RewardResult
from rewards.verifiers import check_spec

STARTUP_TIMEOUT_S = 120.0
MAX_FAILED_STARTS = 3


@dataclass
class _Call:
    item: int
    name: str
    weight: float


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: object
    ready: bool = False
    started_at: float = field(default_factory=time.monotonic)
    running: Deque[int] = field(default_factory=deque)   # call ids sent, not yet answered
    deadline: float = float("inf")                        # for running[0]


class RewardPool:
    """`score(items)` runs every item's reward components in worker processes.

    A component that raises scores 0.0 and counts as an error; one that runs past
    `timeout_s` scores 0.0, counts as a timeout, and its worker is killed and replaced.
    `score` always returns one result per item. Not thread-safe across concurrent `score`
    calls (a lock serialises them).
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, *,
                 mp_context: str = "spawn", preload: Sequence[str] = ("math_verify",),
                 chunk_size: Optional[int] = None) -> None:
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.chunk_size = chunk_size
        self._ctx = mp.get_context(mp_context)
        self._preload = tuple(preload)
        self._lock = threading.Lock()
        self._closed = False
        self._failed_starts = 0
        self.restarts = 0          # workers replaced after a hang or a crash, over the pool's life
        self._workers: List[_Worker] = [self._start_worker() for _ in range(num_workers)]

    # ---- worker lifecycle -------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=worker_main, args=(child_conn, self._preload),
                                 name="reward-worker", daemon=True)
        proc.start()
        child_conn.close()
        return _Worker(proc=proc, conn=parent_conn)

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.proc.is_alive():
            worker.proc.kill()
        worker.proc.join(timeout=5)
        worker.conn.close()

    def _replace(self, index: int) -> None:
        self._kill(self._workers[index])
        self._workers[index] = self._start_worker()
        self.restarts += 1

    # ---- scoring ----------------------------------------------------------------------
    def score(self, items: Sequence[RewardItem]) -> List[RewardResult]:
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        calls: List[_Call] = []
        for i, item in enumerate(items):
            for name, weight in item.weights().items():
                check_spec(name)
                calls.append(_Call(i, name, weight))
        outcomes: Dict[int, Tuple[str, object]] = {}
        if calls:
            with self._lock:
                self._run(items, calls, outcomes)
        return self._collect(items, calls, outcomes)

    def _chunks(self, n_calls: int) -> int:
        if self.chunk_size:
            return self.chunk_size
        return max(1, min(64, n_calls // (4 * self.num_workers)))

    def _run(self, items: Sequence[RewardItem], calls: List[_Call],
             outcomes: Dict[int, Tuple[str, object]]) -> None:
        # A batch interrupted mid-way (KeyboardInterrupt, an exception) leaves workers busy
        # with calls nobody waits for; their late replies would be misread as this batch's.
        for idx, w in enumerate(self._workers):
            if w.running:
                self._replace(idx)
        todo: Deque[int] = deque(range(len(calls)))
        size = self._chunks(len(calls))
        while len(outcomes) < len(calls):
            now = time.monotonic()
            for idx, w in enumerate(self._workers):
                if w.ready and not w.running and todo:
                    if not w.proc.is_alive():          # died while idle: no call to blame
                        self._replace(idx)
                        continue
                    chunk = [todo.popleft() for _ in range(min(size, len(todo)))]
                    payload = [(c, calls[c].name, items[calls[c].item].response,
                                items[calls[c].item].answer, items[calls[c].item].meta)
                               for c in chunk]
                    try:
                        w.conn.send(payload)
                    except (OSError, ValueError):   # died while idle: retry elsewhere
                        todo.extendleft(reversed(chunk))
                        self._replace(idx)
                        continue
                    w.running.extend(chunk)
                    w.deadline = time.monotonic() + self.timeout_s
            deadlines = [w.deadline if w.ready else w.started_at + STARTUP_TIMEOUT_S
                         for w in self._workers if w.running or not w.ready]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            ready_conns = wait([w.conn for w in self._workers], timeout=wait_s)
            for idx, w in enumerate(list(self._workers)):
                if w.conn in ready_conns:
                    self._drain(idx, todo, outcomes)
            self._expire(todo, outcomes)

    def _drain(self, idx: int, todo: Deque[int], outcomes: Dict[int, Tuple[str, object]]) -> None:
        w = self._workers[idx]
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg == ("ready",):
                    w.ready = True
                    self._failed_starts = 0
                    continue
                call_id, ok, value = msg
                if w.running and w.running[0] == call_id:
                    w.running.popleft()
                outcomes[call_id] = ("ok", value) if ok else ("error", value)
                w.deadline = time.monotonic() + self.timeout_s
        except (EOFError, OSError):
            self._on_death(idx, todo, outcomes)

    def _on_death(self, idx: int, todo: Deque[int], outcomes: Dict[int, Tuple[str, object]]) -> None:
        """A worker exited: its current call is an error (it crashed the process), the rest
        of its chunk is retried on a fresh worker."""
        w = self._workers[idx]
        if not w.ready:
            self._failed_starts += 1
            if self._failed_starts >= MAX_FAILED_STARTS:
                self._kill(w)
                raise RuntimeError(f"reward workers fail to start (exit code {w.proc.exitcode}); "
                                   "is `rewards` importable from the workers' sys.path, and does the main "
                                   "script guard its code with `if __name__ == '__main__':` (spawn re-imports it)?")
        if w.running:
            code = w.proc.exitcode
            outcomes[w.running.popleft()] = ("error", f"worker process died (exit code {code})")
            todo.extendleft(reversed(w.running))
        self._replace(idx)

    def _expire(self, todo: Deque[int], outcomes: Dict[int, Tuple[str, object]]) -> None:
        now = time.monotonic()
        for idx, w in enumerate(self._workers):
            if w.running and w.ready and now >= w.deadline:
                outcomes[w.running.popleft()] = ("timeout", f"timed out after {self.timeout_s:g} s")
                todo.extendleft(reversed(w.running))
                self._replace(idx)
            elif not w.ready and now >= w.started_at + STARTUP_TIMEOUT_S:
                self._failed_starts += 1
                if self._failed_starts >= MAX_FAILED_STARTS:
                    raise RuntimeError(f"reward workers did not start within {STARTUP_TIMEOUT_S:g} s")
                self._replace(idx)

    @staticmethod
    def _collect(items: Sequence[RewardItem], calls: List[_Call],
                 outcomes: Dict[int, Tuple[str, object]]) -> List[RewardResult]:
        results = [RewardResult(total=0.0, components={}) for _ in items]
        for call_id, call in enumerate(calls):
            kind, value = outcomes[call_id]
            res = results[call.item]
            if kind == "ok":
                res.components[call.name] = float(value)
                res.total += call.weight * float(value)
                continue
            res.components[call.name] = 0.0
            if kind == "timeout":
                res.timeouts += 1
            else:
                res.errors += 1
            res.error_messages.append(f"{call.name}: {value}")
        return results

    # ---- shutdown ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (politely, then by force); idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            self._kill(w)
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
