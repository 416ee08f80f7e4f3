"""Where actors run: one Ray placement group per actor group (learner ranks, rollout engines).

Each actor asks for exactly what it uses — CPUs, GPUs, any custom resources the user names —
so on a GPU cluster Ray hands each learner rank its own GPU and each engine its
tensor-parallel GPUs, and on a CPU machine the same code runs with GPU counts of 0. Ray can
declare GPUs a machine does not have (`ray start --num-gpus=N`): then this placement logic,
the GPUs each actor is given and the ranks' environment run for real while compute stays on
CPU (tests/integration/test_placement.py).

Inside an actor Ray shows only the actor's own GPUs (CUDA_VISIBLE_DEVICES), so a learner
rank's device is always `cuda:0`, and LOCAL_RANK — which DeepSpeed and torch.distributed read as
the index of the process's device — is 0 for every rank. The rank's position among the group's
ranks on its node (what torchrun calls LOCAL_RANK) is NODE_LOCAL_RANK.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import (PlacementGroup, placement_group, placement_group_table,
                                      remove_placement_group)
from ray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                            PlacementGroupSchedulingStrategy)

log = logging.getLogger(__name__)


def bundle(num_cpus: float, num_gpus: float, resources: dict | None = None) -> dict[str, float]:
    """One actor's resource request; zero entries left out (Ray refuses them in bundles)."""
    wanted = {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}
    return {k: float(v) for k, v in wanted.items() if v}


def actor_resources(b: dict[str, float]) -> dict:
    """`.options(...)` arguments asking for exactly the bundle `b` (an actor inside a
    placement group must request no more than its bundle holds)."""
    custom = {k: v for k, v in b.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": b.get("CPU", 0), "num_gpus": b.get("GPU", 0),
            **({"resources": custom} if custom else {})}


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


@dataclass
class Placement:
    """Bundles reserved for one actor group, one actor per bundle, and the node of each."""
    what: str
    group: PlacementGroup
    bundle: dict[str, float]
    node_ids: list[str]
    node_ips: list[str]

    def options(self, i: int) -> dict:
        """`.options(...)` placing an actor (with the bundle's resources) on bundle i."""
        return {**actor_resources(self.bundle),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=i,
                    placement_group_capture_child_tasks=True)}

    def release(self) -> None:
        remove_placement_group(self.group)


def reserve(what: str, b: dict[str, float], count: int, strategy: str,
            timeout_s: float) -> Placement:
    """Reserve `count` bundles `b` (PACK: as few nodes as possible; SPREAD: as many). A request
    the cluster can never hold fails at once; one that does not fit within timeout_s (other
    jobs hold the resources) fails then — both naming the resources, instead of waiting."""
    total = ray.cluster_resources()
    for key, amount in b.items():
        if amount * count > total.get(key, 0) + 1e-9:
            raise RuntimeError(
                f"{what}: {count} × {b} needs {amount * count:g} {key}, the Ray cluster has "
                f"{total.get(key, 0):g} (resources: {dict(sorted(total.items()))}). Lower the "
                f"group's size or per-actor share, or add nodes.")
    group = placement_group([dict(b) for _ in range(count)], strategy=strategy)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"{what}: {count} × {b} ({strategy}) could not be placed within {timeout_s:.0f} s; "
            f"free now: {ray.available_resources()} (cluster.placement_timeout_s)") from None
    table = placement_group_table(group)["bundles_to_node_id"]
    node_ids = [table[i] for i in range(count)]
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return Placement(what, group, dict(b), node_ids, [ips[n] for n in node_ids])


def rank_env(node_ids: list[str], node_ips: list[str]) -> list[dict[str, str]]:
    """torch.distributed's environment for ranks in bundle order: RANK, WORLD_SIZE, LOCAL_RANK
    (the index of the rank's device among the devices it sees: 0, since Ray shows a rank only
    its own GPU — DeepSpeed binds the process group to cuda:LOCAL_RANK, and a torchrun-style
    node position would name a device the second rank on a node does not have),
    NODE_LOCAL_RANK (the rank's index among the group's ranks on its node), LOCAL_WORLD_SIZE
    (their count), MASTER_ADDR (rank 0's node, where the rendezvous is). MASTER_PORT comes
    later: the port rank 0's store bound (rl/cluster/learner_group.py rendezvous_port)."""
    envs = []
    for rank, node in enumerate(node_ids):
        envs.append({"RANK": str(rank), "WORLD_SIZE": str(len(node_ids)), "LOCAL_RANK": "0",
                     "NODE_LOCAL_RANK": str(node_ids[:rank].count(node)),
                     "LOCAL_WORLD_SIZE": str(node_ids.count(node)),
                     "MASTER_ADDR": node_ips[0]})
    return envs


def where_am_i() -> dict:
    """What an actor reports about its placement (tests, placement.json)."""
    ctx = ray.get_runtime_context()
    keys = ("RANK", "LOCAL_RANK", "NODE_LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "MASTER_ADDR",
            "CUDA_VISIBLE_DEVICES")
    return {"node_id": ctx.get_node_id(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            **{k.lower(): os.environ.get(k) for k in keys}}


def _running(pids: list[int]) -> list[int]:
    """Those of `pids` still running on this node (a zombie has exited: its memory is free)."""
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_exited(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := _running(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def kill_and_wait(actors: list, procs: list[tuple[str, int]], timeout_s: float = 60.0) -> None:
    """Kill `actors` and return once their processes (`procs`: (node id, pid) each) have exited.

    `ray.kill` returns at once, but an actor's GPU memory — its CUDA context included — is only
    free once its process has ended. Whatever starts next on that GPU must wait for that:
    vLLM's start-up profiling measures the device's free memory and fails ("Error in memory
    profiling") when it grows while it measures, and a learner started beside a dying one may
    run out of memory. Processes on the driver's node are watched here, others by a task
    placed on their node."""
    for a in actors:
        ray.kill(a, no_restart=True)
    by_node: dict[str, list[int]] = defaultdict(list)
    for node, pid in procs:
        by_node[node].append(pid)
    here = ray.get_runtime_context().get_node_id()
    alive = _wait_exited(by_node.pop(here, []), timeout_s)
    task = ray.remote(num_cpus=0)(_wait_exited)
    waits = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
             .remote(pids, timeout_s) for node, pids in by_node.items()]
    for left in ray.get(waits, timeout=timeout_s + 30):
        alive += left
    if alive:
        log.warning("processes %s were killed but still run after %.0f s", alive, timeout_s)


def check_transport_placement(transport: str, rank0: dict, engines: list[dict]) -> None:
    """The GPU weight transports need a placement no config key states, checked once the
    actors run (`rank0`: learner rank 0's `where_am_i`; `engines`: each engine's `ready()`;
    `gpu_ids` are Ray's physical GPU ids on the node).

    ipc: each engine reads rank 0's GPU buffers in place through a CUDA IPC handle, which only
    opens on the same physical GPU of the same machine.
    nccl: rank 0 and every engine worker form one NCCL group, and NCCL refuses two members on
    one GPU ("Duplicate GPU detected"): no engine may share rank 0's GPU, nor another
    engine's."""
    if transport not in ("ipc", "nccl") or not rank0.get("gpu_ids"):
        return
    own = {(rank0["node_id"], g) for g in rank0["gpu_ids"]}
    if transport == "ipc":
        for i, e in enumerate(engines):
            if not own & {(e["node_id"], g) for g in e["gpu_ids"]}:
                raise RuntimeError(
                    f"learner.weight_transport=ipc: rollout engine {i} runs on GPU "
                    f"{e['gpu_ids']} of node {e['node_id'][:8]}, learner rank 0 on GPU "
                    f"{rank0['gpu_ids']} of node {rank0['node_id'][:8]}; CUDA IPC needs both "
                    "on one GPU (experiment=debug_gpu: 0.5 GPU each on a one-GPU machine), "
                    "else use nccl")
        return
    seen = {g: "learner rank 0" for g in own}
    for i, e in enumerate(engines):
        for g in ((e["node_id"], g) for g in e["gpu_ids"]):
            if g in seen:
                raise RuntimeError(
                    f"learner.weight_transport=nccl: rollout engine {i} and {seen[g]} share GPU "
                    f"{g[1]} of node {g[0][:8]}, and NCCL refuses two members of one group on "
                    "one GPU; give the engines and the learner GPUs of their own, or use ipc "
                    "for one engine sharing the learner's GPU")
            seen[g] = f"rollout engine {i}"


def _exists(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def check_shared_dirs(dirs: list, timeout_s: float) -> None:
    """On a multi-node cluster every node must see the run's folders: learner rank 0 writes the
    cold start, checkpoints and HF exports, engines on other nodes load them, the driver reads
    them. Nothing is shipped between nodes, so output_dir and cache_dir must be on a filesystem
    every node mounts (NFS, Lustre, a cloud bucket mount). Checked before any actor starts: a
    probe file written here must be visible from a task on each node."""
    import uuid
    from pathlib import Path

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    if len(nodes) < 2:
        return
    probes = [Path(d) / f".node-probe-{uuid.uuid4().hex}" for d in dirs]
    for p in probes:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    try:
        task = ray.remote(num_cpus=0)(_exists)
        seen = ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote([str(p) for p in probes]) for n in nodes],
            timeout=timeout_s)
    finally:
        for p in probes:
            p.unlink(missing_ok=True)
    for node, found in zip(nodes, seen):
        missing = [str(p.parent) for p, ok in zip(probes, found) if not ok]
        if missing:
            raise RuntimeError(
                f"{', '.join(missing)} is not visible from node {node['NodeManagerAddress']}: on a "
                "multi-node cluster output_dir and cache_dir must be on a filesystem every node "
                "mounts (checkpoints, the cold start and HF exports are written by learner rank 0 "
                "and loaded by engines and the driver on other nodes; nothing is copied)")
