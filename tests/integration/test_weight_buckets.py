"""The "buckets" transport into a real vLLM engine: many small buckets (most tensors larger
than one) from a tied model, loaded bucket by bucket, make vLLM score like the HF model that
sent them (float32), and unlike it did before."""
import ray
import torch

from rl.models.tiny_model import TinyModelSpec, build_char_tokenizer, build_tiny_model
from rollout.vllm_engine import EngineConfig, VLLMEngine
from rollout.weight_sync import get_transport


def hf_logprobs(model, seq):
    ids = torch.tensor([seq])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)
    return logp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]


def test_bucketed_sync_makes_vllm_match_the_sender(ray_session, tmp_path):
    from transformers import AutoModelForCausalLM

    path = str(build_tiny_model(tmp_path / "tied", TinyModelSpec(tie_word_embeddings=True)))
    engine = ray.remote(num_cpus=0.5)(VLLMEngine).remote(EngineConfig(path), "buckets")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        seq = build_char_tokenizer()("Add.\n347+285\n7+5=12\n4+8+1=13\n#### 632")["input_ids"]
        before = torch.tensor(ray.get(engine.score.remote([seq]))[0])
        assert (before - hf_logprobs(model, seq)).abs().max() < 1e-4

        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        sent = [(n, p.detach()) for n, p in model.named_parameters()]
        assert "lm_head.weight" not in dict(sent)  # tied: the embeddings travel once

        transport = get_transport("buckets", bucket_bytes=16 << 10)
        payload = transport.pack(sent)
        buckets = payload["buckets"]
        assert len(buckets) > 10 and any(len(b["names"]) > 1 for b in buckets)
        assert any(len(b["data"]) > 16 << 10 for b in buckets)  # oversized tensors, alone
        out = ray.get(engine.update_weights.remote(payload, 1))
        assert out["version"] == 1

        after = torch.tensor(ray.get(engine.score.remote([seq]))[0])
        want = hf_logprobs(model, seq)
        assert (after - want).abs().max() < 1e-4, (after - want).abs().max()
        assert (after - before).abs().max() > 0.1
    finally:
        ray.kill(engine)
