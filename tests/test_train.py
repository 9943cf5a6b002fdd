"""Train step, losses, sharding equivalence, accumulation and short end-to-end runs on `digits` (in process)."""
import json
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoint, sharding, steps, train, workdir as workdir_lib
from vit_jax.objectives import supervised
from vit_jax.errors import UserError

from configs import common


def tiny_config(**overrides):
  """A 1-layer ViT on digits at 16 px: a few seconds per run."""
  config = common.get_config()
  config.model_name = "testing"
  config.model = {"patches": {"size": (4, 4)}}
  config.dataset = "digits"
  config.pp.crop = 16
  config.pp.augment = "none"
  config.batch = 32
  config.batch_eval = 128
  config.total_steps = 6
  config.warmup_steps = 2
  config.base_lr = 1e-3
  config.optimizer = "adamw"
  config.weight_decay = 1e-4
  config.progress_every = 2
  config.eval_every = 3
  config.checkpoint_every = 3
  config.peak_flops = 1e12  # skip the matmul measurement
  config.dtype = "float32"  # layouts and accumulation are compared to float32 tolerance
  config.update(overrides)
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


# --- losses ---------------------------------------------------------------------------------------------------


def test_softmax_loss_with_label_smoothing_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  log_probs = jax.nn.log_softmax(logits)[0]
  targets = np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
  got = supervised.per_example_loss(logits, jnp.array([0]), loss="softmax_xent", label_smoothing=0.1)
  np.testing.assert_allclose(got, [-(targets * log_probs).sum()], rtol=1e-6)


def test_sigmoid_loss_sums_over_classes():
  logits = jnp.array([[1.0, -2.0]])
  expected = np.log1p(np.exp(-1.0)) + np.log1p(np.exp(-2.0))  # class 0 positive, class 1 negative
  got = supervised.per_example_loss(logits, jnp.array([0]), loss="sigmoid_xent")
  np.testing.assert_allclose(got, [expected], rtol=1e-6)


def test_soft_labels_from_mixup():
  logits = jnp.array([[1.0, 0.0]])
  got = supervised.per_example_loss(logits, jnp.array([[0.5, 0.5]]), loss="softmax_xent")
  np.testing.assert_allclose(got, [-0.5 * jax.nn.log_softmax(logits)[0].sum()], rtol=1e-6)


# --- train step on synthetic batches ---------------------------------------------------------------------------


def _synthetic_batches(num, batch, crop=16, classes=10):
  rng = np.random.RandomState(0)
  return [{"image": rng.uniform(-1, 1, (batch, crop, crop, 3)).astype(np.float32),
           "label": rng.randint(0, classes, batch).astype(np.int32)} for _ in range(num)]


def _losses(config, mesh, batches):
  tx, schedule = train.make_optimizer(config)
  model = train.create_model(config, num_classes=10, platform=mesh.devices.flat[0].platform)
  init_fn = steps.make_init_fn(model, tx, config.pp.crop)
  shardings = sharding.tree_shardings(jax.eval_shape(init_fn, jax.random.PRNGKey(0)), mesh)
  state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  objective = supervised.Supervised.from_config(config)
  step = steps.make_train_step(model, tx, schedule, objective.loss_fn, mesh=mesh, state_shardings=shardings,
                               accum_steps=config.accum_steps)
  losses = []
  for batch in batches:
    state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    losses.append(float(metrics["train_loss"]))
  return np.array(losses), jax.device_get(state.params)


def _mesh(data, fsdp, tensor, num_devices):
  config = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
  return sharding.make_mesh(config, jax.devices()[:num_devices])


@pytest.mark.slow
def test_mesh_layouts_give_the_same_loss_curve():
  # hidden 16, 2 heads, MLP 32: fsdp and tensor axes of size 2 really split the kernels; dropout stays on.
  config = tiny_config(model={"hidden_size": 16, "patches": {"size": (4, 4)},
                              "transformer": {"mlp_dim": 32, "num_heads": 2}})
  batches = _synthetic_batches(4, 16)
  reference, reference_params = _losses(config, _mesh(1, 1, 1, 1), batches)
  assert reference[-1] < reference[0]
  for layout in [(8, 1, 1), (4, 2, 1), (2, 2, 2)]:
    losses, params = _losses(config, _mesh(*layout, 8), batches)
    np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=str(layout))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, reference_params)


@pytest.mark.slow
def test_accumulation_equals_the_large_batch():
  no_dropout = {"patches": {"size": (4, 4)}, "transformer": {"dropout_rate": 0.0}}
  batches = _synthetic_batches(3, 32)
  mesh = _mesh(2, 2, 1, 4)
  # SGD: updates are linear in the gradient, so summation-order noise is not amplified as Adam's would be.
  large, large_params = _losses(tiny_config(model=no_dropout, optimizer="sgd"), mesh, batches)
  accumulated, accumulated_params = _losses(tiny_config(model=no_dropout, optimizer="sgd", accum_steps=4), mesh,
                                            batches)
  np.testing.assert_allclose(accumulated, large, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), accumulated_params, large_params)


def test_ema_follows_the_parameters_with_the_warmed_up_decay():
  config = tiny_config(model={"patches": {"size": (4, 4)}, "transformer": {"dropout_rate": 0.0}})
  mesh = _mesh(2, 2, 1, 4)
  tx, schedule = train.make_optimizer(config)
  model = train.create_model(config, num_classes=10, platform="cpu")
  init_fn = steps.make_init_fn(model, tx, config.pp.crop, ema=True)
  shardings = sharding.tree_shardings(jax.eval_shape(init_fn, jax.random.PRNGKey(0)), mesh)
  assert shardings.ema_params == shardings.params  # sharded like the parameters
  state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(0))
  step = steps.make_train_step(model, tx, schedule, supervised.Supervised().loss_fn, mesh=mesh,
                               state_shardings=shardings, ema_decay=0.5)
  expected = jax.device_get(state.params)
  for k, batch in enumerate(_synthetic_batches(3, 16)):
    state, _ = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    decay = min(0.5, (1 + k) / (10 + k))  # 0.1, 0.1818..., 0.25: the warm-up still rules
    expected = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * np.asarray(p), expected,
                            jax.device_get(state.params))
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7),
               jax.device_get(state.ema_params), expected)
  assert float(steps.ema_decay_at(10_000, 0.5)) == 0.5
  with pytest.raises(UserError, match=r"ema_decay=1.0 must be in \[0, 1\)"):
    train.validate_config(tiny_config(ema_decay=1.0))


def test_mixing_labels_needs_an_objective_that_trains_on_them():
  class Unlabelled:  # stands for a self-supervised objective
    classifies = False
  for key in ("mixup", "cutmix"):
    pp = {"mixup": 0.0, "cutmix": 0.0, key: 1.0}
    with pytest.raises(UserError, match=rf"config.pp.{key}=1.0 mixes labels, which the Unlabelled objective does "
                                        rf"not train on; set --config.pp.{key}=0"):
      train.check_objective_data(Unlabelled(), pp)
    train.check_objective_data(supervised.Supervised(), pp)


@pytest.mark.parametrize("platform,sliced", [("cpu", False), ("tpu", True)])
def test_checkpoints_of_replicated_state_slice_it_per_replica_only_off_cpu(tmp_path, monkeypatch, platform, sliced):
  """Orbax's replica-parallel save slices every replicated array once per replica: on CPU that only blocks the
  loop, so CPU checkpoints are written by one replica; the state restores exactly either way."""
  slices = []
  real_slice = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *args, **kwargs: slices.append(1) or real_slice(*args, **kwargs))
  replicated = jax.sharding.NamedSharding(_mesh(8, 1, 1, 8), jax.sharding.PartitionSpec())
  state = {"kernel": jax.device_put(np.arange(64 * 16, dtype=np.float32).reshape(64, 16), replicated),
           "bias": jax.device_put(np.arange(16, dtype=np.float32), replicated)}
  manager = workdir_lib.checkpoint_manager(str(tmp_path), keep=3, platform=platform)
  workdir_lib.save_checkpoint(manager, 1, state, {})
  manager.wait_until_finished()
  assert bool(slices) == sliced
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  restored, _ = workdir_lib.restore_checkpoint(manager, 1, target)
  manager.close()
  for name, value in state.items():
    np.testing.assert_array_equal(restored[name], value)
    assert restored[name].sharding == replicated


# --- end to end on digits ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A complete 6-step run, shared: its workdir is checked here and its model.npz is fine-tuned below."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  config = tiny_config()
  config.fewshot.update(every=3, shots=(2,), seeds=1)
  result = train.train_and_evaluate(config, workdir)
  return workdir, result


@pytest.mark.slow
def test_train_and_evaluate_writes_the_workdir_contract(finished_run):
  workdir, result = finished_run
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [2, 3, 4, 6]
  assert [r["step"] for r in records if "fewshot_2shot_accuracy" in r] == [3, 6]
  assert not os.path.exists(os.path.join(workdir, "curves.png"))  # drawn by vit_jax.main, not by the library
  for record in records:
    if "train_loss" in record:
      assert {"train_loss", "train_accuracy", "learning_rate", "grad_norm", "img_per_sec", "mfu"} <= set(record)
  assert "test_accuracy" in records[1] and "test_accuracy" in records[-1]
  assert result["test_accuracy"] == records[-1]["test_accuracy"]
  assert records[0]["learning_rate"] > 0
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model_name"] == "testing"
  params = checkpoint.load(os.path.join(workdir, "model.npz"))
  assert params["head"]["kernel"].shape == (10, 10)
  assert params["embedding"]["kernel"].shape == (4, 4, 3, 10)


@pytest.mark.slow
def test_resume_with_a_changed_config_is_refused(finished_run):
  workdir, _ = finished_run
  with pytest.raises(UserError, match=r"different config: seed \(was 0, now 3\)"):
    train.train_and_evaluate(tiny_config(seed=3), workdir)
  # Run-control keys may change: this resumes, finds the run complete and leaves model.npz as it is.
  before = os.path.getmtime(os.path.join(workdir, "model.npz"))
  train.train_and_evaluate(tiny_config(progress_every=1, eval_every=0), workdir)
  assert os.path.getmtime(os.path.join(workdir, "model.npz")) == before


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(total_steps=8, base_lr=1e30, warmup_steps=0, grad_norm_clip=0.0, optimizer="sgd",
                       checkpoint_every=1, progress_every=1, eval_every=0)
  with pytest.raises(UserError, match=r"(train_loss|grad_norm) is (nan|inf) at step (\d+); ") as error:
    train.train_and_evaluate(config, workdir)
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert saved and max(saved) < 8
  bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  assert max(saved) == bad_step - 1  # checkpoints come only from steps whose loss and gradients were finite
  if len(saved) > 1:  # the way back starts before the checkpoint whose parameters gave the NaN
    assert f"move the checkpoint(s) of step {max(saved)} aside" in str(error.value)
    assert "--config.base_lr=1e+29" in str(error.value)
  else:
    assert "no checkpoint before it is kept; rerun with a new --workdir" in str(error.value)


@pytest.mark.slow
def test_fine_tune_from_a_checkpoint_at_another_resolution(finished_run, tmp_path):
  pretrained = os.path.join(finished_run[0], "model.npz")  # trained at 16 px: a 4x4 grid
  config = tiny_config(total_steps=2, eval_every=0, pretrained_path=pretrained)
  config.pp.crop = 24  # a 6x6 grid: the position embeddings are interpolated
  train.train_and_evaluate(config, str(tmp_path / "finetune"))
  params = checkpoint.load(str(tmp_path / "finetune" / "model.npz"))
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 10)


@pytest.mark.slow
def test_incompatible_pretrained_checkpoint_fails_before_compiling(finished_run, tmp_path):
  config = tiny_config(model={"patches": {"size": (4, 4)}, "hidden_size": 12},
                       pretrained_path=os.path.join(finished_run[0], "model.npz"))
  with pytest.raises(UserError, match="has shape"):
    train.train_and_evaluate(config, str(tmp_path / "finetune"))
  assert not os.path.exists(tmp_path / "finetune" / "checkpoints")


@pytest.mark.slow
def test_progressive_resizing_resamples_position_embeddings(tmp_path):
  config = tiny_config(total_steps=4, eval_every=0, progress_every=1, checkpoint_every=2,
                       crop_stages=((2, 24),))  # steps 0-1 at 16 px, 2-3 at 24 px
  assert train.crop_at(config, 1) == 16 and train.crop_at(config, 2) == 24
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  params = checkpoint.load(str(workdir / "model.npz"))
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 10)
  # Resuming from the checkpoint taken right at the switch (step 2, still 16 px) redoes it identically.
  uninterrupted = read_metrics(workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  os.remove(workdir / "model.npz")
  train.train_and_evaluate(config, str(workdir))
  losses = lambda records: [(r["step"], r["train_loss"], r["learning_rate"]) for r in records]
  assert losses(read_metrics(workdir)) == losses(uninterrupted)



@pytest.mark.slow
def test_scanned_rematerialised_model_trains_and_exports_the_zoo_layout(tmp_path):
  config = tiny_config(total_steps=2, eval_every=0, checkpoint_every=0, progress_every=1, mesh={"data": 4, "fsdp": 2,
                                                                                                 "tensor": 1})
  config.model.update({"scan_layers": True, "remat": "full", "transformer": {"num_layers": 2}})
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(config, workdir)
  assert 0 <= result["test_accuracy"] <= 1
  params = checkpoint.load(os.path.join(workdir, "model.npz"))
  assert {"encoderblock_0", "encoderblock_1"} <= set(params["Transformer"])


@pytest.mark.slow
def test_the_whole_recipe_trains_resumes_exactly_and_exports_the_chosen_weights(tmp_path):
  # Every piece at once, scanned layers: RandAugment, mixup and CutMix, stochastic depth, EMA, layer decay and a
  # learning-rate multiplier.
  from vit_jax.tools import evaluate, trained_model  # pylint: disable=g-import-not-at-top
  config = tiny_config(ema_decay=0.5, layer_decay=0.8, lr_mults=(("head/.*", 2.0),), base_lr=0.01,
                       mesh={"data": 4, "fsdp": 2, "tensor": 1})
  config.model.update({"scan_layers": True, "stochastic_depth": 0.2, "transformer": {"num_layers": 2}})
  config.pp.update(randaug=(2, 5), mixup=0.2, cutmix=1.0)
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(config, workdir)
  records = read_metrics(workdir)
  assert [r["step"] for r in records if "test_accuracy_ema" in r] == [3, 6]
  exported = evaluate.evaluate(trained_model.load(workdir))
  np.testing.assert_allclose(exported["loss"], result["test_loss_ema"], rtol=1e-5)
  assert abs(result["test_loss_ema"] - result["test_loss"]) > 1e-4  # the two are told apart
  # Resumed from step 3 (the last checkpoint and the export removed): the same weights, bit for bit.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
  os.remove(os.path.join(resumed, "model.npz"))
  train.train_and_evaluate(config, resumed)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load(os.path.join(resumed, "model.npz")),
               checkpoint.load(os.path.join(workdir, "model.npz")))
  # export_ema may change on resume: the complete run exports its raw weights instead.
  config.export_ema = False
  train.train_and_evaluate(config, workdir)
  exported = evaluate.evaluate(trained_model.load(workdir))
  np.testing.assert_allclose(exported["loss"], result["test_loss"], rtol=1e-5)
