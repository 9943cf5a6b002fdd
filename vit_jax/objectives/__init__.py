"""Training objectives by name (config key `trainer`): what a batch's loss is and what the loop evaluates.

An objective is a small object with
- `from_config(config)`; `check_model(model_config, image_size)`: a UserError for a model it cannot train;
- `num_outputs(num_classes)`: the head size of the model the registry builds (0: no head);
- `wrap(model)`: the module trained (the model itself, or the model as `encoder` with the objective's own parts),
  and `encoder_key`: None, or the key of the model's parameters in the wrapped module's (what `model.npz` holds and
  few-shot probes; the rest stays in the orbax checkpoint);
- `loss_fn(model, variables, batch, rng) -> (loss, (metrics, model_state))` on the wrapped model (`variables`: the
  parameters and the model's state, `vit_jax.models.state`; `model_state`: that state after the forward pass, `{}`
  for models without one); the masks and dropout of a step come from `rng`, the step's key, so a resumed run
  draws the same ones;
- `train_flops_per_image(model_config, image_size, num_classes)`: for MFU;
- `classifies`: when True the loop also scores the test split with the classification evaluator, using the
  objective's `loss` (a `supervised.LOSSES` name).
The loop in `vit_jax.train` does the rest (sharding, checkpoints, resume, logging, export) for all.
"""
from vit_jax.errors import UserError
from vit_jax.objectives.mae import MAE
from vit_jax.objectives.masked_patch import MaskedPatch
from vit_jax.objectives.supervised import Supervised

OBJECTIVES = {"supervised": Supervised, "masked_patch": MaskedPatch, "mae": MAE}
# Names that workdirs written before an objective was renamed still carry in their config.json.
_FORMER_NAMES = {"train": "supervised"}


def get(name):
  """The objective class registered as `name`; a UserError listing the known names otherwise."""
  name = _FORMER_NAMES.get(name, name)
  if name not in OBJECTIVES:
    raise UserError(f"unknown trainer {name!r}; use one of {', '.join(OBJECTIVES)}")
  return OBJECTIVES[name]
