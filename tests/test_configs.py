"""Every config file: begins with its command and expected result, and every setting passes the checks a run makes
before it writes anything (keys, ranges, preprocessing, optimizer, model, learning-rate rules), from shapes alone."""
import importlib
import inspect
from pathlib import Path

import jax
import pytest

from vit_jax import objectives, optim, steps, train
from vit_jax.data import preprocess

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))


def test_the_recipe_configs_are_there():
  assert {"quickstart", "augreg_s16_i1k", "deit_s", "vit_cifar_recipe", "bit_finetune", "cnn_digits",
          "masked_patch_pretrain", "mae_pretrain", "mae_finetune", "ssl_digits", "digits_10_labels"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_begins_with_its_command_and_expected_result_and_passes_the_start_up_checks(name):
  module = importlib.import_module(f"configs.{name}")
  doc = inspect.getdoc(module)
  assert f"python -m vit_jax.main --config=configs/{name}.py" in doc
  assert "Expected" in doc
  config = module.get_config()
  train.validate_config(config)
  train.check_model_options(config, train.model_config_from(config))
  objective = objectives.get(config.trainer).from_config(config)
  train.check_objective_data(objective, config.pp)
  preprocess.check_pp(config.pp)
  objective.check_model(train.model_config_from(config), train.crop_at(config, 0))
  model = objective.wrap(train.create_model(config, num_classes=objective.num_outputs(10), platform="cpu"))
  tx, _ = train.make_optimizer(config)
  state = jax.eval_shape(steps.make_init_fn(model, tx, train.crop_at(config, 0), ema=config.ema_decay > 0),
                         jax.random.PRNGKey(0))
  optim.learning_rate_factors(state.params, layer_decay=config.layer_decay, lr_mults=config.lr_mults)
  assert (state.ema_params is not None) == (config.ema_decay > 0)


@pytest.mark.parametrize("dataset, steps_, warmup, decay, mixup, resize, crop", [
    ("oxford_flowers102", 500, 100, (0.4, 0.6, 0.8), 0.0, 448, 384),  # < 20k examples, large images
    ("cifar10", 10_000, 500, (0.3, 0.6, 0.9), 0.1, 160, 128),  # 20k-500k, 32-px images
    ("imagenet2012", 20_000, 500, (0.3, 0.6, 0.9), 0.1, 448, 384),  # > 500k
])
def test_bit_hyperrule_by_dataset_size_and_resolution(dataset, steps_, warmup, decay, mixup, resize, crop):
  config = importlib.import_module("configs.bit_finetune").get_config(dataset)
  assert (config.total_steps, config.warmup_steps, tuple(config.decay_steps), config.pp.mixup) == (
      steps_, warmup, decay, mixup)
  assert (config.pp.resize, config.pp.crop, config.base_lr, config.batch, config.optimizer) == (
      resize, crop, 0.003, 512, "sgd")
  schedule = optim.make_schedule(**{k: config[k] for k in ("base_lr", "total_steps", "warmup_steps", "decay_type",
                                                           "decay_steps")})
  assert float(schedule(steps_ - 1)) == pytest.approx(0.003 * 1e-3)  # three 10x drops by the end


def test_bit_hyperrule_counts_an_image_folder(tmp_path):
  for index in range(3):
    (tmp_path / "train" / "cat").mkdir(parents=True, exist_ok=True)
    (tmp_path / "train" / "cat" / f"{index}.jpg").write_bytes(b"")
  config = importlib.import_module("configs.bit_finetune").get_config(str(tmp_path))
  assert config.total_steps == 500 and config.pp.mixup == 0.0
