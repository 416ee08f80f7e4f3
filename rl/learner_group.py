"""M Ray actors forming one data-parallel training group, driven as one object.

The driver splits every batch by rows across ranks (each rank's forward is a collective under
ZeRO-3, so every rank always gets a non-empty shard), gathers the results back in order, and
pushes rank 0's gathered weights to the rollout engines through a weight transport.
"""
from __future__ import annotations

import socket
import time
from dataclasses import replace

import numpy as np
import ray
import torch

from rl.engine.deepspeed_engine import DeepSpeedEngine, DSEngineConfig, setup_dist_env
from rollout.weight_sync import get_transport


class LearnerWorker:
    """One rank. Lives in a Ray actor; `call` forwards to the TrainEngine."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int,
                 cfg: DSEngineConfig, torch_threads: int):
        torch.set_num_threads(torch_threads)
        setup_dist_env(rank, world_size, master_addr, master_port)
        self.rank = rank
        self.engine = DeepSpeedEngine(cfg)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.engine, method)(*args, **kwargs)

    def call_teacher(self, method: str, *args, **kwargs):
        """The colocated LeaF teacher (teacher.placement=colocated) of this rank."""
        if self.engine.teacher is None:
            raise RuntimeError("no colocated teacher on this learner rank")
        return getattr(self.engine.teacher, method)(*args, **kwargs)

    def weights_payload(self, transport: str):
        weights = list(self.engine.named_weights())  # all ranks gather (ZeRO-3)
        return get_transport(transport).pack(weights) if self.rank == 0 else None


def node_address() -> tuple[str, int]:
    """This node's IP and a free port: rank 0 hosts the process-group rendezvous."""
    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind(("", 0))
        return ip, s.getsockname()[1]


def shard_rows(n: int, parts: int) -> list[np.ndarray]:
    if n < parts:
        raise ValueError(f"cannot split {n} rows over {parts} ranks")
    return np.array_split(np.arange(n), parts)


class LearnerGroup:
    def __init__(self, cfg: DSEngineConfig, num_ranks: int = 1, num_cpus_per_rank: float = 0.5,
                 torch_threads: int = 2, transport: str = "safetensors"):
        self.cfg, self.num_ranks, self.transport = cfg, num_ranks, transport
        t0 = time.perf_counter()
        remote = ray.remote(num_cpus=num_cpus_per_rank)(LearnerWorker)
        addr_fn = ray.remote(num_cpus=0)(node_address)
        # Rank 0's node is where the rendezvous lives. Locally this is the driver's node.
        addr, port = ray.get(addr_fn.remote())
        self.workers = [remote.remote(r, num_ranks, addr, port, cfg, torch_threads)
                        for r in range(num_ranks)]
        ray.get([w.call.remote("set_lr", cfg.lr) for w in self.workers])
        self.start_s = time.perf_counter() - t0

    # --- helpers -------------------------------------------------------------------------------
    def _all(self, method, *args, **kwargs):
        return ray.get([w.call.remote(method, *args, **kwargs) for w in self.workers])

    def _per_rank(self, method, shards, *args, **kwargs):
        return ray.get([w.call.remote(method, s, *args, **kwargs)
                        for w, s in zip(self.workers, shards)])

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

    def input_grad_norms(self, tensors) -> torch.Tensor:
        """The policy's LeaF sensitivities [B, T], in row order (every rank runs: ZeRO-3)."""
        n, shards = self._inference_shards(tensors)
        return torch.cat(self._per_rank("input_grad_norms", shards))[:n]

    def ref_score(self, tensors, temperature: float) -> torch.Tensor:
        n, shards = self._inference_shards(tensors)
        return torch.cat(self._per_rank("ref_score", shards, temperature))[:n]

    def train_minibatch(self, tensors: dict[str, torch.Tensor], loss: str, loss_cfg,
                        loss_agg: str, temperature: float = 1.0,
                        kd: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """One optimizer step on these rows, split over ranks and micro-batches.

        `kd`: LeaF KD rows (prompt ⊕ response + teacher targets) whose KL term joins the policy
        loss with weight loss_cfg.kd_coef, normalised by their own token count; they are
        spread over the same ranks and micro-batches (a micro-batch may get none)."""
        mask = tensors["response_mask"]
        normaliser = float(mask.sum()) if loss_agg == "token_mean" else float(len(mask))
        normaliser = max(normaliser, 1.0)
        gas = self.cfg.grad_accum_steps
        rank_micro = []
        for rows in shard_rows(len(mask), self.num_ranks):
            micro = [{k: v[i] for k, v in tensors.items()} for i in np.array_split(rows, gas)]
            rank_micro.append(micro)
        if kd:
            kd_norm = torch.tensor(max(float(kd["response_mask"].sum()), 1.0))
            parts = np.array_split(np.arange(len(kd["input_ids"])), self.num_ranks * gas)
            for j, rows in enumerate(parts):
                if len(rows):
                    rank_micro[j // gas][j % gas].update(
                        {f"kd_{k}": v[rows] for k, v in kd.items()}, kd_normaliser=kd_norm)
        outs = self._per_rank("train_minibatch", rank_micro, loss, loss_cfg, normaliser,
                              temperature)
        if outs[0].get("skipped"):
            return {"skipped": 1.0, "loss": float("nan")}
        # token-weighted over ranks, like a single rank holding the whole minibatch (a metric
        # only some ranks report, e.g. LeaF's kd_kl, over those ranks' tokens)
        merged = {"loss": float(sum(o["loss"] for o in outs)), "skipped": 0.0,
                  "grad_norm": outs[0]["grad_norm"]}
        for k in {k for o in outs for k in o["weights"]}:
            w = [(o["weights"][k], o[k]) for o in outs if k in o["weights"]]
            merged[k] = float(sum(a * b for a, b in w) / max(sum(a for a, _ in w), 1.0))
        return merged

    def set_lr(self, lr: float) -> None:
        self._all("set_lr", lr)

    def sync_weights(self, engines, version: int) -> dict[str, float]:
        """Gather weights on rank 0, hand one object-store copy to every engine."""
        t0 = time.perf_counter()
        payloads = ray.get([w.weights_payload.remote(self.transport) for w in self.workers])
        ref = ray.put(payloads[0])
        gathered = time.perf_counter() - t0
        results = ray.get([e.update_weights.remote(ref, version) for e in engines])
        return {"sync/gather_s": gathered, "sync/total_s": time.perf_counter() - t0,
                "sync/bytes": float(get_transport(self.transport).payload_bytes(payloads[0])),
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

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []


def grad_accum_steps(minibatch_size: int, num_ranks: int, micro_batch_size: int) -> int:
    per_rank = minibatch_size // num_ranks
    return max(1, -(-per_rank // micro_batch_size))


def with_accum(cfg: DSEngineConfig, minibatch_size: int, num_ranks: int) -> DSEngineConfig:
    return replace(cfg, grad_accum_steps=grad_accum_steps(minibatch_size, num_ranks,
                                                          cfg.micro_batch_size))
