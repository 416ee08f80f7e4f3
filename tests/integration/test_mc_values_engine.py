"""Monte Carlo token values through a real vLLM engine (rl/algorithms/mc_values.py
`rollout_sampler`): greedy continuations of a greedy response's prefixes give that response
back (every prefix's value is 1 under an exact-match judge, so prefixes and token budgets
reach the engine right), and sampled values repeat exactly under the same seed."""
from __future__ import annotations

import ray

from rl.algorithms.mc_values import mc_token_values, rollout_sampler
from rollout.vllm_engine import EngineConfig, VLLMEngine

MAX_NEW = 12
PROMPTS = [[5, 9, 12, 7], [3, 3, 8], [20, 4, 6, 11, 2]]


def test_greedy_prefixes_give_the_greedy_response_back_and_seeds_repeat(ray_session, tiny_model_dir):
    engine = ray.remote(num_cpus=0.5)(VLLMEngine).remote(EngineConfig(tiny_model_dir, max_model_len=64))
    try:
        ray.get(engine.ready.remote())
        comps = ray.get(engine.generate.remote(PROMPTS, 1, 0.0, 1.0, MAX_NEW, [0, 0, 0]))
        greedy = [list(cs[0].token_ids) for cs in comps]
        assert all(greedy)

        def same_as_greedy(i, response):
            return float(response == greedy[i])

        values = mc_token_values(rollout_sampler(engine, temperature=0.0), same_as_greedy,
                                 PROMPTS, greedy, k=1, max_new_tokens=MAX_NEW, stride=3)
        for r, tv in zip(greedy, values):
            assert tv.points[-1] == len(r) and tv.values == [1.0] * len(tv.points)
            assert tv.advantages() == [0.0] * len(r)

        def ends_like_greedy(i, response):  # a judge sampled continuations can fail
            return float(response[-1:] == greedy[i][-1:])

        sampled = rollout_sampler(engine, temperature=1.0)
        a = mc_token_values(sampled, ends_like_greedy, PROMPTS, greedy, 4, MAX_NEW, stride=2, seed=5)
        b = mc_token_values(sampled, ends_like_greedy, PROMPTS, greedy, 4, MAX_NEW, stride=2, seed=5)
        assert [t.values for t in a] == [t.values for t in b]
        assert all(t.values[-1] == 1.0 and t.trials[:-1] == [4] * (len(t.points) - 1) for t in a)
    finally:
        ray.kill(engine)
