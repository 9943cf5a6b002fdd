"""Prepares a TFDS catalog dataset in ArrayRecord format, for random access by the training pipeline.

  python -m vit_jax.tools.prepare_data --dataset=cifar10 [--data_dir=DIR] [--manual_dir=DIR]

TFDS shows download and generation progress bars. Builders that encode images from arrays (cifar10,
cifar100, mnist, ...) need TensorFlow for that step only: pip install 'vit_jax[tfds]' (tensorflow-cpu).
"""
from absl import app
from absl import flags

from vit_jax.data import sources
from vit_jax.errors import run_cli
from vit_jax.errors import UserError

_DATASET = flags.DEFINE_string("dataset", None, "TFDS catalog name, e.g. cifar10, imagenet2012.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default ~/tensorflow_datasets).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with manually downloaded files (imagenet2012).")


def prepare(name: str, data_dir=None, manual_dir=None):
  """Downloads and writes `name` as ArrayRecord; returns the builder. UserError on anything the user can fix."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if sources.dataset_kind(name) != "tfds":
    raise UserError(f"--dataset={name!r} is not a TFDS name; 'digits' and image folders need no preparation")
  builder = sources.tfds_builder(name, data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  tfds.display_progress_bar(True)
  try:
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] == "tensorflow":
      raise UserError(f"preparing {name!r} needs TensorFlow to encode its images: pip install 'vit_jax[tfds]' "
                      "(tensorflow-cpu), then rerun this command; training itself does not need it") from None
    raise
  except AssertionError as e:  # TFDS asserts on a missing manual_dir
    if "manual" in str(e).lower():
      raise UserError(f"{name!r} needs files you download yourself: {' '.join(str(e).split())[:400]} "
                      "Then pass --manual_dir=DIR") from None
    raise
  return builder


def main(argv):
  del argv
  if not _DATASET.value:
    raise UserError("--dataset is required, e.g. --dataset=cifar10")
  builder = prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value)
  print(f"{_DATASET.value} is ready in {builder.data_dir}: train with --config.dataset={_DATASET.value}"
        + (f" --config.tfds_data_dir={_DATA_DIR.value}" if _DATA_DIR.value else ""))


if __name__ == "__main__":
  app.run(lambda argv: run_cli(main, argv))
