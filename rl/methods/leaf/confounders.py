"""Confounder detection for LeaF (papers.md §2.1–§2.2), as pure functions on tensors and lists.

Every tensor is [B, T]: one row per sample, right-padded; a boolean mask says which positions
of a row take part. Nothing here runs a model. The caller supplies the per-token input-gradient
norms g of the teacher and of the student (‖∂L/∂e_i‖₂ over the instruction tokens) and the
decoded text of each token.

The pipeline:
  ĝ = minmax_normalise(g)                  per model, per sample (the two models' gradient
                                           scales differ by orders of magnitude)
  Δ = minmax_normalise(ĝ_T − ĝ_S)          low Δ: the student is sensitive, the teacher is not
  candidates = candidate_mask(texts, region)      whitespace/newline tokens are never masked
  confounders = confounder_mask(Δ, candidates, q) Δ ≤ min(q-th order statistic, cap)
  spans = mask_spans(confounders[i]); prune(ids, spans, "span")   counterfactual samples

With leaf.unit=word the threshold and the prune act on words instead of tokens (issue 26):
  words = word_ids(texts, candidates)       letter/digit runs, single punctuation tokens
  confounders = word_confounder_mask(Δ, words, q)   mean Δ per word, ⌊n·q⌋ over words

The quantile and the cap follow the authors' released pruning scripts (RUCBM/LeaF,
`remove_confounding_tokens_{math,code}.py`): the threshold is the sorted value at index
⌊n·q⌋ (no interpolation), then capped at 0.5. Where those scripts would mask everything in a
degenerate row (all Δ equal), we mask nothing instead: see `confounder_mask`.

The last three functions measure detection quality for the paper's masking ablation
(gradient mask vs student-gradient-only, perplexity, and random masks of the same size).
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "minmax_normalise", "sensitivity_difference", "confounder_mask", "candidate_mask",
    "word_ids", "word_sums", "word_confounder_mask", "mask_spans", "glue_whitespace", "prune", "precision_recall_f1", "top_k_mask", "random_mask",
]

Item = TypeVar("Item")
Span = tuple[int, int]
PRUNE_MODES = ("span", "collective")


def _float(x: Tensor) -> Tensor:
    """At least float32: fp16/bf16 gradient norms lose the small differences Δ ranks on."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(x.shape)}")


def minmax_normalise(x: Tensor, mask: Tensor) -> Tensor:
    """Per row, (x − min)/(max − min) over the positions where `mask` is True; 0 elsewhere.

    Why: the teacher's and the student's gradient norms live on unrelated scales (a 70B and a
    1B model), and only the ranking *within* one sample is meaningful, so each sample is mapped
    onto [0, 1] before the two are compared. Padding and out-of-region positions must neither
    set the min/max nor receive a value, hence the mask.

    A row whose masked values are all equal, or that has no masked position, comes back all 0:
    nothing in it can be ranked, and 0 keeps it harmless downstream (`confounder_mask` treats a
    constant row as "no confounders").
    """
    _check_2d("x", x)
    mask = mask.bool()
    x = _float(x)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lo = torch.where(mask, x, inf).amin(-1, keepdim=True)
    hi = torch.where(mask, x, -inf).amax(-1, keepdim=True)
    span = hi - lo
    rankable = mask.any(-1, keepdim=True) & (span > 0)
    scaled = (x - torch.where(rankable, lo, 0)) / torch.where(rankable, span, 1)
    return torch.where(mask & rankable, scaled, torch.zeros_like(scaled))


def sensitivity_difference(g_teacher: Tensor, g_student: Tensor, mask: Tensor) -> Tensor:
    """Δ = minmax_normalise(ĝ_T − ĝ_S) over `mask`, with ĝ = minmax_normalise(g) (§2.1).

    Why: a token the student leans on (high ĝ_S) but the teacher ignores (low ĝ_T) gets a low Δ;
    such tokens are the confounders. The outer normalisation puts every sample's Δ on [0, 1]
    so one quantile rule (and the absolute 0.5 cap) means the same thing across samples.
    Rows where ĝ_T − ĝ_S is constant (e.g. both g constant) give Δ = 0 everywhere, which
    `confounder_mask` reads as "nothing to rank".
    """
    if g_teacher.shape != g_student.shape:
        raise ValueError(f"g_teacher {tuple(g_teacher.shape)} and g_student "
                         f"{tuple(g_student.shape)} must have the same shape")
    diff = minmax_normalise(g_teacher, mask) - minmax_normalise(g_student, mask)
    return minmax_normalise(diff, mask)


def _order_statistic_index(n: Tensor, quantile: float) -> Tensor:
    """⌊n·q⌋ in float64, clamped to n − 1: the authors' `sorted(v)[int(len(v) * q)]`.

    float64 so the product rounds exactly as Python's float does (e.g. 20·0.05 → index 1).
    """
    idx = torch.floor(n.to(torch.float64) * quantile).long()
    return torch.minimum(idx, (n - 1).clamp(min=0))


def confounder_mask(delta: Tensor, candidates: Tensor, quantile: float, cap: float = 0.5, *,
                    quantile_over: Tensor | None = None) -> Tensor:
    """Per row: candidates & (Δ ≤ τ), τ = min(v_(⌊n·q⌋), cap) (§2.1).

    v_(k) is the k-th smallest (0-based) Δ over the row's `quantile_over` positions (default:
    the candidates themselves), n their count. This is the authors' rule: they sort the
    sample's Δ values and take the one at index int(n · q), no interpolation; it is neither
    numpy's default (linear) percentile nor any torch.quantile interpolation mode (⌊n·q⌋ is
    not ⌊(n−1)·q⌋: for n = 10, q = 0.1 it keeps the two smallest, where linear interpolation
    keeps one). With q = 0.05 any instruction shorter than 20 tokens masks only its minimum.
    Ties with τ are all masked.

    Why the cap: Δ is normalised to [0, 1], so τ > 0.5 means more than (1 − q) of the tokens
    sit in the upper half; the quantile then reaches tokens the teacher does rely on, and the
    cap stops the prune from cutting them.

    `quantile_over`: the authors take the quantile over every token of the instruction span,
    whitespace included, and only afterwards refuse to mask whitespace. Pass the region mask
    here to reproduce that exactly; the default (the candidates) keeps whitespace Δ out of the
    threshold.

    Degenerate rows return all False (documented no-op): no candidate, an empty
    `quantile_over`, or all its Δ equal (e.g. constant g gives Δ ≡ 0). The authors' script
    would mask the whole instruction in that case (every value is ≤ its own quantile); a row
    with no ranking carries no evidence of a confounder, so we prune nothing.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if not 0.0 < cap <= 1.0:
        raise ValueError(f"cap must be in (0, 1], got {cap}")
    _check_2d("delta", delta)
    candidates = candidates.bool()
    pool = candidates if quantile_over is None else quantile_over.bool()
    delta = _float(delta)
    inf = torch.tensor(float("inf"), dtype=delta.dtype, device=delta.device)
    n = pool.sum(-1)
    ordered = torch.where(pool, delta, inf).sort(-1).values
    value = ordered.gather(-1, _order_statistic_index(n, quantile)[:, None])
    tau = value.clamp(max=cap)
    lo = torch.where(pool, delta, inf).amin(-1, keepdim=True)
    hi = torch.where(pool, delta, -inf).amax(-1, keepdim=True)
    rankable = (n[:, None] > 0) & (hi > lo)
    return candidates & (delta <= tau) & rankable


def candidate_mask(token_texts: Sequence[Sequence[str]], region: Tensor, *,
                   never_mask: Collection[str] = ()) -> Tensor:
    """Positions inside `region` whose decoded text is not whitespace-only.

    Why: deleting a space or newline token changes no content the student could be distracted
    by, but it glues words together or breaks the layout of the pruned prompt, so §2.1 never
    masks them. `region` is the instruction span with the chat-template tokens already removed
    by the caller (template trimming is tokenizer-specific). token_texts[i] holds one string
    per position of row i and may be shorter than T: later positions are not candidates.

    `never_mask`: exact texts excluded as well. The authors' scripts also never mask a token
    whose text is exactly a single backslash (LaTeX); pass never_mask=("\\\\",) to follow them.
    """
    _check_2d("region", region)
    batch, length = region.shape
    if len(token_texts) != batch:
        raise ValueError(f"token_texts has {len(token_texts)} rows, region has {batch}")
    keep = torch.zeros(batch, length, dtype=torch.bool)
    for i, texts in enumerate(token_texts):
        if len(texts) > length:
            raise ValueError(f"token_texts[{i}] has {len(texts)} entries, region has T={length}")
        for j, text in enumerate(texts):
            keep[i, j] = bool(text.strip()) and text not in never_mask
    return keep.to(region.device) & region.bool()


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def word_ids(token_texts: Sequence[Sequence[str]], candidates: Tensor) -> Tensor:
    """[B, T] long: the index of the word each candidate position belongs to (0, 1, … per row,
    in order), −1 elsewhere. A word is what the regex `\\w+|[^\\w\\s]` finds in text: a run of
    letters, digits and underscores, or one punctuation token.

    How tokens join: a candidate continues the word of the candidate just before it when that
    token's text ends in a word character and its own text starts with one — so the digits of a
    character-level "347" form one word, and so do BPE pieces like " dist" + "ractor"; a token
    whose text starts with a space (a BPE word start), follows a space, or is punctuation starts
    a new word. Non-candidates (whitespace, template, padding) belong to no word and break runs.
    """
    _check_2d("candidates", candidates)
    batch, length = candidates.shape
    if len(token_texts) != batch:
        raise ValueError(f"token_texts has {len(token_texts)} rows, candidates has {batch}")
    cand = candidates.bool().cpu()
    out = torch.full((batch, length), -1, dtype=torch.long)
    for i, texts in enumerate(token_texts):
        word, prev_open = -1, False   # prev_open: the previous candidate ends inside a word
        for j in range(min(len(texts), length)):
            text = texts[j]
            if not cand[i, j] or not text:
                prev_open = False
                continue
            if not (prev_open and _is_word_char(text[0])):
                word += 1
            out[i, j] = word
            prev_open = _is_word_char(text[-1])
    return out.to(candidates.device)


def word_sums(words: Tensor, values: Tensor) -> Tensor:
    """[B, W]: per row, the sum of `values` over each word's tokens (W = the most words in a
    row; a row's later columns are 0). `words` as `word_ids` gives it."""
    n_words = int(words.max()) + 1 if bool((words >= 0).any()) else 0
    inside = words >= 0
    out = torch.zeros(words.shape[0], n_words, dtype=values.dtype, device=values.device)
    return out.scatter_add(1, words.clamp(min=0), torch.where(inside, values, 0))


WORD_REDUCE = ("mean", "min")


def word_confounder_mask(delta: Tensor, words: Tensor, quantile: float, cap: float = 0.5,
                         reduce: str = "mean") -> Tensor:
    """LeaF's rule with words as the unit: each word's Δ is the mean over its tokens, the
    threshold τ = min(v_(⌊n·q⌋), cap) is taken over the row's n words, and every token of a
    word with Δ_word ≤ τ is a confounder. [B, T] bool, like `confounder_mask`.

    Why words: the paper's tokenizers make a number one token, so a pruned token removes a
    whole number; with characters (or digit-split BPE) ⌊n·q⌋ reaches only a few characters and
    leaves fragments of every distractor. Why the mean: a word's tokens share one meaning, and
    the mean is the typical token's sensitivity — the minimum (`reduce="min"`, kept for the
    benchmark's comparison) flags a whole word for one low character and, over a noisy Δ,
    favours long words, which have more chances of holding a low one.
    Degenerate rows (no word, all words' Δ equal) return all False, as `confounder_mask`.
    """
    if reduce not in WORD_REDUCE:
        raise ValueError(f"reduce must be one of {WORD_REDUCE}, got {reduce!r}")
    _check_2d("delta", delta)
    if words.shape != delta.shape:
        raise ValueError(f"words {tuple(words.shape)} and delta {tuple(delta.shape)} differ in shape")
    delta = _float(delta)
    inside, index = words >= 0, words.clamp(min=0)
    count = word_sums(words, inside.to(delta.dtype))
    if count.shape[1] == 0:
        return torch.zeros_like(inside)
    valid = count > 0
    if reduce == "mean":
        per_word = word_sums(words, delta) / count.clamp(min=1)
    else:
        lowest = torch.full_like(count, torch.inf).scatter_reduce(
            1, index, torch.where(inside, delta, torch.inf), "amin")
        per_word = torch.where(valid, lowest, 0)
    chosen = confounder_mask(per_word, valid, quantile, cap)
    return inside & chosen.gather(1, index)


def mask_spans(mask_row: Tensor) -> list[Span]:
    """Maximal runs of consecutive True positions, as [start, end) pairs in order.

    Why: LeaF prunes contiguous pieces of text (§2.2); one span is one counterfactual, so a
    phrase the student fixates on is removed whole rather than word by word.
    """
    if mask_row.dim() != 1:
        raise ValueError(f"mask_row must be 1-D, got shape {tuple(mask_row.shape)}")
    m = mask_row.bool().to(torch.int8)
    edges = torch.diff(torch.nn.functional.pad(m, (1, 1)))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def glue_whitespace(spans: Sequence[Span], texts: Sequence[str]) -> list[Span]:
    """Each span widened by the horizontal whitespace (spaces, tabs) beside it — the run just
    before it, or, when there is none, the run just after — then overlapping or touching
    spans merged.

    Why: the authors rebuild a pruned instruction token by token with each token's leading
    whitespace glued to it, so deleting a word deletes the space before it. With a tokenizer
    whose spaces are tokens of their own (the character model here), deleting only the span
    would leave a doubled or stray space: text no prompt ever had, which a small model reads
    as a distraction of its own. Newlines are layout and stay.
    """
    def blank(j: int) -> bool:
        return 0 <= j < len(texts) and texts[j] != "" and texts[j].strip(" \t") == ""

    widened = []
    for start, end in spans:
        s, e = start, end
        while blank(s - 1):
            s -= 1
        if s == start:
            while blank(e):
                e += 1
        widened.append((s, e))
    merged: list[Span] = []
    for s, e in sorted(widened):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _check_spans(spans: Sequence[Span], length: int) -> None:
    prev_end = 0
    for start, end in spans:
        if not prev_end <= start < end <= length:
            raise ValueError(f"spans must be sorted, non-empty, non-overlapping and within "
                             f"[0, {length}); got {list(spans)}")
        prev_end = end


def prune(seq: Sequence[Item], spans: Sequence[Span], mode: str) -> list[tuple[list[Item], list[Span]]]:
    """Counterfactual copies of `seq` with confounder spans deleted: (pruned_seq, removed_spans).

    mode "span": one copy per span, only that span deleted (what LeaF trains on, §2.2: a
    sample with k spans yields k counterfactuals, each otherwise intact).
    mode "collective": one copy with every span deleted (the ablation; it breaks sentence
    integrity and did worse).
    `seq` is any per-token list (token ids, token classes, texts) so ids and their side
    information can be pruned in lockstep. No spans → [] (nothing to prune, no
    counterfactual; the caller keeps the original sample).
    """
    if mode not in PRUNE_MODES:
        raise ValueError(f"mode must be one of {PRUNE_MODES}, got {mode!r}")
    spans = [(int(s), int(e)) for s, e in spans]
    _check_spans(spans, len(seq))
    if not spans:
        return []
    if mode == "span":
        return [(list(seq[:s]) + list(seq[e:]), [(s, e)]) for s, e in spans]
    dropped = {i for s, e in spans for i in range(s, e)}
    return [([x for i, x in enumerate(seq) if i not in dropped], spans)]


def precision_recall_f1(pred: Tensor, labels: Tensor, valid: Tensor) -> dict[str, float]:
    """Token-level precision, recall and F1 of `pred` against `labels`, over `valid` positions.

    Micro-averaged: true/false positives and false negatives are pooled over the whole batch
    before dividing, so long instructions weigh more than short ones (a per-row average would
    be dominated by short rows with one or two masked tokens). An undefined ratio (no
    prediction for precision, no label for recall, P + R = 0 for F1) is reported as 0.
    Returns precision, recall, f1 and the counts tp, fp, fn.
    """
    pred, labels, valid = pred.bool(), labels.bool(), valid.bool()
    tp = int((pred & labels & valid).sum())
    fp = int((pred & ~labels & valid).sum())
    fn = int((~pred & labels & valid).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "tp": float(tp), "fp": float(fp), "fn": float(fn)}


def _counts(counts: Tensor | Sequence[int], candidates: Tensor) -> Tensor:
    k = torch.as_tensor(counts, dtype=torch.long, device=candidates.device).flatten()
    if k.numel() != candidates.shape[0]:
        raise ValueError(f"counts has {k.numel()} entries, batch has {candidates.shape[0]}")
    available = candidates.sum(-1)
    if bool((k < 0).any()) or bool((k > available).any()):
        raise ValueError(f"counts must be in [0, #candidates] per row; counts={k.tolist()}, "
                         f"candidates={available.tolist()}")
    return k


def top_k_mask(score: Tensor, candidates: Tensor, counts: Tensor | Sequence[int]) -> Tensor:
    """Per row, the counts[i] candidate positions with the highest score; ties: earliest first.

    Why: the masking ablation compares detectors at equal budget, so each baseline masks as
    many tokens per sample as the gradient-difference mask did. Scores: ĝ_S for the
    student-gradient-only mask, per-token surprisal for the perplexity mask. Deterministic
    tie-breaking keeps the baselines reproducible. Scores at candidate positions must not be
    NaN.
    """
    _check_2d("score", score)
    candidates = candidates.bool()
    k = _counts(counts, candidates)
    score = _float(score)
    if bool(torch.isnan(score[candidates]).any()):
        raise ValueError("score is NaN at a candidate position")
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    cand_in_order = candidates.gather(-1, order)
    rank = cand_in_order.long().cumsum(-1)
    chosen_in_order = cand_in_order & (rank <= k[:, None])
    return torch.zeros_like(candidates).scatter(-1, order, chosen_in_order)


def random_mask(candidates: Tensor, counts: Tensor | Sequence[int],
                generator: torch.Generator) -> Tensor:
    """Per row, counts[i] candidate positions drawn uniformly without replacement.

    The random-mask baseline of the ablation. The top counts[i] of i.i.d. uniform keys is a
    uniform subset; the generator is passed in so a run is reproducible and the global RNG
    (which training code also draws from) is left alone.
    """
    _check_2d("candidates", candidates)
    keys = torch.rand(candidates.shape, generator=generator, device=generator.device)
    return top_k_mask(keys.to(candidates.device), candidates, counts)
