"""vit_jax.evaluate: exact accuracy and loss over a split, checked against a numpy forward over every example."""
import json

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests import numpy_vit
from tests.test_infer import CROP, error_line, flat, make_workdir, random_params, run_cli, tiny_model
from vit_jax import data, evaluate, fewshot, trained_model
from vit_jax.errors import UserError


def digits_split(split):
  """(images [n, CROP, CROP, 3] in [-1, 1], labels): the raw 8x8 digits resized with PIL, independently."""
  source = data.open_source(ml_collections.ConfigDict({"dataset": "digits"}), split)
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
  config = evaluate.eval_config(trained, batch_size=60)
  assert config.batch_eval == 64
  result = evaluate.evaluate(trained, config)
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
    evaluate.evaluate(trained, evaluate.eval_config(trained, dataset=str(root)))
  with pytest.raises(UserError, match="--dataset is required"):
    evaluate.eval_config(trained_model.load(f"{workdir}/model.npz"))
  with pytest.raises(UserError, match="batch_size"):
    evaluate.eval_config(trained, batch_size=0)


def test_cli(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  out = run_cli("vit_jax.evaluate", f"--checkpoint={workdir}/model.npz", "--dataset=digits", "--split=test[:50]",
                "--batch_size=16", f"--output={tmp_path / 'r.json'}")
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout)
  assert result["num_examples"] == 50 and 0 <= result["accuracy"] <= 1 and result["split"] == "test[:50]"
  assert json.loads((tmp_path / "r.json").read_text()) == result
  assert "--dataset is required" in error_line(run_cli("vit_jax.evaluate", f"--checkpoint={workdir}/model.npz"))
