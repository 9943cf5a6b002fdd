"""Zoo checkpoints: load/save, old and Linen-era names, load_pretrained, posemb interpolation, the inspect CLI."""
import importlib.util
import logging as std_logging
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vit_jax import checkpoint, models
from vit_jax.errors import UserError


def flat(params):
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def init(model, size):
  return jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, *size, 3)))["params"])


def tiny_testing_model(num_classes=10, **overrides):
  return models.get_model("testing", num_classes=num_classes, **overrides)


def noisy(params, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: rng.normal(size=v.shape).astype(v.dtype), params)


def write_npz(path, flat_arrays):
  np.savez(path, **flat_arrays)
  return str(path)


@pytest.mark.slow
def test_save_load_round_trip_is_bit_exact(tmp_path):
  params = noisy(init(models.get_model("R+ViT-Ti_16", num_classes=3, hidden_size=32,
                                       transformer=dict(num_layers=2, mlp_dim=16, num_heads=2)), (64, 64)))
  path = checkpoint.save(params, tmp_path / "sub" / "model.npz")
  loaded = checkpoint.load(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for key, value in flat(params).items():
    got = flat(loaded)[key]
    assert got.dtype == value.dtype and got.shape == value.shape
    np.testing.assert_array_equal(got, value)
  # The file holds the zoo's '/'-joined keys.
  assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in np.load(path).files
  assert not os.path.exists(str(path) + ".tmp")
  checkpoint.save(jax.tree.map(lambda v: v + 1, params), path)  # an existing file is replaced
  np.testing.assert_array_equal(checkpoint.load(path)["cls"], params["cls"] + 1)


def test_load_renames_linen_era_names_and_squeezes_groupnorm(tmp_path):
  zoo = flat(noisy(init(models.get_model("R+ViT-Ti_16", num_classes=3, hidden_size=32,
                                         transformer=dict(num_layers=2, mlp_dim=16, num_heads=2)), (64, 64))))
  linen = {}
  renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
             "MlpBlock_3": "MlpBlock_0"}
  for key, value in zoo.items():
    for old, new in renames.items():
      key = key.replace(f"/{old}/", f"/{new}/")
    if key.startswith("gn_root/"):
      value = value.reshape(1, 1, 1, -1)
    linen[key] = value
  assert "Transformer/encoderblock_0/LayerNorm_1/scale" in linen
  loaded = flat(checkpoint.load(write_npz(tmp_path / "linen.npz", linen)))
  assert loaded.keys() == zoo.keys()
  for key, value in zoo.items():
    np.testing.assert_array_equal(loaded[key], value)


@pytest.mark.parametrize("source,target", [((14, 14), (24, 24)), ((24, 24), (14, 14)), ((7, 7), (12, 16)),
                                           ((3, 5), (7, 2)), ((14, 14), (1, 1))])
def test_interpolate_posembed_matches_scipy_zoom(source, target):
  rng = np.random.default_rng(0)
  grid = rng.normal(size=(*source, 6)).astype(np.float32)
  cls = rng.normal(size=(1, 1, 6)).astype(np.float32)
  posemb = np.concatenate([cls, grid.reshape(1, -1, 6)], axis=1)
  zoom = (target[0] / source[0], target[1] / source[1], 1)
  expected = scipy.ndimage.zoom(grid, zoom, order=1)
  assert expected.shape[:2] == target
  out = checkpoint.interpolate_posembed(posemb, target[0] * target[1] + 1, True, grid_shape=target,
                                        source_grid_shape=source)
  np.testing.assert_array_equal(out[:, :1], cls)
  np.testing.assert_allclose(out[0, 1:].reshape(*target, 6), expected, rtol=1e-6, atol=1e-6)


def test_interpolate_posembed_square_default_and_bicubic():
  posemb = np.random.default_rng(0).normal(size=(1, 16, 4)).astype(np.float32)  # 4x4 grid, no class token
  out = checkpoint.interpolate_posembed(posemb, 64, has_class_token=False)
  np.testing.assert_allclose(out.reshape(8, 8, 4), scipy.ndimage.zoom(posemb.reshape(4, 4, 4), (2, 2, 1), order=1),
                             rtol=1e-6, atol=1e-6)
  same = checkpoint.interpolate_posembed(posemb, 16, False, method="bicubic")
  np.testing.assert_allclose(same, posemb, atol=1e-6)
  bicubic = checkpoint.interpolate_posembed(posemb, 64, False, method="bicubic")
  assert bicubic.shape == (1, 64, 4) and not np.allclose(bicubic, out)
  with pytest.raises(UserError, match="not a square grid"):
    checkpoint.interpolate_posembed(posemb, 1 + 24, True)
  with pytest.raises(UserError, match="unknown position-embedding resize method 'nearest'"):
    checkpoint.interpolate_posembed(posemb, 64, False, method="nearest")


def test_load_pretrained_224_to_384_keeps_new_head_and_resizes_posemb(tmp_path, caplog):
  pretrained = noisy(init(tiny_testing_model(num_classes=21843, representation_size=10), (224, 224)))
  path = checkpoint.save(pretrained, tmp_path / "pre.npz")
  model_config = models.get_model_config("testing")
  new_init = init(tiny_testing_model(num_classes=10), (384, 384))
  with caplog.at_level(std_logging.INFO):
    params = checkpoint.load_pretrained(pretrained_path=path, init_params=new_init, model_config=model_config)
  assert jax.tree.structure(params) == jax.tree.structure(new_init)
  got, old, new = flat(params), flat(pretrained), flat(new_init)
  np.testing.assert_array_equal(got["head/kernel"], new["head/kernel"])
  key = "Transformer/posembed_input/pos_embedding"
  assert got[key].shape == (1, 577, 10)
  np.testing.assert_array_equal(got[key][:, 0], old[key][:, 0])
  np.testing.assert_allclose(got[key][0, 1:].reshape(24, 24, 10),
                             scipy.ndimage.zoom(old[key][0, 1:].reshape(14, 14, 10), (24 / 14, 24 / 14, 1), order=1),
                             rtol=1e-6, atol=1e-6)
  for k in new:
    if not k.startswith(("head/", "Transformer/posembed_input")):
      np.testing.assert_array_equal(got[k], old[k])
  messages = "\n".join(r.getMessage() for r in caplog.records)
  assert "dropped pre_logits/kernel" in messages and "resized Transformer/posembed_input" in messages
  assert "head/kernel (10, 10) from the new model" in messages


def test_load_pretrained_to_a_non_square_grid(tmp_path):
  path = checkpoint.save(noisy(init(tiny_testing_model(), (224, 224))), tmp_path / "pre.npz")
  new_init = init(tiny_testing_model(num_classes=3), (384, 512))
  params = checkpoint.load_pretrained(pretrained_path=path, init_params=new_init,
                                      model_config=models.get_model_config("testing"), image_size=(384, 512))
  posemb = flat(params)["Transformer/posembed_input/pos_embedding"]
  assert posemb.shape == (1, 1 + 24 * 32, 10)
  with pytest.raises(UserError, match="not a square grid"):
    checkpoint.load_pretrained(pretrained_path=path, init_params=new_init,
                               model_config=models.get_model_config("testing"))


def test_load_pretrained_keeps_a_representation_layer_the_model_has(tmp_path):
  pretrained = noisy(init(tiny_testing_model(representation_size=10), (32, 32)))
  path = checkpoint.save(pretrained, tmp_path / "pre.npz")
  config = models.get_model_config("testing")
  config.representation_size = 10
  params = checkpoint.load_pretrained(pretrained_path=path, init_params=init(tiny_testing_model(representation_size=10),
                                                                             (32, 32)), model_config=config)
  np.testing.assert_array_equal(params["pre_logits"]["kernel"], pretrained["pre_logits"]["kernel"])


def test_load_pretrained_errors_name_the_key_and_shapes(tmp_path):
  good = flat(noisy(init(tiny_testing_model(), (32, 32))))
  config = models.get_model_config("testing")
  target = init(tiny_testing_model(), (32, 32))
  missing = dict(good)
  del missing["Transformer/encoder_norm/scale"]
  with pytest.raises(UserError, match=r"has no parameter Transformer/encoder_norm/scale \(10,\)"):
    checkpoint.load_pretrained(pretrained_path=write_npz(tmp_path / "m.npz", missing), init_params=target,
                               model_config=config)
  wrong = dict(good, **{"Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": np.zeros((10, 20), np.float32)})
  with pytest.raises(UserError, match=r"MlpBlock_3/Dense_0/kernel has shape \(10, 20\) in .* but \(10, 10\)"):
    checkpoint.load_pretrained(pretrained_path=write_npz(tmp_path / "w.npz", wrong), init_params=target,
                               model_config=config)
  extra = dict(good, **{"Transformer/encoderblock_1/LayerNorm_0/scale": np.zeros(10, np.float32)})
  with pytest.raises(UserError, match=r"1 parameter\(s\) .* does not: Transformer/encoderblock_1/LayerNorm_0"):
    checkpoint.load_pretrained(pretrained_path=write_npz(tmp_path / "e.npz", extra), init_params=target,
                               model_config=config)


def test_load_pretrained_refuses_non_finite_values_naming_the_tensor(tmp_path):
  good = flat(noisy(init(tiny_testing_model(), (32, 32))))
  broken = dict(good)
  kernel = broken["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].copy()
  kernel[0, :3] = [np.nan, np.inf, -np.inf]
  broken["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = kernel
  path = write_npz(tmp_path / "nan.npz", broken)
  with pytest.raises(UserError, match=r"pretrained checkpoint .*nan.npz has 3 non-finite value\(s\) \(NaN or "
                                      r"infinity\) in Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel \(10, 10\); "
                                      r"the file is corrupt"):
    checkpoint.load_pretrained(pretrained_path=path, init_params=init(tiny_testing_model(), (32, 32)),
                               model_config=models.get_model_config("testing"))
  # `load` reads any file (inspect shows what is wrong with it); the values come back as they are.
  assert np.isnan(flat(checkpoint.load(path))["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"][0, 0])


def test_bad_checkpoint_files(tmp_path):
  with pytest.raises(UserError, match=r"does not exist; download a zoo file"):
    checkpoint.load(tmp_path / "missing.npz")
  (tmp_path / "weights.pt").write_bytes(b"x")
  with pytest.raises(UserError, match=r"weights.pt is a PyTorch pickle, which vit_jax never loads"):
    checkpoint.load(tmp_path / "weights.pt")
  (tmp_path / "weights.h5").write_bytes(b"x")
  with pytest.raises(UserError, match=r"is not an .npz, a .safetensors or a transformers/timm directory"):
    checkpoint.load(tmp_path / "weights.h5")
  good = write_npz(tmp_path / "good.npz", {"a/b": np.arange(1000, dtype=np.float32)})
  data = open(good, "rb").read()
  (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(UserError, match=r"truncated or corrupt"):
    checkpoint.load(tmp_path / "truncated.npz")
  if importlib.util.find_spec("gcsfs") is None:  # with gcsfs installed this would try the network
    with pytest.raises(UserError, match=r"cannot read gs://bucket/x.npz: .*gcsfs"):
      checkpoint.load("gs://bucket/x.npz")
  (tmp_path / "garbage.npz").write_bytes(os.urandom(4096))
  with pytest.raises(ValueError, match=r"truncated or corrupt"):
    checkpoint.load(tmp_path / "garbage.npz")


def run_inspect(*args):
  return subprocess.run([sys.executable, "-m", "vit_jax.tools.inspect", *args], capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


@pytest.mark.slow
def test_inspect_cli(tmp_path):
  params = init(models.get_model("testing", num_classes=37), (64, 48))
  path = checkpoint.save(params, tmp_path / "testing.npz")
  result = run_inspect(str(path))
  assert result.returncode == 0, result.stderr
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in result.stdout
  assert f"parameters: {sum(v.size for v in flat(params).values()):,}" in result.stdout
  assert "model: testing" in result.stdout and "classes: 37" in result.stdout
  odd = flat(params)
  odd["Transformer/encoder_norm/scale"] = np.zeros(11, np.float32)
  result = run_inspect(write_npz(tmp_path / "odd.npz", odd))
  assert result.returncode == 0, result.stderr
  assert "no registry model matches; closest is testing" in result.stdout
  assert "encoder_norm/scale: file (11,), testing (10,)" in result.stdout
  odd["embedding/kernel"] = np.zeros((16, 16, 3, 12), np.float32)
  result = run_inspect(write_npz(tmp_path / "wider.npz", odd))
  assert "no registry model has hidden size 12 and 1 encoder blocks" in result.stdout
  result = run_inspect(str(tmp_path / "nope.npz"))
  assert result.returncode == 2
  assert result.stderr.startswith("error: checkpoint") and len(result.stderr.strip().splitlines()) == 1
  # A file with NaN is shown, with its broken tensors named.
  broken = flat(params)
  broken["cls"] = np.full_like(broken["cls"], np.nan)
  result = run_inspect(write_npz(tmp_path / "nan.npz", broken))
  assert result.returncode == 0, result.stderr
  assert "non-finite values (NaN or infinity) in 1 tensor(s): cls (10)" in result.stdout


@pytest.mark.slow
def test_inspect_cli_takes_a_workdir_positional_or_as_checkpoint(tmp_path):
  params = init(models.get_model("testing", num_classes=5), (32, 32))
  checkpoint.save(params, tmp_path / "run" / "model.npz")
  (tmp_path / "run" / "config.json").write_text('{"model_name": "testing", "dataset": "digits"}')
  for args in ([str(tmp_path / "run")], [f"--checkpoint={tmp_path / 'run'}"]):
    result = run_inspect(*args)
    assert result.returncode == 0, result.stderr
    assert "model: testing" in result.stdout and "run's model: testing (config.json)" in result.stdout
    assert f"file: {tmp_path / 'run' / 'model.npz'}" in result.stdout
    assert "weights: raw (config.json" in result.stdout  # a run without ema_decay: older runs too
  (tmp_path / "run" / "config.json").write_text('{"model_name": "testing", "dataset": "digits", "ema_decay": 0.9}')
  assert "weights: ema (config.json" in run_inspect(str(tmp_path / "run")).stdout
  for args in ([], [str(tmp_path / "run"), f"--checkpoint={tmp_path / 'run'}"]):
    result = run_inspect(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: give one checkpoint")
  (tmp_path / "unfinished").mkdir()
  (tmp_path / "unfinished" / "config.json").write_text('{"model_name": "testing"}')
  result = run_inspect(f"--checkpoint={tmp_path / 'unfinished'}")
  assert result.returncode == 2 and "has no model.npz yet" in result.stderr


@pytest.mark.slow
def test_scanned_models_save_and_load_the_zoo_layout(tmp_path):
  overrides = dict(hidden_size=16, transformer=dict(num_layers=3, mlp_dim=8, num_heads=2))
  zoo_params = noisy(init(tiny_testing_model(**overrides), (32, 32)))
  path = checkpoint.save(zoo_params, tmp_path / "zoo.npz")
  scanned_model = tiny_testing_model(num_classes=4, scan_layers=True, **overrides)
  scanned_init = init(scanned_model, (48, 48))
  params = checkpoint.load_pretrained(pretrained_path=path, init_params=scanned_init,
                                      model_config=models.get_model_config("testing"))
  assert jax.tree.structure(params) == jax.tree.structure(scanned_init)
  stacked = params["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"]
  for layer in range(3):
    np.testing.assert_array_equal(
        stacked[layer], zoo_params["Transformer"][f"encoderblock_{layer}"]["MlpBlock_3"]["Dense_0"]["kernel"])
  # Saved back in the zoo's per-layer layout, and equal to what an unrolled model computes.
  params["head"] = noisy(params["head"])  # the new head is zero: logits would agree whatever the encoder did
  checkpoint.save(params, tmp_path / "back.npz")
  unrolled = checkpoint.load(tmp_path / "back.npz")
  assert "encoderblock_2" in unrolled["Transformer"] and "encoderblock" not in unrolled["Transformer"]
  images = np.random.default_rng(0).uniform(-1, 1, size=(2, 48, 48, 3)).astype(np.float32)
  np.testing.assert_allclose(scanned_model.apply({"params": params}, images),
                             tiny_testing_model(num_classes=4, **overrides).apply({"params": unrolled}, images),
                             rtol=1e-5, atol=1e-6)
