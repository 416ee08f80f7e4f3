"""The models built here from a config (tiny Qwen3, tiny Qwen2.5-VL, the real-shape BPE
model) and images on the learner side."""
