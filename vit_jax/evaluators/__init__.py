"""Evaluators: `classification` (exact test loss and accuracy) and `fewshot` (linear probes on frozen features).

Each is used by the training loop and by its tool (`vit_jax.tools.evaluate`, `vit_jax.tools.fewshot`); an
evaluator takes explicit arguments, never the training config.
"""
