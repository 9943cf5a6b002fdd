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
  assert {"quickstart", "augreg_s16_i1k", "deit_s", "vit_cifar_recipe"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_begins_with_its_command_and_expected_result_and_passes_the_start_up_checks(name):
  module = importlib.import_module(f"configs.{name}")
  doc = inspect.getdoc(module)
  assert f"python -m vit_jax.main --config=configs/{name}.py" in doc
  assert "Expected" in doc
  config = module.get_config()
  train.validate_config(config)
  objective = objectives.get(config.trainer).from_config(config)
  train.check_objective_data(objective, config.pp)
  preprocess.check_pp(config.pp)
  model = train.create_model(config, num_classes=10, platform="cpu")
  tx, _ = train.make_optimizer(config)
  state = jax.eval_shape(steps.make_init_fn(model, tx, train.crop_at(config, 0), ema=config.ema_decay > 0),
                         jax.random.PRNGKey(0))
  optim.learning_rate_factors(state.params, layer_decay=config.layer_decay, lr_mults=config.lr_mults)
  assert (state.ema_params is not None) == (config.ema_decay > 0)
