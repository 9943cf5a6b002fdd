"""Model FLOPs and a measured compute ceiling, for model-FLOPs utilisation (MFU).

The analytic count covers the matmuls and convolutions only, 2 FLOPs per multiply-add: what the hardware's peak is
quoted in. Norms, activations, pooling, softmax, biases and residual additions are left out (XLA's cost analysis
counts them, a few percent more: tests/test_flops.py). A training step is 3x the forward pass (the backward pass
computes two products per forward one).
"""
import time

import jax
import jax.numpy as jnp
from vit_jax.models import cnn, geometry, registry


def _conv_out(size, kernel, stride, padding):
  """Output length of a convolution or pool along one axis with `padding` zeros on each side."""
  return (size + 2 * padding - kernel) // stride + 1


def _vit_forward_flops(model_config, image_size, num_classes):
  """Per layer: QKV and output projections 8*N*D^2, MLP 4*N*D*M, attention scores and mixing 4*N^2*D; plus the
  patch embedding, a MAP head and the head. A hybrid's ResNet stem is not counted, so its MFU is a lower bound."""
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
    tokens = grid + geometry.num_prefix_tokens(model_config)
    forward += _transformer_flops(tokens, hidden, transformer.mlp_dim, transformer.num_layers)
    if model_config.get("classifier") == "map":  # one probe: its q/out 4*D^2, keys/values 4*N*D^2, MLP, mixing
      forward += 4 * hidden ** 2 + 4 * grid * hidden ** 2 + 4 * hidden * transformer.mlp_dim + 4 * grid * hidden
  return forward


def _transformer_flops(tokens, hidden, mlp_dim, num_layers):
  per_layer = 8 * tokens * hidden ** 2 + 4 * tokens * hidden * mlp_dim + 4 * tokens ** 2 * hidden
  return num_layers * per_layer


def mae_forward_flops(model_config, image_size, *, visible, decoder_width, decoder_depth) -> int:
  """An MAE forward pass of a plain ViT (`objectives/mae.py`): every patch embedded, the encoder on the class token
  and `visible` patches, the decoder (MLP 4x its width) on every patch, and its pixel prediction."""
  rows, cols = geometry.grid_shape(model_config, image_size)
  grid = rows * cols
  patch_h, patch_w = model_config.patches.size
  hidden, transformer = model_config.hidden_size, model_config.transformer
  prefix = int(geometry.has_class_token(model_config))
  forward = 2 * grid * patch_h * patch_w * 3 * hidden
  forward += _transformer_flops(prefix + visible, hidden, transformer.mlp_dim, transformer.num_layers)
  forward += 2 * (prefix + visible) * hidden * decoder_width
  forward += _transformer_flops(prefix + grid, decoder_width, 4 * decoder_width, decoder_depth)
  forward += 2 * grid * decoder_width * patch_h * patch_w * 3
  return forward


def _bit_forward_flops(model_config, image_size, num_classes):
  """BiT ResNet-v2 (`models/bit.py`): the root's 7x7/2 convolution (padding 3) and 3x3/2 max pool (padding 1);
  per bottleneck unit the 1x1 `a` at the input resolution, the 3x3 `b` carrying the stride (padding 1), the 1x1
  `c`, and in a stage's first unit the strided 1x1 projection of the shortcut; the head on the pooled features."""
  height, width = geometry.image_hw(image_size)
  root_width = 64 * int(model_config.width_factor)
  height, width = _conv_out(height, 7, 2, 3), _conv_out(width, 7, 2, 3)
  forward = 2 * height * width * 7 * 7 * 3 * root_width
  height, width = _conv_out(height, 3, 2, 1), _conv_out(width, 3, 2, 1)
  channels = root_width
  for stage, units in enumerate(model_config.block_units):
    features = 4 * root_width * 2 ** stage
    middle = features // 4
    for unit in range(units):
      stride = 2 if stage > 0 and unit == 0 else 1
      out_height, out_width = _conv_out(height, 3, stride, 1), _conv_out(width, 3, stride, 1)
      forward += 2 * height * width * channels * middle  # a
      if channels != features or stride != 1:
        forward += 2 * out_height * out_width * channels * features  # the shortcut's projection
      forward += 2 * out_height * out_width * 3 * 3 * middle * middle  # b
      forward += 2 * out_height * out_width * middle * features  # c
      height, width, channels = out_height, out_width, features
  return forward + 2 * channels * num_classes


def _cnn_forward_flops(model_config, image_size, num_classes):
  """The course CNN (`models/cnn.py`): 'same' 3x3 convolutions, a 2x2/2 max pool after each stage (odd sizes round
  down), then the dense layers on the flattened features and the head."""
  height, width = geometry.image_hw(image_size)
  conv_widths = model_config.get("conv_widths", cnn.CourseCNN.conv_widths)
  dense_widths = model_config.get("dense_widths", cnn.CourseCNN.dense_widths)
  forward, channels = 0, 3
  for widths in conv_widths:
    for features in widths:
      forward += 2 * height * width * 3 * 3 * channels * features
      channels = features
    height, width = height // 2, width // 2
  features = height * width * channels
  for dense in dense_widths:
    forward += 2 * features * dense
    features = dense
  return forward + 2 * features * num_classes


_FORWARD_FLOPS = {"vit": _vit_forward_flops, "bit": _bit_forward_flops, "cnn": _cnn_forward_flops}


def forward_flops_per_image(model_config, image_size, num_classes) -> int:
  """Matmul and convolution FLOPs of one image's forward pass, for any model family (`registry.family`);
  `image_size` an int or (height, width), `num_classes` 0 or None for a model without a head."""
  return _FORWARD_FLOPS[registry.family(model_config)](model_config, image_size, num_classes or 0)


def train_flops_per_image(model_config, image_size, num_classes) -> float:
  """Training FLOPs of one image: forward + backward = 3x `forward_flops_per_image`."""
  return 3.0 * forward_flops_per_image(model_config, image_size, num_classes)


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
