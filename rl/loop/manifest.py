"""A checkpoint's manifest: the list of what a whole checkpoint holds, written last and
checked before the checkpoint is used.

Why: writing into a temp folder and renaming it protects against a crash during the write
on one local disk; it says nothing about whether what was renamed is whole after a node was
lost mid-flush on a shared filesystem, a disk filled up, or a copy went wrong. So every file
is fsync'd, then `manifest.json` lists each file's size and CRC-32 with the step, the code's
commit and the checkpoint's kind, and is fsync'd with the folders. A folder without a
readable manifest was not finished; one whose files differ from it is damaged.

CRC-32 (zlib's: ~3.7 GB/s on this machine, about the cost of re-reading the files) finds
truncation and changed bytes, which is what a lost flush or a bad copy leaves; it is not a
defence against someone forging a checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
# verify="fast": files above this are checked by size only (a 7B model's optimizer state is
# ~80 GB: a full check reads it all, ~25 s at the CRC's speed, plus the disk's read time)
LARGE_BYTES = 64 << 20
VERIFY_MODES = ("full", "fast")
_CHUNK = 8 << 20


@dataclass
class Verdict:
    """What checking one folder against its manifest found."""

    path: Path
    problems: list[str] = field(default_factory=list)  # one line per missing/damaged file
    checked_bytes: int = 0  # bytes read for checksums
    seconds: float = 0.0
    step: int | None = None  # as the manifest says
    files: list[str] = field(default_factory=list)  # the files the manifest lists

    @property
    def intact(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return "; ".join(self.problems) if self.problems else "intact"


@lru_cache(maxsize=1)
def code_commit() -> str:
    """The commit of the code writing the checkpoint ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def crc32_of(path: Path, sync: bool = False) -> str:
    """The file's CRC-32 (and, with `sync`, its data flushed to the disk on the way)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
        if sync:
            os.fsync(f.fileno())
    return f"{crc:08x}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, kind: str, step: int | None) -> dict:
    """Flush every file of `folder` to disk, then write its manifest (last, also flushed, with
    every folder's entry). Files written by other processes on other nodes of a shared
    filesystem were flushed by their writer's close; this reads what the filesystem serves."""
    folder = Path(folder)
    paths = _files(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size,
                                                "crc32": crc32_of(p, sync=True)} for p in paths}
    manifest = {"format": FORMAT, "kind": kind, "step": step, "commit": code_commit(),
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({folder, *(p.parent for p in paths)}):  # every folder holding a file
        _fsync_dir(d)
    return manifest


def read_manifest(folder: Path) -> dict:
    """The manifest of `folder`; ValueError saying what is wrong with it otherwise."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST}: its save did not finish (killed while writing?), or "
                         f"it was written by a version before checkpoints had manifests")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{MANIFEST} is unreadable ({err})") from None
    return manifest


def built_by(folder: str | Path) -> dict | None:
    """Which code wrote a cached model (commit, time), for a run's summary: a cache is keyed by
    config, so a later code change that alters the trained weights still serves the older build
    (the image_arith cold start moved 5 points with the optimizer's kernel). None for a folder
    without a manifest (a checkpoint the user gives)."""
    try:
        manifest = read_manifest(Path(folder))
    except ValueError:
        return None
    return {"commit": manifest.get("commit"), "written_at": manifest.get("written_at")}


def verify(folder: Path, mode: str = "full", required: tuple[str, ...] = (),
           large_bytes: int = LARGE_BYTES) -> Verdict:
    """Check `folder` against its manifest: every listed file present with its size, and its
    checksum (mode "full": every file; "fast": files up to `large_bytes`). `required` files
    must be listed (a manifest that misses them is not of a whole checkpoint)."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {VERIFY_MODES}, got {mode!r}")
    folder = Path(folder)
    t0 = time.perf_counter()
    verdict = Verdict(folder)
    try:
        manifest = read_manifest(folder)
    except ValueError as err:
        verdict.problems.append(str(err))
        verdict.seconds = time.perf_counter() - t0
        return verdict
    verdict.step = manifest.get("step")
    listed = manifest["files"]
    verdict.files = sorted(listed)
    verdict.problems += [f"{name}: not in the manifest" for name in required if name not in listed]
    for name, want in listed.items():
        p = folder / name
        if not p.is_file():
            verdict.problems.append(f"{name}: missing")
            continue
        size = p.stat().st_size
        if size != want["size"]:
            verdict.problems.append(f"{name}: {size} bytes, the manifest says {want['size']}")
        elif mode == "full" or size <= large_bytes:
            verdict.checked_bytes += size
            if crc32_of(p) != want["crc32"]:
                verdict.problems.append(f"{name}: contents differ from the manifest (checksum)")
    verdict.seconds = time.perf_counter() - t0
    return verdict
