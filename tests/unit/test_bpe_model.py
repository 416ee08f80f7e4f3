"""The Qwen3-shaped model with a byte-level BPE tokenizer and a ChatML template (rl/models/bpe_model.py),
checked the way a downloaded checkpoint is used: loaded through transformers' Auto classes,
its template against ChatML written out by hand, its parameter count against Qwen3-0.6B's
architecture worked out by hand."""
import pytest
import torch

from rl.models.bpe_model import (CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, REAL_SHAPE, SPECIAL_TOKENS,
                          SMALL_SHAPE as SMALL, build_bpe_model, model_config, task_corpus)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_bpe_model(tmp_path_factory.mktemp("bpe"), SMALL, task_corpus(per_task=300))


def test_the_folder_loads_as_a_tied_padded_qwen3(folder):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder)
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.model_type == "qwen3" and cfg.tie_word_embeddings and cfg.head_dim == 64
    assert len(tok) == SMALL.bpe_vocab < cfg.vocab_size == SMALL.vocab_size  # padded rows
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # two stop ids, as Qwen's generation config has: end of turn, end of text
    gen = GenerationConfig.from_pretrained(folder)
    assert gen.eos_token_id == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT


def test_byte_level_bpe_round_trips_any_text_and_merges_the_tasks(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for text in ("Add.\n441+680\n", "7+14=21\n21-5=16\n#### 7+14-5", "héllo 数学 ✓\n\tx  y",
                 "Vars.\nb=9;o=b+9;d=o*3\nd?\n"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # learned merges: a task prompt takes fewer tokens than characters ("441" is one token)
    prompt = "Add.\n441+680\n"
    assert len(tok(prompt)["input_ids"]) < len(prompt)
    for special in SPECIAL_TOKENS:  # one id each, never split
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


def test_the_chat_template_renders_chatml(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": "Solve."},
                {"role": "user", "content": "Add.\n441+680\n"}]
    by_hand = ("<|im_start|>system\nSolve.<|im_end|>\n"
               "<|im_start|>user\nAdd.\n441+680\n<|im_end|>\n"
               "<|im_start|>assistant\n")
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == by_hand
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False) == by_hand + "<think>\n\n</think>\n\n"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                  return_dict=False)
    assert list(ids) == tok(by_hand, add_special_tokens=False)["input_ids"]
    assert list(ids).count(tok.convert_tokens_to_ids(IM_START)) == 3


def test_the_real_shape_is_qwen3_0_6b():
    """596,049,920 parameters: embeddings V·h, per layer q/k/v/o projections, the q and k
    norms, the SwiGLU MLP and two RMSNorms, a final norm; lm_head tied (Qwen3-0.6B: 0.6B, of
    which 0.44B non-embedding)."""
    from transformers import AutoModelForCausalLM

    s = REAL_SHAPE
    h, d = s.hidden_size, s.head_dim
    per_layer = (h * s.num_attention_heads * d * 2 + h * s.num_key_value_heads * d * 2
                 + 2 * d + 3 * h * s.intermediate_size + 2 * h)
    by_hand = s.vocab_size * h + s.num_hidden_layers * per_layer + h
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(s, eos=[2, 0], pad=0))
    assert model.config.tie_word_embeddings and model.config.rope_parameters["rope_theta"] == 1e6
    assert sum(p.numel() for p in model.parameters()) == by_hand == 596_049_920
    assert by_hand - s.vocab_size * h == 440_467_456
