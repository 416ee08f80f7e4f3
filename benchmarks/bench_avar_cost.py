"""What AGTO adds to the cold start, on this machine: the same cold start (`python -m
launch.sft`, fresh cache, same steps and data) with `avar=none` (next-token loss) and `avar=agto`, side
by side, as the SFT loop's own wall time ("N SFT steps in X s"). AGTO's extra work is one
indicator-valued attention call per selected layer (forward and backward).

    .venv/bin/python benchmarks/bench_avar_cost.py [--steps 100] [key=value ...]

VARS's cost is measured inside the RL runs themselves (`time/vars_share`, the AVAR reports).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile

SFT_TIME = re.compile(r"cold_start: (\d+) SFT steps in ([\d.]+) s")


def sft_seconds(objective: str, steps: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run(
            [sys.executable, "-m", "launch.sft", "avar=agto" if objective == "agto" else "avar=none",
             f"cold_start.steps={steps}", f"cache_dir={cache}", "cold_start.reuse=false",
             "logger.progress=false", f"hydra.run.dir={cache}/hydra", *extra],
            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True).stdout
    m = SFT_TIME.search(out)
    if not m:
        raise SystemExit(f"no SFT timing in the output of launch.sft:\n{out[-2000:]}")
    return float(m.group(2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (e.g. task=chain)")
    args = ap.parse_args(argv)
    times = {o: [sft_seconds(o, args.steps, args.overrides) for _ in range(args.repeats)]
             for o in ("lm", "agto")}
    lm, agto = min(times["lm"]), min(times["agto"])
    print(f"cold start, {args.steps} SFT steps {' '.join(args.overrides)} (best of {args.repeats})")
    print(f"{'objective':>10} {'s':>8} {'ms/step':>8}")
    for o, t in (("lm", lm), ("agto", agto)):
        print(f"{o:>10} {t:8.1f} {1e3 * t / args.steps:8.1f}")
    print(f"agto / lm = {agto / lm:.2f}  (AGTO's share of the AGTO cold start: {100 * (1 - lm / agto):.1f}%)")


if __name__ == "__main__":
    main()
