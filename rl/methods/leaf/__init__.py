"""LeaF (arXiv 2506.07851): gradient-guided confounder detection, counterfactual pruning,
causal attention distillation.

`confounders.py` holds the pure tensor/list functions of confounder detection and pruning
(normalisation, teacher−student sensitivity difference, quantile threshold, spans, pruned
copies, detection-quality metrics). It never touches a model: the gradient passes that
produce the per-token sensitivities live elsewhere, so these functions stay cheap to test.
"""
