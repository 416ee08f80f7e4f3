"""Does attention credit find the tokens that matter? Token signals against Monte Carlo token
values, on the policy's own responses to held-out problems (no training).

    python benchmarks/credit_quality.py --out benchmarks/results/credit_quality/arith \
        --prompts 64 --samples 2 --k 16 experiment=credit_ablation

Takes the run's cold start (built and cached if missing, from the same config keys
`launch.train` reads), samples `samples` responses per held-out problem at the rollout
temperature with vLLM, and gives every response token its Monte Carlo advantage A_t =
V(s_{t+1}) − V(s_t), V a prefix's success rate over K seeded continuations by the same policy
(rl/algorithms/mc_values.py; VinePPO). One scoring forward of the same policy (our attention
kernels, every layer's statistics) gives the token signals:

* γ of `coupled`, `local_chunk`, `global_anchor` (rl/methods/credit/preplan_anchor.py, the
  config's credit parameters or the defaults), FAI over the global heads, WAAD-Δ over the local
  heads, the attention entropy Ĥ of the middle layer (rl/methods/credit/attention_entropy.py),
  the policy's predictive entropy, the token's position in the response, and random;
* each attention signal also shifted by one token (the statistic of row t − 1, which shaped the
  prediction of token t; the strategies read row t for token t, the paper's literal indexing).

Two measurements, each with a 95% bootstrap interval over responses:

1. Ranking: AUROC of each signal for the positives = the top decile of |A_t| over the task's
   response tokens (|A_t| > 0 required), and Spearman's ρ between the signal and |A_t|. 0.5 /
   0 is no information; below 0.5 / 0, the signal's low end marks the tokens. Because |A_t|
   depends on where a token sits (the first columns of a sum decide more), also the AUROC
   within position strata: positives and negatives compared only inside the same block of
   `strata` response positions, so a signal that only knows roughly where a token sits scores
   0.5 there.
2. Intervention (the paper's check, §1.11 of papers.md): in every response, the token each
   signal ranks highest is replaced by a draw from the policy's next-token distribution (the
   original excluded) and the rest of the response is generated again (seeded); how often the
   outcome changes, and the Jaccard similarity of the regenerated rest to the original rest
   (whitespace-separated words; lower = the token steered more), against a random token and
   the top-|A_t| token. Keeping the rest and swapping only the token would mostly test whether
   a signal picks the answer line, which a final-answer verifier reads and nothing else.

Writes table.md, numbers.json and signals.png under --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATTENTION_SIGNALS = ("coupled", "local_chunk", "global_anchor", "fai", "waad_delta",
                     "attention_entropy")
OTHER_SIGNALS = ("predictive_entropy", "position", "random")


# --- pure pieces (tests/unit/test_credit_quality.py) ------------------------------------------

def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    for end in list(np.flatnonzero(np.diff(xs)) + 1) + [len(x)]:
        ranks[order[start:end]] = 0.5 * (start + 1 + end)
        start = end
    return ranks


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie) (Mann–Whitney); nan without
    both classes."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(score)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of average ranks; nan when either side is constant."""
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def top_decile(mag: np.ndarray) -> np.ndarray:
    """The positives: |A_t| at or above its 90th percentile (the ⌈0.1 n⌉-th largest, ties kept),
    and above 0."""
    if not len(mag):
        return np.zeros(0, dtype=bool)
    k = max(1, math.ceil(0.1 * len(mag) - 1e-9))
    thr = np.sort(mag)[::-1][k - 1]
    return (mag >= thr) & (mag > 0)


def bootstrap(stat, groups: list[np.ndarray], reps: int, seed: int) -> tuple[float, float, float]:
    """stat over the pooled tokens, and its 2.5 / 97.5 percentiles over `reps` resamples of the
    responses (each entry of `groups` is one response's token indices)."""
    rng = np.random.default_rng(seed)
    full = stat(np.concatenate(groups))
    draws = []
    for _ in range(reps):
        pick = rng.integers(0, len(groups), len(groups))
        v = stat(np.concatenate([groups[i] for i in pick]))
        if not math.isnan(v):
            draws.append(v)
    lo, hi = (np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"),) * 2)
    return full, float(lo), float(hi)


def shift_one(x: torch.Tensor) -> torch.Tensor:
    """s'_t = s_{t−1} along the sequence (0 at position 0)."""
    out = torch.zeros_like(x)
    out[:, 1:] = x[:, :-1]
    return out


def stratified_auroc(score: np.ndarray, positive: np.ndarray, strata: np.ndarray) -> float:
    """AUROC over the (positive, negative) pairs of the same stratum only; nan without pairs."""
    wins = pairs = 0.0
    for g in np.unique(strata):
        m = strata == g
        n_pos, n_neg = int(positive[m].sum()), int((~positive[m]).sum())
        if n_pos and n_neg:
            wins += auroc(score[m], positive[m]) * n_pos * n_neg
            pairs += n_pos * n_neg
    return wins / pairs if pairs else float("nan")


def top_token(score: torch.Tensor, resp: torch.Tensor, gen: torch.Generator) -> list[int]:
    """Per row, the response position with the highest score (ties broken at random)."""
    out = []
    for i in range(score.shape[0]):
        where = resp[i].nonzero().flatten()
        s = score[i, where].double()
        best = (s == s.max()).nonzero().flatten()
        out.append(int(where[best[torch.randint(len(best), (1,), generator=gen)]]))
    return out


def other_token(logp: torch.Tensor, original: int, gen: torch.Generator) -> int:
    """A draw from exp(logp) without `original` (the original itself when nothing else has mass)."""
    p = logp.double().exp()
    p[original] = 0.0
    return int(torch.multinomial(p / p.sum(), 1, generator=gen)) if p.sum() > 0 else original


def word_jaccard(a: str, b: str) -> float:
    """|A ∩ B| / |A ∪ B| of the whitespace-separated words (1 for two empty texts)."""
    wa, wb = set(a.split()), set(b.split())
    return len(wa & wb) / len(wa | wb) if wa | wb else 1.0


# --- the signals of one scored batch ------------------------------------------------------------

def token_signals(out: dict, batch, params, credit_layers: list[int], middle_layer: int,
                  seed: int) -> dict[str, torch.Tensor]:
    """{signal: [B, T]} from a scoring forward with every layer's statistics: the preplan/anchor
    strategies read `credit_layers` (the trainer's learner.stats_layers), attention entropy the
    middle layer. Higher = the strategy's choice, except Ĥ, whose low end the attention-entropy
    method favours first."""
    from rl.methods.credit.attention_entropy import normalised_entropy
    from rl.methods.credit.preplan_anchor import attention_credit

    resp = batch.response_mask.bool()
    stats = out["attn_stats"]
    own = {layer: stats[layer] for layer in credit_layers}
    credit = {s: attention_credit(own, resp, s, params) for s in ("coupled", "local_chunk", "global_anchor")}
    sets = credit["coupled"][1].sets
    pos = torch.cumsum(resp.long(), 1).float() - 1
    gen = torch.Generator().manual_seed(seed)
    signals = {s: credit[s][0] for s in credit}
    signals.update(fai=sets.fai, waad_delta=sets.delta,
                   attention_entropy=normalised_entropy(stats[middle_layer]["entropy"], batch.attention_mask).float(),
                   predictive_entropy=out["entropy"].float(), position=pos,
                   random=torch.rand(resp.shape, generator=gen))
    return signals


def head_distances(out: dict, resp: torch.Tensor) -> dict[int, list[float]]:
    """Each layer's heads' mean look-back distance over the response tokens."""
    w = resp.float()[:, None, :]
    return {layer: ((st["distance"].float() * w).sum((0, 2)) / w.sum().clamp(min=1)).tolist()
            for layer, st in out["attn_stats"].items()}


# --- the run --------------------------------------------------------------------------------------

def preplan_params(cfg):
    """The configured preplan/anchor parameters when the config's credit is one of those
    strategies, else the defaults (conf/credit/coupled.yaml)."""
    from omegaconf import OmegaConf

    from rl.methods.credit.preplan_anchor import PreplanAnchorParams

    if cfg.credit.name in ("coupled", "local_chunk", "global_anchor"):
        return PreplanAnchorParams(**OmegaConf.to_container(cfg.credit.params, resolve=True))
    return PreplanAnchorParams()


def fmt(v: tuple) -> str:
    return "—" if math.isnan(v[0]) else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=64, help="held-out problems")
    ap.add_argument("--samples", type=int, default=2, help="responses per problem")
    ap.add_argument("--k", type=int, default=16, help="continuations per prefix")
    ap.add_argument("--stride", type=int, default=1, help="a value every `stride` tokens")
    ap.add_argument("--strata", type=int, default=4, help="response positions per stratum")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mc_values", help="reuse this mc_values.json (the same draw, other credit settings)")
    args, overrides = ap.parse_known_args()
    from leaf_detection import compose_cfg  # (benchmarks/: the script's folder)

    cfg = compose_cfg(overrides)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import ray

    from kernels.capture import select_layers
    from rl.algorithms.mc_values import TokenValues, mc_token_values, rollout_sampler, verifier_judge
    from rl.cluster.runtime import init_ray, start_engine, wait_ready
    from rl.engine.frozen import FrozenModel
    from rl.loop.cold_start import load_tokenizer, num_layers, run_cold_start
    from rl.methods.credit.mc import response_advantages
    from rl.tasks import get_task
    from rl.tasks.base import stable_hash
    from rl.tasks.data import collate_rollouts, encode_prompt
    from rl.tasks.prompt_format import prompt_format

    t0 = time.perf_counter()
    init_ray(cfg.cluster)
    policy = run_cold_start(cfg, Path(cfg.cache_dir), cfg.logger.progress)
    tok = load_tokenizer(policy)
    task = get_task(cfg.task.name, seed=cfg.task.seed, **cfg.task.params)
    samples = task.dataset("test", args.prompts)
    prompts = [encode_prompt(tok, s, prompt_format(cfg.model, tok)) for s in samples]
    r = cfg.rollout
    engine = start_engine(cfg, policy, args.seed)
    wait_ready([engine])
    seeds = [stable_hash("credit_quality", args.seed, i) % 2**31 for i in range(len(prompts))]
    comps = ray.get(engine.generate.remote([p.request for p in prompts], args.samples, r.temperature,
                                           r.top_p, r.max_new_tokens, seeds))
    batch = collate_rollouts(prompts, comps, tok.pad_token_id)
    resp = batch.response_mask.bool()
    responses = [ids[m].tolist() for ids, m in zip(batch.input_ids, resp)]

    judge = verifier_judge(tok, batch.meta)
    t_mc = time.perf_counter()
    cache = out_dir / "mc_values.json"  # the expensive part, kept for re-renders of the same draw
    if args.mc_values and not cache.exists():
        cache.write_text(Path(args.mc_values).read_text())
    # credit.* settings change the signals, not the draw: they may differ from the saved run's
    key = {"config": [o for o in overrides if not o.startswith("credit")], "k": args.k,
           "stride": args.stride, "seed": args.seed, "responses": responses}
    saved = json.loads(cache.read_text()) if cache.exists() else None
    if saved and saved["key"] == key:
        values = [TokenValues(**v) for v in saved["values"]]
        mc_s = saved["seconds"]
    else:
        values = mc_token_values(rollout_sampler(engine, r.temperature, r.top_p), judge,
                                 [m["prompt"].ids for m in batch.meta], responses, args.k,
                                 r.max_new_tokens, args.stride, seed=args.seed)
        mc_s = time.perf_counter() - t_mc
        cache.write_text(json.dumps({"key": key, "seconds": mc_s,
                                     "values": [vars(v) for v in values]}))
    adv = response_advantages(values, resp)

    layers = num_layers(policy)
    params = preplan_params(cfg)
    model = FrozenModel(policy)
    fields = {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "response_mask")}
    scored = model.score(fields, r.temperature,
                         stats={"distance": True, "entropy": True, "waad_window": params.waad_window,
                                "fai_band": list(params.fai_band), "layers": list(range(layers))})
    credit_layers = select_layers(cfg.learner.stats_layers, layers)
    signals = token_signals(scored, batch, params, credit_layers, layers // 2, args.seed)
    for name in ATTENTION_SIGNALS:
        signals[f"{name} (t−1)"] = shift_one(signals[name])

    # ranking: pooled over response tokens, bootstrapped over responses
    flat = {name: s[resp].numpy().astype(np.float64) for name, s in signals.items()}
    mag = adv[resp].abs().numpy().astype(np.float64)
    positive = top_decile(mag)
    lengths = resp.sum(1).tolist()
    offsets = np.cumsum([0] + lengths)
    groups = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(lengths))]
    strata = flat["position"] // args.strata
    ranking = {}
    for name, x in flat.items():
        ranking[name] = {
            "auroc": bootstrap(lambda idx: auroc(x[idx], positive[idx]), groups, args.boot, args.seed),
            "auroc_within_position": bootstrap(
                lambda idx: stratified_auroc(x[idx], positive[idx], strata[idx]), groups, args.boot, args.seed),
            "spearman": bootstrap(lambda idx: spearman(x[idx], mag[idx]), groups, args.boot, args.seed)}

    # intervention: each signal's top token replaced, the rest regenerated
    logp = model.full_logprobs(fields, r.temperature)
    gen = torch.Generator().manual_seed(args.seed)
    outcome = np.array([judge(i, responses[i]) for i in range(len(responses))])
    pick_by = {name: signals[name] for name in list(ATTENTION_SIGNALS) + list(OTHER_SIGNALS)}
    pick_by["mc |A_t| (oracle)"] = adv.abs()
    sampler = rollout_sampler(engine, r.temperature, r.top_p)
    intervention, per_response = {}, {}
    for name, score in pick_by.items():
        changed, similar = [], []
        picks = top_token(score, resp, gen)
        picked = []
        for i, pos in enumerate(picks):
            j = pos - batch.meta[i]["prompt_len"]  # index in the response
            picked.append(responses[i][:j] + [other_token(logp[i, pos], responses[i][j], gen)])
        todo = [i for i, h in enumerate(picked) if r.max_new_tokens - len(h) >= 1]
        conts = dict(zip(todo, sampler([batch.meta[i]["prompt"].ids + picked[i] for i in todo], 1,
                                       [stable_hash("perturb", args.seed, name, i) % 2**31 for i in todo],
                                       [r.max_new_tokens - len(picked[i]) for i in todo])))
        for i, h in enumerate(picked):
            rest = conts[i][0] if i in conts else []
            changed.append(abs(judge(i, h + rest) - outcome[i]))
            similar.append(word_jaccard(tok.decode(responses[i][len(h):], skip_special_tokens=True),
                                        tok.decode(rest, skip_special_tokens=True)))
        changed, similar = np.array(changed), np.array(similar)
        per_response[name] = similar
        single = [np.array([i]) for i in range(len(responses))]
        intervention[name] = {
            "outcome_changed": bootstrap(lambda idx: float(changed[idx].mean()), single, args.boot, args.seed),
            "jaccard": bootstrap(lambda idx: float(similar[idx].mean()), single, args.boot, args.seed)}
    for name in intervention:  # the paper's "larger change in x% of trials", against random
        intervention[name]["steers_more_than_random"] = float(
            (per_response[name] < per_response["random"]).mean())
    ray.kill(engine)

    heads = head_distances(scored, resp)
    moved = sum(max(tv.values) > min(tv.values) for tv in values)
    facts = {
        "config": overrides, "args": vars(args), "responses": len(responses),
        "response_tokens": int(resp.sum()), "mean_length": float(np.mean(lengths)),
        "accuracy": float(outcome.mean()), "responses_whose_value_moves": int(moved),
        "positives": int(positive.sum()), "positive_threshold": float(mag[positive].min()) if positive.any() else None,
        "continuations": int(sum(sum(tv.trials[:-1]) for tv in values)), "mc_seconds": mc_s,
        "total_seconds": time.perf_counter() - t0, "head_distance": heads,
        "preplan_params": vars(params), "credit_layers": credit_layers,
    }
    (out_dir / "numbers.json").write_text(json.dumps(
        {"facts": facts, "ranking": ranking, "intervention": intervention}, indent=1))
    (out_dir / "table.md").write_text(render(facts, ranking, intervention))
    plot(flat, mag, positive, out_dir / "signals.png")
    print((out_dir / "table.md").read_text())


def render(facts: dict, ranking: dict, intervention: dict) -> str:
    f = facts
    lines = [f"{f['responses']} responses ({f['mean_length']:.1f} tokens on average, "
             f"{f['response_tokens']} tokens), sampled accuracy {100 * f['accuracy']:.1f}%; "
             f"the value moves inside {f['responses_whose_value_moves']} responses; "
             f"{f['positives']} positive tokens (|A_t| ≥ {f['positive_threshold']}); "
             f"{f['continuations']} continuations in {f['mc_seconds']:.0f} s.", "",
             "| signal | AUROC (top-decile |A_t|) | AUROC within position strata | Spearman ρ with |A_t| |",
             "|---|---|---|---|"]
    for name, v in ranking.items():
        lines.append(f"| {name} | {fmt(v['auroc'])} | {fmt(v['auroc_within_position'])} | {fmt(v['spearman'])} |")
    lines += ["", "Intervention: each response's top token by the signal replaced by another draw "
              "from the policy, the rest regenerated", "",
              "| token perturbed | outcome changed | Jaccard of the rest (lower = steers more) | "
              "steers more than random |", "|---|---|---|---|"]
    for name, v in intervention.items():
        lines.append(f"| {name} | {fmt(v['outcome_changed'])} | {fmt(v['jaccard'])} | "
                     f"{100 * v['steers_more_than_random']:.0f}% |")
    lines += ["", "Mean look-back distance per head (rows: layers):", ""]
    for layer, d in f["head_distance"].items():
        lines.append(f"- layer {layer}: " + ", ".join(f"{x:.1f}" for x in d))
    return "\n".join(lines) + "\n"


def plot(flat: dict, mag: np.ndarray, positive: np.ndarray, path: Path) -> None:
    """Each signal's distribution on the positive tokens against the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in flat if "(t−1)" not in n]
    fig, axes = plt.subplots(2, math.ceil(len(names) / 2), figsize=(3.2 * math.ceil(len(names) / 2), 6))
    for ax, name in zip(axes.flat, names):
        x = flat[name]
        ax.hist([x[~positive], x[positive]], bins=20, density=True, label=["rest", "top-decile |A_t|"])
        ax.set_title(name, fontsize=9)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
