"""LeaF confounder detection (rl/methods/leaf/confounders.py) on hand-worked rows, values written out.

The quantile rule is the authors' (RUCBM/LeaF remove_confounding_tokens_*.py): the threshold is
sorted(Δ)[int(n·q)], capped at 0.5. Random data is drawn from a local torch.Generator only.
"""
from __future__ import annotations

import pytest
import torch

from rl.methods.leaf.confounders import (candidate_mask, confounder_mask, mask_spans, minmax_normalise,
                                 precision_recall_f1, prune, random_mask, sensitivity_difference,
                                 top_k_mask)


def _b(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- minmax_normalise ----------------------------------------------------------------------------

def test_minmax_padded_rows():
    x = _t([[2.0, 4.0, 6.0, 99.0, -99.0],    # padding values must not set min/max
            [3.0, 3.0, 3.0, 0.0, 0.0],       # all equal over the mask → all 0
            [1.0, 2.0, 3.0, 4.0, 5.0],       # no masked position → all 0
            [-1.0, 0.0, 3.0, 0.0, 0.0]])     # negatives: (x + 1) / 4
    m = _b([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    out = minmax_normalise(x, m)
    assert out.tolist() == [[0.0, 0.5, 1.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0, 0.0],
                            [0.0, 0.25, 1.0, 0.0, 0.0]]


def test_minmax_promotes_half_precision():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float16)
    out = minmax_normalise(x, _b([[1, 1, 1]]))
    assert out.dtype == torch.float32 and out.tolist() == [[0.0, 0.5, 1.0]]


# --- sensitivity_difference ----------------------------------------------------------------------

def test_delta_worked_by_hand():
    # g_T = [1, 3, 5, 2, 9]  → ĝ_T = [0, .25, .5, .125, 1]        (min 1, max 9)
    # g_S = [4, 2, 6, 10, 2] → ĝ_S = [.25, 0, .5, 1, 0]           (min 2, max 10)
    # ĝ_T − ĝ_S = [−.25, .25, 0, −.875, 1] → min −.875, range 1.875
    # Δ = [.625, 1.125, .875, 0, 1.875] / 1.875 = [1/3, .6, 7/15, 0, 1]
    g_t = _t([[1.0, 3.0, 5.0, 2.0, 9.0, 0.0]])
    g_s = _t([[4.0, 2.0, 6.0, 10.0, 2.0, 0.0]])
    m = _b([[1, 1, 1, 1, 1, 0]])
    delta = sensitivity_difference(g_t, g_s, m)
    expected = _t([[1 / 3, 0.6, 7 / 15, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(delta, expected)
    # token 3 (student most sensitive, teacher barely) is the confounder candidate
    assert int(delta[0, :5].argmin()) == 3


def test_delta_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        sensitivity_difference(torch.zeros(1, 3), torch.zeros(1, 4), _b([[1, 1, 1]]))


# --- confounder_mask -----------------------------------------------------------------------------

ROW10 = [0.9, 0.0, 0.3, 0.7, 0.1, 1.0, 0.2, 0.5, 0.4, 0.6]
# sorted: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9, 1.0] at positions [1, 4, 6, 2, 8, 7, 9, 3, 0, 5]


def test_quantile_threshold_hand_worked():
    delta, cand = _t([ROW10]), _b([[1] * 10])
    # q = 0.25: index int(10·0.25) = 2 → τ = 0.2 → Δ ≤ 0.2 at positions 1, 4, 6
    assert confounder_mask(delta, cand, 0.25)[0].nonzero().flatten().tolist() == [1, 4, 6]
    # q = 0.1: index int(10·0.1) = 1 → τ = 0.1 → positions 1, 4. Linear interpolation
    # (numpy default / torch.quantile 'linear') would give 0.0 + 0.9·0.1 = 0.09 → only position 1.
    assert confounder_mask(delta, cand, 0.1)[0].nonzero().flatten().tolist() == [1, 4]
    # q = 0.05 with fewer than 20 tokens: index 0 → only the minimum
    assert confounder_mask(delta, cand, 0.05)[0].nonzero().flatten().tolist() == [1]


def test_quantile_twenty_tokens_at_five_percent_keeps_two():
    # int(20 · 0.05) = 1 in float arithmetic (not 0): the two smallest of 0.00, 0.05, …, 0.95
    delta = _t([[i / 20 for i in range(20)][::-1]])
    mask = confounder_mask(delta, _b([[1] * 20]), 0.05)
    assert mask[0].nonzero().flatten().tolist() == [18, 19]


def test_cap_binds_when_quantile_value_above_half():
    delta = _t([[0.0, 0.6, 0.7, 0.8, 0.9, 1.0, 0.55, 0.65, 0.75, 0.85]])
    cand = _b([[1] * 10])
    # q = 0.5: index 5 of [0, .55, .6, .65, .7, .75, .8, .85, .9, 1] → 0.75, capped to 0.5
    assert confounder_mask(delta, cand, 0.5)[0].nonzero().flatten().tolist() == [0]
    # without the cap, Δ ≤ 0.75
    assert confounder_mask(delta, cand, 0.5, cap=1.0)[0].nonzero().flatten().tolist() == [0, 1, 2, 6, 7, 8]


def test_quantile_only_over_candidates_and_ties_masked():
    # padding (position 5) and a non-candidate with the lowest Δ (position 0) are ignored;
    # candidates Δ = [.2, .2, .8, 1] → n = 4, q = .3 → index 1 → τ = .2 → both tied .2 masked
    delta = _t([[0.0, 0.2, 0.2, 0.8, 1.0, 0.0]])
    cand = _b([[0, 1, 1, 1, 1, 0]])
    assert confounder_mask(delta, cand, 0.3).tolist() == [[False, True, True, False, False, False]]


def test_quantile_over_region_reproduces_authors_whitespace_handling():
    # Authors: quantile over the whole span (whitespace included), whitespace never masked after.
    # Region Δ = [.5, 0 (a space), .1, .9, .3]; q = .4 → index 2 of [0, .1, .3, .5, .9] → τ = .3
    delta = _t([[0.5, 0.0, 0.1, 0.9, 0.3]])
    region = _b([[1, 1, 1, 1, 1]])
    cand = candidate_mask([["Let", " ", " x", " be", " odd"]], region)
    assert cand.tolist() == [[True, False, True, True, True]]
    authors = confounder_mask(delta, cand, 0.4, quantile_over=region)
    assert authors.tolist() == [[False, False, True, False, True]]
    # default: quantile over candidates [.5, .1, .9, .3] → index 1 → τ = .3 → same here ...
    assert confounder_mask(delta, cand, 0.4).tolist() == [[False, False, True, False, True]]
    # ... but at q = .3: region index 1 → τ = .1 (only " x"); candidates index 1 → τ = .3
    assert confounder_mask(delta, cand, 0.3, quantile_over=region).tolist() == [[False, False, True, False, False]]
    assert confounder_mask(delta, cand, 0.3).tolist() == [[False, False, True, False, True]]


def test_all_equal_g_gives_no_confounders():
    m = _b([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    g_t = _t([[2.0, 2.0, 2.0, 2.0, 0.0], [1.0, 4.0, 2.0, 8.0, 3.0]])
    g_s = _t([[7.0, 7.0, 7.0, 7.0, 0.0], [1.0, 4.0, 2.0, 8.0, 3.0]])  # row 1: g_T = g_S, not constant
    delta = sensitivity_difference(g_t, g_s, m)
    assert delta.tolist() == [[0.0] * 5, [0.0] * 5]
    assert not confounder_mask(delta, m, 0.05).any()
    assert not confounder_mask(delta, m, 0.5, cap=1.0).any()


def test_no_candidates_gives_no_confounders():
    delta = _t([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]])
    cand = _b([[0, 0, 0], [1, 1, 1]])
    out = confounder_mask(delta, cand, 0.1)
    assert out.tolist() == [[False, False, False], [True, False, False]]
    # an empty quantile_over pool is also a no-op
    assert not confounder_mask(delta, cand, 0.1, quantile_over=torch.zeros_like(cand)).any()


@pytest.mark.parametrize("q", [0.0, 1.0, -0.1, 1.5])
def test_bad_quantile(q):
    with pytest.raises(ValueError, match="quantile"):
        confounder_mask(_t([[0.0, 1.0]]), _b([[1, 1]]), q)


@pytest.mark.parametrize("cap", [0.0, -0.5, 1.01])
def test_bad_cap(cap):
    with pytest.raises(ValueError, match="cap"):
        confounder_mask(_t([[0.0, 1.0]]), _b([[1, 1]]), 0.1, cap=cap)


# --- candidate_mask ------------------------------------------------------------------------------

def test_whitespace_and_newline_tokens_never_candidates():
    texts = [["Find", " ", "\n", " x", "\n\n", "\t ", "y"],
             ["a", "b"]]                       # shorter than T: later positions are not candidates
    region = _b([[1, 1, 1, 1, 1, 1, 0],        # position 6 outside the region (template)
                 [0, 1, 1, 1, 1, 1, 1]])
    assert candidate_mask(texts, region).tolist() == [
        [True, False, False, True, False, False, False],
        [False, True, False, False, False, False, False]]


def test_never_mask_exact_texts():
    texts = [["\\", "frac", " \\", "x"]]
    region = _b([[1, 1, 1, 1]])
    assert candidate_mask(texts, region, never_mask=("\\",)).tolist() == [[False, True, True, True]]


def test_candidate_mask_shape_errors():
    with pytest.raises(ValueError):
        candidate_mask([["a"]], _b([[1], [1]]))
    with pytest.raises(ValueError):
        candidate_mask([["a", "b", "c"]], _b([[1, 1]]))


# --- spans and pruning ---------------------------------------------------------------------------

def test_mask_spans():
    assert mask_spans(_b([0, 1, 1, 0, 1, 0, 1, 1, 1])) == [(1, 3), (4, 5), (6, 9)]
    assert mask_spans(_b([1, 1, 0])) == [(0, 2)]
    assert mask_spans(_b([0, 0, 0])) == []
    assert mask_spans(_b([1])) == [(0, 1)]


def test_prune_span_vs_collective():
    seq = list("abcdefghi")
    spans = mask_spans(_b([0, 1, 1, 0, 1, 0, 1, 1, 1]))
    assert prune(seq, spans, "span") == [
        (list("adefghi"), [(1, 3)]),
        (list("abcdfghi"), [(4, 5)]),
        (list("abcdef"), [(6, 9)]),
    ]
    assert prune(seq, spans, "collective") == [(list("adf"), [(1, 3), (4, 5), (6, 9)])]
    assert seq == list("abcdefghi")  # the original is untouched


def test_prune_ids_and_edge_cases():
    ids = [101, 7, 8, 9, 102]
    assert prune(ids, [(0, 5)], "span") == [([], [(0, 5)])]
    assert prune(ids, [], "span") == []
    assert prune(ids, [], "collective") == []
    with pytest.raises(ValueError, match="mode"):
        prune(ids, [(1, 2)], "tokens")
    with pytest.raises(ValueError, match="mode"):
        prune(ids, [], "tokens")
    with pytest.raises(ValueError, match="spans"):
        prune(ids, [(3, 4), (1, 2)], "span")       # not sorted
    with pytest.raises(ValueError, match="spans"):
        prune(ids, [(4, 6)], "span")               # past the end


# --- detection quality ---------------------------------------------------------------------------

def test_precision_recall_f1_micro_hand_worked():
    pred = _b([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]])
    labels = _b([[1, 0, 0, 1, 1], [0, 1, 0, 1, 1]])
    valid = _b([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])  # row 0 position 4 (a would-be tp) excluded
    # row 0: tp pos0, fp pos1, fn pos3; row 1: tp pos1, fp pos2, fn pos3, pos4
    # pooled: tp 2, fp 2, fn 3 → P = 2/4, R = 2/5, F1 = 2·.5·.4/.9 = 4/9
    # (a per-row average would give R = (1/2 + 1/3)/2 = 5/12)
    out = precision_recall_f1(pred, labels, valid)
    assert (out["tp"], out["fp"], out["fn"]) == (2.0, 2.0, 3.0)
    assert out["precision"] == pytest.approx(0.5)
    assert out["recall"] == pytest.approx(0.4)
    assert out["f1"] == pytest.approx(4 / 9)


def test_precision_recall_f1_undefined_is_zero():
    none = _b([[0, 0, 0]])
    assert precision_recall_f1(none, none, _b([[1, 1, 1]]))["f1"] == 0.0
    out = precision_recall_f1(_b([[1, 0, 0]]), _b([[0, 1, 0]]), _b([[1, 1, 1]]))
    assert (out["precision"], out["recall"], out["f1"]) == (0.0, 0.0, 0.0)


def test_top_k_mask_tie_breaking():
    score = _t([[0.5, 0.9, 0.5, 0.9, 0.1, 0.9],
                [0.5, 0.9, 0.5, 0.9, 0.1, 0.9],
                [0.5, 0.9, 0.5, 0.9, 0.1, 0.9],
                [3.0, 2.0, 1.0, 0.0, 0.0, 0.0]])
    cand = _b([[1, 1, 1, 0, 1, 1],   # 0.9 at 1, 5 (3 excluded); then 0.5 tie at 0, 2 → 0 first
               [1, 1, 1, 1, 1, 1],   # 0.9 tie at 1, 3, 5 → earliest two: 1, 3
               [1, 1, 1, 1, 1, 1],   # count 0 → nothing
               [0, 0, 1, 1, 1, 0]])  # best candidates by score: 2 (1.0), then tie 3, 4 → 3
    out = top_k_mask(score, cand, [3, 2, 0, 2])
    assert out.tolist() == [[True, True, False, False, False, True],
                            [False, True, False, True, False, False],
                            [False] * 6,
                            [False, False, True, True, False, False]]


def test_top_k_mask_counts_checked():
    with pytest.raises(ValueError, match="counts"):
        top_k_mask(_t([[1.0, 2.0]]), _b([[1, 0]]), [2])
    with pytest.raises(ValueError, match="counts"):
        top_k_mask(_t([[1.0, 2.0]]), _b([[1, 1]]), [1, 1])


def test_random_mask_exact_counts_candidates_only_reproducible():
    gen = torch.Generator().manual_seed(1234)
    cand = torch.rand(3, 12, generator=gen) < 0.6
    cand[1] = False
    cand[1, [2, 5, 7]] = True
    counts = [min(3, int(cand[0].sum())), 3, min(5, int(cand[2].sum()))]

    out = random_mask(cand, counts, torch.Generator().manual_seed(7))
    assert out.sum(-1).tolist() == counts
    assert not (out & ~cand).any()
    assert out[1].nonzero().flatten().tolist() == [2, 5, 7]    # all of them when count = #candidates
    again = random_mask(cand, counts, torch.Generator().manual_seed(7))
    assert torch.equal(out, again)

    # every candidate of row 0 gets drawn at some point, so the choice is not a fixed subset
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(12, dtype=torch.bool)
    for _ in range(200):
        seen |= random_mask(cand, counts, g)[0]
    assert torch.equal(seen, cand[0])


@pytest.mark.parametrize("q", [0.05, 0.1, 0.15, 0.3])
def test_confounder_mask_matches_literal_sorted_index_rule(q):
    """Random rows vs a plain-Python loop of the authors' rule: sorted(v)[int(len(v)·q)], min with .5."""
    gen = torch.Generator().manual_seed(42)
    delta = torch.rand(16, 40, generator=gen) ** 3        # many near-ties close to 0
    cand = torch.rand(16, 40, generator=gen) < 0.8
    out = confounder_mask(delta, cand, q)
    for i in range(16):
        vals = [float(delta[i, j]) for j in range(40) if cand[i, j]]
        tau = min(sorted(vals)[int(len(vals) * q)], 0.5)
        expected = [bool(cand[i, j]) and float(delta[i, j]) <= tau for j in range(40)]
        assert out[i].tolist() == expected


def test_glue_whitespace_takes_the_space_before_or_else_after_and_merges():
    from rl.methods.leaf.confounders import glue_whitespace

    # "Add.\nx=347 347+285 (note 9)\n" character by character
    texts = list("Add.\nx=347 347+285 (note 9)\n")
    x_span = (5, 10)            # "x=347": preceded by "\n" (kept), followed by " " (taken)
    note = (19, 27)             # "(note 9)": preceded by " " (taken)
    assert glue_whitespace([x_span, note], texts) == [(5, 11), (18, 27)]
    pruned = "".join(prune(texts, glue_whitespace([x_span, note], texts), "collective")[0][0])
    assert pruned == "Add.\n347+285\n"
    # spans that meet once widened are merged; newlines and empty texts are never taken
    assert glue_whitespace([(0, 2), (3, 4)], ["a", "b", " ", "c"]) == [(0, 4)]
    assert glue_whitespace([(1, 2)], ["\n", "a", "\n"]) == [(1, 2)]
    assert glue_whitespace([], texts) == []
