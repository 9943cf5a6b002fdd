"""Attention rollout, attention distance, posemb similarity and filter PCA by hand; the PNGs and the CLI."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.test_infer import error_line, make_workdir, random_params, run_cli, tiny_model
from tests.test_evaluate import digits_split
from vit_jax import checkpoint, models
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


# --- compare: two or more runs overlaid -----------------------------------------------------------------------


def write_run(path, model_name, records, tail=""):
  """A workdir as training leaves it for `compare`: config.json (the fields a run writes that compare reads) and
  metrics.jsonl, one JSON object per line as `MetricsWriter.write` appends them, plus `tail` (a line cut short)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_name": model_name, "model": {}, "dataset": "digits", "batch": 128}, f, indent=2)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(record) + "\n" for record in records) + tail)
  return str(path)


VIT_RECORDS = [
    {"step": 10, "train_loss": 2.0, "train_accuracy": 0.2, "learning_rate": 1e-3, "steps_per_sec": 5.0,
     "img_per_sec": 640.0},
    {"step": 15, "test_loss": 1.8, "test_accuracy": 0.3},  # an evaluation between progress steps: no rate
    {"step": 20, "train_loss": 1.5, "train_accuracy": 0.4, "learning_rate": 1e-3, "steps_per_sec": 10.0,
     "img_per_sec": 1280.0, "test_loss": 1.2, "test_accuracy": 0.5},
    {"step": 40, "train_loss": 1.0, "train_accuracy": 0.7, "learning_rate": 5e-4, "steps_per_sec": 4.0,
     "img_per_sec": 512.0, "test_loss": 0.9, "test_accuracy": 0.75, "test_loss_ema": 0.8, "test_accuracy_ema": 0.8},
]
CNN_RECORDS = [
    {"step": 20, "train_loss": 1.2, "train_accuracy": 0.6, "steps_per_sec": 2.0},
    {"step": 40, "train_loss": 0.6, "train_accuracy": 0.9, "steps_per_sec": 20.0, "test_loss": 0.5,
     "test_accuracy": 0.95},
]


def test_wall_seconds_by_hand():
  # 10 steps at 5/s: 2 s; the eval at 15 takes the next rate (10/s): +0.5 s; 20: +0.5 s; 20 steps at 4/s: +5 s.
  np.testing.assert_allclose(visualize.wall_seconds(VIT_RECORDS), [2.0, 2.5, 3.0, 8.0])
  # A last record without a rate takes the previous one's; no rate anywhere: no wall time.
  tail = [{"step": 10, "steps_per_sec": 2.0}, {"step": 14, "test_loss": 1.0}]
  np.testing.assert_allclose(visualize.wall_seconds(tail), [5.0, 7.0])
  assert np.isnan(visualize.wall_seconds([{"step": 5, "train_loss": 1.0}])).all()


def test_comparison_series_by_hand(tmp_path):
  vit = write_run(tmp_path / "vit", "ViT-CIFAR_4", VIT_RECORDS, tail='{"step": 50, "train_lo')
  cnn = write_run(tmp_path / "cnn", "CNN-CIFAR", CNN_RECORDS)
  runs = visualize.comparison_series([vit, cnn])
  assert list(runs) == ["ViT-CIFAR_4 (vit)", "CNN-CIFAR (cnn)"]
  series = runs["ViT-CIFAR_4 (vit)"]
  assert set(series) == {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_loss_ema",
                         "test_accuracy_ema"}
  for metric, (steps, seconds, values) in {
      "train_loss": ([10, 20, 40], [2.0, 3.0, 8.0], [2.0, 1.5, 1.0]),
      "test_accuracy": ([15, 20, 40], [2.5, 3.0, 8.0], [0.3, 0.5, 0.75]),
      "test_accuracy_ema": ([40], [8.0], [0.8])}.items():
    np.testing.assert_array_equal(series[metric][0], steps)
    np.testing.assert_allclose(series[metric][1], seconds)
    np.testing.assert_allclose(series[metric][2], values)
  cnn_series = runs["CNN-CIFAR (cnn)"]
  assert set(cnn_series) == {"train_loss", "train_accuracy", "test_loss", "test_accuracy"}
  # 20 steps at 2/s, then 20 at 20/s.
  np.testing.assert_allclose(cnn_series["train_loss"][1], [10.0, 11.0])
  np.testing.assert_allclose(cnn_series["test_loss"][1:], [[11.0], [0.5]])
  # Folders of the same name are told apart by their paths; a run without config.json is labelled by its folder.
  other = write_run(tmp_path / "other" / "vit", "ViT-CIFAR_4", VIT_RECORDS)
  os.remove(os.path.join(other, "config.json"))
  assert list(visualize.comparison_series([vit, other])) == [f"ViT-CIFAR_4 ({vit})", other]


def test_compare_writes_a_png(tmp_path):
  vit = write_run(tmp_path / "vit", "ViT-CIFAR_4", VIT_RECORDS)
  cnn = write_run(tmp_path / "cnn", "CNN-CIFAR", CNN_RECORDS)
  path = visualize.plot_comparison([vit, cnn], str(tmp_path / "figures" / "compare.png"))
  assert path == str(tmp_path / "figures" / "compare.png")
  assert_readable_png(path, min_size=500)


def test_compare_refuses_bad_runs_and_outputs(tmp_path):
  vit = write_run(tmp_path / "vit", "ViT-CIFAR_4", VIT_RECORDS)
  empty = write_run(tmp_path / "empty", "CNN-CIFAR", [], tail='{"step": 1, "train_lo')  # cut short by a kill
  (tmp_path / "fresh").mkdir()
  with pytest.raises(UserError, match="two or more runs, got 1"):
    visualize.comparison_series([vit])
  with pytest.raises(UserError, match="fresh/metrics.jsonl does not exist"):
    visualize.comparison_series([vit, str(tmp_path / "fresh")])
  with pytest.raises(UserError, match="empty/metrics.jsonl holds no metrics yet"):
    visualize.comparison_series([vit, empty])
  with pytest.raises(UserError, match="same run"):
    visualize.comparison_series([vit, str(tmp_path / "vit") + "/"])
  with pytest.raises(UserError, match=r"--output=compare\.jpg is not a figure file: end it in \.png, \.pdf, \.svg"):
    visualize.plot_comparison([vit, vit], "compare.jpg")


@pytest.mark.slow
def test_compare_cli(tmp_path):
  vit = write_run(tmp_path / "vit", "ViT-CIFAR_4", VIT_RECORDS)
  cnn = write_run(tmp_path / "cnn", "CNN-CIFAR", CNN_RECORDS)
  out = run_cli("vit_jax.tools.visualize", "compare", f"--workdir={vit}", f"--workdir={cnn}",
                f"--output={tmp_path / 'compare.svg'}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "<svg" in (tmp_path / "compare.svg").read_text()[:2000]
  (tmp_path / "fresh").mkdir()
  for args, message in [
      ([f"--workdir={vit}"], "compare needs two or more runs, got 1"),
      ([f"--workdir={vit}", f"--workdir={tmp_path / 'fresh'}"], f"{tmp_path / 'fresh'}/metrics.jsonl does not exist"),
      ([f"--workdir={vit}", f"--workdir={cnn}", "--output=compare.jpeg"], "--output=compare.jpeg is not a figure"),
  ]:
    line = error_line(run_cli("vit_jax.tools.visualize", "compare", *args))
    assert message in line, line
  assert not os.path.exists("compare.jpeg")


# --- pictures of a ViT's insides refuse convolutional models --------------------------------------------------


def test_vit_pictures_refuse_convolutional_models(tmp_path):
  cnn_config = models.get_model_config("CNN-CIFAR")
  expected = {"attention": "attention maps need a Vision Transformer; CNN-CIFAR (a plain CNN) has no attention; "
                           "pictures for it: curves, compare",
              "distance": "attention distances need a Vision Transformer; CNN-CIFAR (a plain CNN) has no attention",
              "posemb": "position-embedding similarities need a Vision Transformer; CNN-CIFAR (a plain CNN) has no "
                        "position embeddings",
              "filters": "patch-embedding filters need a Vision Transformer; CNN-CIFAR (a plain CNN) has no patch "
                         "embedding"}
  for kind, message in expected.items():
    with pytest.raises(UserError, match=re.escape(message)):
      visualize.require_vision_transformer(cnn_config, kind)
  with pytest.raises(UserError, match=re.escape("BiT-R50x1 (a BiT ResNet-v2) has no position embeddings")):
    visualize.require_vision_transformer(models.get_model_config("BiT-R50x1"), "posemb")
  visualize.require_vision_transformer(models.get_model_config("testing"), "posemb")  # a ViT passes
  # The plotting functions themselves check, whatever holds the weights.
  cnn = trained_model.TrainedModel(model=None, params={}, model_config=cnn_config, image_size=16, pp=None,
                                   class_names=None, run_config=None, source="x")
  images = np.zeros((1, 16, 16, 3), np.float32)
  for plot in (lambda out: visualize.plot_attention(cnn, images, out), lambda out: visualize.plot_posemb(cnn, out),
               lambda out: visualize.plot_filters(cnn, out), lambda out: visualize.plot_distance(cnn, images, out)):
    with pytest.raises(UserError, match=re.escape("CNN-CIFAR (a plain CNN)")):
      plot(str(tmp_path / "p.png"))
  assert not list(tmp_path.iterdir())


def make_cnn_workdir(path):
  """What a CNN-CIFAR run of configs/cnn_digits.py leaves: config.json and model.npz with its BatchNorm state."""
  from configs import cnn_digits  # pylint: disable=g-import-not-at-top
  config = cnn_digits.get_config()
  model = models.get_model(config.model_name, num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda v: (rng.normal(size=v.shape) * 0.1).astype(np.float32), shapes)
  params, model_state = models.state.from_init(variables)
  assert model_state, "CNN-CIFAR keeps BatchNorm statistics"
  os.makedirs(path)
  checkpoint.save(models.state.merge(params, model_state), os.path.join(path, "model.npz"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(json.loads(config.to_json()), f, indent=2, sort_keys=True)
  return str(path)


@pytest.mark.slow
def test_cli_refuses_vit_pictures_of_a_cnn_run(tmp_path):
  workdir = make_cnn_workdir(tmp_path / "cnn")
  for kind, extra, picture in [("attention", ["--dataset=digits"], "attention maps"),
                               ("posemb", [], "position-embedding similarities")]:
    line = error_line(run_cli("vit_jax.tools.visualize", kind, f"--checkpoint={workdir}", *extra,
                              f"--output={tmp_path / 'p.png'}"))
    assert f"{picture} need a Vision Transformer; CNN-CIFAR (a plain CNN) has no" in line, line
    assert "pictures for it: curves, compare" in line
  assert not os.path.exists(tmp_path / "p.png")


@pytest.mark.slow
def test_loaded_cnn_run_is_refused_by_the_vit_pictures(tmp_path):
  """Once trained_model loads CNN runs: the pictures refuse the loaded model, and a bare CNN .npz on the CLI."""
  workdir = make_cnn_workdir(tmp_path / "cnn")
  cnn = trained_model.load(workdir, with_class_names=False)
  assert models.family(cnn.model_config) == "cnn"
  with pytest.raises(UserError, match=re.escape("patch-embedding filters need a Vision Transformer; CNN-CIFAR")):
    visualize.plot_filters(cnn, str(tmp_path / "f.png"))
  line = error_line(run_cli("vit_jax.tools.visualize", "filters", f"--checkpoint={workdir}/model.npz",
                            f"--output={tmp_path / 'f.png'}"))
  assert "patch-embedding filters need a Vision Transformer" in line and "a plain CNN" in line, line
