"""Flax ViT and ResNet-hybrid models, and the registry of named (model-zoo) configurations."""
from vit_jax.models.registry import AUGREG_ALIASES, canonical_name, get_model, get_model_config, model_names
from vit_jax.models.vit import CLASSIFIERS, VisionTransformer, downsampling, num_tokens

__all__ = ["AUGREG_ALIASES", "CLASSIFIERS", "VisionTransformer", "canonical_name", "downsampling", "get_model",
           "get_model_config", "model_names", "num_tokens"]
