"""What attention credit adds to one scoring forward's attention, on this machine.

For RL-shaped batches (B responses, right-padded to N tokens, GQA heads) it times, side by
side in one run: one layer's attention with statistics off (ours, and torch SDPA), with the
statistics preplan/anchor credit reads (distance, WAAD, FAI band), and the γ computation of
`credit=coupled` from those statistics (2 layers). Ratios are against our stats-off call.

    .venv/bin/python benchmarks/bench_credit_overhead.py [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from kernels import StatsSpec, attention
from rl.methods.credit.preplan_anchor import PreplanAnchorParams, attention_credit


def timed(fn, reps: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the learner uses 1 here)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    p = PreplanAnchorParams()
    print(f"threads={args.threads}; times per call in ms; ratio = x / ours stats-off")
    print(f"{'B':>4} {'N':>5} {'Hq/Hkv':>7} | {'sdpa':>7} {'ours off':>8} {'ours stats':>10} {'ratio':>6} | "
          f"{'γ (2 layers)':>12} {'ratio':>6}")
    for B, N, hq, hkv in ((128, 64, 2, 1), (256, 64, 2, 1), (128, 256, 2, 1), (16, 1024, 16, 8)):
        q, k, v = torch.randn(B, hq, N, 64), torch.randn(B, hkv, N, 64), torch.randn(B, hkv, N, 64)
        lens = torch.randint(N // 2, N + 1, (B,))
        am = torch.arange(N)[None, :] < lens[:, None]
        resp = am & (torch.arange(N)[None, :] >= N // 4)
        spec = StatsSpec(distance=True, waad_window=p.waad_window, fai_band=tuple(p.fai_band), response_mask=resp)
        mask4 = am[:, None, None, :] & torch.ones(N, N, dtype=torch.bool).tril()
        g = hq // hkv
        t_sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask4))
        t_off = timed(lambda: attention(q, k, v, attention_mask=am, impl="blockwise"))
        t_on = timed(lambda: attention(q, k, v, attention_mask=am, stats=spec, impl="blockwise"))
        st = attention(q, k, v, attention_mask=am, stats=spec, impl="blockwise")[1].fields()
        stats = {0: st, 1: st}
        t_credit = timed(lambda: attention_credit(stats, resp, "coupled", p))
        print(f"{B:>4} {N:>5} {f'{hq}/{hkv}':>7} | {1e3 * t_sdpa:7.1f} {1e3 * t_off:8.1f} {1e3 * t_on:10.1f} "
              f"{t_on / t_off:6.2f} | {1e3 * t_credit:12.1f} {t_credit / t_off:6.2f}")


if __name__ == "__main__":
    main()
