"""One RL step, ours against TRL's GRPOTrainer on the same work, and our rollout stage against
the same vLLM engine called directly — in one invocation, alone. Ours, the direct engine (and
a --baseline config of ours) run step by step in turn, so that the host's speed changes hit
them alike; TRL runs afterwards (its trainer runs all its steps in one call).

    python benchmarks/bench_step.py                 # defaults: the README's default run
    python benchmarks/bench_step.py --steps 5 --warmup 2 --skip-trl
    python benchmarks/bench_step.py --skip-trl --skip-vllm \
        --baseline "learner.torch_threads=1 learner.padding_free=false"   # vs the issue-12 start

Same work on both sides: the cold-start checkpoint of the default config (built or reused from
cache_dir), the same prompts in the same order (the task's training stream), group size,
prompts per step, minibatch (so the same number of optimizer steps per generation batch), max
new tokens, temperature 1, top-p 1, no top-k, no KL, learning rate, clip 0.2/0.28, token-mean
loss. TRL generates with `transformers.generate` in its own process (its default without a
vLLM server), which is what a user runs locally. TRL is a benchmark-only dependency
(`pip install -e ".[bench]"`); the product never imports it.

Reported per stage, for the steady-state steps (after --warmup): seconds (median), and tokens/s
the way NeMo-RL reports it (tokens ÷ stage time; generation: response tokens, the rest: prompt +
response tokens), then the ratios ours / TRL (< 1: we are faster) and ours / standalone vLLM.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

STAGES = ("rollout", "reward", "score", "update", "sync")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rl.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- ours ----------------------------------------------------------------------------------------
def run_ours(cfgs: dict, warmup: int, steps: int, direct: bool = True) -> dict:
    """Our trainer's step for each config (name → config), the configs in turn step by step,
    `warmup + steps` times (no eval, no checkpoint in between); with `direct`, after each step
    also the first config's generation by the same vLLM engine called directly (`Direct`). A
    change of the host's speed during the run then hits every side alike. Returns name →
    figures, and "direct_s"."""
    from rl.loop.trainer import Trainer

    trainers, engine = {}, None
    try:
        for name, cfg in cfgs.items():
            trainers[name] = Trainer(cfg)
        first, cfg0 = next(iter(trainers.values())), next(iter(cfgs.values()))
        engine = Direct(cfg0, first.policy_init) if direct else None
        rows = {name: [] for name in cfgs}
        direct_s = []
        for step in range(warmup + steps):
            order = list(trainers) if step % 2 == 0 else list(trainers)[::-1]  # no one always first
            for name in order:
                rows[name].append(trainers[name].train_step(step))
            if engine:
                prompts = first.encode(trainer_samples(first, step))
                direct_s.append(engine.generate(prompts, [seed_of(cfg0, step, i)
                                                          for i in range(len(prompts))]))
        out = {name: summarise(trainers[name], cfgs[name], rows[name][warmup:], warmup + steps)
               for name in cfgs}
        out["direct_s"] = median(direct_s[warmup:]) if engine else None
        return out
    finally:
        for trainer in trainers.values():
            trainer.close()
        import ray

        ray.shutdown()


def summarise(trainer, cfg, measured: list[dict], n_steps: int) -> dict:
    prompts = [trainer.encode(trainer_samples(trainer, s)) for s in range(n_steps)]
    warmup = n_steps - len(measured)
    out = {f"{s}_s": median([m[f"time/{s}_s"] for m in measured]) for s in STAGES}
    out["step_s"] = median([m["time/step_s"] for m in measured])
    out["response_tokens"] = median([m["rollout/response_len"] for m in measured]) * \
        cfg.algorithm.prompts_per_step * cfg.algorithm.n_samples
    out["total_tokens"] = out["response_tokens"] + cfg.algorithm.n_samples * median(
        [float(sum(len(p.ids) for p in ps)) for ps in prompts[warmup:]])
    out["policy"] = trainer.policy_init
    out["prompts"] = prompts
    return out


def trainer_samples(trainer, step: int):
    from rl.tasks.data import train_samples_at

    n = trainer.alg.prompts_per_step
    return train_samples_at(trainer.task, step * n, n)


def seed_of(cfg, step: int, i: int) -> int:
    from rl.tasks.base import stable_hash

    return stable_hash("sample", cfg.seed, step, i) % 2**31  # as Trainer.rollout


# --- the same vLLM engine, called directly --------------------------------------------------------
class Direct:
    """vllm.LLM.generate in this process (no Ray, no actor), built with our engine's arguments
    and sampling parameters (rollout/vllm_engine.py: logprobs, no detokenizing, allowed
    tokens), on a step's prompts with the same per-prompt seeds."""

    def __init__(self, cfg, policy: str):
        from rl.cluster.runtime import engine_config
        from rollout.vllm_engine import VLLMEngine

        self.engine = VLLMEngine(engine_config(cfg, policy, cfg.seed))
        self.cfg = cfg

    def generate(self, prompts: list, seeds: list[int]) -> float:
        from rollout.vllm_engine import engine_prompt

        r, a = self.cfg.rollout, self.cfg.algorithm
        params = self.engine.sampling_params(a.n_samples, r.temperature, r.top_p,
                                             r.max_new_tokens, len(prompts), seeds)
        t0 = time.perf_counter()
        self.engine.llm.generate([engine_prompt(p.request) for p in prompts], params,
                                 use_tqdm=False)
        return time.perf_counter() - t0


# --- TRL -----------------------------------------------------------------------------------------
def run_trl(cfg, policy: str, prompts: list, warmup: int, steps: int, threads: int) -> dict:
    """TRL's GRPOTrainer on the same prompts (one generation batch = one of our steps: the
    step's prompts × n samples, split into the same number of optimizer steps)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rewards.verifiers import resolve

    torch.set_num_threads(threads)
    a, r = cfg.algorithm, cfg.rollout
    tok = AutoTokenizer.from_pretrained(policy)
    rows = [{"prompt": tok.decode(p.ids), "answer": p.sample.answer, "task": p.sample.task,
             "meta": p.sample.meta} for ps in prompts for p in ps]
    verifiers = {t: resolve(t) for t in {x["task"] for x in rows}}

    def correct(completions, answer, task, meta, **_):
        return [float(verifiers[t](c, ans, m)) for c, ans, t, m in zip(completions, answer, task, meta)]

    batch = a.prompts_per_step * a.n_samples
    per_opt_step = a.minibatch_size
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, report_to=[], logging_steps=10**6,
            save_strategy="no", seed=cfg.seed, shuffle_dataset=False,
            per_device_train_batch_size=per_opt_step, gradient_accumulation_steps=1,
            steps_per_generation=batch // per_opt_step, num_generations=a.n_samples,
            num_iterations=1, max_completion_length=r.max_new_tokens,
            max_steps=(warmup + steps) * (batch // per_opt_step), temperature=r.temperature,
            top_p=r.top_p, top_k=0, beta=0.0, epsilon=a.clip_low, epsilon_high=a.clip_high,
            loss_type="dapo", learning_rate=a.lr, lr_scheduler_type="constant",
            max_grad_norm=a.grad_clip, dataloader_num_workers=0, disable_tqdm=True)
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
        trainer = GRPOTrainer(model=model, reward_funcs=correct, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tok)
        log = Timings()
        log.wrap(trainer, "_generate", "generate")
        log.wrap(trainer, "_calculate_rewards", "reward")
        log.wrap(trainer, "_generate_and_score_completions", "generate_and_score")
        log.wrap(trainer, "training_step", "training_step")
        trainer.train()
    k = batch // per_opt_step
    gens = log.calls["generate"][warmup:]
    rewards = log.calls["reward"][warmup:]
    gs = log.calls["generate_and_score"][warmup:]
    ts = log.calls["training_step"][warmup * k:]
    step_s = [sum(ts[i * k:(i + 1) * k]) for i in range(len(ts) // k)]
    return {"rollout_s": median(gens), "reward_s": median(rewards),
            "score_s": median([x - g - rw for x, g, rw in zip(gs, gens, rewards)]),
            "update_s": median([s - x for s, x in zip(step_s, gs)]), "sync_s": 0.0,
            "step_s": median(step_s), "threads": threads}


class Timings:
    """Wall time of every call to some methods of one object (TRL's stages)."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}

    def wrap(self, obj, method: str, name: str) -> None:
        inner = getattr(obj, method)
        self.calls[name] = []

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.calls[name].append(time.perf_counter() - t0)

        setattr(obj, method, timed)


# --- report --------------------------------------------------------------------------------------
def report(ours: dict, trl: dict | None, standalone: float | None, cfg, args,
           base: dict | None = None) -> str:
    a = cfg.algorithm
    resp, total = ours["response_tokens"], ours["total_tokens"]
    tokens = {"rollout": resp, "reward": resp, "score": total, "update": total * a.epochs,
              "sync": None, "step": total}
    lines = [f"work per step: {a.prompts_per_step} prompts × {a.n_samples} samples, "
             f"{resp:.0f} response tokens ({resp / (a.prompts_per_step * a.n_samples):.1f} "
             f"per response), {total:.0f} prompt + response tokens, "
             f"{a.prompts_per_step * a.n_samples // a.minibatch_size * a.epochs} optimizer steps; "
             f"median of {args.steps} steps after {args.warmup} warm-up",
             "", f"{'stage':<10}{'ours s':>10}{'ours tok/s':>13}"
             + (f"{'TRL s':>10}{'TRL tok/s':>12}{'ours/TRL':>10}" if trl else "")
             + (f"{'base s':>10}{'base/ours':>11}" if base else "")]
    for s in (*STAGES, "step"):
        o = ours[f"{s}_s"]
        n = tokens[s]
        row = f"{s:<10}{o:>10.3f}{(n / o if n and o else float('nan')):>13,.0f}"
        if trl:
            t = trl[f"{s}_s"]
            row += (f"{t:>10.3f}{(n / t if n and t else float('nan')):>12,.0f}"
                    f"{(o / t if t else float('nan')):>10.2f}")
        if base:
            b = base[f"{s}_s"]
            row += f"{b:>10.3f}{(b / o if o else float('nan')):>10.2f}×"
        lines.append(row)
    if trl:
        lines.append(f"TRL: transformers.generate in-process, torch threads {trl['threads']}; its "
                     "'score' = the old-logprob forward inside _generate_and_score_completions, "
                     "'update' = the optimizer steps; no weight sync (one process)")
    if base:
        lines.append(f"base: ours with {args.baseline!r}, its steps in turn with ours; "
                     "base/ours > 1: ours is faster")
    if standalone is not None:
        lines += ["", f"rollout: ours {ours['rollout_s']:.3f} s vs the same vLLM engine called "
                      f"directly {standalone:.3f} s → ours at {standalone / ours['rollout_s']:.2f}× "
                      "its throughput"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--trl-threads", type=int, default=None,
                    help="torch threads for TRL (default: torch's own, the cores)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--baseline", default="",
                    help="also run ours with these extra Hydra overrides (space-separated), "
                         "its steps in turn with ours, and print the speed-up per stage")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both sides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["logger=none", "logger.progress=false", *args.overrides]
        cfg = compose([*common, f"output_dir={tmp}/ours"])
        cfgs = {"ours": cfg}
        if args.baseline:
            cfgs["base"] = compose([*common, f"output_dir={tmp}/base", *args.baseline.split()])
        t0 = time.perf_counter()
        runs = run_ours(cfgs, args.warmup, args.steps, direct=not args.skip_vllm)
        ours, base, standalone = runs["ours"], runs.get("base"), runs["direct_s"]
        print(f"ours{', the baseline' if base else ''}"
              f"{' and vLLM called directly' if standalone else ''}, step by step in turn: "
              f"{time.perf_counter() - t0:.0f} s in all", flush=True)
        trl = None
        if not args.skip_trl:
            import torch

            t0 = time.perf_counter()
            trl = run_trl(cfg, ours["policy"], ours["prompts"], args.warmup, args.steps,
                          args.trl_threads or torch.get_num_threads())
            print(f"TRL: {time.perf_counter() - t0:.0f} s in all", flush=True)
    print()
    print(report(ours, trl, standalone, cfg, args, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
