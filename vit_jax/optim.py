"""Learning-rate schedules and optimizers (optax).

Two recipes: `sgd` with momentum 0.9, the model zoo's fine-tuning recipe, and `adamw` with decoupled weight
decay on kernels only, the pretraining recipe. Both run behind global-norm clipping and a linear warmup followed
by cosine or linear decay.
"""
import jax
import jax.numpy as jnp
import optax
from absl import logging

from vit_jax.errors import UserError
from vit_jax.models.precision import DTYPES

DECAY_TYPES = ("cosine", "linear", "constant")
OPTIMIZERS = ("sgd", "adamw")


def make_schedule(*, base_lr, total_steps, warmup_steps, decay_type):
  """lr(step) for 0-based optimizer steps: linear warmup to `base_lr`, then decay to 0 at `total_steps`.

  Warmup counts from step + 1, so the first update already moves the parameters.
  """
  if decay_type not in DECAY_TYPES:
    raise UserError(f"unknown decay_type {decay_type!r}; use one of {', '.join(DECAY_TYPES)}")
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
    else:
      decay = jnp.ones_like(progress)
    return base_lr * warmup * decay

  return schedule


def kernel_mask(params):
  """True for weight matrices (`.../kernel`): biases, norms, embeddings and the class token are not decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(*, optimizer, base_lr, total_steps, warmup_steps, decay_type, momentum=0.9, beta2=0.999,
                   momentum_dtype="float32", weight_decay=0.0, grad_norm_clip=0.0):
  """(optax transformation, its learning-rate schedule): `optimizer` (sgd | adamw) behind global-norm clipping
  (`grad_norm_clip` 0 = none), learning rate from `make_schedule`."""
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
  schedule = make_schedule(base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                           decay_type=decay_type)
  if optimizer == "sgd":
    tx = optax.sgd(schedule, momentum=momentum, accumulator_dtype=DTYPES[momentum_dtype])
  else:
    tx = optax.adamw(schedule, b1=momentum, b2=beta2, weight_decay=weight_decay, mu_dtype=DTYPES[momentum_dtype],
                     mask=kernel_mask)
  # Always a chain of two, so that turning clipping on or off keeps the state's structure (and a checkpoint
  # resumes with a changed grad_norm_clip).
  clip = optax.clip_by_global_norm(grad_norm_clip) if grad_norm_clip else optax.identity()
  return optax.chain(clip, tx), schedule


CONFIG_KEYS = ("optimizer", "base_lr", "total_steps", "warmup_steps", "decay_type", "momentum", "beta2",
               "momentum_dtype", "weight_decay", "grad_norm_clip")  # the training config keys make_optimizer takes
