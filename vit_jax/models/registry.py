"""Named model configurations: every model-zoo name, its AugReg alias, and a few extra models.

Sizes and zoo names are data: `_SIZES` gives the transformer of each width, `_MODELS` one row per name.
`get_model_config(name)` returns a fresh, unlocked `ConfigDict` holding exactly the `VisionTransformer` fields.
"""
import difflib

import ml_collections

from vit_jax.errors import UserError
from vit_jax.models.vit import VisionTransformer

# size: (hidden_size, mlp_dim, num_heads, num_layers)
_SIZES = {
    "Ti": (192, 768, 3, 12),
    "S": (384, 1536, 6, 12),
    "B": (768, 3072, 12, 12),
    "L": (1024, 4096, 16, 24),
    "H": (1280, 5120, 16, 32),
}

# name: size, patch, and the fields that differ from the defaults (dropout 0, token classifier, no ResNet stem).
# A hybrid's `patch` applies to the ResNet feature map: the stem downsamples 4x, and 2x more per extra stage.
_MODELS = {
    "ViT-Ti_16": dict(size="Ti", patch=16),
    "ViT-S_16": dict(size="S", patch=16),
    "ViT-B_16": dict(size="B", patch=16),
    "ViT-L_16": dict(size="L", patch=16, dropout=0.1),
    "ViT-H_14": dict(size="H", patch=14, dropout=0.1),
    "ViT-B_8": dict(size="B", patch=8),
    "ViT-S_32": dict(size="S", patch=32),
    "ViT-B_32": dict(size="B", patch=32),
    "ViT-L_32": dict(size="L", patch=32),
    "ViT-S_16-gap-norep": dict(size="S", patch=16, classifier="gap"),
    "ViT-B_16-gap-norep": dict(size="B", patch=16, classifier="gap"),
    "ViT-S_32-gap-norep": dict(size="S", patch=32, classifier="gap"),
    "ViT-B_32-gap-norep": dict(size="B", patch=32, classifier="gap"),
    "R+ViT-Ti_16": dict(size="Ti", patch=8, resnet=()),
    "R50+ViT-B_16": dict(size="B", patch=1, resnet=(3, 4, 9), dropout=0.1),
    "R26+ViT-B_32": dict(size="B", patch=1, resnet=(2, 2, 2, 2)),
    "R26+ViT-S_32": dict(size="S", patch=1, resnet=(2, 2, 2, 2)),
    "R50+ViT-L_32": dict(size="L", patch=1, resnet=(3, 4, 6, 3), dropout=0.1),
    # Not in the zoo: a one-layer model for tests, and the small CIFAR-10 ViT of the from-scratch course
    # (patch 4 on 32 px: 64 tokens).
    "testing": dict(size=(10, 10, 2, 1), patch=16, dropout=0.1),
    "ViT-CIFAR_4": dict(size=(256, 512, 8, 6), patch=4, dropout=0.2),
}

# The AugReg release ("How to train your ViT?") names files `B_16-i21k-300ep-...npz`, `R26_S_32-...npz`.
_NOT_IN_AUGREG = ("testing", "ViT-CIFAR_4", "ViT-L_32", "R50+ViT-B_16", "ViT-H_14")
AUGREG_ALIASES = {
    name.replace("ViT-", "").replace("+", "_"): name for name in _MODELS if name not in _NOT_IN_AUGREG
}


def _build(name):
  row = _MODELS[name]
  hidden_size, mlp_dim, num_heads, num_layers = _SIZES.get(row["size"], row["size"])
  config = ml_collections.ConfigDict()
  config.model_name = name
  config.patches = ml_collections.ConfigDict({"size": (row["patch"], row["patch"])})
  config.hidden_size = hidden_size
  config.transformer = ml_collections.ConfigDict(dict(
      num_layers=num_layers, mlp_dim=mlp_dim, num_heads=num_heads,
      dropout_rate=row.get("dropout", 0.0), attention_dropout_rate=0.0))
  config.classifier = row.get("classifier", "token")
  config.representation_size = None
  if "resnet" in row:
    config.resnet = ml_collections.ConfigDict({"num_layers": row["resnet"], "width_factor": 1.0})
  return config


def model_names():
  """Canonical names, in table order (AugReg aliases not repeated)."""
  return list(_MODELS)


def canonical_name(name):
  """`ViT-B_16` for `ViT-B_16` or its AugReg alias `B_16`; ValueError naming the closest names otherwise."""
  if name in _MODELS:
    return name
  if name in AUGREG_ALIASES:
    return AUGREG_ALIASES[name]
  known = list(_MODELS) + list(AUGREG_ALIASES)
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
  hint = f"did you mean {' or '.join(close)}?" if close else f"known models: {', '.join(_MODELS)}"
  raise UserError(f"unknown model name {name!r}; {hint}")


def get_model_config(name):
  """A fresh `ConfigDict` of `VisionTransformer` fields for a zoo name or AugReg alias."""
  return _build(canonical_name(name))


def get_model(name, *, num_classes, **overrides):
  """`VisionTransformer` for a registry name; `overrides` replace config fields (nested ones by dict)."""
  config = get_model_config(name)
  fields = set(VisionTransformer.__dataclass_fields__) - {"parent", "name", "num_classes"}
  for key, value in overrides.items():
    if key not in fields:
      raise UserError(f"unknown model field {key!r}; fields are {', '.join(sorted(fields))}")
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      config[key].update(value)
    else:
      config[key] = value
  _check_ranges(config)
  return VisionTransformer(num_classes=num_classes, **config)


def _check_ranges(config):
  """A UserError for a size below 1 or a dropout or drop-path rate outside [0, 1), naming the field."""
  transformer = config.get("transformer") or {}
  sizes = {"hidden_size": config.get("hidden_size"),
           **{f"transformer.{k}": transformer.get(k) for k in ("num_layers", "num_heads", "mlp_dim")}}
  for key, value in sizes.items():
    if isinstance(value, int) and value < 1:
      raise UserError(f"model {key}={value} must be at least 1")
  for key, value in transformer.items():
    if key.endswith("_rate") and not 0 <= value < 1:
      raise UserError(f"model transformer.{key}={value} must be in [0, 1)")
  stochastic_depth = config.get("stochastic_depth", 0.0)
  if not 0 <= stochastic_depth < 1:
    raise UserError(f"model stochastic_depth={stochastic_depth} must be in [0, 1) (0 = off), e.g. 0.1")
