"""The DeepSpeed implementation of TrainEngine (ZeRO 0/2/3; gloo on CPU, NCCL on GPU).

One instance per data-parallel rank. Losses are normalised by the *global* count of tokens (or
sequences) in the minibatch, and the loss handed to DeepSpeed is pre-multiplied by
world_size × grad_accum_steps, because DeepSpeed divides by both (mean all-reduce, gas scaling).
The resulting gradient is that of Σ loss / global count: independent of how many ranks and
micro-batches the minibatch was split into.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from types import SimpleNamespace
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.varlen import install_sdpa
from rl.engine.base import Forwards, Loss, Probe, Readable, TrainEngine
from rl.engine.frozen import (FrozenModel, load_model, logits_of, next_token_logprobs, scored,
                              to_cpu, token_logprobs)
from rl.engine.packing import is_right_padded, packed_token_logprobs, packing_matches


# Files of the base model folder an exported checkpoint needs beside the weights (tokenizer,
# and a vision-language model's processor, which vLLM and the learner read images with).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tiny_model_spec.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "processor_config.json",
                   "preprocessor_config.json", "video_preprocessor_config.json")


@dataclass
class DSEngineConfig:
    model_path: str
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 2
    micro_batch_size: int = 64
    grad_accum_steps: int = 1
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    ref_model_path: str | None = None
    # Frozen models loaded next to the policy in every rank, by name (a method names them): a
    # loss reads one's full next-token distributions inside each micro-batch, nothing moves.
    frozen_models: dict[str, str] = field(default_factory=dict)
    backend: str | None = None
    seed: int = 0
    # "sdpa": the model's stock attention. "kernels": our fused attention (kernels/), which can
    # also return per-head statistics from the scoring forward; attn_impl picks the kernel
    # (auto = Triton on GPU, blockwise PyTorch on CPU).
    attention: str = "sdpa"
    attn_impl: str = "auto"
    # with "kernels": the attention of forwards that capture no statistics (training,
    # unselected layers) — "sdpa" (faster on CPU) or "kernels" (ours, stats off)
    plain_attention: str = "sdpa"
    stats_layers: str = "middle:5"
    # How long a collective may wait for a peer before this rank errors out (a dead peer is
    # normally noticed by the driver first; this bounds a rank left waiting).
    collective_timeout_s: float = 1800.0
    # Colocated with a vLLM engine on one GPU: between updates the optimizer states, fp32
    # master weights and gradient buffers wait in CPU memory (the bf16 weights stay, so scoring
    # forwards still run); the next optimizer step brings them back.
    offload_between_updates: bool = False
    # torch.compile the policy (inductor, dynamic shapes): fused kernels for its forwards and
    # backwards, paid for once by a compile at the first forward of each kind
    compile: bool = False
    # Forwards on one packed row of real tokens, each group's shared prefix once
    # (rl/engine/packing.py) instead of right-padded rows; attention "sdpa", text models
    padding_free: bool = True


class DeepSpeedEngine(TrainEngine):
    def __init__(self, cfg: DSEngineConfig, store: torch.distributed.Store | None = None):
        """`store`: the group's rendezvous, already open (rl/cluster/learner_group.py: rank 0
        hosts it on a port it holds from the start). Without one, the process group forms
        from MASTER_ADDR/MASTER_PORT (env://, as under torchrun). RANK and WORLD_SIZE come
        from the environment either way."""
        import deepspeed

        self.cfg = cfg
        on_gpu = torch.cuda.is_available()
        backend = cfg.backend or ("nccl" if on_gpu else "gloo")
        if on_gpu:
            bind_first_visible_gpu()
        else:
            skip_cpu_shm_op()
        timeout = timedelta(seconds=cfg.collective_timeout_s)
        if store is not None:  # DeepSpeed then finds torch.distributed initialized and uses it
            init_process_group(backend, store, timeout, on_gpu)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        torch.manual_seed(cfg.seed)
        dtype = getattr(torch, cfg.dtype)
        model = load_model(cfg.model_path, dtype)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.attention == "kernels":
            from kernels import install

            install(model, impl=cfg.attn_impl, plain=cfg.plain_attention)
        elif cfg.attention != "sdpa":
            raise ValueError(f"attention must be 'sdpa' or 'kernels', got {cfg.attention!r}")
        # text models only: a vision-language batch keeps its rows (image positions are per row)
        self.padding_free = (cfg.padding_free and cfg.attention == "sdpa"
                             and getattr(model.config, "vision_config", None) is None)
        if self.padding_free:  # SDPA that also takes packed rows (padded ones as before)
            install_sdpa(model)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.grad_accum_steps,
            "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * self.world_size,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            # torch's AdamW, fused: the default (foreach) step makes two fp32 temporaries the size
            # of the parameters — +8 bytes per parameter at the update's peak (4.4 GiB at
            # Qwen3-0.6B's shape; what Ray's memory monitor killed the engine over on 24 GiB)
            "optimizer": {"type": "AdamW", "params": {
                "lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": [0.9, 0.999],
                "eps": 1e-8, "torch_adam": True, "fused": True}},
            "bf16": {"enabled": cfg.dtype == "bfloat16"},
            "fp16": {"enabled": cfg.dtype == "float16"},
            "steps_per_print": 10**9,
        }
        # the device bind_first_visible_gpu chose (DeepSpeed would otherwise read LOCAL_RANK)
        args = SimpleNamespace(device_rank=0) if on_gpu else None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            args=args, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
        self.device = self.engine.device
        if self.padding_free:
            self.engine.eval()
            self.padding_free = packing_matches(self.engine, self.device,
                                                model.config.vocab_size, cfg.dtype)
        if cfg.compile:  # in place: parameter names, hooks and checkpoints stay the model's own
            self.engine.module.compile(dynamic=True)
        self.offloaded = False
        self.ref = None
        if cfg.ref_model_path:
            self.ref = load_model(cfg.ref_model_path, dtype)
            if self.padding_free:
                install_sdpa(self.ref)
            self.ref.to(self.device).eval().requires_grad_(False)
        self.frozen = {name: FrozenModel(path, cfg.dtype, str(self.device),
                                         vocab_size=model.config.vocab_size)
                       for name, path in cfg.frozen_models.items()}

    # --- forwards -------------------------------------------------------------------------
    def _to(self, batch):
        """Tensors to the device (and the row sets of a loss's extra terms, b["extra"])."""
        out = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if batch.get("extra"):
            out["extra"] = {name: self._to(rows) for name, rows in batch["extra"].items()}
        return out

    def _forward(self, model, b, temperature, with_entropy=True):
        """Per-token logprobs (and entropy) of a batch: from packed rows when they apply."""
        if self._packs(b):
            return packed_token_logprobs(model, b["input_ids"], b["attention_mask"], temperature,
                                         with_entropy, b.get("group_ids"))
        return token_logprobs(logits_of(model, b), b["input_ids"], temperature, with_entropy)

    def _packs(self, b) -> bool:
        return (self.padding_free and "pixel_values" not in b
                and is_right_padded(b["attention_mask"]))

    @torch.no_grad()
    def score(self, batch, temperature=1.0, stats: dict | None = None):
        """Logprobs and entropy; with `stats` (StatsSpec keyword arguments, e.g.
        {"waad_window": 10, "fai_band": [10, 100]}, plus an optional "layers" selection,
        default learner.stats_layers) also the attention statistics of those layers, from this
        same forward (rl/engine/frozen.py `scored`)."""
        self.engine.eval()
        b = self._to(batch)
        if stats and self.cfg.attention != "kernels":
            raise RuntimeError("attention statistics need learner.attention=kernels")
        if stats:
            stats = {"layers": self.cfg.stats_layers, **stats}
        return scored(self._module(), lambda: self._forward(self.engine, b, temperature), b,
                      stats, self.cfg.attn_impl)

    @torch.no_grad()
    def ref_score(self, batch, temperature=1.0):
        if self.ref is None:
            raise RuntimeError("no reference model was loaded (algorithm.kl_coef is 0)")
        b = self._to(batch)
        lp, _ = self._forward(self.ref, b, temperature, with_entropy=False)
        return lp.float().cpu()

    def probe(self, batch, probe: Probe):
        """`probe` on the policy (rl/engine/base.py). A probe that differentiates (with respect
        to the input embeddings, say) leaves DeepSpeed's gradient buffers and reduction hooks
        untouched as long as no parameter requires its grad; under ZeRO-3 the forward still
        gathers parameters collectively: every rank must call."""
        self.engine.eval()
        return to_cpu(probe(PolicyView(self), self._to(batch)))

    # --- training ---------------------------------------------------------------------------
    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([float(torch.isfinite(loss).all())], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _null_backward(self, b):
        """A zero-gradient backward through every parameter, so DeepSpeed's per-parameter
        reduction hooks fire the same on every rank even when this micro-batch is dropped
        (a vision-language model's first row whole, so that its vision tower takes part)."""
        if "pixel_values" in b:
            logits = logits_of(self.engine, {k: v[:1] for k, v in b.items()
                                             if k in ("input_ids", "attention_mask", "pixel_values",
                                                      "image_grid_thw")})
        else:
            logits = self.engine(input_ids=b["input_ids"][:1, :1], use_cache=False).logits
        self.engine.backward(logits.sum() * 0.0)

    def train_minibatch(self, micro_batches, loss: Loss, temperature=1.0):
        self.reload()
        if len(micro_batches) != self.cfg.grad_accum_steps:
            raise ValueError(f"expected {self.cfg.grad_accum_steps} micro-batches, "
                             f"got {len(micro_batches)}")
        self.engine.train()
        scale = self.world_size * self.cfg.grad_accum_steps
        metrics: dict[str, float] = {}
        weights: dict[str, float] = {}  # per metric: the tokens of the micro-batches reporting it
        loss_sum, finite = 0.0, True
        for i, mb in enumerate(micro_batches):
            b = self._to(mb)
            if finite:
                out = loss(self.forwards, b, temperature)
                finite = self._all_finite(out.value)
            if not finite:
                self._null_backward(b)
            else:
                self.engine.backward(out.value * scale)
                loss_sum += out.value.item()
                for k, v in out.metrics.items():  # weighted over the micro-batches reporting it
                    n = out.weights[k]
                    metrics[k] = metrics.get(k, 0.0) + v * n
                    weights[k] = weights.get(k, 0.0) + n
            if i == len(micro_batches) - 1 and not finite:
                self._skip_step()
            else:
                self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
        if not finite:
            return {"skipped": 1.0, "loss": float("nan")}
        out: dict = {k: v / max(weights[k], 1.0) for k, v in metrics.items()}
        out["weights"] = weights  # lets the group average each metric over all ranks' tokens
        out["loss"] = loss_sum  # micro losses are already over the global normaliser
        gn = self.engine.get_global_grad_norm()
        out["grad_norm"] = float(gn) if gn is not None else float("nan")
        out["skipped"] = 0.0
        return out

    def _skip_step(self):
        """A skipped minibatch leaves no trace. DeepSpeed's step still runs (its state machine
        needs it), at lr 0 so the weights stay; but Adam's step would still advance its step
        count, decay its moments and fold in the gradients it holds (those of micro-batches
        backwarded before the non-finite one), so this rank's optimizer state is put back."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        saved = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                 for p, st in opt.state.items()}
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.set_lr(0.0)
        self.engine.step()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        for p in list(opt.state):
            if p not in saved:  # state created by this step (a skip before any real step)
                del opt.state[p]
                continue
            st = opt.state[p]
            for k, v in saved[p].items():
                if torch.is_tensor(v) and torch.is_tensor(st.get(k)):
                    st[k].copy_(v)
                else:
                    st[k] = v

    @property
    def forwards(self) -> Forwards:
        return PolicyForwards(self)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # --- weights and state --------------------------------------------------------------------
    def _module(self):
        return self.engine.module

    def named_weights(self):
        import deepspeed

        for name, p in self._module().named_parameters():
            if self.cfg.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    t = p.data.detach().clone().cpu() if self.rank == 0 else None
            else:
                t = p.data.detach().cpu() if self.rank == 0 else None
            if t is not None:
                yield name, t

    def export_hf(self, path: str) -> None:
        state = dict(self.named_weights())  # every rank gathers; rank 0 holds values
        if self.rank != 0:
            return
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self._module().save_pretrained(out, state_dict=state, safe_serialization=True)
        for name in TOKENIZER_FILES:
            src = Path(self.cfg.model_path) / name
            if src.exists() and not (out / name).exists():
                shutil.copy(src, out / name)

    def save(self, path: str) -> None:
        self.reload()
        self.engine.save_checkpoint(path, tag="ds", save_latest=False)

    # --- colocation: learner state out of the way while the engine generates ------------------
    OFFLOADED = ("optim_states", "hp_params", "contiguous_grad_buffer", "lp_grads")

    def offload(self) -> dict[str, float]:
        """With offload_between_updates: optimizer states, fp32 master weights and gradient
        buffers to CPU (DeepSpeed's offload_states); the bf16 weights stay for forwards.
        Returns the seconds taken and the device memory freed (0 on CPU)."""
        if not self.cfg.offload_between_updates or self.offloaded:
            return {}
        from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum, OffloadStateTypeEnum

        t0, before = time.perf_counter(), _device_bytes()
        self.engine.offload_states(include=[OffloadStateTypeEnum(s) for s in self.OFFLOADED],
                                   device=OffloadDeviceEnum.cpu,
                                   pin_memory=torch.cuda.is_available())
        release_cached_memory()
        self.offloaded = True
        return {"offload_s": time.perf_counter() - t0, "offload_freed_bytes": before - _device_bytes()}

    def reload(self) -> None:
        if self.offloaded:
            self.engine.reload_states()
            self.offloaded = False

    def load(self, path: str) -> None:
        load_path, _ = self.engine.load_checkpoint(
            path, tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")

    def optimizer_steps(self) -> int:
        """Optimizer steps taken so far (DeepSpeed's count; one per minibatch, skips included)."""
        return int(self.engine.global_steps)

    def memory(self) -> dict[str, float]:
        """What this rank holds, to set against the README's memory budget: its peak (GPU:
        bytes torch allocated; CPU: the process's peak RSS) and every live tensor's bytes —
        weights, gradients, fp32 master copy, optimizer moments, DeepSpeed's buffers — per
        model parameter. (A census of the tensors Python holds, so no DeepSpeed internals are
        named; ~0.1 s.)"""
        import gc
        import resource

        seen, held = set(), 0
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == self.device.type:
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    held += storage.nbytes()
        params = sum(p.numel() for p in self._module().parameters())
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_gb": peak / 2**30, "tensor_gb": held / 2**30,
                "tensor_bytes_per_param": held / params}

    def optimizer_state_digest(self) -> float:
        """Σ|exp_avg| over this rank's optimizer state: lets tests see it was restored."""
        self.reload()
        total = 0.0
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        for st in opt.state.values():
            if "exp_avg" in st:
                total += st["exp_avg"].abs().sum().item()
        return total


class PolicyForwards(Forwards):
    """What a Loss may run on the policy under training (rl/engine/base.py)."""

    def __init__(self, engine: DeepSpeedEngine):
        self.e = engine

    def logprobs(self, b, temperature, entropy=False):
        return self.e._forward(self.e.engine, b, temperature, entropy)

    def logits(self, *row_sets):
        if len(row_sets) == 1:
            return [logits_of(self.e.engine, row_sets[0])]
        # right-padded to a common width; causal + right padding: the extra columns change
        # nothing before them
        width = max(r["input_ids"].shape[1] for r in row_sets)

        def cat(key):
            return torch.cat([F.pad(r[key].long(), (0, width - r[key].shape[1])) for r in row_sets])

        logits = self.e.engine(input_ids=cat("input_ids"), attention_mask=cat("attention_mask"),
                               use_cache=False).logits
        out, start = [], 0
        for r in row_sets:
            n, t = r["input_ids"].shape
            out.append(logits[start:start + n, :t])
            start += n
        return out

    def attention(self, layers, spec, grad_mass=False):
        from kernels import AttentionCapture

        return AttentionCapture(self.e._module(), layers=layers, spec=spec,
                                impl=self.e.cfg.attn_impl, grad_mass=grad_mass)

    def frozen_logprobs(self, name, b):
        if name not in self.e.frozen:
            raise RuntimeError(f"no frozen model {name!r} loaded beside the policy (loaded: "
                               f"{sorted(self.e.frozen)})")
        return self.e.frozen[name].full_logprobs(b)


class PolicyView(Readable):
    """What a Probe may read of the policy under training."""

    def __init__(self, engine: DeepSpeedEngine):
        self.e = engine

    def module(self):
        return self.e.engine.module

    def next_token_logprobs(self, b, temperature):
        return next_token_logprobs(logits_of(self.e.engine, b), temperature)


def device_env(env: dict) -> dict[str, str]:
    """The environment updates that make DeepSpeed use device 0 (see bind_first_visible_gpu):
    LOCAL_RANK 0, the node position it held kept as NODE_LOCAL_RANK."""
    return {"NODE_LOCAL_RANK": env.get("NODE_LOCAL_RANK", env.get("LOCAL_RANK", "0")),
            "LOCAL_RANK": "0"}


def init_process_group(backend: str, store: torch.distributed.Store, timeout: timedelta,
                       on_gpu: bool) -> None:
    """torch.distributed's default group over `store`, as `deepspeed.init_distributed` would
    form it from env:// (deepspeed/comm/torch.py, init_process_group): on CUDA with more than
    one rank bound to the process's device (cuda:0, bind_first_visible_gpu)."""
    world_size = int(os.environ["WORLD_SIZE"])
    device = {"device_id": torch.device("cuda", 0)} if on_gpu and world_size > 1 else {}
    torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                         world_size=world_size, timeout=timeout, **device)


def bind_first_visible_gpu() -> None:
    """A learner rank trains on the first GPU it sees: Ray shows each rank only its own GPU.

    DeepSpeed's `init_distributed` passes `device_id=cuda:$LOCAL_RANK` to
    `torch.distributed.init_process_group` whenever the world has more than one rank, so a
    torchrun-style LOCAL_RANK (the rank's position on its node: 1 for the second rank there)
    names a device this process does not have and the group never forms. rl/placement.rank_env
    already sets LOCAL_RANK=0; this also covers a process started with a node position in
    LOCAL_RANK (benchmarks/gpu_two_ranks.py starts one that way)."""
    os.environ.update(device_env(os.environ))
    torch.cuda.set_device(0)


def release_cached_memory() -> None:
    """Hand memory this process merely keeps back to the device: on a GPU shared with a vLLM
    engine, PyTorch's cached blocks are memory the engine cannot have; on CPU, glibc keeps the
    heap an update freed (activations and gradients under its 32 MiB mmap threshold) — at
    Qwen3-0.6B's shape ~6 GiB of RSS the engine on the same host then lacked at the next sync
    (benchmarks/results/real_shape/)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _device_bytes() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def skip_cpu_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op at start-up.

    On CPU, `init_distributed` builds `deepspeed_shm_comm` with ninja under
    ~/.cache/torch_extensions, holding a lock file while it checks or builds. A process killed
    in that window (a stopped run, a timed-out test) leaves the lock behind, and every later
    DeepSpeed start on the machine then waits on it forever (seen: learners stuck in
    `FileBaton.wait`). The op only serves `inference_all_reduce`, which training never calls;
    gloo does the all-reduces. Marking it incompatible makes DeepSpeed skip it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
