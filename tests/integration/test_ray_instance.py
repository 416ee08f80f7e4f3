"""cluster=local always gets a Ray instance of its own: a RAY_ADDRESS left in the shell (or a
`ray start` cluster's address file, which Ray reads the same way) used to make
`python -m launch.train` join that cluster and die with "When connecting to an existing
cluster, num_cpus and num_gpus must not be provided"."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import ray
from omegaconf import OmegaConf
from rl.cluster.runtime import init_ray
init_ray(OmegaConf.create({"name": "local", "address": None, "num_cpus": 3, "object_store_gb": 0.5}))
print("CPUS", ray.cluster_resources()["CPU"])
print("STORE", ray.cluster_resources()["object_store_memory"])
ray.shutdown()
"""


def test_local_cluster_ignores_a_stale_ray_address(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "CPUS 3.0" in proc.stdout   # our instance, with our num_cpus
    assert f"STORE {0.5 * 2**30}" in proc.stdout   # and cluster.object_store_gb
