"""AVAR (arXiv 2603.03825, shared specs/papers.md §3): how much a model's attention goes to
the evidence (image tokens of a VLM; operands / relevant statements of a text task) rather
than to the system prompt — measured (VAS), trained up in the cold start (AGTO) and rewarded
in RL (VARS). All three read the fused kernels' key-class masses: no eager attention map.

`scores.py` holds the pure formulas; `visual_attention.py` the RL loop's part (what the
scoring forward must capture, VARS on a scored batch, VAS on an evaluated batch). AGTO
(`agto.py`, avar=agto) is the cold start's objective or, with `avar.agto_at=stage`, a short
SFT stage of its own after the LM cold start (both through rl/loop/cold_start.py `sft_stage`).
"""
