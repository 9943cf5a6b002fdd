"""The convolutional models through the one training loop: BatchNorm statistics sharded, averaged over the global
batch, checkpointed, resumed exactly and exported; BiT fine-tuning from a big_transfer file; the CNN errors."""
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from tests.test_train import _mesh, _synthetic_batches, read_metrics
from vit_jax import checkpoint, models, sharding, steps, train
from vit_jax.models import state as model_state_lib
from vit_jax.objectives import supervised

from configs import cnn_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BIT = {"block_units": (1, 1, 1, 1)}  # BiT-R50x1's widths, one unit per stage


def tiny_cnn_config(model_name="CNN-CIFAR", **overrides):
  """The course CNN (or `model_name`) on digits at 16 px for a few steps."""
  config = cnn_digits.get_config(model_name)
  config.pp.augment = "none"
  config.batch = 32
  config.batch_eval = 128
  config.total_steps = 6
  config.warmup_steps = 2
  config.progress_every = 2
  config.eval_every = 3
  config.checkpoint_every = 3
  config.peak_flops = 1e12  # skip the matmul measurement
  config.dtype = "float32"
  config.update(overrides)
  return config


def _train_steps(config, mesh, batches):
  """(losses, params, model_state) after the train step on each of `batches`, on `mesh`."""
  tx, schedule = train.make_optimizer(config)
  model = train.create_model(config, num_classes=10, platform="cpu")
  init_fn = steps.make_init_fn(model, tx, config.pp.crop)
  shardings = sharding.tree_shardings(jax.eval_shape(init_fn, jax.random.PRNGKey(0)), mesh)
  state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  step = steps.make_train_step(model, tx, schedule, supervised.Supervised.from_config(config).loss_fn, mesh=mesh,
                               state_shardings=shardings, accum_steps=config.accum_steps)
  losses = []
  for batch in batches:
    state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    losses.append(float(metrics["train_loss"]))
  return np.array(losses), jax.device_get(state.params), jax.device_get(state.model_state)


@pytest.mark.slow
def test_batchnorm_statistics_do_not_depend_on_the_device_count():
  """Mesh equivalence with BatchNorm: the batch statistics are those of the global batch on any layout."""
  # SGD: updates are linear in the gradient, so summation-order noise is not amplified as Adam's would be.
  config = tiny_cnn_config(optimizer="sgd", base_lr=0.05)
  batches = _synthetic_batches(3, 16)
  reference_losses, reference_params, reference_state = _train_steps(config, _mesh(1, 1, 1, 1), batches)
  assert len(set(reference_losses.tolist())) == len(batches)  # the parameters did change between steps
  moved = jax.tree.leaves(reference_state["batch_stats"]["bn1"]["mean"])[0]
  assert np.abs(moved).max() > 1e-4  # the running statistics did move
  for layout in [(8, 1, 1), (2, 4, 1)]:
    losses, params, model_state = _train_steps(config, _mesh(*layout, 8), batches)
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5, err_msg=str(layout))
    # Summation order differs with the layout (float32); per-device statistics would differ by O(1).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, reference_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), model_state, reference_state)


@pytest.mark.slow
def test_the_course_cnn_trains_resumes_exactly_and_exports_its_statistics(tmp_path):
  from vit_jax.tools import evaluate, trained_model  # pylint: disable=g-import-not-at-top
  config = tiny_cnn_config(mesh={"data": 4, "fsdp": 2, "tensor": 1})
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(config, workdir)
  assert [r["step"] for r in read_metrics(workdir) if "test_accuracy" in r] == [3, 6]
  exported = checkpoint.load(os.path.join(workdir, "model.npz"))
  params, model_state = model_state_lib.split(exported)
  assert set(model_state["batch_stats"]) == {"bn1", "bn2", "bn3"} and "head" in params
  assert np.abs(model_state["batch_stats"]["bn3"]["var"] - 1).max() > 1e-3  # trained, not the initial 1s
  # The exported model (with its statistics) scores what the run scored at the end.
  scored = evaluate.evaluate(trained_model.load(workdir))
  np.testing.assert_allclose(scored["loss"], result["test_loss"], rtol=1e-5)
  # Resumed from step 3 with the later checkpoint and the export removed: the same weights and statistics.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
  os.remove(os.path.join(resumed, "model.npz"))
  train.train_and_evaluate(config, resumed)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load(os.path.join(resumed, "model.npz")), exported)


def _bit_file(path, num_classes=1000, seed=0, **overrides):
  """A big_transfer-layout file of a BiT model (BiT-R50x1 widths, one unit per stage unless overridden) with
  random weights; returns its flat {key: array}."""
  model = models.get_model("BiT-R50x1", num_classes=num_classes, **{**TINY_BIT, **overrides})
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32)))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.1, shapes["params"])
  checkpoint.save(params, path)
  return {k: np.asarray(v) for k, v in np.load(path).items()}


@pytest.mark.slow
def test_bit_fine_tunes_from_a_big_transfer_file_at_a_new_resolution(tmp_path):
  """The file's weights are used (frozen here by lr_mults, so they come out unchanged), its 1000-class head is
  replaced by a 10-class one, and BiT needs no position-embedding resampling at 64 px."""
  path = str(tmp_path / "BiT-M-R50x1.npz")
  stored = _bit_file(path)
  config = tiny_cnn_config("BiT-R50x1", pretrained_path=path, lr_mults=((".*/head/.*", 1.0), (".*", 0.0)),
                           total_steps=2, eval_every=0, checkpoint_every=2)
  config.model.block_units = TINY_BIT["block_units"]
  config.pp.crop = 64
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  exported = {k: np.asarray(v) for k, v in np.load(os.path.join(workdir, "model.npz")).items()}
  assert set(exported) == set(stored)  # the big_transfer layout, key for key
  for key, value in stored.items():
    if key.startswith("resnet/head/"):
      assert exported[key].shape[-1] == 10 and value.shape[-1] == 1000
    else:
      np.testing.assert_array_equal(exported[key], value, err_msg=key)
  assert np.abs(exported["resnet/head/conv2d/kernel"]).max() > 0  # the new head trained


def _run_main(workdir, config, *flags):
  command = [sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}", config, "--config.peak_flops=1e12", *flags]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A BiT file, a ViT zoo file, a BiT file of width 2 (its root only: the width is told there) and a truncated
  BiT file."""
  base = tmp_path_factory.mktemp("files")
  bit = str(base / "BiT-M-R50x1.npz")
  _bit_file(bit)
  vit_model = models.get_model("testing", num_classes=10)
  shapes = jax.eval_shape(lambda: vit_model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32)))
  vit = str(base / "ViT.npz")
  checkpoint.save(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes["params"]), vit)
  wide = str(base / "BiT-M-R50x2.npz")
  np.savez(wide, **{"resnet/root_block/standardized_conv2d/kernel": np.ones((7, 7, 3, 128), np.float32)})
  truncated = str(base / "truncated.npz")
  with open(bit, "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[:len(data) // 2])
  return {"bit": bit, "vit": vit, "wide": wide, "truncated": truncated}


@pytest.mark.slow
@pytest.mark.parametrize("flags, expected", [
    (["--config=configs/quickstart.py", "--config.pretrained_path={bit}"],
     "holds a BiT ResNet-v2 but model testing is a Vision Transformer"),
    (["--config=configs/cnn_digits.py:BiT-R50x1", "--config.pretrained_path={vit}"],
     "holds a Vision Transformer but model BiT-R50x1 is a BiT ResNet-v2"),
    (["--config=configs/cnn_digits.py:BiT-R50x1", "--config.pretrained_path={wide}"],
     "is a BiT ResNet of width 2 (root conv 128 channels) but model BiT-R50x1 has width 1"),
    (["--config=configs/cnn_digits.py:BiT-R50x1", "--config.pretrained_path={truncated}"], "is truncated or corrupt"),
    (["--config=configs/cnn_digits.py", "--config.crop_stages=((0, 8), (3, 16))"],
     "which CNN-CIFAR (a plain CNN) does not have; drop --config.crop_stages"),
    (["--config=configs/cnn_digits.py", "--config.model.scan_layers=True"],
     "model option scan_layers=True does not apply to CNN-CIFAR (a plain CNN)"),
    (["--config=configs/cnn_digits.py:BiT-R50x1", "--config.model.fused_attention=True"],
     "model option fused_attention=True does not apply to BiT-R50x1 (a BiT ResNet-v2)"),
])
def test_cnn_user_errors_exit_2_with_one_line_and_write_nothing(files, tmp_path, flags, expected):
  result = _run_main(str(tmp_path / "run"), *[flag.format(**files) for flag in flags])
  assert result.returncode == 2, result.stderr[-3000:]
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and expected in error_lines[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "run")


def test_vit_options_are_refused_only_when_switched_on():
  config = models.get_model_config("CNN-CIFAR", remat="none", scan_layers=False, stochastic_depth=0.0)
  assert "remat" not in config and models.family(config) == "cnn"
  with pytest.raises(Exception, match="stochastic_depth=0.1 does not apply to CNN-CIFAR"):
    models.get_model_config("CNN-CIFAR", stochastic_depth=0.1)
  with pytest.raises(Exception, match="unknown model field 'hidden_size' for BiT-R50x1"):
    models.get_model_config("BiT-R50x1", hidden_size=3)
  assert ml_collections.ConfigDict(models.get_model_config("BiT-R152x4")).width_factor == 4
