"""One GPU shared by the learner and the engines (experiment=debug_gpu): who holds it, when.

Each side's big memory must be gone before the other's arrives — the README's memory budget
assumes they never overlap:

    start:      engines start and profile the GPU alone, then sleep; the learner starts
    step:       generation (engines awake; learner: bf16 weights only)
                → `to_learner`: engines sleep (level 1: weights to CPU RAM, KV cache dropped)
                → scoring, update (the learner's optimizer state comes back)
                → `to_engines`: the learner offloads its optimizer state, fp32 master weights and
                  gradient buffers, and empties its allocator's cache; then the weight sync
                  wakes the engines (weights, then the KV cache once they are loaded)
    checkpoint: `learner_alone`: engines asleep while the learner holds its state again to save

vLLM's start-up profiling measures the device's free memory and fails ("Error in memory
profiling") when it grows while it measures, so nothing else may start or end on the GPU
meanwhile: the engines start after the cold start's learner has exited
(`LearnerGroup.shutdown` waits for its processes) and before the RL learner. Where nothing is
shared (CPU, or GPUs of their own) every step here is a no-op: engines with sleep_level 0 never
sleep, and a learner without offload_between_updates keeps its state.
"""
from __future__ import annotations

from contextlib import contextmanager


def shares_gpu(num_gpus_per_rank: float, num_gpus_per_engine: float) -> bool:
    """Learner ranks and engines on fractions of GPUs: Ray packs fractions onto one GPU."""
    return any(0 < g < 1 for g in (num_gpus_per_rank, num_gpus_per_engine))


def start_both(start_engines, start_learner, shared: bool):
    """Start the engines and the learner side (zero-argument callables); returns both. On a
    shared GPU the engines start first and alone — vLLM profiles the device's memory while it
    starts and sizes its KV cache from it — and sleep while the learner starts; elsewhere both
    start at once (their start-ups overlap)."""
    engines = start_engines()
    if shared:
        engines.ready()
        to_learner(engines)
    return engines, start_learner()


def to_learner(engines) -> dict[str, float]:
    """The step's generation is done: the engines sleep, the GPU is the learner's."""
    return engines.sleep()


def to_engines(learner, engines, version: int) -> dict[str, float]:
    """The update is done: the learner's state leaves the GPU first, then the weight sync wakes
    the engines and fills them with policy `version`. (The other order would put the engines'
    weights and KV cache on the GPU while the optimizer state still holds it.)"""
    metrics = learner.offload()
    metrics.update(engines.sync_from(learner, version))
    return metrics


@contextmanager
def learner_alone(learner, engines, version: int):
    """For work that needs the learner's full state on the GPU outside an update (a
    checkpoint): the engines sleep meanwhile and get the GPU back — with policy `version`,
    which a level-2 sleep dropped — when it is done."""
    slept = engines.sleep()
    yield
    if slept:
        to_engines(learner, engines, version)
    else:  # nothing sleeps: no engine shares the GPU, but the learner's state goes back to CPU
        learner.offload()
