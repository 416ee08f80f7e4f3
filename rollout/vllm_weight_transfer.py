"""vLLM 0.32's weight-transfer engines wired to our actors (the GPU transports nccl and ipc).

This is vLLM's weight-transfer API, meant for RL trainers (the `LLM` methods below and
`vllm.distributed.weight_transfer`'s trainer factory and init-info classes), not its model
internals, which stay in rollout/vllm_internals.py; like them it is pinned to vLLM 0.32.

`vllm/distributed/weight_transfer/` (pinned: vllm 0.32.0) has a worker half (built inside each
engine's worker when `vllm.LLM(weight_transfer_config=...)` is given, driven through
`LLM.init_weight_transfer_engine / start_weight_update / update_weights /
finish_weight_update`) and a trainer half (`WeightTransferTrainerFactory.trainer_init`, then
`send_weights()` per sync) that talks to the engines through a four-method client. This module
supplies what is ours: the client over our engine actors, the engines' side of it
(`CollectiveReceiver`, mixed into the engine actor), and the source of the learner's tensors.
On a vLLM upgrade, re-read base.py, nccl_engine.py, nccl_common.py, ipc_engine.py and
entrypoints/rl/offline.py.

UNTESTED ON GPU: nothing here has run on a GPU in this repository (the development machines
have none; the GPU sometimes lent has no vLLM). The CPU tests cover only the pure parts.
vLLM is imported inside functions, so importing this module (the engine actor's mixin) stays
cheap.
"""
from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

# The engine actor methods the client calls (CollectiveReceiver defines them).
INIT, START, CHUNK, FINISH, SHUTDOWN = (
    "transfer_init", "transfer_start", "transfer_chunk", "transfer_finish", "transfer_shutdown")


def engine_init_infos(init_info: dict, workers_per_engine: list[int]) -> list[dict]:
    """The init info each engine gets. vLLM ranks a worker in the NCCL group as
    `data_parallel_index × (TP × PP) + its rank in the engine + rank_offset`
    (`nccl_common.worker_init_process_group`); our engines are independent `LLM`s (each DP
    index 0), so with one shared offset every engine's workers would claim ranks 1, 2, ...
    Engine i's workers start after all earlier engines' workers instead: ranks 1 ..
    Σ workers, each once, and one broadcast from rank 0 reaches all of them."""
    if "rank_offset" not in init_info:  # IPC: no group to place
        return [dict(init_info) for _ in workers_per_engine]
    base, infos = int(init_info["rank_offset"]), []
    for workers in workers_per_engine:
        infos.append({**init_info, "rank_offset": base})
        base += workers
    return infos


def transfer_world_size(workers_per_engine: list[int]) -> int:
    """The NCCL group: learner rank 0 (the sender) and every worker of every engine."""
    return 1 + sum(workers_per_engine)


class EngineClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our engine actors: each call fans out to
    every engine and waits. Held by learner rank 0. `version` is what `finish` records on the
    engines (vLLM's trainer calls finish with none)."""

    def __init__(self, engines: list, workers_per_engine: list[int]):
        self.engines = list(engines)
        self.workers_per_engine = list(workers_per_engine)
        self.version = 0

    def _all(self, method: str, args_per_engine: list[tuple]) -> list:
        import ray

        return ray.get([getattr(e, method).remote(*a)
                        for e, a in zip(self.engines, args_per_engine, strict=True)])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        infos = engine_init_infos(init_info, self.workers_per_engine)
        self._all(INIT, [(i,) for i in infos])

    def start_weight_update(self) -> None:
        self._all(START, [()] * len(self.engines))

    def update_weights(self, update_info) -> None:
        self._all(CHUNK, [(update_info,)] * len(self.engines))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all(FINISH, [(self.version,)] * len(self.engines))

    def shutdown_weight_transfer_engine(self) -> None:
        self._all(SHUTDOWN, [()] * len(self.engines))


class CollectiveReceiver:
    """Engine-actor side of `EngineClient`; mixed into the actor that owns `self.llm` (a
    `vllm.LLM` built with the transport's `engine_llm_kwargs()`) and `self.weight_version`.

    vLLM's engines load through the same layerwise reload as `model_runner.reload_weights`,
    but `finish_weight_update` neither re-ties a tied lm_head nor clears the caches built
    from the old weights, so `transfer_finish` does both, as `update_weights` does after a
    payload."""

    def transfer_workers(self) -> int:
        """This engine's workers in a transfer group: its tensor × pipeline parallel size."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size)

    def transfer_init(self, init_info: dict) -> None:
        """Join a learner's transfer group. A group left from an earlier learner (one that
        died before it could close it, then was restarted) is shut down first: vLLM's NCCL
        engine would otherwise build the new communicator over the old one."""
        if getattr(self, "transfer_open", False):
            self.llm.shutdown_weight_transfer_engine()
        self.llm.init_weight_transfer_engine({"init_info": init_info})
        self.transfer_open = True

    def transfer_start(self) -> None:
        if getattr(self, "asleep", 0):  # a sleeping colocated engine: room for weights first
            self.llm.wake_up(tags=["weights"])
        self.llm.start_weight_update()

    def transfer_chunk(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def transfer_finish(self, version: int) -> dict:
        from rollout.vllm_internals import forget_cached_inputs

        t0 = time.perf_counter()
        self.llm.finish_weight_update()
        self.llm.collective_rpc("retie_after_weight_transfer")
        forget_cached_inputs(self.llm)
        if getattr(self, "asleep", 0):
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = 0
        self.weight_version = version
        return {"version": version, "finish_s": time.perf_counter() - t0}

    def transfer_shutdown(self) -> None:
        self.llm.shutdown_weight_transfer_engine()
        self.transfer_open = False


@cache
def _source_class():
    """A `WeightSource` over one sync's tensors, replaced every sync. vLLM's trainer engines
    take their source once, at `trainer_init`, and replay it each `send_weights()`; ours are
    the learner's gathered CPU copies, moved to the GPU one at a time as they are sent."""
    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    class RoundSource(WeightSource):
        def __init__(self, device: torch.device):
            self.device = device
            self.pairs: list[tuple[str, torch.Tensor]] = []

        def metadata(self):
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.pairs]

        def __iter__(self):
            for n, t in self.pairs:
                yield n, t.to(self.device, non_blocking=False)

    return RoundSource


@contextmanager
def reserved_port():
    """A port on this node that nothing else takes until the block ends, for a server this
    process binds inside it with SO_REUSEADDR (vLLM's `StatelessProcessGroup.create` does).

    The port is held by a socket bound to it on all interfaces with SO_REUSEADDR and not
    listening: a second SO_REUSEADDR bind succeeds while no socket on the port listens (so
    vLLM's does), a plain bind+listen of it fails with EADDRINUSE, and the kernel's choice of
    a port for bind(port 0) or an outgoing connection skips a port a socket is bound to
    (tests/unit/test_reserved_port.py). A number from a socket bound and closed could be taken
    by any of those before the server binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 0))
        yield s.getsockname()[1]


@dataclass
class CollectiveSender:
    """Learner side of one collective transport on one rank (`engine` None off rank 0)."""

    backend: str
    bucket_bytes: int
    engine: object = None  # vLLM TrainerWeightTransferEngine
    client: EngineClient | None = None
    source: object = None

    def send(self, named_tensors, version: int) -> dict[str, float]:
        pairs = list(named_tensors)  # every rank iterates: under ZeRO-3 this is the gather
        if self.engine is None:
            return {}
        largest = max((t.numel() * t.element_size() for _, t in pairs), default=0)
        if self.backend == "ipc" and largest > self.bucket_bytes:
            # vLLM's IPC producer raises on this mid-transfer, after start_weight_update.
            raise ValueError(f"ipc transport: a {largest}-byte tensor does not fit a "
                             f"{self.bucket_bytes}-byte bucket; raise the bucket size")
        self.source.pairs, self.client.version = pairs, version
        t0 = time.perf_counter()
        try:
            self.engine.send_weights()
        finally:
            self.source.pairs = []
        return {"bytes": float(sum(t.numel() * t.element_size() for _, t in pairs)),
                "send_s": time.perf_counter() - t0}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.client.shutdown_weight_transfer_engine()
            self.engine = None


def open_sender(backend: str, engines: list, rank: int, bucket_bytes: int) -> CollectiveSender:
    """Rendezvous with the engines (rank 0; other ranks only gather when sending).

    nccl: one group of rank 0 + every engine's workers (each engine says how many it has: a
    tensor-parallel engine has one per GPU); rank 0 hosts the TCP rendezvous on its node.
    ipc: the engine must share rank 0's GPU; vLLM's IPC trainer all-gathers handles over the
    default process group, which would hang with more learner ranks (ours other than 0 hold no
    gathered weights), so only a one-rank learner is accepted."""
    if rank != 0:
        return CollectiveSender(backend, bucket_bytes)
    if not engines:
        raise ValueError("learner rank 0 needs the engine handles to connect")
    import ray
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    device = torch.device("cuda", torch.cuda.current_device())
    workers = ray.get([e.transfer_workers.remote() for e in engines])
    client = EngineClient(engines, workers)
    source = _source_class()(device)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        # held until trainer_init returns: by then vLLM's store (in this process) listens on it
        with reserved_port() as port:
            info = NCCLTrainerInitInfo(
                master_address=ray.util.get_node_ip_address(), master_port=port,
                world_size=transfer_world_size(workers), packed=True,
                packed_buffer_size_bytes=bucket_bytes, rank=0)
            engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
    elif backend == "ipc":
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise RuntimeError("ipc transport: only a one-rank learner is supported (vLLM's IPC "
                               "trainer all-gathers over the default process group)")
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        info = IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=bucket_bytes, rank=0)
        engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
    else:
        raise ValueError(f"unknown collective backend {backend!r}")
    return CollectiveSender(backend, bucket_bytes, engine, client, source)
