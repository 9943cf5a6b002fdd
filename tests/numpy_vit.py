"""An independent numpy forward pass of the zoo's ViT and ResNet-hybrid, written over the flat `.npz` keys.

Float64 throughout; shares no code with `vit_jax.models`. Used to check the Flax modules numerically.
"""
import math

import numpy as np


def layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def same_padding(size, kernel, stride):
  """TensorFlow/XLA 'SAME' padding (before, after) for one spatial dimension."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def conv2d(x, w, stride, padding):
  """NHWC x HWIO convolution as a sum of shifted matmuls; padding 'SAME' or 'VALID'."""
  kh, kw = w.shape[:2]
  if padding == "SAME":
    pads = [same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride)]
    x = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      window = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
      out += window @ w[i, j]
  return out


def max_pool_same(x, size=3, stride=2):
  pads = [same_padding(x.shape[1], size, stride), same_padding(x.shape[2], size, stride)]
  x = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)], constant_values=-np.inf)
  out_h = (x.shape[1] - size) // stride + 1
  out_w = (x.shape[2] - size) // stride + 1
  windows = [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
             for i in range(size) for j in range(size)]
  return np.max(windows, axis=0)


def std_conv(x, w, stride):
  w = w - w.mean(axis=(0, 1, 2), keepdims=True)
  w = w / (w.std(axis=(0, 1, 2), keepdims=True) + 1e-5)
  return conv2d(x, w, stride, "SAME")


def group_norm(x, p, groups=32, eps=1e-6):
  n, h, w, c = x.shape
  g = x.reshape(n, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(n, h, w, c) * p["scale"] + p["bias"]


def sub(params, prefix):
  """The entries of flat `params` under `prefix/`, with the prefix removed."""
  return {k[len(prefix) + 1:]: v for k, v in params.items() if k.startswith(prefix + "/")}


def bottleneck(x, p, stride):
  residual = x
  if "conv_proj/kernel" in p:
    residual = group_norm(std_conv(x, p["conv_proj/kernel"], stride), sub(p, "gn_proj"))
  y = np.maximum(group_norm(std_conv(x, p["conv1/kernel"], 1), sub(p, "gn1")), 0)
  y = np.maximum(group_norm(std_conv(y, p["conv2/kernel"], stride), sub(p, "gn2")), 0)
  y = group_norm(std_conv(y, p["conv3/kernel"], 1), sub(p, "gn3"))
  return np.maximum(residual + y, 0)


def encoder_block(x, p, num_heads, branch_scales=(1.0, 1.0)):
  """`branch_scales`: per-example factors [batch] (or scalars) of the attention and MLP branches: stochastic depth
  multiplies a branch by 0 (dropped) or 1 / (1 - rate) (kept)."""
  attention_scale, mlp_scale = (np.reshape(s, (-1, 1, 1)) for s in branch_scales)
  y = layer_norm(x, sub(p, "LayerNorm_0"))
  a = sub(p, "MultiHeadDotProductAttention_1")
  q, k, v = (np.einsum("btd,dhk->bthk", y, a[f"{n}/kernel"]) + a[f"{n}/bias"] for n in ("query", "key", "value"))
  weights = softmax(np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1]))
  y = np.einsum("bhqt,bthk->bqhk", weights, v)
  y = np.einsum("bqhk,hkd->bqd", y, a["out/kernel"]) + a["out/bias"]
  x = x + attention_scale * y
  y = layer_norm(x, sub(p, "LayerNorm_2"))
  m = sub(p, "MlpBlock_3")
  y = gelu_tanh(y @ m["Dense_0/kernel"] + m["Dense_0/bias"]) @ m["Dense_1/kernel"] + m["Dense_1/bias"]
  return x + mlp_scale * y


def forward(params, images, *, num_heads, classifier="token", resnet_layers=None, branch_scales=None):
  """Logits (or features without a head) of the zoo ViT for flat '/'-keyed `params` and NHWC `images`;
  `branch_scales` {layer: (attention, mlp)} as in `encoder_block`."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = np.asarray(images, np.float64)
  if resnet_layers is not None:
    x = std_conv(x, p["conv_root/kernel"], 2)
    x = max_pool_same(np.maximum(group_norm(x, sub(p, "gn_root")), 0))
    for stage, units in enumerate(resnet_layers):
      for unit in range(units):
        stride = 2 if stage > 0 and unit == 0 else 1
        x = bottleneck(x, sub(p, f"block{stage + 1}/unit{unit + 1}"), stride)
  x = conv2d(x, p["embedding/kernel"], p["embedding/kernel"].shape[0], "VALID") + p["embedding/bias"]
  n, h, w, c = x.shape
  x = x.reshape(n, h * w, c)
  if classifier in ("token", "token_unpooled"):
    x = np.concatenate([np.broadcast_to(p["cls"], (n, 1, c)), x], axis=1)
  x = x + p["Transformer/posembed_input/pos_embedding"]
  layer = 0
  while f"Transformer/encoderblock_{layer}/LayerNorm_0/scale" in p:
    x = encoder_block(x, sub(p, f"Transformer/encoderblock_{layer}"), num_heads,
                      (branch_scales or {}).get(layer, (1.0, 1.0)))
    layer += 1
  x = layer_norm(x, sub(p, "Transformer/encoder_norm"))
  if classifier == "token":
    x = x[:, 0]
  elif classifier == "gap":
    x = x.mean(axis=1)
  if "pre_logits/kernel" in p:
    x = np.tanh(x @ p["pre_logits/kernel"] + p["pre_logits/bias"])
  if "head/kernel" in p:
    x = x @ p["head/kernel"] + p["head/bias"]
  return x
