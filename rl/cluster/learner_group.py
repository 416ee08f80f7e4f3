"""M Ray actors forming one data-parallel training group, driven as one object.

The driver splits every batch by rows across ranks (each rank's forward is a collective under
ZeRO-3, so every rank always gets a non-empty shard), gathers the results back in order, and
pushes rank 0's gathered weights to the rollout engines through a weight transport.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from datetime import timedelta

import numpy as np
import ray
import torch
from ray.exceptions import RayError

from rl.engine.base import Loss
from rl.engine.deepspeed_engine import DeepSpeedEngine, DSEngineConfig, release_cached_memory
from rl.cluster.placement import bundle, kill_and_wait, rank_env, reserve, where_am_i
from rl.cluster.remote_calls import ActorFailure, LearnerFailure, get_all
from rollout.weight_sync import WeightTransport, get_transport

log = logging.getLogger(__name__)


class LearnerWorker:
    """One rank. Lives in a Ray actor; `call` forwards to the TrainEngine, built by `start`
    once the group's rendezvous is open (rank 0: `open_rendezvous` first)."""

    def __init__(self, env: dict[str, str], cfg: DSEngineConfig, torch_threads: int | None,
                 cpu_groups: int = 1):
        torch.set_num_threads(torch_threads or rank_threads(int(env["LOCAL_WORLD_SIZE"]) * cpu_groups))
        os.environ.update(env)  # RANK, LOCAL_RANK, MASTER_ADDR, ...: Ray actors have no launcher
        self.rank = int(env["RANK"])
        self.cfg = cfg
        self.store = None  # the group's rendezvous (rank 0 hosts it)
        self.engine = None
        self.sender = None  # a collective weight transport, once connected

    def open_rendezvous(self) -> int:
        """Rank 0: host the group's TCPStore on a port the OS picks (all interfaces), and keep
        it. Its port: a port chosen elsewhere and bound here later can be taken in between."""
        self.store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"], 0, int(os.environ["WORLD_SIZE"]), is_master=True,
            timeout=timedelta(seconds=self.cfg.collective_timeout_s), wait_for_workers=False)
        return self.store.port

    def start(self, port: int) -> None:
        """Join the group over rank 0's store at MASTER_ADDR:`port` (every rank at once: the
        process group forms when all have joined) and build the engine."""
        os.environ["MASTER_PORT"] = str(port)
        if self.store is None:
            self.store = torch.distributed.TCPStore(
                os.environ["MASTER_ADDR"], port, int(os.environ["WORLD_SIZE"]), is_master=False,
                timeout=timedelta(seconds=self.cfg.collective_timeout_s))
        self.engine = DeepSpeedEngine(self.cfg, store=self.store)

    def where(self) -> dict:
        return where_am_i()

    def call(self, method: str, *args, **kwargs):
        try:
            return getattr(self.engine, method)(*args, **kwargs)
        except torch.OutOfMemoryError as e:  # reaches the driver as the call's error: the run
            e.add_note(out_of_memory_advice(self.rank, method))  # stops, it is not retried
            raise

    def call_frozen(self, name: str, method: str, *args, **kwargs):
        """The frozen model `name` this rank holds beside the policy (DSEngineConfig.frozen_models)."""
        if name not in self.engine.frozen:
            raise RuntimeError(f"no frozen model {name!r} on this learner rank")
        return getattr(self.engine.frozen[name], method)(*args, **kwargs)

    def weights_payload(self, transport: WeightTransport):
        """(payload, its bytes): rank 0's packed weights (None elsewhere). Called with
        num_returns=2, so the payload stays in the object store for the engines to read and
        only its size comes back to the driver."""
        release_cached_memory()  # what the update freed goes back before the payload is built
        weights = list(self.engine.named_weights())  # all ranks gather (ZeRO-3)
        payload = transport.pack(weights) if self.rank == 0 else None
        release_cached_memory()  # the pack's device buffers
        return payload, (transport.payload_bytes(payload) if payload is not None else 0)

    def push_weights(self, transport: WeightTransport, engines: list, version: int) -> dict:
        """A collective transport (nccl, ipc): connect once (rank 0 to the engines), then every
        rank gathers and rank 0 sends. The transport object stays on this rank."""
        if self.sender is None:
            self.sender = transport
            self.sender.connect(engines if self.rank == 0 else [], self.rank)
        out = self.sender.send(self.engine.named_weights(), version)
        release_cached_memory()  # the send's buffers: the engine allocates its KV cache next
        return out

    def close_transport(self) -> None:
        """Leave a collective transport's group (rank 0 also releases the engines' side), so
        a later learner group can form a new one with the same engines."""
        if self.sender is not None:
            self.sender.close()
            self.sender = None


def rendezvous_port(rank0, timeout_s: float | None) -> int:
    """The group's rendezvous port: rank 0 opens its store on a port the OS picks and holds it
    from then on, so nothing on the node can take it before the other ranks connect."""
    return get_all([rank0.open_rendezvous.remote()], timeout_s, "learner rendezvous",
                   LearnerFailure)[0]


def out_of_memory_advice(rank: int, method: str) -> str:
    """What to change when a learner rank runs out of GPU memory."""
    return (f"learner rank {rank} ran out of GPU memory in {method}: lower "
            "learner.micro_batch_size, turn on learner.gradient_checkpointing, raise "
            "learner.zero_stage, or — sharing the GPU with an engine (experiment=debug_gpu) — "
            "lower rollout.gpu_memory_utilization. The run stops here; `resume=true` continues "
            "from the last checkpoint.")


def rank_threads(sharers: int) -> int:
    """The cores this process may use, shared by the processes computing beside it on the node
    (the group's ranks there; twice as many when the engines generate at the same time)."""
    return max(1, len(os.sched_getaffinity(0)) // sharers)


def shard_rows(n: int, parts: int) -> list[np.ndarray]:
    if n < parts:
        raise ValueError(f"cannot split {n} rows over {parts} ranks")
    return np.array_split(np.arange(n), parts)


class LearnerGroup:
    """`num_ranks` ranks in one placement group (PACK: as few nodes as possible, so the
    collectives stay on-node where they can). Every call waits at most `call_timeout_s`; a dead
    or silent rank raises `rl.cluster.remote_calls.ActorFailure` (the trainer restarts the group from
    its last checkpoint)."""

    def __init__(self, cfg: DSEngineConfig, num_ranks: int = 1, num_cpus_per_rank: float = 0.5,
                 torch_threads: int | None = None, cpu_groups: int = 1,
                 transport: WeightTransport | None = None,
                 num_gpus_per_rank: float = 0.0, resources_per_rank: dict | None = None,
                 call_timeout_s: float | None = None, placement_timeout_s: float = 120.0):
        self.cfg, self.num_ranks = cfg, num_ranks
        self.transport = transport or get_transport("safetensors")
        self.call_timeout_s = call_timeout_s
        t0 = time.perf_counter()
        self.placement = reserve("learner", bundle(num_cpus_per_rank, num_gpus_per_rank,
                                                   resources_per_rank),
                                 num_ranks, "PACK", placement_timeout_s)
        envs = rank_env(self.placement.node_ids, self.placement.node_ips)
        self.workers = [ray.remote(LearnerWorker).options(**self.placement.options(r))
                        .remote(envs[r], cfg, torch_threads, cpu_groups) for r in range(num_ranks)]
        port = rendezvous_port(self.workers[0], call_timeout_s)
        self._get([w.start.remote(port) for w in self.workers], "start")
        self._all("set_lr", cfg.lr)
        self.procs = [(w["node_id"], w["pid"]) for w in self.where()]  # waited for at shutdown
        self.start_s = time.perf_counter() - t0

    # --- helpers -------------------------------------------------------------------------------
    def _get(self, futures, what: str) -> list:
        return get_all(futures, self.call_timeout_s, f"learner {what}", LearnerFailure)

    def _all(self, method, *args, **kwargs):
        return self._get([w.call.remote(method, *args, **kwargs) for w in self.workers], method)

    def _per_rank(self, method, shards, *args, **kwargs):
        return self._get([w.call.remote(method, s, *args, **kwargs)
                          for w, s in zip(self.workers, shards)], method)

    def where(self) -> list[dict]:
        """Each rank's node, GPUs and distributed environment (rank order)."""
        return self._get([w.where.remote() for w in self.workers], "where")

    # --- the TrainEngine contract, over the group ---------------------------------------------
    def _inference_shards(self, tensors):
        """Row shards for a no-grad forward. Every rank must run (ZeRO-3 forwards are
        collective), so with fewer rows than ranks the last row is repeated, then dropped."""
        n = len(tensors["input_ids"])
        rows = np.arange(max(n, self.num_ranks)).clip(max=n - 1)
        return n, [{k: v[rows[i]] for k, v in tensors.items()}
                   for i in np.array_split(np.arange(len(rows)), self.num_ranks)]

    def score(self, tensors: dict[str, torch.Tensor], temperature: float,
              stats: dict | None = None) -> dict:
        """Per-token logprobs/entropy [B, T] (and attention statistics per layer) in row order."""
        n, shards = self._inference_shards(tensors)
        outs = self._per_rank("score", shards, temperature, stats)
        merged = {k: torch.cat([o[k] for o in outs])[:n] for k in ("logprobs", "entropy")}
        if stats:
            merged["attn_stats"] = {
                layer: {name: torch.cat([o["attn_stats"][layer][name] for o in outs])[:n]
                        for name in outs[0]["attn_stats"][layer]}
                for layer in outs[0]["attn_stats"]}
            merged["stats_s"] = max(o["stats_s"] for o in outs)  # ranks run side by side
        return merged

    def probe(self, tensors, probe):
        """A Probe on the policy (rl/engine/base.py), rows in order (every rank runs: ZeRO-3)."""
        n, shards = self._inference_shards(tensors)
        outs = self._per_rank("probe", shards, probe)
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts)[:n] for parts in zip(*outs))
        return torch.cat(outs)[:n]

    def ref_score(self, tensors, temperature: float) -> torch.Tensor:
        n, shards = self._inference_shards(tensors)
        return torch.cat(self._per_rank("ref_score", shards, temperature))[:n]

    def train_minibatch(self, tensors: dict[str, torch.Tensor], loss: Loss,
                        temperature: float = 1.0,
                        extra: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
        """One optimizer step of `loss` on these rows, split over ranks and micro-batches.

        `extra`: row sets of the loss's extra terms, by name (e.g. LeaF's KD rows); each is
        dealt out over the same ranks and micro-batches (a micro-batch may get none of it) and
        reaches the loss as b["extra"][name]."""
        extra = extra or {}
        loss = loss.bind(tensors, extra)  # global normalisers, before the split
        gas = self.cfg.grad_accum_steps
        rank_micro = []
        for rows in shard_rows(len(tensors["input_ids"]), self.num_ranks):
            micro = [{k: v[i] for k, v in tensors.items()} for i in np.array_split(rows, gas)]
            rank_micro.append(micro)
        for name, term_rows in extra.items():
            parts = np.array_split(np.arange(len(term_rows["input_ids"])), self.num_ranks * gas)
            for j, rows in enumerate(parts):
                if len(rows):
                    rank_micro[j // gas][j % gas].setdefault("extra", {})[name] = {
                        k: v[rows] for k, v in term_rows.items()}
        outs = self._per_rank("train_minibatch", rank_micro, loss, temperature)
        if outs[0].get("skipped"):
            return {"skipped": 1.0, "loss": float("nan")}
        # token-weighted over ranks, like a single rank holding the whole minibatch (a metric
        # only some ranks report, e.g. an extra term's, over those ranks' tokens)
        merged = {"loss": float(sum(o["loss"] for o in outs)), "skipped": 0.0,
                  "grad_norm": outs[0]["grad_norm"]}
        for k in {k for o in outs for k in o["weights"]}:
            w = [(o["weights"][k], o[k]) for o in outs if k in o["weights"]]
            merged[k] = float(sum(a * b for a, b in w) / max(sum(a for a, _ in w), 1.0))
        return merged

    def set_lr(self, lr: float) -> None:
        self._all("set_lr", lr)

    def offload(self) -> dict[str, float]:
        """learner.offload_between_updates: optimizer state to CPU until the next update (the
        colocated engine generates meanwhile). A no-op otherwise."""
        if not self.cfg.offload_between_updates:
            return {}
        outs = self._all("offload")
        return {f"colocate/{k}": float(max(o.get(k, 0.0) for o in outs))
                for k in ("offload_s", "offload_freed_bytes") if any(k in o for o in outs)}

    def gather_weights(self) -> tuple[ray.ObjectRef, dict[str, float]]:
        """Rank 0's gathered weights as one object-store payload every engine reads (and a
        restarted engine can read again), with its size and gather time."""
        t0 = time.perf_counter()
        # The payload is a return value the driver owns but never fetches: fetching it and
        # putting it back (as before) held a second copy here (1.1 GiB at Qwen3-0.6B's shape)
        # and took ~5 s of a 10 s sync on CPU.
        refs = [w.weights_payload.options(num_returns=2).remote(self.transport)
                for w in self.workers]
        sizes = self._get([size for _, size in refs], "weights_payload")
        return refs[0][0], {"sync/gather_s": time.perf_counter() - t0,
                            "sync/bytes": float(sizes[0])}

    def push_weights(self, engines: list, version: int) -> dict[str, float]:
        """A collective transport: rank 0 sends straight into the engines (no payload)."""
        t0 = time.perf_counter()
        out = self._get([w.push_weights.remote(self.transport, engines, version)
                         for w in self.workers], "push_weights")[0]
        return {"sync/push_s": time.perf_counter() - t0, "sync/bytes": out.get("bytes", 0.0)}

    def sync_weights(self, engines: list, version: int) -> dict[str, float]:
        """Gather, then load into these engine actors (tests, one-off engines; the trainer's
        RolloutGroup loads the gathered payload itself)."""
        t0 = time.perf_counter()
        ref, stats = self.gather_weights()
        results = self._get([e.update_weights.remote(ref, version) for e in engines],
                            "engine weight load")
        return {**stats, "sync/total_s": time.perf_counter() - t0,
                "sync/engine_load_s": max(r["load_s"] for r in results)}

    def save(self, path: str) -> None:
        self._all("save", path)

    def load(self, path: str) -> None:
        self._all("load", path)

    def export_hf(self, path: str) -> None:
        self._all("export_hf", path)

    def optimizer_steps(self) -> int:
        return self._all("optimizer_steps")[0]  # the same on every rank

    def optimizer_state_digest(self) -> float:
        return float(sum(self._all("optimizer_state_digest")))

    def memory(self) -> dict[str, float]:
        """The fullest rank's memory (rl/engine/deepspeed_engine.py `memory`)."""
        return max(self._all("memory"), key=lambda m: m["peak_gb"])

    def shutdown(self) -> None:
        """Close a collective transport's group, kill the ranks and return once their
        processes have exited (so their GPU memory is free for what starts next)."""
        if self.transport.collective and self.workers:
            try:  # a dead rank 0 cannot close: the engines replace its group when one reconnects
                get_all([w.close_transport.remote() for w in self.workers],
                        min(self.call_timeout_s or 60.0, 60.0), "close transport")
            except (ActorFailure, RayError) as err:  # dead, hung or failed: shutting down anyway
                log.warning("learner shutdown: the weight transport did not close (%s)", err)
        kill_and_wait(self.workers, self.procs)
        self.workers = []
        self.placement.release()


def grad_accum_steps(minibatch_size: int, num_ranks: int, micro_batch_size: int) -> int:
    per_rank = minibatch_size // num_ranks
    return max(1, -(-per_rank // micro_batch_size))


def with_accum(cfg: DSEngineConfig, minibatch_size: int, num_ranks: int) -> DSEngineConfig:
    return replace(cfg, grad_accum_steps=grad_accum_steps(minibatch_size, num_ranks,
                                                          cfg.micro_batch_size))
