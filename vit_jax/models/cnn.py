"""The from-scratch course's small CNN, the baseline its small ViT is compared with: three stages of two 3x3
convolutions (32-64, 128-128, 256-256, ReLU), each followed by a 2x2 max pool and BatchNorm, then dense layers
1024-512 (ReLU) and the head. 5.85M parameters on 32-px images with 10 classes.

BatchNorm keeps running statistics in the `batch_stats` collection: training normalises with the batch's own
statistics (over the whole global batch: under `jit` the mean over a sharded batch axis is the global mean, so the
result does not depend on the device count) and updates the running averages; evaluation uses the averages.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vit_jax.models import precision

# Keras's BatchNormalization defaults, which the course used.
BATCHNORM_MOMENTUM = 0.99
BATCHNORM_EPSILON = 1e-3

SHARDING_RULES = (
    (r"(.*/)?dense\d/kernel$", P("fsdp", None)),
)


class CourseCNN(nn.Module):
  """Small CNN classifier; `num_classes=0` or None returns the last hidden layer's features."""
  num_classes: Optional[int]
  conv_widths: Sequence[Sequence[int]] = ((32, 64), (128, 128), (256, 256))
  dense_widths: Sequence[int] = (1024, 512)
  model_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train=False):
    dtype = jnp.dtype(self.dtype)
    x = images.astype(dtype)
    conv_index = 0
    for stage, widths in enumerate(self.conv_widths):
      for width in widths:
        conv_index += 1
        x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", dtype=dtype,
                            conv_general_dilated=precision.conv_general_dilated, name=f"conv{conv_index}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.BatchNorm(use_running_average=not train, momentum=BATCHNORM_MOMENTUM, epsilon=BATCHNORM_EPSILON,
                       dtype=dtype, name=f"bn{stage + 1}")(x)
    x = x.reshape(x.shape[0], -1)
    for index, width in enumerate(self.dense_widths):
      x = nn.relu(nn.Dense(width, dtype=dtype, dot_general=precision.dot_general, name=f"dense{index + 1}")(x))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=dtype, dot_general=precision.dot_general, name="head")(x)
    return x.astype(jnp.float32)
