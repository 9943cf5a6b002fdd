"""vit_jax.tools.evaluate: exact accuracy and loss over a split, checked against a numpy forward over every example."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from tests import numpy_vit
from tests.test_infer import CROP, error_line, flat, make_workdir, random_params, run_cli, tiny_model, with_value
from vit_jax import data
from vit_jax.evaluators import fewshot
from vit_jax.tools import cli, evaluate, trained_model
from vit_jax.errors import UserError

pytestmark = pytest.mark.slow  # trains or starts subprocesses throughout


def digits_split(split):
  """(images [n, CROP, CROP, 3] in [-1, 1], labels): the raw 8x8 digits resized with PIL, independently."""
  source = data.open_source("digits", split)
  records = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(Image.fromarray(r["image"]).resize((CROP, CROP), Image.BILINEAR), np.float32)
                     for r in records]) / 127.5 - 1
  return images, np.array([r["label"] for r in records])


def fit_head(params):
  """A 'tiny trained' classifier: random features, head fitted in closed form (ridge) on the train split."""
  images, labels = digits_split("train")
  features = numpy_vit.forward({k: v for k, v in flat(params).items() if not k.startswith("head/")}, images,
                               num_heads=4)
  mean = features.mean(axis=0)
  weights = fewshot.ridge_weights(features - mean, 2.0 * np.eye(10)[labels] - 1, 1e-2)
  params = jax.tree.map(np.asarray, params)
  params["head"] = {"kernel": weights.astype(np.float32), "bias": (-mean @ weights).astype(np.float32)}
  return params


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  params = fit_head(random_params(tiny_model()))
  return make_workdir(tmp_path_factory.mktemp("evaluate") / "run", params)


def test_evaluate_is_exact_over_the_split(trained_workdir):
  workdir, params = trained_workdir
  trained = trained_model.load(workdir, with_class_names=False)
  # 360 test images in batches of 64 (rounded to the 8 devices): the last batch is padded and masked.
  assert cli.device_batch(60) == 64
  result = evaluate.evaluate(trained, batch_size=60)
  images, labels = digits_split("test")
  logits = numpy_vit.forward(flat(params), images, num_heads=4)
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  assert result["num_examples"] == 360 and result["skipped"] == 0
  assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1e-9)
  assert result["loss"] == pytest.approx(-log_probs[np.arange(len(labels)), labels].mean(), rel=1e-4)
  assert result["accuracy"] > 0.5  # far above chance (0.1): the fitted head works


def test_errors(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  trained = trained_model.load(workdir, with_class_names=False)
  root = tmp_path / "folder"
  for split in ("train", "test"):
    for name in ("a", "b", "c"):
      (root / split / name).mkdir(parents=True)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / name / "x.png")
  with pytest.raises(UserError, match="has 3 classes but checkpoint"):
    evaluate.evaluate(trained, dataset=str(root))
  with pytest.raises(UserError, match="--dataset is required"):
    evaluate.evaluate(trained_model.load(f"{workdir}/model.npz"))
  with pytest.raises(UserError, match="batch_size"):
    evaluate.evaluate(trained, batch_size=0)


def test_cli(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  out = run_cli("vit_jax.tools.evaluate", f"--checkpoint={workdir}/model.npz", "--dataset=digits", "--split=test[:50]",
                "--batch_size=16", f"--output={tmp_path / 'r.json'}")
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout)
  assert result["num_examples"] == 50 and 0 <= result["accuracy"] <= 1 and result["split"] == "test[:50]"
  assert json.loads((tmp_path / "r.json").read_text()) == result
  assert "--dataset is required" in error_line(run_cli("vit_jax.tools.evaluate", f"--checkpoint={workdir}/model.npz"))
  # cli.run: positional arguments a tool does not take, and a bad flag value, are one error line each.
  assert "unexpected arguments stray" in error_line(run_cli("vit_jax.tools.evaluate", f"--checkpoint={workdir}",
                                                            "stray"))
  line = error_line(run_cli("vit_jax.tools.evaluate", f"--checkpoint={workdir}", "--batch_size=many"))
  assert line.startswith("error: bad command-line flag") and "batch_size" in line


def test_non_finite_checkpoint_is_one_error_line_not_a_nan_result(trained_workdir, tmp_path):
  _, params = trained_workdir
  workdir, _ = make_workdir(tmp_path / "nan", with_value(params, "head/bias", np.inf))
  line = error_line(run_cli("vit_jax.tools.evaluate", f"--checkpoint={workdir}", "--split=test[:8]",
                            "--batch_size=8"))
  assert f"checkpoint {workdir} has 10 non-finite value(s) (NaN or infinity) in head/bias (10,)" in line
  # Finite parameters whose activations overflow: the loss is NaN, which is no result either.
  workdir, _ = make_workdir(tmp_path / "huge", with_value(params, "embedding/kernel", 1e38))
  with pytest.raises(UserError, match=r"computes a non-finite loss \(nan\) on digits:test\[:8\]"):
    evaluate.evaluate(trained_model.load(workdir, with_class_names=False), split="test[:8]", batch_size=8)
