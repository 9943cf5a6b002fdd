"""The README's Python examples run as written, and its model table matches the registry."""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_models
from vit_jax import checkpoint, models

README = (Path(__file__).parent.parent / "README.md").read_text()
ZOO_FILE = "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz"


@pytest.mark.slow
def test_python_examples_run(tmp_path, monkeypatch):
  # The examples load a zoo file; stand in one of the same format and shapes (i21k head, 224 px) with noise.
  model = models.get_model("ViT-Ti_16", num_classes=21843)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))["params"]
  rng = np.random.default_rng(0)
  checkpoint.save(jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.02, params),
                  tmp_path / ZOO_FILE)
  monkeypatch.chdir(tmp_path)
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  assert blocks
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  assert (tmp_path / "finetuned.npz").exists()


def test_model_table_matches_registry():
  rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d,]+) \|", README, re.M)
  cnn_rows = re.findall(r"^\| `([^`]+)` \| (BiT ResNet-v2|course CNN) \| [^|]+ \| [^|]+ \| ([\d,]+) ", README, re.M)
  assert [row[0] for row in rows] + [row[0] for row in cnn_rows] == models.model_names()
  for name, _, params in cnn_rows:
    expected = test_models.course_cnn_count() if name == "CNN-CIFAR" else test_models.expected_count(name, 224)
    assert expected == int(params.replace(",", ""))
  for name, _, hidden, mlp, heads, layers, params in rows:
    config = models.get_model_config(name)
    assert (config.hidden_size, config.transformer.mlp_dim, config.transformer.num_heads,
            config.transformer.num_layers) == (int(hidden), int(mlp), int(heads), int(layers))
    # test_models traces every registry model and checks it has exactly this count.
    assert test_models.expected_count(name, 224) == int(params.replace(",", ""))
