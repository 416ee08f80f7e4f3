"""Metrics out: W&B (offline unless logged in), a metrics.jsonl beside the run, the console.

metrics.jsonl is always written: it is what tests and scripts read, and a run without W&B
still has its full history. On resume, rows after the resumed step are dropped first, so the
file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    try:
        import wandb

        return "online" if wandb.api.api_key else "offline"
    except Exception:  # no netrc, no env key: a local run
        return "offline"


class Tracker:
    def __init__(self, cfg, output_dir: Path, config_dict: dict, resume_step: int | None):
        self.cfg = cfg.logger
        self.path = output_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            self.rewind(resume_step)
        self.run = None
        if self.cfg.name == "wandb":
            import wandb

            mode = wandb_mode(self.cfg.mode)
            run_id_file = output_dir / "wandb_run_id"
            run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
            self.run = wandb.init(
                project=self.cfg.project, name=f"{cfg.name}-seed{cfg.seed}", config=config_dict,
                tags=[f"model:{cfg.model.name}", f"task:{cfg.task.name}", f"credit:{cfg.credit.name}"],
                dir=str(output_dir), mode=mode, id=run_id,
                resume="allow" if resume_step is not None else None,
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
            run_id_file.write_text(self.run.id)
            log.info("W&B %s run at %s", mode, self.run.dir)

    def rewind(self, step: int) -> None:
        """Drop metrics.jsonl rows after `step` (a resume, or a recovery from a checkpoint:
        those steps are about to run again). W&B keeps its rows: it ignores steps logged
        again below its current one."""
        if self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            keep = [r for r in rows if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int,
              html_columns: tuple[str, ...] = ()) -> None:
        """A W&B table; cells of `html_columns` are HTML fragments shown rendered."""
        if self.run is None or not rows:
            return
        import wandb

        html = [c in html_columns for c in columns]
        data = [[wandb.Html(v) if h else v for v, h in zip(row, html)] for row in rows]
        self.run.log({name: wandb.Table(columns=columns, data=data)}, step=step)

    def line_plot(self, name: str, xname: str, xs: list, series: dict[str, list[float]],
                  step: int) -> None:
        """One W&B line chart of several series over a shared x (e.g. VAS by layer)."""
        if self.run is None or not series:
            return
        import wandb

        self.run.log({name: wandb.plot.line_series(xs=list(xs), ys=list(series.values()),
                                                   keys=list(series), title=name, xname=xname)},
                     step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    @property
    def run_dir(self) -> str | None:
        return None if self.run is None else self.run.dir
