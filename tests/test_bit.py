"""The convolutional models against independent references: BiT ResNet-v2 against a float64 numpy forward over the
big_transfer `.npz` keys (tests/numpy_bit.py) and against timm's own `resnetv2_*_bit` loading the file we write;
the course CNN against numpy in evaluation and training mode, and its training-mode BatchNorm against sharding."""
import json
import os
import subprocess

import flax
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from tests import numpy_bit
from vit_jax import checkpoint, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As tests/test_convert.py: the timm cross-check needs the `.peer` venv (torch + timm) and VIT_JAX_PEER_DIR.
PEER_PYTHON = os.path.join(REPO, ".peer", "bin", "python")
PEER_DIR = os.environ.get("VIT_JAX_PEER_DIR")
PEER_STUB = os.path.join(PEER_DIR, "tv_stub") if PEER_DIR else None

BIT_IMAGE_SIZE = 64
CNN_IMAGE_SIZE = 32
CNN_MOMENTUM = 0.99  # Keras's BatchNormalization default, which the course used


def relative_error(actual, expected):
  """|actual - expected| / |expected| in the Frobenius norm."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def flat(tree, leaf=np.asarray):
  return {"/".join(k): leaf(v) for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def images(count, size, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (count, size, size, 3)).astype(np.float32)


# --- BiT ---------------------------------------------------------------------------------------------------------


def bit_expected_shapes(block_units, width_factor, num_classes):
  """{key: shape} of a BiT ResNet-v2 as big_transfer stores it, written out from the architecture: the root conv,
  bottlenecks `unit01`... of (in -> out/4 -> out/4 -> out) with GroupNorm before each conv (over its input), a
  projection on each stage's first unit, the final GroupNorm and the 1x1-conv head."""
  root = 64 * width_factor
  shapes = {"resnet/root_block/standardized_conv2d/kernel": (7, 7, 3, root)}
  channels = root
  for block, units in enumerate(block_units, start=1):
    out = 256 * width_factor * 2 ** (block - 1)
    mid = out // 4
    for unit in range(1, units + 1):
      prefix = f"resnet/block{block}/unit{unit:02d}"
      for name, kernel, gn in (("a", (1, 1, channels, mid), channels), ("b", (3, 3, mid, mid), mid),
                               ("c", (1, 1, mid, out), mid)):
        shapes[f"{prefix}/{name}/standardized_conv2d/kernel"] = kernel
        shapes[f"{prefix}/{name}/group_norm/gamma"] = (gn,)
        shapes[f"{prefix}/{name}/group_norm/beta"] = (gn,)
      if unit == 1:
        shapes[f"{prefix}/a/proj/standardized_conv2d/kernel"] = (1, 1, channels, out)
      channels = out
  shapes["resnet/group_norm/gamma"] = (channels,)
  shapes["resnet/group_norm/beta"] = (channels,)
  shapes["resnet/head/conv2d/kernel"] = (1, 1, channels, num_classes)
  shapes["resnet/head/conv2d/bias"] = (num_classes,)
  return shapes


def param_shapes(model, size):
  tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return {key: tuple(value.shape) for key, value in flat(tree["params"], leaf=lambda v: v).items()}


def random_bit_params(model, seed=0):
  """Parameters that make every constant count. Kernels get a per-layer scale from 3e-5 to 1 (standardisation
  removes it, up to its epsilon 1e-8, which the smallest scales reach). Each unit's GroupNorm `a` and `b` gets a
  per-layer scale from 1e-3 to 1 for gamma (around the scale) and beta (around 0), so the next GroupNorm sees
  variances near its epsilon 1e-5; `c` (what the unit adds to the residual) gets 0.1 to 1, the final one 1. The head
  is non-zero, as is its bias."""
  rng = np.random.default_rng(seed)
  norm_scales = {}

  def norm_scale(norm):
    if norm not in norm_scales:
      low = -3 if norm.endswith(("/a/group_norm", "/b/group_norm")) else -1 if norm.endswith("/c/group_norm") else 0
      norm_scales[norm] = 10 ** rng.uniform(low, 0)
    return norm_scales[norm]

  def draw(key, shape):
    if key.endswith("/gamma"):
      return norm_scale(key.rsplit("/", 1)[0]) * (1 + 0.3 * rng.normal(size=shape))
    if key.endswith("/beta"):
      return norm_scale(key.rsplit("/", 1)[0]) * 0.3 * rng.normal(size=shape)
    if key.startswith("resnet/head/"):
      return 0.3 * rng.normal(size=shape) if key.endswith("/bias") else rng.normal(size=shape) / np.sqrt(shape[2])
    return rng.normal(size=shape) * 10 ** rng.uniform(-4.5, 0)

  params = {key: draw(key, shape).astype(np.float32) for key, shape in param_shapes(model, BIT_IMAGE_SIZE).items()}
  return flax.traverse_util.unflatten_dict({tuple(key.split("/")): value for key, value in params.items()})


def bit_checkpoint(tmp_path, model, seed=0):
  """(path of the file `checkpoint.save` wrote, our logits on `images(2, 64)` from `checkpoint.load` of it)."""
  path = str(tmp_path / "bit.npz")
  checkpoint.save(random_bit_params(model, seed), path)
  logits = np.asarray(jax.jit(model.apply)({"params": checkpoint.load(path)}, images(2, BIT_IMAGE_SIZE)))
  return path, logits


@pytest.mark.parametrize("name, block_units, width_factor", [
    ("BiT-R50x1", (3, 4, 6, 3), 1), ("BiT-R101x1", (3, 4, 23, 3), 1), ("BiT-R50x3", (3, 4, 6, 3), 3),
    ("BiT-R152x2", (3, 8, 36, 3), 2)])
def test_bit_parameter_tree_is_the_big_transfer_layout(name, block_units, width_factor):
  model = models.build(models.get_model_config(name), num_classes=7)
  assert param_shapes(model, 32) == bit_expected_shapes(block_units, width_factor, 7)


def test_bit_r50x1_after_save_and_load_matches_numpy_and_file_has_big_transfer_keys(tmp_path):
  model = models.get_model("BiT-R50x1", num_classes=7)
  path, logits = bit_checkpoint(tmp_path, model)
  with np.load(path) as npz:
    stored = {key: npz[key] for key in npz.files}
  # The file is a big_transfer checkpoint: exactly its keys and shapes, all under `resnet/`.
  expected = bit_expected_shapes((3, 4, 6, 3), 1, 7)
  assert {key: value.shape for key, value in stored.items()} == expected
  assert len(expected) == 1 + 16 * 9 + 4 + 4 and all(key.startswith("resnet/") for key in stored)
  reference = numpy_bit.bit_forward(stored, images(2, BIT_IMAGE_SIZE))
  error = relative_error(logits, reference)
  # Float32 rounding alone moves a deep random network's logits by 3e-6 to 5e-5 depending on the draw (numpy in
  # float32 shows the same): the bound is 1e-5, or 3x that rounding where this draw is worse conditioned.
  rounding = relative_error(numpy_bit.bit_forward(stored, images(2, BIT_IMAGE_SIZE), np.float32), reference)
  print(f"BiT-R50x1 vs numpy: relative error {error:.2e} (numpy float32 vs float64: {rounding:.2e})")
  assert logits.shape == (2, 7) and error < max(1e-5, 3 * rounding)
  # Not vacuous: the logits differ between the images, and the head's bias alone is not the answer.
  assert relative_error(logits[0], logits[1]) > 1e-2
  assert relative_error(logits, np.broadcast_to(stored["resnet/head/conv2d/bias"], logits.shape)) > 1e-2


def test_bit_width_two_matches_numpy_and_the_epsilons_matter(tmp_path, monkeypatch):
  # Two one-unit stages keep width 2 (128-channel root, 4-channel GroupNorm groups in block1's a) cheap.
  model = models.get_model("BiT-R50x1", num_classes=5, block_units=(1, 1), width_factor=2)
  path, logits = bit_checkpoint(tmp_path, model, seed=3)
  with np.load(path) as npz:
    stored = {key: npz[key] for key in npz.files}
  assert {key: value.shape for key, value in stored.items()} == bit_expected_shapes((1, 1), 2, 5)
  reference = numpy_bit.bit_forward(stored, images(2, BIT_IMAGE_SIZE))
  error = relative_error(logits, reference)
  print(f"BiT (1,1)x2 vs numpy: relative error {error:.2e}")
  assert error < 1e-5
  # The parameters make both epsilons visible: 10x smaller ones move the logits far beyond the bound.
  monkeypatch.setattr(numpy_bit, "GROUPNORM_EPSILON", 1e-6)
  assert relative_error(numpy_bit.bit_forward(stored, images(2, BIT_IMAGE_SIZE)), reference) > 1e-3
  monkeypatch.setattr(numpy_bit, "GROUPNORM_EPSILON", 1e-5)
  monkeypatch.setattr(numpy_bit, "WEIGHT_STANDARDIZE_EPSILON", 1e-9)
  assert relative_error(numpy_bit.bit_forward(stored, images(2, BIT_IMAGE_SIZE)), reference) > 1e-3


# --- timm itself, where the peer venv exists ----------------------------------------------------------------------

TIMM_BIT_SCRIPT = r"""
import json, sys
import numpy as np, torch
import timm
from timm.models import resnetv2

path, images_path, out_path, options = sys.argv[1:5]
options = json.loads(options)
if options["layers"] is None:
  model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=options["num_classes"])
else:  # the registered names fix the layout; their factory takes any
  model = resnetv2._create_resnetv2_bit("resnetv2_50x1_bit", pretrained=False, layers=options["layers"],
                                        width_factor=options["width_factor"], num_classes=options["num_classes"])
model = model.float().eval()
resnetv2._load_weights(model, path)
stored = np.load(path)
# `_load_weights` skips a head of another class count silently: make sure it took ours.
assert np.array_equal(model.head.fc.bias.detach().numpy(), stored["resnet/head/conv2d/bias"]), "head not loaded"
with torch.no_grad():
  batch = torch.from_numpy(np.load(images_path)).permute(0, 3, 1, 2).contiguous()
  np.save(out_path, model(batch).numpy())
"""


def _peer_available():
  if not PEER_STUB or not os.path.isdir(PEER_STUB) or not os.path.exists(PEER_PYTHON):
    return False
  return subprocess.run([PEER_PYTHON, "-c", "import torch, timm"], capture_output=True,
                        env={**os.environ, "PYTHONPATH": PEER_STUB}).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _peer_available(), reason="needs a .peer venv with torch and timm, and VIT_JAX_PEER_DIR")
@pytest.mark.parametrize("block_units, width_factor", [(None, 1), ((1, 1), 2)])
def test_timm_loads_our_bit_file_and_matches(tmp_path, block_units, width_factor):
  overrides = {} if block_units is None else dict(block_units=block_units, width_factor=width_factor)
  num_classes = 7
  model = models.get_model("BiT-R50x1", num_classes=num_classes, **overrides)
  path, logits = bit_checkpoint(tmp_path, model)
  np.save(tmp_path / "images.npy", images(2, BIT_IMAGE_SIZE))
  (tmp_path / "run_timm.py").write_text(TIMM_BIT_SCRIPT)
  options = dict(num_classes=num_classes, layers=None if block_units is None else list(block_units),
                 width_factor=width_factor)
  out = subprocess.run([PEER_PYTHON, str(tmp_path / "run_timm.py"), path, str(tmp_path / "images.npy"),
                        str(tmp_path / "timm.npy"), json.dumps(options)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": PEER_STUB})
  assert out.returncode == 0, out.stderr[-3000:]
  timm_logits = np.load(tmp_path / "timm.npy")
  with np.load(path) as npz:
    reference = numpy_bit.bit_forward({key: npz[key] for key in npz.files}, images(2, BIT_IMAGE_SIZE))
  error, numpy_error = relative_error(logits, timm_logits), relative_error(reference, timm_logits)
  print(f"BiT {block_units or 'R50x1'} x{width_factor}: relative error vs timm {error:.2e} (numpy vs timm "
        f"{numpy_error:.2e})")
  assert error < 1e-4 and numpy_error < 1e-4


# --- the course CNN -----------------------------------------------------------------------------------------------


def random_cnn_variables(model, seed=0):
  """He-scaled Gaussian kernels (activations stay of order 1), non-trivial biases, BatchNorm scale/bias and
  running statistics."""
  rng = np.random.default_rng(seed)
  tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, CNN_IMAGE_SIZE, CNN_IMAGE_SIZE, 3))))

  def draw(key, shape):
    if key.endswith("/kernel"):
      return rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))
    if key.endswith("/scale"):
      return 1 + 0.3 * rng.normal(size=shape)
    if key.endswith("/var"):
      return rng.uniform(0.5, 2, size=shape)
    return 0.1 * rng.normal(size=shape)  # biases, running means

  def collection(subtree):
    shapes = flat(subtree, leaf=lambda v: v.shape)
    return flax.traverse_util.unflatten_dict(
        {tuple(key.split("/")): draw(key, shape).astype(np.float32) for key, shape in shapes.items()})

  return {name: collection(subtree) for name, subtree in tree.items()}


def cnn_setup(batch=8):
  model = models.get_model("CNN-CIFAR", num_classes=10)
  variables = random_cnn_variables(model)
  return model, variables, images(batch, CNN_IMAGE_SIZE)


def numpy_inputs(variables):
  return {**flat(variables["params"]), **flat(variables["batch_stats"])}


def test_cnn_eval_mode_uses_running_statistics_as_numpy():
  model, variables, batch = cnn_setup()
  logits = np.asarray(jax.jit(model.apply)(variables, batch))
  reference, _ = numpy_bit.cnn_forward(numpy_inputs(variables), batch, train=False)
  error = relative_error(logits, reference)
  print(f"CNN eval vs numpy: relative error {error:.2e}")
  assert logits.shape == (8, 10) and error < 1e-5
  # Evaluation must not use the batch's statistics: those give other logits.
  batch_stat_logits, _ = numpy_bit.cnn_forward(numpy_inputs(variables), batch, train=True)
  assert relative_error(batch_stat_logits, reference) > 1e-2


def test_cnn_train_mode_normalises_with_batch_statistics_and_updates_running_averages():
  model, variables, batch = cnn_setup()
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, batch)
  reference, batch_stats = numpy_bit.cnn_forward(numpy_inputs(variables), batch, train=True)
  error = relative_error(logits, reference)
  print(f"CNN train vs numpy: relative error {error:.2e}")
  assert error < 1e-5
  old, new = flat(variables["batch_stats"]), flat(updates["batch_stats"])
  assert set(new) == set(old) == {f"bn{s}/{stat}" for s in (1, 2, 3) for stat in ("mean", "var")}
  for bn, (mean, var) in batch_stats.items():
    for stat, batch_value in (("mean", mean), ("var", var)):  # flax's running variance is the biased one
      key = f"{bn}/{stat}"
      expected = CNN_MOMENTUM * old[key].astype(np.float64) + (1 - CNN_MOMENTUM) * batch_value
      assert relative_error(new[key], expected) < 1e-6, key
      # The batch statistic recovered from the update: tells the biased variance from the unbiased one
      # (n / (n - 1) is 1 + 5e-4 for bn1's 2048 values) and the momentum from any other.
      recovered = (new[key].astype(np.float64) - CNN_MOMENTUM * old[key]) / (1 - CNN_MOMENTUM)
      assert relative_error(recovered, batch_value) < 1e-4, key


def test_cnn_train_mode_does_not_depend_on_batch_sharding():
  model, variables, batch = cnn_setup(batch=8)
  train_apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  assert mesh.size == 8, "needs the 8 emulated devices of tests/conftest.py"
  sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  assert len(sharded_batch.addressable_shards) == 8 and sharded_batch.addressable_shards[0].data.shape[0] == 1
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  sharded_logits, sharded_updates = jax.jit(train_apply)(replicated, sharded_batch)
  one_device = jax.devices()[0]
  logits, updates = jax.jit(train_apply)(jax.device_put(variables, one_device), jax.device_put(batch, one_device))
  sharded_logits, logits = np.asarray(sharded_logits), np.asarray(logits)
  error = relative_error(sharded_logits, logits)
  print(f"CNN train 8 shards vs 1 device: relative error {error:.2e}")
  # Logits to float32 rounding: per-device convolutions of one image round differently from one batched
  # convolution even in evaluation mode (1.1e-6 measured), and the layers after BatchNorm carry that to 3e-6.
  # Computing per-shard statistics instead would move them by > 1e-2 (below).
  assert error < 1e-5
  for key, value in flat(updates["batch_stats"]).items():
    assert relative_error(flat(sharded_updates["batch_stats"])[key], value) < 1e-6, key
  # The statistics are the global batch's: each shard normalising its one image alone gives other logits.
  reference, _ = numpy_bit.cnn_forward(numpy_inputs(variables), batch, train=True)
  per_shard = np.concatenate([numpy_bit.cnn_forward(numpy_inputs(variables), image[None], train=True)[0]
                              for image in batch])
  assert relative_error(sharded_logits, reference) < 1e-5
  assert relative_error(per_shard, reference) > 1e-2
