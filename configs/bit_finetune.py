"""Fine-tune a BiT ResNet with the BiT-HyperRule (Kolesnikov et al. 2020, Sec. 3.3 and big_transfer's
bit_hyperrule.py): SGD momentum 0.9, base lr 0.003, batch 512, no weight decay; schedule, resolution and mixup from
the dataset's size and image size.

  wget https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz
  python -m vit_jax.tools.prepare_data --dataset=cifar10
  python -m vit_jax.main --config=configs/bit_finetune.py:cifar10 --workdir=runs/bit_cifar10 \
      --config.pretrained_path=BiT-M-R50x1.npz

Expected: BiT-M R50x1 on CIFAR-10 ~97.1% top-1 (the figure this config targets; the BiT paper's BiT-M, R152x4,
reaches 98.9%); not reproduced here. Needs an accelerator (10k steps of batch 512 at 128 px). `--config.model_name=BiT-R101x3
--config.pretrained_path=BiT-M-R101x3.npz` for the larger ones.

The argument picks the dataset: cifar10 (default), cifar100, oxford_iiit_pet, oxford_flowers102, imagenet2012, or
a folder of images ROOT/{train,test}/{class}/*.jpg (its training images are counted here).
The rule, by training-set size: under 20k examples 500 steps (warmup 100, 10x lr drops at steps 200, 300, 400),
20k-500k 10k steps (warmup 500, drops at 30%, 60%, 90%), above 20k steps (the same fractions); mixup alpha 0.1
from 20k examples on. Images smaller than 96x96 px are squashed to 160 px and cropped to 128 px, larger ones to 448
and 384 (the paper's figure; big_transfer's code uses 512 and 480); random crops and flips for training.
Evaluation takes the central 128 (384) of 160 (448), where big_transfer squashes the whole image to 128 (384).
"""
import os

from configs import common

# dataset: (train split, test split, training examples, (height, width) of its images)
DATASETS = {
    "cifar10": ("train", "test", 50_000, (32, 32)),
    "cifar100": ("train", "test", 50_000, (32, 32)),
    "oxford_iiit_pet": ("train", "test", 3_680, (500, 375)),
    "oxford_flowers102": ("train", "test", 1_020, (500, 500)),
    "imagenet2012": ("train", "validation", 1_281_167, (400, 350)),
}
SMALL, LARGE = 20_000, 500_000
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _folder_size(root):
  """Training images in an image folder ROOT/train/{class}/*, counted by suffix."""
  count = 0
  for _, _, names in os.walk(os.path.join(root, "train")):
    count += sum(name.lower().endswith(_IMAGE_SUFFIXES) for name in names)
  return count


def hyperrule(num_examples, image_hw):
  """(total_steps, warmup_steps, decay_steps, mixup alpha, (resize, crop)) of the BiT-HyperRule."""
  if num_examples < SMALL:
    total, warmup, decay, mixup = 500, 100, (0.4, 0.6, 0.8), 0.0
  elif num_examples < LARGE:
    total, warmup, decay, mixup = 10_000, 500, (0.3, 0.6, 0.9), 0.1
  else:
    total, warmup, decay, mixup = 20_000, 500, (0.3, 0.6, 0.9), 0.1
  resolution = (160, 128) if image_hw[0] * image_hw[1] < 96 * 96 else (448, 384)
  return total, warmup, decay, mixup, resolution


def get_config(arg="cifar10"):
  config = common.get_config()
  config.model_name = "BiT-R50x1"
  config.pretrained_path = "BiT-M-R50x1.npz"  # https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz
  config.dataset = arg
  if arg in DATASETS:
    train_split, test_split, num_examples, image_hw = DATASETS[arg]
  else:  # an image folder: its size is counted, its images taken as large
    train_split, test_split, num_examples, image_hw = "train", "test", _folder_size(arg), (224, 224)
  total, warmup, decay, mixup, (resize, crop) = hyperrule(num_examples, image_hw)
  config.pp.train = train_split
  config.pp.test = test_split
  config.pp.resize = resize
  config.pp.crop = crop
  config.pp.augment = "random_crop_flip"
  config.pp.mixup = mixup
  config.batch = 512
  config.batch_eval = 512
  config.total_steps = total
  config.warmup_steps = warmup
  config.decay_type = "steps"
  config.decay_steps = decay
  config.base_lr = 0.003
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.weight_decay = 0.0
  config.grad_norm_clip = 0.0
  config.eval_every = max(total // 10, 50)
  config.checkpoint_every = max(total // 10, 50)
  return config
