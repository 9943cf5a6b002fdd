"""Hugging Face transformers' ViT layout (`ViTForImageClassification` / `ViTModel` as `save_pretrained` writes
them: `model.safetensors` + `config.json`) to and from the zoo's parameter paths. Exact both ways (transposes and
reshapes only).

Keys, with `vit.` in front for `ViTForImageClassification` (none for a bare `ViTModel`):
`embeddings.{cls_token, position_embeddings, patch_embeddings.projection.{weight,bias}}`,
`encoder.layer.{i}.attention.attention.{query,key,value}.{weight,bias}`, `...attention.output.dense.*`,
`...intermediate.dense.*`, `...output.dense.*`, `...layernorm_{before,after}.*`, `layernorm.*`; `classifier.*`
(the head) and `pooler.dense.*` (the in21k models' tanh representation layer, the zoo's `pre_logits`).
transformers' defaults differ from the zoo's numerics: exact GELU (`hidden_act="gelu"`) and LayerNorm eps 1e-12;
`model_fields` carries the file's into the model (`gelu_approximate`, `layer_norm_eps`) so logits match its own.
"""
import json
import os
import re

import numpy as np

from vit_jax.errors import UserError
from vit_jax.models import timm_layout  # its safetensors reading and writing

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# hidden_act values: the exact GELU, or its tanh approximation (the zoo's).
EXACT_GELU = ("gelu",)
TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_ZOO_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_ATTENTION = "MultiHeadDotProductAttention_1"
# zoo block path -> HF layer path (Linear weights are (out, in): transposed)
_BLOCK_NAMES = {
    "LayerNorm_0/scale": "layernorm_before.weight", "LayerNorm_0/bias": "layernorm_before.bias",
    "LayerNorm_2/scale": "layernorm_after.weight", "LayerNorm_2/bias": "layernorm_after.bias",
    "MlpBlock_3/Dense_0/kernel": "intermediate.dense.weight", "MlpBlock_3/Dense_0/bias": "intermediate.dense.bias",
    "MlpBlock_3/Dense_1/kernel": "output.dense.weight", "MlpBlock_3/Dense_1/bias": "output.dense.bias",
    f"{_ATTENTION}/out/kernel": "attention.output.dense.weight",
    f"{_ATTENTION}/out/bias": "attention.output.dense.bias",
    **{f"{_ATTENTION}/{n}/{p}": f"attention.attention.{n}.{'weight' if p == 'kernel' else 'bias'}"
       for n in ("query", "key", "value") for p in ("kernel", "bias")},
}
_TOP_NAMES = {
    "cls": "embeddings.cls_token", "Transformer/posembed_input/pos_embedding": "embeddings.position_embeddings",
    "embedding/kernel": "embeddings.patch_embeddings.projection.weight",
    "embedding/bias": "embeddings.patch_embeddings.projection.bias",
    "Transformer/encoder_norm/scale": "layernorm.weight", "Transformer/encoder_norm/bias": "layernorm.bias",
    "pre_logits/kernel": "pooler.dense.weight", "pre_logits/bias": "pooler.dense.bias",
}
_HEAD_NAMES = {"head/kernel": "classifier.weight", "head/bias": "classifier.bias"}


def is_hf_vit_config(config):
  return isinstance(config, dict) and config.get("model_type") == "vit"


def is_hf_dir(path):
  """True for a directory holding a transformers ViT's `config.json` (model_type vit)."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not (os.path.isdir(path) and os.path.isfile(config_path)):
    return False
  try:
    with open(config_path, encoding="utf-8") as f:
      return is_hf_vit_config(json.load(f))
  except (OSError, ValueError):
    return False


def check_not_other_architecture(path):
  """UserError when a directory holds a transformers `config.json` of another architecture (DeiT, Swin, CLIP...)."""
  try:
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError):
    return
  if isinstance(config, dict) and config.get("model_type") not in (None, "vit"):
    architectures = ", ".join(config.get("architectures") or []) or "its model"
    raise UserError(f"{path}/{CONFIG_FILE} is a transformers {config['model_type']!r} model ({architectures}); only "
                    "transformers' ViT (model_type 'vit': ViTForImageClassification, ViTModel) is read here")


def model_fields(hf_config, representation_size=None):
  """The registry model fields of a transformers ViTConfig dict: sizes, patch, classifier, GELU form and LayerNorm
  eps; `representation_size`: the pooler's width when the checkpoint has one."""
  act = hf_config.get("hidden_act", "gelu")
  if act not in EXACT_GELU + TANH_GELU:
    raise UserError(f"config.json has hidden_act={act!r}; a ViT here uses GELU, exact ({', '.join(EXACT_GELU)}) or "
                    f"tanh ({', '.join(TANH_GELU)})")
  if not hf_config.get("qkv_bias", True):
    raise UserError("config.json has qkv_bias=false; the ViTs here have query/key/value biases")
  patch = hf_config.get("patch_size", 16)
  hidden = hf_config.get("hidden_size", 768)
  return {
      "hidden_size": hidden,
      "patches": {"size": (patch, patch)},
      "transformer": {"num_layers": hf_config.get("num_hidden_layers", 12),
                      "num_heads": hf_config.get("num_attention_heads", 12),
                      "mlp_dim": hf_config.get("intermediate_size", 3072), "dropout_rate": 0.0,
                      "attention_dropout_rate": 0.0},
      "classifier": "token",
      "representation_size": representation_size,
      "layer_norm_eps": float(hf_config.get("layer_norm_eps", 1e-12)),
      "gelu_approximate": act in TANH_GELU,
  }


def _prefix(state):
  return "vit." if any(k.startswith("vit.") for k in state) else ""


def hf_to_zoo(state, num_heads):
  """{zoo path: array} of a transformers ViT state dict (numpy arrays); `num_heads` splits the attention."""
  prefix = _prefix(state)
  flat, used = {}, set()

  def take(key):
    used.add(key)
    return np.asarray(state[key])

  for zoo_key, hf_key in _TOP_NAMES.items():
    if prefix + hf_key in state:
      flat[zoo_key] = _from_hf(zoo_key, take(prefix + hf_key), num_heads)
  for zoo_key, hf_key in _HEAD_NAMES.items():
    if hf_key in state:
      flat[zoo_key] = _from_hf(zoo_key, take(hf_key), num_heads)
  layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k[len(prefix):]))}
  for layer in sorted(layers):
    for zoo_name, hf_name in _BLOCK_NAMES.items():
      hf_key = f"{prefix}encoder.layer.{layer}.{hf_name}"
      if hf_key not in state:
        raise UserError(f"the transformers checkpoint has no {hf_key}; is it a complete ViT file?")
      flat[f"Transformer/encoderblock_{layer}/{zoo_name}"] = _from_hf(zoo_name, take(hf_key), num_heads)
  unknown = sorted(set(state) - used)
  if unknown:
    raise UserError(f"the transformers checkpoint has {len(unknown)} key(s) a ViT here does not, e.g. "
                    f"{', '.join(unknown[:4])}")
  return flat


def zoo_to_hf(flat, *, with_vit_prefix=True):
  """The transformers state dict ({key: array}) of flat zoo params (`ViTForImageClassification` keys when
  `with_vit_prefix`); the inverse of `hf_to_zoo`."""
  prefix = "vit." if with_vit_prefix else ""
  state = {}
  for zoo_key, value in flat.items():
    value = np.asarray(value)
    if zoo_key in _TOP_NAMES:
      state[prefix + _TOP_NAMES[zoo_key]] = _to_hf(zoo_key, value)
    elif zoo_key in _HEAD_NAMES:
      state[_HEAD_NAMES[zoo_key]] = _to_hf(zoo_key, value)
    elif m := _ZOO_BLOCK.match(zoo_key):
      if m.group(2) not in _BLOCK_NAMES:
        raise UserError(f"parameter {zoo_key} has no place in a transformers ViT")
      state[f"{prefix}encoder.layer.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"] = _to_hf(m.group(2), value)
    else:
      raise UserError(f"parameter {zoo_key} has no place in a transformers ViT (a hybrid's ResNet stem, a scanned "
                      "layout or another family cannot be exported to this layout)")
  return state


def _from_hf(zoo_name, value, num_heads):
  """One array, HF -> zoo."""
  if zoo_name == "embedding/kernel":  # OIHW -> HWIO
    return value.transpose(2, 3, 1, 0)
  if re.search(r"/(query|key|value)/kernel$", zoo_name):  # (out, in) -> (in, heads, head_dim)
    return value.T.reshape(value.shape[1], num_heads, -1)
  if re.search(r"/(query|key|value)/bias$", zoo_name):
    return value.reshape(num_heads, -1)
  if zoo_name.endswith("/out/kernel"):  # (out, in) -> (heads, head_dim, out)
    return value.T.reshape(num_heads, -1, value.shape[0])
  if zoo_name.endswith("kernel"):  # Linear (out, in) -> (in, out)
    return value.T
  return value


def _to_hf(zoo_name, value):
  """One array, zoo -> HF."""
  if zoo_name == "embedding/kernel":
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if re.search(r"/(query|key|value)/kernel$", zoo_name):
    return np.ascontiguousarray(value.reshape(value.shape[0], -1).T)
  if re.search(r"/(query|key|value)/bias$", zoo_name):
    return value.reshape(-1)
  if zoo_name.endswith("/out/kernel"):
    return np.ascontiguousarray(value.reshape(-1, value.shape[-1]).T)
  if zoo_name.endswith("kernel"):
    return np.ascontiguousarray(value.T)
  return value


def hf_config(model_config, num_labels, image_size, class_names=None):
  """The transformers `config.json` dict of a plain ViT (`ViTForImageClassification`)."""
  if model_config.get("resnet") is not None or not model_config.get("transformer"):
    raise UserError(f"{model_config.get('model_name') or 'this model'} is not a plain ViT; transformers' ViT "
                    "layout holds plain ViTs only")
  for option in ("num_registers", "no_embed_class", "layer_scale_init", "fc_norm"):
    if model_config.get(option):
      raise UserError(f"{model_config.get('model_name') or 'this model'} has {option}={model_config[option]}, which "
                      "transformers' ViT cannot express; export it to timm's layout (--output=FILE.safetensors)")
  if model_config.get("classifier", "token") != "token":
    raise UserError(f"classifier={model_config.get('classifier')!r}: transformers' ViT classifies from the class "
                    "token only")
  patch = tuple(model_config["patches"]["size"])
  if patch[0] != patch[1]:
    raise UserError(f"patch size {patch} is not square, which transformers' ViTConfig cannot express")
  transformer = model_config["transformer"]
  labels = list(class_names) if class_names else [str(i) for i in range(num_labels)]
  return {
      "model_type": "vit", "architectures": ["ViTForImageClassification"],
      "hidden_size": model_config["hidden_size"], "num_hidden_layers": transformer["num_layers"],
      "num_attention_heads": transformer["num_heads"], "intermediate_size": transformer["mlp_dim"],
      "hidden_act": "gelu_pytorch_tanh" if model_config.get("gelu_approximate", True) else "gelu",
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
      "layer_norm_eps": model_config.get("layer_norm_eps", 1e-6), "image_size": int(image_size),
      "patch_size": patch[0], "num_channels": 3, "qkv_bias": True, "encoder_stride": patch[0],
      "id2label": {str(i): name for i, name in enumerate(labels)},
      "label2id": {name: i for i, name in enumerate(labels)}, "torch_dtype": "float32",
  }


def read(path):
  """(flat zoo params, model fields, image size) of a transformers ViT directory (`config.json` +
  `model.safetensors`), as `save_pretrained` writes it."""
  config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
  if not is_hf_dir(path):
    raise UserError(f"{path} is not a transformers ViT directory (no {CONFIG_FILE} with model_type 'vit')")
  if not os.path.isfile(weights_path):
    raise UserError(f"{path} has no {WEIGHTS_FILE}; save the model with save_pretrained(..., "
                    "safe_serialization=True)")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  state, _ = timm_layout.read_safetensors(weights_path)
  flat = hf_to_zoo(state, config.get("num_attention_heads", 12))
  pre_logits = flat.get("pre_logits/kernel")
  fields = model_fields(config, None if pre_logits is None else pre_logits.shape[-1])
  return flat, fields, int(config.get("image_size", 224))


def write(flat, model_config, path, *, num_labels, image_size, class_names=None):
  """Writes `flat` zoo params of a plain ViT as a transformers `ViTForImageClassification` directory."""
  config = hf_config(model_config, num_labels, image_size, class_names)
  state = zoo_to_hf(flat)
  os.makedirs(path, exist_ok=True)
  timm_layout.safetensors_numpy().save_file(state, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return state
