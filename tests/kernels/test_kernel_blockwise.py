"""The CPU path (blockwise, query-chunked PyTorch) against the float64 reference:
outputs and gradients within 2x PyTorch's own error, statistics within 1e-5 (1 + |ref|),
the spec's invariants, deferred FAI in the backward, and the differentiable class mass."""

import pytest
import torch

import kernels.blockwise as blockwise
from kernels import StatsSpec, attention, key_class_mass
from kernels.reference import reference_attention
from kernel_testlib import check_against_reference, check_invariants, make_case, randn_as


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several query chunks even at test sizes (the chunk boundary is a bug site)."""
    monkeypatch.setattr(blockwise, "CHUNK_BYTES", 4 * 4 * 16 * 64)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_blockwise_matches_reference(layout, group, d, dtype, fused, small_chunks, monkeypatch, gen):
    """Both ways of getting out / lse / grads: torch's fused CPU op and the chunked ops."""
    monkeypatch.setattr(blockwise, "FUSED", fused)
    case = make_case(gen, layout=layout, lens=(1, 17, 45), hq=4, group=group, d=d, dtype=dtype)
    check_against_reference(case, "blockwise")


def test_blockwise_unpadded_batch_is_one_segment(small_chunks, gen):
    """A padded layout without padding runs as one dense batch (no per-row loop)."""
    case = make_case(gen, layout="padded", lens=(40, 40), hq=4, group=2, d=32)
    check_against_reference(case, "blockwise")


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_blockwise_large_logits(layout, small_chunks, gen):
    case = make_case(gen, layout=layout, lens=(3, 40), hq=2, group=2, d=32, logit_scale=30.0, band=(1, None))
    check_against_reference(case, "blockwise")


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_blockwise_invariants(layout, small_chunks, gen):
    check_invariants(make_case(gen, layout=layout, lens=(1, 17, 45), hq=4, group=2, d=32, waad=6), "blockwise")


def test_blockwise_stats_without_response_mask_or_classes(gen):
    case = make_case(gen, layout="padded", lens=(30, 12), hq=2, group=1, d=32, n_classes=0, response=False)
    check_against_reference(case, "blockwise", grad=False)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_fai_in_backward_equals_column_pass(layout, small_chunks, gen):
    case = make_case(gen, layout=layout, lens=(1, 17, 45), hq=4, group=2, d=32)
    _, st_fwd = attention(case.q, case.k, case.v, stats=case.spec, impl="blockwise", **case.kw)
    q, k, v = (x.clone().requires_grad_() for x in (case.q, case.k, case.v))
    spec = case.spec.replace(fai_in_backward=True)
    out, st = attention(q, k, v, stats=spec, impl="blockwise", **case.kw)
    assert torch.isnan(st.fai_sum).all(), "deferred FAI must read NaN until the backward ran"
    out.backward(randn_as(out, gen))
    assert torch.allclose(st.fai_sum, st_fwd.fai_sum, atol=1e-6) and torch.allclose(st.fai, st_fwd.fai, atol=1e-6)
    # without a backward (no_grad), the column pass runs in the forward instead
    with torch.no_grad():
        _, st_ng = attention(case.q, case.k, case.v, stats=spec, impl="blockwise", **case.kw)
    assert torch.allclose(st_ng.fai_sum, st_fwd.fai_sum, atol=1e-6)


@pytest.mark.parametrize("impl", ["blockwise", "reference"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_key_class_mass_is_exact_and_differentiable(layout, impl, gen):
    case = make_case(gen, layout=layout, lens=(4, 33), hq=4, group=2, d=32)
    C = case.spec.n_classes
    q, k = (x.clone().requires_grad_() for x in (case.q, case.k))
    mass = key_class_mass(q, k, case.spec.key_classes, C, impl=impl, **case.kw)
    q64, k64 = (x.detach().double().requires_grad_() for x in (case.q, case.k))
    _, ref = reference_attention(q64, k64, case.v.double(), stats=StatsSpec(key_classes=case.spec.key_classes, n_classes=C),
                                 **case.kw)
    assert torch.allclose(mass.double(), ref.mass, atol=1e-5)
    # the reference's mass is computed under no_grad; rebuild it differentiably from p
    w = randn_as(ref.mass, gen)
    (mass * w.float()).sum().backward()
    onehot = torch.stack([case.spec.key_classes == c for c in range(C)], -1).double()
    v_ind = onehot[:, None].expand(-1, k.shape[1], -1) if layout == "packed" else onehot[:, None].expand(-1, k.shape[1], -1, -1)
    m64, _ = reference_attention(q64, k64, v_ind.contiguous(), **case.kw)
    (m64 * w).sum().backward()
    assert torch.allclose(q.grad.double(), q64.grad, atol=1e-5) and torch.allclose(k.grad.double(), k64.grad, atol=1e-5)
    assert q.grad.abs().sum() > 0


def test_api_rejects_misuse(gen):
    case = make_case(gen, layout="padded", lens=(5, 8), hq=4, group=2, d=32)
    bad = case.attention_mask.clone()
    bad[0, 1] = 0
    bad[0, 3] = 1  # a hole in the middle of a row
    with pytest.raises(ValueError, match="contiguous"):
        attention(case.q, case.k, case.v, attention_mask=bad)
    with pytest.raises(ValueError, match="multiple"):
        attention(case.q[:, :3], case.k, case.v)
    with pytest.raises(NotImplementedError):
        attention(case.q, case.k, case.v, causal=False)
    with pytest.raises(ValueError, match="shape"):
        attention(case.q, case.k, case.v, stats=StatsSpec(response_mask=torch.ones(3, dtype=torch.bool)))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_blockwise_bf16(layout, small_chunks, gen):
    case = make_case(gen, layout=layout, lens=(1, 17, 45), hq=4, group=2, d=64, dtype=torch.bfloat16)
    check_against_reference(case, "blockwise")
