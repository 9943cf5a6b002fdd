"""The train state and the jitted steps every training objective shares: init, train step, parameter count.

An objective supplies `loss_fn(model, variables, batch, rng) -> (loss, (metrics, model_state))` for one
(micro-)batch: `variables` are the parameters and the model's state (`models.state`), and `model_state` the state
after the forward pass (`{}` for models without one). Everything else here (accumulation, the optimizer update,
sharding, donation) is the same for every objective.
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import sharding
from vit_jax.errors import UserError
from vit_jax.models import geometry
from vit_jax.models import state as model_state_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; the key of step s is fold_in(rng, s), so a resumed run draws the same dropout
  ema_params: Any = None  # exponential moving average of `params` (`ema_decay` > 0), sharded like them; else None
  model_state: Any = None  # BatchNorm's running statistics ({'batch_stats': ...}), None for models without them

  def variables(self, ema=False):
    """What `model.apply` takes: the (EMA) parameters and the model's state. The EMA weights use the live
    running statistics."""
    return model_state_lib.variables(self.ema_params if ema else self.params, self.model_state)


def ema_decay_at(step, ema_decay):
  """The EMA decay used by the update of 0-based optimizer step `step`: `ema_decay`, warmed up as TF's
  ExponentialMovingAverage(num_updates) does, min(ema_decay, (1 + step) / (10 + step)), so the average forgets the
  random initialisation within the first steps instead of over ~1 / (1 - ema_decay) of them."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def check_ema_decay(ema_decay):
  if not 0 <= ema_decay < 1:
    raise UserError(f"ema_decay={ema_decay} must be in [0, 1) (0 = no EMA of the weights), e.g. 0.9999")


def _images(image_size):
  height, width = geometry.image_hw(image_size)
  return jnp.zeros((1, height, width, 3), jnp.float32)


def count_params(model, image_size) -> int:
  """Parameters of `model` for images of `image_size`, from shapes alone: JAX's devices stay untouched."""
  shapes = jax.eval_shape(lambda rng: model.init(rng, _images(image_size), train=False),
                          jax.ShapeDtypeStruct((2,), jnp.uint32))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def make_init_fn(model, tx, image_size, *, ema=False):
  """seed -> TrainState for images of `image_size` (int or (height, width)), with an EMA of the parameters when
  `ema`; run it under `jax.jit(out_shardings=...)` so every array is born sharded."""
  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params, model_state = model_state_lib.from_init(model.init(init_rng, _images(image_size), train=False))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng,
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None, model_state=model_state or None)
  return init


# (model, variables, batch, rng) -> (loss, ({name: scalar}, model_state))
LossFn = Callable[[Any, Any, dict, jax.Array], tuple]


def make_train_step(model, tx, schedule, loss_fn: LossFn, *, mesh, state_shardings, accum_steps=1, ema_decay=0.0):
  """jitted (state, batch) -> (state, metrics); the state is donated, so it is updated in place.

  With `ema_decay` > 0 the state's `ema_params` follow the updated parameters: ema = d * ema + (1 - d) * params,
  d = `ema_decay_at(step)`.

  Metrics are the objective's (averaged over micro-batches) plus `learning_rate` and `grad_norm`. With
  `accum_steps` > 1 the batch is split into micro-batches that a `lax.scan` runs one after the other, summing
  gradients: memory stays that of one micro-batch, the update that of the whole batch. The model's state (BatchNorm
  statistics) is updated by each micro-batch in turn.
  """
  batch_spec = P(sharding.BATCH_AXES)

  def micro_step(params, model_state, batch, rng):
    def loss_of(p):
      return loss_fn(model, model_state_lib.variables(p, model_state), batch, rng)
    (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return loss, metrics, grads, new_state or None

  def train_step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    batch = dict(batch, image=jax.lax.with_sharding_constraint(batch["image"], NamedSharding(mesh, batch_spec)))
    if accum_steps == 1:
      loss, metrics, grads, model_state = micro_step(state.params, state.model_state, batch, rng)
    else:
      # Micro-batch i takes rows i, i + accum_steps, ...: every device keeps its own rows, nothing moves.
      def split(x):
        x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), NamedSharding(mesh, P(None, *batch_spec)))

      def accumulate(carry, micro):
        sums, model_state = carry
        index, micro_batch = micro
        loss_i, metrics_i, grads_i, model_state = micro_step(state.params, model_state, micro_batch,
                                                             jax.random.fold_in(rng, index))
        return (jax.tree.map(jnp.add, sums, (loss_i, metrics_i, grads_i)), model_state), None

      shapes = jax.eval_shape(micro_step, state.params, state.model_state,
                              jax.tree.map(lambda x: x[:x.shape[0] // accum_steps], batch), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[:3])
      ((loss, metrics, grads), model_state), _ = jax.lax.scan(
          accumulate, (zeros, state.model_state), (jnp.arange(accum_steps), jax.tree.map(split, batch)))
      loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_decay:
      decay = ema_decay_at(state.step, ema_decay)
      ema_params = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params)
    metrics = {"train_loss": loss, **metrics, "learning_rate": schedule(state.step),
               "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
                         model_state=model_state), metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
