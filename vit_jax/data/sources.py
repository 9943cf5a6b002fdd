"""Random-access sources of raw examples: TFDS (ArrayRecord), image folders, and the bundled `digits`.

Every source is a picklable sequence (grain workers unpickle it) whose items are raw records
`{'image': encoded bytes | uint8 array, 'label': int, 'id': str}`; decoding happens later, in the
preprocessing of each worker, so that a corrupt image is caught, counted and skipped there.

`dataset` (the training config's `dataset`) selects the kind: `digits`, an existing directory (or anything
containing a path separator) for an image folder, otherwise a TFDS catalog name.
"""
import dataclasses
import difflib
import os
import re
import types

from absl import logging
import numpy as np

from vit_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# digits: a fixed stratified split (20% test) so every run and every host agrees on it.
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int  # of train_split, after split slicing
  num_eval_examples: int  # of test_split, after split slicing
  class_names: tuple[str, ...]


def dataset_kind(dataset: str) -> str:
  if dataset == "digits":
    return "digits"
  if os.sep in dataset or "/" in dataset or os.path.isdir(dataset):
    return "folder"
  return "tfds"


class IndexedSource:
  """A sequence of raw records; the common shape of all sources."""

  def __init__(self, records_fn, num, class_names, description):
    self._records_fn = records_fn
    self._num = num
    self.class_names = tuple(class_names)
    self.description = description  # e.g. "cifar10:train[:98%]", used in messages

  def __len__(self):
    return self._num

  def __getitem__(self, index):
    return self._records_fn(index)


def _resolve_split(spec: str, split_sizes: dict, what: str) -> list:
  """TFDS split syntax (`train[:98%]`, `a+b`) over named splits -> [(split, start, stop)]."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  sizes = {k: types.SimpleNamespace(num_examples=v) for k, v in split_sizes.items()}
  try:
    absolute = tfds.core.ReadInstruction.from_spec(spec).to_absolute(sizes)
  except (ValueError, AssertionError) as e:
    raise UserError(f"bad split {spec!r} for {what}: {e} Splits that exist: {sorted(split_sizes)}") from None
  return [(a.splitname, a.from_ or 0, split_sizes[a.splitname] if a.to is None else a.to) for a in absolute]


# ---------------------------------------------------------------------------------------------- digits


class _DigitsRecords:
  """Picklable: holds the selected uint8 images and labels."""

  def __init__(self, images, labels, ids):
    self.images, self.labels, self.ids = images, labels, ids

  def __call__(self, index):
    return {"image": self.images[index], "label": int(self.labels[index]), "id": self.ids[index]}


def _digits_arrays():
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("dataset 'digits' ships with scikit-learn, which is not installed: "
                    "pip install scikit-learn") from None
  x, y = load_digits(return_X_y=True)  # 1,797 x 64, values 0..16
  images = np.round(x.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)  # grey -> RGB, as the models expect 3 channels
  idx = np.arange(len(y))
  train_idx, test_idx = train_test_split(
      idx, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=DIGITS_SPLIT_SEED)
  return {"train": np.sort(train_idx), "test": np.sort(test_idx)}, images, y


def _digits_source(split: str) -> IndexedSource:
  """`split`: TFDS syntax over `train` and `test`, or `train_K_per_class`: the first K training digits of each class
  (a fixed labelled subset for few-label fine-tuning)."""
  splits, images, labels = _digits_arrays()
  if match := re.fullmatch(r"train_(\d+)_per_class", split):
    per_class = int(match.group(1))
    train = splits["train"]
    if not 1 <= per_class <= min(np.bincount(labels[train])):
      raise UserError(f"split {split!r} of dataset 'digits' needs 1 to {min(np.bincount(labels[train]))} images per "
                      "class; pick K in that range")
    sel = np.sort(np.concatenate([train[labels[train] == c][:per_class] for c in range(10)]))
  else:
    parts = _resolve_split(split, {k: len(v) for k, v in splits.items()}, "dataset 'digits'")
    sel = np.concatenate([splits[name][a:b] for name, a, b in parts])
  records = _DigitsRecords(images[sel], labels[sel], [f"digits[{i}]" for i in sel])
  return IndexedSource(records, len(sel), [str(i) for i in range(10)], f"digits:{split}")


# ----------------------------------------------------------------------------------------- image folder


class _FileRecords:
  """Picklable: reads one file's bytes per index; decoding (and its failures) happens in preprocessing."""

  def __init__(self, paths, labels):
    self.paths, self.labels = paths, labels

  def __call__(self, index):
    path = self.paths[index]
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      data = None  # counted as unreadable by preprocessing, like a corrupt file
      logging.debug("cannot read %s: %s", path, e)
    return {"image": data, "label": int(self.labels[index]), "id": path}


def _list_dir(path):
  return sorted(e for e in os.listdir(path) if not e.startswith("."))


def folder_classes(root: str) -> list:
  """Class names: the sorted union of class folders over all splits, so label ids agree across splits."""
  names = set()
  for split in _list_dir(root):
    if os.path.isdir(os.path.join(root, split)):
      names.update(c for c in _list_dir(os.path.join(root, split))
                   if os.path.isdir(os.path.join(root, split, c)))
  return sorted(names)


def _folder_source(root: str, split: str) -> IndexedSource:
  if not os.path.isdir(root):
    raise UserError(f"dataset {root!r} is not a directory; expected an image folder ROOT/{{split}}/{{class}}/*.jpg, "
                    "'digits', or a TFDS name")
  splits = [s for s in _list_dir(root) if os.path.isdir(os.path.join(root, s))]
  if not splits:
    raise UserError(f"image folder {root!r} has no split folders; expected ROOT/{{split}}/{{class}}/*.jpg "
                    "(e.g. ROOT/train/cat/1.jpg)")
  classes = folder_classes(root)
  if not classes:
    raise UserError(f"image folder {root!r} has no class folders; expected ROOT/{{split}}/{{class}}/*.jpg")
  label_of = {c: i for i, c in enumerate(classes)}
  files = {}
  for s in splits:
    files[s] = [(os.path.join(root, s, c, f), label_of[c])
                for c in _list_dir(os.path.join(root, s)) if os.path.isdir(os.path.join(root, s, c))
                for f in _list_dir(os.path.join(root, s, c)) if f.lower().endswith(IMAGE_EXTENSIONS)]
  parts = _resolve_split(split, {k: len(v) for k, v in files.items()}, f"image folder {root!r}")
  for name, _, _ in parts:
    if not files[name]:
      raise UserError(f"split {name!r} of image folder {root!r} has no images "
                      f"({', '.join(IMAGE_EXTENSIONS)}) under {os.path.join(root, name)}/{{class}}/")
  chosen = [item for name, a, b in parts for item in files[name][a:b]]
  if not chosen:
    raise UserError(f"split {split!r} of image folder {root!r} selects no images")
  records = _FileRecords([p for p, _ in chosen], np.array([l for _, l in chosen], np.int64))
  return IndexedSource(records, len(chosen), classes, f"{root}:{split}")


# ------------------------------------------------------------------------------------------------- tfds


def prepare_command(name: str, data_dir) -> str:
  cmd = f"python -m vit_jax.tools.prepare_data --dataset={name}"
  return cmd + (f" --tfds_data_dir={data_dir}" if data_dir else "")


def tfds_builder(name: str, data_dir, **builder_kwargs):
  """The TFDS builder, or a UserError naming close matches when the name is unknown."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir, **builder_kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    try:  # the catalog shipped with TFDS; community datasets would need the network
      catalog = tfds.list_builders(with_community_datasets=False)
    except Exception:  # pylint: disable=broad-except  # only a hint
      catalog = []
    close = difflib.get_close_matches(name, catalog, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(f"unknown dataset {name!r}: not 'digits', not an existing folder, and not in the TFDS catalog."
                    f"{hint} All TFDS names: python -c 'import tensorflow_datasets as t; print(t.list_builders(with_community_datasets=False))'"
                    ) from None


class _TfdsRecords:
  """Picklable: TFDS's ArrayRecord data sources are designed to be shipped to grain workers."""

  def __init__(self, data_source, image_key, label_key, description):
    self.data_source, self.image_key, self.label_key = data_source, image_key, label_key
    self.description = description

  def __call__(self, index):
    ex = self.data_source[index]
    return {"image": ex[self.image_key], "label": int(ex[self.label_key]),
            "id": f"{self.description}[{index}]"}


def _tfds_source(name: str, split: str, data_dir, image_key="image", label_key="label") -> IndexedSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_builder(name, data_dir)
  features = builder.info.features
  for key in (image_key, label_key):
    if key not in features:
      raise UserError(f"TFDS dataset {name!r} has no feature {key!r} (it has {sorted(features.keys())}); "
                      "image classification needs an image and a class label")
  # download=False: never enter TFDS's download (and its retry loop) at train time; preparing is explicit.
  # SkipDecoding: we get the encoded bytes and decode them with PIL in the workers (no TensorFlow needed).
  try:
    data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                   decoders={image_key: tfds.decode.SkipDecoding()})
  except ValueError as e:  # bad split syntax or unknown split; TFDS lists the splits that exist
    if "split" in str(e).lower():
      raise UserError(f"bad split {split!r} for TFDS dataset {name!r}: {e}") from None
    raise
  except (NotImplementedError, AssertionError, FileNotFoundError, KeyError) as e:
    # KeyError: TFDS found a dataset folder without generated splits.
    if not builder.is_prepared():
      raise UserError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root}; prepare it once "
                      f"with: {prepare_command(name, data_dir)}") from None
    raise UserError(f"TFDS dataset {name!r} in {builder.data_dir} cannot be read with random access "
                    f"({e}); re-prepare it in ArrayRecord format: {prepare_command(name, data_dir)}") from None
  label = features[label_key]
  names = getattr(label, "names", None) or [str(i) for i in range(label.num_classes)]
  description = f"{name}:{split}"
  return IndexedSource(_TfdsRecords(data_source, image_key, label_key, description),
                       len(data_source), names, description)


# ---------------------------------------------------------------------------------------------- public


def open_source(dataset: str, split: str, *, tfds_data_dir=None) -> IndexedSource:
  """The source for `split` (TFDS split syntax) of `dataset`; `tfds_data_dir` only matters for TFDS names."""
  if not isinstance(dataset, str) or not dataset:
    raise UserError(f"dataset={dataset!r} names no dataset: set config.dataset to a TFDS name (e.g. cifar10), "
                    "'digits' or the path of an image folder")
  kind = dataset_kind(dataset)
  if kind == "digits":
    return _digits_source(split)
  if kind == "folder":
    return _folder_source(os.path.expanduser(dataset), split)
  return _tfds_source(dataset, split, tfds_data_dir)


def get_dataset_info(dataset: str, *, train_split: str, test_split: str, tfds_data_dir=None) -> DatasetInfo:
  """Class names and split sizes, which the model and the schedules need before any pipeline exists."""
  train = open_source(dataset, train_split, tfds_data_dir=tfds_data_dir)
  test = open_source(dataset, test_split, tfds_data_dir=tfds_data_dir)
  return DatasetInfo(num_classes=len(train.class_names), num_train_examples=len(train),
                     num_eval_examples=len(test), class_names=train.class_names)
