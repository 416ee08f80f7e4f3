"""A checkpoint shaped like a download (rl/models/bpe_model.py: byte-level BPE, ChatML template, two
eos ids in generation_config.json, a tied vocabulary padded beyond the tokenizer) through the
rollout engine and the learner's model loading.

Stopping is checked by steering a copy of the model so that one chosen token is certain
(every other block's output zeroed, the chosen token's embedding row scaled): the engine must
stop on each of the two eos ids, and run on to max_new_tokens for an ordinary token."""
import shutil
from pathlib import Path

import ray
import torch

from rl.models.bpe_model import ENDOFTEXT, IM_END
from rl.engine.frozen import NEVER, load_model
from rollout.vllm_engine import EngineConfig, VLLMEngine, unsampled_ids


def steered_copy(src: str, dst: Path, token: int) -> str:
    """The model at `src` rewritten so that every next token is `token` by ~45 nats: each
    block adds nothing to the residual stream (o_proj, down_proj = 0), every embedding row is
    e0 except `token`'s, 5·e0 — so the last hidden state is ∝ e0 and (tied weights) the logit
    of `token` is 5× every other's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[token, 0] = 5.0
    shutil.copytree(src, dst)
    model.save_pretrained(dst, safe_serialization=True)
    return str(dst)


def engine(path: str):
    e = ray.remote(num_cpus=0.5)(VLLMEngine).remote(EngineConfig(path, max_model_len=256))
    ray.get(e.ready.remote())
    return e


def test_generation_stops_at_each_eos_id_and_runs_on_otherwise(ray_session, bpe_small_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(bpe_small_dir)
    eos = GenerationConfig.from_pretrained(bpe_small_dir).eos_token_id
    assert eos == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]
    ordinary = tok.convert_tokens_to_ids("7")
    prompt = tok("What is 3+4?", add_special_tokens=False)["input_ids"]
    for token, want_len, want_reason in ((eos[0], 1, "stop"), (eos[1], 1, "stop"),
                                         (ordinary, 9, "length")):
        e = engine(steered_copy(bpe_small_dir, tmp_path / f"steer{token}", token))
        try:
            for temperature in (0.0, 1.0):
                (c,), = ray.get(e.generate.remote([prompt], 1, temperature, 1.0, 9, [3]))
                # the eos id itself ends the response: it is trained on as the end
                assert c.token_ids == [token] * want_len and c.finish_reason == want_reason
        finally:
            ray.kill(e)


def test_padded_rows_are_never_sampled_and_the_learner_agrees(ray_session, bpe_small_dir):
    """A random model spreads its mass over all 1,024 rows, 424 of them beyond the tokenizer
    (they decode to nothing). The engine samples only tokenizer ids; the learner's model gives
    the other rows logit NEVER, so its log-probs of the sampled tokens are the engine's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_small_dir)
    banned = unsampled_ids(bpe_small_dir)
    assert banned == list(range(len(tok), 1024)) and len(tok) == 600
    e = engine(bpe_small_dir)
    try:
        prompt = tok("Add.\n12+30\n", add_special_tokens=False)["input_ids"]
        comps, = ray.get(e.generate.remote([prompt], 8, 1.0, 1.0, 40, [11]))
    finally:
        ray.kill(e)
    sampled = [t for c in comps for t in c.token_ids]
    assert len(sampled) >= 8 * 20 and max(sampled) < len(tok)
    model = load_model(bpe_small_dir, "float32").eval()
    for c in comps[:3]:
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        assert bool((logits[:, len(tok):] == NEVER).all())
        lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        ours = lp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(ours, torch.tensor(c.logprobs), atol=2e-4, rtol=0)
