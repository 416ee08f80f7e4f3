"""Weight transports on CPU: bucket packing is exact and bounded, payload transports agree,
tied embeddings travel as the learner sends them, and the GPU transports refuse CPU clearly."""
import pytest
import torch

from rollout import weight_buckets as wb
from rollout.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    BucketedTransport,
    CollectiveTransport,
    get_transport,
)


def mixed_state() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [
        ("model.embed_tokens.weight", torch.randn(50, 24, generator=g)),            # 4800 B
        ("model.layers.0.mlp.up_proj.weight", torch.randn(24, 16, generator=g).to(torch.bfloat16)),
        ("model.layers.0.input_layernorm.weight", torch.randn(24, generator=g)),
        ("model.layers.0.self_attn.qkv.weight", torch.randn(16, 24, generator=g).t()),  # strided
        ("buffers.position_ids", torch.randint(0, 1 << 40, (7,), generator=g)),       # int64
        ("scalar", torch.tensor(3.5)),                                                # 0-d
        ("model.norm.weight", torch.randn(3, generator=g).to(torch.bfloat16)),        # odd size
        ("empty", torch.zeros(0, 4)),
    ]


def assert_same(got, want):
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


LARGEST = 50 * 24 * 4


@pytest.mark.parametrize("bucket_bytes", [1, 100, 1024, LARGEST - 1, LARGEST, 1 << 20])
def test_bucket_round_trip_is_exact(bucket_bytes):
    state = mixed_state()
    buckets = list(wb.pack_buckets(state, bucket_bytes))
    got = [p for b in buckets for p in wb.unpack_bucket(b)]
    assert_same(got, state)
    # and through the wire form the transports send
    assert_same(list(wb.iter_wire(wb.buckets_to_wire(buckets))), state)


@pytest.mark.parametrize("bucket_bytes", [64, 1000, LARGEST - 1, 8192])
def test_bucket_sizes_respected_and_filled_greedily(bucket_bytes):
    state = mixed_state()
    sizes = {n: t.numel() * t.element_size() for n, t in state}
    buckets = list(wb.pack_buckets(state, bucket_bytes))
    for b in buckets:
        assert len(b.data) <= bucket_bytes or len(b.slots) == 1
        assert all(s.offset % wb.ALIGN == 0 for s in b.slots)
    for b, nxt in zip(buckets, buckets[1:]):  # a bucket closes only when the next tensor won't fit
        first = nxt.slots[0].name
        assert -(-len(b.data) // wb.ALIGN) * wb.ALIGN + sizes[first] > bucket_bytes
    oversized = [n for n, s in sizes.items() if s > bucket_bytes]
    for name in oversized:  # a tensor larger than a bucket gets one of its own
        assert [len(b.slots) for b in buckets if name in {s.name for s in b.slots}] == [1]
    if bucket_bytes == LARGEST - 1:
        assert oversized == ["model.embed_tokens.weight"]


def test_packing_is_deterministic():
    a = wb.buckets_to_wire(wb.pack_buckets(mixed_state(), 1000))
    b = wb.buckets_to_wire(wb.pack_buckets(mixed_state(), 1000))
    assert a == b


def test_wire_payload_is_plain_python():
    """vLLM's RPC turns nested tensors into lists (ENVIRONMENT.md trap 5): bytes, str, int,
    lists and dicts only."""
    def walk(x):
        if isinstance(x, dict):
            assert all(isinstance(k, str) for k in x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        else:
            assert isinstance(x, (bytes, str, int)), type(x)

    walk(BucketedTransport(bucket_bytes=1000).pack(mixed_state()))


def test_unpack_decodes_one_bucket_at_a_time():
    """The worker loads bucket 1 before bucket 2 is decoded: a broken second bucket is only
    noticed once the first one's tensors have all been handed out."""
    state = [(f"w{i}", torch.full((64,), float(i))) for i in range(4)]  # 256 B each
    payload = BucketedTransport(bucket_bytes=512).pack(state)
    assert len(payload["buckets"]) == 2
    payload["buckets"][1]["offsets"][0] = 3  # misaligned
    it = BucketedTransport().unpack(payload)
    assert [n for n, _ in (next(it), next(it))] == ["w0", "w1"]
    with pytest.raises(ValueError, match="w2"):
        next(it)


def test_duplicate_names_and_bad_sizes_are_refused():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="twice"):
        list(wb.pack_buckets([("a", t), ("a", t)], 64))
    with pytest.raises(ValueError):
        get_transport("buckets", bucket_bytes=0)
    with pytest.raises(ValueError, match="unknown weight transport"):
        get_transport("carrier-pigeon")


def test_safetensors_and_buckets_transports_agree():
    state = mixed_state()
    out = {}
    for name in ("safetensors", "buckets"):
        t = get_transport(name, bucket_bytes=300)
        payload = t.pack(state)
        assert t.payload_bytes(payload) >= sum(x.numel() * x.element_size() for _, x in state)
        out[name] = dict(t.unpack(payload))
    assert out["safetensors"].keys() == out["buckets"].keys() == dict(state).keys()
    for name, want in state:
        for got in out.values():
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_tied_embeddings_travel_as_sent():
    """A tied model's parameters (what the learner sends) hold the embeddings once and no
    lm_head; the buckets bring back exactly that. A tied state dict (both names on one
    storage, which safetensors refuses) packs by value."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg)
    sent = [(n, p.detach()) for n, p in model.named_parameters()]
    names = [n for n, _ in sent]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names

    t = get_transport("buckets", bucket_bytes=2048)  # smaller than the 5 KiB embeddings
    got = list(t.unpack(t.pack(sent)))
    assert_same(got, sent)

    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    back = dict(t.unpack(t.pack(sd.items())))
    assert torch.equal(back["lm_head.weight"], back["model.embed_tokens.weight"])
    assert back["lm_head.weight"].data_ptr() != back["model.embed_tokens.weight"].data_ptr()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on CPU")
@pytest.mark.parametrize("name", ["nccl", "ipc"])
def test_gpu_transports_construct_but_refuse_cpu(name):
    t = get_transport(name, bucket_bytes=64 << 20)
    assert isinstance(t, CollectiveTransport) and t.collective and t.bucket_bytes == 64 << 20
    assert not get_transport("buckets").collective
    assert get_transport("buckets").bucket_bytes == DEFAULT_BUCKET_BYTES
    for call in (t.engine_llm_kwargs, lambda: t.connect([], rank=0),
                 lambda: t.send(mixed_state(), version=1)):
        with pytest.raises(RuntimeError, match=f"'{name}'.*needs CUDA"):
            call()


def vllm_worker_rank(init_info: dict, dp_index: int, tp_pp_size: int, rank_in_engine: int) -> int:
    """A worker's rank in the transfer group as vLLM 0.32 computes it
    (vllm/distributed/weight_transfer/nccl_common.py, worker_init_process_group)."""
    return dp_index * tp_pp_size + rank_in_engine + int(init_info["rank_offset"])


@pytest.mark.parametrize("workers", [[1], [1, 1, 1], [2, 2], [4, 1, 2], [8]])
def test_every_engine_worker_gets_its_own_nccl_rank(workers):
    """Independent engines all sit at vLLM data-parallel index 0, and a tensor-parallel
    engine has one worker per GPU, each ranked rank_offset + its rank in the engine. Every
    worker of every engine must get its own rank in 1 .. world − 1 (rank 0: the learner), or
    the rendezvous hangs (the group used to be 1 + engines, with offsets one apart)."""
    from rollout.vllm_weight_transfer import engine_init_infos, transfer_world_size

    info = {"master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 1,
            "world_size": transfer_world_size(workers), "packed": True}
    infos = engine_init_infos(info, workers)
    ranks = [vllm_worker_rank(i, 0, n, r) for i, n in zip(infos, workers) for r in range(n)]
    assert sorted(ranks) == list(range(1, info["world_size"]))
    assert all({k: v for k, v in i.items() if k != "rank_offset"} ==
               {k: v for k, v in info.items() if k != "rank_offset"} for i in infos)
    assert engine_init_infos({"packed": True}, [2, 2]) == [{"packed": True}, {"packed": True}]
