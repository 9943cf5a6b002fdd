"""Flax models: ViT and ResNet hybrids, BiT ResNet-v2 and a small CNN; the registry of named configurations, their
geometry and the zoo's `.npz` format (`vit_jax.models.zoo`)."""
from vit_jax.models.geometry import downsampling, has_class_token, image_hw, num_tokens
from vit_jax.models.registry import (AUGREG_ALIASES, FAMILIES, build, canonical_name, family, family_description,
                                     get_model, get_model_config, model_names)
from vit_jax.models import bit, cnn, vit
from vit_jax.models.bit import BiTResNet
from vit_jax.models.cnn import CourseCNN
from vit_jax.models.vit import CLASSIFIERS, REMAT_POLICIES, VisionTransformer, stack_layers, unstack_layers

# Parameter sharding rules of every model family (regex over the path, spec; the first match wins).
SHARDING_RULES = vit.SHARDING_RULES + bit.SHARDING_RULES + cnn.SHARDING_RULES

__all__ = ["AUGREG_ALIASES", "BiTResNet", "CLASSIFIERS", "CourseCNN", "FAMILIES", "REMAT_POLICIES", "SHARDING_RULES",
           "VisionTransformer", "build", "canonical_name", "downsampling", "family", "family_description",
           "get_model", "get_model_config", "has_class_token", "image_hw", "model_names", "num_tokens",
           "stack_layers", "unstack_layers"]
