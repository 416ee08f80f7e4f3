"""Shared helpers for the kernel tests: random cases, PyTorch's own same-precision
attention (the error yardstick), and the comparison rules of the spec (§5).

Rules: outputs/gradients may be at most 2x as far from the float64 reference as
PyTorch's own attention at the same precision (plus a tiny floor for fp32, where both
errors are at the level of the final rounding); statistics within 1e-5 * (1 + |ref|).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import StatsSpec
from kernels.reference import reference_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor | None
    attention_mask: torch.Tensor | None
    spec: StatsSpec
    gen: torch.Generator  # the CPU generator the case was drawn from; later draws for it too

    @property
    def kw(self):
        return {"cu_seqlens": self.cu_seqlens, "attention_mask": self.attention_mask}

    @property
    def n_tok(self):
        return self.q.shape[0] if self.cu_seqlens is not None else self.q.shape[0] * self.q.shape[2]


def randn_as(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like `x` (its dtype and device), drawn from the CPU `gen`."""
    return torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)


def seeded_model(build, gen: torch.Generator, std: float = 0.02) -> torch.nn.Module:
    """`build()` (a transformers model), with every matrix (linear, embedding) redrawn from
    `gen` with the models' own N(0, initializer_range) init; vectors (norm weights: ones) are
    not random. The constructor's own init draws from the global RNG: it runs inside
    fork_rng, so the global stream is left as it was, and its values are all overwritten."""
    with torch.random.fork_rng(devices=[]):
        model = build()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, 0.0, std, generator=gen)
    return model


def make_case(gen: torch.Generator, *, layout="packed", lens=(1, 17, 45), hq=4, group=2, d=32, dtype=torch.float32,
              logit_scale=1.0, waad=5, band=(3, 20), n_classes=3, response=True, device=DEV) -> Case:
    """Random case (never zeros) drawn from the CPU generator `gen` (the test's `gen` fixture).
    Packed: sequences of `lens`; padded: one row per length, alternately right- and
    left-padded to max(lens)."""
    g = gen
    hkv = hq // group
    rnd = lambda *s: torch.randn(*s, generator=g)
    if layout == "packed":
        T = sum(lens)
        q, k, v = rnd(T, hq, d), rnd(T, hkv, d), rnd(T, hkv, d)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        am = None
        tok_shape = (T,)
    else:
        B, N = len(lens), max(lens)
        q, k, v = rnd(B, hq, N, d), rnd(B, hkv, N, d), rnd(B, hkv, N, d)
        am = torch.zeros(B, N, dtype=torch.long)
        for b, n in enumerate(lens):
            if b % 2:
                am[b, N - n:] = 1  # left padding
            else:
                am[b, :n] = 1  # right padding
        cu = None
        tok_shape = (B, N)
    q = q * logit_scale  # large logits: x30 makes p nearly one-hot
    classes = torch.randint(-1, n_classes, tok_shape, generator=g) if n_classes else None
    resp = (torch.rand(tok_shape, generator=g) > 0.3) if response else None
    spec = StatsSpec(entropy=True, distance=True, waad_window=waad, key_classes=classes, n_classes=n_classes,
                     fai_band=band, response_mask=resp)
    to = lambda x: None if x is None else x.to(device)
    spec = spec.replace(key_classes=to(classes), response_mask=to(resp))
    return Case(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), to(cu), to(am), spec, g)


def valid_rows(case: Case) -> torch.Tensor:
    """Bool mask over output rows that are real tokens ([T] or [B, N])."""
    if case.cu_seqlens is not None:
        return torch.ones(case.q.shape[0], dtype=torch.bool, device=case.q.device)
    return case.attention_mask.bool()


def torch_attention(case: Case, q, k, v) -> torch.Tensor:
    """PyTorch's own attention (SDPA) in the inputs' precision, one sequence at a time;
    padding rows are 0. Differentiable (the yardstick for gradients too)."""
    hq, hkv = (q.shape[1], k.shape[1])
    outs = []
    if case.cu_seqlens is not None:
        cu = case.cu_seqlens.tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            if b == a:
                continue
            o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                               v[a:b].transpose(0, 1)[None], is_causal=True, enable_gqa=hq != hkv)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs, 0)
    rows = []
    for b in range(q.shape[0]):
        m = case.attention_mask[b].bool()
        idx = m.nonzero().flatten()
        o = F.scaled_dot_product_attention(q[b:b + 1, :, idx], k[b:b + 1, :, idx], v[b:b + 1, :, idx],
                                           is_causal=True, enable_gqa=hq != hkv)
        full = torch.zeros_like(q[b:b + 1])
        full = full.index_copy(2, idx, o)
        rows.append(full)
    return torch.cat(rows, 0)


def max_err(x, ref, rows):
    sel = (lambda t: t[rows]) if rows.dim() == 1 else (lambda t: t.transpose(1, 2)[rows])
    return (sel(x).double() - sel(ref).double()).abs().max().item()


def assert_within_torch_error(ours, ref64, torch_same, rows, what, floor=None):
    """The spec's rule: our error <= 2x PyTorch's own same-precision error (+ floor)."""
    e_ours, e_torch = max_err(ours, ref64, rows), max_err(torch_same, ref64, rows)
    if floor is None:
        floor = 1e-6 * (1 + ref64.abs().max().item()) if ours.dtype == torch.float32 else 0.0
    assert e_ours <= 2 * e_torch + floor, f"{what}: error {e_ours:.3g} > 2 x torch's {e_torch:.3g} (+{floor:.1g})"


def assert_stats_close(stats, ref_stats, rows, names=None):
    """Every statistic within 1e-5 * (1 + |ref|) of the float64 reference."""
    ours, ref = stats.fields(), ref_stats.fields()
    for name in names or ref:
        a, r = ours[name].double(), ref[name].double()
        assert a.shape == r.shape, (name, a.shape, r.shape)
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        tol = 1e-5 * (1 + r.abs())
        bad = (a - r).abs() > tol
        assert not bad.any(), f"{name}: max err {(a - r).abs().max().item():.3g} at {bad.nonzero()[:3].tolist()}"


def reference(case: Case, spec=None, grad=False):
    q, k, v = (x.detach().double().requires_grad_(grad) for x in (case.q, case.k, case.v))
    out, st = reference_attention(q, k, v, stats=spec if spec is not None else case.spec, **case.kw)
    return (q, k, v), out, st



def check_against_reference(case: Case, impl: str, grad: bool = True, spec=None):
    """Outputs, gradients and every statistic of `impl` against the float64 reference."""
    from kernels import attention

    spec = case.spec if spec is None else spec
    rows = valid_rows(case)
    q, k, v = (x.detach().clone().requires_grad_(grad) for x in (case.q, case.k, case.v))
    out, st = attention(q, k, v, stats=spec, impl=impl, **case.kw)
    (q64, k64, v64), ref, ref_st = reference(case, spec, grad=grad)
    qt, kt, vt = (x.detach().clone().requires_grad_(grad) for x in (case.q, case.k, case.v))
    tout = torch_attention(case, qt, kt, vt)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape[:-1] + case.v.shape[-1:]
    assert torch.isfinite(out).all()
    assert_within_torch_error(out, ref, tout, rows, "out")
    assert_stats_close(st, ref_st, rows)
    if grad:
        g = randn_as(ref, case.gen)
        torch.autograd.backward(out, g.to(out.dtype))
        torch.autograd.backward(ref, g)
        torch.autograd.backward(tout, g.to(tout.dtype))
        for name, a, r, t in (("dq", q, q64, qt), ("dk", k, k64, kt), ("dv", v, v64, vt)):
            assert torch.isfinite(a.grad).all(), name
            assert_within_torch_error(a.grad, r.grad, t.grad, rows, name)  # k/v share q's token layout


def check_invariants(case: Case, impl: str):
    """Spec §5 invariants, independent of the reference implementation."""
    from kernels import StatsSpec, attention

    rows = valid_rows(case)
    spec = case.spec.replace(fai_band=(1, None), response_mask=None)
    out, st = attention(case.q, case.k, case.v, stats=spec, impl=impl, **case.kw)
    out_off = attention(case.q, case.k, case.v, impl=impl, **case.kw)
    _, st_lse = attention(case.q, case.k, case.v, stats=StatsSpec(), impl=impl, **case.kw)
    assert torch.equal(out, out_off), "stats-on and stats-off outputs differ"
    assert torch.equal(st.lse, st_lse.lse), "stats-on and stats-off lse differ"
    pos, s_diag, s_max = _positions_and_logits(case)
    eps = 1e-5
    sel = (lambda t: t[rows]) if rows.dim() == 1 else (lambda t: t.transpose(1, 2)[rows])  # -> [tok, H, ...]
    p_pos = pos[rows][:, None].double()  # [tok, 1]
    mass = sel(st.mass)
    assert (mass >= -eps).all() and (mass <= 1 + eps).all() and (mass.sum(-1) <= 1 + eps).all()
    ent = sel(st.entropy).double()
    assert (ent >= -eps).all() and (ent <= torch.log(p_pos + 1) + eps).all()
    waad = sel(st.waad).double()
    assert (waad >= -eps).all() and (waad <= p_pos.clamp(max=spec.waad_window) + eps * (1 + p_pos)).all()
    assert (sel(st.lse).double() >= sel(s_max) - eps).all()
    # sum of the full future column sums = sum over rows of (1 - p_ii)
    p_diag = torch.exp(sel(s_diag) - sel(st.lse).double())
    lhs, rhs = sel(st.fai_sum).double().sum(0), (1 - p_diag).sum(0)
    assert torch.allclose(lhs, rhs, rtol=1e-5, atol=1e-5 * lhs.numel()), (lhs, rhs)


def _positions_and_logits(case):
    """pos (position in sequence), s_ii and max_j s_ij, in the statistics' layout."""
    from kernels.spec import make_layout, token_positions

    layout = make_layout(case.q, case.k, case.v, case.cu_seqlens, case.attention_mask)
    pos, _ = token_positions(layout, case.q.device)
    scale = case.q.shape[-1] ** -0.5
    packed = case.cu_seqlens is not None
    hq = case.q.shape[1]
    hkv = case.k.shape[1]
    q, k = case.q.double(), case.k.double()
    k = k.repeat_interleave(hq // hkv, dim=1)
    if packed:
        s_diag = (q * k).sum(-1) * scale  # [T, H]
        s_max = torch.full_like(s_diag, float("-inf"))
        for a, b in zip(case.cu_seqlens.tolist()[:-1], case.cu_seqlens.tolist()[1:]):
            s = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) * scale
            s = s.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool, device=s.device).tril(), float("-inf"))
            s_max[a:b] = s.amax(-1).transpose(0, 1)
        return pos, s_diag, s_max
    s_diag = (q * k).sum(-1) * scale  # [B, H, N]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    am = case.attention_mask.bool()
    ok = am[:, None, :, None] & am[:, None, None, :] & torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    s_max = s.masked_fill(~ok, float("-inf")).amax(-1)
    return pos, s_diag, s_max
