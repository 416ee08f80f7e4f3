"""A collective weight transport that runs on CPU, for tests of the learner side of the
collective protocol (connect once, send per sync, close at shutdown): it implements our
`WeightTransport` interface and records what each learner rank did into a folder."""
from __future__ import annotations

from pathlib import Path

from rollout.weight_sync import WeightTransport


class RecordingTransport(WeightTransport):
    name = "recording"
    collective = True

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder
        self.rank = None

    def _note(self, what: str) -> None:
        with open(Path(self.folder) / f"rank{self.rank}.log", "a") as f:
            f.write(what + "\n")

    def connect(self, engines: list, rank: int) -> None:
        self.rank = rank
        self._note(f"connect {len(engines)}")

    def send(self, named_tensors, version: int) -> dict[str, float]:
        n = sum(t.numel() * t.element_size() for _, t in named_tensors)  # every rank gathers
        self._note(f"send v{version}")
        return {"bytes": float(n)}

    def close(self) -> None:
        self._note("close")
