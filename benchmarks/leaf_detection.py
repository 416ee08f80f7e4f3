"""LeaF's detection quality and the paper's motivation experiment, on a task with labelled
distractors (no training).

    python benchmarks/leaf_detection.py --out benchmarks/results/leaf_detection/arith \
        --n 400 experiment=leaf_arith

Takes the run's student (its cold start) and teacher (teacher=tiny|hf) from the same config
keys `launch.train` reads (built and cached if missing), and n train problems of the task
(every prompt carries a distractor at task.params.distractor_prob=1).

1. Detection quality: token-level precision / recall / F1 against the task's distractor
   labels, over the non-whitespace prompt tokens, for LeaF's Δ mask and for masks of the same
   size per prompt: random, perplexity (highest student surprisal) and student-gradient-only
   (highest ĝ_S) — the paper's masking ablation — on all prompts and on those the student gets
   wrong (where LeaF detects), for several quantiles q (one gradient pass; q only moves the
   threshold). The same for LeaF per word (leaf.unit=word: mean Δ per word; also the min, for
   comparison) beside random whole words as many per prompt.
2. Motivation: the student's greedy accuracy on the distractor prompts as given, after
   deleting each mask (all spans at once, with the spaces beside them), after deleting the
   labelled distractors (oracle), and on the same problems rendered without distractors.

Writes table.md, motivation.png and numbers.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from rl.config import register_configs
    from rl.config_checks import check_config

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    check_config(cfg)
    return cfg


def surprisal(model, examples, pad_id: int) -> torch.Tensor:
    """−log p(token | prefix) of every input token under `model` ([B, T]; 0 at position 0)."""
    from rl.methods.leaf.examples import batch_tensors

    t = batch_tensors(examples, pad_id)
    out = model.score({k: t[k] for k in ("input_ids", "attention_mask", "response_mask")})
    return -out["logprobs"]


def delete_mask(examples, masks: torch.Tensor, texts):
    """Each example with the masked input positions deleted (one collective prune, with the
    spaces beside each span, as LeaF's pruning does)."""
    from rl.methods.leaf.confounders import glue_whitespace, mask_spans
    from rl.methods.leaf.examples import counterfactuals

    out = []
    for i, ex in enumerate(examples):
        spans = glue_whitespace(mask_spans(masks[i, : len(ex.input_ids)]), texts[i])
        out.append(counterfactuals(ex, spans, "collective")[0] if spans else ex)
    return out


def random_words(words: torch.Tensor, chosen: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per row, as many whole words drawn uniformly as `chosen` marks (the word unit's random
    baseline: same number of words, so deleting it removes whole words too)."""
    from rl.methods.leaf.confounders import random_mask, word_sums

    valid = word_sums(words, torch.ones(words.shape)) > 0
    if valid.shape[1] == 0:
        return torch.zeros_like(chosen)
    picked = word_sums(words, chosen.float()) > 0
    draw = random_mask(valid, picked.sum(-1), gen)
    return (words >= 0) & draw.gather(1, words.clamp(min=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0, help="random-mask generator seed")
    ap.add_argument("--quantiles", default="0.1,0.2,0.3,0.4",
                    help="LeaF quantiles q to compare (one gradient pass; only the threshold moves)")
    args, overrides = ap.parse_known_args()
    cfg = compose_cfg(overrides)

    import ray

    from rewards import RewardPool
    from rl.loop.cold_start import load_tokenizer, run_cold_start
    from rl.tasks.data import train_samples_at
    from rl.engine.frozen import FrozenModel
    from rl.methods.leaf.confounders import (confounder_mask, precision_recall_f1, random_mask,
                                             top_k_mask, word_confounder_mask, word_ids)
    from rl.methods.leaf.detect import detect, greedy_correct
    from rl.methods.leaf.examples import distractor_labels, instruction_example
    from rl.tasks.prompt_format import prompt_format
    from rl.cluster.runtime import init_ray, start_engine, wait_ready
    from rl.tasks import get_task
    from rl.methods.leaf.teacher import student_vocab_size, teacher_path

    t0 = time.perf_counter()
    init_ray(cfg.cluster)
    cache = Path(cfg.cache_dir)
    student_dir = run_cold_start(cfg, cache, cfg.logger.progress)
    teacher_dir = teacher_path(cfg, cache, cfg.logger.progress)
    vocab = student_vocab_size(student_dir, teacher_dir)
    tok = load_tokenizer(student_dir)
    task = get_task(cfg.task.name, seed=cfg.task.seed, **cfg.task.params)
    samples = train_samples_at(task, cfg.distill.detect_offset, args.n)
    m = cfg.model
    fmt = prompt_format(m, tok)
    examples = [instruction_example(tok, s, fmt) for s in samples]
    student, teacher = FrozenModel(student_dir), FrozenModel(teacher_dir, vocab_size=vocab)
    lf = cfg.leaf
    det = detect(examples, teacher, student, tok, lf.quantile, lf.cap, lf.chunk)
    width = det.confounders.shape[1]
    labels = distractor_labels(examples, width)
    cand = det.candidates
    surp = surprisal(student, examples, tok.pad_token_id)
    surp = torch.nn.functional.pad(surp, (0, max(0, width - surp.shape[1])))[:, :width]
    words = word_ids(det.texts, cand)
    gen = torch.Generator().manual_seed(args.seed)
    quantiles = [float(q) for q in args.quantiles.split(",")]

    engine = start_engine(cfg, student_dir, cfg.seed)
    wait_ready([engine])
    pool = RewardPool(cfg.reward.num_workers, cfg.reward.timeout_s)
    max_new = cfg.rollout.max_new_tokens

    def accuracy(exs) -> float:
        return float(np.mean(greedy_correct(engine, exs, tok, pool, max_new)))

    try:
        correct = torch.tensor(greedy_correct(engine, examples, tok, pool, max_new))
        wrong = ~correct
        clean = [instruction_example(tok, s, fmt)
                 for s in train_samples_at(get_task(cfg.task.name, seed=cfg.task.seed,
                                                    **{**cfg.task.params, "distractor_prob": 0.0}),
                                           cfg.distill.detect_offset, args.n)]
        base = {"as given (with distractors)": float(correct.float().mean()),
                "the same problems without distractors": accuracy(clean),
                "labelled distractors deleted (oracle)": accuracy(delete_mask(examples, labels & cand, det.texts))}
        rows = []
        for q in quantiles:
            leaf = confounder_mask(det.delta, cand, q, lf.cap, quantile_over=det.region)
            counts = leaf.sum(-1)
            masks = {
                "LeaF (Δ = ĝ_T − ĝ_S)": leaf,
                "student gradient only (top ĝ_S)": top_k_mask(det.g_student * cand, cand, counts),
                "perplexity (top student surprisal)": top_k_mask(surp.float() * cand, cand, counts),
                "random (same size)": random_mask(cand, counts, gen),
            }
            per_word = word_confounder_mask(det.delta, words, q, lf.cap)
            masks.update({
                "LeaF per word (mean Δ)": per_word,
                "LeaF per word (min Δ)": word_confounder_mask(det.delta, words, q, lf.cap, reduce="min"),
                "random words (as many)": random_words(words, per_word, gen),
            })
            for name, mask in masks.items():
                rows.append({"q": q, "mask": name, "share": float(mask[cand].float().mean()),
                             "all": precision_recall_f1(mask, labels, cand),
                             "wrong": precision_recall_f1(mask[wrong], labels[wrong], cand[wrong]),
                             "accuracy_after_deletion": accuracy(delete_mask(examples, mask, det.texts))})
        ray.kill(engine)
        engine = start_engine(cfg, teacher_dir, cfg.seed)  # is the teacher robust to them?
        wait_ready([engine])
        base["teacher, as given (with distractors)"] = accuracy(examples)
        base["teacher, the same problems without distractors"] = accuracy(clean)
    finally:
        pool.close()
        ray.kill(engine)
        ray.shutdown()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {"task": cfg.task.name, "task_params": dict(cfg.task.params), "n": args.n,
               "student": student_dir, "teacher": teacher_dir, "cap": lf.cap,
               "student_wrong": int(wrong.sum()),
               "distractor_token_share": float(labels[cand].float().mean()),
               "baselines": base, "rows": rows, "wall_s": time.perf_counter() - t0,
               "overrides": overrides}
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1))
    (out / "table.md").write_text(render_table(numbers))
    plot(numbers, out / "motivation.png")
    print((out / "table.md").read_text())


def render_table(n: dict) -> str:
    lines = [f"Task `{n['task']}` {n['task_params']}, {n['n']} train prompts with a distractor "
             f"each; the student gets {n['student_wrong']} wrong. Distractor tokens are "
             f"{100 * n['distractor_token_share']:.1f}% of the candidate prompt tokens "
             "(non-whitespace). Every mask at a given q has LeaF's size per prompt. P/R/F1: "
             "token level against the labels, on all prompts and on those the student gets wrong; "
             "last column: the student's greedy accuracy after deleting the mask (with the "
             "spaces beside each span).", "",
             "| q | mask | masked share | P | R | F1 | P (wrong) | R (wrong) | F1 (wrong) | accuracy after deletion |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in n["rows"]:
        a, w = r["all"], r["wrong"]
        lines.append(f"| {r['q']} | {r['mask']} | {100 * r['share']:.1f} | {100 * a['precision']:.1f} | "
                     f"{100 * a['recall']:.1f} | {100 * a['f1']:.1f} | {100 * w['precision']:.1f} | "
                     f"{100 * w['recall']:.1f} | {100 * w['f1']:.1f} | "
                     f"{100 * r['accuracy_after_deletion']:.1f} |")
    lines += ["", "| student input | greedy accuracy |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f} |" for k, v in n["baselines"].items()]
    return "\n".join(lines) + "\n"


def plot(n: dict, path: Path) -> None:
    """Student accuracy: as given, after deleting each mask (per q), oracle, clean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    qs = sorted({r["q"] for r in n["rows"]})
    for name, style in (("LeaF (Δ = ĝ_T − ĝ_S)", "o-"), ("student gradient only (top ĝ_S)", "s--"),
                        ("perplexity (top student surprisal)", "^--"), ("random (same size)", "x:"),
                        ("LeaF per word (mean Δ)", "o-"), ("LeaF per word (min Δ)", "v-."),
                        ("random words (as many)", "+:")):
        ys = [100 * r["accuracy_after_deletion"] for q in qs for r in n["rows"]
              if r["q"] == q and r["mask"] == name]
        ax.plot(qs, ys, style, label=f"delete: {name}")
    colours = ("k", "g", "b", "m", "c")
    for (k, v), c in zip(n["baselines"].items(), colours):
        ax.axhline(100 * v, color=c, lw=0.8, ls="-.", label=f"{k}: {100 * v:.1f}")
    ax.set_xlabel("LeaF quantile q (mask size)")
    ax.set_ylabel("student greedy accuracy (%)")
    ax.set_title(f"{n['task']}: deleting detected confounders, no training (n = {n['n']})")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
