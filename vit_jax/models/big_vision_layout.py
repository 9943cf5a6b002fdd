"""big_vision's `.npz` layout of a ViT to and from the zoo's parameter paths; exact both ways.

big_vision saves `params/...` (its checkpoints also hold `opt/...`), and two-tower models (SigLIP, LiT) put the
image tower under `params/img/` beside `params/txt/`. Inside, a ViT differs from the zoo's in three ways: the
position embedding is top-level `pos_embedding` (not `Transformer/posembed_input/pos_embedding`), the encoder
blocks use Linen names (`LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`), and with
`scan=True` they are stacked along a leading layer axis under `Transformer/encoderblock/`. MAP pooling is
`MAPHead_0/` (our `MAPHead`, same names). big_vision computes with the tanh GELU and LayerNorm eps 1e-6, the zoo's.
"""
import re

import numpy as np

from vit_jax.errors import UserError

POSEMB = "pos_embedding"
ZOO_POSEMB = "Transformer/posembed_input/pos_embedding"
_TOWER_PREFIXES = ("params/img/", "opt/target/img/", "img/")
_PREFIXES = ("params/", "opt/target/")
_STACKED = "Transformer/encoderblock/"
_ZOO_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/([^/]+)(/.*)?$")
# Linen-era block submodule (big_vision's, and the zoo's later files') -> the zoo's pre-Linen name, and back.
LINEN_TO_ZOO_BLOCK_NAMES = {"LayerNorm_0": "LayerNorm_0",
                            "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                            "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
_ZOO_TO_LINEN_BLOCK_NAMES = {v: k for k, v in LINEN_TO_ZOO_BLOCK_NAMES.items()}


def is_big_vision(flat):
  """True for the keys of a big_vision ViT file: a `params/` or image-tower prefix, a top-level position embedding,
  or stacked encoder blocks."""
  return any(key.startswith(_PREFIXES + _TOWER_PREFIXES) or key == POSEMB or key.startswith(_STACKED)
             or key.startswith("txt/") for key in flat)


def _image_tower(flat, path):
  """The image tower's (or a one-tower model's) parameters, prefixes removed; other trees (`opt/`, `txt/`, the
  two-tower temperature `t` and bias `b`) are dropped."""
  for prefix in _TOWER_PREFIXES:
    if any(key.startswith(prefix) for key in flat):
      return {key[len(prefix):]: value for key, value in flat.items() if key.startswith(prefix)}
  for prefix in _PREFIXES:
    if any(key.startswith(prefix) for key in flat):
      flat = {key[len(prefix):]: value for key, value in flat.items() if key.startswith(prefix)}
      break
  if any(key.startswith("txt/") for key in flat):
    raise UserError(f"{path} is a two-tower checkpoint without an image tower (txt/ but no img/ parameters); "
                    "pass a file holding an image tower (a SigLIP or LiT checkpoint has both)")
  return flat


def to_zoo(flat, path="the checkpoint"):
  """Flat zoo params of big_vision's flat {key: array}: the image tower, the position embedding moved, blocks
  unstacked and renamed to the zoo's names."""
  flat = _image_tower(flat, path)
  if "embedding/kernel" not in flat:
    raise UserError(f"{path} has no ViT patch embedding (embedding/kernel) in its image tower; it is not a "
                    "big_vision ViT checkpoint")
  if POSEMB not in flat and ZOO_POSEMB not in flat:
    raise UserError(f"{path} stores no position embedding (big_vision's posemb='sincos2d' computes it); the ViT here "
                    "learns them: use a checkpoint trained with posemb='learn'")
  out = {}
  for key, value in flat.items():
    value = np.asarray(value)
    if key == POSEMB:
      out[ZOO_POSEMB] = value
    elif key.startswith(_STACKED):
      module, slash, tail = key[len(_STACKED):].partition("/")
      name = LINEN_TO_ZOO_BLOCK_NAMES.get(module, module) + slash + tail
      for layer, layer_value in enumerate(value):
        out[f"Transformer/encoderblock_{layer}/{name}"] = layer_value
    elif m := _ZOO_BLOCK.match(key):
      module = LINEN_TO_ZOO_BLOCK_NAMES.get(m.group(2), m.group(2))
      out[f"Transformer/encoderblock_{m.group(1)}/{module}{m.group(3) or ''}"] = value
    else:
      out[key] = value
  return out


def from_zoo(flat, *, stacked=False):
  """big_vision's flat {key: array} (`params/` prefix) of flat zoo params; `stacked`: the scan layout."""
  out, layers = {}, {}
  for key, value in flat.items():
    value = np.asarray(value)
    if key == ZOO_POSEMB:
      out["params/" + POSEMB] = value
    elif m := _ZOO_BLOCK.match(key):
      name = f"{_ZOO_TO_LINEN_BLOCK_NAMES.get(m.group(2), m.group(2))}{m.group(3) or ''}"
      if stacked:
        layers.setdefault(name, {})[int(m.group(1))] = value
      else:
        out[f"params/Transformer/encoderblock_{m.group(1)}/{name}"] = value
    else:
      out["params/" + key] = value
  for name, by_layer in layers.items():
    out[f"params/{_STACKED}{name}"] = np.stack([by_layer[i] for i in sorted(by_layer)])
  return out
