"""Attention rollout, attention distance, posemb similarity and filter PCA by hand; the PNGs and the CLI."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.test_infer import error_line, make_workdir, random_params, run_cli, tiny_model
from tests.test_evaluate import digits_split
from vit_jax import models
from vit_jax.models import zoo
from vit_jax.tools import attention_maps, trained_model, visualize
from vit_jax.errors import UserError


def assert_readable_png(path, min_size=200):
  assert os.path.exists(path)
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape[0] >= min_size and image.shape[1] >= min_size
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # a picture, not a blank canvas


def test_rollout_by_hand():
  layer1 = np.array([[[[0.5, 0.5], [0.2, 0.8]], [[0.5, 0.5], [0.2, 0.8]]]])  # 2 identical heads
  layer2 = np.array([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # mean: all 0.5
  # Layer 1: (A + I) row-normalised = [[.75, .25], [.1, .9]]; layer 2: mean 0.5 + I -> [[.75, .25], [.25, .75]].
  a1 = np.array([[0.75, 0.25], [0.1, 0.9]])
  a2 = np.array([[0.75, 0.25], [0.25, 0.75]])
  np.testing.assert_allclose(attention_maps.rollout([layer1]), a1[None])
  np.testing.assert_allclose(attention_maps.rollout([layer1, layer2]), (a2 @ a1)[None])
  # The class token's row over the patches, scaled to a maximum of 1 (one patch: 1).
  config = {"classifier": "token", "patches": {"size": (4, 4)}}
  np.testing.assert_allclose(attention_maps.rollout_map((a2 @ a1)[None], config, 4), [[[1.0]]])
  joint = np.eye(5)[None] * 0.5 + 0.1  # a cls token and 2x2 patches
  joint[0, 0, 1:] = [0.1, 0.2, 0.4, 0.3]
  np.testing.assert_allclose(attention_maps.rollout_map(joint, config, 8), [[[0.25, 0.5], [1.0, 0.75]]])
  with pytest.raises(UserError, match="unpooled"):
    attention_maps.rollout_map(joint, {**config, "classifier": "unpooled"}, 8)


@pytest.mark.slow
def test_attention_weights_of_a_scanned_model_equal_the_plain_ones():
  plain = tiny_model()
  params = random_params(plain)
  scanned = tiny_model(scan_layers=True)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  expected = attention_maps.attention_weights(plain, params, images)
  got = attention_maps.attention_weights(scanned, models.stack_layers(params), images)
  assert len(got) == len(expected) == 2
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, atol=1e-6)


def test_mean_attention_distance_by_hand():
  # A 1x2 grid of 4-pixel patches plus a class token; one image, two heads.
  weights = np.zeros((1, 2, 3, 3))
  weights[0, 0, 1] = [0.5, 0.25, 0.25]  # head 0, patch 0: half on the cls token, rest split -> 0.5 * 4 px
  weights[0, 0, 2] = [0.0, 0.0, 1.0]  # head 0, patch 1: itself -> 0 px
  weights[0, 1, 1] = [0.0, 0.0, 1.0]  # head 1: each patch only on the other -> 4 px
  weights[0, 1, 2] = [0.0, 1.0, 0.0]
  np.testing.assert_allclose(attention_maps.mean_attention_distance(weights, (1, 2), (4, 4), 1), [1.0, 4.0])
  np.testing.assert_allclose(attention_maps.patch_distances((2, 2), (4, 4))[0], [0, 4, 4, np.sqrt(32)])


def test_posemb_similarity_and_filter_components():
  rng = np.random.default_rng(0)
  posemb = rng.normal(size=(1, 1 + 6, 5))
  sim = visualize.posemb_similarity(posemb, (2, 3), 1)
  assert sim.shape == (2, 3, 2, 3)
  a, b = posemb[0, 1 + 1], posemb[0, 1 + 5]  # patch (0, 1) and patch (1, 2)
  assert sim[0, 1, 1, 2] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  np.testing.assert_allclose([sim[r, c, r, c] for r in range(2) for c in range(3)], 1.0)
  # Filters that vary along one direction only: the first component is that direction (up to sign and scale).
  direction = rng.normal(size=(2, 2, 3))
  kernel = np.einsum("hwc,d->hwcd", direction, rng.normal(size=16)) + 5.0
  first = visualize.filter_components(kernel, count=3)[0]
  assert first.min() == 0 and first.max() == 1
  unit = lambda v: (v - v.mean()) / np.linalg.norm(v - v.mean())
  assert abs(unit(first.ravel()) @ unit(direction.ravel())) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir, _ = make_workdir(tmp_path_factory.mktemp("visualize") / "run")
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in range(10, 110, 10):
      record = {"step": step, "train_loss": 2.3 / step**0.3, "learning_rate": 1e-3 * min(step, 50) / 50,
                "img_per_sec": 100.0}
      if step % 50 == 0:
        record.update(test_loss=2.5 / step**0.3, test_accuracy=step / 120)
      f.write(json.dumps(record) + "\n")
  return trained_model.load(workdir, with_class_names=False)


@pytest.mark.slow
def test_pngs_are_written_and_readable(trained, tmp_path):
  images, _ = digits_split("test")
  assert_readable_png(visualize.plot_attention(trained, images[:3], str(tmp_path / "attention.png"), ["a", "b", "c"]))
  assert_readable_png(visualize.plot_posemb(trained, str(tmp_path / "posemb.png")))
  assert_readable_png(visualize.plot_filters(trained, str(tmp_path / "filters.png")), min_size=150)
  assert_readable_png(visualize.plot_distance(trained, images[:8], str(tmp_path / "distance.png")))
  path = visualize.plot_training_curves(trained.source)
  assert path == os.path.join(trained.source, "curves.png")
  assert_readable_png(path)


@pytest.mark.slow
def test_figures_refuse_models_they_do_not_apply_to(tmp_path):
  model = models.get_model("R+ViT-Ti_16", num_classes=3, hidden_size=32,
                           transformer=dict(num_layers=1, mlp_dim=16, num_heads=2))
  zoo.save(random_params(model, size=32), tmp_path / "hybrid.npz")
  hybrid = trained_model.load(str(tmp_path / "hybrid.npz"))
  with pytest.raises(UserError, match="plain ViT"):
    visualize.plot_filters(hybrid, str(tmp_path / "f.png"))
  with pytest.raises(UserError, match="metrics.jsonl does not exist"):
    visualize.plot_training_curves(str(tmp_path))
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_lo')  # a line cut short by a kill
  with pytest.raises(UserError, match="holds no metrics yet"):
    visualize.plot_training_curves(str(tmp_path))
  no_attention = trained_model.TrainedModel(
      model=None, params={}, model_config=models.get_model_config("testing"), image_size=16, pp=None,
      class_names=None, run_config=None, source="x")
  no_attention.model_config.transformer = None
  with pytest.raises(UserError, match="no attention"):
    visualize.plot_posemb(no_attention, str(tmp_path / "p.png"))


@pytest.mark.slow
def test_cli(trained, tmp_path):
  out = run_cli("vit_jax.tools.visualize", "attention", f"--checkpoint={trained.source}", "--dataset=digits",
                "--num_images=2", f"--output={tmp_path / 'a.png'}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert_readable_png(tmp_path / "a.png")
  # An unpooled model (from a workdir: shapes alone cannot tell unpooled from gap) has nothing to roll out to.
  workdir, _ = make_workdir(tmp_path / "unpooled", random_params(tiny_model(classifier="unpooled")))
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  config["model"] = {**config["model"], "classifier": "unpooled"}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  line = error_line(run_cli("vit_jax.tools.visualize", "attention", f"--checkpoint={workdir}", "--dataset=digits"))
  assert "unpooled" in line
