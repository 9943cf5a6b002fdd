"""Training objectives by name (config key `trainer`): what a batch's loss is and what the loop evaluates.

An objective is a small object with `from_config(config)`, `num_outputs(num_classes)` (the head size),
`loss_fn(model, variables, batch, rng) -> (loss, (metrics, model_state))` (`variables`: the parameters and the
model's state, `vit_jax.models.state`; `model_state`: that state after the forward pass, `{}` for models without
one) and `classifies`: when True the loop also scores the test
split with the classification evaluator, using the objective's `loss` (a `supervised.LOSSES` name). The loop in
`vit_jax.train` does the rest (sharding, checkpoints, resume, logging, export) for all.
"""
from vit_jax.errors import UserError
from vit_jax.objectives.supervised import Supervised

OBJECTIVES = {"supervised": Supervised}
# Names that workdirs written before an objective was renamed still carry in their config.json.
_FORMER_NAMES = {"train": "supervised"}


def get(name):
  """The objective class registered as `name`; a UserError listing the known names otherwise."""
  name = _FORMER_NAMES.get(name, name)
  if name not in OBJECTIVES:
    raise UserError(f"unknown trainer {name!r}; use one of {', '.join(OBJECTIVES)}")
  return OBJECTIVES[name]
