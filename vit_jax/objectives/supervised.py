"""Supervised classification: cross-entropy on labels (class ids, or mixed-up targets), the zoo's objective."""
import dataclasses

import jax
import jax.numpy as jnp
import optax

from vit_jax import flops
from vit_jax.errors import UserError
from vit_jax.models import state

LOSSES = ("softmax_xent", "sigmoid_xent")


def per_example_loss(logits, labels, *, loss, label_smoothing=0.0):
  """Cross-entropy per example; `labels` are class ids [batch] or (mixed-up) targets [batch, classes].

  `sigmoid_xent` sums independent binary losses over classes, as in the ImageNet-21k pretraining.
  """
  targets = labels if labels.ndim == 2 else jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  if loss == "sigmoid_xent":
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)
  return optax.softmax_cross_entropy(logits, targets)


def correct(logits, labels):
  """1.0 where the top logit is the label's class (the argmax of mixed-up targets), else 0.0."""
  classes = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
  return (jnp.argmax(logits, axis=-1) == classes).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Supervised:
  """Train a classifier on labelled images; evaluated by test loss and accuracy, exported as the whole model."""
  loss: str = "softmax_xent"
  label_smoothing: float = 0.0
  classifies = True  # the loop runs the classification evaluator on the test split
  encoder_key = None  # the whole model is exported

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise UserError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
    if not 0 <= self.label_smoothing < 1:
      raise UserError(f"label_smoothing={self.label_smoothing} must be in [0, 1), e.g. 0.1")

  @classmethod
  def from_config(cls, config):
    return cls(loss=config.loss, label_smoothing=config.label_smoothing)

  def check_model(self, model_config, image_size):
    del model_config, image_size  # every registry model classifies

  def num_outputs(self, num_classes):
    """The model's head size for a dataset of `num_classes` classes."""
    return num_classes

  def wrap(self, model):
    return model

  def train_flops_per_image(self, model_config, image_size, num_classes):
    return flops.train_flops_per_image(model_config, image_size, num_classes)

  def loss_fn(self, model, variables, batch, rng):
    """(mean loss, ({'train_accuracy'}, model_state)) of one (micro-)batch in training mode."""
    logits, model_state = state.train_apply(model, variables, batch["image"], rng)
    losses = per_example_loss(logits, batch["label"], loss=self.loss, label_smoothing=self.label_smoothing)
    return losses.mean(), ({"train_accuracy": correct(logits, batch["label"]).mean()}, model_state)
