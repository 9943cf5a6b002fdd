"""Throughput of the input pipeline alone (no model, no device transfer), per grain worker count.

  python -m vit_jax.tools.data_benchmark --dataset=/path/to/folder --workers=0,1,2
  python -m vit_jax.tools.data_benchmark --make_jpeg_folder=/tmp/jpegs --workers=0,1,2   # synthetic 500x375 JPEGs
  python -m vit_jax.tools.data_benchmark --make_jpeg_folder=/tmp/jpegs --workers=0,1,2 --randaug=2,10  # RandAugment

Measured figures are in docs/benchmarks.md.
"""
import os
import time

from absl import flags
import numpy as np
from PIL import Image

from vit_jax.data import pipeline
from vit_jax.data import randaugment
from vit_jax.errors import UserError
from vit_jax.tools import cli

FLAGS = flags.FLAGS


def define_flags():
  cli.define_flags("dataset", "split", "tfds_data_dir", "batch", split="train", batch=32)
  flags.DEFINE_string("make_jpeg_folder", None, "Write a synthetic folder of 500x375 JPEGs here and use it.")
  flags.DEFINE_integer("num_images", 400, "Images in the synthetic folder.")
  flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to measure.")
  flags.DEFINE_integer("crop", 224, "Output size.")
  flags.DEFINE_string("augment", "inception_crop", "pp.augment.")
  flags.DEFINE_list("randaug", [], "pp.randaug as N,M: RandAugment with N ops at magnitude M, e.g. 2,10; empty = off.")
  flags.DEFINE_integer("read_threads", 2, "Reader threads per process.")
  flags.DEFINE_float("seconds", 15.0, "Measuring time per worker count (after warm-up).")


def make_jpeg_folder(root, num_images, size=(500, 375), num_classes=4, seed=0):
  """Smooth random colour images (upsampled noise: JPEG sizes like photos, not like flat colour)."""
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    folder = os.path.join(root, "train", f"class{i % num_classes}")
    os.makedirs(folder, exist_ok=True)
    small = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8))
    noise = rng.integers(-20, 20, (size[1], size[0], 3))
    img = np.asarray(small.resize(size, Image.Resampling.BICUBIC), np.int64) + noise
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
  return root


def measure(seconds, **train_dataset_kwargs):
  """Examples per second of `pipeline.host_train_dataset(**train_dataset_kwargs)` as one process."""
  ds, _ = pipeline.host_train_dataset(process_index=0, process_count=1, **train_dataset_kwargs)
  it = iter(ds)
  next(it)  # warm-up: worker start, first batch
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    n += next(it)["image"].shape[0]
  rate = n / (time.perf_counter() - start)
  if hasattr(it, "close"):
    it.close()
  return rate


def parse_randaug_flag(values):
  """--randaug=N,M (a list of strings) -> pp.randaug: (N, M), or () when empty."""
  shown = ",".join(values)
  try:
    value = tuple(int(v) if i == 0 else float(v) for i, v in enumerate(values))
  except ValueError:
    raise UserError(f"--randaug={shown}: must be N,M with N an int and M a number; e.g. --randaug=2,10") from None
  return randaugment.parse_randaug(value, setting="--randaug", example="--randaug=2,10", shown=shown,
                                   off="--randaug=") or ()


def main():
  dataset = FLAGS.dataset
  if FLAGS.make_jpeg_folder:
    dataset = make_jpeg_folder(FLAGS.make_jpeg_folder, FLAGS.num_images)
  if not dataset:
    raise UserError("give --dataset or --make_jpeg_folder")
  try:
    worker_counts = [int(w) for w in FLAGS.workers]
  except ValueError:
    raise UserError(f"--workers={','.join(FLAGS.workers)} must be integers, e.g. --workers=0,1,2") from None
  randaug = parse_randaug_flag(FLAGS.randaug)
  print(f"dataset={dataset} split={FLAGS.split} crop={FLAGS.crop} augment={FLAGS.augment} "
        f"randaug={','.join(FLAGS.randaug) or 'off'} batch={FLAGS.batch} read_threads={FLAGS.read_threads} "
        f"cpus={os.cpu_count()}")
  for workers in worker_counts:
    rate = measure(FLAGS.seconds, dataset=dataset, split=FLAGS.split,
                   pp=dict(crop=FLAGS.crop, resize=None, augment=FLAGS.augment, randaug=randaug, mixup=0.0),
                   batch=FLAGS.batch, seed=0, tfds_data_dir=FLAGS.tfds_data_dir, num_workers=workers,
                   read_threads=FLAGS.read_threads, batch_key="--batch")
    per = f" ({rate / workers:.0f} img/s per worker)" if workers else ""
    print(f"workers={workers}: {rate:.0f} img/s{per}", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
