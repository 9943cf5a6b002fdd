"""Independent float64 numpy forward passes of the convolutional models, to check the Flax modules numerically.

- `bit_forward`: BiT ResNet-v2 (Kolesnikov et al. 2020) over the flat keys of a big_transfer `.npz`
  (`resnet/root_block/...`, `resnet/block{s}/unit{uu}/{a,b,c}/...`, `resnet/group_norm/...`, `resnet/head/conv2d/...`),
  as big_transfer and timm's `resnetv2_*_bit` define it.
- `cnn_forward`: the from-scratch course's CNN (`CNN-CIFAR`) over its flat parameter paths (`conv1/kernel`, ...,
  `bn1/scale`, `dense1/kernel`, `head/kernel`) and BatchNorm running statistics (`bn1/mean`, `bn1/var`).

Images are NHWC, kernels HWIO. Shares no code with `vit_jax.models`.
"""
import re

import numpy as np

GROUPNORM_EPSILON = 1e-5
WEIGHT_STANDARDIZE_EPSILON = 1e-8
NUM_GROUPS = 32
BATCHNORM_EPSILON = 1e-3
_UNIT = re.compile(r"^resnet/block(\d+)/unit(\d+)/a/standardized_conv2d/kernel$")


def conv2d(x, w, stride=1, padding=0):
  """NHWC x HWIO cross-correlation with `padding` zeros on every side, as a sum of shifted matmuls."""
  x = np.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
  kh, kw = w.shape[:2]
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]), np.result_type(x, w))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride] @ w[i, j]
  return out


def max_pool(x, size, stride):
  """Max over `size` x `size` windows at `stride`, no padding."""
  out_h = (x.shape[1] - size) // stride + 1
  out_w = (x.shape[2] - size) // stride + 1
  windows = [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
             for i in range(size) for j in range(size)]
  return np.max(windows, axis=0)


def relu(x):
  return np.maximum(x, 0)


def standardize(w):
  """Weight standardisation per output channel over (H, W, I): (w - mean) / sqrt(var + 1e-8), biased variance."""
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = ((w - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
  return (w - mean) / np.sqrt(var + WEIGHT_STANDARDIZE_EPSILON)


def group_norm(x, gamma, beta):
  """GroupNorm of 32 groups: biased statistics over H, W and each group's channels, eps 1e-5."""
  n, h, w, c = x.shape
  grouped = x.reshape(n, h, w, NUM_GROUPS, c // NUM_GROUPS)
  mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
  var = ((grouped - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((grouped - mean) / np.sqrt(var + GROUPNORM_EPSILON)).reshape(n, h, w, c) * gamma + beta


def bit_units(flat):
  """[(block, unit)] of a BiT checkpoint's bottleneck units, in order (blocks from 1, units from 1)."""
  return sorted((int(m.group(1)), int(m.group(2))) for key in flat if (m := _UNIT.match(key)))


def _bit_unit(x, flat, prefix, stride):
  """One pre-activation bottleneck: the shortcut is projected from the activated input when the unit has `proj`."""
  def kernel(name):
    return flat[f"{prefix}/{name}/standardized_conv2d/kernel"]

  def norm_relu(y, name):
    return relu(group_norm(y, flat[f"{prefix}/{name}/group_norm/gamma"], flat[f"{prefix}/{name}/group_norm/beta"]))

  preact = norm_relu(x, "a")
  shortcut = x
  if f"{prefix}/a/proj/standardized_conv2d/kernel" in flat:
    shortcut = conv2d(preact, standardize(kernel("a/proj")), stride)
  y = conv2d(preact, standardize(kernel("a")))
  y = conv2d(norm_relu(y, "b"), standardize(kernel("b")), stride, padding=1)
  y = conv2d(norm_relu(y, "c"), standardize(kernel("c")))
  return y + shortcut


def bit_forward(flat, images, dtype=np.float64):
  """Logits (or the pooled features when the checkpoint has no head) of BiT ResNet-v2 for NHWC `images`,
  computed in `dtype` (float32 shows how much rounding alone moves a given network's logits)."""
  flat = {key: np.asarray(value, dtype) for key, value in flat.items()}
  x = np.asarray(images, dtype)
  # Root: 7x7/2 standardised conv (padding 3), no norm or activation; zero padding 1, then 3x3/2 max pool.
  x = conv2d(x, standardize(flat["resnet/root_block/standardized_conv2d/kernel"]), 2, padding=3)
  x = max_pool(np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)]), 3, 2)
  for block, unit in bit_units(flat):
    stride = 2 if block > 1 and unit == 1 else 1
    x = _bit_unit(x, flat, f"resnet/block{block}/unit{unit:02d}", stride)
  x = relu(group_norm(x, flat["resnet/group_norm/gamma"], flat["resnet/group_norm/beta"]))
  features = x.mean(axis=(1, 2))
  if "resnet/head/conv2d/kernel" not in flat:
    return features
  return features @ flat["resnet/head/conv2d/kernel"][0, 0] + flat["resnet/head/conv2d/bias"]


def cnn_forward(flat, images, *, train, convs_per_stage=(2, 2, 2)):
  """(logits, batch statistics) of the course CNN for NHWC `images`.

  `flat` holds the parameters (`conv{i}/kernel`, `conv{i}/bias`, `bn{s}/scale`, `bn{s}/bias`, `dense{k}/...`,
  `head/...`) and, for evaluation, the running statistics `bn{s}/mean`, `bn{s}/var`. Training normalises with the
  batch's mean and biased variance over N, H, W, which come back as {`bn{s}`: (mean, var)}; evaluation uses the
  running statistics and returns {}.
  """
  flat = {key: np.asarray(value, np.float64) for key, value in flat.items()}
  x = np.asarray(images, np.float64)
  conv = 0
  batch_stats = {}
  for stage, convs in enumerate(convs_per_stage):
    for _ in range(convs):
      conv += 1
      x = relu(conv2d(x, flat[f"conv{conv}/kernel"], padding=1) + flat[f"conv{conv}/bias"])  # 'same' for 3x3/1
    x = max_pool(x, 2, 2)
    bn = f"bn{stage + 1}"
    if train:
      mean = x.mean(axis=(0, 1, 2))
      var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
      batch_stats[bn] = (mean, var)
    else:
      mean, var = flat[f"{bn}/mean"], flat[f"{bn}/var"]
    x = (x - mean) / np.sqrt(var + BATCHNORM_EPSILON) * flat[f"{bn}/scale"] + flat[f"{bn}/bias"]
  x = x.reshape(x.shape[0], -1)  # NHWC order, as the Flax model flattens
  dense = 1
  while f"dense{dense}/kernel" in flat:
    x = relu(x @ flat[f"dense{dense}/kernel"] + flat[f"dense{dense}/bias"])
    dense += 1
  if "head/kernel" in flat:
    x = x @ flat["head/kernel"] + flat["head/bias"]
  return x, batch_stats
