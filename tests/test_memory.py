"""vit_jax.tools.memory: exact parameter and optimizer bytes, and the activation estimate against XLA's own count."""
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import models, sharding
from vit_jax.models import precision
from vit_jax.tools import memory
from vit_jax.errors import UserError


def test_parameter_count_is_exact():
  # The published count of ViT-B/16 with a 1000-class head (e.g. timm's vit_base_patch16_224).
  estimate = memory.estimate("ViT-B_16", batch=8, image_size=224, optimizer="sgd")
  assert estimate.num_params == 86_567_656
  assert estimate.params == estimate.gradients == 4 * 86_567_656


@pytest.mark.parametrize("optimizer, moments", [("sgd", 1), ("adamw", 2)])
def test_optimizer_state_is_moments_of_every_parameter(optimizer, moments):
  e = memory.estimate("ViT-Ti_16", batch=8, image_size=224, optimizer=optimizer)
  scalars = e.optimizer - moments * e.params  # step counters of the schedule and of adam
  assert 0 <= scalars < 64


def test_sharded_bytes_equal_the_real_shards():
  """Per-device bytes from the sharding rules equal the shards of a real (data=1, fsdp=4, tensor=2) mesh."""
  sizes = {"data": 1, "fsdp": 4, "tensor": 2}
  params, opt_state = memory.abstract_state("ViT-Ti_16", image_size=224)
  mesh = sharding.make_mesh(sizes)  # the 8 emulated CPU devices of conftest
  for tree in (params, opt_state):
    shardings = sharding.tree_shardings(tree, mesh)
    real = sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))
    assert memory.sharded_bytes(tree, sizes) == real
  full = memory.sharded_bytes(params, {"data": 1, "fsdp": 1, "tensor": 1})
  assert memory.sharded_bytes(params, sizes) < full / 3  # the kernels are most of the model


SMALL = dict(hidden_size=64, patches={"size": (4, 4)},
             transformer={"num_layers": 2, "mlp_dim": 256, "num_heads": 4, "dropout_rate": 0.0})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("remat", ["none", "save_dots", "full"])
def test_residual_formula_matches_what_autodiff_saves(remat, dtype):
  """The analytic residuals against the ones JAX's autodiff keeps for this model (per example, batch 3); the
  matmuls save the same residuals on every platform (only their backward pass differs)."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top  # what print_saved_residuals prints
  batch, image_size = 3, 32  # no parameter has a leading dimension of 3, so batch-sized residuals are the activations
  model = models.get_model("testing", num_classes=10, remat=remat, dtype=jnp.dtype(dtype), **SMALL)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"])
  labels = jnp.zeros((batch,), jnp.int32)
  loss = lambda p, x: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x, train=True),
                                                                      labels).mean()
  residuals = saved_residuals(loss, params, jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32))
  saved = sum(math.prod(a.shape) * a.dtype.itemsize for a, _ in residuals if a.shape and a.shape[0] == batch) / batch
  config = models.get_model_config("testing")
  config.update(SMALL)
  formula = memory.residual_bytes_per_example(config, image_size=image_size, dtype=dtype, remat=remat)
  assert formula == pytest.approx(saved, rel=0.002)  # what is left: the loss's few bytes per example


# The tolerance of the activation estimate (docs/scaling.md): XLA's temporary bytes per example of a scanned
# model's gradient, measured / estimated. Measured on CPU: 0.92 for remat=none, 1.04 for remat=full.
TOLERANCE = (0.8, 1.25)


SMALL_VIT = dict(hidden_size=64, patches={"size": (4, 4)},
                 transformer={"num_layers": 4, "mlp_dim": 256, "num_heads": 4, "dropout_rate": 0.0})


def gradient_temp_bytes(batch, image_size=32, **model_options):
  """XLA's temporary bytes of the loss gradient of the small ViT above."""
  model = models.get_model("testing", num_classes=10, **SMALL_VIT, **model_options)
  images = jnp.zeros((1, image_size, image_size, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False)["params"])

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x, train=True), y).mean()
  compiled = jax.jit(jax.grad(loss)).lower(
      params, jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32),
      jax.ShapeDtypeStruct((batch,), jnp.int32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_activation_estimate_matches_memory_analysis(remat):
  image_size = 32
  # The difference of two batch sizes removes what does not grow with the batch (gradients, workspace).
  measured = (gradient_temp_bytes(64, remat=remat, scan_layers=True)
              - gradient_temp_bytes(16, remat=remat, scan_layers=True)) / 48
  config = models.get_model_config("testing")
  config.update(SMALL_VIT)
  estimated = memory.activation_bytes_per_example(config, image_size=image_size, remat=remat)
  print(f"remat={remat}: measured/estimated = {measured / estimated:.2f}")
  assert TOLERANCE[0] <= measured / estimated <= TOLERANCE[1], (measured, estimated)


@pytest.mark.slow
def test_xla_cpu_saves_remat_memory_only_with_scan():
  """Why `vit_jax.models.vit.warn_if_remat_saves_nothing` warns: on XLA:CPU an unrolled model's remat keeps every
  activation. If this starts failing because unrolled remat saves memory, drop the warning and its docs."""
  unrolled = {remat: gradient_temp_bytes(64, remat=remat) for remat in ("none", "full")}
  scanned_full = gradient_temp_bytes(64, remat="full", scan_layers=True)
  assert unrolled["full"] > 0.8 * unrolled["none"], unrolled
  assert scanned_full < 0.5 * unrolled["none"], (scanned_full, unrolled)


def test_remat_and_sharding_reduce_the_estimate():
  common = dict(batch=256, image_size=224, num_devices=8, dtype="bfloat16")
  none = memory.estimate("ViT-L_16", mesh={"data": -1}, **common)
  full = memory.estimate("ViT-L_16", mesh={"data": -1}, remat="full", **common)
  fsdp = memory.estimate("ViT-L_16", mesh={"fsdp": -1}, **common)
  tensor = memory.estimate("ViT-L_16", mesh={"fsdp": 4, "tensor": 2}, **common)
  assert full.activations < none.activations / 4
  assert fsdp.params * 8 == pytest.approx(none.params, rel=0.02)  # kernels split 8 ways; biases, norms replicated
  assert tensor.activations < fsdp.activations * 2  # twice the examples per device, heads and MLP split in 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(mesh={"data": -1}), "needs the device count"),
    (dict(mesh={"data": 3}, num_devices=8), "multiply to 3"),
    (dict(batch=12, mesh={"data": 8}), "not divisible"),
    (dict(remat="some"), "unknown remat"),
    (dict(optimizer="lion"), "unknown optimizer"),
    (dict(dtype="float16"), "unknown dtype"),
])
def test_bad_input_is_a_user_error(kwargs, message):
  args = dict(batch=16, image_size=224) | kwargs
  with pytest.raises(UserError, match=message):
    memory.estimate("ViT-Ti_16", **args)


@pytest.mark.slow
def test_cli_report_table_and_errors():
  run = lambda *args: subprocess.run([sys.executable, "-m", "vit_jax.tools.memory", *args], capture_output=True,
                                     text=True, check=False)
  report = run("--model_name=ViT-H_14", "--batch=4096", "--devices=256", "--mesh.data=-1", "--mesh.fsdp=16",
               "--optimizer=adamw", "--remat=full", "--dtype=bfloat16")
  assert report.returncode == 0, report.stderr
  assert "632,045,800 parameters" in report.stdout and "total" in report.stdout
  table = memory.table()  # what --table prints
  assert all(f"| {name} |" in table for name in memory.TABLE_MODELS)
  assert "| activations remat=none | save_dots | full | total fsdp=8, none | total fsdp=8, full |" in table
  bad = run("--model_name=ViT-Q_16")
  assert bad.returncode == 2
  assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
  # An unknown mesh axis is a bad flag naming the axes there are.
  bad = run("--model_name=ViT-B_16", "--batch=8", "--mesh.foo=2")
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert bad.stderr.startswith("error: bad command-line flag (Unknown command line flag mesh.foo")


# --- the convolutional families: activations measured from the compiled gradient ---------------------------------


def test_convolutional_parameter_counts_are_exact():
  # timm's resnetv2_50x1_bit with a 1000-class head (25.5 M on its model card; 23,520,842 with 10 classes).
  params, _ = memory.abstract_state("BiT-R50x1", image_size=64)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == 25_549_352
  # The course CNN by hand: six 3x3 convolutions, three BatchNorms (scale, bias), two dense layers and the head.
  convs = sum(9 * i * o + o for i, o in ((3, 32), (32, 64), (64, 128), (128, 128), (128, 256), (256, 256)))
  expected = convs + 2 * (64 + 128 + 256) + (4 * 4 * 256 * 1024 + 1024) + (1024 * 512 + 512) + (512 * 10 + 10)
  e = memory.estimate("CNN-CIFAR", batch=8, image_size=32, num_classes=10, optimizer="sgd", dtype="float32")
  assert e.num_params == expected == 5_852_234 and e.params == 4 * expected
  assert e.activations_from == "measured on XLA:cpu"


def conv_gradient_temp_bytes(model_name, batch, image_size):
  """XLA's temporary bytes of the training-mode loss gradient of a convolutional registry model (BatchNorm on the
  batch's statistics, its updates returned as flax returns them)."""
  model = models.get_model(model_name, num_classes=10)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3))))

  def loss(variables_, x, y):
    mutable = [k for k in variables_ if k != "params"]
    logits, _ = model.apply(variables_, x, train=True, mutable=mutable)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  compiled = jax.jit(jax.grad(loss)).lower(
      variables, jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32),
      jax.ShapeDtypeStruct((batch,), jnp.int32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


# The course CNN only: the same measurement of BiT-R50x1 compiles its full gradient nine times (~3 minutes on 2
# cores); test_cli_reports_a_bit_model measures BiT through the CLI.
@pytest.mark.parametrize("model_name", ["CNN-CIFAR"])
def test_measured_activations_are_the_batch_dependent_temporaries(model_name):
  """The activation term at the per-device batch (16 of 64 on 4 devices) is XLA's temporaries of that batch's
  gradient less their part that does not grow with the batch (extrapolated from batches 1 and 2); it grows with
  the pixels. Per example it is more than a small batch's slope suggests: XLA:CPU's bytes per example grow with the
  batch, which is why the tool compiles the batch asked for."""
  image_size = 32
  temp = {b: conv_gradient_temp_bytes(model_name, b, image_size) for b in (1, 2, 16)}
  fixed = 2 * temp[1] - temp[2]
  assert 0 < fixed < temp[1]
  e = memory.estimate(model_name, batch=64, image_size=image_size, mesh={"data": 4}, num_devices=4, dtype="float32",
                      num_classes=10)
  assert e.per_device_batch == 16 and e.activations == temp[16] - fixed
  assert e.activations >= 0.95 * 16 * (temp[2] - temp[1])
  bigger = memory.estimate(model_name, batch=64, image_size=2 * image_size, mesh={"data": 4}, num_devices=4,
                           dtype="float32", num_classes=10)
  assert 3 * e.activations < bigger.activations < 5 * e.activations  # 4x the pixels, about 4x the activations


def test_remat_with_a_convolutional_model_is_a_user_error():
  with pytest.raises(UserError, match=r"--remat=full is for Vision Transformers, not for CNN-CIFAR \(a plain CNN\)"):
    memory.estimate("CNN-CIFAR", batch=8, image_size=32, remat="full")
  config = models.get_model_config("BiT-R50x1")
  with pytest.raises(UserError, match="no activation formula for BiT-R50x1"):
    memory.activation_bytes_per_example(config, image_size=224)


@pytest.mark.slow
def test_cli_reports_a_convolutional_model():
  # The course CNN: the same measured path as BiT (whose full gradient takes ~45 s to compile three times here).
  result = subprocess.run([sys.executable, "-m", "vit_jax.tools.memory", "--model_name=CNN-CIFAR", "--batch=64",
                           "--image_size=32", "--devices=8", "--mesh.data=-1"], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "CNN-CIFAR: 6,360,104 parameters" in result.stdout  # 1000 classes by default
  line = next(l for l in result.stdout.splitlines() if "activations (measured on XLA:cpu, bfloat16, 8 images)" in l)
  assert float(line.split()[-2]) >= 0 and "total" in result.stdout  # the extrapolation went negative here once
