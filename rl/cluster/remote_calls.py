"""Waiting on actors without hanging: every hot-path `ray.get` has a deadline, and the first
failed actor surfaces at once.

A plain `ray.get([rank0, rank1])` blocks on rank 0 first; if rank 1 dies, rank 0 sits in a
collective that will never finish and the driver waits with it (peers' users report exactly
these silent hangs). Here the futures are watched together: the first error is raised as soon
as it arrives, and no answer within `timeout_s` is an error too, naming what was waited on.
"""
from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError


class ActorFailure(RuntimeError):
    """An actor died, or did not answer in time. The caller decides: restart and retry, or
    stop with this message."""


class LearnerFailure(ActorFailure):
    """A learner rank died or hung: the group is lost (its collectives cannot continue)."""


def get_all(futures: list, timeout_s: float | None, what: str,
            error: type[ActorFailure] = ActorFailure) -> list:
    """Results of `futures` in order; raises `error` on a dead actor or after timeout_s
    (None: no deadline). Other exceptions (a bug in the called method) pass through."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(futures)
    while pending:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise error(f"{what}: no answer within {timeout_s:.0f} s "
                               f"({len(pending)} of {len(futures)} calls still running; "
                               "raise cluster.call_timeout_s if this work is legitimately slow)")
        try:
            ray.get(done[0])
        except RayActorError as err:
            raise error(f"{what}: an actor died ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:200]})") from err
    return ray.get(list(futures))
