"""Learning-rate schedules and optimizers (optax).

Two recipes: `sgd` with momentum 0.9, the model zoo's fine-tuning recipe, and `adamw` with decoupled weight
decay on kernels only, the pretraining recipe. Both run behind global-norm clipping and a linear warmup followed
by cosine or linear decay.

Per-parameter learning-rate factors, for fine-tuning: layer-wise decay (`layer_decay`, BEiT/MAE style) and
multipliers by regex over parameter paths (`lr_mults`, big_vision style; 0 freezes). They scale each update after
the optimizer, so a checkpoint's optimizer state is the same with or without them.
"""
import math
import numbers
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vit_jax.errors import UserError
from vit_jax.models.precision import DTYPES
from vit_jax.sharding import path_str

DECAY_TYPES = ("cosine", "linear", "constant", "steps")
STEP_DECAY_FACTOR = 0.1  # `steps` decay: the learning rate is divided by 10 at each boundary (BiT-HyperRule)
OPTIMIZERS = ("sgd", "adamw")


def make_schedule(*, base_lr, total_steps, warmup_steps, decay_type, decay_steps=()):
  """lr(step) for 0-based optimizer steps: linear warmup to `base_lr`, then decay to 0 at `total_steps` (cosine,
  linear), none (constant), or 10x at each of `decay_steps` (fractions of `total_steps`, for `steps`).

  Warmup counts from step + 1, so the first update already moves the parameters.
  """
  if decay_type not in DECAY_TYPES:
    raise UserError(f"unknown decay_type {decay_type!r}; use one of {', '.join(DECAY_TYPES)}")
  decay_steps = tuple(decay_steps or ())
  if decay_type == "steps" and (not decay_steps or not all(0 < f < 1 for f in decay_steps)):
    raise UserError(f"decay_type=steps needs decay_steps, fractions of total_steps in (0, 1), e.g. (0.3, 0.6, 0.9); "
                    f"got decay_steps={decay_steps}")
  if decay_steps and decay_type != "steps":
    raise UserError(f"decay_steps={decay_steps} applies only to decay_type=steps (decay_type={decay_type})")
  if not base_lr > 0:  # also NaN
    raise UserError(f"base_lr={base_lr} must be positive; e.g. 1e-3 for adamw, 0.03 for sgd fine-tuning")
  if total_steps < 1:
    raise UserError(f"total_steps={total_steps} must be at least 1")
  if warmup_steps < 0:
    raise UserError(f"warmup_steps={warmup_steps} is negative; use 0 or more")
  if warmup_steps > total_steps:
    logging.warning("warmup_steps=%d > total_steps=%d: the learning rate rises to only %.3g of base_lr and never "
                    "decays.", warmup_steps, total_steps, total_steps / warmup_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.minimum(1.0, (step + 1) / max(warmup_steps, 1))
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    if decay_type == "cosine":
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay_type == "linear":
      decay = 1.0 - progress
    elif decay_type == "steps":
      passed = sum((step >= round(fraction * total_steps)).astype(jnp.float32) for fraction in decay_steps)
      decay = STEP_DECAY_FACTOR ** passed
    else:
      decay = jnp.ones_like(progress)
    return base_lr * warmup * decay

  return schedule


def kernel_mask(params):
  """True for weight matrices (`.../kernel`): biases, norms, embeddings and the class token are not decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


_LR_MULTS_EXAMPLE = '(("head/.*", 1.0), (".*", 0.0))'
_BLOCK_PATH = re.compile(r"^Transformer/encoderblock_(\d+)(/|$)")  # unrolled layout: one subtree per layer
_STACKED_PATH = re.compile(r"^Transformer/encoderblock(/|$)")  # scan_layers=True: leaves stacked over layers
_AFTER_BLOCKS_PATH = re.compile(r"^(Transformer/encoder_norm|pre_logits|head)(/|$)")


def _check_layer_decay(layer_decay):
  if isinstance(layer_decay, bool) or not isinstance(layer_decay, numbers.Real) or not 0 < layer_decay <= 1:
    raise UserError(f"config.layer_decay={layer_decay!r} must be in (0, 1]: 1 is off, e.g. 0.75 to fine-tune "
                    "ViT-B/16 (each block's learning rate 0.75 times the next one's)")


def _parse_lr_mults(lr_mults):
  """[(regex, compiled, multiplier)] of `lr_mults`, a sequence of (regex, multiplier) pairs (tuples or lists)."""
  if lr_mults is None:
    return []
  if isinstance(lr_mults, (str, bytes)) or not isinstance(lr_mults, (tuple, list)):
    raise UserError(f"config.lr_mults={lr_mults!r} must be a sequence of (regex, multiplier) pairs, e.g. "
                    f"{_LR_MULTS_EXAMPLE}")
  if (len(lr_mults) == 2 and isinstance(lr_mults[0], str) and isinstance(lr_mults[1], numbers.Real)
      and not isinstance(lr_mults[1], bool)):
    raise UserError(f"config.lr_mults={lr_mults!r} is one pair, not a sequence of pairs; wrap it: "
                    f"({tuple(lr_mults)!r},)")
  rules = []
  for entry in lr_mults:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], numbers.Real) and not isinstance(entry[1], bool)):
      raise UserError(f"config.lr_mults entry {entry!r} is not a (regex, multiplier) pair of a string and a number, "
                      f"e.g. {_LR_MULTS_EXAMPLE}")
    regex, multiplier = entry
    try:
      compiled = re.compile(regex)
    except re.error as e:
      raise UserError(f"config.lr_mults regex {regex!r} does not compile ({e}); fix it, e.g. escape a literal "
                      "character with a backslash") from None
    if not (math.isfinite(multiplier) and multiplier >= 0):
      raise UserError(f"config.lr_mults multiplier {multiplier!r} of regex {regex!r} must be a finite number >= 0 "
                      "(0 freezes the matching parameters)")
    rules.append((regex, compiled, float(multiplier)))
  return rules


def _leaves_with_paths(params):
  return [(path_str(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]


def _example_paths(paths, count=10):
  """The first path of each module (`Transformer/<module>` or a top-level one), block 0 standing for all blocks."""
  firsts = {}
  for path in paths:
    parts = path.split("/")
    module = "/".join(parts[:2]) if parts[0] == "Transformer" else parts[0]
    if not ((m := _BLOCK_PATH.match(path)) and m.group(1) != "0"):
      firsts.setdefault(module, path)
  return ", ".join(repr(path) for path in list(firsts.values())[:count])


def check_lr_mults(params, lr_mults):
  """Raises a UserError for a malformed `lr_mults` entry, a regex that does not compile, a negative multiplier, or a
  regex that fullmatches no path of `params` (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`)."""
  rules = _parse_lr_mults(lr_mults)
  paths = [path for path, _ in _leaves_with_paths(params)]
  for regex, compiled, _ in rules:
    if not any(compiled.fullmatch(path) for path in paths):
      hint = ""
      if "encoderblock_" in regex and any(_STACKED_PATH.match(path) for path in paths):
        hint = " (scan_layers=True stacks every layer under 'Transformer/encoderblock/', without an index)"
      raise UserError(f"config.lr_mults regex {regex!r} matches no parameter path{hint}; it must match a whole path "
                      f"(re.fullmatch), e.g. one of {_example_paths(paths)} ({len(paths)} parameters)")


def _num_layers(leaves):
  """L, the number of transformer blocks: `encoderblock_{i}` subtrees, or the leading axis of stacked ones."""
  indices = {int(m.group(1)) for path, _ in leaves if (m := _BLOCK_PATH.match(path))}
  depths = {leaf.shape[0] for path, leaf in leaves if _STACKED_PATH.match(path)}
  if indices and depths:
    raise ValueError("parameters hold both Transformer/encoderblock_{i} and a stacked Transformer/encoderblock")
  if len(depths) > 1:
    raise ValueError(f"stacked Transformer/encoderblock leaves disagree on the number of layers: {sorted(depths)}")
  return max(indices) + 1 if indices else (depths.pop() if depths else 0)


def learning_rate_factors(params, *, layer_decay=1.0, lr_mults=()):
  """Each parameter's learning-rate factor, in a tree shaped like `params`: its layer decay times its multiplier.

  Layer decay with L blocks: decay**(L + 1) for everything before the blocks (patch embedding, ResNet stem, class
  token, position embedding), decay**(L - i) for block i, 1 after them (encoder_norm, pre_logits, head). A stacked
  (scan_layers) block leaf of shape (L, ...) gets an array of shape (L, 1, ...) whose row i is decay**(L - i);
  every other factor is a Python float. The multiplier is that of the first `lr_mults` regex that fullmatches the
  path ('Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'), 1 if none does; 0 freezes. Raises a UserError for
  a bad `layer_decay` or `lr_mults` (see `check_lr_mults`).
  """
  _check_layer_decay(layer_decay)
  check_lr_mults(params, lr_mults)
  rules = _parse_lr_mults(lr_mults)
  leaves = _leaves_with_paths(params)
  num_layers = _num_layers(leaves) if layer_decay != 1 else 0
  if layer_decay != 1 and not num_layers:
    raise UserError(f"config.layer_decay={layer_decay} needs transformer blocks (Transformer/encoderblock_*), and "
                    "this model has none; set layer_decay=1.0")

  def layer_factor(path, leaf):
    if layer_decay == 1 or _AFTER_BLOCKS_PATH.match(path):
      return 1.0
    if m := _BLOCK_PATH.match(path):
      return layer_decay ** (num_layers - int(m.group(1)))
    if _STACKED_PATH.match(path):
      rows = np.array([layer_decay ** (num_layers - i) for i in range(num_layers)])
      return rows.reshape((num_layers,) + (1,) * (len(leaf.shape) - 1))
    return layer_decay ** (num_layers + 1)  # embeddings and the ResNet stem come before the first block

  def factor(path, leaf):
    path = path_str(path)
    multiplier = next((mult for _, compiled, mult in rules if compiled.fullmatch(path)), 1.0)
    return multiplier * layer_factor(path, leaf)

  return jax.tree_util.tree_map_with_path(factor, params)


def _is_frozen(factor):
  return not np.any(factor)


def _scale(update, factor):
  if _is_frozen(factor):
    return jnp.zeros_like(update)  # not update * 0, which keeps a NaN or inf
  if isinstance(factor, float) and factor == 1.0:
    return update
  return update * np.asarray(factor, dtype=update.dtype)  # keeps the update's dtype


def scale_by_learning_rate_factors(inner, *, layer_decay=1.0, lr_mults=()):
  """`inner` (the clipping + optimizer chain) with the factors of `learning_rate_factors` applied per parameter.

  Frozen parameters (factor 0) get zero gradients before `inner`, so global-norm clipping and the moments see only
  trained ones; `inner`'s updates are then multiplied by the factors, which thus scale the whole learning rate,
  AdamW's decoupled weight decay included (as timm's `lr_scale`). The state is exactly `inner`'s, so checkpoints
  restore whether the factors are on or off. Factors come from the updates' paths at trace time (static under jit).
  """
  _check_layer_decay(layer_decay)
  _parse_lr_mults(lr_mults)  # fails here on what needs no parameters; a regex without a match fails on update
  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, **extra_args):
    factors = learning_rate_factors(updates, layer_decay=layer_decay, lr_mults=lr_mults)
    grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if _is_frozen(f) else g, updates, factors)
    updates, state = inner.update(grads, state, params, **extra_args)
    return jax.tree.map(_scale, updates, factors), state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def make_optimizer(*, optimizer, base_lr, total_steps, warmup_steps, decay_type, decay_steps=(), momentum=0.9,
                   beta2=0.999, momentum_dtype="float32", weight_decay=0.0, grad_norm_clip=0.0, layer_decay=1.0,
                   lr_mults=()):
  """(optax transformation, its learning-rate schedule): `optimizer` (sgd | adamw) behind global-norm clipping
  (`grad_norm_clip` 0 = none), learning rate from `make_schedule`, times the per-parameter factors of
  `layer_decay` and `lr_mults` (`learning_rate_factors`) unless those are off (1.0 and empty)."""
  if optimizer not in OPTIMIZERS:
    raise UserError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
  if momentum_dtype not in DTYPES:
    raise UserError(f"unknown momentum_dtype {momentum_dtype!r}; use one of {', '.join(DTYPES)}")
  for name, value in (("momentum", momentum), ("beta2", beta2)):
    if not 0 <= value < 1:
      raise UserError(f"{name}={value} must be in [0, 1), e.g. 0.9")
  for name, value in (("weight_decay", weight_decay), ("grad_norm_clip", grad_norm_clip)):
    if not value >= 0:
      raise UserError(f"{name}={value} must be 0 (off) or positive")
  _check_layer_decay(layer_decay)
  factors_on = layer_decay != 1 or bool(_parse_lr_mults(lr_mults))
  schedule = make_schedule(base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                           decay_type=decay_type, decay_steps=decay_steps)
  if optimizer == "sgd":
    tx = optax.sgd(schedule, momentum=momentum, accumulator_dtype=DTYPES[momentum_dtype])
  else:
    tx = optax.adamw(schedule, b1=momentum, b2=beta2, weight_decay=weight_decay, mu_dtype=DTYPES[momentum_dtype],
                     mask=kernel_mask)
  # Always a chain of two, so that turning clipping on or off keeps the state's structure (and a checkpoint
  # resumes with a changed grad_norm_clip).
  clip = optax.clip_by_global_norm(grad_norm_clip) if grad_norm_clip else optax.identity()
  chain = optax.chain(clip, tx)
  if not factors_on:
    return chain, schedule  # exactly the plain chain, numerics included
  return scale_by_learning_rate_factors(chain, layer_decay=layer_decay, lr_mults=lr_mults), schedule


# The training config keys make_optimizer takes.
CONFIG_KEYS = ("optimizer", "base_lr", "total_steps", "warmup_steps", "decay_type", "decay_steps", "momentum",
               "beta2", "momentum_dtype", "weight_decay", "grad_norm_clip", "layer_decay", "lr_mults")
