"""The learner with our attention kernels: same logprobs as stock attention, statistics from
the scoring forward equal those read off eager attention maps, and training runs through it."""
import pytest
import ray
import torch

from rl.engine.deepspeed_engine import DSEngineConfig
from rl.cluster.learner_group import LearnerGroup
from tests.integration.test_learner import sft_batch
from rl.algorithms.losses import SftLoss

STATS = {"entropy": True, "distance": True, "waad_window": 4, "fai_band": [2, 8]}


@pytest.fixture(scope="module")
def learners(ray_session, tiny_model_dir):
    # plain_attention="kernels": training forwards/backwards run through our kernels too
    fused = LearnerGroup(DSEngineConfig(tiny_model_dir, lr=3e-3, attention="kernels",
                                        attn_impl="blockwise", stats_layers="all",
                                        plain_attention="kernels"))
    stock = LearnerGroup(DSEngineConfig(tiny_model_dir, lr=3e-3))
    yield fused, stock
    fused.shutdown()
    stock.shutdown()


def eager_stats(model_dir, batch, layer):
    """WAAD, distance, entropy and FAI of one layer from materialised attention maps, by the
    definitions (papers.md §1.5-1.6, kernels.md): FAI_s is the mean of p_ts over the response
    rows t of s's sequence with s + H_lo <= t <= s + H_hi, and 0 where there is no such row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                    output_attentions=True)
    p = out.attentions[layer].double()  # [B, H, N, N]
    n = p.shape[-1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    dist = (i - j).clamp(min=0).double()
    ent = -(p * torch.log(p.clamp(min=1e-300))).sum(-1)
    lo, hi = STATS["fai_band"]
    real, resp = batch["attention_mask"].bool(), batch["response_mask"].bool()
    fai = torch.zeros(p.shape[:3], dtype=torch.float64)  # [B, H, N]: one value per key s
    for b in range(p.shape[0]):
        for s in range(n):
            rows = [t for t in range(s + lo, min(n - 1, s + hi) + 1) if real[b, t] and resp[b, t]]
            if real[b, s] and rows:
                fai[b, :, s] = p[b, :, rows, s].mean(-1)
    return {"distance": (p * dist).sum(-1), "waad": (p * dist.clamp(max=4)).sum(-1),
            "entropy": ent, "fai": fai}


def test_fused_learner_matches_stock_and_eager_maps(learners, tiny_model_dir):
    fused, stock = learners
    b = sft_batch()
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "response_mask")}
    out = fused.score(inputs, 1.0, STATS)
    ref = stock.score({k: b[k] for k in ("input_ids", "attention_mask")}, 1.0)
    real = b["attention_mask"]  # padded positions carry no meaning (and differ by kernel)
    assert torch.allclose(out["logprobs"][real], ref["logprobs"][real], atol=1e-5)
    stats = out["attn_stats"]
    assert sorted(stats) == [0, 1, 2, 3]
    B, N = b["input_ids"].shape
    for layer in (0, 2):
        eager = eager_stats(tiny_model_dir, b, layer)
        valid = b["attention_mask"][:, None, :].expand(B, 2, N)
        for name in ("distance", "waad", "entropy", "fai"):
            got = stats[layer][name]
            assert got.shape == (B, 2, N)
            want = eager[name].float()
            assert torch.allclose(got[valid], want[valid], atol=1e-5 * (1 + want.abs().max())), name
        # the band is not empty on most keys: the comparison is not one of zeros
        assert (eager["fai"][valid] > 0).float().mean() > 0.5


def test_training_runs_through_the_kernels(learners):
    fused, _ = learners
    b = sft_batch()
    losses = [fused.train_minibatch(b, SftLoss())["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] - 0.3
