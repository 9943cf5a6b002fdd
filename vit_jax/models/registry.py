"""Named model configurations: every model-zoo name, its AugReg alias, the BiT ResNets and a few extra models.

Sizes and zoo names are data: `_SIZES` gives the transformer of each width, `_MODELS` one row per ViT name,
`_CNNS` one row per convolutional model with its family. `get_model_config(name)` returns a fresh, unlocked
`ConfigDict` holding exactly the fields of the name's module class (`FAMILIES`); `family(model_config)` says which.
"""
import difflib

import ml_collections

from vit_jax.errors import UserError
from vit_jax.models.bit import BLOCK_UNITS, BiTResNet
from vit_jax.models.cnn import CourseCNN
from vit_jax.models.vit import VisionTransformer

# family: (module class, what it is called in messages)
FAMILIES = {
    "vit": (VisionTransformer, "a Vision Transformer"),
    "bit": (BiTResNet, "a BiT ResNet-v2"),
    "cnn": (CourseCNN, "a plain CNN"),
}
# ViT options and the value at which they are off: a convolutional model accepts them only off (the training
# config always carries them).
VIT_OPTIONS = {"remat": "none", "scan_layers": False, "fused_attention": False, "stochastic_depth": 0.0}
# ViT fields the training config always carries, None meaning "the registry model's value" (a checkpoint's
# architecture and numerics: `configs/common.py`).
REGISTRY_DEFAULT_IF_NONE = ("classifier", "num_registers", "no_embed_class", "fc_norm", "gelu_approximate",
                            "layer_norm_eps")

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
    # Later ViTs, for their published weights (docs/use.md): SigLIP image towers (big_vision; MAP pooling, no class
    # token), DeiT III (LayerScale, no position embedding on the class token; trained with the exact GELU) and
    # timm's register models (`vit_base_patch16_reg4_gap_256`).
    "ViT-B_16-SigLIP": dict(size="B", patch=16, classifier="map"),
    "ViT-L_16-SigLIP": dict(size="L", patch=16, classifier="map"),
    "ViT-So400m_14-SigLIP": dict(size=(1152, 4304, 16, 27), patch=14, classifier="map"),
    **{f"DeiT3-{size}_16": dict(size=size, patch=16, fields=dict(no_embed_class=True, layer_scale_init=1e-6,
                                                                 gelu_approximate=False)) for size in "SBL"},
    "ViT-B_16-reg4-gap": dict(size="B", patch=16, classifier="gap", fields=dict(
        num_registers=4, no_embed_class=True, fc_norm=True, gelu_approximate=False)),
}

# Convolutional models: name -> (family, fields).
_CNNS = {
    **{f"BiT-R{depth}x{width}": ("bit", dict(block_units=BLOCK_UNITS[depth], width_factor=width))
       for depth, width in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))},
    # The from-scratch course's CNN baseline (conv 32-64, 128-128, 256-256, BatchNorm, dense 1024-512).
    "CNN-CIFAR": ("cnn", {}),
}

# The AugReg release ("How to train your ViT?") names files `B_16-i21k-300ep-...npz`, `R26_S_32-...npz`.
_NOT_IN_AUGREG = ("testing", "ViT-CIFAR_4", "ViT-L_32", "R50+ViT-B_16", "ViT-H_14")
AUGREG_ALIASES = {
    name.replace("ViT-", "").replace("+", "_"): name for name in _MODELS
    if name not in _NOT_IN_AUGREG and not name.startswith("DeiT3") and not name.endswith(("SigLIP", "-reg4-gap"))
}


def _build(name):
  if name in _CNNS:
    family_name, fields = _CNNS[name]
    return ml_collections.ConfigDict(dict(model_name=name, family=family_name, **fields))
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
  config.update(row.get("fields", {}))
  if "resnet" in row:
    config.resnet = ml_collections.ConfigDict({"num_layers": row["resnet"], "width_factor": 1.0})
  return config


def model_names():
  """Canonical names, in table order (AugReg aliases not repeated)."""
  return list(_MODELS) + list(_CNNS)


def family(model_config):
  """'vit', 'bit' or 'cnn': the module family of a model config (the registry's, or one read off a file)."""
  return model_config.get("family", "vit")


def family_description(model_config):
  return f"{model_config.get('model_name') or 'the model'} ({FAMILIES[family(model_config)][1]})"


def canonical_name(name):
  """`ViT-B_16` for `ViT-B_16` or its AugReg alias `B_16`; ValueError naming the closest names otherwise."""
  if name in _MODELS or name in _CNNS:
    return name
  if name in AUGREG_ALIASES:
    return AUGREG_ALIASES[name]
  known = model_names() + list(AUGREG_ALIASES)
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
  hint = f"did you mean {' or '.join(close)}?" if close else f"known models: {', '.join(model_names())}"
  raise UserError(f"unknown model name {name!r}; {hint}")


def get_model_config(name, **overrides):
  """A fresh `ConfigDict` of the module's fields for a registry name or AugReg alias, with `overrides` applied
  (nested ones by dict); `family` names the module class for a convolutional model. ViT options at their off
  value are dropped for a CNN, any other value is a UserError naming it; so are unknown fields and values out of
  range."""
  config = _build(canonical_name(name))
  kind = family(config)
  fields = set(FAMILIES[kind][0].__dataclass_fields__) - {"parent", "name", "num_classes", "dtype"}
  for key, value in overrides.items():
    if value is None and key in REGISTRY_DEFAULT_IF_NONE:
      continue
    if kind != "vit" and key in VIT_OPTIONS:
      if value != VIT_OPTIONS[key]:
        raise UserError(f"model option {key}={value} does not apply to {family_description(config)}; drop "
                        f"--config.model.{key} (it is for Vision Transformers)")
      continue
    if key not in fields:
      raise UserError(f"unknown model field {key!r} for {family_description(config)}; fields are "
                      f"{', '.join(sorted(fields))}")
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      config[key].update(value)
    else:
      config[key] = value
  _check_ranges(config)
  return config


def build(model_config, *, num_classes, dtype=None):
  """The module of a model config (`get_model_config`'s, or one read off a checkpoint's shapes)."""
  fields = {k: v for k, v in model_config.items() if k != "family"}
  if dtype is not None:
    fields["dtype"] = dtype
  return FAMILIES[family(model_config)][0](num_classes=num_classes, **fields)


def get_model(name, *, num_classes, dtype=None, **overrides):
  """The module for a registry name; `overrides` replace config fields (nested ones by dict)."""
  return build(get_model_config(name, **overrides), num_classes=num_classes, dtype=dtype)


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
  if config.get("num_registers", 0) < 0:
    raise UserError(f"model num_registers={config.num_registers} must be 0 or more (timm's reg4 models: 4)")
  if config.get("layer_scale_init") is not None and not config.layer_scale_init > 0:
    raise UserError(f"model layer_scale_init={config.layer_scale_init} must be positive (DeiT III: 1e-6), or None "
                    "for no LayerScale")
  stochastic_depth = config.get("stochastic_depth", 0.0)
  if not 0 <= stochastic_depth < 1:
    raise UserError(f"model stochastic_depth={stochastic_depth} must be in [0, 1) (0 = off), e.g. 0.1")
