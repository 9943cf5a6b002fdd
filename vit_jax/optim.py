"""Learning-rate schedules and optimizers (optax).

Two recipes: `sgd` with momentum 0.9, the model zoo's fine-tuning recipe, and `adamw` with decoupled weight
decay on kernels only, the pretraining recipe. Both run behind global-norm clipping and a linear warmup followed
by cosine or linear decay.
"""
import jax
import jax.numpy as jnp
import optax

from vit_jax.errors import UserError

DECAY_TYPES = ("cosine", "linear", "constant")
OPTIMIZERS = ("sgd", "adamw")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_schedule(*, base_lr, total_steps, warmup_steps, decay_type):
  """lr(step) for 0-based optimizer steps: linear warmup to `base_lr`, then decay to 0 at `total_steps`.

  Warmup counts from step + 1, so the first update already moves the parameters.
  """
  if decay_type not in DECAY_TYPES:
    raise UserError(f"unknown decay_type {decay_type!r}; use one of {', '.join(DECAY_TYPES)}")
  if warmup_steps < 0:
    raise UserError(f"warmup_steps={warmup_steps} is negative; use 0 or more")

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


def schedule_from_config(config):
  return make_schedule(base_lr=config.base_lr, total_steps=config.total_steps, warmup_steps=config.warmup_steps,
                       decay_type=config.decay_type)


def kernel_mask(params):
  """True for weight matrices (`.../kernel`): biases, norms, embeddings and the class token are not decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(config):
  """The optax transformation of `config.optimizer`, learning rate from `schedule_from_config(config)`."""
  if config.optimizer not in OPTIMIZERS:
    raise UserError(f"unknown optimizer {config.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
  if config.momentum_dtype not in _DTYPES:
    raise UserError(f"unknown momentum_dtype {config.momentum_dtype!r}; use one of {', '.join(_DTYPES)}")
  momentum_dtype = _DTYPES[config.momentum_dtype]
  schedule = schedule_from_config(config)
  if config.optimizer == "sgd":
    optimizer = optax.sgd(schedule, momentum=config.momentum, accumulator_dtype=momentum_dtype)
  else:
    optimizer = optax.adamw(schedule, b1=config.momentum, b2=config.beta2, weight_decay=config.weight_decay,
                            mu_dtype=momentum_dtype, mask=kernel_mask)
  if config.grad_norm_clip:
    return optax.chain(optax.clip_by_global_norm(config.grad_norm_clip), optimizer)
  return optimizer

