"""The vision-language path on the real stack: the tiny Qwen2.5-VL in a vLLM-CPU engine (images
in, placeholder tokens never out), in a 2-rank ZeRO-3 learner group with the fused kernels,
and the weight sync between them. References: the same weights in plain `transformers`
(eager attention, float64) and the engine's own outputs before and after a sync."""
from __future__ import annotations

import pytest
import ray
import torch

from rl.methods.avar.scores import EVIDENCE, SYSTEM, key_classes
from rl.batch import TOKEN_CLASS
from rl.tasks.data import collate_rollouts, collate_sft, encode_prompt
from rl.engine.deepspeed_engine import DSEngineConfig
from rl.engine.frozen import image_kwargs, load_model
from rl.cluster.learner_group import LearnerGroup
from rl.tasks import get_task
from rl.models.vision import image_processor_for
from rollout.vllm_engine import EngineConfig, VLLMEngine, image_placeholder_ids
from rl.algorithms.losses import SftLoss


@pytest.fixture(scope="module")
def parts(ray_session, tiny_vl_dir):
    from transformers import AutoTokenizer

    engine = ray.remote(num_cpus=0.5)(VLLMEngine).remote(EngineConfig(tiny_vl_dir))
    group = LearnerGroup(DSEngineConfig(tiny_vl_dir, lr=3e-3, zero_stage=3, micro_batch_size=4,
                                        attention="kernels", attn_impl="blockwise"), num_ranks=2)
    ray.get(engine.ready.remote())
    tok = AutoTokenizer.from_pretrained(tiny_vl_dir)
    task = get_task("image_arith", seed=3, distractor_prob=1.0)
    prompts = [encode_prompt(tok, task.sample("train", i), images=image_processor_for(tiny_vl_dir))
               for i in range(4)]
    yield engine, group, tok, prompts
    group.shutdown()
    ray.kill(engine)


def test_prompts_expand_one_pad_per_image_token(parts, tiny_vl_dir):
    _, _, tok, prompts = parts
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for p in prompts:
        # 140 × 28 pixels → a 2 × 10 patch grid → 5 merged tokens, each a 28 × 28 glyph cell
        assert p.image_inputs.image_grid_thw.tolist() == [[1, 2, 10]]
        assert p.ids.count(pad) == 5 and p.engine_ids.count(pad) == 1
        image_pos = [i for i, c in enumerate(p.classes) if c == TOKEN_CLASS["image"]]
        assert image_pos == [i for i, t in enumerate(p.ids) if t == pad]
        # the rest lines up: removing the extra pads gives the engine's ids, classes included
        assert [t for i, t in enumerate(p.ids) if i not in image_pos[1:]] == p.engine_ids
    with pytest.raises(ValueError, match="text-only"):
        encode_prompt(tok, get_task("image_arith").sample("train", 0))
    with pytest.raises(ValueError, match="needs an image"):
        encode_prompt(tok, get_task("arith").sample("train", 0), images=image_processor_for(tiny_vl_dir))


def eager_forward(model_dir: str, b: dict):
    m = load_model(model_dir, torch.float64)
    m.set_attn_implementation("eager")
    images = image_kwargs(m, b)
    images["pixel_values"] = images["pixel_values"].double()
    with torch.no_grad():
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                output_attentions=True, **images)
    return out.logits, out.attentions


def test_class_masses_with_image_keys_equal_eager_maps(parts, tiny_vl_dir):
    """The scoring forward's key-class masses (2 ranks, the kernels) = Σ over image-pad keys
    and over system keys of the eager float64 attention maps, every layer."""
    _, group, tok, prompts = parts
    b = collate_sft(prompts, [tok("1+2=3", add_special_tokens=False)["input_ids"]] * len(prompts),
                    tok.pad_token_id)
    kc = key_classes(b.pop("token_classes"), "image")
    assert (kc == EVIDENCE).sum(1).tolist() == [5] * len(prompts)
    out = group.score({**b, "key_classes": kc}, 1.0, {"layers": "all", "n_classes": 2})
    logits, maps = eager_forward(tiny_vl_dir, b)
    valid = b["attention_mask"].bool()
    assert sorted(out["attn_stats"]) == [0, 1, 2, 3]
    for layer in range(4):
        got = out["attn_stats"][layer]["mass"].double()
        for cls in (EVIDENCE, SYSTEM):
            ref = (maps[layer] * (kc == cls)[:, None, None, :].double()).sum(-1)
            err = (got[..., cls] - ref).abs()[valid[:, None, :].expand_as(ref)].max()
            assert err < 1e-5, (layer, cls, float(err))
    # and the same forward's logprobs are the eager model's (placeholder targets left out:
    # their logit is −1e4 by design, a float32 rounding of ~1e-3 there)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    real = valid[:, 1:] & ~torch.isin(b["input_ids"][:, 1:], torch.tensor(image_placeholder_ids(tiny_vl_dir)))
    assert (out["logprobs"][:, 1:].double() - lp).abs()[real].max() < 1e-4


def generate_and_score(engine, group, prompts, pad_id):
    comps = ray.get(engine.generate.remote([p.request for p in prompts], 2, 1.0, 1.0, 24,
                                           [11, 12, 13, 14]))
    batch = collate_rollouts(prompts, comps, pad_id)
    learner = group.score({**batch.model_inputs(), "response_mask": batch.response_mask}, 1.0)
    gap = (learner["logprobs"] - batch.sampler_logprobs).abs()[batch.response_mask]
    return batch, gap


def test_engine_samples_with_images_and_follows_the_learner_after_sync(parts, tiny_vl_dir,
                                                                       tmp_path):
    engine, group, tok, prompts = parts
    banned = set(image_placeholder_ids(tiny_vl_dir))
    assert len(banned) == 4
    before, gap = generate_and_score(engine, group, prompts, tok.pad_token_id)
    responses = before.input_ids[before.response_mask]
    assert not set(responses.tolist()) & banned   # a random model would emit them otherwise
    assert gap.max() < 1e-2 and gap.mean() < 2e-3, (float(gap.max()), float(gap.mean()))

    # move the policy (vision tower included: its gradient flows through the image features)
    b = collate_sft(prompts, [tok(p.sample.solution, add_special_tokens=False)["input_ids"]
                              for p in prompts], tok.pad_token_id)
    b.pop("token_classes")
    for _ in range(3):
        m = group.train_minibatch(b, SftLoss())
    assert m["skipped"] == 0 and m["grad_norm"] > 0
    group.export_hf(str(tmp_path / "hf"))
    old, new = (dict(load_model(d, "float32").named_parameters()) for d in (tiny_vl_dir, tmp_path / "hf"))
    assert not torch.equal(old["model.visual.patch_embed.proj.weight"],
                           new["model.visual.patch_embed.proj.weight"])
    sync = group.sync_weights([engine], version=1)
    assert sync["sync/bytes"] > 4 * sum(p.numel() for p in new.values())  # the whole VLM
    # the same images again: cached vision-encoder outputs of the old weights must not be used
    after, gap = generate_and_score(engine, group, prompts, tok.pad_token_id)
    assert gap.max() < 1e-2 and gap.mean() < 2e-3, (float(gap.max()), float(gap.mean()))
    assert not torch.equal(after.input_ids, before.input_ids)  # the engine's policy changed
