"""Masked patch prediction, the ViT paper's self-supervision (Dosovitskiy et al. 2021, App. B.1.2).

A share of the patch embeddings (`corruption_rate`, 50%) is corrupted: of those, 80% are replaced by a learned
`[mask]` embedding, 10% by the embedding of another patch of the same image and 10% kept. From each corrupted
patch's output token a linear head predicts its mean colour, each channel quantised to 3 bits (512 classes for
RGB); the loss is the cross-entropy on corrupted patches only. Targets `colour_4x4` (the mean colours of the 4x4
sub-patches: 16 predictions of 512) and `pixels` (L2 regression on the whole patch) are the appendix's variants.
The encoder is the ViT itself (its parameters under `encoder/`, exported as `model.npz` without a head); the mask
embedding and the prediction head live in the orbax checkpoint only.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax import flops
from vit_jax.errors import UserError
from vit_jax.models import geometry, precision, state
from vit_jax.objectives import masking

TARGETS = ("colour", "colour_4x4", "pixels")


def unpooled(vit):
  """`vit` returning every output token (class token first, when it has one) and no head."""
  classifier = "token_unpooled" if vit.classifier in geometry.TOKEN_CLASSIFIERS else "unpooled"
  return vit.clone(num_classes=0, classifier=classifier, representation_size=None, parent=None)


def corrupt_patches(x, corruption, mask_embedding):
  """`x` [batch, patches, hidden] with the corruption applied: (replace [batch, patches] bool: by the mask embedding,
  swap [batch, patches] bool: by the embedding at `source` [batch, patches] of the same image)."""
  replace, swap, source = corruption
  other = jnp.take_along_axis(x, source[..., None], axis=1)
  x = jnp.where(swap[..., None], other, x)
  return jnp.where(replace[..., None], mask_embedding.astype(x.dtype), x)


class MaskedPatchModel(nn.Module):
  """The encoder (an unpooled ViT, under `encoder/`), the `[mask]` embedding and the prediction head."""
  encoder: Any
  num_predictions: int  # outputs per patch token

  @nn.compact
  def __call__(self, images, *, train=False, corruption=None):
    mask_embedding = self.param("mask_embedding", nn.initializers.normal(stddev=0.02), (self.encoder.hidden_size,))
    transform = None if corruption is None else lambda x: corrupt_patches(x, corruption, mask_embedding)
    tokens = self.encoder(images, train=train, patch_transform=transform)
    tokens = tokens[:, 1:] if self.encoder.classifier == "token_unpooled" else tokens
    out = nn.Dense(self.num_predictions, dtype=self.encoder.dtype, dot_general=precision.dot_general,
                   kernel_init=nn.initializers.zeros, name="prediction_head")(tokens)
    return out.astype(jnp.float32)


def draw_corruption(rng, batch, num_patches, *, rate, split):
  """(corrupted, replace, swap, source): which patches are corrupted (exactly round(rate * patches) per image, at
  random), which of those the mask embedding replaces and which another patch's embedding swaps in (each corrupted
  patch independently, with probabilities `split[0]` and `split[1]`; `split[2]` keeps it), and the other patch
  (uniform over the image's other patches)."""
  count = max(1, int(round(rate * num_patches)))
  pick_rng, kind_rng, source_rng = jax.random.split(rng, 3)
  corrupted, _, _ = masking.random_subset(pick_rng, batch, num_patches, count)
  kind = jax.random.choice(kind_rng, 3, (batch, num_patches), p=jnp.asarray(split, jnp.float32))
  offset = jax.random.randint(source_rng, (batch, num_patches), 1, max(num_patches, 2))
  source = (jnp.arange(num_patches)[None, :] + offset) % num_patches  # never the patch itself
  return corrupted, corrupted & (kind == 0), corrupted & (kind == 1), source


@dataclasses.dataclass(frozen=True)
class MaskedPatch:
  """config.trainer = "masked_patch"; its keys are `config.ssl.{corruption_rate, corruption_split, target}`."""
  corruption_rate: float = 0.5
  corruption_split: tuple = (0.8, 0.1, 0.1)
  target: str = "colour"
  loss = "masked_patch"  # no classification loss: the loop runs no classification evaluator
  classifies = False
  encoder_key = "encoder"

  def __post_init__(self):
    if not 0 < self.corruption_rate < 1:
      raise UserError(f"ssl.corruption_rate={self.corruption_rate} must be in (0, 1), e.g. 0.5 (the paper) or "
                      "0.15 (BERT's)")
    split = tuple(float(v) for v in self.corruption_split)
    if len(split) != 3 or min(split) < 0 or not math.isclose(sum(split), 1.0, abs_tol=1e-6):
      raise UserError(f"ssl.corruption_split={tuple(self.corruption_split)} must be three fractions >= 0 (mask "
                      "embedding, another patch, unchanged) that sum to 1, e.g. (0.8, 0.1, 0.1)")
    if self.target not in TARGETS:
      raise UserError(f"ssl.target={self.target!r} is not a masked-patch target; use one of {', '.join(TARGETS)}")

  @classmethod
  def from_config(cls, config):
    ssl = config.ssl
    return cls(corruption_rate=ssl.corruption_rate, corruption_split=tuple(ssl.corruption_split), target=ssl.target)

  def check_model(self, model_config, image_size):
    masking.check_plain_vit(model_config, "masked_patch")
    if self.target == "colour_4x4" and any(p % 4 for p in model_config.patches.size):
      raise UserError(f"ssl.target='colour_4x4' splits each patch into 4x4 sub-patches, but the patch size "
                      f"{tuple(model_config.patches.size)} is not a multiple of 4; use ssl.target='colour'")

  def num_outputs(self, num_classes):
    """The encoder's head size: none, the prediction head is the objective's."""
    del num_classes
    return 0

  def _num_predictions(self, patch, channels=3):
    if self.target == "pixels":
      return patch[0] * patch[1] * channels
    cells = 16 if self.target == "colour_4x4" else 1
    return cells * 2 ** (masking.COLOUR_BITS * channels)

  def wrap(self, vit):
    """The model trained: the ViT as the encoder, with the mask embedding and the prediction head."""
    return MaskedPatchModel(unpooled(vit), self._num_predictions(tuple(vit.patches["size"])))


  def train_flops_per_image(self, model_config, image_size, num_classes=0):
    rows, cols = geometry.grid_shape(model_config, image_size)
    head = 2 * rows * cols * model_config.hidden_size * self._num_predictions(tuple(model_config.patches.size))
    return 3 * (flops.forward_flops_per_image(model_config, image_size, 0) + head)

  def loss_fn(self, model, variables, batch, rng):
    """(mean loss over corrupted patches, ({'masked_accuracy'} or {}, {})) of one (micro-)batch."""
    images = batch["image"]
    patch = tuple(model.encoder.patches["size"])
    pixels = masking.patchify(images, patch)
    batch_size, num_patches = pixels.shape[:2]
    corrupt_rng, dropout_rng = jax.random.split(rng)
    corrupted, replace, swap, source = draw_corruption(corrupt_rng, batch_size, num_patches,
                                                       rate=self.corruption_rate, split=self.corruption_split)
    out, _ = state.train_apply(model, variables, images, dropout_rng, corruption=(replace, swap, source))
    return prediction_loss(out, pixels, corrupted, target=self.target, channels=images.shape[-1])


def prediction_loss(out, pixels, corrupted, *, target, channels):
  """(mean loss over the corrupted patches, metrics) of the head's outputs `out` [batch, patches, outputs] against
  the patches' `pixels` (as `masking.patchify` gives them); `corrupted` [batch, patches] bool."""
  weights = corrupted.astype(jnp.float32)
  if target == "pixels":
    per_patch = jnp.mean(jnp.square(out - pixels), axis=-1)
    return (per_patch * weights).sum() / weights.sum(), ({}, {})
  cells = 4 if target == "colour_4x4" else 1
  classes = masking.colour_classes(pixels, channels, cells)  # [batch, patches, cells ** 2]
  logits = out.reshape(*classes.shape, -1)
  per_patch = optax.softmax_cross_entropy_with_integer_labels(logits, classes).mean(axis=-1)
  hits = (jnp.argmax(logits, axis=-1) == classes).mean(axis=-1)
  return ((per_patch * weights).sum() / weights.sum(),
          ({"masked_accuracy": (hits * weights).sum() / weights.sum()}, {}))
