"""Few-shot linear probe: the closed-form ridge solution, the shot draws, the evaluator on `digits`
(vit_jax.evaluators.fewshot) and its tool (vit_jax.tools.fewshot)."""
import json

import numpy as np
import pytest

from tests import numpy_vit
from tests.test_evaluate import digits_split
from tests.test_infer import error_line, flat, make_workdir, random_params, run_cli, tiny_model
from vit_jax.evaluators import fewshot
from vit_jax.errors import UserError


@pytest.mark.parametrize("n,d", [(40, 6), (5, 12)])  # primal and dual forms
def test_ridge_weights_match_lstsq_of_the_augmented_system(n, d):
  rng = np.random.default_rng(0)
  x, y, l2 = rng.normal(size=(n, d)), rng.normal(size=(n, 3)), 0.7
  # min |xW - y|^2 + l2 |W|^2  ==  min |[x; sqrt(l2) I] W - [y; 0]|^2
  expected = np.linalg.lstsq(np.vstack([x, np.sqrt(l2) * np.eye(d)]), np.vstack([y, np.zeros((d, 3))]),
                             rcond=None)[0]
  np.testing.assert_allclose(fewshot.ridge_weights(x, y, l2), expected, atol=1e-10)


def test_linear_probe_by_hand():
  # Two classes, one feature: x = [3, 1] centres to [1, -1] and has unit mean square norm already. Targets
  # [[1, -1], [-1, 1]]: W = (x'x + l2)^-1 x'Y = [2, -2] / (2 + l2), so test scores (t - 2) * [2, -2] / (2 + l2)
  # pick class 0 above the mean (2) and class 1 below.
  train_x, train_y = np.array([[3.0], [1.0]]), np.array([0, 1])
  test_x, test_y = np.array([[2.5], [0.0], [10.0], [1.9]]), np.array([0, 1, 0, 0])
  assert fewshot.linear_probe_accuracy(train_x, train_y, test_x, test_y, 2, l2_reg=0.5) == 0.75
  # Translation and scale of the features change nothing (centring and scale normalisation).
  assert fewshot.linear_probe_accuracy(train_x * 7 + 3, train_y, test_x * 7 + 3, test_y, 2, l2_reg=0.5) == 0.75


def test_draw_shots_are_per_class_nested_and_checked():
  labels = np.array([0, 1, 2] * 10)
  draw = fewshot.draw_shots(labels, 3, 5, seed=1)
  assert draw.shape == (3, 5) and len(np.unique(draw)) == 15
  assert all((labels[draw[c]] == c).all() for c in range(3))
  np.testing.assert_array_equal(draw, fewshot.draw_shots(labels, 3, 5, seed=1))
  assert not np.array_equal(draw, fewshot.draw_shots(labels, 3, 5, seed=2))
  with pytest.raises(UserError, match="fewer than 11 shots"):
    fewshot.draw_shots(labels, 3, 11, seed=0)


@pytest.fixture(scope="module")
def digits_evaluation():
  model = tiny_model()
  params = random_params(model)
  evaluator = fewshot.FewShotEvaluator(dataset="digits", pp={"crop": 16, "resize": None}, shots=(1, 5, 10), seeds=2,
                                       batch=128)
  return model, params, evaluator, evaluator({"params": params}, model)


@pytest.mark.slow
def test_digits_few_shot_beats_chance_and_matches_hand_computation(digits_evaluation):
  _, params, evaluator, metrics = digits_evaluation
  assert set(metrics) == {f"fewshot_{k}shot_accuracy{s}" for k in (1, 5, 10) for s in ("", "_std")}
  assert metrics["fewshot_10shot_accuracy"] > 0.35  # chance is 0.1
  assert metrics["fewshot_10shot_accuracy"] > metrics["fewshot_1shot_accuracy"]
  # By hand, for 5 shots: features from the independent numpy forward, ridge via lstsq, averaged over seeds.
  features_params = {k: v for k, v in flat(params).items() if not k.startswith("head/")}
  train_images, _ = digits_split("train")
  test_images, test_labels = digits_split("test")
  test_features = numpy_vit.forward(features_params, test_images, num_heads=4)
  accuracies = []
  for draw in evaluator.draws:
    chosen = draw[:, :5].ravel()
    x = numpy_vit.forward(features_params, train_images[chosen], num_heads=4)
    y = np.repeat(np.arange(10), 5)
    mean = x.mean(0)
    scale = np.sqrt(np.mean(np.sum((x - mean) ** 2, axis=1)))
    xs, ts = (x - mean) / scale, (test_features - mean) / scale
    targets = 2 * np.eye(10)[y] - 1
    w = np.linalg.lstsq(np.vstack([xs, np.sqrt(fewshot.DEFAULT_L2_REG) * np.eye(xs.shape[1])]),
                        np.vstack([targets, np.zeros((xs.shape[1], 10))]), rcond=None)[0]
    accuracies.append(np.mean((ts @ w).argmax(1) == test_labels))
  assert metrics["fewshot_5shot_accuracy"] == pytest.approx(np.mean(accuracies), abs=1.5 / 360)


@pytest.mark.slow
def test_evaluator_is_deterministic_and_refuses_unpooled_models(digits_evaluation):
  model, params, evaluator, metrics = digits_evaluation
  assert evaluator({"params": params}, model) == metrics  # deterministic, cached images
  unpooled = tiny_model(num_classes=0, classifier="unpooled")
  unpooled_params = random_params(unpooled)
  with pytest.raises(UserError, match="pooled model"):
    evaluator({"params": unpooled_params}, unpooled)
  with pytest.raises(UserError, match="shots"):
    fewshot.FewShotEvaluator(dataset="digits", pp={"crop": 16}, shots=(0,))


@pytest.mark.slow
def test_cli(tmp_path):
  workdir, _ = make_workdir(tmp_path / "run")
  out = run_cli("vit_jax.tools.fewshot", f"--checkpoint={workdir}", "--shots=1,5", "--seeds=1",
                f"--output={tmp_path / 'f.json'}")
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout)
  assert result["dataset"] == "digits" and 0 <= result["fewshot_5shot_accuracy"] <= 1
  assert json.loads((tmp_path / "f.json").read_text()) == result
  assert "--dataset is required" in error_line(run_cli("vit_jax.tools.fewshot", f"--checkpoint={workdir}/model.npz"))
  assert "--shots=1,x must be integers" in error_line(run_cli("vit_jax.tools.fewshot", f"--checkpoint={workdir}",
                                                                "--shots=1,x"))
