"""Inspect a checkpoint: its layout, parameter table, total count, which registry model it is, and any NaN or
infinity.

  python -m vit_jax.tools.inspect FILE.npz
  python -m vit_jax.tools.inspect --checkpoint=runs/quickstart        # a training workdir: its model.npz
  python -m vit_jax.tools.inspect model.safetensors                   # any layout: timm, transformers, big_vision

The layout (zoo, big_vision, transformers, timm) is told by the file's content; a ViT's options (registers,
LayerScale, MAP head, ...) and the numerics the file says it computes with are printed.

Any model family: a ViT (position-embedding tokens), a BiT ResNet-v2 (units per stage, width factor) or the course
CNN (its widths, and its BatchNorm statistics counted apart from the parameters). A file holding NaN or infinity
is shown (with the first such tensors) rather than refused: the other tools and fine-tuning refuse it.
"""
from absl import flags
from clu import parameter_overview
import jax
import numpy as np

from vit_jax import models, workdir
from vit_jax.errors import UserError
from vit_jax.models import geometry, layouts, zoo
from vit_jax.models import state as model_state_lib
from vit_jax.tools import cli, trained_model

FLAGS = flags.FLAGS
_NON_FINITE_SHOWN = 3  # tensors named when a file holds NaN or infinity


def define_flags():
  """Flags of this tool, defined only when it runs."""
  cli.define_flags("checkpoint")


def _shapes_of(name, num_classes, representation_size):
  """Parameter shapes of registry model `name`, on a one-token-per-side-unit image (the grid is resized anyway)."""
  config = models.get_model_config(name)
  config.representation_size = representation_size
  model = models.VisionTransformer(num_classes=num_classes, **config)
  stride = geometry.stride(config)
  images = jax.ShapeDtypeStruct((1, *stride, 3), np.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]
  return {key: tuple(v.shape) for key, v in zoo.flatten(shapes).items()}


def _width_and_depth(name):
  config = models.get_model_config(name)
  return config.hidden_size, (config.get("transformer") or {}).get("num_layers", 0)


def _vit_names():
  return [name for name in models.model_names() if models.family(models.get_model_config(name)) == "vit"]


def match_convolutional(flat_shapes, family):
  """(name, None, model config) of the BiT or CNN registry model whose parameters these are (any class count),
  or (None, reason, the config read off the shapes or None)."""
  try:
    config = trained_model.config_of_file(flat_shapes, family)
  except UserError as e:
    return None, str(e), None
  if not config.get("model_name"):
    return None, "none has this architecture", config
  model = models.build(config, num_classes=trained_model.num_classes_of(flat_shapes, family))
  try:  # a CNN's dense layer fixes the image size; BiT's shapes do not depend on it
    size = trained_model.cnn_image_size(flat_shapes, config) if family == "cnn" else models.bit.MIN_IMAGE_SIZE
  except UserError as e:
    return None, str(e), config
  images = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
  want_shapes = {key: tuple(v.shape) for key, v in zoo.flatten(
      jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]).items()}
  differences = [f"{key}: file {got or 'missing'}, {config.model_name} {want or 'missing'}"
                 for key, got, want in zoo.shape_differences(flat_shapes, want_shapes)]
  if differences:
    closest = f"closest is {config.model_name} with {len(differences)} difference(s), first: {differences[0]}"
    return None, closest, config
  return config.model_name, None, config


def match_registry(flat_shapes):
  """(name, None) of the registry ViT whose parameters these are, or (None, reason) for the closest one.

  The head's class count, the representation layer and the position-embedding grid may differ from the
  registry's defaults: they are what fine-tuning changes.
  """
  num_classes = flat_shapes["head/kernel"][-1] if "head/kernel" in flat_shapes else 0
  representation = flat_shapes["pre_logits/kernel"][-1] if "pre_logits/kernel" in flat_shapes else None
  # Only models of the file's width and depth can match or come close: tracing every registry model is slow.
  hidden = flat_shapes["embedding/kernel"][-1] if "embedding/kernel" in flat_shapes else None
  depth = len({m.group(1) for key in flat_shapes if (m := zoo.ENCODER_BLOCK.match(key))})
  candidates = [name for name in _vit_names() if hidden is None or _width_and_depth(name) == (hidden, depth)]
  if not candidates:
    return None, f"no registry model has hidden size {hidden} and {depth} encoder blocks"
  structure = zoo.vit_structure(flat_shapes)
  candidates = [name for name in candidates if zoo.model_structure(models.get_model_config(name)) == structure] or (
      candidates)
  best = None
  for name in candidates:
    want_shapes = _shapes_of(name, num_classes, representation)
    differences = [f"{key}: file {got or 'missing'}, {name} {want or 'missing'}"
                   for key, got, want in zoo.shape_differences(flat_shapes, want_shapes)]
    if not differences:
      return name, None
    if best is None or len(differences) < best[0]:
      best = (len(differences), name, differences)
  count, name, differences = best
  return None, f"closest is {name} with {count} difference(s), first: {differences[0]}"


def inspect(path):
  """Prints the parameter table, the total count, the registry model the file matches, and its non-finite
  tensors; `path` is a zoo `.npz` or a training workdir."""
  npz, run_config = trained_model.resolve(path)
  checkpoint = layouts.read(npz)
  tree = zoo.unflatten(checkpoint.flat)
  params, model_state = model_state_lib.split(tree)
  flat = zoo.flatten(params)
  shapes = {key: tuple(v.shape) for key, v in flat.items()}
  print(parameter_overview.get_parameter_overview(tree, include_stats=False))
  if run_config is not None:
    print(f"file: {npz}")
  print(f"parameters: {sum(int(np.prod(v.shape)) for v in flat.values()):,}")
  for collection, values in model_state.items():
    count = sum(int(np.prod(v.shape)) for v in zoo.flatten(values).values())
    print(f"model state: {collection}/ {count:,} values (BatchNorm running statistics, not parameters)")
  family = zoo.checkpoint_family(shapes)
  print(f"layout: {checkpoint.layout}" + (f" ({checkpoint.path})" if checkpoint.path != str(npz) else ""))
  print(f"family: {family} ({models.FAMILIES[family][1]})")
  if family == "vit":
    options = [f"{k}={v}" for k, v in zoo.vit_structure(shapes).items() if v]
    if options:
      print(f"options: {', '.join(options)}")
    numerics = [f"{k}={checkpoint.fields[k]}" for k in ("gelu_approximate", "layer_norm_eps") if k in checkpoint.fields]
    if numerics:
      print(f"computes with: {', '.join(numerics)} (set these model fields to reproduce its logits)")
    name, reason = match_registry(shapes)
  else:
    name, reason, config = match_convolutional(shapes, family)
    if config is not None:
      print(f"architecture: {trained_model.architecture(config)}")
    if config is not None and family == "cnn":
      try:
        print(f"image size: {trained_model.cnn_image_size(shapes, config)} px (its dense layer fixes it)")
      except UserError:
        pass  # the model line below says why
  print(f"model: {name}" if name else f"model: no registry model matches; {reason}")
  if run_config is not None:
    overrides = " with the overrides of its `model` section" if run_config.get("model") else ""
    print(f"run's model: {run_config.model_name}{overrides} (config.json)")
    print(f"weights: {workdir.exported_weights(run_config)} (config.json: ema_decay, export_ema)")
  if zoo.POSEMB_KEY in flat:
    print(f"position embedding: {flat[zoo.POSEMB_KEY].shape[1]} tokens")
  if num_classes := trained_model.num_classes_of(shapes, family):
    print(f"classes: {num_classes}")
  if found := zoo.non_finite(tree):
    shown = ", ".join(f"{key} ({count})" for key, count, _ in found[:_NON_FINITE_SHOWN])
    more = f" and {len(found) - _NON_FINITE_SHOWN} more" if len(found) > _NON_FINITE_SHOWN else ""
    print(f"non-finite values (NaN or infinity) in {len(found)} tensor(s): {shown}{more}; infer, evaluate and "
          "fine-tuning refuse this file")


def main(args):
  paths = ([FLAGS.checkpoint] if FLAGS.checkpoint else []) + list(args)
  if len(paths) != 1:
    raise UserError(f"give one checkpoint, not {len(paths)}: python -m vit_jax.tools.inspect FILE.npz|WORKDIR "
                    "(or --checkpoint=...)")
  inspect(paths[0])


if __name__ == "__main__":
  define_flags()
  cli.run(main, arguments=True)
