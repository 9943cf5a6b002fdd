"""The one door for checkpoint files: which layout a path holds, told by its content, and its parameters in the
zoo's paths with the model fields the tensors cannot show.

Layouts: the zoo's `.npz` (both naming generations; also our `model.npz`), big_vision's `.npz`
(`big_vision_layout`), a Hugging Face transformers ViT directory (`hf`), a timm `.safetensors` file or hub
directory (`timm_layout`), and `hf://ORG/REPO` hub names (`hub`), resolved to a local directory or file first.
PyTorch pickles (`.bin`, `.pth`, `.pt`) are refused, never unpickled.
"""
import dataclasses
import io
import os
import re
import zipfile
from typing import Any, Dict, Optional

from etils import epath
import numpy as np

from vit_jax.errors import UserError
from vit_jax.models import big_vision_layout, hf, hub, timm_layout

ZOO_URL = "https://storage.googleapis.com/vit_models/"
LAYOUTS = ("zoo", "big_vision", "transformers", "timm")

_GROUPNORM_PARAM = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")
ENCODER_BLOCK = re.compile(r"^(Transformer/encoderblock_\d+)/([^/]+)(/.*)$")


@dataclasses.dataclass
class Checkpoint:
  flat: Dict[str, Any]  # {zoo path: array}
  layout: str  # one of LAYOUTS
  fields: Dict[str, Any]  # model fields the file fixes beyond its shapes (GELU form, LayerNorm eps, ...)
  image_size: Optional[int] = None  # the resolution the file says it was trained at, when it says
  path: str = ""  # the local file or directory read


def _to_zoo_names(flat):
  """Renames Linen-era encoder-block submodules and squeezes (1, 1, 1, C) GroupNorm parameters."""
  blocks_in_linen_naming = {m.group(1) for key in flat if (m := ENCODER_BLOCK.match(key))
                            and m.group(2) in ("MultiHeadDotProductAttention_0", "MlpBlock_0")}
  renamed = {}
  for key, value in flat.items():
    m = ENCODER_BLOCK.match(key)
    if m and m.group(1) in blocks_in_linen_naming:
      key = m.group(1) + "/" + big_vision_layout.LINEN_TO_ZOO_BLOCK_NAMES.get(m.group(2), m.group(2)) + m.group(3)
    if _GROUPNORM_PARAM.search(key) and value.ndim == 4:
      value = value.reshape(value.shape[-1])
    renamed[key] = value
  return renamed


def read_npz(path):
  """{key: array} of an `.npz` file, or a UserError saying what is wrong with the file."""
  path = epath.Path(path)
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise UserError(f"checkpoint {path} does not exist; download a zoo file, e.g. "
                    f"`wget {ZOO_URL}imagenet21k/ViT-B_16.npz`, and pass its path") from None
  except IsADirectoryError:
    raise UserError(f"checkpoint {path} is a directory without a transformers or timm config.json; pass the "
                    "checkpoint file in it") from None
  except OSError as e:
    raise UserError(f"cannot read checkpoint {path}: {e}; check the path and its permissions") from None
  except ImportError as e:  # etils needs a filesystem package for gs:// and other remote URLs
    raise UserError(f"cannot read {path}: {e} (pip install 'vit_jax[gcs]'), or download the file and pass "
                    "its local path") from None
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      return {key: npz[key] for key in npz.files}
  except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
    raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}); "
                    "download it again") from None


def _refuse_pickle(path):
  raise UserError(f"{path} is a PyTorch pickle, which vit_jax never loads (unpickling runs code from the file); "
                  "save it as safetensors (transformers: save_pretrained(..., safe_serialization=True); timm: "
                  "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) and pass that")


def read(path, *, num_heads=None) -> Checkpoint:
  """The checkpoint at `path` (file, directory, gs:// or other epath URL, or `hf://` name) in the zoo's paths.
  `num_heads` splits fused attention weights of timm files that do not record it."""
  path = str(path)
  if hub.is_hub_name(path):
    path = hub.resolve(path)
  lower = path.lower()
  if lower.endswith(hub.PICKLE_SUFFIXES):
    _refuse_pickle(path)
  if os.path.isdir(path):
    if hf.is_hf_dir(path):
      flat, fields, image_size = hf.read(path)
      return Checkpoint(flat, "transformers", fields, image_size, path)
    if timm_layout.is_timm_dir(path):
      flat, fields, image_size = timm_layout.read(path, num_heads)
      return Checkpoint(flat, "timm", fields, image_size, path)
    hf.check_not_other_architecture(path)
    files = sorted(os.listdir(path))
    pickles = [f for f in files if f.lower().endswith(hub.PICKLE_SUFFIXES)]
    if pickles and not any(f.endswith((".safetensors", ".npz")) for f in files):
      _refuse_pickle(os.path.join(path, pickles[0]))
    weights = [f for f in files if f.endswith((".safetensors", ".npz"))]
    if len(weights) == 1:
      return read(os.path.join(path, weights[0]), num_heads=num_heads)
    raise UserError(f"{path} is a directory without a transformers or timm config.json and "
                    f"{'several' if weights else 'no'} .npz/.safetensors files; pass the checkpoint file itself")
  if lower.endswith(".safetensors"):
    flat, fields, image_size = timm_layout.read(path, num_heads)
    return Checkpoint(flat, "timm", fields, image_size, path)
  if not lower.endswith(".npz"):
    raise UserError(f"checkpoint {path} is not an .npz, a .safetensors or a transformers/timm directory; pass a "
                    f"model-zoo .npz such as {ZOO_URL}imagenet21k/ViT-B_16.npz (or the model.npz of a finished run)")
  flat = read_npz(path)
  if not flat:
    raise UserError(f"checkpoint {path} holds no arrays; download it again")
  if big_vision_layout.is_big_vision(flat):
    return Checkpoint(big_vision_layout.to_zoo(flat, path), "big_vision",
                      {"gelu_approximate": True, "layer_norm_eps": 1e-6}, None, path)
  return Checkpoint(_to_zoo_names(flat), "zoo", {}, None, path)
