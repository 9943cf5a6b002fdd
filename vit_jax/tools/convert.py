"""Convert between zoo `.npz` checkpoints and timm-compatible PyTorch state dicts in `.safetensors`, no torch needed.

  python -m vit_jax.tools.convert --input=runs/quickstart --output=model.safetensors        # workdir or .npz -> timm
  python -m vit_jax.tools.convert --input=model.safetensors --output=model.npz              # timm -> zoo
  python -m vit_jax.tools.convert --input=runs/quickstart --output=hf_vit --to=hf           # -> transformers
  python -m vit_jax.tools.convert --input=hf_vit --output=model.npz                         # transformers -> zoo

The direction follows the file extensions. The timm layout (`timm.models.vision_transformer.VisionTransformer`):
fused `blocks.{i}.attn.qkv` (rows: q, k, v, each head-major), torch `Linear` weights (out, in), OIHW convolutions,
`cls_token`, `pos_embed`, `patch_embed.proj`, `norm`, `head`; hybrids put the ResNet stem under
`patch_embed.backbone.` (`stem.conv`/`stem.norm` and `stages.{s}.blocks.{u}.conv1..3/norm1..3/downsample.*`; a
stem-only model has `conv`/`norm` directly there), as timm's `vit_*_r*` models do. Both directions are exact
(transposes and reshapes only), so npz -> safetensors -> npz gives back the same bits.

The exported file's metadata holds `vit_jax.model_config` (JSON) and `timm_kwargs` (JSON): the
`VisionTransformer(**timm_kwargs)` arguments that rebuild the model in timm. Going back, the number of heads comes
from that metadata, or from `--model_name`/`--num_heads` for files exported by other tools. Notes for comparing
outputs with timm: the zoo uses the tanh approximation of GELU (`timm_kwargs` sets `act_layer='gelu_tanh'`),
`gap` models pool after the final norm (`fc_norm=False`), and hybrids' GroupNorm eps is 1e-6 (timm's default
1e-5). timm has no representation (`pre_logits`) layer, so models with one cannot be exported.

BiT ResNet-v2 checkpoints (big_transfer keys) become timm's `resnetv2_*_bit` state dict (`timm.models.resnetv2
.ResNetV2`): `stem.conv`, `stages.{s}.blocks.{u}.{norm1,conv1,norm2,conv2,norm3,conv3,downsample.conv}`, `norm`
and `head.fc` (a 1x1 convolution), the mapping of timm's own big_transfer loader (`resnetv2._load_weights`),
exact both ways. The metadata's `timm_model` names timm's model where there is one
(`timm.create_model(timm_model, num_classes=N)` loads the file strictly); `timm_kwargs` holds the `ResNetV2`
arguments (`layers`, `width_factor`, `num_classes`, `stem_type`), to which BiT adds
`conv_layer=partial(StdConv2d, eps=1e-8)`. The course CNN has no timm model and cannot be exported.
"""
import json
import os
import re

from absl import flags, logging
import flax
import numpy as np

from vit_jax import models
from vit_jax.errors import UserError
from vit_jax.models import bit, geometry, hf, zoo
from vit_jax.tools import cli, trained_model

FLAGS = flags.FLAGS


def define_flags():
  """Flags of this tool, defined only when it runs; `--output` is the .safetensors (timm) or .npz (zoo) to write."""
  cli.define_flags("model_name", "output")
  flags.DEFINE_string("input", None, "Workdir, zoo .npz, or timm .safetensors.")
  flags.DEFINE_integer("num_heads", None, "Attention heads, for .safetensors without vit_jax metadata.")
  flags.DEFINE_enum("to", None, ["hf"], "hf: write --output as a Hugging Face transformers ViT directory.")

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
}
_QKV = ("query", "key", "value")

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


# --- layouts ---------------------------------------------------------------------------------------------------


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
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def timm_to_zoo(state, num_heads):
  """timm state dict -> flat zoo params; `num_heads` splits the fused qkv and the output projection."""
  inverse_top = {name: (key, kind) for key, (name, kind) in _TOP_PARAMS.items()}
  inverse_block = {name: (key, kind) for key, (name, kind) in _BLOCK_PARAMS.items()}
  has_stages = any(_TIMM_RESNET.match(key) for key in state)
  stem = _resnet_prefix(has_stages)
  out = {}
  for name, value in state.items():
    value = np.asarray(value)
    if name in inverse_top:
      key, kind = inverse_top[name]
      out[key] = _from_timm_array(value, kind)
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
        raise UserError(f"timm parameter {name} has no zoo counterpart (only plain ViT blocks are supported: no "
                        "layer scale, qk-norm or register tokens)")
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
      fc_norm=False,  # the zoo applies its final LayerNorm to every token, before pooling
      act_layer="gelu_tanh")
  if model_config.get("resnet") is not None:
    kwargs["resnet_layers"] = tuple(model_config.resnet.num_layers)
    kwargs["resnet_width_factor"] = model_config.resnet.width_factor
  return kwargs


# --- files -----------------------------------------------------------------------------------------------------


def _safetensors_numpy():
  try:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("conversion to/from .safetensors needs the safetensors package: pip install safetensors") from None
  return st_numpy


def export_timm(input_path, output_path, model_name=None):
  """Writes the timm state dict of a workdir or zoo `.npz` to `output_path` (.safetensors); returns it."""
  trained = trained_model.load(input_path, model_name=model_name, with_class_names=False)
  family = models.family(trained.model_config)
  if family == "cnn":
    raise UserError(f"{input_path} is {trained_model.describe(trained.model_config)}, which has no timm model; "
                    "convert exports Vision Transformers and BiT ResNets (use the .npz itself)")
  if family == "vit" and not trained.model_config.get("transformer"):
    raise UserError(f"{input_path} is a ResNet without a transformer; timm's VisionTransformer cannot hold it")
  flat = {key: np.asarray(value) for key, value in zoo.flatten(trained.params).items()}
  config_json = json.dumps(trained.model_config.to_dict())
  if family == "bit":
    state = bit_to_timm(flat)
    kwargs = {"layers": list(trained.model_config.block_units), "width_factor": trained.model_config.width_factor,
              "num_classes": trained.num_classes, "stem_type": "fixed"}
    metadata = {"format": "pt", CONFIG_METADATA: config_json, TIMM_METADATA: json.dumps(kwargs)}
    if timm_name := timm_bit_name(trained.model_config):
      metadata[TIMM_MODEL_METADATA] = timm_name
  else:
    state = zoo_to_timm(flat)
    metadata = {"format": "pt", CONFIG_METADATA: config_json,
                TIMM_METADATA: json.dumps(timm_kwargs(trained.model_config, trained.num_classes, trained.image_size))}
  cli.write_output(output_path, lambda path: _safetensors_numpy().save_file(state, path, metadata=metadata))
  logging.info("Wrote %d tensors to %s", len(state), output_path)
  return state


def read_safetensors(path):
  """(state dict of numpy arrays, metadata dict) of a .safetensors file."""
  st_numpy = _safetensors_numpy()
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


def import_timm(input_path, output_path, model_name=None, num_heads=None):
  """Writes the zoo `.npz` of a timm `.safetensors` to `output_path`; returns the flat zoo params."""
  state, metadata = read_safetensors(input_path)
  if TIMM_BIT_STEM in state:
    return _import_bit(state, input_path, output_path, model_name)
  model_config = None
  if CONFIG_METADATA in metadata:
    model_config = json.loads(metadata[CONFIG_METADATA])
  elif model_name:
    model_config = models.get_model_config(model_name).to_dict()
  if num_heads is None:
    if model_config is None or not model_config.get("transformer"):
      raise UserError(f"{input_path} has no vit_jax metadata; pass --num_heads (or --model_name) so the fused "
                      "qkv weights can be split into heads")
    num_heads = model_config["transformer"]["num_heads"]
  if "blocks.0.attn.qkv.weight" in state and state["blocks.0.attn.qkv.weight"].shape[1] % num_heads:
    raise UserError(f"num_heads={num_heads} does not divide the width "
                    f"{state['blocks.0.attn.qkv.weight'].shape[1]} of {input_path}")
  flat = timm_to_zoo(state, num_heads)
  params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  if model_name:  # checks every shape against the named model
    config = models.get_model_config(model_name)
    config.representation_size = None
    num_classes = flat["head/kernel"].shape[-1] if "head/kernel" in flat else 0
    model = models.VisionTransformer(num_classes=num_classes, **config)
    trained_model.check_params_match(params, model, trained_model.posemb_image_size(params, config),
                                     f"model {model_name}")
  cli.write_output(output_path, lambda path: zoo.save(params, path))
  logging.info("Wrote %d arrays to %s", len(flat), output_path)
  return flat


def _import_bit(state, input_path, output_path, model_name):
  """Writes the big_transfer-layout `.npz` of a timm BiT state dict; with `model_name`, checked against it."""
  flat = timm_to_bit(state)
  params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  if model_name:  # the family, the width and then every shape against the named model
    shapes = trained_model.flat_shapes(params)
    config = models.get_model_config(model_name)
    trained_model.check_family(shapes, "bit", config, f"--model_name={model_name}", input_path, named=True)
    model = models.build(config, num_classes=trained_model.num_classes_of(shapes, "bit"))
    trained_model.check_params_match(params, model, bit.MIN_IMAGE_SIZE, f"model {model_name}")
  cli.write_output(output_path, lambda path: zoo.save(params, path))
  logging.info("Wrote %d arrays to %s", len(flat), output_path)
  return flat


def export_hf(input_path, output_dir, model_name=None):
  """Writes a workdir's or zoo `.npz`'s plain ViT as a transformers `ViTForImageClassification` directory."""
  trained = trained_model.load(input_path, model_name=model_name, with_class_names=True)
  if models.family(trained.model_config) != "vit":
    raise UserError(f"{input_path} is {trained_model.describe(trained.model_config)}; transformers' ViT layout holds "
                    "plain Vision Transformers")
  flat = {key: np.asarray(value) for key, value in zoo.flatten(trained.params).items()}
  image_size = geometry.image_hw(trained.image_size)
  if image_size[0] != image_size[1]:
    raise UserError(f"image size {image_size} is not square, which transformers' ViTConfig cannot express")
  cli.write_output(output_dir, lambda path: hf.write(
      flat, trained.model_config, path, num_labels=trained.num_classes, image_size=image_size[0],
      class_names=trained.class_names))
  return flat


def import_hf(input_dir, output_path):
  """Writes the zoo `.npz` of a transformers ViT directory; returns its model fields (the GELU form and LayerNorm
  eps that its logits need are logged: a `.npz` does not record them)."""
  flat, fields, _ = hf.read(input_dir)
  params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  cli.write_output(output_path, lambda path: zoo.save(params, path))
  logging.warning("%s computes with gelu_approximate=%s and layer_norm_eps=%g; set these model fields (config file: "
                  "config.model.update(...)) to reproduce its logits exactly", input_dir, fields["gelu_approximate"],
                  fields["layer_norm_eps"])
  return fields


def main():
  source, target = FLAGS.input, FLAGS.output
  if not source or not target:
    raise UserError("--input and --output are required, e.g. --input=model.npz --output=model.safetensors")
  if FLAGS.to == "hf":
    export_hf(source, target, FLAGS.model_name)
  elif hf.is_hf_dir(source) and target.endswith(".npz"):
    import_hf(source, target)
  elif target.endswith(".safetensors") and (source.endswith(".npz") or os.path.isdir(source)):
    export_timm(source, target, FLAGS.model_name)
  elif source.endswith(".safetensors") and target.endswith(".npz"):
    import_timm(source, target, FLAGS.model_name, FLAGS.num_heads)
  else:
    raise UserError(f"cannot tell the direction from --input={source} --output={target}; convert a workdir or "
                    ".npz to .safetensors, or a .safetensors to .npz")
  print(f"wrote {target}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
