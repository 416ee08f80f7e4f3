"""Padding-free forwards (rl/engine/packing.py, kernels/varlen.py): the re-padding index is
hand-checked, and the packed forward is compared with the padded forward of the same model
(transformers' own SDPA path: the independent reference)."""
import pytest
import torch

from kernels.varlen import install_sdpa, repad_index
from rl.engine.deepspeed_engine import token_logprobs
from rl.engine.frozen import load_model, logits_of
from rl.engine.packing import (is_right_padded, pack, packed_token_logprobs, packing_error,
                               packing_matches)


def right_padded(seed: int, rows: int = 12, width: int = 24, vocab: int = 90):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (rows,), generator=g)
    mask = torch.arange(width)[None] < lengths[:, None]
    ids = torch.randint(3, vocab, (rows, width), generator=g) * mask
    return ids, mask


def grouped(seed: int, groups: int = 4, size: int = 4, width: int = 30, vocab: int = 90):
    """GRPO-like rows: each group's rows share a prompt, then differ (and sometimes share the
    first response tokens too)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(groups * size, width, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i in range(groups):
        prompt = torch.randint(3, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        first = torch.randint(3, vocab, (2,), generator=g)
        for j in range(size):
            resp = torch.randint(3, vocab, (int(torch.randint(1, width - len(prompt) + 1, (1,), generator=g)),),
                                 generator=g)
            if j % 2 and len(resp) > 2:
                resp[:2] = first
            row = torch.cat([prompt, resp])
            ids[i * size + j, :len(row)], mask[i * size + j, :len(row)] = row, True
    return ids, mask, torch.arange(groups).repeat_interleave(size)


def test_repad_index_by_hand():
    # sequences of 3, 1 and 2 tokens packed as [a a a b c c]
    r = repad_index(torch.tensor([0, 3, 4, 6]))
    assert r.width == 3
    assert r.gather.tolist() == [0, 1, 2, 3, 3, 3, 4, 5, 5]   # slot s·3 + t; past the end: the last token
    assert r.keep.tolist() == [0, 1, 2, 3, 6, 7]              # the slot of each packed token


def test_pack_with_a_shared_prefix_by_hand():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [4, 3, 0, 0]])
    p = pack(ids, ids > 0, group_ids=torch.tensor([0, 0, 1]))
    # row 1 shares [5 6] with its group's first row; row 2 is another group
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert p.slot.tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [5, 6, 0, 0]]
    assert p.repad.gather.tolist() == [0, 1, 2, 3, 0, 1, 4, 4, 5, 6, 6, 6]
    assert p.repad.keep.tolist() == [0, 1, 2, 3, 6, 8, 9]
    assert p.repad.width == 4


def test_right_padding_check():
    assert is_right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert not is_right_padded(torch.tensor([[1, 0, 1], [1, 1, 1]]))


@pytest.mark.parametrize("seed,groups", [(0, False), (1, False), (0, True), (1, True)])
def test_packed_logprobs_entropy_and_gradients_match_padded(tiny_model_dir, seed, groups):
    stock = load_model(tiny_model_dir, "float32")        # transformers' "sdpa"
    model = load_model(tiny_model_dir, "float32")
    install_sdpa(model)
    ids, mask, group_ids = grouped(seed) if groups else (*right_padded(seed), None)
    if groups:  # the packed row holds fewer tokens than the rows
        assert pack(ids, mask, group_ids).input_ids.shape[1] < mask.sum() - 3 * 3 * 4
    lp, ent = packed_token_logprobs(model, ids, mask, temperature=0.7, group_ids=group_ids)
    (lp * mask).sum().backward()

    ref_lp, ref_ent = token_logprobs(logits_of(stock, {"input_ids": ids, "attention_mask": mask}),
                                     ids, temperature=0.7)
    (ref_lp * mask).sum().backward()
    m = mask.float()
    assert ((lp - ref_lp).abs() * m).max() < 1e-5
    assert ((ent - ref_ent).abs() * m).max() < 1e-5
    assert (lp * ~mask).abs().sum() == 0 and lp[:, 0].abs().sum() == 0
    for p, ref in zip(model.parameters(), stock.parameters()):  # float summation order only
        assert (p.grad - ref.grad).abs().max() <= 1e-5 * ref.grad.abs().max()


def test_padded_batches_keep_the_stock_sdpa_numerics(tiny_model_dir):
    stock = load_model(tiny_model_dir, "float32")
    model = load_model(tiny_model_dir, "float32")
    install_sdpa(model)
    ids, mask = right_padded(2)
    b = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        diff = (logits_of(model, b) - logits_of(stock, b)).abs()[mask].max()
    assert diff < 1e-5


def test_a_model_whose_attention_ignores_the_packing_is_detected(tiny_model_dir):
    """The stock SDPA over a packed row without our attention function sees the boundaries
    only through position ids; OPT ignores them (positions from the 2-D mask): its sequences
    would see each other, and the engine's start-up check must say so."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids, mask = right_padded(3)
    model = load_model(tiny_model_dir, "float32")
    install_sdpa(model)
    assert packing_error(model, ids, mask) < 1e-5
    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128,
        vocab_size=100, word_embed_proj_dim=64)).eval()
    assert packing_error(opt, ids, mask) > 1e-2


def _failing_forward(model, error: Exception):
    """A forward hook that raises `error` once the model runs (fault injection into a real
    model: what a CUDA out-of-memory in the start-up check looks like to the engine)."""
    def hook(module, args, kwargs):
        raise error
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_the_start_up_packing_check_keeps_padded_rows_only_for_a_model_that_cannot_pack(tiny_model_dir):
    """learner start (rl/engine/deepspeed_engine.py): packed rows are used when they match the
    padded ones; a forward refusing the packed arguments (TypeError) falls back to padded rows;
    any other error — an out-of-memory, a CUDA error — propagates instead of being hidden
    behind a silent fallback (the check used to catch every exception)."""
    model = load_model(tiny_model_dir, "float32").eval()
    install_sdpa(model)
    vocab = model.config.vocab_size
    assert packing_matches(model, "cpu", vocab, "float32") is True
    handle = _failing_forward(model, TypeError("forward() got an unexpected keyword argument 'repad'"))
    assert packing_matches(model, "cpu", vocab, "float32") is False
    handle.remove()
    for error in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  RuntimeError("CUDA error: an illegal memory access was encountered")):
        handle = _failing_forward(model, error)
        with pytest.raises(type(error)) as raised:
            packing_matches(model, "cpu", vocab, "float32")
        assert raised.value is error and "padding_free check" in str(raised.value.__notes__)
        handle.remove()
