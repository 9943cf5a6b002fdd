"""Prepares a TFDS catalog dataset in ArrayRecord format, for random access by the training pipeline.

  python -m vit_jax.tools.prepare_data --dataset=cifar10 [--tfds_data_dir=DIR] [--manual_dir=DIR]

TFDS shows download and generation progress bars. Builders that encode images from arrays (cifar10,
cifar100, mnist, ...) need TensorFlow for that step only: pip install 'vit_jax[tfds]' (tensorflow-cpu).
"""
from absl import flags

from vit_jax.data import sources
from vit_jax.errors import UserError
from vit_jax.tools import cli

FLAGS = flags.FLAGS


def define_flags():
  cli.define_flags("dataset", "tfds_data_dir")
  flags.DEFINE_string("manual_dir", None, "Folder with manually downloaded files (imagenet2012).")


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


def main():
  if not FLAGS.dataset:
    raise UserError("--dataset is required, e.g. --dataset=cifar10")
  builder = prepare(FLAGS.dataset, FLAGS.tfds_data_dir, FLAGS.manual_dir)
  print(f"{FLAGS.dataset} is ready in {builder.data_dir}: train with --config.dataset={FLAGS.dataset}"
        + (f" --config.tfds_data_dir={FLAGS.tfds_data_dir}" if FLAGS.tfds_data_dir else ""))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
