"""LeaF on real (tiny, random) models, no Ray: input-gradient sensitivities against an
autograd reference and central finite differences, padding/batching invariance, the KD losses
against a float64 loop (full and top-k + tail), vocabulary checks, and detection with a
teacher identical to the student (no confounders, a documented no-op)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rl.algorithms.losses import distill_loss, forward_kl, forward_kl_topk
from rl.engine.frozen import FrozenModel, next_token_logprobs, topk_logprobs
from rl.methods.leaf.detect import InputGradNorms, input_grad_norms
from rl.methods.leaf.detect import detect
from rl.methods.leaf.examples import batch_tensors, counterfactuals, instruction_example, response_example
from rl.tasks.prompt_format import PromptFormat
from rl.tasks import get_task
from rl.methods.leaf.teacher import student_vocab_size
from rl.models.tiny_model import TinyModelSpec, build_char_tokenizer, build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("student"), TinyModelSpec(seed=3)))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    spec = TinyModelSpec(hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, seed=4)
    return str(build_tiny_model(tmp_path_factory.mktemp("teacher"), spec))


def rows(tok, pairs):
    """(prompt, response) texts → right-padded tensors with the response masked in."""
    ids = [tok(p + r)["input_ids"] for p, r in pairs]
    width = max(map(len, ids))
    out = {"input_ids": torch.zeros(len(ids), width, dtype=torch.long),
           "attention_mask": torch.zeros(len(ids), width, dtype=torch.bool),
           "response_mask": torch.zeros(len(ids), width, dtype=torch.bool)}
    for i, ((p, _), x) in enumerate(zip(pairs, ids)):
        out["input_ids"][i, : len(x)] = torch.tensor(x)
        out["attention_mask"][i, : len(x)] = True
        out["response_mask"][i, len(tok(p)["input_ids"]): len(x)] = True
    return out


PAIRS = [("Add.\nx=19 12+34\n", "2+4=6\n1+3=4\n#### 46"), ("Add.\n7+8\n", "7+8=15\n#### 15"),
         ("Add.\n50+50 (note 3)\n", "0+0=0\n5+5=10\n#### 100")]


def reference_g(model, ids, resp):
    """One sample alone, HF's own label-shifted loss (mean CE over labelled tokens)."""
    emb = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
    labels = torch.where(resp, ids, torch.full_like(ids, -100))[None]
    loss = model(inputs_embeds=emb, labels=labels).loss
    (grad,) = torch.autograd.grad(loss, emb)
    return grad[0].norm(dim=-1)


def test_input_grad_norms_match_autograd_reference_alone_and_in_a_padded_batch(model_dir):
    tok = build_char_tokenizer()
    m = FrozenModel(model_dir)
    b = rows(tok, PAIRS)
    g = m.probe(b, InputGradNorms())
    for i in range(len(PAIRS)):
        n = int(b["attention_mask"][i].sum())
        ref = reference_g(m.model, b["input_ids"][i, :n], b["response_mask"][i, :n])
        torch.testing.assert_close(g[i, :n], ref, rtol=1e-4, atol=1e-7)
        assert (g[i, n:] == 0).all()  # padding carries no sensitivity
        alone = m.probe({k: v[i:i + 1, :n] for k, v in b.items()}, InputGradNorms())
        torch.testing.assert_close(g[i:i + 1, :n], alone, rtol=1e-4, atol=1e-7)
    # the batch order does not matter either
    perm = torch.tensor([2, 0, 1])
    g_perm = m.probe({k: v[perm] for k, v in b.items()}, InputGradNorms())
    torch.testing.assert_close(g_perm, g[perm], rtol=1e-4, atol=1e-7)


def test_input_grad_norms_match_central_finite_differences_in_float64(model_dir):
    tok = build_char_tokenizer()
    m = FrozenModel(model_dir)
    model = m.model.double()
    b = rows(tok, PAIRS[1:2])
    ids, resp = b["input_ids"][0], b["response_mask"][0]
    g = input_grad_norms(model, b)[0]
    emb0 = model.get_input_embeddings()(ids[None]).detach()
    targets = resp[1:].nonzero().flatten()

    def loss(e):  # mean response cross-entropy, all in float64 (HF's own loss upcasts to 32)
        with torch.no_grad():
            logp = F.log_softmax(model(inputs_embeds=e).logits[0, :-1], -1)
            return -logp[targets, ids[1:][targets]].mean().item()

    # Qwen3's RMSNorm computes in float32 even in a float64 model, so the step is 1e-3:
    # truncation error O(h²) and rounding error O(1e-7 / h) both stay near 1e-4.
    h = 1e-3
    for t in (2, 7):  # a prompt digit and the prompt's last token
        grad = torch.zeros(emb0.shape[-1], dtype=torch.float64)
        for d in range(emb0.shape[-1]):
            e_plus, e_minus = emb0.clone(), emb0.clone()
            e_plus[0, t, d] += h
            e_minus[0, t, d] -= h
            grad[d] = (loss(e_plus) - loss(e_minus)) / (2 * h)
        assert g[t].item() == pytest.approx(grad.norm().item(), rel=1e-3)
    m.model.float()


def kl_reference(student_logits, teacher_logits, ids=None):
    """float64 loop over positions: Σ_v p_T(v)(log p_T(v) − log p_S(v)), or, given top-k
    ids, the same over the k ids plus one tail bin of the remaining mass."""
    s = F.log_softmax(student_logits.double(), -1)
    t = F.log_softmax(teacher_logits.double(), -1)
    out = torch.zeros(s.shape[:-1], dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            if ids is None:
                out[i, j] = sum(t[i, j, v].exp() * (t[i, j, v] - s[i, j, v]) for v in range(s.shape[-1]))
                continue
            top = ids[i, j].tolist()
            pt = [t[i, j, v].exp() for v in top]
            ps = [s[i, j, v].exp() for v in top]
            val = sum(a * (a.log() - b.log()) for a, b in zip(pt, ps))
            tail_t, tail_s = 1 - sum(pt), 1 - sum(ps)
            out[i, j] = val + tail_t * (tail_t.log() - tail_s.log())
    return out


def test_forward_kl_full_and_topk_equal_a_float64_loop():
    gen = torch.Generator().manual_seed(0)
    s_logits = torch.randn(2, 3, 11, generator=gen) * 2
    t_logits = torch.randn(2, 3, 11, generator=gen) * 2
    s, t = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
    torch.testing.assert_close(forward_kl(s, t).double(), kl_reference(s_logits, t_logits),
                               rtol=1e-5, atol=1e-6)
    ids, top = topk_logprobs(t, 4)
    torch.testing.assert_close(forward_kl_topk(s, ids, top).double(),
                               kl_reference(s_logits, t_logits, ids), rtol=1e-5, atol=1e-6)
    # k = V: the tail is empty and the coarse KL is the full KL
    ids_all, top_all = topk_logprobs(t, 11)
    torch.testing.assert_close(forward_kl_topk(s, ids_all, top_all), forward_kl(s, t),
                               rtol=1e-5, atol=1e-6)
    # the coarse KL never exceeds the full one (data processing inequality)
    assert (forward_kl_topk(s, ids, top) <= forward_kl(s, t) + 1e-6).all()


def test_distill_loss_is_the_token_mean_over_the_response_and_its_gradient_flows():
    gen = torch.Generator().manual_seed(1)
    s_logits = torch.randn(2, 4, 7, generator=gen, requires_grad=True)
    t = F.log_softmax(torch.randn(2, 4, 7, generator=gen), -1)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    s = F.log_softmax(s_logits, -1)
    loss, m = distill_loss(s, mask, 4.0, teacher_logp=t)
    ref = kl_reference(s_logits.detach(), t)
    assert loss.item() == pytest.approx(float(ref[mask].sum() / 4), rel=1e-5)
    assert m["kd_kl"] == pytest.approx(float(ref[mask].mean()), rel=1e-5)
    loss.backward()
    assert s_logits.grad[~mask].abs().max() == 0 and s_logits.grad[mask].abs().max() > 0
    with pytest.raises(ValueError, match="either teacher_logp"):
        distill_loss(s, mask, 4.0)


def test_teacher_with_a_padded_vocabulary_is_cut_and_a_foreign_tokenizer_is_refused(
        model_dir, teacher_dir, tmp_path):
    assert student_vocab_size(model_dir, teacher_dir) == len(build_char_tokenizer())
    # A teacher whose embedding matrix has 5 padded rows: its distribution is cut to the
    # student's ids, so it equals the softmax over the first V logits.
    from transformers import AutoModelForCausalLM

    big = AutoModelForCausalLM.from_pretrained(teacher_dir)
    big.resize_token_embeddings(big.config.vocab_size + 5)
    big.save_pretrained(tmp_path / "padded")
    build_char_tokenizer().save_pretrained(tmp_path / "padded")
    v = student_vocab_size(model_dir, str(tmp_path / "padded"))
    fm = FrozenModel(str(tmp_path / "padded"), vocab_size=v)
    b = rows(build_char_tokenizer(), PAIRS[:1])
    logits = fm.model(input_ids=b["input_ids"]).logits[..., :v]
    torch.testing.assert_close(fm.full_logprobs(b), next_token_logprobs(logits))
    assert fm.full_logprobs(b).shape[-1] == v
    # A teacher with another tokenizer: a clear error naming both
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3},
                                       unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save_pretrained(tmp_path / "foreign")
    PreTrainedTokenizerFast(tokenizer_object=other, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(tmp_path / "foreign")
    with pytest.raises(ValueError, match="different tokenizers"):
        student_vocab_size(model_dir, str(tmp_path / "foreign"))


def test_detection_with_the_student_as_its_own_teacher_finds_nothing(model_dir):
    tok = build_char_tokenizer()
    task = get_task("arith", seed=1, distractor_prob=1.0)
    examples = [instruction_example(tok, task.sample("train", i)) for i in range(4)]
    m = FrozenModel(model_dir)
    det = detect(examples, m, m, tok, quantile=0.1, cap=0.5)
    assert (det.delta == 0).all() and not det.confounders.any()


def test_detection_on_a_different_teacher_masks_region_tokens_only(model_dir, teacher_dir):
    tok = build_char_tokenizer()
    task = get_task("arith", seed=1, distractor_prob=1.0)
    examples = [instruction_example(tok, task.sample("train", i), PromptFormat("Q: ", "A:"))
                for i in range(6)]
    det = detect(examples, FrozenModel(teacher_dir), FrozenModel(model_dir), tok, 0.1, 0.5)
    assert det.confounders.any()
    for i, ex in enumerate(examples):
        picked = det.confounders[i].nonzero().flatten().tolist()
        if not picked:  # only when the row's smallest Δ sits on whitespace (never masked)
            j = int(torch.where(det.region[i], det.delta[i], torch.inf).argmin())
            assert not tok.decode([ex.input_ids[j]]).strip()
        text = [tok.decode([ex.input_ids[j]]) for j in picked]
        assert all(ex.region[j] for j in picked) and all(t.strip() for t in text)
        # template tokens (prefix "Q: ", suffix "A:") are outside the region
        assert not any(ex.region[:3]) and not any(ex.region[-2:])
        # the threshold: every picked Δ is ≤ the ⌊n·q⌋-th smallest region Δ, capped at 0.5
        region_delta = det.delta[i][det.region[i]].sort().values
        tau = min(region_delta[int(len(region_delta) * 0.1)].item(), 0.5)
        assert all(det.delta[i, j].item() <= tau for j in picked)


def test_response_level_example_and_counterfactuals_cut_ids_classes_and_region_together():
    tok = build_char_tokenizer()
    s = get_task("arith", seed=1, distractor_prob=1.0).sample("train", 0)
    ex = response_example(tok, s, segments=2)
    lines = s.solution.split("\n")          # e.g. 3 column lines + "#### ..."
    head = -(-(len(lines) - 1) // 2)
    context = "\n".join(lines[:head]) + "\n"
    assert tok.decode(ex.input_ids) == s.prompt + context
    assert tok.decode(ex.continuation, skip_special_tokens=True) == "\n".join(lines[head:])
    assert sum(ex.region) == len(context)
    cf = counterfactuals(ex, [(len(s.prompt), len(s.prompt) + 2)], "span")
    assert len(cf) == 1 and cf[0].removed == [(len(s.prompt), len(s.prompt) + 2)]
    assert tok.decode(cf[0].input_ids) == s.prompt + context[2:]
    assert len(cf[0].input_ids) == len(cf[0].input_classes) == len(cf[0].region)
    t = batch_tensors([ex, cf[0]], tok.pad_token_id)
    assert t["response_mask"][1].sum() == len(ex.continuation)
