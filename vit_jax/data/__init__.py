"""Datasets for vit_jax: TFDS catalog datasets, image folders and the bundled `digits`, through grain.

Choosing a dataset (`dataset`, the training config's `config.dataset`):

- A TFDS name (`cifar10`, `cifar100`, `oxford_iiit_pet`, `oxford_flowers102`, `imagenet2012`, ...), read
  with random access from ArrayRecord files via `tfds.data_source` (no TensorFlow at train time). Prepare it
  once, on a machine with network access:

      python -m vit_jax.tools.prepare_data --dataset=cifar10 [--data_dir=DIR]

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

The functions take explicit keyword arguments, never the training config; the training loop passes its keys:
`dataset`, `tfds_data_dir`, `seed`, `num_workers` (grain worker processes, 0 = main process), `read_threads` (per
process, default 2) and `prefetch` (device batches) under the same names; `split` is `pp.train` or `pp.test`
(TFDS split syntax); `batch` is `batch` (train) or `batch_eval` (eval), global; `pp` is `config.pp` itself (any
mapping): `crop`, `resize` (eval: resize then central crop; None: resize straight to crop), `augment`
(`inception_crop` | `affine` | `none`), `randaug` ((N, M): RandAugment, N ops at magnitude M in [0, 30] on the
training crop, e.g. (2, 10); () = off), `mixup` (Beta alpha, 0 = off), `cutmix` (Beta alpha, 0 = off),
`mix_switch_prob` (with mixup and cutmix both on: the share of batches that use cutmix, default 0.5), `strict`
(corrupt image -> error instead of skip-and-count). Errors name those config keys (`batch_key` names the batch
setting, e.g. `--batch_size`).

API:

    info = get_dataset_info("cifar10", train_split="train[:98%]", test_split="test")
    # DatasetInfo(num_classes, num_train_examples, num_eval_examples, class_names)
    it = make_train_iterator(dataset="cifar10", split="train[:98%]", pp=config.pp, batch=512, seed=0,
                             sharding=batch_sharding)
    batch = next(it)                        # {'image': f32 [batch, crop, crop, 3] in [-1, 1], 'label': i32}
    state = it.get_state(); it.set_state(state)
    for batch in make_eval_iterator(dataset="cifar10", split="test", pp=config.pp, batch=512,
                                    sharding=batch_sharding):   # every example once; 'mask' 0 on padding
      ...
    source = open_source("digits", "test")  # random access to raw records {'image', 'label', 'id'}
    image, reason = files.load("cat.jpg", {"crop": 224, "resize": None})   # one file, as eval sees it
    check_pp(config.pp)                     # a UserError naming the bad pp key, before anything is read
"""
from vit_jax.data import files
from vit_jax.data.pipeline import DataIterator
from vit_jax.data.pipeline import host_eval_dataset
from vit_jax.data.pipeline import host_train_dataset
from vit_jax.data.pipeline import make_eval_iterator
from vit_jax.data.pipeline import make_train_iterator
from vit_jax.data.preprocess import check_pp
from vit_jax.data.sources import DatasetInfo
from vit_jax.data.sources import get_dataset_info
from vit_jax.data.sources import IndexedSource
from vit_jax.data.sources import open_source
