"""The vLLM engines, driven as one: a step's prompts split over them, results back in prompt
order, and an engine that dies mid-step replaced without losing or doubling a sample.

Recovery: each engine actor is created with Ray `max_restarts`, so Ray starts a dead one again
(in the same placement bundle, from its initial checkpoint). Its share of the call fails
(RayActorError), or — when the call was sent after the restart — the engine refuses it because
it holds weight version 0, not the current one (`StaleWeights`). Either way the group waits
for it, loads the weights that generation was started with from the object store (the payload
every engine read: the last sync's, or an earlier one for a generation started before it —
asynchronous rollouts), and sends the same prompts with the same per-prompt seeds again: the
step gets exactly the samples the dead engine would have produced. A generation is started by
`submit` and gathered by `collect` (`generate` does both), so the trainer can run the learner
in between.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from rl.cluster.placement import bundle, kill_and_wait, reserve
from rl.cluster.remote_calls import ActorFailure, get_all
from rollout.vllm_engine import StaleWeights, VLLMEngine

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """A generation in flight: each engine's part, and the weights it samples with (`version`;
    `weights` the payload, None for v0 or a collective transport) — what an engine restarted
    meanwhile must load before its part is re-issued."""
    requests: list[list]          # per engine
    seeds: list[list | None]      # per engine
    sampling: tuple               # n, temperature, top_p, max_tokens
    version: int
    weights: ray.ObjectRef | None
    futures: dict = field(default_factory=dict)  # engine index → ObjectRef, while outstanding


class RolloutGroup:
    def __init__(self, engine_configs: list, transport: str, num_cpus: float, num_gpus: float,
                 resources: dict | None = None, max_restarts: int = 3,
                 call_timeout_s: float | None = None, placement_timeout_s: float = 120.0):
        self.call_timeout_s = call_timeout_s
        self.max_restarts = max_restarts
        self.sleep_level = engine_configs[0].sleep_level
        # SPREAD: engines share no GPU and no node's memory bandwidth where the cluster allows.
        self.placement = reserve("rollout", bundle(num_cpus, num_gpus, resources),
                                 len(engine_configs), "SPREAD", placement_timeout_s)
        nodes = self.placement.node_ids
        self.engines = [ray.remote(VLLMEngine).options(max_restarts=max_restarts,
                                                       **self.placement.options(i))
                        .remote(replace(c, engines_on_node=nodes.count(nodes[i])), transport)
                        for i, c in enumerate(engine_configs)]
        # The last synced payload; None: the initial weights, or a collective transport
        self.weights: ray.ObjectRef | None = None
        self.version = 0
        self.restarts = 0  # engines restarted so far (metric fault/engine_restarts)
        self.pids: list[int | None] = [None] * len(self.engines)  # a new pid: a restart

    def __len__(self) -> int:
        return len(self.engines)

    def ready(self) -> list[dict]:
        infos = get_all([e.ready.remote() for e in self.engines], self.call_timeout_s,
                        "engine start")
        self.pids = [info["pid"] for info in infos]
        return infos

    def generate(self, requests: list, n: int, temperature: float, top_p: float,
                 max_tokens: int, seeds: list[int] | None = None) -> list:
        """n completions per request, split over the engines, in request order."""
        return self.collect(self.submit(requests, n, temperature, top_p, max_tokens, seeds))

    def submit(self, requests: list, n: int, temperature: float, top_p: float,
               max_tokens: int, seeds: list[int] | None = None) -> Generation:
        """Starts a generation with the current weights and returns at once. An engine runs
        its calls one after another, so a weight sync sent later waits for this generation to
        finish: it samples with these weights, whole (never half-updated ones)."""
        parts = [idx for idx in np.array_split(np.arange(len(requests)), len(self.engines))
                 if len(idx)]
        g = Generation([[requests[j] for j in idx] for idx in parts],
                       [None if seeds is None else [seeds[j] for j in idx] for idx in parts],
                       (n, temperature, top_p, max_tokens), self.version, self.weights)
        g.futures = {i: self.send(g, i) for i in range(len(parts))}
        return g

    def send(self, g: Generation, i: int):
        return self.engines[i].generate.remote(g.requests[i], *g.sampling, g.seeds[i], g.version)

    def collect(self, g: Generation) -> list:
        """The generation's completions in request order. An engine that died meanwhile is
        restarted, given the weights the generation was started with, and its part re-issued
        with the same seeds; then, if those were older than the group's (a generation started
        before the last sync), given the current weights again."""
        results: dict[int, list] = {}
        attempts = {i: 0 for i in g.futures}
        deadline = None if self.call_timeout_s is None else time.monotonic() + self.call_timeout_s
        while g.futures:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            done, _ = ray.wait(list(g.futures.values()), num_returns=1, timeout=left)
            if not done:
                raise ActorFailure(f"rollout: no answer within {self.call_timeout_s:.0f} s from "
                                   f"engines {sorted(g.futures)} (cluster.call_timeout_s)")
            i = next(k for k, f in g.futures.items() if f == done[0])
            try:
                results[i] = ray.get(g.futures.pop(i))
            except (RayActorError, StaleWeights) as err:
                attempts[i] += 1
                if attempts[i] > self.max_restarts:
                    raise ActorFailure(f"rollout engine {i} failed {attempts[i]} times in one "
                                       f"call; last: {err}") from err
                self.recover(i, err, len(g.requests[i]), g.weights, g.version)
                g.futures[i] = self.send(g, i)
        behind = [self.engines[i] for i, n in attempts.items() if n and g.version != self.version]
        if behind:  # recovered to an older generation's weights (async): back to the current
            self.load_into(behind, self.weights, self.version)
        return [c for i in range(len(results)) for c in results[i]]

    def recover(self, i: int, err: Exception, prompts: int, weights: ray.ObjectRef | None,
                version: int) -> None:
        """Engine i failed a generation that samples with weights `version`: wait until it
        answers again (restarted by Ray, counted once per new process), and load that version
        into it if it holds another (its initial weights, or those of a sync since)."""
        t0 = time.perf_counter()
        info = self.wait_restarted(i, err)
        # counted once per new process (one death can fail several queued generations)
        restarted = info["pid"] != self.pids[i]
        self.pids[i] = info["pid"]
        if info["weight_version"] != version:
            if weights is None:
                raise ActorFailure(
                    f"rollout engine {i} holds weights v{info['weight_version']}, and nothing "
                    f"can bring it to v{version}: a collective weight transport (nccl/ipc) "
                    "keeps no payload and its group is fixed at connect time (not supported "
                    "yet; the payload transports are)") from err
            self.load_into([self.engines[i]], weights, version)
        self.restarts += restarted
        log.warning("rollout engine %d failed (%s); %s pid %d in %.1f s, weights v%d "
                    "loaded, its %d prompts re-issued", i, type(err).__name__,
                    "restarted as" if restarted else "still", info["pid"],
                    time.perf_counter() - t0, version, prompts)

    def wait_restarted(self, i: int, err: Exception) -> dict:
        """Engine i's `ready()` once Ray has started it again ("temporarily unavailable" while
        it restarts); an error when it is dead for good or does not come back in time."""
        deadline = time.monotonic() + (self.call_timeout_s or float("inf"))
        while True:
            try:
                return ray.get(self.engines[i].ready.remote(),
                               timeout=max(deadline - time.monotonic(), 0.0))
            except ActorUnavailableError:
                time.sleep(0.5)
            except (RayActorError, GetTimeoutError) as dead:
                raise ActorFailure(f"rollout engine {i} died and did not come back "
                                   f"(rollout.max_restarts={self.max_restarts}, "
                                   f"cluster.call_timeout_s): {dead}") from err

    def sync_from(self, learner, version: int) -> dict[str, float]:
        """The learner's current weights (policy `version`) into every engine: through the
        object store (payload transports: the payload is kept for engines restarted later), or
        sent by learner rank 0 straight into the engines (collective transports: nccl, ipc)."""
        t0 = time.perf_counter()
        if learner.transport.collective:
            stats = learner.push_weights(self.engines, version)
            self.weights, self.version = None, version
        else:
            payload, stats = learner.gather_weights()
            stats.update(self.load_weights(payload, version))
        return {**stats, "sync/total_s": time.perf_counter() - t0}

    def load_weights(self, payload: ray.ObjectRef, version: int) -> dict[str, float]:
        """Every engine loads `payload` (policy `version`); kept for engines restarted later."""
        self.weights, self.version = payload, version
        return self.load_into(self.engines, payload, version)

    def load_into(self, engines: list, weights: ray.ObjectRef | None,
                  version: int) -> dict[str, float]:
        """An engine that dies while loading is not waited for: Ray restarts it, and it is
        reloaded when it next refuses to sample with stale weights."""
        if weights is None:  # version 0 is what every engine starts from
            return {"sync/engine_load_s": 0.0}
        futures = [e.update_weights.remote(weights, version) for e in engines]
        load_s = 0.0
        for e, f in zip(engines, futures):
            try:
                load_s = max(load_s, get_all([f], self.call_timeout_s, "engine weight load")[0]["load_s"])
            except ActorFailure as err:
                log.warning("rollout engine %d failed while loading weights v%d (%s); it will be "
                            "reloaded before it samples again", self.engines.index(e),
                            version, err)
        return {"sync/engine_load_s": load_s}

    def sleep(self) -> dict[str, float]:
        """Colocated engines (rollout.sleep_level > 0) free the GPU for the update; the next
        weight sync wakes them. A no-op otherwise."""
        if not self.sleep_level:
            return {}
        outs = get_all([e.sleep.remote() for e in self.engines], self.call_timeout_s, "engine sleep")
        return {"colocate/sleep_s": max(o.get("sleep_s", 0.0) for o in outs)}

    def shutdown(self) -> None:
        """Kill the engines and return once their processes have exited (their GPU memory is
        free for what starts next)."""
        kill_and_wait(self.engines, [(node, pid) for node, pid
                                     in zip(self.placement.node_ids, self.pids) if pid])
        self.engines = []
        self.placement.release()
