"""`python -m launch.train [key=value ...]`: cold start (if needed), then RL.

With no argument it runs the embedded default (conf/config.yaml): a tiny model on `arith`,
local Ray, one vLLM engine, one DeepSpeed rank. Hydra validates every key against rl/config.py
before anything starts; `-m` sweeps (e.g. `-m seed=0,1,2`).
"""
from __future__ import annotations

import logging
import os
import signal

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rl.config import register_configs  # noqa: E402

register_configs()
log = logging.getLogger("launch.train")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from rl.loop.trainer import Trainer

    sweep_job_output_dir(cfg)
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    print_summary(summary, cfg)
    if summary["stopped_by"]:  # checkpointed and stopped by SIGTERM/SIGINT: 128 + signal, as
        # a killed process would exit, so a job script can requeue it with resume=true
        raise SystemExit(128 + signal.Signals[summary["stopped_by"]].value)
    return summary


def sweep_job_output_dir(cfg: DictConfig) -> None:
    """In a `-m` sweep, each job writes to its own Hydra job folder (outputs/multirun/<name>/<n>)
    unless output_dir was set: the default `outputs/<name>/seed<seed>` would put e.g.
    `-m credit=a,b` into one folder, the second job pruning the first one's checkpoints."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from rl.config import TrainConfig

    hc = HydraConfig.get()
    default = cfg._get_node("output_dir")._value() == TrainConfig.output_dir
    if hc.mode == RunMode.MULTIRUN and default:
        with open_dict(cfg):
            cfg.output_dir = hc.runtime.output_dir


def print_summary(summary: dict, cfg) -> None:
    from rl.loop.cold_start import cold_start_on

    start = "cold-start model" if cold_start_on(cfg) else "given checkpoint"
    lines = [
        "",
        f"=== {cfg.name} seed={cfg.seed}: {summary['steps']} RL steps on task '{cfg.task.name}' ===",
        f"held-out accuracy, {start:<16} : {summary['cold_start_accuracy']:.3f} greedy, "
        f"{summary['cold_start_accuracy_sampled']:.3f} sampled",
        f"held-out accuracy, final policy     : {summary['final_accuracy']:.3f} greedy, "
        f"{summary['final_accuracy_sampled']:.3f} sampled",
        credit_line(summary),
        *leaf_line(summary),
        *avar_line(summary),
        *fault_lines(summary),
        f"cold start {summary['cold_start_s']:.0f} s, actors {summary['actors_start_s']:.0f} s, "
        f"RL loop {summary['rl_wall_s']:.0f} s; outputs in {cfg.output_dir}",
    ]
    print("\n".join(lines), flush=True)


def leaf_line(summary: dict) -> list[str]:
    share = summary.get("leaf_share_of_step", float("nan"))
    if share != share:  # LeaF's RL terms were off
        return []
    return [f"LeaF in RL: detection + counterfactual groups = {100 * share:.1f}% of step time"]


def avar_line(summary: dict) -> list[str]:
    vas0, vas1 = summary.get("cold_start_vas", float("nan")), summary.get("final_vas", float("nan"))
    if vas0 != vas0:  # VAS was not measured (no AVAR part on)
        return []
    share = summary.get("vars_share_of_step", float("nan"))
    cost = f"; VARS = {100 * share:.1f}% of step time" if share == share else ""
    pooled = " → ".join(f"{summary.get(f'{w}_vas_pooled', float('nan')):.3f}" for w in ("cold_start", "final"))
    share = " → ".join(f"{summary.get(f'{w}_evidence_share', float('nan')):.3f}" for w in ("cold_start", "final"))
    return [f"AVAR: VAS (response tokens) {vas0:.2f} → {vas1:.2f}; pooled {pooled}; evidence share "
            f"{share}{cost}"]


def fault_lines(summary: dict) -> list[str]:
    lines = []
    if summary["engine_restarts"] or summary["learner_restarts"]:
        lines.append(f"survived: {summary['engine_restarts']} rollout-engine restarts, "
                     f"{summary['learner_restarts']} learner-group restarts from a checkpoint")
    if summary["stopped_by"]:
        lines.append(f"stopped by {summary['stopped_by']} after step {summary['steps']} "
                     "(checkpoint written): continue with resume=true")
    return lines


def credit_line(summary: dict) -> str:
    share = summary["credit_share_of_step"]
    what = (f"{100 * share:.1f}% of step time" if share == share
            else "not timed apart (fused GPU kernels: see benchmarks/)")
    return f"credit '{summary['credit']}': attention statistics + credit = {what}"


if __name__ == "__main__":
    main()
