"""What a run shows beside its metrics, at evaluations: W&B tables of responses coloured token by
token by their credit, of prompts coloured by LeaF's Δ, and AVAR's VAS per layer as a chart.
Kept out of the trainer's loop: each reads one method's trace and only draws it."""
from __future__ import annotations

from rl.credit.render import credit_html


def log_credit_table(tracker, tok, batch, trace, n: int, step: int) -> None:
    """A few responses coloured token by token by WAAD, FAI and γ (`credit_samples`); `trace`:
    the credit method's last trace (None: it keeps none)."""
    if trace is None or tracker.run is None or n <= 0:
        return
    rows = []
    for i in range(min(n, len(batch))):
        pos = batch.response_mask[i].nonzero()[:, 0]
        tokens = [tok.decode([t]) for t in batch.input_ids[i, pos].tolist()]
        values = {"γ": trace.gamma[i, pos].tolist()}
        marks = {"selected": trace.selected[i, pos].tolist()}
        if trace.sets is not None:
            values = {"WAAD": trace.sets.waad[i, pos].tolist(), "FAI": trace.sets.fai[i, pos].tolist(), **values}
            marks = {"preplan": trace.sets.preplan[i, pos].tolist(),
                     "anchor": trace.sets.anchor[i, pos].tolist(),
                     "intro": trace.sets.intro[i, pos].tolist()}
        rows.append([step, float(batch.rewards[i]), float(batch.seq_advantages[i]),
                     credit_html(tokens, values, marks=marks)])
    tracker.table("credit_samples", ["step", "reward", "advantage", "credit"], rows, step,
                  html_columns=("credit",))


def log_leaf_table(tracker, records: list[dict], step: int) -> None:
    """Prompts LeaF's detection saw (before RL: the distillation's; during RL: the step's),
    each token coloured by Δ (low Δ: the student leans on it, the teacher does not),
    confounders and labelled distractors marked (`leaf_confounders`)."""
    rows = [[d["uid"], sum(d["confounder"]),
             credit_html(d["tokens"], {"Δ": d["delta"]},
                         marks={"confounder": d["confounder"],
                                "distractor (label)": d["distractor"]})]
            for d in records]
    tracker.table("leaf_confounders", ["uid", "confounders", "prompt"], rows, step,
                  html_columns=("prompt",))


def log_vas_plot(tracker, evals: dict, layers: list[int], step: int) -> None:
    """AVAR's VAS per layer at this evaluation, as one chart (response and user-query tokens as
    two lines)."""
    series = {u: [evals[f"eval/vas_{u}_L{layer}"] for layer in layers]
              for u in ("response", "query") if f"eval/vas_{u}_L{layers[0]}" in evals}
    tracker.line_plot("eval/vas_by_layer", "layer", layers, series, step)
