"""Flax ViT and ResNet-hybrid models, the registry of named (model-zoo) configurations, their geometry and the zoo's
`.npz` format (`vit_jax.models.zoo`)."""
from vit_jax.models.geometry import downsampling, has_class_token, image_hw, num_tokens
from vit_jax.models.registry import AUGREG_ALIASES, canonical_name, get_model, get_model_config, model_names
from vit_jax.models import vit
from vit_jax.models.vit import CLASSIFIERS, REMAT_POLICIES, VisionTransformer, stack_layers, unstack_layers

# Parameter sharding rules of every model family (regex over the path, spec; the first match wins).
SHARDING_RULES = vit.SHARDING_RULES

__all__ = ["AUGREG_ALIASES", "CLASSIFIERS", "REMAT_POLICIES", "SHARDING_RULES", "VisionTransformer",
           "canonical_name", "downsampling", "get_model", "get_model_config", "has_class_token", "image_hw",
           "model_names", "num_tokens", "stack_layers", "unstack_layers"]
