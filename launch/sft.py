"""`python -m launch.sft [key=value ...]`: only the cold-start (supervised warm-start) stage.

Writes the HF checkpoint the RL stage starts from into `cache_dir` and prints its path;
`python -m launch.train` reuses it when the model/task/cold-start config is the same.
"""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rl.config import register_configs  # noqa: E402

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> str:
    from pathlib import Path

    from rl.loop.cold_start import run_cold_start
    from rl.cluster.runtime import stage_session

    with stage_session(cfg):
        path = run_cold_start(cfg, Path(cfg.cache_dir), cfg.logger.progress)
    print(f"cold-start checkpoint: {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
