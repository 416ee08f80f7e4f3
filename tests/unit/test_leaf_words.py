"""LeaF scored per word (leaf.unit=word, issue 26): word boundaries, the per-word threshold and
whole-word pruning, on hand-worked rows with the values written out, against a plain-Python
re-statement of the rule, and on the BPE model's tokenizer (a word there is several subword
pieces). Random data comes from a local torch.Generator only.
"""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from rl.methods.leaf.confounders import (candidate_mask, glue_whitespace, mask_spans, prune,
                                         word_confounder_mask, word_ids)
from rl.methods.leaf.detect import confounders_by_unit

PROMPT = "Add.\nx=347 347+285 (note 9)\n"   # the arith task's distractor layout, one char per token


def _char_row(text: str):
    texts = list(text)
    cand = candidate_mask([texts], torch.ones(1, len(texts), dtype=torch.bool))
    return texts, cand


def _words_as_text(texts, ids_row) -> list[str]:
    out: dict[int, str] = {}
    for t, w in zip(texts, ids_row.tolist()):
        if w >= 0:
            out[w] = out.get(w, "") + t
    return [out[w] for w in sorted(out)]


def test_word_ids_on_characters_are_the_regex_words():
    texts, cand = _char_row(PROMPT)
    ids = word_ids([texts], cand)
    assert _words_as_text(texts, ids[0]) == ["Add", ".", "x", "=", "347", "347", "+", "285",
                                             "(", "note", "9", ")"]
    assert _words_as_text(texts, ids[0]) == re.findall(r"\w+|[^\w\s]", PROMPT)
    # whitespace and newlines belong to no word
    assert [w for t, w in zip(texts, ids[0].tolist()) if not t.strip()] == [-1] * 5


def test_word_ids_join_bpe_pieces_and_split_at_leading_spaces():
    # decoded BPE pieces: a leading space starts a word, a piece without one continues it,
    # punctuation is a word of its own; a non-candidate (template) breaks the run
    texts = [[" dist", "ractor", " 34", "7", ")", "x", "<|im_end|>", "y"]]
    cand = torch.tensor([[True] * 6 + [False, True]])
    assert word_ids(texts, cand).tolist() == [[0, 0, 1, 1, 2, 3, -1, 4]]


def test_word_threshold_hand_worked_mean_and_min():
    texts, cand = _char_row(PROMPT)
    ids = word_ids([texts], cand)
    # Δ per character; the words' means are written beside them
    delta = torch.zeros(1, len(texts))
    per_word = {"Add": [0.9, 0.8, 0.7], ".": [0.6], "x": [0.05], "=": [0.3],
                "347a": [0.1, 0.2, 0.3],       # mean 0.2, min 0.1 (the distractor's number)
                "347b": [0.9, 0.0, 0.9],       # mean 0.6, min 0.0 (the sum's first operand)
                "+": [0.5], "285": [0.7, 0.8, 0.9], "(": [0.4], "note": [0.35] * 4,
                "9": [0.45], ")": [0.55]}
    values = [v for vs in per_word.values() for v in vs]
    delta[0, cand[0]] = torch.tensor(values)
    # 12 words, q = 0.25 → index ⌊12·0.25⌋ = 3 of the sorted word means
    # means: x .05, 347a .2, = .3, note .35, ( .4, 9 .45, + .5, ) .55, . .6, 347b .6, 285 .8, Add .8
    mean_mask = word_confounder_mask(delta, ids, 0.25)
    assert _words_as_text(texts, torch.where(mean_mask[0], ids[0], -1)) == ["x", "=", "347", "note"]
    # min: x .05, 347b 0.0, 347a .1, = .3, note .35 … → τ = .3: 347b (the sum's own number!) too
    min_mask = word_confounder_mask(delta, ids, 0.25, reduce="min")
    assert _words_as_text(texts, torch.where(min_mask[0], ids[0], -1)) == ["x", "=", "347", "347"]
    # the cap binds: τ = min(.35, .25) drops "=" and "note"
    capped = word_confounder_mask(delta, ids, 0.25, cap=0.25)
    assert _words_as_text(texts, torch.where(capped[0], ids[0], -1)) == ["x", "347"]
    # pruned whole, with the space beside each span, as the collective counterfactual
    spans = glue_whitespace(mask_spans(mean_mask[0]), texts)
    assert "".join(prune(texts, spans, "collective")[0][0]) == "Add.\n347+285 (9)\n"


def test_token_unit_on_the_same_row_leaves_fragments():
    """The paper's per-token rule on the same Δ: ⌊n·q⌋ of the region reaches characters, not
    numbers, which is why the word unit exists (a fragment of "347" stays)."""
    texts, cand = _char_row(PROMPT)
    region = torch.ones_like(cand)
    delta = torch.zeros(1, len(texts))
    delta[0, cand[0]] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.05, 0.3, 0.1, 0.2, 0.3, 0.9, 0.0, 0.9,
                                      0.5, 0.7, 0.8, 0.9, 0.4, .35, .35, .35, .35, .45, .55])
    delta[0, ~cand[0]] = 0.5
    tok = confounders_by_unit(delta, region, cand, [texts], 0.1, 0.5, "token")
    # 28 region positions, index ⌊2.8⌋ = 2 → τ = 0.1: "x", the "3" of x=347, the "4" of 347+285
    assert [texts[j] + str(j) for j in tok[0].nonzero().flatten().tolist()] == ["x5", "37", "412"]
    word = confounders_by_unit(delta, region, cand, [texts], 0.1, 0.5, "word")
    assert torch.equal(word, word_confounder_mask(delta, word_ids([texts], cand), 0.1))
    with pytest.raises(ValueError, match="leaf.unit"):
        confounders_by_unit(delta, region, cand, [texts], 0.1, 0.5, "sentence")


def test_degenerate_rows_mark_nothing():
    texts, cand = _char_row("ab cd")
    ids = word_ids([texts, texts], torch.cat([cand, torch.zeros_like(cand)]))
    delta = torch.tensor([[0.3, 0.3, 0.0, 0.3, 0.3], [0.1, 0.2, 0.0, 0.3, 0.4]])
    # row 0: both words' means equal (nothing to rank); row 1: no candidate, so no word
    assert not word_confounder_mask(delta, ids, 0.5).any()
    assert not word_confounder_mask(delta[:, :0], ids[:, :0], 0.5).any()
    with pytest.raises(ValueError, match="reduce"):
        word_confounder_mask(delta, ids, 0.5, reduce="max")
    with pytest.raises(ValueError, match="shape"):
        word_confounder_mask(delta, ids[:, :3], 0.5)


@pytest.mark.parametrize("reduce", ["mean", "min"])
@pytest.mark.parametrize("q", [0.05, 0.1, 0.3])
def test_word_mask_matches_a_plain_python_statement_of_the_rule(q, reduce):
    gen = torch.Generator().manual_seed(7)
    rows, width = 12, 30
    alphabet = list("ab1 2+(") + [" x", "yz"]
    texts = [[alphabet[int(i)] for i in torch.randint(len(alphabet), (width,), generator=gen)]
             for _ in range(rows)]
    cand = candidate_mask(texts, torch.rand(rows, width, generator=gen) < 0.9)
    delta = torch.rand(rows, width, generator=gen) ** 2
    ids = word_ids(texts, cand)
    out = word_confounder_mask(delta, ids, q, reduce=reduce)
    for i in range(rows):
        words: dict[int, list[float]] = {}
        for j in range(width):
            if ids[i, j] >= 0:
                words.setdefault(int(ids[i, j]), []).append(float(delta[i, j]))
        score = {w: (sum(v) / len(v) if reduce == "mean" else min(v)) for w, v in words.items()}
        vals = sorted(score.values())
        ranked = len(vals) > 0 and vals[0] < vals[-1]
        tau = min(vals[int(len(vals) * q)], 0.5) if vals else 0.0
        expected = [ranked and int(ids[i, j]) >= 0 and score[int(ids[i, j])] <= tau + 1e-7
                    for j in range(width)]
        assert out[i].tolist() == expected


def test_word_detection_on_the_bpe_model_prunes_whole_words(bpe_small_dir, tmp_path):
    """Detection with a BPE tokenizer (subword pieces, ChatML template): teacher and student are
    two random-weight small Qwen3s of the same tokenizer; every confounder is a whole regex word
    of the prompt's own text, and the word rule holds against a plain re-statement."""
    from rl.engine.frozen import FrozenModel
    from rl.loop.cold_start import load_tokenizer
    from rl.methods.leaf.detect import detect
    from rl.methods.leaf.examples import instruction_example
    from rl.models.bpe_model import SMALL_SHAPE, build_bpe_model, task_corpus
    from rl.tasks import get_task
    from rl.tasks.prompt_format import PromptFormat

    teacher = build_bpe_model(tmp_path / "teacher", replace(SMALL_SHAPE, seed=SMALL_SHAPE.seed + 1),
                              task_corpus(per_task=300))
    tok = load_tokenizer(bpe_small_dir)
    task = get_task("arith", seed=3, distractor_prob=1.0)
    examples = [instruction_example(tok, task.sample("train", i), PromptFormat(chat_template=True))
                for i in range(6)]
    det = detect(examples, FrozenModel(str(teacher)), FrozenModel(bpe_small_dir), tok, 0.3, 0.5,
                 unit="word")
    ids = word_ids(det.texts, det.candidates)
    assert det.confounders.any()
    pieces = [int((ids[i] == w).sum()) for i in range(len(examples)) for w in set(ids[i].tolist()) - {-1}]
    assert max(pieces) > 1        # some word is several BPE tokens, joined
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        words = [w.strip() for w in _words_as_text(det.texts[i], ids[i, :n])]
        region_text = "".join(t for t, r in zip(det.texts[i], ex.region) if r)
        # the words tile the prompt's own text (whitespace aside); each is a letter/digit run or
        # punctuation (a BPE piece like "+(" is one word: the tokenizer's boundary)
        assert "".join(words) == re.sub(r"\s", "", region_text)
        assert all(re.fullmatch(r"\w+|[^\w\s]+", w) for w in words)
        for w in set(ids[i, :n].tolist()) - {-1}:
            marks = det.confounders[i, :n][ids[i, :n] == w]
            assert bool(marks.all()) or not bool(marks.any())   # whole words only
    assert torch.equal(det.confounders, word_confounder_mask(det.delta, ids, 0.3))


@pytest.mark.parametrize("steps,available,cap", [(150, 3, 32), (150, 888, 32), (4, 10, 2), (5, 0, 8)])
def test_counterfactual_schedule_uses_each_once_spread_and_capped(steps, available, cap):
    """The distillation's data mixing (rl/methods/leaf/warm_start.py): over the run each
    counterfactual appears at most once, in order, never more than `cap` in a step, and as many
    as the steps can hold are used."""
    from rl.methods.leaf.warm_start import counterfactual_schedule

    per_step = [list(counterfactual_schedule(s, steps, available, cap)) for s in range(steps)]
    flat = [i for step in per_step for i in step]
    assert flat == list(range(min(available, steps * cap)))
    assert max(len(s) for s in per_step) <= cap
    if available:   # spread evenly: step sizes differ by at most one
        sizes = [len(s) for s in per_step]
        assert max(sizes) - min(sizes) <= 1


def test_counterfactual_schedule_hand_worked():
    from rl.methods.leaf.warm_start import counterfactual_schedule

    # 3 survivors over 150 steps: rows at steps 0, 50, 100 (not 32 per batch, cycled)
    used = {s: list(counterfactual_schedule(s, 150, 3, 32)) for s in range(150)}
    assert {s: v for s, v in used.items() if v} == {0: [0], 50: [1], 100: [2]}
    # 10 over 4 steps, cap 2: the cap binds; 8 used
    assert [list(counterfactual_schedule(s, 4, 10, 2)) for s in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_distillation_batches_keep_their_size_and_read_each_original_once():
    """batch_rows over a whole run with 3 counterfactuals: every batch has batch_size rows; the
    originals are the train stream's positions 0, 1, 2, … with none repeated or skipped; the
    counterfactuals appear once each, at steps 0, 2 and 4 of 6."""
    from omegaconf import OmegaConf

    from rl.methods.leaf.examples import instruction_example
    from rl.methods.leaf.warm_start import batch_rows
    from rl.models.tiny_model import build_char_tokenizer
    from rl.tasks import get_task

    tok = build_char_tokenizer()
    task = get_task("arith", seed=5)
    cfg = OmegaConf.create({"seed": 0, "distill": {"steps": 6, "batch_size": 4, "mix": 0.5},
                            "model": {"prompt_prefix": "", "response_prefix": "",
                                      "chat_template_kwargs": {}, "path": None}})
    pruned = [instruction_example(tok, task.sample("test", i)) for i in range(3)]
    batches = [batch_rows(task, tok, cfg, s, pruned) for s in range(6)]
    assert [len(b) for b in batches] == [4] * 6
    cf_at = [[pruned.index(r) for r in b if r in pruned] for b in batches]
    assert cf_at == [[0], [], [1], [], [2], []]
    originals = [r.sample.uid for b in batches for r in b if r not in pruned]
    assert originals == [task.sample("train", i).uid for i in range(6 * 4 - 3)]
