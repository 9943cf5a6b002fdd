"""zoo .npz <-> timm .safetensors: bit-exact round trips, a numpy forward over the timm layout, timm itself."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy
from safetensors import safe_open

from tests import numpy_vit
from tests.test_infer import random_params
from vit_jax import models
from vit_jax.models import timm_layout, zoo
from vit_jax.tools import convert
from vit_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The timm cross-check needs a torch + timm venv in the checkout (`.peer`, git-ignored) and the peer's folder
# (its `tv_stub/` stands in for torchvision) in VIT_JAX_PEER_DIR; without either it is skipped.
PEER_PYTHON = os.path.join(REPO, ".peer", "bin", "python")
PEER_DIR = os.environ.get("VIT_JAX_PEER_DIR")
PEER_STUB = os.path.join(PEER_DIR, "tv_stub") if PEER_DIR else None

# name, overrides, image size: a plain ViT, a gap ViT, a hybrid with stages and a stem-only hybrid.
MODELS = {
    "vit": ("testing", dict(hidden_size=32, transformer=dict(num_layers=2, mlp_dim=48, num_heads=4),
                            patches=dict(size=(4, 4))), 16),
    "gap": ("testing", dict(hidden_size=32, classifier="gap",
                            transformer=dict(num_layers=2, mlp_dim=48, num_heads=4), patches=dict(size=(4, 4))), 16),
    "hybrid": ("R26+ViT-S_32", dict(hidden_size=32, transformer=dict(num_layers=1, mlp_dim=48, num_heads=4),
                                    resnet=dict(num_layers=(1, 2), width_factor=0.5)), 32),
    "stem": ("R+ViT-Ti_16", dict(hidden_size=32, transformer=dict(num_layers=1, mlp_dim=48, num_heads=4),
                                 patches=dict(size=(2, 2))), 32),
}


def make_checkpoint(tmp_path, key, num_classes=5):
  name, overrides, size = MODELS[key]
  model = models.get_model(name, num_classes=num_classes, **overrides)
  params = random_params(model, size)
  path = str(tmp_path / f"{key}.npz")
  zoo.save(params, path)
  images = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, images))
  return path, model, params, images, logits


# --- an independent numpy forward over the timm layout (torch conventions: Linear y = x W^T + b, OIHW convs) ---


def _conv_oihw(x, w, stride, same):
  """NHWC activations, OIHW weights."""
  return numpy_vit.conv2d(x, w.transpose(2, 3, 1, 0), stride, "SAME" if same else "VALID")


def _std_conv_oihw(x, w, stride):
  w = w - w.mean(axis=(1, 2, 3), keepdims=True)
  w = w / (w.std(axis=(1, 2, 3), keepdims=True) + 1e-5)
  return _conv_oihw(x, w, stride, same=True)


def _gn(x, s, prefix):
  return numpy_vit.group_norm(x, {"scale": s[prefix + ".weight"], "bias": s[prefix + ".bias"]})


def _ln(x, s, prefix):
  return numpy_vit.layer_norm(x, {"scale": s[prefix + ".weight"], "bias": s[prefix + ".bias"]})


def timm_layout_forward(state, images, num_heads, classifier):
  s = {k: np.asarray(v, np.float64) for k, v in state.items()}
  x = np.asarray(images, np.float64)
  if "patch_embed.backbone.conv.weight" in s or "patch_embed.backbone.stem.conv.weight" in s:
    stem = "patch_embed.backbone.stem" if "patch_embed.backbone.stem.conv.weight" in s else "patch_embed.backbone"
    x = numpy_vit.max_pool_same(np.maximum(_gn(_std_conv_oihw(x, s[stem + ".conv.weight"], 2), s, stem + ".norm"), 0))
    stage = 0
    while f"patch_embed.backbone.stages.{stage}.blocks.0.conv1.weight" in s:
      unit = 0
      while (p := f"patch_embed.backbone.stages.{stage}.blocks.{unit}") + ".conv1.weight" in s:
        stride = 2 if stage > 0 and unit == 0 else 1
        residual = x
        if p + ".downsample.conv.weight" in s:
          residual = _gn(_std_conv_oihw(x, s[p + ".downsample.conv.weight"], stride), s, p + ".downsample.norm")
        y = np.maximum(_gn(_std_conv_oihw(x, s[p + ".conv1.weight"], 1), s, p + ".norm1"), 0)
        y = np.maximum(_gn(_std_conv_oihw(y, s[p + ".conv2.weight"], stride), s, p + ".norm2"), 0)
        y = _gn(_std_conv_oihw(y, s[p + ".conv3.weight"], 1), s, p + ".norm3")
        x = np.maximum(residual + y, 0)
        unit += 1
      stage += 1
  w = s["patch_embed.proj.weight"]
  x = _conv_oihw(x, w, w.shape[-1], same=False) + s["patch_embed.proj.bias"]
  n, h, wd, c = x.shape
  x = x.reshape(n, h * wd, c)
  if "cls_token" in s:
    x = np.concatenate([np.broadcast_to(s["cls_token"], (n, 1, c)), x], axis=1)
  x = x + s["pos_embed"]
  i = 0
  while f"blocks.{i}.attn.qkv.weight" in s:
    p = f"blocks.{i}."
    y = _ln(x, s, p + "norm1")
    qkv = y @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"]  # (n, t, 3D)
    qkv = qkv.reshape(n, -1, 3, num_heads, c // num_heads).transpose(2, 0, 3, 1, 4)  # as timm's Attention
    q, k, v = qkv
    weights = numpy_vit.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(c // num_heads))
    y = (weights @ v).transpose(0, 2, 1, 3).reshape(n, -1, c)
    x = x + y @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
    y = _ln(x, s, p + "norm2")
    y = numpy_vit.gelu_tanh(y @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
    x = x + y @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
    i += 1
  x = _ln(x, s, "norm")
  x = x[:, 0] if classifier == "token" else x.mean(axis=1)
  return x @ s["head.weight"].T + s["head.bias"]


@pytest.mark.slow
@pytest.mark.parametrize("key", list(MODELS))
def test_round_trip_is_bit_exact_and_numpy_forward_over_timm_layout_matches_jax(tmp_path, key):
  path, model, _, images, logits = make_checkpoint(tmp_path, key)
  exported = str(tmp_path / "model.safetensors")
  convert.export_timm(path, exported)
  state = st_numpy.load_file(exported)
  num_heads = model.transformer["num_heads"]
  np.testing.assert_allclose(timm_layout_forward(state, images, num_heads, model.classifier), logits,
                             rtol=1e-4, atol=1e-4)
  # Metadata rebuilds the model and restores the config.
  with safe_open(exported, framework="numpy") as f:
    metadata = f.metadata()
  assert json.loads(metadata[timm_layout.CONFIG_METADATA])["transformer"]["num_heads"] == num_heads
  assert json.loads(metadata[timm_layout.TIMM_METADATA])["act_layer"] == "gelu_tanh"

  back = str(tmp_path / "back.npz")
  convert.import_checkpoint(exported, back)
  original, restored = np.load(path), np.load(back)
  assert sorted(original.files) == sorted(restored.files)
  for name in original.files:
    assert original[name].dtype == restored[name].dtype
    np.testing.assert_array_equal(original[name], restored[name])


def test_timm_layout_names_and_shapes():
  d, heads = 8, 2
  flat = {
      "cls": np.zeros((1, 1, d)), "embedding/kernel": np.zeros((4, 4, 3, d)), "embedding/bias": np.zeros(d),
      "Transformer/posembed_input/pos_embedding": np.zeros((1, 5, d)),
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel": np.zeros((heads, d // heads, d)),
      "head/kernel": np.zeros((d, 3)),
  }
  for n, base in zip(("query", "key", "value"), (1, 2, 3)):
    kernel = np.full((d, heads, d // heads), float(base))
    kernel[:, 1] += 10  # mark the second head
    flat[f"Transformer/encoderblock_0/MultiHeadDotProductAttention_1/{n}/kernel"] = kernel
    flat[f"Transformer/encoderblock_0/MultiHeadDotProductAttention_1/{n}/bias"] = np.zeros((heads, d // heads))
  state = timm_layout.zoo_to_timm(flat)
  assert state["patch_embed.proj.weight"].shape == (d, 3, 4, 4)
  assert state["head.weight"].shape == (3, d)
  qkv = state["blocks.0.attn.qkv.weight"]
  assert qkv.shape == (3 * d, d)
  # Rows: q (head 0, head 1), k (head 0, head 1), v (...), as timm reshapes (3, heads, head_dim).
  np.testing.assert_array_equal(qkv[:, 0], [1] * 4 + [11] * 4 + [2] * 4 + [12] * 4 + [3] * 4 + [13] * 4)


def test_representation_layer_cannot_be_exported(tmp_path):
  model = models.get_model("testing", num_classes=3, representation_size=8, patches=dict(size=(4, 4)))
  params = random_params(model, 8)
  zoo.save(params, str(tmp_path / "rep.npz"))
  with pytest.raises(ValueError, match="pre_logits"):
    convert.export_timm(str(tmp_path / "rep.npz"), str(tmp_path / "rep.safetensors"))


@pytest.mark.slow
def test_cli_both_directions_and_errors(tmp_path):
  path, *_ = make_checkpoint(tmp_path, "vit")
  run = lambda *args: subprocess.run([sys.executable, "-m", "vit_jax.tools.convert", *args], capture_output=True,
                                     text=True, cwd=REPO, timeout=120)
  out = run(f"--input={path}", f"--output={tmp_path / 'm.safetensors'}")
  assert out.returncode == 0, out.stderr
  out = run(f"--input={tmp_path / 'm.safetensors'}", f"--output={tmp_path / 'm.npz'}")
  assert out.returncode == 0, out.stderr
  np.testing.assert_array_equal(np.load(tmp_path / "m.npz")["cls"], np.load(path)["cls"])
  (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
  out = run(f"--input={tmp_path / 'junk.safetensors'}", f"--output={tmp_path / 'j.npz'}")
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: cannot read")


@pytest.mark.slow
def test_import_errors_and_foreign_files(tmp_path):
  path, *_ = make_checkpoint(tmp_path, "vit")
  exported = str(tmp_path / "m.safetensors")
  convert.export_timm(path, exported)
  # `testing` has other widths than this checkpoint: the named model does not match.
  with pytest.raises(UserError, match="does not match model testing"):
    convert.import_checkpoint(exported, str(tmp_path / "x.npz"), model_name="testing")
  # Without vit_jax metadata (a file from another tool) the heads must be given.
  bare = str(tmp_path / "bare.safetensors")
  st_numpy.save_file(st_numpy.load_file(exported), bare)
  with pytest.raises(UserError, match="--num_heads"):
    convert.import_checkpoint(bare, str(tmp_path / "b.npz"))
  with pytest.raises(UserError, match="does not divide"):
    convert.import_checkpoint(bare, str(tmp_path / "b.npz"), num_heads=5)
  flat = convert.import_checkpoint(bare, str(tmp_path / "b.npz"), num_heads=4).flat
  np.testing.assert_array_equal(flat["embedding/kernel"], np.load(path)["embedding/kernel"])
  with pytest.raises(UserError, match=r"blocks.0.attn.q_norm.weight belongs to qk_norm"):
    timm_layout.timm_to_zoo({"blocks.0.attn.q_norm.weight": np.zeros(4)}, num_heads=1)
  with pytest.raises(UserError, match=r"dist_token belongs to a distillation token"):
    timm_layout.timm_to_zoo({"dist_token": np.zeros((1, 1, 4))}, num_heads=1)


# --- timm itself, where the peer venv exists (bash $VIT_JAX_PEER_DIR/setup.sh .peer) -------------------------------

TIMM_SCRIPT = r"""
import functools, json, sys
import numpy as np, torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
from timm.models.vision_transformer import VisionTransformer

path, images_path, out_path = sys.argv[1:4]
with safe_open(path, framework="pt") as f:
  kwargs = json.loads(f.metadata()["timm_kwargs"])
layers, width = kwargs.pop("resnet_layers", None), kwargs.pop("resnet_width_factor", None)
if layers is not None:
  # The zoo's hybrids: weight-standardised SAME convs, GroupNorm eps 1e-6 (timm's default is 1e-5).
  conv = functools.partial(StdConv2dSame, eps=1e-10)
  norm = functools.partial(GroupNormAct, num_groups=32, eps=1e-6)
  if layers:
    backbone = ResNetV2(layers=layers, num_classes=0, global_pool="", preact=False, stem_type="same",
                        conv_layer=conv, norm_layer=norm, width_factor=width)  # timm scales its stem by width itself
  else:
    backbone = create_resnetv2_stem(3, int(64 * width), stem_type="same", preact=False, conv_layer=conv,
                                    norm_layer=norm)
  kwargs["embed_layer"] = functools.partial(HybridEmbed, backbone=backbone)
model = VisionTransformer(**kwargs).eval()
model.load_state_dict(load_file(path), strict=True)
with torch.no_grad():
  images = torch.from_numpy(np.load(images_path)).permute(0, 3, 1, 2)
  np.save(out_path, model(images).numpy())
"""


def _peer_available():
  if not PEER_STUB or not os.path.isdir(PEER_STUB) or not os.path.exists(PEER_PYTHON):
    return False
  return subprocess.run([PEER_PYTHON, "-c", "import torch, timm"], capture_output=True,
                        env={**os.environ, "PYTHONPATH": PEER_STUB}).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _peer_available(), reason="needs a .peer venv with torch and timm, and VIT_JAX_PEER_DIR")
@pytest.mark.parametrize("key", ["vit", "gap", "hybrid"])
def test_timm_loads_strictly_and_matches(tmp_path, key):
  path, _, _, images, logits = make_checkpoint(tmp_path, key)
  exported = str(tmp_path / "model.safetensors")
  convert.export_timm(path, exported)
  np.save(tmp_path / "images.npy", images)
  (tmp_path / "run_timm.py").write_text(TIMM_SCRIPT)
  out = subprocess.run([PEER_PYTHON, str(tmp_path / "run_timm.py"), exported, str(tmp_path / "images.npy"),
                        str(tmp_path / "timm.npy")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": PEER_STUB})
  assert out.returncode == 0, out.stderr[-3000:]
  timm_logits = np.load(tmp_path / "timm.npy")
  print(f"{key}: max |timm - jax| = {np.abs(timm_logits - logits).max():.2e}")
  np.testing.assert_allclose(timm_logits, logits, rtol=1e-4, atol=1e-4)


# --- BiT ResNet-v2 <-> timm's resnetv2_*_bit ------------------------------------------------------------------------

BIT_UNITS = (1, 2, 1, 1)  # a second unit in stage 2: a unit without projection, and block index 1


def make_bit_checkpoint(tmp_path, block_units=BIT_UNITS, width_factor=1, num_classes=5, name="bit"):
  model = models.get_model("BiT-R50x1", num_classes=num_classes, block_units=block_units, width_factor=width_factor)
  params = random_params(model, 32)
  path = str(tmp_path / f"{name}.npz")
  zoo.save(params, path)
  return path, model, params


def timm_bit_layout_by_hand(flat, block_units):
  """The state dict timm's `resnetv2._load_weights` makes of a big_transfer file, written out from its code: OIHW
  convolutions (t2p), `stem.conv`, `stages.{i}.blocks.{j}.{conv,norm}{1,2,3}` from units a, b, c,
  `downsample.conv` from `a/proj`, `norm`, and the 1x1-conv head `head.fc`."""
  oihw = lambda w: w.transpose(3, 2, 0, 1)
  state = {"stem.conv.weight": oihw(flat["resnet/root_block/standardized_conv2d/kernel"]),
           "norm.weight": flat["resnet/group_norm/gamma"], "norm.bias": flat["resnet/group_norm/beta"],
           "head.fc.weight": oihw(flat["resnet/head/conv2d/kernel"]), "head.fc.bias": flat["resnet/head/conv2d/bias"]}
  for i, units in enumerate(block_units):
    for j in range(units):
      src, dst = f"resnet/block{i + 1}/unit{j + 1:02d}/", f"stages.{i}.blocks.{j}."
      for index, letter in enumerate("abc", start=1):
        state[f"{dst}conv{index}.weight"] = oihw(flat[f"{src}{letter}/standardized_conv2d/kernel"])
        state[f"{dst}norm{index}.weight"] = flat[f"{src}{letter}/group_norm/gamma"]
        state[f"{dst}norm{index}.bias"] = flat[f"{src}{letter}/group_norm/beta"]
      if j == 0:
        state[f"{dst}downsample.conv.weight"] = oihw(flat[f"{src}a/proj/standardized_conv2d/kernel"])
  return state


def test_bit_exports_timms_layout_and_round_trips_bit_exactly(tmp_path):
  path, _, _ = make_bit_checkpoint(tmp_path)
  exported = str(tmp_path / "bit.safetensors")
  convert.export_timm(path, exported)
  state = st_numpy.load_file(exported)
  with np.load(path) as npz:
    original = {key: npz[key] for key in npz.files}
  expected = timm_bit_layout_by_hand(original, BIT_UNITS)
  assert sorted(state) == sorted(expected)
  for key, value in expected.items():
    assert state[key].dtype == value.dtype
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  assert state["stages.1.blocks.0.conv1.weight"].shape == (128, 256, 1, 1)  # as timm's resnetv2_50x1_bit
  with safe_open(exported, framework="numpy") as f:
    metadata = f.metadata()
  assert json.loads(metadata[timm_layout.TIMM_METADATA]) == {"layers": list(BIT_UNITS), "width_factor": 1,
                                                         "num_classes": 5, "stem_type": "fixed"}
  assert timm_layout.TIMM_MODEL_METADATA not in metadata  # timm registers no (1, 2, 1, 1) BiT
  assert json.loads(metadata[timm_layout.CONFIG_METADATA])["family"] == "bit"

  back = str(tmp_path / "back.npz")
  convert.import_checkpoint(exported, back)
  with np.load(back) as npz:
    restored = {key: npz[key] for key in npz.files}
  assert sorted(restored) == sorted(original)
  for key, value in original.items():
    assert restored[key].dtype == value.dtype
    np.testing.assert_array_equal(restored[key], value, err_msg=key)
  # A file without vit_jax metadata (timm's own) imports the same.
  bare = str(tmp_path / "bare.safetensors")
  st_numpy.save_file(state, bare)
  flat_back = convert.import_checkpoint(bare, str(tmp_path / "bare.npz")).flat
  assert sorted(flat_back) == sorted(original)


def test_bit_timm_names_and_import_checks(tmp_path):
  for name, timm_name in (("BiT-R50x1", "resnetv2_50x1_bit"), ("BiT-R101x3", "resnetv2_101x3_bit"),
                          ("BiT-R152x4", "resnetv2_152x4_bit")):
    assert timm_layout.timm_bit_name(models.get_model_config(name)) == timm_name
  assert timm_layout.timm_bit_name(models.get_model_config("BiT-R50x1", block_units=BIT_UNITS)) is None
  path, _, _ = make_bit_checkpoint(tmp_path, width_factor=2, num_classes=3)
  exported = str(tmp_path / "wide.safetensors")
  convert.export_timm(path, exported)
  with pytest.raises(UserError, match=r"wide.safetensors is a BiT ResNet-v2 with \(1, 2, 1, 1\) units per stage "
                                      r"\(width 2\) but --model_name=BiT-R50x1 has width 1"):
    convert.import_checkpoint(exported, str(tmp_path / "x.npz"), model_name="BiT-R50x1")
  with pytest.raises(UserError, match=r"holds a BiT ResNet-v2 but --model_name=ViT-B_16 is a Vision Transformer"):
    convert.import_checkpoint(exported, str(tmp_path / "x.npz"), model_name="ViT-B_16")
  narrow, _, _ = make_bit_checkpoint(tmp_path, num_classes=3, name="narrow")
  convert.export_timm(narrow, str(tmp_path / "narrow.safetensors"))
  with pytest.raises(UserError, match=r"does not match model BiT-R50x1: .*resnet/block1/unit02"):
    convert.import_checkpoint(str(tmp_path / "narrow.safetensors"), str(tmp_path / "x.npz"), model_name="BiT-R50x1")
  assert not os.path.exists(tmp_path / "x.npz")
  with pytest.raises(UserError, match="stages.0.blocks.0.ls1.gamma has no BiT counterpart"):
    timm_layout.timm_to_bit({"stem.conv.weight": np.zeros((64, 3, 7, 7)), "stages.0.blocks.0.ls1.gamma": np.zeros(4)})


def test_cnn_has_no_timm_model(tmp_path):
  model = models.get_model("CNN-CIFAR", num_classes=10)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32)))
  tree = {**variables["params"], "batch_stats": variables["batch_stats"]}
  zoo.save(jax.tree.map(lambda v: np.ones(v.shape, np.float32), tree), tmp_path / "cnn.npz")
  with pytest.raises(UserError, match=r"cnn.npz is CNN-CIFAR \(a plain CNN\), which has no timm model"):
    convert.export_timm(str(tmp_path / "cnn.npz"), str(tmp_path / "cnn.safetensors"))
  assert not os.path.exists(tmp_path / "cnn.safetensors")


TIMM_BIT_SCRIPT = r"""
import functools, json, sys
import numpy as np, torch
import timm
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import StdConv2d
from timm.models.resnetv2 import ResNetV2

path, images_path, out_path = sys.argv[1:4]
with safe_open(path, framework="pt") as f:
  metadata = f.metadata()
kwargs = json.loads(metadata["timm_kwargs"])
if "timm_model" in metadata:  # one of timm's registered BiT models
  model = timm.create_model(metadata["timm_model"], pretrained=False, num_classes=kwargs["num_classes"])
else:  # what timm's _create_resnetv2_bit builds, for any layout
  model = ResNetV2(**kwargs, conv_layer=functools.partial(StdConv2d, eps=1e-8))
model = model.float().eval()
model.load_state_dict(load_file(path), strict=True)
with torch.no_grad():
  np.save(out_path, model(torch.from_numpy(np.load(images_path)).permute(0, 3, 1, 2)).numpy())
"""


@pytest.mark.slow
@pytest.mark.skipif(not _peer_available(), reason="needs a .peer venv with torch and timm, and VIT_JAX_PEER_DIR")
@pytest.mark.parametrize("block_units, width_factor", [(BIT_UNITS, 1), ((1, 1, 1, 1), 2), ((3, 4, 6, 3), 1)])
def test_timm_loads_exported_bit_strictly_and_matches(tmp_path, block_units, width_factor):
  path, model, params = make_bit_checkpoint(tmp_path, block_units, width_factor, num_classes=7)
  exported = str(tmp_path / "bit.safetensors")
  convert.export_timm(path, exported)
  with safe_open(exported, framework="numpy") as f:
    assert (f.metadata().get(timm_layout.TIMM_MODEL_METADATA) == "resnetv2_50x1_bit") == (block_units == (3, 4, 6, 3))
  images = np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, images))
  np.save(tmp_path / "images.npy", images)
  (tmp_path / "run_timm.py").write_text(TIMM_BIT_SCRIPT)
  out = subprocess.run([PEER_PYTHON, str(tmp_path / "run_timm.py"), exported, str(tmp_path / "images.npy"),
                        str(tmp_path / "timm.npy")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": PEER_STUB})
  assert out.returncode == 0, out.stderr[-3000:]
  timm_logits = np.load(tmp_path / "timm.npy")
  error = np.linalg.norm(timm_logits - logits) / np.linalg.norm(logits)
  print(f"BiT {block_units}x{width_factor}: relative error timm vs jax {error:.2e}")
  assert timm_logits.shape == logits.shape and error < 1e-4
