"""`python -m launch.distill distill=leaf teacher=tiny [key=value ...]`: the offline
distillation stage alone (cold start if needed, the teacher if needed, then KD or LeaF).

Prints the student checkpoint and what LeaF's detection found; `python -m launch.train` with
the same keys reuses that checkpoint and starts RL from it. `distill=kd` is plain KD.
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
    import json
    from pathlib import Path

    from rl.loop.cold_start import run_cold_start
    from rl.methods.leaf.warm_start import run_distill
    from rl.cluster.runtime import stage_session

    if cfg.distill.name == "none":
        raise SystemExit("launch.distill: choose a mode, e.g. distill=leaf teacher=tiny "
                         "(distill=none means no distillation stage)")
    cache = Path(cfg.cache_dir)
    with stage_session(cfg):
        student = run_cold_start(cfg, cache, cfg.logger.progress)
        path = run_distill(cfg, cache, student, cfg.logger.progress)
    report = json.loads((Path(path) / "leaf_report.json").read_text())
    print(json.dumps(report, indent=1))
    print(f"distilled checkpoint ({cfg.distill.name}): {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
