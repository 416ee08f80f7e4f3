"""A user's checkpoint through the whole loop: a small Qwen3 folder of the kind a download gives
(byte-level BPE, ChatML chat template, two eos ids, padded tied vocabulary; rl/models/bpe_model.py)
given as model.path, and a conversational JSONL (`messages` with a system and a user turn).

RL starts from the given weights (no cold-start SFT by default), prompts are rendered by the
folder's chat template, and truncated responses are filtered out of the loss (DAPO)."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rl.batch import TOKEN_CLASS
from rl.config import register_configs
from rl.tasks.arith import column_steps
from rl.loop.trainer import Trainer
from tests.e2e.arith_rows import ROWS, TEST_ROWS

CONF = str(Path(__file__).resolve().parents[2] / "conf")
SYSTEM = "Add the numbers. End with a final line '#### <answer>'."
register_configs()
pytestmark = pytest.mark.timeout(3600)


def conversations(path: Path, rows) -> str:
    with open(path, "w") as f:
        for a, b in rows:
            _, total = column_steps([a, b])
            f.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": f"{a}+{b}"}],
                                "answer": str(total)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run(ray_session, bpe_small_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("real_model_loop")
    out, cache = d / "out", d / "cache"
    overrides = [
        f"output_dir={out}", f"cache_dir={cache}", f"model.path={bpe_small_dir}",
        "steps=2", "eval_every=2", "save_every=10", "task=gsm8k", "task.eval_size=2",
        f"task.params.path={conversations(d / 'train.jsonl', ROWS)}",
        f"task.params.test_path={conversations(d / 'test.jsonl', TEST_ROWS)}",
        "+task.params.verifier=arith", "algorithm.prompts_per_step=2", "algorithm.n_samples=4",
        "algorithm.minibatch_size=4", "rollout.max_new_tokens=12", "algorithm.overlong=filter",
        "logger=none", "logger.progress=false",
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
        prompt = trainer.encode(trainer.task.dataset("train", 1))[0]
    finally:
        trainer.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, prompt, {r["step"]: r for r in rows}, cache


def test_rl_starts_from_the_given_checkpoint_without_sft(run, bpe_small_dir):
    summary, _, m, cache = run
    assert summary["policy_init"] == bpe_small_dir and summary["cold_start_s"] < 1.0
    assert not list(cache.glob("cold_start-*"))   # no SFT product was built or cached
    assert sorted(m) == [0, 1, 2] and summary["steps"] == 2


def test_a_messages_row_is_rendered_by_the_chat_template(run, bpe_small_dir):
    from transformers import AutoTokenizer

    _, prompt, _, _ = run
    tok = AutoTokenizer.from_pretrained(bpe_small_dir)
    a, b = prompt.sample.prompt.split("\n")[1].split("+")
    ref = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": f"{a}+{b}"}],
                                  tokenize=True, add_generation_prompt=True)["input_ids"]
    assert prompt.ids == list(ref)
    by_class = {c: tok.decode([t for t, k in zip(prompt.ids, prompt.classes) if k == TOKEN_CLASS[c]])
                for c in ("system", "evidence")}
    assert by_class == {"system": SYSTEM, "evidence": f"{a}+{b}"}


def test_truncated_responses_leave_the_loss(run):
    _, _, m, _ = run
    for step in (1, 2):
        # 8 responses a step; each one cut at max_new_tokens is masked, no other
        assert m[step]["overlong/masked"] == round(8 * m[step]["rollout/truncated"])
        assert m[step]["train/skipped"] == 0
        assert m[step]["rollout/logprob_gap"] < 1e-3   # padded rows: engine and learner agree
    assert sum(m[s]["overlong/masked"] for s in (1, 2)) > 0   # a random model runs on
