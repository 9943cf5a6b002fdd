"""Self-supervised objectives (masked patch prediction, MAE): corruption and masks against their definitions, the
targets and losses against numpy, FLOPs against XLA's count, and tiny runs through the loop (resume, export,
fine-tuning from the export, few-shot while pretraining, the errors)."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_flops import xla_forward_flops
from tests.test_train import read_metrics, tiny_config
from vit_jax import checkpoint, flops, models, objectives, train
from vit_jax.errors import UserError
from vit_jax.objectives import mae, masked_patch, masking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_VIT = {"hidden_size": 32, "patches": {"size": (4, 4)},
             "transformer": {"num_layers": 2, "mlp_dim": 64, "num_heads": 4, "dropout_rate": 0.0}}
TINY_DECODER = {"decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2}


def ssl_config(trainer, **overrides):
  config = tiny_config(trainer=trainer, label_smoothing=0.0, model=dict(SMALL_VIT))
  config.ssl.update(TINY_DECODER)
  config.update(overrides)
  return config


def numpy_patches(images, p):
  """[n, H, W, C] -> [n, (H/p)*(W/p), p, p, C], patches row by row."""
  n, h, w, c = images.shape
  return np.stack([images[:, i:i + p, j:j + p] for i in range(0, h, p) for j in range(0, w, p)], axis=1)


# --- masked patch prediction ------------------------------------------------------------------------------------


def test_corruption_rate_and_split_follow_the_paper():
  batch, patches = 512, 64
  corrupted, replace, swap, source = jax.device_get(masked_patch.draw_corruption(
      jax.random.PRNGKey(0), batch, patches, rate=0.5, split=(0.8, 0.1, 0.1)))
  assert (corrupted.sum(axis=1) == 32).all()  # exactly half of every image
  assert not (replace & swap).any() and not ((replace | swap) & ~corrupted).any()
  n = corrupted.sum()
  # 16,384 corrupted patches: the binomial standard error of each share is < 0.3 points.
  assert abs(replace.sum() / n - 0.8) < 0.01 and abs(swap.sum() / n - 0.1) < 0.01
  assert (source != np.arange(patches)[None]).all() and source.min() >= 0 and source.max() < patches
  # BERT's 15%: round(0.15 * 64) = 10 per image.
  corrupted, *_ = masked_patch.draw_corruption(jax.random.PRNGKey(1), 4, 64, rate=0.15, split=(0.8, 0.1, 0.1))
  assert (np.asarray(corrupted).sum(axis=1) == 10).all()


def test_corruption_puts_the_mask_embedding_and_another_patch_in_place():
  x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  replace = jnp.array([[True, False, False, False], [False, False, False, False]])
  swap = jnp.array([[False, True, False, False], [False, False, False, True]])
  source = jnp.array([[1, 3, 0, 0], [0, 0, 0, 2]])
  out = np.asarray(masked_patch.corrupt_patches(x, (replace, swap, source), jnp.full((3,), -1.0)))
  expected = np.asarray(x).copy()
  expected[0, 0] = -1.0
  expected[0, 1] = expected[0, 3]
  expected[1, 3] = np.asarray(x)[1, 2]
  np.testing.assert_array_equal(out, expected)


def hand_colour_classes(images, p, cells):
  """Class ids by hand: per (sub-)patch and channel the mean in [-1, 1] -> level floor((m + 1) / 2 * 8) in 0..7,
  class = r * 64 + g * 8 + b."""
  patches = numpy_patches(images, p)
  n, num, _, _, c = patches.shape
  sub = p // cells
  out = np.zeros((n, num, cells * cells), np.int64)
  for i in range(n):
    for k in range(num):
      for a in range(cells):
        for b in range(cells):
          mean = patches[i, k, a * sub:(a + 1) * sub, b * sub:(b + 1) * sub].reshape(-1, c).mean(axis=0)
          levels = [min(7, max(0, int(np.floor((m + 1) / 2 * 8)))) for m in mean]
          out[i, k, a * cells + b] = sum(level * 8 ** (c - 1 - ch) for ch, level in enumerate(levels))
  return out


@pytest.mark.parametrize("cells", [1, 4])
def test_colour_targets_by_hand(cells):
  rng = np.random.RandomState(0)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  images[0, :8, :8] = [1.0, -1.0, 0.3]  # one patch of a flat colour: levels 7, 0, 5
  got = np.asarray(masking.colour_classes(masking.patchify(jnp.asarray(images), (8, 8)), 3, cells))
  np.testing.assert_array_equal(got, hand_colour_classes(images, 8, cells))
  assert got[0, 0, 0] == 7 * 64 + 0 * 8 + 5
  grey = images[..., :1]  # one channel: 8 classes
  got = np.asarray(masking.colour_classes(masking.patchify(jnp.asarray(grey), (8, 8)), 1, cells))
  np.testing.assert_array_equal(got, hand_colour_classes(grey, 8, cells))
  assert got.max() < 8


@pytest.mark.parametrize("target", masked_patch.TARGETS)
def test_masked_patch_loss_counts_only_corrupted_patches(target):
  rng = np.random.RandomState(1)
  images = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  pixels = masking.patchify(jnp.asarray(images), (4, 4))
  outputs = {"pixels": 48, "colour": 512, "colour_4x4": 16 * 512}[target]
  out = jnp.asarray(rng.normal(size=(2, 4, outputs)).astype(np.float32))
  corrupted = jnp.array([[True, False, True, False], [False, False, False, True]])
  loss, _ = masked_patch.prediction_loss(out, pixels, corrupted, target=target, channels=3)
  changed = np.asarray(pixels).copy()
  changed[0, 1] = -changed[0, 1]  # an uncorrupted patch's target
  same, _ = masked_patch.prediction_loss(out, jnp.asarray(changed), corrupted, target=target, channels=3)
  assert float(same) == float(loss)
  changed[0, 0] = 1.0  # a corrupted one's
  other, _ = masked_patch.prediction_loss(out, jnp.asarray(changed), corrupted, target=target, channels=3)
  assert float(other) != float(loss)
  if target == "colour":  # the mean cross-entropy over the three corrupted patches, by hand
    classes = hand_colour_classes(images, 4, 1)[..., 0]
    logp = jax.nn.log_softmax(np.asarray(out), axis=-1)
    hand = -np.mean([logp[0, 0, classes[0, 0]], logp[0, 2, classes[0, 2]], logp[1, 3, classes[1, 3]]])
    np.testing.assert_allclose(float(loss), hand, rtol=1e-6)


# --- MAE --------------------------------------------------------------------------------------------------------


def test_mae_masks_exactly_the_ratio_and_the_unshuffle_restores_order():
  objective = objectives.MAE(mask_ratio=0.75)
  keep, restore, hidden = jax.device_get(objective.draw_mask(jax.random.PRNGKey(0), 64, 16))
  assert (hidden.sum(axis=1) == 12).all() and keep.shape == (64, 4)
  for row in range(64):
    assert set(keep[row]) == set(np.flatnonzero(~hidden[row]))  # the encoder sees exactly the visible patches
  assert len({tuple(k) for k in keep}) > 50  # drawn per image
  # The decoder's order: (visible in `keep` order, then the hidden), put back by `restore`.
  tokens = np.arange(16)[None].repeat(64, axis=0)
  hidden_ids = np.stack([np.flatnonzero(h)[np.argsort(restore[i][np.flatnonzero(h)])] for i, h in enumerate(hidden)])
  shuffled = np.concatenate([keep, hidden_ids], axis=1)
  np.testing.assert_array_equal(np.take_along_axis(shuffled, restore, axis=1), tokens)


def test_mae_reconstruction_loss_against_numpy_and_only_on_hidden_patches():
  rng = np.random.RandomState(2)
  predicted = rng.normal(size=(2, 4, 12)).astype(np.float32)
  pixels = rng.uniform(-1, 1, (2, 4, 12)).astype(np.float32)
  hidden = np.array([[True, True, False, True], [False, True, True, True]])
  loss = float(mae.reconstruction_loss(predicted, pixels, hidden))
  mean = pixels.mean(-1, keepdims=True)
  var = pixels.var(-1, ddof=1, keepdims=True)  # MAE: torch's unbiased .var()
  target = (pixels - mean) / np.sqrt(var + 1e-6)
  per_patch = ((predicted - target) ** 2).mean(-1)
  np.testing.assert_allclose(loss, per_patch[hidden].mean(), rtol=1e-5)
  changed = pixels.copy()
  changed[0, 2] += 0.5  # a visible patch
  assert float(mae.reconstruction_loss(predicted, changed, hidden)) == loss
  raw = float(mae.reconstruction_loss(predicted, pixels, hidden, norm_pix_loss=False))
  np.testing.assert_allclose(raw, ((predicted - pixels) ** 2).mean(-1)[hidden].mean(), rtol=1e-5)


def test_sincos_posemb_as_mae_defines_it():
  width, rows, cols = 8, 2, 3
  got = masking.sincos_posemb(rows, cols, width)
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  for r in range(rows):
    for c in range(cols):
      expected = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
      np.testing.assert_allclose(got[r * cols + c], expected, rtol=1e-6, atol=1e-7)


def test_mae_encoder_sees_only_the_visible_patches():
  """The encoder's output tokens for a batch masked by `keep` equal a model run on those tokens alone: the hidden
  patches' pixels do not reach it."""
  config = models.get_model_config("testing", **SMALL_VIT)
  objective = objectives.MAE(**TINY_DECODER)
  model = objective.wrap(models.build(config, num_classes=0))
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.PRNGKey(1), images)
  keep, restore, hidden = objective.draw_mask(jax.random.PRNGKey(2), 2, 16)
  out = model.apply(variables, images, keep=keep, restore=restore)
  # Change only hidden patches' pixels: the prediction (which depends on the encoder output) must not move.
  patches = np.asarray(masking.patchify(images, (4, 4)))
  noisy = np.where(np.asarray(hidden)[..., None], patches + 1.0, patches).reshape(2, 4, 4, 4, 4, 3)
  noisy = jnp.asarray(noisy.transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 16, 3))
  np.testing.assert_allclose(np.asarray(masking.patchify(noisy, (4, 4)))[np.asarray(~hidden)],
                             patches[np.asarray(~hidden)])  # the un-patchify above is right
  np.testing.assert_array_equal(model.apply(variables, noisy, keep=keep, restore=restore), out)
  assert not np.array_equal(model.apply(variables, noisy), model.apply(variables, images))


def test_mae_flops_fall_with_the_mask_ratio_and_match_xla():
  config = models.get_model_config("testing", **SMALL_VIT)
  objective = objectives.MAE(mask_ratio=0.75, **TINY_DECODER)
  model = objective.wrap(models.build(config, num_classes=0))
  images = jnp.zeros((1, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  keep, restore, _ = objective.draw_mask(jax.random.PRNGKey(0), 1, 64)
  compiled = jax.jit(lambda v, x: model.apply(v, x, keep=keep, restore=restore)).lower(variables, images).compile()
  cost = compiled.cost_analysis()
  xla_masked = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  ours_masked = objective.train_flops_per_image(config, 32, 0) / 3
  ours_full = flops.mae_forward_flops(config, 32, visible=64, **{k: v for k, v in TINY_DECODER.items()
                                                                  if k != "decoder_heads"})
  # XLA also counts softmax, GELU and the norms, which the analytic count leaves out.
  assert 0.8 * xla_masked <= ours_masked <= xla_masked
  xla_full = xla_forward_flops(model, 32)  # every patch visible
  assert 0.8 * xla_full <= ours_full <= xla_full
  assert ours_masked < 0.6 * ours_full  # the encoder sees a quarter of the patches


# --- through the loop -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["mae", "masked_patch"])
def test_ssl_run_resumes_exactly_exports_the_encoder_and_fine_tunes(trainer, tmp_path):
  config = ssl_config(trainer, fewshot={"every": 3, "shots": (2,), "seeds": 1, "train_split": "train[:100]",
                                        "test_split": "test[:40]"})
  workdir = str(tmp_path / "ssl")
  train.train_and_evaluate(config, workdir)
  records = read_metrics(workdir)
  losses = [r["train_loss"] for r in records if "train_loss" in r]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert [r["step"] for r in records if "fewshot_2shot_accuracy" in r] == [3, 6]
  assert ("masked_accuracy" in records[-1]) == (trainer == "masked_patch")
  assert not any("test_accuracy" in r for r in records)  # nothing to classify with
  exported = checkpoint.load(os.path.join(workdir, "model.npz"))
  assert "Transformer" in exported and "embedding" in exported and "head" not in exported
  assert not {"mask_embedding", "prediction_head", "mask_token", "decoder_embed"} & set(exported)
  # Killed after step 3 (its checkpoint kept, the rest gone) and restarted: the same masks, losses and weights.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
  os.remove(os.path.join(resumed, "model.npz"))
  train.train_and_evaluate(config, resumed)
  assert [r["train_loss"] for r in read_metrics(resumed) if "train_loss" in r] == losses
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load(os.path.join(resumed, "model.npz")), exported)
  if trainer != "mae":  # the export is the same encoder layout for both objectives: fine-tune once
    return
  # A supervised run fine-tunes from the export (a new head; position embeddings resampled for 24 px).
  tuned = str(tmp_path / "tuned")
  result = train.train_and_evaluate(tiny_config(model=dict(SMALL_VIT), pretrained_path=os.path.join(
      workdir, "model.npz"), total_steps=2, eval_every=0, checkpoint_every=0, pp={"crop": 24}), tuned)
  assert 0 <= result["test_accuracy"] <= 1
  tuned_params = checkpoint.load(os.path.join(tuned, "model.npz"))
  assert tuned_params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 32)
  assert exported["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 17, 32)


@pytest.mark.parametrize("overrides, expected", [
    (dict(trainer="mae", ssl={"mask_ratio": 1.0}), "ssl.mask_ratio=1.0 must be in (0, 1)"),
    (dict(trainer="mae", ssl={"mask_ratio": 0.0}), "ssl.mask_ratio=0.0 must be in (0, 1)"),
    (dict(trainer="masked_patch", ssl={"corruption_split": (0.8, 0.1, 0.2)}),
     "ssl.corruption_split=(0.8, 0.1, 0.2) must be three fractions >= 0 (mask embedding, another patch, "
     "unchanged) that sum to 1"),
    (dict(trainer="masked_patch", ssl={"corruption_rate": 1.0}), "ssl.corruption_rate=1.0 must be in (0, 1)"),
    (dict(trainer="masked_patch", ssl={"target": "colour_4x4"}, model={"patches": {"size": (2, 2)}}),
     "not a multiple of 4"),
    (dict(trainer="mae", model_name="CNN-CIFAR", model={}), "masks patch tokens, which CNN-CIFAR (a plain CNN) does "
     "not have"),
    (dict(trainer="mae", model_name="R50+ViT-B_16", model={}), "cannot mask the tokens of the hybrid R50+ViT-B_16"),
    (dict(trainer="mae", pp={"mixup": 0.2}), "config.pp.mixup=0.2 mixes labels, which the MAE objective"),
    (dict(trainer="masked_patch", pp={"crop": 18}), "image size 18x18 is not divisible by the patch size 4x4"),
    (dict(trainer="mae", layer_decay=0.75), "layer_decay=0.75 is a fine-tuning rule, which the mae objective"),
])
def test_ssl_user_errors_name_the_value_and_write_nothing(overrides, expected, tmp_path):
  config = ssl_config(overrides.pop("trainer"))
  for key, value in overrides.items():
    if isinstance(value, dict) and key != "model":
      config[key].update(value)
    else:
      config[key] = value
  with pytest.raises(UserError) as raised:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert expected in str(raised.value)
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_an_ssl_error_exits_2_with_one_line():
  command = [sys.executable, "-m", "vit_jax.main", "--config=configs/ssl_digits.py:mae", "--workdir=unused",
             "--config.ssl.mask_ratio=1.5"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
      "error: ssl.mask_ratio=1.5 must be in (0, 1), e.g. 0.75 (MAE's)"]
  assert not os.path.exists(os.path.join(ROOT, "unused"))


def test_flops_of_masked_patch_add_the_prediction_head():
  config = models.get_model_config("testing", **SMALL_VIT)
  objective = objectives.MaskedPatch()
  head = 2 * 16 * 32 * 512
  assert objective.train_flops_per_image(config, 16, 0) == 3 * (flops.forward_flops_per_image(config, 16, 0) + head)


@pytest.mark.slow
def test_ssl_run_starts_from_a_supervised_file(tmp_path):
  """`pretrained_path` into an SSL run: the encoder takes the file's weights (its head is dropped; frozen here by
  lr_mults, so they come out unchanged), the objective's own parts keep their initialisation."""
  model = models.get_model("testing", num_classes=10, **SMALL_VIT)
  params = jax.device_get(model.init(jax.random.PRNGKey(3), jnp.zeros((1, 16, 16, 3)))["params"])
  path = str(tmp_path / "supervised.npz")
  checkpoint.save(params, path)
  config = ssl_config("mae", pretrained_path=path, lr_mults=(("encoder/.*", 0.0),), total_steps=2,
                      eval_every=0, checkpoint_every=0)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  exported = checkpoint.load(str(tmp_path / "run" / "model.npz"))
  assert "head" not in exported
  jax.tree.map(np.testing.assert_array_equal, exported, {k: v for k, v in params.items() if k != "head"})
