"""Attention with per-head statistics (lse, entropy, look-back distance, WAAD, key-class
masses, FAI) computed without materialising the N x N attention matrix.

Public API: `attention`, `key_class_mass`, `StatsSpec`, `AttnStats`, and for
`transformers` models `AttentionCapture` / `install` (see kernels/README.md).
This package knows nothing about RL, Ray or vLLM; transformers and triton are imported
only when used.
"""

from .api import IMPLS, attention, key_class_mass
from .capture import AttentionCapture, CapturedStats, select_layers
from .hf_hook import ATTN_NAME, install
from .spec import AttnStats, StatsSpec

__all__ = ["IMPLS", "attention", "key_class_mass", "AttnStats", "StatsSpec", "AttentionCapture", "CapturedStats",
           "select_layers", "install", "ATTN_NAME"]
