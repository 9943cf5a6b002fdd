"""timm's layouts: `timm.models.vision_transformer.VisionTransformer` and `timm.models.resnetv2.ResNetV2` (BiT)
state dicts, to and from the zoo's parameter paths; exact both ways (transposes and reshapes only), no torch needed.

ViT keys: fused `blocks.{i}.attn.qkv` (rows: q, k, v, each head-major), torch `Linear` weights (out, in), OIHW
convolutions, `cls_token`, `reg_token` (registers), `pos_embed`, `patch_embed.proj`, `blocks.{i}.ls1/ls2.gamma`
(LayerScale), `norm` (absent with `fc_norm`), `fc_norm`, `attn_pool.{latent,q,kv,proj,norm,mlp}` (MAP pooling:
our `MAPHead_0`), `head`; hybrids put the ResNet stem under `patch_embed.backbone.` (`stem.conv`/`stem.norm` and
`stages.{s}.blocks.{u}.conv1..3/norm1..3/downsample.*`; a stem-only model has `conv`/`norm` directly there).
Options timm has and our ViT does not (qk-norm, a pre-norm, a distillation token, no position embedding) are
refused by name. BiT: `stem.conv`, `stages.{s}.blocks.{u}.{norm1,conv1,norm2,conv2,norm3,conv3,downsample.conv}`,
`norm`, `head.fc` (a 1x1 convolution), the mapping of timm's own big_transfer loader.

A timm file's numerics are not in its tensors: timm's ViT defaults to the exact GELU (a few of its SigLIP models: the
tanh form) and LayerNorm eps 1e-6; `read` says which, from the file's metadata or the hub's `config.json`.
"""
import json
import os
import re

import numpy as np

from vit_jax.errors import UserError
from vit_jax.models import bit, geometry

CONFIG_METADATA = "vit_jax.model_config"
TIMM_METADATA = "timm_kwargs"
TIMM_MODEL_METADATA = "timm_model"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_RESNET = re.compile(r"^block(\d+)/unit(\d+)/(conv|gn)(\d|_proj)/(kernel|scale|bias)$")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TIMM_RESNET = re.compile(r"^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$")

# Per-block parameters that map one to one: zoo suffix -> (timm suffix, kind).
_BLOCK_PARAMS = {
    "LayerNorm_0/scale": ("norm1.weight", "vector"),
    "LayerNorm_0/bias": ("norm1.bias", "vector"),
    "LayerNorm_2/scale": ("norm2.weight", "vector"),
    "LayerNorm_2/bias": ("norm2.bias", "vector"),
    "MlpBlock_3/Dense_0/kernel": ("mlp.fc1.weight", "dense"),
    "MlpBlock_3/Dense_0/bias": ("mlp.fc1.bias", "vector"),
    "MlpBlock_3/Dense_1/kernel": ("mlp.fc2.weight", "dense"),
    "MlpBlock_3/Dense_1/bias": ("mlp.fc2.bias", "vector"),
    "MultiHeadDotProductAttention_1/out/bias": ("attn.proj.bias", "vector"),
    "ls1": ("ls1.gamma", "vector"),
    "ls2": ("ls2.gamma", "vector"),
}
_TOP_PARAMS = {
    "cls": ("cls_token", "vector"),
    "Transformer/posembed_input/pos_embedding": ("pos_embed", "vector"),
    "embedding/kernel": ("patch_embed.proj.weight", "conv"),
    "embedding/bias": ("patch_embed.proj.bias", "vector"),
    "Transformer/encoder_norm/scale": ("norm.weight", "vector"),
    "Transformer/encoder_norm/bias": ("norm.bias", "vector"),
    "head/kernel": ("head.weight", "dense"),
    "head/bias": ("head.bias", "vector"),
    "reg": ("reg_token", "vector"),
    "fc_norm/scale": ("fc_norm.weight", "vector"),
    "fc_norm/bias": ("fc_norm.bias", "vector"),
    "MAPHead_0/probe": ("attn_pool.latent", "vector"),
    "MAPHead_0/MultiHeadDotProductAttention_0/out/bias": ("attn_pool.proj.bias", "vector"),
    "MAPHead_0/LayerNorm_0/scale": ("attn_pool.norm.weight", "vector"),
    "MAPHead_0/LayerNorm_0/bias": ("attn_pool.norm.bias", "vector"),
    "MAPHead_0/MlpBlock_0/Dense_0/kernel": ("attn_pool.mlp.fc1.weight", "dense"),
    "MAPHead_0/MlpBlock_0/Dense_0/bias": ("attn_pool.mlp.fc1.bias", "vector"),
    "MAPHead_0/MlpBlock_0/Dense_1/kernel": ("attn_pool.mlp.fc2.weight", "dense"),
    "MAPHead_0/MlpBlock_0/Dense_1/bias": ("attn_pool.mlp.fc2.bias", "vector"),
}
_QKV = ("query", "key", "value")
_MAP_ATTENTION = "MAPHead_0/MultiHeadDotProductAttention_0/"
# timm parameters of options our ViT does not have: (key pattern, the option, what to do).
_UNSUPPORTED = (
    (re.compile(r"^blocks\.\d+\.attn\.(q_norm|k_norm)\."), "qk_norm (LayerNorm on queries and keys)"),
    (re.compile(r"^norm_pre\."), "pre_norm (a LayerNorm before the blocks, CLIP-style)"),
    (re.compile(r"^(dist_token|head_dist\.)"), "a distillation token (DeiT distilled models)"),
    (re.compile(r"^blocks\.\d+\.(attn\.norm|norm1_post|norm2_post|mlp\.norm)\."), "extra norms inside the blocks"),
    (re.compile(r"^attn_pool\.(q_norm|k_norm|pos_embed)"), "a MAP head with qk-norm or its own position embedding"),
)

# BiT ResNet-v2: big_transfer key -> timm key, as timm's `resnetv2._load_weights` reads the files.
_BIT_TOP = {
    "resnet/root_block/standardized_conv2d/kernel": "stem.conv.weight",
    "resnet/group_norm/gamma": "norm.weight",
    "resnet/group_norm/beta": "norm.bias",
    "resnet/head/conv2d/kernel": "head.fc.weight",
    "resnet/head/conv2d/bias": "head.fc.bias",
}
_BIT_UNIT_PARAMS = {
    "a/standardized_conv2d/kernel": "conv1.weight",
    "b/standardized_conv2d/kernel": "conv2.weight",
    "c/standardized_conv2d/kernel": "conv3.weight",
    "a/group_norm/gamma": "norm1.weight",
    "a/group_norm/beta": "norm1.bias",
    "b/group_norm/gamma": "norm2.weight",
    "b/group_norm/beta": "norm2.bias",
    "c/group_norm/gamma": "norm3.weight",
    "c/group_norm/beta": "norm3.bias",
    "a/proj/standardized_conv2d/kernel": "downsample.conv.weight",
}
_BIT_UNIT = re.compile(r"^resnet/block(\d+)/unit(\d+)/(.+)$")
_TIMM_BIT_UNIT = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
TIMM_BIT_STEM = "stem.conv.weight"  # a timm ResNetV2 state dict (a hybrid ViT's is under patch_embed.backbone.)


def _to_timm_array(value, kind):
  if kind == "conv" and value.ndim == 4:  # HWIO -> OIHW (a GroupNorm vector beside a conv passes through)
    return value.transpose(3, 2, 0, 1)
  if kind == "dense":  # (in, out) -> (out, in)
    return value.T
  return value


def _from_timm_array(value, kind):
  if kind == "conv" and value.ndim == 4:  # OIHW -> HWIO
    return value.transpose(2, 3, 1, 0)
  if kind == "dense":
    return value.T
  return value


def _resnet_prefix(has_stages):
  # timm's stem-only backbone (`create_resnetv2_stem`) is the stem module itself.
  return "patch_embed.backbone.stem." if has_stages else "patch_embed.backbone."


def zoo_to_timm(flat):
  """Flat zoo params {'a/b': array} -> timm state dict {'a.b': array} (numpy; exact)."""
  flat = dict(flat)
  map_attention = {name: flat.pop(_MAP_ATTENTION + name) for name in [k[len(_MAP_ATTENTION):] for k in flat
                                                                       if k.startswith(_MAP_ATTENTION)]
                   if name != "out/bias"}
  if any(key.startswith("pre_logits/") for key in flat):
    raise UserError("the model has a representation layer (pre_logits), which timm's VisionTransformer does not "
                    "have; export a model without one (representation_size=None)")
  has_stages = any(_RESNET.match(key) for key in flat)
  out, blocks = {}, {}
  for key, value in flat.items():
    value = np.asarray(value)
    if key in _TOP_PARAMS:
      name, kind = _TOP_PARAMS[key]
      out[name] = _to_timm_array(value, kind)
    elif m := _BLOCK.match(key):
      layer, rest = m.groups()
      if rest in _BLOCK_PARAMS:
        name, kind = _BLOCK_PARAMS[rest]
        out[f"blocks.{layer}.{name}"] = _to_timm_array(value, kind)
      elif rest == "MultiHeadDotProductAttention_1/out/kernel":  # (heads, head_dim, D) -> (D, heads * head_dim)
        out[f"blocks.{layer}.attn.proj.weight"] = value.reshape(-1, value.shape[-1]).T
      elif rest.startswith("MultiHeadDotProductAttention_1/"):
        blocks.setdefault(layer, {})[rest.split("/", 1)[1]] = value
      else:
        raise UserError(f"parameter {key} has no timm counterpart")
    elif key in ("conv_root/kernel", "gn_root/scale", "gn_root/bias"):
      prefix = _resnet_prefix(has_stages)
      name = {"conv_root/kernel": "conv.weight", "gn_root/scale": "norm.weight", "gn_root/bias": "norm.bias"}[key]
      out[prefix + name] = _to_timm_array(value, "conv")
    elif m := _RESNET.match(key):
      stage, unit, op, index, param = m.groups()
      module = ("downsample." + ("conv" if op == "conv" else "norm")) if index == "_proj" else (
          ("conv" if op == "conv" else "norm") + index)
      name = "weight" if param in ("kernel", "scale") else "bias"
      out[f"patch_embed.backbone.stages.{int(stage) - 1}.blocks.{int(unit) - 1}.{module}.{name}"] = (
          _to_timm_array(value, "conv"))
    else:
      raise UserError(f"parameter {key} has no timm counterpart")
  for layer, attention in blocks.items():
    # (D, heads, head_dim) kernels -> rows of (3 * D, D), q then k then v, each head-major as timm splits them.
    out[f"blocks.{layer}.attn.qkv.weight"] = np.concatenate(
        [attention[f"{n}/kernel"].reshape(attention[f"{n}/kernel"].shape[0], -1).T for n in _QKV], axis=0)
    out[f"blocks.{layer}.attn.qkv.bias"] = np.concatenate([attention[f"{n}/bias"].reshape(-1) for n in _QKV])
  if map_attention:  # timm's attn_pool: its own q, and k and v fused as kv
    heads_flat = lambda name: np.asarray(map_attention[name]).reshape(np.shape(map_attention[name])[0], -1).T
    out["attn_pool.q.weight"] = heads_flat("query/kernel")
    out["attn_pool.q.bias"] = np.asarray(map_attention["query/bias"]).reshape(-1)
    out["attn_pool.kv.weight"] = np.concatenate([heads_flat("key/kernel"), heads_flat("value/kernel")], axis=0)
    out["attn_pool.kv.bias"] = np.concatenate([np.asarray(map_attention[f"{n}/bias"]).reshape(-1)
                                               for n in ("key", "value")])
    kernel = np.asarray(map_attention["out/kernel"])
    out["attn_pool.proj.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def timm_to_zoo(state, num_heads):
  """timm state dict -> flat zoo params; `num_heads` splits the fused qkv and the output projection."""
  inverse_top = {name: (key, kind) for key, (name, kind) in _TOP_PARAMS.items()}
  inverse_block = {name: (key, kind) for key, (name, kind) in _BLOCK_PARAMS.items()}
  has_stages = any(_TIMM_RESNET.match(key) for key in state)
  stem = _resnet_prefix(has_stages)
  out = {}
  for name in state:
    for pattern, option in _UNSUPPORTED:
      if pattern.search(name):
        raise UserError(f"timm parameter {name} belongs to {option}, which the ViT here does not have; use a "
                        "timm model without it")
  for name, value in state.items():
    value = np.asarray(value)
    if name in inverse_top:
      key, kind = inverse_top[name]
      out[key] = _from_timm_array(value, kind)
    elif name.startswith("attn_pool.") and name.split(".")[1] in ("q", "kv", "proj"):
      module, param = name.split(".")[1:]
      if module == "proj":
        out[_MAP_ATTENTION + "out/kernel"] = value.T.reshape(num_heads, value.shape[1] // num_heads, value.shape[0])
      elif param == "weight":
        hidden = value.shape[1]
        for n, part in zip(("query",) if module == "q" else ("key", "value"), np.split(value, len(module), axis=0)):
          out[_MAP_ATTENTION + f"{n}/kernel"] = part.T.reshape(hidden, num_heads, hidden // num_heads)
      else:
        for n, part in zip(("query",) if module == "q" else ("key", "value"), np.split(value, len(module))):
          out[_MAP_ATTENTION + f"{n}/bias"] = part.reshape(num_heads, -1)
    elif m := _TIMM_BLOCK.match(name):
      layer, rest = m.groups()
      prefix = f"Transformer/encoderblock_{layer}/"
      attention = prefix + "MultiHeadDotProductAttention_1/"
      if rest in inverse_block:
        key, kind = inverse_block[rest]
        out[prefix + key] = _from_timm_array(value, kind)
      elif rest == "attn.proj.weight":
        hidden = value.shape[0]
        out[attention + "out/kernel"] = value.T.reshape(num_heads, hidden // num_heads, hidden)
      elif rest == "attn.qkv.weight":
        hidden = value.shape[1]
        for n, part in zip(_QKV, np.split(value, 3, axis=0)):
          out[attention + f"{n}/kernel"] = part.T.reshape(hidden, num_heads, hidden // num_heads)
      elif rest == "attn.qkv.bias":
        for n, part in zip(_QKV, np.split(value, 3)):
          out[attention + f"{n}/bias"] = part.reshape(num_heads, -1)
      else:
        raise UserError(f"timm parameter {name} has no counterpart in the ViT here")
    elif name.startswith(stem) and name[len(stem):] in ("conv.weight", "norm.weight", "norm.bias"):
      key = {"conv.weight": "conv_root/kernel", "norm.weight": "gn_root/scale", "norm.bias": "gn_root/bias"}[
          name[len(stem):]]
      out[key] = _from_timm_array(value, "conv")
    elif m := _TIMM_RESNET.match(name):
      stage, unit, rest = m.groups()
      module, param = rest.rsplit(".", 1)
      op = {"downsample.conv": "conv_proj", "downsample.norm": "gn_proj"}.get(module)
      if op is None and re.fullmatch(r"(conv|norm)\d", module):
        op = ("conv" if module.startswith("conv") else "gn") + module[-1]
      if op is None:
        raise UserError(f"timm parameter {name} has no zoo counterpart")
      zoo_param = "kernel" if op.startswith("conv") else ("scale" if param == "weight" else "bias")
      out[f"block{int(stage) + 1}/unit{int(unit) + 1}/{op}/{zoo_param}"] = _from_timm_array(value, "conv")
    else:
      raise UserError(f"timm parameter {name} has no zoo counterpart")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def bit_to_timm(flat):
  """Flat BiT params (big_transfer keys) -> timm `ResNetV2` state dict (numpy; exact: HWIO -> OIHW only)."""
  out = {}
  for key, value in flat.items():
    value = np.asarray(value)
    if key in _BIT_TOP:
      out[_BIT_TOP[key]] = _to_timm_array(value, "conv")
    elif (m := _BIT_UNIT.match(key)) and m.group(3) in _BIT_UNIT_PARAMS:
      block, unit, rest = m.groups()
      out[f"stages.{int(block) - 1}.blocks.{int(unit) - 1}.{_BIT_UNIT_PARAMS[rest]}"] = _to_timm_array(value, "conv")
    else:
      raise UserError(f"parameter {key} has no timm counterpart in a BiT ResNet-v2")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def timm_to_bit(state):
  """timm `ResNetV2` (`resnetv2_*_bit`) state dict -> flat BiT params with big_transfer keys (exact)."""
  inverse_top = {name: key for key, name in _BIT_TOP.items()}
  inverse_unit = {name: rest for rest, name in _BIT_UNIT_PARAMS.items()}
  out = {}
  for name, value in state.items():
    value = np.asarray(value)
    if name in inverse_top:
      out[inverse_top[name]] = _from_timm_array(value, "conv")
    elif (m := _TIMM_BIT_UNIT.match(name)) and m.group(3) in inverse_unit:
      stage, block, rest = m.groups()
      out[f"resnet/block{int(stage) + 1}/unit{int(block) + 1:02d}/{inverse_unit[rest]}"] = (
          _from_timm_array(value, "conv"))
    else:
      raise UserError(f"timm parameter {name} has no BiT counterpart (only timm's resnetv2_*_bit layout is "
                      "supported: pre-activation bottlenecks, GroupNorm, a 1x1-conv head)")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def timm_bit_name(model_config):
  """timm's registered name of a BiT config (`resnetv2_50x1_bit`), or None for a layout timm does not register."""
  depths = {tuple(units): depth for depth, units in bit.BLOCK_UNITS.items()}
  depth = depths.get(tuple(model_config.block_units))
  return f"resnetv2_{depth}x{model_config.width_factor}_bit" if depth else None


def timm_kwargs(model_config, num_classes, image_size):
  """Arguments of timm's `VisionTransformer` (plain ViTs; hybrids need the backbone as `embed_layer` too)."""
  transformer = model_config.transformer
  classifier = model_config.get("classifier", "token")
  kwargs = dict(
      img_size=image_size, patch_size=tuple(model_config.patches.size), num_classes=num_classes,
      embed_dim=model_config.hidden_size, depth=transformer.num_layers, num_heads=transformer.num_heads,
      mlp_ratio=transformer.mlp_dim / model_config.hidden_size,
      class_token=geometry.has_class_token(model_config),
      global_pool={"token": "token", "gap": "avg"}.get(classifier, ""),
      fc_norm=bool(model_config.get("fc_norm", False)),
      act_layer="gelu_tanh" if model_config.get("gelu_approximate", True) else "gelu",
      reg_tokens=int(model_config.get("num_registers", 0) or 0),
      no_embed_class=bool(model_config.get("no_embed_class", False)),
      init_values=model_config.get("layer_scale_init"))
  if classifier == "map":
    kwargs["global_pool"] = "map"
  if model_config.get("resnet") is not None:
    kwargs["resnet_layers"] = tuple(model_config.resnet.num_layers)
    kwargs["resnet_width_factor"] = model_config.resnet.width_factor
  return kwargs



# --- files -----------------------------------------------------------------------------------------------------

WEIGHTS_FILE = "model.safetensors"
HUB_CONFIG_FILE = "config.json"  # timm's hub config: `architecture`, `num_classes`, `pretrained_cfg`
# timm's ViT architectures built with the tanh GELU (timm 1.0.31's `act_layer='gelu_tanh'`): some of its SigLIP
# towers; the others, like every other ViT there, use the exact GELU.
TANH_GELU_ARCHITECTURES = frozenset(
    f"vit_{size}_siglip{pool}_{res}" for pool in ("", "_gap") for size, res in (
        ("base_patch32", 256), ("large_patch16", 512), ("so400m_patch16", 256), ("so400m_patch16", 384),
        ("so400m_patch16", 512), ("giantopt_patch16", 256), ("giantopt_patch16", 384)))
# Attention heads of timm's ViT size names (its hub config.json does not record them).
_HEADS_OF_SIZE = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16,
                  "gigantic": 16, "so150m": 16, "so400m": 16}


def safetensors_numpy():
  try:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("reading or writing .safetensors needs the safetensors package: pip install safetensors") from None
  return st_numpy


def read_safetensors(path):
  """(state dict of numpy arrays, metadata dict) of a .safetensors file."""
  st_numpy = safetensors_numpy()
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist; pass a .safetensors file")
  try:
    with safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
    return st_numpy.load_file(path), metadata
  except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own error types
    raise UserError(f"cannot read {path} as safetensors ({type(e).__name__}: {e}); is it a complete "
                    ".safetensors file?") from None


def is_timm_dir(path):
  """A directory as timm's hub repos hold it: `model.safetensors` beside a `config.json` naming an
  `architecture`."""
  config = _hub_config(path) if os.path.isdir(path) else None
  return bool(config and "architecture" in config and os.path.isfile(os.path.join(path, WEIGHTS_FILE)))


def _hub_config(directory):
  try:
    with open(os.path.join(directory, HUB_CONFIG_FILE), encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError):
    return None
  return config if isinstance(config, dict) else None


def _heads_of(architecture, hidden):
  words = set(re.split(r"[_.]", architecture or ""))
  return next((heads for size, heads in _HEADS_OF_SIZE.items() if size in words), None)


def read(path, num_heads=None):
  """(flat zoo params, model fields, image size or None) of a timm `.safetensors` file or hub directory
  (`model.safetensors` + `config.json`). BiT files (`resnetv2_*_bit`) give fields {'family': 'bit'}.

  The fields are those the tensors do not show: the GELU form (`gelu_approximate`: from our export's metadata, the
  hub config's `model_args`, else tanh only for `TANH_GELU_ARCHITECTURES`, timm's default being the exact GELU)
  and the LayerNorm eps (1e-6).
  `num_heads` (needed to split the fused attention) comes from our export's metadata, the hub architecture's size
  name, or the caller."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  weights = os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else path
  state, metadata = read_safetensors(weights)
  hub_config = _hub_config(directory) or {}
  if TIMM_BIT_STEM in state:
    return timm_to_bit(state), {"family": "bit"}, None
  ours = json.loads(metadata[CONFIG_METADATA]) if CONFIG_METADATA in metadata else {}
  architecture = hub_config.get("architecture") or metadata.get(TIMM_MODEL_METADATA)
  kwargs = json.loads(metadata[TIMM_METADATA]) if TIMM_METADATA in metadata else dict(
      hub_config.get("model_args") or {})
  hidden = state["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in state else None
  num_heads = num_heads or (ours.get("transformer") or {}).get("num_heads") or kwargs.get("num_heads") or (
      _heads_of(architecture, hidden))
  if num_heads is None:
    raise UserError(f"{path} does not say its number of attention heads (no vit_jax metadata, no timm architecture "
                    "name); pass --num_heads or --model_name so the fused qkv weights can be split into heads")
  qkv = state.get("blocks.0.attn.qkv.weight")
  if qkv is not None and qkv.shape[1] % num_heads:
    raise UserError(f"num_heads={num_heads} does not divide the width {qkv.shape[1]} of {path}")
  flat = timm_to_zoo(state, num_heads)
  if "gelu_approximate" in ours:
    gelu_approximate = ours["gelu_approximate"]
  elif "act_layer" in kwargs:
    gelu_approximate = kwargs["act_layer"] in ("gelu_tanh", "gelu_pytorch_tanh")
  elif ours:  # our exports before the field: the zoo's tanh GELU
    gelu_approximate = True
  else:
    gelu_approximate = architecture in TANH_GELU_ARCHITECTURES
  fields = {"gelu_approximate": bool(gelu_approximate), "layer_norm_eps": float(ours.get("layer_norm_eps", 1e-6))}
  if kwargs.get("no_embed_class") is not None:
    fields["no_embed_class"] = bool(kwargs["no_embed_class"])
  image_size = None
  input_size = (hub_config.get("pretrained_cfg") or {}).get("input_size") or kwargs.get("img_size")
  if isinstance(input_size, (list, tuple)) and len(input_size) == 3:
    image_size = int(input_size[-1])
  elif isinstance(input_size, int):
    image_size = input_size
  return flat, fields, image_size
