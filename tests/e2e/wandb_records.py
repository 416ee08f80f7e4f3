"""Read the history rows of an offline W&B run file (`run-*.wandb`).

wandb 0.31 ships no Python reader for its run files; they are a LevelDB-style log (7-byte file
header, 32 KiB blocks, records split FULL/FIRST/MIDDLE/LAST) of protobuf `Record`s.
"""
from __future__ import annotations

import json
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too small for a header: skip to next block
            pos += BLOCK - pos % BLOCK
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def history(path: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                         for i in rec.history.item})
    return rows


def run_tags(path: Path) -> list[str]:
    """The tags of the run (its `run` record)."""
    from wandb.proto import wandb_internal_pb2

    for raw in records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "run":
            return list(rec.run.tags)
    raise AssertionError(f"no run record in {path}")
