"""The reference itself: against SDPA in float64 and against the papers' definitions
written as plain loops (tiny sizes), so the ground truth is not just trusted."""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import StatsSpec
from kernels.reference import reference_attention
from kernel_testlib import make_case, torch_attention, valid_rows


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_reference_output_matches_sdpa_float64(layout, gen):
    case = make_case(gen, layout=layout, lens=(1, 9, 20), hq=4, group=2, d=16, dtype=torch.float64)
    out, _ = reference_attention(case.q, case.k, case.v, **case.kw)
    sdpa = torch_attention(case, case.q, case.k, case.v)
    rows = valid_rows(case)
    assert torch.allclose(out, sdpa, atol=1e-12)
    if layout == "padded":  # padding rows are exactly zero
        assert (out.transpose(1, 2)[~rows] == 0).all()


def test_reference_statistics_match_loop_definitions(gen):
    n, d, W, lo, hi = 9, 8, 3, 2, 4
    g = gen
    q, k, v = (torch.randn(n, 1, d, generator=g, dtype=torch.float64) for _ in range(3))
    cls = torch.randint(-1, 2, (n,), generator=g)
    resp = torch.rand(n, generator=g) > 0.4
    spec = StatsSpec(entropy=True, distance=True, waad_window=W, key_classes=cls, n_classes=2,
                     fai_band=(lo, hi), response_mask=resp)
    _, st = reference_attention(q, k, v, cu_seqlens=torch.tensor([0, n]), stats=spec)
    s = (q[:, 0] @ k[:, 0].T) / math.sqrt(d)
    P = [[0.0] * n for _ in range(n)]
    for i in range(n):
        z = sum(math.exp(s[i, j]) for j in range(i + 1))
        for j in range(i + 1):
            P[i][j] = math.exp(s[i, j]) / z
        assert st.lse[i, 0] == pytest.approx(math.log(z), rel=1e-12)
        assert st.entropy[i, 0] == pytest.approx(-sum(p * math.log(p) for p in P[i][: i + 1]), rel=1e-10)
        assert st.distance[i, 0] == pytest.approx(sum(P[i][j] * (i - j) for j in range(i + 1)), rel=1e-10, abs=1e-12)
        assert st.waad[i, 0] == pytest.approx(sum(P[i][j] * min(i - j, W) for j in range(i + 1)), rel=1e-10, abs=1e-12)
        # the papers' cheap form: W - sum_{j<W} (W - j) p_{i, i-j}
        assert st.waad[i, 0] == pytest.approx(W - sum((W - t) * P[i][i - t] for t in range(W) if i - t >= 0), abs=1e-10)
        for c in range(2):
            assert st.mass[i, 0, c] == pytest.approx(sum(P[i][j] for j in range(i + 1) if cls[j] == c), abs=1e-12)
    for j in range(n):
        rows_ = [i for i in range(j + lo, min(n - 1, j + hi) + 1) if resp[i]]
        want = sum(P[i][j] for i in rows_) / len(rows_) if rows_ else 0.0
        assert st.fai_count[j] == len(rows_)
        assert st.fai[j, 0] == pytest.approx(want, abs=1e-12)


def test_reference_packed_equals_padded(gen):
    case = make_case(gen, layout="packed", lens=(5, 12), hq=2, group=1, d=16, dtype=torch.float64)
    out_p, st_p = reference_attention(case.q, case.k, case.v, stats=case.spec, **case.kw)
    # the same two sequences as a right-padded batch
    N = 12
    pad = lambda x, a, b: F.pad(x[a:b].transpose(0, 1), (0, 0, 0, N - (b - a)))
    q = torch.stack([pad(case.q, 0, 5), pad(case.q, 5, 17)])
    k = torch.stack([pad(case.k, 0, 5), pad(case.k, 5, 17)])
    v = torch.stack([pad(case.v, 0, 5), pad(case.v, 5, 17)])
    am = torch.zeros(2, N, dtype=torch.long)
    am[0, :5], am[1, :] = 1, 1
    side = lambda t, fill: torch.stack([F.pad(t[:5], (0, N - 5), value=fill), t[5:]])
    spec = case.spec.replace(key_classes=side(case.spec.key_classes, -1), response_mask=side(case.spec.response_mask, 0))
    out_b, st_b = reference_attention(q, k, v, attention_mask=am, stats=spec)
    assert torch.allclose(out_b[0, :, :5].transpose(0, 1), out_p[:5]) and torch.allclose(out_b[1].transpose(0, 1), out_p[5:])
    for name, t in st_p.fields().items():
        b = st_b.fields()[name]
        if name == "fai_count":
            assert torch.equal(torch.cat([b[0, :5], b[1]]), t)
        else:
            assert torch.allclose(torch.cat([b[0, :, :5].transpose(0, 1), b[1].transpose(0, 1)]), t), name
