"""The tools on the convolutional models: `trained_model.load` of BiT ResNet-v2 and course-CNN workdirs and bare
files; infer, evaluate and fewshot end to end against the independent float64 numpy forwards of tests/numpy_bit.py;
inspect; and the errors that name both model families or both widths."""
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

from tests import numpy_bit
from vit_jax import checkpoint, data, models, workdir
from vit_jax.data import files
from vit_jax.errors import UserError
from vit_jax.evaluators import fewshot as fewshot_lib
from vit_jax.models import state as model_state_lib
from vit_jax.tools import evaluate, fewshot, infer
from vit_jax.tools import inspect as inspect_tool
from vit_jax.tools import trained_model

from configs import cnn_digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BIT = {"block_units": (1, 1, 1, 1)}  # BiT-R50x1's widths, one unit per stage: fast, and no registry model
SIZES = {"bit": 32, "cnn": 16}  # cnn_digits' crops: BiT's smallest size, the quickstart's 16 px for the CNN
FIT_IMAGES = 250  # train images the heads are fitted on
TEST_SPLIT = "test[:120]"  # evaluated against the numpy reference (its float64 BiT is the slow part): 2 batches of 64


def flat(tree, leaf=np.asarray):
  return {"/".join(k): leaf(v) for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def unflat(flat_tree):
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat_tree.items()})


def random_variables(model, size, seed=0):
  """{'params': ..., and 'batch_stats' for the CNN}: He-scaled Gaussian kernels (activations of order 1; BiT
  standardises its kernels anyway), norm scales around 1, biases and shifts around 0, BatchNorm variances in
  [0.5, 2]."""
  rng = np.random.default_rng(seed)
  tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))

  def draw(key, shape):
    if key.endswith("/kernel"):
      return rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))
    if key.endswith("/gamma") or key.endswith("/scale"):
      return 1 + 0.3 * rng.normal(size=shape)
    if key.endswith("/var"):
      return rng.uniform(0.5, 2, size=shape)
    return 0.1 * rng.normal(size=shape)

  return {collection: unflat({key: draw(key, v.shape).astype(np.float32)
                              for key, v in flat(subtree, leaf=lambda v: v).items()})
          for collection, subtree in tree.items()}


def numpy_forward(kind, flat_variables, images):
  """Logits (features without a head) of the independent numpy reference; `flat_variables` as model.npz holds
  them (the CNN's statistics under `batch_stats/`)."""
  if kind == "bit":
    return numpy_bit.bit_forward(flat_variables, images)
  inputs = {key.removeprefix("batch_stats/"): value for key, value in flat_variables.items()}
  return numpy_bit.cnn_forward(inputs, images, train=False)[0]


def without_head(kind, flat_variables):
  prefix = "resnet/head/" if kind == "bit" else "head/"
  return {k: v for k, v in flat_variables.items() if not k.startswith(prefix)}


def digits(split, size):
  """(images [n, size, size, 3] in [-1, 1], labels): the raw 8x8 digits resized with PIL, independently of the
  data pipeline."""
  source = data.open_source("digits", split)
  records = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(Image.fromarray(r["image"]).resize((size, size), Image.BILINEAR), np.float32)
                     for r in records]) / 127.5 - 1
  return images, np.array([r["label"] for r in records])


def with_fitted_head(kind, flat_variables, size):
  """A 'tiny trained' classifier: random features, the head fitted in closed form (ridge) on train images."""
  images, labels = digits("train", size)
  features = numpy_forward(kind, without_head(kind, flat_variables), images[:FIT_IMAGES])
  mean = features.mean(axis=0)
  weights = fewshot_lib.ridge_weights(features - mean, 2.0 * np.eye(10)[labels[:FIT_IMAGES]] - 1, 1e-2)
  bias = (-mean @ weights).astype(np.float32)
  fitted = dict(flat_variables)
  if kind == "bit":
    fitted["resnet/head/conv2d/kernel"] = weights.astype(np.float32)[None, None]
    fitted["resnet/head/conv2d/bias"] = bias
  else:
    fitted["head/kernel"], fitted["head/bias"] = weights.astype(np.float32), bias
  return fitted


def head_of(kind, flat_variables):
  """(kernel [features, classes], bias) of the classifier, in float64."""
  if kind == "bit":
    return (flat_variables["resnet/head/conv2d/kernel"][0, 0].astype(np.float64),
            flat_variables["resnet/head/conv2d/bias"].astype(np.float64))
  return flat_variables["head/kernel"].astype(np.float64), flat_variables["head/bias"].astype(np.float64)


def make_model(kind, num_classes=10, **overrides):
  if kind == "bit":
    return models.get_model("BiT-R50x1", num_classes=num_classes, **{**TINY_BIT, **overrides})
  return models.get_model("CNN-CIFAR", num_classes=num_classes, **overrides)


def run_config(kind):
  """The config a digits run of this model writes (configs/cnn_digits.py), as `vit_jax.main` would."""
  config = cnn_digits.get_config("BiT-R50x1" if kind == "bit" else None)
  if kind == "bit":
    config.model.block_units = TINY_BIT["block_units"]
  return config


def make_workdir(path, kind, flat_variables):
  """A finished run as training leaves it: config.json (workdir.write_config) and model.npz (checkpoint.save)."""
  os.makedirs(path, exist_ok=True)
  workdir.write_config(run_config(kind), str(path))
  checkpoint.save(unflat(flat_variables), workdir.path(str(path), workdir.MODEL_FILE))
  return str(path)


@pytest.fixture(scope="module", params=["bit", "cnn"])
def run(request, tmp_path_factory):
  """(kind, workdir, the flat variables of its model.npz) of a tiny trained BiT or course CNN."""
  kind = request.param
  variables = random_variables(make_model(kind), SIZES[kind])
  flat_variables = with_fitted_head(kind, flat(model_state_lib.merge(variables["params"],
                                                                       {k: v for k, v in variables.items()
                                                                        if k != "params"})), SIZES[kind])
  return kind, make_workdir(tmp_path_factory.mktemp(kind) / "run", kind, flat_variables), flat_variables


_TEST_FEATURES = {}


def numpy_test_features(kind, flat_variables):
  """(numpy pre-logit features of TEST_SPLIT, labels), computed once per model (the slow part)."""
  if kind not in _TEST_FEATURES:
    images, labels = digits(TEST_SPLIT, SIZES[kind])
    _TEST_FEATURES[kind] = numpy_forward(kind, without_head(kind, flat_variables), images), labels
  return _TEST_FEATURES[kind]


def softmax(logits):
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def run_cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                        timeout=300)


def error_line(result):
  """The one `error:` line of a CLI that failed as users should see it: exit 2, no traceback."""
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines[-3:]
  return lines[-1]


# --- loading ------------------------------------------------------------------------------------------------------


def test_workdir_and_bare_file_load_with_family_size_and_state(run):
  kind, workdir_path, flat_variables = run
  trained = trained_model.load(workdir_path)
  assert models.family(trained.model_config) == kind and trained.num_classes == 10
  assert trained.image_size == SIZES[kind] and trained.pp == {"crop": SIZES[kind], "resize": None}
  assert trained.class_names == tuple(str(i) for i in range(10))  # the run's dataset
  state_keys = {f"batch_stats/{k}" for k in flat(trained.model_state.get("batch_stats", {}))}
  assert state_keys == {k for k in flat_variables if k.startswith("batch_stats/")}
  assert bool(state_keys) == (kind == "cnn")
  assert set(flat(trained.variables)) == {f"params/{k}" for k in flat_variables if not k.startswith("batch_")} | {
      k for k in flat_variables if k.startswith("batch_stats/")}

  bare = trained_model.load(workdir.path(workdir_path, workdir.MODEL_FILE))
  assert bare.class_names is None and bare.run_config is None
  if kind == "bit":  # no registry model has one unit per stage: the architecture is read off the shapes
    assert bare.model_config.model_name is None and tuple(bare.model_config.block_units) == (1, 1, 1, 1)
    assert bare.model_config.width_factor == 1 and bare.image_size == trained_model.BIT_DEFAULT_IMAGE_SIZE
  else:  # the registry's CNN, at the size its dense layer was built for
    assert bare.model_config.model_name == "CNN-CIFAR" and bare.image_size == 16
  # Any size of at least 32 px for BiT (no position embeddings), the trained size only for the CNN.
  if kind == "bit":
    assert trained_model.load(workdir_path, image_size=48).pp == {"crop": 48, "resize": None}
  else:
    with pytest.raises(UserError, match=r"--image_size=32 does not fit CNN-CIFAR \(a plain CNN\): it flattens the "
                                        r"2x2 feature map of 16-px images into a dense layer"):
      trained_model.load(workdir_path, image_size=32)


def test_cnn_stages_are_read_off_the_shapes_and_ambiguity_refused():
  # The course CNN: 128-128 across the second boundary also fits (32, 64) (128,) (128, 256, 256); even stages win.
  assert trained_model._cnn_stages([32, 64, 128, 128, 256, 256], [64, 128, 256]) == (
      (32, 64), (128, 128), (256, 256))
  assert trained_model._cnn_stages([8, 16, 24], [16, 24]) == ((8, 16), (24,))
  assert trained_model._cnn_stages([8, 8, 8, 8], [8, 8]) == ((8, 8), (8, 8))  # of 3 fits, the one even split
  with pytest.raises(UserError, match=r"cannot tell the stages of this CNN checkpoint: 2 groupings of its "
                                      r"convolution widths \(8, 8, 8\) into stages ending in its BatchNorm widths"):
    trained_model._cnn_stages([8, 8, 8], [8, 8])  # (1, 2) and (2, 1)
  with pytest.raises(UserError, match="no grouping"):
    trained_model._cnn_stages([8, 16], [32])


@pytest.mark.slow
def test_full_bit_r50x1_file_with_and_without_model_name(tmp_path):
  """A big_transfer file of BiT-R50x1's shapes: named or read off the shapes, it is the registry's BiT-R50x1, runs
  as numpy says, and other names are refused naming both families or both widths."""
  model = models.get_model("BiT-R50x1", num_classes=10)
  variables = flat(random_variables(model, 32)["params"])
  path = str(tmp_path / "BiT-M-R50x1.npz")
  checkpoint.save(unflat(variables), path)
  named = trained_model.load(path, model_name="BiT-R50x1")
  bare = trained_model.load(path)
  for trained in (named, bare):
    assert trained.model_config.model_name == "BiT-R50x1" and trained.image_size == 224
  image = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  logits = np.asarray(jax.jit(bare.model.apply)(bare.variables, image))
  reference = numpy_bit.bit_forward(variables, image)
  assert np.linalg.norm(logits - reference) / np.linalg.norm(reference) < 1e-4  # float32 through 16 units
  with pytest.raises(UserError, match=rf"checkpoint {path} is BiT-R50x1 \(width 1\) but --model_name=BiT-R152x2 has "
                                      r"width 2; pass --model_name=BiT-R50x1 or leave --model_name out"):
    trained_model.load(path, model_name="BiT-R152x2")
  with pytest.raises(UserError, match=rf"checkpoint {path} holds a BiT ResNet-v2 but --model_name=ViT-B_16 is a "
                                      r"Vision Transformer; pass --model_name=BiT-R50x1 or leave --model_name out"):
    trained_model.load(path, model_name="ViT-B_16")
  # Deeper, same width: the first missing unit is named.
  with pytest.raises(UserError, match=r"does not match model BiT-R101x1: .*resnet/block3/unit07"):
    trained_model.load(path, model_name="BiT-R101x1")


def test_user_errors_name_both_families_and_widths(tmp_path):
  bit_path = str(tmp_path / "bit.npz")
  checkpoint.save(random_variables(make_model("bit", width_factor=2), 32)["params"], bit_path)
  with pytest.raises(UserError, match=r"is a BiT ResNet-v2 with \(1, 1, 1, 1\) units per stage \(width 2\) but "
                                      r"--model_name=BiT-R50x1 has width 1; leave --model_name out"):
    trained_model.load(bit_path, model_name="BiT-R50x1")
  with pytest.raises(UserError, match=r"holds a BiT ResNet-v2 but --model_name=CNN-CIFAR is a plain CNN"):
    trained_model.load(bit_path, model_name="CNN-CIFAR")
  with pytest.raises(UserError, match=r"--image_size=16 is too small for the BiT ResNet-v2, units per stage "
                                      r"\(1, 1, 1, 1\), width factor 2: it downsamples 32x; use at least 32"):
    trained_model.load(bit_path, image_size=16)
  vit_path = str(tmp_path / "vit.npz")
  vit = models.get_model("testing", num_classes=3, hidden_size=16, patches={"size": (4, 4)},
                         transformer={"num_layers": 1, "mlp_dim": 8, "num_heads": 2})
  checkpoint.save(random_variables(vit, 8)["params"], vit_path)
  with pytest.raises(UserError, match=r"holds a Vision Transformer but --model_name=BiT-R50x1 is a BiT ResNet-v2; "
                                      r"leave --model_name out"):
    trained_model.load(vit_path, model_name="BiT-R50x1")
  # A workdir whose model.npz is not its run's.
  os.makedirs(tmp_path / "run")
  workdir.write_config(run_config("cnn"), str(tmp_path / "run"))
  os.replace(bit_path, tmp_path / "run" / "model.npz")
  with pytest.raises(UserError, match=r"holds a BiT ResNet-v2 but model CNN-CIFAR of .*config.json is a plain CNN; "
                                      r"its model.npz is not this run's"):
    trained_model.load(str(tmp_path / "run"))
  # A truncated file and non-finite values (BiT parameters, CNN statistics) are named.
  data_bytes = (tmp_path / "run" / "model.npz").read_bytes()
  (tmp_path / "truncated.npz").write_bytes(data_bytes[:len(data_bytes) // 2])
  with pytest.raises(UserError, match=r"truncated.npz is truncated or corrupt"):
    trained_model.load(str(tmp_path / "truncated.npz"))
  broken = flat(checkpoint.load(tmp_path / "run" / "model.npz"))
  broken["resnet/block2/unit01/b/group_norm/gamma"][3] = np.nan
  checkpoint.save(unflat(broken), tmp_path / "nan_bit.npz")
  with pytest.raises(UserError, match=r"has 1 non-finite value\(s\) \(NaN or infinity\) in "
                                      r"resnet/block2/unit01/b/group_norm/gamma \(256,\)"):
    trained_model.load(str(tmp_path / "nan_bit.npz"))
  cnn = random_variables(make_model("cnn"), 16)
  cnn["batch_stats"]["bn2"]["var"][:] = np.inf
  checkpoint.save(model_state_lib.merge(cnn["params"], {"batch_stats": cnn["batch_stats"]}), tmp_path / "inf.npz")
  with pytest.raises(UserError, match=r"has 128 non-finite value\(s\) \(NaN or infinity\) in batch_stats/bn2/var"):
    trained_model.load(str(tmp_path / "inf.npz"))


# --- the tools ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_infer_matches_numpy(run, tmp_path):
  kind, workdir_path, flat_variables = run
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
  Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(tmp_path / "grey.jpg")
  Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
  paths = [str(tmp_path / name) for name in ("rgb.png", "grey.jpg", "rgba.png")]
  trained = trained_model.load(workdir_path)
  predictions, skipped = infer.predict_files(trained, paths, k=3, batch_size=2)
  assert not skipped and [p["path"] for p in predictions] == paths
  images = np.stack([files.load(path, {"crop": SIZES[kind], "resize": None})[0] for path in paths])
  probabilities = softmax(numpy_forward(kind, flat_variables, images))
  for prediction, expected in zip(predictions, probabilities):
    order = np.argsort(-expected)[:3]
    assert [t["index"] for t in prediction["top_k"]] == list(order)
    assert [t["label"] for t in prediction["top_k"]] == [str(i) for i in order]  # the digits' class names
    np.testing.assert_allclose([t["probability"] for t in prediction["top_k"]], expected[order], atol=1e-5)


@pytest.mark.slow
def test_evaluate_is_exact_over_the_split(run):
  kind, workdir_path, flat_variables = run
  result = evaluate.evaluate(trained_model.load(workdir_path, with_class_names=False), split=TEST_SPLIT,
                             batch_size=60)
  features, labels = numpy_test_features(kind, flat_variables)
  kernel, bias = head_of(kind, flat_variables)
  logits = features @ kernel + bias
  log_probs = np.log(softmax(logits))
  # 120 examples in batches of 64 (60 rounded to the 8 devices): the last batch is padded and masked.
  assert result["num_examples"] == 120 and result["skipped"] == 0 and result["image_size"] == SIZES[kind]
  # float32 against float64: at most one near-tie may flip.
  assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1.5 / 120)
  assert result["loss"] == pytest.approx(-log_probs[np.arange(len(labels)), labels].mean(), rel=1e-4)
  assert result["accuracy"] > 0.5  # far above chance (0.1): the fitted head works


@pytest.mark.slow
def test_fewshot_probes_pre_logit_features_as_by_hand(run):
  kind, workdir_path, flat_variables = run
  trained = trained_model.load(workdir_path, with_class_names=False)
  result = fewshot.fewshot(trained, test_split=TEST_SPLIT, shots=(5,), seeds=1, batch_size=128)
  assert result["dataset"] == "digits" and set(result) >= {"fewshot_5shot_accuracy", "fewshot_5shot_accuracy_std"}
  # By hand: the pooled features of the numpy reference without its head, ridge via lstsq on the same draws.
  features = without_head(kind, flat_variables)
  train_images, train_labels = digits("train", SIZES[kind])
  test_features, test_labels = numpy_test_features(kind, flat_variables)
  assert test_features.shape == (120, 2048 if kind == "bit" else 512)
  chosen = fewshot_lib.draw_shots(train_labels, 10, 5, seed=0).ravel()  # the shots of seed 0, as the probe draws
  x = numpy_forward(kind, features, train_images[chosen])
  mean = x.mean(0)
  scale = np.sqrt(np.mean(np.sum((x - mean) ** 2, axis=1)))
  xs, ts = (x - mean) / scale, (test_features - mean) / scale
  targets = 2 * np.eye(10)[np.repeat(np.arange(10), 5)] - 1
  w = np.linalg.lstsq(np.vstack([xs, np.sqrt(fewshot_lib.DEFAULT_L2_REG) * np.eye(xs.shape[1])]),
                      np.vstack([targets, np.zeros((xs.shape[1], 10))]), rcond=None)[0]
  assert result["fewshot_5shot_accuracy"] == pytest.approx(np.mean((ts @ w).argmax(1) == test_labels), abs=1.5 / 120)
  assert result["fewshot_5shot_accuracy"] > 0.3  # chance is 0.1


def test_inspect_prints_family_architecture_and_state(run, capsys):
  kind, workdir_path, flat_variables = run
  inspect_tool.inspect(workdir_path)
  out = capsys.readouterr().out
  assert "position embedding" not in out and "classes: 10" in out and "weights: raw (config.json" in out
  parameters = sum(v.size for k, v in flat_variables.items() if not k.startswith("batch_stats/"))
  assert f"parameters: {parameters:,}\n" in out
  if kind == "bit":
    assert "family: bit (a BiT ResNet-v2)" in out
    assert "architecture: BiT ResNet-v2, units per stage (1, 1, 1, 1), width factor 1" in out
    assert "model: no registry model matches; none has this architecture" in out
    assert "run's model: BiT-R50x1 with the overrides of its `model` section (config.json)" in out
  else:
    assert "family: cnn (a plain CNN)" in out and "model: CNN-CIFAR\n" in out
    assert ("architecture: plain CNN, convolution widths per stage ((32, 64), (128, 128), (256, 256)), dense widths "
            "(1024, 512)") in out
    assert "image size: 16 px" in out
    assert "model state: batch_stats/ 896 values (BatchNorm running statistics" in out  # 2 x (64 + 128 + 256)


@pytest.mark.slow
def test_cli_end_to_end(run, tmp_path):
  """Each tool as users run it (the functions are checked numerically above): infer on the workdir, evaluate on the
  CNN's bare model.npz, fewshot on BiT's workdir, inspect, and a wrong --model_name as one error line."""
  kind, workdir_path, _ = run
  if kind == "bit":  # ~45 s of subprocesses; the BiT paths of these tools are checked in-process above
    pytest.skip("the CLI wiring is the same for both families: run on the course CNN")
  npz = workdir.path(workdir_path, workdir.MODEL_FILE)
  Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "x.png")
  out = run_cli("vit_jax.tools.infer", f"--checkpoint={workdir_path}", "--top_k=2", str(tmp_path / "x.png"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith(f"{tmp_path / 'x.png'}: ")
  if kind == "cnn":
    out = run_cli("vit_jax.tools.evaluate", f"--checkpoint={npz}", "--dataset=digits", "--split=test[:40]",
                  "--batch_size=16")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["num_examples"] == 40 and json.loads(out.stdout)["image_size"] == 16
  else:
    out = run_cli("vit_jax.tools.fewshot", f"--checkpoint={workdir_path}", "--shots=1,2", "--seeds=1",
                  "--train_split=train[:200]", "--test_split=test[:40]")
    assert out.returncode == 0, out.stderr[-2000:]
    assert 0 <= json.loads(out.stdout)["fewshot_2shot_accuracy"] <= 1
  out = run_cli("vit_jax.tools.inspect", npz)
  assert out.returncode == 0 and f"family: {kind}" in out.stdout, out.stderr[-2000:]
  wrong = "ViT-B_16" if kind == "bit" else "BiT-R50x1"
  line = error_line(run_cli("vit_jax.tools.infer", f"--checkpoint={npz}", f"--model_name={wrong}",
                            str(tmp_path / "x.png")))
  assert f"but --model_name={wrong} is" in line
