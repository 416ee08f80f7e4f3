#!/usr/bin/env python
"""Compile every Triton kernel launch of the GPU path for sm_80 and sm_90, on this machine
(no GPU needed), and print a markdown table of the resources each one uses.

The launches and the verdict are kernels/gpu_compile.py's: the forward over every config the
GPU autotunes, stats off / the pipeline's statistics / all of them; the FAI column pass; the
backward's dK/dV (with and without the in-loop column statistic) and dQ; head dims 64 and 128;
bf16, fp16, fp32. A launch fails if it does not compile or needs more shared memory than the
architecture gives one block (sm_80: 163 KiB, sm_90: 227 KiB). Spills (registers past 255 go
to local memory) are shown, not failed: they cost speed, not correctness.

  python benchmarks/compile_kernels.py                 # the full sweep (~250 compiles, minutes)
  python benchmarks/compile_kernels.py --ci            # the test's subset
  python benchmarks/compile_kernels.py --json out.json # also keep every record

Exit status 1 when any launch fails. What it cannot tell: speed, and runtime errors that
depend on data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import gpu_compile  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ci", action="store_true", help="only the CI subset (tests/kernels/test_kernel_compile.py)")
    ap.add_argument("--workers", type=int, default=None, help="parallel compiles (default: one per CPU)")
    ap.add_argument("--json", default=None, help="write every record to this file")
    args = ap.parse_args()

    todo = gpu_compile.ci_subset() if args.ci else gpu_compile.full_sweep()
    t0 = time.perf_counter()
    done = 0

    def progress(r):
        nonlocal done
        done += 1
        x = r.launch
        print(f"[{done}/{len(todo)} {time.perf_counter() - t0:5.0f}s] {x.kernel} {x.variant} {x.config} "
              f"d{x.head_dim} {x.dtype} sm_{x.arch}: {'ok' if r.ok else 'FAIL ' + r.problem}", file=sys.stderr,
              flush=True)

    results = gpu_compile.compile_all(todo, workers=args.workers, progress=progress)
    wall = time.perf_counter() - t0
    import triton

    print(gpu_compile.markdown_table(results))
    print()
    print(gpu_compile.summary(results))
    print(f"{len(results)} compiles in {wall:.0f} s wall ({sum(r.seconds for r in results):.0f} s of compiling), "
          f"Triton {triton.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
