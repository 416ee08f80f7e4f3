"""The RL loop, one readable step at a time.

    prompts → rollouts (vLLM engines; with rollout.async_steps=k started up to k steps early,
    rl/loop/rollout_queue.py) → rewards (worker pool) → the methods' extra rows → scoring forward
    (old logprobs, entropy, the attention statistics methods ask for) → the methods' reward
    shaping → advantages × the methods' token weights γ_t → minibatch updates (DeepSpeed; the
    policy loss with the methods' extra terms) → weight sync → held-out eval → checkpoint

The methods (rl/methods/base.py) are called at those fixed points; none is named here.

Every step is reproducible from (seed, step): prompts come from the task by position, sampling
seeds are derived per prompt, so `resume=true` after step k replays step k+1 exactly.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from rewards import RewardItem, RewardPool, summarize
from rl.algorithms.advantages import compute_advantages
from rl.algorithms.mc_values import budget_sampler
from rl.algorithms.losses import PolicyLoss, PolicyLossConfig
from rl.algorithms.overlong import apply_to_mask, apply_to_rewards
from rl.batch import RolloutBatch
from rl.loop.checkpoint import EARLIER, CheckpointManager, check_same_run
from rl.loop.manifest import built_by, code_commit
from rl.loop.cold_start import base_model_path, load_tokenizer, num_layers, run_cold_start
from rl.config_checks import check_config, check_layers, overlong_config
from rl.tasks.data import check_prompt_lengths, collate_rollouts, encode_prompt, train_samples_at
from rl.cluster.gpu_sharing import learner_alone, shares_gpu, start_both, to_engines, to_learner
from rl.methods import build_methods, scoring_request
from rl.methods.base import ExtraRows, Method, RunInfo, Tools
from rl.cluster.placement import check_shared_dirs, check_transport_placement
from rl.tasks.prompt_format import prompt_format
from rl.cluster.remote_calls import LearnerFailure
from rl.cluster.rollout_group import Generation
from rl.loop.rollout_queue import RolloutQueue
from rl.cluster.runtime import (engine_gpus, init_ray, learner_gpus, start_engines, start_learner,
                        write_placement)
from rl.loop.stop_signal import StopOnSignal
from rl.tasks import get_task
from rl.tasks.base import stable_hash
from rl.loop.tracking import Tracker
from rl.models.vision import image_processor_for

log = logging.getLogger(__name__)

IN_FLIGHT = "rollouts_in_flight.json"  # async mode: batches started before the checkpoint
TRAIN_KEYS = ("input_ids", "attention_mask", "response_mask", "old_logprobs", "advantages",
              "sampler_logprobs", "ref_logprobs", "pixel_values", "image_grid_thw",
              "group_ids")  # a group's rows share their prompt: packed forwards store it once


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(x.dtype)
    return float((x * m).sum() / m.sum().clamp(min=1))


def mixed_group_share(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    groups = group_ids.unique()
    mixed = [bool(rewards[group_ids == g].unique().numel() > 1) for g in groups]
    return float(np.mean(mixed))


def mean_of_finite(values: list[float]) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


class StageClock:
    """Seconds per stage of a step (time/<stage>_s), a method's hooks under its name."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        key = f"time/{name}_s"
        self.times[key] = self.times.get(key, 0.0) + seconds

    def __call__(self, name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.add(name, time.perf_counter() - t0)
        return out

    def finish(self, methods: list[Method]) -> dict[str, float]:
        """The step's total, and each method's share of it (with the statistics pass when it
        reads one; on GPU that pass is not timed apart, and the share is NaN)."""
        t = self.times
        t["time/step_s"] = time.perf_counter() - self.start
        for m in methods:
            own = t.get(f"time/{m.name}_s", 0.0) + (t["time/stats_s"] if m.reads_statistics else 0.0)
            t[f"time/{m.name}_share"] = own / t["time/step_s"]
        return t


class Trainer:
    def __init__(self, cfg):
        check_config(cfg)
        self.cfg = cfg
        self.alg = cfg.algorithm
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        # Built before any actor: a bad task parameter fails here, cheaply.
        self.task = get_task(cfg.task.name, seed=cfg.task.seed, **cfg.task.params)
        if self.task.num_samples("test") == 0:
            raise ValueError(f"task {cfg.task.name!r} has no held-out problems to evaluate on "
                             "(see its test_path / heldout_frac parameters)")
        self.loss_cfg = PolicyLossConfig(
            clip_low=self.alg.clip_low, clip_high=self.alg.clip_high, kl_coef=self.alg.kl_coef,
            kl_estimator=self.alg.kl_estimator, entropy_coef=self.alg.entropy_coef,
            tis_cap=self.alg.tis_cap, tis_mode=self.alg.tis_mode, loss_agg=self.alg.loss_agg)
        self.methods = build_methods(cfg)
        self.overlong = overlong_config(cfg)
        self.ckpts = CheckpointManager(self.out / "checkpoints", cfg.keep_last, cfg.verify_checkpoints)
        resume_from = None
        if cfg.resume:  # verified here, before any actor: the newest intact one, or a clear error
            resume_from = self.ckpts.newest_intact()
            if resume_from is None:
                log.info("resume=true: no checkpoint in %s, starting fresh", self.ckpts.root)
        elif n := self.ckpts.set_aside():
            log.warning("resume=false: %d checkpoints of an earlier run in %s moved to %s/, removed "
                        "once this run's first checkpoint is written (resume=true continues a run)",
                        n, self.ckpts.root, EARLIER)
        self.resumed_from = resume_from  # (summary.json)
        run_config = OmegaConf.to_container(cfg, resolve=True)
        if resume_from is not None:
            check_same_run(self.out / "config.yaml", run_config)
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(run_config))
        base = base_model_path(cfg, Path(cfg.cache_dir))
        check_layers(cfg, num_layers(base))  # layer selections against the model's depth
        self.tok = load_tokenizer(base)
        self.images = image_processor_for(base)  # None for a text model
        self.fmt = prompt_format(cfg.model, self.tok)  # its chat template, or the prefix keys
        for split in ("train", "test"):  # a finite data set is checked whole, before any actor
            n = self.task.num_samples(split)
            # (a generated one by its first sample: an image task with a text model, or the
            # reverse, fails here)
            self.encode(self.task.dataset(split, 1 if n is None else None))
        init_ray(cfg.cluster)
        check_shared_dirs([self.out, cfg.cache_dir], cfg.cluster.placement_timeout_s)
        self.timings: dict[str, float] = {}
        self.policy_init = self.starting_policy()
        log.info("RL starts from %s", self.policy_init)
        for m in self.methods:
            m.setup(RunInfo(num_layers(self.policy_init), cfg.steps))
        self.request = scoring_request(self.methods)  # what the scoring forward captures

        t0 = time.perf_counter()
        shared = shares_gpu(learner_gpus(cfg), engine_gpus(cfg))
        self.engines, self.learner = start_both(lambda: start_engines(cfg, self.policy_init),
                                                self.start_learner_side, shared)
        self.rollouts = RolloutQueue(self.engines, self.start_rollouts, cfg.rollout.async_steps,
                                     cfg.steps)
        if cfg.rollout.async_steps and not self.alg.tis_cap:
            log.warning("rollout.async_steps=%d without algorithm.tis_cap: responses sampled up "
                        "to %d versions ago are trained on uncorrected", cfg.rollout.async_steps,
                        cfg.rollout.async_steps)
        self.engines_info = self.engines.ready()  # where each engine runs
        self.timings["actors_start_s"] = time.perf_counter() - t0
        ranks = self.learner.where()
        write_placement(self.out / "placement.json", ranks, self.engines_info)
        check_transport_placement(cfg.learner.weight_transport, ranks[0], self.engines_info)

        self.step = 0
        self.state: dict = {}
        self.failures = 0
        if resume_from is not None:
            self.restore(resume_from)
            log.info("resumed from %s (step %d)", resume_from, self.step)
        elif cfg.rollout.async_steps or shared:  # async: v0 as a payload too (an engine restarted
            self.sync_weights(0)  # during a generation started with v0 reloads it); shared: the
            # learner's state off the GPU, the sleeping engines woken with the policy's weights
        self.pool = RewardPool(cfg.reward.num_workers, cfg.reward.timeout_s)
        self.tracker = Tracker(cfg, self.out, run_config,
                               resume_step=self.step if resume_from is not None else None)

    def starting_policy(self) -> str:
        """The cold start, then each method's stage before RL, if it has one."""
        cfg, progress = self.cfg, self.cfg.logger.progress
        t0 = time.perf_counter()
        policy = run_cold_start(cfg, Path(cfg.cache_dir), progress)
        self.timings["cold_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m in self.methods:
            policy = m.before_rl(policy, progress)
        self.timings["before_rl_s"] = time.perf_counter() - t0
        return policy

    def start_learner_side(self):
        """The learner group (with what methods load beside the policy), then what the
        methods read through it. Started again after a learner failure."""
        options = {k: v for m in self.methods for k, v in m.learner_options().items()}
        ref = self.policy_init if self.alg.kl_coef > 0 else None
        learner = start_learner(self.cfg, self.policy_init, lr=self.alg.lr,
                                minibatch_size=self.alg.minibatch_size, ref_model_path=ref,
                                **options)
        for m in self.methods:
            m.start(self.tools(learner))
        return learner

    def tools(self, learner=None) -> Tools:
        """What a method's hooks may use."""
        r = self.cfg.rollout
        return Tools(learner or self.learner, self.tok, r.temperature, self.roll,
                     budget_sampler(self.continue_prefixes), r.max_new_tokens)

    def restore(self, ckpt: Path | None) -> None:
        """Learner state and trainer state from a checkpoint (None: the start of RL), then the
        engines get the same weights."""
        in_flight = []
        if ckpt is not None:
            self.learner.load(str(ckpt / "ds"))
            self.state = CheckpointManager.load_state(ckpt)
            if (ckpt / IN_FLIGHT).exists():
                in_flight = json.loads((ckpt / IN_FLIGHT).read_text())
        else:
            self.state = {k: v for k, v in self.state.items() if k == "cold_start_eval"}
        self.step = self.state.get("step", 0)
        self.sync_weights(self.step)
        self.rollouts.restore(in_flight)

    def sync_weights(self, version: int) -> dict[str, float]:
        """Policy `version` into the engines — after the learner's optimizer state has left a
        GPU they share (rl/cluster/gpu_sharing.py; a no-op otherwise)."""
        return to_engines(self.learner, self.engines, version)

    def recover_learner(self, err: LearnerFailure) -> None:
        """A learner rank died or hung: a new group, restored from the last checkpoint (or from
        the start of RL when none was written yet). The lost steps are re-run exactly."""
        self.failures += 1
        if self.failures > self.cfg.max_failures:
            raise RuntimeError(f"the learner group failed {self.failures} times "
                               f"(max_failures={self.cfg.max_failures}); last: {err}") from err
        ckpt = self.ckpts.newest_intact()
        log.warning("learner failure %d of at most %d at step %d: %s — restarting the group from "
                    "%s", self.failures, self.cfg.max_failures, self.step + 1, err,
                    ckpt or "the start of RL")
        t0 = time.perf_counter()
        self.shutdown_learner_side()  # returns once its ranks' processes have exited
        to_learner(self.engines)  # a GPU shared with the engines: the new learner starts alone
        self.learner = self.start_learner_side()
        check_transport_placement(self.cfg.learner.weight_transport, self.learner.where()[0],
                                  self.engines_info)
        self.restore(ckpt)
        self.tracker.rewind(self.step)
        log.warning("learner group restarted, step %d restored and engines re-synced in %.1f s",
                    self.step, time.perf_counter() - t0)

    def shutdown_learner_side(self) -> None:
        for m in self.methods:
            m.stop()
        self.learner.shutdown()

    # --- data -------------------------------------------------------------------------------
    def encode(self, samples):
        prompts = [encode_prompt(self.tok, s, self.fmt, self.images) for s in samples]
        check_prompt_lengths(prompts, self.cfg.rollout.max_model_len)
        return prompts

    def step_prompts(self, step: int):
        """The step's prompts and per-prompt sampling seeds: a function of (seed, step) alone."""
        n = self.alg.prompts_per_step
        prompts = self.encode(train_samples_at(self.task, step * n, n))
        seeds = [stable_hash("sample", self.cfg.seed, step, i) % 2**31 for i in range(len(prompts))]
        return prompts, seeds

    def start_rollouts(self, step: int) -> tuple[list, Generation]:
        prompts, seeds = self.step_prompts(step)
        r = self.cfg.rollout
        return prompts, self.engines.submit([p.request for p in prompts], self.alg.n_samples,
                                            r.temperature, r.top_p, r.max_new_tokens, seeds)

    def generate(self, prompts, n: int, temperature: float, seeds=None):
        """n completions per prompt, in prompt order (rl/cluster/rollout_group.py splits them over the
        engines and survives a dead one)."""
        r = self.cfg.rollout
        return self.engines.generate([p.request for p in prompts], n, temperature, r.top_p,
                                     r.max_new_tokens, seeds)

    def continue_prefixes(self, prefixes: list[list[int]], k: int, seeds: list[int], budget: int):
        """k completions of each token-id prefix (Monte Carlo values), at most `budget` tokens."""
        r = self.cfg.rollout
        return self.engines.generate(prefixes, k, r.temperature, r.top_p, budget, seeds)

    def roll(self, prompts, seeds: list[int], first_group: int) -> RolloutBatch:
        """Rollouts of extra prompts (a method's extra groups), collated and rewarded."""
        comps = self.generate(prompts, self.alg.n_samples, self.cfg.rollout.temperature, seeds)
        batch = collate_rollouts(prompts, comps, self.tok.pad_token_id, first_group=first_group)
        self.reward(batch, self.decode_responses(batch))
        return batch

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        rows = [ids[m].tolist() for ids, m in zip(batch.input_ids, batch.response_mask)]
        return self.tok.batch_decode(rows, skip_special_tokens=True)

    # --- one step ---------------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[RolloutBatch, int]:
        """The step's batch (waiting for it when started earlier) and its staleness."""
        prompts, completions, staleness = self.rollouts.take(step)
        if prompts is None:  # started before a resume: encoded again, not kept in the checkpoint
            prompts, _ = self.step_prompts(step)
        return collate_rollouts(prompts, completions, self.tok.pad_token_id), staleness

    def reward(self, batch: RolloutBatch, texts: list[str]) -> dict:
        items = [RewardItem(response=t, answer=m["answer"], meta=m["sample_meta"],
                            verifier=m["task"], components=dict(self.cfg.reward.components))
                 for t, m in zip(texts, batch.meta)]
        results = self.pool.score(items)
        batch.rewards = torch.tensor([r.total for r in results], dtype=torch.float32)
        batch.correct = torch.tensor([r.components.get(m["task"], 0.0)
                                      for r, m in zip(results, batch.meta)], dtype=torch.float32)
        for r in results:
            if r.error_messages:
                log.warning("reward: %s", "; ".join(r.error_messages[:3]))
        return summarize(results)

    def hooks(self, clock: StageClock, hook: str, *args) -> dict[str, float]:
        """Every method's `hook`, in order: its metrics under its name, its seconds on its
        clock."""
        out = {}
        for m in self.methods:
            metrics = clock(m.name, getattr(m, hook), *args)
            out.update({f"{m.name}/{k}": v for k, v in metrics.items()})
        return out

    def after_rewards(self, batch: RolloutBatch, step: int,
                      clock: StageClock) -> tuple[RolloutBatch, list[ExtraRows], dict]:
        """The methods' extra groups (added to the batch) and extra loss rows."""
        rows, metrics = [], {}
        for m in self.methods:
            out = clock(m.name, m.after_rewards, batch, step, self.tools())
            batch = out.batch
            rows += out.extra_rows
            metrics.update({f"{m.name}/{k}": v for k, v in out.metrics.items()})
        return batch, rows, metrics

    def score(self, batch: RolloutBatch) -> float:
        """Old logprobs and entropy — and the attention statistics the methods read — from one
        no-grad forward of the current policy. Returns the seconds of the statistics pass."""
        t = {**batch.model_inputs(), "response_mask": batch.response_mask,
             "group_ids": batch.group_ids}
        for m in self.methods:
            classes = m.key_classes(batch)
            if classes is not None:
                t["key_classes"] = classes
        out = self.learner.score(t, self.cfg.rollout.temperature, self.request)
        batch.attn_stats = out.get("attn_stats")
        mask = batch.response_mask
        batch.old_logprobs = out["logprobs"] * mask
        batch.entropy = out["entropy"] * mask
        if self.alg.kl_coef > 0:
            batch.ref_logprobs = self.learner.ref_score(t, self.cfg.rollout.temperature) * mask
        return out.get("stats_s", 0.0)

    def advantages(self, batch: RolloutBatch, step: int,
                   clock: StageClock | None = None) -> tuple[torch.Tensor, dict]:
        """Per-response advantages, then the methods' token weights γ_t (which may read their
        sign), then per-token advantages A × γ_t."""
        adv = compute_advantages(self.alg.advantage, batch.rewards, batch.group_ids,
                                 self.alg.std_normalize)
        batch.seq_advantages = adv
        metrics = self.hooks(clock or StageClock(), "token_weights", batch, step)
        batch.advantages = adv[:, None] * batch.token_weights * batch.response_mask
        return adv, metrics

    def update(self, batch: RolloutBatch, step: int, extra_rows: list[ExtraRows] = ()) -> dict:
        """`epochs` passes of minibatch updates; metrics averaged over minibatches. The rows of
        the methods' loss terms are dealt out over each epoch's minibatches."""
        gen = torch.Generator().manual_seed(stable_hash("minibatch", self.cfg.seed, step) % 2**63)
        rows, mb = len(batch), self.alg.minibatch_size
        starts = range(0, rows, mb)
        parts = [np.array_split(np.arange(len(e.rows["input_ids"])), len(starts)) for e in extra_rows]
        loss = PolicyLoss(self.loss_cfg, tuple(e.term for e in extra_rows))
        collected: dict[str, list[float]] = {}
        for _ in range(self.alg.epochs):
            perm = torch.randperm(rows, generator=gen)
            for j, start in enumerate(starts):
                sub = batch.select(perm[start:start + mb]).trimmed()
                tensors = {k: v for k, v in sub.tensor_fields().items() if k in TRAIN_KEYS}
                extra = {e.term.name: {k: v[p[j]] for k, v in e.rows.items()}
                         for e, p in zip(extra_rows, parts) if len(p[j])}
                m = self.learner.train_minibatch(tensors, loss, self.cfg.rollout.temperature, extra)
                if m.get("skipped"):
                    log.warning("step %d: non-finite loss, optimizer step skipped", step + 1)
                for k, v in m.items():
                    collected.setdefault(k, []).append(v)
        return {f"train/{k}": float(np.nanmean(v)) if k != "skipped" else float(np.sum(v))
                for k, v in collected.items()}

    def train_step(self, step: int) -> dict:
        clock = StageClock()
        lr = self.alg.lr * min(1.0, (step + 1) / max(1, self.alg.lr_warmup_steps))
        self.learner.set_lr(lr)
        batch, staleness = clock("rollout", self.rollout, step)
        texts = self.decode_responses(batch)
        reward_metrics = clock("reward", self.reward, batch, texts)
        batch, extra_rows, method_metrics = self.after_rewards(batch, step, clock)
        colocate = to_learner(self.engines)  # the step's generation is done: GPU to the learner
        self.rollouts.prefetch(step)  # async: the engines sample the next steps meanwhile
        clock.add("stats", clock("score", self.score, batch))
        method_metrics.update(self.hooks(clock, "shape_rewards", batch, step))
        overlong_metrics = apply_to_rewards(batch, self.overlong, self.cfg.rollout.max_new_tokens)
        mask = batch.response_mask  # every sampled token (the filter below drops truncated rows)
        adv, weight_metrics = self.advantages(batch, step, clock)
        overlong_metrics.update(apply_to_mask(batch, self.overlong))  # (after their baselines)
        train_metrics = clock("update", self.update, batch, step, extra_rows)
        memory = clock("memory", self.learner.memory)  # after the update: its peak, its state
        sync = clock("sync", self.sync_weights, step + 1)  # (offloads the learner first)
        times = clock.finish(self.methods)
        n_tokens = float(mask.sum())
        metrics = {**reward_metrics, **train_metrics, **times, **sync,
                   **colocate, **method_metrics, **weight_metrics, **overlong_metrics,
                   **{f"perf/learner_{k}": v for k, v in memory.items()},
                   **self.rollout_metrics(batch, mask, adv, staleness), "train/lr": lr,
                   "rollout/tokens_per_s": n_tokens / max(times["time/rollout_s"], 1e-9),
                   "perf/tokens_per_s": n_tokens / times["time/step_s"]}
        self.log_samples(batch, texts, step + 1)
        return metrics

    def rollout_metrics(self, batch: RolloutBatch, mask: torch.Tensor, adv: torch.Tensor,
                        staleness: int) -> dict[str, float]:
        gap = (batch.sampler_logprobs - batch.old_logprobs).abs()
        out = {
            "rollout/accuracy": float(batch.correct.double().mean()),
            # policy versions between the weights that sampled the batch and the learner's
            "rollout/staleness": float(staleness),
            "rollout/response_len": float(batch.response_lengths().float().mean()),
            "rollout/truncated": float(np.mean([m["finish_reason"] == "length" for m in batch.meta])),
            "rollout/entropy": masked_mean(batch.entropy, mask),
            "rollout/logprob_gap": masked_mean(gap, mask),
            "rollout/logprob_gap_max": float((gap * mask).max()),
            "rollout/advantage_abs": float(adv.abs().mean()),
            # Groups whose rewards differ: the only ones that carry a GRPO learning signal.
            "rollout/mixed_groups": mixed_group_share(batch.rewards, batch.group_ids),
        }
        if batch.ref_logprobs is not None:
            out["rollout/kl_ref"] = masked_mean(batch.old_logprobs - batch.ref_logprobs, mask)
        return out

    def log_samples(self, batch: RolloutBatch, texts: list[str], step: int) -> None:
        """The sample table every step; at evaluations, each method's own tables too."""
        rows = [[step, self.tok.decode(batch.input_ids[i][: m["prompt_len"]]), texts[i],
                 float(batch.rewards[i]), m["answer"]]
                for i, m in enumerate(batch.meta[: self.cfg.logger.sample_table_rows])]
        self.tracker.table("samples", ["step", "prompt", "response", "reward", "answer"], rows, step)
        if step == 1 or step % self.cfg.eval_every == 0:
            for m in self.methods:
                m.draw(self.tracker, self.tok, batch, self.cfg.logger.sample_table_rows, step)

    # --- eval and checkpoints -----------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy, greedy (`eval/accuracy`) and sampled at the rollout temperature
        (`eval/accuracy_sampled`, `rollout.eval_samples` per problem: the quantity RL
        maximises, measured on problems it never trains on); and what the methods measure on
        the greedy responses."""
        samples = self.task.dataset("test", self.cfg.task.eval_size)
        prompts = self.encode(samples)
        r = self.cfg.rollout
        out = {}
        for key, temp, n in (("eval/accuracy", r.eval_temperature, 1),
                             ("eval/accuracy_sampled", r.temperature, r.eval_samples)):
            if n < 1:
                continue
            seeds = [stable_hash("eval", i) % 2**31 for i in range(len(prompts))]
            comps = self.generate(prompts, n, temp, seeds=seeds)
            flat = [(c, s) for cs, s in zip(comps, samples) for c in cs]
            texts = self.tok.batch_decode([c.token_ids for c, _ in flat], skip_special_tokens=True)
            items = [RewardItem(response=t, answer=s.answer, meta=s.meta, verifier=s.task)
                     for t, (_, s) in zip(texts, flat)]
            results = self.pool.score(items)
            correct = [res.components.get(s.task, 0.0) for res, (_, s) in zip(results, flat)]
            out[key] = float(np.mean(correct))
            if key == "eval/accuracy":
                greedy = collate_rollouts(prompts, comps, self.tok.pad_token_id)
                for m in self.methods:
                    out.update(m.evaluate(greedy, self.tools()))
        return out

    def draw_eval(self, evals: dict, step: int) -> None:
        for m in self.methods:
            m.draw_eval(self.tracker, evals, step)

    def save(self, step: int) -> Path:
        def write(tmp: Path) -> None:
            with learner_alone(self.learner, self.engines, step):  # the optimizer state is saved
                self.learner.save(str(tmp / "ds"))
                self.learner.export_hf(str(tmp / "hf"))
            (tmp / IN_FLIGHT).write_text(json.dumps(self.rollouts.in_flight()))

        self.state.update({"step": step, "seed": self.cfg.seed,
                           "data_position": step * self.alg.prompts_per_step})
        t0 = time.perf_counter()
        path, times = self.ckpts.save(step, self.state, write)
        self.timings["last_save_s"] = time.perf_counter() - t0  # (summary.json)
        self.timings.update({f"last_save_{k}": v for k, v in times.items()})
        log.info("checkpoint %s written in %.2f s (learner and state %.2f s, manifest %.2f s, "
                 "verification %.2f s)", path, self.timings["last_save_s"], times["write_s"],
                 times["manifest_s"], times["verify_s"])
        return path

    # --- the loop ------------------------------------------------------------------------------
    def stop_reason(self, done: int, signals: StopOnSignal) -> str | None:
        """Why the loop stops early after step `done` (it checkpoints first), or None."""
        if signals.received:
            return signals.received
        stop_after = self.cfg.stop_after
        return f"stop_after={stop_after}" if stop_after is not None and done >= stop_after else None

    def advance(self, evals: dict, signals: StopOnSignal) -> tuple[dict, dict]:
        """One RL step, then its evaluation, metrics and checkpoint when due. A learner failure
        anywhere in here is recovered by the caller from the last checkpoint."""
        cfg, done = self.cfg, self.step + 1
        metrics = self.train_step(self.step)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            t0 = time.perf_counter()
            evals = self.evaluate()
            self.state["last_eval"] = evals
            metrics.update({**evals, "time/eval_s": time.perf_counter() - t0})
            self.draw_eval(evals, done)
        metrics.update({"fault/learner_restarts": float(self.failures),
                        "fault/engine_restarts": float(self.engines.restarts)})
        self.tracker.log(metrics, step=done)
        if done % cfg.save_every == 0 or done == cfg.steps or self.stop_reason(done, signals):
            self.save(done)
        self.step = done
        return metrics, evals

    def run(self) -> dict:
        cfg = self.cfg
        if "cold_start_eval" not in self.state:
            t0 = time.perf_counter()
            self.state["cold_start_eval"] = self.evaluate()
            self.tracker.log({**self.state["cold_start_eval"],
                              "time/eval_s": time.perf_counter() - t0}, step=0)
            self.draw_eval(self.state["cold_start_eval"], 0)
            log.info("held-out accuracy before RL (of %s): %s", self.policy_init,
                     self.state["cold_start_eval"])
        bar = tqdm(total=cfg.steps, initial=self.step, desc="RL",
                   disable=not cfg.logger.progress, dynamic_ncols=True)
        evals = self.state.get("last_eval", self.state["cold_start_eval"])
        t_loop = time.perf_counter()
        # per step, each method's share of step time (NaN where its statistics pass cannot be
        # timed apart: fused GPU kernels)
        shares: dict[int, dict] = {}
        with StopOnSignal() as signals:
            while self.step < cfg.steps:
                try:
                    metrics, evals = self.advance(evals, signals)
                except LearnerFailure as err:
                    self.recover_learner(err)
                    evals = self.state.get("last_eval", self.state["cold_start_eval"])
                    bar.n = self.step
                    continue
                done = self.step
                shares[done] = {m.name: metrics[f"time/{m.name}_share"] for m in self.methods}
                bar.update(done - bar.n)
                bar.set_postfix(reward=f"{metrics['reward/total']:.2f}",
                                acc=f"{metrics['rollout/accuracy']:.2f}",
                                # share cut at rollout.max_new_tokens (algorithm.overlong)
                                truncated=f"{metrics['rollout/truncated']:.2f}",
                                eval=f"{evals['eval/accuracy']:.2f}")
                reason = self.stop_reason(done, signals)
                if reason:
                    log.warning("%s: stopped after step %d, checkpoint written; continue with "
                                "resume=true", reason, done)
                    break
        bar.close()
        cold = self.state["cold_start_eval"]
        summary = {"cold_start_accuracy": cold["eval/accuracy"],
                   "final_accuracy": evals["eval/accuracy"],
                   "cold_start_accuracy_sampled": cold.get("eval/accuracy_sampled", float("nan")),
                   "final_accuracy_sampled": evals.get("eval/accuracy_sampled", float("nan")),
                   "steps": self.step,
                   "policy_init": self.policy_init,  # the cold start, or what a stage before RL made of it
                   "policy_init_built_by": built_by(self.policy_init),
                   "commit": code_commit(),
                   "stopped_by": signals.received,  # SIGTERM / SIGINT, or None
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "learner_restarts": self.failures, "engine_restarts": self.engines.restarts,
                   "rl_wall_s": time.perf_counter() - t_loop, **self.timings}
        for m in self.methods:  # its figures, and its share of step time (mean over the steps)
            summary.update(m.summary(cold, evals))
            summary[f"{m.name}_share_of_step"] = mean_of_finite([v[m.name] for v in shares.values()])
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self.tracker.summary(summary)
        return summary

    def close(self) -> None:
        self.tracker.finish()
        self.pool.close()
        self.shutdown_learner_side()
        self.engines.shutdown()
