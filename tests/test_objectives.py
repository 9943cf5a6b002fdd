"""Training objectives: the registry by name, and the supervised objective's loss and metrics (the self-supervised
ones: tests/test_ssl.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models, objectives
from vit_jax.errors import UserError
from vit_jax.objectives import supervised


def test_registry_names_and_errors():
  assert objectives.get("supervised") is supervised.Supervised
  assert objectives.get("train") is supervised.Supervised  # the name workdirs written before the rename carry
  assert objectives.get("mae") is objectives.MAE and objectives.get("masked_patch") is objectives.MaskedPatch
  with pytest.raises(UserError, match="unknown trainer 'byol'; use one of supervised, masked_patch, mae"):
    objectives.get("byol")
  with pytest.raises(UserError, match="unknown loss 'hinge'; use one of softmax_xent, sigmoid_xent"):
    supervised.Supervised(loss="hinge")


def test_supervised_loss_fn_is_the_mean_cross_entropy_and_accuracy_of_the_batch():
  model = models.get_model("testing", num_classes=3, transformer={"dropout_rate": 0.0})
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  labels = jnp.array([0, 1, 2, 1])
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), params["head"]["kernel"].shape)
  logits = np.asarray(model.apply({"params": params}, images), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  objective = supervised.Supervised()
  assert objective.num_outputs(3) == 3 and objective.classifies
  loss, (metrics, model_state) = objective.loss_fn(model, {"params": params}, {"image": images, "label": labels},
                                                   jax.random.PRNGKey(2))
  assert model_state == {}
  np.testing.assert_allclose(loss, -log_probs[np.arange(4), labels].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["train_accuracy"], np.mean(logits.argmax(-1) == np.asarray(labels)))
