"""Flax ViT and ResNet-hybrid models, and the registry of named (model-zoo) configurations."""
from vit_jax.models.registry import AUGREG_ALIASES, canonical_name, get_model, get_model_config, model_names
from vit_jax.models.vit import (CLASSIFIERS, REMAT_POLICIES, VisionTransformer, downsampling, num_tokens,
                                stack_layers, unstack_layers)

__all__ = ["AUGREG_ALIASES", "CLASSIFIERS", "REMAT_POLICIES", "VisionTransformer", "canonical_name", "downsampling",
           "get_model", "get_model_config", "model_names", "num_tokens", "stack_layers", "unstack_layers"]
