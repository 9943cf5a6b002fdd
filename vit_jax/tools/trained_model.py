"""Load a trained model for inference: from a training workdir or a bare zoo `.npz`, checked against its model.

`load(checkpoint, model_name=None, image_size=None)` returns a `TrainedModel`: the Flax module, its parameters
(position embeddings resized when `image_size` differs from the checkpoint's), the image size, the test
preprocessing settings, the class names when known, and the run's config when the checkpoint is a workdir.

Where the architecture comes from:
- a workdir: `config.json` (`model_name` plus the `model` overrides, exactly as training built it);
- a `.npz` with `--model_name`: the registry entry, with the class count and representation size of the file;
- a bare `.npz`: read off the parameter shapes (width, depth, heads, MLP, patch, ResNet stem). Only `gap` and
  `unpooled` cannot be told apart by shapes; a file without a class token is taken to be `gap`.
Any parameter whose shape differs from what that model expects, or that holds NaN or infinity, is a UserError
naming it.
"""
import dataclasses
import os
import re
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import models, workdir
from vit_jax.errors import UserError
from vit_jax.models import geometry, zoo
from vit_jax.models import state as model_state_lib

_QUERY_KERNEL = re.compile(r"^Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_1/query/kernel$")
_RESNET_UNIT = re.compile(r"^block(\d+)/unit(\d+)/conv1/kernel$")
# model.npz is in the zoo's per-layer layout whatever the run's speed options were; inference also wants the
# unfused attention, which sows the attention maps the pictures need (same numbers, up to rounding).
_PLAIN_OPTIONS = {"scan_layers": False, "remat": "none", "fused_attention": False}


@dataclasses.dataclass
class TrainedModel:
  model: Any  # VisionTransformer with the checkpoint's head
  params: Any  # nested dict of arrays
  model_config: ml_collections.ConfigDict  # the registry's kind of model config
  image_size: int  # the resolution `params` are for (position embeddings match it)
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
  config = dict(model_name=None, patches={"size": (ph, pw)}, hidden_size=hidden, transformer=transformer,
                classifier="token" if "cls" in shapes else "gap",
                representation_size=shapes["pre_logits/kernel"][-1] if "pre_logits/kernel" in shapes else None)
  if resnet is not None:
    config["resnet"] = resnet
  return ml_collections.ConfigDict(config)  # the type `models.get_model_config` returns


def _expected_shapes(model, image_size):
  height, width = geometry.image_hw(image_size)
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)["params"]
  return flat_shapes(abstract)


def check_params_match(params, model, image_size, what):
  """UserError naming the first difference when `params` are not `model`'s (position-embedding length aside)."""
  expected = _expected_shapes(model, image_size)
  differences = [f"{key} is {g or 'missing'} in the checkpoint but {w or 'missing'} in the model"
                 for key, g, w in zoo.shape_differences(flat_shapes(params), expected)]
  if differences:
    raise UserError(f"checkpoint does not match {what}: {len(differences)} difference(s), first: "
                    f"{differences[0]}; pass the --model_name the checkpoint was trained with (or its workdir)")


def posemb_image_size(params, model_config):
  """The (square) image size the checkpoint's position embeddings were trained at."""
  tokens = flat_shapes(params)[zoo.POSEMB_KEY][1]
  grid = tokens - int(geometry.has_class_token(model_config))
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
  return flax.traverse_util.unflatten_dict({tuple(key.split("/")): value for key, value in flat.items()})


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
  if os.path.isdir(checkpoint_path):
    # The tool genuinely reads a run's config.json here; attribute access keeps the callers short.
    run_config = ml_collections.ConfigDict(workdir.read_config(checkpoint_path))
    npz = workdir.path(checkpoint_path, workdir.MODEL_FILE)
    if not os.path.exists(npz):
      raise UserError(f"workdir {checkpoint_path} has no {workdir.MODEL_FILE} yet (training writes it on "
                      "completion); wait for the run to finish or pass a .npz file")
    return npz, run_config
  if os.path.exists(checkpoint_path) or checkpoint_path.endswith(".npz"):
    return checkpoint_path, None
  raise UserError(f"checkpoint {checkpoint_path} does not exist; pass a training workdir or a .npz file")


def _read_checkpoint(checkpoint_path):
  """(params, the run's config or None) of a workdir or a zoo `.npz`; parameters holding NaN or infinity are a
  UserError (their outputs would be too)."""
  npz, run_config = resolve(checkpoint_path)
  params = zoo.load(npz)
  zoo.check_finite(params, f"checkpoint {checkpoint_path}", "it is corrupt or from a run that diverged; use "
                   "another checkpoint, or retrain (e.g. with a lower --config.base_lr)")
  return params, run_config


def _model_config(shapes, run_config, model_name, checkpoint_path):
  """(model config, what it is called in errors): the run's model, the named registry model, or the shapes'."""
  if run_config is not None and not model_name:
    model_config = models.get_model_config(run_config.model_name)
    if run_config.get("model"):
      model_config.update(run_config.model.to_dict())
    what = f"model {run_config.model_name} of {checkpoint_path}/{workdir.CONFIG_FILE}"
  elif model_name:
    model_config = models.get_model_config(model_name)
    model_config.representation_size = shapes["pre_logits/kernel"][-1] if "pre_logits/kernel" in shapes else None
    what = f"model {model_name}"
  else:
    model_config, what = config_from_shapes(shapes), "the architecture read off its shapes"
  for field, plain in _PLAIN_OPTIONS.items():
    if field in models.VisionTransformer.__dataclass_fields__:
      model_config[field] = plain
  return model_config, what


def _test_pp(image_size, run_config):
  """The test preprocessing at `image_size`, keeping a run's crop fraction (e.g. resize 256 -> crop 224)."""
  pp = {"crop": image_size, "resize": None}
  if run_config is not None and run_config.get("pp", {}).get("resize"):
    pp["resize"] = int(round(image_size * run_config.pp.resize / run_config.pp.crop))
  return pp


def load(checkpoint_path, *, model_name=None, image_size=None, labels_path=None, with_class_names=True):
  """A `TrainedModel` from a workdir (config.json + model.npz) or a zoo `.npz` file."""
  params, run_config = _read_checkpoint(checkpoint_path)
  shapes = flat_shapes(params)
  num_classes = shapes["head/kernel"][-1] if "head/kernel" in shapes else 0
  model_config, what = _model_config(shapes, run_config, model_name, checkpoint_path)
  model = models.VisionTransformer(num_classes=num_classes, **model_config)

  # Position-embedding length aside, shapes do not depend on the image size: check at one patch per side.
  check_params_match(params, model, geometry.stride(model_config), what)
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
                      source=checkpoint_path)
