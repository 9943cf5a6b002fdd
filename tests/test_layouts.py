"""Checkpoint layouts of the later ViTs (registers, LayerScale, MAP head, fc_norm, no_embed_class): timm's and
big_vision's, read by content through `layouts.read`, checked against an independent numpy forward written over
timm's layout from timm's code (and timm itself where the peer venv exists); round trips bit-exact."""
import json
import logging
import os
import subprocess

import jax
import numpy as np
import pytest
import scipy.special
from safetensors import numpy as st_numpy

from tests import numpy_vit
from tests.test_convert import PEER_PYTHON, PEER_STUB, TIMM_SCRIPT, _peer_available
from tests.test_infer import random_params
from vit_jax import checkpoint, models
from vit_jax.errors import UserError
from vit_jax.models import big_vision_layout, layouts, timm_layout, zoo
from vit_jax.tools import convert

TINY = dict(hidden_size=32, transformer=dict(num_layers=2, mlp_dim=48, num_heads=4), patches=dict(size=(4, 4)))
SIZE = 16
# The published families' options on a tiny ViT: timm's reg4_gap (registers, no_embed_class, fc_norm, exact GELU),
# DeiT III (LayerScale, no_embed_class), SigLIP (MAP head, no class token), registers under the position
# embeddings with a class token, and a MAP head with registers and LayerScale.
VARIANTS = {
    "reg4_gap": dict(classifier="gap", num_registers=4, no_embed_class=True, fc_norm=True, gelu_approximate=False),
    "deit3": dict(no_embed_class=True, layer_scale_init=0.1, gelu_approximate=False),
    "siglip": dict(classifier="map"),
    "reg_embedded": dict(num_registers=2),
    "map_reg_ls": dict(classifier="map", num_registers=2, layer_scale_init=0.1, no_embed_class=True),
}


def make(variant, num_classes=5, seed=0):
  model = models.get_model("testing", num_classes=num_classes, **TINY, **VARIANTS[variant])
  params = random_params(model, SIZE, seed=seed)
  images = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, images))
  return model, params, images, logits


# --- timm's ViT forward in numpy, from timm's code (vision_transformer.py, attention_pool.py), float64 -----------


def _ln(x, s, prefix, eps=1e-6):
  return numpy_vit.layer_norm(x, {"scale": s[prefix + ".weight"], "bias": s[prefix + ".bias"]}, eps)


def _gelu(x, exact):
  return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2))) if exact else numpy_vit.gelu_tanh(x)


def _linear(x, s, prefix):
  return x @ s[prefix + ".weight"].T + s[prefix + ".bias"]


def _attention(q, k, v, heads):
  """(n, tq, D) queries, (n, tk, D) keys and values, split head-major as timm's `reshape(B, N, heads, hd)`."""
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  weights = numpy_vit.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]))
  out = weights @ v
  return out.transpose(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)


def timm_forward(state, images, heads, *, global_pool, no_embed_class, exact_gelu):
  s = {k: np.asarray(v, np.float64) for k, v in state.items()}
  w = s["patch_embed.proj.weight"]
  x = numpy_vit.conv2d(np.asarray(images, np.float64), w.transpose(2, 3, 1, 0), w.shape[-1], "VALID")
  x = x + s["patch_embed.proj.bias"]
  n, h, wd, c = x.shape
  x = x.reshape(n, h * wd, c)
  prefix = [np.broadcast_to(s[k], (n,) + s[k].shape[1:]) for k in ("cls_token", "reg_token") if k in s]
  num_prefix = sum(p.shape[1] for p in prefix)
  if no_embed_class:  # `_pos_embed`: add, then concatenate
    x = np.concatenate(prefix + [x + s["pos_embed"]], axis=1)
  else:
    x = np.concatenate(prefix + [x], axis=1) + s["pos_embed"]
  i = 0
  while f"blocks.{i}.attn.qkv.weight" in s:
    p = f"blocks.{i}."
    qkv = _linear(_ln(x, s, p + "norm1"), s, p + "attn.qkv")
    y = _linear(_attention(*np.split(qkv, 3, axis=-1), heads), s, p + "attn.proj")
    x = x + y * s.get(p + "ls1.gamma", 1.0)
    y = _linear(_gelu(_linear(_ln(x, s, p + "norm2"), s, p + "mlp.fc1"), exact_gelu), s, p + "mlp.fc2")
    x = x + y * s.get(p + "ls2.gamma", 1.0)
    i += 1
  if "norm.weight" in s:
    x = _ln(x, s, "norm")
  if global_pool == "map":  # `pool`: prefix tokens left out, then AttentionPoolLatent
    x = x[:, num_prefix:]
    latent = np.broadcast_to(s["attn_pool.latent"], (n, 1, c))
    k, v = np.split(_linear(x, s, "attn_pool.kv"), 2, axis=-1)
    x = _linear(_attention(_linear(latent, s, "attn_pool.q"), k, v, heads), s, "attn_pool.proj")
    mlp = lambda y: _linear(_gelu(_linear(y, s, "attn_pool.mlp.fc1"), exact_gelu), s, "attn_pool.mlp.fc2")
    x = (x + mlp(_ln(x, s, "attn_pool.norm")))[:, 0]
  elif global_pool == "token":
    x = x[:, 0]
  else:
    x = x[:, num_prefix:].mean(axis=1)
  if "fc_norm.weight" in s:
    x = _ln(x, s, "fc_norm")
  return _linear(x, s, "head")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_timm_layout_forward_matches_and_round_trips_bit_exactly(variant):
  model, params, images, logits = make(variant)
  flat = zoo.flatten(params)
  state = timm_layout.zoo_to_timm(flat)
  kwargs = timm_layout.timm_kwargs(models.get_model_config("testing", **TINY, **VARIANTS[variant]), 5, SIZE)
  assert kwargs["act_layer"] == ("gelu" if variant in ("reg4_gap", "deit3") else "gelu_tanh")
  expected = timm_forward(state, images, 4, global_pool=kwargs["global_pool"],
                          no_embed_class=kwargs["no_embed_class"], exact_gelu=kwargs["act_layer"] == "gelu")
  np.testing.assert_allclose(logits, expected, rtol=2e-5, atol=2e-5)
  back = timm_layout.timm_to_zoo(state, num_heads=4)
  assert sorted(back) == sorted(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("variant", ["siglip", "reg4_gap", "deit3"])
@pytest.mark.parametrize("stacked,prefix", [(False, "params/"), (True, "params/"), (True, "params/img/")])
def test_big_vision_layout_round_trips_bit_exactly(tmp_path, variant, stacked, prefix):
  _, params, _, _ = make(variant)
  flat = zoo.flatten(params)
  bv = big_vision_layout.from_zoo(flat, stacked=stacked)
  assert "params/pos_embedding" in bv and "params/Transformer/posembed_input/pos_embedding" not in bv
  assert ("params/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel" in bv) == stacked
  arrays = {prefix + k[len("params/"):]: v for k, v in bv.items()}
  if prefix == "params/img/":  # a two-tower file: the text tower and the temperature are not the image model's
    arrays.update({"params/txt/Embed_0/embedding": np.zeros((3, 2), np.float32), "params/t": np.ones(1, np.float32)})
  path = str(tmp_path / "bv.npz")
  np.savez(path, **arrays)
  read = layouts.read(path)
  assert read.layout == "big_vision" and read.fields == {"gelu_approximate": True, "layer_norm_eps": 1e-6}
  assert sorted(read.flat) == sorted(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(read.flat[key], value, err_msg=key)


def test_big_vision_files_without_an_image_tower_or_learned_position_embeddings(tmp_path):
  np.savez(tmp_path / "text.npz", **{"params/txt/Embed_0/embedding": np.zeros((3, 2)), "params/t": np.ones(1)})
  with pytest.raises(UserError, match=r"two-tower checkpoint without an image tower"):
    layouts.read(str(tmp_path / "text.npz"))
  _, params, _, _ = make("siglip")
  bv = big_vision_layout.from_zoo(zoo.flatten(params))
  del bv["params/pos_embedding"]
  np.savez(tmp_path / "sincos.npz", **bv)
  with pytest.raises(UserError, match=r"stores no position embedding .*posemb='sincos2d'"):
    layouts.read(str(tmp_path / "sincos.npz"))


def _timm_file(tmp_path, variant, *, metadata=True, name="model"):
  model, params, images, logits = make(variant)
  state = timm_layout.zoo_to_timm(zoo.flatten(params))
  config = models.get_model_config("testing", **TINY, **VARIANTS[variant])
  meta = {"format": "pt"}
  if metadata:
    meta[timm_layout.TIMM_METADATA] = json.dumps(timm_layout.timm_kwargs(config, 5, SIZE))
  path = str(tmp_path / f"{name}.safetensors")
  st_numpy.save_file(state, path, metadata=meta)
  return path, model, params, images, logits


def test_trained_model_reads_a_timm_file_with_its_options_and_gelu(tmp_path):
  """The architecture from a timm file's shapes (registers, no_embed_class, fc_norm), the heads and GELU from its
  metadata or its hub config's architecture name; the logits are the model's."""
  from vit_jax.tools import trained_model  # pylint: disable=import-outside-toplevel
  path, _, _, images, logits = _timm_file(tmp_path, "reg4_gap", metadata=False)
  with pytest.raises(UserError, match=r"does not say its number of attention heads"):
    trained_model.load(path)
  # A hub directory names its architecture: timm's size word gives the heads (medium: 8), timm's default GELU.
  hub = tmp_path / "hub"
  hub.mkdir()
  os.replace(path, hub / "model.safetensors")
  (hub / "config.json").write_text(json.dumps({"architecture": "vit_medium_patch4_reg4_gap", "num_classes": 5,
                                               "pretrained_cfg": {"input_size": [3, SIZE, SIZE]}}))
  trained = trained_model.load(str(hub))
  config = trained.model_config
  assert (config.num_registers, config.no_embed_class, config.fc_norm, config.classifier) == (4, True, True, "gap")
  assert config.transformer.num_heads == 8 and not config.gelu_approximate
  # Our own export records the model config: 4 heads, and the logits are the source model's.
  ours = str(tmp_path / "ours.safetensors")
  st_numpy.save_file(st_numpy.load_file(str(hub / "model.safetensors")), ours, metadata={
      timm_layout.CONFIG_METADATA: json.dumps(models.get_model_config("testing", **TINY, **VARIANTS["reg4_gap"])
                                              .to_dict())})
  trained = trained_model.load(ours)
  assert trained.model_config.transformer.num_heads == 4 and trained.image_size == SIZE
  np.testing.assert_allclose(np.asarray(trained.model.apply({"params": trained.params}, images)), logits,
                             rtol=1e-5, atol=1e-5)


def test_load_pretrained_across_layouts_and_structure_errors(tmp_path, caplog):
  path, _, params, _, _ = _timm_file(tmp_path, "deit3")
  config = models.get_model_config("testing", **TINY, **VARIANTS["deit3"])
  model = models.get_model("testing", num_classes=3, **TINY, **VARIANTS["deit3"])
  init = random_params(model, 24, seed=5)
  with caplog.at_level(logging.INFO):
    adapted = checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=config,
                                         image_size=24)
  flat, want = zoo.flatten(adapted), zoo.flatten(params)
  np.testing.assert_array_equal(flat["Transformer/encoderblock_1/ls2"], want["Transformer/encoderblock_1/ls2"])
  # no_embed_class: the 16 grid embeddings alone are resampled to 36, none taken for the class token.
  assert flat[zoo.POSEMB_KEY].shape == (1, 36, 32)
  expected = zoo.resize_grid(want[zoo.POSEMB_KEY][0].reshape(4, 4, 32), (6, 6)).reshape(1, 36, 32)
  np.testing.assert_allclose(flat[zoo.POSEMB_KEY], expected, rtol=1e-6)
  # A model without the file's options is refused by name, with the field to set.
  plain = models.get_model_config("testing", **TINY, gelu_approximate=False)
  with pytest.raises(UserError, match=r"no_embed_class=True but model testing has False; .*no_embed_class=True"):
    checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=plain)
  registers = models.get_model_config("testing", **TINY, **VARIANTS["deit3"], num_registers=2)
  with pytest.raises(UserError, match=r"num_registers=0 but model testing has 2"):
    checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=registers)
  # The GELU form is fine-tuning's choice: a model with the zoo's tanh GELU loads the file, with a warning.
  tanh = models.get_model_config("testing", **TINY, **{**VARIANTS["deit3"], "gelu_approximate": True})
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=tanh, image_size=24)
  assert "gelu_approximate=False but the model has True" in caplog.text


def test_pickles_and_other_architectures_are_refused(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")
  with pytest.raises(UserError, match=r"pytorch_model.bin is a PyTorch pickle, which vit_jax never loads"):
    layouts.read(str(tmp_path))
  swin = tmp_path / "swin"
  swin.mkdir()
  (swin / "config.json").write_text(json.dumps({"model_type": "swin", "architectures": ["SwinForImageClassification"]}))
  with pytest.raises(UserError, match=r"is a transformers 'swin' model \(SwinForImageClassification\); only"):
    layouts.read(str(swin))
  deit = tmp_path / "deit"
  deit.mkdir()
  (deit / "config.json").write_text(json.dumps({"model_type": "deit"}))
  with pytest.raises(UserError, match=r"'deit' model"):
    checkpoint.load(str(deit))


def test_convert_cli_writes_big_vision_and_reads_any_layout(tmp_path):
  """convert --to=big_vision, then big_vision -> zoo .npz and timm -> zoo .npz, all bit-exact."""
  _, params, _, _ = make("siglip")
  npz = str(tmp_path / "model.npz")
  checkpoint.save(params, npz)
  bv = str(tmp_path / "bv.npz")
  convert.export_big_vision(npz, bv)
  assert "params/MAPHead_0/probe" in np.load(bv).files
  back = str(tmp_path / "back.npz")
  assert convert.import_checkpoint(bv, back).layout == "big_vision"
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load(back), checkpoint.load(npz))


# --- timm itself (peer venv) ----------------------------------------------------------------------------------

TIMM_BIG_VISION_SCRIPT = r"""
import json, sys
import numpy as np, torch
from timm.models.vision_transformer import VisionTransformer, _load_weights
npz, kwargs, images_path, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
model = VisionTransformer(**kwargs).eval()
_load_weights(model, npz)
with torch.no_grad():
  np.save(out_path, model(torch.from_numpy(np.load(images_path)).permute(0, 3, 1, 2)).numpy())
"""


def _run_peer(tmp_path, script, *args):
  (tmp_path / "peer.py").write_text(script)
  out = subprocess.run([PEER_PYTHON, str(tmp_path / "peer.py"), *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": PEER_STUB})
  assert out.returncode == 0, out.stderr[-3000:]
  return np.load(tmp_path / "peer.npy")


def _relative_error(got, want):
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.slow
@pytest.mark.skipif(not _peer_available(), reason="needs a .peer venv with torch and timm, and VIT_JAX_PEER_DIR")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_timm_vision_transformer_loads_each_variant_strictly_and_agrees(tmp_path, variant):
  path, _, _, images, logits = _timm_file(tmp_path, variant)
  np.save(tmp_path / "images.npy", images)
  timm_logits = _run_peer(tmp_path, TIMM_SCRIPT, path, str(tmp_path / "images.npy"), str(tmp_path / "peer.npy"))
  error = _relative_error(logits, timm_logits)
  print(f"{variant}: relative error vs timm {error:.1e}")
  assert error < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not _peer_available(), reason="needs a .peer venv with torch and timm, and VIT_JAX_PEER_DIR")
@pytest.mark.parametrize("variant,stacked", [("siglip", True), ("siglip", False), ("plain", True)])
def test_timms_big_vision_loader_agrees_with_ours(tmp_path, variant, stacked):
  """big_vision files we write, read by timm's own `_load_weights` and by us: the same logits."""
  overrides = VARIANTS.get(variant, {})
  model = models.get_model("testing", num_classes=5, **TINY, **overrides)
  params = random_params(model, SIZE, seed=3)
  images = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  path = str(tmp_path / "bv.npz")
  np.savez(path, **big_vision_layout.from_zoo(zoo.flatten(params), stacked=stacked))
  ours = checkpoint.load(path)
  logits = np.asarray(model.apply({"params": ours}, images))
  kwargs = timm_layout.timm_kwargs(models.get_model_config("testing", **TINY, **overrides), 5, SIZE)
  np.save(tmp_path / "images.npy", images)
  timm_logits = _run_peer(tmp_path, TIMM_BIG_VISION_SCRIPT, path, json.dumps(kwargs), str(tmp_path / "images.npy"),
                          str(tmp_path / "peer.npy"))
  error = _relative_error(logits, timm_logits)
  print(f"{variant} stacked={stacked}: relative error vs timm's big_vision loader {error:.1e}")
  assert error < 1e-4


TIMM_HUB_SCRIPT = r"""
import sys
import numpy as np, timm, torch
from timm.models._hub import save_for_hf
arch, directory, images_path, out_path = sys.argv[1:5]
torch.manual_seed(0)
model = timm.create_model(arch, pretrained=False, num_classes=5, img_size=32, depth=2, embed_dim=96).eval()
with torch.no_grad():
  for p in model.parameters():  # off the init (LayerScale's 1e-6, zero heads): every tensor matters
    p.copy_(torch.randn_like(p) * 0.2)
save_for_hf(model, directory, safe_serialization="both")  # model.safetensors, pytorch_model.bin and config.json
with torch.no_grad():
  np.save(out_path, model(torch.from_numpy(np.load(images_path)).permute(0, 3, 1, 2)).numpy())
"""


@pytest.mark.slow
@pytest.mark.skipif(not _peer_available(), reason="needs a .peer venv with torch and timm, and VIT_JAX_PEER_DIR")
@pytest.mark.parametrize("arch", ["vit_base_patch16_224", "deit3_small_patch16_224", "vit_base_patch16_reg4_gap_256",
                                  "vit_base_patch16_siglip_224", "vit_base_patch32_siglip_256"])
def test_hub_directories_timm_writes_load_by_content_and_agree(tmp_path, arch):
  """timm's own `save_for_hf` directory (2 layers, width 96, 32 px): read by its config.json's architecture (heads,
  GELU form) and its shapes (options); the logits equal timm's."""
  from vit_jax.tools import trained_model  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  directory = str(tmp_path / "hub")
  timm_logits = _run_peer(tmp_path, TIMM_HUB_SCRIPT, arch, directory, str(tmp_path / "images.npy"),
                          str(tmp_path / "peer.npy"))
  trained = trained_model.load(directory, image_size=32)
  logits = np.asarray(trained.model.apply({"params": trained.params}, images))
  error = _relative_error(logits, timm_logits)
  print(f"{arch}: relative error vs timm {error:.1e} ({trained.model_config.classifier}, "
        f"{zoo.vit_structure(trained_model.flat_shapes(trained.params))})")
  assert error < 1e-4


@pytest.mark.slow
def test_infer_inspect_and_convert_take_hub_names_offline(tmp_path):
  """`hf://` names from a hub cache (offline, as on a cluster node without internet): a transformers ViT repo and
  a timm repo, through infer, inspect and convert; a name not in the cache is one error line."""
  from tests.test_infer import error_line  # pylint: disable=import-outside-toplevel
  from vit_jax.models import hf  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  cache = tmp_path / "hf" / "hub"
  model, params, images, logits = make("siglip")
  plain = models.get_model_config("testing", **TINY, gelu_approximate=False, layer_norm_eps=1e-12)
  plain_model = models.build(plain, num_classes=5)
  plain_params = random_params(plain_model, SIZE, seed=2)
  for repo, write in (("google/tiny-vit", lambda d: hf.write(zoo.flatten(plain_params), plain, d, num_labels=5,
                                                              image_size=SIZE)),
                      ("timm/tiny_siglip", lambda d: st_numpy.save_file(
                          timm_layout.zoo_to_timm(zoo.flatten(params)), os.path.join(d, "model.safetensors")))):
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("c" * 40)
    write(str(snapshot))
  (cache / "models--timm--tiny_siglip" / "snapshots" / ("c" * 40) / "config.json").write_text(json.dumps(
      {"architecture": "vit_small_patch4_siglip", "num_classes": 5}))  # small: 6 heads, so --num_heads=4 below
  image = tmp_path / "image.png"
  Image.fromarray(((images[0] + 1) * 127.5).round().astype(np.uint8)).save(image)
  env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
         "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run([os.sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                                     timeout=300)
  result = run("vit_jax.tools.infer", "--checkpoint=hf://google/tiny-vit", "--top_k=1", str(image))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith(str(image) + ": ")
  result = run("vit_jax.tools.inspect", "hf://google/tiny-vit")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "layout: transformers (" in result.stdout, result.stdout[-800:]
  assert "computes with: gelu_approximate=False, layer_norm_eps=1e-12" in result.stdout, result.stdout[-800:]
  out = tmp_path / "siglip.npz"
  result = run("vit_jax.tools.convert", "--input=hf://timm/tiny_siglip", f"--output={out}", "--num_heads=4")
  assert result.returncode == 0, result.stderr[-2000:]
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load(str(out)), jax.device_get(params))
  line = error_line(run("vit_jax.tools.infer", "--checkpoint=hf://google/not-cached", str(image)))
  assert "google/not-cached" in line and str(cache) in line and "hf download google/not-cached" in line


def test_cli_refuses_a_pickle_with_one_error_line(tmp_path):
  from tests.test_infer import error_line, run_cli  # pylint: disable=import-outside-toplevel
  (tmp_path / "model.pth").write_bytes(b"\x80\x04")
  line = error_line(run_cli("vit_jax.tools.convert", f"--input={tmp_path}/model.pth",
                            f"--output={tmp_path}/model.npz"))
  assert "model.pth is a PyTorch pickle, which vit_jax never loads" in line and "safetensors" in line
  assert not (tmp_path / "model.npz").exists()


def test_transformers_layout_refuses_the_later_options(tmp_path):
  from vit_jax.models import hf  # pylint: disable=import-outside-toplevel
  _, params, _, _ = make("deit3")
  config = models.get_model_config("testing", **TINY, **VARIANTS["deit3"])
  with pytest.raises(UserError, match=r"has no_embed_class=True, which transformers' ViT cannot express; export "
                                      r"it to timm's layout"):
    hf.write(zoo.flatten(params), config, str(tmp_path / "hf"), num_labels=5, image_size=SIZE)


def test_model_flags_unset_keep_the_registry_models_values():
  """`--config.model.gelu_approximate` and the other checkpoint flags: unset (None) keeps the registry model's value,
  set replaces it; a CNN accepts them unset."""
  import importlib  # pylint: disable=import-outside-toplevel
  from vit_jax import train  # pylint: disable=import-outside-toplevel
  config = importlib.import_module("configs.common").get_config()
  config.model_name = "DeiT3-S_16"
  built = train.model_config_from(config)
  assert (built.gelu_approximate, built.no_embed_class, built.layer_scale_init, built.classifier) == (
      False, True, 1e-6, "token")
  config.model.gelu_approximate, config.model.classifier, config.model.num_registers = True, "gap", 4
  built = train.model_config_from(config)
  assert (built.gelu_approximate, built.classifier, built.num_registers) == (True, "gap", 4)
  config = importlib.import_module("configs.common").get_config()
  config.model_name = "CNN-CIFAR"
  assert models.family(train.model_config_from(config)) == "cnn"
  config.model.fc_norm = True
  with pytest.raises(UserError, match=r"unknown model field 'fc_norm'"):
    train.model_config_from(config)
