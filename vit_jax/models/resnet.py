"""ResNet stem of the hybrid ViTs: weight-standardised convs, GroupNorm, post-activation bottlenecks (BiT style).

Parameter names follow the zoo: `conv_root`, `gn_root`, `block{s}/unit{u}/{conv1..3,gn1..3,conv_proj,gn_proj}`.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vit_jax.models import precision

# The zoo was trained with flax's GroupNorm default epsilon (timm uses 1e-5; that difference is visible at f32).
GROUPNORM_EPSILON = 1e-6
WEIGHT_STANDARDIZE_EPSILON = 1e-5


def weight_standardize(kernel, axis, eps=WEIGHT_STANDARDIZE_EPSILON):
  """Zero mean, unit standard deviation per output channel (over `axis`)."""
  kernel = kernel - jnp.mean(kernel, axis=axis, keepdims=True)
  return kernel / (jnp.std(kernel, axis=axis, keepdims=True) + eps)


class StdConv(nn.Conv):
  """Convolution whose kernel is weight-standardised on every call (the stored kernel stays raw)."""

  def param(self, name, init_fn, *init_args, **init_kwargs):
    param = super().param(name, init_fn, *init_args, **init_kwargs)
    if name == "kernel":
      param = weight_standardize(param, axis=(0, 1, 2))
    return param


def group_norm(name, dtype, **kwargs):
  return nn.GroupNorm(num_groups=32, epsilon=GROUPNORM_EPSILON, dtype=dtype, name=name, **kwargs)


class BottleneckUnit(nn.Module):
  """Post-activation bottleneck: 1x1 -> 3x3 (strided) -> 1x1 (x4 channels), residual projected on shape change."""
  features: int
  strides: Sequence[int] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda features, kernel, strides, name: StdConv(
        features, kernel, strides=strides, use_bias=False, dtype=self.dtype,
        conv_general_dilated=precision.conv_general_dilated, name=name)
    residual = x
    if x.shape[-1] != self.features * 4 or tuple(self.strides) != (1, 1):
      residual = conv(self.features * 4, (1, 1), self.strides, "conv_proj")(residual)
      residual = group_norm("gn_proj", self.dtype)(residual)

    y = nn.relu(group_norm("gn1", self.dtype)(conv(self.features, (1, 1), (1, 1), "conv1")(x)))
    y = nn.relu(group_norm("gn2", self.dtype)(conv(self.features, (3, 3), self.strides, "conv2")(y)))
    y = conv(self.features * 4, (1, 1), (1, 1), "conv3")(y)
    # Zero-initialised last scale: each unit starts as the identity on its (projected) input.
    y = group_norm("gn3", self.dtype, scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`num_units` bottleneck units; the first one carries the stage's stride."""
  num_units: int
  features: int
  first_stride: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for unit in range(self.num_units):
      strides = self.first_stride if unit == 0 else (1, 1)
      x = BottleneckUnit(self.features, strides=strides, dtype=self.dtype, name=f"unit{unit + 1}")(x)
    return x


def resnet_stem(x, *, num_layers, width_factor=1, dtype=jnp.float32):
  """Root block (7x7/2 conv, GroupNorm, ReLU, 3x3/2 max-pool) and `len(num_layers)` bottleneck stages.

  Called inside the parent's compact `__call__`, so `conv_root`, `gn_root` and `block{s}` sit at the root of the
  parameter tree, as in the zoo. The root alone downsamples 4x; every stage after the first halves the resolution
  again: (3, 4, 9) gives /16, (2, 2, 2, 2) and (3, 4, 6, 3) give /32, `()` is the root only.
  """
  width = int(64 * width_factor)
  x = StdConv(width, (7, 7), strides=(2, 2), use_bias=False, dtype=dtype,
              conv_general_dilated=precision.conv_general_dilated, name="conv_root")(x)
  x = nn.relu(group_norm("gn_root", dtype)(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
  for stage, num_units in enumerate(num_layers):
    x = ResNetStage(num_units, width * 2**stage, first_stride=(1, 1) if stage == 0 else (2, 2), dtype=dtype,
                    name=f"block{stage + 1}")(x)
  return x
