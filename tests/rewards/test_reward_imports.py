"""DESIGN.md: `rewards` never imports `rl` (dependencies point one way)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_rl_import_in_source():
    pattern = re.compile(r"^\s*(from\s+rl(\.|\s)|import\s+rl(\.|\s|$))", re.MULTILINE)
    offenders = [p.name for p in (ROOT / "rewards").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_importing_rewards_loads_no_rl_module():
    code = ("import sys, rewards, rewards.pool, rewards.verifiers, rewards._worker, rewards.expr; "
            "bad = [m for m in sys.modules if m == 'rl' or m.startswith('rl.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
