"""Fine-tune ImageNet-21k ViT-B/16 from the model zoo at 384 px with the zoo recipe (SGD momentum, cosine).

  wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz
  python -m vit_jax.tools.prepare_data --dataset=cifar10
  python -m vit_jax.main --config=configs/vit_b16.py --workdir=runs/vit_b16_cifar10 \
      --config.pretrained_path=ViT-B_16.npz

Expected (the paper's recipe, 10k steps at batch 512): CIFAR-10 99.0%, CIFAR-100 ~91.7%, Pets ~94%,
Flowers ~99%, ImageNet ~84% top-1 (ImageNet uses 20k steps). Needs an accelerator: ~1 day on a TPUv3-8 class host.

The argument picks the dataset: cifar10 (default), cifar100, imagenet2012, oxford_iiit_pet, oxford_flowers102,
or a folder of images ROOT/{train,test}/{class}/*.jpg, e.g. `--config=configs/vit_b16.py:/data/my_images`.
Any registry model works: `--config.model_name=ViT-L_16 --config.pretrained_path=ViT-L_16.npz`.
`--config.pp.crop=224` fine-tunes at the pretraining resolution; other sizes resize the position embeddings.
Out of memory? `--config.accum_steps=8` keeps the batch of 512 at an eighth of the activation memory.
"""
from configs import common

# dataset: (train split, test split, total steps); the splits follow the zoo's fine-tuning setup.
DATASETS = {
    "cifar10": ("train[:98%]", "test", 10_000),
    "cifar100": ("train[:98%]", "test", 10_000),
    "imagenet2012": ("train[:99%]", "validation", 20_000),
    "oxford_iiit_pet": ("train[:90%]", "test", 500),
    "oxford_flowers102": ("train[:90%]", "test", 500),
}


def get_config(arg="cifar10"):
  config = common.get_config()
  config.model_name = "ViT-B_16"
  config.pretrained_path = "ViT-B_16.npz"  # https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz
  config.dataset = arg
  train_split, test_split, total_steps = DATASETS.get(arg, ("train", "test", 10_000))  # else: an image folder
  config.pp.train = train_split
  config.pp.test = test_split
  config.pp.crop = 384
  config.pp.augment = "inception_crop"
  config.batch = 512
  config.batch_eval = 512
  config.total_steps = total_steps
  config.warmup_steps = min(500, total_steps // 10)
  config.base_lr = 0.03
  config.decay_type = "cosine"
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.grad_norm_clip = 1.0
  config.eval_every = 1000
  config.checkpoint_every = 1000
  return config
