"""SIGTERM / SIGINT end a run cleanly: the current step finishes, a checkpoint is written, the
loop stops, and `resume=true` continues from there (a preempted job loses at most one step).

A second signal stops at once (KeyboardInterrupt). Installed by the trainer's loop only, after
`ray.init` (which installs its own SIGTERM handler in the driver), and restored afterwards. On
SLURM, deliver the signal to the driver alone (launch/slurm.sbatch traps it and forwards it):
SLURM's own SIGTERM to every task would also kill the Ray workers holding the step.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    def __init__(self):
        self.received: str | None = None  # the first signal's name
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name})")
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing this step, writing a checkpoint, then stopping "
                    "(send it again to stop at once)", self.received)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # signals reach only it
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
