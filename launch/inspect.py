"""`python -m launch.inspect --checkpoint PATH --prompt TEXT`: look at preplan/anchor credit
(and, with `--teacher`, at the prompt tokens LeaF calls confounders).

Why: the credit a training step applies is a function of the learner's attention on that
step's batch, logged only as shares. This tool replays the scoring forward of one checkpoint
on a prompt (and a given or generated response), computes WAAD, FAI, the token sets and γ
exactly as `rl/methods/credit/preplan_anchor.py` does in training, and writes one HTML page and one
PNG per sample to read them token by token.

    python -m launch.inspect --checkpoint outputs/default/seed0 --task-sample 0
    python -m launch.inspect --checkpoint outputs/cache/cold_start-XXXX \\
        --prompt $'Add.\\n347+285\\n' --samples 4 --temperature 1.0 --strategy coupled
    python -m launch.inspect --checkpoint outputs/cache/cold_start-XXXX --task-sample 0 \\
        --distractors --teacher outputs/cache/teacher-YYYY

PATH is an HF folder (config.json), a checkpoint step folder (hf/ inside), a checkpoints
folder, or a trainer output dir (its latest checkpoint). As in training, the head groups
(local / global) are chosen over the whole batch, i.e. over the `--samples` responses here.
The credit parameters are the run's (its Hydra config) when PATH lies in a trainer output
dir, else the defaults of `PreplanAnchorParams`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONF = Path(__file__).resolve().parent.parent / "conf"


def resolve_checkpoint(path: str) -> Path:
    """The HF folder to load for PATH (see the module docstring); a clear error otherwise."""
    from rl.loop.checkpoint import CheckpointManager

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    if (p / "config.json").is_file():
        return p
    if (p / "hf" / "config.json").is_file():
        return p / "hf"
    for root in (p, p / "checkpoints"):
        if root.is_dir() and any(x.name.startswith("step_") for x in root.iterdir()):
            step = CheckpointManager(root, verify_mode="fast").newest_intact()
            if step is not None:
                return step / "hf"
            raise FileNotFoundError(f"{root} holds no checkpoint (step_*/ with a manifest.json)")
    raise FileNotFoundError(
        f"{path!r} is not an HF model folder (no config.json), a checkpoint step (no hf/), "
        f"nor a folder of checkpoints (no step_*/ in it or in its checkpoints/)")


def task_sample(index: int, distractors: bool = False, task: str = "arith"):
    """Held-out problem `index` of a shipped task (arith, the default; image_arith for a
    vision-language checkpoint), with a distractor if asked."""
    from omegaconf import OmegaConf

    from rl.tasks import TEST, get_task

    task_cfg = OmegaConf.load(CONF / "task" / f"{task}.yaml")
    params = {**OmegaConf.to_container(task_cfg.params), **({"distractor_prob": 1.0} if distractors else {})}
    return get_task(task_cfg.name, seed=task_cfg.seed, **params).sample(TEST, index)


def task_prompt(index: int, distractors: bool = False, task: str = "arith") -> tuple[str, str]:
    """(prompt text, reference answer) of held-out problem `index` of the task, with
    the default model's prompt/response prefixes — what the trainer feeds the policy."""
    from omegaconf import OmegaConf

    s = task_sample(index, distractors, task)
    model_cfg = OmegaConf.load(CONF / "model" / "tiny.yaml")
    return (model_cfg.prompt_prefix or "") + s.prompt + (model_cfg.response_prefix or ""), s.answer


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def generate(model, tok, prompt_ids: list[int], n: int, temperature: float, max_new_tokens: int,
             images=None) -> list[list[int]]:
    """`n` responses (token ids, ending with EOS when the model stopped there). `images`: a
    vision-language prompt's `rl.models.vision.ImageInputs` (its pads already expanded in prompt_ids)."""
    import torch

    ids = torch.tensor([prompt_ids], device=model.device)
    if images is not None:
        kw = image_inputs(model, ids, images, n)
        ids = kw.pop("input_ids")
    else:
        kw = {}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         num_return_sequences=1 if images is not None else n,
                         pad_token_id=_pad_id(tok), eos_token_id=tok.eos_token_id, **kw)
    responses = []
    for row in out[:, len(prompt_ids):].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        responses.append(row)
    return responses


def image_inputs(model, ids, images, rows: int) -> dict:
    """The VLM forward's inputs for `rows` copies of one prompt's image (ids: [rows, T])."""
    from rl.engine.frozen import image_kwargs

    ids = ids.expand(rows, -1) if ids.shape[0] == 1 else ids
    b = {"input_ids": ids, "pixel_values": images.pixel_values[None].expand(rows, -1, -1),
         "image_grid_thw": images.image_grid_thw[None].expand(rows, -1, -1)}
    return {"input_ids": ids, **{k: v.to(model.device) for k, v in image_kwargs(model, b).items()}}


def score_batch(model, prompt_ids: list[int], responses: list[list[int]], pad_id: int,
                token_classes=None, images=None):
    """prompt ⊕ response rows (right-padded) as the trainer's RolloutBatch: tokens, masks, the
    task's token classes (for AVAR), the prompt's image once per row."""
    import torch

    from rl.batch import RolloutBatch
    from rl.tasks.data import pad_rows

    rows = [prompt_ids + r for r in responses]
    ids = pad_rows(rows, pad_id, torch.long)
    B, T = ids.shape
    batch = RolloutBatch(
        input_ids=ids, attention_mask=pad_rows([[1] * len(r) for r in rows], 0, torch.bool),
        response_mask=pad_rows([[0] * len(prompt_ids) + [1] * len(r) for r in responses], 0, torch.bool),
        sampler_logprobs=torch.zeros(B, T),
        token_classes=token_classes if token_classes is not None else torch.zeros(B, T, dtype=torch.int8),
        group_ids=torch.zeros(B, dtype=torch.long), rewards=torch.zeros(B),
        token_weights=torch.ones(B, T), seq_advantages=torch.ones(B))
    if images is not None:
        batch.pixel_values = images.pixel_values[None].expand(B, -1, -1)
        batch.image_grid_thw = images.image_grid_thw[None].expand(B, -1, -1)
    return batch


def scoring_forward(model, batch, methods: list) -> None:
    """The trainer's scoring forward (rl/engine/frozen.py `scored`, through a FrozenModel):
    what the methods ask for, on the batch; fills batch.attn_stats and batch.entropy."""
    from rl.methods import scoring_request

    t = {**batch.model_inputs(), "response_mask": batch.response_mask}
    for m in methods:
        classes = m.key_classes(batch)
        if classes is not None:
            t["key_classes"] = classes
    out = model.score(t, 1.0, scoring_request(methods))
    if not out.get("attn_stats"):
        raise RuntimeError("no attention statistics captured (check --layers)")
    batch.attn_stats, batch.entropy = out["attn_stats"], out["entropy"] * batch.response_mask


def _short(x: float) -> float:
    """A float32 statistic as its shortest decimal (what the tooltips show)."""
    import numpy as np

    return float(str(np.float32(x)))


def head_names(stats: dict) -> list[str]:
    """Names of the pooled heads in `pooled_heads` order (layers sorted, then query heads)."""
    names = []
    for layer in sorted(stats):
        names += [f"L{layer}.h{h}" for h in range(stats[layer]["distance"].shape[1])]
    return names


def parse_args(argv):
    from rl.methods.credit.preplan_anchor import ATTENTION_STRATEGIES

    ap = argparse.ArgumentParser(prog="python -m launch.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="HF folder, checkpoint step, checkpoints dir or output dir")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the full prompt text, used verbatim")
    src.add_argument("--task-sample", type=int, metavar="N", help="held-out problem N of the default arith task (image_arith for a vision-language checkpoint)")
    ap.add_argument("--response", help="score this response instead of generating one")
    ap.add_argument("--strategy", default="coupled", choices=ATTENTION_STRATEGIES)
    ap.add_argument("--samples", type=int, default=1, help="responses to generate (head groups span them all)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--layers", default="middle:5", help='"all", "middle:n" or comma-separated indices')
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--teacher", help="LeaF: a teacher HF folder (same tokenizer), or `run` for the teacher "
                    "of the run that wrote --checkpoint; adds each prompt token's sensitivities ĝ_T, ĝ_S, "
                    "Δ and the confounders LeaF would prune")
    ap.add_argument("--quantile", type=float, default=0.10, help="LeaF confounder quantile (leaf.quantile)")
    ap.add_argument("--vas", action="store_true",
                    help="AVAR: each token's attention to the evidence over the system prompt, and the "
                    "VAS of the response and of the user query, per layer (a --prompt's first line is "
                    "taken as the system prompt, the rest as the evidence)")
    ap.add_argument("--system", default="instruction",
                    help="AVAR's system keys for --vas (avar.system): instruction | template_prefix:<share>")
    ap.add_argument("--distractors", action="store_true",
                    help="with --task-sample: the problem with a distractor (arith distractor_prob=1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="outputs/inspect")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be >= 1")
    if args.response is not None and args.samples != 1:
        ap.error("--response gives exactly one sample; drop --samples")
    if args.prompt == "":
        ap.error("--prompt is empty")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    from transformers import AutoTokenizer

    from rl.loop.cold_start import num_layers
    from rl.methods.credit import build
    from rl.tasks.data import encode_prompt
    from rl.engine.frozen import FrozenModel
    from rl.methods.base import RunInfo
    from rl.tasks.prompt_format import PromptFormat
    from rl.models.vision import image_processor_for

    try:
        hf = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as e:
        raise SystemExit(f"launch.inspect: {e}") from None
    tok = AutoTokenizer.from_pretrained(hf)
    frozen = FrozenModel(str(hf), "float32", args.device)
    model = frozen.model
    images = image_processor_for(str(hf))   # a vision-language checkpoint's; None for text
    if images is not None and args.task_sample is None:
        raise SystemExit("launch.inspect: a vision-language checkpoint reads an image with its "
                         "prompt: use --task-sample N (a held-out image_arith problem)")
    task = "arith" if images is None else "image_arith"
    answer = None
    prompt = args.prompt
    if prompt is None:
        prompt, answer = task_prompt(args.task_sample, args.distractors, task)
    encoded = None
    if images is not None:  # image pads expanded to the image's tokens, pixels alongside
        sample = task_sample(args.task_sample, args.distractors, task)
        offset = prompt.index(sample.prompt)
        encoded = encode_prompt(tok, sample, PromptFormat(prompt[:offset],
                                                          prompt[offset + len(sample.prompt):]), images)
        prompt_ids = encoded.ids
    else:
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    image_in = encoded.image_inputs if encoded is not None else None

    # Generate before the scoring forward installs the statistics attention on the model.
    if args.response is not None:
        responses = [tok(args.response, add_special_tokens=False)["input_ids"]]
        if not responses[0]:
            raise SystemExit("launch.inspect: --response is empty")
    else:
        torch.manual_seed(args.seed)
        if args.temperature == 0 and args.samples > 1:
            print("note: greedy decoding gives identical samples; use --temperature > 0", file=sys.stderr)
        with torch.no_grad():
            responses = [r for _ in range(args.samples if image_in is not None else 1)
                         for r in generate(model, tok, prompt_ids, 1 if image_in is not None else args.samples,
                                           args.temperature, args.max_new_tokens, image_in)]
        if any(not r for r in responses):
            raise SystemExit("launch.inspect: a generated response is empty (raise --max-new-tokens)")

    # The methods as the trainer builds them: the run's credit parameters, AVAR for --vas.
    p = run_params(hf, args.strategy)
    credit = build(args.strategy, p, stats_layers=args.layers)
    methods = [credit]
    classes = None
    evidence = "evidence" if images is None else "image"
    if args.vas:
        from rl.methods.avar.visual_attention import Avar
        from rl.batch import TOKEN_CLASS
        from rl.config import AvarConfig
        from rl.tasks.data import pad_rows

        sample = task_sample(args.task_sample, args.distractors, task) if args.task_sample is not None else None
        prompt_classes = encoded.classes if encoded is not None else prompt_token_classes(tok, prompt, sample)
        classes = pad_rows([prompt_classes + [TOKEN_CLASS["response"]] * len(r) for r in responses],
                           0, torch.int8)
        # (vars_on: its masses come from this scoring forward, as VARS reads them in training)
        methods.append(Avar(AvarConfig(name="vars", evidence=evidence, layers=args.layers, system=args.system),
                            vars_on=True, agto=None))
    for m in methods:
        m.setup(RunInfo(num_layers(str(hf)), steps=1))
    batch = score_batch(model, prompt_ids, responses, _pad_id(tok), classes, image_in)
    scoring_forward(frozen, batch, methods)
    credit.token_weights(batch, 0)
    trace, stats, resp = credit.trace, batch.attn_stats, batch.response_mask

    ctx = {"prompt": prompt, "answer": answer, "strategy": args.strategy, "checkpoint": hf,
           "params": {"strategy": args.strategy, "checkpoint": str(hf), "layers": args.layers,
                      "impl": "blockwise" if str(args.device).startswith("cpu") else "auto", **p},
           "groups": head_group_rows(stats, trace, trace.head_distance, len(responses))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    leaf = None
    if args.teacher:
        labels = None
        if args.task_sample is not None:
            labels = distractor_flags(tok, task_sample(args.task_sample, args.distractors), prompt)
        teacher = run_teacher(hf) if args.teacher == "run" else args.teacher
        leaf = leaf_views(hf, teacher, tok, prompt_ids, responses, args.quantile, labels)
    avar = avar_views(stats, resp, tok, prompt_ids, responses, classes, evidence, args.system) if args.vas else None
    written = []
    for i, r_ids in enumerate(responses):
        new = write_sample(out, i, tok, r_ids, resp[i], batch.token_weights[i], trace.sets, ctx,
                           None if leaf is None else leaf[i], None if avar is None else avar[i])
        written += new
        print("\n".join(str(x) for x in new))
    return written


def prompt_token_classes(tok, prompt: str, sample) -> list[int]:
    """Task token classes of the prompt's tokens: from the sample's labelled segments, or for
    a free prompt, its first line as the system prompt and the rest as the evidence."""
    from rl.tasks.data import encode_prompt
    from rl.tasks.prompt_format import PromptFormat
    from rl.tasks import Sample

    if sample is None:
        cut = prompt.find("\n") + 1 or len(prompt)
        sample = Sample(uid="prompt", task="", prompt=prompt, answer="", solution="",
                        segments={"system": [(0, cut)], "evidence": [(cut, len(prompt))]})
    offset = prompt.index(sample.prompt)
    enc = encode_prompt(tok, sample, PromptFormat(prompt[:offset], prompt[offset + len(sample.prompt):]))
    return enc.classes


def avar_views(stats: dict, resp, tok, prompt_ids, responses, tc, evidence: str = "evidence",
               system: str = "instruction") -> list[dict]:
    """Per response: every token's evidence/system attention ratio (head- and layer-averaged,
    as VARS reads it), system/evidence marks, and VAS (response, user query) overall and per
    layer."""
    import torch

    from rl.methods.avar.scores import (EVIDENCE, SYSTEM, key_classes, r_visual, user_query_mask, vas,
                                vas_pooled, visual_ratio)
    from rl.tasks.data import pad_rows

    mass = {layer: st["mass"] for layer, st in stats.items()}
    am = pad_rows([[1] * (len(prompt_ids) + len(r)) for r in responses], 0, torch.bool)
    kc = key_classes(tc, evidence, system, am)
    query = user_query_mask(tc, am, resp, kc)
    ratio = visual_ratio(mass)
    vas_r, per_layer_r = vas(mass, resp)
    vas_q, per_layer_q = vas(mass, query)
    pooled = vas_pooled(mass, resp)
    r_vis = r_visual(mass, resp, torch.ones(len(responses)))
    views = []
    for i, r in enumerate(responses):
        ids = list(prompt_ids) + list(r)
        n = len(ids)
        table = {"VAS, response tokens": f"{float(vas_r[i]):.3f}",
                 "VAS, user-query tokens": f"{float(vas_q[i]):.3f}",
                 "VAS pooled (Σ evidence / Σ system), response": f"{float(pooled.ratio[i]):.3f}",
                 "evidence share (Σ e / (Σ e + Σ s)), response": f"{float(pooled.share[i]):.3f}",
                 "r_visual (VARS, if correct)": f"{float(r_vis[i]):.3f}"}
        for j, layer in enumerate(sorted(mass)):
            table[f"layer {layer}: VAS response / query; evidence share"] = \
                (f"{float(per_layer_r[j, i]):.3f} / {float(per_layer_q[j, i]):.3f}; "
                 f"{float(pooled.share_by_layer[j, i]):.3f}")
        views.append({"tokens": [tok.decode([t]) for t in ids],
                      "values": {"evidence/system": [_short(x) for x in ratio[i, :n].tolist()]},
                      "marks": {"system": (kc[i, :n] == SYSTEM).tolist(),
                                "evidence": (kc[i, :n] == EVIDENCE).tolist(),
                                "response": resp[i, :n].tolist()},
                      "table": table})
    return views


def run_teacher(hf: Path) -> str:
    """The teacher of the trainer run whose output dir holds this checkpoint (its saved
    config.yaml names it; a tiny teacher is found in that run's cache)."""
    from omegaconf import OmegaConf

    from rl.methods.leaf.teacher import teacher_path

    for parent in Path(hf).resolve().parents:
        if (parent / "config.yaml").is_file() and (parent / "checkpoints").is_dir():
            cfg = OmegaConf.load(parent / "config.yaml")
            if cfg.get("teacher", {}).get("name", "none") == "none":
                break
            return teacher_path(cfg, Path(cfg.cache_dir), progress=False)
    raise SystemExit(f"launch.inspect: --teacher run: {hf} is not in the output dir of a run "
                     "with a teacher; pass the teacher's HF folder")


def distractor_flags(tok, sample, prompt: str) -> list[bool]:
    """Per prompt token: inside one of the sample's labelled distractor spans."""
    offset = prompt.index(sample.prompt)
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    return [any(s <= a - offset < e for s, e in sample.distractors) for a, _ in enc["offset_mapping"]]


def leaf_views(student: Path, teacher: str, tok, prompt_ids, responses, quantile: float, labels):
    """Per response: the prompt tokens with ĝ_T, ĝ_S, Δ and marks (confounder, distractor),
    computed as LeaF's detection does with that response as the continuation."""
    from rl.engine.frozen import FrozenModel
    from rl.methods.leaf.confounders import minmax_normalise
    from rl.methods.leaf.detect import detect
    from rl.methods.leaf.examples import Example
    from rl.methods.leaf.teacher import student_vocab_size

    vocab = student_vocab_size(str(student), teacher)
    examples = [Example(None, list(prompt_ids), [0] * len(prompt_ids), [True] * len(prompt_ids), r)
                for r in responses]
    det = detect(examples, FrozenModel(teacher, vocab_size=vocab), FrozenModel(str(student)), tok,
                 quantile, 0.5)
    n = len(prompt_ids)
    views = []
    for i in range(len(responses)):
        g_t = minmax_normalise(det.g_teacher, det.region)[i, :n]
        g_s = minmax_normalise(det.g_student, det.region)[i, :n]
        marks = {"confounder": det.confounders[i, :n].tolist()}
        if labels is not None:
            marks["distractor (label)"] = labels
        views.append({"tokens": [tok.decode([t]) for t in prompt_ids],
                      "values": {"ĝ_T": [_short(x) for x in g_t.tolist()],
                                 "ĝ_S": [_short(x) for x in g_s.tolist()],
                                 "Δ": [_short(x) for x in det.delta[i, :n].tolist()]},
                      "marks": marks, "teacher": teacher, "quantile": quantile})
    return views


def run_params(hf: Path, strategy: str) -> dict:
    """The credit parameters of the run that wrote this checkpoint (its Hydra config, when
    the checkpoint sits in a trainer output dir), those `strategy` reads, else the defaults —
    so the page shows the credit that run applied."""
    import dataclasses

    from omegaconf import OmegaConf

    from rl.methods.credit import METHODS

    cls = METHODS[strategy]
    defaults = {f.name: getattr(cls.Params(), f.name) for f in dataclasses.fields(cls.Params)}
    params = {k: v for k, v in defaults.items() if k in cls.keys(strategy)}
    for parent in Path(hf).resolve().parents:
        cfg_file = parent / "hydra" / ".hydra" / "config.yaml"
        if cfg_file.is_file():
            run = OmegaConf.to_container(OmegaConf.load(cfg_file).get("credit", {}).get("params", {}))
            params.update({k: v for k, v in (run or {}).items() if k in params})
            break
    return params


def head_group_rows(stats: dict, trace, dist, n_responses: int) -> dict[str, str]:
    """The local / global heads with their mean look-back distance, for the page."""
    names = head_names(stats)
    return {
        "local heads (WAAD)": ", ".join(f"{names[h]} (d={dist[h]:.2f})" for h in trace.local_heads),
        "global heads (FAI)": ", ".join(f"{names[h]} (d={dist[h]:.2f})" for h in trace.global_heads),
        "all heads, mean look-back distance": ", ".join(f"{n}={d:.2f}" for n, d in zip(names, dist.tolist())),
        "chosen over": f"the {n_responses} response(s) of this run, as over a training batch: "
                       f"other samples give other groups, hence other WAAD / FAI",
    }


def write_sample(out: Path, i: int, tok, r_ids: list[int], resp_row, gamma_row, sets, ctx: dict,
                 leaf: dict | None = None, avar: dict | None = None) -> list[Path]:
    """sample_<i>.html (prompt, response, WAAD / FAI / γ views, head groups, parameters; with
    a teacher, LeaF's view of the prompt; with --vas, AVAR's view of the whole sequence) and
    sample_<i>.png (+ sample_<i>_leaf.png, sample_<i>_avar.png)."""
    from rl.methods.credit.render import credit_html, credit_page, credit_png, table_html, text_html

    pos = resp_row.nonzero(as_tuple=True)[0]
    tokens = [tok.decode([t], skip_special_tokens=False) for t in r_ids]
    values = {"WAAD": [_short(x) for x in sets.waad[i, pos].tolist()],
              "FAI": [_short(x) for x in sets.fai[i, pos].tolist()],
              "γ": [_short(x) for x in gamma_row[pos].tolist()]}
    marks = {name: getattr(sets, name)[i, pos].tolist() for name in ("preplan", "anchor", "intro", "dominated")}
    title = f"sample {i} · {ctx['strategy']} · {ctx['checkpoint']}"
    sections = [text_html("prompt", ctx["prompt"]),
                text_html("response", tok.decode(r_ids, skip_special_tokens=False))]
    if ctx["answer"] is not None:
        sections.append(text_html("reference answer", ctx["answer"]))
    sections += [credit_html(tokens, values, title=f"credit ({ctx['strategy']})", marks=marks),
                 table_html("head groups", ctx["groups"]), table_html("parameters", ctx["params"])]
    written = []
    if leaf is not None:
        leaf_title = f"LeaF on the prompt (teacher {leaf['teacher']}, q = {leaf['quantile']})"
        sections.append(credit_html(leaf["tokens"], leaf["values"], title=leaf_title, marks=leaf["marks"]))
        leaf_png = out / f"sample_{i}_leaf.png"
        credit_png(leaf["tokens"], leaf["values"], leaf_png, title=leaf_title, marks=leaf["marks"])
        written.append(leaf_png)
    if avar is not None:
        avar_title = "AVAR: attention to the evidence / to the system prompt (head and layer mean)"
        sections += [credit_html(avar["tokens"], avar["values"], title=avar_title, marks=avar["marks"]),
                     table_html("AVAR: VAS", avar["table"])]
        avar_png = out / f"sample_{i}_avar.png"
        credit_png(avar["tokens"], avar["values"], avar_png, title=avar_title, marks=avar["marks"])
        written.append(avar_png)
    html_path, png_path = out / f"sample_{i}.html", out / f"sample_{i}.png"
    html_path.write_text(credit_page(sections, title), encoding="utf-8")
    credit_png(tokens, values, png_path, title=title, marks=marks)
    return [html_path, png_path, *written]


if __name__ == "__main__":
    main()
