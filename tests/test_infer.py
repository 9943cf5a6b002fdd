"""vit_jax.tools.infer and vit_jax.tools.trained_model: checkpoints from workdirs and bare .npz files, top-k on image
files."""
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests import numpy_vit
from vit_jax import models
from vit_jax.data import files
from vit_jax.models import zoo
from vit_jax.tools import infer, trained_model
from vit_jax.errors import UserError

pytestmark = pytest.mark.slow  # trains or starts subprocesses throughout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = dict(hidden_size=32, patches=dict(size=(4, 4)),
                 transformer=dict(num_layers=2, mlp_dim=48, num_heads=4, dropout_rate=0.0))
CROP = 16


def tiny_model(num_classes=10, **overrides):
  return models.get_model("testing", num_classes=num_classes, **{**OVERRIDES, **overrides})


def random_params(model, size=CROP, seed=0, scale=0.3):
  """Gaussian parameters of `model`'s shapes (from eval_shape: no eager initialisation, which is slow)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: (rng.normal(size=v.shape) * scale).astype(np.float32), shapes)


def flat(params):
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def make_workdir(path, params=None, dataset="digits", loss="softmax_xent"):
  """A finished-run workdir as training leaves it: config.json and model.npz."""
  os.makedirs(path, exist_ok=True)
  params = random_params(tiny_model()) if params is None else params
  zoo.save(params, os.path.join(path, "model.npz"))
  config = {"model_name": "testing", "model": OVERRIDES, "dataset": dataset, "loss": loss,
            "pp": {"train": "train", "test": "test", "crop": CROP, "resize": None}}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return str(path), params


def run_cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                        timeout=300)


def error_line(result):
  """The one `error:` line of a CLI that failed as users should see it: exit 2, no traceback, last on stderr."""
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines[-3:]
  assert lines[-1].startswith("error: "), lines[-3:]
  return lines[-1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("infer")
  workdir, params = make_workdir(root / "run")
  images = root / "images"
  (images / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(images / "rgb.png")
  Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(images / "sub" / "grey.jpg")
  Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)).save(images / "rgba.png")
  (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  return workdir, params, images


def test_image_files_use_the_test_preprocessing(setup):
  _, _, images = setup
  image, reason = files.load(str(images / "rgb.png"), {"crop": CROP, "resize": None})
  assert reason is None
  # Independent: PIL's bilinear resize of the whole image, scaled to [-1, 1].
  expected = np.asarray(Image.open(images / "rgb.png").convert("RGB").resize((CROP, CROP), Image.BILINEAR),
                        np.float32) / 127.5 - 1
  np.testing.assert_allclose(image, expected, atol=1e-6)
  image, reason = files.load(str(images / "broken.jpg"), {"crop": CROP, "resize": None})
  assert image is None and reason


def test_predict_files_matches_numpy_forward_and_skips_corrupt(setup):
  workdir, params, images = setup
  trained = trained_model.load(workdir)
  assert trained.class_names == tuple(str(i) for i in range(10))  # from the digits dataset of the run
  paths, any_folder = files.expand([str(images)])
  assert any_folder and len(paths) == 4
  predictions, skipped = infer.predict_files(trained, paths, k=3, batch_size=2)
  assert [p for p, _ in skipped] == [str(images / "broken.jpg")]
  assert [p["path"] for p in predictions] == [str(images / n) for n in ("rgb.png", "rgba.png", "sub/grey.jpg")]
  for prediction in predictions:
    image, _ = files.load(prediction["path"], {"crop": CROP, "resize": None})
    logits = numpy_vit.forward(flat(params), image[None], num_heads=4)[0]
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    expected = np.argsort(-probabilities)[:3]
    assert [t["index"] for t in prediction["top_k"]] == list(expected)
    assert [t["label"] for t in prediction["top_k"]] == [str(i) for i in expected]
    np.testing.assert_allclose([t["probability"] for t in prediction["top_k"]], probabilities[expected], atol=1e-5)


def test_bare_npz_architecture_is_read_off_shapes(setup, tmp_path):
  workdir, params, _ = setup
  trained = trained_model.load(os.path.join(workdir, "model.npz"))
  assert trained.model_config.transformer.num_heads == 4 and trained.model_config.transformer.num_layers == 2
  assert trained.image_size == CROP and trained.class_names is None
  images = np.random.default_rng(0).uniform(-1, 1, (2, CROP, CROP, 3)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(trained.model.apply)({"params": trained.params}, images),
                             numpy_vit.forward(flat(params), images, num_heads=4), atol=1e-4)
  # A gap hybrid too.
  model = models.get_model("R+ViT-Ti_16", num_classes=3, hidden_size=32, classifier="gap",
                           transformer=dict(num_layers=1, mlp_dim=16, num_heads=2))
  hybrid = random_params(model, size=32)
  zoo.save(hybrid, tmp_path / "hybrid.npz")
  loaded = trained_model.load(str(tmp_path / "hybrid.npz"))
  assert loaded.model_config.classifier == "gap" and tuple(loaded.model_config.resnet.num_layers) == ()
  assert loaded.image_size == 32


def test_new_resolution_interpolates_position_embeddings(setup):
  workdir, params, _ = setup
  trained = trained_model.load(workdir, image_size=24)
  posemb = trained.params["Transformer"]["posembed_input"]["pos_embedding"]
  assert posemb.shape == (1, 1 + 6 * 6, 32)
  np.testing.assert_array_equal(posemb, zoo.interpolate_posembed(
      params["Transformer"]["posembed_input"]["pos_embedding"], 37, True))
  assert trained.pp == {"crop": 24, "resize": None}
  image = np.random.default_rng(0).uniform(-1, 1, (1, 24, 24, 3)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(trained.model.apply)({"params": trained.params}, image),
                             numpy_vit.forward(flat(trained.params), image, num_heads=4), atol=1e-4)


def test_workdir_with_speed_options_loads_as_a_plain_model(setup, tmp_path):
  """model.npz is per-layer whatever the run's scan/remat/fused-attention options; inference uses plain layers."""
  _, params, _ = setup
  workdir, _ = make_workdir(tmp_path / "run", params)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  config["model"] = {**config["model"], "scan_layers": True, "fused_attention": True}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  trained = trained_model.load(workdir, with_class_names=False)
  assert not trained.model.scan_layers and not trained.model.fused_attention
  image = np.random.default_rng(0).uniform(-1, 1, (1, CROP, CROP, 3)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(trained.model.apply)({"params": trained.params}, image),
                             numpy_vit.forward(flat(params), image, num_heads=4), atol=1e-4)


def test_cli_end_to_end(setup, tmp_path):
  workdir, _, images = setup
  output = tmp_path / "preds.jsonl"
  result = run_cli("vit_jax.tools.infer", f"--checkpoint={workdir}", "--top_k=2", f"--output={output}", str(images))
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3 and lines[0].startswith(str(images / "rgb.png") + ": ")
  assert "skipped 1 unreadable image" in result.stderr and "broken.jpg" in result.stderr
  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert len(records) == 3 and all(len(r["top_k"]) == 2 for r in records)
  assert records[0]["top_k"][0]["probability"] >= records[0]["top_k"][1]["probability"]

  labels = tmp_path / "labels.txt"
  labels.write_text("\n".join(f"digit-{i}" for i in range(10)))
  result = run_cli("vit_jax.tools.infer", f"--checkpoint={workdir}/model.npz", f"--labels={labels}",
                   "--image_size=24", str(images / "rgb.png"))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "digit-" in result.stdout


def test_cli_strict_fails_with_one_error_line(setup):
  workdir, _, images = setup
  assert "broken.jpg" in error_line(run_cli("vit_jax.tools.infer", f"--checkpoint={workdir}", "--strict", str(images)))


def test_user_errors(setup, tmp_path):
  """What the CLI turns into `error:` lines (run_cli's exit 2 is checked above and in test_errors)."""
  workdir, _, images = setup
  labels = tmp_path / "labels.txt"
  labels.write_text("cat\ndog\n")
  with pytest.raises(UserError, match="2 names but the model has 10 classes"):
    trained_model.load(workdir, labels_path=str(labels))
  with pytest.raises(UserError, match="does not match model ViT-B_16"):
    trained_model.load(f"{workdir}/model.npz", model_name="ViT-B_16")
  with pytest.raises(UserError, match="does not exist"):
    trained_model.load(f"{tmp_path}/nope.npz")
  with pytest.raises(UserError, match="does not exist"):
    files.expand([str(tmp_path / "x.png")])
  with pytest.raises(UserError, match="no image files"):
    files.expand([str(tmp_path)])
  (tmp_path / "run").mkdir()
  with pytest.raises(UserError, match="no config.json"):
    trained_model.load(str(tmp_path / "run"))


def with_value(params, key, value):
  """A copy of `params` with parameter `key` ('/'-joined) set to `value` everywhere."""
  flat_params = flat(params)
  flat_params[key] = np.full_like(flat_params[key], value)
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat_params.items()})


def test_non_finite_checkpoint_is_refused_naming_the_tensor(setup, tmp_path):
  _, params, images = setup
  workdir, _ = make_workdir(tmp_path / "nan", with_value(params, "Transformer/encoder_norm/scale", np.nan))
  with pytest.raises(UserError, match=r"checkpoint .*nan has 32 non-finite value\(s\) \(NaN or infinity\) in "
                                      r"Transformer/encoder_norm/scale \(32,\); it is corrupt or from a run that "
                                      r"diverged"):
    trained_model.load(workdir)
  line = error_line(run_cli("vit_jax.tools.infer", f"--checkpoint={workdir}/model.npz", str(images / "rgb.png")))
  assert f"checkpoint {workdir}/model.npz has 32 non-finite value(s)" in line and "encoder_norm/scale" in line


def test_finite_checkpoint_that_computes_nan_is_refused(setup, tmp_path):
  """Parameters too large for float32: the patch embeddings overflow to infinity, the layer norms give NaN."""
  _, params, images = setup
  huge, _ = make_workdir(tmp_path / "huge", with_value(params, "embedding/kernel", 1e38))
  trained = trained_model.load(huge, with_class_names=False)
  with pytest.raises(UserError, match=r"computes non-finite probabilities \(NaN or infinity\) for .*rgb.png; its "
                                      r"parameters are finite"):
    infer.predict_files(trained, [str(images / "rgb.png")], k=2, batch_size=2)
