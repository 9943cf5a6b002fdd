"""Model FLOPs and a measured compute ceiling, for model-FLOPs utilisation (MFU)."""
import time

import jax
import jax.numpy as jnp
from vit_jax.models import geometry


def train_flops_per_image(model_config, image_size, num_classes) -> float:
  """Training FLOPs of one image (forward + backward = 3x forward), counted analytically from matmuls.

  Per layer: QKV and output projections 8*N*D^2, MLP 4*N*D*M, attention scores and mixing 4*N^2*D; plus the
  patch embedding and the head. A hybrid's ResNet stem is not counted, so its MFU is a lower bound.
  """
  rows, cols = geometry.grid_shape(model_config, image_size)
  grid = rows * cols
  patch_h, patch_w = model_config.patches.size
  hidden = model_config.hidden_size
  resnet = model_config.get("resnet")
  # The patch embedding sees pixels, or a hybrid's ResNet features (bottleneck units output 4x their width).
  channels = 3
  if resnet is not None:
    width = int(64 * resnet["width_factor"])
    channels = 4 * width * 2 ** (len(resnet["num_layers"]) - 1) if resnet["num_layers"] else width
  forward = 2 * grid * patch_h * patch_w * channels * hidden + 2 * hidden * num_classes
  transformer = model_config.get("transformer")
  if transformer is not None:
    tokens = grid + int(geometry.has_class_token(model_config))
    per_layer = 8 * tokens * hidden ** 2 + 4 * tokens * hidden * transformer.mlp_dim + 4 * tokens ** 2 * hidden
    forward += transformer.num_layers * per_layer
  return 3.0 * forward


def measure_matmul_flops(dtype, size=None) -> float:
  """FLOP/s of one local device on a square matmul with `dtype` operands and float32 accumulation, the way the
  model computes (bf16 x bf16 -> bf16 would understate a bf16 model's ceiling on CPU)."""
  device = jax.local_devices()[0]
  size = size or (2048 if device.platform == "cpu" else 8192)
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  matmul(a).block_until_ready()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / min(times)


def peak_flops(dtype, num_devices=None) -> float:
  """Ceiling of a job on `num_devices` (default: all): one device's measured matmul rate times the devices.

  Emulated CPU devices share their host's cores, so there the ceiling is one host's rate per process.
  """
  per_device = measure_matmul_flops(dtype)
  if jax.devices()[0].platform == "cpu":
    return per_device * jax.process_count()
  return per_device * (num_devices or jax.device_count())
