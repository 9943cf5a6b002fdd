"""Load a trained model for inference: from a training workdir or a bare zoo `.npz`, checked against its model.

`load(checkpoint, model_name=None, image_size=None)` returns a `TrainedModel`: the Flax module, its parameters
(position embeddings resized when `image_size` differs from the checkpoint's) and model state (BatchNorm
statistics), the image size, the test preprocessing settings, the class names when known, and the run's config
when the checkpoint is a workdir. Every model family works: Vision Transformers, BiT ResNet-v2 and the course CNN.

Where the architecture comes from:
- a workdir: `config.json` (`model_name` plus the `model` overrides, exactly as training built it);
- a `.npz` with `--model_name`: the registry entry, with the class count and representation size of the file; a
  file of another family (a BiT file with a ViT name, ...) or a BiT file of another width is refused naming both;
- a bare `.npz`: its family told by its keys (`zoo.checkpoint_family`), its architecture read off the parameter
  shapes: a ViT's width, depth, heads, MLP, patch and ResNet stem (only `gap` and `unpooled` cannot be told apart
  by shapes; a file without a class token is taken to be `gap`); a BiT file's units per stage and width factor; a
  course CNN's convolution, BatchNorm and dense widths and the image size its dense layer was built for.
Any parameter whose shape differs from what that model expects, or that holds NaN or infinity, is a UserError
naming it.

Image size: a ViT runs at its position embeddings' resolution unless told otherwise (they are resampled). The
convolutional models have no position embeddings: a BiT ResNet runs at any size of at least 32 px (default: the
run's `pp.crop`, else 224); the course CNN flattens its last feature map into a dense layer, so it runs at the size
it was trained at (the run's `pp.crop`, or the one its dense layer implies).
"""
import dataclasses
import itertools
import math
import os
import re
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import models, workdir
from vit_jax.errors import UserError
from vit_jax.models import bit, geometry, hf, hub, layouts, timm_layout, zoo
from vit_jax.models import state as model_state_lib

_QUERY_KERNEL = re.compile(r"^Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_1/query/kernel$")
_RESNET_UNIT = re.compile(r"^block(\d+)/unit(\d+)/conv1/kernel$")
_BIT_UNIT = re.compile(r"^resnet/block(\d+)/unit(\d+)/a/standardized_conv2d/kernel$")
_CNN_LAYER = re.compile(r"^(conv|bn|dense)(\d+)/(kernel|scale)$")
# The class count's parameter in each family.
_HEAD_KERNEL = {"vit": "head/kernel", "bit": "resnet/head/conv2d/kernel", "cnn": "head/kernel"}
# Where a registry model's fields are read off a BiT or CNN checkpoint (the rest of its config is the registry's).
_CNN_FIELDS = {"bit": ("block_units", "width_factor"), "cnn": ("conv_widths", "dense_widths")}
BIT_DEFAULT_IMAGE_SIZE = 224  # BiT's ImageNet resolution: a bare BiT file's default
# model.npz is in the zoo's per-layer layout whatever the run's speed options were; inference also wants the
# unfused attention, which sows the attention maps the pictures need (same numbers, up to rounding).
_PLAIN_OPTIONS = {"scan_layers": False, "remat": "none", "fused_attention": False}


@dataclasses.dataclass
class TrainedModel:
  model: Any  # the Flax module (VisionTransformer, BiTResNet or CourseCNN) with the checkpoint's head
  params: Any  # nested dict of arrays
  model_config: ml_collections.ConfigDict  # the registry's kind of model config
  image_size: int  # the resolution the model runs at (a ViT's position embeddings match it)
  pp: dict  # test preprocessing {'crop' (= image_size), 'resize' (None or >= crop)}, as `vit_jax.data` takes it
  class_names: Optional[tuple]  # None when unknown (bare .npz without a labels file)
  run_config: Optional[ml_collections.ConfigDict]  # the training run's config.json when loaded from a workdir
  source: str  # the path given
  model_state: dict = dataclasses.field(default_factory=dict)  # BatchNorm statistics ({'batch_stats': ...}) or {}

  @property
  def variables(self):
    """What `model.apply` takes: the parameters and the model's state."""
    return model_state_lib.variables(self.params, self.model_state)

  @property
  def num_classes(self):
    return self.model.num_classes or 0

  def label(self, index):
    return self.class_names[index] if self.class_names else str(index)

  def run_setting(self, key, default=None):
    """`key` of the run's config (dots for nested keys, e.g. 'pp.test'), or `default` for a bare .npz."""
    value = self.run_config
    for part in key.split("."):
      if value is None or part not in value:
        return default
      value = value[part]
    return default if value is None else value


def flat_shapes(params):
  return {key: tuple(np.shape(value)) for key, value in zoo.flatten(params).items()}


def config_from_shapes(shapes):
  """The `VisionTransformer` config a zoo parameter tree of these flat shapes was built from (a model config like
  the registry's, for a file that names none)."""
  if "embedding/kernel" not in shapes:
    raise UserError("checkpoint has no patch embedding (embedding/kernel); it is not a ViT checkpoint")
  ph, pw, _, hidden = shapes["embedding/kernel"]
  layers = sorted(int(m.group(1)) for k in shapes if (m := _QUERY_KERNEL.match(k)))
  transformer = None
  if layers:
    _, heads, _ = shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
    mlp = shapes["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"][-1]
    transformer = dict(num_layers=len(layers), mlp_dim=mlp, num_heads=heads, dropout_rate=0.0,
                       attention_dropout_rate=0.0)
  resnet = None
  if "conv_root/kernel" in shapes:
    units = {}
    for key in shapes:
      if m := _RESNET_UNIT.match(key):
        units[int(m.group(1))] = max(units.get(int(m.group(1)), 0), int(m.group(2)))
    resnet = {"num_layers": tuple(units[s] for s in sorted(units)), "width_factor": shapes["conv_root/kernel"][-1] / 64}
  structure = zoo.vit_structure(shapes)
  classifier = "map" if structure["map"] else "token" if "cls" in shapes else "gap"
  config = dict(model_name=None, patches={"size": (ph, pw)}, hidden_size=hidden, transformer=transformer,
                classifier=classifier,
                representation_size=shapes["pre_logits/kernel"][-1] if "pre_logits/kernel" in shapes else None)
  # The later ViTs' options only when the file has them, so a zoo file's config stays the zoo model's. LayerScale's
  # init value does not matter for a loaded model: DeiT III's 1e-6.
  config.update({k: structure[k] for k in ("num_registers", "no_embed_class", "fc_norm") if structure[k]})
  if structure["layer_scale"]:
    config["layer_scale_init"] = 1e-6
  if resnet is not None:
    config["resnet"] = resnet
  return ml_collections.ConfigDict(config)  # the type `models.get_model_config` returns


def num_classes_of(shapes, family):
  """The class count of a checkpoint of `family` ('vit', 'bit', 'cnn') with these flat shapes; 0 without a head."""
  key = _HEAD_KERNEL[family]
  return shapes[key][-1] if key in shapes else 0


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def model_field(model_config, field):
  """A field of a model config, or its module's default when the config leaves it out (CNN-CIFAR's widths)."""
  if field in model_config:
    return model_config[field]
  return models.FAMILIES[models.family(model_config)][0].__dataclass_fields__[field].default


def registry_name(family, fields):
  """The registry name of `family` whose config has these `fields` ({field: value}), or None."""
  for name in models.model_names():
    config = models.get_model_config(name)
    if models.family(config) == family and all(_as_tuples(model_field(config, k)) == _as_tuples(v)
                                               for k, v in fields.items()):
      return name
  return None


def architecture(model_config):
  """One line naming the family and the fields that shape a BiT or CNN model config, e.g. for `inspect`."""
  if models.family(model_config) == "bit":
    return (f"BiT ResNet-v2, units per stage {_as_tuples(model_config.block_units)}, width factor "
            f"{model_config.width_factor}")
  return (f"plain CNN, convolution widths per stage {_as_tuples(model_field(model_config, 'conv_widths'))}, "
          f"dense widths {_as_tuples(model_field(model_config, 'dense_widths'))}")


def describe(model_config):
  """The model in messages: its registry name and family, or the architecture of a model read off a file."""
  if model_config.get("model_name"):
    return models.family_description(model_config)
  return f"the {architecture(model_config)}"


def _convolutional_config(family, fields):
  """The registry config whose `fields` these are, or the family's first model with them (no model name)."""
  name = registry_name(family, fields)
  if name:
    return models.get_model_config(name)
  base = {"bit": "BiT-R50x1", "cnn": "CNN-CIFAR"}[family]
  config = models.get_model_config(base, **fields)
  config.model_name = None
  return config


def bit_fields_from_shapes(shapes):
  """{'block_units', 'width_factor'} of a big_transfer checkpoint: units per stage from the `resnet/block{s}/unit{uu}`
  keys, the width factor from the root convolution's 64 x width output channels."""
  root_channels = shapes[bit.ROOT_KEY][-1]
  if root_channels % 64:
    raise UserError(f"checkpoint's root convolution {bit.ROOT_KEY} has {root_channels} output channels, not a "
                    "multiple of 64; it is not a BiT ResNet-v2 checkpoint")
  units = {}
  for key in shapes:
    if m := _BIT_UNIT.match(key):
      units[int(m.group(1))] = max(units.get(int(m.group(1)), 0), int(m.group(2)))
  return {"block_units": tuple(units[s] for s in sorted(units)), "width_factor": root_channels // 64}


def _cnn_stages(conv_widths, bn_widths):
  """The convolution widths grouped into stages, each ending in its BatchNorm's width. Equal widths across a stage
  boundary (128-128) leave several groupings: the one with as many convolutions in every stage is taken (the
  course CNN's), any other ambiguity is a UserError."""
  fits = []
  for cuts in itertools.combinations(range(1, len(conv_widths)), len(bn_widths) - 1):
    bounds = (0, *cuts, len(conv_widths))
    stages = tuple(tuple(conv_widths[a:b]) for a, b in zip(bounds, bounds[1:]))
    if all(stage[-1] == width for stage, width in zip(stages, bn_widths)):
      fits.append(stages)
  even = [stages for stages in fits if len({len(stage) for stage in stages}) == 1]
  if len(fits) == 1 or len(even) == 1:
    return fits[0] if len(fits) == 1 else even[0]
  reason = "no grouping" if not fits else f"{len(fits)} groupings"
  raise UserError(f"cannot tell the stages of this CNN checkpoint: {reason} of its convolution widths "
                  f"{tuple(conv_widths)} into stages ending in its BatchNorm widths {tuple(bn_widths)}; load it "
                  "from its training workdir, whose config.json names the model")


def cnn_fields_from_shapes(shapes):
  """{'conv_widths', 'dense_widths'} of a course-CNN checkpoint, from its `conv{i}`, `bn{s}` and `dense{k}` shapes."""
  widths = {"conv": {}, "bn": {}, "dense": {}}
  for key, shape in shapes.items():
    if m := _CNN_LAYER.match(key):
      widths[m.group(1)][int(m.group(2))] = shape[-1]
  ordered = {kind: [by_index[i] for i in sorted(by_index)] for kind, by_index in widths.items()}
  if not ordered["conv"] or not ordered["bn"] or len(ordered["bn"]) > len(ordered["conv"]):
    raise UserError(f"CNN checkpoint has {len(ordered['conv'])} convolutions (conv1...) and {len(ordered['bn'])} "
                    "BatchNorm layers (bn1...); the course CNN has at least one of each per stage")
  return {"conv_widths": _cnn_stages(ordered["conv"], ordered["bn"]), "dense_widths": tuple(ordered["dense"])}


def cnn_feature_side(model_config, image_size):
  """The side of the course CNN's last feature map (what its first dense layer flattens) for square images."""
  side = int(image_size)
  for _ in model_field(model_config, "conv_widths"):
    side //= 2  # each stage's 2x2/2 max pool, 'VALID': odd sizes round down
  return side


def cnn_image_size(shapes, model_config):
  """The image size a course-CNN checkpoint was trained at: its first dense layer (or head) reads a square
  side x side x channels feature map, downsampled 2x per stage."""
  conv_widths = model_field(model_config, "conv_widths")
  first = "dense1/kernel" if model_field(model_config, "dense_widths") else "head/kernel"
  channels = conv_widths[-1][-1]
  positions = shapes[first][0] // channels if first in shapes else 0
  side = math.isqrt(positions)
  if positions < 1 or side * side != positions or shapes[first][0] % channels:
    raise UserError(f"CNN checkpoint's {first} reads {shapes.get(first, ('no', ))[0]} features, not a square map of "
                    f"{channels}-channel positions; it does not fit {describe(model_config)}")
  return side * 2 ** len(conv_widths)


def _expected_shapes(model, image_size):
  """Flat shapes of everything `model` stores: its parameters and its state (`batch_stats/...`)."""
  height, width = geometry.image_hw(image_size)
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  return flat_shapes(model_state_lib.merge(*model_state_lib.from_init(abstract)))


def check_params_match(params, model, image_size, what, model_state=None):
  """UserError naming the first difference when `params` (and `model_state`, BatchNorm statistics) are not
  `model`'s at `image_size` (a ViT's position-embedding length aside)."""
  expected = _expected_shapes(model, image_size)
  got = flat_shapes(model_state_lib.merge(params, model_state))
  differences = [f"{key} is {g or 'missing'} in the checkpoint but {w or 'missing'} in the model"
                 for key, g, w in zoo.shape_differences(got, expected)]
  if differences:
    raise UserError(f"checkpoint does not match {what}: {len(differences)} difference(s), first: "
                    f"{differences[0]}; pass the --model_name the checkpoint was trained with (or its workdir)")


def posemb_image_size(params, model_config):
  """The (square) image size the checkpoint's position embeddings were trained at."""
  tokens = flat_shapes(params)[zoo.POSEMB_KEY][1]
  grid = tokens - geometry.posemb_prefix_tokens(model_config)
  side = int(round(np.sqrt(grid)))
  if side * side != grid:
    raise UserError(f"checkpoint's position embedding has {grid} grid tokens, not a square grid; "
                    "only square images are supported here")
  return side * geometry.stride(model_config)[0]


def resize_posemb(params, model_config, image_size):
  """`params` with position embeddings resampled for `image_size` (`zoo.resample_posemb`: 2-D linear, as zoo
  fine-tuning does)."""
  stride = geometry.stride(model_config)[0]
  if image_size % stride:
    raise UserError(f"image size {image_size} is not a multiple of the model's patch size {stride}; "
                    f"use e.g. {max(1, round(image_size / stride)) * stride}")
  posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
  resized = zoo.resample_posemb(posemb, model_config, image_size)
  if resized is posemb:
    return params
  logging.info("Resized position embeddings %s -> %s for %dpx images.", posemb.shape, resized.shape, image_size)
  flat = zoo.flatten(params)
  flat[zoo.POSEMB_KEY] = resized
  return zoo.unflatten(flat)


def _dataset_class_names(run_config):
  """Class names of the run's dataset, or None (logged) when the dataset cannot be opened here."""
  from vit_jax import data  # pylint: disable=g-import-not-at-top  (grain/TFDS only when needed)
  try:
    return tuple(data.open_source(run_config.dataset, run_config.get("pp", {}).get("train", "train"),
                                  tfds_data_dir=run_config.get("tfds_data_dir")).class_names)
  except Exception as e:  # pylint: disable=broad-except  # e.g. TFDS dataset not prepared on this machine
    logging.warning("Class names of dataset %r unavailable (%s); using class indices.", run_config.dataset, e)
    return None


def read_labels_file(path, num_classes):
  try:
    with open(path, encoding="utf-8") as f:
      names = [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise UserError(f"cannot read labels file {path}: {e.strerror}") from None
  if len(names) != num_classes:
    raise UserError(f"labels file {path} has {len(names)} names but the model has {num_classes} classes; "
                    "give one class name per line, in class-index order")
  return tuple(names)


def resolve(checkpoint_path):
  """(the .npz file, the run's config or None) of a workdir (config.json + model.npz) or a zoo `.npz`."""
  if hub.is_hub_name(checkpoint_path) or hf.is_hf_dir(checkpoint_path) or timm_layout.is_timm_dir(checkpoint_path):
    return checkpoint_path, None
  if os.path.isdir(checkpoint_path):
    # The tool genuinely reads a run's config.json here; attribute access keeps the callers short.
    run_config = ml_collections.ConfigDict(workdir.read_config(checkpoint_path))
    npz = workdir.path(checkpoint_path, workdir.MODEL_FILE)
    if not os.path.exists(npz):
      raise UserError(f"workdir {checkpoint_path} has no {workdir.MODEL_FILE} yet (training writes it on "
                      "completion); wait for the run to finish or pass a .npz file")
    return npz, run_config
  if os.path.exists(checkpoint_path) or checkpoint_path.endswith((".npz", ".safetensors")):
    return checkpoint_path, None
  raise UserError(f"checkpoint {checkpoint_path} does not exist; pass a training workdir, a .npz or .safetensors "
                  "file, a transformers or timm directory, or an hf://ORG/REPO name")


def _read_checkpoint(checkpoint_path, num_heads=None):
  """(params, model state, the run's config or None, `layouts.Checkpoint`) of a workdir or a checkpoint of any
  layout; values holding NaN or infinity are a UserError (their outputs would be too)."""
  file_path, run_config = resolve(checkpoint_path)
  checkpoint = layouts.read(file_path, num_heads=num_heads)
  tree = zoo.unflatten(checkpoint.flat)
  zoo.check_finite(tree, f"checkpoint {checkpoint_path}", "it is corrupt or from a run that diverged; use "
                   "another checkpoint, or retrain (e.g. with a lower --config.base_lr)")
  params, model_state = model_state_lib.split(tree)
  return params, model_state, run_config, checkpoint


def config_of_file(shapes, family):
  """The model config read off a checkpoint's flat shapes: the registry's config when the file is a registry
  model's (BiT and CNN files), else one built from the shapes."""
  if family == "bit":
    return _convolutional_config("bit", bit_fields_from_shapes(shapes))
  if family == "cnn":
    return _convolutional_config("cnn", cnn_fields_from_shapes(shapes))
  return config_from_shapes(shapes)


def check_family(shapes, file_family, model_config, source, checkpoint_path, *, named):
  """UserError naming both when the checkpoint is of another family than `model_config` (called `source`: the
  `--model_name` when `named`, else a run's config.json), or a BiT file of another width."""
  want = models.family(model_config)
  file_name = registry_name(file_family, bit_fields_from_shapes(shapes)) if file_family == "bit" else None
  if named:
    fix = f"pass --model_name={file_name} or leave --model_name out" if file_name else "leave --model_name out"
  else:
    fix = f"its {workdir.MODEL_FILE} is not this run's; pass the .npz alone"
  fix += " (the architecture is read off the file)"
  if file_family != want:
    raise UserError(f"checkpoint {checkpoint_path} holds {models.FAMILIES[file_family][1]} but {source} is "
                    f"{models.FAMILIES[want][1]}; {fix}")
  if file_family == "bit":
    fields = bit_fields_from_shapes(shapes)
    if fields["width_factor"] != model_config.width_factor:
      described = file_name or f"a BiT ResNet-v2 with {fields['block_units']} units per stage"
      raise UserError(f"checkpoint {checkpoint_path} is {described} (width {fields['width_factor']}) but {source} "
                      f"has width {model_config.width_factor}; {fix}")


def _model_config(shapes, file_family, run_config, model_name, checkpoint_path):
  """(model config, what it is called in errors): the run's model, the named registry model, or the shapes'."""
  if run_config is not None and not model_name:
    overrides = run_config.model.to_dict() if run_config.get("model") else {}
    # As training built it (`train.model_config_from`): ViT speed options at their off value leave a CNN's config.
    model_config = models.get_model_config(run_config.model_name, **overrides)
    what = f"model {run_config.model_name} of {checkpoint_path}/{workdir.CONFIG_FILE}"
    check_family(shapes, file_family, model_config, what, checkpoint_path, named=False)
  elif model_name:
    model_config = models.get_model_config(model_name)
    check_family(shapes, file_family, model_config, f"--model_name={model_name}", checkpoint_path,
                  named=True)
    if file_family == "vit":
      model_config.representation_size = shapes["pre_logits/kernel"][-1] if "pre_logits/kernel" in shapes else None
    what = f"model {model_name}"
  else:
    model_config, what = config_of_file(shapes, file_family), "the architecture read off its shapes"
  if models.family(model_config) == "vit":
    model_config.update(_PLAIN_OPTIONS)
  return model_config, what


def _convolutional_image_size(model_config, shapes, run_config, image_size):
  """(the size to run at, the size trained at) of a BiT or CNN model; they have no position embeddings to resample,
  so BiT runs at any size of at least 32 px and the CNN only where its dense layer fits."""
  description = describe(model_config)
  if run_config is not None and run_config.get("pp", {}).get("crop"):
    trained = int(run_config.pp.crop)
  elif models.family(model_config) == "bit":
    trained = BIT_DEFAULT_IMAGE_SIZE
  else:
    trained = cnn_image_size(shapes, model_config)
  size = int(image_size or trained)
  if models.family(model_config) == "bit" and size < bit.MIN_IMAGE_SIZE:
    raise UserError(f"--image_size={size} is too small for {description}: it downsamples 32x; use at least "
                    f"{bit.MIN_IMAGE_SIZE} (e.g. {trained}, the default)")
  if models.family(model_config) == "cnn" and cnn_feature_side(model_config, size) != cnn_feature_side(
      model_config, trained):
    side = cnn_feature_side(model_config, trained)
    raise UserError(f"--image_size={size} does not fit {description}: it flattens the {side}x{side} feature map of "
                    f"{trained}-px images into a dense layer (there are no position embeddings to resample); drop "
                    f"--image_size (the model runs at {trained} px)")
  return size, trained


def _test_pp(image_size, run_config):
  """The test preprocessing at `image_size`, keeping a run's crop fraction (e.g. resize 256 -> crop 224)."""
  pp = {"crop": image_size, "resize": None}
  if run_config is not None and run_config.get("pp", {}).get("resize"):
    pp["resize"] = int(round(image_size * run_config.pp.resize / run_config.pp.crop))
  return pp


def load(checkpoint_path, *, model_name=None, image_size=None, labels_path=None, with_class_names=True):
  """A `TrainedModel` from a workdir (config.json + model.npz) or a zoo `.npz` file."""
  named_heads = models.get_model_config(model_name).get("transformer", {}).get("num_heads") if model_name else None
  params, model_state, run_config, checkpoint = _read_checkpoint(checkpoint_path, named_heads)
  shapes = flat_shapes(params)
  file_family = zoo.checkpoint_family(shapes)
  model_config, what = _model_config(shapes, file_family, run_config, model_name, checkpoint_path)
  if run_config is None and file_family == "vit":
    if model_name:
      zoo.check_structure(checkpoint.flat, model_config, checkpoint_path)
      zoo.warn_numerics(checkpoint.fields, model_config, checkpoint_path)
    else:  # what the file says it computes with (transformers' and timm's GELU and eps)
      model_config.update({k: v for k, v in checkpoint.fields.items() if k in ("gelu_approximate", "layer_norm_eps",
                                                                                "no_embed_class")})
  num_classes = num_classes_of(shapes, file_family)
  model = models.build(model_config, num_classes=num_classes)

  if models.family(model_config) != "vit":
    image_size, trained_size = _convolutional_image_size(model_config, shapes, run_config, image_size)
    # BiT's shapes do not depend on the image size; the CNN's dense layer does, on the size it was trained at.
    check_params_match(params, model, trained_size, what, model_state)
  else:
    # Position-embedding length aside, shapes do not depend on the image size: check at one patch per side.
    check_params_match(params, model, geometry.stride(model_config), what, model_state)
    has_transformer = bool(model_config.get("transformer"))
    trained_size = posemb_image_size(params, model_config) if has_transformer else None
    if trained_size is None:
      trained_size = run_config.pp.crop if run_config is not None else 224
    image_size = int(image_size or trained_size)
    if has_transformer:
      params = resize_posemb(params, model_config, image_size)

  class_names = None
  if labels_path:
    class_names = read_labels_file(labels_path, num_classes)
  elif run_config is not None and with_class_names and num_classes:
    class_names = _dataset_class_names(run_config)
    if class_names is not None and len(class_names) != num_classes:
      logging.warning("Dataset has %d classes, the model %d; using class indices.", len(class_names), num_classes)
      class_names = None
  return TrainedModel(model=model, params=params, model_config=model_config, image_size=image_size,
                      pp=_test_pp(image_size, run_config), class_names=class_names, run_config=run_config,
                      source=checkpoint_path, model_state=model_state)
