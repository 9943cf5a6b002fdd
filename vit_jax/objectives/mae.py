"""Masked autoencoders (He et al. 2021, MAE): mask most patches, encode only the visible ones, reconstruct the rest.

Per image a random `mask_ratio` (75%) of the patches is hidden; the encoder (the ViT, its position embeddings added
before the visible patches are picked) sees only the others, so its cost falls with the mask ratio. A light decoder
(its own width, depth and heads; fixed 2-D sine-cosine position embeddings) takes the encoded patches and a learned
mask token in every hidden place, back in image order, and predicts each patch's pixels. The loss is the mean
squared error on the hidden patches only, against pixels normalised per patch (mean and variance of the patch's
own pixels, `norm_pix_loss`). The encoder's parameters sit under `encoder/` and are exported as `model.npz`
without a head; the decoder lives in the orbax checkpoint only.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import flops
from vit_jax.errors import UserError
from vit_jax.models import geometry, precision, state
from vit_jax.models.vit import Encoder1DBlock
from vit_jax.objectives import masking
from vit_jax.objectives.masked_patch import unpooled

NORM_PIX_EPS = 1e-6  # MAE's


def num_visible(num_patches, mask_ratio):
  """Patches the encoder sees: MAE's int(patches * (1 - mask_ratio)), at least one."""
  return max(1, int(num_patches * (1.0 - mask_ratio)))


class MAEModel(nn.Module):
  """The encoder (an unpooled ViT, under `encoder/`) and the decoder."""
  encoder: Any
  decoder_width: int
  decoder_depth: int
  decoder_heads: int

  @nn.compact
  def __call__(self, images, *, train=False, keep=None, restore=None):
    """Pixels of every patch [batch, patches, ph * pw * C]. `keep` [batch, k]: the visible patches in the order the
    encoder takes them; `restore` [batch, patches]: where each patch sits in (visible ..., hidden ...) order, i.e.
    the inverse of the shuffle whose first k entries are `keep`. None: every patch is visible."""
    dtype = self.encoder.dtype
    patch = tuple(self.encoder.patches["size"])
    rows, cols = images.shape[1] // patch[0], images.shape[2] // patch[1]
    tokens = self.encoder(images, train=train, keep=keep)
    prefix = 1 if self.encoder.classifier == "token_unpooled" else 0
    dense = lambda features, name, **kw: nn.Dense(features, dtype=dtype, dot_general=precision.dot_general,
                                                  kernel_init=nn.initializers.xavier_uniform(), name=name, **kw)
    x = dense(self.decoder_width, "decoder_embed")(tokens).astype(jnp.float32)
    mask_token = self.param("mask_token", nn.initializers.normal(stddev=0.02), (self.decoder_width,))
    patches = x[:, prefix:]
    if keep is not None:
      hidden = rows * cols - patches.shape[1]
      filler = jnp.broadcast_to(mask_token, (x.shape[0], hidden, self.decoder_width))
      patches = jnp.take_along_axis(jnp.concatenate([patches, filler], axis=1), restore[..., None], axis=1)
    posemb = jnp.asarray(masking.sincos_posemb(rows, cols, self.decoder_width))
    x = jnp.concatenate([x[:, :prefix], patches + posemb[None]], axis=1)  # the class token's position: zeros
    for layer in range(self.decoder_depth):
      x = Encoder1DBlock(4 * self.decoder_width, self.decoder_heads, dtype=dtype,
                         name=f"decoder_block_{layer}")(x, not train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, name="decoder_norm")(x)
    out = dense(patch[0] * patch[1] * images.shape[-1], "decoder_pred")(x[:, prefix:].astype(dtype))
    return out.astype(jnp.float32)


def reconstruction_loss(predicted, pixels, hidden, norm_pix_loss=True):
  """Mean over hidden patches of each patch's mean squared error; targets normalised per patch when
  `norm_pix_loss` (MAE's: the unbiased variance, eps 1e-6). `hidden` [batch, patches] is 1 where masked."""
  target = pixels
  if norm_pix_loss:
    mean = pixels.mean(axis=-1, keepdims=True)
    var = pixels.var(axis=-1, keepdims=True, ddof=1)
    target = (pixels - mean) / jnp.sqrt(var + NORM_PIX_EPS)
  per_patch = jnp.mean(jnp.square(predicted - target), axis=-1)
  hidden = hidden.astype(jnp.float32)
  return (per_patch * hidden).sum() / hidden.sum()


@dataclasses.dataclass(frozen=True)
class MAE:
  """config.trainer = "mae"; its keys are `config.ssl.{mask_ratio, decoder_width, decoder_depth, decoder_heads,
  norm_pix_loss}`."""
  mask_ratio: float = 0.75
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  norm_pix_loss: bool = True
  loss = "mae"
  classifies = False
  encoder_key = "encoder"

  def __post_init__(self):
    if not 0 < self.mask_ratio < 1:
      raise UserError(f"ssl.mask_ratio={self.mask_ratio} must be in (0, 1), e.g. 0.75 (MAE's)")
    if self.decoder_depth < 1 or self.decoder_heads < 1 or self.decoder_width < 4:
      raise UserError(f"the MAE decoder (ssl.decoder_width={self.decoder_width}, decoder_depth={self.decoder_depth}, "
                      f"decoder_heads={self.decoder_heads}) needs a width >= 4 and at least one layer and head")
    if self.decoder_width % self.decoder_heads or self.decoder_width % 4:
      raise UserError(f"ssl.decoder_width={self.decoder_width} must be a multiple of 4 and of "
                      f"ssl.decoder_heads={self.decoder_heads}, e.g. 512 with 16 heads")

  @classmethod
  def from_config(cls, config):
    ssl = config.ssl
    return cls(mask_ratio=ssl.mask_ratio, decoder_width=ssl.decoder_width, decoder_depth=ssl.decoder_depth,
               decoder_heads=ssl.decoder_heads, norm_pix_loss=ssl.norm_pix_loss)

  def check_model(self, model_config, image_size):
    masking.check_plain_vit(model_config, "mae")

  def num_outputs(self, num_classes):
    del num_classes
    return 0

  def wrap(self, vit):
    return MAEModel(unpooled(vit), self.decoder_width, self.decoder_depth, self.decoder_heads)


  def draw_mask(self, rng, batch, num_patches):
    """(keep [batch, k], restore [batch, patches], hidden [batch, patches] bool) for one batch."""
    count = num_visible(num_patches, self.mask_ratio)
    visible, shuffle, restore = masking.random_subset(rng, batch, num_patches, count)
    return shuffle[:, :count], restore, ~visible

  def train_flops_per_image(self, model_config, image_size, num_classes=0):
    rows, cols = geometry.grid_shape(model_config, image_size)
    return 3 * flops.mae_forward_flops(model_config, image_size, visible=num_visible(rows * cols, self.mask_ratio),
                                       decoder_width=self.decoder_width, decoder_depth=self.decoder_depth)

  def loss_fn(self, model, variables, batch, rng):
    """(mean squared error over hidden patches, ({}, {})) of one (micro-)batch."""
    images = batch["image"]
    pixels = masking.patchify(images, tuple(model.encoder.patches["size"]))
    mask_rng, dropout_rng = jax.random.split(rng)
    keep, restore, hidden = self.draw_mask(mask_rng, *pixels.shape[:2])
    predicted, _ = state.train_apply(model, variables, images, dropout_rng, keep=keep, restore=restore)
    return reconstruction_loss(predicted, pixels, hidden, self.norm_pix_loss), ({}, {})
