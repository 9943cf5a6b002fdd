"""Model-zoo `.npz` checkpoints: load, save, adapt for fine-tuning, resample position embeddings and patch filters.

The zoo stores one array per parameter under its '/'-joined path, the paths of our modules. `load` reads every
layout `layouts.read` knows (the zoo's Linen-era names, big_vision, transformers, timm, `hf://` names) into these
paths; `save` writes the zoo's.
"""
import io

from absl import logging
from etils import epath
import flax
import jax
import numpy as np
import scipy.ndimage

from vit_jax.errors import UserError
from vit_jax.models import bit, geometry, layouts, registry, vit

ZOO_URL = layouts.ZOO_URL
ENCODER_BLOCK = layouts.ENCODER_BLOCK
POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
EMBEDDING_KEY = "embedding/kernel"  # a plain ViT's patch filters (patch_h, patch_w, 3, hidden)
_RESIZE_METHODS = ("linear", "bicubic")


def flatten(params):
  return {"/".join(path): value for path, value in flax.traverse_util.flatten_dict(params).items()}


def unflatten(flat):
  """{'a/b': x} -> {'a': {'b': x}}: the inverse of `flatten`."""
  return flax.traverse_util.unflatten_dict({tuple(key.split("/")): value for key, value in flat.items()})


def load(path):
  """Nested dict of numpy arrays in the zoo's paths from a checkpoint of any layout (`layouts.read`: a zoo or
  big_vision `.npz`, local or gs://, a transformers or timm directory, a timm `.safetensors`, an `hf://` name)."""
  return unflatten(layouts.read(path).flat)


def non_finite(params):
  """[(key, count of NaN and infinite values, shape)] of the floating-point parameters holding any, in key order."""
  found = []
  for key, value in sorted(flatten(params).items()):
    value = np.asarray(value)
    try:
      finite = np.isfinite(value)
    except TypeError:  # not a number type: nothing to check
      continue
    if not finite.all():
      found.append((key, int(finite.size - np.count_nonzero(finite)), value.shape))
  return found


def check_finite(params, what, fix):
  """UserError naming the first parameter of `params` (called `what` in the message) holding NaN or infinity."""
  found = non_finite(params)
  if found:
    key, count, shape = found[0]
    more = f" (and {len(found) - 1} more tensor(s))" if len(found) > 1 else ""
    raise UserError(f"{what} has {count} non-finite value(s) (NaN or infinity) in {key} {tuple(shape)}{more}; {fix}")


def save(params, path):
  """Writes `params` as a zoo `.npz` (one array per '/'-joined path); `load(path)` gives them back bit for bit.

  Parameters of a model with `scan_layers=True` are written in the zoo's per-layer layout.
  """
  params = vit.unstack_layers(flax.core.unfreeze(jax.device_get(params)))
  flat = {key: np.asarray(value) for key, value in flatten(params).items()}
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


def resize_grid(grid, shape, method="linear"):
  """Resizes a (height, width, channels) grid of embeddings to `shape` = (new_height, new_width).

  `linear` is `scipy.ndimage.zoom(grid, zoom, order=1)` itself, which the zoo's fine-tuning used (its results
  depend on it); `bicubic` is `jax.image.resize`'s half-pixel bicubic (as timm's resizing).
  """
  if method not in _RESIZE_METHODS:
    raise UserError(f"unknown position-embedding resize method {method!r}; use one of {', '.join(_RESIZE_METHODS)}")
  grid = np.asarray(grid)
  if method == "bicubic":
    resized = jax.image.resize(grid.astype(np.float32), (*shape, grid.shape[-1]), "bicubic", antialias=False)
    return np.asarray(resized).astype(grid.dtype)
  zoom = (shape[0] / grid.shape[0], shape[1] / grid.shape[1], 1)
  return scipy.ndimage.zoom(grid, zoom, order=1)


def interpolate_posembed(posemb, num_tokens, has_class_token, *, grid_shape=None, source_grid_shape=None,
                         method="linear"):
  """Resamples position embeddings (1, tokens, D) to `num_tokens` tokens (class token included if present).

  `has_class_token` may also be a count: the embeddings in front of the grid (class and register tokens). They
  are kept as is; the grid is resized in 2-D. Grids are square unless given:
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
    raise UserError(f"target grid {tuple(grid_shape)} plus {num_extra} class/register token(s) does not make "
                    f"{num_tokens} tokens")
  grid = resize_grid(grid.reshape(*source_grid_shape, -1), grid_shape, method)
  return np.concatenate([extra, grid.reshape(1, grid_shape[0] * grid_shape[1], -1)], axis=1)


def _shape(x):
  return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def checkpoint_family(flat):
  """'bit', 'cnn' or 'vit': which model family a flat {key: array} checkpoint holds, told by its keys."""
  if bit.ROOT_KEY in flat:
    return "bit"
  if "conv1/kernel" in flat and "dense1/kernel" in flat:
    return "cnn"
  return "vit"


def bit_width_factor(flat):
  """The width factor of a BiT checkpoint: its root convolution has 64 x width output channels."""
  return _shape(flat[bit.ROOT_KEY])[-1] // 64


def check_same_family(flat, model_config, path):
  """UserError naming both when a checkpoint holds another model family, or a BiT ResNet of another width."""
  got, want = checkpoint_family(flat), registry.family(model_config)
  name = model_config.get("model_name") or "the model"
  if got != want:
    raise UserError(f"checkpoint {path} holds {registry.FAMILIES[got][1]} but model {name} is "
                    f"{registry.FAMILIES[want][1]}; set the model name to the checkpoint's model (or use a checkpoint "
                    f"of {name})")
  if got == "bit" and bit_width_factor(flat) != model_config.width_factor:
    width = bit_width_factor(flat)
    raise UserError(f"checkpoint {path} is a BiT ResNet of width {width} (root conv {64 * width} channels) but "
                    f"model {name} has width {model_config.width_factor}; use a BiT-R..x{width} model name or a "
                    f"x{model_config.width_factor} file")


def _is_square(n):
  return n >= 0 and int(round(np.sqrt(n))) ** 2 == n


def vit_structure(shapes):
  """The ViT options a checkpoint's flat {key: shape} shows: `num_registers`, `no_embed_class` (position embeddings
  for a square grid alone although class or register tokens exist), `layer_scale` (`ls1`/`ls2` gains), `fc_norm`
  and `map` (a `MAPHead_0`)."""
  num_registers = int(shapes["reg"][1]) if "reg" in shapes else 0
  prefix = int("cls" in shapes) + num_registers
  tokens = shapes[POSEMB_KEY][1] if POSEMB_KEY in shapes else None
  return {
      "num_registers": num_registers,
      "no_embed_class": bool(prefix and tokens is not None and _is_square(tokens)
                             and not (tokens > prefix and _is_square(tokens - prefix))),
      "layer_scale": any(key.endswith(("/ls1", "/ls2")) for key in shapes),
      "fc_norm": "fc_norm/scale" in shapes,
      "map": "MAPHead_0/probe" in shapes,
  }


def model_structure(model_config):
  """`vit_structure`'s options of a model config."""
  return {
      "num_registers": int(model_config.get("num_registers", 0) or 0),
      "no_embed_class": bool(model_config.get("no_embed_class", False)),
      "layer_scale": model_config.get("layer_scale_init") is not None,
      "fc_norm": bool(model_config.get("fc_norm", False)),
      "map": model_config.get("classifier") == "map",
  }


# The model field and value that give each option of `vit_structure` the file's value.
_STRUCTURE_FIELDS = {
    "num_registers": lambda v: ("num_registers", v),
    "no_embed_class": lambda v: ("no_embed_class", v),
    "layer_scale": lambda v: ("layer_scale_init", 1e-6 if v else None),
    "fc_norm": lambda v: ("fc_norm", v),
    "map": lambda v: ("classifier", "map" if v else "token"),
}


def check_structure(flat, model_config, path):
  """UserError naming the first ViT option (`vit_structure`) where a checkpoint and the model differ, and the
  override that makes the model the file's."""
  shapes = {key: _shape(value) for key, value in flat.items()}
  if checkpoint_family(shapes) != "vit" or "embedding/kernel" not in shapes:
    return
  got, want = vit_structure(shapes), model_structure(model_config)
  for option, value in got.items():
    if value != want[option]:
      field, fix = _STRUCTURE_FIELDS[option](value)
      how = (f"--config.model.{field}={fix}" if field != "layer_scale_init" else
             f"config.model.update({field}={fix!r}) in a config file")
      raise UserError(f"checkpoint {path} has {option}={value} but model {model_config.get('model_name')} has "
                      f"{want[option]}; set {how} (or use a registry model with it)")


def warn_numerics(fields, model_config, path):
  """Logs the GELU form or LayerNorm eps a checkpoint computed with when the model's differ (fine-tuning works
  either way; the source's logits need the file's)."""
  for field, default in (("gelu_approximate", True), ("layer_norm_eps", 1e-6)):
    if field in fields and fields[field] != model_config.get(field, default):
      logging.warning("%s was trained with %s=%s but the model has %s; set --config.model.%s=%s to compute as its "
                      "source does", path, field, fields[field], model_config.get(field, default), field, fields[field])


def is_head(key):
  """The classifier's parameters, which fine-tuning re-initialises: ViT's and the CNN's `head/`, BiT's
  `resnet/head/`."""
  return key.startswith("head/") or key.startswith(bit.HEAD_PREFIX)


def load_pretrained(*, pretrained_path, init_params, model_config, image_size=None, posemb_method="linear"):
  """Pretrained parameters adapted to a new task, with the structure and shapes of `init_params`.

  - the classification head (`is_head`) comes from `init_params` (the class count usually differs);
  - `pre_logits` is dropped when the model has no representation layer;
  - position embeddings are resized to the model's grid (`image_size`, int or (height, width), is needed only
    for non-square grids).
  One log line per changed tensor. Any other missing or extra key, shape mismatch, or a NaN or infinity in the
  file is a UserError naming it.
  A model with `scan_layers=True` gets its encoder blocks stacked, as its `init_params` are.
  `init_params` may hold the model's state beside the parameters (`models.state.merge`: BatchNorm statistics),
  which is then read from the file too. A file of another model family, or a BiT file of another width, is a
  UserError naming both.
  """
  num_heads = (model_config.get("transformer") or {}).get("num_heads")
  checkpoint = layouts.read(pretrained_path, num_heads=num_heads)
  check_structure(checkpoint.flat, model_config, pretrained_path)
  warn_numerics(checkpoint.fields, model_config, pretrained_path)
  restored = unflatten(checkpoint.flat)
  # Refused here, not in `load`: inspecting a broken file must still work, starting from one must not.
  check_finite(restored, f"pretrained checkpoint {pretrained_path}",
               "the file is corrupt or from a run that diverged; download it again or start from another checkpoint")
  restored = flatten(restored)
  check_same_family(restored, model_config, pretrained_path)
  init_params = flax.core.unfreeze(init_params)
  scanned = "encoderblock" in init_params.get("Transformer", {})
  expected = flatten(vit.unstack_layers(init_params))
  adapted = {}
  for key in [k for k in restored if is_head(k) and k not in expected]:  # e.g. an SSL encoder: no head
    logging.info("load_pretrained: dropped %s %s (the model has no head)", key, _shape(restored.pop(key)))
  for key in [k for k in restored if k.startswith("pre_logits/") and k not in expected]:
    if model_config.get("representation_size") is None:
      logging.info("load_pretrained: dropped %s %s (the model has no representation layer)", key,
                   _shape(restored[key]))
      del restored[key]
  for key, init_value in expected.items():
    if is_head(key):
      logging.info("load_pretrained: %s %s from the new model (checkpoint had %s)", key, _shape(init_value),
                   _shape(restored[key]) if key in restored else "none")
      adapted[key] = init_value
      restored.pop(key, None)
      continue
    if key not in restored:
      raise UserError(f"checkpoint {pretrained_path} has no parameter {key} {_shape(init_value)} that model "
                      f"{model_config.get('model_name')} needs; use the checkpoint of the same model")
    value = restored.pop(key)
    if key == EMBEDDING_KEY and _shape(value)[2:] == _shape(init_value)[2:] and model_config.get("resnet") is None:
      if _shape(value) != _shape(init_value):  # another patch size: FlexiViT's PI-resize of the pixel filters
        patch = _shape(init_value)[:2]
        height, width = geometry.image_hw(image_size) if image_size is not None else patch
        if height % patch[0] or width % patch[1]:
          raise UserError(f"patch size {patch[0]}x{patch[1]} (resized from {_shape(value)[0]}x{_shape(value)[1]} of "
                          f"{pretrained_path}) does not divide the image size {height}x{width}; use a patch size "
                          f"that divides it, e.g. {_shape(value)[0]}")
        logging.info("load_pretrained: PI-resized %s %s -> %s (patch size)", key, _shape(value), _shape(init_value))
        value = pi_resize_patch_embedding(np.asarray(value), _shape(init_value)[:2])
    if _shape(value) != _shape(init_value):
      if key != POSEMB_KEY:
        raise UserError(f"parameter {key} has shape {_shape(value)} in {pretrained_path} but "
                        f"{_shape(init_value)} in model {model_config.get('model_name')}; use the checkpoint "
                        "of the same model")
      if _shape(value)[-1] != _shape(init_value)[-1]:
        raise UserError(f"parameter {key} has width {_shape(value)[-1]} in the checkpoint but "
                        f"{_shape(init_value)[-1]} in model {model_config.get('model_name')}; use the checkpoint "
                        "of the same model")
      resized = resample_posemb(value, model_config, image_size, num_tokens=_shape(init_value)[1],
                                method=posemb_method)
      if resized.shape[1] != _shape(init_value)[1]:
        raise UserError(f"image_size={image_size} gives {resized.shape[1]} tokens but the model's {key} has "
                        f"{_shape(init_value)[1]}; pass the image size the model was initialised for")
      logging.info("load_pretrained: resized %s %s -> %s (%s)", key, value.shape, resized.shape, posemb_method)
      value = resized
    adapted[key] = value
  if restored:
    extra = ", ".join(f"{k} {_shape(v)}" for k, v in sorted(restored.items())[:5])
    raise UserError(f"checkpoint {pretrained_path} has {len(restored)} parameter(s) model "
                    f"{model_config.get('model_name')} does not: {extra}; use the checkpoint of the same model")
  adapted = unflatten(adapted)
  return vit.stack_layers(adapted) if scanned else adapted


def resample_posemb(posemb, model_config, image_size=None, *, num_tokens=None, method="linear"):
  """Position embeddings (1, tokens, D) resampled to the model's token grid: the grid of `image_size` (int or
  (height, width)), or without it a square grid of `num_tokens` tokens. The one resampler of the package: fine-tuning
  from the zoo, progressive resizing and the tools all call it. Unchanged when the length already fits."""
  grid_shape = None
  prefix = geometry.posemb_prefix_tokens(model_config)
  if image_size is not None:
    grid_shape = geometry.grid_shape(model_config, image_size)
    num_tokens = grid_shape[0] * grid_shape[1] + prefix
  if posemb.shape[1] == num_tokens:
    return posemb
  return interpolate_posembed(posemb, num_tokens, prefix, grid_shape=grid_shape, method=method)


def bilinear_resize_matrix(old_size, new_size):
  """[new_h * new_w, old_h * old_w]: `jax.image.resize(patch, new_size, "bilinear")` of an old-size patch (row-major
  pixels) as a matrix, column i the resized i-th basis patch."""
  basis = np.eye(old_size[0] * old_size[1], dtype=np.float32).reshape(-1, *old_size)
  resized = jax.vmap(lambda patch: jax.image.resize(patch, tuple(new_size), "bilinear"))(basis)
  return np.asarray(resized, np.float64).reshape(len(basis), -1).T


def pi_resize_patch_embedding(kernel, new_size):
  """FlexiViT's pseudo-inverse resize (Beyer et al. 2023) of patch filters (ph, pw, C, D) to `new_size` (qh, qw):
  the filters w' = pinv(B^T) w, B the bilinear resize matrix, so that <resize(x), w'> = <x, w> for every patch x
  when upsampling (a token of a resized patch equals the original token), the least-squares fit when shrinking."""
  old_size = tuple(kernel.shape[:2])
  if old_size == tuple(new_size):
    return kernel
  resize = bilinear_resize_matrix(old_size, new_size)
  flat = np.asarray(kernel, np.float64).reshape(old_size[0] * old_size[1], -1)
  resized = np.linalg.pinv(resize.T) @ flat
  return resized.reshape(*new_size, *kernel.shape[2:]).astype(kernel.dtype)


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
