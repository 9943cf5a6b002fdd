"""Datasets for vit_jax: TFDS catalog datasets, image folders and the bundled `digits`, through grain.

Choosing a dataset (`config.dataset`):

- A TFDS name (`cifar10`, `cifar100`, `oxford_iiit_pet`, `oxford_flowers102`, `imagenet2012`, ...), read
  with random access from ArrayRecord files via `tfds.data_source` (no TensorFlow at train time). Prepare it
  once, on a machine with network access:

      python -m vit_jax.data.prepare --dataset=cifar10 [--data_dir=DIR]

  and point `config.tfds_data_dir` at DIR (default: TFDS's `~/tensorflow_datasets`). Builders that encode
  images from arrays (cifar10, cifar100, ...) need TensorFlow to *prepare*: `pip install vit_jax[tfds]`
  (tensorflow-cpu). imagenet2012 needs the manually downloaded tars: `--manual_dir=DIR`. Training never
  downloads: an unprepared dataset fails at once with the prepare command.
- A folder `ROOT/{split}/{class}/*.{jpg,jpeg,png}` (class ids: sorted class folder names, union over
  splits): `--config.dataset=/path/to/ROOT`, with `pp.train=train`, `pp.test=val` (the split folder names;
  TFDS slicing such as `train[:90%]` works). Files are read directly, not converted: random access to
  files is what ArrayRecord would give us, without a second copy of the data or a prepare step, and files
  added later are picked up. Convert to a TFDS dataset if your file system is slow on many small files.
- `digits`: the UCI handwritten digits shipped inside scikit-learn (1,797 8x8 grey images, 10 classes,
  values 0..16 scaled to 0..255 and replicated to RGB), split `train` (1,437) / `test` (360), stratified
  with a fixed seed. No network, no preparation.

Config keys read here: `dataset`, `tfds_data_dir`, `pp.train`, `pp.test` (TFDS split syntax), `pp.crop`,
`pp.resize` (eval: resize then central crop; None: resize straight to crop), `pp.augment`
(`inception_crop` | `affine` | `none`), `pp.mixup` (Beta alpha, 0 = off), `pp.strict` (corrupt image ->
error instead of skip-and-count), `batch`, `batch_eval` (global), `seed`, `num_workers` (grain worker
processes, 0 = main process), `read_threads` (per process, default 2), `prefetch` (device batches).

API:

    info = get_dataset_info(config)         # DatasetInfo(num_classes, num_train_examples, ...)
    it = make_train_iterator(config, sharding)
    batch = next(it)                        # {'image': f32 [batch, crop, crop, 3] in [-1, 1], 'label': i32}
    state = it.get_state(); it.set_state(state)
    for batch in make_eval_iterator(config, sharding):   # every example once; 'mask' 0 on padding
      ...
"""
from vit_jax.data.pipeline import check_batch
from vit_jax.data.pipeline import DataIterator
from vit_jax.data.pipeline import host_eval_dataset
from vit_jax.data.pipeline import host_train_dataset
from vit_jax.data.pipeline import make_eval_iterator
from vit_jax.data.pipeline import make_train_iterator
from vit_jax.data.sources import DatasetInfo
from vit_jax.data.sources import get_dataset_info
from vit_jax.data.sources import open_source
