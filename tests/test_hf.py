"""Hugging Face transformers' ViT layout: the key mapping by hand, round trips bit-exact, the GELU and eps options,
and (where the peer venv has transformers) logits equal to transformers' own on files it wrote itself, and
transformers loading our export."""
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.errors import UserError
from vit_jax.models import hf, zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PYTHON = os.path.join(REPO, ".peer", "bin", "python")
TINY = {"hidden_size": 32, "patches": {"size": (4, 4)},
        "transformer": {"num_layers": 2, "mlp_dim": 64, "num_heads": 4, "dropout_rate": 0.0}}


def _random_flat(num_classes=5, **fields):
  model = models.get_model("testing", num_classes=num_classes, **{**TINY, **fields})
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  rng = np.random.default_rng(0)  # every tensor random (the head and biases start at zero)
  return model, {k: rng.normal(size=np.shape(v)).astype(np.float32) * 0.2
                 for k, v in zoo.flatten(jax.device_get(params)).items()}


def test_key_mapping_by_hand():
  _, flat = _random_flat()
  state = hf.zoo_to_hf(flat)
  q = flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"]  # (32, 4, 8)
  np.testing.assert_array_equal(state["vit.encoder.layer.1.attention.attention.query.weight"], q.reshape(32, 32).T)
  out = flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"]  # (4, 8, 32)
  np.testing.assert_array_equal(state["vit.encoder.layer.0.attention.output.dense.weight"], out.reshape(32, 32).T)
  np.testing.assert_array_equal(state["vit.embeddings.patch_embeddings.projection.weight"],
                                flat["embedding/kernel"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(state["vit.encoder.layer.0.intermediate.dense.weight"],
                                flat["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].T)
  np.testing.assert_array_equal(state["classifier.weight"], flat["head/kernel"].T)
  assert state["vit.layernorm.weight"] is not None and len(state) == len(flat)


def test_round_trips_are_bit_exact(tmp_path):
  model, flat = _random_flat(representation_size=24)
  back = hf.hf_to_zoo(hf.zoo_to_hf(flat), num_heads=4)
  assert set(back) == set(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  config = models.get_model_config("testing", **TINY)
  hf.write({k: v for k, v in flat.items() if not k.startswith("pre_logits")}, config, str(tmp_path / "hf"),
           num_labels=5, image_size=16)
  read_flat, fields, image_size = hf.read(str(tmp_path / "hf"))
  assert image_size == 16 and fields["gelu_approximate"] and fields["layer_norm_eps"] == 1e-6
  assert fields["transformer"]["num_heads"] == 4 and fields["patches"] == {"size": (4, 4)}
  for key, value in read_flat.items():
    np.testing.assert_array_equal(value, flat[key], err_msg=key)


def test_gelu_and_eps_options_change_the_numerics_as_named():
  _, flat = _random_flat()
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
  outputs = {}
  for approximate in (True, False):
    model = models.get_model("testing", num_classes=5, gelu_approximate=approximate, layer_norm_eps=1e-12, **TINY)
    variables = {"params": _nest(flat)}
    outputs[approximate] = np.asarray(model.apply(variables, images))
  assert 1e-6 < np.abs(outputs[True] - outputs[False]).max() < 0.1  # tanh vs erf GELU: close, not equal


def _nest(flat):
  nested = {}
  for key, value in flat.items():
    node = nested
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return nested


def test_unsupported_layouts_are_named():
  with pytest.raises(UserError, match="hidden_act='relu'"):
    hf.model_fields({"model_type": "vit", "hidden_act": "relu"})
  with pytest.raises(UserError, match="qkv_bias=false"):
    hf.model_fields({"model_type": "vit", "qkv_bias": False})
  with pytest.raises(UserError, match="has no place in a transformers ViT"):
    hf.zoo_to_hf({"Transformer/encoderblock/LayerNorm_0/scale": np.zeros((2, 3))})
  with pytest.raises(UserError, match="a ViT here does not"):
    hf.hf_to_zoo({"vit.embeddings.mask_token": np.zeros((1, 1, 3))}, num_heads=1)


# --- transformers itself, where the peer venv has it ---------------------------------------------------------------

PEER_SCRIPT = """
import json, sys
import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTModel
mode, directory, images_path, out_path = sys.argv[1:]
images = torch.from_numpy(np.load(images_path)).permute(0, 3, 1, 2)
torch.manual_seed(0)
if mode == "write":  # transformers' own random model, in its own file, with its defaults (exact GELU, eps 1e-12)
  config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     image_size=16, patch_size=4, num_labels=5)
  model = ViTForImageClassification(config).eval()
  with torch.no_grad():
    for p in model.parameters():  # no zero biases or unit norms: every tensor matters
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  out = model(pixel_values=images).logits
elif mode == "write_pooler":  # an in21k-style ViTModel with the pooler
  config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     image_size=16, patch_size=4)
  model = ViTModel(config, add_pooling_layer=True).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  out = model(pixel_values=images).pooler_output
else:  # load ours strictly
  model = ViTForImageClassification.from_pretrained(directory).eval()
  out = model(pixel_values=images).logits
np.save(out_path, out.detach().numpy())
"""


def _peer_has_transformers():
  if not os.path.exists(PEER_PYTHON):
    return False
  return subprocess.run([PEER_PYTHON, "-c", "import torch, transformers"], capture_output=True).returncode == 0


def _peer(tmp_path, mode, directory, images):
  np.save(tmp_path / "images.npy", images)
  (tmp_path / "peer.py").write_text(PEER_SCRIPT)
  out = subprocess.run([PEER_PYTHON, str(tmp_path / "peer.py"), mode, directory, str(tmp_path / "images.npy"),
                        str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
  assert out.returncode == 0, out.stderr[-3000:]
  return np.load(tmp_path / "out.npy")


def _ours(directory, images, num_classes):
  flat, fields, _ = hf.read(directory)
  model = models.get_model("testing", num_classes=num_classes, **fields)
  return np.asarray(model.apply({"params": _nest(flat)}, jnp.asarray(images)))


def _relative_error(a, b):
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.slow
@pytest.mark.skipif(not _peer_has_transformers(), reason="needs a .peer venv with torch and transformers")
@pytest.mark.parametrize("mode, num_classes", [("write", 5), ("write_pooler", 0)])
def test_logits_equal_transformers_on_its_own_files(tmp_path, mode, num_classes):
  images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  directory = str(tmp_path / "hf")
  theirs = _peer(tmp_path, mode, directory, images)
  config = json.load(open(os.path.join(directory, "config.json"), encoding="utf-8"))
  assert config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-12
  ours = _ours(directory, images, num_classes)
  print(f"{mode}: relative error {_relative_error(ours, theirs):.2e}")
  assert _relative_error(ours, theirs) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not _peer_has_transformers(), reason="needs a .peer venv with torch and transformers")
def test_transformers_loads_our_export_and_agrees(tmp_path):
  model, flat = _random_flat()
  images = np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  ours = np.asarray(model.apply({"params": _nest(flat)}, jnp.asarray(images)))
  directory = str(tmp_path / "ours")
  hf.write(flat, models.get_model_config("testing", **TINY), directory, num_labels=5, image_size=16)
  theirs = _peer(tmp_path, "load", directory, images)
  assert _relative_error(theirs, ours) < 1e-4


def test_convert_to_hf_and_back_and_fine_tune_from_the_directory(tmp_path):
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.tools import convert  # pylint: disable=g-import-not-at-top
  _, flat = _random_flat()
  npz = str(tmp_path / "model.npz")
  checkpoint.save(_nest(flat), npz)
  directory = str(tmp_path / "hf_vit")
  convert.export_hf(npz, directory)
  config = json.load(open(os.path.join(directory, "config.json"), encoding="utf-8"))
  assert (config["hidden_size"], config["num_hidden_layers"], config["patch_size"], config["image_size"]) == (
      32, 2, 4, 16)
  assert config["hidden_act"] == "gelu_pytorch_tanh" and len(config["id2label"]) == 5
  back = str(tmp_path / "back.npz")
  fields = convert.import_checkpoint(directory, back).fields
  assert fields["gelu_approximate"] and fields["layer_norm_eps"] == 1e-6
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load(back), _nest(flat))
  # load_pretrained reads the directory by its content: a new 3-class head, position embeddings for 24 px.
  model_config = models.get_model_config("testing", **TINY)
  model = models.get_model("testing", num_classes=3, **TINY)
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3))))["params"]
  loaded = checkpoint.load_pretrained(pretrained_path=directory, init_params=init, model_config=model_config,
                                      image_size=24)
  np.testing.assert_array_equal(loaded["embedding"]["kernel"], flat["embedding/kernel"])
  assert loaded["head"]["kernel"].shape == (32, 3)
  assert loaded["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 32)
