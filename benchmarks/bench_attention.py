#!/usr/bin/env python
"""Attention kernel benchmark: time and peak memory, side by side in one run.

Rows for each sequence length N (one sequence, causal):
  stats-off   kernels.attention, no statistics (Triton on CUDA, blockwise on CPU)
  stats-on    kernels.attention with every statistic: entropy, distance, WAAD (W=10),
              2 key-class masses, FAI band [10, 100] (the column pass)
  sdpa        torch.nn.functional.scaled_dot_product_attention (causal, GQA)
  eager+maps  eager attention that returns the [B, H, N, N] maps, i.e. what
              transformers' output_attentions=True path materialises
and on CUDA (unless --no-bwd):
  col-pass    the standalone FAI band column kernel alone (after a forward)
  bwd         backward of kernels.attention (stats-off forward)
  bwd+col     backward with the FAI column statistic inside the dK/dV loop
  sdpa-bwd    backward of SDPA
then the acceptance figures of the kernel spec (GPU budgets, or on CPU the blockwise
path's peak memory against eager).

Peak memory: CUDA allocator peak above the inputs; on CPU the peak resident set above
the level before the call (VmHWM reset through /proc/self/clear_refs; the script
re-executes itself with MALLOC_MMAP_THRESHOLD_ fixed so freed blocks leave the process).

  python benchmarks/bench_attention.py                      # CPU defaults: 8 heads, d64, N 1k-4k
  python benchmarks/bench_attention.py --seqlens 1024,2048,4096,8192,16384 --max-eager-n 4096
  python benchmarks/bench_attention.py --device cuda         # 32/8 heads, d128, bf16, N 1k-16k
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--seqlens", default=None, help="comma list (CPU default 1024,2048,4096; CUDA 1k..16k)")
    ap.add_argument("--heads", type=int, default=None, help="query heads (CPU 8, CUDA 32)")
    ap.add_argument("--kv-heads", type=int, default=None, help="kv heads (CPU 8, CUDA 8)")
    ap.add_argument("--head-dim", type=int, default=None, help="CPU 64, CUDA 128")
    ap.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (CPU float32, CUDA bfloat16)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (CPU 2, CUDA 20); median reported")
    ap.add_argument("--max-eager-n", type=int, default=None, help="skip eager above this N (CPU 4096, CUDA 8192)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (on a loaded shared machine"
                    " 1 thread gives steadier figures; default: torch's)")
    ap.add_argument("--no-bwd", action="store_true", help="CUDA: skip the backward rows")
    ap.add_argument("--bwd", action="store_true", help="CPU: add the backward rows (off by default: slow)")
    ap.add_argument("--impl", default=None, help="kernels implementation (default: triton on CUDA, blockwise on CPU;"
                    " 'triton' on CPU needs TRITON_INTERPRET=1 and tiny N: a smoke test of this script)")
    return ap.parse_args()


def rss_kib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


class Meter:
    """Times a callable and measures its peak memory above the level before the call."""

    def __init__(self, device, reps):
        import torch

        self.torch, self.device, self.reps = torch, device, reps
        self.cpu_mem = device == "cpu" and self._can_reset_hwm()

    @staticmethod
    def _can_reset_hwm():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def run(self, fn):
        torch = self.torch
        res = fn()  # warm-up (compiles / autotunes on CUDA)
        del res
        if self.device == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(self.reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                res = fn()
                b.record()
                torch.cuda.synchronize()
                del res
                times.append(a.elapsed_time(b))
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            res = fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            del res
            return statistics.median(times), peak
        times = []
        peak = float("nan")
        for i in range(self.reps):
            if self.cpu_mem and i == 0:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                before = rss_kib()["VmRSS"]
            t = time.perf_counter()
            res = fn()
            times.append((time.perf_counter() - t) * 1e3)
            if self.cpu_mem and i == 0:
                peak = (rss_kib()["VmHWM"] - before) / 1024
            del res
        return statistics.median(times), peak


def eager_with_maps(q, k, v, mask, scale):
    """transformers' eager_attention_forward (repeat_kv, additive mask, fp32 softmax),
    returning the maps as output_attentions=True does."""
    import torch

    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1) if g > 1 else k
    v = v.repeat_interleave(g, dim=1) if g > 1 else v
    w = torch.matmul(q, k.transpose(2, 3)) * scale + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def col_pass_fn(impl, q, k, lse, scale, spec, fai):
    """The FAI band column pass alone (given a forward's lse)."""
    from kernels.spec import make_layout

    if impl == "triton":
        from kernels import triton_backend

        layout = make_layout(q, k, k, None, None)
        return lambda: triton_backend.column_pass(q, k, lse, layout, scale, spec, fai)
    from kernels import blockwise

    return lambda: blockwise._stats(q, k, lse, scale, spec, {"fai_sum": fai}, {"response_mask": spec.response_mask})


def main():
    args = parse()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and (args.device or "cpu") == "cpu":
        # freed blocks must go back to the OS, or the resident-set peak undercounts
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    sys.path.insert(0, ROOT)
    import torch
    import torch.nn.functional as F

    from kernels import StatsSpec, attention

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = dev == "cuda"
    seqlens = [int(x) for x in (args.seqlens or ("1024,2048,4096,8192,16384" if gpu else "1024,2048,4096")).split(",")]
    hq = args.heads or (32 if gpu else 8)
    hkv = args.kv_heads or 8
    d = args.head_dim or (128 if gpu else 64)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    reps = args.reps or (20 if gpu else 2)
    max_eager = args.max_eager_n or (8192 if gpu else 4096)
    impl = args.impl or ("triton" if gpu else "blockwise")
    B = args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    meter = Meter(dev, reps)
    torch.manual_seed(0)

    import triton

    print(f"device={torch.cuda.get_device_name() if gpu else 'cpu'} torch={torch.__version__} "
          f"triton={triton.__version__} impl={impl} B={B} Hq={hq} Hkv={hkv} d={d} dtype={str(dtype)[6:]} reps={reps} "
          f"threads={torch.get_num_threads()}")
    hdr = f"{'N':>6} {'variant':<11} {'ms':>10} {'TFLOP/s':>8} {'peak MiB':>10} {'x stats-off':>11}"
    print(hdr)
    print("-" * len(hdr))
    results = {}
    for N in seqlens:
        q = torch.randn(B, hq, N, d, device=dev, dtype=dtype)
        k = torch.randn(B, hkv, N, d, device=dev, dtype=dtype)
        v = torch.randn(B, hkv, N, d, device=dev, dtype=dtype)
        cls = torch.randint(-1, 2, (B, N), device=dev)
        resp = torch.zeros(B, N, dtype=torch.bool, device=dev)
        resp[:, N // 2:] = True
        spec = StatsSpec.all(waad_window=10, fai_band=(10, 100), key_classes=cls, n_classes=2, response_mask=resp)
        scale = d ** -0.5
        fwd_flop = 2 * B * hq * N * N * d  # two matmuls, causal half
        rows = {
            "stats-off": (lambda: attention(q, k, v, impl=impl), fwd_flop),
            "stats-on": (lambda: attention(q, k, v, stats=spec, impl=impl), fwd_flop),
            "sdpa": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv), fwd_flop),
        }
        mask = None
        eager_gib = B * hq * N * N * (2 * dtype.itemsize + 4) / 2**30
        if N <= max_eager:
            mask = torch.full((N, N), torch.finfo(dtype).min, device=dev, dtype=dtype).triu(1)[None, None]
            rows["eager+maps"] = (lambda: eager_with_maps(q, k, v, mask, scale), fwd_flop)
        if (gpu and not args.no_bwd) or args.bwd:
            _, st0 = attention(q, k, v, stats=StatsSpec(), impl=impl)
            fai = torch.empty_like(st0.lse)
            col_spec = StatsSpec(fai_band=(10, 100), response_mask=resp)
            rows["col-pass"] = (col_pass_fn(impl, q, k, st0.lse, scale, col_spec, fai), None)
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            g = torch.randn_like(q)
            out_plain = attention(qg, kg, vg, impl=impl)
            out_col, _ = attention(qg, kg, vg, impl=impl, stats=col_spec.replace(fai_in_backward=True))
            out_sdpa = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=hq != hkv)
            grad = lambda o: torch.autograd.grad(o, (qg, kg, vg), g, retain_graph=True)
            rows["bwd"] = (lambda: grad(out_plain), 2.5 * fwd_flop)
            rows["bwd+col"] = (lambda: grad(out_col), 2.5 * fwd_flop)
            rows["sdpa-bwd"] = (lambda: grad(out_sdpa), 2.5 * fwd_flop)
        for name, (fn, flop) in rows.items():
            try:
                ms, mib = meter.run(fn)
            except torch.OutOfMemoryError:
                ms, mib = float("nan"), float("nan")
                if gpu:
                    torch.cuda.empty_cache()
            results[(N, name)] = (ms, mib)
            tf = f"{flop / ms / 1e9:8.1f}" if (flop and gpu and ms == ms) else f"{'':8}"
            base = results.get((N, "stats-off"), (float("nan"),))[0]
            print(f"{N:>6} {name:<11} {ms:>10.2f} {tf} {mib:>10.1f} {ms / base:>11.2f}", flush=True)
        if "eager+maps" not in rows:
            print(f"{N:>6} {'eager+maps':<11} {'skipped':>10} {'':8} {'~%.0f GiB' % eager_gib:>10}")
        del q, k, v, mask, rows
        if gpu:
            torch.cuda.empty_cache()
    print()
    report(results, gpu, impl)


def report(results, gpu, impl):
    """The spec's acceptance figures, from the rows above."""
    def r(n, a, b):
        x, y = results.get((n, a)), results.get((n, b))
        return None if x is None or y is None else x[0] / y[0]

    lines = []
    n4 = 4096 if any(k[0] == 4096 for k in results) else max(k[0] for k in results)
    if gpu:
        checks = [("stats-on fwd / stats-off fwd", r(n4, "stats-on", "stats-off"), "<=", 1.15),
                  ("bwd+col / bwd", r(n4, "bwd+col", "bwd"), "<=", 1.05),
                  ("sdpa fwd time / stats-off fwd time", r(n4, "sdpa", "stats-off"), ">=", 0.9),
                  ("col-pass / stats-off fwd", r(n4, "col-pass", "stats-off"), "<=", 0.3)]
    else:
        on, eager = results.get((n4, "stats-on")), results.get((n4, "eager+maps"))
        mem = None if on is None or eager is None else on[1] / eager[1]
        checks = [(f"{impl} all-stats peak mem / eager peak mem", mem, "<=", 1 / 8),
                  (f"{impl} stats-off peak mem / eager peak mem",
                   None if eager is None else results[(n4, "stats-off")][1] / eager[1], "<=", 1 / 8)]
    print(f"acceptance at N={n4}:")
    for name, val, op, lim in checks:
        if val is None:
            lines.append(f"  {name:<48} n/a")
            continue
        ok = val <= lim if op == "<=" else val >= lim
        lines.append(f"  {name:<48} {val:8.3f}  (want {op} {lim:.3f})  {'PASS' if ok else 'FAIL'}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
