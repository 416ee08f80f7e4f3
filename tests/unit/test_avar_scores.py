"""AVAR's quantities (rl/methods/avar/scores.py) against eager attention maps in float64.

A tiny Qwen3 (built from a config, its matrices redrawn from a local generator) reads real
arith prompts ⊕ worked solutions tokenized by the project's character tokenizer, so the token
classes (system = the instruction, evidence = the sum, distractor) come from the task itself.
The kernels' key-class masses (the blockwise CPU path, through the transformers hook) must give
the same VAS, r_visual and AGTO loss — and the same AGTO gradient — as the formulas of
specs/papers.md §3 written out here on `output_attentions` maps.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from kernels import StatsSpec
from kernels.capture import AttentionCapture
from rl.methods.avar.scores import (EVIDENCE, SYSTEM, agto_loss, check_classes, key_classes,
                            normalise_visual, r_visual, user_query_mask, vas, vas_pooled)
from rl.batch import TOKEN_CLASS
from rl.tasks.data import collate_sft, encode_prompt
from rl.tasks import get_task
from rl.models.tiny_model import build_char_tokenizer

EPS = 1e-6


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    """5 arith prompts (some with a distractor) ⊕ their solutions, right-padded."""
    task = get_task("arith", seed=7, distractor_prob=0.5)
    samples = [task.sample("train", i) for i in range(5)]
    prompts = [encode_prompt(tok, s) for s in samples]
    responses = [tok(s.solution, add_special_tokens=False)["input_ids"] for s in samples]
    b = collate_sft(prompts, responses, tok.pad_token_id)
    assert (b["token_classes"] == TOKEN_CLASS["distractor"]).any()  # a real mix of classes
    assert b["attention_mask"].sum(1).unique().numel() > 1          # and real padding
    return b


@pytest.fixture(scope="module")
def model(tok):
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=32)
    gen = torch.Generator().manual_seed(11)
    with torch.random.fork_rng(devices=[]):
        m = transformers.Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3, generator=gen)  # far from uniform attention
    return m


def eager_maps(model, b, grad=False):
    m = copy.deepcopy(model) if not grad else model
    m.set_attn_implementation("eager")
    with torch.set_grad_enabled(grad):
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                output_attentions=True)
    return out.attentions  # per layer [B, H, N, N]


def kernel_masses(model, b, kc, grad=False):
    m = copy.deepcopy(model) if not grad else model
    cap = AttentionCapture(m, layers="all", spec=StatsSpec(n_classes=2), impl="blockwise",
                           grad_mass=grad)
    with torch.set_grad_enabled(grad), cap(key_classes=kc) as st:
        m(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long())
    return st.grad_mass if grad else {layer: s.mass for layer, s in st.items()}


def eager_class_mass(A, kc, cls):
    """Σ_{k ∈ class} A[b, h, i, k] in float64: [B, H, N]."""
    return (A.double() * (kc == cls)[:, None, None, :].double()).sum(-1)


@pytest.mark.parametrize("system", ["instruction", "template_prefix:0.4"])
def test_masses_vas_and_r_visual_equal_eager_maps(model, batch, system):
    b = batch
    kc = key_classes(b["token_classes"], "evidence", system, b["attention_mask"])
    maps = eager_maps(model, b)
    mass = kernel_masses(model, b, kc)
    valid = b["attention_mask"].bool()
    for layer, A in enumerate(maps):
        for cls in (EVIDENCE, SYSTEM):
            ref = eager_class_mass(A, kc, cls)
            got = mass[layer][..., cls].double()
            assert (got - ref).abs()[valid[:, None, :].expand_as(ref)].max() < 1e-5

    # VAS: mean over layers, heads and query tokens of the per-token ratio (a mean of ratios)
    for q in (b["response_mask"], user_query_mask(b["token_classes"], b["attention_mask"],
                                                  b["response_mask"], kc)):
        ref = []
        for row in range(len(kc)):
            ratios = [float(eager_class_mass(A, kc, EVIDENCE)[row, h, i]
                            / eager_class_mass(A, kc, SYSTEM)[row, h, i])
                      for A in maps for h in range(A.shape[1]) for i in q[row].nonzero()[:, 0]]
            ref.append(sum(ratios) / len(ratios))
        got, per_layer = vas(mass, q)
        assert got.tolist() == pytest.approx(ref, rel=1e-5)
        assert per_layer.mean(0).tolist() == pytest.approx(ref, rel=1e-5)

        # the headline: pooled sums over (layer, head, query token) cells, and the evidence share
        pooled = vas_pooled(mass, q)
        for row in range(len(kc)):
            cells = q[row].nonzero()[:, 0]
            e_l = [float(eager_class_mass(A, kc, EVIDENCE)[row][:, cells].sum()) for A in maps]
            s_l = [float(eager_class_mass(A, kc, SYSTEM)[row][:, cells].sum()) for A in maps]
            assert float(pooled.ratio[row]) == pytest.approx(sum(e_l) / sum(s_l), rel=1e-5)
            assert float(pooled.share[row]) == pytest.approx(sum(e_l) / (sum(e_l) + sum(s_l)), rel=1e-5)
            assert pooled.ratio_by_layer[:, row].tolist() == pytest.approx(
                [e / s for e, s in zip(e_l, s_l)], rel=1e-5)
            assert pooled.share_by_layer[:, row].tolist() == pytest.approx(
                [e / (e + s) for e, s in zip(e_l, s_l)], rel=1e-5)
            heads = maps[0].shape[1]  # the mean attention on each side per (head, query token)
            assert pooled.mass_by_layer[:, row].flatten().tolist() == pytest.approx(
                [x / (heads * len(cells)) for e, s in zip(e_l, s_l) for x in (e, s)], rel=1e-5)

    # r_visual: per response token, per layer, the head-averaged masses' ratio (+ε); gated
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    ref = []
    for row in range(len(kc)):
        toks = b["response_mask"][row].nonzero()[:, 0]
        per_tok = [sum(float(eager_class_mass(A, kc, EVIDENCE)[row, :, t].mean()
                             / (eager_class_mass(A, kc, SYSTEM)[row, :, t].mean() + EPS))
                       for A in maps) / len(maps) for t in toks]
        ref.append(correct[row].item() * sum(per_tok) / len(per_tok))
    got = r_visual(mass, b["response_mask"], correct, EPS)
    assert got.tolist() == pytest.approx(ref, rel=1e-5)
    assert got[1] == 0 and got[4] == 0 and (got[[0, 2, 3]] > 0).all()


def test_agto_loss_and_gradient_equal_the_eager_map_autograd(model, batch):
    """§3.3.2 written on output_attentions maps, differentiated by autograd, against the
    kernels' differentiable class masses: same loss, same parameter gradients."""
    b = batch
    kc = key_classes(b["token_classes"])
    q = user_query_mask(b["token_classes"], b["attention_mask"], b["response_mask"])
    assert q.any(1).all() and not (q & b["response_mask"]).any()

    def eager_loss(m):
        maps = eager_maps(m, b, grad=True)
        l_img = l_sys = 0.0
        for row in range(len(kc)):
            qi = q[row].nonzero()[:, 0]
            n_img, n_sys = int((kc[row] == EVIDENCE).sum()), int((kc[row] == SYSTEM).sum())
            for A in maps:
                for h in range(A.shape[1]):
                    rows = A[row, h][qi]
                    img = rows[:, kc[row] == EVIDENCE].sum() / (len(qi) * n_img)
                    sys_ = rows[:, kc[row] == SYSTEM].sum() / (len(qi) * n_sys)
                    l_img = l_img - torch.log(img) / (len(maps) * A.shape[1])
                    l_sys = l_sys + torch.log(sys_ + EPS) / (len(maps) * A.shape[1])
        return l_img / len(kc), l_sys / len(kc)

    m_ref, m_ours = copy.deepcopy(model), copy.deepcopy(model)
    ref_img, ref_sys = eager_loss(m_ref)
    (0.15 * ref_img + 0.15 * ref_sys).backward()
    img, sys_ = agto_loss(kernel_masses(m_ours, b, kc, grad=True), q, kc, EPS)
    assert img.mean().item() == pytest.approx(ref_img.item(), rel=1e-5)
    assert sys_.mean().item() == pytest.approx(ref_sys.item(), rel=1e-5)
    (0.15 * img.mean() + 0.15 * sys_.mean()).backward()
    grads = 0
    for (name, p_ref), p in zip(m_ref.named_parameters(), m_ours.parameters()):
        if p_ref.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        grads += 1
        scale = p_ref.grad.abs().max().clamp_min(1e-12)
        assert (p.grad - p_ref.grad).abs().max() / scale < 1e-4, name
    assert grads >= 3 * 4  # q, k projections and norms of every layer, and the embeddings


def test_r_visual_on_a_hand_worked_case():
    # 1 layer, 2 heads, one row of 3 tokens; the response is tokens 1 and 2
    mass = torch.zeros(1, 2, 3, 2)
    mass[0, 0, :, EVIDENCE] = torch.tensor([0.0, 0.2, 0.6])
    mass[0, 1, :, EVIDENCE] = torch.tensor([0.0, 0.4, 0.2])
    mass[0, 0, :, SYSTEM] = torch.tensor([1.0, 0.5, 0.1])
    mass[0, 1, :, SYSTEM] = torch.tensor([1.0, 0.3, 0.3])
    resp = torch.tensor([[False, True, True]])
    # token 1: (0.3 / 0.4), token 2: (0.4 / 0.2) → (0.75 + 2) / 2 = 1.375 (ε = 0)
    assert float(r_visual({0: mass}, resp, torch.tensor([1.0]), eps=0.0)) == pytest.approx(1.375)
    assert float(r_visual({0: mass}, resp, torch.tensor([0.0]), eps=0.0)) == 0.0
    # two layers average per token before the token mean: layer 2 doubles the evidence
    twice = mass.clone()
    twice[..., EVIDENCE] *= 2
    assert float(r_visual({0: mass, 5: twice}, resp, torch.tensor([1.0]), eps=0.0)) == \
        pytest.approx(1.375 * 1.5)
    # VAS is the mean of per-head ratios (not of head-averaged masses): head 0 gives 0.4, 6;
    # head 1 gives 4/3, 2/3 → (0.4 + 6 + 4/3 + 2/3) / 4
    per_row, _ = vas({0: mass}, resp)
    assert float(per_row) == pytest.approx((0.4 + 6 + 4 / 3 + 2 / 3) / 4)


def test_vars_scale_options():
    r = torch.tensor([2.0, 12.0, 0.0, 5.0, 7.0, 9.0])
    correct = torch.tensor([1, 1, 0, 1, 0, 1])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert normalise_visual(r, correct, groups, "none", 10.0).tolist() == r.tolist()
    assert normalise_visual(r, correct, groups, "clip", 10.0).tolist() == [2, 10, 0, 5, 7, 9]
    z = normalise_visual(r, correct, groups, "group_z", 10.0)
    # group 0: correct values 2, 12 → −1, +1; group 1: correct 5, 9 → −1, +1; wrong stay 0
    assert z.tolist() == pytest.approx([-1, 1, 0, -1, 0, 1])
    one = normalise_visual(r, torch.tensor([1, 0, 0, 0, 0, 0]), groups, "group_z", 10.0)
    assert one.tolist() == [0] * 6  # one correct response: nothing to compare it with
    with pytest.raises(ValueError, match="vars_norm"):
        normalise_visual(r, correct, groups, "softmax", 10.0)


def test_token_sets_and_bad_inputs():
    S, E, D, R, O = (TOKEN_CLASS[k] for k in ("system", "evidence", "distractor", "response", "other"))
    tc = torch.tensor([[S, S, D, E, E, O, R, R, 0], [S, E, O, R, R, R, R, R, R]])
    am = torch.tensor([[1] * 8 + [0], [1] * 9]).bool()
    resp = tc == R
    kc = key_classes(tc)
    assert kc.tolist() == [[1, 1, -1, 0, 0, -1, -1, -1, -1], [1, 0, -1, -1, -1, -1, -1, -1, -1]]
    q = user_query_mask(tc, am, resp)
    assert q.tolist() == [[False, False, True, True, True, True, False, False, False],
                          [False, True, True, False, False, False, False, False, False]]
    check_classes(kc, "here")
    with pytest.raises(ValueError, match="1 of 2 rows have no evidence"):
        check_classes(key_classes(torch.tensor([[S, E, R], [S, O, R]])), "task x")
    with pytest.raises(ValueError, match="no system"):
        check_classes(key_classes(torch.tensor([[E, E, R]])), "task x")
    with pytest.raises(ValueError, match="no evidence"):  # a VLM prompt without an image
        check_classes(key_classes(tc, evidence="image"), "vlm")
    with pytest.raises(ValueError, match="avar.evidence"):
        key_classes(tc, evidence="audio")


def test_template_prefix_system_set_by_hand():
    """`template_prefix:s` takes the first ⌊s·n⌋ (≥ 1) of a row's n prompt tokens as the
    system set, whatever their task class (the first token, a real model's sink, included);
    evidence in the prefix stays evidence; Q starts after the prefix."""
    S, E, D, R, O = (TOKEN_CLASS[k] for k in ("system", "evidence", "distractor", "response", "other"))
    tc = torch.tensor([[O, S, S, S, E, E, D, O, O, O, R, R, 0, 0],   # 10 prompt tokens → 3
                       [O, O, E, S, O, R, R, R, R, R, R, R, R, R],   # 5 → ⌊1.5⌋ = 1
                       [E, E, S, R, R, R, R, R, R, R, R, R, R, R]])  # 3 → ⌊0.9⌋ = 0 → 1: stays E
    am = torch.tensor([[1] * 12 + [0, 0], [1] * 14, [1] * 14]).bool()
    resp = tc == R
    kc = key_classes(tc, "evidence", "template_prefix:0.3", am)
    assert kc.tolist() == [[1, 1, 1, -1, 0, 0] + [-1] * 8,
                           [1, -1, 0, -1] + [-1] * 10,
                           [0, 0] + [-1] * 12]
    q = user_query_mask(tc, am, resp, kc)  # after the prefix (the instruction's rest included)
    assert q.nonzero().tolist() == [[0, i] for i in range(3, 10)] + [[1, i] for i in range(1, 5)] \
        + [[2, 0], [2, 1], [2, 2]]
    # the instruction set of the same rows, for contrast: row 0's first token is not in it
    assert key_classes(tc)[0].tolist()[:4] == [-1, 1, 1, 1]
    for bad in ("template_prefix", "template_prefix:1.5", "prefix:0.4", "system"):
        with pytest.raises(ValueError, match="avar.system"):
            key_classes(tc, "evidence", bad, am)
    with pytest.raises(ValueError, match="attention mask"):
        key_classes(tc, "evidence", "template_prefix:0.4")


def test_pooled_vas_on_a_hand_worked_case():
    """Two layers, one head, two tokens, the second the only query token. Layer 0 gives it
    evidence 0.3 / system 0.6; layer 1 0.2 / 1e-12 (no sink among the system keys). The mean
    of ratios is ruled by layer 1; the pooled ratio and share are not. A row with no query
    token is NaN."""
    def layer(e, s):
        m = torch.zeros(2, 1, 2, 2)
        m[:, 0, 1] = torch.tensor([e, s])
        m[:, 0, 0] = torch.tensor([9.0, 9.0])  # not a query token: ignored
        return m

    mass = {0: layer(0.3, 0.6), 1: layer(0.2, 1e-12)}
    query = torch.tensor([[False, True], [False, False]])
    got = vas_pooled(mass, query)
    assert float(got.ratio[0]) == pytest.approx(0.5 / (0.6 + 1e-12))
    assert float(got.share[0]) == pytest.approx(0.5 / 1.1)
    assert got.ratio_by_layer[:, 0].tolist() == pytest.approx([0.5, 0.2 / 1e-12])
    assert got.share_by_layer[:, 0].tolist() == pytest.approx([1 / 3, 1.0])
    assert got.mass_by_layer[:, 0].flatten().tolist() == pytest.approx([0.3, 0.6, 0.2, 1e-12])
    assert got.mass_by_layer[:, 1].isnan().all()
    assert float(vas(mass, query)[0][0]) == pytest.approx((0.5 + 2e11) / 2, rel=1e-6)
    assert all(torch.isnan(x[..., 1]).all() for x in got[:4])  # (row 1 has no query token)
