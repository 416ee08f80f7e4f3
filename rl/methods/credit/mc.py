"""Monte Carlo credit, the oracle arm (issue 25): γ from the tokens' Monte Carlo advantages
instead of from attention. Expensive, and meant as an upper bound on what token credit can do
in a setting: if amplifying the tokens that measurably move the success rate does not beat
plain GRPO there, no attention signal can, and the setting is the wrong test.

Every response of the batch gets VinePPO's values (rl/algorithms/mc_values.py): K continuations
from every `stride`-th prefix, sampled by the rollout engines with the policy that wrote the
batch, judged by the task's verifier; A_t = V(s_{t+1}) − V(s_t). Then the attention
strategies' rule on |A_t|: TopQ of each response gets γ_amp (ties kept; a response whose
values never move selects nothing), so the γ scale is theirs and only the choice of tokens
differs. A token whose value does not move (|A_t| = 0) is never selected: amplifying
every token of a flat response would only rescale its advantage.

Cost per step: responses × ⌈length / stride⌉ × K continuations of up to max_new_tokens, over
the responses whose advantage is not 0 (γ scales the advantage, so the others are skipped).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.algorithms.mc_values import mc_token_values, verifier_judge
from rl.batch import RolloutBatch
from rl.methods.base import Tools
from rl.methods.credit import CreditMethod, register
from rl.methods.credit.preplan_anchor import CreditTrace, top_q_mask
from rl.tasks.base import stable_hash


@dataclass
class MonteCarloParams:
    k: int = 4                # continuations per prefix
    stride: int = 8           # a value every `stride` response tokens (a block shares its change)
    top_q: float = 0.4        # fraction of each response's tokens (largest |A_t|) amplified
    gamma_amp: float = 1.5    # γ on a selected token

    def __post_init__(self):
        if self.k < 1 or self.stride < 1:
            raise ValueError(f"k and stride must be >= 1, got {self.k}, {self.stride}")
        if not 0.0 <= self.top_q <= 1.0 or self.gamma_amp < 1.0:
            raise ValueError(f"top_q must be in [0, 1] and gamma_amp >= 1, got {self.top_q}, {self.gamma_amp}")


def response_advantages(values, resp: torch.Tensor) -> torch.Tensor:
    """[B, T] Monte Carlo advantages at the response positions (0 elsewhere) from one
    TokenValues per row."""
    out = torch.zeros(resp.shape, dtype=torch.float32)
    for i, tv in enumerate(values):
        out[i, resp[i]] = torch.tensor(tv.advantages(), dtype=torch.float32)
    return out


@register("mc")
class MonteCarloCredit(CreditMethod):
    Params = MonteCarloParams
    tools: Tools | None = None  # the running system's, from start()

    def start(self, tools: Tools) -> None:
        self.tools = tools

    def weights(self, batch: RolloutBatch, stats: dict | None, step: int) -> dict[str, float]:
        if self.tools is None:
            raise RuntimeError("credit=mc samples continuations through the rollout engines: "
                               "start(tools) with a sampler first")
        if batch.pixel_values is not None:
            raise NotImplementedError("credit=mc continues text prompts only")
        resp = batch.response_mask.bool()
        # γ scales the response's advantage: where that is 0 (a group whose responses all
        # scored alike) it changes nothing, and those responses are not continued
        rows = list(range(len(batch.meta))) if batch.seq_advantages is None else \
            batch.seq_advantages.nonzero().flatten().tolist()
        values = mc_token_values(self.tools.sample,
                                 verifier_judge(self.tools.tok, [batch.meta[i] for i in rows]),
                                 [batch.meta[i]["prompt"].ids for i in rows],
                                 [batch.input_ids[i][resp[i]].tolist() for i in rows],
                                 self.p.k, self.tools.max_new_tokens, self.p.stride,
                                 seed=stable_hash("mc_credit", self.seed, step) % 2**31)
        adv = torch.zeros(resp.shape)
        adv[rows] = response_advantages(values, resp[rows])
        selected = top_q_mask(adv.abs(), resp, self.p.top_q)[0] & (adv != 0)
        gamma = torch.where(selected, torch.full_like(adv, self.p.gamma_amp), torch.ones_like(adv))
        batch.token_weights = batch.token_weights * gamma
        self.trace = CreditTrace(None, gamma, selected, [], [])
        n = resp.sum().clamp(min=1).item()
        moved = [tv for tv in values if max(tv.values) > min(tv.values)]
        return {"selected_share": selected.sum().item() / n,
                "gamma_mean": gamma[resp].mean().item() if resp.any() else 1.0,
                "responses_continued": len(rows) / max(1, len(batch.meta)),
                "responses_with_signal": len(moved) / max(1, len(values)),
                "abs_advantage_mean": adv.abs()[resp].mean().item() if resp.any() else 0.0,
                "continuations": sum(sum(tv.trials[:-1]) for tv in values)}
