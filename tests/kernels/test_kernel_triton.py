"""The Triton kernels (forward with statistics, band column pass, backward with the
in-loop column statistic) against the float64 reference. On CPU they run under
TRITON_INTERPRET=1 (set in conftest.py); on a CUDA machine the same tests run the real
kernels and add bf16. Shapes are small: the interpreter runs programs one by one.

The combinations are chosen so that every GQA group (1, 2, 4), head_dim (32, 64),
dtype and layout appears, with lengths 1, 17 and 45 (not a multiple of any block)."""

import pytest
import torch

from kernels import StatsSpec, attention, key_class_mass
from kernels.reference import reference_attention
from kernel_testlib import DEV, check_against_reference, check_invariants, make_case, randn_as

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # masked cells, discarded

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [  # (layout, group, head_dim, dtype)
    ("packed", 1, 32, F32), ("packed", 2, 64, F16), ("packed", 4, 32, F16), ("packed", 4, 64, F32),
    ("padded", 1, 64, F16), ("padded", 2, 32, F32), ("padded", 4, 64, F32), ("padded", 2, 32, F16),
]
if DEV == "cuda":  # bf16 is broken in the interpreter: GPU only
    CASES += [("packed", 2, 64, BF16), ("padded", 4, 128, BF16), ("packed", 1, 128, BF16), ("padded", 2, 64, BF16)]


@pytest.mark.parametrize("layout,group,d,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_triton_matches_reference(layout, group, d, dtype, gen):
    case = make_case(gen, layout=layout, lens=(1, 17, 45), hq=4, group=group, d=d, dtype=dtype)
    check_against_reference(case, "triton")


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_triton_large_logits_and_full_future(layout, gen):
    """x30 logits (near one-hot p) and the analysis mode band [1, end]."""
    case = make_case(gen, layout=layout, lens=(2, 50), hq=2, group=2, d=32, logit_scale=30.0, band=(1, None))
    check_against_reference(case, "triton")


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_triton_invariants_and_stats_off_identical(layout, gen):
    check_invariants(make_case(gen, layout=layout, lens=(1, 17, 45), hq=4, group=2, d=32, waad=6), "triton")


def test_triton_window_longer_than_tiles_and_wide_band(gen):
    """WAAD with W spanning several key tiles, band reaching far (several query tiles)."""
    case = make_case(gen, layout="packed", lens=(70,), hq=2, group=1, d=32, waad=40, band=(5, 60), n_classes=1)
    check_against_reference(case, "triton", grad=False)


def test_triton_matches_blockwise_exactly_enough(gen):
    """The CPU and GPU paths agree with each other (not just with the reference)."""
    case = make_case(gen, layout="padded", lens=(33, 20), hq=4, group=2, d=32)
    out_t, st_t = attention(case.q, case.k, case.v, stats=case.spec, impl="triton", **case.kw)
    out_b, st_b = attention(case.q, case.k, case.v, stats=case.spec, impl="blockwise", **case.kw)
    assert torch.allclose(out_t, out_b, atol=1e-5)
    for name, t in st_b.fields().items():
        assert torch.allclose(st_t.fields()[name], t, atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_triton_fai_in_backward_equals_column_pass(layout, gen):
    case = make_case(gen, layout=layout, lens=(1, 17, 45), hq=4, group=4, d=32)
    _, st_fwd = attention(case.q, case.k, case.v, stats=case.spec, impl="triton", **case.kw)
    _, ref = reference_attention(case.q.double(), case.k.double(), case.v.double(), stats=case.spec, **case.kw)
    q, k, v = (x.clone().requires_grad_() for x in (case.q, case.k, case.v))
    out, st = attention(q, k, v, stats=case.spec.replace(fai_in_backward=True), impl="triton", **case.kw)
    assert torch.isnan(st.fai_sum).all()
    g = randn_as(out, gen)
    out.backward(g)
    q2, k2, v2 = (x.clone().requires_grad_() for x in (case.q, case.k, case.v))
    attention(q2, k2, v2, impl="triton", **case.kw).backward(g)
    for a, b in ((q, q2), (k, k2), (v, v2)):  # the column statistic does not change the gradients
        assert torch.equal(a.grad, b.grad)
    for got in (st.fai_sum, st_fwd.fai_sum):
        assert torch.allclose(got.double(), ref.fai_sum, atol=1e-5 * (1 + ref.fai_sum.abs().max().item()))


def test_triton_key_class_mass_gradients(gen):
    case = make_case(gen, layout="packed", lens=(5, 30), hq=2, group=2, d=32)
    C = case.spec.n_classes
    grads = {}
    for impl in ("triton", "blockwise"):
        q, k = (x.clone().requires_grad_() for x in (case.q, case.k))
        m = key_class_mass(q, k, case.spec.key_classes, C, impl=impl, **case.kw)
        (m * torch.arange(1, C + 1, device=m.device)).sum().backward()
        grads[impl] = (m.detach(), q.grad, k.grad)
    for a, b in zip(grads["triton"], grads["blockwise"]):
        assert torch.allclose(a, b, atol=1e-5)


def test_triton_no_stats_spec_gives_lse_only(gen):
    case = make_case(gen, layout="packed", lens=(17,), hq=2, group=1, d=32)
    out, st = attention(case.q, case.k, case.v, stats=StatsSpec(), impl="triton", **case.kw)
    _, ref = reference_attention(case.q.double(), case.k.double(), case.v.double(), stats=StatsSpec(), **case.kw)
    assert st.entropy is None and st.fai_sum is None
    assert torch.allclose(st.lse.double(), ref.lse, atol=1e-5)


def test_triton_bf16_input(gen):
    """bf16 through the Triton path: native on GPU; computed in fp32 under the
    interpreter, whose bf16 is broken (so the CPU pipeline never gets garbage)."""
    case = make_case(gen, layout="padded", lens=(17, 30), hq=4, group=2, d=32, dtype=BF16)
    check_against_reference(case, "triton")
