"""Throughput of the input pipeline alone (no model, no device transfer), per grain worker count.

  python -m vit_jax.tools.data_benchmark --dataset=/path/to/folder --workers=0,1,2
  python -m vit_jax.tools.data_benchmark --make_jpeg_folder=/tmp/jpegs --workers=0,1,2   # synthetic 500x375 JPEGs

Measured figures are in docs/benchmarks.md.
"""
import os
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from vit_jax.data import pipeline
from vit_jax.errors import run_cli
from vit_jax.errors import UserError

_DATASET = flags.DEFINE_string("dataset", None, "Dataset (TFDS name, folder, digits).")
_MAKE = flags.DEFINE_string("make_jpeg_folder", None, "Write a synthetic folder of 500x375 JPEGs here and use it.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 400, "Images in the synthetic folder.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to measure.")
_CROP = flags.DEFINE_integer("crop", 224, "Output size.")
_AUGMENT = flags.DEFINE_string("augment", "inception_crop", "pp.augment.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_READ_THREADS = flags.DEFINE_integer("read_threads", 2, "Reader threads per process.")
_SECONDS = flags.DEFINE_float("seconds", 15.0, "Measuring time per worker count (after warm-up).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir.")


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


def main(argv):
  del argv
  dataset = _DATASET.value
  if _MAKE.value:
    dataset = make_jpeg_folder(_MAKE.value, _NUM_IMAGES.value)
  if not dataset:
    raise UserError("give --dataset or --make_jpeg_folder")
  print(f"dataset={dataset} split={_SPLIT.value} crop={_CROP.value} augment={_AUGMENT.value} "
        f"batch={_BATCH.value} read_threads={_READ_THREADS.value} cpus={os.cpu_count()}")
  for workers in [int(w) for w in _WORKERS.value]:
    rate = measure(_SECONDS.value, dataset=dataset, split=_SPLIT.value,
                   pp=dict(crop=_CROP.value, resize=None, augment=_AUGMENT.value, mixup=0.0),
                   batch=_BATCH.value, seed=0, tfds_data_dir=_DATA_DIR.value, num_workers=workers,
                   read_threads=_READ_THREADS.value, batch_key="--batch")
    per = f" ({rate / workers:.0f} img/s per worker)" if workers else ""
    print(f"workers={workers}: {rate:.0f} img/s{per}", flush=True)


if __name__ == "__main__":
  app.run(lambda argv: run_cli(main, argv))
