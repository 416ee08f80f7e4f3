"""A Qwen3-shaped model the way a download gives it, built here: a byte-level BPE tokenizer with
Qwen's special tokens, a ChatML chat template, two end-of-sequence ids, and a vocabulary padded
beyond the tokenizer (tied embeddings).

Why: a user's first run is a Qwen3 / Qwen2.5 checkpoint, not the character-level tiny model —
subword tokens (a prompt's characters no longer map 1:1 to tokens), a chat template, several
stop ids and a 151,936-row embedding. Nothing can be downloaded here, so the folder is built
from a config with random weights and goes through the same loading code a user's checkpoint
goes through. `REAL_SHAPE` is Qwen3-0.6B's architecture exactly (596M parameters); a small
shape of the same kind (`BpeModelSpec(...)` with tiny sizes) lets CI exercise the template,
multi-eos and subword paths.

The tokenizer is trained with `tokenizers` on the embedded tasks' prompts and worked solutions
(arith, countdown, chain), so their text takes a few tokens per number rather than one per
character; any other text still encodes, byte by byte at worst (byte-level BPE has no unknown
token).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

# Qwen's control tokens (the ones its chat template and generation config use), in Qwen's order.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, THINK, END_THINK]

# ChatML as Qwen3 writes it, reduced to what RL prompts use: system / user / assistant turns,
# the generation prompt, and Qwen3's thinking switch (`enable_thinking=False` closes an empty
# thinking block so the model answers directly).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


@dataclass
class BpeModelSpec:
    """Defaults: Qwen3-0.6B's published architecture."""
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 151936        # embedding rows: more than the tokenizer has, as Qwen's
    bpe_vocab: int = 2048           # tokens the BPE tokenizer learns (with the specials)
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    dtype: str = "bfloat16"
    seed: int = 0


REAL_SHAPE = BpeModelSpec()
# The tiny model's size with the same tokenizer, template, eos ids and padded tied vocabulary:
# what CI runs through the loop.
SMALL_SHAPE = BpeModelSpec(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                           vocab_size=1024, bpe_vocab=600, max_position_embeddings=1024,
                           dtype="float32")


def task_corpus(per_task: int = 2000) -> list[str]:
    """Prompts and worked solutions of the embedded text tasks, the shipped GSM8K / MATH
    sample rows and the chat roles: what the tokenizer learns from."""
    from rl.tasks import get_task

    texts = ["system", "user", "assistant"]
    for name in ("arith", "countdown", "chain"):
        for s in get_task(name, seed=0).dataset("train", per_task):
            texts += [s.prompt, s.solution]
    for path in sorted((Path(__file__).resolve().parents[2] / "data").glob("*_sample*.jsonl")):
        texts += [json.dumps(json.loads(line), ensure_ascii=False) for line in
                  path.read_text().splitlines() if line.strip()]
    return texts


def train_bpe_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE tokenizer (GPT-2 / Qwen style: bytes mapped to printable characters,
    merges learned from `texts`) with Qwen's special tokens, each one id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, THINK, END_THINK],
        model_max_length=131072, clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE)


def model_config(spec: BpeModelSpec, eos: list[int], pad: int):
    """The transformers config of `spec`; `eos`: the end-of-turn and end-of-text ids."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=eos[1], eos_token_id=eos[0],
        pad_token_id=pad)


def build_bpe_model(out_dir: str | os.PathLike, spec: BpeModelSpec | None = None,
                    corpus: list[str] | None = None) -> Path:
    """Write the model (random weights, `spec.dtype`), tokenizer, chat template and generation
    config (eos ids: <|im_end|> and <|endoftext|>) as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = spec or BpeModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(corpus if corpus is not None else task_corpus(), spec.bpe_vocab)
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size={spec.vocab_size} embedding rows")
    eos = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT)]
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(model_config(spec, eos, tokenizer.pad_token_id),
                                             dtype=getattr(torch, spec.dtype))
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=eos[1])
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "bpe_model_spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return out


if __name__ == "__main__":  # python -m rl.models.bpe_model OUT [--small]: a folder to point model.path at
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--small", action="store_true",
                    help="2 layers, hidden 128, 1,024 embedding rows (fp32) instead of Qwen3-0.6B")
    a = ap.parse_args()
    print(build_bpe_model(a.out, SMALL_SHAPE if a.small else REAL_SHAPE))
