"""FlexiViT's PI-resize of the patch embedding: the resize matrix against a hand-written bilinear interpolation, the
pseudo-inverse property (a resized patch gets the original token), and loading a checkpoint at another patch size."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint, models
from vit_jax.errors import UserError
from vit_jax.models import zoo


def hand_bilinear_matrix(old, new):
  """Half-pixel-centre linear interpolation, edges clamped, one axis: [new, old]."""
  matrix = np.zeros((new, old))
  for j in range(new):
    x = min(max((j + 0.5) * old / new - 0.5, 0.0), old - 1.0)
    lo = int(np.floor(x))
    hi = min(lo + 1, old - 1)
    matrix[j, lo] += 1.0 - (x - lo)
    matrix[j, hi] += x - lo
  return matrix


@pytest.mark.parametrize("old, new", [((2, 2), (4, 4)), ((3, 3), (5, 5)), ((2, 3), (4, 6))])
def test_resize_matrix_is_bilinear_upsampling_by_hand(old, new):
  rows, cols = hand_bilinear_matrix(old[0], new[0]), hand_bilinear_matrix(old[1], new[1])
  np.testing.assert_allclose(zoo.bilinear_resize_matrix(old, new), np.kron(rows, cols), atol=1e-6)


def test_pi_resize_keeps_every_token_when_upsampling():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(4, 4, 3, 8)).astype(np.float32)
  resized = zoo.pi_resize_patch_embedding(kernel, (8, 8))
  assert resized.shape == (8, 8, 3, 8) and resized.dtype == np.float32
  patches = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
  big = jax.image.resize(patches, (5, 8, 8, 3), "bilinear")
  tokens = np.einsum("nhwc,hwcd->nd", patches, kernel)
  np.testing.assert_allclose(np.einsum("nhwc,hwcd->nd", np.asarray(big), resized), tokens, rtol=1e-4, atol=1e-4)
  # The pseudo-inverse by hand: B^T w' = w, and w' has no part in the null space of B^T (it lies in B's range).
  b = np.kron(hand_bilinear_matrix(4, 8), hand_bilinear_matrix(4, 8))
  flat_new = resized.reshape(64, -1).astype(np.float64)
  np.testing.assert_allclose(b.T @ flat_new, kernel.reshape(16, -1), atol=1e-4)
  projector = b @ np.linalg.solve(b.T @ b, b.T)
  np.testing.assert_allclose(projector @ flat_new, flat_new, atol=1e-4)


def test_pi_resize_is_the_least_squares_fit_when_shrinking():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(8, 8, 3, 4))
  resized = zoo.pi_resize_patch_embedding(kernel, (4, 4))
  b = zoo.bilinear_resize_matrix((8, 8), (4, 4))  # [16, 64]
  residual = b.T @ resized.reshape(16, -1) - kernel.reshape(64, -1)
  np.testing.assert_allclose(b @ residual, 0.0, atol=1e-8)  # the normal equations


def test_a_checkpoint_loads_at_another_patch_size(tmp_path):
  """A patch-4 model at 16 px, loaded as patch 8 at 32 px (the same 4x4 grid): on each image with every patch
  upsampled 2x its features equal the original model's on the image."""
  small = dict(hidden_size=16, transformer={"num_layers": 1, "mlp_dim": 32, "num_heads": 2, "dropout_rate": 0.0})
  source = models.get_model("testing", num_classes=0, patches={"size": (4, 4)}, **small)
  images = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 16, 3), minval=-1, maxval=1)
  params = source.init(jax.random.PRNGKey(1), images)["params"]
  path = os.path.join(tmp_path, "patch4.npz")
  checkpoint.save(jax.device_get(params), path)
  config = models.get_model_config("testing", patches={"size": (8, 8)}, **small)
  target = models.get_model("testing", num_classes=0, patches={"size": (8, 8)}, **small)
  init = jax.eval_shape(lambda: target.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
  loaded = checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=config, image_size=32)
  assert loaded["embedding"]["kernel"].shape == (8, 8, 3, 16)
  # Each patch upsampled on its own (the property is per patch; resizing the whole image mixes neighbours).
  patches = images.reshape(3, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)
  big = jax.image.resize(patches, (3, 4, 4, 8, 8, 3), "bilinear").transpose(0, 1, 3, 2, 4, 5).reshape(3, 32, 32, 3)
  np.testing.assert_allclose(target.apply({"params": loaded}, big), source.apply({"params": params}, images),
                             rtol=1e-4, atol=1e-4)


def test_a_patch_size_that_does_not_divide_the_image_is_refused(tmp_path):
  small = dict(hidden_size=16, transformer={"num_layers": 1, "mlp_dim": 32, "num_heads": 2, "dropout_rate": 0.0})
  source = models.get_model("testing", num_classes=0, patches={"size": (4, 4)}, **small)
  path = os.path.join(tmp_path, "patch4.npz")
  checkpoint.save(jax.device_get(source.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))["params"]), path)
  config = models.get_model_config("testing", patches={"size": (6, 6)}, **small)
  target = models.get_model("testing", num_classes=0, patches={"size": (6, 6)}, **small)
  init = jax.eval_shape(lambda: target.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3))))["params"]
  with pytest.raises(UserError, match=r"patch size 6x6 \(resized from 4x4 of .*patch4.npz\) does not divide the "
                                      r"image size 32x32; use a patch size that divides it, e.g. 4"):
    checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=config, image_size=32)
