"""A two-node Ray cluster on one machine — a head and a worker started with `ray start`, each
declaring GPUs it does not have (ENVIRONMENT.md: Ray can pretend) and a custom resource of its
own — and a short training run submitted to it as the README says (`ray job submit` with
launch/ray_job.yaml, `python -m launch.train cluster=ray ...`): the placement groups put the
learner ranks on the worker node and the engine on the head. Compute stays on CPU; what is
real is the job submission and the placement: which node each actor ran on, which GPU Ray
gave it, and the ranks' RANK / LOCAL_RANK / NODE_LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.ray_processes import free_port, stop_group

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.timeout(1200)


def start_node(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block` in the foreground (stopping it stops its node and nothing else on
    the machine, unlike `ray stop`); returns once the node is up."""
    proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: see stop_group
    NODES_STARTED.append(proc)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Ray runtime started" in line:
            return proc
    raise RuntimeError("ray start failed:\n" + "".join(seen[-40:]))


NODES_STARTED: list[subprocess.Popen] = []


def stop_nodes() -> None:
    for p in reversed(NODES_STARTED):
        stop_group(p.pid)
    NODES_STARTED.clear()


@pytest.fixture(scope="module")
def two_nodes():
    # One auth mode for the nodes and every driver: Ray 2.60 turns token auth on by itself
    # when a token file exists (~/.ray/auth_token), and a node or driver that decides
    # otherwise cannot connect. A throwaway local test cluster needs none.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           "RAY_AUTH_MODE": "disabled",
           # the job's entrypoint runs `python` from the head's PATH: this environment's
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    tmp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: Ray's socket paths have a limit
    port, dashboard = free_port(), free_port()
    common = ["--num-cpus=3", "--object-store-memory=200000000"]
    try:
        # each node's agent on its own port (two nodes on one machine would share the default)
        start_node(["--head", f"--port={port}", f"--temp-dir={tmp}", "--include-dashboard=true",
                    f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
                    "--num-gpus=1", '--resources={"node_a": 4}', *common], env)
        # and its own temp dir, as separate machines have: a node unpacks a job's working_dir
        # under it, and re-unpacking into the head's copy deleted the job driver's cwd
        start_node([f"--address=127.0.0.1:{port}", f"--temp-dir={tmp}/w",
                    f"--dashboard-agent-listen-port={free_port()}",
                    "--num-gpus=2", '--resources={"node_b": 4}', *common], env)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_nodes()
        shutil.rmtree(tmp, ignore_errors=True)


NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("NODES", json.dumps({n["NodeID"]: [n["NodeManagerAddress"], sorted(k for k in n["Resources"] if k.startswith("node_"))]
                           for n in ray.nodes() if n["Alive"]}))
"""


def submit(dashboard: str, env: dict, args: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit` as in the README; retried while the head's job agent is still starting
    ("No available agent to submit job")."""
    cmd = [RAY, "job", "submit", f"--address={dashboard}", "--runtime-env=launch/ray_job.yaml",
           "--", "python", "-m", "launch.train", *args]
    deadline = time.monotonic() + 120
    while True:
        run = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=900)
        if "No available agent" not in run.stdout + run.stderr or time.monotonic() > deadline:
            return run
        time.sleep(3)


def test_a_submitted_job_places_learner_and_engines_on_their_nodes(two_nodes, tmp_path):
    address, dashboard, env = two_nodes
    env = {**env, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    nodes = subprocess.run([sys.executable, "-c", NODES, address], env=env, text=True,
                           capture_output=True, timeout=120)
    line = next(x for x in nodes.stdout.splitlines() if x.startswith("NODES"))
    by_resource = {res[0]: (nid, ip) for nid, (ip, res) in json.loads(line[6:]).items()}
    assert sorted(by_resource) == ["node_a", "node_b"], nodes.stdout + nodes.stderr

    out = tmp_path / "run"  # absolute: the job runs in an uploaded copy of the project
    args = ["cluster=ray", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", "logger=none",
            "logger.progress=false", "steps=2", "eval_every=2", "cold_start.steps=4",
            "cold_start.batch_size=8", "cold_start.warmup_steps=1", "task.eval_size=4",
            "rollout.eval_samples=1", "algorithm.prompts_per_step=2", "algorithm.n_samples=4",
            "algorithm.minibatch_size=4", "rollout.max_new_tokens=16", "learner.num_ranks=2",
            "+learner.resources_per_rank.node_b=1", "+rollout.resources_per_engine.node_a=1"]
    run = submit(dashboard, env, args)
    logs = run.stdout + run.stderr
    assert run.returncode == 0 and "succeeded" in logs, logs[-5000:]
    assert "2 RL steps" in logs and "working_dir_files" not in str(out)

    placed = json.loads((out / "placement.json").read_text())
    worker_id, worker_ip = by_resource["node_b"]
    head_id, _ = by_resource["node_a"]
    ranks = placed["learner_ranks"]
    assert [r["rank"] for r in ranks] == ["0", "1"]
    for i, r in enumerate(ranks):
        assert r["node_id"] == worker_id  # both on the node with node_b (and 2 GPUs)
        assert r["node_local_rank"] == str(i) and r["local_world_size"] == "2"
        assert r["world_size"] == "2" and r["master_addr"] == worker_ip  # rank 0's node
        assert len(r["gpu_ids"]) == 1 and r["cuda_visible_devices"] == r["gpu_ids"][0]
        # DeepSpeed binds the rank to cuda:LOCAL_RANK: it must be a device the rank sees (the
        # second rank on the node used to get LOCAL_RANK=1 beside one visible GPU)
        assert int(r["local_rank"]) < len(r["cuda_visible_devices"].split(","))
    assert sorted(r["gpu_ids"][0] for r in ranks) == ["0", "1"]  # a GPU each, not shared
    (engine,) = placed["engines"]
    assert engine["node_id"] == head_id and engine["gpu_ids"] == ["0"]
    assert engine["cuda_visible_devices"] == "0"
