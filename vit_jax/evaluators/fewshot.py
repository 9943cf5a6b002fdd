"""Few-shot linear evaluation (ViT paper, Sec. 4.1): a closed-form ridge regression on frozen pre-logit features.

For k shots per class, k training images of every class are drawn (per seed); the frozen model's pre-logit
features of those images are centred (by the support mean) and scaled to unit mean squared norm, and a
regularised least-squares map W = argmin |X W - Y|^2 + l2_reg |W|^2 to targets Y in {-1, +1}^classes is solved in
closed form; test images are classified by argmax of (x - mean) W. No bias is needed: with the same number of
shots in every class its optimum is the same constant for every class, which does not change the argmax.
Accuracy is averaged over seeds; the draws are nested (the 5 shots of a seed contain its 1 shot).

Build the evaluator once (it caches the preprocessed images) and call it with the current parameters; the
training loop does so every `config.fewshot.every` steps, `python -m vit_jax.tools.fewshot` once:

  evaluator = FewShotEvaluator(dataset="digits", pp={"crop": 16}, shots=(1, 5))
  metrics = evaluator(state.variables(), model)          # {'fewshot_5shot_accuracy': ..., ...}
"""
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import data
from vit_jax.data import preprocess
from vit_jax.errors import UserError


DEFAULT_L2_REG = 0.1
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3


# --- the linear probe --------------------------------------------------------------------------------------------


def ridge_weights(x, targets, l2_reg):
  """argmin_W |x W - targets|^2 + l2_reg |W|^2, solved in whichever of the primal/dual is smaller."""
  x, targets = np.asarray(x, np.float64), np.asarray(targets, np.float64)
  n, d = x.shape
  if n >= d:
    return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)
  # Dual form (fewer examples than features): W = x^T (x x^T + l2_reg I)^-1 targets.
  return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)


def linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes, l2_reg=DEFAULT_L2_REG):
  """Test accuracy of the ridge regression to {-1, +1} targets fitted on (train_x, train_y)."""
  train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
  mean = train_x.mean(axis=0, keepdims=True)
  train_x, test_x = train_x - mean, test_x - mean
  # Scale-free regularisation: l2_reg means the same for features of any width or magnitude.
  scale = np.sqrt(np.mean(np.sum(train_x**2, axis=1))) or 1.0
  train_x, test_x = train_x / scale, test_x / scale
  targets = 2.0 * np.eye(num_classes)[np.asarray(train_y)] - 1.0
  weights = ridge_weights(train_x, targets, l2_reg)
  return float(np.mean(np.argmax(test_x @ weights, axis=1) == np.asarray(test_y)))


def draw_shots(labels, num_classes, max_shots, seed):
  """[num_classes, max_shots] indices into `labels`: a random ordering of each class, cut to `max_shots`."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  draws = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < max_shots:
      raise UserError(f"class {c} has {len(members)} training examples, fewer than {max_shots} shots; "
                      "lower the shots or use a larger train split")
    draws.append(rng.permutation(members)[:max_shots])
  return np.stack(draws)


# --- features ----------------------------------------------------------------------------------------------------


def _without_head(tree):
  """The variables without the classifier (`head`, or BiT's `resnet/head`): the features model has none."""
  if not isinstance(tree, dict):
    return tree
  return {k: _without_head(v) for k, v in tree.items() if k != "head"}


def features_fn(model, batch):
  """(variables, images) -> pre-logit features, in fixed-size batches (one compilation); `variables` as
  `model.apply` takes them."""
  features_model = model.clone(num_classes=0)
  apply = jax.jit(lambda v, x: features_model.apply(v, x, train=False))

  def compute(variables, images):
    variables = _without_head(variables)
    out = []
    for start in range(0, len(images), batch):
      chunk = images[start:start + batch]
      padded = np.zeros((batch, *chunk.shape[1:]), np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(apply(variables, jnp.asarray(padded)))[:len(chunk)])
    features = np.concatenate(out)
    if features.ndim != 2:
      raise UserError(f"model gives features of shape {features.shape[1:]} per image, not a vector; few-shot "
                      "evaluation needs a pooled model (classifier token or gap)")
    return features
  return compute


def _load_images(source, indices, pp):
  images = []
  run = preprocess.EvalPreprocess(pp)
  for i in indices:
    example = run(source[int(i)])
    if example["_skipped"]:
      raise UserError(f"cannot decode few-shot image {example['_skipped']}; remove it from the dataset")
    images.append(example["image"])
  return np.stack(images)


class FewShotEvaluator:
  """Holds the preprocessed support (all seeds) and test images; `__call__(variables, model)` -> metrics (`variables` as `model.apply` takes them)."""

  def __init__(self, *, dataset, pp, train_split="train", test_split="test", shots=DEFAULT_SHOTS,
               seeds=DEFAULT_SEEDS, l2_reg=DEFAULT_L2_REG, batch=256, tfds_data_dir=None):
    """`pp`: the test preprocessing ({'crop', 'resize'}) of the support and test images."""
    self.shots = sorted({int(k) for k in shots})
    if not self.shots or self.shots[0] < 1:
      raise UserError(f"fewshot.shots={tuple(shots)} must be positive integers")
    if seeds < 1:
      raise UserError(f"fewshot.seeds={seeds} must be at least 1")
    if not l2_reg > 0 or batch < 1:
      raise UserError(f"fewshot.l2_reg={l2_reg} must be positive and fewshot.batch={batch} at least 1")
    self.seeds, self.l2_reg, self.batch = int(seeds), float(l2_reg), int(batch)
    self.dataset = dataset
    pp = {"crop": pp["crop"], "resize": pp.get("resize")}
    train = data.open_source(dataset, train_split, tfds_data_dir=tfds_data_dir)
    test = data.open_source(dataset, test_split, tfds_data_dir=tfds_data_dir)
    self.num_classes = len(train.class_names)
    labels = np.array([train[i]["label"] for i in range(len(train))])
    # draws[s] is [classes, max_shots]; every draw's images are loaded once, in one array.
    self.draws = [draw_shots(labels, self.num_classes, self.shots[-1], seed) for seed in range(self.seeds)]
    self.support_indices = np.unique(np.concatenate([d.ravel() for d in self.draws]))
    self.support_images = _load_images(train, self.support_indices, pp)
    self.test_images = _load_images(test, range(len(test)), pp)
    self.test_labels = np.array([test[i]["label"] for i in range(len(test))])
    self._model, self._features = None, None  # the last model and its compiled feature function
    logging.info("Few-shot on %s: %d support and %d test images, shots %s, %d seeds.", self.dataset,
                 len(self.support_indices), len(self.test_labels), self.shots, self.seeds)

  def __call__(self, variables, model):
    if model is not self._model:
      self._model, self._features = model, features_fn(model, self.batch)
    compute = self._features
    support = compute(variables, self.support_images)
    test = compute(variables, self.test_images)
    row = {index: position for position, index in enumerate(self.support_indices)}
    metrics = {}
    for k in self.shots:
      accuracies = []
      for draw in self.draws:
        chosen = draw[:, :k]
        x = support[[row[i] for i in chosen.ravel()]]
        y = np.repeat(np.arange(self.num_classes), k)
        accuracies.append(linear_probe_accuracy(x, y, test, self.test_labels, self.num_classes, self.l2_reg))
      metrics[f"fewshot_{k}shot_accuracy"] = float(np.mean(accuracies))
      metrics[f"fewshot_{k}shot_accuracy_std"] = float(np.std(accuracies))
    return metrics
