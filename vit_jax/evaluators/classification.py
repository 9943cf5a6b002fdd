"""Exact classification metrics over a whole split: every example once, the padding of the last batch masked out.

The training loop (test metrics every `eval_every` steps) and `python -m vit_jax.tools.evaluate` both use this.
"""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import sharding
from vit_jax.objectives.supervised import correct, per_example_loss


def make_eval_step(model, *, loss, mesh, variable_shardings):
  """jitted (variables, batch) -> masked sums of the loss and of correct predictions, and the count of real
  examples; `variables` as `model.apply` takes them (`models.state.variables(params, model_state)`)."""
  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    mask = batch["mask"]
    return {"loss": jnp.sum(per_example_loss(logits, batch["label"], loss=loss) * mask),
            "correct": jnp.sum(correct(logits, batch["label"]) * mask),
            "count": jnp.sum(mask)}
  return jax.jit(eval_step, in_shardings=(variable_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=NamedSharding(mesh, P()))


def evaluate(eval_step, variables, batches, on_batch=None):
  """{'loss', 'accuracy', 'count'} over `batches` (an eval iterator); `on_batch()` is called after each batch."""
  totals = None
  for batch in batches:
    sums = eval_step(variables, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if on_batch is not None:
      on_batch()
  totals = jax.device_get(totals) if totals is not None else {"loss": 0.0, "correct": 0.0, "count": 0.0}
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / max(count, 1.0), "accuracy": float(totals["correct"]) / max(count, 1.0),
          "count": int(count)}
