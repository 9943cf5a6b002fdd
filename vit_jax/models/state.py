"""Model variables beyond the parameters: the collections a model updates while training (BatchNorm's running
statistics in `batch_stats`), how a forward pass carries them, and their place in `model.npz`.

`model_state` is `{}` for a model without such variables (every ViT and BiT) and `{'batch_stats': tree}` for one
with BatchNorm. In `model.npz` the statistics sit beside the parameter paths under `batch_stats/`.
"""
STATE_COLLECTIONS = ("batch_stats",)


def variables(params, model_state=None):
  """The variables dict `module.apply` takes."""
  return {"params": params, **(model_state or {})}


def from_init(variables_):
  """(params, model_state) of what `module.init` returned."""
  return variables_["params"], {k: variables_[k] for k in STATE_COLLECTIONS if k in variables_}


def train_apply(model, variables_, images, rng, **kwargs):
  """(outputs, updated model_state) of a forward pass in training mode: dropout and drop path draw from `rng`,
  BatchNorm normalises with the batch's statistics and updates its running averages."""
  mutable = [k for k in STATE_COLLECTIONS if k in variables_]
  if not mutable:
    return model.apply(variables_, images, train=True, rngs={"dropout": rng}, **kwargs), {}
  outputs, updates = model.apply(variables_, images, train=True, rngs={"dropout": rng}, mutable=mutable, **kwargs)
  return outputs, dict(updates)


def split(tree):
  """(params, model_state) of a loaded `model.npz` tree (`batch_stats/...` keys are the state)."""
  tree = dict(tree)
  model_state = {k: tree.pop(k) for k in STATE_COLLECTIONS if k in tree}
  return tree, model_state


def merge(params, model_state=None):
  """The tree `model.npz` stores: the parameters, and the state under its collection names."""
  return {**params, **(model_state or {})}
