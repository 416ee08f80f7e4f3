"""`python -m launch.verify PATH [--fast]`: check a run's checkpoints against their manifests
without starting anything, and say which one `resume=true` would continue from.

    python -m launch.verify outputs/default/seed0
    python -m launch.verify outputs/default/seed0/checkpoints/step_000020 --fast

PATH is a trainer output dir, its checkpoints/ folder, or one step_* folder. Exit status 0 when
every checkpoint is intact, 1 when one is damaged or unfinished (a resume still takes the newest
intact one), 2 when there is no intact checkpoint at all. See rl/loop/manifest.py for what is
checked (and what a checksum does not protect against).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rl.loop.checkpoint import STEP_DIR, CheckpointManager


def checkpoint_folders(path: Path) -> tuple[CheckpointManager, list[Path]]:
    """The manager of PATH's checkpoints and the step folders to check (PATH's kinds above)."""
    if STEP_DIR.match(path.name) and path.is_dir():
        return CheckpointManager(path.parent), [path]
    for root in (path / "checkpoints", path):
        if root.is_dir() and (any(STEP_DIR.match(p.name) for p in root.iterdir())
                              or root.name == "checkpoints"):
            manager = CheckpointManager(root)
            return manager, manager.list()
    raise SystemExit(f"{path}: not a trainer output dir, a checkpoints folder or a step_* folder")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--fast", action="store_true",
                    help="checksums of files up to 64 MiB only (sizes of all): verify_checkpoints=fast")
    args = ap.parse_args(argv)
    if not args.path.exists():
        raise SystemExit(f"{args.path} does not exist")
    manager, folders = checkpoint_folders(args.path)
    mode = "fast" if args.fast else "full"
    unfinished = sorted(manager.root.glob(".tmp-step_*"))
    intact = []
    for ckpt in folders:
        v = manager.verify(ckpt, mode)
        mb = v.checked_bytes / 2**20
        print(f"{ckpt.name}  {'intact ' if v.intact else 'DAMAGED'}  {len(v.files):3d} files  "
              f"{mb:9.1f} MiB checksummed in {v.seconds:5.1f} s" + ("" if v.intact else f"\n    {v.describe()}"))
        if v.intact:
            intact.append(ckpt)
    for tmp in unfinished:
        print(f"{tmp.name}  unfinished save (a temp folder; never resumed from, removed by the next save of its step)")
    if not folders:
        print(f"no checkpoint in {manager.root}: resume=true starts fresh")
        return 2
    whole_run = folders == manager.list()
    if intact and whole_run:
        print(f"resume=true continues from {intact[-1]}")
    elif whole_run:
        print("no intact checkpoint: resume=true stops with an error")
    return 0 if len(intact) == len(folders) and not unfinished else (1 if intact else 2)


if __name__ == "__main__":
    sys.exit(main())
