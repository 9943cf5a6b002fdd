"""What the self-supervised objectives share: patches as pixel vectors, random masks drawn from a step's key, the
mean-colour targets of masked patch prediction and fixed 2-D sine-cosine position embeddings (MAE's decoder)."""
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.errors import UserError
from vit_jax import models

COLOUR_BITS = 3  # the paper's target: each channel's mean quantised to 3 bits (8 levels)


def check_plain_vit(model_config, objective):
  """SSL objectives mask patch tokens: a CNN has none, and a hybrid's ResNet stem sees every pixel of a masked
  patch's neighbourhood before the tokens exist, so masking its tokens would not hide the pixels."""
  name = model_config.get("model_name") or "this model"
  if models.family(model_config) != "vit" or model_config.get("transformer") is None:
    raise UserError(f"trainer={objective!r} masks patch tokens, which {models.family_description(model_config)} "
                    "does not have; use a ViT (--config.model_name=ViT-B_16, ...)")
  if model_config.get("resnet") is not None:
    raise UserError(f"trainer={objective!r} cannot mask the tokens of the hybrid {name}: its ResNet stem sees the "
                    "masked pixels first; use a plain ViT (e.g. ViT-B_16)")


def patchify(images, patch):
  """[batch, H, W, C] -> [batch, patches, ph * pw * C], patches in row-major order as the patch embedding makes
  them, each patch's pixels row by row with the channels last."""
  n, h, w, c = images.shape
  ph, pw = patch
  x = images.reshape(n, h // ph, ph, w // pw, pw, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // ph) * (w // pw), ph * pw * c)


def random_subset(rng, batch, num_patches, count):
  """[batch, num_patches] bool, exactly `count` True per row at positions drawn uniformly, and the row-wise
  ordering that puts them first (`shuffle`, [batch, num_patches] ints) and its inverse (`restore`)."""
  noise = jax.random.uniform(rng, (batch, num_patches))
  shuffle = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  chosen = jnp.take_along_axis(jnp.arange(num_patches)[None, :] < count, restore, axis=1)
  return chosen, shuffle, restore


def colour_classes(pixels, channels, cells=1):
  """Mean colour of each patch (or of each of its `cells` x `cells` sub-patches), quantised to COLOUR_BITS per
  channel, as one class id in [0, 8 ** channels): [batch, patches, ph * pw * C] in [-1, 1] -> [batch, patches,
  cells ** 2] ints. `pixels` as `patchify` orders them; `channels` C."""
  n, num_patches, size = pixels.shape
  side = int(round((size // channels) ** 0.5))
  sub = side // cells
  x = pixels.reshape(n, num_patches, cells, sub, cells, sub, channels)
  mean = x.mean(axis=(3, 5)).reshape(n, num_patches, cells * cells, channels)
  levels = 2 ** COLOUR_BITS
  bins = jnp.clip(jnp.floor((mean + 1.0) / 2.0 * levels), 0, levels - 1).astype(jnp.int32)
  weights = levels ** jnp.arange(channels - 1, -1, -1)
  return (bins * weights).sum(axis=-1)


def sincos_posemb(rows, cols, width):
  """Fixed 2-D sine-cosine position embeddings [rows * cols, width], as MAE's decoder has them: the first half of the
  channels encodes the column, the second the row, each as sin then cos of the position at frequencies
  1 / 10000^(k / (width / 4)), k < width / 4."""
  if width % 4:
    raise UserError(f"decoder width {width} must be a multiple of 4 for 2-D sine-cosine position embeddings")
  quarter = width // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  grid_r, grid_c = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
  parts = []
  for pos in (grid_c.ravel(), grid_r.ravel()):
    angles = np.outer(pos, omega)
    parts += [np.sin(angles), np.cos(angles)]
  return np.concatenate(parts, axis=1).astype(np.float32)

