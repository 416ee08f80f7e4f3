"""AVAR's training-free attention intervention (specs §3.2) on held-out problems (no training).

    python benchmarks/avar_intervention.py experiment=avar_image cache_dir=/work/main/outputs/cache \
        --n 300 --out benchmarks/results/avar_intervention/image_arith

Takes the experiment's cold start (`run_cold_start`: built and cached if missing) or a
`--checkpoint` HF folder, and the task's first n held-out problems, rendered as the trainer
renders them. Greedy HF generation (cfg.rollout.max_new_tokens, batched, left-padded), scored
by the task's verifier as the trainer's evaluation scores it, for:

* none: the model as loaded (its own attention implementation);
* α = 0: the intervention path with nothing re-weighted — must give the same responses as
  none (asserted: it is the check that the path itself changes nothing);
* α_e = 0.15 with α_s ∈ {0, 0.05, 0.4, 0.6}, rows renormalised (rl/methods/avar/intervention.py);
* the paper's best point without renormalisation (`--raw-alpha-system`, default 0.4: of the
  two α_s with gains in the paper, 0 and 0.4, the one that suppresses anything).

Evidence keys: the image pads for a VLM (`avar.evidence=image`), the labelled evidence text
otherwise; system keys: `avar.system` (the instruction, or `template_prefix:<share>`, the
authors' prefix of the prompt). Writes table.md and numbers.json under --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def left_pad(prompts, pad_id: int) -> dict:
    """A left-padded batch of encoded prompts: ids, mask, token classes (padding is class
    "other": neither evidence nor system) and, for a VLM, its images."""
    from rl.tasks.data import image_fields

    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    classes = torch.zeros((len(prompts), width), dtype=torch.int8)
    for i, p in enumerate(prompts):
        n = len(p.ids)
        ids[i, width - n:] = torch.tensor(p.ids)
        mask[i, width - n:] = 1
        classes[i, width - n:] = torch.tensor(p.classes, dtype=torch.int8)
    return {"input_ids": ids, "attention_mask": mask, "token_classes": classes,
            **image_fields(prompts, [1] * len(prompts))}


def cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    """A response as the engines return it: up to and including the first stop token."""
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def generate(model, batches, max_new: int, eos: set[int], pad_id: int, setting: dict | None,
             evidence: str, system: str) -> list[list[int]]:
    """Greedy responses (token ids) of every batch, with the intervention `setting` (None:
    the model untouched)."""
    from contextlib import nullcontext

    from rl.engine.frozen import image_kwargs
    from rl.methods.avar.intervention import intervene, prompt_key_masks

    out = []
    for b in batches:
        ctx = nullcontext()
        if setting is not None:
            ev, sy = prompt_key_masks(b["token_classes"], evidence, system, b["attention_mask"])
            ctx = intervene(model, ev, sy, setting["alpha_evidence"], setting["alpha_system"],
                            setting["renormalise"], setting.get("layers"))
        with ctx, torch.no_grad():
            gen = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 **image_kwargs(model, b), max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=sorted(eos))
        width = b["input_ids"].shape[1]
        out += [cut_at_eos(r, eos) for r in gen[:, width:].tolist()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=300, help="held-out problems (the first n)")
    ap.add_argument("--checkpoint", default=None, help="an HF folder instead of the cold start")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--alpha-evidence", type=float, default=0.15)
    ap.add_argument("--alpha-systems", default="0,0.05,0.4,0.6")
    ap.add_argument("--raw-alpha-system", type=float, default=0.4,
                    help="α_s of the run without renormalisation")
    ap.add_argument("--layers", default=None, help="comma-separated decoder layers (default: all)")
    args, overrides = ap.parse_known_args()

    from leaf_detection import compose_cfg

    cfg = compose_cfg(overrides)

    from rewards import RewardItem, RewardPool
    from rl.engine.frozen import load_model
    from rl.loop.cold_start import load_tokenizer, run_cold_start
    from rl.models.vision import image_processor_for
    from rl.tasks import get_task
    from rl.tasks.data import encode_prompt
    from rl.tasks.prompt_format import prompt_format

    t0 = time.perf_counter()
    if args.checkpoint:
        model_dir = args.checkpoint
    else:  # a cold start that is not cached yet is trained by Ray learners
        import ray

        from rl.cluster.runtime import init_ray

        init_ray(cfg.cluster)
        try:
            model_dir = run_cold_start(cfg, Path(cfg.cache_dir), cfg.logger.progress)
        finally:
            ray.shutdown()
    t_model = time.perf_counter() - t0

    tok = load_tokenizer(model_dir)
    images = image_processor_for(model_dir)
    fmt = prompt_format(cfg.model, tok)
    task = get_task(cfg.task.name, seed=cfg.task.seed, **cfg.task.params)
    samples = task.dataset("test", args.n)
    prompts = [encode_prompt(tok, s, fmt, images) for s in samples]
    evidence, system = cfg.avar.evidence, cfg.avar.system
    model = load_model(model_dir, cfg.model.dtype).eval().requires_grad_(False)
    eos_ids = model.generation_config.eos_token_id
    eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    pad_id = tok.pad_token_id
    batches = [left_pad(prompts[i:i + args.batch_size], pad_id)
               for i in range(0, len(prompts), args.batch_size)]
    max_new = cfg.rollout.max_new_tokens
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None

    def setting(name, a_e, a_s, renorm=True):
        return {"name": name, "alpha_evidence": a_e, "alpha_system": a_s, "renormalise": renorm,
                "layers": layers}

    a_e = args.alpha_evidence
    settings = [{"name": "none"}, setting("intervention path, α = 0", 0.0, 0.0)]
    settings += [setting(f"α_e = {a_e}, α_s = {float(s)}", a_e, float(s))
                 for s in args.alpha_systems.split(",")]
    settings.append(setting(f"α_e = {a_e}, α_s = {args.raw_alpha_system}, not renormalised",
                            a_e, args.raw_alpha_system, False))

    pool = RewardPool(1, cfg.reward.timeout_s)
    rows = []
    try:
        for s in settings:
            t = time.perf_counter()
            resp = generate(model, batches, max_new, eos, pad_id,
                            None if s["name"] == "none" else s, evidence, system)
            gen_s = time.perf_counter() - t
            texts = tok.batch_decode(resp, skip_special_tokens=True)
            results = pool.score([RewardItem(response=x, answer=smp.answer, meta=smp.meta,
                                             verifier=smp.task) for x, smp in zip(texts, samples)])
            correct = [r.components.get(smp.task, 0.0) for r, smp in zip(results, samples)]
            rows.append({**s, "responses": resp, "texts": texts, "correct": correct,
                         "accuracy": sum(correct) / len(correct), "generate_s": gen_s})
            print(f"{s['name']}: accuracy {rows[-1]['accuracy']:.4f} ({gen_s:.0f} s)", flush=True)
    finally:
        pool.close()

    base = rows[0]
    for r in rows:
        r["changed"] = sum(a != b for a, b in zip(r["responses"], base["responses"]))
        r["gained"] = sum(c > 0 and not b > 0 for c, b in zip(r["correct"], base["correct"]))
        r["lost"] = sum(b > 0 and not c > 0 for c, b in zip(r["correct"], base["correct"]))
        r["delta"] = r["accuracy"] - base["accuracy"]
    zero = rows[1]
    print(f"α = 0 path vs none: {len(samples) - zero['changed']} of {len(samples)} responses "
          "identical", flush=True)
    assert zero["changed"] == 0, "the intervention path at α = 0 changed responses"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {
        "experiment": overrides, "task": cfg.task.name, "task_params": dict(cfg.task.params),
        "model": model_dir, "n": len(samples), "evidence": evidence, "system": system, "max_new_tokens": max_new,
        "batch_size": args.batch_size, "layers": layers or "all",
        "date": datetime.date.today().isoformat(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "model_s": t_model, "wall_s": time.perf_counter() - t0,
        "alpha0_identical": len(samples) - zero["changed"],
        "rows": [{k: v for k, v in r.items() if k not in ("responses", "texts")} for r in rows],
        "examples": [{"answer": smp.answer, **{r["name"]: r["texts"][i] for r in rows}}
                     for i, smp in enumerate(samples[:5])],
    }
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1, ensure_ascii=False))
    (out / "table.md").write_text(render_table(numbers))
    print((out / "table.md").read_text())


def render_table(n: dict) -> str:
    lines = [f"`{n['task']}`, {n['n']} held-out problems, model `{n['model']}`; greedy HF "
             f"generation (max {n['max_new_tokens']} new tokens); evidence keys: "
             f"{n['evidence']}; system keys: {n.get('system', 'instruction')}; layers: {n['layers']}. Δ in points against none; changed: "
             "responses that differ from none's (gained / lost: correctness flips).", "",
             "| setting | accuracy (%) | Δ vs none | changed | gained / lost | generate (s) |",
             "|---|---|---|---|---|---|"]
    for r in n["rows"]:
        lines.append(f"| {r['name']} | {100 * r['accuracy']:.1f} | {100 * r['delta']:+.1f} | "
                     f"{r['changed']} | {r['gained']} / {r['lost']} | {r['generate_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
