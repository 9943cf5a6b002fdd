"""Model-zoo `.npz` checkpoints: load, save, adapt for fine-tuning, and a CLI to inspect them.

The zoo stores one array per parameter under its '/'-joined path. Files come in two naming generations: the
original pre-Linen names (`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3` inside each encoder block),
which our modules use, and Linen-era names (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`), which
`load` renames. Linen-era files also store GroupNorm scale/bias as (1, 1, 1, C); `load` squeezes them.

  python -m vit_jax.checkpoint inspect FILE.npz
"""
import io
import re
import sys
import zipfile

from absl import logging
from etils import epath
import flax
import jax
import numpy as np

from vit_jax import models
from vit_jax.errors import UserError, run_cli

ZOO_URL = "https://storage.googleapis.com/vit_models/"

# Linen-era name -> pre-Linen (zoo) name, inside `Transformer/encoderblock_{i}/`.
_LINEN_TO_ZOO_BLOCK_NAMES = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_GROUPNORM_PARAM = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")
_ENCODER_BLOCK = re.compile(r"^(Transformer/encoderblock_\d+)/([^/]+)(/.*)$")
POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
_RESIZE_METHODS = ("linear", "bicubic")


def _flatten(params):
  return {"/".join(path): value for path, value in flax.traverse_util.flatten_dict(params).items()}


def _unflatten(flat):
  return flax.traverse_util.unflatten_dict({tuple(key.split("/")): value for key, value in flat.items()})


def _to_zoo_names(flat):
  """Renames Linen-era encoder-block submodules and squeezes (1, 1, 1, C) GroupNorm parameters."""
  blocks_in_linen_naming = {m.group(1) for key in flat if (m := _ENCODER_BLOCK.match(key))
                            and m.group(2) in ("MultiHeadDotProductAttention_0", "MlpBlock_0")}
  renamed = {}
  for key, value in flat.items():
    m = _ENCODER_BLOCK.match(key)
    if m and m.group(1) in blocks_in_linen_naming:
      key = m.group(1) + "/" + _LINEN_TO_ZOO_BLOCK_NAMES.get(m.group(2), m.group(2)) + m.group(3)
    if _GROUPNORM_PARAM.search(key) and value.ndim == 4:
      value = value.reshape(value.shape[-1])
    renamed[key] = value
  return renamed


def _read_npz(path):
  """{key: array} of an `.npz` file, or a UserError saying what is wrong with the file."""
  path = epath.Path(path)
  if not str(path).endswith(".npz"):
    raise UserError(f"checkpoint {path} is not an .npz file; pass a model-zoo .npz such as "
                    f"{ZOO_URL}imagenet21k/ViT-B_16.npz (or the model.npz of a finished run)")
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise UserError(f"checkpoint {path} does not exist; download a zoo file, e.g. "
                    f"`wget {ZOO_URL}imagenet21k/ViT-B_16.npz`, and pass its path") from None
  except OSError as e:
    raise UserError(f"cannot read checkpoint {path}: {e}; check the path and its permissions") from None
  except ImportError as e:  # etils needs a filesystem package for gs:// and other remote URLs
    raise UserError(f"cannot read {path}: {e} (pip install 'vit_jax[gcs]'), or download the file and pass "
                    "its local path") from None
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      return {key: npz[key] for key in npz.files}
  except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
    raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}); "
                    "download it again") from None


def load(path):
  """Nested dict of numpy arrays from a zoo `.npz` (local path or any etils-epath URL such as gs://)."""
  flat = _to_zoo_names(_read_npz(path))
  if not flat:
    raise UserError(f"checkpoint {path} holds no arrays; download it again")
  return _unflatten(flat)


def save(params, path):
  """Writes `params` as a zoo `.npz` (one array per '/'-joined path); `load(path)` gives them back bit for bit.

  Parameters of a model with `scan_layers=True` are written in the zoo's per-layer layout.
  """
  params = models.unstack_layers(flax.core.unfreeze(jax.device_get(params)))
  flat = {key: np.asarray(value) for key, value in _flatten(params).items()}
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Write then rename, so a crash never leaves a half-written file under the final name.
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)  # overwrites an existing file (`rename` refuses to)
  return path


def _square_side(n, what):
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise UserError(f"{what} has {n} grid tokens, which is not a square grid; pass its grid shape explicitly")
  return side


def _linear_resize_axis(x, size, axis):
  """Linear interpolation along `axis` with scipy.ndimage.zoom(order=1)'s sampling: the end points align."""
  n = x.shape[axis]
  if size == n:
    return x
  coords = np.arange(size) * ((n - 1) / (size - 1)) if size > 1 else np.zeros(1)
  low = np.clip(np.floor(coords).astype(int), 0, n - 1)
  high = np.minimum(low + 1, n - 1)
  frac = (coords - low).reshape([-1 if i == axis else 1 for i in range(x.ndim)])
  return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


def resize_grid(grid, shape, method="linear"):
  """Resizes a (height, width, channels) grid of embeddings to `shape` = (new_height, new_width).

  `linear` reproduces `scipy.ndimage.zoom(grid, zoom, order=1)`, which the zoo's fine-tuning used (its results
  depend on it); `bicubic` is `jax.image.resize`'s half-pixel bicubic (as timm's resizing).
  """
  if method not in _RESIZE_METHODS:
    raise UserError(f"unknown position-embedding resize method {method!r}; use one of {', '.join(_RESIZE_METHODS)}")
  grid = np.asarray(grid)
  if method == "bicubic":
    resized = jax.image.resize(grid.astype(np.float32), (*shape, grid.shape[-1]), "bicubic", antialias=False)
    return np.asarray(resized).astype(grid.dtype)
  out = grid.astype(np.float64)
  out = _linear_resize_axis(out, shape[0], 0)
  out = _linear_resize_axis(out, shape[1], 1)
  return out.astype(grid.dtype)


def interpolate_posembed(posemb, num_tokens, has_class_token, *, grid_shape=None, source_grid_shape=None,
                         method="linear"):
  """Resamples position embeddings (1, tokens, D) to `num_tokens` tokens (class token included if present).

  The class token's embedding is kept as is; the grid is resized in 2-D. Grids are square unless given:
  `grid_shape` is the target (rows, cols), e.g. (24, 32) for a 384x512 image with patch 16, and
  `source_grid_shape` the stored one.
  """
  posemb = np.asarray(posemb)
  num_extra = int(has_class_token)
  extra, grid = posemb[:, :num_extra], posemb[0, num_extra:]
  if source_grid_shape is None:
    side = _square_side(len(grid), "the stored position embedding")
    source_grid_shape = (side, side)
  if grid_shape is None:
    side = _square_side(num_tokens - num_extra, "the target position embedding")
    grid_shape = (side, side)
  if tuple(source_grid_shape)[0] * tuple(source_grid_shape)[1] != len(grid):
    raise UserError(f"source grid {tuple(source_grid_shape)} does not hold the {len(grid)} stored grid tokens")
  if grid_shape[0] * grid_shape[1] + num_extra != num_tokens:
    raise UserError(f"target grid {tuple(grid_shape)} plus {num_extra} class token does not make "
                    f"{num_tokens} tokens")
  grid = resize_grid(grid.reshape(*source_grid_shape, -1), grid_shape, method)
  return np.concatenate([extra, grid.reshape(1, grid_shape[0] * grid_shape[1], -1)], axis=1)


def _shape(x):
  return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def load_pretrained(*, pretrained_path, init_params, model_config, image_size=None, posemb_method="linear"):
  """Pretrained parameters adapted to a new task, with the structure and shapes of `init_params`.

  - the classification `head` comes from `init_params` (the class count usually differs);
  - `pre_logits` is dropped when the model has no representation layer;
  - position embeddings are resized to the model's grid (`image_size`, int or (height, width), is needed only
    for non-square grids).
  One log line per changed tensor. Any other missing or extra key, or shape mismatch, is a UserError naming it.
  A model with `scan_layers=True` gets its encoder blocks stacked, as its `init_params` are.
  """
  restored = _flatten(load(pretrained_path))
  init_params = flax.core.unfreeze(init_params)
  scanned = "encoderblock" in init_params.get("Transformer", {})
  expected = _flatten(models.unstack_layers(init_params))
  adapted = {}
  for key in [k for k in restored if k.startswith("pre_logits/") and k not in expected]:
    if model_config.get("representation_size") is None:
      logging.info("load_pretrained: dropped %s %s (the model has no representation layer)", key,
                   _shape(restored[key]))
      del restored[key]
  for key, init_value in expected.items():
    if key.startswith("head/"):
      logging.info("load_pretrained: %s %s from the new model (checkpoint had %s)", key, _shape(init_value),
                   _shape(restored[key]) if key in restored else "none")
      adapted[key] = init_value
      restored.pop(key, None)
      continue
    if key not in restored:
      raise UserError(f"checkpoint {pretrained_path} has no parameter {key} {_shape(init_value)} that model "
                      f"{model_config.get('model_name')} needs; use the checkpoint of the same model")
    value = restored.pop(key)
    if _shape(value) != _shape(init_value):
      if key != POSEMB_KEY:
        raise UserError(f"parameter {key} has shape {_shape(value)} in {pretrained_path} but "
                        f"{_shape(init_value)} in model {model_config.get('model_name')}; use the checkpoint "
                        "of the same model")
      value = _resize_posemb(value, _shape(init_value), model_config, image_size, posemb_method)
    adapted[key] = value
  if restored:
    extra = ", ".join(f"{k} {_shape(v)}" for k, v in sorted(restored.items())[:5])
    raise UserError(f"checkpoint {pretrained_path} has {len(restored)} parameter(s) model "
                    f"{model_config.get('model_name')} does not: {extra}; use the checkpoint of the same model")
  adapted = _unflatten(adapted)
  return models.stack_layers(adapted) if scanned else adapted


def _resize_posemb(posemb, target_shape, model_config, image_size, method):
  has_class_token = model_config.get("classifier", "token") in ("token", "token_unpooled")
  grid_shape = None
  if image_size is not None:
    height, width = (image_size, image_size) if np.isscalar(image_size) else image_size
    stride = models.downsampling(model_config["patches"], model_config.get("resnet"))
    grid_shape = (height // stride[0], width // stride[1])
  if posemb.shape[-1] != target_shape[-1]:
    raise UserError(f"parameter {POSEMB_KEY} has width {posemb.shape[-1]} in the checkpoint but "
                    f"{target_shape[-1]} in model {model_config.get('model_name')}; use the checkpoint of the "
                    "same model")
  resized = interpolate_posembed(posemb, target_shape[1], has_class_token, grid_shape=grid_shape, method=method)
  logging.info("load_pretrained: resized %s %s -> %s (%s)", POSEMB_KEY, posemb.shape, resized.shape, method)
  return resized


# --- inspect CLI --------------------------------------------------------------------------------------------


def _shapes_of(name, num_classes, representation_size):
  """Parameter shapes of registry model `name`, on a one-token-per-side-unit image (the grid is resized anyway)."""
  config = models.get_model_config(name)
  config.representation_size = representation_size
  model = models.VisionTransformer(num_classes=num_classes, **config)
  stride = models.downsampling(config.patches, config.get("resnet"))
  images = jax.ShapeDtypeStruct((1, *stride, 3), np.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]
  return {key: tuple(v.shape) for key, v in _flatten(shapes).items()}


def _width_and_depth(name):
  config = models.get_model_config(name)
  return config.hidden_size, (config.get("transformer") or {}).get("num_layers", 0)


def shape_differences(got, want):
  """(key, got shape, wanted shape) for each parameter whose shape differs between two {key: shape} maps (None
  where a side lacks it). The position embedding's token count may differ: it is resampled to the model's grid."""
  differences = []
  for key in sorted(set(got) | set(want)):
    g, w = got.get(key), want.get(key)
    if key == POSEMB_KEY and g and w and g[-1] == w[-1]:
      continue
    if g != w:
      differences.append((key, g, w))
  return differences


def match_registry(flat_shapes):
  """(name, None) of the registry model whose parameters these are, or (None, reason) for the closest one.

  The head's class count, the representation layer and the position-embedding grid may differ from the
  registry's defaults: they are what fine-tuning changes.
  """
  num_classes = flat_shapes["head/kernel"][-1] if "head/kernel" in flat_shapes else 0
  representation = flat_shapes["pre_logits/kernel"][-1] if "pre_logits/kernel" in flat_shapes else None
  # Only models of the file's width and depth can match or come close; their shapes are traced (~1 s a model).
  hidden = flat_shapes["embedding/kernel"][-1] if "embedding/kernel" in flat_shapes else None
  depth = len({m.group(1) for key in flat_shapes if (m := _ENCODER_BLOCK.match(key))})
  candidates = [name for name in models.model_names() if hidden is None or _width_and_depth(name) == (hidden, depth)]
  if not candidates:
    return None, f"no registry model has hidden size {hidden} and {depth} encoder blocks"
  best = None
  for name in candidates:
    differences = [f"{key}: file {got or 'missing'}, {name} {want or 'missing'}"
                   for key, got, want in shape_differences(flat_shapes, _shapes_of(name, num_classes, representation))]
    if not differences:
      return name, None
    if best is None or len(differences) < best[0]:
      best = (len(differences), name, differences)
  count, name, differences = best
  return None, f"closest is {name} with {count} difference(s), first: {differences[0]}"


def inspect(path):
  """Prints the parameter table, the total count and the registry model the file matches."""
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top  (CLI only)
  params = load(path)
  flat = _flatten(params)
  print(parameter_overview.get_parameter_overview(params, include_stats=False))
  print(f"parameters: {sum(int(np.prod(v.shape)) for v in flat.values()):,}")
  name, reason = match_registry({key: tuple(v.shape) for key, v in flat.items()})
  print(f"model: {name}" if name else f"model: no registry model matches; {reason}")
  if POSEMB_KEY in flat:
    print(f"position embedding: {flat[POSEMB_KEY].shape[1]} tokens")
  if "head/kernel" in flat:
    print(f"classes: {flat['head/kernel'].shape[-1]}")


def main(argv):
  if len(argv) != 2 or argv[0] != "inspect":
    raise UserError("usage: python -m vit_jax.checkpoint inspect FILE.npz")
  inspect(argv[1])


if __name__ == "__main__":
  run_cli(main, sys.argv[1:])
