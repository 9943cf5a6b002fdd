"""Image files given on a command line: expand folders, read and preprocess each file as the test split is.

Each file goes through the data module's test preprocessing (`vit_jax.data.preprocess.EvalPreprocess`: decode any
PIL format and mode, resize to `pp.crop`, or to `pp.resize` then central-crop, scale to [-1, 1]), so a model
sees a single image exactly as it saw its evaluation images. A file that cannot be read or decoded is reported
back, not raised, so that callers can skip and count it.
"""
import os

import numpy as np

from vit_jax.data import preprocess
from vit_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def expand(paths):
  """(files, any_folder): the files named, plus the image files under each folder named (recursively, sorted)."""
  files, any_folder = [], False
  for path in paths:
    if os.path.isdir(path):
      any_folder = True
      found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                     if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))
      if not found:
        raise UserError(f"folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
      files.extend(found)
    elif os.path.exists(path) or os.path.islink(path):
      files.append(path)  # any extension: the decoder decides
    else:
      raise UserError(f"image {path} does not exist; pass image files or folders of images")
  if not files:
    raise UserError("no images given; pass image files or folders, e.g. `python -m vit_jax.tools.infer "
                    "--checkpoint=runs/quickstart cat.jpg photos/`")
  return files, any_folder


def load(path, pp):
  """(image float32 [crop, crop, 3] in [-1, 1], None), or (None, reason) when the file cannot be used.

  `pp`: any mapping with 'crop' and optionally 'resize' (the run's `config.pp`, or a dict), used as given.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return None, e.strerror or str(e)
  example = preprocess.EvalPreprocess(pp)({"image": data, "label": 0, "id": path})
  if example["_skipped"]:
    note = example["_skipped"]  # "<id> (<reason>)"
    return None, note[len(path) + 2:-1] if note.startswith(path + " (") else note
  return example["image"], None


def batches(paths, pp, batch_size):
  """Yields (paths, images [n, crop, crop, 3]) of readable files, and (path, reason) lists of skipped ones."""
  good_paths, images, skipped = [], [], []
  for path in paths:
    image, reason = load(path, pp)
    if image is None:
      skipped.append((path, reason))
      continue
    good_paths.append(path)
    images.append(image)
    if len(images) == batch_size:
      yield good_paths, np.stack(images), skipped
      good_paths, images, skipped = [], [], []
  if images or skipped:
    yield good_paths, (np.stack(images) if images else None), skipped
