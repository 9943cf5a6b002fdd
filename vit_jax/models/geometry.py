"""Geometry of a ViT model config: its class token, image size, token grid and sequence length, each decided here.

Every function takes a model config (the registry's `ConfigDict` or any mapping with the `VisionTransformer`
fields), so training, the zoo loader, the tools and the FLOP count agree on one answer.
"""
from typing import Any, Mapping, Optional, Tuple

import numpy as np

TOKEN_CLASSIFIERS = ("token", "token_unpooled")  # the classifiers that prepend a class token


def has_class_token(model_config: Mapping[str, Any]) -> bool:
  return model_config.get("classifier", "token") in TOKEN_CLASSIFIERS


def num_prefix_tokens(model_config: Mapping[str, Any]) -> int:
  """Tokens in front of the patch grid in the encoder: the class token and the registers."""
  return int(has_class_token(model_config)) + int(model_config.get("num_registers", 0) or 0)


def posemb_prefix_tokens(model_config: Mapping[str, Any]) -> int:
  """Position embeddings in front of the grid's: none with `no_embed_class`, else one per prefix token."""
  return 0 if model_config.get("no_embed_class", False) else num_prefix_tokens(model_config)


def image_hw(image_size) -> Tuple[int, int]:
  """(height, width) of an image size given as an int (square) or a (height, width) pair."""
  if np.isscalar(image_size):
    return int(image_size), int(image_size)
  height, width = image_size
  return int(height), int(width)


def downsampling(patches: Mapping[str, Any], resnet_config: Optional[Mapping[str, Any]]) -> Tuple[int, int]:
  """Total stride (height, width) from pixels to tokens: the ResNet stem's times the patch size."""
  ph, pw = patches["size"]
  if resnet_config is None:
    return ph, pw
  stem = 4 * 2 ** max(len(resnet_config["num_layers"]) - 1, 0)
  return stem * ph, stem * pw


def stride(model_config: Mapping[str, Any]) -> Tuple[int, int]:
  """`downsampling` of a whole model config."""
  return downsampling(model_config["patches"], model_config.get("resnet"))


def grid_shape(model_config: Mapping[str, Any], image_size) -> Tuple[int, int]:
  """(rows, cols) of the token grid for an image of `image_size` (int or (height, width))."""
  height, width = image_hw(image_size)
  sh, sw = stride(model_config)
  return height // sh, width // sw


def num_tokens(model_config: Mapping[str, Any], image_size) -> int:
  """Sequence length in the encoder (class token and registers included) for an image of `image_size` (int or
  (height, width))."""
  rows, cols = grid_shape(model_config, image_size)
  return rows * cols + num_prefix_tokens(model_config)
