"""Analytic FLOPs (the MFU numerator) against XLA's own count of the compiled forward pass, against the
convolutions and matmuls of the traced program, and against PyTorch's FLOP counter on timm's BiT."""
import json
import math
import os
import subprocess

import jax
import jax.numpy as jnp
import pytest

from vit_jax import flops, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As tests/test_convert.py: the timm cross-check needs the `.peer` venv (torch + timm) and VIT_JAX_PEER_DIR.
PEER_PYTHON = os.path.join(REPO, ".peer", "bin", "python")
PEER_DIR = os.environ.get("VIT_JAX_PEER_DIR")
PEER_STUB = os.path.join(PEER_DIR, "tv_stub") if PEER_DIR else None


def xla_forward_flops(model, size):
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]
  compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("name,size,overrides", [
    ("ViT-Ti_16", 64, {}),
    ("testing", 32, {"patches": {"size": (4, 4)}, "hidden_size": 64, "transformer": {"num_heads": 4, "mlp_dim": 128}}),
])
def test_plain_vit_matmul_flops_are_most_of_what_xla_counts(name, size, overrides):
  model = models.get_model(name, num_classes=10, **overrides)
  config = models.get_model_config(name)
  config.update(overrides)
  ours = flops.train_flops_per_image(config, size, 10) / 3
  xla = xla_forward_flops(model, size)
  # XLA also counts the softmax, GELU and layer norms, which the analytic count leaves out.
  assert 0.85 * xla <= ours <= xla


def test_a_hybrid_counts_the_tokens_of_its_resnet_grid():
  config = models.get_model_config("R50+ViT-B_16")  # stride 16: 14 x 14 tokens at 224 px, not 224 x 224
  per_layer = 8 * 197 * 768**2 + 4 * 197 * 768 * 3072 + 4 * 197**2 * 768
  embedding = 2 * 196 * 1024 * 768  # 1x1 patches of the 1024-channel ResNet features
  expected = 3 * (12 * per_layer + embedding + 2 * 768 * 1000)
  assert flops.train_flops_per_image(config, 224, 1000) == expected


# --- the convolutional models --------------------------------------------------------------------------------------


def _valid_taps(size, kernel, stride, pad_low, out):
  """Kernel positions over all outputs along one axis that land on the input rather than on padding."""
  return sum(1 for o in range(out) for k in range(kernel) if 0 <= o * stride - pad_low + k < size)


def traced_flops(jaxpr):
  """(every tap, taps on the input only) FLOPs of the convolutions and matmuls of a traced program, 2 per
  multiply-add, read off each equation's shapes. XLA's cost analysis counts a convolution's taps on the input only
  (none on the zero padding); the analytic count, as PyTorch's and fvcore's, counts every tap."""
  every = on_input = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      lhs, rhs, out = (v.aval.shape for v in (*eqn.invars[:2], eqn.outvars[0]))
      numbers = eqn.params["dimension_numbers"]
      every += 2 * math.prod(out) * math.prod(rhs) // rhs[numbers.rhs_spec[0]]
      taps = 2 * out[numbers.out_spec[0]] * out[numbers.out_spec[1]] * rhs[numbers.rhs_spec[1]]
      for axis, (pad_low, _) in enumerate(eqn.params["padding"]):
        taps *= _valid_taps(lhs[numbers.lhs_spec[2 + axis]], rhs[numbers.rhs_spec[2 + axis]],
                            eqn.params["window_strides"][axis], pad_low, out[numbers.out_spec[2 + axis]])
      on_input += taps
    elif eqn.primitive.name == "dot_general":
      (contracted, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      product = 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracted)
      every, on_input = every + product, on_input + product
    for param in eqn.params.values():  # jit, custom_vjp and friends hold their body as a sub-program
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        body = getattr(sub, "jaxpr", sub)
        if isinstance(body, jax.extend.core.Jaxpr):
          sub_every, sub_on_input = traced_flops(body)
          every, on_input = every + sub_every, on_input + sub_on_input
  return every, on_input


def xla_flops_per_image(model, variables, size):
  """XLA's count of the compiled forward pass, batch 2 minus batch 1: what grows with the batch (BiT's weight
  standardisation runs once per step on the kernels, not per image)."""
  def count(batch):
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    cost = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  return count(2) - count(1)


# BiT with one unit per stage but two in the second (an identity-shortcut unit too); odd sizes make the strided
# convolutions and pools round: 40 px -> 20, 10, 10, 5, 3, 2; 72 px -> 36, 18, 18, 9, 5, 3. The CNN's pools floor
# 44 px -> 22, 11, 5.
@pytest.mark.parametrize("name,size,overrides", [
    ("BiT-R50x1", 40, dict(block_units=(1, 2, 1, 1))),
    ("BiT-R50x1", 72, dict(block_units=(1, 2, 1, 1))),
    ("CNN-CIFAR", 32, {}),
    ("CNN-CIFAR", 44, {}),
])
def test_convolutional_flops_match_the_traced_program_and_xla(name, size, overrides):
  config = models.get_model_config(name, **overrides)
  model = models.build(config, num_classes=10)
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)  # params (and batch_stats)
  every, on_input = traced_flops(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images).jaxpr)
  ours = flops.forward_flops_per_image(config, size, 10)
  assert ours == every
  assert flops.train_flops_per_image(config, size, 10) == 3 * ours
  # XLA counts the taps on the input plus the elementwise work: GroupNorm, ReLU, the residual additions and the
  # max pools add 1.0-1.1% to BiT's convolutions, BatchNorm and the pools 0.2% to the CNN's (measured on CPU).
  xla = xla_flops_per_image(model, variables, size)
  assert on_input <= xla <= 1.02 * on_input, (xla, on_input)


def test_bit_r50x1_at_224_px_is_4_09_gmacs():
  """The root conv, 16 bottlenecks and a 1000-class head: 4.089 GMACs, as torchvision's ResNet-50 (its docs: 4.09
  "GFLOPS", which are multiply-adds; the same convolutions, the stride on the 3x3 as ResNet v1.5) and as
  `torch.utils.flop_counter` counts timm's resnetv2_50x1_bit (below). timm's model card says 4.2 GMACs: its
  profiler also counts the norms."""
  config = models.get_model_config("BiT-R50x1")
  root = 2 * 112 * 112 * 7 * 7 * 3 * 64
  assert flops.forward_flops_per_image(config, 224, 1000) == 8_178_368_512
  assert flops.forward_flops_per_image(config, 224, 0) == 8_178_368_512 - 2 * 2048 * 1000
  assert flops.forward_flops_per_image(models.get_model_config("BiT-R50x1", block_units=()), 224, 0) == root
  # Three times as wide: every convolution but the root's (3 input channels) has 9x the multiply-adds.
  wide = flops.forward_flops_per_image(models.get_model_config("BiT-R50x3"), 224, 0)
  assert wide == 9 * (8_178_368_512 - 2 * 2048 * 1000 - root) + 3 * root


def test_the_course_cnn_by_hand():
  convs = 2 * 9 * (32 * 32 * (3 * 32 + 32 * 64) + 16 * 16 * (64 * 128 + 128 * 128) + 8 * 8 * (128 * 256 + 256 * 256))
  dense = 2 * (4 * 4 * 256 * 1024 + 1024 * 512 + 512 * 10)
  assert flops.forward_flops_per_image(models.get_model_config("CNN-CIFAR"), 32, 10) == convs + dense
  assert flops.forward_flops_per_image(models.get_model_config("CNN-CIFAR"), (32, 32), None) == convs + dense - 2 * 5120


TIMM_FLOPS_SCRIPT = r"""
import json, sys
import timm, torch
from torch.utils.flop_counter import FlopCounterMode
counts = {}
for name, size in json.loads(sys.argv[1]):
  model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
  with torch.no_grad(), FlopCounterMode(display=False) as counter:
    model(torch.zeros(1, 3, size, size))
  counts[f"{name}@{size}"] = counter.get_total_flops()
print(json.dumps(counts))
"""


def _peer_available():
  if not PEER_STUB or not os.path.isdir(PEER_STUB) or not os.path.exists(PEER_PYTHON):
    return False
  return subprocess.run([PEER_PYTHON, "-c", "import torch, timm"], capture_output=True,
                        env={**os.environ, "PYTHONPATH": PEER_STUB}).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _peer_available(), reason="needs a .peer venv with torch and timm, and VIT_JAX_PEER_DIR")
def test_bit_flops_equal_pytorchs_count_of_timm():
  cases = [("BiT-R50x1", "resnetv2_50x1_bit", 224), ("BiT-R50x1", "resnetv2_50x1_bit", 72),
           ("BiT-R101x1", "resnetv2_101x1_bit", 40)]
  out = subprocess.run([PEER_PYTHON, "-c", TIMM_FLOPS_SCRIPT, json.dumps([[t, s] for _, t, s in cases])],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": PEER_STUB})
  assert out.returncode == 0, out.stderr[-3000:]
  counts = json.loads(out.stdout.strip().splitlines()[-1])
  for ours, theirs, size in cases:
    assert flops.forward_flops_per_image(models.get_model_config(ours), size, 1000) == counts[f"{theirs}@{size}"]
