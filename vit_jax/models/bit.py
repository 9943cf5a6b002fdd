"""BiT ResNet-v2 (Kolesnikov et al. 2020, "Big Transfer"): pre-activation bottlenecks with weight-standardised
convolutions and GroupNorm (32 groups), the BiT root (7x7/2 conv, zero padding, 3x3/2 max pool), a final GroupNorm
and ReLU, global average pooling and a linear head.

Parameter paths are the keys of the big_transfer `.npz` files (BiT-S/BiT-M, upstream and ILSVRC2012 fine-tuned):
`resnet/root_block/standardized_conv2d/kernel`, `resnet/block{s}/unit{uu}/{a,b,c}/standardized_conv2d/kernel`,
`resnet/block{s}/unit{uu}/{a,b,c}/group_norm/{gamma,beta}`, `resnet/block{s}/unit{uu}/a/proj/standardized_conv2d/kernel`,
`resnet/group_norm/{gamma,beta}`, `resnet/head/conv2d/{kernel,bias}`: a BiT file is this model's parameter tree, and
`zoo.save` writes it back in the same layout.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vit_jax.errors import UserError
from vit_jax.models import precision

# Units per stage of each depth.
BLOCK_UNITS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# As timm's resnetv2_*_bit, which reproduces the big_transfer checkpoints: GroupNorm eps 1e-5, and the kernel
# standardised as (w - mean) / sqrt(var + 1e-8).
GROUPNORM_EPSILON = 1e-5
WEIGHT_STANDARDIZE_EPSILON = 1e-8
NUM_GROUPS = 32
MIN_IMAGE_SIZE = 32  # the network downsamples 32x
ROOT_KEY = "resnet/root_block/standardized_conv2d/kernel"  # its last axis is 64 x the width factor
HEAD_PREFIX = "resnet/head/"

# The large kernels split over `fsdp` along their output channels; the rest is small and replicated.
SHARDING_RULES = (
    (r"(.*/)?resnet/.*standardized_conv2d/kernel$", P(None, None, None, "fsdp")),
    (r"(.*/)?resnet/head/conv2d/kernel$", P(None, None, "fsdp", None)),
)


class StandardizedConv2d(nn.Conv):
  """Convolution whose kernel is standardised per output channel on every call (the stored kernel stays raw)."""

  def param(self, name, init_fn, *init_args, **init_kwargs):
    kernel = super().param(name, init_fn, *init_args, **init_kwargs)
    if name != "kernel":
      return kernel
    return standardize(kernel)


def standardize(kernel):
  """(w - mean) / sqrt(var + eps) per output channel (the last axis) of an HWIO kernel."""
  mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
  return (kernel - mean) * jax.lax.rsqrt(var + WEIGHT_STANDARDIZE_EPSILON)


class StandardizedPointwiseConv(nn.Module):
  """A standardised 1x1 convolution (kernel (1, 1, I, O), as BiT stores it) computed as a strided slice and a
  matmul: XLA:CPU's convolution gradients are several times slower than a matmul's (docs/benchmarks.md)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features))
    kernel = standardize(kernel)[0, 0].astype(self.dtype)
    if self.strides > 1:
      x = x[:, ::self.strides, ::self.strides]
    return precision.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))


class GroupNorm(nn.Module):
  """GroupNorm with BiT's parameter names (`gamma`, `beta`); statistics in float32 whatever the compute dtype."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.ones, (channels,))
    beta = self.param("beta", nn.initializers.zeros, (channels,))
    x32 = x.astype(jnp.float32)
    grouped = x32.reshape(*x.shape[:-1], NUM_GROUPS, channels // NUM_GROUPS)
    axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)  # two passes: no cancellation
    # Normalisation and affine folded into one scale and shift per (example, channel): one pass over x.
    scale = jax.lax.rsqrt(var + GROUPNORM_EPSILON) * gamma.reshape(NUM_GROUPS, -1)
    shift = beta.reshape(NUM_GROUPS, -1) - mean * scale
    stats_shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (channels,)
    return (x32 * scale.reshape(stats_shape) + shift.reshape(stats_shape)).astype(self.dtype)


def _conv(features, kernel, strides, padding, dtype, name="standardized_conv2d"):
  if kernel == 1:
    return StandardizedPointwiseConv(features, strides, dtype, name=name)
  return StandardizedConv2d(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                            use_bias=False, dtype=dtype, conv_general_dilated=precision.conv_general_dilated,
                            name=name)


class _Projection(nn.Module):
  """The shortcut's strided 1x1 convolution (`a/proj/standardized_conv2d`)."""
  features: int
  strides: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    return _conv(self.features, 1, self.strides, "VALID", self.dtype)(x)


class _PreActConv(nn.Module):
  """GroupNorm, ReLU, then a standardised convolution (one of a unit's `a`, `b`, `c`); `a` also projects the
  activated input for the shortcut when the shape changes."""
  features: int
  kernel: int
  strides: int = 1
  projection: Optional[int] = None  # the shortcut's output channels, or None for the identity shortcut
  projection_strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(GroupNorm(self.dtype, name="group_norm")(x))
    shortcut = None
    if self.projection is not None:
      shortcut = _Projection(self.projection, self.projection_strides, self.dtype, name="proj")(x)
    pad = (self.kernel - 1) // 2  # symmetric, as BiT and timm (not TF's SAME, which pads strided convs unevenly)
    y = _conv(self.features, self.kernel, self.strides, ((pad, pad), (pad, pad)), self.dtype)(x)
    return y, shortcut


class PreActBottleneck(nn.Module):
  """x + c(b(a(x))): 1x1 to features/4, 3x3 (strided) and 1x1 back to `features`, each after GroupNorm and ReLU.
  The shortcut is projected from the activated input when the channels or the resolution change."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    needs_projection = x.shape[-1] != self.features or self.strides != 1
    y, shortcut = _PreActConv(self.features // 4, 1, projection=self.features if needs_projection else None,
                              projection_strides=self.strides, dtype=self.dtype, name="a")(x)
    y, _ = _PreActConv(self.features // 4, 3, self.strides, dtype=self.dtype, name="b")(y)
    y, _ = _PreActConv(self.features, 1, dtype=self.dtype, name="c")(y)
    return y + (x if shortcut is None else shortcut)


class _ResNetV2(nn.Module):
  """The whole network under `resnet/`, as the BiT files have it."""
  block_units: Sequence[int]
  width_factor: int
  num_classes: Optional[int]
  dtype: Any

  @nn.compact
  def __call__(self, x):
    width = 64 * self.width_factor
    x = _RootBlock(width, self.dtype, name="root_block")(x)
    for stage, units in enumerate(self.block_units):
      x = _Stage(units, width * 4 * 2**stage, 1 if stage == 0 else 2, self.dtype, name=f"block{stage + 1}")(x)
    x = nn.relu(GroupNorm(self.dtype, name="group_norm")(x))
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = _Head(self.num_classes, self.dtype, name="head")(x)
    return x


class _Stage(nn.Module):
  """`units` bottlenecks `unit01`, `unit02`, ...; the first one carries the stage's stride."""
  units: int
  features: int
  strides: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    for unit in range(self.units):
      x = PreActBottleneck(self.features, self.strides if unit == 0 else 1, self.dtype, name=f"unit{unit + 1:02d}")(x)
    return x


class _RootBlock(nn.Module):
  """7x7/2 standardised conv (padding 3), then zero padding of 1 and a 3x3/2 max pool (BiT's root)."""
  features: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = _conv(self.features, 7, 2, ((3, 3), (3, 3)), self.dtype)(x)
    # Zero, not -inf, padding: the root has no ReLU, so negative values meet the padding (as in BiT and timm).
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Head(nn.Module):
  """The classifier as BiT stores it: a 1x1 convolution `head/conv2d` (kernel (1, 1, C, classes), bias), applied
  to the pooled features. Zero-initialised, as BiT fine-tunes."""
  num_classes: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   conv_general_dilated=precision.conv_general_dilated, name="conv2d")
    return conv(x[:, None, None, :])[:, 0, 0, :]


class BiTResNet(nn.Module):
  """BiT ResNet-v2 classifier; `num_classes=0` or None returns the pooled pre-logit features."""
  num_classes: Optional[int]
  block_units: Sequence[int]
  width_factor: int
  model_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train=False):
    del train  # no dropout, no batch statistics
    if images.shape[1] < MIN_IMAGE_SIZE or images.shape[2] < MIN_IMAGE_SIZE:
      raise UserError(f"image size {images.shape[1]}x{images.shape[2]} is too small for {self.model_name or 'BiT'} "
                      f"(it downsamples 32x); use at least {MIN_IMAGE_SIZE} px")
    x = images.astype(jnp.dtype(self.dtype))
    x = _ResNetV2(tuple(self.block_units), int(self.width_factor), self.num_classes, jnp.dtype(self.dtype),
                  name="resnet")(x)
    return x.astype(jnp.float32)
