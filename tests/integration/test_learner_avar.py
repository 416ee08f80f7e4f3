"""AVAR on the learner group: 2 DeepSpeed ranks under ZeRO-3 with the kernels' attention.
The AGTO cold-start loss over 2 ranks × 2 micro-batches equals L_LM + α·L_img + β·L_sys written
out on the same model's eager attention maps in float64; the scoring forward's key-class masses
(the ones VARS and VAS read) equal the eager maps' class sums."""
from __future__ import annotations

import pytest
import torch

from rl.methods.avar.scores import EVIDENCE, SYSTEM, AgtoConfig
from rl.methods.avar.agto import agto_inputs
from rl.tasks.data import collate_sft, encode_prompt
from rl.engine.deepspeed_engine import DSEngineConfig
from rl.cluster.learner_group import LearnerGroup
from rl.tasks import get_task
from rl.models.tiny_model import build_char_tokenizer
from rl.methods.avar.agto import AgtoLoss
from rl.algorithms.losses import SftLoss


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_dir):
    lg = LearnerGroup(DSEngineConfig(tiny_model_dir, lr=0.0, zero_stage=3, grad_accum_steps=2,
                                     micro_batch_size=2, attention="kernels", attn_impl="blockwise"),
                      num_ranks=2)
    yield lg
    lg.shutdown()


def sft_rows(n: int) -> dict[str, torch.Tensor]:
    tok = build_char_tokenizer()
    task = get_task("arith", seed=5, distractor_prob=0.5)
    samples = [task.sample("train", i) for i in range(n)]
    return collate_sft([encode_prompt(tok, s) for s in samples],
                       [tok(s.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                        for s in samples], tok.pad_token_id)


def eager_attentions(model_dir: str, b):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64,
                                             attn_implementation="eager").eval()
    with torch.no_grad():
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                output_attentions=True)
    return out.logits, out.attentions


def test_agto_loss_on_two_zero3_ranks_equals_the_eager_formula(group, tiny_model_dir):
    b = sft_rows(8)
    agto = AgtoConfig(alpha=0.15, beta=0.15, layers="all", eps=1e-6)
    b.update(agto_inputs(b, agto))
    kc, q = b["key_classes"], b["query_mask"]
    out = group.train_minibatch(b, AgtoLoss(cfg=agto))

    logits, maps = eager_attentions(tiny_model_dir, b)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    resp = b["response_mask"][:, 1:]
    lm = -(logp * resp).sum() / resp.sum()
    l_img = l_sys = 0.0
    for row in range(len(kc)):
        qi = q[row].nonzero()[:, 0]
        for A in maps:
            for h in range(A.shape[1]):
                a = A[row, h][qi]
                img = a[:, kc[row] == EVIDENCE].sum() / (len(qi) * int((kc[row] == EVIDENCE).sum()))
                sys_ = a[:, kc[row] == SYSTEM].sum() / (len(qi) * int((kc[row] == SYSTEM).sum()))
                l_img -= float(torch.log(img)) / (len(maps) * A.shape[1] * len(kc))
                l_sys += float(torch.log(sys_ + 1e-6)) / (len(maps) * A.shape[1] * len(kc))
    assert out["skipped"] == 0
    assert out["loss"] == pytest.approx(float(lm) + 0.15 * l_img + 0.15 * l_sys, rel=1e-5)
    # the attention terms are really in the loss: without them it is the LM loss alone
    plain = group.train_minibatch({k: v for k, v in b.items() if k in
                                   ("input_ids", "attention_mask", "response_mask")}, SftLoss())
    assert plain["loss"] == pytest.approx(float(lm), rel=1e-5)
    assert abs(l_img) + abs(l_sys) > 0.1


def test_scoring_forward_class_masses_equal_eager_maps(group, tiny_model_dir):
    from rl.methods.avar.scores import key_classes

    b = sft_rows(5)
    kc = key_classes(b.pop("token_classes"))
    out = group.score({**b, "key_classes": kc}, 1.0, {"layers": [0, 1], "n_classes": 2})
    _, maps = eager_attentions(tiny_model_dir, b)
    valid = b["attention_mask"].bool()
    assert sorted(out["attn_stats"]) == [0, 1]
    for layer in (0, 1):
        got = out["attn_stats"][layer]["mass"].double()
        for cls in (EVIDENCE, SYSTEM):
            ref = (maps[layer] * (kc == cls)[:, None, None, :].double()).sum(-1)
            err = (got[..., cls] - ref).abs()[valid[:, None, :].expand_as(ref)].max()
            assert err < 1e-5, (layer, cls, float(err))
