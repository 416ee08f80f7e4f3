"""Preplan/anchor credit on hand-built statistics, checked against papers.md §1 formulas.

Three layers of checks: hand-worked examples (numbers written out below), a literal
per-response loop implementation of the §1.13 pseudocode compared with the vectorised batch
code on random statistics, and explicit attention matrices (GQA) → WAAD/FAI/head groups by the
formulas, compared with the statistics our kernels emit feeding `attention_credit`.
"""
from __future__ import annotations

import math

import pytest
import torch

from rl.batch import RolloutBatch
from rl.methods.credit import build
from rl.methods.credit.preplan_anchor import (PreplanAnchorParams, attention_credit, gamma_from_sets, head_groups,
                                      next_delta, row_quantile, top_q_mask, token_sets)

P = PreplanAnchorParams()


def _mask(B, T, spans):
    m = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, e) in enumerate(spans):
        m[b, s:e] = True
    return m


# --- TopQ, quantiles, Δ ---------------------------------------------------------------------

def test_top_q_basic_and_float_rounding():
    x = torch.tensor([[0.0, 5.0, 1.0, 4.0, 2.0, 3.0]])
    resp = _mask(1, 6, [(1, 6)])  # response = [5, 1, 4, 2, 3]: q·n = 0.4·5 = 2 (not 3 by float error)
    sel, thr = top_q_mask(x, resp, 0.4)
    assert sel.tolist() == [[False, True, False, True, False, False]]
    assert thr.item() == 4.0


def test_top_q_ties_at_the_quantile_are_all_kept():
    x = torch.tensor([[9.0, 3.0, 3.0, 3.0, 1.0]])
    sel, thr = top_q_mask(x, torch.ones(1, 5, dtype=torch.bool), 0.4)  # k = 2: threshold 3
    assert thr.item() == 3.0
    assert sel.tolist() == [[True, True, True, True, False]]


def test_top_q_all_equal_and_empty_select_nothing():
    x = torch.full((2, 5), 0.7)
    resp = _mask(2, 5, [(0, 5), (0, 0)])
    sel, thr = top_q_mask(x, resp, 0.4)
    assert not sel.any() and torch.isinf(thr).all()


def test_top_q_ignores_prompt_values():
    x = torch.tensor([[100.0, 100.0, 1.0, 2.0, 3.0]])
    sel, _ = top_q_mask(x, _mask(1, 5, [(2, 5)]), 0.4)  # k = ceil(1.2) = 2 over the response
    assert sel.tolist() == [[False, False, False, True, True]]


def test_row_quantile_is_the_lower_median():
    x = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0]])
    assert row_quantile(x, _mask(1, 5, [(0, 4)]), 0.5).item() == 2.0  # {1,2,3,4}: lower median 2


def test_delta_last_token_and_prompt_are_zero():
    w = torch.tensor([[7.0, 1.0, 4.0, 2.0, 9.0]])
    d = next_delta(w, _mask(1, 5, [(1, 4)]))  # response = positions 1..3
    assert d.tolist() == [[0.0, 3.0, 2.0, 0.0, 0.0]]


# --- a hand-worked coupled example ------------------------------------------------------------

def test_coupled_hand_worked_example():
    # Response of 10 tokens (positions 0..9, no prompt). WAAD spikes at 2, anchors at 3 and 7.
    waad = torch.tensor([[1.0, 1.0, 6.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0]])
    fai = torch.tensor([[0.1, 0.0, 0.2, 0.9, 0.1, 0.0, 0.3, 0.8, 0.0, 0.0]])
    resp = torch.ones(1, 10, dtype=torch.bool)
    s = token_sets(waad, fai, resp, P)
    # Δ = |w_t − w_{t+1}| = [0, 5, 5, 1, 0, 0, 1, 0, 0, 0(last)]; k = ceil(4) = 4 → 4th largest = 1
    assert s.delta.tolist() == [[0, 5, 5, 1, 0, 0, 1, 0, 0, 0]]
    assert s.preplan.nonzero()[:, 1].tolist() == [1, 2, 3, 6]
    # FAI top 4: 0.9, 0.8, 0.3, 0.2 → tokens 3, 7, 6, 2
    assert s.anchor.nonzero()[:, 1].tolist() == [2, 3, 6, 7]
    # τ_waad = lower median of sorted waad [1,1,1,2,2,2,3,3,3,6] = 2; τ_Δ = 1.
    # Token 3: waad 1 ≤ 2, max Δ over 0..2 = 5 ≥ 1 → dominated, intro = argmax → 1 (earliest of 5, 5).
    # Token 6: waad 2 ≤ 2, max Δ over 3..5 = 1 ≥ 1 → dominated, intro = 3.
    # Token 2: waad 6 > 2 → not dominated. Token 7: waad 3 > 2 → not dominated.
    assert s.dominated.nonzero()[:, 1].tolist() == [3, 6]
    assert s.intro.nonzero()[:, 1].tolist() == [1, 3]
    g = gamma_from_sets("coupled", s, P)[0]
    b, a = 0.5, 0.5
    expect = [1, 1 + a * b, 1 + b, 1 + (1 - a) * b + a * b, 1, 1, 1 + (1 - a) * b, 1 + b, 1, 1]
    assert g.tolist() == pytest.approx(expect)
    assert gamma_from_sets("local_chunk", s, P)[0].tolist() == pytest.approx(
        [1, 1.5, 1.5, 1.5, 1, 1, 1.5, 1, 1, 1])
    assert gamma_from_sets("global_anchor", s, P)[0].tolist() == pytest.approx(
        [1, 1, 1.5, 1.5, 1, 1, 1.5, 1.5, 1, 1])


def test_bottom_rank_hand_worked_example():
    # The example above with rank=bottom (the paper's bottom-40% ablation).
    waad = torch.tensor([[1.0, 1.0, 6.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0]])
    fai = torch.tensor([[0.1, 0.0, 0.2, 0.9, 0.1, 0.0, 0.3, 0.8, 0.0, 0.0]])
    p = PreplanAnchorParams(rank="bottom")
    s = token_sets(waad, fai, torch.ones(1, 10, dtype=torch.bool), p)
    # Δ = [0, 5, 5, 1, 0, 0, 1, 0, 0, 0]: the 4th smallest is 0 and ties are kept → six tokens
    assert s.preplan.nonzero()[:, 1].tolist() == [0, 4, 5, 7, 8, 9]
    # FAI > 0 on tokens 0, 2, 3, 4, 6, 7 (n = 6, ⌈2.4⌉ = 3): the 3rd smallest is 0.2 → 0, 2, 4
    assert s.anchor.nonzero()[:, 1].tolist() == [0, 2, 4]
    # token 4: waad 2 ≤ 2 and max Δ over 1..3 = 5 ≥ τ_Δ = 1 (the top's) → dominated, intro 1;
    # token 0 has no tokens before it, token 2's waad 6 > 2
    assert s.dominated.nonzero()[:, 1].tolist() == [4]
    assert s.intro.nonzero()[:, 1].tolist() == [1]
    assert gamma_from_sets("coupled", s, p)[0].tolist() == pytest.approx(
        [1.5, 1.25, 1.5, 1, 1.25, 1, 1, 1, 1, 1])


def test_all_equal_statistics_give_plain_grpo():
    resp = torch.ones(2, 12, dtype=torch.bool)
    s = token_sets(torch.full((2, 12), 3.0), torch.full((2, 12), 0.2), resp, P)
    for strat in ("local_chunk", "global_anchor", "coupled"):
        assert torch.equal(gamma_from_sets(strat, s, P), torch.ones(2, 12))


# --- the literal pseudocode vs the vectorised batch code --------------------------------------

def literal_gamma(w, f, p, strategy):
    """papers.md §1.13 for one response, in plain Python lists."""
    n, b = len(w), p.gamma_amp - 1

    def topq(x):
        if n == 0 or max(x) == min(x):
            return set(), math.inf
        k = max(1, math.ceil(p.top_q * n - 1e-9))
        thr = sorted(x, reverse=True)[k - 1]
        return {i for i in range(n) if x[i] >= thr}, thr

    delta = [abs(w[i] - w[i + 1]) for i in range(n - 1)] + [0.0]
    t_loc, thr_d = topq(delta)
    t_glob = {i for i in topq(f)[0] if f[i] > 0}
    med = sorted(w)[(n - 1) // 2]
    dom, intro = set(), set()
    for t in t_glob:
        prev = list(range(max(0, t - p.k), t))
        if prev and w[t] <= med and max(delta[u] for u in prev) >= thr_d:
            dom.add(t)
            intro.add(max(prev, key=lambda u: (delta[u], -u)))  # earliest on ties
    g = [1.0] * n
    for t in range(n):
        if strategy == "local_chunk":
            g[t] += b * (t in t_loc)
        elif strategy == "global_anchor":
            g[t] += b * (t in t_glob)
        else:
            g[t] += b * (t in t_glob and t not in dom) + (1 - p.alpha) * b * (t in dom) + p.alpha * b * (t in intro)
    return g


@pytest.mark.parametrize("strategy", ["local_chunk", "global_anchor", "coupled"])
def test_batch_code_matches_literal_pseudocode(strategy):
    gen = torch.Generator().manual_seed(0)
    B, T = 24, 40
    spans = []
    for b in range(B):
        start = int(torch.randint(0, 10, (1,), generator=gen))
        length = [1, 2, 3, 7, 30][b % 5]
        spans.append((start, min(T, start + length)))
    resp = _mask(B, T, spans)
    # coarse values so that ties (at quantiles, in argmax) actually occur
    waad = torch.randint(0, 6, (B, T), generator=gen).float()
    fai = torch.randint(0, 5, (B, T), generator=gen).float() / 10
    s = token_sets(waad, fai, resp, P)
    g = gamma_from_sets(strategy, s, P)
    for b, (st, en) in enumerate(spans):
        want = literal_gamma(waad[b, st:en].tolist(), fai[b, st:en].tolist(), P, strategy)
        assert g[b, st:en].tolist() == pytest.approx(want), (b, st, en)


# --- from attention matrices: head groups, WAAD, FAI (GQA) -----------------------------------

def _attention_matrices(q, k):
    """Explicit causal softmax maps [B, Hq, N, N] (GQA by repeating kv heads)."""
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1)
    s = q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    N = q.shape[2]
    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1)


def test_from_gqa_attention_matrices():
    from kernels import StatsSpec, attention

    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, N, d = 2, 4, 2, 48, 16
    layers = {3: None, 5: None}
    resp = _mask(B, N, [(8, 48), (20, 48)])
    spec = StatsSpec(distance=True, waad_window=10, fai_band=(10, 100), response_mask=resp)
    A, stats = {}, {}
    for layer in layers:
        q = torch.randn(B, Hq, N, d, dtype=torch.float64, generator=gen) * 2
        k = torch.randn(B, Hkv, N, d, dtype=torch.float64, generator=gen) * 2
        v = torch.randn(B, Hkv, N, d, dtype=torch.float64, generator=gen)
        A[layer] = _attention_matrices(q, k)
        _, st = attention(q, k, v, stats=spec, impl="blockwise")
        stats[layer] = st.fields()
    gamma, trace, dist = attention_credit(stats, resp, "coupled", P)

    # pool = 2 layers × 4 query heads; d by the §1.4 formula over all response rows of the batch
    pool = torch.cat([A[l] for l in sorted(A)], dim=1)  # [B, 8, N, N]
    t = torch.arange(N, dtype=torch.float64)
    dist_rows = (pool * (t[:, None] - t[None, :]).clamp(min=0)).sum(-1)  # [B, 8, N]
    d_ref = (dist_rows * resp[:, None]).sum((0, 2)) / resp.sum()
    assert torch.allclose(dist.double(), d_ref, atol=1e-4)
    n = round(0.3 * 8)
    order = torch.argsort(d_ref)
    assert sorted(trace.local_heads) == sorted(order[:n].tolist())
    assert sorted(trace.global_heads) == sorted(order[-n:].tolist())
    # WAAD on the head-mean map of local heads; FAI on the head-mean map of global heads
    A_loc = pool[:, trace.local_heads].mean(1)
    A_glob = pool[:, trace.global_heads].mean(1)
    waad_ref = (A_loc * (t[:, None] - t[None, :]).clamp(min=0, max=10)).sum(-1)
    gap = t[:, None] - t[None, :]  # [row t, key s]
    band = (gap >= 10) & (gap <= 100)
    fai_ref = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        rows = band & resp[b][:, None]
        cnt = rows.sum(0)
        fai_ref[b] = torch.where(cnt > 0, (A_glob[b] * rows).sum(0) / cnt.clamp(min=1), 0.0)
    assert torch.allclose(trace.sets.waad.double(), waad_ref * resp, atol=1e-4)
    assert torch.allclose(trace.sets.fai.double(), fai_ref * resp, atol=1e-5)
    # the last H_lo response tokens have an empty band: FAI 0, never anchors
    assert (trace.sets.fai[:, -10:] == 0).all() and not trace.sets.anchor[:, -10:].any()
    # γ equals the formulas applied to the reference statistics
    s_ref = token_sets(waad_ref.float(), fai_ref.float(), resp, P)
    assert torch.allclose(gamma, torch.where(resp, gamma_from_sets("coupled", s_ref, P), torch.ones(())))


def test_response_shorter_than_h_lo_gets_no_anchor():
    from kernels import StatsSpec, attention

    gen = torch.Generator().manual_seed(1)
    B, H, N = 1, 2, 20
    resp = _mask(B, N, [(12, 20)])  # 8 response tokens < H_lo = 10
    q, k, v = (torch.randn(B, H, N, 64, generator=gen) for _ in range(3))
    spec = StatsSpec(distance=True, waad_window=10, fai_band=(10, 100), response_mask=resp)
    _, st = attention(q, k, v, stats=spec, impl="blockwise")
    gamma, trace, _ = attention_credit({0: st.fields()}, resp, "global_anchor", P)
    assert (trace.sets.fai == 0).all()
    assert torch.equal(gamma, torch.ones(B, N))
    # local-chunk still works on such a response (WAAD needs no future rows)
    gamma_l, trace_l, _ = attention_credit({0: st.fields()}, resp, "local_chunk", P)
    # Independently, from the explicit maps: a pool of 2 heads → round(0.3·2) = 1 local head,
    # the one with the smaller mean look-back distance over the 8 response rows; WAAD (W = 10)
    # of that head; the literal pseudocode's local-chunk γ on those 8 tokens.
    A = _attention_matrices(q.double(), k.double())[0]  # [H, N, N]
    t = torch.arange(N, dtype=torch.float64)
    gap = (t[:, None] - t[None, :]).clamp(min=0)
    d_head = (A * gap).sum(-1)[:, 12:].mean(-1)  # [H]
    local = int(d_head.argmin())
    assert trace_l.local_heads == [local]
    waad = (A[local] * gap.clamp(max=10)).sum(-1)[12:].tolist()
    want = literal_gamma(waad, [0.0] * 8, P, "local_chunk")
    assert gamma_l[0, 12:].tolist() == pytest.approx(want)
    assert torch.equal(gamma_l[0, :12], torch.ones(12))
    # TopQ keeps ⌈0.4·8⌉ = 4 of the 8 Δ values (continuous random data: no ties)
    assert sum(g > 1 for g in want) == 4
    assert trace_l.sets.preplan.sum() == 4 and trace_l.sets.preplan[0, 12:].tolist() == [g > 1 for g in want]


def test_head_groups_single_head_pool():
    local, glob, d = head_groups(torch.rand(2, 1, 5, generator=torch.Generator().manual_seed(2)),
                                 torch.ones(2, 5, dtype=torch.bool), 0.3)
    assert local.tolist() == [0] and glob.tolist() == [0]


# --- the method object: sign switch, baselines, config validation ----------------------------

def _batch(B=4, T=16, prompt=4):
    resp = _mask(B, T, [(prompt, T)] * B)
    return RolloutBatch(
        input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.bool),
        response_mask=resp, sampler_logprobs=torch.zeros(B, T), token_classes=torch.zeros(B, T, dtype=torch.int8),
        group_ids=torch.zeros(B, dtype=torch.long), rewards=torch.zeros(B), token_weights=torch.ones(B, T),
        entropy=torch.rand(B, T, generator=torch.Generator().manual_seed(3)) * resp,
        seq_advantages=torch.tensor([1.0, -1.0, 0.0, -0.5]))


def test_entropy_baseline_picks_highest_entropy():
    batch = _batch()
    m = build("entropy", {})(batch, step=0)
    for b in range(4):
        ent = batch.entropy[b, 4:]
        k = math.ceil(0.4 * 12)
        top = set(ent.argsort(descending=True)[:k].tolist())
        assert set((batch.token_weights[b, 4:] > 1).nonzero()[:, 0].tolist()) == top
    assert m["selected_share"] == pytest.approx(5 / 12)
    assert (batch.token_weights[:, :4] == 1).all()


def test_random_baseline_is_seeded_and_sized():
    a, b, c = _batch(), _batch(), _batch()
    build("random", {}, seed=1)(a, step=7)
    build("random", {}, seed=1)(b, step=7)
    build("random", {}, seed=1)(c, step=8)
    assert torch.equal(a.token_weights, b.token_weights)
    assert not torch.equal(a.token_weights, c.token_weights)
    assert ((a.token_weights[:, 4:] > 1).sum(1) == 5).all()


def test_positive_only_leaves_negative_advantages_alone():
    batch = _batch()
    build("entropy", {"positive_only": True})(batch, step=0)
    amplified = (batch.token_weights > 1).any(1).tolist()
    assert amplified == [True, False, True, False]  # advantages 1, -1, 0, -0.5


def test_unknown_or_bad_param_is_named():
    with pytest.raises(ValueError, match="credit.params.gama_amp"):
        build("coupled", {"gama_amp": 2.0})
    with pytest.raises(ValueError, match="top_q"):
        build("coupled", {"top_q": 1.5})
    with pytest.raises(ValueError, match="unknown"):
        build("copuled", {})


def test_stats_request_only_for_attention_strategies():
    assert build("coupled", {}).stats_request() == {"distance": True, "waad_window": 10, "fai_band": [10, 100]}
    assert build("random", {}).stats_request() is None
    assert build("none", {}).stats_request() is None
